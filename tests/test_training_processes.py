"""Training in real processes: killed with SIGKILL and resumed; two ranks under ``accelerate launch``; push."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddpm_components.training import list_checkpoints

TINY_FLAGS = [
    "--no-evaluate",
    *("--block-out-channels", "8,16", "--layers-per-block", "1", "--num-train-timesteps", "50"),
    *(
        "--num-inference-steps",
        "2",
        "--samples-per-class",
        "1",
        "--lr-warmup-steps",
        "0",
        "--logging-steps",
        "1",
    ),
]
# files of a checkpoint: accelerate.save_state's for our loop (model, optimizer, RNG, EMA, step counter) and
# our run record (the learning-rate schedule has no state beyond the step: it is rebuilt on resume)
CHECKPOINT_FILES = {
    "model.safetensors",
    "optimizer.bin",
    "run.json",
    "random_states_0.pkl",
    "custom_checkpoint_0.pkl",
    "custom_checkpoint_1.pkl",
}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ACCELERATE_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    return env


def _metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_checkpoints_complete(output_dir: Path, ranks: int = 1) -> None:
    expected = CHECKPOINT_FILES | {f"random_states_{rank}.pkl" for rank in range(ranks)}
    for checkpoint in list_checkpoints(output_dir):
        missing = expected - {path.name for path in checkpoint.iterdir()}
        assert not missing, f"{checkpoint.name} is missing {missing}"


def test_sigkill_mid_run_then_resume_latest_reaches_the_target(tmp_path):
    output_dir = tmp_path / "run"
    command = [sys.executable, "-m", "ddpm_components", "train", "--output-dir", str(output_dir), *TINY_FLAGS]
    command += ["--train-batch-size", "8", "--max-train-steps", "150", "--checkpointing-steps", "5"]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if len(list_checkpoints(output_dir)) >= 2:
                break
            time.sleep(0.02)
        assert process.poll() is None, (
            "the run ended before it could be killed:\n" + process.stdout.read().decode()
        )
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = max(record["step"] for record in _metrics(output_dir))
    assert killed_at < 150
    _assert_checkpoints_complete(output_dir)  # whatever the moment of the kill

    resumed = subprocess.run(
        [*command, "--resume", "latest"], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    records = _metrics(output_dir)
    steps = [record["step"] for record in records]
    assert steps == sorted(set(steps)) and steps[-1] == 150  # no step logged twice, target reached
    assert all(math.isfinite(record["loss"]) for record in records)
    _assert_checkpoints_complete(output_dir)
    assert (output_dir / "model_index.json").exists() and (output_dir / "samples.png").exists()
    assert not [
        p for p in output_dir.iterdir() if p.name.startswith(("tmp-checkpoint", "deleting-checkpoint"))
    ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_with_accelerate_launch_shard_data_and_stay_in_sync(tmp_path):
    output_dir = tmp_path / "ddp"
    # on a machine without GPUs, `--multi_gpu` starts torchrun and accelerate picks MULTI_CPU with gloo
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", str(_free_port()), "--num_cpu_threads_per_process", "1"]
    command += ["-m", "ddpm_components", "train", "--output-dir", str(output_dir), *TINY_FLAGS]
    command += [
        "--train-batch-size",
        "8",
        "--max-train-steps",
        "4",
        "--checkpointing-steps",
        "2",
        "--debug-record",
        # the final grid and evaluation, drawn by both ranks (each its share)
        *("--samples-per-class", "3", "--num-inference-steps", "4", "--evaluate", "--eval-num-samples", "20"),
        *("--eval-inference-steps", "3", "--eval-bpd-timesteps", "2"),
    ]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # each micro-batch: two different shards, 8 indices each; no index twice within the epoch
    lines = (output_dir / "debug" / "sample_indices.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [record["micro_step"] for record in records] == [0, 1, 2, 3]
    seen: list[int] = []
    for record in records:
        rank0, rank1 = record["indices"]
        assert len(rank0) == len(rank1) == 8 and not set(rank0) & set(rank1)
        seen += rank0 + rank1
    assert len(seen) == len(set(seen)) == 64

    # parameters identical on both ranks at the end (gathered checksums)
    rank0_sums, rank1_sums = json.loads((output_dir / "debug" / "parameter_checksums.json").read_text())
    assert rank0_sums == rank1_sums

    # only the main process logs and writes: one metrics line per step, one summary line, rank-0 files only
    assert [record["step"] for record in _metrics(output_dir)] == [1, 2, 3, 4, 4]  # 4: the final evaluation
    assert result.stdout.count("trained 4 steps") == 1
    _assert_checkpoints_complete(output_dir, ranks=2)
    assert sorted(p.name for p in list_checkpoints(output_dir)) == ["checkpoint-2", "checkpoint-4"]
    assert (output_dir / "model_index.json").exists()
    _assert_one_process_draws_the_same(output_dir, _metrics(output_dir)[-1])


def _assert_one_process_draws_the_same(output_dir: Path, evaluation: dict) -> None:
    """The grid and the evaluation of a 2-process run (each rank drew its share of the samples) are those that
    one process draws from the saved model: the same pixels and digits FD. The bits/dim estimate was computed by
    both ranks too (each its share of the images, with its own generator), so its random timesteps differ from one
    process's: the two estimates agree within 5 standard errors."""
    import numpy as np
    from PIL import Image

    from ddpm_components import DDPMPipeline
    from ddpm_components.data import DigitsDataset
    from ddpm_components.training import TrainingConfig, evaluate_during_training, sample_grid

    pipeline = DDPMPipeline.from_pretrained(output_dir)
    saved = json.loads((output_dir / "training_config.json").read_text())
    config = TrainingConfig.from_dict({**saved, "output_dir": str(output_dir.parent / "unused")})
    grid = sample_grid(pipeline.unet, pipeline.scheduler, config, 10, pipeline.device)
    assert np.array_equal(np.asarray(Image.open(output_dir / "samples.png")), np.asarray(grid))
    numbers = evaluate_during_training(
        pipeline.unet, pipeline.scheduler, config, DigitsDataset(), 10, pipeline.device
    )
    bpd = ("eval_bpd", "eval_bpd_stderr")
    assert {key: value for key, value in numbers.items() if key not in bpd} == {
        key: value for key, value in evaluation.items() if key not in ("step", *bpd)
    }
    difference = abs(numbers["eval_bpd"] - evaluation["eval_bpd"])
    assert difference < 5 * math.hypot(numbers["eval_bpd_stderr"], evaluation["eval_bpd_stderr"]), (
        numbers,
        evaluation,
    )
    assert numbers["eval_bpd"] != evaluation["eval_bpd"]  # drawn by two ranks, not by the main one alone


