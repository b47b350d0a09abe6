"""The ``ddpm-components`` command line (also ``python -m ddpm_components``).

Sub-commands:

- ``forward``: show the forward (noising) process q(x_t | x_0) on a few embedded digits, x_0 → x_T;
- ``sample``: sample images from a saved pipeline (a folder or a Hub repo id);
- ``push``: push a saved pipeline folder to the Hugging Face Hub;
- ``train``: train a DDPM on a folder of images or on the embedded digits;
- ``evaluate``: bits/dim and sample quality of a saved model;
- ``distill``: progressive distillation of a trained model into a few-step sampler;
- ``analytic-variance``: estimate Analytic-DPM's moments Γ_t for a saved model and switch its scheduler to
  ``variance_type="analytic"``.

Errors: every mistake in the options or the input files is reported as one line on stderr before any long work,
with exit code 2 (see :func:`main` for the other exit codes); ``DDPM_COMPONENTS_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from .cpu_memory import keep_freed_memory

DEBUG_ENVIRONMENT_VARIABLE = "DDPM_COMPONENTS_DEBUG"
"""Set to 1 to let errors propagate with their traceback instead of the one-line message."""

EXIT_USAGE = 2
"""Exit code for a mistake in the options or the input files (also argparse's)."""
EXIT_FAILURE = 1
"""Exit code for a failure of the environment: the Hub, a full disk, a permission, a bug."""
EXIT_INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT), the shell's convention."""

SEED_LIMIT = 2**64
"""Seeds are integers in [0, 2**64): the range torch.Generator.manual_seed takes without remapping."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block): ``PROG: error: MESSAGE (see PROG --help)``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {number}")
    return number


def _finite_float(value: str) -> float:
    """A float option: NaN and infinity are refused (NaN guidance gave black images with exit code 0)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return number


def _seed(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {value!r}") from None
    if not 0 <= number < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"the seed must be an integer in [0, 2**64 - 1], got {number}")
    return number


def _check_png_output(path: Path, flag: str) -> None:
    """``flag``'s PNG file can be written (checked before any work; nothing is written)."""
    from .data import check_output_file

    if path.suffix.lower() != ".png":
        raise ValueError(f"{flag} must be a .png file, got {str(path)!r}")
    check_output_file(path, flag)


def _torch_device(text: str | None) -> Any:
    """The torch device named ``text`` (default: cuda if available, else cpu), checked by allocating on it."""
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise ValueError(
            f"--device {text!r} is not a torch device (e.g. cpu, cuda, cuda:1): {error}"
        ) from None
    try:
        if device.type == "meta":
            raise RuntimeError("meta tensors hold no values")
        torch.empty(0, device=device)
    except Exception as error:  # torch raises several types for a missing backend or device index
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"--device {text!r} is not available here ({reason}); available: {', '.join(_available_devices())}"
        ) from None
    return device


def _available_devices() -> list[str]:
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


# --------------------------------------------------------------------------------------------- forward
def _add_forward_parser(subparsers: argparse._SubParsersAction) -> None:
    # imports nothing heavy: `--help` stays instant (the checks that need torch run in _check_forward_options)
    parser = subparsers.add_parser(
        "forward",
        help="write a PNG of the forward process q(x_t | x_0) on embedded digit images",
        description=(
            "Noise a few of the embedded 8x8 digits with the closed form q(x_t | x_0) (DDPM Eq. 4) and write "
            "a PNG grid: one row per image, columns from x_0 (left) to x_T (right)."
        ),
    )
    parser.add_argument("--out", type=Path, default=Path("forward_process.png"), help="output PNG path")
    parser.add_argument(
        "--num-images",
        type=_positive_int,
        default=8,
        help="rows: how many of the embedded digits (default 8)",
    )
    parser.add_argument(
        "--num-columns", type=_positive_int, default=10, help="columns from x_0 to x_T (default 10)"
    )
    parser.add_argument(
        "--resolution", type=_positive_int, default=32, help="image size in pixels (default 32)"
    )
    parser.add_argument("--num-train-timesteps", type=_positive_int, default=1000, help="T (default 1000)")
    parser.add_argument(
        "--beta-schedule",
        default="linear",
        help="beta schedule, e.g. linear or squaredcos_cap_v2 (default linear; a wrong name lists the valid ones)",
    )
    parser.add_argument("--seed", type=_seed, default=0, help="random seed for the noise (default 0)")
    parser.set_defaults(func=_run_forward)


def _check_forward_options(args: argparse.Namespace) -> None:
    from .data import DIGITS_NUM_IMAGES
    from .scheduling_ddpm import BetaSchedule, _check_choice

    _check_choice("--beta-schedule", args.beta_schedule, get_args(BetaSchedule))
    if args.num_images > DIGITS_NUM_IMAGES:
        raise ValueError(
            f"--num-images {args.num_images} is more than the {DIGITS_NUM_IMAGES:,} embedded digits; pass at most "
            f"{DIGITS_NUM_IMAGES}"
        )
    if args.num_columns < 2:
        raise ValueError(f"--num-columns must be at least 2 (x_0 and x_T), got {args.num_columns}")
    _check_png_output(args.out, "--out")


def _run_forward(args: argparse.Namespace) -> int:
    _check_forward_options(args)
    import torch
    from diffusers.utils import make_image_grid
    from PIL import Image

    from .data import digits_tensor, save_png, to_uint8_images
    from .scheduling_ddpm import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule)
    images, _ = digits_tensor(args.resolution)
    generator = torch.Generator().manual_seed(args.seed)
    index = torch.randperm(images.shape[0], generator=generator)[: args.num_images]
    x0 = images[index]
    noise = torch.randn(x0.shape, generator=generator)
    steps = torch.linspace(0, args.num_train_timesteps - 1, args.num_columns - 1).round().long()
    columns = [x0] + [scheduler.add_noise(x0, noise, t.expand(x0.shape[0])) for t in steps]
    # grid rows are images, columns are timesteps
    stacked = torch.stack(columns, dim=1).flatten(0, 1)
    pil_images = [Image.fromarray(a.squeeze(-1), mode="L") for a in to_uint8_images(stacked)]
    grid = make_image_grid(pil_images, rows=args.num_images, cols=args.num_columns)
    save_png(grid, args.out)
    print(
        f"wrote {args.out}: {args.num_images} digits; columns x_0, then x_t for t = {', '.join(map(str, steps.tolist()))}"
    )
    return 0


