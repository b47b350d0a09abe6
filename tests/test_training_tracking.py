"""Tracking (--report-to, --logging-dir: scalars, grad-norm, loss by quartile of t, sample grids as images) and
background pushes of periodic saves (--hub-push-every) against the loopback Hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAINING

from ddpm_components.cli import main
from ddpm_components.training import (
    TrainingConfig,
    _BackgroundPush,
    loss_by_quartile,
    shareable_config,
    train,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def tiny(output_dir: Path, **overrides) -> TrainingConfig:
    return TrainingConfig(output_dir=str(output_dir), **{**TINY_TRAINING, **overrides})


def _metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_by_quartile_sums_and_counts():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    timesteps = torch.tensor([0, 24, 25, 60, 99])  # T = 100: quarters [0, 25), [25, 50), [50, 75), [75, 100)
    table = loss_by_quartile(values, timesteps, 100)
    assert table.tolist() == [[3.0, 3.0, 4.0, 5.0], [2.0, 1.0, 1.0, 1.0]]


def test_tensorboard_scalars_images_and_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    config = tiny(
        out,
        max_train_steps=4,
        sample_every_steps=2,
        report_to="tensorboard",
        logging_dir="tb",
        max_grad_norm=0.0,
        evaluate=True,
        eval_num_samples=4,
        eval_inference_steps=2,
        eval_bpd_timesteps=2,
    )
    train(config)
    records = [record for record in _metrics(out) if "loss" in record]
    assert [record["step"] for record in records] == [1, 2, 3, 4]
    for record in records:
        assert record["grad_norm"] > 0  # measured also without clipping (max_grad_norm 0)
        quartiles = [record[f"loss_q{index}"] for index in range(4)]
        assert any(value is not None for value in quartiles)
        assert all(value is None or value >= 0 for value in quartiles)
    assert not (out / "logs").exists()  # --logging-dir tb: relative to the output folder
    (events,) = (out / "tb" / "ddpm-components").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    expected = {
        "loss",
        "mse",
        "lr",
        "images_per_second",
        "grad_norm",
        "loss_q0",
        "loss_q3",
        "eval_bpd",
        "eval_fd",
    }
    assert expected <= scalars, scalars
    assert [event.step for event in accumulator.Scalars("grad_norm")] == [1, 2, 3, 4]
    images = accumulator.Images("samples")
    assert [event.step for event in images] == [2, 4]  # the periodic grid, then the final one
    assert images[0].encoded_image_string.startswith(b"\x89PNG")


def test_grad_norm_is_the_norm_before_clipping(tmp_path):
    out = tmp_path / "out"
    train(tiny(out, max_train_steps=2, max_grad_norm=1e-6, learning_rate=1e-3))
    assert all(record["grad_norm"] > 1e-3 for record in _metrics(out))  # clipped to 1e-6, logged before


def test_wandb_offline_and_report_to_all(tmp_path, monkeypatch, capsys, offline_wandb):
    """--report-to all: every tracker installed (here tensorboard and wandb, offline: no account, no network)."""
    monkeypatch.chdir(tmp_path)
    flags = [
        "--output-dir",
        "out",
        "--max-train-steps",
        "2",
        "--sample-every-steps",
        "1",
        "--report-to",
        "all",
    ]
    for name, value in TINY_TRAINING.items():
        if isinstance(value, bool):
            flags.append(f"--{'' if value else 'no-'}{name.replace('_', '-')}")
        else:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    assert main(["train", *flags]) == 0, capsys.readouterr().err
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert any(run.rglob("*.wandb"))
    assert list((run / "files" / "media" / "images").glob("samples_*.png"))  # the grid as a wandb.Image
    assert list((tmp_path / "out" / "logs" / "ddpm-components").glob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"report_to": "comet"},
            "report_to must be one of 'none', 'tensorboard', 'wandb', 'all', got 'comet'",
        ),
        ({"logging_dir": " "}, "logging_dir must name a folder"),
        ({"hub_push_every": 2}, "hub_push_every=2 needs push_to_hub"),
        ({"hub_push_every": -1}, "hub_push_every must be zero or positive, got -1"),
        ({"hub_push_every": 2, "push_to_hub": True, "hub_model_id": "u/m"}, "set save_model_steps"),
    ],
)
def test_tracking_and_push_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainingConfig(**options)


def test_an_absolute_logging_dir_is_not_published(tmp_path):
    config = TrainingConfig(logging_dir=str(tmp_path / "tensorboard-logs"))
    assert shareable_config(config)["logging_dir"] == "tensorboard-logs"


def test_cli_bad_report_to_exits_2(tmp_path, capsys):
    assert main(["train", "--output-dir", str(tmp_path / "o"), "--report-to", "neptune"]) == 2
    err = capsys.readouterr().err
    assert "report_to must be one of" in err and "'neptune'" in err and not (tmp_path / "o").exists()


class _FakePipeline:
    def stage_for_hub(self, folder, repo_id, training_config=None):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "model_index.json").write_text(json.dumps(training_config))


def test_background_push_schedule_failure_retry_and_skip(caplog):
    """Every K-th save is pushed; a failure warns once and is retried at the next save; a save while an upload is
    in flight is skipped; wait() waits for the upload in flight; staging folders are removed."""
    config = TrainingConfig(push_to_hub=True, hub_model_id="user/m", hub_push_every=2, save_model_steps=1)
    calls, staged = [], []

    def upload(folder, repo_id, commit_message):
        calls.append(commit_message)
        staged.append(Path(folder))
        assert json.loads((Path(folder) / "model_index.json").read_text()) == {"step": len(calls)}
        if "step 2 " in commit_message:
            raise RuntimeError("500 Server Error\nsecond line")

    pusher = _BackgroundPush(config, upload=upload)
    pusher.create_repo = lambda repo_id, private: repo_id
    assert not pusher.offer(_FakePipeline(), 1, {"step": 0})  # the 1st save: not due
    assert pusher.offer(_FakePipeline(), 2, {"step": 1})  # the 2nd save: pushed, fails
    pusher.wait()
    assert pusher.failed == [2] and pusher.retry
    assert pusher.offer(_FakePipeline(), 3, {"step": 2})  # retried at the next save
    pusher.wait()
    assert pusher.pushed == [3] and not pusher.retry
    assert pusher.offer(_FakePipeline(), 4, {"step": 3})  # the 4th save: due
    pusher.wait()
    assert not pusher.offer(_FakePipeline(), 5, {"step": 9})
    assert pusher.offer(_FakePipeline(), 6, {"step": 4})
    pusher.wait()
    assert pusher.pushed == [3, 4, 6] and pusher.failed == [2] and pusher.skipped == []
    warnings = [record.getMessage() for record in caplog.records if "background push" in record.getMessage()]
    assert len(warnings) == 1 and "step 2" in warnings[0] and "\n" not in warnings[0], warnings
    assert not any(folder.exists() for folder in staged)  # staging folders removed after each upload


def test_background_push_in_flight_is_skipped_and_close_does_not_hang():
    config = TrainingConfig(push_to_hub=True, hub_model_id="user/m", hub_push_every=1, save_model_steps=1)
    release = threading.Event()
    pusher = _BackgroundPush(config, upload=lambda folder, repo_id, commit_message: release.wait(30))
    pusher.create_repo = lambda repo_id, private: repo_id
    assert pusher.offer(_FakePipeline(), 1, {})
    assert not pusher.offer(_FakePipeline(), 2, {}) and pusher.skipped == [2]  # one upload in flight at most
    started = time.perf_counter()
    pusher.close(timeout=0.2)  # a stuck upload: abandoned after the timeout (a daemon thread)
    assert time.perf_counter() - started < 5 and pusher.thread.daemon
    release.set()
    pusher.wait()


def _train_with_background_pushes(tmp_path, hub_server) -> tuple[subprocess.CompletedProcess, Path]:
    """8 tiny steps with --save-model-steps 1 --hub-push-every 2, pushed to the loopback Hub as user/tiny."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "ddpm_components", "train", "--output-dir", str(out)]
    command += ["--block-out-channels", "8,16", "--layers-per-block", "1", "--train-batch-size", "8"]
    command += ["--num-train-timesteps", "20", "--num-inference-steps", "2", "--samples-per-class", "1"]
    command += [
        "--no-evaluate",
        "--checkpointing-steps",
        "0",
        "--max-train-steps",
        "8",
        "--save-model-steps",
        "1",
    ]
    command += ["--push-to-hub", "--hub-model-id", "user/tiny", "--hub-push-every", "2"]
    env = {**hub_server.env, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, out


def _background_steps(messages: list[str]) -> list[int]:
    return [int(message.split(" at step ")[1].split()[0]) for message in messages if " at step " in message]


def test_hub_push_every_through_the_loopback_hub(tmp_path, hub_server):
    """--save-model-steps 1 --hub-push-every 2: the 2nd save's upload always lands (at most one is in flight, and
    the final push waits for it), later ones only on even saves not skipped for an upload in flight; the final
    push lands last. Which later saves are skipped depends on the machine's speed, so only their steps are
    checked."""
    result, out = _train_with_background_pushes(tmp_path, hub_server)
    assert "background push" not in result.stderr, result.stderr[-3000:]
    repo = hub_server.state.repos["user/tiny"]
    steps = _background_steps(repo.messages)
    assert steps[:1] == [2] and set(steps) <= {2, 4, 6, 8} and steps == sorted(steps), repo.messages
    assert repo.messages[-1] == "Upload DDPM pipeline (ddpm-components)"  # the final push, last
    assert json.loads(repo.files["training_config.json"])["max_train_steps"] == 8
    assert "model_index.json" in repo.files and os.path.isfile(out / "model_index.json")


def test_a_failed_background_push_is_one_warning_and_training_completes(tmp_path, hub_server):
    """The first upload fails (the Hub answers 500): one warning line naming step 2, training completes, and the
    final push lands last. A retry lands at a later save unless training ends first (the machine's speed decides;
    the retry itself is tested with a fake upload above)."""
    hub_server.state.fail_commits = 1
    result, _ = _train_with_background_pushes(tmp_path, hub_server)
    warnings = [line for line in result.stderr.splitlines() if "background push" in line]
    assert len(warnings) == 1 and "step 2" in warnings[0], result.stderr[-3000:]
    repo = hub_server.state.repos["user/tiny"]
    assert set(_background_steps(repo.messages)) <= set(range(3, 9)), repo.messages
    assert repo.messages[-1] == "Upload DDPM pipeline (ddpm-components)"
    assert json.loads(repo.files["training_config.json"])["max_train_steps"] == 8


def test_sigterm_with_an_upload_in_flight_does_not_hang(tmp_path, hub_server):
    """SIGTERM while a background upload hangs (the Hub holds the commit): the run stops at once with 143; the
    upload is abandoned (the repository holds no half commit), and its staging folder in the temporary directory
    (a copy of the pipeline) is removed as the process exits."""
    import signal

    hub_server.state.hold_commits = threading.Event()
    command = [sys.executable, "-m", "ddpm_components", "train", "--output-dir", str(tmp_path / "out")]
    command += ["--block-out-channels", "8,16", "--layers-per-block", "1", "--train-batch-size", "8"]
    command += ["--num-train-timesteps", "20", "--num-inference-steps", "2", "--samples-per-class", "1"]
    command += ["--no-evaluate", "--max-train-steps", "100000", "--save-model-steps", "2"]
    command += ["--push-to-hub", "--hub-model-id", "user/held", "--hub-push-every", "1"]
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = {**hub_server.env, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(Path(__file__).parents[1])}
    env["TMPDIR"] = str(temporary)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:
            if "in the background" in line:
                break
        time.sleep(1.0)  # the upload reaches the held commit
        started = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
        stopped_in = time.perf_counter() - started
    finally:
        hub_server.state.hold_commits.set()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, err[-3000:]
    assert stopped_in < 15, stopped_in
    assert "interrupted by SIGTERM" in err and "abandoned" in err, err[-3000:]
    assert hub_server.state.repos["user/held"].messages == []
    assert not [path.name for path in temporary.iterdir() if path.name.startswith("ddpm-push-")]


def test_a_tracker_that_is_not_installed_is_refused(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    hidden = {"tensorboard", "tensorboardX", "wandb"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in hidden else find_spec(name, *a)
    )
    with pytest.raises(ValueError, match=r"report_to='tensorboard' needs tensorboard: pip install"):
        TrainingConfig(report_to="tensorboard")
    with pytest.raises(ValueError, match="report_to='all' found no tracker installed"):
        TrainingConfig(report_to="all")
    TrainingConfig(report_to="none")
