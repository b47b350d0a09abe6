"""Train a DDPM: from a folder of images (or the embedded digits) to a saved, shareable pipeline.

:class:`TrainingConfig` holds every option, with its default and help text declared once; the
``ddpm-components train`` flags are generated from it (``--train-batch-size`` ↔ ``train_batch_size``).
:func:`train` runs the loop with `accelerate` (devices, mixed precision, gradient accumulation,
multi-process data parallelism), so the same command scales with ``accelerate launch -m ddpm_components
train ...``. The loop is written in named phases (:class:`_TrainLoop`, in the manner of improved-diffusion's
``TrainLoop``): setup, restore, start, step / log / checkpoint / sample, finish.

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

Safety (see docs/training.md): every option, the output folder and a resumed checkpoint are checked before
anything is written; one run per output folder (a run id in ``training_config.json`` and every checkpoint);
a non-finite loss or weight stops the run (:class:`TrainingDiverged`); SIGINT / SIGTERM stop it at the next
step (:class:`TrainingInterrupted`), keeping the last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, get_args, get_type_hints

from .cpu_memory import keep_freed_memory

if TYPE_CHECKING:  # torch is imported where it is used, so that building the command line stays fast
    import torch

PredictionType = Literal["epsilon", "sample", "v_prediction"]
LossWeighting = Literal["uniform", "min_snr"]
MixedPrecision = Literal["no", "fp16", "bf16"]
Conditioning = Literal["auto", "class", "none"]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]
TimestepSpacing = Literal["trailing", "leading", "linspace"]
LRScheduler = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]
ReportTo = Literal["none", "tensorboard", "wandb", "all"]
ModelPreset = Literal["digits", "cifar10", "celebahq256", "lsun256"]
ColorMode = Literal["grayscale", "rgb"]
CropMode = Literal["center", "random"]

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
_TEMPORARY_PREFIX = "tmp-checkpoint-"
_DELETING_PREFIX = "deleting-checkpoint-"
METRICS_NAME = "metrics.jsonl"
#: written into every checkpoint: the run id, the step, and what must match to resume from it
RUN_RECORD_NAME = "run.json"
RUN_ID_KEY = "run_id"
SAMPLES_FOLDER = "samples"
DEBUG_FOLDER = "debug"
LOGS_FOLDER = "logs"
_TRACKER_PROJECT = "ddpm-components"  # accelerate's trackers log into logs/<project>
_DEBUG_FILES = ("sample_indices.jsonl", "parameter_checksums.json")
#: the checkpointed objects' files (``_save_objects``: EMA, step counter, teacher), named as accelerate names them
_OBJECT_FILE = re.compile(r"custom_checkpoint_\d+\.pkl")
#: the files accelerate.save_state writes for our loop (and our objects and run record): a checkpoint folder
#: holding anything else was not written by us and is never deleted
_CHECKPOINT_FILE = re.compile(
    r"(model|pytorch_model|optimizer|scheduler|sampler|dl_state_dict)(_\d+)?\.(safetensors|bin)"
    rf"|random_states_\d+\.pkl|{_OBJECT_FILE.pattern}|scaler\.pt|" + re.escape(RUN_RECORD_NAME)
)
_SAMPLE_FILE = re.compile(r"step-\d+\.png")
# what accelerate's TensorBoard tracker writes into logs/<project>: event files, and add_hparams' and accelerate's
# folders named by time.time() holding an event file or hparams.yml
_TRACKER_FILE = re.compile(r"events\.out\.tfevents\..+")
_TRACKER_RUN_FOLDER = re.compile(r"\d+(\.\d+)?")


class TrainingInterrupted(KeyboardInterrupt):
    """:func:`train` stopped by SIGINT or SIGTERM (a ``KeyboardInterrupt``, so notebooks treat it as one).

    ``str(error)`` is the one-line report (the checkpoint kept and the command that resumes);
    ``exit_code`` is the shell's convention, 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signal_number: int, message: str = "") -> None:
        super().__init__(message or f"interrupted by {signal.Signals(signal_number).name}")
        self.signal_number = signal_number

    @property
    def exit_code(self) -> int:
        return 128 + self.signal_number


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite; ``str(error)`` names the step, the checkpoint kept and
    how to resume with a lower learning rate. ``exit_code`` is 1."""

    exit_code = 1

    def __init__(self, message: str, is_main_process: bool = True) -> None:
        super().__init__(message)
        self.is_main_process = is_main_process


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
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "a dataset that the `datasets` library loads: a Hub id (user/name), a local folder it reads "
            "(imagefolder, parquet files, ...), a .parquet/.arrow/.csv/.json file, or a folder written by save_to_disk"
        },
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "the configuration of --dataset-name, where it has several"}
    )
    dataset_split: str = field(default="train", metadata={"help": "the split of --dataset-name to train on"})
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "where `datasets` stores downloads and prepared data (default: its own, HF_DATASETS_CACHE)"
        },
    )
    image_column: str | None = field(
        default=None,
        metadata={
            "help": "the column of --dataset-name holding the images (default: 'image', else the first image column)"
        },
    )
    label_column: str | None = field(
        default=None,
        metadata={
            "help": "the column of --dataset-name holding class labels, a ClassLabel (its names become the model's "
            "class_names) or integers 0..K-1 (default: 'label' if it is a ClassLabel, else no labels)"
        },
    )
    dataset_streaming: bool = field(
        default=False,
        metadata={
            "help": "stream --dataset-name instead of downloading and preparing it first (no length: train for "
            "--max-train-steps; shuffled with a 1000-row buffer)"
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
    model_config_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "a diffusers UNet2DModel configuration (a folder holding config.json, a JSON file or a Hub id), "
            "converted to this U-Net instead of --model-preset; image size and channels follow the data"
        },
    )
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
    # ---- the saved sampler (scheduler config keys; they do not change training)
    timestep_spacing: TimestepSpacing = field(
        default="trailing",
        metadata={
            "help": "the saved scheduler's timesteps when sampling fewer steps than num_train_timesteps (trailing: "
            "the chain starts at T-1; diffusers' default is leading)"
        },
    )
    multistep_order: int = field(
        default=2,
        metadata={
            "help": "the saved scheduler's step: 2 = the DDPM step with DPM-Solver++(2M)'s extrapolation of x_0 "
            "(measured best at 10-100 steps, docs/scheduler.md), 1 = the plain DDPM step"
        },
    )

    # ---- optimisation
    train_batch_size: int = field(default=128, metadata={"help": "images per batch on each process"})
    max_train_steps: int = field(
        default=1500, metadata={"help": "optimizer steps to train for (a resumed run continues up to it)"}
    )
    num_epochs: int | None = field(
        default=None,
        metadata={
            "help": "train for this many passes over the data instead: sets --max-train-steps to num_epochs x the "
            "optimizer steps of one epoch, once the dataset size is known (not with --dataset-streaming)"
        },
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
        default="no",
        metadata={
            "help": "mixed precision (fp16 needs a GPU; bf16 on CPU is fast only with AMX: Xeon 4th gen+)"
        },
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
    process_group_timeout: int = field(
        default=7200,
        metadata={
            "help": "seconds a process waits for the others at a collective (a barrier, a gather) before the run "
            "fails: torch.distributed's process-group timeout, set through accelerate's InitProcessGroupKwargs "
            "(default 7200, as diffusers' training scripts; torch's own is 600 for NCCL)"
        },
    )
    seed: int = field(default=0, metadata={"help": "random seed (weights, data order, noise, timesteps)"})

    # ---- checkpoints, samples, logs
    checkpointing_steps: int = field(
        default=500, metadata={"help": "save a resumable checkpoint every N optimizer steps (0: never)"}
    )
    checkpoints_total_limit: int | None = field(
        default=2,
        metadata={"help": "keep only the newest K checkpoints (0 or 'none': keep every checkpoint)"},
    )
    resume: str | None = field(
        default=None,
        metadata={
            "help": "resume from a checkpoint folder of this run, or 'latest' for the newest checkpoint in "
            "--output-dir (none yet: start from step 0)"
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "start afresh in an --output-dir that holds another run: delete that run's files (checkpoints, "
            "metrics, samples, logs, the saved pipeline) first; other files stay"
        },
    )
    sample_every_steps: int = field(
        default=0, metadata={"help": "write a sample grid every N optimizer steps (0: only at the end)"}
    )
    save_images_epochs: int | None = field(
        default=None,
        metadata={
            "help": "write a sample grid every N epochs instead: sets --sample-every-steps to N x the optimizer "
            "steps of one epoch (not with --dataset-streaming)"
        },
    )
    save_model_steps: int = field(
        default=0,
        metadata={
            "help": "also save the EMA pipeline (loadable anywhere, with its card) into --output-dir every N optimizer "
            "steps, so that a run that stops early leaves a usable model; checkpoints are untouched (0: only at the end)"
        },
    )
    save_model_epochs: int | None = field(
        default=None,
        metadata={
            "help": "save the EMA pipeline every N epochs instead: sets --save-model-steps to N x the optimizer "
            "steps of one epoch (not with --dataset-streaming)"
        },
    )
    num_inference_steps: int = field(default=1000, metadata={"help": "denoising steps for the sample grids"})
    evaluate: bool = field(
        default=True,
        metadata={
            "help": "evaluate the final EMA model (ddpm_components.evaluation): a bits/dim estimate on held-out data "
            "and, on the embedded digits, the digits FD of --eval-num-samples samples; printed, logged to "
            "metrics.jsonl and written into the model card"
        },
    )
    eval_every_steps: int = field(
        default=0,
        metadata={"help": "also evaluate every N optimizer steps during training (0: only at the end)"},
    )
    eval_num_samples: int = field(
        default=200, metadata={"help": "samples for the digits FD of an evaluation"}
    )
    eval_inference_steps: int | None = field(
        default=None,
        metadata={
            "help": "denoising steps of the evaluation's samples with the model's own scheduler (default: "
            "min(100, num_train_timesteps))"
        },
    )
    eval_few_steps: int = field(
        default=10,
        metadata={
            "help": "the evaluation also measures the samples' FD at this few-step count, at most "
            "num_train_timesteps (0: not)"
        },
    )
    eval_bpd_timesteps: int | None = field(
        default=None,
        metadata={
            "help": "K: the evaluation's bits/dim is the unbiased estimate from K stratified timesteps per image "
            "(default: min(20, num_train_timesteps); ddpm-components evaluate runs the full chain)"
        },
    )
    inception_weights: str | None = field(
        default=None,
        metadata={
            "help": "torch-fidelity's weights-inception-2015-12-05-6726825d.pth: evaluations of a folder dataset "
            "then add the FID of --eval-num-samples samples against up to 256 training images (never downloaded; "
            "needs pip install 'ddpm-components[fid]')"
        },
    )
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
    report_to: ReportTo = field(
        default="none",
        metadata={
            "help": "experiment tracker (through accelerate): tensorboard, wandb (WANDB_MODE=offline works without "
            "an account) or all (every tracker accelerate finds installed)"
        },
    )
    logging_dir: str = field(
        default=LOGS_FOLDER,
        metadata={
            "help": "the trackers' folder: relative to --output-dir (as diffusers' os.path.join(output_dir, "
            "logging_dir)), or an absolute path"
        },
    )
    push_to_hub: bool = field(
        default=False,
        metadata={"help": "push the trained pipeline and its model card to the Hugging Face Hub"},
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repository id for --push-to-hub (e.g. user/ddpm-digits)"}
    )
    hub_private: bool = field(default=False, metadata={"help": "create the Hub repository as private"})
    hub_push_every: int = field(
        default=0,
        metadata={
            "help": "with --push-to-hub and --save-model-steps: also upload every K-th periodic save in the background, "
            "without stopping training (a failed upload is a warning, retried at the next save; 0: only the final push)"
        },
    )
    debug_record: bool = field(
        default=False,
        metadata={
            "help": "debug: record each rank's sample indices and final parameter checksums under output_dir/debug"
        },
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid value (and the valid choices for options).

        Checks what the options alone decide; :func:`train` checks the data, the output folder and a
        resumed checkpoint before it writes anything."""
        _check_options_of(self)
        self._validate_counts()
        self._validate_rates()
        self._validate_data()
        if self.block_out_channels is not None:
            parse_channels(self.block_out_channels)
        for name in ("num_inference_steps", "eval_inference_steps", "eval_bpd_timesteps"):
            if getattr(self, name) is not None and getattr(self, name) > self.num_train_timesteps:
                raise ValueError(
                    f"{name} ({getattr(self, name)}) must be at most num_train_timesteps "
                    f"({self.num_train_timesteps}): sampling and the bits/dim estimate use at most T steps"
                )
        if isinstance(self.multistep_order, bool) or self.multistep_order not in (1, 2):
            raise ValueError(
                f"multistep_order must be 1 (the DDPM step) or 2 (with DPM-Solver++(2M)'s extrapolation), got "
                f"{self.multistep_order!r}"
            )
        if self.eval_num_samples < 2:
            raise ValueError(
                f"eval_num_samples must be at least 2 (a Fréchet distance), got {self.eval_num_samples}"
            )
        # the Inception weights file (92 MB, hashed) is checked once per run, in train()'s setup, not on every
        # construction of a config (the command line's, dataclasses.replace, a resumed run's)
        if self.guidance_scale != 1.0 and self.conditioning == "none":
            raise ValueError(
                f"guidance_scale={self.guidance_scale} needs a class-conditional model, but conditioning='none'; "
                "use guidance_scale=1.0 or conditioning 'auto' / 'class'"
            )
        self._validate_tracking()
        if self.resume is not None and self.overwrite:
            raise ValueError(
                "resume and overwrite exclude each other: --resume continues the run in output_dir, "
                "--overwrite deletes it and starts afresh"
            )

    def _validate_tracking(self) -> None:
        """Trackers and the Hub: wandb installed when asked for, a logging folder, periodic pushes of periodic saves."""
        import importlib.util

        installed = {
            "tensorboard": any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX")),
            "wandb": importlib.util.find_spec("wandb") is not None,
        }
        if self.report_to in installed and not installed[self.report_to]:
            raise ValueError(
                f"report_to={self.report_to!r} needs {self.report_to}: pip install 'ddpm-components[{self.report_to}]'"
            )
        if self.report_to == "all" and not any(installed.values()):
            raise ValueError(
                "report_to='all' found no tracker installed: pip install 'ddpm-components[tensorboard]' (or [wandb])"
            )
        if not self.logging_dir.strip():
            raise ValueError(
                f"logging_dir must name a folder (e.g. {LOGS_FOLDER!r}), got {self.logging_dir!r}"
            )
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("push_to_hub needs hub_model_id (e.g. --hub-model-id user/ddpm-digits)")
        if self.hub_push_every < 0:
            raise ValueError(f"hub_push_every must be zero or positive, got {self.hub_push_every}")
        if self.hub_push_every and not self.push_to_hub:
            raise ValueError(f"hub_push_every={self.hub_push_every} needs push_to_hub (and hub_model_id)")
        if self.hub_push_every and not (self.save_model_steps or self.save_model_epochs):
            raise ValueError(
                f"hub_push_every={self.hub_push_every} pushes every K-th periodic save, but there is none: "
                "set save_model_steps or save_model_epochs"
            )

    def _validate_counts(self) -> None:
        positive = [
            "train_batch_size",
            "max_train_steps",
            "gradient_accumulation_steps",
            "num_train_timesteps",
        ]
        positive += ["num_inference_steps", "samples_per_class", "num_samples", "logging_steps"]
        positive += ["eval_num_samples", "process_group_timeout"]
        positive += [
            name for name in ("eval_inference_steps", "eval_bpd_timesteps") if getattr(self, name) is not None
        ]
        positive += [
            name
            for name in (
                "resolution",
                "cpu_threads",
                "layers_per_block",
                "num_epochs",
                "save_images_epochs",
                "save_model_epochs",
            )
            if getattr(self, name) is not None
        ]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        non_negative = [
            "lr_warmup_steps",
            "checkpointing_steps",
            "sample_every_steps",
            "save_model_steps",
            "eval_every_steps",
            "dataloader_num_workers",
            "eval_few_steps",
        ]
        if self.checkpoints_total_limit is not None:
            non_negative.append("checkpoints_total_limit")  # 0: keep every checkpoint, like None
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be zero or positive, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:  # numpy's seed range (accelerate.utils.set_seed seeds numpy too)
            raise ValueError(f"seed must be in [0, 2**32 - 1], got {self.seed}")

    def _validate_data(self) -> None:
        """The data options: one source, options of ``datasets`` only with --dataset-name, epochs need a length."""
        if self.dataset_name is not None and self.train_data_dir is not None:
            raise ValueError(
                f"dataset_name ({self.dataset_name!r}) and train_data_dir ({self.train_data_dir!r}) exclude each other: "
                "pass one source of images"
            )
        if self.dataset_name is None:
            given = [
                f"{name}={getattr(self, name)!r}"
                for name, default in (
                    ("dataset_config_name", None),
                    ("dataset_split", "train"),
                    ("image_column", None),
                    ("label_column", None),
                    ("dataset_streaming", False),
                )
                if getattr(self, name) != default
            ]
            if given:
                raise ValueError(f"{', '.join(given)} need(s) dataset_name (a `datasets` dataset to read)")
        if not self.dataset_split:
            raise ValueError("dataset_split must name a split, e.g. 'train'")
        if self.dataset_streaming:
            for name in ("num_epochs", "save_images_epochs", "save_model_epochs"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name} needs the dataset's length, which a streamed dataset (dataset_streaming) does not "
                        "have: use max_train_steps / sample_every_steps"
                    )
        if self.model_config_name_or_path is not None:
            path = Path(self.model_config_name_or_path)
            if (
                path.exists() or path.is_absolute() or self.model_config_name_or_path.startswith(".")
            ) and not (path.is_file() or (path / "config.json").is_file()):
                raise ValueError(
                    f"model_config_name_or_path {self.model_config_name_or_path!r} is neither a JSON file nor a "
                    "folder holding config.json"
                )

    def _validate_rates(self) -> None:
        """Float options: their ranges (finiteness is checked for every float option in :meth:`validate`)."""
        for name in ("learning_rate", "snr_gamma", "adam_epsilon", "ema_inv_gamma", "ema_power"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("vlb_weight", "max_grad_norm", "adam_weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be zero or positive, got {getattr(self, name)}")
        for name in ("label_dropout", "adam_beta1", "adam_beta2", "model_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if not 0.0 < self.ema_max_decay < 1.0:
            raise ValueError(f"ema_max_decay must be in (0, 1), got {self.ema_max_decay}")

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a JSON-serialisable dict (what ``training_config.json`` holds)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingConfig:
        """Build a configuration from :meth:`to_dict`'s output (or a ``training_config.json``, whose ``run_id``
        is ignored); unknown keys raise ``ValueError``."""
        names = {item.name for item in dataclasses.fields(cls)}
        values = {key: value for key, value in values.items() if key != RUN_ID_KEY}  # a record, not an option
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; valid options: {sorted(names)}")
        return cls(**values)


def _check_options_of(options: Any) -> None:
    """``ValueError`` for a field of the dataclass ``options`` outside its ``Literal`` choices, or a non-finite float."""
    hints = get_type_hints(type(options))
    for item in dataclasses.fields(options):
        hint, value = hints[item.name], getattr(options, item.name)
        choices = get_args(hint) if getattr(hint, "__origin__", None) is Literal else ()
        if choices and value not in choices:
            raise ValueError(f"{item.name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        if float in (hint, *get_args(hint)) and value is not None and not math.isfinite(value):
            raise ValueError(f"{item.name} must be a finite number, got {value}")


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


def _json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with NaN and infinities replaced by ``None`` (JSON has no such numbers)."""
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in record.items()
    }


def _append_json_line(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one line of strict JSON (one ``write``: a killed run leaves whole lines)."""
    line = json.dumps(_json_safe(record), allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the records of steps up to ``last_step`` (a resumed run logs the later steps again), atomically;
    lines cut short by a kill are dropped."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
            kept.append(json.dumps(_json_safe(record), allow_nan=False) + "\n")
    _atomic_write_text(path, "".join(kept))


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


def _fsync_directory(path: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):
        descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _save_checkpoint(
    accelerator: Any,
    output_dir: Path,
    step: int,
    keep: int | None,
    record: dict[str, Any],
    objects: list[Any],
) -> Path:
    """``accelerator.save_state``, the checkpointed ``objects`` (:func:`_save_objects`) and the run ``record`` into a
    temporary folder, then rename it to ``checkpoint-<step>``.

    Every process writes its part (its RNG state) into the same temporary folder; after a barrier only
    the main process renames it and prunes checkpoints beyond the newest ``keep`` (``None`` or 0: keep all),
    so a ``checkpoint-*`` folder is always complete. An exception (or an abort by a second signal) on the way
    removes the temporary folder.
    """
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    temporary = output_dir / f"{_TEMPORARY_PREFIX}{step}"
    main = accelerator.is_main_process
    try:
        if main and temporary.exists():
            shutil.rmtree(temporary)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(temporary))
        accelerator.wait_for_everyone()
        if main:
            _save_objects(objects, temporary)
            _atomic_write_text(temporary / RUN_RECORD_NAME, json.dumps(record, indent=2) + "\n")
            from .pipeline_ddpm import match_file_modes

            match_file_modes(temporary, temporary / RUN_RECORD_NAME)  # safetensors writes 0o600 (see there)
            if final.exists():
                _remove_tree_atomic(final)
            os.replace(temporary, final)
            _fsync_directory(output_dir)
            if keep:
                for old in list_checkpoints(output_dir)[:-keep]:
                    _remove_tree_atomic(old)
    except BaseException:
        if main:
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return final


def _save_objects(objects: list[Any], folder: Path) -> None:
    """Each object's ``state_dict()`` (the EMA, the step counter, distillation's teacher) as
    ``custom_checkpoint_<index>.pkl``: the files and format of ``accelerator.register_for_checkpointing``, which we
    do not use because its ``load_state`` unpickles them with ``weights_only=False``, so a shared checkpoint could
    run code. :func:`_load_objects` reads them back."""
    import torch

    for index, obj in enumerate(objects):
        torch.save(obj.state_dict(), folder / _object_file_name(index))


def _load_objects(objects: list[Any], folder: Path) -> None:
    """Restore what :func:`_save_objects` wrote (or accelerate, for checkpoints of earlier versions) with torch's
    weights-only unpickler: tensors, numbers, strings and containers of them load, anything else is refused."""
    import pickle

    import torch

    for index, obj in enumerate(objects):
        path = folder / _object_file_name(index)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            found = re.search(r"GLOBAL ([\w.]+)", str(error))
            what = f" (it calls {found.group(1)})" if found else ""
            raise ValueError(
                f"cannot resume from {str(folder)!r}: {path.name} holds more than tensors and numbers{what}; it is "
                "refused because unpickling it could run code, and ddpm-components never writes such a file"
            ) from None
        obj.load_state_dict(state)


def _object_file_name(index: int) -> str:
    """The file of the ``index``-th checkpointed object (a name :data:`_OBJECT_FILE` matches)."""
    return f"custom_checkpoint_{index}.pkl"


@contextlib.contextmanager
def _without_objects(folder: Path) -> Iterator[Path]:
    """A temporary view of checkpoint ``folder`` without the checkpointed objects' files, for
    ``accelerator.load_state``: it unpickles every ``custom_checkpoint_*.pkl`` it finds with ``weights_only=False``
    (and refuses a folder with more of them than registered objects), so it must not see them; everything else
    (weights, optimizer and RNG states) it loads with the weights-only unpickler. The view links the files (copies
    them where links are not allowed) and is removed afterwards; ``folder`` is only read."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ddpm-components-resume-") as view:
        for entry in folder.iterdir():
            if _OBJECT_FILE.fullmatch(entry.name):
                continue
            target, link = entry.resolve(), Path(view) / entry.name
            try:
                os.symlink(target, link, target_is_directory=target.is_dir())
            except OSError:  # e.g. Windows without the privilege to create symbolic links
                (shutil.copytree if target.is_dir() else shutil.copy2)(target, link)
        yield Path(view)


def _clean_stale_folders(output_dir: Path) -> None:
    """Remove what a killed run may have left: unfinished temporary checkpoints and half-deleted ones."""
    for path in output_dir.iterdir() if output_dir.is_dir() else []:
        if path.is_dir() and path.name.startswith((_TEMPORARY_PREFIX, _DELETING_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------- the output folder
def _pipeline_file_names() -> tuple[str, ...]:
    """The files the final ``DDPMPipeline.save_pretrained`` writes into the output folder (remote-code layout)."""
    from .pipeline_ddpm import SAMPLE_GRID_NAME, SAVE_MANIFEST_NAME, TRAINING_CONFIG_NAME

    return (
        "model_index.json",
        "README.md",
        "pipeline_ddpm.py",
        SAMPLE_GRID_NAME,
        TRAINING_CONFIG_NAME,
        SAVE_MANIFEST_NAME,
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/unet_ddpm.py",
        "scheduler/scheduler_config.json",
        "scheduler/scheduling_ddpm.py",
    )


def _run_files(root: Path) -> list[Path]:
    """The files and folders a training run writes into ``root`` besides checkpoints and the saved pipeline
    (and besides ``training_config.json``) that exist there now."""
    found = [root / METRICS_NAME] if (root / METRICS_NAME).is_file() else []
    samples = root / SAMPLES_FOLDER
    if samples.is_dir():
        found += sorted(path for path in samples.iterdir() if _SAMPLE_FILE.fullmatch(path.name))
    found += [root / DEBUG_FOLDER / name for name in _DEBUG_FILES if (root / DEBUG_FOLDER / name).is_file()]
    found += _tracker_files(root / LOGS_FOLDER / _TRACKER_PROJECT)
    return found


def _tracker_files(folder: Path) -> list[Path]:
    """The files in ``folder`` (``logs/<project>``) at names the TensorBoard tracker writes (anything else there is
    not ours, and ``--overwrite`` leaves it)."""
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and _TRACKER_FILE.fullmatch(entry.name):
            found.append(entry)
        elif entry.is_dir() and _TRACKER_RUN_FOLDER.fullmatch(entry.name):
            found += [
                path
                for path in sorted(entry.iterdir())
                if path.is_file() and (_TRACKER_FILE.fullmatch(path.name) or path.name == "hparams.yml")
            ]
    return found


def _is_our_checkpoint(path: Path) -> bool:
    """A (complete or partial) checkpoint folder holding only files that our checkpoints consist of."""
    temporary = re.compile(rf"\.{re.escape(RUN_RECORD_NAME)}\.\d+\.tmp")  # _atomic_write_text, killed
    return path.is_dir() and all(
        entry.is_file() and (_CHECKPOINT_FILE.fullmatch(entry.name) or temporary.fullmatch(entry.name))
        for entry in path.iterdir()
    )


def _read_run_config(path: Path) -> tuple[bool, str | None]:
    """``(written by train(), its run id)`` for a ``training_config.json`` (run id ``None`` before run ids)."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False, None
    names = {item.name for item in dataclasses.fields(TrainingConfig)} | {RUN_ID_KEY}
    if not isinstance(values, dict) or "output_dir" not in values or not set(values) <= names:
        return False, None
    run_id = values.get(RUN_ID_KEY)
    return True, run_id if isinstance(run_id, str) else None


def _read_run_record(checkpoint: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((checkpoint / RUN_RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


@dataclass
class _OutputFolder:
    """What an output folder holds, sorted into the files of a run of ours and files of others that sit at
    names this run would write (which are never overwritten or deleted)."""

    path: Path
    run_id: str | None = None  # of the run the folder holds (its training_config.json or newest checkpoint)
    checkpoints: list[Path] = field(default_factory=list)  # complete checkpoint-<step> folders, oldest first
    saved_pipeline: list[str] = field(default_factory=list)  # the files of a finished model (its manifest)
    ours: list[Path] = field(default_factory=list)  # what --overwrite deletes, besides the saved pipeline
    foreign: list[str] = field(default_factory=list)

    @property
    def holds_a_run(self) -> bool:
        return bool(self.ours or self.saved_pipeline)

    def describe(self) -> str:
        """A short list of the run's files, for messages."""
        names = [path.name for path in self.checkpoints]
        names = [*names[:2], "...", *names[-1:]] if len(names) > 3 else names
        if self.saved_pipeline:
            names.append("a saved model")
        names += [path.name for path in self.ours if not path.name.startswith(CHECKPOINT_PREFIX)][:3]
        return ", ".join(names)


def _inspect_output_folder(path: Path) -> _OutputFolder:
    """Sort what ``path`` holds (nothing is changed); ``ValueError`` for a damaged save manifest."""
    from .pipeline_ddpm import SAVE_MANIFEST_NAME, TRAINING_CONFIG_NAME, saved_pipeline_files

    folder = _OutputFolder(path)
    if not path.is_dir():
        return folder
    folder.saved_pipeline = saved_pipeline_files(path)
    config_is_ours, folder.run_id = _read_run_config(path / TRAINING_CONFIG_NAME)
    checkpoint_names = re.compile(
        rf"({re.escape(_TEMPORARY_PREFIX)}|{re.escape(_DELETING_PREFIX)})?{CHECKPOINT_PREFIX}\d+"
    )
    for entry in sorted(path.iterdir()):
        if checkpoint_names.fullmatch(entry.name):
            if _is_our_checkpoint(entry):
                folder.ours.append(entry)
            else:
                folder.foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    folder.checkpoints = [checkpoint for checkpoint in list_checkpoints(path) if checkpoint in folder.ours]
    if folder.run_id is None and folder.checkpoints:
        folder.run_id = (_read_run_record(folder.checkpoints[-1]) or {}).get(RUN_ID_KEY)
    manifest = set(folder.saved_pipeline) | ({SAVE_MANIFEST_NAME} if folder.saved_pipeline else set())
    for name in _pipeline_file_names():
        if name in manifest or not (path / name).exists():
            continue
        if name == TRAINING_CONFIG_NAME and config_is_ours:
            folder.ours.append(path / name)
        else:
            folder.foreign.append(name)
    run_is_ours = config_is_ours or folder.holds_a_run
    for run_file in _run_files(path):
        if run_is_ours:
            folder.ours.append(run_file)
        else:
            folder.foreign.append(run_file.relative_to(path).as_posix())
    return folder


def _plan_output_folder(config: TrainingConfig, folder: _OutputFolder) -> Path | None:
    """The checkpoint this run resumes from (``None``: step 0); ``ValueError`` when the output folder cannot
    take this run (nothing is changed here)."""
    where = config.output_dir
    if folder.foreign:
        shown = ", ".join(folder.foreign[:5]) + (", ..." if len(folder.foreign) > 5 else "")
        raise ValueError(
            f"--output-dir {where!r} holds {shown}, at names this run writes, which ddpm-components did not "
            "write; move them away or choose another --output-dir (nothing was changed)"
        )
    if config.overwrite:
        return None
    if config.resume is None:
        if folder.holds_a_run:
            raise ValueError(
                f"--output-dir {where!r} holds another training run ({folder.describe()}): pass --resume latest "
                "to continue it, --overwrite to delete it and start afresh (only ddpm-components' files are "
                "deleted), or choose another --output-dir"
            )
        return None
    if config.resume == "latest":
        if not folder.checkpoints and folder.saved_pipeline:
            raise ValueError(
                f"--output-dir {where!r} holds a saved model and no checkpoint to resume from: pass --overwrite "
                "to train a new model there, or choose another --output-dir"
            )
        return folder.checkpoints[-1] if folder.checkpoints else None
    path = Path(config.resume)
    if not path.is_dir() and (folder.path / config.resume).is_dir():
        path = folder.path / config.resume  # a bare checkpoint name, as diffusers' scripts take it
    if not path.is_dir():
        raise FileNotFoundError(
            f"resume checkpoint {config.resume!r} does not exist (neither here nor in --output-dir; or pass 'latest')"
        )
    _checkpoint_step(path)
    return path


def _remove_run(folder: _OutputFolder) -> None:
    """``--overwrite``: delete the run that ``folder`` holds, exactly the files that are ours."""
    from .pipeline_ddpm import remove_saved_pipeline

    remove_saved_pipeline(folder.path)
    for path in folder.ours:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    tracker = folder.path / LOGS_FOLDER / _TRACKER_PROJECT
    leftovers = (
        [path for path in tracker.iterdir() if path.is_dir() and _TRACKER_RUN_FOLDER.fullmatch(path.name)]
        if tracker.is_dir()
        else []
    )
    for path in [
        *leftovers,
        tracker,
        *(folder.path / name for name in (SAMPLES_FOLDER, DEBUG_FOLDER, LOGS_FOLDER)),
    ]:
        with contextlib.suppress(OSError):  # only when nothing else is left in it
            path.rmdir()


# ------------------------------------------------------------------------------------------ resuming
def _check_checkpoint_files(checkpoint: Path, names: list[str], where: str) -> None:
    """Each file exists and is not cut short: safetensors headers and the zip directory of torch files are
    read (cheap); what loads anyway is loaded later."""
    from safetensors import safe_open

    for name in names:
        path = checkpoint / name
        if not path.is_file():
            raise ValueError(
                f"{where}: {name} is missing (an incomplete checkpoint; resume from another one)"
            )
        try:
            if name.endswith(".safetensors"):
                with safe_open(str(path), framework="pt"):
                    pass
            else:  # torch.save files are zip archives; a truncated one has no central directory
                zipfile.ZipFile(path).close()
        except Exception as error:  # safetensors raises its own error type
            raise ValueError(
                f"{where}: {name} is damaged ({error}); resume from another checkpoint"
            ) from None


def _record_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between the run record of a checkpoint and this run's, one phrase per value."""
    differences = []
    for section, label in (("dataset", "data"), ("diffusion", ""), ("model", "U-Net")):
        old, new = saved.get(section) or {}, current[section]
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                name = f"{label} {key}".strip()
                differences.append(f"{name}: {old.get(key)!r} in the checkpoint, {new.get(key)!r} now")
    if saved.get("use_ema") != current["use_ema"]:
        differences.append(f"use_ema: {saved.get('use_ema')!r} in the checkpoint, {current['use_ema']!r} now")
    return differences


def check_resume(
    checkpoint: Path,
    current: dict[str, Any],
    folder_run_id: str | None,
    max_train_steps: int,
    files: list[str],
) -> dict[str, Any]:
    """The run record of ``checkpoint`` after checking that the run described by ``current`` (a run record of
    this run) can continue from it: same run, same data, diffusion and U-Net, a step within
    ``max_train_steps``, and ``files`` present and whole. ``ValueError`` says what differs or what is broken."""
    where = f"cannot resume from {str(checkpoint)!r}"
    step = _checkpoint_step(checkpoint)
    if not (checkpoint / RUN_RECORD_NAME).is_file():
        raise ValueError(
            f"{where}: it has no {RUN_RECORD_NAME}, so it is incomplete or was not written by this version of "
            "ddpm-components train"
        )
    saved = _read_run_record(checkpoint)
    if saved is None or not isinstance(saved.get(RUN_ID_KEY), str) or saved.get("step") != step:
        raise ValueError(f"{where}: its {RUN_RECORD_NAME} is damaged")
    if folder_run_id is not None and saved[RUN_ID_KEY] != folder_run_id:
        raise ValueError(
            f"{where}: it belongs to another run (id {saved[RUN_ID_KEY]}) than the one in --output-dir "
            f"(id {folder_run_id})"
        )
    if max_train_steps < step:
        raise ValueError(
            f"{where}: max_train_steps={max_train_steps} is below its step {step}; pass --max-train-steps {step} "
            "or more"
        )
    differences = _record_differences(saved, current)
    if differences:
        shown = "; ".join(differences[:6]) + ("; ..." if len(differences) > 6 else "")
        raise ValueError(
            f"{where}: this run differs from it ({shown}); resume with the options of the run that wrote it, "
            "or start afresh with --overwrite"
        )
    _check_checkpoint_files(checkpoint, files, where)
    return saved


def resume_command(config: TrainingConfig, **changes: Any) -> str:
    """The ``ddpm-components train`` command line that continues ``config``'s run (``--resume latest``), with
    ``changes`` to its options (e.g. ``learning_rate=1e-4``); options at their defaults are left out."""
    return command_line("train", config, **changes)


def command_line(subcommand: str, config: Any, **changes: Any) -> str:
    """The ``ddpm-components SUBCOMMAND`` command line that continues the run of ``config`` (a dataclass of
    options, one flag per field, as ``train`` and ``distill`` take them) with ``--resume latest`` and ``changes``;
    options at their defaults are left out (fields without a default are always written)."""
    values = {**dataclasses.asdict(config), **changes, "resume": "latest", "overwrite": False}
    words = ["ddpm-components", subcommand]
    for item in dataclasses.fields(config):
        value = values[item.name]
        if value == item.default and item.name != "output_dir":
            continue
        flag = "--" + item.name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{flag[2:]}")
        else:
            words += [flag, "none" if value is None else str(value)]
    return shlex.join(words)


# ----------------------------------------------------------------------------------------------- data
def build_dataset(config: TrainingConfig) -> Any:
    """The training dataset of ``config``: the embedded digits, an :class:`ImageFolderDataset`, or a ``datasets``
    dataset (:func:`~ddpm_components.data.build_hf_image_dataset`; decoded lazily, streamed with
    ``dataset_streaming``)."""
    from .data import DigitsDataset, ImageFolderDataset, build_hf_image_dataset

    if config.dataset_name is not None:
        dataset = build_hf_image_dataset(
            config.dataset_name,
            resolution=_sample_size(config),
            config_name=config.dataset_config_name,
            split=config.dataset_split,
            cache_dir=config.cache_dir,
            image_column=config.image_column,
            label_column=config.label_column,
            use_labels=config.conditioning != "none",
            streaming=config.dataset_streaming,
            color_mode=config.color_mode,
            crop=config.crop,
            random_flip=config.random_flip,
        )
        if config.dataset_streaming:
            dataset.seed = config.seed
        return dataset
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
            f"conditioning='class' needs labelled data with at least two classes; "
            f"{config.dataset_name or config.train_data_dir!r} has {dataset.num_classes} (put the images of each "
            "class in its own sub-folder, or name a --label-column)"
        )
    return dataset.num_classes if dataset.num_classes >= 2 else None


def _sample_size(config: TrainingConfig) -> int:
    return config.resolution or (8 if config.train_data_dir is None and config.dataset_name is None else 32)


def build_model(
    config: TrainingConfig,
    num_channels: int,
    num_classes: int | None,
    class_names: list[str] | tuple[str, ...] | None = None,
) -> Any:
    """The U-Net of ``config``: ``DDPMUNet2DModel.from_preset`` with the data's shape and the overrides.

    ``class_names`` (position = label, e.g. the dataset's ``class_names``) are saved in the U-Net's config, so
    that a shared model says which label is which class."""
    from .unet_ddpm import DDPMUNet2DModel

    sample_size = _sample_size(config)
    if config.model_config_name_or_path is not None:
        preset = unet_config_from_diffusers(config.model_config_name_or_path)
    else:
        preset = DDPMUNet2DModel.preset_config(config.model_preset)
    overrides: dict[str, Any] = {
        "sample_size": sample_size,
        "in_channels": num_channels,
        "out_channels": num_channels * (2 if config.learned_variance else 1),
        "num_class_embeds": num_classes,
    }
    if num_classes is not None and class_names:
        overrides["class_names"] = list(class_names)
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
    if config.model_config_name_or_path is not None:
        preset.pop("class_names", None)  # the data's classes, as with presets
        overrides["use_null_class_embed"] = num_classes is not None  # label dropout's null class
        return DDPMUNet2DModel(**{**preset, **overrides})
    return DDPMUNet2DModel.from_preset(config.model_preset, **overrides)


def unet_config_from_diffusers(name_or_path: str) -> dict[str, Any]:
    """Our U-Net configuration for a diffusers ``UNet2DModel`` configuration (``--model-config-name-or-path``, as
    diffusers' ``train_unconditional.py`` takes it: a folder holding ``config.json``, a JSON file or a Hub id),
    through the conversion of :meth:`DDPMUNet2DModel.from_unet2d`; ``ValueError`` naming what cannot be converted."""
    import inspect

    from diffusers import UNet2DModel

    from .unet_ddpm import _config_from_unet2d

    where = f"--model-config-name-or-path {name_or_path!r}"
    try:
        config = UNet2DModel.load_config(name_or_path)
    except (OSError, ValueError) as error:
        raise ValueError(f"{where}: {' '.join(str(error).split())}") from None
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"{where} configures a {config['_class_name']}; pass a UNet2DModel configuration")
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(UNet2DModel.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    values = {**defaults, **{key: value for key, value in config.items() if not key.startswith("_")}}
    values["_class_names"] = config.get("_class_names")
    if values.get("sample_size") is None:
        values["sample_size"] = 32  # replaced by the data's size; needed to place attention levels
    try:
        return _config_from_unet2d(values)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None


def build_scheduler(config: TrainingConfig) -> Any:
    """The noise scheduler of ``config`` (``learned_range`` variance with ``learned_variance``)."""
    from .scheduling_ddpm import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        variance_type="learned_range" if config.learned_variance else "fixed_small",
        clip_sample=True,
        timestep_spacing=config.timestep_spacing,
        multistep_order=config.multistep_order,
    )


# ---------------------------------------------------------------------------------------------- loss
class LossTerms(NamedTuple):
    """The terms of one estimate of the training objective (scalar tensors; ``loss`` carries the gradient).

    ``loss = mse + vlb_weight · T · vb``: ``mse`` is the (min-SNR-weighted) simple loss against
    ``scheduler.get_target``, ``vb`` the mean variational-bound term L_t in bits/dim (``None`` without a
    learned variance). ``by_quartile`` (optional, detached): a (2, 4) tensor, row 0 the sums of the per-sample
    ``mse`` whose timestep t falls in each quarter of [0, T) (t/T in [0, .25), [.25, .5), ...), row 1 their counts,
    for the loss by quartile of t that improved-diffusion logs."""

    loss: torch.Tensor
    mse: torch.Tensor
    vb: torch.Tensor | None
    by_quartile: torch.Tensor | None = None


def loss_by_quartile(
    per_sample: torch.Tensor, timesteps: torch.Tensor, num_train_timesteps: int
) -> torch.Tensor:
    """(2, 4): the sums of ``per_sample`` in each quarter of the timesteps' range [0, T), and the counts (on the
    device, no host sync)."""
    import torch

    bucket = (timesteps * 4 // num_train_timesteps).clamp(0, 3)
    sums = torch.zeros(4, device=per_sample.device).index_add_(0, bucket, per_sample.detach().float())
    counts = torch.bincount(bucket, minlength=4).to(sums)
    return torch.stack([sums, counts])


def training_loss(
    model: torch.nn.Module,
    scheduler: Any,
    original_sample: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    class_labels: torch.Tensor | None = None,
    null_class_label: int | None = None,
    label_dropout: float = 0.0,
    loss_weighting: LossWeighting = "uniform",
    snr_gamma: float = 5.0,
    learned_variance: bool = False,
    vlb_weight: float = 0.001,
) -> LossTerms:
    """One Monte-Carlo estimate of the training objective for a batch of clean images ``x_0``.

    Draws ``t ~ U{0, …, T-1}`` and ``ε ~ N(0, I)`` (and the label dropout: each label becomes
    ``null_class_label`` with probability ``label_dropout``) from ``generator``, forms
    ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε`` and returns the :class:`LossTerms`: the per-sample MSE against
    ``scheduler.get_target`` weighted by ``scheduler.loss_weights(t, loss_weighting, snr_gamma)`` and, with
    ``learned_variance`` (the model outputs 2×C channels: mean part, variance part), ``vlb_weight · T · L_t``
    computed with the mean part detached.
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
    if class_labels is not None and null_class_label is not None and label_dropout > 0:
        drop = torch.rand(batch_size, generator=generator, device=device) < label_dropout
        class_labels = torch.where(drop, torch.full_like(class_labels, null_class_label), class_labels)
    sample = scheduler.add_noise(original_sample, noise, timesteps)
    model_output = model(sample, timesteps, class_labels=class_labels, return_dict=False)[0].float()
    if learned_variance:
        mean_output, variance_output = model_output.split(channels, dim=1)
    else:
        mean_output = model_output
    target = scheduler.get_target(original_sample, noise, timesteps).float()
    mse = F.mse_loss(mean_output, target, reduction="none").mean(dim=tuple(range(1, mean_output.ndim)))
    weights = scheduler.loss_weights(timesteps, weighting=loss_weighting, snr_gamma=snr_gamma)
    per_sample = weights.to(mse) * mse
    weighted_mse = per_sample.mean()
    quartiles = loss_by_quartile(per_sample, timesteps, num_train_timesteps)
    if not learned_variance:
        return LossTerms(weighted_mse, weighted_mse, None, quartiles)
    frozen_mean_output = torch.cat([mean_output.detach(), variance_output], dim=1)
    vb = scheduler.vlb_terms(frozen_mean_output, original_sample.float(), sample.float(), timesteps).mean()
    if vlb_weight == 0:  # logged only; not added, so that it cannot reach the gradient (0 * inf is NaN)
        return LossTerms(weighted_mse, weighted_mse, vb.detach(), quartiles)
    return LossTerms(weighted_mse + vlb_weight * num_train_timesteps * vb, weighted_mse, vb, quartiles)


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
    """The step counter, saved and restored with every checkpoint (``_TrainLoop.checkpointed_objects``)."""

    def __init__(self) -> None:
        self.global_step = 0

    def state_dict(self) -> dict[str, int]:
        return {"global_step": self.global_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.global_step = int(state["global_step"])


# ------------------------------------------------------------------------------------------- sampling
def _share(indices: list[int], accelerator: Any) -> list[int]:
    """This process's share of ``indices``: a contiguous, near-equal part (all of them in a single process)."""
    if accelerator is None or accelerator.num_processes == 1:
        return indices
    count, world, rank = len(indices), accelerator.num_processes, accelerator.process_index
    return indices[rank * count // world : (rank + 1) * count // world]


def sample_shared(
    pipeline: Any,
    indices: list[int],
    accelerator: Any = None,
    stop: Callable[[], bool] | None = None,
    **options: Any,
) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` samples of images ``indices``, drawn by all processes in parallel (each its share,
    :func:`_share`) and gathered on every process.

    Image ``i`` is seeded :func:`~ddpm_components.sampling.image_seed` ``(seed, i)`` (``options`` go to
    :func:`~ddpm_components.sampling.sample_batches`), so the result is the same whatever the number of processes.
    A ``FloatingPointError`` on any process is raised on every process, after the gather (no process is left
    waiting in it)."""
    import torch

    from .sampling import sample_batches

    share = _share(indices, accelerator)
    parts, error = [], None
    try:
        for _, images in sample_batches(
            pipeline,
            share,
            batch_size=max(1, min(len(share), 250)),
            show_progress=False,
            callback_on_step_end=None if stop is None else _stop_sampling_when(stop),
            **options,
        ):
            parts.append(images)
    except FloatingPointError as caught:
        error = str(caught)
    shards = [(torch.cat(parts) if parts else None, error)]
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        shards = gather_object(shards)
    errors = [error for _, error in shards if error is not None]
    if errors:
        raise FloatingPointError(errors[0])
    return torch.cat([images for images, _ in shards if images is not None])


def sample_grid(
    unet: Any,
    scheduler: Any,
    config: TrainingConfig,
    num_classes: int | None,
    device: torch.device,
    stop: Callable[[], bool] | None = None,
    accelerator: Any = None,
) -> Any:
    """A PIL grid of samples from ``unet`` via :class:`DDPMPipeline` (one row per class when conditional).

    Image ``i`` of the grid is seeded :func:`~ddpm_components.sampling.image_seed` ``(config.seed, i)``; with an
    ``accelerator`` of several processes, every process samples its share and every process gets the grid
    (:func:`sample_shared`): the same grid whatever the number of processes. Images smaller than 32 pixels are
    enlarged and framed for viewing (:func:`_for_viewing`). ``stop`` is asked after every denoising step; when it
    returns True, sampling ends there (the grid is then unfinished).
    """
    from diffusers.utils import make_image_grid

    from .pipeline_ddpm import DDPMPipeline
    from .sampling import _to_pil

    pipeline = DDPMPipeline(unet=unet, scheduler=scheduler)
    if num_classes is not None:
        rows, cols = num_classes, config.samples_per_class
    else:
        cols = math.ceil(math.sqrt(config.num_samples))
        rows = math.ceil(config.num_samples / cols)
    images = sample_shared(
        pipeline,
        list(range(rows * cols)),
        accelerator,
        stop,
        seed=config.seed,
        num_inference_steps=config.num_inference_steps,
        class_label_of=None if num_classes is None else (lambda index: index // cols),
        guidance_scale=config.guidance_scale,
    )
    return make_image_grid(_for_viewing(_to_pil(images)), rows=rows, cols=cols)


# ----------------------------------------------------------------------------------------- evaluation
def evaluate_during_training(
    unet: Any,
    scheduler: Any,
    config: TrainingConfig,
    dataset: Any,
    num_classes: int | None,
    device: torch.device,
    stop: Callable[[], bool] | None = None,
    accelerator: Any = None,
    cache: dict[str, Any] | None = None,
) -> dict[str, float]:
    """The numbers of an evaluation during (or at the end of) training, for the EMA ``unet``.

    - ``eval_bpd`` (± ``eval_bpd_stderr``): the unbiased K-timestep estimate of the bits/dim bound
      (:func:`~ddpm_components.evaluation.bits_per_dim_estimate`, K = ``eval_bpd_timesteps``) on the digits'
      held-out test split, or on up to 256 training images of a folder (then a training-set number);
    - ``eval_fd``: on 8×8 digits only, the digits FD of ``eval_num_samples`` samples (balanced class labels for a
      class-conditional model; ``eval_inference_steps`` steps of the model's own scheduler) against the test split;
    - ``eval_fd_few_steps`` / ``eval_fid_few_steps``: the same at ``eval_few_steps`` steps (unless 0 or equal);
    - ``eval_fid``: on a folder dataset with ``inception_weights``, the FID of as many samples against those
      training images.

    With an ``accelerator`` of several processes, call it on every process: the samples are drawn by all of them
    (each its share, :func:`sample_shared`), and so is the bits/dim estimate (each its share of the images,
    :func:`_bits_per_dim_shared`); the numbers are computed on the main process (others return ``{}``).

    ``cache``: a dict kept across the evaluations of one run (empty at first), which then holds the reference
    images and the :class:`~ddpm_components.evaluation.SampleQuality` built on them: the feature network (the
    digits classifier, or Inception-V3 from its 92 MB file) is loaded and the reference features are computed
    once per run instead of at every evaluation.
    """
    import torch

    from .data import DigitsDataset
    from .evaluation import SampleQuality, reference_digits

    digits = isinstance(dataset, DigitsDataset) and dataset.resolution == 8
    metric = "fd" if digits else ("fid" if config.inception_weights is not None else None)
    steps, timesteps = evaluation_steps(config)
    few_steps = evaluation_few_steps(config)
    several = accelerator is not None and accelerator.num_processes > 1

    def stopped() -> bool:
        # with several processes a stop is each process's own, so every one still takes part in every gather
        return not several and stop is not None and stop()

    samples = few_step_samples = None
    if metric is not None:
        samples = _evaluation_samples(unet, scheduler, config, num_classes, steps, stop, accelerator)
        if few_steps and not stopped():
            few_step_samples = _evaluation_samples(
                unet, scheduler, config, num_classes, few_steps, stop, accelerator
            )
    if stopped():
        return {}
    cache = {} if cache is None else cache
    if "reference" not in cache:
        if digits:
            cache["reference"] = reference_digits("test")
        else:
            if hasattr(dataset, "head"):  # a streamed dataset: its first rows
                items = dataset.head(256)
            else:
                items = [dataset[index] for index in range(min(len(dataset), 256))]
            cache["reference"] = (
                torch.stack([item["pixel_values"] for item in items]),
                torch.stack([torch.as_tensor(item["class_labels"]) for item in items]),
            )
    images, labels = cache["reference"]
    total, stderr = _bits_per_dim_shared(
        unet,
        scheduler,
        images.to(device),
        labels if num_classes is not None else None,
        timesteps,
        config.seed,
        accelerator,
    )
    if accelerator is not None and not accelerator.is_main_process:
        return {}
    numbers = {"eval_bpd": total, "eval_bpd_stderr": stderr}
    if samples is not None:
        if cache.get("quality_metric") != metric:
            cache["quality"] = SampleQuality(
                images.cpu(), [metric], inception_weights=config.inception_weights
            )
            cache["quality_metric"] = metric
        numbers[f"eval_{metric}"] = cache["quality"](samples)[metric]
        if few_step_samples is not None:
            numbers[f"eval_{metric}_few_steps"] = cache["quality"](few_step_samples)[metric]
    return numbers


def _bits_per_dim_shared(
    unet: Any,
    scheduler: Any,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    num_timesteps: int,
    seed: int,
    accelerator: Any = None,
) -> tuple[float, float]:
    """The K-timestep bits/dim estimate (:func:`~ddpm_components.evaluation.bits_per_dim_estimate`) of ``images`` and
    its standard error, computed by all processes of ``accelerator`` in parallel (each its share of the images, with
    its own generator seeded ``seed``) and combined from the gathered per-image values on every process. With one
    process this is the estimate over all images with one generator seeded ``seed``. A ``FloatingPointError`` on any
    process is raised on every process, after the gather."""
    import torch

    from .evaluation import bits_per_dim_estimate, mean_and_stderr

    share = _share(list(range(images.shape[0])), accelerator)
    per_image, error = None, None
    if share:
        try:
            per_image = bits_per_dim_estimate(
                unet,
                scheduler,
                images[share],
                None if labels is None else labels[share],
                num_timesteps=num_timesteps,
                generator=torch.Generator().manual_seed(seed),
            ).per_image
        except FloatingPointError as caught:
            error = str(caught)
    shards = [(per_image, error)]
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        shards = gather_object(shards)
    errors = [error for _, error in shards if error is not None]
    if errors:
        raise FloatingPointError(errors[0])
    return mean_and_stderr(torch.cat([values for values, _ in shards if values is not None]))


def _evaluation_samples(
    unet: Any,
    scheduler: Any,
    config: TrainingConfig,
    num_classes: int | None,
    steps: int,
    stop: Callable[[], bool] | None,
    accelerator: Any = None,
) -> torch.Tensor:
    """``eval_num_samples`` samples in [-1, 1], balanced over the classes, seeded by the run's seed (drawn by
    every process of ``accelerator``, each its share)."""
    from .pipeline_ddpm import DDPMPipeline

    images = sample_shared(
        DDPMPipeline(unet=unet, scheduler=scheduler),
        list(range(config.eval_num_samples)),
        accelerator,
        stop,
        seed=config.seed,
        num_inference_steps=steps,
        class_label_of=None if num_classes is None else (lambda index: index % num_classes),
    )
    return images.float() / 127.5 - 1.0


def evaluation_steps(config: TrainingConfig) -> tuple[int, int]:
    """``(eval_inference_steps, eval_bpd_timesteps)`` with their defaults min(100, T) and min(20, T) filled in."""
    steps = config.eval_inference_steps or min(100, config.num_train_timesteps)
    return steps, config.eval_bpd_timesteps or min(20, config.num_train_timesteps)


def evaluation_few_steps(config: TrainingConfig) -> int:
    """The few-step count of an evaluation's second FD: ``eval_few_steps`` at most T; 0 when off or when it equals
    the evaluation's own step count."""
    few_steps = min(config.eval_few_steps, config.num_train_timesteps)
    return 0 if few_steps == evaluation_steps(config)[0] else few_steps


def _evaluation_for_card(config: TrainingConfig, numbers: dict[str, float]) -> dict[str, str]:
    """The final evaluation as model-card rows: what was measured, and how."""
    rows = {}
    steps, timesteps = evaluation_steps(config)
    digits = config.train_data_dir is None and config.dataset_name is None
    data = "the digits' held-out test split" if digits else "training images"
    for key, title, reference in (
        ("eval_fd", "digits FD", "vs the digits' held-out test split"),
        ("eval_fid", "FID (Inception-V3)", "vs up to 256 training images"),
    ):
        what = f"{title}, {config.eval_num_samples} samples"
        if key in numbers:
            rows[f"{what}, {steps} steps of the model's scheduler, {reference} (lower is better)"] = (
                f"{numbers[key]:.2f}"
            )
        if f"{key}_few_steps" in numbers:
            rows[f"{what}, {evaluation_few_steps(config)} steps of the model's scheduler (few steps)"] = (
                f"{numbers[f'{key}_few_steps']:.2f}"
            )
    rows[f"bits/dim on {data} (unbiased estimate from {timesteps} timesteps per image)"] = (
        f"{numbers['eval_bpd']:.3f} ± {numbers['eval_bpd_stderr']:.3f}"
    )
    return rows


def _stop_sampling_when(stop: Callable[[], bool]) -> Callable[..., dict]:
    """A pipeline step-end callback that ends sampling after the step at which ``stop()`` is True."""

    def on_step_end(pipeline: Any, step_index: int, timestep: int, callback_kwargs: dict) -> dict:
        if stop():
            pipeline._interrupt = True  # DDPMPipeline's (and diffusers') documented way to end the loop
        return callback_kwargs

    return on_step_end


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
class _StopSignals:
    """SIGINT and SIGTERM while :func:`train` runs: the first sets a flag that the loop checks at every step
    and the sample grids after every denoising step; a second raises :class:`TrainingInterrupted` at once.

    Installed only in the main thread (``signal`` allows no other); the previous handlers come back on exit
    or :meth:`release`.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()

    def release(self) -> None:
        """Put the previous handlers back."""
        while self._previous:
            number, handler = self._previous.popitem()
            signal.signal(number, signal.SIG_DFL if handler is None else handler)

    def _handle(self, number: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked data-loader worker before its worker_init_fn ran
            return
        if self.received is not None:
            raise TrainingInterrupted(number)
        self.received = number

    def requested(self) -> bool:
        return self.received is not None

    def raise_if_requested(self) -> None:
        if self.received is not None:
            raise TrainingInterrupted(self.received)


def _ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of the data loader: its workers ignore SIGINT and SIGTERM. A Ctrl-C reaches the
    whole process group; only the training process decides when to stop, and it shuts its workers down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _LossWindow:
    """Sums since the last log, kept on the device (no host sync per step): the loss terms (loss, mse, vb), the
    gradient norm before clipping (one per optimizer step) and the mse by quartile of t (sums, then counts).

    The terms of one optimizer step's micro-batches are added when the step ends; with fp16, those of a step
    that the gradient scaler skipped (inf/NaN gradients at the current loss scale: the weights do not change)
    are dropped instead, as such a step is not an error.
    """

    SIZE = 3 + 1 + 8  # loss, mse, vb | grad norm | 4 quartile sums, 4 quartile counts

    def __init__(self, device: torch.device) -> None:
        import torch

        self.sums = torch.zeros(self.SIZE, device=device)
        self.pending = torch.zeros(self.SIZE, device=device)
        self.zero = torch.zeros((), device=device)
        self.count = self.pending_count = 0
        self.norms = self.pending_norms = 0  # optimizer steps whose gradient norm was added

    def add(self, terms: LossTerms) -> None:
        import torch

        vb = self.zero if terms.vb is None else terms.vb.detach()
        self.pending[:3] += torch.stack([terms.loss.detach(), terms.mse.detach(), vb])
        if terms.by_quartile is not None:
            self.pending[4:] += terms.by_quartile.flatten().to(self.pending)
        self.pending_count += 1

    def add_grad_norm(self, norm: torch.Tensor | None) -> None:
        """The total gradient norm of this optimizer step (``clip_grad_norm_``'s return; None: not available)."""
        if norm is not None:
            self.pending[3] += norm.detach().float().to(self.pending.device)
            self.pending_norms += 1

    def end_step(self, skipped: bool = False) -> None:
        if not skipped:
            self.sums += self.pending
            self.count += self.pending_count
            self.norms += self.pending_norms
        self.pending.zero_()
        self.pending_count = self.pending_norms = 0

    def means(self, accelerator: Any) -> dict[str, float | None]:
        """The means over the window and all processes (one reduction, one host sync): ``loss``, ``mse``, ``vb``,
        ``grad_norm`` and ``loss_q0`` … ``loss_q3`` (``None`` for an empty window, a quartile without samples)."""
        names = ["loss", "mse", "vb", "grad_norm"] + [f"loss_q{index}" for index in range(4)]
        if self.count == 0:
            return dict.fromkeys(names)
        import torch

        scale = torch.ones_like(self.sums)
        scale[:3] = 1 / self.count
        scale[3] = 1 / max(self.norms, 1)
        values = accelerator.reduce(self.sums * scale, reduction="mean").tolist()
        means: list[float | None] = values[:4] if self.norms else [*values[:3], None]
        for total, count in zip(values[4:8], values[8:12]):
            means.append(total / count if count > 0 else None)
        return dict(zip(names, means))

    def reset(self) -> None:
        self.sums.zero_()
        self.count = self.norms = 0


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


def _build_accelerator(config: TrainingConfig, output_dir: Path) -> Any:
    """The run's Accelerator; ``process_group_timeout`` becomes the process group's timeout (every collective:
    barriers, gathers, and NCCL's watchdog), through ``InitProcessGroupKwargs``."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import (
        DataLoaderConfiguration,
        GradientAccumulationPlugin,
        InitProcessGroupKwargs,
        ProjectConfiguration,
    )

    accelerator = Accelerator(
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.process_group_timeout))],
        mixed_precision=config.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / config.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        step_scheduler_with_optimizer=False,
        dynamo_backend="inductor" if config.torch_compile else "no",
        cpu=_distributed_without_accelerator(),
    )
    _warn_if_bf16_is_slow_here(config, accelerator.device)
    return accelerator


def _warn_if_bf16_is_slow_here(config: TrainingConfig, device: torch.device) -> None:
    """bf16 on CPU is fast only where the CPU multiplies bfloat16 matrices in hardware (AMX: Intel Xeon 4th generation
    and later); elsewhere it is emulated and slower than float32: say so once, before training starts."""
    if config.mixed_precision != "bf16" or device.type != "cpu":
        return
    import torch

    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if has_amx is not None and not has_amx():
        logger.warning(
            "--mixed-precision bf16 on a CPU without AMX: bfloat16 matrix products are emulated here and usually "
            "slower than float32 (--mixed-precision no)"
        )


def log_image_to_trackers(accelerator: Any, name: str, image: Any, step: int) -> None:
    """Log the PIL ``image`` (a sample grid) under ``name`` at ``step`` to every active tracker that takes images:
    TensorBoard (``add_image``, HWC uint8), wandb (accelerate's ``log_images``: a ``wandb.Image``) and any other
    with a ``log_images`` method; a tracker that fails to take it only warns."""
    import numpy as np

    for tracker in accelerator.trackers:
        try:
            if getattr(tracker, "name", None) == "tensorboard":
                pixels = np.asarray(image.convert("RGB"))
                tracker.writer.add_image(name, pixels, global_step=step, dataformats="HWC")
                tracker.writer.flush()
            elif hasattr(tracker, "log_images"):
                tracker.log_images({name: [image]}, step=step)
        except Exception as error:  # an image is a convenience: never a reason to stop training
            logger.warning("could not log %s to %s: %s", name, getattr(tracker, "name", tracker), error)


class _BackgroundPush:
    """``--hub-push-every K``: uploads of periodic saves to the Hub in a daemon thread, at most one in flight.

    :meth:`offer` is called after every periodic save: on every K-th save, and on the first save after a failed
    upload (the retry), the pipeline is staged in the calling thread (:meth:`DDPMPipeline.stage_for_hub` into a
    temporary folder: a snapshot that later saves cannot change) and uploaded in the background. While an upload
    is still running, the save is skipped (the next K-th save pushes newer weights). A failed upload is one
    warning line. :meth:`wait` lets the final, synchronous push follow the last background one; :meth:`close`
    joins the thread for a few seconds and otherwise abandons it: the daemon thread dies with the process, and a
    cut upload never lands half (a Hub commit is atomic), so the repository keeps its last complete push. The
    abandoned upload's staging folder (a whole copy of the pipeline) is removed when the process exits. In a
    notebook the abandoned upload simply goes on and removes its folder when it ends.
    """

    def __init__(self, config: TrainingConfig, upload: Callable[..., Any] | None = None) -> None:
        from .pipeline_ddpm import create_hub_repo, upload_staged_pipeline  # imported here, not in the thread

        self.config, self.every = config, config.hub_push_every
        self.create_repo, self.upload = create_hub_repo, upload or upload_staged_pipeline
        self.saves, self.retry = 0, False
        self.thread: threading.Thread | None = None
        self.staging: Path | None = None  # the folder of the upload in flight
        self.pushed: list[int] = []  # steps whose upload landed, in order
        self.failed: list[int] = []
        self.skipped: list[int] = []

    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def offer(self, pipeline: Any, step: int, training_config: dict[str, Any]) -> bool:
        """After a periodic save of ``pipeline`` at ``step``: start its upload when due; True if started."""
        self.saves += 1
        if not (self.retry or self.saves % self.every == 0):
            return False
        if self.busy():
            self.skipped.append(step)
            return False
        import tempfile

        staging = Path(tempfile.mkdtemp(prefix="ddpm-push-"))
        try:
            pipeline.stage_for_hub(
                staging / "pipeline", self.config.hub_model_id, training_config=training_config
            )
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.staging = staging
        self.thread = threading.Thread(
            target=self._push, args=(staging, step), name=f"hub-push-{step}", daemon=True
        )
        self.thread.start()
        return True

    def _push(self, staging: Path, step: int) -> None:
        try:
            repo_id = self.create_repo(self.config.hub_model_id, private=self.config.hub_private)
            message = f"Upload DDPM pipeline at step {step} (ddpm-components)"
            self.upload(staging / "pipeline", repo_id, commit_message=message)
            self.pushed.append(step)
            self.retry = False
        except Exception as error:
            self.failed.append(step)
            self.retry = True
            first_line = (str(error) or type(error).__name__).strip().splitlines()[0]
            logger.warning(
                "the background push of step %d to %s failed (retried at the next save): %s",
                step,
                self.config.hub_model_id,
                first_line,
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def wait(self, stop: _StopSignals | None = None) -> None:
        """Until the upload in flight ends; a stop signal (``stop``) interrupts the wait, not the upload."""
        while self.busy():
            if stop is not None:
                stop.raise_if_requested()
            self.thread.join(timeout=0.2)

    def close(self, timeout: float = 10.0) -> None:
        """Join the upload in flight for at most ``timeout`` seconds, then abandon it (see the class)."""
        if self.busy():
            self.thread.join(timeout=timeout)
        if self.busy():
            import atexit

            # the daemon thread will not reach its own clean-up if the process exits first
            atexit.register(shutil.rmtree, self.staging, ignore_errors=True)
            logger.warning(
                "a background push to %s was still running and was abandoned (the repository keeps its last "
                "complete push)",
                self.config.hub_model_id,
            )


def _learning_rate_schedule(config: TrainingConfig, optimizer: Any, start_step: int) -> Any:
    """The learning-rate schedule of ``config`` positioned at ``start_step``: the rate of step ``s`` is
    ``learning_rate · factor(s)`` whatever the checkpoint's options were, so a resumed run follows the
    schedule of its own ``--learning-rate``, ``--lr-scheduler`` and ``--max-train-steps`` (it is not part of
    the checkpoint: it has no state beyond the step)."""
    from diffusers.optimization import get_scheduler

    for group in optimizer.param_groups:
        group["initial_lr"] = config.learning_rate  # torch's base rate of a schedule that starts mid-way
    return get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps,
        last_epoch=start_step - 1,  # the constructor takes one step: the rate of step start_step
    )


def _plain_gradients(accelerator: Any) -> bool:
    """True when gradients are plain tensors that :func:`_clip_grad_norm` may clip itself (no FSDP, DeepSpeed or XLA,
    whose clipping accelerate delegates to them)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type not in (
        DistributedType.FSDP,
        DistributedType.DEEPSPEED,
        DistributedType.XLA,
    )


def _clip_grad_norm(
    accelerator: Any, parameters: list[torch.Tensor], max_norm: float, plain: bool
) -> torch.Tensor | None:
    """``accelerator.clip_grad_norm_(parameters, max_norm)``: the total gradient norm before clipping (None where
    unavailable). With ``plain`` gradients of one device and dtype, the same computation as torch's
    ``clip_grad_norm_`` (foreach norms, their norm, one foreach multiply by ``min(max_norm / (norm + 1e-6), 1)``),
    without its per-call grouping and wrappers, which cost as much again on the digits model (measured)."""
    import torch

    if plain:
        grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
        if grads and all(grad.device == grads[0].device and grad.dtype == grads[0].dtype for grad in grads):
            accelerator.unscale_gradients()  # fp16: the scaler's unscale (a no-op otherwise)
            with torch.no_grad():
                total_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
                factor = torch.clamp(float(max_norm) / (total_norm + 1e-6), max=1.0)
                # on CPU reading the factor is free (no device to wait for): a factor of exactly 1, the usual case
                # once training settles, would multiply every gradient by one, so that pass is skipped (same bits)
                if grads[0].device.type != "cpu" or factor.item() != 1.0:
                    torch._foreach_mul_(grads, factor)
            return total_norm
    norm = accelerator.clip_grad_norm_(parameters, max_norm)
    return norm if isinstance(norm, torch.Tensor) else None


def _ema_step(ema: Any, parameters: list[torch.Tensor], fused: bool) -> None:
    """``ema.step(parameters)`` (diffusers' ``EMAModel``); with ``fused`` (foreach, every parameter trainable, no
    DeepSpeed) in one ``torch._foreach_lerp_``: ``s + (1 - decay) (p - s)`` instead of its
    ``s - (1 - decay) (s - p)`` through a temporary copy of the weights (equal up to float rounding)."""
    import torch

    if not fused:
        ema.step(parameters)
        return
    ema.optimization_step += 1
    decay = ema.get_decay(ema.optimization_step)
    ema.cur_decay_value = decay
    with torch.no_grad():
        torch._foreach_lerp_(ema.shadow_params, parameters, 1 - decay)


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


def _cycle_stream(
    dataloader: Any, accelerator: Any, start_batch: int
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """:func:`_cycle_batches` for a streamed dataset (no length): epoch ``e`` is the stream shuffled by
    ``seed + e``; a resumed run reads (and drops) the batches before ``start_batch`` again."""
    micro_step, epoch = 0, 0
    while True:
        dataloader.set_epoch(epoch)
        if hasattr(dataloader.dataset, "set_epoch"):
            dataloader.dataset.set_epoch(epoch)
        batches = 0
        for batch in dataloader:
            batches += 1
            if micro_step >= start_batch:
                yield micro_step, batch
            micro_step += 1
        if batches == 0:
            raise ValueError(
                "the streamed dataset is smaller than one batch per process; lower --train-batch-size"
            )
        epoch += 1


def train(config: TrainingConfig) -> dict[str, Any]:
    """Train a DDPM as configured and save the EMA pipeline at the root of ``config.output_dir``.

    Returns a summary: ``{"global_step", "loss", "output_dir", "wall_time", "is_main_process"}`` (the loss is
    the mean of the last logging window, over all processes).

    Raises ``ValueError`` / ``FileNotFoundError`` before anything is written (bad options, data, output folder
    or checkpoint); :class:`TrainingDiverged` when the loss or the weights stop being finite; and
    :class:`TrainingInterrupted` after SIGINT / SIGTERM (single-process runs; a multi-process launcher
    handles signals itself). Signal handlers are restored on return.
    """
    config.validate()
    return run_loop(lambda stop: _TrainLoop(config, stop))


def run_loop(make_loop: Callable[[_StopSignals], _TrainLoop]) -> dict[str, Any]:
    """Run a :class:`_TrainLoop` (made by ``make_loop`` under the stop-signal handlers) through its phases."""
    with _StopSignals() as stop:
        loop = make_loop(stop)
        try:
            loop.setup()
            loop.restore()
            loop.start()
            loop.run()
            return loop.finish()
        except TrainingInterrupted as interrupt:
            raise loop.interrupted(interrupt.signal_number) from None
        finally:
            loop.close()


class _TrainLoop:
    """One call of :func:`train`, in phases (in the manner of improved-diffusion's ``TrainLoop``):

    - :meth:`setup`: accelerator, data, output-folder check, model, optimiser, data loader (nothing written);
    - :meth:`restore`: checks the checkpoint to resume from and loads it; the learning-rate schedule;
    - :meth:`start`: the first writes, now that the run is known to start (``--overwrite``'s deletion,
      ``training_config.json`` with the run id, ``metrics.jsonl`` cut at the resumed step);
    - :meth:`run`: :meth:`run_step` per micro-batch, then :meth:`log`, :meth:`checkpoint` and :meth:`sample`
      on their steps; :meth:`finish`: the final grid, save and push; :meth:`close`: always, last.
    """

    progress_name = "train"  # the progress bar's label
    #: :meth:`_evaluation_numbers` runs on every process (which then share the sampling); else on the main one
    shared_evaluation = True

    def __init__(self, config: TrainingConfig, stop: _StopSignals) -> None:
        self.config = config
        self.stop = stop
        self.started, self.started_cpu = time.perf_counter(), time.process_time()
        self.accelerator: Any = None
        self.bar: Any = None
        self.previous_threads: int | None = None
        self.wrote = False  # start() ran: the output folder holds this run
        self.phase = "training"
        self.last_loss = math.nan
        self.pusher: _BackgroundPush | None = None  # --hub-push-every: uploads of periodic saves
        # the evaluations' reference images and SampleQuality (feature network, reference features), made once
        self.evaluation_cache: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        import torch

        from .pipeline_ddpm import check_save_directory

        config = self.config
        try:
            self.output_dir = check_save_directory(config.output_dir)
        except ValueError as error:
            raise ValueError(f"--output-dir: {error}") from None
        if config.inception_weights is not None and config.evaluate:
            from .evaluation import find_inception_weights

            find_inception_weights(config.inception_weights)  # once per run: it hashes the 92 MB file
        for flag, folder in (
            ("--train-data-dir", config.train_data_dir),
            ("--dataset-name", config.dataset_name),
        ):
            data = Path(folder).resolve() if folder is not None and Path(folder).is_dir() else None
            if data is not None and (
                self.output_dir.resolve() == data or data in self.output_dir.resolve().parents
            ):
                raise ValueError(
                    f"--output-dir {config.output_dir!r} lies in {flag} {folder!r}: the run's sample grids would "
                    "become training images (and a new class); choose an output folder outside it"
                )
        self.accelerator = accelerator = _build_accelerator(config, self.output_dir)
        if accelerator.num_processes > 1:
            self.stop.release()  # the launcher signals every rank; ranks must not stop at different steps
        self.is_main = accelerator.is_main_process
        self.previous_threads = torch.get_num_threads()
        if accelerator.device.type == "cpu":
            keep_freed_memory()  # no page faults for every step's new activations (see cpu_memory.py)
            threads = config.cpu_threads
            if threads is None and "OMP_NUM_THREADS" not in os.environ and _sample_size(config) <= 16:
                threads = 1
            if threads is not None:
                torch.set_num_threads(threads)

        self.dataset = build_dataset(config)  # data first: a bad folder fails before any model is built
        self.num_classes = _num_classes(config, self.dataset)
        self.streaming = not hasattr(self.dataset, "__len__")
        if self.streaming:  # a stream's length is unknown: read as many rows as one batch per process needs
            need = config.train_batch_size * accelerator.num_processes
            if len(self.dataset.head(need)) < need:
                raise ValueError(
                    f"the streamed dataset has fewer than one batch per process ({config.train_batch_size} x "
                    f"{accelerator.num_processes}) of readable rows; lower --train-batch-size"
                )
        if not self.streaming and len(self.dataset) < config.train_batch_size * accelerator.num_processes:
            raise ValueError(
                f"the dataset has {len(self.dataset)} images, fewer than one batch per process "
                f"({config.train_batch_size} x {accelerator.num_processes}); lower --train-batch-size"
            )
        if self.is_main:  # finish or clean up a save of ours that was interrupted, before judging the folder
            from .pipeline_ddpm import repair_interrupted_save

            for line in repair_interrupted_save(self.output_dir):
                accelerator.print(f"{config.output_dir}: {line}")
        accelerator.wait_for_everyone()
        self.folder = _inspect_output_folder(self.output_dir)
        self.resume_path = _plan_output_folder(config, self.folder)
        self.stop.raise_if_requested()
        self._build_model()
        self._epochs_to_steps()
        self.stop.raise_if_requested()

    def _epochs_to_steps(self) -> None:
        """``num_epochs``, ``save_images_epochs`` and ``save_model_epochs`` (diffusers' options) in optimizer steps, now
        that the data loader's length is known: one epoch is ceil(batches per process / gradient_accumulation_steps)
        steps."""
        config = self.config
        if (
            config.num_epochs is None
            and config.save_images_epochs is None
            and config.save_model_epochs is None
        ):
            return
        steps_per_epoch = math.ceil(len(self.dataloader) / config.gradient_accumulation_steps)
        changes = {}
        if config.num_epochs is not None:
            changes["max_train_steps"] = config.num_epochs * steps_per_epoch
        if config.save_images_epochs is not None:
            changes["sample_every_steps"] = config.save_images_epochs * steps_per_epoch
        if config.save_model_epochs is not None:
            changes["save_model_steps"] = config.save_model_epochs * steps_per_epoch
        self.config = dataclasses.replace(config, **changes)
        self.accelerator.print(
            f"{steps_per_epoch} optimizer steps per epoch: "
            + ", ".join(f"{name} {value}" for name, value in changes.items())
        )

    def _build_model(self) -> None:
        import torch
        from accelerate.utils import set_seed
        from diffusers.training_utils import EMAModel

        config, accelerator = self.config, self.accelerator
        set_seed(config.seed)
        unet, self.scheduler = self._new_model()
        self.null_class_label = unet.null_class_label if self.num_classes is not None else None
        self._check_class_options()
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.ema = None
        if config.use_ema:
            self.ema = EMAModel(
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
        dataloader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=config.train_batch_size,
            shuffle=not self.streaming,  # a stream shuffles itself (a seeded buffer per epoch)
            drop_last=True,
            num_workers=config.dataloader_num_workers,
            worker_init_fn=_ignore_stop_signals if config.dataloader_num_workers > 0 else None,
            generator=None if self.streaming else torch.Generator().manual_seed(config.seed),
        )
        self.model, self.optimizer, self.dataloader = accelerator.prepare(unet, optimizer, dataloader)
        # listed once (the same tensors all run: checkpoints load into them): for clipping and the EMA every step
        self.parameters = list(self.model.parameters())
        self.unwrapped_parameters = list(accelerator.unwrap_model(self.model).parameters())
        self.plain_gradients = _plain_gradients(accelerator)
        self.fused_ema = (
            self.ema is not None
            and self.ema.foreach
            and self.plain_gradients
            and all(parameter.requires_grad for parameter in self.unwrapped_parameters)
        )
        # saved and restored with every checkpoint (_save_objects, _load_objects), in this order
        self.checkpointed_objects: list[Any] = []
        if self.ema is not None:
            self.ema.to(accelerator.device)
            self.checkpointed_objects.append(self.ema)
        self.progress = _Progress()
        self.checkpointed_objects.append(self.progress)
        self.run_record = self._run_record(unet)

    def _new_model(self) -> tuple[Any, Any]:
        """The U-Net to train (freshly initialised) and the noise scheduler (a hook: distillation loads a teacher)."""
        class_names = getattr(self.dataset, "class_names", None)
        unet = build_model(self.config, self.dataset.num_channels, self.num_classes, class_names)
        return unet, build_scheduler(self.config)

    def _check_class_options(self) -> None:
        """Label dropout and the sample grids' guidance need the U-Net's null class (and the guidance classes)."""
        config = self.config
        if config.guidance_scale != 1.0:
            if self.num_classes is None:
                raise ValueError(
                    f"guidance_scale={config.guidance_scale} needs a class-conditional model, but the training data "
                    "has no class labels; use guidance_scale=1.0"
                )
            if self.null_class_label is None or config.label_dropout == 0:
                raise ValueError(
                    f"guidance_scale={config.guidance_scale} needs a null class trained by label dropout "
                    "(label_dropout > 0 and a U-Net with use_null_class_embed); use guidance_scale=1.0"
                )
        if self.num_classes is not None and self.null_class_label is None and config.label_dropout > 0:
            raise ValueError("label_dropout > 0 needs a U-Net with a null class (use_null_class_embed=True)")

    def _run_record(self, unet: Any) -> dict[str, Any]:
        """What a checkpoint must share with this run to be resumed by it (without the run id and step)."""
        config = self.config
        model = {key: value for key, value in unet.config.items() if not key.startswith("_")}
        class_names = list(getattr(self.dataset, "class_names", None) or []) or None
        return {
            "dataset": {
                "images": None if self.streaming else len(self.dataset),
                "channels": self.dataset.num_channels,
                "resolution": _sample_size(config),
                "class_names": class_names,
            },
            "diffusion": {
                "num_train_timesteps": config.num_train_timesteps,
                "beta_schedule": config.beta_schedule,
                "prediction_type": config.prediction_type,
                "learned_variance": config.learned_variance,
            },
            "model": json.loads(json.dumps(model, default=list)),
            "use_ema": config.use_ema,
        }

    # ---------------------------------------------------------------------------------- restore
    def restore(self) -> None:
        """Resume from the planned checkpoint (checked first: run, data, model, step, files), else step 0."""
        config, accelerator = self.config, self.accelerator
        if self.resume_path is None:
            resumed_run = config.resume == "latest" and self.folder.holds_a_run and not config.overwrite
            self.run_id = self.folder.run_id if resumed_run and self.folder.run_id else uuid.uuid4().hex
            if config.resume == "latest":
                accelerator.print(f"no checkpoint in {config.output_dir}: starting from step 0")
        else:
            files = ["model.safetensors", "optimizer.bin", f"random_states_{accelerator.process_index}.pkl"]
            files += [_object_file_name(index) for index in range(len(self.checkpointed_objects))]
            saved = check_resume(
                self.resume_path, self.run_record, self.folder.run_id, config.max_train_steps, files
            )
            self.run_id = saved[RUN_ID_KEY]
            accelerator.print(f"resuming from {self.resume_path}")
            _load_objects(self.checkpointed_objects, self.resume_path)  # first: it refuses unsafe files
            try:
                with _without_objects(self.resume_path) as view:
                    accelerator.load_state(str(view))
            except Exception as error:
                raise ValueError(
                    f"cannot resume from {str(self.resume_path)!r}: loading it failed ({type(error).__name__}: "
                    f"{error})"
                ) from None
            if self.ema is not None:
                # accelerate loads registered objects' tensors onto the CPU: back to the model's device
                self.ema.to(accelerator.device)
        self.start_step = self.progress.global_step
        self.lr_scheduler = _learning_rate_schedule(config, self.optimizer, self.start_step)
        self.stop.raise_if_requested()

    def resume_command(self, **changes: Any) -> str:
        """The command line that continues this run (see :func:`resume_command`)."""
        return resume_command(self.config, **changes)

    # ------------------------------------------------------------------------------------ start
    def start(self) -> None:
        """The first writes: only now is the run known to start."""
        from .pipeline_ddpm import TRAINING_CONFIG_NAME

        config, accelerator = self.config, self.accelerator
        accelerator.wait_for_everyone()  # every process checked the folder before the main process changes it
        if self.is_main:
            if config.overwrite:
                _remove_run(self.folder)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            _clean_stale_folders(self.output_dir)
            record = {**config.to_dict(), RUN_ID_KEY: self.run_id}
            _atomic_write_text(self.output_dir / TRAINING_CONFIG_NAME, json.dumps(record, indent=2) + "\n")
            _truncate_metrics(self.output_dir / METRICS_NAME, self.start_step)
        self.wrote = True
        accelerator.wait_for_everyone()
        if config.report_to != "none":
            accelerator.init_trackers(_TRACKER_PROJECT, config=config.to_dict())
        if config.push_to_hub and config.hub_push_every and self.is_main:
            self.pusher = _BackgroundPush(config)

    # -------------------------------------------------------------------------------------- run
    def run(self) -> None:
        from tqdm.auto import tqdm

        config, accelerator = self.config, self.accelerator
        self.step_seeds = _StepSeeds(config.seed, accelerator.process_index, accelerator.device)
        self.loss_options = {
            "null_class_label": self.null_class_label,
            "label_dropout": config.label_dropout,
            "loss_weighting": config.loss_weighting,
            "snr_gamma": config.snr_gamma,
            "learned_variance": config.learned_variance,
            "vlb_weight": config.vlb_weight,
        }
        self.window = _LossWindow(accelerator.device)
        self.window_start, self.window_step = time.perf_counter(), self.start_step
        self.bar = tqdm(
            total=config.max_train_steps,
            initial=self.start_step,
            desc=self.progress_name,
            disable=not accelerator.is_local_main_process,
            dynamic_ncols=True,
        )
        self.model.train()
        cycle = _cycle_stream if self.streaming else _cycle_batches
        batches = cycle(self.dataloader, accelerator, self.start_step * config.gradient_accumulation_steps)
        while self.progress.global_step < config.max_train_steps:
            self.stop.raise_if_requested()
            micro_step, batch = next(batches)
            if not self.run_step(micro_step, batch):
                continue
            step = self.progress.global_step
            self.bar.update(1)
            if step % config.logging_steps == 0 or step == config.max_train_steps:
                self.log(step)
            # every N steps and at the last one, so that an interrupt in the final grid or save loses no training
            if config.checkpointing_steps and (
                step % config.checkpointing_steps == 0 or step == config.max_train_steps
            ):
                self.checkpoint(step)
            if (
                config.sample_every_steps
                and step % config.sample_every_steps == 0
                and step < config.max_train_steps
            ):
                self.sample(step)
            if (
                config.eval_every_steps
                and step % config.eval_every_steps == 0
                and step < config.max_train_steps
            ):
                self.evaluate(step)
            if (
                config.save_model_steps
                and step % config.save_model_steps == 0
                and step < config.max_train_steps
            ):
                self.save_model(step)
        self.bar.close()

    def run_step(self, micro_step: int, batch: dict[str, torch.Tensor]) -> bool:
        """Forward, backward and (when the accumulation is complete) an optimizer step; True after the latter."""
        config, accelerator = self.config, self.accelerator
        if config.debug_record:
            self._record_indices(micro_step, batch)
        class_labels = batch["class_labels"] if self.num_classes is not None else None
        with accelerator.accumulate(self.model):
            terms = self.loss(micro_step, batch, class_labels)
            accelerator.backward(terms.loss)
            if (
                accelerator.sync_gradients
            ):  # the norm before clipping, logged (max_grad_norm 0: measured only)
                norm = _clip_grad_norm(
                    accelerator, self.parameters, config.max_grad_norm or math.inf, self.plain_gradients
                )
                self.window.add_grad_norm(norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.window.add(terms)
        if not accelerator.sync_gradients:
            return False
        # fp16's gradient scaler already synchronised to decide whether to skip: reading it costs nothing more
        self.window.end_step(
            skipped=config.mixed_precision == "fp16" and accelerator.optimizer_step_was_skipped
        )
        self.lr_scheduler.step()
        if self.ema is not None:
            _ema_step(self.ema, self.unwrapped_parameters, self.fused_ema)
        self.progress.global_step += 1
        return True

    def loss(
        self, micro_step: int, batch: dict[str, torch.Tensor], class_labels: torch.Tensor | None
    ) -> LossTerms:
        """The loss terms of one micro-batch (a hook: distillation has its own objective)."""
        return training_loss(
            self.model,
            self.scheduler,
            batch["pixel_values"],
            generator=self.step_seeds(micro_step),
            class_labels=class_labels,
            **self.loss_options,
        )

    # ------------------------------------------------------------------------------------- log
    def log(self, step: int) -> None:
        """Mean loss terms of the window, learning rate and speed: to metrics.jsonl, the trackers and the bar;
        a non-finite loss stops the run (checked here, where the loss is read anyway)."""
        config, accelerator = self.config, self.accelerator
        means = self.window.means(accelerator)  # the one host sync per logging step
        loss, now = means["loss"], time.perf_counter()
        record = {"step": step, "loss": loss, "mse": means["mse"]}
        if config.learned_variance:
            record["vb"] = means["vb"]
        if means["grad_norm"] is not None:
            record["grad_norm"] = means["grad_norm"]
        quartiles = {name: value for name, value in means.items() if name.startswith("loss_q")}
        if any(value is not None for value in quartiles.values()):
            record.update(quartiles)
        record.update(
            lr=self.lr_scheduler.get_last_lr()[0],
            images_per_second=(step - self.window_step)
            * config.train_batch_size
            * config.gradient_accumulation_steps
            * accelerator.num_processes
            / max(now - self.window_start, 1e-9),
            wall_time=now - self.started,
            cpu_time=time.process_time() - self.started_cpu,
        )
        if self.ema is not None:
            record["ema_decay"] = self.ema.cur_decay_value
        if self.is_main:
            _append_json_line(self.output_dir / METRICS_NAME, record)
        finite = loss is None or math.isfinite(loss)  # None: the scaler skipped every step of the window
        if not finite:
            first = self.window_step + 1
            raise self.diverged(
                step, f"the training loss became {loss} by step {step} (mean of steps {first}-{step})"
            )
        if loss is not None:
            self.last_loss = loss
            accelerator.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=step)
            self.bar.set_postfix(
                loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{record['images_per_second']:.0f}"
            )
        self.window.reset()
        self.window_start, self.window_step = time.perf_counter(), step

    # ------------------------------------------------------------------------------ checkpoint
    def checkpoint(self, step: int) -> None:
        """A resumable checkpoint, only of finite weights (so the newest checkpoint is always a good one)."""
        self.check_finite(step)
        record = {RUN_ID_KEY: self.run_id, "step": step, **self.run_record}
        _save_checkpoint(
            self.accelerator,
            self.output_dir,
            step,
            self.config.checkpoints_total_limit,
            record,
            self.checkpointed_objects,
        )

    def check_finite(self, step: int) -> None:
        """Raise :class:`TrainingDiverged` unless the weights (and EMA weights) and the loss terms since the last
        log are finite on every process (one host sync: called at checkpoints and before the final save)."""
        import torch

        accelerator = self.accelerator
        tensors = list(accelerator.unwrap_model(self.model).parameters())
        tensors += list(self.ema.shadow_params) if self.ema is not None else []
        finite = torch.stack([tensor.detach().isfinite().all() for tensor in tensors])
        finite = finite.all() & self.window.sums.isfinite().all() & self.window.pending.isfinite().all()
        if accelerator.reduce((~finite).float(), reduction="sum").item() > 0:
            raise self.diverged(
                step, f"the weights or the training loss were no longer finite at step {step}"
            )

    def diverged(self, step: int, what: str) -> TrainingDiverged:
        lower = f"{self.config.learning_rate / 2:g}"
        checkpoints = list_checkpoints(self.output_dir)
        kept = (
            f"kept the last good checkpoint {Path(self.config.output_dir) / checkpoints[-1].name}"
            if checkpoints
            else "no checkpoint was written before it, so a resumed run starts from step 0"
        )
        command = self.resume_command(learning_rate=float(lower))
        return TrainingDiverged(
            f"{what}; stopped without saving the model; {kept}. Resume with a lower learning rate: {command}",
            is_main_process=self.is_main,
        )

    # ---------------------------------------------------------------------------------- sample
    def sample(self, step: int) -> None:
        """An intermediate grid ``samples/step-<step>.png`` (interruptible after any denoising step)."""
        from .data import save_png

        grid = self.sample_grid(_ema_unet(self.accelerator, self.model, self.ema))
        self.stop.raise_if_requested()  # an unfinished grid is not written
        if self.is_main:
            save_png(grid, self.output_dir / SAMPLES_FOLDER / f"step-{step:07d}.png")
            log_image_to_trackers(self.accelerator, "samples", grid, step)
        self.accelerator.wait_for_everyone()

    def sample_grid(self, unet: Any) -> Any:
        """(Every process.) The sample grid of the EMA ``unet``, each process drawing its share."""
        return sample_grid(
            unet,
            self.scheduler,
            self.config,
            self.num_classes,
            self.accelerator.device,
            self.stop.requested,
            self.accelerator,
        )

    def save_model(self, step: int) -> None:
        """A periodic save of the EMA pipeline into the output folder, as the final save writes it (atomically: an
        interrupted save leaves the previous one); the final save replaces it."""
        from .pipeline_ddpm import DDPMPipeline

        if self.is_main:
            self.phase = f"the save of step {step}"
            pipeline = DDPMPipeline(
                unet=_ema_unet(self.accelerator, self.model, self.ema), scheduler=self.scheduler
            )
            shared = shareable_config(self.config, self.run_id)
            pipeline.save_pretrained(str(self.output_dir), training_config=shared, overwrite=True)
            pushing = self.pusher is not None and self.pusher.offer(pipeline, step, shared)
            pushed = f"; pushing it to {self.config.hub_model_id} in the background" if pushing else ""
            self.bar.write(f"step {step}: saved the EMA pipeline to {self.output_dir}{pushed}")
            self.phase = "training"
        self.accelerator.wait_for_everyone()

    # -------------------------------------------------------------------------------- evaluate
    def evaluate(self, step: int, unet: Any = None) -> dict[str, float]:
        """The EMA model's bits/dim estimate on held-out data and, on the digits, its digits FD: logged to
        metrics.jsonl, the trackers and the bar; interruptible after any denoising step. ``unet``: the EMA U-Net
        when the caller has made it already (the final evaluation). Every process draws its share of the samples
        (:attr:`shared_evaluation`); the numbers are the main process's."""
        numbers: dict[str, float] = {}
        if self.is_main or self.shared_evaluation:
            numbers = self._evaluation_numbers(
                unet if unet is not None else _ema_unet(self.accelerator, self.model, self.ema), step
            )
            self.stop.raise_if_requested()  # an unfinished evaluation is not logged
        if self.is_main:
            _append_json_line(self.output_dir / METRICS_NAME, {"step": step, **numbers})
            self.accelerator.log(numbers, step=step)
            shown = ", ".join(
                f"{name} {value:.3f}" for name, value in numbers.items() if not name.endswith("_stderr")
            )
            self.bar.write(f"step {step}: {shown}")
        self.accelerator.wait_for_everyone()
        return numbers

    def _evaluation_numbers(self, unet: Any, step: int) -> dict[str, float]:
        """What :meth:`evaluate` measures of the EMA ``unet`` (a hook: see :func:`evaluate_during_training`)."""
        return evaluate_during_training(
            unet,
            self.scheduler,
            self.config,
            self.dataset,
            self.num_classes,
            self.accelerator.device,
            self.stop.requested,
            self.accelerator,
            self.evaluation_cache,
        )

    def _evaluation_for_card(self, numbers: dict[str, float]) -> dict[str, str]:
        """The final evaluation as model-card rows (a hook, like :meth:`_evaluation_numbers`)."""
        return _evaluation_for_card(self.config, numbers)

    # ---------------------------------------------------------------------------------- finish
    def finish(self) -> dict[str, Any]:
        """Check the final weights, sample the final grid, save the pipeline (and push it)."""
        from .pipeline_ddpm import DDPMPipeline

        config, accelerator = self.config, self.accelerator
        step = self.progress.global_step
        if config.debug_record:
            self._record_checksums()
        self.check_finite(step)
        accelerator.wait_for_everyone()
        # one copy of the EMA weights serves the final evaluation, the grid and the save
        final_unet = _ema_unet(accelerator, self.model, self.ema)  # every process samples its share
        evaluation = None
        if config.evaluate:
            self.phase = "the final evaluation"
            evaluation = self.evaluate(step, final_unet)
        self.stop.raise_if_requested()
        self.phase = "the final sample grid"
        accelerator.print(f"sampling the final grid ({config.num_inference_steps} denoising steps)")
        try:
            grid = self.sample_grid(final_unet)
        except FloatingPointError as error:  # finite weights, non-finite samples: keep the model anyway
            if self.is_main:
                logger.warning("the final sample grid was not saved: %s", error)
            grid = None
        if self.is_main:
            self.stop.raise_if_requested()
            if grid is not None:
                log_image_to_trackers(accelerator, "samples", grid, step)
            for tracker in accelerator.trackers:  # flush and close the logs before the save
                tracker.finish()
            self.phase = "the save"
            pipeline = DDPMPipeline(unet=final_unet, scheduler=self.scheduler)
            shared = shareable_config(config, self.run_id)
            card_numbers = self._evaluation_for_card(evaluation) if evaluation else None
            # overwrite=True: this run's own training_config.json is not in a save manifest yet, and the folder was
            # checked before training for files at our names that ddpm-components did not write
            pipeline.save_pretrained(
                str(self.output_dir),
                training_config=shared,
                sample_grid=grid,
                evaluation=card_numbers,
                overwrite=True,
            )
            if config.push_to_hub:
                self.phase = "the push"
                self.stop.raise_if_requested()
                if self.pusher is not None:  # the final push lands last
                    self.pusher.wait(self.stop)
                url = pipeline.push_to_hub(
                    config.hub_model_id,
                    private=config.hub_private,
                    training_config=shared,
                    sample_grid=grid,
                    evaluation=card_numbers,
                )
                accelerator.print(f"pushed to {url}")
        accelerator.wait_for_everyone()
        return {
            "global_step": step,
            "loss": self.last_loss,
            "output_dir": str(config.output_dir),
            "wall_time": time.perf_counter() - self.started,
            "is_main_process": self.is_main,
            "evaluation": evaluation,
        }

    def close(self) -> None:
        """Always, last: release accelerate's process-wide state and the thread setting."""
        import torch

        if self.bar is not None:
            self.bar.close()
        if self.pusher is not None:  # after a stop signal, do not keep the user waiting for an upload
            self.pusher.close(timeout=1.0 if self.stop.requested() else 10.0)
        if self.accelerator is not None:
            self.accelerator.end_training()
            if self.accelerator.num_processes == 1:
                # accelerate keeps the first Accelerator's mixed precision in a process-wide singleton and refuses a
                # different one later. It has no public way to forget it (its own test utilities call this private
                # reset too), and without it train() could not run twice in a process (a notebook, tests).
                from accelerate.state import AcceleratorState

                AcceleratorState._reset_state()
        if self.previous_threads is not None:
            torch.set_num_threads(self.previous_threads)

    def interrupted(self, signal_number: int) -> TrainingInterrupted:
        """The one-line report of an interrupt: what is kept and the command that resumes."""
        name = signal.Signals(signal_number).name
        if not self.wrote:
            message = f"interrupted by {name} before training started; nothing was written to {self.config.output_dir}"
            return TrainingInterrupted(signal_number, message)
        step = self.progress.global_step
        if self.phase == "the push":
            folder, repo_id = str(self.config.output_dir), str(self.config.hub_model_id)
            push = shlex.join(["ddpm-components", "push", "--model", folder, "--repo-id", repo_id])
            message = f"interrupted by {name} before the push to the Hub; the model is saved in {folder}; push it with: {push}"
            return TrainingInterrupted(signal_number, message)
        checkpoints = list_checkpoints(self.output_dir)
        kept = (
            f"kept {Path(self.config.output_dir) / checkpoints[-1].name}"
            if checkpoints
            else "no checkpoint yet, so a resumed run starts from step 0"
        )
        when = f"during {self.phase} after step {step}" if self.phase != "training" else f"at step {step}"
        message = (
            f"interrupted by {name} {when}; the model was not saved and no checkpoint was written now; {kept}. "
            f"Resume with: {self.resume_command()}"
        )
        return TrainingInterrupted(signal_number, message)

    # ----------------------------------------------------------------------------------- debug
    def _record_indices(self, micro_step: int, batch: dict[str, torch.Tensor]) -> None:
        """``--debug-record``: every rank's sample indices of this micro-batch, appended to a log."""
        accelerator = self.accelerator
        indices = accelerator.gather(batch["index"].to(accelerator.device).reshape(1, -1))
        if self.is_main:
            (self.output_dir / DEBUG_FOLDER).mkdir(exist_ok=True)
            record = {"micro_step": micro_step, "indices": indices.tolist()}
            _append_json_line(self.output_dir / DEBUG_FOLDER / _DEBUG_FILES[0], record)

    def _record_checksums(self) -> None:
        """``--debug-record``: every rank's final parameter sums (they must agree)."""
        import torch

        accelerator = self.accelerator
        parameters = accelerator.unwrap_model(self.model).parameters()
        sums = torch.stack([parameter.detach().double().sum() for parameter in parameters])
        gathered = accelerator.gather(sums.reshape(1, -1))
        if self.is_main:
            (self.output_dir / DEBUG_FOLDER).mkdir(exist_ok=True)
            _atomic_write_text(
                self.output_dir / DEBUG_FOLDER / _DEBUG_FILES[1], json.dumps(gathered.tolist())
            )


def shareable_config(config: TrainingConfig, run_id: str | None = None) -> dict[str, Any]:
    """The training configuration as saved with the model and pushed to the Hub: local paths are reduced to
    their last component (the Hub need not learn the user's folder layout), plus the run id."""
    values = config.to_dict()
    for name in ("output_dir", "train_data_dir", "resume", "cache_dir", "logging_dir"):
        if values[name] is not None and values[name] != "latest":
            values[name] = Path(values[name]).name
    for name in ("dataset_name", "model_config_name_or_path"):  # a Hub id stays whole, a local path does not
        if values[name] is not None and os.path.exists(values[name]):
            values[name] = Path(values[name]).name
    if run_id is not None:
        values[RUN_ID_KEY] = run_id
    return values


def _ema_unet(accelerator: Any, model: torch.nn.Module, ema: Any) -> Any:
    """A fresh copy of the U-Net carrying the EMA weights (the trained weights without EMA), in eval mode."""
    import copy

    unet = copy.deepcopy(accelerator.unwrap_model(model, keep_torch_compile=False))
    if ema is not None:
        ema.copy_to(unet.parameters())
    unet.eval()
    return unet
