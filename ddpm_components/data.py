"""Image data for ddpm-components: the embedded default dataset and helpers shared by the CLI and training.

The embedded default dataset is scikit-learn's 8×8 handwritten digits (1,797 greyscale images of the
digits 0–9 with labels), which ships inside scikit-learn: nothing is downloaded. :class:`DigitsDataset`
serves it for training; :class:`ImageFolderDataset` serves any folder of images (labels from sub-folders).
"""

from __future__ import annotations

import io
import itertools
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .pipeline_ddpm import standardize_pil_image
from .scheduling_ddpm import _check_choice

DIGITS_NUM_CLASSES = 10
DIGITS_NUM_IMAGES = 1797
"""How many images the embedded digits dataset holds."""


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-learn's digits as ``(images, labels)``: uint8 ``(1797, 8, 8)`` in [0, 255] and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError(
            "The embedded digits dataset ships with scikit-learn; install it with `pip install scikit-learn`."
        ) from error
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def digits_tensor(resolution: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as a float tensor ``(N, 1, resolution, resolution)`` in [-1, 1] and their labels.

    Images are resized with bilinear interpolation (antialiased when shrinking) when ``resolution != 8``.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
    images, labels = load_digits_arrays()
    x = torch.from_numpy(images).float().div(127.5).sub(1.0).unsqueeze(1)
    if resolution != x.shape[-1]:
        x = F.interpolate(
            x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True
        )
        x = x.clamp(-1.0, 1.0)
    return x, torch.from_numpy(labels)


DigitsSplit = Literal["train", "test", "all"]
DIGITS_SPLITS: tuple[str, ...] = get_args(DigitsSplit)
#: the share of each digit held out for evaluation (the test split), and the seed that fixes which images
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 200611239  # arXiv 2006.11239, the DDPM paper: the split never changes


def digits_split_indices(split: DigitsSplit) -> torch.Tensor:
    """Sorted indices into :func:`digits_tensor` of a fixed, seeded, class-stratified split of the digits:
    ``"test"`` holds round(20%) of the images of each digit (359 images), ``"train"`` the rest (1,438),
    ``"all"`` every image. The same on every machine and in every version (a seeded ``torch.randperm``)."""
    if split not in DIGITS_SPLITS:
        raise ValueError(
            f"split={split!r} is not supported; choose one of {', '.join(map(repr, DIGITS_SPLITS))}."
        )
    _, labels = load_digits_arrays()
    labels = torch.from_numpy(labels)
    if split == "all":
        return torch.arange(labels.numel())
    generator = torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    test = []
    for digit in range(DIGITS_NUM_CLASSES):
        members = torch.nonzero(labels == digit).flatten()
        chosen = members[torch.randperm(members.numel(), generator=generator)]
        test.append(chosen[: round(DIGITS_TEST_FRACTION * members.numel())])
    in_test = torch.zeros(labels.numel(), dtype=torch.bool)
    in_test[torch.cat(test)] = True
    return torch.nonzero(in_test if split == "test" else ~in_test).flatten()


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """Map a batch in [-1, 1] of shape ``(N, C, H, W)`` to uint8 ``(N, H, W, C)``."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


# --------------------------------------------------------------------------------------- training datasets
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
"""File name endings (case-insensitive) that :class:`ImageFolderDataset` reads."""

ColorMode = Literal["grayscale", "rgb"]
CropMode = Literal["center", "random"]
COLOR_MODES: tuple[str, ...] = get_args(ColorMode)
CROP_MODES: tuple[str, ...] = get_args(CropMode)

logger = logging.getLogger(__name__)


class DigitsDataset(Dataset):
    """The embedded 8×8 digits as a training dataset (greyscale, labels 0–9).

    Items are dicts ``{"pixel_values": (1, R, R) in [-1, 1], "class_labels": int64, "index": int}``.

    Args:
        resolution: image size; 8 is native, other sizes are resized once (see :func:`digits_tensor`).
        random_flip: flip horizontally with probability 1/2 (off by default: flipped digits are not digits).
        split: ``"train"`` (default: the held-out test split stays out of training, for evaluation),
            ``"test"`` or ``"all"`` (see :func:`digits_split_indices`).
    """

    class_names: tuple[str, ...] = tuple(str(digit) for digit in range(DIGITS_NUM_CLASSES))
    num_channels = 1

    def __init__(self, resolution: int = 8, random_flip: bool = False, split: DigitsSplit = "train") -> None:
        images, labels = digits_tensor(resolution)
        indices = digits_split_indices(split)
        self.images, self.labels = images[indices], labels[indices]
        self.split = split
        self.resolution = resolution
        self.random_flip = random_flip

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        image = self.images[index]
        if self.random_flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return {"pixel_values": image, "class_labels": self.labels[index], "index": index}


def _is_readable_image(path: Path) -> str | None:
    """``None`` if ``path`` looks like a whole image, else the reason it does not; cheap: no pixels are decoded
    where the format allows a check without.

    Every file's header is parsed (format, size, mode). A PNG's chunks are then read and their checksums
    verified (``Image.verify``: a truncated or damaged file fails, nothing is inflated); a JPEG must end with its
    end-of-image marker (a file cut short does not). Other formats, and a JPEG without the marker at its end
    (trailing bytes), are decoded fully. What this misses (damage inside a JPEG's entropy-coded data) is reported
    when the image is read during training, and the next image is used."""
    try:
        with Image.open(path) as image:
            if image.format == "PNG":
                image.verify()
                return None
            if image.format == "JPEG" and _ends_with(path, b"\xff\xd9"):
                return None
            image.load()
    except Exception as error:  # Pillow raises many types for corrupt files
        return f"{type(error).__name__}: {error}"
    return None


def _ends_with(path: Path, marker: bytes) -> bool:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() < len(marker):
            return False
        handle.seek(-len(marker), os.SEEK_END)
        return handle.read() == marker


def read_image_file(path: str | os.PathLike, what: str = "image") -> Image.Image:
    """Open and fully decode the image file ``path`` (nothing converted yet: pass the result to
    :func:`~ddpm_components.pipeline_ddpm.standardize_pil_image`).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a folder, an empty file or a file that
    Pillow cannot decode; each message starts with ``what`` and the path (e.g. ``--init-image 'x.png': ...``).
    """
    path = Path(path)
    name = f"{what} {str(path)!r}"
    if not path.exists():
        raise FileNotFoundError(f"{name}: no such file")
    if path.is_dir():
        raise ValueError(f"{name} is a folder; pass an image file")
    if path.stat().st_size == 0:
        raise ValueError(f"{name} is empty (0 bytes); pass an image file")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except PermissionError:
        raise
    except Exception as error:  # Pillow raises many types for corrupt or unknown files
        raise ValueError(
            f"{name} is not an image Pillow can read ({type(error).__name__}: {error}); use a PNG, JPEG or WebP file"
        ) from None


def _find_image_files(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The image files under ``root`` (paths through ``root``, sorted), and the ones that are broken links.

    Hidden entries (names starting with ``.``: ``.ipynb_checkpoints/``, ``.DS_Store``, macOS ``._x.png``) are
    ignored. Symbolic links to folders and files are followed; each real folder is read once: a link back to a
    folder that contains it (a loop) or to a folder already read is skipped with a warning naming both paths.
    """
    files: list[Path] = []
    broken: list[tuple[Path, str]] = []
    read: dict[tuple[int, int], Path] = {}
    stack: list[tuple[Path, tuple[tuple[int, int], ...]]] = [(root, ())]
    while stack:
        folder, ancestors = stack.pop()
        try:
            status = folder.stat()
        except OSError as error:
            logger.warning("skipping folder %s (%s)", folder, error.strerror or error)
            continue
        key = (status.st_dev, status.st_ino)
        if key in ancestors:
            logger.warning(
                "symbolic link loop: %s leads back to %s, which contains it; not followed", folder, read[key]
            )
            continue
        if key in read:
            logger.warning("skipping %s: it is the same folder as %s (read once)", folder, read[key])
            continue
        read[key] = folder
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name, reverse=True)
        except OSError as error:
            logger.warning("skipping folder %s (%s)", folder, error.strerror or error)
            continue
        for entry in entries:  # reversed, so that the stack pops sub-folders in name order
            if entry.name.startswith("."):
                continue
            path = folder / entry.name
            if entry.is_dir(follow_symlinks=True):
                stack.append((path, (*ancestors, key)))
            elif Path(entry.name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            elif entry.is_file(follow_symlinks=True):
                files.append(path)
            elif entry.is_symlink():
                broken.append((path, f"broken symbolic link to {os.readlink(path)!r}"))
    files.sort(key=lambda path: path.relative_to(root).parts)
    return files, broken


def image_to_tensor(
    image: Image.Image,
    resolution: int,
    color_mode: ColorMode = "rgb",
    crop: CropMode = "center",
    random_flip: bool = False,
) -> torch.Tensor:
    """The one conversion of a training image, for folders and ``datasets`` alike: ``(C, R, R)`` float in [-1, 1].

    :func:`~ddpm_components.pipeline_ddpm.standardize_pil_image` to ``color_mode`` (EXIF orientation applied,
    16-bit greyscale scaled to 8 bits, transparency composited on black), the shorter side resized to
    ``resolution`` (bicubic, antialiased), a square crop (``"center"`` or ``"random"``), an optional horizontal
    flip with probability 1/2, and the map to [-1, 1]. Random crops and flips use torch's global generator."""
    image = standardize_pil_image(image, "L" if color_mode == "grayscale" else "RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != image.size:
        image = image.resize(size, resample=Image.Resampling.BICUBIC, reducing_gap=None)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    x = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)
    height, width = x.shape[-2:]
    if crop == "random":
        top = int(torch.randint(0, height - resolution + 1, ()))
        left = int(torch.randint(0, width - resolution + 1, ()))
    else:
        top = (height - resolution) // 2
        left = (width - resolution) // 2
    x = x[:, top : top + resolution, left : left + resolution]
    if random_flip and torch.rand(()) < 0.5:
        x = x.flip(-1)
    return x


class ImageFolderDataset(Dataset):
    """Every image under a folder, recursively, for training.

    Files ending in :data:`IMAGE_EXTENSIONS` are found recursively and sorted by path. Hidden files and
    folders (any name starting with ``.``, e.g. ``.ipynb_checkpoints/``) are ignored; symbolic links to
    folders and files are followed, each real folder is read once, and a link loop is reported (a warning)
    and not followed. With ``use_labels=True`` the name of each file's first-level sub-folder is its class:
    ``class_names`` are the sorted folder names and a label is a position in it (files directly in ``root``
    make the dataset unlabelled). Every file is checked once when the dataset is built, cheaply (its header; a
    PNG's chunk checksums, a JPEG's end marker; other formats are decoded): unreadable, truncated or corrupt files
    are reported by name (a warning per file) and skipped before training; a folder with no readable image raises
    ``ValueError`` right away. Pixels are decoded lazily, when an item is read (a file that fails then is reported
    and the next one is used).

    Images are decoded through the one image path of ddpm-components,
    :func:`~ddpm_components.pipeline_ddpm.standardize_pil_image` (EXIF orientation applied, 16-bit greyscale
    scaled to 8 bits, transparency composited on black), then resized (shorter side to ``resolution``,
    bicubic, antialiased), cropped to a square (``crop="center"`` or ``"random"``), optionally flipped
    horizontally, and mapped to [-1, 1].

    Args:
        root: the folder.
        resolution: output size in pixels.
        color_mode: ``"grayscale"`` (1 channel) or ``"rgb"`` (3 channels).
        crop: ``"center"`` or ``"random"``.
        random_flip: flip horizontally with probability 1/2.
        use_labels: take class labels from first-level sub-folder names.
        check_files: check every file once at build time (cheaply, see above) to skip broken ones (recommended).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int,
        color_mode: ColorMode = "rgb",
        crop: CropMode = "center",
        random_flip: bool = False,
        use_labels: bool = True,
        check_files: bool = True,
    ) -> None:
        _check_choice("color_mode", color_mode, COLOR_MODES)
        _check_choice("crop", crop, CROP_MODES)
        if resolution < 1:
            raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(f"training data folder {str(self.root)!r} does not exist")
        if not self.root.is_dir():
            raise NotADirectoryError(f"training data path {str(self.root)!r} is not a folder")
        self.resolution = resolution
        self.color_mode = color_mode
        self.crop = crop
        self.random_flip = random_flip
        self.num_channels = 1 if color_mode == "grayscale" else 3

        candidates, self.skipped = _find_image_files(self.root)
        for path, reason in self.skipped:
            logger.warning("skipping unreadable image %s (%s)", path, reason)
        paths: list[Path] = []
        for path in tqdm(
            candidates, desc="checking images", disable=not check_files or len(candidates) < 2000
        ):
            reason = _is_readable_image(path) if check_files else None
            if reason is None:
                paths.append(path)
            else:
                self.skipped.append((path, reason))
                logger.warning("skipping unreadable image %s (%s)", path, reason)
        if not paths:
            found = f"{len(candidates)} image file(s), none readable" if candidates else "no image files"
            raise ValueError(
                f"training data folder {str(self.root)!r} has {found} "
                f"(looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
            )
        self.paths = paths

        folders = [path.relative_to(self.root).parts for path in paths]
        labelled = use_labels and all(len(parts) >= 2 for parts in folders)
        loose = [path for path, parts in zip(paths, folders) if len(parts) < 2]
        if use_labels and loose and len(loose) < len(paths):
            logger.warning(
                "%d image(s) lie directly in %s and not in a class sub-folder (e.g. %s): the dataset is "
                "unlabelled; move them into sub-folders for class labels",
                len(loose),
                self.root,
                loose[0].name,
            )
        if labelled:
            self.class_names: tuple[str, ...] = tuple(sorted({parts[0] for parts in folders}))
            index = {name: label for label, name in enumerate(self.class_names)}
            self.labels: list[int] | None = [index[parts[0]] for parts in folders]
        else:
            self.class_names = ()
            self.labels = None

    @property
    def num_classes(self) -> int:
        """Number of classes (0 when the dataset is unlabelled)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, index: int) -> torch.Tensor:
        """Decode, resize, crop and flip image ``index``; ``(C, R, R)`` float in [-1, 1]."""
        image = read_image_file(self.paths[index], "training image")
        return image_to_tensor(image, self.resolution, self.color_mode, self.crop, self.random_flip)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        # Files were checked at build time; if one changed on disk since, report it and use the next one.
        for attempt in range(len(self.paths)):
            current = (index + attempt) % len(self.paths)
            try:
                pixel_values = self.load_image(current)
            except Exception as error:
                logger.warning(
                    "skipping unreadable image %s (%s: %s)", self.paths[current], type(error).__name__, error
                )
                continue
            label = self.labels[current] if self.labels is not None else -1
            return {"pixel_values": pixel_values, "class_labels": torch.tensor(label), "index": current}
        raise RuntimeError(f"no image under {str(self.root)!r} can be read any more")


# ------------------------------------------------------------------------------- `datasets` (Hub and local)
_SINGLE_FILE_BUILDERS = {
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
}


def _is_saved_to_disk(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (read by ``load_from_disk``)."""
    return path.is_dir() and (
        ((path / "dataset_info.json").is_file() and (path / "state.json").is_file())
        or (path / "dataset_dict.json").is_file()
    )


def load_hf_dataset(
    name: str,
    config_name: str | None = None,
    split: str = "train",
    cache_dir: str | None = None,
    streaming: bool = False,
) -> Any:
    """One split of a dataset that ``datasets`` reads: a Hub id, a local folder that ``load_dataset`` reads
    (imagefolder, parquet files, ...), a single ``.parquet``/``.arrow``/``.csv``/``.json`` file, or a folder
    written by ``save_to_disk`` (through ``load_from_disk``). ``streaming=True`` gives an ``IterableDataset``.

    ``ValueError`` (its message starts with ``--dataset-name`` and ``name``) for a split that does not exist (naming
    the splits that do) or a name that ``datasets`` cannot load."""
    import datasets

    where = f"--dataset-name {name!r}"
    path = Path(name).expanduser()
    try:
        if _is_saved_to_disk(path):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f'Unknown split "{split}". Should be one of {sorted(loaded)}.')
                loaded = loaded[split]
            return loaded.to_iterable_dataset() if streaming else loaded
        if path.is_file():
            builder = _SINGLE_FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ValueError(
                    f"cannot read a {path.suffix or 'suffix-less'} file; pass a folder, a Hub id or a file ending in "
                    f"{', '.join(_SINGLE_FILE_BUILDERS)}"
                )
            return datasets.load_dataset(
                builder,
                data_files={"train": str(path)},
                split=split,
                cache_dir=cache_dir,
                streaming=streaming,
            )
        return datasets.load_dataset(name, config_name, split=split, cache_dir=cache_dir, streaming=streaming)
    except (ValueError, FileNotFoundError) as error:
        text = " ".join(str(error).split()) or type(error).__name__
        if "corresponds to no data" in text:  # datasets' words for an empty split
            text = f"the split {split!r} is empty: it has no rows"
        raise ValueError(f"{where}: {text}") from None


def _column_list(features: Any) -> str:
    return ", ".join(f"{name!r} ({type(feature).__name__})" for name, feature in features.items())


def resolve_columns(
    features: Any, image_column: str | None, label_column: str | None, use_labels: bool, where: str
) -> tuple[str, str | None]:
    """``(image column, label column or None)`` of a dataset with ``features``; ``ValueError`` naming the bad
    column and the valid choices for an unknown column, an image column without images, or a label column that is
    neither a ``ClassLabel`` nor integers. Default image column: ``image`` if it holds images, else the first
    column that does; default label column (unless ``use_labels`` is False): ``label`` if it is a ``ClassLabel``."""
    import datasets

    image_columns = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if image_column is None:
        if not image_columns:
            raise ValueError(
                f"{where} has no column of images (columns: {_column_list(features)}); pass --image-column"
            )
        image_column = "image" if "image" in image_columns else image_columns[0]
    elif image_column not in features:
        raise ValueError(
            f"--image-column {image_column!r} is not a column of {where}; image columns: {image_columns or 'none'} "
            f"(all columns: {_column_list(features)})"
        )
    elif not isinstance(features[image_column], datasets.Image):
        raise ValueError(
            f"--image-column {image_column!r} of {where} holds {features[image_column]}, not images; image "
            f"columns: {image_columns or 'none'}"
        )
    if not use_labels:
        return image_column, None
    label_columns = [name for name, feature in features.items() if _is_label_feature(feature)]
    if label_column is None:
        found = features.get("label")
        return image_column, "label" if isinstance(found, datasets.ClassLabel) else None
    if label_column not in features:
        raise ValueError(
            f"--label-column {label_column!r} is not a column of {where}; label columns (ClassLabel or integers): "
            f"{label_columns or 'none'} (all columns: {_column_list(features)})"
        )
    if not _is_label_feature(features[label_column]):
        raise ValueError(
            f"--label-column {label_column!r} of {where} holds {features[label_column]}, not class labels (a "
            f"ClassLabel or an integer column); label columns: {label_columns or 'none'}"
        )
    return image_column, label_column


def _is_label_feature(feature: Any) -> bool:
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return True
    return isinstance(feature, datasets.Value) and feature.dtype in (
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
    )


def _class_names(dataset: Any, label_column: str, where: str) -> tuple[str, ...]:
    """The class names of ``label_column`` (position = label): a ``ClassLabel``'s names, else ``"0"`` … ``"K-1"``
    for integers 0 … K-1 (read from the column; a streamed dataset needs a ``ClassLabel``)."""
    import datasets

    feature = dataset.features[label_column]
    if isinstance(dataset, datasets.IterableDataset):
        if not isinstance(feature, datasets.ClassLabel):
            raise ValueError(
                f"--label-column {label_column!r} of {where} holds {feature}: a streamed dataset needs a ClassLabel "
                "column (its names are the classes; integers would have to be read to the end)"
            )
        return tuple(feature.names)
    labels = np.asarray(dataset.with_format("numpy", columns=[label_column])[label_column])
    if labels.size and labels.min() < 0:
        raise ValueError(
            f"--label-column {label_column!r} of {where} holds the label {int(labels.min())}; labels must be 0 or "
            "more (a ClassLabel's -1, 'no label', cannot be trained on: drop those rows or use --conditioning none)"
        )
    if isinstance(feature, datasets.ClassLabel):
        return tuple(feature.names)
    return tuple(str(label) for label in range(int(labels.max()) + 1 if labels.size else 0))


class HFImageDataset(Dataset):
    """One split of a ``datasets`` dataset (map-style) for training, decoded lazily: ``__getitem__`` reads and
    decodes one row's image and converts it with :func:`image_to_tensor` (the same conversion as folders).

    Items are ``{"pixel_values", "class_labels" (-1 without labels), "index"}``. A row whose image cannot be
    decoded is reported (a warning) and replaced by the next one. Build it with :func:`build_hf_image_dataset`.
    """

    def __init__(
        self,
        dataset: Any,
        image_column: str,
        label_column: str | None,
        class_names: tuple[str, ...],
        resolution: int,
        color_mode: ColorMode = "rgb",
        crop: CropMode = "center",
        random_flip: bool = False,
        name: str = "",
    ) -> None:
        self.dataset = dataset
        self.image_column, self.label_column = image_column, label_column
        self.class_names = class_names
        self.resolution, self.color_mode, self.crop, self.random_flip = (
            resolution,
            color_mode,
            crop,
            random_flip,
        )
        self.num_channels = 1 if color_mode == "grayscale" else 3
        self.name = name

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.dataset)

    def _item(self, row: dict[str, Any], index: int) -> dict[str, torch.Tensor | int]:
        image = row[self.image_column]
        if not isinstance(image, Image.Image):
            raise ValueError(
                f"row {index} of column {self.image_column!r} holds {type(image).__name__}, not an image"
            )
        pixel_values = image_to_tensor(image, self.resolution, self.color_mode, self.crop, self.random_flip)
        label = int(row[self.label_column]) if self.label_column is not None else -1
        return {"pixel_values": pixel_values, "class_labels": torch.tensor(label), "index": index}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        for attempt in range(len(self.dataset)):
            current = (index + attempt) % len(self.dataset)
            try:
                return self._item(self.dataset[current], current)
            except Exception as error:  # a corrupt image in the column: report it and use the next row
                logger.warning(
                    "skipping row %d of %s (%s: %s)", current, self.name, type(error).__name__, error
                )
        raise RuntimeError(f"no image of {self.name} can be read")


def build_hf_image_dataset(
    name: str,
    resolution: int,
    config_name: str | None = None,
    split: str = "train",
    cache_dir: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    use_labels: bool = True,
    streaming: bool = False,
    color_mode: ColorMode = "rgb",
    crop: CropMode = "center",
    random_flip: bool = False,
) -> Any:
    """A training dataset from ``datasets`` (see :func:`load_hf_dataset`), checked before training: the columns
    (:func:`resolve_columns`), the labels, and that the split is not empty. Map-style datasets give an
    :class:`HFImageDataset`; ``streaming=True`` gives a :class:`StreamingImageDataset` (no length)."""
    import datasets

    where = f"--dataset-name {name!r} (split {split!r})"
    dataset = load_hf_dataset(name, config_name, split, cache_dir, streaming)
    if isinstance(dataset, datasets.IterableDataset) and dataset.features is None:
        dataset = dataset._resolve_features()  # reads the first rows
    image_column, label_column = resolve_columns(
        dataset.features, image_column, label_column, use_labels, where
    )
    dataset = dataset.select_columns([image_column] + ([label_column] if label_column else []))
    if (
        not isinstance(dataset.features[image_column], datasets.Image)
        or not dataset.features[image_column].decode
    ):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=True))
    class_names = _class_names(dataset, label_column, where) if label_column else ()
    options = dict(
        resolution=resolution, color_mode=color_mode, crop=crop, random_flip=random_flip, name=where
    )
    if isinstance(dataset, datasets.IterableDataset):
        if next(iter(dataset.take(1)), None) is None:
            raise ValueError(f"{where} is empty: it has no rows")
        return StreamingImageDataset(dataset, image_column, label_column, class_names, **options)
    if len(dataset) == 0:
        raise ValueError(f"{where} is empty: it has no rows")
    return HFImageDataset(dataset, image_column, label_column, class_names, **options)


class StreamingImageDataset(torch.utils.data.IterableDataset):
    """A streamed split (a ``datasets.IterableDataset``) for training: rows are downloaded or read and decoded as
    training goes (never all stored), through :func:`image_to_tensor`. It has no length: train for
    ``--max-train-steps``; an epoch ends where the stream does. Each epoch is shuffled with a buffer of
    ``shuffle_buffer`` rows, seeded by ``seed`` and the epoch (``set_epoch``); torch ``DataLoader`` workers read
    separate shards of the stream (``datasets`` splits them). A row that cannot be decoded is skipped (warning)."""

    def __init__(
        self,
        dataset: Any,
        image_column: str,
        label_column: str | None,
        class_names: tuple[str, ...],
        resolution: int,
        color_mode: ColorMode = "rgb",
        crop: CropMode = "center",
        random_flip: bool = False,
        name: str = "",
        seed: int = 0,
        shuffle_buffer: int = 1000,
    ) -> None:
        self.maps = HFImageDataset(
            dataset, image_column, label_column, class_names, resolution, color_mode, crop, random_flip, name
        )
        self.dataset, self.class_names, self.num_channels = dataset, class_names, self.maps.num_channels
        self.seed, self.shuffle_buffer, self.epoch = seed, shuffle_buffer, 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rows(self, dataset: Any) -> Iterator[dict[str, torch.Tensor | int]]:
        for index, row in enumerate(dataset):
            try:
                yield self.maps._item(row, index)
            except Exception as error:
                logger.warning(
                    "skipping row %d of %s (%s: %s)", index, self.maps.name, type(error).__name__, error
                )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor | int]]:
        dataset = self.dataset.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        dataset.set_epoch(self.epoch)
        return self._rows(dataset)

    def head(self, count: int) -> list[dict[str, torch.Tensor | int]]:
        """The first ``count`` readable rows of the stream, unshuffled (e.g. for an evaluation)."""
        return list(itertools.islice(self._rows(self.dataset), count))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it, fsync and ``os.replace``: readers see the
    old file or the new one, never half of one, and a failed write leaves no temporary file behind.

    A failed write (disk full, permission denied) raises the ``OSError`` with ``filename`` set to ``path`` (not
    to the temporary file)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        if error.errno is None:
            raise
        raise type(error)(error.errno, error.strerror, str(path)) from error
    finally:
        temporary.unlink(missing_ok=True)


def save_png(image: Image.Image, path: str | os.PathLike) -> None:
    """Save a PIL image as PNG atomically (see :func:`atomic_write_bytes`)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


# ------------------------------------------------------------------------------------------- output checks
def _nearest_existing(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing parent (``os.path.exists``: unreadable counts as
    missing, so the check below reports it as not writable)."""
    while not os.path.exists(path) and path != path.parent:
        path = path.parent
    return path


def _check_writable_folder(folder: Path, what: str, target: Path) -> None:
    """Raise ``ValueError`` unless a file can be created in ``folder`` (``pipeline_ddpm.unwritable_reason``)."""
    from .pipeline_ddpm import unwritable_reason

    reason = unwritable_reason(folder)
    if reason is not None:
        raise ValueError(f"{what} {str(target)!r}: cannot write into {str(folder)!r} ({reason})")


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """Check, writing nothing, that :func:`atomic_write_bytes` can write the file ``path``; return it as a Path.

    ``ValueError`` (its message starts with ``what`` and the path) when ``path`` is a folder, when a parent of it is a
    file, or when its folder (or the nearest existing parent, for folders still to be created) is not writable.
    An existing file is replaced by the write."""
    path = Path(path)
    if os.path.isdir(path):
        raise ValueError(
            f"{what} {str(path)!r} is a folder; pass a file name, e.g. {str(path / 'samples.png')!r}"
        )
    folder = _nearest_existing(path.parent)
    if not os.path.isdir(folder):
        raise ValueError(f"{what} {str(path)!r}: {str(folder)!r} is a file, not a folder")
    _check_writable_folder(folder, what, path)
    return path


def check_output_folder(path: str | os.PathLike, what: str, file_names: Sequence[str] = ()) -> Path:
    """Check, writing nothing, that the files ``file_names`` can be written into the folder ``path`` (existing or
    to be created); return it as a Path.

    ``ValueError`` (its message starts with ``what`` and the path) when ``path`` or a parent of it is a file, when
    one of ``file_names`` is an existing folder, or when the folder (or its nearest existing parent) is not
    writable."""
    path = Path(path)
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        where = "it is a file" if existing == path else f"{str(existing)!r} is a file"
        raise ValueError(f"{what} {str(path)!r} must be a folder, but {where}")
    if existing == path:
        for name in file_names:
            if os.path.isdir(path / name):
                raise ValueError(
                    f"{what} {str(path)!r}: {str(path / name)!r} is a folder; it would be written as a file"
                )
    _check_writable_folder(existing, what, path)
    return path
