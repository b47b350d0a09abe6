"""Benchmark: DDPMUNet2DModel against diffusers' UNet2DModel, same configuration, same weights.

Both models are built in one process in google/ddpm-cifar10-32's configuration (35.7M parameters, random
weights; ours converted from diffusers' with ``from_unet2d``) and timed in alternation, repetition by
repetition, so that disturbances from other work on the machine hit both alike.

Rows (``--rows``, comma separated):

- ``fwd-b1``, ``fwd-b16``: forward pass (``torch.no_grad``, eval mode) at batch 1 / 16;
- ``fwd-b1-compiled``, ``fwd-b16-compiled``: the same after ``torch.compile`` (ours with ``fullgraph=True``);
- ``train-b16``: a training step (train mode, forward, MSE loss, backward) at batch 16.

Columns: median and best time per call in ms, speed-up of ours (diffusers' time / ours, from the medians and
from the best times), achieved GFLOP/s (each model's own FLOPs, counted with
``torch.utils.flop_counter.FlopCounterMode``, over its best time), and peak memory.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` around one call. On CPU, each (row, model) runs in
a fresh subprocess: after building the model and one warm-up call (and compilation), the process's peak
resident set (VmHWM) is reset through ``/proc/self/clear_refs``, one more call runs, and the reported number
is the peak resident set during that call minus the resident set before it (``ru_maxrss`` deltas where the
reset is unavailable). The subprocess runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc maps every
tensor-sized allocation separately and unmaps it on free: the resident set then follows the live tensors.
``--no-memory`` skips it.

Timing clock: wall time by default. On a machine shared with other work, ``--threads 1 --clock cpu`` (CPU
time of the calling thread, ``time.thread_time``) gives far steadier comparisons; CPU time is meaningless
with several threads.

Examples::

    python benchmarks/bench_unet.py --quick                 # fwd-b1 and fwd-b16, eager, few repetitions
    python benchmarks/bench_unet.py --rows fwd-b1,train-b16 --repeats 5
    python benchmarks/bench_unet.py                         # every row (compilation takes minutes on CPU)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import UNet2DModel
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ddpm_components.unet_ddpm import DDPMUNet2DModel

CIFAR10_UNET2D_CONFIG = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 256, 256),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 2,
    "downsample_padding": 0,
    "freq_shift": 1,
    "flip_sin_to_cos": False,
    "norm_eps": 1e-6,
    "attention_head_dim": None,
    "dropout": 0.1,
}
ROWS = ("fwd-b1", "fwd-b16", "fwd-b1-compiled", "fwd-b16-compiled", "train-b16")
QUICK_ROWS = ("fwd-b1", "fwd-b16")
MODELS = ("ours", "diffusers")


def parse_rows(text: str) -> list[str]:
    rows = [row.strip() for row in text.split(",") if row.strip()]
    bad = [row for row in rows if row not in ROWS]
    if bad or not rows:
        raise ValueError(f"unknown rows {bad or text!r}; valid rows: {', '.join(ROWS)}")
    return rows


def row_spec(row: str) -> tuple[str, int, bool]:
    """(kind "fwd"/"train", batch size, compiled)."""
    parts = row.split("-")
    return parts[0], int(parts[1][1:]), parts[-1] == "compiled"


def build_models(device: str, dtype: torch.dtype, channels_last: bool) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    theirs = UNet2DModel(**CIFAR10_UNET2D_CONFIG)
    ours = DDPMUNet2DModel.from_unet2d(theirs)
    models = {"ours": ours, "diffusers": theirs}
    for name, model in models.items():
        model = model.to(device=device)
        if model.dtype != dtype:
            model = model.to(dtype=dtype)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        models[name] = model
    return models


def make_inputs(batch: int, device: str, dtype: torch.dtype, channels_last: bool):
    generator = torch.Generator().manual_seed(batch)
    sample = torch.randn(batch, 3, 32, 32, generator=generator).to(device=device, dtype=dtype)
    if channels_last:
        sample = sample.contiguous(memory_format=torch.channels_last)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    target = torch.randn(sample.shape, generator=generator).to(device=device, dtype=dtype)
    return sample, timesteps, target


def make_call(model: torch.nn.Module, row: str, device: str, dtype: torch.dtype, channels_last: bool):
    """A zero-argument function running one call of ``row`` on ``model`` (compiling it first if asked)."""
    kind, batch, compiled = row_spec(row)
    sample, timesteps, target = make_inputs(batch, device, dtype, channels_last)
    model.train(kind == "train")
    runner = model
    if compiled:
        torch._dynamo.reset()
        runner = torch.compile(model, fullgraph=isinstance(model, DDPMUNet2DModel))

    if kind == "fwd":

        def call():
            with torch.no_grad():
                return runner(sample, timesteps).sample

    else:

        def call():
            model.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(runner(sample, timesteps).sample.float(), target.float())
            loss.backward()
            return loss

    return call


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def count_flops(call: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def matmul_gflops(
    device: str, dtype: torch.dtype, clock: Callable[[], float], size: int = 2048, repeats: int = 7
) -> float:
    """Best rate of a ``size``-cubed matrix product, timed with the same clock as the rows."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, clock() - start)
    return 2 * size**3 / best / 1e9


