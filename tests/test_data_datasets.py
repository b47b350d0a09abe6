"""Training data through the `datasets` library: local imagefolder folders, parquet files, save_to_disk folders
and streaming, all built in the test (nothing reaches the network); columns and labels checked before training."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_components.data import (
    HFImageDataset,
    ImageFolderDataset,
    StreamingImageDataset,
    build_hf_image_dataset,
)

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network: `datasets` and huggingface_hub in offline mode, caches in the test's folder."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache", raising=False)


def write_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 3, size=(10, 12)) -> Path:
    """A small imagefolder: ``root/<class>/<i>.png``, random RGB images of ``size`` (height, width)."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")
    return root


def load_folder(root: Path, cache: Path):
    return datasets.load_dataset(str(root), split="train", cache_dir=str(cache))


def test_imagefolder_matches_the_folder_dataset_item_for_item(tmp_path):
    """The same files through `datasets` and through ImageFolderDataset give the same tensors and labels:
    one image conversion."""
    root = write_image_folder(tmp_path / "pets")
    dataset = build_hf_image_dataset(str(root), resolution=8, cache_dir=str(tmp_path / "cache"))
    folder = ImageFolderDataset(root, resolution=8)
    assert isinstance(dataset, HFImageDataset) and len(dataset) == len(folder) == 6
    assert dataset.class_names == folder.class_names == ("cat", "dog") and dataset.num_channels == 3
    for index in range(6):
        item, reference = dataset[index], folder[index]
        torch.testing.assert_close(item["pixel_values"], reference["pixel_values"], rtol=0, atol=0)
        assert int(item["class_labels"]) == int(reference["class_labels"])
    assert dataset[0]["pixel_values"].shape == (3, 8, 8)
    assert dataset[0]["pixel_values"].min() >= -1 and dataset[0]["pixel_values"].max() <= 1


def test_parquet_file_and_save_to_disk_folders(tmp_path):
    source = load_folder(write_image_folder(tmp_path / "pets"), tmp_path / "cache")
    source.to_parquet(str(tmp_path / "pets.parquet"))
    source.save_to_disk(str(tmp_path / "saved"))
    split_dict = datasets.DatasetDict({"train": source, "holdout": source.select(range(2))})
    split_dict.save_to_disk(str(tmp_path / "saved_dict"))
    cache = str(tmp_path / "cache")
    for name in (tmp_path / "pets.parquet", tmp_path / "saved", tmp_path / "saved_dict"):
        dataset = build_hf_image_dataset(str(name), resolution=4, color_mode="grayscale", cache_dir=cache)
        assert len(dataset) == 6 and dataset.class_names == ("cat", "dog"), name
        assert dataset[5]["pixel_values"].shape == (1, 4, 4) and int(dataset[5]["class_labels"]) == 1
    holdout = build_hf_image_dataset(str(tmp_path / "saved_dict"), resolution=4, split="holdout")
    assert len(holdout) == 2
    with pytest.raises(ValueError, match=r"Unknown split \"test\".*\['holdout', 'train'\]"):
        build_hf_image_dataset(str(tmp_path / "saved_dict"), resolution=4, split="test")
    with pytest.raises(
        ValueError, match=r"--dataset-name .*Unknown split \"test\". Should be one of \['train'\]"
    ):
        build_hf_image_dataset(str(tmp_path / "pets.parquet"), resolution=4, split="test", cache_dir=cache)


def _table(tmp_path: Path, **columns) -> str:
    """A save_to_disk folder of a dataset with ``columns`` (features inferred or given as (values, feature))."""
    data, features = {}, {}
    for name, value in columns.items():
        values, feature = value if isinstance(value, tuple) else (value, None)
        data[name] = values
        if feature is not None:
            features[name] = feature
    dataset = datasets.Dataset.from_dict(data)
    for name, feature in features.items():
        dataset = dataset.cast_column(name, feature)
    path = tmp_path / f"table{len(list(tmp_path.glob('table*')))}"
    dataset.save_to_disk(str(path))
    return str(path)


