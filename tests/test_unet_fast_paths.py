"""The U-Net's CPU training fast paths (issue 12): small convolutions as one matrix product, the cheaper dropout
mask, and float32 GroupNorm/attention under CPU autocast. Each is checked against the plain computation it replaces.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ddpm_components import unet_ddpm
from ddpm_components.unet_ddpm import DDPMUNet2DModel, Dropout, conv3x3_as_matmul

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# lowest resolution 2x2 (16 -> 8 -> 4 -> 2), so the fast convolution path is taken in training
SMALL = {
    "sample_size": 16,
    "in_channels": 3,
    "block_out_channels": (8, 16, 16, 16),
    "layers_per_block": 1,
    "attention_resolutions": (4,),
    "norm_num_groups": 4,
    "num_class_embeds": 3,
}


def make(dtype: torch.dtype = torch.float32, **overrides) -> DDPMUNet2DModel:
    torch.manual_seed(0)
    model = DDPMUNet2DModel(**{**SMALL, **overrides}).to(dtype)
    with torch.no_grad():  # zero-initialised layers would hide bugs
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


@pytest.mark.parametrize("size", [(2, 2), (1, 1), (1, 2), (2, 1)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_conv3x3_as_matmul_equals_the_convolution_and_its_gradients(size, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, kernel_size=3, padding=1).double()
    x = torch.randn(4, 6, *size, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(4, 5, *size, dtype=torch.float64)

    def run(function):
        conv.zero_grad()
        leaf = x.clone().requires_grad_()
        out = function(leaf)
        (out * upstream).sum().backward()
        return out, leaf.grad, conv.weight.grad.clone(), conv.bias.grad.clone()

    expected = run(conv)
    got = run(lambda leaf: conv3x3_as_matmul(conv, leaf))
    for name, a, b in zip(("output", "input grad", "weight grad", "bias grad"), got, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=name)
    # the output keeps the input's layout (dense channels-last, or contiguous)
    assert got[0].is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


def test_conv3x3_fast_path_is_taken_only_in_cpu_training_at_2x2_or_less(monkeypatch):
    calls: list[tuple[int, int]] = []
    original = unet_ddpm.conv3x3_as_matmul

    def spy(conv, hidden_states):
        calls.append(tuple(hidden_states.shape[-2:]))
        return original(conv, hidden_states)

    monkeypatch.setattr(unet_ddpm, "conv3x3_as_matmul", spy)
    model = make()
    x = torch.randn(2, 3, 16, 16)
    model.train()
    model(x, 5, class_labels=torch.tensor([0, 2])).sample.sum().backward()
    # one residual block on the way down, the two of the middle block and two on the way up: 2 convolutions each
    assert calls and set(calls) == {(2, 2)} and len(calls) == 2 * (1 + 2 + 2)
    calls.clear()
    with torch.no_grad():
        model(x, 5, class_labels=torch.tensor([0, 2]))
    model.eval()
    with torch.enable_grad():
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        model(x, 5, class_labels=torch.tensor([0, 2]))
    assert calls == []  # inference (no grad, or frozen weights) keeps the module's convolution


def test_training_step_matches_the_plain_convolutions(monkeypatch):
    """A float64 forward and backward of the whole model with the fast convolution equals the one without it."""
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2])

    def gradients() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = make(torch.float64, dropout=0.0).train()
        out = model(x, torch.tensor([3, 500, 999]), class_labels=labels).sample
        out.square().mean().backward()
        return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    fast_out, fast = gradients()
    monkeypatch.setattr(unet_ddpm, "conv3x3_as_matmul", lambda conv, hidden_states: conv(hidden_states))
    plain_out, plain = gradients()
    torch.testing.assert_close(fast_out, plain_out, atol=1e-12, rtol=1e-10)
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], atol=1e-12, rtol=1e-9, msg=name)


def test_dropout_keeps_each_value_with_probability_1_minus_p_and_rescales():
    p = 0.1
    dropout = Dropout(p).train()
    x = torch.full((64, 32, 16, 16), 2.0).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    out = dropout(x)
    kept = out != 0
    assert torch.equal(out[kept], torch.full_like(out[kept], 2.0 / (1 - p)))
    n = x.numel()
    # the kept count is Binomial(n, 1 - p): within 6 standard deviations (a failure rate of ~1e-9)
    assert abs(kept.sum().item() - n * (1 - p)) < 6 * math.sqrt(n * p * (1 - p))
    assert out.is_contiguous(memory_format=torch.channels_last)  # the mask follows the layout
    # seeded: the same mask again; a different draw next time
    torch.manual_seed(0)
    assert torch.equal(dropout(x), out)
    assert not torch.equal(dropout(x), out)
    # the gradient is the mask times 1 / (1 - p)
    leaf = x.clone().requires_grad_()
    torch.manual_seed(1)
    dropped = dropout(leaf)
    dropped.sum().backward()
    torch.testing.assert_close(leaf.grad, (dropped != 0).float() / (1 - p))


def test_dropout_is_the_identity_in_eval_and_torch_s_own_elsewhere():
    x = torch.randn(4, 8, 4, 4)
    assert torch.equal(Dropout(0.3).eval()(x), x)
    # inplace: torch's own dropout (the same function as nn.Dropout from the same random state)
    torch.manual_seed(5)
    expected = nn.Dropout(0.3, inplace=True).train()(x.clone())
    torch.manual_seed(5)
    assert torch.equal(Dropout(0.3, inplace=True).train()(x.clone()), expected)


def test_cpu_autocast_runs_group_norm_and_attention_in_float32():
    model = make().train()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2])
    seen: dict[str, torch.dtype] = {}

    def record(module, inputs, output) -> None:
        seen["norm"] = output.dtype

    model.down_blocks[0].resnets[0].norm1.register_forward_hook(record)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, 7, class_labels=labels).sample
        # the group norm helper itself: float32 output equal to float32 GroupNorm of the bfloat16 input
        norm = model.down_blocks[1].resnets[0].norm2
        h = torch.randn(2, 16, 8, 8).to(torch.bfloat16)
        normed = unet_ddpm._group_norm(norm, h)
    assert normed.dtype == torch.float32
    torch.testing.assert_close(normed, norm(h.float()))
    assert "norm" not in seen  # the module's own forward is bypassed under autocast (F.group_norm in float32)
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    reference = model(x, 7, class_labels=labels).sample
    # bfloat16 convolutions: within bfloat16's precision of the float32 model
    torch.testing.assert_close(out.float(), reference, atol=0.05, rtol=0.05)
    # outside autocast the module runs as before
    model(x, 7, class_labels=labels)
    assert seen["norm"] == torch.float32
    plain_norm = model.down_blocks[1].resnets[0].norm2
    torch.testing.assert_close(unet_ddpm._group_norm(plain_norm, h.float()), plain_norm(h.float()))


def test_a_bfloat16_model_under_cpu_autocast_runs():
    """Weights in bfloat16 (``from_pretrained(torch_dtype=torch.bfloat16)``) under CPU autocast: the float32
    GroupNorm takes the bf16 weights too."""
    model = make(torch.bfloat16).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, 7, class_labels=torch.tensor([1, 2])).sample
    assert out.shape == x.shape and torch.isfinite(out.float()).all()
