"""Benchmark: training throughput and peak memory of our loop against a plain diffusers loop.

Rows (same model size, same batch, same data: the embedded digits, class-conditional):

- ``diffusers-loop``: the baseline. diffusers' ``UNet2DModel`` (our "digits" preset exported with
  ``to_unet2d()``, so the very same architecture and parameter count) + diffusers' ``DDPMScheduler.add_noise``
  + ``torch.optim.AdamW``, ε-MSE, batches drawn by index from a tensor: no data loader, no EMA, no clipping.
- ``plain-loop-our-unet``: the same plain loop with our ``DDPMUNet2DModel`` and our scheduler (model cost).
- ``ddpm-components-train``: our whole :func:`ddpm_components.training.train` loop: accelerate, DataLoader,
  label dropout, gradient clipping, warm-up schedule, EMA update every step, metrics (everything the
  ``ddpm-components train`` command does per step).

Allocator: ``train()`` on CPU makes glibc's malloc keep freed memory (``ddpm_components/cpu_memory.py``); the plain
loops run with glibc's defaults. To give every row the same allocator settings, run with
``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=18446744073709551615`` in the environment (our setting
then stands aside).

Every row runs in a fresh subprocess (so that its peak memory is its own: peak RSS on CPU,
``torch.cuda.max_memory_allocated`` on GPU); rows alternate, ``--repeats`` times, and the table shows the
median images/s, the ratio to the baseline (above 1: faster than the baseline) and the peak memory.

    python benchmarks/bench_training.py --quick            # fewer steps, one repetition
    python benchmarks/bench_training.py --threads 1 --clock cpu   # steadier on a shared machine
    python benchmarks/bench_training.py --device cuda      # GPU rows
    python benchmarks/bench_training.py --mixed-precision bf16   # every row under bfloat16 autocast
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROWS = ("diffusers-loop", "plain-loop-our-unet", "ddpm-components-train")


def _peak_memory_mib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _plain_loop(row: str, args: argparse.Namespace) -> float:
    import diffusers
    import torch
    import torch.nn.functional as F

    from ddpm_components import DDPMScheduler, DDPMUNet2DModel
    from ddpm_components.data import digits_tensor

    torch.manual_seed(0)
    device = torch.device(args.device)
    unet = DDPMUNet2DModel.from_preset("digits", sample_size=args.resolution, num_class_embeds=10)
    scheduler = DDPMScheduler()
    if row == "diffusers-loop":
        unet = unet.to_unet2d()
        scheduler = diffusers.DDPMScheduler()
    unet.to(device).train()
    images, labels = digits_tensor(args.resolution)
    images, labels = images.to(device), labels.to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = clock()
        index = torch.randint(0, images.shape[0], (args.batch_size,), device=device)
        original = images[index]
        noise = torch.randn_like(original)
        timesteps = torch.randint(0, 1000, (args.batch_size,), device=device)
        noisy = scheduler.add_noise(original, noise, timesteps)
        # --mixed-precision bf16: autocast around the forward, as accelerate does for train_unconditional.py
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16"):
            prediction = unet(noisy, timesteps, class_labels=labels[index]).sample
        loss = F.mse_loss(prediction.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch_size / (clock() - started)


def _our_train(args: argparse.Namespace) -> float:
    import torch

    from ddpm_components.training import TrainingConfig, train

    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"
    with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
        config = TrainingConfig(
            output_dir=folder,
            resolution=args.resolution,
            train_batch_size=args.batch_size,
            max_train_steps=args.warmup + args.steps,
            logging_steps=args.warmup,
            checkpointing_steps=0,
            num_inference_steps=1,
            samples_per_class=1,
            cpu_threads=torch.get_num_threads(),  # the same threads as the other rows (not train()'s auto choice)
            mixed_precision=args.mixed_precision,
        )
        train(config)
        with open(os.path.join(folder, "metrics.jsonl")) as handle:
            records = [json.loads(line) for line in handle]
    key = "cpu_time" if args.clock == "cpu" else "wall_time"
    # only the logging records carry the clocks (an evaluation record at the final step has numbers only)
    by_step = {record["step"]: record[key] for record in records if key in record}
    elapsed = by_step[args.warmup + args.steps] - by_step[args.warmup]
    return args.steps * args.batch_size / elapsed


def _child(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rate = _our_train(args) if args.row == "ddpm-components-train" else _plain_loop(args.row, args)
    print(json.dumps({"row": args.row, "images_per_second": rate, "peak_mib": _peak_memory_mib(args.device)}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--resolution", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40, help="timed optimizer steps per row")
    parser.add_argument(
        "--warmup", type=int, default=5, help="untimed steps first (steps must be a multiple)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall: elapsed time; cpu: the process's CPU time (steadier on a shared machine, CPU only)",
    )
    parser.add_argument(
        "--mixed-precision",
        default="no",
        choices=["no", "bf16"],
        help="bf16: every row under bfloat16 autocast (accelerate's --mixed_precision bf16); fast on CPUs with AMX",
    )
    parser.add_argument("--quick", action="store_true", help="--steps 10 --repeats 1")
    parser.add_argument(
        "--row", choices=ROWS, help=argparse.SUPPRESS
    )  # internal: run one row in this process
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 10, 1
    if args.steps % args.warmup:
        parser.error("--steps must be a multiple of --warmup (metrics are logged every --warmup steps)")
    if args.row is not None:
        _child(args)
        return

    import torch

    results: dict[str, list[dict]] = {row: [] for row in ROWS}
    forwarded = [
        "--device",
        args.device,
        "--batch-size",
        str(args.batch_size),
        "--resolution",
        str(args.resolution),
    ]
    forwarded += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    forwarded += ["--clock", args.clock, "--mixed-precision", args.mixed_precision]
    for repeat in range(args.repeats):
        for row in ROWS:
            output = subprocess.run(
                [sys.executable, __file__, "--row", row, *forwarded],
                capture_output=True,
                text=True,
                check=False,
            )
            if output.returncode != 0:
                raise SystemExit(f"row {row} failed:\n{output.stderr[-3000:]}")
            results[row].append(json.loads(output.stdout.strip().splitlines()[-1]))
            print(
                f"  repeat {repeat + 1}/{args.repeats} {row}: {results[row][-1]['images_per_second']:.0f} img/s",
                flush=True,
            )

    device_name = (
        torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    )
    print(
        f"\ntraining throughput, digits preset ({args.resolution}x{args.resolution}, class-conditional), "
        f"batch {args.batch_size}, {args.steps} timed steps after {args.warmup}, median of {args.repeats}; "
        f"device {args.device} ({device_name}), torch threads {args.threads or torch.get_num_threads()}, "
        f"{args.clock} clock, mixed precision {args.mixed_precision}"
    )
    baseline = statistics.median(r["images_per_second"] for r in results["diffusers-loop"])
    header = f"{'row':<24} {'images/s':>10} {'vs diffusers':>13} {'peak MiB':>10}"
    print(header)
    print("-" * len(header))
    for row in ROWS:
        rate = statistics.median(r["images_per_second"] for r in results[row])
        peak = max(r["peak_mib"] for r in results[row])
        print(f"{row:<24} {rate:>10.0f} {rate / baseline:>12.2f}x {peak:>10.0f}")
    print(
        "(peak MiB: resident set size of the row's process on CPU, including Python and libraries; "
        "torch.cuda.max_memory_allocated on GPU)"
    )


if __name__ == "__main__":
    main()
