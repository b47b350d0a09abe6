"""Measure inpainting (RePaint) and ILVR super-resolution on the embedded 8×8 digits, with no retraining.

    OMP_NUM_THREADS=1 python benchmarks/control_digits.py --model runs/digits \\
        --inpaint 1000 250 100 100:10:10 --ilvr 1000 --json control.json --grid docs/control_digits.png

Inputs: the first ``--num-images`` digits of the held-out test split (``evaluation.reference_digits("test")``),
sampled UNLABELLED (the null class of a class-conditional model), image i seeded by ``image_seed(--seed, i)``.

- Inpainting: the bottom half (rows 4..7) is repainted (white in the mask). Reported: the largest difference
  between a result's kept pixels and the input's, in 1/255 steps after 8-bit quantisation (0 or 1 is exact), and
  the share of results that the shipped digits classifier assigns to the input's true class; with the same
  number for the inputs themselves and for the inputs with the bottom half blanked (black) as references.
  A spec ``S`` is plain replacement with S steps, ``S:L:K`` RePaint with jump_length L and jump_n_sample K.
- ILVR: the input area-down-sampled by 2 (4×4) is the reference; reported: the mean absolute difference (in
  [-1, 1]) between the result down-sampled by 2 and the reference, and the digits FD against the whole test
  split, next to bicubic up-sampling's FD (and the inputs' own FD, the floor).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ddpm_components import DDPMPipeline
from ddpm_components.digits_classifier import accuracy, load_digits_classifier
from ddpm_components.evaluation import digits_fd, reference_digits
from ddpm_components.sampling import image_seed


def _quantised(images01: torch.Tensor) -> torch.Tensor:
    """[0, 1] images as 8-bit levels (float), as a PNG stores them."""
    return (images01.clamp(0, 1) * 255).round()


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    return (images + 1) / 2


class _CountingUNet:
    """Counts the U-Net's forward calls (one per step, guidance batched)."""

    def __init__(self, pipe: DDPMPipeline) -> None:
        self.calls = 0
        forward = pipe.unet.forward

        def counted(*args, **kwargs):
            self.calls += 1
            return forward(*args, **kwargs)

        pipe.unet.forward = counted


def _generators(seed: int, count: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(image_seed(seed, index)) for index in range(count)]


def inpaint(pipe, counter, images, labels, classifier, spec: str, seed: int) -> tuple[dict, torch.Tensor]:
    steps, _, rest = spec.partition(":")
    jump_length, jump_n_sample = (int(v) for v in rest.split(":")) if rest else (None, 1)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:, :] = 1.0  # white = repaint: the bottom half
    counter.calls = 0
    start = time.perf_counter()
    out = pipe(
        image=images,
        mask_image=mask,
        num_inference_steps=int(steps),
        jump_length=jump_length,
        jump_n_sample=jump_n_sample,
        generator=_generators(seed, images.shape[0]),
        output_type="pt",
    ).images
    seconds = time.perf_counter() - start
    levels = _quantised(out)
    known = ~mask.bool().expand_as(levels)
    diff = (levels - _quantised(_to_unit(images)))[known].abs().max()
    results = levels / 127.5 - 1
    row = {
        "spec": spec,
        "steps": int(steps),
        "jump_length": jump_length,
        "jump_n_sample": jump_n_sample,
        "unet_calls": counter.calls,
        "seconds": round(seconds, 1),
        "known_max_diff_levels": float(diff),
        "accuracy": accuracy(classifier, results, labels),
    }
    return row, results


def ilvr(pipe, images, reference_all, spec: str, seed: int, factor: int = 2) -> tuple[dict, torch.Tensor]:
    steps, _, until = spec.partition(":")
    low = F.avg_pool2d(images, factor)
    start = time.perf_counter()
    out = pipe(
        reference_image=low,
        reference_factor=factor,
        reference_until=float(until) if until else None,
        num_inference_steps=int(steps),
        generator=_generators(seed, images.shape[0]),
        output_type="pt",
    ).images
    seconds = time.perf_counter() - start
    results = _quantised(out) / 127.5 - 1
    row = {
        "spec": spec,
        "steps": int(steps),
        "factor": factor,
        "seconds": round(seconds, 1),
        "downsampled_mean_abs_error": float((F.avg_pool2d(results, factor) - low).abs().mean()),
        "digits_fd": digits_fd(results, reference_all),
    }
    return row, results


