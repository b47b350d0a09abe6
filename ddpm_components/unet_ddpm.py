"""The DDPM noise-prediction U-Net (Ho et al. 2020, Appendix B) as a diffusers model.

``DDPMUNet2DModel`` is a PixelCNN++-style U-Net: a sinusoidal timestep embedding followed by an MLP; at
each resolution level ``layers_per_block`` residual blocks (GroupNorm, SiLU, dropout, the time embedding
added, or Improved-DDPM's scale-shift normalisation), optionally followed by single- or multi-head self
attention; strided-convolution down-sampling, nearest-neighbour up-sampling followed by a convolution, and
skip connections from every down-path activation to the matching up-path residual block.

Options beyond the paper: class conditioning with an extra "null" class for classifier-free guidance,
learned variance (``out_channels = 2 * in_channels``), gradient checkpointing, and conversion from and to
diffusers' :class:`~diffusers.UNet2DModel` (the format of the official DDPM checkpoints on the Hub).

This module is self-contained (it imports only torch, diffusers and the standard library) because saved
pipelines carry it next to the weights as remote code.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn

TimeScaleShift = Literal["default", "scale_shift"]

#: Named configurations; ``DDPMUNet2DModel.from_preset(name, **overrides)`` builds one.
PRESETS: dict[str, dict[str, Any]] = {
    # DDPM paper, CIFAR-10 (Appendix B): ch 128, multipliers 1,2,2,2, 2 residual blocks per level,
    # self attention at 16x16, dropout 0.1; 35.7M parameters. Same layout as google/ddpm-cifar10-32.
    "cifar10": {
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (128, 256, 256, 256),
        "layers_per_block": 2,
        "attention_resolutions": (16,),
        "dropout": 0.1,
    },
    # DDPM paper, 256x256 models (CelebA-HQ, LSUN): ch 128, multipliers 1,1,2,2,4,4, 2 residual blocks,
    # self attention at 16x16; layout of google/ddpm-celebahq-256, google/ddpm-church-256, ...
    "celebahq256": {
        "sample_size": 256,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (128, 128, 256, 256, 512, 512),
        "layers_per_block": 2,
        "attention_resolutions": (16,),
        "dropout": 0.0,
    },
    # A small model for the embedded 8x8 greyscale digits (also works at 16x16: pass sample_size=16).
    "digits": {
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 2,
        "attention_resolutions": (4,),
        "dropout": 0.1,
        "norm_num_groups": 16,
    },
}
PRESETS["lsun256"] = dict(PRESETS["celebahq256"])

PresetName = Literal["cifar10", "celebahq256", "lsun256", "digits"]


@dataclass
class DDPMUNet2DOutput(BaseOutput):
    """Output of :class:`DDPMUNet2DModel`.

    Args:
        sample: ``(batch, out_channels, height, width)``: the predicted noise, original sample or velocity
            (and, with learned variance, the variance parametrisation in the second half of the channels).
    """

    sample: torch.Tensor


# Copied from ddpm_components.scheduling_ddpm._check_choice
def _check_choice(name: str, value: object, choices: tuple[object, ...]) -> None:
    """Raise a ValueError naming the option, the bad value and every valid choice unless ``value`` is one of
    ``choices``: ``beta_schedule='foo' is not supported; choose one of 'linear', 'scaled_linear', ...``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}.")


