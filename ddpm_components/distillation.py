"""Progressive distillation (Salimans & Ho, ICLR 2022, arXiv 2202.00512): fewer sampling steps, round by round.

``ddpm-components distill --model M --output-dir D`` turns a trained pipeline (the teacher) into one that samples
in ``--target-steps`` deterministic DDIM (η = 0) steps. Each round trains a student to match **two** DDIM steps of
its teacher with **one** of its own, then the student (its EMA weights) becomes the next round's teacher:
``teacher_steps → teacher_steps/2 → … → target_steps``.

The discrete schedule is the teacher's: α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t) at the kept timesteps of a
*trailing* grid of N = ``teacher_steps`` points, ``t_i = round(i·T/N) − 1`` (i = 1 … N), plus the clean end point
i = 0 (α = 1, σ = 0). A round with N teacher points keeps every second one for the student, so the target grid
(``T`` divisible by ``target_steps``) is diffusers' ``timestep_spacing="trailing"`` exactly (4 steps of T = 1000:
999, 749, 499, 249, then x_0).

The target (paper Eq. 8 / Algorithm 2): for a student step from t to t'' over the teacher steps t → t' → t'',

    x̃ = (z_{t''} − (σ_{t''}/σ_t) z_t) / (α_{t''} − (σ_{t''}/σ_t) α_t),

the x_0 for which one DDIM step from z_t lands exactly where the teacher's two steps land; the student predicts
v (``prediction_type="v_prediction"``), so its target is ṽ = (α_t z_t − x̃)/σ_t. The loss is the mean squared
error in v, which is the paper's "SNR+1" weighting of the x-loss (σ²‖v̂−ṽ‖² = ‖x̂−x̃‖², and (SNR+1)σ² = 1);
``loss_weighting="truncated_snr"`` uses max(SNR, 1) on the x-loss instead, i.e. max(α², σ²) on the v-loss.

The ε → v bridge: our teachers predict ε, which cannot give x_0 = (z − σ ε)/α at the highest noise level of a
4-step chain (α_999 ≈ 0.006). The teacher keeps its own parametrisation (its ε is turned into x̂_0 and ε̂ for its
DDIM steps: nothing is lost at the 2N-step level it was trained for), and the student of the first round starts
from the teacher's weights with its output read as v. At low noise v ≈ ε (α ≈ 1), so the start is already right
there; the first round also learns the high-noise end. ``bridge_steps > 0`` adds a round before the first halving
in which the student matches one teacher step with one step (a pure ε → v conversion at the teacher's step count).

Everything else is the trainer's (:class:`~ddpm_components.training._TrainLoop`): accelerate, EMA, checkpoints and
``--resume``, signals, ``metrics.jsonl``, evaluations, the atomic save of the final EMA pipeline. The teacher's
weights are part of every checkpoint, so a run resumes in any round.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .training import (
    LossTerms,
    MixedPrecision,
    TrainingConfig,
    _evaluation_samples,
    _learning_rate_schedule,
    _TrainLoop,
    command_line,
    run_loop,
)

if TYPE_CHECKING:
    import torch

DistillationWeighting = Literal["snr_plus_one", "truncated_snr"]
DistillationLRScheduler = Literal["constant", "linear", "cosine"]
#: prediction types a teacher may have (learned variance is not supported)
TEACHER_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DEFAULT_TEACHER_STEPS = 256


@dataclass
class DistillationConfig:
    """Every option of :func:`distill`; field ``name`` is the flag ``--name-with-dashes`` of ``ddpm-components distill``.

    The defaults distil a main-job model (T = 1000, 8×8 digits) from 256 to 4 steps in 6 rounds of 300 optimizer steps
    at batch 128 (see docs/distillation.md for the measured cost).
    """

    model: str = field(
        default="",
        metadata={
            "required": True,
            "help": "the teacher: a folder saved by `ddpm-components train` (or save_pretrained)",
        },
    )
    output_dir: str = field(
        default="",
        metadata={
            "required": True,
            "help": "folder for the distilled pipeline, checkpoints, metrics and samples (the rules of train's)",
        },
    )
    target_steps: int = field(
        default=4, metadata={"help": "sampling steps of the distilled model (a power of two)"}
    )
    teacher_steps: int | None = field(
        default=None,
        metadata={
            "help": "DDIM steps of the teacher in the first round, a power of two (default: 256, or the largest power "
            "of two up to the teacher's T when T < 256)"
        },
    )
    steps_per_round: int = field(default=300, metadata={"help": "optimizer steps per halving round"})
    bridge_steps: int = field(
        default=0,
        metadata={
            "help": "optimizer steps of an extra first round that only converts the teacher to v-prediction "
            "(one student step per teacher step; 0: none, the first halving round converts too)"
        },
    )
    loss_weighting: DistillationWeighting = field(
        default="snr_plus_one",
        metadata={"help": "'snr_plus_one': MSE in v; 'truncated_snr': max(SNR, 1) on the x_0 error"},
    )
    train_data_dir: str | None = field(
        default=None,
        metadata={
            "help": "the images x_0 (default: the teacher's training data: the embedded digits; a teacher trained on "
            "a folder needs that folder here)"
        },
    )
    train_batch_size: int = field(default=128, metadata={"help": "images per batch on each process"})
    learning_rate: float = field(default=3e-4, metadata={"help": "peak AdamW learning rate of each round"})
    lr_scheduler: DistillationLRScheduler = field(
        default="linear", metadata={"help": "learning-rate schedule within each round (after the warm-up)"}
    )
    lr_warmup_steps: int = field(
        default=0, metadata={"help": "linear warm-up steps at the start of each round"}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient-norm clipping threshold (0: none)"})
    use_ema: bool = field(
        default=True,
        metadata={"help": "keep an EMA of the student (restarted each round); it becomes the next teacher"},
    )
    ema_max_decay: float = field(default=0.9999, metadata={"help": "maximum EMA decay"})
    mixed_precision: MixedPrecision = field(default="no", metadata={"help": "mixed precision"})
    cpu_threads: int | None = field(
        default=None, metadata={"help": "torch threads on CPU (default: as train chooses them)"}
    )
    seed: int = field(default=0, metadata={"help": "random seed (data order, noise, timesteps)"})
    checkpointing_steps: int = field(
        default=300, metadata={"help": "save a resumable checkpoint every N optimizer steps (0: never)"}
    )
    checkpoints_total_limit: int | None = field(
        default=2, metadata={"help": "keep only the newest K checkpoints (0 or 'none': all)"}
    )
    resume: str | None = field(
        default=None,
        metadata={
            "help": "resume from a checkpoint folder of this run, or 'latest' (none yet: start afresh)"
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "start afresh in an --output-dir that holds another run (deletes its files)"},
    )
    logging_steps: int = field(default=10, metadata={"help": "log the loss every N optimizer steps"})
    evaluate: bool = field(
        default=True,
        metadata={
            "help": "evaluate the final model: on 8x8 digits the digits FD of --eval-num-samples samples at its step "
            "count (logged to metrics.jsonl and the model card)"
        },
    )
    eval_every_steps: int = field(
        default=0,
        metadata={
            "help": "also evaluate every N optimizer steps, at the current round's step count (0: only at the end)"
        },
    )
    eval_num_samples: int = field(
        default=200, metadata={"help": "samples for the digits FD of an evaluation"}
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """``ValueError`` for options that are wrong on their own (the teacher is checked by :func:`load_teacher`)."""
        from .training import _check_options_of

        _check_options_of(self)
        if not self.model:
            raise ValueError("--model is required: the folder of the teacher pipeline")
        if not self.output_dir:
            raise ValueError("--output-dir is required")
        if not _is_power_of_two(self.target_steps):
            raise ValueError(
                f"--target-steps must be a power of two (1, 2, 4, 8, ...), got {self.target_steps}"
            )
        if self.teacher_steps is not None:
            if not _is_power_of_two(self.teacher_steps):
                raise ValueError(
                    f"--teacher-steps must be a power of two (e.g. 256), got {self.teacher_steps}"
                )
            if self.teacher_steps <= self.target_steps:
                raise ValueError(
                    f"--target-steps ({self.target_steps}) must be below --teacher-steps ({self.teacher_steps}): "
                    "each round halves the steps"
                )
        for name in ("steps_per_round", "train_batch_size", "logging_steps", "eval_num_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("bridge_steps", "lr_warmup_steps", "checkpointing_steps", "eval_every_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be zero or positive, got {getattr(self, name)}")
        if self.eval_num_samples < 2:
            raise ValueError(
                f"eval_num_samples must be at least 2 (a Fréchet distance), got {self.eval_num_samples}"
            )
        if self.resume is not None and self.overwrite:
            raise ValueError("resume and overwrite exclude each other")


def _is_power_of_two(value: int) -> bool:
    return isinstance(value, int) and value >= 1 and value & (value - 1) == 0


# ------------------------------------------------------------------------------------------- the maths
def trailing_grid(num_train_timesteps: int, num_steps: int) -> list[int]:
    """The ``num_steps`` timesteps ``round(i·T/N) − 1`` for i = N … 1 (descending; diffusers' ``trailing``)."""
    return [round(i * num_train_timesteps / num_steps) - 1 for i in range(num_steps, 0, -1)]


class Grid:
    """α, σ and t of a trailing grid of ``num_steps`` points, indexed 0 (clean: α = 1, σ = 0) … N (noisiest).

    ``alphas_cumprod``: the teacher scheduler's ᾱ_t (float64 preferred)."""

    def __init__(self, alphas_cumprod: torch.Tensor, num_steps: int) -> None:
        import torch

        alphas_cumprod = alphas_cumprod.double().cpu()
        timesteps = trailing_grid(len(alphas_cumprod), num_steps)[
            ::-1
        ]  # ascending: index i ↔ timesteps[i - 1]
        if len(set(timesteps)) != num_steps or timesteps[0] < 0:
            raise ValueError(f"{num_steps} steps do not fit in T = {len(alphas_cumprod)} timesteps")
        bar = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[timesteps]])
        self.num_steps = num_steps
        self.timesteps = torch.tensor([-1, *timesteps], dtype=torch.long)  # -1: the clean end point
        self.alphas = bar.sqrt()
        self.sigmas = (1.0 - bar).sqrt()

    def at(self, index: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """α and σ at grid ``index`` (one per batch element), shaped to broadcast against ``like``."""
        shape = (-1,) + (1,) * (like.ndim - 1)
        index = index.cpu()
        return (
            self.alphas[index].to(like.device, like.dtype).reshape(shape),
            self.sigmas[index].to(like.device, like.dtype).reshape(shape),
        )


def x0_and_eps(
    output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂_0, ε̂) from a model ``output`` of ``prediction_type`` at z_t = α x_0 + σ ε."""
    if prediction_type == "epsilon":
        return (sample - sigma * output) / alpha, output
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * output, sigma * sample + alpha * output
    if prediction_type == "sample":
        return output, (sample - alpha * output) / sigma
    raise ValueError(f"prediction_type must be one of {TEACHER_PREDICTION_TYPES}, got {prediction_type!r}")


def ddim_chain(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sample: torch.Tensor,
    grid: Grid,
    start: torch.Tensor,
    num_steps: int,
    prediction_type: str,
) -> torch.Tensor:
    """``num_steps`` deterministic DDIM steps (η = 0) on ``grid`` from index ``start`` (one per batch element)
    down to ``start − num_steps``: z ← α' x̂_0 + σ' ε̂. ``model(z, timesteps)`` returns the prediction."""
    for offset in range(num_steps):
        index = start - offset
        alpha, sigma = grid.at(index, sample)
        output = model(sample, grid.timesteps[index.cpu()].to(sample.device)).to(sample.dtype)
        x0, eps = x0_and_eps(output, sample, alpha, sigma, prediction_type)
        alpha_next, sigma_next = grid.at(index - 1, sample)
        sample = alpha_next * x0 + sigma_next * eps
    return sample


def distillation_target(
    sample: torch.Tensor,
    end: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    alpha_end: torch.Tensor,
    sigma_end: torch.Tensor,
) -> torch.Tensor:
    """x̃ = (z_{t''} − (σ_{t''}/σ_t) z_t) / (α_{t''} − (σ_{t''}/σ_t) α_t): the x_0 whose DDIM step from ``sample`` = z_t
    lands on ``end`` = z_{t''} (Salimans & Ho 2022, Algorithm 2)."""
    ratio = sigma_end / sigma
    return (end - ratio * sample) / (alpha_end - ratio * alpha)


def v_from_x0(
    x0: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """v = α ε − σ x_0 expressed through x_0 and z_t: (α z_t − x_0)/σ."""
    return (alpha * sample - x0) / sigma


def student_targets(
    teacher: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    teacher_prediction_type: str,
    teacher_grid: Grid,
    student_grid: Grid,
    sample: torch.Tensor,
    student_index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̃, ṽ): the targets of a student on ``student_grid`` at ``sample`` = z_t, t = student grid point
    ``student_index``, from the teacher's DDIM steps over the same interval (2 steps when the teacher's grid has
    twice the points, 1 for the ε → v bridge)."""
    import torch

    ratio = teacher_grid.num_steps // student_grid.num_steps
    with torch.no_grad():
        end = ddim_chain(teacher, sample, teacher_grid, student_index * ratio, ratio, teacher_prediction_type)
    alpha, sigma = student_grid.at(student_index, sample)
    alpha_end, sigma_end = student_grid.at(student_index - 1, sample)
    x_target = distillation_target(sample, end, alpha, sigma, alpha_end, sigma_end)
    return x_target, v_from_x0(x_target, sample, alpha, sigma)


@dataclass(frozen=True)
class Round:
    """One round: the teacher's and the student's step counts, the teacher's prediction type, its length."""

    teacher_steps: int
    student_steps: int
    teacher_prediction_type: str
    num_optimizer_steps: int


def plan_rounds(config: DistillationConfig, teacher_steps: int, teacher_prediction_type: str) -> list[Round]:
    """The rounds: an optional bridge (N → N), then halvings N → N/2 → … → ``target_steps``."""
    rounds = []
    steps, prediction = teacher_steps, teacher_prediction_type
    if config.bridge_steps:
        rounds.append(Round(steps, steps, prediction, config.bridge_steps))
        prediction = "v_prediction"
    while steps > config.target_steps:
        rounds.append(Round(steps, steps // 2, prediction, config.steps_per_round))
        steps, prediction = steps // 2, "v_prediction"
    return rounds


@dataclass
class Teacher:
    """The checked teacher: its pipeline, prediction type, ᾱ (float64) and T."""

    pipeline: Any
    prediction_type: str
    alphas_cumprod: Any
    num_train_timesteps: int
    teacher_steps: int
    training_config: dict[str, Any] | None


def default_teacher_steps(num_train_timesteps: int) -> int:
    """256, or the largest power of two up to T when T < 256."""
    return min(DEFAULT_TEACHER_STEPS, 1 << (num_train_timesteps.bit_length() - 1))


def load_teacher(config: DistillationConfig) -> Teacher:
    """Load and check the teacher of ``config`` (``ValueError`` / ``FileNotFoundError`` in one line)."""
    from .pipeline_ddpm import TRAINING_CONFIG_NAME, DDPMPipeline

    folder = Path(config.model)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"--model {config.model!r} is not a folder (a pipeline saved by `ddpm-components train`)"
        )
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"--model {config.model!r} has no model_index.json: it is not a saved pipeline")
    if Path(config.output_dir).resolve() == folder.resolve():
        raise ValueError("--output-dir must differ from --model (the teacher would be overwritten)")
    try:
        pipeline = DDPMPipeline.from_pretrained(str(folder))
    except (ValueError, OSError, KeyError, TypeError) as error:
        raise ValueError(
            f"--model {config.model!r} does not load as a ddpm-components pipeline: {error}"
        ) from None
    scheduler, unet = pipeline.scheduler, pipeline.unet
    scheduler_config = scheduler.config
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    if prediction_type not in TEACHER_PREDICTION_TYPES:
        raise ValueError(
            f"--model's prediction_type {prediction_type!r} is not one of {TEACHER_PREDICTION_TYPES}"
        )
    variance = str(scheduler_config.get("variance_type", "fixed_small"))
    if variance.startswith("learned") or unet.config.out_channels != unet.config.in_channels:
        raise ValueError(
            "--model has a learned variance (2x output channels): distillation supports fixed-variance models"
        )
    alphas_cumprod = getattr(scheduler, "_alphas_cumprod64", None)
    if alphas_cumprod is None:
        alphas_cumprod = scheduler.alphas_cumprod
    num_train = int(scheduler_config.get("num_train_timesteps", len(alphas_cumprod)))
    if prediction_type == "epsilon" and float(alphas_cumprod[-1]) <= 0:
        raise ValueError(
            "--model predicts epsilon with zero terminal SNR (alpha_T = 0): x_0 = (z - sigma eps)/alpha is undefined"
        )
    teacher_steps = config.teacher_steps or default_teacher_steps(num_train)
    if teacher_steps > num_train:
        raise ValueError(
            f"--teacher-steps {teacher_steps} is more than the teacher's T = {num_train} timesteps; pass at most "
            f"{default_teacher_steps(num_train)}"
        )
    if teacher_steps <= config.target_steps:
        raise ValueError(
            f"--target-steps ({config.target_steps}) must be below the teacher's steps ({teacher_steps}): each round "
            "halves the steps"
        )
    if num_train % config.target_steps:
        raise ValueError(
            f"--target-steps {config.target_steps} must divide the teacher's T = {num_train}, so that the saved "
            "DDIM sampler's trailing timesteps are the distilled ones"
        )
    training_config = None
    if (folder / TRAINING_CONFIG_NAME).is_file():
        try:
            training_config = json.loads((folder / TRAINING_CONFIG_NAME).read_text(encoding="utf-8"))
            TrainingConfig.from_dict({**training_config, "resume": None, "overwrite": False})
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"--model's {TRAINING_CONFIG_NAME} is not a training configuration: {error}"
            ) from None
    return Teacher(pipeline, prediction_type, alphas_cumprod, num_train, teacher_steps, training_config)


