"""Ctrl-C and SIGTERM during training, in a real process with a real signal (issue 9, item 6).

Each case: the run stops within a few seconds, exits with 130 (SIGINT) or 143 (SIGTERM), prints one line that
names the checkpoint kept and the command that resumes (no traceback), writes no checkpoint at the interrupt
and leaves no temporary file; the printed command, run again, finishes the training.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddpm_components.cli import main
from ddpm_components.training import list_checkpoints

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TINY_FLAGS = [
    "--no-evaluate",
    *("--block-out-channels", "8,16", "--layers-per-block", "1", "--train-batch-size", "8"),
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
MESSAGE = re.compile(
    r"^ddpm-components train: interrupted by (SIGINT|SIGTERM) (at step \d+|during the final sample grid after step "
    r"\d+); the model was not saved and no checkpoint was written now; kept (\S+)\. Resume with: (.+)$"
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ACCELERATE_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    return env


def _start(arguments: list[str], cwd: Path) -> subprocess.Popen:
    # a session of its own, so that the test can signal the whole process group like a terminal's Ctrl-C
    return subprocess.Popen(
        [sys.executable, "-m", "ddpm_components", "train", *arguments],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(
                f"the run ended early ({process.returncode}):\n{process.communicate()[1][-3000:]}"
            )
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError("the run did not get there in time")
        time.sleep(0.02)


def _stop(process: subprocess.Popen, number: int, whole_group: bool) -> tuple[str, str, float]:
    sent = time.monotonic()
    if whole_group:
        os.killpg(process.pid, number)  # as Ctrl-C in a terminal: the data-loader workers get it too
    else:
        process.send_signal(number)  # as `kill` / a container stop: only the training process
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"the run did not stop within 60 s of the signal:\n{stderr[-3000:]}") from None
    return stdout, stderr, time.monotonic() - sent


def _check_interrupt(
    folder: Path, stderr: str, returncode: int, number: int, leftovers_before: set[str]
) -> tuple[str, str]:
    """The exit code, the one line and a clean folder; returns (the kept checkpoint, the resume command)."""
    assert returncode == 128 + number, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("ddpm-components")]
    assert len(lines) == 1, lines
    match = MESSAGE.match(lines[0])
    assert match and match.group(1) == signal.Signals(number).name, lines[0]
    kept, command = match.group(3), match.group(4)
    # no checkpoint written at the interrupt: the kept one is the newest, and it is whole
    assert Path(kept).name == list_checkpoints(folder)[-1].name
    names = {path.name for path in (folder.parent / kept).iterdir()}  # (relative to the run's working folder)
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "run.json"} <= names
    temporary = {
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.name.endswith(".tmp") or path.name.startswith(("tmp-checkpoint", "deleting-checkpoint", "."))
    }
    assert temporary <= leftovers_before, temporary
    return kept, command


def _resume(command: str, cwd: Path, target_steps: int, extra: list[str] = ()) -> int:
    """Run the printed command to ``target_steps`` (in this process, through the command line's ``main``, to
    save an interpreter start; the interrupted run was a real process)."""
    words = shlex.split(command)
    assert words[:2] == ["ddpm-components", "train"] and words[words.index("--resume") + 1] == "latest"
    position = words.index("--max-train-steps")
    words[position + 1] = str(target_steps)
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        return main([*words[1:], *extra])
    finally:
        os.chdir(previous)


@pytest.mark.parametrize(
    ("signal_name", "workers"),
    [
        ("SIGINT", 2),  # Ctrl-C: the whole process group, data-loader workers included
        ("SIGTERM", 2),
        # without workers (about 10 s each, mostly the interpreter start): with `pytest -m slow`
        pytest.param("SIGINT", 0, marks=pytest.mark.slow),
        pytest.param("SIGTERM", 0, marks=pytest.mark.slow),
    ],
)
def test_a_signal_mid_training_stops_at_the_next_step_and_resume_finishes(tmp_path, signal_name, workers):
    number = getattr(signal, signal_name)
    folder = tmp_path / "run"
    arguments = [
        "--output-dir",
        "run",
        *TINY_FLAGS,
        "--num-train-timesteps",
        "50",
        "--max-train-steps",
        "100000",
    ]
    arguments += ["--checkpointing-steps", "3", "--dataloader-num-workers", str(workers)]
    process = _start(arguments, tmp_path)
    _wait_for(lambda: len(list_checkpoints(folder)) >= 1, process)
    _, stderr, took = _stop(process, number, whole_group=number == signal.SIGINT)
    assert (
        took < 30
    )  # (the bound is the signal contract's 5 s plus interpreter exit; generous for a busy machine)
    kept, command = _check_interrupt(folder, stderr, process.returncode, number, set())
    assert not (folder / "model_index.json").exists()

    kept_step = int(kept.rsplit("-", 1)[1])
    assert _resume(command, tmp_path, kept_step + 2) == 0
    steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, kept_step + 3))  # every step once
    assert (folder / "model_index.json").exists()


def test_sigint_during_the_final_sample_grid_stops_without_saving_and_resume_saves(tmp_path):
    folder = tmp_path / "run"
    arguments = [
        "--output-dir",
        "run",
        *TINY_FLAGS,
        "--num-train-timesteps",
        "1000",
        "--max-train-steps",
        "2",
    ]
    arguments += [
        "--checkpointing-steps",
        "2",
        "--num-inference-steps",
        "1000",
    ]  # the last one counts: 1000 steps
    process = _start(arguments, tmp_path)
    for line in process.stdout:  # train() announces the grid just before it starts
        if line.startswith("sampling the final grid"):
            break
    time.sleep(0.3)
    _, stderr, _ = _stop(process, signal.SIGINT, whole_group=True)
    _, command = _check_interrupt(folder, stderr, process.returncode, signal.SIGINT, set())
    assert "during the final sample grid after step 2" in stderr
    assert not (folder / "model_index.json").exists() and not (folder / "samples.png").exists()

    assert _resume(command, tmp_path, 2, ["--num-inference-steps", "20"]) == 0  # sample options may change
    assert (folder / "model_index.json").exists() and (folder / "samples.png").exists()
