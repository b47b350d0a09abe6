"""`sample --mask` (inpainting, RePaint) and `sample --reference-image` (ILVR super-resolution) on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_pipeline
from PIL import Image

from ddpm_components import DDPMPipeline
from ddpm_components.cli import main
from ddpm_components.sampling import image_seed

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_control")
    tiny_pipeline().save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(root / "digit.png")
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[4:] = 255  # white = repaint the bottom half
    Image.fromarray(mask, mode="L").save(root / "mask.png")
    Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8), mode="L").save(root / "low.png")
    Image.fromarray(rng.integers(0, 256, (3, 3), dtype=np.uint8), mode="L").save(root / "low3.png")
    return {name: root / name for name in ("model", "digit.png", "mask.png", "low.png", "low3.png")}


def _generators(seed: int, count: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(image_seed(seed, index)) for index in range(count)]


def test_sample_inpaints_with_mask_and_jumps(files, tmp_path: Path, capsys):
    out, each = tmp_path / "inpaint.png", tmp_path / "each"
    args = ["sample", "--model", str(files["model"]), "--num-images", "2", "--steps", "6"]
    control = ["--init-image", str(files["digit.png"]), "--mask", str(files["mask.png"])]
    assert main([*args, *control, "--jump-length", "2", "--jump-n-sample", "2", "--out", str(out),
                 "--out-dir", str(each)]) == 0  # fmt: skip
    assert "wrote" in capsys.readouterr().out
    grid = np.asarray(Image.open(out))
    digit = np.asarray(Image.open(files["digit.png"]))
    pipeline = DDPMPipeline.from_pretrained(files["model"])
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(
        batch_size=2, image=Image.open(files["digit.png"]), mask_image=Image.open(files["mask.png"]),
        jump_length=2, jump_n_sample=2, num_inference_steps=6, generator=_generators(0, 2),
    ).images  # fmt: skip
    for index, image in enumerate(expected):
        tile = grid[:, 8 * index : 8 * index + 8]
        np.testing.assert_array_equal(tile, np.asarray(image))
        np.testing.assert_array_equal(tile[:4], digit[:4])  # the black part of the mask is kept exactly
    assert not np.array_equal(grid[4:, :8], digit[4:])
    settings = json.loads((each / "sampling.json").read_text())
    assert settings["jump_n_sample"] == 2 and len(settings["mask_sha256"]) == 64
    # --strength with --mask runs only that part of the chain (image-to-image inside the mask)
    assert main([*args, *control, "--strength", "0.5", "--out", str(tmp_path / "half.png")]) == 0


def test_sample_ilvr_with_reference_image(files, tmp_path: Path):
    out = tmp_path / "ilvr.npz"
    args = ["sample", "--model", str(files["model"]), "--num-images", "3", "--steps", "6"]
    assert (
        main(
            [*args, "--reference-image", str(files["low.png"]), "--reference-factor", "2", "--out", str(out)]
        )
        == 0
    )
    images = np.load(out)["arr_0"].astype(np.float64)  # (3, 8, 8, 1) uint8
    down = images[..., 0].reshape(3, 4, 2, 4, 2).mean(axis=(2, 4))
    low = np.asarray(Image.open(files["low.png"])).astype(np.float64)
    assert np.abs(down - low).mean() < 0.05 * 255  # tiny random model: clipping makes it inexact in places
    assert main([*args, "--reference-image", str(files["low.png"]), "--reference-until", "0.5",
                 "--out", str(tmp_path / "until.png")]) == 0  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mask", "MASK"], "--mask only applies with --init-image: pass --init-image FILE as well"),
        (["--init-image", "DIGIT", "--jump-length", "3"], "--jump-length only applies with --mask"),
        (["--init-image", "DIGIT", "--jump-n-sample", "3"], "--jump-n-sample only applies with --mask"),
        (["--reference-factor", "2"], "--reference-factor only applies with --reference-image"),
        (["--reference-until", "0.5"], "--reference-until only applies with --reference-image"),
        (["--init-image", "DIGIT", "--mask", "MASK", "--reference-image", "LOW"], "cannot be combined"),
        (
            ["--reference-image", "LOW", "--reference-until", "2"],
            r"--reference-until must be in (0, 1], got 2.0",
        ),
        (["--init-image", "DIGIT", "--mask", "missing.png"], "--mask 'missing.png': no such file"),
        (
            ["--reference-image", "LOW3"],
            "reference_image is 3x3, which is not this U-Net's 8x8 divided by one",
        ),
        (["--reference-image", "LOW", "--reference-factor", "4"], "reference_factor=4 gives 16x16"),
        (["--init-image", "DIGIT", "--mask", "MASK", "--strength", "1.5"], r"strength must be in (0, 1]"),
    ],
)
def test_sample_control_option_errors(files, tmp_path: Path, capsys, extra, message):
    names = {"MASK": "mask.png", "DIGIT": "digit.png", "LOW": "low.png", "LOW3": "low3.png"}
    extra = [str(files[names[item]]) if item in names else item for item in extra]
    out = tmp_path / "x.png"
    args = ["sample", "--model", str(files["model"]), "--num-images", "2", "--steps", "2", "--out", str(out)]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_jump_options_must_be_positive_integers(files, capsys):
    args = ["sample", "--model", str(files["model"]), "--init-image", str(files["digit.png"])]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--mask", str(files["mask.png"]), "--jump-n-sample", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--jump-n-sample: expected a positive integer, got 0" in err and err.count("\n") == 1
