"""Training fails early and clearly, and never loses or corrupts what is in the output folder (issue 9).

- validate first: bad options, output folders and checkpoints are refused before anything is written;
- one run per output folder: a run id in training_config.json and every checkpoint; --overwrite deletes only
  our files; resume checks the run, the data, the diffusion and the U-Net, the step and the files;
- NaN/inf is an error: the run stops with a message naming the step and the checkpoint kept;
- metrics.jsonl is strict JSON, appended, and cut at the resumed step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAINING
from PIL import Image

from ddpm_components import training
from ddpm_components.cli import main
from ddpm_components.training import (
    TrainingConfig,
    TrainingDiverged,
    list_checkpoints,
    resume_command,
    train,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TINY = TINY_TRAINING
TINY_ARGS = [
    "--no-evaluate",
    *("--block-out-channels", "8,16", "--layers-per-block", "1", "--train-batch-size", "16"),
    *("--num-inference-steps", "2", "--samples-per-class", "1", "--lr-warmup-steps", "0"),
    *("--num-train-timesteps", "50", "--logging-steps", "1"),
]


def tiny_config(output_dir: Path, **overrides) -> TrainingConfig:
    return TrainingConfig(output_dir=str(output_dir), **{**TINY, **overrides})


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``folder`` with its mode and content (a folder's mode too)."""
    state = {}
    for path in sorted(folder.rglob("*")):
        key = path.relative_to(folder).as_posix()
        state[key] = (path.stat().st_mode, b"" if path.is_dir() else path.read_bytes())
    return state


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished tiny run (4 steps, checkpoints 2 and 4); tests copy it before changing anything."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(tiny_config(folder, max_train_steps=4, checkpointing_steps=2))
    finally:
        torch.set_num_threads(threads)
    return folder


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def image_folder(
    root: Path, classes: tuple[str, ...] = ("circle", "square"), count: int = 8, size: int = 8
) -> Path:
    rng = np.random.default_rng(0)
    for label in classes:
        for index in range(count):
            path = root / label / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return root


# --------------------------------------------------------------------------------------- validate first
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"learning_rate": math.inf}, "learning_rate must be a finite number, got inf"),
        ({"snr_gamma": math.nan}, "snr_gamma must be a finite number, got nan"),
        ({"guidance_scale": math.nan}, "guidance_scale must be a finite number, got nan"),
        ({"label_dropout": math.nan}, "label_dropout must be a finite number"),
        ({"ema_power": -math.inf}, "ema_power must be a finite number"),
        ({"model_dropout": math.nan}, "model_dropout must be a finite number"),
        ({"model_dropout": 1.0}, r"model_dropout must be in \[0, 1\), got 1.0"),
        ({"adam_epsilon": 0.0}, "adam_epsilon must be positive, got 0.0"),
        ({"ema_inv_gamma": 0.0}, "ema_inv_gamma must be positive"),
        ({"layers_per_block": 0}, "layers_per_block must be a positive integer, got 0"),
        ({"seed": 2**32}, r"seed must be in \[0, 2\*\*32 - 1\], got 4294967296"),
        ({"seed": -1}, "seed must be in"),
        ({"checkpoints_total_limit": -1}, "checkpoints_total_limit must be zero or positive, got -1"),
        (
            {"num_train_timesteps": 100},
            r"num_inference_steps \(1000\) must be at most num_train_timesteps \(100\)",
        ),
        (
            {"guidance_scale": 3.0, "conditioning": "none"},
            "guidance_scale=3.0 needs a class-conditional model",
        ),
        ({"resume": "latest", "overwrite": True}, "resume and overwrite exclude each other"),
        ({"multistep_order": 3}, "multistep_order must be 1 .* or 2 .*, got 3"),
        (
            {"timestep_spacing": "last"},
            "timestep_spacing must be one of 'trailing', 'leading', 'linspace', got 'last'",
        ),
        ({"eval_few_steps": -1}, "eval_few_steps must be zero or positive, got -1"),
    ],
)
def test_every_option_is_checked_when_the_config_is_made(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**overrides)