def student_training_config(config: DistillationConfig, teacher: Teacher) -> TrainingConfig:
    """The :class:`TrainingConfig` the trainer's machinery runs under: the teacher's data options, the student's
    diffusion (v-prediction), and ``config``'s optimisation, checkpoint and evaluation options."""
    saved = dict(teacher.training_config or {})
    if saved.get("train_data_dir") and config.train_data_dir is None:
        raise ValueError(
            f"the teacher was trained on images of a folder ({saved['train_data_dir']!r}): pass it with --train-data-dir"
        )
    unet_config = teacher.pipeline.unet.config
    conditional = unet_config.get("num_class_embeds") is not None
    has_null = getattr(teacher.pipeline.unet, "null_class_label", None) is not None
    keys = ("color_mode", "crop", "random_flip", "samples_per_class", "num_samples")
    data = {key: saved[key] for key in keys if key in saved}
    rounds = plan_rounds(config, teacher.teacher_steps, teacher.prediction_type)
    return TrainingConfig(
        **data,
        output_dir=config.output_dir,
        train_data_dir=config.train_data_dir,
        resolution=saved.get("resolution") or unet_config.get("sample_size"),
        conditioning="class" if conditional else "none",
        label_dropout=saved.get("label_dropout", 0.1) if conditional and has_null else 0.0,
        num_train_timesteps=teacher.num_train_timesteps,
        prediction_type="v_prediction",
        train_batch_size=config.train_batch_size,
        max_train_steps=sum(round_.num_optimizer_steps for round_ in rounds),
        learning_rate=config.learning_rate,
        lr_scheduler=config.lr_scheduler,
        lr_warmup_steps=config.lr_warmup_steps,
        max_grad_norm=config.max_grad_norm,
        use_ema=config.use_ema,
        ema_max_decay=config.ema_max_decay,
        mixed_precision=config.mixed_precision,
        cpu_threads=config.cpu_threads,
        seed=config.seed,
        checkpointing_steps=config.checkpointing_steps,
        checkpoints_total_limit=config.checkpoints_total_limit,
        resume=config.resume,
        overwrite=config.overwrite,
        num_inference_steps=config.target_steps,
        evaluate=config.evaluate,
        eval_every_steps=config.eval_every_steps,
        eval_num_samples=config.eval_num_samples,
        eval_inference_steps=config.target_steps,
        logging_steps=config.logging_steps,
    )


