"""Benchmark: ddpm_components.DDPMPipeline against diffusers' DDPMPipeline, same U-Net, same seed.

Both pipelines run in one process, in alternation, repetition by repetition, so that disturbances from other
work on the machine hit both alike. Every run also checks that both produced the same images.

Rows:

- ``overhead``: a U-Net that costs almost nothing (one 1x1 convolution), 3x32x32, batch 16: the time is the
  pipelines' own per-step work (scheduler step, noise, bookkeeping). Both use diffusers' DDPMScheduler.
- ``overhead-our-scheduler``: the same, but our pipeline runs with our DDPMScheduler (diffusers' with its own).
- ``digits``: the U-Net preset "digits" (1.6M parameters, random weights) on 1x8x8, batch 16: the U-Net
  dominates.

Columns: median and best time per sampling run (``--steps`` steps), per-step time, ours / diffusers ratio
(below 1 means ours is faster), and whether the images matched (exactly, or to 1e-4 with our scheduler).

- ``save`` (only when asked for, ``--rows save``): ``save_pretrained`` of the paper's CIFAR-10 pipeline
  (35.7M parameters, 143 MB) over an earlier save, ours (staged, fsynced, moved into place file by file, with
  a manifest) against diffusers' (written in place, no fsync), wall clock.

    python benchmarks/bench_pipeline.py --quick              # fewer steps and repetitions
    python benchmarks/bench_pipeline.py --threads 1 --clock cpu   # steadier on a shared machine
    python benchmarks/bench_pipeline.py --rows save --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import diffusers
import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput

from ddpm_components import DDPMPipeline, DDPMScheduler, DDPMUNet2DModel


class CheapUNet(ModelMixin, ConfigMixin):
    """A stand-in U-Net whose forward is one 1x1 convolution: sampling time is the pipeline's own."""

    @register_to_config
    def __init__(self, sample_size: int = 32, in_channels: int = 3, out_channels: int = 3):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        return UNet2DOutput(sample=self.conv(sample))


def _build(row: str):
    torch.manual_seed(0)
    unet = CheapUNet().eval() if row.startswith("overhead") else DDPMUNet2DModel.from_preset("digits").eval()
    theirs = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
    our_scheduler = DDPMScheduler() if row == "overhead-our-scheduler" else diffusers.DDPMScheduler()
    ours = DDPMPipeline(unet=unet, scheduler=our_scheduler)
    for pipeline in (theirs, ours):
        pipeline.set_progress_bar_config(disable=True)
    return theirs, ours


def _time(pipeline, steps: int, batch: int, clock) -> tuple[float, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    start = clock()
    images = pipeline(
        batch_size=batch, generator=generator, num_inference_steps=steps, output_type="pt"
    ).images
    return clock() - start, images


def _time_saves(repeats: int) -> None:
    """Median and best wall time of save_pretrained over an earlier save, diffusers' and ours."""
    torch.manual_seed(0)
    unet = DDPMUNet2DModel.from_preset("cifar10").eval()
    ours = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    theirs = diffusers.DDPMPipeline(unet=unet.to_unet2d(), scheduler=diffusers.DDPMScheduler())
    times: dict[str, list[float]] = {"diffusers": [], "ours": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats + 1):  # the first round writes the earlier save
            for name, pipeline in (("diffusers", theirs), ("ours", ours)):
                start = time.perf_counter()
                pipeline.save_pretrained(Path(tmp) / name)
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(values[1:]) for name, values in times.items()}
    best = {name: min(values[1:]) for name, values in times.items()}
    print(
        f"{'save (cifar10, 143 MB)':<24} {med['diffusers']:>6.2f}/{best['diffusers']:<5.2f}"
        f" {med['ours']:>6.2f}/{best['ours']:<5.2f} {'':>18} {'':>13}"
        f" {med['ours'] / med['diffusers']:>7.2f}/{best['ours'] / best['diffusers']:<7.2f} {'-':>12}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="overhead,overhead-our-scheduler,digits")
    parser.add_argument("--steps", type=int, default=1000, help="sampling steps per run (default 1000)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: thread CPU time")
    parser.add_argument("--quick", action="store_true", help="200 steps, 3 repetitions")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = min(args.steps, 200), min(args.repeats, 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() > 1:
        parser.error("--clock cpu measures one thread: use it with --threads 1")
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    print(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, {platform.processor() or platform.machine()},"
        f" {torch.get_num_threads()} threads, {args.clock} clock, {args.steps} steps, batch {args.batch},"
        f" {args.repeats} repetitions (median / best)"
    )
    header = (
        f"{'row':<24} {'diffusers s':>12} {'ours s':>12} {'diffusers ms/step':>18} {'ours ms/step':>13}"
        f" {'ours/diffusers':>15} {'same images':>12}"
    )
    print(header)
    print("-" * len(header))
    for row in args.rows.split(","):
        if row == "save":
            _time_saves(args.repeats)
            continue
        theirs, ours = _build(row)
        _time(theirs, 2, args.batch, clock), _time(ours, 2, args.batch, clock)  # warm-up
        times_theirs, times_ours, same = [], [], True
        for _ in range(args.repeats):
            t_theirs, images_theirs = _time(theirs, args.steps, args.batch, clock)
            t_ours, images_ours = _time(ours, args.steps, args.batch, clock)
            times_theirs.append(t_theirs)
            times_ours.append(t_ours)
            if row == "overhead-our-scheduler":
                same &= torch.allclose(images_ours, images_theirs, atol=1e-4, rtol=0)
            else:
                same &= torch.equal(images_ours, images_theirs)
        med_theirs, med_ours = statistics.median(times_theirs), statistics.median(times_ours)
        best_theirs, best_ours = min(times_theirs), min(times_ours)
        print(
            f"{row:<24} {med_theirs:>6.2f}/{best_theirs:<5.2f} {med_ours:>6.2f}/{best_ours:<5.2f}"
            f" {1000 * med_theirs / args.steps:>18.3f} {1000 * med_ours / args.steps:>13.3f}"
            f" {med_ours / med_theirs:>7.2f}/{best_ours / best_theirs:<7.2f}"
            f" {'yes' if same else 'NO':>12}"
        )


if __name__ == "__main__":
    main()