def sinusoidal_timestep_embedding(
    timesteps: torch.Tensor, embedding_dim: int, flip_sin_to_cos: bool = False, freq_shift: float = 1.0
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM's ``get_timestep_embedding``.

    Frequencies are ``exp(-log(10000) * i / (half - freq_shift))`` for ``i < half = embedding_dim // 2``;
    the result is ``[sin, cos]`` (``[cos, sin]`` with ``flip_sin_to_cos``), zero-padded to an odd
    ``embedding_dim``. Computed in float32.
    """
    half = embedding_dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) * (
        -math.log(10000.0) / (half - freq_shift)
    )
    angles = timesteps.float()[:, None] * torch.exp(exponent)[None, :]
    if flip_sin_to_cos:
        embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    else:
        embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if embedding_dim % 2 == 1:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class TimestepMLP(nn.Module):
    """The time-embedding MLP: Linear, SiLU, Linear."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(embedding)))


class Dropout(nn.Dropout):
    """``nn.Dropout`` (keep each element with probability 1 - p, scale the kept ones by 1 / (1 - p)) whose mask, in
    training on CPU, comes from 31-bit random integers compared with ``round((1 - p) * 2**31)``: the same
    distribution as torch's Bernoulli draw (keep probability exact to 2**-32), at a third of its cost on CPU (measured:
    0.5 ms instead of 1.5 ms for a 128x32x8x8 activation; the draw was 5% of a training step of the digits model). The
    mask follows the input's memory layout (channels-last activations, see :meth:`DDPMUNet2DModel.forward`). Elsewhere
    (GPU, evaluation, ``inplace``) this is torch's own dropout."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or not 0.0 < self.p < 1.0 or self.inplace or input.device.type != "cpu":
            return super().forward(input)
        keep = 1.0 - self.p
        integers = torch.empty_like(input, dtype=torch.int32).random_()  # uniform on 0 .. 2**31 - 1
        noise = (integers < round(keep * 2**31)).to(input.dtype).div_(keep)
        return input * noise


@functools.cache
def _tap_table(height: int, width: int, device: torch.device) -> torch.Tensor:
    """``(HW * HW,)`` index of the 3x3 kernel tap linking each (output pixel, input pixel) pair, row-major over
    ``height x width`` pixels: tap ``(dy + 1) * 3 + (dx + 1)`` for the input at offset (dy, dx) from the output.
    Only for ``height, width <= 2``, where every pair is within the kernel's reach."""
    pixels = [(row, column) for row in range(height) for column in range(width)]
    taps = [(inp[0] - out[0] + 1) * 3 + (inp[1] - out[1] + 1) for out in pixels for inp in pixels]
    return torch.tensor(taps, dtype=torch.long, device=device)


def conv3x3_as_matmul(conv: nn.Conv2d, hidden_states: torch.Tensor) -> torch.Tensor:
    """``conv(hidden_states)`` (a 3x3 convolution, stride 1, padding 1) for an input of at most 2x2 pixels, computed as
    one matrix product: every output pixel then sees every input pixel, so the convolution is a dense linear map
    from the ``HW * C_in`` input values to the ``HW * C_out`` output values, whose ``(HW * C_out, HW * C_in)`` matrix
    is assembled from the kernel's taps. Same function (up to float rounding), but one GEMM instead of a convolution
    that mostly multiplies zero padding: measured 1.9x faster forward and backward on CPU for the digits model's
    64-channel 2x2 convolutions (128 images). The output is channels-last (the matrix product's natural layout) if
    the input is, else contiguous."""
    batch, channels, height, width = hidden_states.shape
    pixels = height * width
    out_channels = conv.out_channels
    # (tap, C_out, C_in) -> blocks (out pixel, in pixel, C_out, C_in) -> rows (out pixel, C_out), columns (in pixel, C_in)
    taps = conv.weight.permute(2, 3, 0, 1).reshape(9, out_channels, channels)
    blocks = taps[_tap_table(height, width, hidden_states.device)].view(
        pixels, pixels, out_channels, channels
    )
    matrix = blocks.transpose(1, 2).reshape(pixels * out_channels, pixels * channels)
    bias = None if conv.bias is None else conv.bias.repeat(pixels)
    flat = hidden_states.permute(0, 2, 3, 1).reshape(batch, pixels * channels)  # a view when channels-last
    out = F.linear(flat, matrix, bias).view(batch, height, width, out_channels).permute(0, 3, 1, 2)
    return out if hidden_states.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


def _conv3x3(conv: nn.Conv2d, hidden_states: torch.Tensor) -> torch.Tensor:
    """A residual block's 3x3 convolution: :func:`conv3x3_as_matmul` in training on CPU at 2x2 pixels or fewer,
    else the module itself (inference keeps oneDNN's convolution: there the matrix product measured no faster)."""
    if (
        hidden_states.shape[-1] <= 2
        and hidden_states.shape[-2] <= 2
        and hidden_states.device.type == "cpu"
        and torch.is_grad_enabled()
        and conv.weight.requires_grad
        and not torch.compiler.is_compiling()
    ):
        return conv3x3_as_matmul(conv, hidden_states)
    return conv(hidden_states)


def _cpu_autocast_lower_precision(hidden_states: torch.Tensor) -> bool:
    """Whether ``hidden_states`` is a bfloat16/float16 activation under CPU autocast (mixed-precision training on CPU)."""
    return (
        hidden_states.dtype in (torch.bfloat16, torch.float16)
        and hidden_states.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
    )


def _group_norm(norm: nn.GroupNorm, hidden_states: torch.Tensor) -> torch.Tensor:
    """``norm(hidden_states)``; under CPU autocast, in float32 (as CUDA autocast runs GroupNorm). CPU autocast leaves
    GroupNorm in the activations' bfloat16, whose kernels on channels-last tensors measured 4-5x slower than float32
    ones (GroupNorm took 40% of a bf16 training step of the digits model), and float32 statistics are the usual
    mixed-precision practice anyway."""
    if _cpu_autocast_lower_precision(hidden_states):
        weight = None if norm.weight is None else norm.weight.float()  # a bf16 model's weights too
        bias = None if norm.bias is None else norm.bias.float()
        with torch.autocast("cpu", enabled=False):
            return F.group_norm(hidden_states.float(), norm.num_groups, weight, bias, norm.eps)
    return norm(hidden_states)


class ResnetBlock(nn.Module):
    """Residual block: GroupNorm, SiLU, conv3x3, + time embedding, GroupNorm, SiLU, dropout, conv3x3.

    With ``time_scale_shift="scale_shift"`` the time embedding instead gives a per-channel scale and shift
    applied after the second GroupNorm (Improved DDPM). The block receives ``SiLU(time embedding)``,
    computed once per forward by the model.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        norm_num_groups: int,
        norm_eps: float,
        dropout: float,
        time_scale_shift: TimeScaleShift,
    ):
        super().__init__()
        self.scale_shift = time_scale_shift == "scale_shift"
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=norm_eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels * (2 if self.scale_shift else 1))
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=norm_eps)
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, hidden_states: torch.Tensor, activated_temb: torch.Tensor) -> torch.Tensor:
        h = _conv3x3(self.conv1, F.silu(_group_norm(self.norm1, hidden_states)))
        temb = self.time_emb_proj(activated_temb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = temb.chunk(2, dim=1)
            h = torch.addcmul(shift, _group_norm(self.norm2, h), 1 + scale)
        else:
            h = _group_norm(self.norm2, h + temb)
        h = _conv3x3(self.conv2, self.dropout(F.silu(h)))
        shortcut = hidden_states if self.conv_shortcut is None else self.conv_shortcut(hidden_states)
        return shortcut + h


class SelfAttention(nn.Module):
    """Residual self attention over the spatial positions (GroupNorm, fused qkv projection, SDPA, output
    projection); ``channels // head_dim`` heads (a single head when ``head_dim`` is None, as in DDPM)."""

    def __init__(self, channels: int, head_dim: int | None, norm_num_groups: int, norm_eps: float):
        super().__init__()
        head_dim = channels if head_dim is None else head_dim
        if channels % head_dim != 0:
            raise ValueError(
                f"attention_head_dim={head_dim} must divide the attention's channel count {channels}"
            )
        self.heads = channels // head_dim
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=norm_eps)
        self.to_qkv = nn.Linear(channels, 3 * channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = hidden_states.shape
        tokens = _group_norm(self.norm, hidden_states).flatten(2).transpose(1, 2)  # (B, HW, C)
        qkv = self.to_qkv(tokens).unflatten(-1, (3, self.heads, channels // self.heads))
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, HW, head_dim)
        if _cpu_autocast_lower_precision(query):
            # CPU autocast runs attention in bfloat16, whose backward measured 10x slower than float32's at the
            # digits model's 16 tokens; float32 here, like the softmax statistics of CUDA's fused kernels
            with torch.autocast("cpu", enabled=False):
                attended = F.scaled_dot_product_attention(query.float(), key.float(), value.float())
        else:
            attended = F.scaled_dot_product_attention(query, key, value)
        attended = attended.transpose(1, 2).flatten(2)  # (B, HW, C)
        out = self.to_out(attended).transpose(1, 2).reshape(batch, channels, height, width)
        return hidden_states + out


class Downsample(nn.Module):
    """Stride-2 3x3 convolution; ``padding=0`` pads right and bottom by one (as the DDPM TF code does),
    ``padding=1`` pads symmetrically."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.asymmetric = padding == 0
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.asymmetric:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1))
        return self.conv(hidden_states)


class Upsample(nn.Module):
    """Nearest-neighbour 2x up-sampling followed by a 3x3 convolution (the module holds that convolution).

    Computed as one stride-2 transposed convolution with a 4x4 kernel whose taps are sums of the 3x3
    kernel's taps: the same function without materialising the up-sampled input, with 16 instead of 36
    multiply-adds per input pixel and channel pair. Outside autograd on CPU (inference) the derived kernel
    is cached together with a copy of the 3x3 weight it came from, and reused only while the weight still
    equals that copy: in-place writes that bypass the version counter (``param.data.copy_`` as in
    ``EMAModel.copy_to``/``restore``, fused optimizers) must not leave a stale kernel. On other devices the
    kernel is rebuilt each call (comparing would synchronise with the device).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self._cache: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def transposed_kernel(self) -> torch.Tensor:
        """``(C_in, C_out, 4, 4)``: the stride-2 transposed-convolution kernel equal to nearest-2x + conv3x3.

        Output row ``2y + a`` reads input rows ``y - 1, y`` (a = 0) or ``y, y + 1`` (a = 1); as taps of a
        transposed convolution (output ``o = 2 i - 1 + k``) the 1-d kernel is ``[w2, w1 + w2, w0 + w1, w0]``,
        i.e. the sum of the zero-padded, flipped 3-tap kernel and its shift by one; rows, then columns.
        """
        flipped = self.conv.weight.transpose(0, 1).flip(-1, -2)
        padded = F.pad(flipped, (1, 1, 1, 1))
        rows = padded[:, :, :-1] + padded[:, :, 1:]
        return rows[..., :-1] + rows[..., 1:]

    def _kernel(self) -> torch.Tensor:
        weight = self.conv.weight
        if (
            torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and weight.requires_grad)
            or weight.device.type != "cpu"
        ):
            return self.transposed_kernel()
        with torch.no_grad():
            key = (weight.shape, weight.dtype, weight.device)
            # the version counter and data pointer miss writes through ``.data`` and fused optimizer
            # steps, so the weight itself is compared (a tenth of the cost of rebuilding the kernel)
            if (
                self._cache is None
                or self._cache[0] != key
                # a kernel made under torch.inference_mode cannot enter autograd (an input requiring grad)
                or (self._cache[2].is_inference() and not torch.is_inference_mode_enabled())
                or not torch.equal(self._cache[1], weight)
            ):
                self._cache = (key, weight.detach().clone(), self.transposed_kernel())
        return self._cache[2]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(hidden_states, self._kernel(), self.conv.bias, stride=2, padding=1)


class DownLevel(nn.Module):
    """One resolution level of the down path: residual blocks (each optionally followed by attention) and,
    except at the lowest resolution, a down-sampling convolution."""

    def __init__(self, resnets: list[ResnetBlock], attentions: list[SelfAttention] | None, downsample):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.downsample = downsample


class UpLevel(nn.Module):
    """One resolution level of the up path: ``layers_per_block + 1`` residual blocks fed with skip
    connections (each optionally followed by attention) and, except at full resolution, an up-sampling."""

    def __init__(self, resnets: list[ResnetBlock], attentions: list[SelfAttention] | None, upsample):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.upsample = upsample


class MidBlock(nn.Module):
    """The bottleneck: residual block, self attention (optional), residual block."""

    def __init__(self, resnet_1: ResnetBlock, attention: SelfAttention | None, resnet_2: ResnetBlock):
        super().__init__()
        self.resnets = nn.ModuleList([resnet_1, resnet_2])
        self.attention = attention


class DDPMUNet2DModel(ModelMixin, ConfigMixin):
    r"""The DDPM U-Net ε_θ(x_t, t) (Ho et al. 2020, Appendix B), with Improved-DDPM options.

    Config keys reuse :class:`diffusers.UNet2DModel`'s names where the concept is the same.

    Args:
        sample_size: Height (= width) of the training images; fixes which levels get attention.
        in_channels: Channels of the input image.
        out_channels: Channels of the output; ``None`` means ``in_channels``; ``2 * in_channels`` for learned
            variance (the second half parametrises the variance, read by the scheduler's ``learned_range``).
        block_out_channels: Channels at each resolution level (``ch * ch_mult`` in the paper); one level per
            entry, each but the last halving the resolution.
        layers_per_block: Residual blocks per level on the down path (the up path has one more).
        attention_resolutions: Feature-map sizes (in pixels, relative to ``sample_size``) whose levels get
            self attention after every residual block; each must be a level's size.
        add_attention: Self attention in the middle block.
        attention_head_dim: Channels per attention head; ``None`` for a single head (DDPM).
        dropout: Dropout rate inside the residual blocks.
        norm_num_groups: GroupNorm groups (must divide every level's channel count).
        norm_eps: GroupNorm epsilon.
        resnet_time_scale_shift: ``"default"`` adds the time embedding; ``"scale_shift"`` applies it as
            ``norm(h) * (1 + scale) + shift`` (Improved DDPM).
        time_embedding_dim: Width of the time embedding; ``None`` means ``4 * block_out_channels[0]``.
        flip_sin_to_cos: Order the sinusoidal embedding ``[cos, sin]`` instead of DDPM's ``[sin, cos]``.
        freq_shift: Frequency shift of the sinusoidal embedding (DDPM: 1).
        downsample_padding: ``0`` pads right/bottom before the stride-2 convolution (DDPM), ``1`` pads
            symmetrically.
        num_class_embeds: Number of classes for class conditioning, or ``None`` for an unconditional model.
        use_null_class_embed: Add one more embedding row, the "no class" label ``num_class_embeds``
            (:attr:`null_class_label`), for label dropout and classifier-free guidance.
        class_names: The name of each class, position = label (e.g. the class folders' names), or ``None``;
            ``len(class_names) == num_class_embeds``. Saved in the config, so a shared model says which label
            is which; the pipeline accepts these names as ``class_labels``.
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ("norm",)

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        block_out_channels: tuple[int, ...] = (128, 256, 256, 256),
        layers_per_block: int = 2,
        attention_resolutions: tuple[int, ...] = (16,),
        add_attention: bool = True,
        attention_head_dim: int | None = None,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        resnet_time_scale_shift: TimeScaleShift = "default",
        time_embedding_dim: int | None = None,
        flip_sin_to_cos: bool = False,
        freq_shift: float = 1,
        downsample_padding: int = 0,
        num_class_embeds: int | None = None,
        use_null_class_embed: bool = True,
        class_names: list[str] | tuple[str, ...] | None = None,
    ):
        super().__init__()
        if class_names is not None:
            class_names = list(class_names)
            self.register_to_config(class_names=class_names)  # a list in config.json, whatever was passed
        if out_channels is None:
            out_channels = in_channels
            self.register_to_config(out_channels=out_channels)
        block_out_channels = tuple(int(c) for c in block_out_channels)
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        _validate_config(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            attention_resolutions=attention_resolutions,
            attention_head_dim=attention_head_dim,
            dropout=dropout,
            norm_num_groups=norm_num_groups,
            resnet_time_scale_shift=resnet_time_scale_shift,
            downsample_padding=downsample_padding,
            num_class_embeds=num_class_embeds,
            class_names=class_names,
        )
        attention_levels = _attention_levels(sample_size, len(block_out_channels), attention_resolutions)
        base_channels = block_out_channels[0]
        temb_channels = time_embedding_dim or 4 * base_channels

        def resnet(cin: int, cout: int) -> ResnetBlock:
            return ResnetBlock(
                cin, cout, temb_channels, norm_num_groups, norm_eps, dropout, resnet_time_scale_shift
            )

        def attention(channels: int) -> SelfAttention:
            return SelfAttention(channels, attention_head_dim, norm_num_groups, norm_eps)

        self.conv_in = nn.Conv2d(in_channels, base_channels, kernel_size=3, padding=1)
        self.time_embedding = TimestepMLP(base_channels, temb_channels)
        self.class_embedding = None
        if num_class_embeds is not None:
            rows = num_class_embeds + (1 if use_null_class_embed else 0)
            self.class_embedding = nn.Embedding(rows, temb_channels)

        skip_channels = [base_channels]
        channels = base_channels
        self.down_blocks = nn.ModuleList()
        for level, level_channels in enumerate(block_out_channels):
            resnets, attentions = [], []
            for _ in range(layers_per_block):
                resnets.append(resnet(channels, level_channels))
                channels = level_channels
                if level in attention_levels:
                    attentions.append(attention(channels))
                skip_channels.append(channels)
            downsample = None
            if level < len(block_out_channels) - 1:
                downsample = Downsample(channels, downsample_padding)
                skip_channels.append(channels)
            self.down_blocks.append(DownLevel(resnets, attentions, downsample))

        self.mid_block = MidBlock(
            resnet(channels, channels),
            attention(channels) if add_attention else None,
            resnet(channels, channels),
        )

        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(block_out_channels))):
            level_channels = block_out_channels[level]
            resnets, attentions = [], []
            for _ in range(layers_per_block + 1):
                resnets.append(resnet(channels + skip_channels.pop(), level_channels))
                channels = level_channels
                if level in attention_levels:
                    attentions.append(attention(channels))
            upsample = Upsample(channels) if level > 0 else None
            self.up_blocks.append(UpLevel(resnets, attentions, upsample))

        self.conv_norm_out = nn.GroupNorm(norm_num_groups, channels, eps=norm_eps)
        self.conv_out = nn.Conv2d(channels, out_channels, kernel_size=3, padding=1)
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------------------------------ properties
    @property
    def null_class_label(self) -> int | None:
        """The "no class" label (``num_class_embeds``) when the model has a null class embedding, else None."""
        if self.config.num_class_embeds is not None and self.config.use_null_class_embed:
            return int(self.config.num_class_embeds)
        return None

    @property
    def downsampling_factor(self) -> int:
        """Input height and width must be multiples of this (``2 ** (levels - 1)``)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    # ---------------------------------------------------------------------------------------------- forward
    def _run(self, module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(module, *args)
        return module(*args)

    def _timesteps(
        self, timestep: torch.Tensor | float | int, batch: int, device: torch.device
    ) -> torch.Tensor:
        if not torch.is_tensor(timestep):
            if isinstance(timestep, bool) or not isinstance(timestep, (int, float)):
                raise ValueError(
                    f"timestep must be an int, a float or a 0-d or 1-d tensor, got {type(timestep).__name__}"
                )
            return torch.full((batch,), float(timestep), device=device)
        if timestep.ndim == 0:
            return timestep.to(device).reshape(1).expand(batch)
        if timestep.ndim == 1 and timestep.shape[0] in (1, batch):
            return timestep.to(device).expand(batch)
        raise ValueError(
            f"timestep must be a scalar or a 1-d tensor with 1 or batch size ({batch}) entries, "
            f"got shape {tuple(timestep.shape)}"
        )

    def _class_embedding(self, class_labels: torch.Tensor | int | None, batch: int, device: torch.device):
        if self.class_embedding is None:
            if class_labels is not None:
                raise ValueError(
                    "class_labels were given but this model is unconditional (num_class_embeds=None)"
                )
            return None
        num_rows = self.class_embedding.num_embeddings
        if class_labels is None:
            hint = f"; pass the null class {self.null_class_label} for none" if self.null_class_label else ""
            raise ValueError(
                f"class_labels are required: this model is class-conditional with labels 0..{num_rows - 1}{hint}"
            )
        if not torch.is_tensor(class_labels):
            class_labels = torch.tensor(class_labels, device=device)
        if class_labels.is_floating_point() or class_labels.is_complex() or class_labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be an integer tensor, got dtype {class_labels.dtype}")
        if class_labels.ndim > 1 or (class_labels.ndim == 1 and class_labels.shape[0] not in (1, batch)):
            raise ValueError(
                f"class_labels must be a scalar or a 1-d tensor with 1 or batch size ({batch}) entries, "
                f"got shape {tuple(class_labels.shape)}"
            )
        # label values are not checked here: that would cost a host sync on every call (every training and
        # sampling step); DDPMPipeline.check_inputs is the user-facing check, and torch's embedding lookup
        # rejects an out-of-range label itself (IndexError on CPU, a device-side assert on CUDA)
        return self.class_embedding(class_labels.to(device).reshape(-1).expand(batch))

    def _check_sample(self, sample: torch.Tensor) -> None:
        if sample.ndim != 4:
            raise ValueError(
                f"sample must be (batch, channels, height, width), got shape {tuple(sample.shape)}"
            )
        if sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"sample has {sample.shape[1]} channels, expected in_channels={self.config.in_channels}"
            )
        factor = self.downsampling_factor
        if sample.shape[2] % factor or sample.shape[3] % factor:
            raise ValueError(
                f"sample height and width must be multiples of {factor} (the model halves them "
                f"{len(self.config.block_out_channels) - 1} times), got {tuple(sample.shape[2:])}"
            )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | int | None = None,
        return_dict: bool = True,
    ) -> DDPMUNet2DOutput | tuple[torch.Tensor]:
        """Predict from a noisy sample x_t at ``timestep`` t.

        Args:
            sample: ``(batch, in_channels, height, width)``, height and width multiples of
                :attr:`downsampling_factor`.
            timestep: An int or float, a 0-d tensor, or a 1-d tensor with 1 or ``batch`` entries.
            class_labels: Integer labels (0-d, or 1-d with 1 or ``batch`` entries) in
                ``0..num_class_embeds - 1``, or :attr:`null_class_label`; required iff class-conditional. Their
                values are not checked (no host sync per call; ``DDPMPipeline`` checks them before sampling).
            return_dict: Return a :class:`DDPMUNet2DOutput` (default) or a 1-tuple.
        """
        self._check_sample(sample)
        batch = sample.shape[0]
        timesteps = self._timesteps(timestep, batch, sample.device)
        dtype = self.conv_in.weight.dtype
        t_emb = sinusoidal_timestep_embedding(
            timesteps, self.config.block_out_channels[0], self.config.flip_sin_to_cos, self.config.freq_shift
        )
        emb = self.time_embedding(t_emb.to(dtype))
        class_emb = self._class_embedding(class_labels, batch, sample.device)
        if class_emb is not None:
            emb = emb + class_emb.to(dtype)
        activated_emb = F.silu(emb)

        hidden = self.conv_in(sample)
        if hidden.device.type == "cpu" and torch.is_grad_enabled() and self.conv_in.weight.requires_grad:
            # training on CPU: oneDNN's convolutions and their gradients are faster on channels-last activations
            # (measured: about 5% of a training step of the digits model; no difference for the CIFAR-10 model's;
            # 10% slower for CIFAR-10 sampling at batch 1, hence only when the weights take gradients). The input
            # has too few channels to carry the layout, so it starts here; the output is returned contiguous.
            hidden = hidden.contiguous(memory_format=torch.channels_last)
        skips = [hidden]
        for level in self.down_blocks:
            for index, resnet in enumerate(level.resnets):
                hidden = self._run(resnet, hidden, activated_emb)
                if level.attentions is not None:
                    hidden = self._run(level.attentions[index], hidden)
                skips.append(hidden)
            if level.downsample is not None:
                hidden = level.downsample(hidden)
                skips.append(hidden)

        hidden = self._run(self.mid_block.resnets[0], hidden, activated_emb)
        if self.mid_block.attention is not None:
            hidden = self._run(self.mid_block.attention, hidden)
        hidden = self._run(self.mid_block.resnets[1], hidden, activated_emb)

        for level in self.up_blocks:
            for index, resnet in enumerate(level.resnets):
                hidden = self._run(resnet, torch.cat([hidden, skips.pop()], dim=1), activated_emb)
                if level.attentions is not None:
                    hidden = self._run(level.attentions[index], hidden)
            if level.upsample is not None:
                hidden = level.upsample(hidden)

        out = self.conv_out(F.silu(_group_norm(self.conv_norm_out, hidden))).contiguous()
        if not return_dict:
            return (out,)
        return DDPMUNet2DOutput(sample=out)

    # ---------------------------------------------------------------------------------------------- presets
    @classmethod
    def preset_config(cls, name: PresetName, **overrides: Any) -> dict[str, Any]:
        """The config dict of a named preset (see :data:`PRESETS`), with ``overrides`` applied."""
        _check_choice("preset", name, tuple(PRESETS))
        config = dict(PRESETS[name])
        config.update(overrides)
        return config

    @classmethod
    def from_preset(cls, name: PresetName, **overrides: Any) -> DDPMUNet2DModel:
        """A randomly initialised model in a named configuration.

        ``"cifar10"``: the paper's CIFAR-10 model (35.7M parameters); ``"celebahq256"`` / ``"lsun256"``: the
        paper's 256x256 models; ``"digits"``: a small model for 8x8 greyscale digits. Keyword ``overrides``
        replace preset keys, e.g. ``from_preset("cifar10", num_class_embeds=10, out_channels=6)``.
        """
        return cls(**cls.preset_config(name, **overrides))

    # ------------------------------------------------------------------------------------- loading / interop
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, **kwargs: Any):
        """diffusers' ``from_pretrained``; a folder or repo holding a ``UNet2DModel`` (``_class_name``
        ``"UNet2DModel"``, e.g. google/ddpm-cifar10-32) is loaded with diffusers and converted with
        :meth:`from_unet2d`."""
        config_kwargs = {
            key: kwargs[key]
            for key in (
                "cache_dir",
                "force_download",
                "proxies",
                "local_files_only",
                "token",
                "revision",
                "subfolder",
                "user_agent",
            )
            if key in kwargs
        }
        try:
            config = cls.load_config(pretrained_model_name_or_path, **config_kwargs)
        except (OSError, ValueError):
            config = {}
        if isinstance(config, dict) and config.get("_class_name") == "UNet2DModel":
            from diffusers import UNet2DModel

            unet2d = UNet2DModel.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
            return cls.from_unet2d(unet2d)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def from_unet2d(cls, unet2d: nn.Module) -> DDPMUNet2DModel:
        """Convert a diffusers ``UNet2DModel`` (same weights, same outputs).

        Class names in its config (``_class_names`` as :meth:`to_unet2d` writes them, or ``class_names``) become
        ``class_names``. With one name fewer than its ``num_class_embeds``, the last embedding is taken as the
        null class (what :meth:`to_unet2d` makes of one), so the round trip restores the model exactly; any other
        count raises ``ValueError``.

        Raises:
            ValueError: naming the option, when the UNet2DModel's configuration is one this architecture
                cannot express (e.g. ``time_embedding_type="fourier"``, a block type other than
                ``DownBlock2D``/``AttnDownBlock2D``/``UpBlock2D``/``AttnUpBlock2D``, attention on a down level
                without the matching up level, ``mid_block_scale_factor != 1``).
        """
        config = dict(unet2d.config)
        our_config = _config_from_unet2d(config)
        model = cls(**our_config)
        state_dict = _state_dict_from_unet2d(unet2d.state_dict(), model)
        model.load_state_dict(state_dict, strict=True)
        return _match_parameters(model, unet2d)

    def to_unet2d(self):
        """Export to an equivalent diffusers ``UNet2DModel`` (same weights, same outputs).

        The null class embedding, if any, becomes the last of ``num_class_embeds + 1`` class embeddings.
        ``class_names`` are kept in the UNet2DModel's config as ``_class_names`` (it has no such argument); the
        pipeline reads them there, and :meth:`from_unet2d` turns them back into ``class_names``.
        """
        from diffusers import UNet2DModel

        config = self.config
        levels = len(config.block_out_channels)
        attention_levels = _attention_levels(config.sample_size, levels, config.attention_resolutions)
        num_class_embeds = None
        if config.num_class_embeds is not None:
            num_class_embeds = self.class_embedding.num_embeddings
        unet2d = UNet2DModel(
            sample_size=config.sample_size,
            in_channels=config.in_channels,
            out_channels=config.out_channels,
            time_embedding_type="positional",
            time_embedding_dim=config.time_embedding_dim,
            freq_shift=config.freq_shift,
            flip_sin_to_cos=config.flip_sin_to_cos,
            down_block_types=tuple(
                "AttnDownBlock2D" if level in attention_levels else "DownBlock2D" for level in range(levels)
            ),
            up_block_types=tuple(
                "AttnUpBlock2D" if level in attention_levels else "UpBlock2D"
                for level in reversed(range(levels))
            ),
            block_out_channels=tuple(config.block_out_channels),
            layers_per_block=config.layers_per_block,
            downsample_padding=config.downsample_padding,
            dropout=config.dropout,
            act_fn="silu",
            attention_head_dim=config.attention_head_dim,
            norm_num_groups=config.norm_num_groups,
            attn_norm_num_groups=config.norm_num_groups if config.add_attention else None,
            norm_eps=config.norm_eps,
            resnet_time_scale_shift=config.resnet_time_scale_shift,
            add_attention=config.add_attention,
            num_class_embeds=num_class_embeds,
        )
        if config.class_names is not None:
            # UNet2DModel has no such argument: a hidden key ("_" first) is kept in its config.json and
            # restored on loading without diffusers' "unexpected config attributes" warning
            unet2d.register_to_config(_class_names=list(config.class_names))
        state_dict = _state_dict_to_unet2d(self.state_dict(), self)
        unet2d.load_state_dict(state_dict, strict=True)
        return _match_parameters(unet2d, self)


