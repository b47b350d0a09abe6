"""The example scripts in examples/ run (in-process, tiny local models, a few steps)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import diffusers
import pytest
from conftest import tiny_diffusers_unet, tiny_pipeline
from PIL import Image

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _run(script: str, *args: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")


def test_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    ours, plain = tmp_path / "ours", tmp_path / "plain"
    tiny_pipeline().save_pretrained(ours)
    diffusers.DDPMPipeline(unet=tiny_diffusers_unet(), scheduler=diffusers.DDPMScheduler(50)).save_pretrained(
        plain
    )
    Image.new("RGB", (20, 20), (120, 40, 200)).save(tmp_path / "input.png")

    _run("load_and_sample.py", "--model", str(plain), "--num-images", "3", "--steps", "3",
         "--out", str(tmp_path / "a.png"), monkeypatch=monkeypatch)  # fmt: skip
    assert Image.open(tmp_path / "a.png").size == (16, 16)
    _run("swap_scheduler.py", "--model", str(plain), "--steps", "3", "--out", str(tmp_path / "b.png"),
         monkeypatch=monkeypatch)  # fmt: skip
    assert "ddpm_components.scheduling_ddpm.DDPMScheduler" in capsys.readouterr().out
    _run("image_to_image.py", "--model", str(ours), "--image", str(tmp_path / "input.png"), "--strength", "0.5",
         "--steps", "4", "--out", str(tmp_path / "c.png"), monkeypatch=monkeypatch)  # fmt: skip
    assert Image.open(tmp_path / "c.png").size == (8, 8)
    assert "2 of 4 steps" in capsys.readouterr().out
    assert (EXAMPLES / "push_to_hub.py").is_file()  # pushing is covered end to end by tests/test_hub.py


def test_image_to_image_example_reads_16_bit_greyscale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The example reads its input through standardize_pil_image: a 16-bit grey 128 * 257 is grey 128, not white."""
    import numpy as np
    import torch

    from ddpm_components import DDPMPipeline

    model = tmp_path / "ours"
    tiny_pipeline().save_pretrained(model)
    Image.fromarray(np.full((20, 20), 128 * 257, dtype=np.uint16)).save(tmp_path / "grey16.png")
    _run("image_to_image.py", "--model", str(model), "--image", str(tmp_path / "grey16.png"), "--strength", "0.5",
         "--steps", "4", "--out", str(tmp_path / "out.png"), monkeypatch=monkeypatch)  # fmt: skip
    pipeline = DDPMPipeline.from_pretrained(model)
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(
        image=Image.new("L", (8, 8), 128),
        strength=0.5,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(expected))


def test_inpaint_and_super_resolution_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    import numpy as np

    model = tmp_path / "ours"
    tiny_pipeline().save_pretrained(model)
    digit = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(digit, mode="L").save(tmp_path / "digit.png")
    Image.fromarray(digit[::2, ::2], mode="L").save(tmp_path / "low.png")
    _run("inpaint.py", "--model", str(model), "--image", str(tmp_path / "digit.png"), "--steps", "4",
         "--jump-length", "2", "--jump-n-sample", "2", "--num-images", "2", "--out", str(tmp_path / "i.png"),
         monkeypatch=monkeypatch)  # fmt: skip
    grid = np.asarray(Image.open(tmp_path / "i.png"))
    assert grid.shape == (8, 24) and "6 U-Net calls each" in capsys.readouterr().out
    for column in (1, 2):  # the top half (black in the default mask) is the input's
        np.testing.assert_array_equal(grid[:4, 8 * column : 8 * column + 8], digit[:4])
    _run("super_resolution.py", "--model", str(model), "--image", str(tmp_path / "low.png"), "--steps", "4",
         "--num-images", "2", "--out", str(tmp_path / "s.png"), monkeypatch=monkeypatch)  # fmt: skip
    assert Image.open(tmp_path / "s.png").size == (24, 8)