# ------------------------------------------------------------------------------------------------ train
#: diffusers' train_unconditional.py flags whose names are not ours (besides ``--<field_name>`` with
#: underscores, which every TrainingConfig field accepts): their TrainingConfig field (docs/training.md's table)
DIFFUSERS_ALIASES: dict[str, tuple[str, ...]] = {
    "overwrite": ("--overwrite_output_dir",),
    "num_samples": ("--eval_batch_size",),
    "hub_private": ("--hub_private_repo",),
    "report_to": ("--logger",),
    "num_train_timesteps": ("--ddpm_num_steps",),
    "num_inference_steps": ("--ddpm_num_inference_steps",),
    "beta_schedule": ("--ddpm_beta_schedule",),
    "resume": ("--resume_from_checkpoint",),
}
#: diffusers' flags that are accepted with a one-line note: what they do here instead
DIFFUSERS_NOTES: dict[str, str] = {
    "--local_rank": "the process rank comes from accelerate's environment (as in diffusers, where it is unused)",
    "--enable_xformers_memory_efficient_attention": "not needed: the U-Net's attention uses torch's "
    "scaled_dot_product_attention (memory-efficient kernels where available)",
    "--preserve_input_precision": "not supported: images go through the one 8-bit image path (16-bit greyscale is "
    "scaled to 8 bits)",
}


def _add_diffusers_flags(parser: argparse.ArgumentParser) -> None:
    """diffusers' flags without a TrainingConfig field of the same meaning: ``--center_crop``, ``--hub_token``
    and the noted ones (:data:`DIFFUSERS_NOTES`); none of them changes a default."""
    group = parser.add_argument_group(
        "diffusers' train_unconditional.py flags",
        "accepted as there (see docs/training.md for the table); every option above also takes diffusers' "
        "spelling with underscores (--train_batch_size)",
    )
    options = {option: action for action in parser._actions for option in action.option_strings}
    for name, aliases in DIFFUSERS_ALIASES.items():
        for alias in aliases:
            _add_alias(group, options[f"--{name.replace('_', '-')}"], alias, f"= --{name.replace('_', '-')}")
    group.add_argument(
        "--push_to_hub",
        dest="push_to_hub",
        action=_DiffusersPush,
        nargs=0,
        default=argparse.SUPPRESS,
        help="= --push-to-hub; without --hub_model_id, to a repository named like --output_dir, as in diffusers",
    )
    for option, action in options.items():  # --train_batch_size: hidden from --help, to keep it readable
        spelling = "--" + option[2:].replace("-", "_")
        if (
            option.startswith("--")
            and not option.startswith("--no-")
            and spelling not in (option, "--push_to_hub")
        ):
            _add_alias(group, action, spelling, argparse.SUPPRESS)
    group.add_argument(
        "--center_crop",
        dest="crop",
        action="store_const",
        const="center",
        default=argparse.SUPPRESS,
        help="--crop center",
    )
    group.add_argument(
        "--hub_token", default=None, help="Hub token for --push-to-hub (default: HF_TOKEN or the saved login)"
    )
    for flag, note in DIFFUSERS_NOTES.items():
        switch = flag.startswith(("--enable", "--preserve"))
        group.add_argument(
            flag,
            dest="diffusers_notes",
            action=_NoteFlag,
            nargs=0 if switch else None,
            metavar=None if switch else "VALUE",
            default=argparse.SUPPRESS,
            help=f"accepted: {note}",
        )
    parser.set_defaults(diffusers_notes=[])


def _add_alias(group: Any, action: argparse.Action, alias: str, help_text: str) -> None:
    """``alias`` for ``action``'s option, as diffusers declares it: a boolean as a switch (``store_true``)."""
    options = {"dest": action.dest, "default": argparse.SUPPRESS, "help": help_text}
    if isinstance(action, argparse.BooleanOptionalAction):
        group.add_argument(alias, action="store_true", **options)
    else:
        group.add_argument(alias, type=action.type, metavar=action.metavar, **options)


