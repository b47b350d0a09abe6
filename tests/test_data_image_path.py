"""Training images enter through the one image path (EXIF, 16-bit, alpha) and the folder walk is safe (issue 9, item 5).

Hidden files and folders are ignored (a `.ipynb_checkpoints/` folder used to become class 0 and shift every label),
symbolic links to folders and files are followed, and a link loop is reported instead of walked forever.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_components import data, pipeline_ddpm
from ddpm_components.data import ImageFolderDataset

needs_symlinks = pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="POSIX symlinks")


def _png(path: Path, value: int = 100, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (size, size), value).save(path)
    return path


def _pixels(value: float) -> float:
    """An 8-bit grey level as the dataset's [-1, 1] value."""
    return value / 127.5 - 1.0


# ------------------------------------------------------------------------------------------- decoding
def test_exif_orientation_is_applied(tmp_path):
    # stored 16 wide x 8 high: top half dark, bottom half bright; EXIF orientation 6 = "rotate 90 degrees clockwise
    # to display", so the viewer (and the dataset) sees 8 wide x 16 high with the bright half on the LEFT
    stored = np.zeros((8, 16), dtype=np.uint8)
    stored[4:] = 250
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "photo.jpg", quality=95, exif=exif)
    image = ImageFolderDataset(tmp_path, resolution=8, color_mode="grayscale")[0]["pixel_values"][0]
    assert image.shape == (8, 8)  # centre crop of the 8 x 16 upright image
    left, right = float(image[:, :3].mean()), float(image[:, 5:].mean())
    # JPEG ringing: stated tolerance of 12 grey levels around the stored values
    assert abs(left - _pixels(250)) < 12 / 127.5 and abs(right - _pixels(0)) < 12 / 127.5, (left, right)


def test_16_bit_greyscale_goes_through_the_one_image_path(tmp_path):
    # a 16-bit gradient: each value v becomes round(v / 257), the rule of standardize_pil_image
    values = np.linspace(0, 65535, 64, dtype=np.float64).reshape(8, 8).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    got = ImageFolderDataset(tmp_path, resolution=8, color_mode="grayscale")[0]["pixel_values"][0]
    expected = torch.from_numpy(np.rint(values / 257.0)).float() / 127.5 - 1.0
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_composited_on_black(tmp_path, mode):
    # left half fully transparent (its stored colour must not show), right half opaque
    colour = (200, 100, 50) if mode == "RGBA" else (180,)
    pixels = np.zeros((8, 8, len(colour) + 1), dtype=np.uint8)
    pixels[..., :-1] = colour
    pixels[:, 4:, -1] = 255
    Image.fromarray(pixels, mode=mode).save(tmp_path / "alpha.png")
    image = ImageFolderDataset(tmp_path, resolution=8, color_mode="rgb")[0]["pixel_values"]
    assert image.shape == (3, 8, 8)
    torch.testing.assert_close(image[:, :, :4], torch.full((3, 8, 4), -1.0), rtol=0, atol=1e-6)
    opaque = torch.tensor([_pixels(c) for c in (colour * 3 if mode == "LA" else colour)])
    torch.testing.assert_close(image[:, :, 4:], opaque[:, None, None].expand(3, 8, 4), rtol=0, atol=1e-6)


def test_the_dataset_decodes_with_standardize_pil_image(tmp_path, monkeypatch):
    """One image path: the dataset calls pipeline_ddpm.standardize_pil_image (data.py keeps no decoder of its own)."""
    _png(tmp_path / "a.png")
    calls = []

    def spy(image, mode):
        calls.append(mode)
        return pipeline_ddpm.standardize_pil_image(image, mode)

    monkeypatch.setattr(data, "standardize_pil_image", spy)
    ImageFolderDataset(tmp_path, resolution=8, color_mode="grayscale")[0]
    ImageFolderDataset(tmp_path, resolution=8, color_mode="rgb")[0]
    assert calls == ["L", "RGB"]
    assert not hasattr(data, "_to_8_bit")


