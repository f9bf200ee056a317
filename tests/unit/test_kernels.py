"""Attention backends equal the float32 reference; the NASA steering processor equals diffusers'
AttnProcessor2_0 at scale 0 and a hand-written formula at scale alpha."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from stepdistill.kernels import (
    NegativeSteeringAttnProcessor,
    attention,
    cross_attention_layers,
    negative_prompt_steering,
    reference_attention,
    select_backend,
    xformers_available,
)

# the package re-exports the function ``attention``, which hides the submodule of the same name
attention_module = importlib.import_module("stepdistill.kernels.attention")

# (B, H, N, M, d): square, cross-attention lengths (77 keys as CLIP), odd sizes, one head
SHAPES = [(1, 1, 4, 4, 8), (2, 3, 17, 9, 16), (2, 4, 64, 77, 40), (3, 2, 5, 33, 64)]
# max |backend - reference| allowed, by dtype (measured on CPU: 6e-7 in float32; 7.8e-3 in
# bfloat16, one bfloat16 ulp at outputs in [1, 2): the float32 reference is rounded once, the kernel too)
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 1.6e-2}


def usable_backends() -> list[tuple[str, str]]:
    """(backend, device) pairs this machine can run: sdpa on the CPU, plus CUDA ones when present."""
    pairs = [("sdpa", "cpu"), ("auto", "cpu")]
    if torch.cuda.is_available():
        pairs.append(("sdpa", "cuda"))
        if xformers_available():
            pairs.append(("xformers", "cuda"))
    return pairs


def qkv(shape, dtype, device="cpu", seed=0):
    b, h, n, m, d = shape
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(size, generator=g) for size in ((b, h, n, d), (b, h, m, d), (b, h, m, d))]
    return [t.to(device, dtype) for t in tensors]


def random_masks(shape, dtype, device="cpu", seed=1):
    """A boolean key-padding mask [B, 1, 1, M] (every row keeps a key) and the same as an additive bias."""
    b, _, _, m, _ = shape
    keep = torch.rand((b, 1, 1, m), generator=torch.Generator().manual_seed(seed)) > 0.3
    keep[..., 0] = True
    bias = torch.zeros(keep.shape).masked_fill(~keep, -10000.0)
    return keep.to(device), bias.to(device, dtype)


# --------------------------------------------------------------------------- backends
@pytest.mark.parametrize(("backend", "device"), usable_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_backends_equal_reference(backend, device, dtype, shape):
    q, k, v = qkv(shape, dtype, device)
    out = attention(q, k, v, backend=backend)
    assert out.shape == (*shape[:3], shape[4]) and out.dtype == dtype
    expected = reference_attention(q, k, v)
    assert (out.float() - expected.float()).abs().max() <= TOLERANCE[dtype]


@pytest.mark.parametrize(("backend", "device"), usable_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_backends_equal_reference_with_masks(backend, device, dtype, shape):
    q, k, v = qkv(shape, dtype, device)
    keep, bias = random_masks(shape, dtype, device)
    expected = reference_attention(q, k, v, keep)
    for mask in (keep, bias):
        out = attention(q, k, v, mask=mask, backend=backend)
        assert (out.float() - expected.float()).abs().max() <= TOLERANCE[dtype]


def test_reference_is_the_formula_and_masks_drop_keys():
    q, k, v = qkv((2, 3, 5, 7, 4), torch.float64)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)
    assert torch.allclose(reference_attention(q, k, v), weights @ v, atol=1e-6)
    keep = torch.zeros(1, 1, 1, 7, dtype=torch.bool)
    keep[..., :3] = True  # masked keys are as if absent
    dropped = reference_attention(q, k[..., :3, :], v[..., :3, :])
    assert torch.allclose(reference_attention(q, k, v, keep), dropped, atol=1e-6)


def test_auto_picks_sdpa_on_cpu():
    assert select_backend("cpu") == "sdpa" and select_backend(torch.device("cpu")) == "sdpa"
    q, k, v = qkv(SHAPES[1], torch.float32)
    assert torch.equal(attention(q, k, v), attention(q, k, v, backend="sdpa"))


def test_missing_xformers_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(attention_module, "xformers_ops", lambda: None)
    assert not xformers_available() and select_backend("cuda") == "sdpa"
    q, k, v = qkv(SHAPES[0], torch.float32)
    with pytest.raises(ValueError, match=r"'xformers' is not installed: pip install -e \"\.\[xformers\]\" on a "
                                         r"CUDA machine, or use backend='sdpa'") as info:
        attention(q, k, v, backend="xformers")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="not installed"):
        NegativeSteeringAttnProcessor(torch.zeros(1, 2, 3), backend="xformers")


def test_xformers_on_cpu_tensors_and_unknown_backends_are_errors(monkeypatch):
    monkeypatch.setattr(attention_module, "xformers_ops", lambda: object())
    q, k, v = qkv(SHAPES[0], torch.float32)
    with pytest.raises(ValueError, match=r"'xformers' needs CUDA tensors \(got cpu\); use backend='sdpa'"):
        attention(q, k, v, backend="xformers")
    with pytest.raises(ValueError, match="unknown attention backend 'flash'; allowed: auto, sdpa, xformers, reference"):
        attention(q, k, v, backend="flash")


# --------------------------------------------------------------------------- the steering processor
QUERY_DIM, CONTEXT_DIM, HEADS, HEAD_DIM = 32, 24, 4, 8
LAYER_OPTIONS = {  # plain SD cross-attention, and every normalisation / residual path AttnProcessor2_0 has
    "sd": {},
    "norms_residual": {"cross_attention_norm": "layer_norm", "qk_norm": "layer_norm", "norm_num_groups": 4,
                       "residual_connection": True, "rescale_output_factor": 2.0, "out_bias": True},
}


def cross_attention(options: dict, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    layer = Attention(QUERY_DIM, cross_attention_dim=CONTEXT_DIM, heads=HEADS, dim_head=HEAD_DIM, **options).eval()
    with torch.no_grad():
        for p in layer.parameters():  # norms start at identity: move them too
            p.add_(0.1 * torch.randn(p.shape))
    return layer


def inputs(spatial: bool, batch: int = 2, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, QUERY_DIM, 4, 5) if spatial else (batch, 20, QUERY_DIM)
    hidden = torch.randn(shape, generator=g)
    context = torch.randn(batch, 7, CONTEXT_DIM, generator=g)
    negative = torch.randn(batch, 9, CONTEXT_DIM, generator=g)
    return hidden, context, negative


@pytest.mark.parametrize("options", LAYER_OPTIONS.values(), ids=LAYER_OPTIONS.keys())
@pytest.mark.parametrize("spatial", [False, True])
def test_scale_zero_is_diffusers_attn_processor(options, spatial):
    layer = cross_attention(options)
    hidden, context, negative = inputs(spatial)
    mask = torch.ones(2, 7)
    mask[0, 5:] = 0
    bias = (1 - mask)[:, None, :] * -10000.0  # what UNet2DConditionModel makes of encoder_attention_mask
    with torch.no_grad():
        for attention_mask in (None, bias):
            expected = AttnProcessor2_0()(layer, hidden, context, attention_mask)
            ours = NegativeSteeringAttnProcessor(negative, scale=0.0)(layer, hidden, context, attention_mask)
            assert torch.equal(ours, expected)  # the same ops in the same order: bitwise equal


def test_without_a_context_it_is_plain_self_attention():
    torch.manual_seed(0)
    layer = Attention(QUERY_DIM, heads=HEADS, dim_head=HEAD_DIM).eval()
    hidden, _, negative = inputs(spatial=False)
    with torch.no_grad():
        assert torch.equal(NegativeSteeringAttnProcessor(negative)(layer, hidden), AttnProcessor2_0()(layer, hidden))


def hand_written_nasa(layer: Attention, hidden, context, negative, alpha):
    """to_out(softmax(Q K+^T / sqrt d) V+ - alpha softmax(Q K-^T / sqrt d) V-), per head, for the plain layer."""
    def heads(x):
        return x.view(x.shape[0], x.shape[1], HEADS, HEAD_DIM).transpose(1, 2)

    def attend(q, ctx):
        k, v = heads(layer.to_k(ctx)), heads(layer.to_v(ctx))
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM), dim=-1) @ v

    q = heads(layer.to_q(hidden))
    out = attend(q, context) - alpha * attend(q, negative)
    return layer.to_out[0](out.transpose(1, 2).reshape(hidden.shape[0], -1, HEADS * HEAD_DIM))


@pytest.mark.parametrize("backend", ["auto", "sdpa", "reference"])
@pytest.mark.parametrize("alpha", [0.5, 1.3])
def test_steering_equals_hand_written_formula(backend, alpha):
    layer = cross_attention(LAYER_OPTIONS["sd"])
    hidden, context, negative = inputs(spatial=False)
    with torch.no_grad():
        expected = hand_written_nasa(layer, hidden, context, negative, alpha)
        ours = NegativeSteeringAttnProcessor(negative, scale=alpha, backend=backend)(layer, hidden, context)
        plain = AttnProcessor2_0()(layer, hidden, context)
    assert (ours - expected).abs().max() <= 2e-6  # measured: 3e-7 (sdpa), 0 (reference)
    assert (ours - plain).abs().max() > 1e-2


def test_one_negative_broadcasts_over_the_batch():
    layer = cross_attention(LAYER_OPTIONS["sd"])
    hidden, context, negative = inputs(spatial=False, batch=3)
    with torch.no_grad():
        one = NegativeSteeringAttnProcessor(negative[:1])(layer, hidden, context)
        repeated = NegativeSteeringAttnProcessor(negative[:1].expand(3, -1, -1))(layer, hidden, context)
        assert torch.equal(one, repeated)
        with pytest.raises(ValueError, match="negative prompt batch 2 does not match the batch 3; pass 1 or 3"):
            NegativeSteeringAttnProcessor(negative[:2])(layer, hidden, context)
    with pytest.raises(ValueError, match=r"negative_embeds must be \[B, L, D\]"):
        NegativeSteeringAttnProcessor(negative[0])


# --------------------------------------------------------------------------- installation
class TwoAttentions(torch.nn.Module):
    """A self-attention (attn1) and a cross-attention (attn2), called as a transformer block does."""

    def __init__(self) -> None:
        super().__init__()
        self.attn1 = Attention(QUERY_DIM, heads=HEADS, dim_head=HEAD_DIM)
        self.attn2 = cross_attention(LAYER_OPTIONS["sd"])

    def forward(self, hidden, context):
        hidden = hidden + self.attn1(hidden)
        return hidden + self.attn2(hidden, encoder_hidden_states=context)


def test_context_manager_steers_cross_attention_only_and_restores():
    model = TwoAttentions().eval()
    hidden, context, negative = inputs(spatial=False)
    before = {name: m.processor for name, m in model.named_modules() if isinstance(m, Attention)}
    assert list(cross_attention_layers(model)) == ["attn2"]
    with torch.no_grad():
        plain = model(hidden, context)
        with negative_prompt_steering(model, negative, scale=0.7) as processor:
            assert model.attn2.processor is processor and model.attn1.processor is before["attn1"]
            steered = model(hidden, context)
        assert all(m.processor is before[name] for name, m in model.named_modules() if isinstance(m, Attention))
        assert torch.equal(model(hidden, context), plain)
        with negative_prompt_steering(model, negative, scale=0.0):
            assert torch.equal(model(hidden, context), plain)
    assert (steered - plain).abs().max() > 1e-2


def test_context_manager_restores_on_exception_and_needs_cross_attention():
    model = TwoAttentions()
    original = model.attn2.processor
    with pytest.raises(RuntimeError, match="boom"), negative_prompt_steering(model, torch.zeros(1, 3, CONTEXT_DIM)):
        raise RuntimeError("boom")
    assert model.attn2.processor is original
    with pytest.raises(ValueError, match="Linear has no cross-attention layers to steer"):
        with negative_prompt_steering(torch.nn.Linear(2, 2), torch.zeros(1, 3, CONTEXT_DIM)):
            pass