class _DiffusersPush(argparse.Action):
    """diffusers' ``--push_to_hub``: also remembers the spelling, for diffusers' default repository name."""

    def __call__(
        self, parser: Any, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        namespace.push_to_hub = True
        namespace.diffusers_push = True


class _NoteFlag(argparse.Action):
    """A diffusers flag accepted with a note: records which flag was given."""

    def __call__(
        self, parser: Any, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        namespace.diffusers_notes = [*getattr(namespace, "diffusers_notes", []), option]


def _add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    """``train``: one flag per :class:`~ddpm_components.training.TrainingConfig` field, generated from it."""
    from .training import TrainingConfig

    parser = subparsers.add_parser(
        "train",
        help="train a DDPM on a folder of images or on the embedded 8x8 digits",
        description=(
            "Train a DDPM with accelerate and save the EMA pipeline (loadable with "
            "DiffusionPipeline.from_pretrained(output_dir, trust_remote_code=True)), a sample grid, "
            "training_config.json and metrics.jsonl in --output-dir. With no flags: a class-conditional "
            "model on the embedded digits, about ten minutes on two CPU cores. Multi-GPU / multi-node: "
            "`accelerate launch -m ddpm_components train ...` (see docs/training.md)."
        ),
    )
    _add_dataclass_options(parser, TrainingConfig)
    _add_diffusers_flags(parser)
    parser.set_defaults(func=_run_train)


def _add_dataclass_options(parser: argparse.ArgumentParser, options: type) -> None:
    """One flag per field of the dataclass ``options`` (``--name-with-dashes``), typed, with its help and default;
    a field whose metadata says ``required`` is a required flag."""
    import dataclasses
    import types
    import typing

    hints = typing.get_type_hints(options)
    for item in dataclasses.fields(options):
        flag = "--" + item.name.replace("_", "-")
        annotation = hints[item.name]
        optional = isinstance(annotation, types.UnionType) and type(None) in typing.get_args(annotation)
        if optional:
            annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
        help_text = item.metadata.get("help", "")
        if item.metadata.get("required"):
            parser.add_argument(flag, type=annotation, required=True, help=help_text)
            continue
        if "default" not in help_text:
            help_text += f" (default: {item.default})"
        if annotation is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=item.default, help=help_text
            )
        elif typing.get_origin(annotation) is typing.Literal:
            # no argparse `choices`: TrainingConfig validates (one place) and names the valid values
            choices = typing.get_args(annotation)
            parser.add_argument(
                flag, default=item.default, metavar="{" + ",".join(choices) + "}", help=help_text
            )
        elif optional and annotation in (int, float):
            # an optional number also takes 'none' (e.g. --checkpoints-total-limit none: keep every checkpoint)
            def number_or_none(text: str, number_type: type = annotation) -> int | float | None:
                return None if text.strip().lower() == "none" else number_type(text)

            number_or_none.__name__ = annotation.__name__  # argparse names the type in its error message
            parser.add_argument(flag, type=number_or_none, default=item.default, help=help_text)
        else:
            parser.add_argument(flag, type=annotation, default=item.default, help=help_text)


def _run_train(args: argparse.Namespace) -> int:
    """Train; exit code 0, 1 when the loss diverged (NaN/inf), 128 + the signal number after SIGINT / SIGTERM
    (130 / 143), each with one line on stderr; bad options, data, folders or checkpoints raise ValueError (2)."""
    from .training import TrainingConfig, evaluation_few_steps, evaluation_steps, train

    if getattr(args, "diffusers_push", False) and args.hub_model_id is None:
        # diffusers names the repository after the output folder, in the token's namespace
        args.hub_model_id = Path(args.output_dir).name

    def announce(config: TrainingConfig) -> None:  # once the options are valid, before any work
        for flag in dict.fromkeys(args.diffusers_notes) if os.environ.get("RANK", "0") == "0" else ():
            print(f"ddpm-components train: note: {flag} {DIFFUSERS_NOTES[flag]}", file=sys.stderr)
        if args.hub_token:  # diffusers' --hub_token: the token of this process's Hub calls, never saved
            os.environ["HF_TOKEN"] = args.hub_token

    config, summary = _run_training_command("train", train, TrainingConfig, args, announce)
    if isinstance(summary, int):
        return summary
    if summary.get("is_main_process", True):
        loss = summary[
            "loss"
        ]  # NaN when this call ran no step (resumed at --max-train-steps: sample and save)
        loss_text = (
            f"last loss {loss:.4f}" if math.isfinite(loss) else "no step left to train: sampled and saved"
        )
        print(
            f"trained {summary['global_step']} steps in {summary['wall_time']:.0f} s ({loss_text}); pipeline, "
            f"samples.png, training_config.json and metrics.jsonl are in {summary['output_dir']}"
        )
        evaluation = summary.get("evaluation") or {}
        if evaluation:
            parts = []
            steps, _ = evaluation_steps(config)
            for key, title in (("eval_fd", "digits FD"), ("eval_fid", "FID")):
                if key in evaluation:
                    text = f"{title} {evaluation[key]:.2f} ({config.eval_num_samples} samples, {steps} steps"
                    if f"{key}_few_steps" in evaluation:
                        few = evaluation[f"{key}_few_steps"]
                        text += f"; {few:.2f} at {evaluation_few_steps(config)} steps"
                    parts.append(text + ")")
            parts.append(
                f"bits/dim {evaluation['eval_bpd']:.3f} ± {evaluation['eval_bpd_stderr']:.3f} (estimate)"
            )
            print("evaluation: " + "; ".join(parts) + " (ddpm-components evaluate measures more)")
    return 0


def _run_training_command(
    command: str, run: Any, options: type, args: argparse.Namespace, announce: Any = None
) -> tuple[Any, dict[str, Any] | int]:
    """``(options from args, run(options))``, or the exit code in place of the summary after an interrupt
    (128 + the signal number) or a divergence (1), each reported in one line on stderr (``train``, ``distill``).
    ``announce(options)`` runs once the options are valid, before the run."""
    import dataclasses

    from .training import TrainingDiverged, TrainingInterrupted

    config = options(**{item.name: getattr(args, item.name) for item in dataclasses.fields(options)})
    if announce is not None:
        announce(config)
    try:
        return config, run(config)
    except TrainingInterrupted as interrupt:
        print(f"ddpm-components {command}: {interrupt}", file=sys.stderr)
        return config, interrupt.exit_code
    except TrainingDiverged as error:
        if error.is_main_process:
            print(f"ddpm-components {command}: error: {error}", file=sys.stderr)
        return config, error.exit_code
    except KeyboardInterrupt:  # before the run installed its handlers
        print(
            f"ddpm-components {command}: interrupted before training started; nothing was written",
            file=sys.stderr,
        )
        return config, 130


# ----------------------------------------------------------------------------------------------- sample
def _add_sample_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="sample images from a saved pipeline (a folder or a Hub repo id) into a PNG grid",
        description=(
            "Sample images from a saved DDPM pipeline and write them as one PNG grid (and optionally one PNG per "
            "image). Folders saved by ddpm-components load with the installed code (no stored code runs); Hub "
            "repos are downloaded first. Image-to-image (SDEdit): --init-image noises the image to the level "
            "--strength and denoises it from there. Inpainting (RePaint): --init-image with --mask repaints the mask's white "
            "pixels and keeps the others exactly. Super-resolution (ILVR): --reference-image makes images whose "
            "down-sampled version is that low-resolution image. The options, the output paths and the input image are "
            "checked before the model is loaded; nothing is written unless sampling succeeds."
        ),
        formatter_class=_DefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        help="a folder written by save_pretrained / `train`, or a Hub repo id (user/name)",
    )
    parser.add_argument("--num-images", type=_positive_int, default=16, help="how many images to sample")
    parser.add_argument(
        "--batch-size", type=_positive_int, default=64, help="images per batch (a progress bar counts them)"
    )
    parser.add_argument(
        "--steps",
        type=_steps_value,
        default=None,
        help="denoising steps (1000 = the DDPM paper; fewer is faster and rougher), or a respacing string for our "
        "scheduler such as ddim50 or 10,15,20 (default: the model's own, 1000, or the step count of a model made by "
        "`distill`)",
    )
    parser.add_argument(
        "--scheduler",
        default=None,
        metavar="SPEC",
        help="sample with another scheduler: 'ddpm:key=value,...' overrides the model's own scheduler's config, a "
        "diffusers scheduler class name (e.g. DPMSolverMultistepScheduler[:key=value,...]) swaps it in "
        "(default: the model's scheduler as saved)",
    )
    parser.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="random seed in [0, 2**64 - 1]: image i is seeded by (seed, i), so the same seed gives the same images "
        "whatever --batch-size or the number of processes",
    )
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument(
        "--class-label",
        type=int,
        nargs="+",
        default=None,
        metavar="L",
        help="class label(s) for a class-conditional model, as integer indices: one for all images or one per "
        "image (default: unconditional, via the null class)",
    )
    labels.add_argument(
        "--class-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="class name(s) instead of --class-label, from the model's class_names (the training folder names): "
        "one for all images or one per image",
    )
    parser.add_argument(
        "--guidance-scale",
        type=_finite_float,
        default=1.0,
        help="classifier-free guidance weight g (eps = eps_uncond + g (eps_cond - eps_uncond)); 1 = off; needs "
        "--class-label or --class-name and a model trained with label dropout",
    )
    parser.add_argument(
        "--init-image",
        type=Path,
        default=None,
        metavar="FILE",
        help="image-to-image: start from this image (EXIF orientation applied, 16-bit scaled, transparency on "
        "black, resized to the model's resolution) instead of pure noise",
    )
    parser.add_argument(
        "--strength",
        type=_finite_float,
        default=None,
        help="with --init-image: the fraction of the schedule to run, in (0, 1]; small values stay close to the "
        "image (default 0.5)",
    )
    parser.add_argument(
        "--mask",
        type=Path,
        default=None,
        metavar="FILE",
        help="inpainting (RePaint) with --init-image: white pixels of this mask are repainted, black ones kept "
        "exactly (resized to the model's resolution with nearest-neighbour sampling, thresholded at 0.5); the whole "
        "chain runs unless --strength is given",
    )
    parser.add_argument(
        "--jump-length",
        type=_positive_int,
        default=None,
        metavar="L",
        help="with --mask: RePaint's resampling runs pieces of L steps (default 10)",
    )
    parser.add_argument(
        "--jump-n-sample",
        type=_positive_int,
        default=None,
        metavar="K",
        help="with --mask: each piece of --jump-length steps is run K times in all (default 1: plain replacement; "
        "RePaint's 10 costs about 10x the U-Net calls)",
    )
    parser.add_argument(
        "--reference-image",
        type=Path,
        default=None,
        metavar="FILE",
        help="super-resolution (ILVR): a low-resolution image whose size times --reference-factor is the model's "
        "resolution; the results down-sampled by that factor match it",
    )
    parser.add_argument(
        "--reference-factor",
        type=_positive_int,
        default=None,
        metavar="N",
        help="with --reference-image: the down-sampling factor N (default: the model's resolution divided by the "
        "reference's size)",
    )
    parser.add_argument(
        "--reference-until",
        type=_finite_float,
        default=None,
        metavar="F",
        help="with --reference-image: the fraction of the steps, from the first, that follow the reference, in "
        "(0, 1] (default 1: all)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="a PNG grid (FILE.png) or all images as an .npz (arr_0: uint8 N x H x W x C, arr_1: class labels), "
        "written at the end (default: samples.png when --out-dir is not given)",
    )
    parser.add_argument(
        "--out-dir",
        "--save-individual",
        dest="out_dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="write one PNG per image into DIR (000000.png, ...); a rerun with the same settings skips the images "
        "already there",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow running component code stored with the model when it is not part of ddpm-components",
    )
    parser.set_defaults(func=_run_sample)