# ---------------------------------------------------------------------------------------- folder walk
def test_hidden_files_and_folders_are_ignored(tmp_path, caplog):
    _png(tmp_path / "cats" / "a.png", 10)
    _png(tmp_path / "dogs" / "b.png", 20)
    _png(tmp_path / ".ipynb_checkpoints" / "c-checkpoint.png", 30)  # was class 0, shifting every label
    _png(tmp_path / "cats" / ".cache" / "d.png", 40)
    (tmp_path / "dogs" / "._b.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    with caplog.at_level(logging.WARNING, logger="ddpm_components.data"):
        dataset = ImageFolderDataset(tmp_path, resolution=8, color_mode="grayscale")
    assert dataset.class_names == ("cats", "dogs")
    assert [path.relative_to(tmp_path).as_posix() for path in dataset.paths] == ["cats/a.png", "dogs/b.png"]
    assert dataset.labels == [0, 1] and dataset.skipped == []
    assert caplog.text == ""  # ignored, not reported as unreadable


def test_a_hidden_root_folder_is_still_read(tmp_path):
    _png(tmp_path / ".data" / "cats" / "a.png")
    _png(tmp_path / ".data" / "dogs" / "b.png")
    assert ImageFolderDataset(tmp_path / ".data", resolution=8).class_names == ("cats", "dogs")


@needs_symlinks
def test_symlinked_class_folders_and_files_are_followed(tmp_path):
    elsewhere, root = tmp_path / "elsewhere", tmp_path / "root"
    _png(elsewhere / "cat_pictures" / "a.png", 10)
    _png(elsewhere / "cat_pictures" / "nested" / "b.png", 20)
    _png(elsewhere / "loose.png", 30)
    _png(root / "dogs" / "c.png", 40)
    (root / "cats").symlink_to(elsewhere / "cat_pictures", target_is_directory=True)
    (root / "dogs" / "d.png").symlink_to(elsewhere / "loose.png")
    dataset = ImageFolderDataset(root, resolution=8, color_mode="grayscale")
    assert dataset.class_names == ("cats", "dogs")  # the link's name is the class, not the target's
    assert [path.relative_to(root).as_posix() for path in dataset.paths] == [
        "cats/a.png",
        "cats/nested/b.png",
        "dogs/c.png",
        "dogs/d.png",
    ]
    assert dataset.labels == [0, 0, 1, 1]
    means = [round((float(dataset[i]["pixel_values"].mean()) + 1) * 127.5) for i in range(4)]
    assert means == [10, 20, 40, 30]


@needs_symlinks
def test_symlink_loops_are_reported_and_each_real_folder_is_read_once(tmp_path, caplog):
    root = tmp_path / "root"
    _png(root / "cats" / "a.png")
    _png(root / "dogs" / "b.png")
    (root / "cats" / "again").symlink_to(root, target_is_directory=True)  # a loop back to the root
    (root / "dogs" / "self").symlink_to(root / "dogs", target_is_directory=True)  # a loop to itself
    (root / "puppies").symlink_to(root / "dogs", target_is_directory=True)  # the same folder twice
    (root / "cats" / "gone.png").symlink_to(tmp_path / "missing.png")  # a broken link
    with caplog.at_level(logging.WARNING, logger="ddpm_components.data"):
        dataset = ImageFolderDataset(root, resolution=8)
    assert [path.relative_to(root).as_posix() for path in dataset.paths] == ["cats/a.png", "dogs/b.png"]
    assert dataset.class_names == ("cats", "dogs")
    assert f"symbolic link loop: {root / 'cats' / 'again'} leads back to {root}" in caplog.text
    assert f"symbolic link loop: {root / 'dogs' / 'self'} leads back to {root / 'dogs'}" in caplog.text
    assert f"skipping {root / 'puppies'}: it is the same folder as {root / 'dogs'}" in caplog.text
    assert [(path.name, reason) for path, reason in dataset.skipped] == [
        ("gone.png", f"broken symbolic link to {str(tmp_path / 'missing.png')!r}")
    ]