def student_scheduler(teacher_scheduler: Any, alphas_cumprod: Any, num_steps: int) -> Any:
    """The saved sampler of a student with ``num_steps`` steps: deterministic DDIM (η = 0) with DPM-Solver++(2M)'s
    extrapolation of x̂_0 (``multistep_order=2``: the student was trained on single DDIM steps, yet at 4 steps the
    extrapolation measured better on both main models, docs/distillation.md), v-prediction, trailing
    timesteps, the teacher's betas, the last step to x_0 (ᾱ = 1), no clipping (the student was trained to match the
    unclipped chain), and ``_default_num_inference_steps = num_steps`` so that the pipeline samples in
    ``num_steps`` steps by default.

    Ours (``ddpm_components.DDPMScheduler``) when its config has an ``eta`` key (DDIM-style steps), else diffusers'
    ``DDIMScheduler`` (``set_alpha_to_one=True``)."""
    from diffusers import DDIMScheduler

    from .pipeline_ddpm import DEFAULT_STEPS_CONFIG_KEY
    from .scheduling_ddpm import DDPMScheduler

    common = {
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
        "steps_offset": 0,
        "clip_sample": False,
    }
    common.update(thresholding=False)
    ours = DDPMScheduler.from_config(teacher_scheduler.config, **common)
    if "eta" in ours.config:
        scheduler = DDPMScheduler.from_config(
            teacher_scheduler.config, **common, eta=0.0, variance_type="fixed_small", multistep_order=2
        )
    else:
        betas = 1.0 - alphas_cumprod / torch_cat_one(alphas_cumprod)
        scheduler = DDIMScheduler(
            num_train_timesteps=len(alphas_cumprod),
            trained_betas=[float(beta) for beta in betas],
            set_alpha_to_one=True,
            **common,
        )
    scheduler.register_to_config(**{DEFAULT_STEPS_CONFIG_KEY: num_steps})
    return scheduler


