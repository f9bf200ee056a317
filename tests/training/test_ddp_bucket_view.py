"""``trainer.gradient_as_bucket_view`` (default true): DDP's gradients are views into its
communication buckets, so a trained role holds one copy of its gradients instead of two.

The memory is counted from the real storages after a backward: the buckets (captured with a comm hook)
plus every gradient storage that is not inside a bucket.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stepdistill.training.callbacks import LoggerConfig
from stepdistill.training.settings import TrainerConfig, build_accelerator


def _gradient_bytes(tmp_path, bucket_view: bool) -> tuple[int, int]:
    """(bytes of DDP's buckets, bytes of gradient storages outside them) after one backward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.SiLU(), nn.Linear(256, 64))
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / f"store{bucket_view}"), 1), rank=0,
                            world_size=1)
    try:
        ddp = DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
        buckets: dict[int, int] = {}

        def hook(_state, bucket):
            buffer = bucket.buffer()
            buckets[buffer.untyped_storage().data_ptr()] = buffer.untyped_storage().nbytes()
            future = torch.futures.Future()
            future.set_result(buffer)
            return future

        ddp.register_comm_hook(None, hook)
        ddp(torch.randn(8, 64)).square().mean().backward()
        outside = {p.grad.untyped_storage().data_ptr(): p.grad.untyped_storage().nbytes()
                   for p in model.parameters() if p.grad.untyped_storage().data_ptr() not in buckets}
        return sum(buckets.values()), sum(outside.values())
    finally:
        dist.destroy_process_group()


def test_bucket_views_hold_one_copy_of_the_gradients_instead_of_two(tmp_path):
    parameters = 64 * 256 + 256 + 256 * 64 + 64
    in_buckets, outside = _gradient_bytes(tmp_path, bucket_view=True)
    assert (in_buckets, outside) == (4 * parameters, 0)
    in_buckets, outside = _gradient_bytes(tmp_path, bucket_view=False)
    assert (in_buckets, outside) == (4 * parameters, 4 * parameters)  # 131,584 bytes saved here


def test_the_trainer_asks_ddp_for_bucket_views_unless_told_not_to(tmp_path):
    for flag in (True, False):
        accelerator = build_accelerator(TrainerConfig(cpu=True, gradient_as_bucket_view=flag), LoggerConfig(),
                                        tmp_path)
        assert accelerator.ddp_handler.to_kwargs().get("gradient_as_bucket_view", False) is flag
