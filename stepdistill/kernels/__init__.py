"""Attention kernels: SDPA (default), xformers (when importable, on CUDA), a float32 torch reference,
and SNOOPI's negative-prompt steering of cross-attention (``negative_prompt_steering``).

Each kernel is tested against ``reference_attention`` (tests/unit/test_kernels.py).
"""

from stepdistill.kernels.attention import (
    BACKENDS,
    attention,
    reference_attention,
    sdpa_attention,
    select_backend,
    xformers_attention,
    xformers_available,
)
from stepdistill.kernels.negative_steering import (
    NegativeSteeringAttnProcessor,
    cross_attention_layers,
    negative_prompt_steering,
)

__all__ = ["BACKENDS", "NegativeSteeringAttnProcessor", "attention", "cross_attention_layers",
           "negative_prompt_steering", "reference_attention", "sdpa_attention", "select_backend",
           "xformers_attention", "xformers_available"]
