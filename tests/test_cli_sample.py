"""The `sample` and `push` sub-commands (in-process through cli.main; Hub paths are in tests/test_hub.py)."""

from __future__ import annotations

import subprocess
import sys
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
def saved_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_models")
    tiny_pipeline().save_pretrained(root / "unconditional")
    tiny_pipeline(num_class_embeds=3).save_pretrained(root / "conditional")
    return {"unconditional": root / "unconditional", "conditional": root / "conditional"}


def _image_generators(seed: int, count: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(image_seed(seed, index)) for index in range(count)]


def test_sample_writes_grid_and_individual_images(saved_models, tmp_path: Path, capsys):
    out, individual = tmp_path / "grid.png", tmp_path / "each"
    args = ["sample", "--model", str(saved_models["unconditional"]), "--num-images", "3", "--steps", "5"]
    assert main([*args, "--seed", "1", "--out", str(out), "--save-individual", str(individual)]) == 0
    assert "wrote" in capsys.readouterr().out
    grid = Image.open(out)
    assert grid.size == (16, 16)  # 3 images in a 2 x 2 grid of 8 x 8 pixels
    files = sorted(individual.glob("*.png"))
    assert [f.name for f in files] == ["000000.png", "000001.png", "000002.png"]
    assert (individual / "sampling.json").is_file()  # the settings, for resuming
    # the images are the pipeline's own for per-image seeds (seed, i), and they sit in the grid row by row
    pipeline = DDPMPipeline.from_pretrained(saved_models["unconditional"])
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(batch_size=3, generator=_image_generators(1, 3), num_inference_steps=5).images
    grid_pixels = np.asarray(grid)
    for index, (file, image) in enumerate(zip(files, expected)):
        np.testing.assert_array_equal(np.asarray(Image.open(file)), np.asarray(image))
        row, column = divmod(index, 2)
        np.testing.assert_array_equal(
            grid_pixels[row * 8 : row * 8 + 8, column * 8 : column * 8 + 8], np.asarray(image)
        )
    # same seed, same file; another seed, other images
    again, other = tmp_path / "again.png", tmp_path / "other.png"
    assert main([*args, "--seed", "1", "--out", str(again)]) == 0
    assert main([*args, "--seed", "2", "--out", str(other)]) == 0
    assert again.read_bytes() == out.read_bytes() and other.read_bytes() != out.read_bytes()


def test_sample_class_labels_guidance_and_init_image(saved_models, tmp_path: Path):
    model = str(saved_models["conditional"])
    common = ["sample", "--model", model, "--num-images", "2", "--steps", "4"]
    assert (
        main([*common, "--class-label", "1", "--guidance-scale", "3", "--out", str(tmp_path / "g.png")]) == 0
    )
    assert main([*common, "--class-label", "0", "2", "--out", str(tmp_path / "two.png")]) == 0
    init = tmp_path / "init.png"
    Image.fromarray(np.full((20, 30, 3), 200, dtype=np.uint8)).save(
        init
    )  # RGB, other size: converted, resized
    assert (
        main([*common, "--init-image", str(init), "--strength", "0.7", "--out", str(tmp_path / "i.png")]) == 0
    )
    grid = np.asarray(Image.open(tmp_path / "i.png"))
    assert grid.shape == (8, 16)
    # the grid holds the pipeline's image-to-image result for that image (greyscale, 8x8) and strength
    pipeline = DDPMPipeline.from_pretrained(model)
    pipeline.set_progress_bar_config(disable=True)
    grey = Image.new("L", (8, 8), 200)
    for strength, same in ((0.7, True), (0.25, False)):
        expected = pipeline(
            batch_size=2,
            generator=_image_generators(0, 2),
            num_inference_steps=4,
            image=grey,
            strength=strength,
        ).images
        matches = all(
            np.array_equal(grid[:, 8 * i : 8 * i + 8], np.asarray(image)) for i, image in enumerate(expected)
        )
        assert matches == same, strength


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--class-label", "1"], "this U-Net is unconditional"),
        (["--class-label", "0", "1", "0"], "got 3 class labels for --num-images 2"),
        (["--strength", "0.5"], "--strength only applies to image-to-image: pass --init-image"),
        (["--init-image", "missing.png"], "--init-image 'missing.png': no such file"),
        (["--out", "grid.jpg"], "--out must be a .png grid or an .npz file"),
        (["--device", "nonsense"], "--device 'nonsense' is not a torch device"),
    ],
)
def test_sample_option_errors(saved_models, tmp_path: Path, capsys, extra, message):
    model = saved_models["conditional" if extra[:2] == ["--class-label", "0"] else "unconditional"]
    args = ["sample", "--model", str(model), "--num-images", "2", "--steps", "2"]
    if "--out" not in extra:
        extra = [*extra, "--out", str(tmp_path / "x.png")]
    assert main([*args, *extra]) == 2
    assert message in capsys.readouterr().err


def test_model_path_errors(tmp_path: Path, capsys):
    (tmp_path / "file.txt").write_text("x")
    cases = [
        (["sample", "--model", str(tmp_path / "nope")], "no such folder, and it is not a Hub repo id"),
        (["sample", "--model", str(tmp_path)], "has no model_index.json: it is not a saved pipeline folder"),
        (["sample", "--model", str(tmp_path / "file.txt")], "is a file; pass the folder"),
        (["push", "--model", str(tmp_path / "nope"), "--repo-id", "user/x"], "is not a folder"),
        (["push", "--model", str(tmp_path), "--repo-id", "user/x", "--num-sample-images", "-1"], ">= 0"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        assert message in capsys.readouterr().err, args
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--model", str(tmp_path), "--num-images", "0"])
    assert exit_info.value.code == 2
    assert "expected a positive integer, got 0" in capsys.readouterr().err


def test_help_explains_the_options(capsys):
    for command, options in [
        ("sample", ["--model", "--num-images", "--steps", "--seed", "--class-label", "--guidance-scale"]),
        ("push", ["--model", "--repo-id", "--private", "--token"]),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        for option in options:
            assert option in text
    # the module entry point (one subprocess)
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_components", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "sample" in result.stdout and "push" in result.stdout
