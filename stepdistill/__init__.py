"""stepdistill: step distillation for diffusers models."""
import logging

__version__ = "0.1.0"

# torchao (the optional 8-bit AdamW) makes every diffusers model load warn on stderr: its CUDA-only
# kernels fail to load on a CPU, diffusers 0.42 cannot import torchao 0.18's quantized tensor types, and
# torch flags torchao's Enum registrations. stepdistill uses none of them; errors still show.
for _name in ("torchao", "diffusers.quantizers.torchao.torchao_quantizer", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
