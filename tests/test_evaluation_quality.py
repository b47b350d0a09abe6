"""The digits classifier and the digits FD/KID computed through torchmetrics with it."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from ddpm_components.data import digits_split_indices, digits_tensor
from ddpm_components.digits_classifier import accuracy, load_digits_classifier, train_digits_classifier
from ddpm_components.evaluation import digits_fd, digits_kid


@pytest.fixture(scope="module")
def digits():
    images, labels = digits_tensor(8)
    return images, labels, digits_split_indices("train"), digits_split_indices("test")


def test_split_is_fixed_stratified_and_disjoint(digits):
    images, labels, train, test = digits
    assert len(train) + len(test) == len(images) == 1797 and len(test) == 359
    assert not set(train.tolist()) & set(test.tolist())
    counts = torch.bincount(labels[test], minlength=10).float() / torch.bincount(labels, minlength=10)
    assert torch.allclose(counts, torch.full_like(counts, 0.2), atol=0.02)
    assert test[:5].tolist() == digits_split_indices("test")[:5].tolist()  # the same split every call


def test_shipped_classifier_accuracy_on_the_test_split(digits):
    images, labels, _, test = digits
    assert accuracy(load_digits_classifier(), images[test], labels[test]) >= 0.97


def test_digits_fd_matches_a_direct_frechet_computation(digits):
    """torchmetrics' number equals |μ1-μ2|² + Tr(Σ1 + Σ2 - 2(Σ1Σ2)^½) on the same features (scipy), to 1e-3."""
    images, _, train, test = digits
    generated = images[train[:300]]
    reference = images[test]
    features = load_digits_classifier().features
    with torch.no_grad():
        a, b = features(generated).double().numpy(), features(reference).double().numpy()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    direct = float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))
    assert digits_fd(generated, reference) == pytest.approx(direct, rel=1e-3, abs=1e-3)


def test_real_vs_real_is_small_and_noise_vs_real_large(digits):
    images, _, train, test = digits
    generator = torch.Generator().manual_seed(0)
    same_size = train[torch.randperm(len(train), generator=generator)[: len(test)]]
    real = digits_fd(images[same_size], images[test])
    noise = digits_fd(torch.randn(len(test), 1, 8, 8, generator=generator).clamp(-1, 1), images[test])
    assert real < 10 < 100 * real < noise
    kid_real, _ = digits_kid(images[same_size], images[test])
    kid_noise, _ = digits_kid(torch.rand(len(test), 1, 8, 8, generator=generator) * 2 - 1, images[test])
    assert abs(kid_real) < kid_noise / 100


def test_fd_refuses_other_images():
    with pytest.raises(ValueError, match=r"8x8 greyscale images.*use FID"):
        digits_fd(torch.zeros(4, 3, 32, 32), torch.zeros(4, 1, 8, 8))
    with pytest.raises(ValueError, match="NaN or infinite"):
        digits_fd(torch.full((4, 1, 8, 8), float("nan")), torch.zeros(4, 1, 8, 8))


@pytest.mark.slow
def test_the_classifier_script_reproduces_an_accurate_network():
    model, test_accuracy = train_digits_classifier(epochs=60)
    assert test_accuracy >= 0.97
    shipped = load_digits_classifier()
    differences = [float((p - q).abs().max()) for p, q in zip(model.parameters(), shipped.parameters())]
    assert max(differences) < 1e-4, (
        "retraining on this torch version gives other weights than the shipped ones"
    )