@pytest.mark.usefixtures("torch_single_thread")
def test_push_to_hub_uploads_pipeline_card_and_training_config(tmp_path, hub_server):
    output_dir = tmp_path / "pushed"
    command = [sys.executable, "-m", "ddpm_components", "train", "--output-dir", str(output_dir), *TINY_FLAGS]
    command += ["--train-batch-size", "8", "--max-train-steps", "2", "--checkpointing-steps", "0"]
    command += ["--push-to-hub", "--hub-model-id", "user/tiny-digits"]
    env = {**hub_server.env, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = hub_server.state.repos["user/tiny-digits"].files
    for name in ["model_index.json", "pipeline_ddpm.py", "unet/unet_ddpm.py", "scheduler/scheduling_ddpm.py"]:
        assert name in files, name
    assert json.loads(files["training_config.json"])["max_train_steps"] == 2
    card = files["README.md"].decode()
    assert "max_train_steps" in card


# a launcher that makes the main rank sleep before it draws its share of every sample grid (a slow main rank)
_SLOW_MAIN_RANK = """
import os, sys, time
import ddpm_components.training as training

drawn = training.sample_shared

def slow_main_rank(*args, **kwargs):
    if os.environ.get("RANK", "0") == "0":
        time.sleep(float(os.environ["SLOW_MAIN_SECONDS"]))
    return drawn(*args, **kwargs)

training.sample_shared = slow_main_rank
from ddpm_components.cli import main
raise SystemExit(main())
"""


def _launch_two(script: Path, output_dir: Path, *flags: str, delay: float) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", str(_free_port()), "--num_cpu_threads_per_process", "1"]
    command += [str(script), "train", "--output-dir", str(output_dir), *TINY_FLAGS]
    command += ["--train-batch-size", "8", "--max-train-steps", "2", "--checkpointing-steps", "0", *flags]
    env = {**_env(), "SLOW_MAIN_SECONDS": str(delay)}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # two 2-process runs, with a 6 s delay each: about 35 s
def test_process_group_timeout_reaches_gloo_and_a_slow_main_rank_completes(tmp_path):
    """The main rank 6 s late at the final grid (the other rank waits for it in the grid's gather): with
    --process-group-timeout 2 the other rank's gather times out and the run fails, so the option reaches
    torch.distributed (gloo); the same run with 60 completes."""
    script = tmp_path / "slow_main_rank.py"
    script.write_text(_SLOW_MAIN_RANK)
    grid_flags = ["--samples-per-class", "3", "--num-inference-steps", "4"]

    short = _launch_two(script, tmp_path / "short", *grid_flags, "--process-group-timeout", "2", delay=6)
    assert short.returncode != 0, short.stdout[-2000:] + short.stderr[-2000:]
    # rank 1 times out in the grid's gather and closes its connections; whichever rank reports first ends the run
    output = (short.stdout + short.stderr).lower()
    assert "timed out" in output or "connection closed by peer" in output, short.stderr[-3000:]
    assert not (tmp_path / "short" / "model_index.json").exists()

    output_dir = tmp_path / "generous"
    result = _launch_two(script, output_dir, *grid_flags, "--process-group-timeout", "60", delay=6)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (output_dir / "model_index.json").exists() and (output_dir / "samples.png").exists()
