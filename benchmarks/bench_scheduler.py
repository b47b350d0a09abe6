"""Microseconds per DDPM ``step``: ddpm_components.DDPMScheduler vs diffusers.DDPMScheduler, same process.

Each row runs the same chain of timesteps (every 10th timestep of a 1000-step schedule, as DDPMPipeline sets
it, plus t = 0) on the same sample and model output and reports the median over repeats of the mean time per
step. Rows:

- ``diffusers eager``: diffusers' step with a generator (what DDPMPipeline does);
- ``randn_tensor draw alone``: the noise draw both steps make (identical draws are part of the contract, so this
  part of the cost cannot shrink);
- ``ours eager, generator``: the same call on ours (same random draws, same work);
- ``ours eager, variance_noise``: the noise drawn beforehand and passed in (``randn`` excluded from the step);
- ``ours eager, tensor t``: timesteps as 1-element tensors on the sample's device (the compile-friendly path);
- ``diffusers compiled`` / ``ours compiled``: ``torch.compile`` of each step. Ours with ``fullgraph=True`` and
  ``variance_noise``; diffusers with its default (graph breaks allowed) and no generator, since a generator
  cannot be traced. If compilation fails, the row says why.

The ratio column is row time / ``diffusers eager`` time for the same device and shape.

    python benchmarks/bench_scheduler.py            # CPU (and CUDA when present)
    python benchmarks/bench_scheduler.py --quick    # fewer repeats, no compiled rows
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import torch
from diffusers import DDPMScheduler as DiffusersDDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from ddpm_components import DDPMScheduler

SHAPES = [(16, 3, 32, 32), (1, 4, 64, 64)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_chain(
    run_step: Callable[[int, torch.Tensor], object], timesteps: list, device, repeats: int
) -> float:
    """Median over ``repeats`` of the mean microseconds per step over ``timesteps`` (after one warm-up chain)."""
    for index, t in enumerate(timesteps):
        run_step(index, t)
    synchronize(device)
    results = []
    for _ in range(repeats):
        start = time.perf_counter()
        for index, t in enumerate(timesteps):
            run_step(index, t)
        synchronize(device)
        results.append((time.perf_counter() - start) / len(timesteps) * 1e6)
    return statistics.median(results)


def bench_shape(shape, device: torch.device, repeats: int, compile_rows: bool) -> list[tuple[str, str]]:
    g = torch.Generator(device=device).manual_seed(0)
    sample = torch.randn(shape, generator=g, device=device)
    model_output = torch.randn(shape, generator=g, device=device)
    noises = [torch.randn(shape, generator=g, device=device) for _ in range(2)]

    ours, theirs = DDPMScheduler(), DiffusersDDPMScheduler()
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(1000, device=device)
    chain = [*range(990, -1, -10), 0][:101]
    int_timesteps = chain
    tensor_timesteps = [torch.tensor([t], device=device) for t in chain]
    scalar_tensor_timesteps = [torch.tensor(t, device=device) for t in chain]
    generator = torch.Generator(device=device).manual_seed(1)
    rows: list[tuple[str, float | str]] = []

    rows.append(
        (
            "diffusers eager",
            time_chain(
                lambda i, t: theirs.step(model_output, t, sample, generator=generator),
                scalar_tensor_timesteps,
                device,
                repeats,
            ),
        )
    )
    rows.append(
        (
            "  randn_tensor draw alone (in both)",
            time_chain(
                lambda i, t: randn_tensor(shape, generator=generator, device=device, dtype=sample.dtype),
                chain[:-1],
                device,
                repeats,
            ),
        )
    )
    rows.append(
        (
            "ours eager, generator",
            time_chain(
                lambda i, t: ours.step(model_output, t, sample, generator=generator),
                scalar_tensor_timesteps,
                device,
                repeats,
            ),
        )
    )
    rows.append(
        (
            "ours eager, variance_noise",
            time_chain(
                lambda i, t: ours.step(model_output, t, sample, variance_noise=noises[i % 2]),
                int_timesteps,
                device,
                repeats,
            ),
        )
    )
    rows.append(
        (
            "ours eager, tensor t",
            time_chain(
                lambda i, t: ours.step(model_output, t, sample, variance_noise=noises[i % 2]),
                tensor_timesteps,
                device,
                repeats,
            ),
        )
    )
    if compile_rows:
        torch._dynamo.reset()
        try:
            compiled_theirs = torch.compile(theirs.step)
            rows.append(
                (
                    "diffusers compiled (no generator)",
                    time_chain(
                        lambda i, t: compiled_theirs(model_output, t, sample, return_dict=False),
                        scalar_tensor_timesteps,
                        device,
                        max(1, repeats // 2),
                    ),
                )
            )
        except Exception as error:  # report, do not hide, why diffusers' step does not compile
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            rows.append(
                ("diffusers compiled (no generator)", f"fails: {type(error).__name__}: {first_line}"[:100])
            )
        torch._dynamo.reset()
        compiled_ours = torch.compile(ours.step, fullgraph=True)
        rows.append(
            (
                "ours compiled, variance_noise",
                time_chain(
                    lambda i, t: compiled_ours(
                        model_output, t, sample, variance_noise=noises[i % 2], return_dict=False
                    ),
                    tensor_timesteps,
                    device,
                    repeats,
                ),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="3 repeats and no compiled rows")
    parser.add_argument("--repeats", type=int, default=None, help="chains timed per row (default 7, quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU rows")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # diffusers' step breaks the graph at every data-dependent branch; keep dynamo's per-break warnings quiet
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    torch._logging.set_logs(dynamo=logging.ERROR, graph_breaks=False, recompiles=False)
    repeats = args.repeats or (3 if args.quick else 7)
    devices = []
    if args.device in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {repeats}")
    header = f"{'device':<6} {'shape':<14} {'row':<36} {'us/step':>10} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for device in devices:
        for shape in SHAPES:
            rows = bench_shape(shape, device, repeats, compile_rows=not args.quick)
            baseline = rows[0][1]
            for name, value in rows:
                shape_text = "x".join(map(str, shape))
                if isinstance(value, str):
                    print(f"{device.type:<6} {shape_text:<14} {name:<36} {value}")
                else:
                    print(
                        f"{device.type:<6} {shape_text:<14} {name:<36} {value:>10.1f} {value / baseline:>7.2f}"
                    )


if __name__ == "__main__":
    main()