def _individual_names(num_images: int) -> list[str]:
    from .sampling import png_name

    return [png_name(index) for index in range(num_images)]


def _check_sample_options(args: argparse.Namespace) -> Any:
    """Everything about ``sample``'s options that needs no model; returns the decoded ``--init-image`` (or None)."""
    from .data import check_output_file, check_output_folder
    from .sampling import SchedulerSpec

    if args.strength is not None and args.init_image is None:
        raise ValueError("--strength only applies to image-to-image: pass --init-image FILE as well")
    if args.out is None and args.out_dir is None:
        args.out = Path("samples.png")
    if args.out is not None:
        if args.out.suffix.lower() not in (".png", ".npz"):
            raise ValueError(f"--out must be a .png grid or an .npz file, got {str(args.out)!r}")
        check_output_file(args.out, "--out")
    if args.out_dir is not None:
        check_output_folder(args.out_dir, "--out-dir", _individual_names(args.num_images))
    labels = args.class_label if args.class_label is not None else args.class_name
    if labels is not None and len(labels) not in (1, args.num_images):
        raise ValueError(
            f"got {len(labels)} class labels for --num-images {args.num_images}: pass one label or one per image"
        )
    if isinstance(args.steps, str) and args.scheduler is not None and not args.scheduler.startswith("ddpm"):
        raise ValueError(
            f"--steps {args.steps!r} is a respacing string, which only our scheduler ('ddpm') takes"
        )
    if args.scheduler is not None:
        SchedulerSpec.parse(args.scheduler)
    _check_control_options(args)
    if args.init_image is None:
        return None
    return _read_input_image(args.init_image, "--init-image")


def _read_input_image(path: Path, flag: str) -> Any:
    """An input image file, decoded and checked by the one image path (refuses e.g. 32-bit float images)."""
    from .data import read_image_file
    from .pipeline_ddpm import standardize_pil_image

    image = read_image_file(path, flag)
    try:
        standardize_pil_image(image, "RGB")
    except ValueError as error:
        raise ValueError(f"{flag} {str(path)!r}: {error}") from None
    return image


def _check_control_options(args: argparse.Namespace) -> None:
    """The inpainting (--mask) and ILVR (--reference-image) options that need no model; reads both files."""
    needs = {
        "--jump-length": (args.jump_length, args.mask, "--mask"),
        "--jump-n-sample": (args.jump_n_sample, args.mask, "--mask"),
        "--reference-factor": (args.reference_factor, args.reference_image, "--reference-image"),
        "--reference-until": (args.reference_until, args.reference_image, "--reference-image"),
        "--mask": (args.mask, args.init_image, "--init-image"),
    }
    for flag, (value, needed, needed_flag) in needs.items():
        if value is not None and needed is None:
            raise ValueError(f"{flag} only applies with {needed_flag}: pass {needed_flag} FILE as well")
    if args.mask is not None and args.reference_image is not None:
        raise ValueError(
            "--mask (inpainting) and --reference-image (ILVR) cannot be combined; pass one of them"
        )
    if args.reference_until is not None and not 0.0 < args.reference_until <= 1.0:
        raise ValueError(f"--reference-until must be in (0, 1], got {args.reference_until}")
    args.mask_pixels = None if args.mask is None else _read_input_image(args.mask, "--mask")
    args.reference_pixels = (
        None if args.reference_image is None else _read_input_image(args.reference_image, "--reference-image")
    )


