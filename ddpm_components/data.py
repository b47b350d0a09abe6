"""Image data for ddpm-components: the embedded default dataset and helpers shared by the CLI and training.

The embedded default dataset is scikit-learn's 8×8 handwritten digits (1,797 greyscale images of the
digits 0–9 with labels), which ships inside scikit-learn: nothing is downloaded. :class:`DigitsDataset`
serves it for training; :class:`ImageFolderDataset` serves any folder of images (labels from sub-folders).
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

DIGITS_NUM_CLASSES = 10


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


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


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
    """``None`` if Pillow can decode ``path`` fully, else the reason it cannot."""
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as error:  # Pillow raises many types for corrupt files
        return f"{type(error).__name__}: {error}"
    return None


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale (modes ``I;16*`` and ``I``, e.g. 16-bit PNGs) scaled to 8-bit ``L``; other modes as they
    are. Pillow's own ``convert("L")`` clips such images at 255, turning almost every pixel white."""
    if image.mode != "I" and not image.mode.startswith("I;16"):
        return image
    array = np.asarray(image).astype(np.float64).clip(0, 65535)
    return Image.fromarray(np.rint(array / 257.0).astype(np.uint8), mode="L")


class ImageFolderDataset(Dataset):
    """Every image under a folder, recursively, for training.

    Files ending in :data:`IMAGE_EXTENSIONS` are found recursively and sorted by path. With
    ``use_labels=True`` the name of each file's first-level sub-folder is its class (classes sorted by
    name; files directly in ``root`` make the dataset unlabelled). Every file is decoded once when the
    dataset is built: unreadable or corrupt files are reported by name (a warning per file) and skipped,
    so nothing fails mid-epoch; a folder with no readable image raises ``ValueError`` right away.

    Images are resized (shorter side to ``resolution``, bicubic, antialiased), cropped to a square
    (``crop="center"`` or ``"random"``), optionally flipped horizontally, and mapped to [-1, 1].

    Args:
        root: the folder.
        resolution: output size in pixels.
        color_mode: ``"grayscale"`` (1 channel) or ``"rgb"`` (3 channels).
        crop: ``"center"`` or ``"random"``.
        random_flip: flip horizontally with probability 1/2.
        use_labels: take class labels from first-level sub-folder names.
        check_files: decode every file once at build time to skip corrupt ones (recommended).
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

        candidates = sorted(
            path
            for path in self.root.rglob("*")
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
        )
        self.skipped: list[tuple[Path, str]] = []
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
        with Image.open(self.paths[index]) as image:
            image = _to_8_bit(image).convert("L" if self.color_mode == "grayscale" else "RGB")
            width, height = image.size
            scale = self.resolution / min(width, height)
            size = (max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale)))
            if size != image.size:
                image = image.resize(size, resample=Image.Resampling.BICUBIC, reducing_gap=None)
            array = np.asarray(image, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        x = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)
        height, width = x.shape[-2:]
        if self.crop == "random":
            top = int(torch.randint(0, height - self.resolution + 1, ()))
            left = int(torch.randint(0, width - self.resolution + 1, ()))
        else:
            top = (height - self.resolution) // 2
            left = (width - self.resolution) // 2
        x = x[:, top : top + self.resolution, left : left + self.resolution]
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x

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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it, fsync and ``os.replace``: readers see the
    old file or the new one, never half of one, and a failed write leaves no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_png(image: Image.Image, path: str | os.PathLike) -> None:
    """Save a PIL image as PNG atomically (see :func:`atomic_write_bytes`)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