# ---------------------------------------------------------------------------------------------- memory
def _read_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure_peak_memory_here(args: argparse.Namespace, row: str, model_name: str) -> float:
    """Peak extra memory (MiB) of one call of ``row`` on ``model_name``, measured in this process."""
    dtype = getattr(torch, args.dtype)
    model = build_models(args.device, dtype, args.channels_last)[model_name]
    call = make_call(model, row, args.device, dtype, args.channels_last)
    call()  # warm-up: compilation, weight caches, allocator pools
    synchronize(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call()
        synchronize(args.device)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    if _reset_peak_rss():
        before = _read_status_kib("VmRSS")
        call()
        peak = _read_status_kib("VmHWM")
        if before is not None and peak is not None:
            return (peak - before) / 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    call()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def measure_peak_memory(args: argparse.Namespace, row: str, model_name: str) -> float | None:
    if args.device == "cuda":
        return measure_peak_memory_here(args, row, model_name)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-case",
        f"{row}:{model_name}",
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
    ]
    if args.channels_last:
        command.append("--channels-last")
    # glibc: serve every allocation of 64 KiB or more with mmap and give it back on free, so that the
    # resident set follows the live tensors instead of the allocator's retained free lists
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    for line in result.stdout.splitlines():
        if line.startswith("PEAK_MIB "):
            return float(line.split()[1])
    print(f"memory measurement for {row}/{model_name} failed:\n{result.stderr[-2000:]}", file=sys.stderr)
    return None


# ---------------------------------------------------------------------------------------------- timing
def time_row(args: argparse.Namespace, models: dict[str, torch.nn.Module], row: str) -> dict[str, dict]:
    dtype = getattr(torch, args.dtype)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    results: dict[str, dict] = {}
    calls = {}
    for name in MODELS:
        start = time.perf_counter()
        calls[name] = make_call(models[name], row, args.device, dtype, args.channels_last)
        calls[name]()  # first call: compiles when asked
        synchronize(args.device)
        results[name] = {"first_call_s": time.perf_counter() - start, "times": []}
        for _ in range(args.warmup):
            calls[name]()
        synchronize(args.device)
        results[name]["flops"] = count_flops(calls[name]) if not row_spec(row)[2] else None
    _, batch, _ = row_spec(row)
    repeats = args.repeats or (args.quick_repeats if args.quick else (10 if batch == 1 else 4))
    for repeat in tqdm(range(repeats), desc=row, leave=False):
        order = MODELS if repeat % 2 == 0 else tuple(reversed(MODELS))
        for name in order:
            synchronize(args.device)
            start = clock()
            calls[name]()
            synchronize(args.device)
            results[name]["times"].append(clock() - start)
    if row_spec(row)[2]:  # FLOPs of a compiled call: count the eager model's
        for name in MODELS:
            eager = make_call(
                models[name], row.removesuffix("-compiled"), args.device, dtype, args.channels_last
            )
            results[name]["flops"] = count_flops(eager)
    for name in MODELS:
        times = results[name]["times"]
        results[name]["median_ms"] = statistics.median(times) * 1e3
        results[name]["best_ms"] = min(times) * 1e3
        results[name]["gflops"] = results[name]["flops"] / min(times) / 1e9
    return results