def _init_image_for(pipeline: Any, image: Any) -> Any:
    """``--init-image`` through the one image path (standardize_pil_image), resized to the model's size."""
    from PIL import Image

    from .pipeline_ddpm import standardize_pil_image

    channels, height, width = pipeline._sample_shape()
    image = standardize_pil_image(image, "L" if channels == 1 else "RGB")
    return image.resize((width, height), Image.Resampling.LANCZOS)


def _run_sample(args: argparse.Namespace) -> int:
    init_image = _check_sample_options(args)
    device = _torch_device(args.device)
    from .hub import load_pipeline
    from .sampling import SampleOutputs, SchedulerSpec, sample_batches

    state = _sampling_processes()
    pipeline = load_pipeline(args.model, trust_remote_code=args.trust_remote_code)
    if args.scheduler is not None:
        spec = SchedulerSpec.parse(args.scheduler)
        pipeline.scheduler = spec.build(pipeline.scheduler)
        spec.check_steps(pipeline.scheduler, args.steps)
    pipeline.to(device)
    pipeline.set_progress_bar_config(file=getattr(args, "stderr", sys.stderr))
    call_kwargs = {}
    if init_image is not None:
        default_strength = 1.0 if args.mask is not None else 0.5  # inpainting runs the whole chain
        call_kwargs.update(
            image=_init_image_for(pipeline, init_image),
            strength=default_strength if args.strength is None else args.strength,
        )
    control_kwargs = {
        "mask_image": args.mask_pixels,
        "jump_length": args.jump_length,
        "jump_n_sample": args.jump_n_sample,
        "reference_image": args.reference_pixels,
        "reference_factor": args.reference_factor,
        "reference_until": args.reference_until,
    }
    call_kwargs.update({key: value for key, value in control_kwargs.items() if value is not None})
    labels = args.class_label if args.class_label is not None else args.class_name
    if args.steps is None:
        args.steps = getattr(pipeline, "default_num_inference_steps", 1000)
    pipeline.check_inputs(  # the labels (names), steps and image against this model, before anything is written
        batch_size=len(labels) if labels is not None and len(labels) > 1 else 1,
        generator=None,
        num_inference_steps=args.steps,
        timesteps=None,
        class_labels=labels,
        guidance_scale=args.guidance_scale,
        image=call_kwargs.get("image"),
        strength=call_kwargs.get("strength", 1.0),
        output_type="pt",
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=None,
        **{key: value for key, value in call_kwargs.items() if key in control_kwargs},
    )
    resumable = state is not None or args.num_images > args.batch_size
    outputs = SampleOutputs(args.out, args.out_dir, _sample_settings(args), args.num_images, resumable)
    is_main = state is None or state.is_main_process
    if is_main:
        outputs.check()
        outputs.prepare()
    _barrier(state)
    todo = outputs.todo()
    _barrier(state)  # every process has its list before any image is written
    rank, world = (0, 1) if state is None else (state.process_index, state.num_processes)
    class_label_of = None if labels is None else (lambda index: labels[index if len(labels) > 1 else 0])
    try:
        for indices, images in sample_batches(
            pipeline,
            todo[rank::world],
            seed=args.seed,
            num_inference_steps=args.steps,
            batch_size=args.batch_size,
            class_label_of=class_label_of,
            guidance_scale=args.guidance_scale,
            show_progress=is_main,
            progress_file=getattr(args, "stderr", sys.stderr),
            **call_kwargs,
        ):
            outputs.write(indices, images, rank)
    except KeyboardInterrupt:
        args.interrupted_summary = outputs.interrupted_summary()  # main() prints it after "interrupted"
        raise
    _barrier(state)
    if is_main:
        all_labels = (
            None if labels is None else [labels[i if len(labels) > 1 else 0] for i in range(args.num_images)]
        )
        outputs.finish(all_labels)
        written = [str(path) for path in (args.out, args.out_dir) if path is not None]
        resumed = f", {args.num_images - len(todo)} already there" if len(todo) < args.num_images else ""
        print(
            f"wrote {' and '.join(written)} ({args.num_images} images{resumed}, {args.steps} steps, seed {args.seed})"
        )
    return 0


def _sample_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What makes ``sample``'s images what they are: a rerun into the same outputs must use the same."""
    import hashlib

    def sha256(path: Path | None) -> str | None:
        return None if path is None else hashlib.sha256(path.read_bytes()).hexdigest()

    init_image = sha256(args.init_image)
    control = {  # only what is used, so that folders sampled before these options existed still resume
        "mask_sha256": sha256(args.mask),
        "jump_length": args.jump_length,
        "jump_n_sample": args.jump_n_sample,
        "reference_image_sha256": sha256(args.reference_image),
        "reference_factor": args.reference_factor,
        "reference_until": args.reference_until,
    }
    return {
        **{key: value for key, value in control.items() if value is not None},
        "model": str(args.model),
        "steps": args.steps,
        "scheduler": args.scheduler,
        "seed": args.seed,
        "class_labels": args.class_label if args.class_label is not None else args.class_name,
        "guidance_scale": args.guidance_scale,
        "init_image_sha256": init_image,
        "strength": args.strength,
    }


