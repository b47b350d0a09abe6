"""Image data for ddpm-components: the embedded default dataset and helpers shared by the CLI and training.

The embedded default dataset is scikit-learn's 8×8 handwritten digits (1,797 greyscale images of the
digits 0–9 with labels), which ships inside scikit-learn: nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

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
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp(-1.0, 1.0)
    return x, torch.from_numpy(labels)


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """Map a batch in [-1, 1] of shape ``(N, C, H, W)`` to uint8 ``(N, H, W, C)``."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
