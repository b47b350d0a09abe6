"""The digits classifier and the digits FD/KID computed through torchmetrics with it."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from ddpm_components.data import digits_split_indices, digits_tensor
from ddpm_components.digits_classifier import accuracy, load_digits_classifier, train_digits_classifier
from ddpm_components.evaluation import (
    INCEPTION_WEIGHTS_NAME,
    INCEPTION_WEIGHTS_URL,
    digits_fd,
    digits_kid,
    feature_space,
    find_inception_weights,
    frechet_distance,
    precision_recall,
)


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
    """Retraining gives a network equivalent to the shipped one. Not the same weights everywhere: on the CPU kind
    that trained them (an Intel Xeon) they matched to 1e-4, but another CPU's kernels round differently and 60 epochs
    amplify it (up to 0.33 apart on an AMD EPYC, with identical predictions), so the predictions are compared."""
    model, test_accuracy = train_digits_classifier(epochs=60)
    assert test_accuracy >= 0.97
    shipped = load_digits_classifier()
    images, _ = digits_tensor(8)
    test = digits_split_indices("test")
    with torch.no_grad():
        agreement = (model(images[test]).argmax(1) == shipped(images[test]).argmax(1)).double().mean()
    assert agreement >= 0.98, (
        f"the retrained classifier agrees with the shipped one on {float(agreement):.1%}"
    )


def _brute_force_precision_recall(generated, reference, k):
    """Kynkäänniemi et al. (2019) written out with loops: each set's k-NN radii, then membership."""

    def radii(points):
        return [sorted(float((p - q).norm()) for q in points)[k] for p in points]  # [0] is the point itself

    real_radii, fake_radii = radii(reference), radii(generated)
    precision = sum(
        any(float((g - r).norm()) < radius for r, radius in zip(reference, real_radii)) for g in generated
    ) / len(generated)
    recall = sum(
        any(float((r - g).norm()) < radius for g, radius in zip(generated, fake_radii)) for r in reference
    ) / len(reference)
    return precision, recall


def test_precision_recall_matches_a_brute_force_computation():
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(40, 5, generator=generator, dtype=torch.float64)
    generated = torch.randn(30, 5, generator=generator, dtype=torch.float64) * 1.5 + 0.7
    precision, recall = precision_recall(generated, reference, nearest_k=3)
    expected = _brute_force_precision_recall(generated, reference, 3)
    assert (precision, recall) == pytest.approx(expected, abs=1e-9)
    assert 0 < precision < 1 and 0 < recall < 1  # a case where both sides matter
    assert precision_recall(reference, reference) == (1.0, 1.0)
    assert precision_recall(reference + 100.0, reference) == (0.0, 0.0)


def test_frechet_distance_of_features_matches_scipy():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(200, 6, generator=generator, dtype=torch.float64)
    b = (
        torch.randn(150, 6, generator=generator, dtype=torch.float64)
        @ torch.diag(torch.linspace(0.5, 2, 6, dtype=torch.float64))
        + 0.3
    )
    cov_a, cov_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    direct = float(((a.mean(0) - b.mean(0)) ** 2).sum()) + float(np.trace(cov_a + cov_b - 2 * root))
    assert frechet_distance(a, b) == pytest.approx(direct, rel=1e-6)


def test_metrics_follow_the_data_and_refuse_digit_metrics_on_other_data():
    digits = torch.zeros(4, 1, 8, 8)
    rgb = torch.zeros(4, 3, 16, 16)
    assert [feature_space(m, digits) for m in ("fd", "fid", "kid", "precision-recall")] == [
        "digits",
        "inception",
        "digits",
        "digits",
    ]
    assert feature_space("kid", rgb) == feature_space("precision-recall", rgb) == "inception"
    for metric in ("fd", "accuracy"):
        with pytest.raises(ValueError, match=rf"{metric} uses the digits classifier.*\(3, 16, 16\).*use fid"):
            feature_space(metric, rgb)


def test_inception_weights_are_found_or_the_error_says_where_to_put_which_file(tmp_path, monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    with pytest.raises(ValueError, match=r"pip install 'ddpm-components\[fid\]'"):
        find_inception_weights()
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    expected = tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS_NAME
    with pytest.raises(ValueError) as error:
        find_inception_weights()
    assert str(expected) in str(error.value) and INCEPTION_WEIGHTS_URL in str(error.value)
    assert "never downloads" in str(error.value)
    other = tmp_path / "other.pth"
    other.write_bytes(b"not the weights")
    with pytest.raises(
        ValueError, match=r"is not torch-fidelity's weights-inception-2015-12-05-6726825d.pth"
    ):
        find_inception_weights(other)
