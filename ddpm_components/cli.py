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
    parser.add_argument("--num-images", type=_positive_int, default=8, help="rows: how many digits (default 8)")
    parser.add_argument("--num-columns", type=_positive_int, default=10, help="columns from x_0 to x_T (default 10)")
    parser.add_argument("--resolution", type=_positive_int, default=32, help="image size in pixels (default 32)")
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

    from .data import digits_tensor, to_uint8_images
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    grid.save(tmp, format="PNG")
    tmp.replace(args.out)
    print(f"wrote {args.out} ({args.num_images} digits, x_0 -> x_T over t = 0, {', '.join(map(str, steps.tolist()))})")
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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(TrainingConfig)
    for item in dataclasses.fields(TrainingConfig):
        flag = "--" + item.name.replace("_", "-")
        annotation = hints[item.name]
        optional = isinstance(annotation, types.UnionType) and type(None) in typing.get_args(annotation)
        if optional:
            annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
        help_text = item.metadata.get("help", "")
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
        else:
            parser.add_argument(flag, type=annotation, default=item.default, help=help_text)
    parser.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    import dataclasses

    from .training import TrainingConfig, train

    names = [item.name for item in dataclasses.fields(TrainingConfig)]
    config = TrainingConfig(**{name: getattr(args, name) for name in names})
    summary = train(config)
    if summary.get("is_main_process", True):
        print(
            f"trained {summary['global_step']} steps in {summary['wall_time']:.0f} s "
            f"(last loss {summary['loss']:.4f}); pipeline, samples.png, training_config.json and "
            f"metrics.jsonl are in {summary['output_dir']}"
        )
    return 0


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpm-components",
        description="Denoising Diffusion Probabilistic Models as components for Hugging Face diffusers.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_forward_parser(subparsers)
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
