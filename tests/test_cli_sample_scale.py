"""`ddpm-components sample` at scale: batches, .npz and folder outputs, resuming, other schedulers, processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_pipeline
from PIL import Image

from ddpm_components.cli import main

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("scale") / "model"
    tiny_pipeline(num_class_embeds=3, num_train_timesteps=20).save_pretrained(folder)
    return folder


def _sample(model: Path, *flags: str) -> int:
    return main(["sample", "--model", str(model), "--steps", "4", "--seed", "7", *flags])


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    with np.load(path) as data:
        return data["arr_0"], data.get("arr_1")


def test_npz_output_does_not_depend_on_the_batch_size(model, tmp_path):
    labels = ["--class-label", "0", "1", "2", "0", "1", "2", "0"]
    assert (
        _sample(model, "--num-images", "7", "--batch-size", "3", "--out", str(tmp_path / "a.npz"), *labels)
        == 0
    )
    assert (
        _sample(model, "--num-images", "7", "--batch-size", "7", "--out", str(tmp_path / "b.npz"), *labels)
        == 0
    )
    images, written_labels = _npz(tmp_path / "a.npz")
    assert images.shape == (7, 8, 8, 1) and images.dtype == np.uint8 and images.std() > 10
    assert written_labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    np.testing.assert_array_equal(images, _npz(tmp_path / "b.npz")[0])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.npz", "b.npz"]  # no shards left


def test_a_killed_run_resumes_where_it_stopped(model, tmp_path, monkeypatch):
    """The batches done before an interrupt are kept (as shards beside the .npz, or PNGs in --out-dir) and a
    rerun with the same settings samples only the rest: the result equals an uninterrupted run."""
    from ddpm_components import pipeline_ddpm

    assert _sample(model, "--num-images", "6", "--batch-size", "2", "--out", str(tmp_path / "whole.npz")) == 0
    calls = {"count": 0}
    original = pipeline_ddpm.DDPMPipeline.__call__

    def interrupted_after_two_batches(self, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    for flags in (["--out", str(tmp_path / "part.npz")], ["--out-dir", str(tmp_path / "pngs")]):
        calls["count"] = 0
        monkeypatch.setattr(pipeline_ddpm.DDPMPipeline, "__call__", interrupted_after_two_batches)
        assert _sample(model, "--num-images", "6", "--batch-size", "2", *flags) == 130
        monkeypatch.setattr(pipeline_ddpm.DDPMPipeline, "__call__", original)
        calls["count"] = 0
        counting = _count_calls(monkeypatch, pipeline_ddpm.DDPMPipeline)
        assert _sample(model, "--num-images", "6", "--batch-size", "2", *flags) == 0
        assert counting["count"] == 1  # only the third batch was sampled again
        monkeypatch.setattr(pipeline_ddpm.DDPMPipeline, "__call__", original)
    whole = _npz(tmp_path / "whole.npz")[0]
    np.testing.assert_array_equal(_npz(tmp_path / "part.npz")[0], whole)
    assert not (tmp_path / ".part.npz.shards").exists()
    pngs = sorted((tmp_path / "pngs").glob("*.png"))
    assert [path.name for path in pngs] == [f"{index:06d}.png" for index in range(6)]
    for index, path in enumerate(pngs):
        np.testing.assert_array_equal(np.asarray(Image.open(path))[:, :, None], whole[index])


def _count_calls(monkeypatch, pipeline_class) -> dict[str, int]:
    counting = {"count": 0}
    original = pipeline_class.__call__

    def counted(self, *args, **kwargs):
        counting["count"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pipeline_class, "__call__", counted)
    return counting


def test_a_rerun_with_other_settings_is_refused(model, tmp_path, capsys):
    out_dir = tmp_path / "pngs"
    assert _sample(model, "--num-images", "3", "--out-dir", str(out_dir)) == 0
    before = {path.name: path.read_bytes() for path in out_dir.iterdir()}
    capsys.readouterr()
    assert main(["sample", "--model", str(model), "--steps", "5", "--seed", "7", "--num-images", "3",
                 "--out-dir", str(out_dir)]) == 2  # fmt: skip
    assert "holds samples made with other settings (steps: 4 then, 5 now)" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in out_dir.iterdir()} == before
    # a larger --num-images with the same settings continues
    assert _sample(model, "--num-images", "5", "--out-dir", str(out_dir)) == 0
    assert len(list(out_dir.glob("*.png"))) == 5
    assert json.loads((out_dir / "sampling.json").read_text())["steps"] == 4


def test_pngs_of_someone_else_are_never_overwritten(model, tmp_path, capsys):
    out_dir = tmp_path / "theirs"
    out_dir.mkdir()
    (out_dir / "000000.png").write_bytes(b"not ours")
    assert _sample(model, "--num-images", "2", "--out-dir", str(out_dir)) == 2
    assert "no sampling.json of ours" in capsys.readouterr().err
    assert (out_dir / "000000.png").read_bytes() == b"not ours"


def test_respacing_strings_and_other_schedulers(model, tmp_path, capsys):
    assert _sample(model, "--num-images", "2", "--steps", "ddim5", "--out", str(tmp_path / "r.png")) == 0
    assert _sample(model, "--num-images", "2", "--scheduler", "DPMSolverMultistepScheduler",
                   "--out", str(tmp_path / "d.png")) == 0  # fmt: skip
    assert _sample(model, "--num-images", "2", "--scheduler", "ddpm:variance_type=fixed_large",
                   "--out", str(tmp_path / "f.png")) == 0  # fmt: skip
    images = [np.asarray(Image.open(tmp_path / name)) for name in ("r.png", "d.png", "f.png")]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])
    capsys.readouterr()
    assert (
        _sample(model, "--steps", "ddim5", "--scheduler", "DDIMScheduler", "--out", str(tmp_path / "x.png"))
        == 2
    )
    assert "only our scheduler ('ddpm') takes" in capsys.readouterr().err
    assert _sample(model, "--scheduler", "NoSuchScheduler", "--out", str(tmp_path / "x.png")) == 2
    capsys.readouterr()
    # T steps of a T-step model with the DDPM config's leading spacing: timestep 0 twenty times, then an IndexError
    repeated = [
        "--steps",
        "20",
        "--scheduler",
        "DPMSolverMultistepScheduler",
        "--out",
        str(tmp_path / "x.png"),
    ]
    assert _sample(model, *repeated) == 2
    assert "repeats timesteps" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_split_the_images_and_give_the_same_result(model, tmp_path):
    """`accelerate launch --num_processes 2 -m ddpm_components sample`: every image once, the same images as one
    process (each image is seeded by its index)."""
    flags = ["--model", str(model), "--steps", "4", "--seed", "7", "--num-images", "5", "--batch-size", "2"]
    assert (
        main(["sample", *flags, "--out", str(tmp_path / "one.npz"), "--out-dir", str(tmp_path / "one")]) == 0
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ACCELERATE_"))}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", str(_free_port()), "--num_cpu_threads_per_process", "1"]
    command += ["-m", "ddpm_components", "sample", *flags, "--out", str(tmp_path / "two.npz")]
    command += ["--out-dir", str(tmp_path / "two")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    np.testing.assert_array_equal(_npz(tmp_path / "two.npz")[0], _npz(tmp_path / "one.npz")[0])
    names = sorted(path.name for path in (tmp_path / "two").glob("*.png"))
    assert names == [f"{index:06d}.png" for index in range(5)]
