"""Attention kernels: SDPA (default), xformers (when importable, on CUDA), a float32 torch reference,
SNOOPI's negative-prompt steering of cross-attention (``negative_prompt_steering``), and the switch of
a whole backbone's attention layers (``set_model_attention``, ``trainer.attention``).

Each kernel is tested against ``reference_attention`` (tests/unit/test_kernels.py).
"""

from stepdistill.kernels.attention import (
    BACKENDS,
    MODEL_BACKENDS,
    attention,
    attention_layers,
    check_model_backend,
    reference_attention,
    runnable_model_backend,
    sdpa_attention,
    select_backend,
    set_model_attention,
    set_run_attention,
    xformers_attention,
    xformers_available,
)
from stepdistill.kernels.negative_steering import (
    NegativeSteeringAttnProcessor,
    cross_attention_layers,
    negative_prompt_steering,
)

__all__ = ["BACKENDS", "MODEL_BACKENDS", "NegativeSteeringAttnProcessor", "attention", "attention_layers",
           "check_model_backend", "cross_attention_layers", "negative_prompt_steering", "reference_attention",
           "runnable_model_backend", "sdpa_attention", "select_backend", "set_model_attention",
           "set_run_attention", "xformers_attention", "xformers_available"]