def _png(value: int) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(np.full((6, 6, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def test_columns_by_name_and_integer_labels(tmp_path):
    images = ([_png(10), _png(20), _png(30)], datasets.Image())
    path = _table(tmp_path, photo=images, digit=[2, 0, 2], caption=["a", "b", "c"])
    dataset = build_hf_image_dataset(path, resolution=4)  # the only image column; no ClassLabel 'label'
    assert dataset.image_column == "photo" and dataset.class_names == ()
    assert int(dataset[0]["class_labels"]) == -1
    labelled = build_hf_image_dataset(path, resolution=4, image_column="photo", label_column="digit")
    assert labelled.class_names == ("0", "1", "2") and int(labelled[2]["class_labels"]) == 2
    assert (
        build_hf_image_dataset(path, resolution=4, label_column="digit", use_labels=False).class_names == ()
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"image_column": "picture"},
            r"--image-column 'picture' is not a column of .*image columns: \['photo'\]",
        ),
        (
            {"image_column": "caption"},
            r"--image-column 'caption' .* holds Value\('string'.*not images; image columns",
        ),
        (
            {"label_column": "kind"},
            r"--label-column 'kind' is not a column .*label columns .*\['digit', 'negative'\]",
        ),
        (
            {"label_column": "caption"},
            r"--label-column 'caption' .* not class labels .*label columns: \['digit', 'negative'\]",
        ),
        (
            {"label_column": "negative"},
            r"--label-column 'negative' .* holds the label -1; labels must be 0 or more",
        ),
    ],
)
def test_bad_columns_name_the_value_and_the_choices(tmp_path, options, message):
    images = ([_png(10), _png(20)], datasets.Image())
    path = _table(tmp_path, photo=images, digit=[1, 0], caption=["a", "b"], negative=[0, -1])
    with pytest.raises(ValueError, match=message):
        build_hf_image_dataset(path, resolution=4, **options)


def test_no_image_column_and_empty_split(tmp_path):
    with pytest.raises(
        ValueError, match=r"has no column of images \(columns: 'caption' \(Value\)\); pass --image-column"
    ):
        build_hf_image_dataset(_table(tmp_path, caption=["a", "b"]), resolution=4)
    empty = str(tmp_path / "empty.parquet")  # (datasets 5.2's load_from_disk fails on an empty saved dataset)
    datasets.Dataset.from_dict({"image": [_png(1)]}).cast_column("image", datasets.Image()).select(
        []
    ).to_parquet(empty)
    with pytest.raises(ValueError, match="is empty: it has no rows"):
        build_hf_image_dataset(empty, resolution=4, cache_dir=str(tmp_path / "cache"))


def test_images_are_decoded_lazily_and_a_corrupt_row_is_skipped(tmp_path, caplog):
    broken = {"bytes": b"not a png", "path": None}
    path = _table(tmp_path, image=([_png(10), broken, _png(250)], datasets.Image()))
    dataset = build_hf_image_dataset(
        path, resolution=4
    )  # nothing decoded yet: the broken row passes the build
    assert len(dataset) == 3
    item = dataset[1]
    assert item["index"] == 2 and item["pixel_values"].mean() > 0.9  # the next row's image
    assert "skipping row 1" in caplog.text


def test_streaming_reads_rows_as_it_goes_without_a_length(tmp_path):
    root = write_image_folder(tmp_path / "pets")
    dataset = build_hf_image_dataset(
        str(root), resolution=4, streaming=True, cache_dir=str(tmp_path / "cache")
    )
    assert isinstance(dataset, StreamingImageDataset) and not hasattr(dataset, "__len__")
    assert dataset.class_names == ("cat", "dog")
    first = [int(item["class_labels"]) for item in dataset]
    assert sorted(first) == [0, 0, 0, 1, 1, 1]
    dataset.set_epoch(1)
    second = [int(item["class_labels"]) for item in dataset]
    assert sorted(second) == sorted(first)
    assert [int(item["index"]) for item in dataset.head(2)] == [0, 1]
    saved = tmp_path / "saved"
    load_folder(root, tmp_path / "cache").save_to_disk(str(saved))
    assert len(list(build_hf_image_dataset(str(saved), resolution=4, streaming=True))) == 6