def test_inference_steps_above_t_fail_before_training(tmp_path, capsys):
    # today: trains 30 steps, then rejects the 1000 inference steps, and nothing is kept
    output = tmp_path / "o"
    code = main(
        ["train", "--output-dir", str(output), "--num-train-timesteps", "100", "--max-train-steps", "30"]
    )
    assert code == 2
    assert "num_inference_steps (1000) must be at most num_train_timesteps (100)" in capsys.readouterr().err
    assert not output.exists()


@pytest.mark.parametrize("case", ["cwd", "parent_of_cwd", "file", "unwritable"])
def test_an_output_folder_that_cannot_be_saved_to_fails_before_training(case, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    target = {"cwd": ".", "parent_of_cwd": "..", "file": "model.txt", "unwritable": "sub/out"}[case]
    if case == "file":
        (work / "model.txt").write_text("a file\n")
    if case == "unwritable":  # root can write anywhere: the write probe fails as on a read-only mount
        from ddpm_components import pipeline_ddpm

        def read_only(*args, **kwargs):
            raise OSError(30, "Read-only file system")

        monkeypatch.setattr(pipeline_ddpm.tempfile, "mkstemp", read_only)
    before = snapshot(tmp_path)
    code = main(["train", "--output-dir", target, *TINY_ARGS, "--max-train-steps", "2"])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "--output-dir" in error, error
    assert snapshot(tmp_path) == before  # nothing written (today: training_config.json, then training)


def test_guidance_for_the_grids_needs_classes_and_a_trained_null_class(tmp_path):
    one_class = image_folder(tmp_path / "images", classes=("only",))
    with pytest.raises(
        ValueError, match="needs a class-conditional model, but the training data has no class"
    ):
        train(
            tiny_config(tmp_path / "a", train_data_dir=str(one_class), guidance_scale=3.0, train_batch_size=4)
        )
    with pytest.raises(ValueError, match="needs a null class trained by label dropout"):
        train(tiny_config(tmp_path / "b", guidance_scale=3.0, label_dropout=0.0))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_rejected_run_leaves_a_finished_model_untouched(run_copy, capsys):
    # today: training_config.json was overwritten before the options were checked
    before = snapshot(run_copy)
    for flags in (
        ["--layers-per-block", "0"],
        ["--resume", "latest", "--num-train-timesteps", "60", "--max-train-steps", "6"],
        ["--max-train-steps", "6"],  # a new run into the folder of another
    ):
        assert main(["train", "--output-dir", str(run_copy), *TINY_ARGS, *flags]) == 2
        assert snapshot(run_copy) == before, flags
    assert capsys.readouterr().err.count("error:") == 3


# ------------------------------------------------------------------------------------- resume checks
def _break(folder: Path, case: str) -> None:
    checkpoint = folder / "checkpoint-4"
    if case == "missing_random_states":
        (checkpoint / "random_states_0.pkl").unlink()
    elif case == "truncated_model":
        data = (checkpoint / "model.safetensors").read_bytes()
        (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "truncated_pkl":
        data = (checkpoint / "custom_checkpoint_1.pkl").read_bytes()
        (checkpoint / "custom_checkpoint_1.pkl").write_bytes(data[: len(data) - 10])
    elif case == "no_run_record":
        (checkpoint / "run.json").unlink()


@pytest.mark.parametrize(
    ("overrides", "case", "message"),
    [
        ({"num_train_timesteps": 60}, None, "num_train_timesteps: 50 in the checkpoint, 60 now"),
        (
            {"block_out_channels": "8,32"},
            None,
            r"U-Net block_out_channels: \[8, 16\] in the checkpoint, \[8, 32\] now",
        ),
        ({"layers_per_block": 2}, None, "U-Net layers_per_block: 1 in the checkpoint, 2 now"),
        ({"resolution": 16}, None, "data resolution: 8 in the checkpoint, 16 now"),
        ({"conditioning": "none"}, None, "U-Net num_class_embeds: 10 in the checkpoint, None now"),
        (
            {"prediction_type": "v_prediction"},
            None,
            "prediction_type: 'epsilon' in the checkpoint, 'v_prediction' now",
        ),
        ({"use_ema": False}, None, "use_ema: True in the checkpoint, False now"),
        (
            {"max_train_steps": 3},
            None,
            "max_train_steps=3 is below its step 4; pass --max-train-steps 4 or more",
        ),
        ({}, "missing_random_states", "random_states_0.pkl is missing"),
        ({}, "truncated_model", "model.safetensors is damaged"),
        ({}, "truncated_pkl", "custom_checkpoint_1.pkl is damaged"),
        ({}, "no_run_record", "it has no run.json"),
    ],
)
def test_resume_refuses_what_does_not_match_before_anything_is_written(run_copy, overrides, case, message):
    if case is not None:
        _break(run_copy, case)
    before = snapshot(run_copy)
    config = tiny_config(run_copy, resume="latest", **{"max_train_steps": 6, **overrides})
    with pytest.raises(ValueError, match=message):
        train(config)
    assert snapshot(run_copy) == before


class _OpensAFile:
    """Unpickled, it calls ``open(path, "w")``: a stand-in for a shared checkpoint that runs code when loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("index", [0, 1])  # the EMA's file and the step counter's
def test_resume_refuses_a_checkpoint_file_that_would_run_code(run_copy, tmp_path, index):
    """The checkpointed objects load with torch's weights-only unpickler, here and from a checkpoint shared into a
    new folder: a file that calls a function when unpickled is refused and the call never runs (accelerate's
    load_state unpickled these files with weights_only=False, and the file was opened)."""
    marker = tmp_path / "code-ran"
    torch.save({"state": _OpensAFile(marker)}, run_copy / "checkpoint-4" / f"custom_checkpoint_{index}.pkl")
    before = snapshot(run_copy)
    for output_dir, resume in ((run_copy, "latest"), (tmp_path / "fresh", str(run_copy / "checkpoint-4"))):
        message = (
            rf"custom_checkpoint_{index}\.pkl holds more than tensors and numbers \(it calls [\w.]*open\); it is "
            "refused because unpickling it could run code"
        )
        with pytest.raises(ValueError, match=message):
            train(tiny_config(output_dir, resume=resume, max_train_steps=6))
        assert not marker.exists()
    assert snapshot(run_copy) == before
    assert not (tmp_path / "fresh").exists()


def test_resume_refuses_other_data(tmp_path):
    images = image_folder(tmp_path / "images")
    train(
        tiny_config(
            tmp_path / "run",
            train_data_dir=str(images),
            train_batch_size=4,
            max_train_steps=2,
            checkpointing_steps=2,
        )
    )
    cases = {
        "data images: 16 in the checkpoint, 12 now": lambda: [
            p.unlink() for p in list(images.rglob("*.png"))[:4]
        ],
        "data channels: 3 in the checkpoint, 1 now": None,
        r"data class_names: \['circle', 'square'\] in the checkpoint, \['circle', 'square', 'star'\] now": lambda: (
            image_folder(images, classes=("star",), count=4)
        ),
    }
    for message, change in cases.items():
        overrides = {"color_mode": "grayscale"} if change is None else {}
        if change is not None:
            change()
        config = tiny_config(
            tmp_path / "run",
            train_data_dir=str(images),
            train_batch_size=4,
            max_train_steps=3,
            resume="latest",
            **overrides,
        )
        with pytest.raises(ValueError, match=message):
            train(config)


def test_resume_refuses_a_checkpoint_of_another_run(run_copy, tmp_path):
    other = tmp_path / "other"
    train(tiny_config(other, max_train_steps=6, checkpointing_steps=6))
    shutil.copytree(other / "checkpoint-6", run_copy / "checkpoint-6")  # the newest: --resume latest picks it
    before = snapshot(run_copy)
    with pytest.raises(ValueError, match="belongs to another run"):
        train(tiny_config(run_copy, resume="latest", max_train_steps=8))
    with pytest.raises(ValueError, match="belongs to another run"):
        train(tiny_config(run_copy, resume=str(other / "checkpoint-6"), max_train_steps=8))
    assert snapshot(run_copy) == before


# ------------------------------------------------------------------------------------ one run per folder
def test_a_new_run_refuses_a_folder_holding_another_run(tmp_path, capsys):
    # today: trained, and --resume latest later mixed both runs (issue item 5)
    folder = tmp_path / "run"
    train(tiny_config(folder, max_train_steps=2, checkpointing_steps=1, checkpoints_total_limit=None))
    before = snapshot(folder)
    assert main(["train", "--output-dir", str(folder), *TINY_ARGS, "--max-train-steps", "1"]) == 2
    error = capsys.readouterr().err
    assert "holds another training run (checkpoint-1, checkpoint-2, a saved model" in error
    assert "--resume latest" in error and "--overwrite" in error
    assert snapshot(folder) == before


@pytest.mark.parametrize(
    "name", ["README.md", "model_index.json", "metrics.jsonl", "unet/config.json", "checkpoint-3"]
)
def test_files_at_our_names_that_we_did_not_write_are_never_overwritten(tmp_path, name):
    folder = tmp_path / "mine"
    target = folder / name
    target.parent.mkdir(parents=True)
    if name.startswith("checkpoint-"):
        target.mkdir()
        (target / "my-notes.txt").write_text("mine\n")
    else:
        target.write_text("mine\n")
    before = snapshot(folder)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=f"holds {name}.*which ddpm-components did not write"):
            train(tiny_config(folder, max_train_steps=1, overwrite=overwrite))
    assert snapshot(folder) == before


def test_overwrite_deletes_exactly_the_previous_runs_files(tmp_path):
    folder = tmp_path / "run"
    train(
        tiny_config(
            folder,
            max_train_steps=4,
            checkpointing_steps=1,
            checkpoints_total_limit=None,
            sample_every_steps=2,
            debug_record=True,
            report_to="tensorboard",
        )
    )
    old_id = json.loads((folder / "training_config.json").read_text())["run_id"]
    assert (folder / "samples" / "step-0000002.png").exists() and (
        folder / "logs" / "ddpm-components"
    ).is_dir()
    user_files = {"notes.txt": "n", "samples/cat.png": "c", "debug/mine.txt": "d", "logs/other/x.txt": "x"}
    for name, text in user_files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)

    train(tiny_config(folder, max_train_steps=2, checkpointing_steps=2, overwrite=True))
    for name, text in user_files.items():
        assert (folder / name).read_text() == text, name
    assert [path.name for path in list_checkpoints(folder)] == ["checkpoint-2"]
    assert not (folder / "samples" / "step-0000002.png").exists()
    assert not (folder / "debug" / "sample_indices.jsonl").exists()
    assert not (folder / "logs" / "ddpm-components").exists()
    assert [record["step"] for record in metrics(folder)] == [1, 2]
    new_id = json.loads((folder / "training_config.json").read_text())["run_id"]
    assert new_id != old_id
    assert json.loads((folder / "checkpoint-2" / "run.json").read_text())["run_id"] == new_id


def test_overwrite_keeps_files_of_others_in_the_tracker_folder(tmp_path):
    """--overwrite deletes the TensorBoard files of the previous run in logs/ddpm-components/ (event files, the
    hparams folders), not the folder with whatever else it holds: a file we did not write is never deleted."""
    folder = tmp_path / "run"
    train(tiny_config(folder, max_train_steps=2, checkpointing_steps=0, report_to="tensorboard"))
    tracker = folder / "logs" / "ddpm-components"
    written = [path for path in tracker.rglob("*") if path.is_file()]
    assert any(path.name.startswith("events.out.tfevents.") for path in written)
    (tracker / "notes.txt").write_text("mine")
    (tracker / "analysis").mkdir()
    (tracker / "analysis" / "events.out.tfevents.mine").write_text("mine too")
    train(tiny_config(folder, max_train_steps=2, checkpointing_steps=0, overwrite=True))
    assert (tracker / "notes.txt").read_text() == "mine"
    assert (tracker / "analysis" / "events.out.tfevents.mine").read_text() == "mine too"
    assert not any(path.exists() for path in written)
    assert sorted(path.name for path in tracker.iterdir()) == ["analysis", "notes.txt"]


def test_a_run_keeps_unrelated_user_files_and_folder_modes(tmp_path):
    # today: o/unet/important.txt was deleted by the final save and the folder became mode 0700
    folder = tmp_path / "o"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "important.txt").write_text("x\n")
    (folder / "notes.txt").write_text("n\n")
    folder.chmod(0o755)
    assert (
        main(
            [
                "train",
                "--output-dir",
                str(folder),
                *TINY_ARGS,
                "--max-train-steps",
                "2",
                "--checkpointing-steps",
                "0",
            ]
        )
        == 0
    )
    assert (folder / "unet" / "important.txt").read_text() == "x\n"
    assert (folder / "notes.txt").read_text() == "n\n"
    assert folder.stat().st_mode & 0o777 == 0o755


def test_resume_latest_without_a_checkpoint_restarts_the_same_run(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n")  # an unrelated file does not make the folder another run's
    train(tiny_config(folder, max_train_steps=2, checkpointing_steps=0, resume="latest"))
    assert (folder / "notes.txt").read_text() == "mine\n"
    with pytest.raises(ValueError, match="holds a saved model and no checkpoint to resume from"):
        train(tiny_config(folder, max_train_steps=3, checkpointing_steps=0, resume="latest"))


# ----------------------------------------------------------------------------------------- NaN is an error
def _poison_loss_from(monkeypatch, first_bad_micro_step: int) -> None:
    """From micro-batch ``first_bad_micro_step`` on, the loss (and so the gradients) become NaN."""
    real_loss = training.training_loss
    calls = {"count": 0}

    def loss(*args, **kwargs):
        terms = real_loss(*args, **kwargs)
        calls["count"] += 1
        if calls["count"] > first_bad_micro_step:
            return terms._replace(loss=terms.loss * math.nan, mse=terms.mse * math.nan)
        return terms

    monkeypatch.setattr(training, "training_loss", loss)


def test_a_nan_loss_at_a_logging_step_stops_with_the_step_and_the_good_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    _poison_loss_from(monkeypatch, 4)  # steps 1-4 fine, step 5 NaN
    config = tiny_config(
        folder, max_train_steps=20, checkpointing_steps=4, logging_steps=2, checkpoints_total_limit=None
    )
    with pytest.raises(TrainingDiverged) as caught:
        train(config)
    message = str(caught.value)
    assert "the training loss became nan by step 6 (mean of steps 5-6)" in message
    assert f"kept the last good checkpoint {folder / 'checkpoint-4'}" in message
    assert "--resume latest" in message and "--learning-rate 0.001" in message and "\n" not in message
    assert [path.name for path in list_checkpoints(folder)] == ["checkpoint-4"]
    assert not (folder / "model_index.json").exists()  # no NaN model saved
    text = (folder / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert [(r["step"], r["loss"]) for r in metrics(folder)][-1] == (6, None)
    # the advice works: resume from the good checkpoint (here the poison is gone) and finish
    monkeypatch.undo()
    summary = train(dataclasses.replace(config, resume="latest", learning_rate=1e-3, max_train_steps=6))
    assert summary["global_step"] == 6 and math.isfinite(summary["loss"])
    assert [r["step"] for r in metrics(folder)] == [2, 4, 6]


def test_a_nan_between_logging_steps_never_reaches_a_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    _poison_loss_from(monkeypatch, 5)  # step 6 NaN; logs every 10 steps, checkpoints every 4
    config = tiny_config(folder, max_train_steps=20, checkpointing_steps=4, logging_steps=10)
    with pytest.raises(TrainingDiverged, match=r"no longer finite at step 8; .* checkpoint .*checkpoint-4"):
        train(config)
    assert [path.name for path in list_checkpoints(folder)] == ["checkpoint-4"]


def test_non_finite_final_weights_are_not_saved(tmp_path, monkeypatch):
    # the loss of the last step is computed before its update: only the weight check catches this one
    folder = tmp_path / "run"
    real_step = training._TrainLoop.run_step

    def run_step(self, micro_step, batch):
        stepped = real_step(self, micro_step, batch)
        if stepped and self.progress.global_step == self.config.max_train_steps:
            with torch.no_grad():
                next(self.accelerator.unwrap_model(self.model).parameters()).fill_(math.inf)
        return stepped

    monkeypatch.setattr(training._TrainLoop, "run_step", run_step)
    with pytest.raises(
        TrainingDiverged, match="weights or the training loss were no longer finite at step 3"
    ):
        train(tiny_config(folder, max_train_steps=3, checkpointing_steps=2))
    assert not (folder / "model_index.json").exists()
    assert [path.name for path in list_checkpoints(folder)] == ["checkpoint-2"]


def test_the_command_line_exits_1_with_one_line_when_the_loss_diverges(tmp_path, monkeypatch, capsys):
    _poison_loss_from(monkeypatch, 2)
    code = main(["train", "--output-dir", str(tmp_path / "run"), *TINY_ARGS, "--max-train-steps", "5"])
    error = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert code == 1
    lines = [line for line in error if line.startswith("ddpm-components train:")]
    assert len(lines) == 1 and "the training loss became nan by step 3" in lines[0]
    assert not any("Traceback" in line for line in error)


def test_a_step_skipped_by_the_fp16_gradient_scaler_is_not_an_error():
    window = training._LossWindow(torch.device("cpu"))
    finite = training.LossTerms(torch.tensor(0.5), torch.tensor(0.5), None)
    overflow = training.LossTerms(torch.tensor(math.inf), torch.tensor(math.inf), None)

    class OneProcess:
        def reduce(self, tensor, reduction):
            return tensor

    window.add(finite)
    window.end_step(skipped=False)
    window.add(overflow)  # the scaler skipped this step: its terms are dropped
    window.end_step(skipped=True)
    terms = ("loss", "mse", "vb")
    means = window.means(OneProcess())
    assert [means[name] for name in terms] == [0.5, 0.5, 0.0]
    window.reset()
    window.add(overflow)
    window.end_step(skipped=True)
    means = window.means(OneProcess())
    assert [means[name] for name in terms] == [None, None, None]  # logged as null, not an error
    window.add(overflow)
    window.end_step(skipped=False)
    assert math.isinf(window.means(OneProcess())["loss"])  # a step that was taken with it: an error


# -------------------------------------------------------------------------------------------- metrics
def test_metrics_are_appended_not_rewritten_and_cut_at_the_resumed_step(tmp_path, monkeypatch):
    from ddpm_components import data

    folder = tmp_path / "run"
    rewrites = []
    real_write = data.atomic_write_bytes

    def atomic_write_bytes(path, payload):
        if Path(path).name == "metrics.jsonl":
            rewrites.append(payload)
        return real_write(path, payload)

    monkeypatch.setattr(data, "atomic_write_bytes", atomic_write_bytes)
    train(tiny_config(folder, max_train_steps=6, checkpointing_steps=4, use_ema=False))
    assert len(rewrites) <= 1  # today: the whole file was rewritten at every logging step
    assert [r["step"] for r in metrics(folder)] == [1, 2, 3, 4, 5, 6]
    assert all(
        set(r) >= {"loss", "mse", "lr", "images_per_second", "wall_time", "cpu_time"} for r in metrics(folder)
    )

    # a killed run: lines past the checkpoint and a cut line; the resumed run logs steps 5..8 once each
    with open(folder / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 7, "loss": 0.1}\n{"step": 8, "lo')
    (folder / "model_index.json").unlink()  # (also allowed with a saved model; the files are the point here)
    train(tiny_config(folder, max_train_steps=8, checkpointing_steps=4, use_ema=False, resume="latest"))
    assert [r["step"] for r in metrics(folder)] == [1, 2, 3, 4, 5, 6, 7, 8]


# ------------------------------------------------------------------------------------- learning rate
def test_a_changed_learning_rate_on_resume_is_honoured(tmp_path):
    # today: the checkpoint's rate won silently
    folder = tmp_path / "run"
    train(tiny_config(folder, max_train_steps=4, checkpointing_steps=4, use_ema=False))
    train(
        tiny_config(
            folder,
            max_train_steps=6,
            checkpointing_steps=0,
            use_ema=False,
            resume="latest",
            learning_rate=5e-4,
        )
    )
    assert [r["lr"] for r in metrics(folder)] == [2e-3] * 4 + [5e-4] * 2


def test_checkpoints_total_limit_none_or_0_keeps_every_checkpoint(tmp_path):
    # today: 'none' was not accepted and 0 was an error
    for limit in ("none", "0"):
        folder = tmp_path / limit
        args = [
            "train",
            "--output-dir",
            str(folder),
            *TINY_ARGS,
            "--max-train-steps",
            "3",
            "--checkpointing-steps",
            "1",
        ]
        assert main([*args, "--checkpoints-total-limit", limit]) == 0
        assert [path.name for path in list_checkpoints(folder)] == [
            "checkpoint-1",
            "checkpoint-2",
            "checkpoint-3",
        ]


def test_resume_command_reproduces_the_options(tmp_path):
    from ddpm_components.cli import build_parser

    config = tiny_config(tmp_path / "my run", use_ema=False, checkpoints_total_limit=None, learning_rate=3e-4)
    command = resume_command(config, learning_rate=1e-4)
    import shlex

    words = shlex.split(command)
    assert words[:2] == ["ddpm-components", "train"]
    args = build_parser().parse_args(words[1:])
    rebuilt = TrainingConfig(
        **{item.name: getattr(args, item.name) for item in dataclasses.fields(TrainingConfig)}
    )
    assert rebuilt == dataclasses.replace(config, resume="latest", learning_rate=1e-4)


def test_signal_handlers_are_restored_when_train_returns_or_fails(tmp_path):
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    train(tiny_config(tmp_path / "run", max_train_steps=1, checkpointing_steps=0))
    with pytest.raises(ValueError):
        train(tiny_config(tmp_path / "run", max_train_steps=1))  # another run's folder
    assert {number: signal.getsignal(number) for number in before} == before


def test_a_first_signal_sets_the_flag_and_a_second_aborts_at_once():
    with training._StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() and stop.received == signal.SIGTERM
        with pytest.raises(training.TrainingInterrupted) as caught:
            os.kill(os.getpid(), signal.SIGINT)
        assert caught.value.exit_code == 130
        with pytest.raises(training.TrainingInterrupted) as caught:
            stop.raise_if_requested()
        assert caught.value.exit_code == 143


def test_the_saved_unet_names_its_classes(tmp_path):
    # today: nothing in the saved model said which label is which class
    images = image_folder(tmp_path / "images", classes=("cat", "dog"), count=4)
    train(
        tiny_config(
            tmp_path / "folder",
            train_data_dir=str(images),
            train_batch_size=4,
            max_train_steps=1,
            checkpointing_steps=0,
        )
    )
    train(tiny_config(tmp_path / "digits", max_train_steps=1, checkpointing_steps=0))
    folder_config = json.loads((tmp_path / "folder" / "unet" / "config.json").read_text())
    digits_config = json.loads((tmp_path / "digits" / "unet" / "config.json").read_text())
    assert folder_config["class_names"] == ["cat", "dog"]
    assert digits_config["class_names"] == [str(digit) for digit in range(10)]


def test_a_checkpoint_is_written_at_the_last_step_too(tmp_path):
    """So that an interrupt during the final grid or save loses no training: `--resume latest` then only samples
    and saves (the step counter is already at --max-train-steps)."""
    folder = tmp_path / "run"
    train(tiny_config(folder, max_train_steps=3, checkpointing_steps=2, checkpoints_total_limit=None))
    assert [path.name for path in list_checkpoints(folder)] == ["checkpoint-2", "checkpoint-3"]


def test_an_output_folder_inside_the_training_data_is_refused(tmp_path):
    """Its sample grids would be read as training images (and its folder name as a class) by the next run."""
    data = tmp_path / "data"
    for name in ("cat", "dog"):
        (data / name).mkdir(parents=True)
        for index in range(2):
            Image.new("L", (8, 8), 40 * index).save(data / name / f"{index}.png")
    for output in (data, data / "out"):
        with pytest.raises(ValueError, match="lies in --train-data-dir"):
            train(tiny_config(output, train_data_dir=str(data), resolution=8, train_batch_size=2))
    assert sorted(path.name for path in data.iterdir()) == ["cat", "dog"]


def test_resume_takes_a_bare_checkpoint_name_from_the_output_folder(tmp_path):
    folder = tmp_path / "run"
    train(tiny_config(folder, max_train_steps=2, checkpointing_steps=1, checkpoints_total_limit=None))
    summary = train(tiny_config(folder, max_train_steps=3, checkpointing_steps=1, resume="checkpoint-1"))
    assert summary["global_step"] == 3


def test_resuming_a_finished_run_only_samples_and_saves_and_says_so(tmp_path, capsys):
    folder = tmp_path / "run"
    args = [
        "train",
        "--output-dir",
        str(folder),
        *TINY_ARGS,
        "--max-train-steps",
        "2",
        "--checkpointing-steps",
        "2",
    ]
    assert main(args) == 0
    (folder / "model_index.json").unlink()  # as if the first run had been stopped during its final save
    capsys.readouterr()
    assert main([*args, "--resume", "latest"]) == 0
    out = capsys.readouterr().out
    assert "trained 2 steps" in out and "no step left to train: sampled and saved" in out and "nan" not in out
    assert (folder / "model_index.json").is_file()
