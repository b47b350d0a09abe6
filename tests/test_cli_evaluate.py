"""`ddpm-components evaluate`: the report, its JSON and plot, and errors before any work."""

from __future__ import annotations

import json
import re

import pytest
from conftest import tiny_pipeline

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
        (["--metrics", "bpd,fid2"], "choose from bpd,fd,kid,accuracy"),
        (["--scheduler", "NoSuch"], "neither 'ddpm'"),
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