def format_table(rows: list[str], results: dict[str, dict], memory: dict) -> str:
    header = (
        f"{'row':<18} {'ours ms (med/best)':>20} {'diffusers ms':>18} {'speed-up med':>13} {'best':>6} "
        f"{'GFLOP/s ours':>13} {'diffusers':>10} {'peak MiB ours':>14} {'diffusers':>10}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        ours, theirs = results[row]["ours"], results[row]["diffusers"]
        memory_ours = memory.get((row, "ours"))
        memory_theirs = memory.get((row, "diffusers"))
        lines.append(
            f"{row:<18} {ours['median_ms']:>10.1f} /{ours['best_ms']:>8.1f} "
            f"{theirs['median_ms']:>8.1f} /{theirs['best_ms']:>8.1f} "
            f"{theirs['median_ms'] / ours['median_ms']:>12.2f}x {theirs['best_ms'] / ours['best_ms']:>5.2f}x "
            f"{ours['gflops']:>13.1f} {theirs['gflops']:>10.1f} "
            f"{'n/a' if memory_ours is None else f'{memory_ours:.0f}':>14} "
            f"{'n/a' if memory_theirs is None else f'{memory_theirs:.0f}':>10}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rows", default=None, help=f"comma-separated rows (default: all): {', '.join(ROWS)}"
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"rows {', '.join(QUICK_ROWS)} with few repetitions"
    )
    parser.add_argument("--quick-repeats", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per model and row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls after the first (default 1)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="wall time or thread CPU time"
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="default: float32 on CPU, bfloat16 on CUDA",
    )
    parser.add_argument(
        "--channels-last", action="store_true", help="channels-last weights and inputs for both"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    torch.set_num_threads(args.threads)
    if args.memory_case:
        row, model_name = args.memory_case.split(":")
        print(f"PEAK_MIB {measure_peak_memory_here(args, row, model_name):.3f}")
        return 0
    if args.clock == "cpu" and args.threads != 1:
        print("note: --clock cpu measures the calling thread only; use it with --threads 1", file=sys.stderr)
    rows = parse_rows(args.rows) if args.rows else list(QUICK_ROWS if args.quick else ROWS)
    dtype = getattr(torch, args.dtype)
    models = build_models(args.device, dtype, args.channels_last)
    sample, timesteps, _ = make_inputs(2, args.device, dtype, args.channels_last)
    with torch.no_grad():
        models["ours"].eval()
        models["diffusers"].eval()
        difference = (
            models["ours"](sample, timesteps).sample - models["diffusers"](sample, timesteps).sample
        ).abs()
    parameters = sum(p.numel() for p in models["ours"].parameters())
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(
        f"DDPM CIFAR-10 U-Net ({parameters / 1e6:.2f}M parameters), {args.device} ({device_name}), {args.dtype}, "
        f"{args.threads} threads, clock={args.clock}, channels_last={args.channels_last}, torch {torch.__version__}"
    )
    print(f"max |ours - diffusers| on the same weights (batch 2): {difference.max().item():.2e}")
    reference = matmul_gflops(
        args.device, dtype, time.thread_time if args.clock == "cpu" else time.perf_counter
    )
    print(f"large matmul (2048^3, {args.dtype}): {reference:.1f} GFLOP/s")

    results: dict[str, dict] = {}
    memory: dict[tuple[str, str], float | None] = {}
    for row in tqdm(rows, desc="rows"):
        results[row] = time_row(args, models, row)
        if not args.no_memory:
            for name in MODELS:
                memory[(row, name)] = measure_peak_memory(args, row, name)
    print()
    print(format_table(rows, results, memory))
    print()
    for row in rows:
        flops = {name: results[row][name]["flops"] / 1e9 for name in MODELS}
        line = f"{row}: GFLOP per call ours {flops['ours']:.2f}, diffusers {flops['diffusers']:.2f}"
        if row_spec(row)[2]:
            first = {name: results[row][name]["first_call_s"] for name in MODELS}
            line += (
                f"; first call (compilation) ours {first['ours']:.0f} s, diffusers {first['diffusers']:.0f} s"
            )
        best_ours = results[row]["ours"]["best_ms"]
        line += f"; ours at {results[row]['ours']['gflops'] / reference:.0%} of the matmul rate"
        line += f" (diffusers-equivalent work: {flops['diffusers'] / best_ours * 1e3:.1f} GFLOP/s)"
        print(line)
    if args.json:
        payload = {
            "rows": {
                row: {
                    name: {k: v for k, v in results[row][name].items() if k != "times"}
                    | {"peak_mib": memory.get((row, name))}
                    for name in MODELS
                }
                for row in rows
            },
            "matmul_gflops": reference,
            "settings": {k: str(v) for k, v in vars(args).items()},
        }
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
