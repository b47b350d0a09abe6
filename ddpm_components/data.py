"""Image data for ddpm-components: the embedded default dataset and helpers shared by the CLI and training.

The embedded default dataset is scikit-learn's 8×8 handwritten digits (1,797 greyscale images of the
digits 0–9 with labels), which ships inside scikit-learn: nothing is downloaded. :class:`DigitsDataset`
serves it for training; :class:`ImageFolderDataset` serves any folder of images (labels from sub-folders).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

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
    """``None`` if Pillow can decode ``path`` fully, else the reason it cannot."""
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as error:  # Pillow raises many types for corrupt files
        return f"{type(error).__name__}: {error}"
    return None


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


class ImageFolderDataset(Dataset):
    """Every image under a folder, recursively, for training.

    Files ending in :data:`IMAGE_EXTENSIONS` are found recursively and sorted by path. Hidden files and
    folders (any name starting with ``.``, e.g. ``.ipynb_checkpoints/``) are ignored; symbolic links to
    folders and files are followed, each real folder is read once, and a link loop is reported (a warning)
    and not followed. With ``use_labels=True`` the name of each file's first-level sub-folder is its class:
    ``class_names`` are the sorted folder names and a label is a position in it (files directly in ``root``
    make the dataset unlabelled). Every file is decoded once when the dataset is built: unreadable or corrupt
    files are reported by name (a warning per file) and skipped, so nothing fails mid-epoch; a folder with no
    readable image raises ``ValueError`` right away.

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
        with Image.open(self.paths[index]) as image:
            image = standardize_pil_image(image, "L" if self.color_mode == "grayscale" else "RGB")
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
