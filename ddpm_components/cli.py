"""The ``ddpm-components`` command line (also ``python -m ddpm_components``).

Sub-commands:

- ``forward``: show the forward (noising) process q(x_t | x_0) on a few embedded digits, x_0 → x_T;
- ``sample``: sample images from a saved pipeline (a folder or a Hub repo id);
- ``push``: push a saved pipeline folder to the Hugging Face Hub;
- ``train``: train a DDPM on a folder of images or on the embedded digits.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {number}")
    return number


# --------------------------------------------------------------------------------------------- forward
def _add_forward_parser(subparsers: argparse._SubParsersAction) -> None:
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
        "--num-images", type=_positive_int, default=8, help="rows: how many digits (default 8)"
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
        help="beta schedule: linear, scaled_linear, squaredcos_cap_v2 or sigmoid (default linear)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for the noise (default 0)")
    parser.set_defaults(func=_run_forward)


def _run_forward(args: argparse.Namespace) -> int:
    import torch
    from diffusers.utils import make_image_grid
    from PIL import Image

    from .data import digits_tensor, save_png, to_uint8_images
    from .scheduling_ddpm import DDPMScheduler

    if args.num_columns < 2:
        raise ValueError(f"--num-columns must be at least 2 (x_0 and x_T), got {args.num_columns}")
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
def _add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    """``train``: one flag per :class:`~ddpm_components.training.TrainingConfig` field, generated from it."""
    import dataclasses
    import types
    import typing

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
    hints = typing.get_type_hints(TrainingConfig)
    for item in dataclasses.fields(TrainingConfig):
        flag = "--" + item.name.replace("_", "-")
        annotation = hints[item.name]
        optional = isinstance(annotation, types.UnionType) and type(None) in typing.get_args(annotation)
        if optional:
            annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
        help_text = item.metadata.get("help", "")
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
    parser.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    """Train; exit code 0, 1 when the loss diverged (NaN/inf), 128 + the signal number after SIGINT / SIGTERM
    (130 / 143), each with one line on stderr; bad options, data, folders or checkpoints raise ValueError (2)."""
    import dataclasses

    from .training import TrainingConfig, TrainingDiverged, TrainingInterrupted, train

    names = [item.name for item in dataclasses.fields(TrainingConfig)]
    config = TrainingConfig(**{name: getattr(args, name) for name in names})
    try:
        summary = train(config)
    except TrainingInterrupted as interrupt:
        print(f"ddpm-components train: {interrupt}", file=sys.stderr)
        return interrupt.exit_code
    except TrainingDiverged as error:
        if error.is_main_process:
            print(f"ddpm-components train: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:  # before train() installed its handlers
        print(
            "ddpm-components train: interrupted before training started; nothing was written", file=sys.stderr
        )
        return 130
    if summary.get("is_main_process", True):
        print(
            f"trained {summary['global_step']} steps in {summary['wall_time']:.0f} s "
            f"(last loss {summary['loss']:.4f}); pipeline, samples.png, training_config.json and "
            f"metrics.jsonl are in {summary['output_dir']}"
        )
    return 0


# ----------------------------------------------------------------------------------------------- sample
def _add_sample_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="sample images from a saved pipeline (a folder or a Hub repo id) into a PNG grid",
        description=(
            "Sample images from a saved DDPM pipeline and write them as one PNG grid (and optionally one PNG per "
            "image). Folders saved by ddpm-components load with the installed code (no stored code runs); Hub "
            "repos are downloaded first. Image-to-image (SDEdit): --init-image noises the image to the level "
            "--strength and denoises it from there."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        help="a folder written by save_pretrained / `train`, or a Hub repo id (user/name)",
    )
    parser.add_argument("--num-images", type=_positive_int, default=16, help="how many images to sample")
    parser.add_argument(
        "--steps",
        type=_positive_int,
        default=1000,
        help="denoising steps (1000 = the DDPM paper; fewer is faster and rougher)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed: the same seed gives the same images"
    )
    parser.add_argument(
        "--class-label",
        type=int,
        nargs="+",
        default=None,
        metavar="L",
        help="class label(s) for a class-conditional model: one for all images or one per image "
        "(default: unconditional, via the null class)",
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=1.0,
        help="classifier-free guidance weight g (eps = eps_uncond + g (eps_cond - eps_uncond)); 1 = off; needs "
        "--class-label and a model trained with label dropout",
    )
    parser.add_argument(
        "--init-image",
        type=Path,
        default=None,
        metavar="FILE",
        help="image-to-image: start from this image (resized to the model's resolution) instead of pure noise",
    )
    parser.add_argument(
        "--strength",
        type=float,
        default=None,
        help="with --init-image: the fraction of the schedule to run, in (0, 1]; small values stay close to the "
        "image (default 0.5)",
    )
    parser.add_argument("--out", type=Path, default=Path("samples.png"), help="output PNG grid")
    parser.add_argument(
        "--save-individual",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write one PNG per image into DIR",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow running component code stored with the model when it is not part of ddpm-components",
    )
    parser.set_defaults(func=_run_sample)


def _run_sample(args: argparse.Namespace) -> int:
    import math

    import torch
    from diffusers.utils import make_image_grid
    from PIL import Image

    from .data import save_png
    from .hub import HubError, load_pipeline

    if args.strength is not None and args.init_image is None:
        raise ValueError("--strength only applies to image-to-image: pass --init-image FILE as well")
    if args.init_image is not None and not args.init_image.is_file():
        raise FileNotFoundError(f"--init-image {str(args.init_image)!r}: no such file")
    if args.out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file, got {str(args.out)!r}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(
            f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1): {error}"
        ) from None
    try:
        pipeline = load_pipeline(args.model, trust_remote_code=args.trust_remote_code)
    except HubError as error:
        print(f"ddpm-components sample: error: {error}", file=sys.stderr)
        return 1
    pipeline.to(device)
    call_kwargs = {}
    if args.init_image is not None:
        channels, height, width = pipeline._sample_shape()
        with Image.open(args.init_image) as opened:
            init = opened.convert("L" if channels == 1 else "RGB").resize((width, height), Image.LANCZOS)
        call_kwargs.update(image=init, strength=0.5 if args.strength is None else args.strength)
    labels = args.class_label[0] if args.class_label and len(args.class_label) == 1 else args.class_label
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    images = pipeline(
        batch_size=args.num_images,
        generator=generator,
        num_inference_steps=args.steps,
        class_labels=labels,
        guidance_scale=args.guidance_scale,
        **call_kwargs,
    ).images
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    blank = Image.new(images[0].mode, images[0].size)
    grid = make_image_grid(images + [blank] * (rows * columns - len(images)), rows=rows, cols=columns)
    grid = grid.convert(images[0].mode)  # make_image_grid pastes onto RGB; keep greyscale greyscale
    save_png(grid, args.out)
    if args.save_individual is not None:
        for index, image in enumerate(images):
            save_png(image, args.save_individual / f"{index:04d}.png")
    where = f" and {len(images)} images in {args.save_individual}" if args.save_individual is not None else ""
    print(f"wrote {args.out} ({len(images)} images, {args.steps} steps, seed {args.seed}){where}")
    return 0


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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
        print(f"ddpm-components push: error: {error}", file=sys.stderr)
        print(f"ddpm-components push: nothing was changed in {args.model}", file=sys.stderr)
        return 1
    print(f"pushed {args.model} to {args.repo_id}: {url}")
    return 0


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpm-components",
        description="Denoising Diffusion Probabilistic Models as components for Hugging Face diffusers.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_forward_parser(subparsers)
    _add_sample_parser(subparsers)
    _add_push_parser(subparsers)
    _add_train_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        print(f"ddpm-components {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
