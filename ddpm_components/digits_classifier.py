"""A small classifier of the embedded 8×8 digits: the feature network of the "digits FD" and a class-consistency
judge, shipped with its weights so that its numbers never drift between machines and need no download.

Inception features mean nothing at 8×8, so sample quality on the digits is measured in the penultimate
(64-dimensional) features of this network, trained on the digits' fixed training split
(:func:`ddpm_components.data.digits_split_indices`); its accuracy on the test split is reported with it.

The weights (``assets/digits_classifier.safetensors``, about 0.5 MB) were made by this module:

    python -m ddpm_components.digits_classifier            # retrain (about a minute on one CPU core) and write them

Training is seeded and single-threaded, so it reproduces the same network on the same torch version; the
shipped file is what counts (a different torch may round differently; the numbers are then still comparable
only when computed with the shipped weights, which is why they are shipped).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DigitsClassifier", "load_digits_classifier", "train_digits_classifier"]

WEIGHTS_PATH = Path(__file__).parent / "assets" / "digits_classifier.safetensors"
NUM_FEATURES = 64


class DigitsClassifier(nn.Module):
    """Three 3×3 convolutions (32, 64, 128 channels, one 2×2 max-pool), global average pooling, a 64-unit
    feature layer and a 10-way output. Input: ``(N, 1, 8, 8)`` in [-1, 1]."""

    num_features = NUM_FEATURES  # torchmetrics reads this of a custom feature extractor

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.feature = nn.Linear(128, NUM_FEATURES)
        self.head = nn.Linear(NUM_FEATURES, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The penultimate activations ``(N, 64)``: what the digits FD compares."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8):
            raise ValueError(
                f"the digits classifier takes (N, 1, 8, 8) greyscale images in [-1, 1], got shape "
                f"{tuple(images.shape)}"
            )
        h = F.relu(self.conv1(images))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.relu(self.conv3(h)).mean(dim=(2, 3))
        return F.relu(self.feature(h))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, 10)``."""
        return self.head(self.features(images))


def load_digits_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """The shipped classifier (or one saved at ``path``), in eval mode, on the CPU, float32."""
    from safetensors.torch import load_file

    path = WEIGHTS_PATH if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"the digits classifier's weights {path} are missing; reinstall ddpm-components or recreate them with "
            "`python -m ddpm_components.digits_classifier`"
        )
    model = DigitsClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def _shifted(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Augmentation: shift each image by up to one pixel in each direction (zero-padded, i.e. background)."""
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    offsets = torch.randint(0, 3, (images.shape[0], 2), generator=generator)
    return torch.stack(
        [padded[i, :, dy : dy + 8, dx : dx + 8] for i, (dy, dx) in enumerate(offsets.tolist())]
    )


def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of ``images`` that ``model`` classifies as ``labels``."""
    with torch.no_grad():
        return float((model(images).argmax(dim=1) == labels).double().mean())


def train_digits_classifier(
    epochs: int = 60, batch_size: int = 64, learning_rate: float = 2e-3, seed: int = 0
) -> tuple[DigitsClassifier, float]:
    """Train a :class:`DigitsClassifier` on the digits' training split; return it and its test accuracy."""
    from tqdm.auto import tqdm

    from .data import digits_split_indices, digits_tensor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic reductions
    try:
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        images, labels = digits_tensor(8)
        train, test = digits_split_indices("train"), digits_split_indices("test")
        model = DigitsClassifier()
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
        steps = epochs * math.ceil(train.numel() / batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps)
        for _ in tqdm(range(epochs), desc="digits classifier"):
            model.train()
            order = train[torch.randperm(train.numel(), generator=generator)]
            for start in range(0, order.numel(), batch_size):
                batch = order[start : start + batch_size]
                loss = F.cross_entropy(model(_shifted(images[batch], generator)), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
        model.eval()
        return model, accuracy(model, images[test], labels[test])
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description="Retrain the digits classifier and write its weights.")
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH, help="where to write the safetensors file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model, test_accuracy = train_digits_classifier(seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_name(f".{args.out.name}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(temporary))
        temporary.replace(args.out)
    finally:
        temporary.unlink(missing_ok=True)
    print(f"wrote {args.out}: test accuracy {test_accuracy:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
