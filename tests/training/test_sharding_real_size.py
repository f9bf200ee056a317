"""``sharding.shard`` on the real architectures, built on the meta device (no weights): every
parameter ends up in a per-block FSDP unit, and no unit gathers more than a small slice of the model
at once (one unit over the whole backbone would gather all of it)."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from stepdistill.planner.stack import preset_stack
from stepdistill.training import sharding

#: backbone -> (FSDP units, the largest unit's share of the parameters): SDXL 102 units, the largest
#: 1.9% of 2.57 B (its all-gather holds 49 M parameters whole), SD3-medium 25 (4.2%),
#: Flux.1-dev 58 (2.9%)
EXPECTED = {"sdxl": (102, 0.0191), "sd3-medium": (25, 0.0419), "flux-dev": (58, 0.0286)}


def _unit_sizes(module: torch.nn.Module) -> list[int]:
    """Parameters each FSDP unit gathers in its own all-gather."""
    sizes = []
    for m in module.modules():
        if isinstance(m, FSDPModule):
            group = m._get_fsdp_state()._fsdp_param_group
            sizes.append(sum(p.sharded_param.numel() for p in group.fsdp_params) if group else 0)
    return sizes


@pytest.fixture(scope="module")
def mesh():
    mesh = sharding.device_mesh("fsdp", torch.device("cpu"))  # a process group of one
    yield mesh
    dist.destroy_process_group()


@pytest.mark.parametrize("name", list(EXPECTED))
def test_real_backbones_shard_per_block(mesh, name):
    backbone = preset_stack(name).backbone
    total = sum(p.numel() for p in backbone.parameters())
    units = sharding.shard(torch.nn.ModuleDict({"denoiser": backbone}), mesh)
    assert all(isinstance(p, DTensor) for p in backbone.parameters())
    sizes = _unit_sizes(backbone)
    count, share = EXPECTED[name]
    assert units == len(sizes) == count
    assert sum(sizes) == total
    assert max(sizes) / total == pytest.approx(share, abs=1e-4)
