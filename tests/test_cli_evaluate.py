"""`ddpm-components evaluate`: the report, its JSON and plot, and errors before any work."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from conftest import tiny_pipeline, tiny_unet

from ddpm_components.cli import main


@pytest.fixture
def saved_model(tmp_path):
    folder = tmp_path / "model"
    tiny_pipeline(num_class_embeds=10, num_train_timesteps=20).save_pretrained(folder)
    return folder


def test_evaluate_writes_table_json_and_plot(saved_model, tmp_path, capsys, torch_single_thread):
    pytest.importorskip("matplotlib")
    out, plot = tmp_path / "report.json", tmp_path / "quality.png"
    code = main(
        [
            "evaluate",
            "--model",
            str(saved_model),
            "--metrics",
            "bpd,fd,accuracy",
            "--num-samples",
            "20",
            "--steps",
            "4",
            "ddim5",
            "--scheduler",
            "ddpm",
            "ddpm:variance_type=fixed_large",
            "--seeds",
            "2",
            "--bpd-timesteps",
            "4",
            "--batch-size",
            "20",
            "--json",
            str(out),
            "--plot",
            str(plot),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "bits/dim (359 images, estimate from 4 timesteps)" in printed and "real vs real" in printed
    report = json.loads(out.read_text())
    assert set(report["bpd"]) >= {"total", "prior", "vb", "decoder", "stderr", "num_images"}
    assert set(report["samplers"]) == {"ddpm", "ddpm:variance_type=fixed_large"}
    row = report["samplers"]["ddpm"]["ddim5"]
    assert len(row["fd_per_seed"]) == 2 and row["fd_stderr"] is not None and 0 <= row["accuracy"] <= 1
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--metrics", "bpd,fid2"], "choose from bpd,fd,fid,kid,precision-recall,accuracy"),
        (["--metrics", "fd", "--plot", "q.png", "--data", "nowhere"], "nowhere"),
        (["--metrics", "kid", "--plot", "q.png"], "--plot draws fd or fid"),
        (
            ["--metrics", "bpd,precision-recall", "--num-samples", "3", "--steps", "4"],
            "num_samples=3 is too few",
        ),
        (["--scheduler", "NoSuch"], "neither 'ddpm'"),
        (  # diffusers' multistep solver with the DDPM config's leading spacing: T steps of timestep 0
            ["--metrics", "fd", "--steps", "20", "--scheduler", "DPMSolverMultistepScheduler"],
            r"repeats timesteps \(timestep_spacing='leading'.*DPMSolverMultistepScheduler:timestep_spacing=trailing",
        ),
        (["--steps", "ddim5", "--scheduler", "DDIMScheduler"], "only 'ddpm' \\(our scheduler\\) takes"),
        (["--plot", "quality.jpg"], "--plot writes a PNG image"),
    ],
)
def test_evaluate_rejects_bad_input_before_work(saved_model, tmp_path, capsys, flags, message):
    code = main(["evaluate", "--model", str(saved_model), *flags])
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err)


class _StandInInception(torch.nn.Module):
    """A tiny fixed feature network in place of Inception-V3 (whose weights the tests cannot download)."""

    def __init__(self, weights=None) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.projection = torch.randn(3 * 8 * 8, 16, generator=generator)
        self.num_features = 16

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float().expand(-1, 3, -1, -1)
        return torch.tanh(images.reshape(images.shape[0], -1) @ self.projection)


def _rgb_folder(folder, count: int = 24):
    from PIL import Image

    folder.mkdir()
    generator = torch.Generator().manual_seed(1)
    for index in range(count):
        pixels = (torch.rand(8, 8, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return folder


def test_fid_kid_and_precision_recall_run_offline_with_a_stand_in_network(
    tmp_path, capsys, monkeypatch, torch_single_thread
):
    """The whole command on RGB data, with a stand-in for Inception: every number in the JSON, nothing downloaded."""
    import ddpm_components.evaluation as evaluation

    monkeypatch.setattr(evaluation, "InceptionFeatures", _StandInInception)
    folder = tmp_path / "rgb_model"
    pipeline = tiny_pipeline(num_train_timesteps=20)
    pipeline.unet = tiny_unet(in_channels=3, out_channels=3)
    pipeline.register_modules(unet=pipeline.unet)
    pipeline.save_pretrained(folder)
    out = tmp_path / "report.json"
    flags = ["--metrics", "fid,kid,precision-recall", "--data", str(_rgb_folder(tmp_path / "real"))]
    flags += ["--num-samples", "12", "--steps", "3", "--json", str(out)]
    assert main(["evaluate", "--model", str(folder), *flags]) == 0
    printed = capsys.readouterr().out
    assert "FID at this sample size: real vs real" in printed
    report = json.loads(out.read_text())
    assert report["features"] == {"fid": "inception", "kid": "inception", "precision-recall": "inception"}
    row = report["samplers"]["ddpm"]["3"]
    assert row["fid"] > 0 and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1 and "kid" in row
    assert report["reference"]["noise_vs_real_fid"] > 0


def test_fid_without_torch_fidelity_fails_before_sampling_with_what_to_install(
    saved_model, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # absent, whatever this machine has
    monkeypatch.setattr("ddpm_components.sampling.sample_batches", _no_sampling)
    assert main(["evaluate", "--model", str(saved_model), "--metrics", "fid", "--steps", "4"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pip install 'ddpm-components[fid]'" in err


def _no_sampling(*args, **kwargs):
    raise AssertionError("sampled before the checks")