def torch_cat_one(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """ᾱ_{t−1} for t = 0 … T−1 (ᾱ_{−1} = 1)."""
    import torch

    values = alphas_cumprod.double()
    return torch.cat([torch.ones(1, dtype=values.dtype), values[:-1]])


# ------------------------------------------------------------------------------------------- the loop
class _ModuleState:
    """A module's weights as a checkpointed object (``_TrainLoop.checkpointed_objects``): the teacher."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state)


class _DistillLoop(_TrainLoop):
    """:class:`_TrainLoop` with a teacher: the student starts from the teacher's weights, its loss is the distillation
    loss of the current round, and at the end of each round its EMA weights become the teacher (and the student's
    start) of the next; the optimizer state, the EMA and the learning-rate schedule restart with each round."""

    progress_name = "distill"
    shared_evaluation = False  # the evaluation below samples on the main process only

    def __init__(
        self, config: TrainingConfig, options: DistillationConfig, teacher: Teacher, stop: Any
    ) -> None:
        super().__init__(config, stop)
        self.options = options
        self.teacher_info = teacher
        self.rounds = plan_rounds(options, teacher.teacher_steps, teacher.prediction_type)
        self.round_ends = list(_cumulative(round_.num_optimizer_steps for round_ in self.rounds))
        self.grids: dict[int, Grid] = {}

    # ---------------------------------------------------------------------------------- model
    def _new_model(self) -> tuple[Any, Any]:
        unet = copy.deepcopy(self.teacher_info.pipeline.unet)
        channels, size = unet.config.in_channels, unet.config.sample_size
        resolution = getattr(self.dataset, "resolution", None)
        if self.dataset.num_channels != channels or (resolution is not None and resolution != size):
            raise ValueError(
                f"the data ({self.dataset.num_channels} channels, {resolution} pixels) does not fit the teacher's U-Net "
                f"({channels} channels, {size} pixels); pass the teacher's data with --train-data-dir"
            )
        unet.train()
        unet.requires_grad_(True)
        last = self.rounds[-1].student_steps
        return unet, student_scheduler(
            self.teacher_info.pipeline.scheduler, self.teacher_info.alphas_cumprod, last
        )

    def _build_model(self) -> None:
        super()._build_model()
        # a copy of the loaded teacher, not of the prepared student (whose forward accelerate may have wrapped)
        teacher = copy.deepcopy(self.teacher_info.pipeline.unet).to(self.accelerator.device)
        teacher.eval().requires_grad_(False)
        self.teacher = teacher
        self.checkpointed_objects.append(_ModuleState(teacher))

    def _run_record(self, unet: Any) -> dict[str, Any]:
        record = super()._run_record(unet)
        record["diffusion"].update(
            teacher_prediction_type=self.teacher_info.prediction_type,
            rounds=[list(dataclasses.astuple(round_)) for round_ in self.rounds],
            distillation_weighting=self.options.loss_weighting,
        )
        return record

    def resume_command(self, **changes: Any) -> str:
        return command_line("distill", self.options, **changes)

    # --------------------------------------------------------------------------------- rounds
    def round_at(self, step: int) -> int:
        """The round that optimizer step ``step + 1`` belongs to (``step`` steps done)."""
        return min(bisect.bisect_right(self.round_ends, step), len(self.rounds) - 1)

    def grid(self, num_steps: int) -> Grid:
        if num_steps not in self.grids:
            self.grids[num_steps] = Grid(self.teacher_info.alphas_cumprod, num_steps)
        return self.grids[num_steps]

    def _round_schedule(self, round_index: int, step: int) -> Any:
        """The learning-rate schedule of round ``round_index`` positioned at global step ``step``."""
        start = self.round_ends[round_index] - self.rounds[round_index].num_optimizer_steps
        length = self.rounds[round_index].num_optimizer_steps
        warmup = min(self.config.lr_warmup_steps, length)
        schedule_config = dataclasses.replace(self.config, max_train_steps=length, lr_warmup_steps=warmup)
        return _learning_rate_schedule(schedule_config, self.optimizer, step - start)

    def restore(self) -> None:
        super().restore()
        self.lr_scheduler = self._round_schedule(self.round_at(self.start_step), self.start_step)

    def run_step(self, micro_step: int, batch: dict[str, torch.Tensor]) -> bool:
        done = super().run_step(micro_step, batch)
        step = self.progress.global_step
        if done and step in self.round_ends[:-1]:
            self._next_round(step)
        return done

    def _next_round(self, step: int) -> None:
        """The student's EMA becomes the teacher and the student's start; optimizer, EMA and schedule restart."""
        import torch

        student = self.accelerator.unwrap_model(self.model)
        if self.ema is not None:
            self.ema.copy_to(student.parameters())
            self.ema.shadow_params = [parameter.detach().clone() for parameter in student.parameters()]
            self.ema.optimization_step = 0
        with torch.no_grad():
            self.teacher.load_state_dict(student.state_dict())
        getattr(self.optimizer, "optimizer", self.optimizer).state.clear()
        self.lr_scheduler = self._round_schedule(self.round_at(step), step)
        round_ = self.rounds[self.round_at(step)]
        if self.bar is not None:
            self.bar.write(
                f"step {step}: round {self.round_at(step) + 1}/{len(self.rounds)}: {round_.teacher_steps} -> "
                f"{round_.student_steps} steps"
            )

    # ----------------------------------------------------------------------------------- loss
    def loss(
        self, micro_step: int, batch: dict[str, torch.Tensor], class_labels: torch.Tensor | None
    ) -> LossTerms:
        import torch
        import torch.nn.functional as F

        round_ = self.rounds[self.round_at(self.progress.global_step)]
        generator = self.step_seeds(micro_step)
        x0 = batch["pixel_values"]
        batch_size, device = x0.shape[0], x0.device
        index = torch.randint(1, round_.student_steps + 1, (batch_size,), generator=generator, device=device)
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        dropout = self.config.label_dropout
        if class_labels is not None and self.null_class_label is not None and dropout > 0:
            drop = torch.rand(batch_size, generator=generator, device=device) < dropout
            class_labels = torch.where(
                drop, torch.full_like(class_labels, self.null_class_label), class_labels
            )
        student_grid = self.grid(round_.student_steps)
        alpha, sigma = student_grid.at(index, x0)
        sample = alpha * x0 + sigma * noise
        _, v_target = student_targets(
            lambda z, t: self.teacher(z, t, class_labels=class_labels, return_dict=False)[0],
            round_.teacher_prediction_type,
            self.grid(round_.teacher_steps),
            student_grid,
            sample,
            index,
        )
        timesteps = student_grid.timesteps[index.cpu()].to(device)
        output = self.model(sample, timesteps, class_labels=class_labels, return_dict=False)[0].float()
        mse = F.mse_loss(output, v_target.float(), reduction="none").mean(dim=tuple(range(1, output.ndim)))
        if (
            self.options.loss_weighting == "truncated_snr"
        ):  # max(SNR, 1) on the x-loss = max(α², σ²) on the v-loss
            weights = torch.maximum(alpha, sigma).flatten() ** 2
        else:
            weights = torch.ones_like(mse)
        loss = (weights.to(mse) * mse).mean()
        return LossTerms(loss, mse.mean(), None)

    # ----------------------------------------------------------------------------- evaluation
    def _evaluation_numbers(self, unet: Any, step: int) -> dict[str, float]:
        """On 8×8 digits: the digits FD of ``eval_num_samples`` samples of the EMA student at its step count (the
        round that ``step`` ended in), against the held-out test split; elsewhere only the step count.

        The samples are drawn as the saved pipeline draws them: :class:`DDPMPipeline` with the student's saved
        scheduler (:func:`student_scheduler` at that step count, so with the multistep extrapolation where the
        teacher's scheduler is ours), image ``i`` seeded from (``seed``, ``i``) as in training's evaluation."""
        from .data import DigitsDataset
        from .evaluation import SampleQuality, reference_digits

        steps = self.rounds[self.round_at(max(step - 1, 0))].student_steps
        numbers: dict[str, float] = {"eval_steps": steps}
        if not (isinstance(self.dataset, DigitsDataset) and self.dataset.resolution == 8):
            return numbers
        if (
            "quality" not in self.evaluation_cache
        ):  # the digits classifier and reference features, once per run
            self.evaluation_cache["quality"] = SampleQuality(reference_digits("test")[0], ["fd"])
        scheduler = student_scheduler(
            self.teacher_info.pipeline.scheduler, self.teacher_info.alphas_cumprod, steps
        )
        images = _evaluation_samples(
            unet, scheduler, self.config, self.num_classes, steps, self.stop.requested
        )
        if self.stop.requested():
            return numbers
        numbers["eval_fd"] = self.evaluation_cache["quality"](images)["fd"]
        return numbers

    def _evaluation_for_card(self, numbers: dict[str, float]) -> dict[str, str]:
        if "eval_fd" not in numbers:
            return {}
        what = (
            f"digits FD, {self.config.eval_num_samples} samples, {int(numbers['eval_steps'])} steps (distilled), vs "
            "the digits' held-out test split (lower is better)"
        )
        return {what: f"{numbers['eval_fd']:.2f}"}


def _cumulative(values: Any) -> Any:
    total = 0
    for value in values:
        total += value
        yield total


def sample_on_grid(
    unet: Any,
    grid: Grid,
    noise: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    prediction_type: str = "v_prediction",
    batch_size: int = 250,
    stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """x_0 from ``noise`` = z_T by ``grid.num_steps`` DDIM (η = 0) steps of ``unet`` on ``grid``, in batches."""
    import torch

    results = []
    with torch.no_grad():
        for start in range(0, noise.shape[0], batch_size):
            z = noise[start : start + batch_size]
            labels = None if class_labels is None else class_labels[start : start + batch_size]
            index = torch.full((z.shape[0],), grid.num_steps, dtype=torch.long)
            results.append(
                ddim_chain(
                    lambda x, t, labels=labels: unet(x, t, class_labels=labels, return_dict=False)[0],
                    z,
                    grid,
                    index,
                    grid.num_steps,
                    prediction_type,
                )
            )
            if stop is not None and stop():
                break
    return torch.cat(results)


def distill(config: DistillationConfig) -> dict[str, Any]:
    """Distil ``config.model`` into a ``config.target_steps``-step pipeline saved at the root of ``config.output_dir``.

    Checks everything (the teacher, the options, the data, the output folder, a checkpoint to resume) before it
    writes anything; errors as :func:`~ddpm_components.training.train`'s (``ValueError`` / ``FileNotFoundError``,
    ``TrainingDiverged``, ``TrainingInterrupted``). Returns train's summary plus ``rounds``.
    """
    config.validate()
    teacher = load_teacher(config)
    training = student_training_config(config, teacher)
    summary = run_loop(lambda stop: _DistillLoop(training, config, teacher, stop))
    summary["rounds"] = [
        dataclasses.asdict(round_)
        for round_ in plan_rounds(config, teacher.teacher_steps, teacher.prediction_type)
    ]
    return summary


__all__ = [
    "DistillationConfig",
    "Grid",
    "Round",
    "ddim_chain",
    "distill",
    "distillation_target",
    "load_teacher",
    "plan_rounds",
    "sample_on_grid",
    "student_scheduler",
    "student_targets",
    "trailing_grid",
    "v_from_x0",
    "x0_and_eps",
]