def _sampling_processes() -> Any:
    """accelerate's ``PartialState`` when launched as several processes (``accelerate launch``), else ``None``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    from .training import _distributed_without_accelerator

    return PartialState(cpu=_distributed_without_accelerator())


def _barrier(state: Any) -> None:
    if state is not None:
        state.wait_for_everyone()


# ------------------------------------------------------------------------------------------------- push
def _add_push_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push",
        help="push a saved pipeline folder to the Hugging Face Hub (with a model card and sample grid)",
        description=(
            "Upload a saved pipeline folder to a Hub model repository (created if needed) in the remote-code "
            "layout, so that anyone can load it with DiffusionPipeline.from_pretrained(repo_id, "
            "trust_remote_code=True), plus a model card with a sample grid (the folder's samples.png, or freshly "
            "sampled) and its training_config.json. The local folder is only read. Authenticate with "
            "`hf auth login`, HF_TOKEN, or --token."
        ),
        formatter_class=_DefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, type=Path, help="the saved pipeline folder")
    parser.add_argument("--repo-id", required=True, help="the Hub repository, namespace/name (or name)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument(
        "--token", default=None, help="a Hub token with write access (default: the stored token)"
    )
    parser.add_argument("--commit-message", default=None, help="the commit message")
    parser.add_argument(
        "--num-sample-images",
        type=int,
        default=16,
        help="images in the card's grid when sampled (0: no grid); ignored when the folder has samples.png",
    )
    parser.add_argument(
        "--sample-steps", type=_positive_int, default=None, help="steps for the grid (default min(100, T))"
    )
    parser.add_argument(
        "--resample", action="store_true", help="sample a new grid even if samples.png exists"
    )
    parser.set_defaults(func=_run_push)


def _run_push(args: argparse.Namespace) -> int:
    from .hub import HubError, push_folder

    if args.num_sample_images < 0:
        raise ValueError(f"--num-sample-images must be >= 0, got {args.num_sample_images}")
    try:
        url = push_folder(
            args.model,
            args.repo_id,
            private=True if args.private else None,
            token=args.token,
            commit_message=args.commit_message,
            num_sample_images=args.num_sample_images,
            sample_inference_steps=args.sample_steps,
            resample=args.resample,
        )
    except HubError as error:
        raise HubError(f"{error}; nothing was changed in {args.model}") from error
    print(f"pushed {args.model} to {args.repo_id}: {url}")
    return 0


# --------------------------------------------------------------------------------------------- evaluate
def _comma_separated(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _steps_value(value: str) -> int | str:
    """An integer number of steps, or a respacing string such as ``ddim50`` or ``10,15,20``."""
    return int(value) if value.isdigit() else value


def _add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    from .evaluation import EVALUATION_METRICS

    parser = subparsers.add_parser(
        "evaluate",
        help="measure a saved model: bits/dim on held-out data, sample quality (digits FD) per sampler and steps",
        description=(
            "Evaluate a saved pipeline: the variational bound in bits per dimension on held-out data (DDPM Eq. 5, "
            "every timestep, or an unbiased estimate with --bpd-timesteps K), and the sample quality of each "
            "sampler and number of steps: the digits FD (Frechet distance in the features of a digits classifier "
            "shipped with the package), KID, and class accuracy of labelled samples. The default data is the "
            "embedded digits' held-out test split. Prints a table; --json and --plot write files."
        ),
        formatter_class=_DefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model", required=True, help="a folder written by `train` / save_pretrained, or a Hub repo id"
    )
    parser.add_argument(
        "--metrics",
        type=_comma_separated,
        default=("bpd", "fd"),
        help=f"comma-separated, from {','.join(EVALUATION_METRICS)}",
    )
    parser.add_argument(
        "--data", default=None, help="folder of real images (default: the digits' test split)"
    )
    parser.add_argument(
        "--num-samples", type=_positive_int, default=500, help="images sampled per setting and seed"
    )
    parser.add_argument(
        "--steps", type=_steps_value, nargs="+", default=[100], help="sampling steps (several: one row each)"
    )
    parser.add_argument(
        "--scheduler",
        nargs="+",
        default=["ddpm"],
        metavar="SPEC",
        help="samplers: 'ddpm' (the model's scheduler) or a diffusers scheduler class name, with optional "
        "overrides NAME:key=value,... (e.g. ddpm:variance_type=fixed_large DPMSolverMultistepScheduler)",
    )
    parser.add_argument(
        "--unlabelled", action="store_true", help="sample a class-conditional model with the null class"
    )
    parser.add_argument("--guidance-scale", type=_finite_float, default=1.0, help="classifier-free guidance")
    parser.add_argument("--seeds", type=_positive_int, default=1, help="repeat each setting with K seeds")
    parser.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="the first seed: the K runs use seeds S, S+1, ..., S+K-1 (the bits/dim noise and the real-vs-real "
        "draw use S)",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=250, help="images per model call")
    parser.add_argument(
        "--bpd-timesteps",
        type=_positive_int,
        default=None,
        help="estimate bits/dim from K stratified timesteps per image (unbiased; default: the full chain)",
    )
    parser.add_argument(
        "--inception-weights",
        type=Path,
        default=None,
        metavar="FILE",
        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth for fid (and kid / precision-recall on "
        "data other than 8x8 digits); default: torch's hub cache, where torch-fidelity looks. Never downloaded",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
    parser.add_argument(
        "--plot", type=Path, default=None, help="write a PNG of FD (or FID) against steps here"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    import json

    from .data import atomic_write_bytes, check_output_file
    from .evaluation import EVALUATION_METRICS, format_report, plot_quality, run_evaluation
    from .hub import load_pipeline
    from .sampling import SchedulerSpec

    unknown = sorted(set(args.metrics) - set(EVALUATION_METRICS))
    if unknown or not args.metrics:
        raise ValueError(f"--metrics {','.join(args.metrics)!r}: choose from {','.join(EVALUATION_METRICS)}")
    for spec in args.scheduler:
        SchedulerSpec.parse(spec)
    if args.json is not None:
        check_output_file(args.json, "--json")
    if args.plot is not None:
        import importlib.util

        if args.plot.suffix.lower() != ".png":
            raise ValueError(f"--plot writes a PNG image: give it a .png name, got {str(args.plot)!r}")
        check_output_file(args.plot, "--plot")
        if importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--plot needs matplotlib: pip install 'ddpm-components[plots]'")
        if not {"fd", "fid"} & set(args.metrics):
            raise ValueError("--plot draws fd or fid against the steps: add one of them to --metrics")
    device = _torch_device(args.device)
    pipeline = load_pipeline(args.model)
    pipeline.to(device)
    report = run_evaluation(
        pipeline,
        model_name=str(args.model),
        metrics=args.metrics,
        data=args.data,
        num_samples=args.num_samples,
        steps=args.steps,
        schedulers=args.scheduler,
        labelled=not args.unlabelled,
        guidance_scale=args.guidance_scale,
        seeds=args.seeds,
        batch_size=args.batch_size,
        bpd_timesteps=args.bpd_timesteps,
        seed=args.seed,
        inception_weights=args.inception_weights,
    )
    print(format_report(report))
    if args.json is not None:
        atomic_write_bytes(args.json, (json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
        print(f"wrote {args.json}")
    if args.plot is not None:
        plot_quality(report, args.plot, metric="fd" if "fd" in args.metrics else "fid")
        print(f"wrote {args.plot}")
    return 0


# ---------------------------------------------------------------------------------------------- distill
def _add_distill_parser(subparsers: argparse._SubParsersAction) -> None:
    """``distill``: one flag per :class:`~ddpm_components.distillation.DistillationConfig` field."""
    from .distillation import DistillationConfig

    parser = subparsers.add_parser(
        "distill",
        help="progressive distillation: a saved model that samples in a few deterministic steps (e.g. 4)",
        description=(
            "Progressive distillation (Salimans & Ho 2022): starting from --teacher-steps DDIM steps of --model, each "
            "round trains a v-predicting student to match two teacher steps with one, then makes it the teacher, "
            "down to --target-steps. Saves a pipeline (DiffusionPipeline.from_pretrained(output_dir, "
            "trust_remote_code=True)) that samples in --target-steps steps by default, with checkpoints, "
            "metrics.jsonl and samples.png; Ctrl-C keeps the last checkpoint (--resume latest). See docs/distillation.md."
        ),
    )
    _add_dataclass_options(parser, DistillationConfig)
    parser.set_defaults(func=_run_distill)


def _run_distill(args: argparse.Namespace) -> int:
    """Distil; exit codes as ``train``'s."""
    from .distillation import DistillationConfig, distill

    config, summary = _run_training_command("distill", distill, DistillationConfig, args)
    if isinstance(summary, int):
        return summary
    if summary.get("is_main_process", True):
        rounds = summary["rounds"]
        chain = " -> ".join([str(rounds[0]["teacher_steps"])] + [str(r["student_steps"]) for r in rounds])
        print(
            f"distilled {chain} steps in {len(rounds)} rounds ({summary['global_step']} optimizer steps, "
            f"{summary['wall_time']:.0f} s); the pipeline (default {rounds[-1]['student_steps']} steps), samples.png "
            f"and metrics.jsonl are in {summary['output_dir']}"
        )
        evaluation = summary.get("evaluation") or {}
        if "eval_fd" in evaluation:
            print(
                f"evaluation: digits FD {evaluation['eval_fd']:.2f} ({config.eval_num_samples} samples, "
                f"{int(evaluation['eval_steps'])} steps)"
            )
    return 0