# ------------------------------------------------------------------------------------------- config helpers
def _match_parameters(model: nn.Module, source: nn.Module) -> nn.Module:
    """Give ``model`` the device, dtype (cast only where it differs) and train/eval mode of ``source``."""
    like = next(source.parameters())
    model = model.to(device=like.device)
    if next(model.parameters()).dtype != like.dtype:
        model = model.to(dtype=like.dtype)
    return model.train(source.training)


def _validate_config(
    *,
    sample_size: int,
    in_channels: int,
    out_channels: int,
    block_out_channels: tuple[int, ...],
    layers_per_block: int,
    attention_resolutions: tuple[int, ...],
    attention_head_dim: int | None,
    dropout: float,
    norm_num_groups: int,
    resnet_time_scale_shift: str,
    downsample_padding: int,
    num_class_embeds: int | None,
    class_names: list[str] | None = None,
) -> None:
    """Reject configurations the model cannot build, naming the bad value and what is valid."""
    _check_choice("resnet_time_scale_shift", resnet_time_scale_shift, get_args(TimeScaleShift))
    _check_choice("downsample_padding", downsample_padding, (0, 1))
    if not isinstance(sample_size, int) or isinstance(sample_size, bool) or sample_size <= 0:
        raise ValueError(f"sample_size must be a positive int (square images), got {sample_size!r}")
    for name, value in (
        ("in_channels", in_channels),
        ("out_channels", out_channels),
        ("layers_per_block", layers_per_block),
    ):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if not block_out_channels or any(c <= 0 for c in block_out_channels):
        raise ValueError(
            f"block_out_channels must be a non-empty list of positive ints, got {block_out_channels}"
        )
    bad_groups = [c for c in block_out_channels if c % norm_num_groups]
    if norm_num_groups <= 0 or bad_groups:
        raise ValueError(
            f"norm_num_groups={norm_num_groups} must divide every entry of block_out_channels "
            f"{list(block_out_channels)}"
        )
    factor = 2 ** (len(block_out_channels) - 1)
    if sample_size % factor:
        raise ValueError(
            f"sample_size={sample_size} must be a multiple of {factor} for {len(block_out_channels)} levels"
        )
    if attention_head_dim is not None:
        attended = [
            block_out_channels[level]
            for level in _attention_levels(sample_size, len(block_out_channels), attention_resolutions)
        ] + [block_out_channels[-1]]
        if attention_head_dim <= 0 or any(c % attention_head_dim for c in attended):
            raise ValueError(
                f"attention_head_dim={attention_head_dim} must divide the channels of every attention level "
                f"{attended}"
            )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if num_class_embeds is not None and num_class_embeds <= 0:
        raise ValueError(f"num_class_embeds must be a positive int or None, got {num_class_embeds}")
    if class_names is not None:
        if num_class_embeds is None or len(class_names) != num_class_embeds:
            raise ValueError(
                f"class_names has {len(class_names)} names but num_class_embeds={num_class_embeds}: give one "
                "name per class (position = label), or class_names=None"
            )
        bad = [name for name in class_names if not isinstance(name, str) or not name]
        if bad or len(set(class_names)) != len(class_names):
            raise ValueError(f"class_names must be distinct non-empty strings, got {class_names!r}")


