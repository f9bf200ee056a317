"""Tensors that may be sharded (FSDP2's DTensors): the two conversions every module that mixes whole
and sharded tensors needs."""

from __future__ import annotations

from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor


def whole(t: Tensor) -> Tensor:
    """A sharded tensor gathered whole (a collective: every process must call it); any other as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shaped_like(value: Tensor, like: Tensor) -> Tensor:
    """The whole ``value`` laid out as ``like``: this process's shard of it when ``like`` is sharded
    (sliced locally, no communication), else ``value`` itself."""
    if not isinstance(like, DTensor):
        return value
    return distribute_tensor(value.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)
