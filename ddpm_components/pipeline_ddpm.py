"""``DDPMPipeline``: sampling, image-to-image, classifier-free guidance, saving and sharing for DDPM.

This module is self-contained (it imports only torch, diffusers and the Python standard library) because
:meth:`DDPMPipeline.save_pretrained` copies this very file next to the weights as remote code, so that a saved
pipeline loads with ``DiffusionPipeline.from_pretrained(path_or_repo_id, trust_remote_code=True)`` where
``ddpm_components`` is not installed.

Sampling follows Ho et al. 2020 (arXiv 2006.11239), Algorithm 2: start from x_T ~ N(0, I) and apply the
scheduler's reverse step x_t -> x_{t-1} for every timestep. With the same U-Net, scheduler and generator, the
unconditional images equal those of diffusers' own ``DDPMPipeline``.
"""

from __future__ import annotations

import contextlib
import glob
import inspect
import json
import logging
import math
import numbers
import os
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, Literal, get_args

import torch
from diffusers import (
    ConfigMixin,
    DiffusionPipeline,
    ImagePipelineOutput,
    ModelMixin,
    SchedulerMixin,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import make_image_grid
from diffusers.utils.torch_utils import randn_tensor

logger = logging.getLogger(__name__)

OutputType = Literal["pil", "np", "pt"]
SaveLayout = Literal["auto", "remote_code", "diffusers"]

#: libraries whose classes diffusers loads by name; components from anywhere else are saved as remote code
_LIBRARY_PACKAGES = ("diffusers", "transformers")
#: files the card refers to
SAMPLE_GRID_NAME = "samples.png"
TRAINING_CONFIG_NAME = "training_config.json"
#: the list of files a completed save wrote (relative paths): what a later save may replace or remove
SAVE_MANIFEST_NAME = ".ddpm_components_save.json"
#: scheduler config key (private, so diffusers loads it without a warning and keeps it through ``from_config``): the
#: number of steps :meth:`DDPMPipeline.__call__` runs when ``num_inference_steps`` is not given (e.g. 4 for a model
#: made by progressive distillation); absent: 1000
DEFAULT_STEPS_CONFIG_KEY = "_default_num_inference_steps"
_CARD_TAGS = ["pytorch", "diffusers", "ddpm", "ddpm-components", "unconditional-image-generation"]
# model-loading keywords forwarded to each component's from_pretrained by DDPMPipeline.from_pretrained
_MODEL_LOAD_KWARGS = ("torch_dtype", "variant", "use_safetensors", "low_cpu_mem_usage", "device_map")
_DOWNLOAD_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")


class HubError(RuntimeError):
    """A Hub operation (create, upload, download) failed; the message says why and what to do."""


# Copied from ddpm_components.scheduling_ddpm._check_choice
def _check_choice(name: str, value: object, choices: tuple[object, ...]) -> None:
    """Raise a ValueError naming the option, the bad value and every valid choice unless ``value`` is one of
    ``choices``: ``beta_schedule='foo' is not supported; choose one of 'linear', 'scaled_linear', ...``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}.")


def _is_integer(value: Any) -> bool:
    """True for Python and numpy integers, False for bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# Copied from ddpm_components.scheduling_ddpm._check_finite
def _check_finite(name: str, value: object, positive: bool = False) -> None:
    """Raise a ValueError naming ``value`` unless it is a finite real number (and > 0 when ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number.")
    if positive and value <= 0:
        raise ValueError(f"{name}={value!r} must be positive.")


# ------------------------------------------------------------------------------------------------ images
# The one image path of ddpm-components: the pipeline's ``image=``, the command line's ``--init-image`` and the
# training data all go through these two functions (the data module imports them from here; this module stays
# self-contained, so PIL images are handled through their own methods and diffusers' ``load_image``).

#: what a transparent pixel becomes when an image's alpha channel is composited away: black, the background
#: of the embedded digits (a fully transparent pixel stored as (0, 0, 0, 0) keeps its value)
ALPHA_BACKGROUND = 0
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# slack for float images computed in floating point (e.g. 1.0000001); anything further out is an error
_RANGE_TOLERANCE = 1e-3


def _is_pil_image(image: Any) -> bool:
    return all(hasattr(image, name) for name in ("mode", "size", "convert", "tobytes", "getexif"))


def standardize_pil_image(image: Any, mode: Literal["L", "RGB"]) -> Any:
    """A PIL image as 8-bit ``mode`` (``"L"`` or ``"RGB"``), the way every image enters ddpm-components.

    1. EXIF orientation is applied (diffusers' ``load_image``), so a photo shows as a viewer shows it.
    2. 16-bit greyscale (modes ``I;16*`` and ``I``, e.g. 16-bit PNGs) is scaled to 8 bits, v / 257 rounded
       (PIL's own conversion clips at 255, turning almost every pixel white).
    3. Transparency (an alpha channel, or a palette/greyscale ``transparency`` entry) is composited on
       :data:`ALPHA_BACKGROUND` (black).
    4. The colours are converted to ``mode`` by PIL (ITU-R 601-2 luma for ``"L"``).

    Raises ``ValueError`` for 32-bit float images (mode ``F``, no standard range) and for non-images.
    """
    from diffusers.utils import load_image

    _check_choice("mode", mode, ("L", "RGB"))
    if not _is_pil_image(image):
        raise ValueError(f"expected a PIL image, got {type(image).__name__}")
    image = load_image(image, convert_method=lambda opened: opened)  # EXIF orientation
    if image.mode == "F":
        raise ValueError(
            "32-bit float images (PIL mode 'F') have no standard value range; save the image with 8 or 16 "
            "bits per channel"
        )
    if image.mode in _SIXTEEN_BIT_MODES:
        values = torch.frombuffer(bytearray(image.convert("I").tobytes()), dtype=torch.int32)
        eight_bit = (values.double() / 257.0).round().clamp(0, 255).to(torch.uint8)
        image = image.convert("L")  # the right size and mode; its pixels are replaced next
        image.frombytes(bytes(eight_bit.untyped_storage()))
    elif image.mode in _ALPHA_MODES or "transparency" in image.info:
        foreground = image.convert("RGBA")
        background = foreground.copy()
        background.paste((ALPHA_BACKGROUND,) * 3 + (255,), (0, 0, *foreground.size))
        background.alpha_composite(foreground)
        image = background
    return image.convert(mode)


def images_to_tensor(image: Any, num_channels: int) -> torch.Tensor:
    """Images as one float32 tensor ``(N, num_channels, H, W)`` in [-1, 1], with documented input ranges.

    Accepted (alone or in a list of equal-sized images):

    - PIL images, any mode (through :func:`standardize_pil_image`);
    - numpy arrays ``(H, W)``, ``(H, W, C)`` or ``(N, H, W, C)``, channels last: ``uint8`` in [0, 255],
      ``uint16`` in [0, 65535], floats in [0, 1] (or in [-1, 1] when any value is below -0.001);
    - torch tensors ``(C, H, W)`` or ``(N, C, H, W)``, channels first: ``uint8`` in [0, 255], floats in
      [0, 1] (or in [-1, 1] when any value is below -0.001: diffusers' convention, with room for rounding).

    C may be 1, 3, or 2 / 4 with alpha last (composited on :data:`ALPHA_BACKGROUND`); 3 channels become 1
    with PIL's luma weights, 1 becomes 3 by repetition. Anything else (another dtype, a float image in
    [0, 255], NaN or infinity, other shapes) raises ``ValueError`` saying what was found and what is valid.
    """
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 or 3, got {num_channels}")
    parts = list(image) if isinstance(image, (list, tuple)) else [image]
    if not parts:
        raise ValueError("got an empty list of images; pass at least one")
    tensors = [_one_image_to_tensor(part, num_channels) for part in parts]
    shapes = {tuple(t.shape[1:]) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"the images have different shapes {sorted(shapes)}; give them one size")
    return torch.cat(tensors)


def _one_image_to_tensor(image: Any, num_channels: int) -> torch.Tensor:
    """One PIL image, array or tensor (possibly a batch) as ``(N, num_channels, H, W)`` in [-1, 1]."""
    if _is_pil_image(image):
        image = standardize_pil_image(image, "L" if num_channels == 1 else "RGB")
        width, height = image.size
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        return pixels.reshape(1, height, width, num_channels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    if type(image).__module__ == "numpy" and hasattr(image, "dtype") and hasattr(image, "shape"):
        if image.ndim not in (2, 3, 4):
            raise ValueError(
                f"a numpy image must be (H, W), (H, W, C) or (N, H, W, C), channels last; got shape {image.shape}"
            )
        if image.dtype.kind not in "uif":
            raise ValueError(f"numpy images must be uint8, uint16 or float arrays, got dtype {image.dtype}")
        array = image.astype("float64") if image.dtype == "uint16" else image  # torch lacks most uint16 ops
        tensor = torch.as_tensor(array)
        if image.dtype == "uint16":
            tensor = tensor.div(65535.0).float()
        if tensor.ndim == 2:
            tensor = tensor[None, :, :, None]
        elif tensor.ndim == 3:
            tensor = tensor[None]
        tensor = tensor.permute(0, 3, 1, 2)
        kind = f"numpy array of dtype {image.dtype}"
    elif isinstance(image, torch.Tensor):
        if image.ndim not in (3, 4):
            raise ValueError(
                f"an image tensor must be (C, H, W) or (N, C, H, W), channels first; got shape {tuple(image.shape)}"
            )
        tensor = image.detach().cpu()
        tensor = tensor[None] if tensor.ndim == 3 else tensor
        kind = f"tensor of dtype {image.dtype}"
    else:
        raise ValueError(
            f"image must be a PIL image, a numpy array or a torch tensor (or a list of them), got "
            f"{type(image).__name__}"
        )
    if tensor.dtype == torch.uint8:
        unit = tensor.double() / 255.0
    elif tensor.is_floating_point():
        unit = tensor.double()
        if not bool(torch.isfinite(unit).all()):
            raise ValueError(f"the image ({kind}) holds NaN or infinite values")
        low, high = float(unit.min()), float(unit.max())
        if (
            low < -_RANGE_TOLERANCE
        ):  # [-1, 1]; a value just below 0 (resampling overshoot) is [0, 1]'s rounding
            if low < -1 - _RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
                raise ValueError(
                    f"the image ({kind}) has values in [{low:.4g}, {high:.4g}]; float images must lie in [0, 1] or "
                    "in [-1, 1]"
                )
            unit = (unit + 1.0) / 2.0
        elif high > 1 + _RANGE_TOLERANCE:
            raise ValueError(
                f"the image ({kind}) has values up to {high:.4g}; float images must lie in [0, 1] (or [-1, 1]): "
                "divide 8-bit values by 255, or pass a uint8 array"
            )
    else:
        raise ValueError(
            f"the image is a {kind}; use uint8 (0..255), uint16 (numpy, 0..65535) or float values in [0, 1]"
        )
    unit = unit.clamp(0.0, 1.0)
    channels = unit.shape[1]
    if channels in (2, 4):  # alpha last: composite on the background
        alpha = unit[:, -1:]
        unit = unit[:, :-1] * alpha + (ALPHA_BACKGROUND / 255.0) * (1.0 - alpha)
        channels -= 1
    if channels not in (1, 3):
        raise ValueError(
            f"the image has {channels} channels (shape {tuple(unit.shape)}); use 1 (greyscale), 3 (RGB), or 2 / 4 "
            "with alpha last"
        )
    if channels == 3 and num_channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=unit.dtype).reshape(1, 3, 1, 1)
        unit = (unit * weights).sum(dim=1, keepdim=True)
    elif channels == 1 and num_channels == 3:
        unit = unit.expand(-1, 3, -1, -1)
    return (unit * 2.0 - 1.0).float().contiguous()


# --------------------------------------------------------------------------- control by noise level
# Inpainting (RePaint, Lugmayr et al. 2022, arXiv 2201.09865) and super-resolution (ILVR, Choi et al. 2021,
# arXiv 2108.02938) steer an unconditional (or class-conditional) DDPM without retraining: after every reverse
# step x_t -> x_{t-1}, part of x_{t-1} is replaced by a sample of the forward process q(x_{t-1} | x_0) of the
# input (the known pixels; the low frequencies of a low-resolution reference).

#: RePaint's defaults (chosen by measurement, see docs/pipeline.md): jump_n_sample=1 is plain replacement
DEFAULT_JUMP_LENGTH = 10
DEFAULT_JUMP_N_SAMPLE = 1
#: attributes of schedulers whose ``step`` depends on earlier steps (a step counter, a multistep history): such a
#: scheduler cannot redo steps, which RePaint's resampling jumps need
_STATEFUL_SCHEDULER_ATTRIBUTES = (
    "_step_index",
    "model_outputs",
    "lower_order_nums",
    "ets",
    "counter",
    "cur_model_output",
    "cur_sample",
)


def repaint_step_indices(num_steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """The indices into the timesteps of every U-Net call of a RePaint chain of ``num_steps`` steps, in order.

    Plain sampling (``jump_n_sample=1``) is ``[0, 1, ..., num_steps - 1]``. With resampling, the chain is cut
    into pieces of ``jump_length`` steps counted back from its last step (as RePaint's reference code and
    diffusers' ``RePaintScheduler`` do); each piece before the last step is run ``jump_n_sample`` times in all:
    after it, the sample goes back up ``jump_length`` steps with the forward process and the piece is redone.
    The last step (the one that returns x_0) is run once. Where an index is not above its predecessor, the
    sample jumps back up from the state after the predecessor's step to that index's timestep. The number of
    U-Net calls is ``num_steps + (jump_n_sample - 1) * jump_length * ((num_steps - 1) // jump_length)``.
    """
    remaining = {state: jump_n_sample - 1 for state in range(num_steps - 1, jump_length - 1, -jump_length)}
    order, state = [], 0
    while state < num_steps:
        order.append(state)
        state += 1
        if remaining.get(state, 0) > 0:
            remaining[state] -= 1
            state -= jump_length
    return order


def low_pass(images: torch.Tensor, factor: int) -> torch.Tensor:
    """ILVR's φ_N: area down-sampling by ``factor`` then nearest up-sampling (the same size; a projection, so
    ``low_pass(low_pass(x)) == low_pass(x)``, and ``x`` down-sampled by ``factor`` equals ``low_pass(x)``'s)."""
    if factor == 1:
        return images
    pooled = torch.nn.functional.avg_pool2d(images, factor)
    return torch.nn.functional.interpolate(pooled, scale_factor=factor, mode="nearest")


def _bool_mask_as_float(mask: Any) -> Any:
    """A boolean numpy / torch mask as floats (True = 1.0 = repaint); anything else unchanged."""
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        return mask.float()
    if type(mask).__module__ == "numpy" and getattr(getattr(mask, "dtype", None), "kind", None) == "b":
        return mask.astype("float32")
    return mask


def mask_to_tensor(mask_image: Any, height: int, width: int) -> torch.Tensor:
    """An inpainting mask as a float ``(N, 1, height, width)`` tensor of 0 (keep) and 1 (repaint).

    The mask goes through the one image path (:func:`images_to_tensor`, greyscale: PIL images, numpy arrays and
    tensors with the same ranges as ``image=``; booleans are accepted too, True = repaint), is resized to
    ``height`` x ``width`` with nearest-neighbour sampling (PIL's convention, torch's ``nearest-exact``) and
    thresholded at 0.5: white (>= 0.5) is repainted, black is kept.
    """
    parts = list(mask_image) if isinstance(mask_image, (list, tuple)) else [mask_image]
    parts = [_bool_mask_as_float(part) for part in parts]
    unit = (images_to_tensor(parts, 1) + 1.0) / 2.0
    if tuple(unit.shape[-2:]) != (height, width):
        unit = torch.nn.functional.interpolate(unit, size=(height, width), mode="nearest-exact")
    return (unit >= 0.5).float()


class NoiseLevelControl:
    """What an inpainting or ILVR call imposes after every reverse step (made by
    :meth:`DDPMPipeline.prepare_control`).

    - Inpainting: ``mask`` (``(B, 1, H, W)`` bool, True = repaint) and ``known`` (x_0, the input images): after a
      step to timestep s, the kept pixels become a sample of q(x_s | x_0) (the scheduler's ``add_noise``); after
      the last step they become x_0 itself, so the result keeps the input's pixels exactly. RePaint's resampling
      (``jump_n_sample > 1``) goes back up with q(x_t | x_s) = N(√(ᾱ_t/ᾱ_s) x_s, (1 − ᾱ_t/ᾱ_s) I), the product of
      the one-step forward transitions between the kept (possibly respaced) timesteps.
    - ILVR: ``reference`` (the low-resolution reference, nearest-upsampled to the model's size) and ``factor``:
      x_{s} ← x_{s} − φ_N(x_{s}) + φ_N(y_{s}), y_s ~ q(y_s | y_0), for the first ``reference_until`` part of the
      chain; after the last step y_0 itself, so the result down-sampled by N equals the reference.
    """

    def __init__(
        self,
        scheduler: Any,
        *,
        known: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        jump_length: int = DEFAULT_JUMP_LENGTH,
        jump_n_sample: int = DEFAULT_JUMP_N_SAMPLE,
        reference: torch.Tensor | None = None,
        factor: int = 1,
        reference_until: float = 1.0,
    ) -> None:
        self.scheduler = scheduler
        self.known, self.mask = known, mask
        self.jump_length, self.jump_n_sample = jump_length, jump_n_sample
        self.reference, self.factor, self.reference_until = reference, factor, reference_until
        self.guided_steps = 0

    def step_order(self, num_steps: int) -> list[int]:
        """The timestep indices of every U-Net call (see :func:`repaint_step_indices`)."""
        self.guided_steps = max(1, math.ceil(self.reference_until * num_steps - 1e-9))
        if self.mask is None:
            return list(range(num_steps))
        return repaint_step_indices(num_steps, self.jump_length, self.jump_n_sample)

    def _noised(self, clean: torch.Tensor, timestep: torch.Tensor, generator: Any) -> torch.Tensor:
        """A sample of q(x_t | x_0 = clean) at ``timestep`` (a 1-element tensor; empty: x_0 itself)."""
        if timestep.numel() == 0:
            return clean
        noise = randn_tensor(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        return self.scheduler.add_noise(clean, noise, timestep.reshape(1).repeat(clean.shape[0]))

    def start(self, latents: torch.Tensor, timestep: torch.Tensor, generator: Any) -> torch.Tensor:
        """The first sample: for inpainting, the kept pixels noised to the first timestep."""
        if self.mask is None:
            return latents
        return torch.where(self.mask, latents, self._noised(self.known, timestep, generator))

    def project(
        self, latents: torch.Tensor, step_index: int, next_timestep: torch.Tensor, generator: Any
    ) -> torch.Tensor:
        """x after the scheduler's step ``step_index``, whose noise level is ``next_timestep`` (empty: x_0), with
        the known pixels (inpainting) or the reference's low frequencies (ILVR) imposed."""
        if self.mask is not None:
            return torch.where(self.mask, latents, self._noised(self.known, next_timestep, generator))
        if step_index >= self.guided_steps:
            return latents
        target = self._noised(self.reference, next_timestep, generator)
        return latents - low_pass(latents, self.factor) + low_pass(target, self.factor)

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        """The result: for inpainting, the input's pixels pasted on the kept region (exactly)."""
        return latents if self.mask is None else torch.where(self.mask, latents, self.known)

    def jump(self, latents: torch.Tensor, timestep: int, to_timestep: int, generator: Any) -> torch.Tensor:
        """RePaint's jump back up: a sample of q(x_to | x_timestep), to_timestep > timestep."""
        alphas_cumprod = self.scheduler.alphas_cumprod
        ratio = float(alphas_cumprod[to_timestep].double() / alphas_cumprod[timestep].double())
        noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        return latents * math.sqrt(ratio) + noise * math.sqrt(max(0.0, 1.0 - ratio))


# ------------------------------------------------------------------------------------------ the pipeline
class DDPMPipeline(DiffusionPipeline):
    """Pipeline for DDPM image generation (Ho et al. 2020) with image-to-image and classifier-free guidance.

    Args:
        unet: the noise-prediction network: ``ddpm_components.DDPMUNet2DModel`` or diffusers'
            ``UNet2DModel`` (any ``ModelMixin`` with ``forward(sample, timestep, class_labels=None)``
            returning ``.sample``).
        scheduler: ``ddpm_components.DDPMScheduler`` or any diffusers scheduler whose ``step`` takes
            ``generator`` (``DDPMScheduler``, ``DDIMScheduler``, ...).

    Saving writes a folder that loads anywhere (see :meth:`save_pretrained`); :meth:`push_to_hub` shares it.
    """

    model_cpu_offload_seq = "unet"
    _optional_components: list[str] = []  # noqa: RUF012 - diffusers reads this class attribute
    _callback_tensor_inputs: list[str] = ["latents"]  # noqa: RUF012

    def __init__(self, unet: ModelMixin, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    # -------------------------------------------------------------------------------- properties
    @property
    def guidance_scale(self) -> float:
        """The classifier-free guidance scale of the current (or last) call."""
        return getattr(self, "_guidance_scale", 1.0)

    @property
    def num_timesteps(self) -> int:
        """How many denoising steps the current (or last) call runs."""
        return getattr(self, "_num_timesteps", 0)

    @property
    def default_num_inference_steps(self) -> int:
        """The steps :meth:`__call__` runs by default: the scheduler config's ``_default_num_inference_steps`` (set by
        ``ddpm-components distill``), else 1000 (the DDPM paper's chain)."""
        value = getattr(self.scheduler, "config", {}).get(DEFAULT_STEPS_CONFIG_KEY)
        return value if _is_integer(value) and value >= 1 else 1000

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` from a step-end callback to stop sampling after that step."""
        return getattr(self, "_interrupt", False)

    @property
    def class_names(self) -> list[str] | None:
        """The U-Net's class names (position = label), which ``class_labels`` accepts in place of integers.

        Read from the U-Net's config key ``class_names`` (``_class_names`` on a diffusers ``UNet2DModel``, whose
        loader warns about keys it does not know); ``None`` when the U-Net has none."""
        config = self.unet.config
        names = config.get("class_names") or config.get("_class_names")
        return list(names) if names else None

    def _sample_shape(self) -> tuple[int, int, int]:
        config = self.unet.config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return config.in_channels, height, width

    def _class_info(self) -> tuple[bool, int | None, int | None]:
        """``(is_class_conditional, number_of_classes, null_class_label)`` of the U-Net."""
        config = self.unet.config
        num_classes = getattr(config, "num_class_embeds", None)
        conditional = num_classes is not None or getattr(config, "class_embed_type", None) is not None
        null_label = getattr(self.unet, "null_class_label", None)
        return conditional, num_classes, null_label

    # ------------------------------------------------------------------------------ validation
    def check_inputs(
        self,
        batch_size: int,
        generator: torch.Generator | list[torch.Generator] | None,
        num_inference_steps: int | str,
        timesteps: list[int] | None,
        class_labels: Any,
        guidance_scale: float,
        image: Any,
        strength: float,
        output_type: str,
        callback_on_step_end: Any,
        callback_on_step_end_tensor_inputs: list[str] | None,
        mask_image: Any = None,
        jump_length: int | None = None,
        jump_n_sample: int | None = None,
        reference_image: Any = None,
        reference_factor: int | None = None,
        reference_until: float | None = None,
    ) -> int:
        """Validate every argument of :meth:`__call__` before any work (diffusers' ``check_inputs`` convention);
        return the number of images the call makes.

        Raises ``ValueError`` naming the bad value and what is allowed. This is the one user-facing check of
        class labels (the U-Net's ``forward`` does not check label values): it knows the batch size, the class
        names, the null class and guidance, and it runs once, before the first U-Net call.
        """
        _check_choice("output_type", output_type, get_args(OutputType))
        if not _is_integer(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self._check_steps(num_inference_steps, timesteps)
        _check_finite("guidance_scale", guidance_scale)
        _check_finite("strength", strength)
        if image is None and strength != 1.0:
            raise ValueError(f"strength={strength} only applies to image-to-image: pass image= as well")
        if image is not None and not 0.0 < strength <= 1.0:
            raise ValueError(
                f"strength must be in (0, 1] (the fraction of the schedule to run), got {strength}"
            )
        num_images = int(batch_size) if image is None else self._check_image(image, int(batch_size))
        num_images = self._check_control(
            num_images, image, mask_image, jump_length, jump_n_sample, reference_image, reference_factor,
            reference_until,
        )  # fmt: skip
        if isinstance(generator, list):
            if len(generator) != num_images:
                raise ValueError(
                    f"got {len(generator)} generators for {num_images} images: pass one per image or one"
                )
            generators = generator
        else:
            generators = [] if generator is None else [generator]
        bad = [g for g in generators if not isinstance(g, torch.Generator)]
        if bad:
            raise ValueError(f"generator must be a torch.Generator or a list of them, got {bad[0]!r}")
        self._check_class_labels(class_labels, num_images, guidance_scale)
        self._check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        return num_images

    def _check_control(
        self,
        num_images: int,
        image: Any,
        mask_image: Any,
        jump_length: Any,
        jump_n_sample: Any,
        reference_image: Any,
        reference_factor: Any,
        reference_until: Any,
    ) -> int:
        """Check the inpainting (``mask_image``) and ILVR (``reference_image``) arguments and the scheduler they
        need; return the number of images (a mask or reference batch can set it, as several images do)."""
        unused = {"jump_length": jump_length, "jump_n_sample": jump_n_sample} if mask_image is None else {}
        if reference_image is None:
            unused.update(reference_factor=reference_factor, reference_until=reference_until)
        for name, value in unused.items():
            if value is not None:
                needs = (
                    "inpainting: pass mask_image="
                    if name.startswith("jump")
                    else "ILVR: pass reference_image="
                )
                raise ValueError(f"{name}={value!r} only applies to {needs} as well")
        if mask_image is None and reference_image is None:
            return num_images
        if mask_image is not None and reference_image is not None:
            raise ValueError(
                "mask_image (inpainting) and reference_image (ILVR super-resolution) cannot be combined in one "
                "call; pass one of them"
            )
        channels, height, width = self._sample_shape()
        if mask_image is not None:
            if image is None:
                raise ValueError(
                    "mask_image needs image=: the pictures whose black (unmasked) pixels are kept and whose white "
                    "(masked) pixels are repainted"
                )
            for name, value in (("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
                if value is not None and (not _is_integer(value) or value < 1):
                    raise ValueError(f"{name} must be a positive integer, got {value!r}")
            try:
                count = mask_to_tensor(mask_image, height, width).shape[0]
            except ValueError as error:
                raise ValueError(f"mask_image: {error}") from None
            self._check_control_scheduler("inpainting (mask_image)", jump_n_sample or DEFAULT_JUMP_N_SAMPLE)
            return self._batch_with("mask_image", count, num_images)
        try:
            reference = images_to_tensor(reference_image, channels)
        except ValueError as error:
            raise ValueError(f"reference_image: {error}") from None
        self._reference_factor(tuple(reference.shape), reference_factor)
        if reference_until is not None:
            _check_finite("reference_until", reference_until)
            if not 0.0 < reference_until <= 1.0:
                raise ValueError(
                    f"reference_until must be in (0, 1] (the fraction of the steps, from the first, that follow "
                    f"the reference; 1 = all), got {reference_until}"
                )
        self._check_control_scheduler("ILVR (reference_image)", 1)
        return self._batch_with("reference_image", reference.shape[0], num_images)

    @staticmethod
    def _batch_with(name: str, count: int, num_images: int) -> int:
        """The batch size once ``name``'s ``count`` images join a batch of ``num_images`` (1 is repeated)."""
        if count == 1:
            return num_images
        if num_images not in (1, count):
            raise ValueError(
                f"{name} holds {count} images for a batch of {num_images}: pass one (used for every image) or "
                f"{num_images}"
            )
        return count

    def _reference_factor(self, shape: tuple[int, ...], reference_factor: Any) -> int:
        """ILVR's down-sampling factor N for a reference of ``shape``: ``reference_factor``, checked, or inferred
        from the sizes when ``None``. The reference's size times N must be the U-Net's resolution."""
        _, height, width = self._sample_shape()
        low_height, low_width = shape[-2:]
        factors = [n for n in range(1, min(height, width) + 1) if height % n == 0 and width % n == 0]
        if reference_factor is None:
            if height % low_height or width % low_width or height // low_height != width // low_width:
                raise ValueError(
                    f"reference_image is {low_height}x{low_width}, which is not this U-Net's {height}x{width} "
                    f"divided by one integer factor; valid references are {height}x{width} divided by one of "
                    f"{factors}"
                )
            return height // low_height
        if not _is_integer(reference_factor) or reference_factor < 1:
            raise ValueError(
                f"reference_factor must be a positive integer (the down-sampling factor N), got {reference_factor!r}"
            )
        factor = int(reference_factor)
        if (low_height * factor, low_width * factor) != (height, width):
            raise ValueError(
                f"reference_image is {low_height}x{low_width} and reference_factor={factor} gives "
                f"{low_height * factor}x{low_width * factor}, but this U-Net makes {height}x{width} images: pass "
                + (
                    f"a {height // factor}x{width // factor} reference for reference_factor={factor}"
                    if factor in factors
                    else f"reference_factor in {factors} with a reference of {height}x{width} divided by it"
                )
            )
        return factor

    def _check_control_scheduler(self, what: str, jump_n_sample: int) -> None:
        """Refuse a scheduler that lacks what inpainting / ILVR needs: a forward process q(x_t | x_0)
        (``add_noise``) and one U-Net call per timestep; for RePaint's jumps also ᾱ_t (``alphas_cumprod``),
        variance-preserving samples and a step that can be redone (no step counter or multistep history)."""
        scheduler = self.scheduler
        name = type(scheduler).__name__
        if not callable(getattr(scheduler, "add_noise", None)):
            raise ValueError(
                f"{what} needs the scheduler's forward process q(x_t | x_0), but {name} has no add_noise; use "
                "ddpm_components' DDPMScheduler or diffusers' DDPMScheduler / DDIMScheduler"
            )
        if getattr(scheduler, "order", 1) != 1:
            raise ValueError(
                f"{what} needs a first-order scheduler (one U-Net call per timestep); {name} has order "
                f"{scheduler.order}: use DDPMScheduler or DDIMScheduler"
            )
        if jump_n_sample == 1:
            return
        if getattr(scheduler, "alphas_cumprod", None) is None:
            raise ValueError(
                f"RePaint's resampling (jump_n_sample={jump_n_sample}) goes back up with q(x_t | x_s), which needs "
                f"ᾱ_t, but {name} has no alphas_cumprod; use jump_n_sample=1 or DDPMScheduler / DDIMScheduler"
            )
        if getattr(scheduler, "init_noise_sigma", 1.0) != 1.0:
            raise ValueError(
                f"RePaint's resampling (jump_n_sample={jump_n_sample}) needs variance-preserving samples, but {name} "
                f"samples in sigma units (init_noise_sigma={float(scheduler.init_noise_sigma):.4g}); use "
                "jump_n_sample=1 or DDPMScheduler / DDIMScheduler"
            )
        stateful = [
            attribute for attribute in _STATEFUL_SCHEDULER_ATTRIBUTES if hasattr(scheduler, attribute)
        ]
        if stateful:
            raise ValueError(
                f"RePaint's resampling (jump_n_sample={jump_n_sample}) redoes steps, but {name}'s step depends on "
                f"its earlier steps (it keeps {', '.join(stateful)}); use jump_n_sample=1, or a scheduler whose step "
                "depends only on (model output, t, x_t): DDPMScheduler or DDIMScheduler"
            )

    def _check_steps(self, num_inference_steps: Any, timesteps: Any) -> None:
        if timesteps is not None:
            if "timesteps" not in inspect.signature(self.scheduler.set_timesteps).parameters:
                raise ValueError(
                    f"{type(self.scheduler).__name__}.set_timesteps does not accept custom timesteps; "
                    "pass num_inference_steps instead"
                )
            if (
                isinstance(timesteps, (str, bytes))
                or not hasattr(timesteps, "__len__")
                or len(timesteps) == 0
            ):
                raise ValueError(
                    f"timesteps must be a non-empty list of descending integers, got {timesteps!r}"
                )
            return
        if isinstance(num_inference_steps, str):  # a respacing such as "ddim50", validated by the scheduler
            return
        if not _is_integer(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(
                f"num_inference_steps must be a positive integer or a respacing string such as 'ddim50', got "
                f"{num_inference_steps!r}"
            )

    def _check_image(self, image: Any, batch_size: int) -> int:
        """Check ``image`` (see :func:`images_to_tensor`) against the U-Net and ``batch_size``; return the batch."""
        channels, height, width = self._sample_shape()
        shape = tuple(images_to_tensor(image, channels).shape)
        if shape[1:] != (channels, height, width):
            raise ValueError(
                f"image has shape {shape[1:]} (channels, height, width) after preprocessing; this U-Net needs "
                f"({channels}, {height}, {width}): resize the image to {height}x{width} and use "
                f"{'greyscale' if channels == 1 else f'{channels}-channel'} images"
            )
        if shape[0] == 1:
            return batch_size
        if batch_size not in (1, shape[0]):
            raise ValueError(
                f"got {shape[0]} images and batch_size={batch_size}: pass one image (repeated batch_size times) or "
                "batch_size equal to the number of images"
            )
        return shape[0]

    def _check_class_labels(self, class_labels: Any, batch_size: int, guidance_scale: float) -> None:
        conditional, num_classes, null_label = self._class_info()
        guided = guidance_scale != 1.0
        if class_labels is None:
            if guided:
                raise ValueError(
                    f"guidance_scale={guidance_scale} needs class_labels (classifier-free guidance steers towards "
                    "a class); pass class_labels or use guidance_scale=1.0"
                )
            if conditional and null_label is None:
                raise ValueError(
                    "this U-Net is class-conditional and has no null class: pass class_labels"
                    + (f" (integers in [0, {num_classes}))" if num_classes is not None else "")
                    + (f" or names from {self.class_names}" if self.class_names else "")
                )
            return
        if not conditional:
            raise ValueError(
                "class_labels were given but this U-Net is unconditional (its config has num_class_embeds=None); "
                "pass class_labels=None"
            )
        labels = self._class_label_indices(class_labels)
        if labels.numel() not in (1, batch_size):
            raise ValueError(
                f"class_labels must be one label or one per image ({batch_size}); got {labels.numel()} labels"
            )
        if num_classes is not None:
            upper = num_classes if null_label is None else max(num_classes, null_label + 1)
            bad = labels[(labels < 0) | (labels >= upper)]
            if bad.numel() > 0:
                allowed = f"0..{num_classes - 1}" + (
                    f" (or {null_label}, the null class)" if null_label is not None else ""
                )
                raise ValueError(
                    f"class label {int(bad[0])} is out of range: this U-Net knows classes {allowed}"
                )
        if guided and null_label is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs a U-Net with a null class (use_null_class_embed=True, "
                "trained with label dropout); this U-Net has none, so only guidance_scale=1.0 is allowed"
            )

    def _class_label_indices(self, class_labels: Any) -> torch.Tensor:
        """``class_labels`` (an int, a class name, a list mixing both, or an integer tensor / array) as a 1-d
        int64 CPU tensor; names are looked up in :attr:`class_names`. The one place where names become labels."""
        if isinstance(class_labels, torch.Tensor):
            if (
                class_labels.is_floating_point()
                or class_labels.is_complex()
                or class_labels.dtype == torch.bool
            ):
                raise ValueError(
                    f"class_labels must be integers or class names, got a tensor of dtype {class_labels.dtype}"
                )
            if class_labels.ndim > 1:
                raise ValueError(f"class_labels must be 0-d or 1-d, got shape {tuple(class_labels.shape)}")
            return class_labels.detach().cpu().long().reshape(-1)
        if hasattr(class_labels, "tolist") and not isinstance(class_labels, str):  # numpy arrays and scalars
            class_labels = class_labels.tolist()
        items = list(class_labels) if isinstance(class_labels, (list, tuple)) else [class_labels]
        if not items:
            raise ValueError("class_labels is empty; pass one label or one per image")
        names = self.class_names
        indices = []
        for item in items:
            if isinstance(item, str):
                if not names:
                    raise ValueError(
                        f"class label {item!r} is a name, but this U-Net's config has no class_names; pass integer "
                        "labels"
                    )
                if item not in names:
                    raise ValueError(
                        f"unknown class name {item!r}; valid names: {', '.join(map(repr, names))}"
                    )
                indices.append(names.index(item))
            elif _is_integer(item):
                indices.append(int(item))
            else:
                raise ValueError(
                    f"class_labels must be integers or class names, got {item!r} ({type(item).__name__})"
                )
        return torch.tensor(indices, dtype=torch.long)

    def _check_callback(self, callback: Any, tensor_inputs: list[str] | None) -> None:
        if callback is not None and not callable(callback):
            raise ValueError(f"callback_on_step_end must be callable, got {type(callback).__name__}")
        names = self._callback_names(callback, tensor_inputs)
        unknown = [name for name in names if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not available; choose from "
                f"{self._callback_tensor_inputs}"
            )

    @staticmethod
    def _callback_names(callback: Any, tensor_inputs: list[str] | None) -> list[str]:
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            return list(callback.tensor_inputs)
        return ["latents"] if tensor_inputs is None else list(tensor_inputs)

    # ------------------------------------------------------------------------- preparation steps
    def prepare_class_labels(
        self, class_labels: Any, batch_size: int, device: torch.device
    ) -> torch.Tensor | None:
        """The labels of the batch (names resolved, one label repeated), the null class when none are given on a
        class-conditional U-Net, or ``None`` for an unconditional one. Assumes :meth:`check_inputs` passed."""
        conditional, _, null_label = self._class_info()
        if class_labels is None:
            if not conditional:
                return None
            return torch.full((batch_size,), null_label, dtype=torch.long, device=device)
        labels = self._class_label_indices(class_labels).to(device)
        return labels.expand(batch_size) if labels.numel() == 1 else labels

    def prepare_timesteps(
        self,
        num_inference_steps: int | str,
        timesteps: list[int] | None,
        strength: float | None,
        device: torch.device,
    ) -> torch.Tensor:
        """Set the scheduler's timesteps and return those to run: all of them, or, for image-to-image
        (``strength`` not ``None``), the last ``int(num_steps * strength)`` steps."""
        parameters = inspect.signature(self.scheduler.set_timesteps).parameters
        device_kwargs = {"device": device} if "device" in parameters else {}
        if timesteps is not None:
            self.scheduler.set_timesteps(timesteps=list(timesteps), **device_kwargs)
        elif isinstance(num_inference_steps, str):
            try:
                self.scheduler.set_timesteps(num_inference_steps, **device_kwargs)
            except TypeError as error:  # e.g. diffusers' schedulers compare the string with an int
                raise ValueError(
                    f"num_inference_steps={num_inference_steps!r} is a respacing string, which "
                    f"{type(self.scheduler).__name__}.set_timesteps does not take; pass an integer number of "
                    "steps (or timesteps=[...]), or use ddpm_components' DDPMScheduler for respacing strings"
                ) from error
        else:
            self.scheduler.set_timesteps(int(num_inference_steps), **device_kwargs)
        schedule = self.scheduler.timesteps
        if strength is None:
            return schedule
        order = getattr(self.scheduler, "order", 1)
        num_steps = len(schedule) // order
        kept = min(int(num_steps * strength), num_steps)
        if kept < 1:
            raise ValueError(
                f"strength={strength} with {num_steps} inference steps keeps no denoising step: raise strength "
                f"to at least {1 / num_steps:.3g} or use more steps"
            )
        start = (num_steps - kept) * order
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        return schedule[start:]

    def prepare_latents(
        self,
        batch_size: int,
        init_image: torch.Tensor | None,
        timesteps: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """x_T ~ N(0, I), drawn exactly as diffusers' ``DDPMPipeline`` draws it; for image-to-image, the image
        noised with ``scheduler.add_noise`` to the first timestep to run (SDEdit)."""
        shape = (batch_size, *self._sample_shape())
        if device.type == "mps":  # randn is not reproducible on mps
            noise = randn_tensor(shape, generator=generator, dtype=dtype).to(device)
        else:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if init_image is not None:
            return self.scheduler.add_noise(init_image, noise, timesteps[:1].repeat(batch_size))
        return noise * getattr(self.scheduler, "init_noise_sigma", 1.0)

    def prepare_control(
        self,
        init_image: torch.Tensor | None,
        batch_size: int,
        mask_image: Any = None,
        jump_length: int | None = None,
        jump_n_sample: int | None = None,
        reference_image: Any = None,
        reference_factor: int | None = None,
        reference_until: float | None = None,
    ) -> NoiseLevelControl | None:
        """What inpainting (``mask_image``) or ILVR (``reference_image``) imposes after every step, on the device
        and in the dtype of the U-Net; ``None`` for plain sampling. Assumes :meth:`check_inputs` passed."""
        if mask_image is None and reference_image is None:
            return None
        channels, height, width = self._sample_shape()
        device, dtype = self._execution_device, self.unet.dtype
        if mask_image is not None:
            mask = mask_to_tensor(mask_image, height, width).to(device=device).bool()
            return NoiseLevelControl(
                self.scheduler,
                known=init_image,
                mask=mask.expand(batch_size, -1, -1, -1) if mask.shape[0] == 1 else mask,
                jump_length=DEFAULT_JUMP_LENGTH if jump_length is None else int(jump_length),
                jump_n_sample=DEFAULT_JUMP_N_SAMPLE if jump_n_sample is None else int(jump_n_sample),
            )
        reference = images_to_tensor(reference_image, channels)
        factor = self._reference_factor(tuple(reference.shape), reference_factor)
        reference = torch.nn.functional.interpolate(reference, scale_factor=factor, mode="nearest")
        reference = reference.expand(batch_size, -1, -1, -1) if reference.shape[0] == 1 else reference
        return NoiseLevelControl(
            self.scheduler,
            reference=reference.to(device=device, dtype=dtype).contiguous(),
            factor=factor,
            reference_until=1.0 if reference_until is None else float(reference_until),
        )

    def prepare_image(
        self, image: Any, batch_size: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """The image(s) as a ``(batch, C, H, W)`` tensor in [-1, 1] (see :func:`images_to_tensor`); one image is
        repeated ``batch_size`` times. Assumes :meth:`check_inputs` passed."""
        pixels = images_to_tensor(image, self._sample_shape()[0])
        if pixels.shape[0] == 1 and batch_size > 1:
            pixels = pixels.expand(batch_size, -1, -1, -1)
        return pixels.to(device=device, dtype=dtype)

    def predict_model_output(
        self, latents: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        """The U-Net's output at step ``t``; with guidance ε = ε_uncond + g (ε_cond − ε_uncond) in one batched
        call (Ho & Salimans 2022); for learned variance only the first C channels are guided."""
        model_input = self.scheduler.scale_model_input(latents, t)
        if labels is None:
            return self.unet(model_input, t).sample
        if self.guidance_scale == 1.0:
            return self.unet(model_input, t, class_labels=labels).sample
        null = torch.full_like(labels, self._class_info()[2])
        output = self.unet(
            torch.cat([model_input, model_input]), t, class_labels=torch.cat([null, labels])
        ).sample
        uncond, cond = output.chunk(2)
        channels = latents.shape[1]
        guided_eps = uncond[:, :channels] + self.guidance_scale * (cond[:, :channels] - uncond[:, :channels])
        return torch.cat([guided_eps, cond[:, channels:]], dim=1)

    def postprocess(self, latents: torch.Tensor, output_type: str) -> Any:
        """Check the samples are finite (one check at the end, no per-step sync), then convert them to
        ``output_type``. Raises ``FloatingPointError`` instead of returning black or NaN images."""
        finite = torch.isfinite(latents).flatten(1).all(dim=1)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise FloatingPointError(
                f"sampling produced NaN or infinite values in {bad} of {latents.shape[0]} images, so no images are "
                "returned; the U-Net's output or the scheduler's step is not finite (weights saved from a diverged "
                "training run, a float16 overflow: try float32, or a scheduler setting that divides by zero)"
            )
        return VaeImageProcessor(do_resize=False, vae_scale_factor=1).postprocess(
            latents, output_type=output_type
        )

    # ----------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | str | None = None,
        timesteps: list[int] | None = None,
        class_labels: int | str | list[int | str] | torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        image: Any = None,
        strength: float = 1.0,
        output_type: OutputType = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        mask_image: Any = None,
        jump_length: int | None = None,
        jump_n_sample: int | None = None,
        reference_image: Any = None,
        reference_factor: int | None = None,
        reference_until: float | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images by running the reverse diffusion process.

        Args:
            batch_size: how many images (with ``image``: one image is repeated ``batch_size`` times; several
                images make the batch themselves).
            generator: a ``torch.Generator`` or one per image, for reproducible sampling.
            num_inference_steps: number of denoising steps (1000 reproduces the DDPM paper); a string (e.g.
                ``"ddim50"``) is passed on to schedulers that take respacing strings, such as ours. Default: the
                scheduler config's ``_default_num_inference_steps`` (a distilled model's step count), else 1000.
            timesteps: custom descending timesteps (for schedulers whose ``set_timesteps`` takes them);
                overrides ``num_inference_steps``.
            class_labels: one label or one per image, for class-conditional U-Nets: integers, or names from the
                U-Net's ``class_names`` (``"cat"``, ``["cat", 3]``). ``None`` on a class-conditional U-Net with a
                null class samples unconditionally.
            guidance_scale: classifier-free guidance weight g (finite): ε = ε_uncond + g (ε_cond − ε_uncond); 1.0
                turns it off. Needs a U-Net with a null class (``unet.null_class_label``). With learned variance
                only the first C output channels (the mean part) are guided; the conditional variance is kept.
            image: image-to-image (SDEdit), or the picture to inpaint with ``mask_image``: PIL image(s), numpy
                arrays or tensors, with the ranges documented in :func:`images_to_tensor`, at the U-Net's size.
            strength: with ``image``, in (0, 1]: the fraction of the denoising schedule to run. The image is noised
                with ``scheduler.add_noise`` to the first kept timestep and denoised from there; 1.0 starts from
                (almost) pure noise.
            output_type: ``"pil"``, ``"np"`` (``(N, H, W, C)`` in [0, 1]) or ``"pt"`` (``(N, C, H, W)`` in [0, 1]).
            return_dict: return an ``ImagePipelineOutput`` (else a tuple).
            callback_on_step_end: ``callback(pipe, step_index, timestep, callback_kwargs) -> dict`` called after
                every step (diffusers' convention); returned tensors (e.g. ``"latents"``) replace the current ones.
            callback_on_step_end_tensor_inputs: names passed in ``callback_kwargs`` (default ``["latents"]``).
            mask_image: inpainting (RePaint): with ``image``, where white (>= 0.5) is repainted and black is kept,
                as in diffusers' Stable Diffusion inpainting pipelines (the opposite of diffusers'
                ``RePaintPipeline``). PIL image(s), numpy arrays, tensors (as ``image``; booleans too), resized to
                the U-Net's size with nearest-neighbour sampling; one mask or one per image. After every step the
                kept pixels are replaced by q(x_{t-1} | x_0) of the input, and the result keeps them exactly. The
                whole chain runs from pure noise unless ``strength`` < 1 is given (then as image-to-image).
            jump_length, jump_n_sample: RePaint's resampling (default 10 and 1): each piece of ``jump_length``
                steps is run ``jump_n_sample`` times in all, going back up with the forward process between runs
                (see :func:`repaint_step_indices`); ``jump_n_sample=1`` is plain replacement. RePaint's 10 / 10
                costs about 10× the U-Net calls.
            reference_image: super-resolution (ILVR): a low-resolution image (or one per image, as ``image``);
                after every step x_{t-1} ← x_{t-1} − φ_N(x_{t-1}) + φ_N(y_{t-1}), y_{t-1} ~ q(y_{t-1} | y_0), where
                φ_N is area down-sampling by N then nearest up-sampling. The result down-sampled by N matches it.
            reference_factor: N (an integer); its size times N must be the U-Net's resolution. Default: inferred
                from the sizes.
            reference_until: the fraction of the steps, from the first, that follow the reference, in (0, 1]
                (default 1: all, so the result down-sampled by N equals the reference up to clipping); less leaves
                the last steps free (ILVR's conditioning range).

        Returns:
            ``ImagePipelineOutput(images=...)`` or ``(images,)``.

        Raises:
            ValueError: a bad argument (see :meth:`check_inputs`), before any denoising step.
            FloatingPointError: the samples hold NaN or infinity (see :meth:`postprocess`).
        """
        control_kwargs = dict(
            mask_image=mask_image, jump_length=jump_length, jump_n_sample=jump_n_sample, reference_image=reference_image,
            reference_factor=reference_factor, reference_until=reference_until,
        )  # fmt: skip
        # 1. check every input before any work
        if num_inference_steps is None:
            num_inference_steps = self.default_num_inference_steps
        batch_size = self.check_inputs(
            batch_size, generator, num_inference_steps, timesteps, class_labels, guidance_scale, image, strength,
            output_type, callback_on_step_end, callback_on_step_end_tensor_inputs, **control_kwargs,
        )  # fmt: skip
        self._guidance_scale = float(guidance_scale)
        self._interrupt = False
        device, dtype = self._execution_device, self.unet.dtype
        init_image = None if image is None else self.prepare_image(image, batch_size, device, dtype)
        labels = self.prepare_class_labels(class_labels, batch_size, device)
        control = self.prepare_control(init_image, batch_size, **control_kwargs)

        # 2. timesteps: all of them, or the last `strength` part for image-to-image
        schedule = self.prepare_timesteps(
            num_inference_steps, timesteps, None if image is None else strength, device
        )

        # 3. x_T (or the noised image; inpainting the whole chain starts from pure noise, as diffusers does)
        from_noise = mask_image is not None and strength == 1.0
        latents = self.prepare_latents(
            batch_size, None if from_noise else init_image, schedule, generator, device, dtype
        )
        if control is not None:
            latents = control.start(latents, schedule[:1], generator)

        # 4. the denoising loop (Algorithm 2), with the inpainting / ILVR replacements after every step
        latents = self.denoise(
            latents,
            schedule,
            labels,
            generator,
            control,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )
        if control is not None:
            latents = control.finish(latents)

        # 5. postprocess
        images = self.postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def denoise(
        self,
        latents: torch.Tensor,
        schedule: torch.Tensor,
        labels: torch.Tensor | None,
        generator: torch.Generator | list[torch.Generator] | None,
        control: NoiseLevelControl | None = None,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> torch.Tensor:
        """The reverse chain over ``schedule`` from ``latents``: one U-Net call and one ``scheduler.step`` per
        step, then ``control``'s replacement (inpainting, ILVR) and the step-end callback. With RePaint's
        resampling the chain goes back up (``control.jump``) and redoes steps (:func:`repaint_step_indices`)."""
        step_kwargs = (
            {"generator": generator}
            if "generator" in inspect.signature(self.scheduler.step).parameters
            else {}
        )
        callback_names = self._callback_names(callback_on_step_end, callback_on_step_end_tensor_inputs)
        order = list(range(len(schedule))) if control is None else control.step_order(len(schedule))
        self._num_timesteps = len(order)
        values = [int(t) for t in schedule] if control is not None and control.jump_n_sample > 1 else []
        previous = -1
        for i, index in enumerate(self.progress_bar(order)):
            if self.interrupt:
                break
            if index <= previous:  # RePaint: back up from the state after step `previous` to step `index`
                latents = control.jump(latents, values[previous + 1], values[index], generator)
            previous, t = index, schedule[index]
            model_output = self.predict_model_output(latents, t, labels)
            latents = self.scheduler.step(model_output, t, latents, **step_kwargs, return_dict=False)[0]
            if control is not None:
                latents = control.project(latents, index, schedule[index + 1 : index + 2], generator)
            if callback_on_step_end is not None:
                scope = {"latents": latents}
                callback_kwargs = {name: scope[name] for name in callback_names}
                callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                latents = callback_outputs.pop("latents", latents)
        return latents

    # ------------------------------------------------------------------------------------- saving
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        *,
        training_config: dict | None = None,
        layout: SaveLayout = "auto",
        sample_grid: Any = None,
        evaluation: dict[str, str] | None = None,
        overwrite: bool = False,
        **kwargs: Any,
    ) -> None:
        """Save the pipeline to a folder, crash-safely, in a layout that loads where ddpm-components is absent.

        With ``layout="auto"`` (default), a pipeline holding any non-diffusers component (our U-Net or
        scheduler) is saved in the remote-code layout: ``model_index.json`` names the pipeline and those
        components by module file (``"_class_name": ["pipeline_ddpm", "DDPMPipeline"]``,
        ``"unet": ["unet_ddpm", "DDPMUNet2DModel"]``), this file is copied to the folder root and each
        component's module file next to its weights. Such a folder loads with
        ``DiffusionPipeline.from_pretrained(path, trust_remote_code=True)`` anywhere and with
        ``ddpm_components.DDPMPipeline.from_pretrained(path)`` where the package is installed. A pipeline of only
        diffusers components is saved as a plain diffusers folder (``"_class_name": "DDPMPipeline"``), which
        ``DiffusionPipeline.from_pretrained(path)`` loads as diffusers' own ``DDPMPipeline`` (same unconditional
        images) and ``ddpm_components.DDPMPipeline.from_pretrained(path)`` as this class.
        ``layout="remote_code"`` forces the remote-code layout, ``"diffusers"`` writes what plain diffusers writes.

        The folder itself is never renamed, and nothing in it that this save does not write is moved or deleted
        (only files that the previous save's manifest lists and this save no longer writes are removed). The
        files are written to a hidden staging folder inside it, then moved into place one by one: an interrupt at
        any moment leaves the old pipeline, the new one, or a folder that refuses to load with a message naming
        the interrupted save; the next save (or :func:`repair_interrupted_save`) repairs it. See
        :func:`repair_interrupted_save` and ``docs/pipeline.md``.

        Args:
            save_directory: the target folder.
            safe_serialization, variant, max_shard_size: as in diffusers (safetensors by default).
            push_to_hub: also push to the Hub (``repo_id=`` and :meth:`push_to_hub`'s keywords in ``kwargs``).
            training_config: the training configuration, written as is to ``training_config.json``; the model
                card shows :func:`published_training_config` of it (no local paths).
            layout: ``"auto"``, ``"remote_code"`` or ``"diffusers"`` (see above).
            sample_grid: an optional PIL image saved as ``samples.png`` and shown in the model card.
            evaluation: optional measured numbers for the model card's "Evaluation" table (``{what: value}``,
                e.g. ``{"digits FD, 200 samples, 100 steps": "4.81"}``).
            overwrite: replace files at the names this save writes (``README.md``, ``model_index.json``, ...)
                that no earlier save of ours wrote; by default such files of yours are a ``ValueError`` and
                nothing is changed (files listed in the folder's save manifest are ours and always replaced).
        """
        _check_choice("layout", layout, get_args(SaveLayout))
        target = check_save_directory(save_directory)
        repair_interrupted_save(target)
        target.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=target))
        try:
            self._write_pipeline_files(
                staging,
                safe_serialization=safe_serialization,
                variant=variant,
                max_shard_size=max_shard_size,
                training_config=training_config,
                layout=layout,
                sample_grid=sample_grid,
                evaluation=evaluation,
                repo_id=kwargs.get("repo_id") or target.name,
            )
            _commit_staged_save(target, staging, overwrite)
        finally:
            _discard_uncommitted_staging(target, staging)
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", target.name)
            self.push_to_hub(
                repo_id,
                training_config=training_config,
                layout=layout,
                sample_grid=sample_grid,
                evaluation=evaluation,
                **kwargs,
            )

    def _write_pipeline_files(
        self,
        folder: Path,
        *,
        safe_serialization: bool,
        variant: str | None,
        max_shard_size: int | str | None,
        training_config: dict | None,
        layout: SaveLayout,
        sample_grid: Any,
        evaluation: dict[str, str] | None,
        repo_id: str,
    ) -> None:
        """Write every file of a save into the empty ``folder`` (diffusers' files, our layout, the card)."""
        super().save_pretrained(
            folder, safe_serialization=safe_serialization, variant=variant, max_shard_size=max_shard_size
        )
        remote = layout == "remote_code" or (layout == "auto" and self._has_custom_components())
        if remote:
            self._write_remote_code_layout(folder)
        _strip_local_paths_from_configs(folder)
        if training_config is not None:
            _write_text(
                folder / TRAINING_CONFIG_NAME, json.dumps(training_config, indent=2, default=str) + "\n"
            )
        if sample_grid is not None:
            sample_grid.save(folder / SAMPLE_GRID_NAME, format="PNG")
        card = self._model_card(
            repo_id=repo_id,
            remote_code=remote,
            training_config=None if training_config is None else published_training_config(training_config),
            has_grid=sample_grid is not None,
            evaluation=evaluation,
        )
        _write_text(folder / "README.md", card)
        match_file_modes(folder, folder / "model_index.json")

    def _components_to_save(self) -> dict[str, Any]:
        # torch.compile's wrapper keeps the model in `_orig_mod` (torch has no public accessor; diffusers'
        # `unwrap_module`, which reads the same attribute, is not in every diffusers this file supports)
        return {name: getattr(c, "_orig_mod", c) for name, c in self.components.items() if c is not None}

    def _has_custom_components(self) -> bool:
        return any(not _is_library_class(type(c)) for c in self._components_to_save().values())

    def _write_remote_code_layout(self, folder: Path) -> None:
        """Copy module files next to the weights and point ``model_index.json`` at them."""
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text(encoding="utf-8"))
        pipeline_file = _module_file(type(self))
        shutil.copyfile(pipeline_file, folder / pipeline_file.name)
        index["_class_name"] = [pipeline_file.stem, type(self).__name__]
        for name, component in self._components_to_save().items():
            component_class = type(component)
            if _is_library_class(component_class):
                continue
            module_file = _module_file(component_class)
            shutil.copyfile(module_file, folder / name / module_file.name)
            index[name] = [module_file.stem, component_class.__name__]
        _write_text(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")

    # -------------------------------------------------------------------------------- model card
    def _model_card(
        self,
        repo_id: str,
        remote_code: bool,
        training_config: dict | None,
        has_grid: bool,
        evaluation: dict[str, str] | None = None,
    ) -> str:
        """The model card (README.md): YAML metadata, samples, how to load, the model and training setup."""
        from diffusers.utils.hub_utils import ModelCardData

        conditional, num_classes, null_label = self._class_info()
        tags = list(_CARD_TAGS) + (["class-conditional"] if conditional else [])
        data = ModelCardData(
            library_name="diffusers", pipeline_tag="unconditional-image-generation", tags=tags
        )
        unet, scheduler = self.unet, self.scheduler
        channels, height, width = self._sample_shape()
        parameters = sum(p.numel() for p in unet.parameters()) if isinstance(unet, torch.nn.Module) else None
        trust = ", trust_remote_code=True" if remote_code else ""
        steps = self.default_num_inference_steps
        call = (
            f"pipe(num_inference_steps={steps}, class_labels=[0]).images[0]"
            if conditional and null_label is None
            else (f"pipe(num_inference_steps={steps}).images[0]")
        )
        lines = [
            f"# {repo_id.split('/')[-1]}",
            "",
            "A Denoising Diffusion Probabilistic Model (DDPM, [Ho et al. 2020](https://arxiv.org/abs/2006.11239)) "
            "made with ddpm-components for 🧨 diffusers.",
            "",
        ]
        if has_grid:
            lines += [f"![samples]({SAMPLE_GRID_NAME})", ""]
        lines += [
            "## How to use",
            "",
            "```python",
            "from diffusers import DiffusionPipeline",
            f'pipe = DiffusionPipeline.from_pretrained("{repo_id}"{trust})',
            f"image = {call}",
            "```",
            "",
        ]
        if remote_code:
            lines += [
                "`trust_remote_code=True` runs the Python files stored in this repository (the pipeline and "
                "its custom components); read them first. Where ddpm-components is "
                f'installed, `ddpm_components.DDPMPipeline.from_pretrained("{repo_id}")` uses the installed code instead.',
                "",
            ]
        lines += ["## Model", "", "| | |", "|---|---|"]
        lines.append(
            f"| U-Net | `{type(unet).__name__}`"
            + (f", {parameters / 1e6:.2f}M parameters |" if parameters else " |")
        )
        lines.append(f"| samples | {channels} × {height} × {width} |")
        if conditional:
            extra = f", null class {null_label} (classifier-free guidance)" if null_label is not None else ""
            lines.append(f"| classes | {num_classes}{extra} |")
            if self.class_names:
                shown = ", ".join(f"{label} = `{name}`" for label, name in enumerate(self.class_names[:20]))
                more = f", ... ({len(self.class_names)} in all)" if len(self.class_names) > 20 else ""
                lines.append(f"| class names | {shown}{more} |")
        scheduler_config = getattr(scheduler, "config", {})
        lines.append(f"| scheduler | `{type(scheduler).__name__}` |")
        for key in (
            "num_train_timesteps",
            "beta_schedule",
            "beta_start",
            "beta_end",
            "variance_type",
            "prediction_type",
            "timestep_spacing",
            "eta",
            "multistep_order",
        ):
            if key in scheduler_config:
                lines.append(f"| {key} | `{scheduler_config[key]}` |")
        lines.append("")
        if evaluation:
            lines += ["## Evaluation", "", "| measured | value |", "|---|---|"]
            lines += [f"| {what} | {value} |" for what, value in evaluation.items()]
            lines.append("")
        if training_config is not None:
            lines += [
                "## Training configuration",
                "",
                "```json",
                json.dumps(training_config, indent=2, default=str),
                "```",
                "",
            ]
        return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)

    # ----------------------------------------------------------------------------------- sharing
    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
        *,
        training_config: dict | None = None,
        layout: SaveLayout = "auto",
        sample_grid: Any = None,
        evaluation: dict[str, str] | None = None,
        num_sample_images: int = 16,
        sample_inference_steps: int | None = None,
        sample_seed: int = 0,
    ) -> str:
        """Upload the pipeline (the :meth:`save_pretrained` layout) plus a model card to the Hub.

        The repository is created first (so that a bad token or an unreachable Hub fails before any sampling),
        then, unless ``sample_grid`` is given or ``num_sample_images=0``, ``num_sample_images`` images are sampled
        with ``sample_inference_steps`` steps (default 100; at most num_train_timesteps) and seed ``sample_seed``
        for the card's grid. Files are written to a temporary folder: local files are never touched. What is
        uploaded carries no local paths: the training configuration is :func:`published_training_config` of
        ``training_config`` and the save's bookkeeping files (its manifest) stay out of the upload.

        Returns:
            The URL of the commit. Hub failures raise :class:`HubError` with a message that says what to do.
        """
        if num_sample_images < 0:
            raise ValueError(f"num_sample_images must be >= 0, got {num_sample_images}")
        repo_id = create_hub_repo(repo_id, private=private, token=token)
        if sample_grid is None and num_sample_images > 0:
            sample_grid = self._sample_grid(num_sample_images, sample_inference_steps, sample_seed)
        with tempfile.TemporaryDirectory(prefix="ddpm-push-") as tmp:
            folder = Path(tmp) / "pipeline"
            self.stage_for_hub(
                folder,
                repo_id,
                training_config=training_config,
                safe_serialization=safe_serialization,
                variant=variant,
                layout=layout,
                sample_grid=sample_grid,
                evaluation=evaluation,
            )
            return upload_staged_pipeline(
                folder, repo_id, token=token, commit_message=commit_message, create_pr=create_pr
            )

    def stage_for_hub(
        self,
        folder: str | os.PathLike,
        repo_id: str,
        *,
        training_config: dict | None = None,
        safe_serialization: bool = True,
        variant: str | None = None,
        layout: SaveLayout = "auto",
        sample_grid: Any = None,
        evaluation: dict[str, str] | None = None,
    ) -> None:
        """Write what :meth:`push_to_hub` uploads into the new ``folder``: the :meth:`save_pretrained` layout with a
        card for ``repo_id`` and :func:`published_training_config` of ``training_config`` (no local paths). Upload
        it with :func:`upload_staged_pipeline` (a snapshot: later saves elsewhere cannot change it mid-upload)."""
        self.save_pretrained(
            folder,
            safe_serialization=safe_serialization,
            variant=variant,
            training_config=None if training_config is None else published_training_config(training_config),
            layout=layout,
            sample_grid=sample_grid,
            evaluation=evaluation,
            repo_id=repo_id,
        )

    def _sample_grid(self, num_images: int, steps: int | None, seed: int) -> Any:
        """Sample ``num_images`` images and arrange them in a near-square grid (a PIL image)."""
        num_train_timesteps = int(getattr(self.scheduler.config, "num_train_timesteps", 1000))
        steps = min(
            min(100, self.default_num_inference_steps) if steps is None else steps, num_train_timesteps
        )
        conditional, num_classes, null_label = self._class_info()
        labels = None
        if conditional and null_label is None and num_classes:
            labels = [i % num_classes for i in range(num_images)]
        images = self(
            batch_size=num_images,
            generator=torch.Generator().manual_seed(seed),
            num_inference_steps=steps,
            class_labels=labels,
        ).images
        columns = next(c for c in range(int(num_images**0.5), num_images + 1) if num_images % c == 0)
        columns = max(columns, num_images // columns)
        grid = make_image_grid(images, rows=num_images // columns, cols=columns)
        return grid.convert(images[0].mode)  # make_image_grid pastes onto RGB; keep greyscale greyscale

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> DDPMPipeline:
        """Load a pipeline from a folder or a Hub repo id.

        Plain diffusers folders load through diffusers. Folders in the remote-code layout (see
        :meth:`save_pretrained`) load without running their stored code when the component modules they name
        are installed next to this module (``ddpm_components``); otherwise the stored component code is used,
        which needs ``trust_remote_code=True``. Components passed as keywords (``scheduler=...``) are used as is.

        A folder whose last save was interrupted is refused with a ``ValueError`` that says how to repair it
        (see :func:`check_not_interrupted`). Weights load from safetensors only: pickle files (``.bin``) need an
        explicit ``use_safetensors=False`` (loading a pickle can run code).
        """
        kwargs.setdefault("use_safetensors", True)
        source = str(pretrained_model_name_or_path)
        folder = Path(source)
        if not folder.is_dir():
            _check_not_moved_away(folder)
            if source.count("/") > 1 or not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", source):
                raise ValueError(
                    f"{source!r} is neither an existing folder nor a Hub repo id ('namespace/name')"
                )
            download_kwargs = {k: kwargs[k] for k in _DOWNLOAD_KWARGS if k in kwargs}
            index = _read_remote_index(source, download_kwargs)
            if not isinstance(index.get("_class_name"), list):
                return super().from_pretrained(source, **kwargs)
            from diffusers.utils.hub_utils import snapshot_download

            for key in _DOWNLOAD_KWARGS:
                kwargs.pop(key, None)
            try:
                folder = Path(snapshot_download(source, **download_kwargs))
            except Exception as error:
                _raise_hub_error(error, source, "downloading")
                raise
        check_not_interrupted(folder)
        index_path = folder / "model_index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{folder} has no model_index.json: it is not a saved pipeline folder")
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if not isinstance(index.get("_class_name"), list):
            return super().from_pretrained(str(folder), **kwargs)
        return cls._from_remote_code_layout(folder, index, source, kwargs)

    @classmethod
    def _from_remote_code_layout(cls, folder: Path, index: dict, source: str, kwargs: dict) -> DDPMPipeline:
        import diffusers

        trust_remote_code = kwargs.pop("trust_remote_code", False)
        model_kwargs = {k: kwargs.pop(k) for k in _MODEL_LOAD_KWARGS if k in kwargs}
        expected = set(inspect.signature(cls.__init__).parameters) - {"self"}
        components = {name: kwargs.pop(name) for name in list(kwargs) if name in expected}
        if kwargs:
            logger.warning(
                "keyword arguments %s are not used by %s.from_pretrained", sorted(kwargs), cls.__name__
            )
        package = cls.__module__.rpartition(".")[0]
        for name in sorted(expected - set(components)):
            entry = index.get(name)
            if not isinstance(entry, list) or entry[0] is None:
                raise ValueError(f"model_index.json in {folder} has no component {name!r}")
            library, class_name = entry
            component_class = None
            if (folder / name / f"{library}.py").is_file():
                if package:
                    with contextlib.suppress(ImportError):
                        module = __import__(f"{package}.{library}", fromlist=[class_name])
                        component_class = getattr(module, class_name, None)
                if component_class is None:
                    from diffusers.utils.dynamic_modules_utils import get_class_from_dynamic_module

                    component_class = get_class_from_dynamic_module(
                        str(folder / name),
                        module_file=f"{library}.py",
                        class_name=class_name,
                        trust_remote_code=trust_remote_code,
                    )
            else:
                component_class = (
                    getattr(diffusers, class_name, None) if library in _LIBRARY_PACKAGES else None
                )
                if component_class is None:
                    raise ValueError(
                        f"cannot load component {name!r} = {entry}: {folder / name / (library + '.py')} is missing"
                    )
            load_kwargs = model_kwargs if issubclass(component_class, ModelMixin) else {}
            components[name] = component_class.from_pretrained(folder, subfolder=name, **load_kwargs)
        pipeline = cls(**components)
        pipeline.register_to_config(_name_or_path=source)
        return pipeline


# ------------------------------------------------------------------------------------------- helpers
def _is_library_class(component_class: type) -> bool:
    """True for classes that diffusers loads by name (diffusers' and transformers' own)."""
    return component_class.__module__.split(".")[0] in _LIBRARY_PACKAGES


def _module_file(component_class: type) -> Path:
    """The source file that defines ``component_class`` (copied as remote code)."""
    source = inspect.getsourcefile(component_class)
    if source is None or not source.endswith(".py"):
        raise ValueError(
            f"cannot find the source file of {component_class.__module__}.{component_class.__name__} to save it "
            "as remote code; use layout='diffusers'"
        )
    return Path(source)


def check_save_directory(save_directory: str | os.PathLike) -> Path:
    """Check that a pipeline can be saved into ``save_directory`` and return its absolute path; nothing is written
    to it. Call it before long work (training, sampling) whose result is saved there.

    Raises ``ValueError`` when the path is a file, the working folder or one of its parents, or when the folder
    (or, if it does not exist yet, its nearest existing parent) cannot be written.
    """
    target = Path(os.path.abspath(os.fspath(save_directory)))  # "out/../out" -> "out"
    working_directory = Path.cwd().resolve()
    resolved = target.resolve()  # a symbolic link to the working folder (or a parent) is that folder
    if resolved == working_directory or resolved in working_directory.parents:
        raise ValueError(
            f"save_directory={str(save_directory)!r} is the current folder or one of its parents; pass a folder of "
            "its own, e.g. './my-ddpm'"
        )
    existing = target
    while not existing.exists():
        existing = existing.parent
    if existing != target and not existing.is_dir():
        raise ValueError(f"cannot save to {str(save_directory)!r}: {str(existing)!r} is a file, not a folder")
    if existing == target and not target.is_dir():
        raise ValueError(f"cannot save to {str(save_directory)!r}: it is a file, not a folder")
    reason = unwritable_reason(existing)
    if reason is not None:
        raise ValueError(
            f"cannot save to {str(save_directory)!r}: {str(existing)!r} is not writable ({reason})"
        )
    return target


def unwritable_reason(folder: str | os.PathLike) -> str | None:
    """``None`` when a file can be created in the existing ``folder``, else why not. Tried for real (a temporary
    file, removed at once): permission bits do not tell for root, read-only mounts, pseudo file systems or full
    disks."""
    try:
        handle, probe = tempfile.mkstemp(prefix=".ddpm-write-test-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        return str(error.strerror or error)
    return None


def saved_pipeline_files(folder: str | os.PathLike) -> list[str]:
    """The files (paths relative to ``folder``, ``/``-separated) that the last completed :meth:`DDPMPipeline.
    save_pretrained` into ``folder`` wrote, from its manifest; ``[]`` when the folder holds no save of ours."""
    manifest = Path(folder) / SAVE_MANIFEST_NAME
    if not manifest.is_file():
        return []
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{manifest} is not a valid save manifest ({error}); delete it by hand") from None
    return [name for name in files if isinstance(name, str)]


def remove_saved_pipeline(folder: str | os.PathLike) -> list[str]:
    """Delete the pipeline that :meth:`DDPMPipeline.save_pretrained` wrote into ``folder``: exactly the files its
    manifest lists (and those of an interrupted save, from its marker), then the manifest and sub-folders left
    empty, never anything else. Leftovers of interrupted saves are repaired first (:func:`repair_interrupted_save`).
    ``model_index.json`` goes first, so an interrupted removal leaves a folder that no loader takes for a pipeline.
    Returns the files deleted."""
    root = Path(os.path.abspath(os.fspath(folder)))
    repair_interrupted_save(root)
    if not root.is_dir():
        return []
    record = _read_save_record(root)
    names = set(saved_pipeline_files(root)) | set(record["files"] if record else ())
    ordered = sorted(names, key=lambda name: (name != _INDEX_NAME, name))
    removed = _remove_listed_files(root, ordered)
    (root / SAVE_IN_PROGRESS_NAME).unlink(missing_ok=True)
    (root / SAVE_MANIFEST_NAME).unlink(missing_ok=True)
    return removed


# ------------------------------------------------------------------------------------ the save's commit
# How a save commits (save_pretrained -> _commit_staged_save -> _finish_commit). The output folder itself is
# never renamed, so mount points work and its permissions, checkpoints and other files stay as they are.
#   1. every file of the save is written to a staging folder of ours INSIDE the target (one file system, so the
#      moves below are renames) and fsynced; nothing visible has changed yet;
#   2. the marker SAVE_IN_PROGRESS_NAME is written (the save's files, the previous save's files, the staging
#      folder): from here on DDPMPipeline.from_pretrained refuses the folder, naming the interrupted save;
#   3. model_index.json is replaced by a tombstone that diffusers' loaders refuse (its "_class_name" and
#      component entries are a sentence naming the interrupted save, which diffusers' error message shows);
#   4. each new file is moved into place with os.replace; files that the previous save wrote and this one does
#      not are deleted; the new manifest is written;
#   5. the new model_index.json is moved into place: diffusers' loaders see the new pipeline;
#   6. the marker is removed: our loader sees it too; then the (empty) staging folder goes.
# An interrupt before 2 leaves the old pipeline (and a staging folder that the next save removes), between 2 and
# 6 a folder that refuses to load, after 6 the new pipeline. Once the marker exists the staged files are complete,
# so repair_interrupted_save (run by every save) finishes steps 3-6 from it.

#: present while a save is being committed; lists the save's files; a folder holding it is refused on load
SAVE_IN_PROGRESS_NAME = ".ddpm_components_save_in_progress.json"
_STAGING_PREFIX = ".ddpm_components_staging-"
_INDEX_NAME = "model_index.json"
#: files of a save that are local bookkeeping, not part of the model: never uploaded
_BOOKKEEPING_PATTERNS = (SAVE_MANIFEST_NAME, SAVE_IN_PROGRESS_NAME, f"{_STAGING_PREFIX}*")
_TOMBSTONE_KEY = "_ddpm_components_interrupted_save"
_TOMBSTONE_NOTICE = (
    "INTERRUPTED SAVE: a save of a ddpm-components pipeline into this folder was interrupted, so its files may "
    "mix two saves and it must not be loaded. Repair it by saving the pipeline into this folder again, or with "
    "ddpm_components.pipeline_ddpm.repair_interrupted_save(folder), which completes the interrupted save"
)
# temporary files of our atomic writers: ".NAME.<32 hex>.tmp" (this module), ".NAME.<pid>.tmp" (data module)
_TEMPORARY_FILE = re.compile(r"\..+\.(?:[0-9a-f]{32}|(?P<pid>\d+))\.tmp")
_WRITE_PROBE = re.compile(r"\.ddpm-write-test-\w+")  # check_save_directory's probe, killed before its unlink


def check_not_interrupted(folder: str | os.PathLike) -> None:
    """Raise ``ValueError`` when ``folder`` holds an interrupted save (its marker, or the tombstone
    ``model_index.json`` of a commit in progress), saying how to repair it; return otherwise."""
    root = Path(folder)
    if os.path.lexists(root / SAVE_IN_PROGRESS_NAME) or _is_tombstone(root / _INDEX_NAME):
        raise ValueError(
            f"a save into {str(root)!r} was interrupted, so its files may mix two saves, and it is not loaded. "
            "Repair it: save the pipeline into that folder again, or call "
            "ddpm_components.pipeline_ddpm.repair_interrupted_save(folder), which completes the interrupted save "
            "(other files in the folder are never touched)"
        )


def repair_interrupted_save(folder: str | os.PathLike) -> list[str]:
    """Repair what interrupted saves left in or beside ``folder``; return what was done (one line each).

    - A save interrupted while its files were moved into place (its marker :data:`SAVE_IN_PROGRESS_NAME` is
      present and its staged files complete) is finished: the folder then loads as that save.
    - Our staging folders (``.ddpm_components_staging-*``) and stale temporary files of our atomic writers
      (``.NAME.<hex>.tmp``, and ``.NAME.<pid>.tmp`` of processes that no longer run) are removed, in the folder
      and its direct sub-folders.
    - Leftovers of the earlier save implementation, beside the folder: a ``.NAME.old-*`` backup is moved back
      (the whole folder when it is missing; else every entry the folder lacks; where both hold a file, the
      backup's copy is deleted only if the backup's own save manifest lists it, anything else is kept there with
      a warning); ``.NAME.saving-*`` is removed.

    Nothing else is moved or deleted. Every save runs it first; it is safe to run again after an interrupt.
    """
    target = Path(os.path.abspath(os.fspath(folder)))
    done = _restore_moved_away_folder(target)
    if not target.is_dir():
        return done
    record = _read_save_record(target)
    if record is not None and _staged_save_is_complete(target, record):
        _finish_commit(target, record)
        done.append(f"completed the interrupted save ({len(record['files'])} files)")
    for staging in sorted(target.glob(f"{_STAGING_PREFIX}*")):
        if staging.is_dir() and not staging.is_symlink():
            shutil.rmtree(staging)
            done.append(f"removed the staging folder {staging.name}")
    return done + _remove_stale_temporary_files(target)


def _commit_staged_save(target: Path, staging: Path, overwrite: bool = False) -> None:
    """Move the complete save in ``staging`` (a folder inside ``target``) into ``target`` (steps 2-6 above)."""
    files = sorted(path.relative_to(staging).as_posix() for path in staging.rglob("*") if path.is_file())
    _check_destinations(target, staging, files)
    # an interrupted save that could not be finished (repair_interrupted_save ran first): its files are ours too
    pending = _read_save_record(target)
    previous = set(saved_pipeline_files(target)) | set(pending["files"] if pending else ())
    foreign = [name for name in files if name not in previous and os.path.lexists(target / name)]
    if foreign and not overwrite:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ValueError(
            f"save_directory={str(target)!r} holds {shown}, at names this save writes, which no earlier save of "
            "ddpm-components wrote (no save manifest lists them); move them away, choose another folder, or pass "
            "overwrite=True to replace them (nothing was changed)"
        )
    for name in files:
        _fsync_file(staging / name)
    for path in {(staging / name).parent for name in files}:
        _fsync_directory(path)
    record = {"staging": staging.name, "files": files, "previous": sorted(previous)}
    _write_text(target / SAVE_IN_PROGRESS_NAME, json.dumps(record, indent=2) + "\n")
    _fsync_directory(target)
    _finish_commit(target, record)


def _finish_commit(target: Path, record: dict) -> None:
    """Steps 3-6 of a commit, from its record; each step is skipped when already done, so an interrupted commit
    can be finished by running this again."""
    staging, files = target / record["staging"], record["files"]
    if (staging / _INDEX_NAME).is_file():
        _write_text(target / _INDEX_NAME, _tombstone(staging / _INDEX_NAME))
    touched = {target}
    for name in files:
        source, destination = staging / name, target / name
        if name == _INDEX_NAME or not os.path.lexists(source):
            continue  # model_index.json goes last; other files may have been moved before an interrupt
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, destination)
        touched.add(destination.parent)
    _remove_listed_files(target, sorted(set(record["previous"]) - set(files)))
    _write_text(target / SAVE_MANIFEST_NAME, json.dumps({"files": files}, indent=2) + "\n")
    for path in touched:
        _fsync_directory(path)
    if (staging / _INDEX_NAME).is_file():
        os.replace(staging / _INDEX_NAME, target / _INDEX_NAME)
        _fsync_directory(target)
    (target / SAVE_IN_PROGRESS_NAME).unlink(missing_ok=True)
    _fsync_directory(target)
    shutil.rmtree(staging, ignore_errors=True)


def _discard_uncommitted_staging(target: Path, staging: Path) -> None:
    """After a save (done or failed): remove ``staging`` unless its commit had started; a started commit that
    failed (an interrupt, a disk error) is finished now if it can be, else left for the next repair."""
    if not staging.exists():
        return
    record = _read_save_record(target)
    if record is None or record["staging"] != staging.name:
        shutil.rmtree(staging, ignore_errors=True)
        return
    with contextlib.suppress(Exception):  # the original exception is the one to report
        _finish_commit(target, record)


def _read_save_record(target: Path) -> dict | None:
    """The marker of a save in progress as ``{"staging", "files", "previous"}``; ``None`` without a marker. An
    unreadable marker gives a record that lists no files (it cannot be finished; the folder stays refused)."""
    path = target / SAVE_IN_PROGRESS_NAME
    if not os.path.lexists(path):
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        staging, files, previous = record["staging"], record["files"], record["previous"]
        valid = isinstance(staging, str) and staging.startswith(_STAGING_PREFIX) and "/" not in staging
        valid = valid and all(isinstance(name, str) for name in [*files, *previous])
    except (OSError, ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        return {"staging": "", "files": [], "previous": []}
    return {"staging": staging, "files": list(files), "previous": list(previous)}


def _staged_save_is_complete(target: Path, record: dict) -> bool:
    """True when every file of the recorded save is still staged or already moved into place."""
    staging = target / record["staging"]
    if not record["staging"] or not staging.is_dir() or _INDEX_NAME not in record["files"]:
        return False
    return all(os.path.lexists(staging / n) or os.path.lexists(target / n) for n in record["files"])


def _tombstone(staged_index: Path) -> str:
    """The ``model_index.json`` shown while a commit runs: diffusers' loaders fail on it with our notice."""
    try:
        index = json.loads(staged_index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    tombstone: dict[str, Any] = {"_class_name": _TOMBSTONE_NOTICE, _TOMBSTONE_KEY: True}
    for key, value in index.items() if isinstance(index, dict) else ():
        if key == "_diffusers_version" or (not key.startswith("_") and isinstance(value, list)):
            tombstone[key] = value if key.startswith("_") else [_TOMBSTONE_NOTICE, _TOMBSTONE_NOTICE]
    return json.dumps(tombstone, indent=2) + "\n"


def _is_tombstone(index_path: Path) -> bool:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and _TOMBSTONE_KEY in index


def _check_destinations(target: Path, staging: Path, files: list[str]) -> None:
    """Before anything visible changes: raise ``ValueError`` when a file of the save cannot be moved into place
    (a folder of that name, a file where a sub-folder goes, a sub-folder on another file system)."""
    device = os.stat(staging).st_dev
    for name in files:
        destination = target / name
        if destination.is_dir():
            raise ValueError(
                f"cannot save into {str(target)!r}: {name!r} there is a folder, but the pipeline writes a file of "
                "that name; move it away"
            )
        parent = destination.parent
        while parent != target:
            relative = parent.relative_to(target).as_posix()
            if os.path.lexists(parent) and not parent.is_dir():
                raise ValueError(
                    f"cannot save into {str(target)!r}: {relative!r} there is a file, but the pipeline needs a "
                    "folder of that name; move it away"
                )
            if parent.is_dir() and os.stat(parent).st_dev != device:
                raise ValueError(
                    f"cannot save into {str(target)!r}: its sub-folder {relative!r} is on another file system (a "
                    "mount point, or a link to one), so files cannot be moved into it atomically"
                )
            parent = parent.parent


def _remove_listed_files(root: Path, names: list[str]) -> list[str]:
    """Delete the files ``names`` (relative paths) inside ``root``, and sub-folders that this leaves empty; names
    that point outside ``root`` or at folders are skipped. Returns the names deleted."""
    inside = root.resolve()
    removed = []
    for name in names:
        relative = PurePosixPath(name)
        path = root / relative
        if relative.is_absolute() or ".." in relative.parts or not os.path.lexists(path):
            continue
        parent = path.parent.resolve()
        if (parent != inside and inside not in parent.parents) or (path.is_dir() and not path.is_symlink()):
            continue
        path.unlink()
        removed.append(name)
        folder = path.parent
        while folder != root and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
    return removed


def _remove_stale_temporary_files(target: Path) -> list[str]:
    """Delete leftover temporary files of our atomic writers in ``target`` and its direct sub-folders."""
    removed = []
    folders = [target, *(p for p in sorted(target.iterdir()) if p.is_dir() and not p.is_symlink())]
    for folder in folders:
        for entry in sorted(folder.iterdir()):
            match = _TEMPORARY_FILE.fullmatch(entry.name)
            probe = folder == target and _WRITE_PROBE.fullmatch(entry.name)
            if not (match or probe) or entry.is_dir():
                continue
            if match and match["pid"] and _process_may_be_running(int(match["pid"])):
                continue  # another process may be writing it right now
            entry.unlink(missing_ok=True)
            removed.append(f"removed the stale temporary file {entry.relative_to(target).as_posix()}")
    return removed


def _process_may_be_running(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # (on Windows, os.kill would terminate the process)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, as another user's process
        return True
    return True


def _restore_moved_away_folder(target: Path) -> list[str]:
    """Undo what an interrupted save of the earlier implementation left beside ``target``: move the contents of
    ``.NAME.old-*`` back, remove ``.NAME.saving-*`` (a staging folder holding only that save's files)."""
    done = []
    for backup in _leftovers_beside(target, r"old-[0-9a-f]{8}"):
        if not os.path.lexists(target):
            os.replace(backup, target)  # the whole folder, with its permissions
            done.append(f"moved {backup.name} back to {target.name}")
            continue
        try:
            ours = set(saved_pipeline_files(backup))  # what the save before the interrupted one wrote
        except ValueError:
            ours = set()
        kept = _merge_back(backup, target, ours, "")
        (backup / SAVE_MANIFEST_NAME).unlink(missing_ok=True)  # last: it tells which copies are ours
        with contextlib.suppress(OSError):
            backup.rmdir()
        done.append(f"moved the contents of {backup.name} back into {target.name}")
        if kept:
            logger.warning(
                "kept %d file(s) in %s that would overwrite files of the same name in %s: %s",
                len(kept), backup, target, ", ".join(kept[:10]),
            )  # fmt: skip
    for staging in _leftovers_beside(target, r"saving-[a-z0-9_]{8}"):
        shutil.rmtree(staging)
        done.append(f"removed the staging folder {staging.name}")
    return done


def _leftovers_beside(target: Path, suffix: str) -> list[Path]:
    """Folders ``.NAME.<suffix>`` next to ``target`` (the earlier implementation's backup and staging folders)."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.{suffix}")
    if not target.name or not target.parent.is_dir():
        return []
    candidates = target.parent.glob(f"{glob.escape('.' + target.name)}.*")
    return sorted(p for p in candidates if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink())


def _merge_back(source: Path, destination: Path, ours: set[str], prefix: str) -> list[str]:
    """Move every entry of ``source`` (a backup) that ``destination`` lacks into it, recursively for folders both
    have. Where both have a file, the backup's copy is deleted only if ``ours`` (the backup's save manifest) lists
    it: an old version of a file of ours that the completed save replaced. Returns the relative paths of the other
    conflicting entries, which stay in ``source``. The backup's manifest itself is left to the caller."""
    kept = []
    for entry in sorted(source.iterdir()):
        relative, counterpart = prefix + entry.name, destination / entry.name
        if relative == SAVE_MANIFEST_NAME:
            continue
        if not os.path.lexists(counterpart):
            os.replace(entry, counterpart)
        elif entry.is_dir() and not entry.is_symlink() and counterpart.is_dir():
            kept += _merge_back(entry, counterpart, ours, relative + "/")
            with contextlib.suppress(OSError):
                entry.rmdir()
        elif not entry.is_dir() and relative in ours:
            entry.unlink()
        else:
            kept.append(relative)
    return kept


def _check_not_moved_away(folder: Path) -> None:
    """Raise ``ValueError`` when ``folder`` is missing because an interrupted save of the earlier implementation
    left its contents in a ``.NAME.old-*`` folder beside it."""
    backups = _leftovers_beside(Path(os.path.abspath(folder)), r"old-[0-9a-f]{8}")
    if backups:
        raise ValueError(
            f"{str(folder)!r} does not exist, but an interrupted save of an earlier ddpm-components version left its "
            f"contents in {str(backups[0])!r}; call ddpm_components.pipeline_ddpm.repair_interrupted_save("
            f"{str(folder)!r}) (or save into it again) to move them back"
        )


def _fsync_file(path: Path) -> None:
    handle = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _fsync_directory(path: Path) -> None:
    """Make renames in ``path`` durable (POSIX; Windows cannot open folders, and some file systems refuse)."""
    if os.name == "nt":
        return
    handle = os.open(path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            os.fsync(handle)
    finally:
        os.close(handle)


def match_file_modes(folder: Path, reference: Path) -> None:
    """Give every file under ``folder`` the permission bits of ``reference``, a file written there with ``open()`` (so
    0o666 less the process's umask, or what the folder's default ACL gives). safetensors 0.8 writes through a
    temporary file created with mode 0o600 and renames it (safetensors issue 782): the weights alone were readable by
    their owner only, so a model saved as root into a Docker image, or into a shared folder, did not load for anyone
    else. Nothing happens on systems without POSIX modes."""
    if os.name != "posix":
        return
    mode = stat.S_IMODE(reference.stat().st_mode)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and stat.S_IMODE(path.stat().st_mode) != mode:
            os.chmod(path, mode)


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically and durably (temp file, fsync, os.replace)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- privacy
#: training-configuration keys whose values are local paths: what is published keeps their last component only
PATH_CONFIG_KEYS = (
    "output_dir",
    "train_data_dir",
    "resume",
    "resume_from_checkpoint",
    "logging_dir",
    "cache_dir",
    "init_image",
)


def published_training_config(config: dict) -> dict:
    """A copy of a training configuration fit to publish (model card, Hub upload), without local paths.

    The values of :data:`PATH_CONFIG_KEYS`, and every string that is an absolute path (POSIX, Windows or
    ``file://``) or starts with ``~``, anywhere in nested dicts and lists, become their last path component
    (``/home/me/runs/digits`` -> ``digits``). Hub names such as ``user/dataset`` stay. The local
    ``training_config.json`` keeps the full paths (resuming needs them).
    """
    return {key: _published_value(value, key in PATH_CONFIG_KEYS) for key, value in config.items()}


def _published_value(value: Any, is_path: bool) -> Any:
    if isinstance(value, dict):
        return {key: _published_value(item, key in PATH_CONFIG_KEYS) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_published_value(item, is_path) for item in value]
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str) and (is_path or _is_local_absolute_path(value)):
        return re.split(r"[\\/]+", value.rstrip("\\/"))[-1] or value
    return value


def _is_local_absolute_path(text: str) -> bool:
    return text.startswith(("/", "\\", "~", "file:")) or bool(re.match(r"[A-Za-z]:[\\/]", text))


def _strip_local_paths_from_configs(folder: Path) -> None:
    """Replace the local ``_name_or_path`` that diffusers records in the configs of a loaded pipeline (e.g.
    ``/home/me/models/x``) by its last component, in the JSON files diffusers wrote into ``folder``."""
    for path in [folder / _INDEX_NAME, *folder.glob("*/*.json")]:
        if not path.is_file():
            continue
        config = json.loads(path.read_text(encoding="utf-8"))
        name = config.get("_name_or_path") if isinstance(config, dict) else None
        if isinstance(name, str) and _is_local_absolute_path(name):
            config["_name_or_path"] = _published_value(name, True)
            _write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _read_remote_index(repo_id: str, download_kwargs: dict) -> dict:
    """Download and parse a Hub repository's model_index.json, turning Hub failures into HubError."""
    from diffusers.utils.hub_utils import HF_HUB_OFFLINE, hf_hub_download, model_info

    try:
        if not (HF_HUB_OFFLINE or download_kwargs.get("local_files_only")):
            # one quick request first: a missing repo or an unreachable Hub fails at once, without the download
            # retries (about 20 s) that hf_hub_download makes on connection errors
            model_info(repo_id, revision=download_kwargs.get("revision"), token=download_kwargs.get("token"))
        path = hf_hub_download(repo_id, "model_index.json", **download_kwargs)
    except Exception as error:
        _raise_hub_error(error, repo_id, "downloading")
        raise
    return json.loads(Path(path).read_text(encoding="utf-8"))


def create_hub_repo(repo_id: str, private: bool | None = None, token: str | None = None) -> str:
    """Create the model repository ``repo_id`` on the Hub if it does not exist; its full id (``namespace/name``).
    Failures raise :class:`HubError` with a message that says what to do."""
    from diffusers.utils.hub_utils import create_repo

    try:
        return create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    except Exception as error:
        _raise_hub_error(error, repo_id, "creating the repository")
        raise


def upload_staged_pipeline(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> str:
    """Upload a folder written by :meth:`DDPMPipeline.stage_for_hub` to the existing repository ``repo_id`` as one
    commit (the save's bookkeeping files stay local); the commit's URL. Failures raise :class:`HubError`."""
    from diffusers.utils.hub_utils import upload_folder

    try:
        commit = upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            token=token,
            commit_message=commit_message or "Upload DDPM pipeline (ddpm-components)",
            create_pr=create_pr,
            ignore_patterns=list(_BOOKKEEPING_PATTERNS),  # our save's manifest is local state
        )
    except Exception as error:
        _raise_hub_error(error, repo_id, "uploading")
        raise
    return str(getattr(commit, "commit_url", commit))


def _raise_hub_error(error: Exception, repo_id: str, action: str) -> None:
    """Raise a HubError (or ValueError) whose message says what went wrong and what to do, for Hub client errors;
    return for other exceptions (the caller re-raises them)."""
    from diffusers.utils import hub_utils

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(error, hub_utils.RepositoryNotFoundError) and status != 401:
        message = (
            f"repository {repo_id!r} was not found on {endpoint} (check the repo id; for a private repository "
            "pass a token that can read it)"
        )
    elif status == 401 or isinstance(error, hub_utils.RepositoryNotFoundError):
        message = (
            f"the Hub at {endpoint} did not accept your credentials (HTTP 401): log in with `hf auth login`, set "
            "HF_TOKEN, or pass a token with write access (token=... / --token)"
        )
    elif status == 403:
        message = (
            f"permission denied (HTTP 403) for {repo_id!r}: your token cannot write to the namespace "
            f"{repo_id.split('/')[0]!r}; use a token with write access or your own namespace"
        )
    elif status is not None:
        message = f"the Hub answered HTTP {status}: {error}"
    elif isinstance(
        error, (getattr(getattr(hub_utils, "httpx", None), "TransportError", ()), ConnectionError, OSError)
    ):
        message = (
            f"could not reach the Hub at {endpoint} ({type(error).__name__}: {error}); check your network "
            "connection (and HF_ENDPOINT, if you set it)"
        )
    elif isinstance(error, hub_utils.HFValidationError):
        raise ValueError(f"invalid repo id {repo_id!r}: {error}") from error
    else:
        return
    raise HubError(f"{action} {repo_id!r} failed: {message}") from error


# diffusers looks these names up on a component's module; keep them referenced
__all__ = ["ConfigMixin", "DDPMPipeline", "HubError", "ModelMixin", "SchedulerMixin"]