def _grid(rows: list[tuple[str, torch.Tensor]], path: Path, columns: int, scale: int = 4) -> None:
    """Rows of images in [-1, 1], each tile up-scaled ×scale (nearest), labelled on the left; written as PNG."""
    from PIL import Image, ImageDraw

    size, gap, label_width = 8 * scale, 2, 120
    grid = Image.new("L", (label_width + columns * (size + gap), len(rows) * (size + gap)), 64)
    draw = ImageDraw.Draw(grid)
    for row, (name, images) in enumerate(rows):
        tiles = F.interpolate(_to_unit(images[:columns]).clamp(0, 1), scale_factor=scale, mode="nearest")
        top = row * (size + gap)
        draw.text((4, top + size // 2 - 6), name, fill=255)
        for column, tile in enumerate(tiles):
            pixels = (tile[0] * 255).round().to(torch.uint8).numpy()
            grid.paste(Image.fromarray(pixels, mode="L"), (label_width + column * (size + gap), top))
    grid.save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", required=True, help="a saved digits pipeline (e.g. the main job's runs/digits)"
    )
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inpaint", nargs="*", default=["250", "100", "100:10:10"], metavar="S[:L:K]")
    parser.add_argument("--ilvr", nargs="*", default=["250"], metavar="S[:UNTIL]")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--grid", type=Path, default=None, help="a PNG: inputs, mask, results (10 columns)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    pipe = DDPMPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    counter = _CountingUNet(pipe)
    classifier = load_digits_classifier()
    reference_all, labels_all = reference_digits("test")
    images, labels = reference_all[: args.num_images], labels_all[: args.num_images]
    blanked = images.clone()
    blanked[..., 4:, :] = -1.0
    report = {
        "model": str(args.model),
        "num_images": images.shape[0],
        "seed": args.seed,
        "accuracy_inputs": accuracy(classifier, images, labels),
        "accuracy_bottom_blanked": accuracy(classifier, blanked, labels),
        "inpaint": [],
        "ilvr": [],
    }
    print(
        f"inputs: accuracy {report['accuracy_inputs']:.3f}; bottom half blanked: {report['accuracy_bottom_blanked']:.3f}"
    )
    grid_rows = [("input", images), ("bottom blanked", blanked)]
    for spec in args.inpaint:
        row, results = inpaint(pipe, counter, images, labels, classifier, spec, args.seed)
        report["inpaint"].append(row)
        steps, _, jumps = spec.partition(":")
        name = f"RePaint {jumps.replace(':', '/')}, {steps} st." if jumps else f"plain, {steps} steps"
        grid_rows.append((name, results))
        print(json.dumps(row))
    low = F.avg_pool2d(images, 2)
    bicubic = F.interpolate(low, scale_factor=2, mode="bicubic", align_corners=False).clamp(-1, 1)
    report["fd_inputs"] = digits_fd(images, reference_all)
    report["fd_bicubic"] = digits_fd(bicubic, reference_all)
    print(f"digits FD: inputs {report['fd_inputs']:.3f}, bicubic x2 {report['fd_bicubic']:.3f}")
    grid_rows += [
        ("4x4 reference", F.interpolate(low, scale_factor=2, mode="nearest")),
        ("bicubic x2", bicubic),
    ]
    for spec in args.ilvr:
        row, results = ilvr(pipe, images, reference_all, spec, args.seed)
        row["fd_ratio_to_bicubic"] = row["digits_fd"] / report["fd_bicubic"]
        report["ilvr"].append(row)
        grid_rows.append((f"ILVR x2, {spec.partition(':')[0]} steps", results))
        print(json.dumps(row))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.grid is not None:
        _grid(grid_rows, args.grid, columns=10)
        print(f"wrote {args.grid}: rows " + ", ".join(name for name, _ in grid_rows))


if __name__ == "__main__":
    main()