def _attention_levels(sample_size: int, levels: int, attention_resolutions: tuple[int, ...]) -> set[int]:
    sizes = [sample_size // 2**level for level in range(levels)]
    bad = [r for r in attention_resolutions if r not in sizes]
    if bad:
        raise ValueError(
            f"attention_resolutions {list(attention_resolutions)} contains {bad}, not a level's size; valid "
            f"sizes for sample_size={sample_size} with {levels} levels: {sizes}"
        )
    return {sizes.index(r) for r in attention_resolutions}


_UNET2D_REQUIRED = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "act_fn": "silu",
    "class_embed_type": None,
}


def _config_from_unet2d(config: dict[str, Any]) -> dict[str, Any]:
    for key, required in _UNET2D_REQUIRED.items():
        if key in config and config[key] != required:
            raise ValueError(
                f"cannot convert this UNet2DModel: {key}={config[key]!r} is unsupported by DDPMUNet2DModel "
                f"(supported: {required!r})"
            )
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    for key, types, choices in (
        ("down_block_types", down_types, ("DownBlock2D", "AttnDownBlock2D")),
        ("up_block_types", up_types, ("UpBlock2D", "AttnUpBlock2D")),
    ):
        bad = [t for t in types if t not in choices]
        if bad:
            raise ValueError(
                f"cannot convert this UNet2DModel: {key} contains {bad}; supported block types: {list(choices)}"
            )
    down_attention = [t == "AttnDownBlock2D" for t in down_types]
    up_attention = [t == "AttnUpBlock2D" for t in reversed(up_types)]
    if down_attention != up_attention:
        raise ValueError(
            f"cannot convert this UNet2DModel: down_block_types {down_types} and up_block_types {up_types} put "
            "attention on different levels; DDPMUNet2DModel needs the same levels on both paths"
        )
    sample_size = config["sample_size"]
    if isinstance(sample_size, (list, tuple)):
        if len(set(sample_size)) != 1:
            raise ValueError(f"cannot convert this UNet2DModel: sample_size={sample_size} is not square")
        sample_size = sample_size[0]
    if sample_size is None:
        raise ValueError("cannot convert this UNet2DModel: sample_size=None (DDPMUNet2DModel needs it)")
    norm_num_groups = config.get("norm_num_groups", 32)
    if norm_num_groups is None:
        raise ValueError("cannot convert this UNet2DModel: norm_num_groups=None is unsupported")
    add_attention = config.get("add_attention", True)
    shift = config.get("resnet_time_scale_shift", "default")
    attn_groups = config.get("attn_norm_num_groups")
    if add_attention:
        effective = (
            attn_groups if attn_groups is not None else (norm_num_groups if shift == "default" else None)
        )
        if effective != norm_num_groups:
            raise ValueError(
                f"cannot convert this UNet2DModel: attn_norm_num_groups={attn_groups!r} with "
                f"resnet_time_scale_shift={shift!r} gives the middle attention "
                f"{'no GroupNorm' if effective is None else f'{effective} groups'}; DDPMUNet2DModel uses "
                f"norm_num_groups={norm_num_groups}"
            )
    levels = len(down_types)
    sizes = [sample_size // 2**level for level in range(levels)]
    num_class_embeds = config.get("num_class_embeds")
    return {
        "sample_size": sample_size,
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "block_out_channels": tuple(config["block_out_channels"]),
        "layers_per_block": config["layers_per_block"],
        "attention_resolutions": tuple(sizes[level] for level in range(levels) if down_attention[level]),
        "add_attention": add_attention,
        "attention_head_dim": config.get("attention_head_dim"),
        "dropout": config.get("dropout", 0.0),
        "norm_num_groups": norm_num_groups,
        "norm_eps": config.get("norm_eps", 1e-5),
        "resnet_time_scale_shift": shift,
        "time_embedding_dim": config.get("time_embedding_dim"),
        "flip_sin_to_cos": config.get("flip_sin_to_cos", True),
        "freq_shift": config.get("freq_shift", 0),
        "downsample_padding": config.get("downsample_padding", 1),
        "num_class_embeds": num_class_embeds,
        "use_null_class_embed": False,
        **_class_names_from_unet2d(config, num_class_embeds),
    }


def _class_names_from_unet2d(config: dict[str, Any], num_class_embeds: int | None) -> dict[str, Any]:
    """``class_names`` (and the null class) for :meth:`DDPMUNet2DModel.from_unet2d`: one name per embedding, or
    one fewer when the last embedding is a null class exported by :meth:`DDPMUNet2DModel.to_unet2d`."""
    names = config.get("_class_names") or config.get("class_names")
    if not names:
        return {}
    names = list(names)
    if num_class_embeds is not None and len(names) == num_class_embeds - 1:
        return {"class_names": names, "num_class_embeds": num_class_embeds - 1, "use_null_class_embed": True}
    return {"class_names": names}  # any other count is rejected by _validate_config


def _key_pairs(model: DDPMUNet2DModel) -> list[tuple[str, str]]:
    """(our module prefix, UNet2DModel module prefix) for every module that maps one to one."""
    pairs = [
        ("conv_in", "conv_in"),
        ("time_embedding.linear_1", "time_embedding.linear_1"),
        ("time_embedding.linear_2", "time_embedding.linear_2"),
        ("conv_norm_out", "conv_norm_out"),
        ("conv_out", "conv_out"),
    ]
    if model.class_embedding is not None:
        pairs.append(("class_embedding", "class_embedding"))
    resnet_parts = ("norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut")
    attention_parts = (("norm", "group_norm"), ("to_out", "to_out.0"))

    def add_resnet(ours: str, theirs: str, block: ResnetBlock) -> None:
        for part in resnet_parts:
            if getattr(block, part) is not None:
                pairs.append((f"{ours}.{part}", f"{theirs}.{part}"))

    def add_attention(ours: str, theirs: str) -> None:
        for our_part, their_part in attention_parts:
            pairs.append((f"{ours}.{our_part}", f"{theirs}.{their_part}"))

    for i, level in enumerate(model.down_blocks):
        for j, block in enumerate(level.resnets):
            add_resnet(f"down_blocks.{i}.resnets.{j}", f"down_blocks.{i}.resnets.{j}", block)
            if level.attentions is not None:
                add_attention(f"down_blocks.{i}.attentions.{j}", f"down_blocks.{i}.attentions.{j}")
        if level.downsample is not None:
            pairs.append((f"down_blocks.{i}.downsample.conv", f"down_blocks.{i}.downsamplers.0.conv"))
    for j, block in enumerate(model.mid_block.resnets):
        add_resnet(f"mid_block.resnets.{j}", f"mid_block.resnets.{j}", block)
    if model.mid_block.attention is not None:
        add_attention("mid_block.attention", "mid_block.attentions.0")
    for i, level in enumerate(model.up_blocks):
        for j, block in enumerate(level.resnets):
            add_resnet(f"up_blocks.{i}.resnets.{j}", f"up_blocks.{i}.resnets.{j}", block)
            if level.attentions is not None:
                add_attention(f"up_blocks.{i}.attentions.{j}", f"up_blocks.{i}.attentions.{j}")
        if level.upsample is not None:
            pairs.append((f"up_blocks.{i}.upsample.conv", f"up_blocks.{i}.upsamplers.0.conv"))
    return pairs


def _qkv_prefixes(model: DDPMUNet2DModel) -> list[tuple[str, str]]:
    prefixes = []
    for i, level in enumerate(model.down_blocks):
        if level.attentions is not None:
            prefixes += [
                (f"down_blocks.{i}.attentions.{j}", f"down_blocks.{i}.attentions.{j}")
                for j in range(len(level.attentions))
            ]
    if model.mid_block.attention is not None:
        prefixes.append(("mid_block.attention", "mid_block.attentions.0"))
    for i, level in enumerate(model.up_blocks):
        if level.attentions is not None:
            prefixes += [
                (f"up_blocks.{i}.attentions.{j}", f"up_blocks.{i}.attentions.{j}")
                for j in range(len(level.attentions))
            ]
    return prefixes


def _state_dict_from_unet2d(
    theirs: dict[str, torch.Tensor], model: DDPMUNet2DModel
) -> dict[str, torch.Tensor]:
    ours: dict[str, torch.Tensor] = {}
    for our_prefix, their_prefix in _key_pairs(model):
        for suffix in ("weight", "bias"):
            key = f"{their_prefix}.{suffix}"
            if key in theirs:
                ours[f"{our_prefix}.{suffix}"] = theirs[key]
    for our_prefix, their_prefix in _qkv_prefixes(model):
        for suffix in ("weight", "bias"):
            ours[f"{our_prefix}.to_qkv.{suffix}"] = torch.cat(
                [theirs[f"{their_prefix}.{name}.{suffix}"] for name in ("to_q", "to_k", "to_v")], dim=0
            )
    return ours


def _state_dict_to_unet2d(ours: dict[str, torch.Tensor], model: DDPMUNet2DModel) -> dict[str, torch.Tensor]:
    theirs: dict[str, torch.Tensor] = {}
    for our_prefix, their_prefix in _key_pairs(model):
        for suffix in ("weight", "bias"):
            key = f"{our_prefix}.{suffix}"
            if key in ours:
                theirs[f"{their_prefix}.{suffix}"] = ours[key]
    for our_prefix, their_prefix in _qkv_prefixes(model):
        for suffix in ("weight", "bias"):
            for name, part in zip(
                ("to_q", "to_k", "to_v"), ours[f"{our_prefix}.to_qkv.{suffix}"].chunk(3, dim=0)
            ):
                theirs[f"{their_prefix}.{name}.{suffix}"] = part.clone()
    return theirs