# ------------------------------------------------------------------------------------ analytic-variance
def _add_analytic_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "analytic-variance",
        help="estimate Analytic-DPM's moments for a saved model and make its scheduler use the optimal variance",
        description=(
            "Analytic-DPM (Bao et al. 2022): estimate Gamma_t = E||eps_theta(x_t, t)||^2/d at every training "
            "timestep by Monte Carlo on real data (the digits' training split by default; the true labels for a "
            "class-conditional model, no guidance), then write variance_type='analytic' and the moments into the "
            "saved pipeline's scheduler/scheduler_config.json (atomically; in the remote-code layout the current "
            "scheduling_ddpm.py is written beside it). Cost: one model call per timestep and image; for the 8x8 "
            "digits model on 2 CPU cores about 0.25 s per call of 250 images, so 1000 timesteps x 250 images take "
            "about 4-5 minutes (--timesteps K or fewer --num-images for less)."
        ),
        formatter_class=_DefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="a local folder written by `train` / save_pretrained")
    parser.add_argument(
        "--data", default=None, help="folder of real images (default: the embedded digits' training split)"
    )
    parser.add_argument(
        "--num-images", type=_positive_int, default=250, help="images (Monte Carlo samples) per timestep"
    )
    parser.add_argument(
        "--timesteps",
        type=_positive_int,
        default=None,
        help="estimate at K evenly spaced timesteps and interpolate linearly between them (default: every one)",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=250, help="images per model call")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of the image choice and the noise")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.set_defaults(func=_run_analytic)


def _analytic_data(pipeline: Any, data: str | None, num_images: int, generator: Any) -> tuple[Any, Any]:
    """``num_images`` real images (and labels for a class-conditional model) drawn without replacement."""
    import torch

    from .evaluation import _class_labels_for, reference_digits, reference_images

    if data is None:
        reference_images(pipeline, None)  # checks that the model makes 8x8 one-channel digits
        images, labels = reference_digits("train")
    else:
        images, labels = reference_images(pipeline, data)
    if num_images > images.shape[0]:
        raise ValueError(f"--num-images {num_images}: the data has only {images.shape[0]} images")
    chosen = torch.randperm(images.shape[0], generator=generator)[:num_images]
    conditional = getattr(pipeline.unet.config, "num_class_embeds", None) is not None
    labels = labels[chosen] if (labels is not None and conditional) else None
    return images[chosen], _class_labels_for(pipeline.unet, labels, num_images)


def _check_analytic_model(folder: Path, pipeline: Any) -> None:
    """The folder's scheduler is ours (diffusers' DDPMScheduler knows no analytic variance) and the U-Net
    predicts only the mean (a learned variance is already learned)."""
    import json

    from .data import check_output_file
    from .scheduling_ddpm import DDPMScheduler

    entry = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("scheduler")
    if (
        not isinstance(pipeline.scheduler, DDPMScheduler)
        or not entry
        or "scheduling_ddpm" not in str(entry[0])
    ):
        raise ValueError(
            f"--model {str(folder)!r}: its scheduler is {entry}, not ddpm-components' DDPMScheduler; only ours "
            "has variance_type='analytic'"
        )
    if pipeline.scheduler.config.variance_type in ("learned", "learned_range"):
        raise ValueError(
            f"--model {str(folder)!r} learns its variance (variance_type="
            f"{pipeline.scheduler.config.variance_type!r}); the analytic variance is for a fixed-variance model"
        )
    check_output_file(folder / "scheduler" / "scheduler_config.json", "--model")


