"""Train a DDPM: from a folder of images (or the embedded digits) to a saved, shareable pipeline.

:class:`TrainingConfig` holds every option, with its default and help text declared once; the
``ddpm-components train`` flags are generated from it (``--train-batch-size`` ↔ ``train_batch_size``).
:func:`train` runs the loop with `accelerate` (devices, mixed precision, gradient accumulation,
multi-process data parallelism), so the same command scales with ``accelerate launch -m ddpm_components
train ...``.

Objectives (all through :class:`~ddpm_components.scheduling_ddpm.DDPMScheduler`'s training API):

- ``L_simple`` (Ho et al. 2020, Eq. 14) with t uniform on {0, …, T-1}; the target follows
  ``prediction_type`` (ε, x_0 or v, ``scheduler.get_target``);
- optional min-SNR-γ weighting (Hang et al. 2023, ``scheduler.loss_weights``);
- with ``learned_variance``: the Improved-DDPM hybrid loss ``L_simple + λ·T·L_t`` where ``L_t`` is the
  per-sample variational-bound term in bits/dim (``scheduler.vlb_terms``), computed with the predicted
  mean detached so that ``L_vlb`` trains only the variance (``λ = vlb_weight = 0.001``; the factor T
  makes the one-term estimate an estimate of the whole bound, as in Nichol & Dhariwal 2021);
- class-conditional training with label dropout to the U-Net's null class (for classifier-free guidance).

Randomness: the noise ε, the timesteps t and the label dropout of every micro-batch come from a generator
seeded by ``(seed, process index, micro-batch number)``, and the data order of every epoch from
``(seed, epoch)``; model dropout and random crops/flips use torch's global generator, whose state
`accelerate` saves in every checkpoint. A stopped and resumed run therefore continues exactly like an
uninterrupted one (on CPU).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_type_hints

if TYPE_CHECKING:  # torch is imported where it is used, so that building the command line stays fast
    import torch

PredictionType = Literal["epsilon", "sample", "v_prediction"]
LossWeighting = Literal["uniform", "min_snr"]
MixedPrecision = Literal["no", "fp16", "bf16"]
Conditioning = Literal["auto", "class", "none"]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]
LRScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine"]
ReportTo = Literal["none", "tensorboard"]
ModelPreset = Literal["digits", "cifar10", "celebahq256", "lsun256"]
ColorMode = Literal["grayscale", "rgb"]
CropMode = Literal["center", "random"]

CHECKPOINT_PREFIX = "checkpoint-"
_TEMPORARY_PREFIX = "tmp-checkpoint-"
_DELETING_PREFIX = "deleting-checkpoint-"
METRICS_NAME = "metrics.jsonl"


@dataclass
class TrainingConfig:
    """Every option of :func:`train`; field ``name`` is the command-line flag ``--name-with-dashes``.

    Defaults are the main job: ``ddpm-components train`` with no flags trains a small class-conditional
    model on the embedded 8×8 digits in about ten minutes on two CPU cores. Invalid values raise
    ``ValueError`` naming the value and the valid choices.
    """

    # ---- input and output
    output_dir: str = field(
        default="ddpm-digits",
        metadata={
            "help": "folder for the trained pipeline, sample grids, checkpoints, metrics and the training configuration"
        },
    )
    train_data_dir: str | None = field(
        default=None,
        metadata={
            "help": "folder of training images, searched recursively (png/jpg/jpeg/webp); first-level sub-folder names "
            "are class labels. Default: the embedded 8x8 digits (no download)"
        },
    )
    resolution: int | None = field(
        default=None,
        metadata={
            "help": "image size in pixels (default: 8, the digits' native size; 32 for --train-data-dir)"
        },
    )
    color_mode: ColorMode = field(
        default="rgb", metadata={"help": "channels for --train-data-dir images (the digits are grayscale)"}
    )
    crop: CropMode = field(
        default="center",
        metadata={"help": "how --train-data-dir images are cropped to a square after resizing"},
    )
    random_flip: bool = field(
        default=False, metadata={"help": "flip training images horizontally with probability 1/2"}
    )
    conditioning: Conditioning = field(
        default="auto",
        metadata={
            "help": "'class': class-conditional U-Net (labels from the digits or sub-folders); 'none': unconditional; "
            "'auto': class-conditional when the data has at least two classes"
        },
    )
    label_dropout: float = field(
        default=0.1,
        metadata={
            "help": "probability of replacing a class label by the null class (for classifier-free guidance)"
        },
    )
    dataloader_num_workers: int = field(
        default=0, metadata={"help": "data-loading worker processes (0: load in the training process)"}
    )

    # ---- model and objective
    model_preset: ModelPreset = field(
        default="digits",
        metadata={
            "help": "U-Net preset (DDPMUNet2DModel.from_preset); image size and channels follow the data"
        },
    )
    block_out_channels: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated channel widths per U-Net level, overriding the preset's (e.g. 32,64,64)"
        },
    )
    layers_per_block: int | None = field(
        default=None, metadata={"help": "residual blocks per U-Net level, overriding the preset's"}
    )
    model_dropout: float | None = field(
        default=None, metadata={"help": "U-Net dropout probability, overriding the preset's"}
    )
    num_train_timesteps: int = field(default=1000, metadata={"help": "diffusion length T"})
    beta_schedule: BetaSchedule = field(default="linear", metadata={"help": "noise schedule beta_1..beta_T"})
    prediction_type: PredictionType = field(
        default="epsilon",
        metadata={"help": "what the U-Net predicts: the noise (DDPM), the clean image x_0, or v"},
    )
    loss_weighting: LossWeighting = field(
        default="uniform", metadata={"help": "per-timestep loss weights: uniform or min-SNR-gamma"}
    )
    snr_gamma: float = field(default=5.0, metadata={"help": "gamma of min-SNR-gamma weighting"})
    learned_variance: bool = field(
        default=False,
        metadata={
            "help": "learn the reverse-process variance (Improved DDPM): U-Net outputs 2x channels, "
            "variance_type=learned_range, hybrid loss L_simple + lambda * L_vlb"
        },
    )
    vlb_weight: float = field(
        default=0.001, metadata={"help": "lambda of the hybrid loss (used with --learned-variance)"}
    )

    # ---- optimisation
    train_batch_size: int = field(default=128, metadata={"help": "images per batch on each process"})
    max_train_steps: int = field(
        default=1500, metadata={"help": "optimizer steps to train for (a resumed run continues up to it)"}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "batches accumulated per optimizer step"}
    )
    learning_rate: float = field(default=2e-3, metadata={"help": "peak AdamW learning rate"})
    lr_scheduler: LRScheduler = field(
        default="cosine", metadata={"help": "learning-rate schedule after the warm-up"}
    )
    lr_warmup_steps: int = field(default=100, metadata={"help": "linear learning-rate warm-up steps"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "gradient-norm clipping threshold (0: no clipping)"}
    )
    use_ema: bool = field(
        default=True,
        metadata={"help": "keep an exponential moving average of the weights; it is sampled and saved"},
    )
    ema_max_decay: float = field(default=0.9999, metadata={"help": "maximum EMA decay"})
    ema_inv_gamma: float = field(
        default=1.0,
        metadata={"help": "EMA warm-up inverse gamma: decay = 1 - (1 + step / inv_gamma) ** -power"},
    )
    ema_power: float = field(default=0.75, metadata={"help": "EMA warm-up power"})
    mixed_precision: MixedPrecision = field(
        default="no", metadata={"help": "mixed precision (fp16 needs a GPU; bf16 is slow on most CPUs)"}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in the backward pass to save memory"}
    )
    torch_compile: bool = field(
        default=False, metadata={"help": "compile the U-Net with torch.compile (inductor)"}
    )
    cpu_threads: int | None = field(
        default=None,
        metadata={
            "help": "torch threads per process when training on CPU (default: one thread for images of at most "
            "16x16 pixels, where threads cost more than they gain, measured; else OMP_NUM_THREADS or torch's "
            "choice)"
        },
    )
    seed: int = field(default=0, metadata={"help": "random seed (weights, data order, noise, timesteps)"})

    # ---- checkpoints, samples, logs
    checkpointing_steps: int = field(
        default=500, metadata={"help": "save a resumable checkpoint every N optimizer steps (0: never)"}
    )
    checkpoints_total_limit: int | None = field(
        default=2, metadata={"help": "keep only the newest K checkpoints"}
    )
    resume: str | None = field(
        default=None,
        metadata={
            "help": "resume from a checkpoint folder, or 'latest' for the newest checkpoint in --output-dir"
        },
    )
    sample_every_steps: int = field(
        default=0, metadata={"help": "write a sample grid every N optimizer steps (0: only at the end)"}
    )
    num_inference_steps: int = field(default=1000, metadata={"help": "denoising steps for the sample grids"})
    samples_per_class: int = field(
        default=10, metadata={"help": "grid columns per class (class-conditional) ..."}
    )
    num_samples: int = field(default=64, metadata={"help": "... or images in the grid (unconditional)"})
    guidance_scale: float = field(
        default=1.0, metadata={"help": "classifier-free guidance scale for the sample grids (1: none)"}
    )
    logging_steps: int = field(
        default=10, metadata={"help": "log loss, learning rate and images/s every N optimizer steps"}
    )
    report_to: ReportTo = field(default="none", metadata={"help": "experiment tracker (through accelerate)"})
    push_to_hub: bool = field(
        default=False,
        metadata={"help": "push the trained pipeline and its model card to the Hugging Face Hub"},
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repository id for --push-to-hub (e.g. user/ddpm-digits)"}
    )
    hub_private: bool = field(default=False, metadata={"help": "create the Hub repository as private"})
    debug_record: bool = field(
        default=False,
        metadata={
            "help": "debug: record each rank's sample indices and final parameter checksums under output_dir/debug"
        },
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid value (and the valid choices for options)."""
        hints = get_type_hints(type(self))
        for item in dataclasses.fields(self):
            choices = (
                get_args(hints[item.name]) if getattr(hints[item.name], "__origin__", None) is Literal else ()
            )
            value = getattr(self, item.name)
            if choices and value not in choices:
                raise ValueError(f"{item.name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        positive = [
            "train_batch_size",
            "max_train_steps",
            "gradient_accumulation_steps",
            "num_train_timesteps",
        ]
        positive += ["num_inference_steps", "samples_per_class", "num_samples", "logging_steps"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in [
            "lr_warmup_steps",
            "checkpointing_steps",
            "sample_every_steps",
            "dataloader_num_workers",
        ]:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be zero or positive, got {getattr(self, name)}")
        if self.resolution is not None and self.resolution < 1:
            raise ValueError(f"resolution must be a positive number of pixels, got {self.resolution}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be a positive integer, got {self.cpu_threads}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(
                f"checkpoints_total_limit must be at least 1, got {self.checkpoints_total_limit}"
            )
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be positive, got {self.snr_gamma}")
        for name in ("vlb_weight", "max_grad_norm", "adam_weight_decay"):
            if not getattr(self, name) >= 0:  # also rejects NaN
                raise ValueError(f"{name} must be zero or positive, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.ema_max_decay < 1.0:
            raise ValueError(f"ema_max_decay must be in (0, 1), got {self.ema_max_decay}")
        if self.block_out_channels is not None:
            parse_channels(self.block_out_channels)
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("push_to_hub needs hub_model_id (e.g. --hub-model-id user/ddpm-digits)")

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a JSON-serialisable dict (what ``training_config.json`` holds)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingConfig:
        """Build a configuration from :meth:`to_dict`'s output; unknown keys raise ``ValueError``."""
        names = {item.name for item in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; valid options: {sorted(names)}")
        return cls(**values)


def parse_channels(text: str) -> tuple[int, ...]:
    """``"32,64,64"`` → ``(32, 64, 64)``; ``ValueError`` for anything but positive integers."""
    try:
        channels = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(
            f"block_out_channels must be comma-separated integers like '32,64,64', got {text!r}"
        ) from None
    if not channels or min(channels) < 1:
        raise ValueError(f"block_out_channels must be positive integers, got {text!r}")
    return channels


# ---------------------------------------------------------------------------------------------- files
def _atomic_write_text(path: Path, text: str) -> None:
    from .data import atomic_write_bytes

    atomic_write_bytes(path, text.encode("utf-8"))


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints ``output_dir/checkpoint-<step>``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def _checkpoint_step(path: Path) -> int:
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
    if not match:
        raise ValueError(
            f"resume path {str(path)!r} is not a checkpoint folder named {CHECKPOINT_PREFIX}<step>"
        )
    return int(match.group(1))


def _remove_tree_atomic(path: Path) -> None:
    """Rename ``path`` out of the ``checkpoint-*`` namespace first, then delete it."""
    doomed = path.with_name(f"{_DELETING_PREFIX}{path.name}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _save_checkpoint(accelerator: Any, output_dir: Path, step: int, keep: int | None) -> Path:
    """``accelerator.save_state`` into a temporary folder, then rename it to ``checkpoint-<step>``.

    Every process writes its part (its RNG state) into the same temporary folder; after a barrier only
    the main process renames it and prunes old checkpoints, so a ``checkpoint-*`` folder is always complete.
    """
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    temporary = output_dir / f"{_TEMPORARY_PREFIX}{step}"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            _remove_tree_atomic(final)
        os.replace(temporary, final)
        if hasattr(os, "O_DIRECTORY"):
            descriptor = os.open(output_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        if keep is not None:
            for old in list_checkpoints(output_dir)[:-keep]:
                _remove_tree_atomic(old)
    accelerator.wait_for_everyone()
    return final


def _clean_stale_folders(output_dir: Path) -> None:
    """Remove what a killed run may have left: unfinished temporary checkpoints and half-deleted ones."""
    for path in output_dir.iterdir() if output_dir.is_dir() else []:
        if path.is_dir() and path.name.startswith((_TEMPORARY_PREFIX, _DELETING_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- data
def build_dataset(config: TrainingConfig) -> Any:
    """The training dataset of ``config``: the embedded digits or an :class:`ImageFolderDataset`."""
    from .data import DigitsDataset, ImageFolderDataset

    if config.train_data_dir is None:
        return DigitsDataset(resolution=config.resolution or 8, random_flip=config.random_flip)
    return ImageFolderDataset(
        config.train_data_dir,
        resolution=config.resolution or 32,
        color_mode=config.color_mode,
        crop=config.crop,
        random_flip=config.random_flip,
        use_labels=config.conditioning != "none",
    )


def _num_classes(config: TrainingConfig, dataset: Any) -> int | None:
    """Number of classes to condition on, or ``None`` for an unconditional model."""
    if config.conditioning == "none":
        return None
    if config.conditioning == "class" and dataset.num_classes < 2:
        raise ValueError(
            f"conditioning='class' needs labelled data with at least two classes; {config.train_data_dir!r} "
            f"has {dataset.num_classes} (put the images of each class in its own sub-folder)"
        )
    return dataset.num_classes if dataset.num_classes >= 2 else None


def _sample_size(config: TrainingConfig) -> int:
    return config.resolution or (8 if config.train_data_dir is None else 32)


def build_model(config: TrainingConfig, num_channels: int, num_classes: int | None) -> Any:
    """The U-Net of ``config``: ``DDPMUNet2DModel.from_preset`` with the data's shape and the overrides."""
    from .unet_ddpm import DDPMUNet2DModel

    sample_size = _sample_size(config)
    preset = DDPMUNet2DModel.preset_config(config.model_preset)
    overrides: dict[str, Any] = {
        "sample_size": sample_size,
        "in_channels": num_channels,
        "out_channels": num_channels * (2 if config.learned_variance else 1),
        "num_class_embeds": num_classes,
    }
    if sample_size != preset["sample_size"] and preset.get("attention_resolutions"):
        # keep self attention at the same level of the U-Net when the image size differs from the preset's
        overrides["attention_resolutions"] = tuple(
            max(1, size * sample_size // preset["sample_size"]) for size in preset["attention_resolutions"]
        )
    if config.block_out_channels is not None:
        channels = parse_channels(config.block_out_channels)
        overrides["block_out_channels"] = channels
        # GroupNorm groups must divide every width: keep the preset's count where possible
        overrides["norm_num_groups"] = math.gcd(preset.get("norm_num_groups", 32), *channels)
    if config.layers_per_block is not None:
        overrides["layers_per_block"] = config.layers_per_block
    if config.model_dropout is not None:
        overrides["dropout"] = config.model_dropout
    return DDPMUNet2DModel.from_preset(config.model_preset, **overrides)


def build_scheduler(config: TrainingConfig) -> Any:
    """The noise scheduler of ``config`` (``learned_range`` variance with ``learned_variance``)."""
    from .scheduling_ddpm import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        variance_type="learned_range" if config.learned_variance else "fixed_small",
        clip_sample=True,
    )


# ---------------------------------------------------------------------------------------------- loss
def training_loss(
    model: torch.nn.Module,
    scheduler: Any,
    original_sample: torch.Tensor,
    config: TrainingConfig,
    generator: torch.Generator | None = None,
    class_labels: torch.Tensor | None = None,
    null_class_label: int | None = None,
) -> torch.Tensor:
    """One Monte-Carlo estimate of the training objective for a batch of clean images ``x_0``.

    Draws ``t ~ U{0, …, T-1}`` and ``ε ~ N(0, I)`` (and the label dropout) from ``generator``, forms
    ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε`` and returns the scalar loss: the per-sample weighted MSE
    against ``scheduler.get_target`` plus, for a learned variance, ``vlb_weight · T · L_t`` with the mean
    part of the output detached.
    """
    import torch
    import torch.nn.functional as F

    batch_size, channels = original_sample.shape[:2]
    device = original_sample.device
    num_train_timesteps = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=device)
    noise = torch.randn(
        original_sample.shape, generator=generator, device=device, dtype=original_sample.dtype
    )
    if class_labels is not None and null_class_label is not None and config.label_dropout > 0:
        drop = torch.rand(batch_size, generator=generator, device=device) < config.label_dropout
        class_labels = torch.where(drop, torch.full_like(class_labels, null_class_label), class_labels)
    sample = scheduler.add_noise(original_sample, noise, timesteps)
    model_output = model(sample, timesteps, class_labels=class_labels, return_dict=False)[0].float()
    if config.learned_variance:
        mean_output, variance_output = model_output.split(channels, dim=1)
    else:
        mean_output = model_output
    target = scheduler.get_target(original_sample, noise, timesteps).float()
    mse = F.mse_loss(mean_output, target, reduction="none").mean(dim=tuple(range(1, mean_output.ndim)))
    weights = scheduler.loss_weights(timesteps, weighting=config.loss_weighting, snr_gamma=config.snr_gamma)
    loss = (weights.to(mse) * mse).mean()
    if config.learned_variance and config.vlb_weight > 0:
        frozen_mean_output = torch.cat([mean_output.detach(), variance_output], dim=1)
        vlb = scheduler.vlb_terms(frozen_mean_output, original_sample.float(), sample.float(), timesteps)
        loss = loss + config.vlb_weight * num_train_timesteps * vlb.mean()
    return loss


class _StepSeeds:
    """Generator for the noise, timesteps and label dropout of micro-batch ``n`` on process ``rank``.

    Re-seeded from ``(seed, rank, n)`` for every micro-batch, so it needs no checkpointed state: a resumed
    run draws exactly what the uninterrupted run would have drawn, and ranks draw differently.
    """

    def __init__(self, seed: int, rank: int, device: torch.device) -> None:
        import torch

        self.seed = seed
        self.rank = rank
        self.generator = torch.Generator(device=device)

    def __call__(self, micro_step: int) -> torch.Generator:
        mixed = (self.seed * 1_000_003 + self.rank) * 1_000_000_007 + micro_step
        return self.generator.manual_seed(mixed % (2**63 - 1))


class _Progress:
    """The step counter, saved and restored with every checkpoint (``register_for_checkpointing``)."""

    def __init__(self) -> None:
        self.global_step = 0

    def state_dict(self) -> dict[str, int]:
        return {"global_step": self.global_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.global_step = int(state["global_step"])


# ------------------------------------------------------------------------------------------- sampling
def sample_grid(
    unet: Any, scheduler: Any, config: TrainingConfig, num_classes: int | None, device: torch.device
) -> Any:
    """A PIL grid of samples from ``unet`` via :class:`DDPMPipeline` (one row per class when conditional).

    Images smaller than 32 pixels are enlarged and framed for viewing (:func:`_for_viewing`).
    """
    import torch
    from diffusers.utils import make_image_grid

    from .pipeline_ddpm import DDPMPipeline

    pipeline = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    if num_classes is not None:
        rows, cols = num_classes, config.samples_per_class
        class_labels = torch.arange(num_classes).repeat_interleave(cols).tolist()
        kwargs: dict[str, Any] = {"class_labels": class_labels, "guidance_scale": config.guidance_scale}
    else:
        cols = math.ceil(math.sqrt(config.num_samples))
        rows = math.ceil(config.num_samples / cols)
        kwargs = {}
    with torch.no_grad():
        images = pipeline(
            batch_size=rows * cols,
            generator=generator,
            num_inference_steps=config.num_inference_steps,
            output_type="pil",
            **kwargs,
        ).images
    return make_image_grid(_for_viewing(images), rows=rows, cols=cols)


def _for_viewing(images: list[Any]) -> list[Any]:
    """Enlarge images smaller than 32 pixels by an integer factor (nearest neighbour) and frame them with a
    thin grey border, so that a grid of tiny images stays legible."""
    from PIL import ImageOps

    scale = max(1, 32 // images[0].width)
    if scale == 1:
        return images
    fill = 96 if images[0].mode == "L" else (96,) * len(images[0].getbands())
    return [
        ImageOps.expand(image.resize((image.width * scale, image.height * scale), resample=0), scale, fill)
        for image in images
    ]


# ------------------------------------------------------------------------------------------- training
def _cycle_batches(
    dataloader: Any, accelerator: Any, start_batch: int
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield ``(micro_step, batch)`` forever from ``start_batch`` on: epoch ``e`` is ordered by ``seed + e``."""
    batches_per_epoch = len(dataloader)
    if batches_per_epoch == 0:
        raise ValueError("the dataset is smaller than one batch per process; lower --train-batch-size")
    micro_step = start_batch
    epoch, skip = divmod(start_batch, batches_per_epoch)
    while True:
        dataloader.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        for batch in epoch_loader:
            yield micro_step, batch
            micro_step += 1
        epoch, skip = epoch + 1, 0


def _distributed_without_accelerator() -> bool:
    """True when launched as several processes (``WORLD_SIZE > 1``) on a machine without GPUs or other
    accelerators: accelerate then needs ``cpu=True`` to set up gloo data parallelism (MULTI_CPU) instead
    of running independent copies."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    accelerator_api = getattr(torch, "accelerator", None)
    if accelerator_api is not None and hasattr(accelerator_api, "is_available"):
        return not accelerator_api.is_available()
    return not torch.cuda.is_available()


def _resolve_resume(config: TrainingConfig, output_dir: Path) -> Path | None:
    if config.resume is None:
        return None
    if config.resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(config.resume)
    if not path.is_dir():
        raise FileNotFoundError(f"resume checkpoint {config.resume!r} does not exist (or pass 'latest')")
    _checkpoint_step(path)
    return path


def train(config: TrainingConfig) -> dict[str, Any]:
    """Train a DDPM as configured and save the EMA pipeline at the root of ``config.output_dir``.

    Returns a summary: ``{"global_step", "loss", "output_dir", "wall_time"}`` (the loss is the mean of the
    last logging window, over all processes).
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import (
        DataLoaderConfiguration,
        GradientAccumulationPlugin,
        ProjectConfiguration,
        set_seed,
    )
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from .data import save_png
    from .pipeline_ddpm import TRAINING_CONFIG_NAME, DDPMPipeline

    config.validate()
    started, started_cpu = time.perf_counter(), time.process_time()
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        step_scheduler_with_optimizer=False,
        dynamo_backend="inductor" if config.torch_compile else "no",
        cpu=_distributed_without_accelerator(),
    )
    is_main = accelerator.is_main_process

    previous_threads = torch.get_num_threads()
    if accelerator.device.type == "cpu":
        threads = config.cpu_threads
        if threads is None and "OMP_NUM_THREADS" not in os.environ and _sample_size(config) <= 16:
            threads = 1
        if threads is not None:
            torch.set_num_threads(threads)

    # data first: a bad folder fails before any model is built
    dataset = build_dataset(config)
    num_classes = _num_classes(config, dataset)
    if len(dataset) < config.train_batch_size * accelerator.num_processes:
        raise ValueError(
            f"the dataset has {len(dataset)} images, fewer than one batch per process "
            f"({config.train_batch_size} x {accelerator.num_processes}); lower --train-batch-size"
        )

    resume_path = _resolve_resume(config, output_dir)  # a missing checkpoint fails before anything is written

    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        _clean_stale_folders(output_dir)
        _atomic_write_text(output_dir / TRAINING_CONFIG_NAME, json.dumps(config.to_dict(), indent=2) + "\n")
    accelerator.wait_for_everyone()

    set_seed(config.seed)
    unet = build_model(config, dataset.num_channels, num_classes)
    scheduler = build_scheduler(config)
    null_class_label = unet.null_class_label if num_classes is not None else None
    if num_classes is not None and null_class_label is None and config.label_dropout > 0:
        raise ValueError("label_dropout > 0 needs a U-Net with a null class (use_null_class_embed=True)")
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    ema = None
    if config.use_ema:
        ema = EMAModel(
            unet.parameters(),
            decay=config.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=config.ema_inv_gamma,
            power=config.ema_power,
            model_cls=type(unet),
            model_config=unet.config,
            foreach=True,
        )
    adamw_kwargs = {
        "lr": config.learning_rate,
        "betas": (config.adam_beta1, config.adam_beta2),
        "weight_decay": config.adam_weight_decay,
        "eps": config.adam_epsilon,
    }
    try:  # the fused kernel: about 4x faster updates than the default on CPU (measured), also on CUDA
        optimizer = torch.optim.AdamW(unet.parameters(), fused=True, **adamw_kwargs)
    except (RuntimeError, ValueError, TypeError):  # a device or dtype without fused AdamW
        optimizer = torch.optim.AdamW(unet.parameters(), **adamw_kwargs)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps,
    )
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.train_batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=config.dataloader_num_workers,
        generator=torch.Generator().manual_seed(config.seed),
    )
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        unet, optimizer, dataloader, lr_scheduler
    )
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    progress = _Progress()
    accelerator.register_for_checkpointing(progress)

    if resume_path is not None:
        accelerator.print(f"resuming from {resume_path}")
        accelerator.load_state(str(resume_path))
        if ema is not None:
            # accelerate loads registered objects' tensors onto the CPU: back to the model's device
            ema.to(accelerator.device)
        # the optimizer comes back with the learning rate the checkpoint's schedule gave for the next step; a
        # larger --max-train-steps changes the schedule, so take that step's rate from the new one
        schedule = lr_scheduler.scheduler  # a LambdaLR for every --lr-scheduler choice
        for group, base, factor in zip(optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas):
            group["lr"] = base * factor(schedule.last_epoch)
    elif config.resume == "latest":
        accelerator.print(f"no checkpoint in {output_dir}: starting from step 0")
    start_step = progress.global_step

    metrics: list[dict[str, Any]] = []
    metrics_path = output_dir / METRICS_NAME
    if is_main and start_step > 0 and metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", math.inf) <= start_step:
                metrics.append(record)
    debug_dir = output_dir / "debug"
    if config.report_to != "none":
        accelerator.init_trackers("ddpm-components", config=config.to_dict())

    step_seeds = _StepSeeds(config.seed, accelerator.process_index, accelerator.device)
    images_per_step = config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    bar = tqdm(
        total=config.max_train_steps,
        initial=start_step,
        desc="train",
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )
    model.train()
    window_loss = torch.zeros((), device=accelerator.device)
    window_count = 0
    window_start = time.perf_counter()
    window_step = start_step
    last_loss = math.nan
    batches = _cycle_batches(dataloader, accelerator, start_step * config.gradient_accumulation_steps)
    while progress.global_step < config.max_train_steps:
        micro_step, batch = next(batches)
        pixel_values = batch["pixel_values"]
        class_labels = batch["class_labels"] if num_classes is not None else None
        if config.debug_record:
            indices = accelerator.gather(batch["index"].to(accelerator.device).reshape(1, -1))
            if is_main:  # a debug log, appended line by line
                debug_dir.mkdir(exist_ok=True)
                with open(debug_dir / "sample_indices.jsonl", "a") as handle:
                    handle.write(json.dumps({"micro_step": micro_step, "indices": indices.tolist()}) + "\n")
        with accelerator.accumulate(model):
            loss = training_loss(
                model,
                scheduler,
                pixel_values,
                config,
                generator=step_seeds(micro_step),
                class_labels=class_labels,
                null_class_label=null_class_label,
            )
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        window_loss += loss.detach()
        window_count += 1
        if not accelerator.sync_gradients:
            continue

        lr_scheduler.step()
        if ema is not None:
            ema.step(accelerator.unwrap_model(model).parameters())
        progress.global_step += 1
        step = progress.global_step
        bar.update(1)

        if step % config.logging_steps == 0 or step == config.max_train_steps:
            mean_loss = accelerator.reduce(window_loss / window_count, reduction="mean").item()
            elapsed = time.perf_counter() - window_start
            record = {
                "step": step,
                "loss": mean_loss,
                "lr": lr_scheduler.get_last_lr()[0],
                "images_per_second": (step - window_step) * images_per_step / max(elapsed, 1e-9),
                "wall_time": time.perf_counter() - started,
                "cpu_time": time.process_time() - started_cpu,
            }
            if ema is not None:
                record["ema_decay"] = ema.cur_decay_value
            last_loss = mean_loss
            bar.set_postfix(
                loss=f"{mean_loss:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{record['images_per_second']:.0f}"
            )
            accelerator.log({key: value for key, value in record.items() if key != "step"}, step=step)
            if is_main:
                metrics.append(record)
                _atomic_write_text(metrics_path, "".join(json.dumps(item) + "\n" for item in metrics))
            window_loss.zero_()
            window_count = 0
            window_start = time.perf_counter()
            window_step = step

        if config.checkpointing_steps and step % config.checkpointing_steps == 0:
            _save_checkpoint(accelerator, output_dir, step, config.checkpoints_total_limit)
        if (
            config.sample_every_steps
            and step % config.sample_every_steps == 0
            and step < config.max_train_steps
        ):
            if is_main:
                grid = sample_grid(
                    _ema_unet(accelerator, model, ema), scheduler, config, num_classes, accelerator.device
                )
                save_png(grid, output_dir / "samples" / f"step-{step:07d}.png")
            accelerator.wait_for_everyone()
    bar.close()

    if config.debug_record:
        sums = torch.stack([p.detach().double().sum() for p in accelerator.unwrap_model(model).parameters()])
        gathered = accelerator.gather(sums.reshape(1, -1))
        if is_main:
            debug_dir.mkdir(exist_ok=True)
            _atomic_write_text(debug_dir / "parameter_checksums.json", json.dumps(gathered.tolist()))

    accelerator.wait_for_everyone()
    if is_main:
        for tracker in accelerator.trackers:  # flush and close the logs before the output folder is rewritten
            tracker.finish()

        final_unet = _ema_unet(accelerator, model, ema)
        grid = sample_grid(final_unet, scheduler, config, num_classes, accelerator.device)
        pipeline = DDPMPipeline(unet=final_unet, scheduler=scheduler)
        # the pipeline, training_config.json, samples.png and the model card; other files in output_dir stay
        pipeline.save_pretrained(str(output_dir), training_config=config.to_dict(), sample_grid=grid)
        if config.push_to_hub:
            url = pipeline.push_to_hub(
                config.hub_model_id,
                private=config.hub_private,
                training_config=config.to_dict(),
                sample_grid=grid,
            )
            accelerator.print(f"pushed to {url}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.num_processes == 1:
        # accelerate keeps the first Accelerator's mixed precision in a process-wide singleton and refuses a
        # different one later: forget it, so that train() can run again in this process (a notebook, tests)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
    torch.set_num_threads(previous_threads)
    return {
        "global_step": progress.global_step,
        "loss": last_loss,
        "output_dir": str(output_dir),
        "wall_time": time.perf_counter() - started,
        "is_main_process": is_main,
    }


def _ema_unet(accelerator: Any, model: torch.nn.Module, ema: Any) -> Any:
    """A fresh copy of the U-Net carrying the EMA weights (the trained weights without EMA), in eval mode."""
    import copy

    unet = copy.deepcopy(accelerator.unwrap_model(model, keep_torch_compile=False))
    if ema is not None:
        ema.copy_to(unet.parameters())
    unet.eval()
    return unet
