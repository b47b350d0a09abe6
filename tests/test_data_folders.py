"""Training datasets: the embedded digits and folders of images (labels, crops, corrupt files, errors)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_components.data import DigitsDataset, ImageFolderDataset, digits_split_indices, digits_tensor


def _write(path: Path, array: np.ndarray, format: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=format)
    return path


def _solid(value: int, size: tuple[int, int] = (12, 12), channels: int = 3) -> np.ndarray:
    height, width = size
    return np.full((height, width, channels), value, dtype=np.uint8).squeeze()


def test_digits_dataset_items_match_digits_tensor():
    dataset = DigitsDataset(resolution=8)
    images, labels = digits_tensor(8)
    train = digits_split_indices("train")
    # training leaves the held-out test split out
    assert len(dataset) == len(train) == 1438 and dataset.num_classes == 10 and dataset.num_channels == 1
    assert len(DigitsDataset(split="all")) == 1797 and len(DigitsDataset(split="test")) == 359
    item = dataset[5]
    assert item["pixel_values"].shape == (1, 8, 8)
    torch.testing.assert_close(item["pixel_values"], images[train[5]], rtol=0, atol=0)
    assert int(item["class_labels"]) == int(labels[train[5]]) and item["index"] == 5
    assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0
    assert DigitsDataset(resolution=16)[0]["pixel_values"].shape == (1, 16, 16)


def test_folder_labels_from_subfolders_recursive_and_extensions(tmp_path):
    _write(tmp_path / "cats" / "a.png", _solid(10))
    _write(tmp_path / "cats" / "deeper" / "b.jpg", _solid(20), format="JPEG")
    _write(tmp_path / "dogs" / "c.webp", _solid(30), format="WEBP")
    _write(tmp_path / "dogs" / "d.JPEG", _solid(40), format="JPEG")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    dataset = ImageFolderDataset(tmp_path, resolution=8, color_mode="rgb")
    assert len(dataset) == 4
    assert dataset.class_names == ("cats", "dogs") and dataset.num_classes == 2
    assert dataset.labels == [0, 0, 1, 1]
    item = dataset[2]
    assert item["pixel_values"].shape == (3, 8, 8) and int(item["class_labels"]) == 1
    # solid value 30 maps to 30/127.5 - 1 (webp is lossy: tolerance of 2 grey levels)
    torch.testing.assert_close(
        item["pixel_values"].mean(), torch.tensor(30 / 127.5 - 1), atol=2 / 127.5, rtol=0
    )


def test_folder_without_subfolders_is_unlabelled_and_grayscale(tmp_path):
    _write(tmp_path / "x.png", _solid(200, channels=3))
    _write(tmp_path / "y.png", _solid(100, channels=3))
    dataset = ImageFolderDataset(tmp_path, resolution=4, color_mode="grayscale")
    assert dataset.num_classes == 0 and dataset.labels is None and dataset.num_channels == 1
    item = dataset[0]
    assert item["pixel_values"].shape == (1, 4, 4) and int(item["class_labels"]) == -1
    torch.testing.assert_close(
        item["pixel_values"], torch.full((1, 4, 4), 200 / 127.5 - 1), atol=1e-6, rtol=0
    )
    assert ImageFolderDataset(tmp_path, resolution=4, use_labels=False).num_classes == 0


@pytest.mark.parametrize("color_mode", ["grayscale", "rgb"])
def test_16_bit_grayscale_png_keeps_its_grey_levels(tmp_path, color_mode):
    # Pillow opens these as mode I;16 and its convert("L") clips at 255: mid-grey came out white
    _write(tmp_path / "grey16.png", np.full((12, 12), 32896, dtype=np.uint16))  # 128 * 257
    dataset = ImageFolderDataset(tmp_path, resolution=4, color_mode=color_mode)
    channels = 1 if color_mode == "grayscale" else 3
    torch.testing.assert_close(
        dataset[0]["pixel_values"], torch.full((channels, 4, 4), 128 / 127.5 - 1), atol=1e-6, rtol=0
    )


def test_stray_image_beside_class_folders_is_reported(tmp_path, caplog):
    _write(tmp_path / "cats" / "a.png", _solid(10))
    _write(tmp_path / "dogs" / "b.png", _solid(20))
    _write(tmp_path / "stray.png", _solid(30))
    with caplog.at_level(logging.WARNING, logger="ddpm_components.data"):
        dataset = ImageFolderDataset(tmp_path, resolution=4)
    assert dataset.num_classes == 0 and dataset.labels is None
    assert "stray.png" in caplog.text and "class sub-folder" in caplog.text


def test_center_crop_random_crop_and_flip(tmp_path):
    # 8 rows x 16 columns: column j has grey value 10 * j; resized shorter side 8 == no resize
    array = np.tile((np.arange(16, dtype=np.uint8) * 10)[None, :], (8, 1))
    _write(tmp_path / "wide.png", array)
    center = ImageFolderDataset(tmp_path, resolution=8, color_mode="grayscale", crop="center")[0][
        "pixel_values"
    ]
    expected = torch.from_numpy(array[:, 4:12].astype(np.float32)) / 127.5 - 1
    torch.testing.assert_close(center[0], expected, atol=1e-6, rtol=0)

    flipped = ImageFolderDataset(tmp_path, resolution=8, color_mode="grayscale", random_flip=True)
    random_crop = ImageFolderDataset(tmp_path, resolution=8, color_mode="grayscale", crop="random")
    seen_flip, seen_offsets = set(), set()
    torch.manual_seed(0)
    for _ in range(20):
        image = flipped[0]["pixel_values"][0]
        seen_flip.add(bool(image[0, 0] > image[0, -1]))
        crop = random_crop[0]["pixel_values"][0]
        offset = round(float((crop[0, 0] + 1) * 127.5) / 10)
        torch.testing.assert_close(
            crop, torch.from_numpy(array[:, offset : offset + 8].astype(np.float32)) / 127.5 - 1
        )
        seen_offsets.add(offset)
    assert seen_flip == {True, False}
    assert len(seen_offsets) > 2 and seen_offsets <= set(range(9))


def test_corrupt_files_are_reported_by_name_and_skipped(tmp_path, caplog):
    _write(tmp_path / "a" / "good.png", _solid(50))
    _write(tmp_path / "b" / "good.png", _solid(60))
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    truncated = tmp_path / "b" / "truncated.jpg"
    _write(truncated, np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8), format="JPEG")
    truncated.write_bytes(truncated.read_bytes()[:200])
    with caplog.at_level(logging.WARNING, logger="ddpm_components.data"):
        dataset = ImageFolderDataset(tmp_path, resolution=8)
    assert len(dataset) == 2
    assert {path.name for path, _ in dataset.skipped} == {"broken.png", "truncated.jpg"}
    assert "broken.png" in caplog.text and "truncated.jpg" in caplog.text


def test_the_check_before_training_decodes_no_pixels_yet_finds_damaged_files(tmp_path, monkeypatch, caplog):
    """PNG chunk checksums and the JPEG end marker are checked at build time without decoding; pixels are
    decoded when an item is read. A PNG damaged inside its compressed data is still skipped before training."""
    from PIL import ImageFile

    noise = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    _write(tmp_path / "a.png", noise)
    _write(tmp_path / "b.jpg", noise, format="JPEG")
    damaged = _write(tmp_path / "c.png", noise)
    data = bytearray(damaged.read_bytes())
    data[data.index(b"IDAT") + 20] ^= 0xFF  # one byte of the compressed pixels
    damaged.write_bytes(bytes(data))
    trailing = _write(tmp_path / "d.jpg", noise, format="JPEG")
    trailing.write_bytes(trailing.read_bytes() + b"\0" * 16)  # no end marker at the end: decoded to be sure

    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(
        ImageFile.ImageFile, "load", lambda image: decoded.append(image.format) or load(image)
    )
    with caplog.at_level(logging.WARNING, logger="ddpm_components.data"):
        dataset = ImageFolderDataset(tmp_path, resolution=8)
    assert [path.name for path in dataset.paths] == ["a.png", "b.jpg", "d.jpg"]
    assert [(path.name, reason.split(":")[0]) for path, reason in dataset.skipped] == [
        ("c.png", "SyntaxError")
    ]
    assert "c.png" in caplog.text and "broken PNG file" in caplog.text
    assert decoded == ["JPEG"]  # only the JPEG with trailing bytes, at build time
    assert dataset[1]["pixel_values"].shape == (3, 8, 8) and len(decoded) > 1  # read: decoded now


def test_file_that_breaks_after_build_falls_back_without_crashing(tmp_path, caplog):
    first = _write(tmp_path / "0.png", _solid(0))
    _write(tmp_path / "1.png", _solid(255))
    dataset = ImageFolderDataset(tmp_path, resolution=8)
    first.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="ddpm_components.data"):
        item = dataset[0]
    assert item["index"] == 1 and float(item["pixel_values"].mean()) == pytest.approx(1.0)
    assert "0.png" in caplog.text


def test_empty_or_unreadable_folders_are_clear_errors(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="no image files"):
        ImageFolderDataset(tmp_path / "empty", resolution=8)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="none readable"):
        ImageFolderDataset(tmp_path / "bad", resolution=8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", resolution=8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"color_mode": "cmyk"}, "color_mode='cmyk' is not supported; choose one of 'grayscale', 'rgb'."),
        ({"crop": "left"}, "crop='left' is not supported; choose one of 'center', 'random'."),
        ({"resolution": 0}, "resolution must be a positive"),
    ],
)
def test_bad_options_name_value_and_choices(tmp_path, kwargs, message):
    _write(tmp_path / "x.png", _solid(1))
    with pytest.raises(ValueError, match=re.escape(message)):
        ImageFolderDataset(tmp_path, **{"resolution": 8, **kwargs})