def _run_analytic(args: argparse.Namespace) -> int:
    import time

    import torch

    from .analytic import estimate_analytic_moments, write_analytic_scheduler
    from .hub import load_pipeline

    folder = Path(args.model)
    if not folder.is_dir():
        raise ValueError(
            f"--model {args.model!r}: no such folder (the moments are written into a local folder)"
        )
    device = _torch_device(args.device)
    pipeline = load_pipeline(folder)
    _check_analytic_model(folder, pipeline)
    num_train = pipeline.scheduler.config.num_train_timesteps
    if args.timesteps is not None and args.timesteps > num_train:
        raise ValueError(f"--timesteps {args.timesteps} exceeds num_train_timesteps={num_train}")
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = _analytic_data(pipeline, args.data, args.num_images, generator)
    timesteps = None
    if args.timesteps is not None:
        timesteps = torch.linspace(0, num_train - 1, args.timesteps).round().long().tolist()
    pipeline.unet.to(device).eval()
    started = time.perf_counter()
    moments = estimate_analytic_moments(
        pipeline.unet,
        pipeline.scheduler,
        images,
        class_labels=labels,
        batch_size=args.batch_size,
        generator=generator,
        timesteps=timesteps,
        show_progress=True,
        progress_file=getattr(args, "stderr", sys.stderr),
    )
    path = write_analytic_scheduler(folder, pipeline.scheduler, moments)
    print(
        f"estimated Gamma_t at {len(timesteps) if timesteps else num_train} timesteps from {args.num_images} images "
        f"in {time.perf_counter() - started:.0f} s (Gamma_0 = {moments[0]:.4f}, Gamma_T-1 = {moments[-1]:.4f}); "
        f"wrote variance_type='analytic' to {path}"
    )
    return 0


# ------------------------------------------------------------------------------------------------ main
_MODEL_COMMANDS = ("sample", "evaluate", "analytic-variance")
"""Commands that run the model outside the trainer (``train`` and ``distill`` tune memory in their own setup)."""


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="ddpm-components",
        description="Denoising Diffusion Probabilistic Models as components for Hugging Face diffusers.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_forward_parser(subparsers)
    _add_sample_parser(subparsers)
    _add_push_parser(subparsers)
    _add_train_parser(subparsers)
    _add_evaluate_parser(subparsers)
    _add_distill_parser(subparsers)
    _add_analytic_parser(subparsers)
    return parser


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def describe_error(error: Exception) -> tuple[int, str]:
    """The exit code and the one-line message for an error that ended a command (see :func:`main`)."""
    import torch

    from .pipeline_ddpm import HubError

    if isinstance(error, (ValueError, FileNotFoundError, NotADirectoryError)):
        return EXIT_USAGE, _one_line(str(error))
    if isinstance(
        error, (HubError, FloatingPointError)
    ):  # FloatingPointError: a NaN/inf result, not a result
        return EXIT_FAILURE, _one_line(str(error))
    if isinstance(error, torch.OutOfMemoryError):
        first = (str(error).strip().splitlines() or [""])[0]
        return EXIT_FAILURE, f"out of memory ({first}); use fewer images per run or another --device"
    if isinstance(error, OSError):
        if error.strerror and error.filename:
            return EXIT_FAILURE, f"{error.strerror}: {str(error.filename)!r}"
        return EXIT_FAILURE, _one_line(str(error)) or type(error).__name__
    message = (str(error).strip().splitlines() or [""])[0]
    if isinstance(error, RuntimeError) and "timed out" in message.lower():
        # a collective of a multi-process run (gloo's message; NCCL's watchdog aborts the process instead)
        return EXIT_FAILURE, (
            f"{message}: another process did not reach the same point in time (it failed, or it is still working: "
            "then raise --process-group-timeout)"
        )
    return EXIT_FAILURE, (
        f"unexpected {type(error).__name__}: {message} (probably a bug in ddpm-components: run again with "
        f"{DEBUG_ENVIRONMENT_VARIABLE}=1 for the traceback and report it)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code.

    Every error ends in one line on stderr (``ddpm-components COMMAND: error: ...``), never a traceback:

    - exit code 2: a mistake in the options or the input files (``ValueError``, ``FileNotFoundError``,
      ``NotADirectoryError``; argparse's own errors too), found before any long work where it can be;
    - exit code 1: the environment failed (``HubError``; an ``OSError`` such as a full disk or a permission;
      out of memory), a result that is NaN or infinite (``FloatingPointError``), or an unexpected error, which is
      a bug: its line says so and how to see the traceback;
    - exit code 130: Ctrl-C (``interrupted``).

    With the environment variable ``DDPM_COMPONENTS_DEBUG=1`` errors propagate with their traceback instead.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    prefix = f"ddpm-components {args.command}"
    debug = os.environ.get(DEBUG_ENVIRONMENT_VARIABLE, "") not in ("", "0")
    args.stderr = stderr = _LineEndTracker(sys.stderr)  # progress bars write through it (see _run_sample)
    if args.command in _MODEL_COMMANDS:
        keep_freed_memory()  # CPU sampling and training without a page fault per new activation (cpu_memory.py)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as interrupt:
        if debug:
            raise
        _release_frames(interrupt)
        summary = getattr(args, "interrupted_summary", None)
        stderr.write_line(f"{prefix}: interrupted" + (f"; {summary}" if summary else ""))
        return EXIT_INTERRUPTED
    except Exception as error:
        if debug:
            raise
        _release_frames(error)
        code, message = describe_error(error)
        stderr.write_line(f"{prefix}: error: {message}")
        return code


class _LineEndTracker:
    """A text stream that passes everything to ``stream`` and remembers whether the last write ended a line, so
    that an error line never continues the line of a progress bar that an interrupt cut short."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.mid_line = False

    def write(self, text: str) -> int:
        if text:
            self.mid_line = not text.endswith("\n")
        return self._stream.write(text)

    def write_line(self, line: str) -> None:
        """``line`` on a line of its own."""
        self.write(("\n" if self.mid_line else "") + line + "\n")
        self.flush()

    def __getattr__(self, name: str) -> Any:  # flush, isatty, encoding, fileno ... of the stream
        return getattr(self._stream, name)


def _release_frames(error: BaseException) -> None:
    """Drop the traceback of the failed command, so that what its frames hold is closed before the error line
    is printed: an interrupted progress bar then ends its line instead of sharing it with the message."""
    import gc

    while error is not None:
        error.__traceback__ = None
        error = error.__context__
    gc.collect()  # frames in reference cycles too


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
