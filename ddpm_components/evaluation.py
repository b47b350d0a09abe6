"""How good is a trained DDPM: its negative log-likelihood bound in bits per dimension.

The bound is DDPM's Eq. 5 (Ho et al. 2020, arXiv 2006.11239) with the discretized Gaussian decoder of §3.3:

    -log p(x_0) <= L_T + Σ_{t=2}^{T} L_{t-1} + L_0,
    L_T = KL(q(x_T | x_0) || N(0, I)),  L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_θ(x_{t-1} | x_t)),
    L_0 = -log p_θ(x_0 | x_1),

divided by the number of dimensions and by log 2. The terms come from the scheduler's likelihood API
(:meth:`~ddpm_components.scheduling_ddpm.DDPMScheduler.vlb_terms` and ``prior_bpd``), so every prediction
type and variance type of the scheduler (learned variance included) is covered; timesteps are 0-based, as in
diffusers (the paper's t = 1 is our t = 0).

- :func:`bits_per_dim` runs the whole chain, every one of the T timesteps for every image, like
  improved-diffusion's ``calc_bpd_loop``: the number to report.
- :func:`bits_per_dim_estimate` draws K timesteps per image, one uniformly from each of K equal strata of
  {0, …, T-1}, and returns ``L_T + Σ_k |stratum_k| · L_{t_k}``: an unbiased estimate of the same bound (its
  expectation over the timesteps is the full sum) at K/T of the cost, for use during training. Its variance
  over the draw of timesteps is ``Σ_k |stratum_k|² · Var_{t ∈ stratum_k}[L_t]`` per image (stratification
  removes the variance between strata); the standard error it reports is taken over images and so includes it.

Data must be 8-bit images mapped to [-1, 1] (the decoder's bins are 2/255 wide); other values raise
``ValueError``.

Sample quality on the embedded digits is the **digits FD**: the Fréchet distance between the penultimate features
of :class:`~ddpm_components.digits_classifier.DigitsClassifier` (shipped weights) of generated and real images,
computed by torchmetrics' ``FrechetInceptionDistance`` with that network as its feature extractor (and KID
likewise), so no Fréchet maths is written here and nothing is downloaded. Other data gets FID and KID in
Inception-V3's features (torch-fidelity's network through torchmetrics, from a local weights file:
:func:`find_inception_weights`); precision and recall (Kynkäänniemi et al. 2019) come from ``prdc``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BitsPerDim",
    "InceptionFeatures",
    "SampleQuality",
    "bits_per_dim",
    "bits_per_dim_estimate",
    "digits_fd",
    "digits_kid",
    "evaluate_samplers",
    "find_inception_weights",
    "frechet_distance",
    "kernel_distance",
    "mean_and_stderr",
    "precision_recall",
    "run_evaluation",
]

_GRID_TOLERANCE = 1e-3  # how far (in 8-bit levels) a value may lie from the 256-level grid


@dataclass
class BitsPerDim:
    """A likelihood bound in bits per dimension, averaged over images, with its parts.

    Attributes:
        total: the bound L_T + Σ L_{t-1} + L_0 (mean over images).
        prior: L_T, the prior term.
        vb: Σ_{t=2}^{T} L_{t-1}, the KL terms of the chain (the decoder excluded).
        decoder: L_0, the discretized Gaussian decoder's negative log-likelihood.
        stderr: the standard error of ``total`` over images.
        num_images: how many images the mean is over.
        per_image: ``total`` of each image (a 1-d tensor).
    """

    total: float
    prior: float
    vb: float
    decoder: float
    stderr: float
    num_images: int
    per_image: torch.Tensor = field(repr=False)

    def to_dict(self) -> dict[str, float | int]:
        """The numbers, without the per-image tensor (what the evaluation JSON holds)."""
        values = asdict(self)
        values.pop("per_image")
        return values


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise ValueError("images must be a float tensor (N, C, H, W) of 8-bit values mapped to [-1, 1]")
    if images.shape[0] == 0:
        raise ValueError("images is empty; pass at least one image")
    levels = (images.double() + 1.0) * 127.5
    off_grid = (levels - levels.round()).abs().max().item()
    if (
        not math.isfinite(off_grid)
        or off_grid > _GRID_TOLERANCE
        or levels.min() < -0.5
        or levels.max() > 255.5
    ):
        raise ValueError(
            "images must be 8-bit images mapped to [-1, 1] (x = level / 127.5 - 1, level in 0..255), as the "
            "discretized decoder L_0 needs; these hold other values"
        )


def _class_labels_for(unet: Any, class_labels: torch.Tensor | None, num_images: int) -> torch.Tensor | None:
    """Labels to condition on: the given ones, else the null class of a class-conditional U-Net."""
    conditional = getattr(unet.config, "num_class_embeds", None) is not None
    if class_labels is not None:
        if not conditional:
            raise ValueError("class_labels were given but the U-Net is unconditional; pass class_labels=None")
        labels = torch.as_tensor(class_labels).long().reshape(-1)
        if labels.numel() != num_images:
            raise ValueError(f"got {labels.numel()} class labels for {num_images} images; pass one per image")
        return labels
    if not conditional:
        return None
    null_label = getattr(unet, "null_class_label", None)
    if null_label is None:
        raise ValueError("this class-conditional U-Net has no null class: pass class_labels, one per image")
    return torch.full((num_images,), int(null_label), dtype=torch.long)


def _terms(
    unet: Any,
    scheduler: Any,
    original_sample: torch.Tensor,
    timesteps: torch.Tensor,
    class_labels: torch.Tensor | None,
    generator: torch.Generator | None,
    clip_denoised: bool,
) -> torch.Tensor:
    """L_t (bits/dim, one per image) at one timestep per image: draw ε, form x_t ~ q(x_t | x_0), call the model."""
    noise = torch.randn(original_sample.shape, generator=generator, dtype=original_sample.dtype)
    noise = noise.to(original_sample.device)
    sample = scheduler.add_noise(original_sample, noise, timesteps)
    kwargs = {} if class_labels is None else {"class_labels": class_labels}
    model_output = unet(sample.to(unet.dtype), timesteps, **kwargs).sample.to(original_sample.dtype)
    return scheduler.vlb_terms(model_output, original_sample, sample, timesteps, clip_denoised=clip_denoised)


def _batches(num_images: int, batch_size: int) -> list[slice]:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return [slice(start, min(start + batch_size, num_images)) for start in range(0, num_images, batch_size)]


def mean_and_stderr(per_image: torch.Tensor) -> tuple[float, float]:
    """The mean of a bound's per-image values and its standard error over images (sample standard deviation /
    sqrt(n); NaN for a single image)."""
    count = per_image.numel()
    stderr = float(per_image.std(unbiased=True) / math.sqrt(count)) if count > 1 else float("nan")
    return float(per_image.mean()), stderr


def _summarise(prior: torch.Tensor, vb: torch.Tensor, decoder: torch.Tensor) -> BitsPerDim:
    total = prior + vb + decoder
    if not bool(torch.isfinite(total).all()):
        raise FloatingPointError("the bound is not finite for some image: the model output holds NaN or inf")
    mean, stderr = mean_and_stderr(total)
    return BitsPerDim(
        total=mean,
        prior=float(prior.mean()),
        vb=float(vb.mean()),
        decoder=float(decoder.mean()),
        stderr=stderr,
        num_images=total.numel(),
        per_image=total,
    )


@torch.no_grad()
def bits_per_dim(
    unet: Any,
    scheduler: Any,
    images: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    *,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    clip_denoised: bool = True,
    show_progress: bool = True,
) -> BitsPerDim:
    """The full variational bound of DDPM Eq. 5 in bits/dim, every timestep for every image.

    Args:
        unet: the noise-prediction network (``unet(x_t, t, class_labels=...).sample``), in eval mode.
        scheduler: our ``DDPMScheduler`` with the configuration the model was trained with (its
            ``variance_type`` says how the model's variance is read, e.g. ``learned_range``).
        images: ``(N, C, H, W)``, 8-bit images mapped to [-1, 1], on the U-Net's device.
        class_labels: one label per image for a class-conditional U-Net (the conditional likelihood
            p(x | y)); ``None`` uses the null class (the unconditional likelihood) or an unconditional U-Net.
        batch_size: images per model call.
        generator: CPU generator for the noise ε of every q(x_t | x_0) draw (reproducible numbers).
        clip_denoised: clip x̂_0 to [-1, 1] before the posterior mean, as improved-diffusion's ``calc_bpd_loop``.
        show_progress: a progress bar over the timesteps.

    Returns:
        :class:`BitsPerDim` (total, prior, vb, decoder, standard error over images).
    """
    _check_images(images)
    num_train_timesteps = scheduler.config.num_train_timesteps
    rounds = [
        (torch.full((images.shape[0],), t, dtype=torch.long), 1.0)
        for t in range(num_train_timesteps - 1, -1, -1)
    ]
    return _bound(
        unet, scheduler, images, class_labels, rounds, batch_size, generator, clip_denoised, show_progress
    )


def _bound(
    unet: Any,
    scheduler: Any,
    images: torch.Tensor,
    class_labels: torch.Tensor | None,
    rounds: Sequence[tuple[torch.Tensor, float]],
    batch_size: int,
    generator: torch.Generator | None,
    clip_denoised: bool,
    show_progress: bool,
) -> BitsPerDim:
    """L_T plus Σ over ``rounds`` of weight · L_{t} at each round's timesteps (one per image), split into the
    decoder (t = 0) and KL parts: the full chain (every t, weight 1) or the stratified estimate."""
    from tqdm.auto import tqdm

    labels = _class_labels_for(unet, class_labels, images.shape[0])
    batches = _batches(images.shape[0], batch_size)
    prior = torch.cat([scheduler.prior_bpd(images[part]) for part in batches]).double().cpu()
    vb = torch.zeros(images.shape[0], dtype=torch.float64)
    decoder = torch.zeros_like(vb)
    for timesteps, weight in tqdm(rounds, desc="bits/dim", disable=not show_progress):
        for part in batches:
            batch = images[part]
            batch_labels = None if labels is None else labels[part].to(batch.device)
            batch_timesteps = timesteps[part].to(batch.device)
            terms = _terms(unet, scheduler, batch, batch_timesteps, batch_labels, generator, clip_denoised)
            weighted = terms.double().cpu() * weight
            is_decoder = timesteps[part] == 0
            decoder[part] += torch.where(is_decoder, weighted, 0.0)
            vb[part] += torch.where(is_decoder, 0.0, weighted)
    return _summarise(prior, vb, decoder)


def _stratified_timesteps(
    num_train_timesteps: int, num_strata: int, num_images: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One timestep per image from each of ``num_strata`` near-equal strata of {0, …, T-1}: ``(K, N)``
    timesteps and the ``(K,)`` stratum sizes (the weights that make the sum unbiased)."""
    edges = torch.linspace(0, num_train_timesteps, num_strata + 1).round().long()
    sizes = edges[1:] - edges[:-1]
    offsets = (torch.rand(num_strata, num_images, generator=generator) * sizes[:, None]).long()
    offsets = torch.minimum(offsets, sizes[:, None] - 1)
    return edges[:-1, None] + offsets, sizes


@torch.no_grad()
def bits_per_dim_estimate(
    unet: Any,
    scheduler: Any,
    images: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    *,
    num_timesteps: int = 10,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    clip_denoised: bool = True,
) -> BitsPerDim:
    """An unbiased estimate of :func:`bits_per_dim` from ``num_timesteps`` (K) stratified timesteps per image.

    {0, …, T-1} is cut into K near-equal strata; each image gets one uniform timestep t_k in each, and its
    estimate is ``L_T + Σ_k |stratum_k| · L_{t_k}`` (decoder and KL parts likewise), whose expectation over
    the timesteps is the full bound. K model calls per image instead of T. Arguments as :func:`bits_per_dim`.
    """
    _check_images(images)
    num_train_timesteps = scheduler.config.num_train_timesteps
    if not isinstance(num_timesteps, int) or not 1 <= num_timesteps <= num_train_timesteps:
        raise ValueError(
            f"num_timesteps must be an integer in [1, {num_train_timesteps}] (num_train_timesteps), got "
            f"{num_timesteps!r}"
        )
    timesteps, sizes = _stratified_timesteps(num_train_timesteps, num_timesteps, images.shape[0], generator)
    rounds = [(timesteps[stratum], float(sizes[stratum])) for stratum in range(num_timesteps)]
    return _bound(unet, scheduler, images, class_labels, rounds, batch_size, generator, clip_denoised, False)


# ------------------------------------------------------------------------------------------ sample quality
INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
"""torch-fidelity's Inception-V3 weights (the TensorFlow FID network, converted), which FID here uses."""
INCEPTION_WEIGHTS_URL = (
    f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_NAME}"
)
_INCEPTION_SHA256_PREFIX = (
    "6726825d"  # torch.hub's convention: the file name carries its SHA-256's first digits
)

SAMPLE_METRICS: tuple[str, ...] = ("fd", "fid", "kid", "precision-recall", "accuracy")
"""The sample metrics: ``fd`` (digits FD) and ``accuracy`` use the digits classifier and need 8×8 greyscale data;
``fid`` uses Inception-V3; ``kid`` and ``precision-recall`` use the digits classifier's features on 8×8 greyscale
data and Inception-V3's otherwise (see :func:`feature_space`)."""


class _DigitsFeatures(torch.nn.Module):
    """The digits classifier's penultimate features, as torchmetrics' custom feature extractor."""

    def __init__(self) -> None:
        super().__init__()
        from .digits_classifier import NUM_FEATURES, load_digits_classifier

        self.classifier = load_digits_classifier()
        self.num_features = NUM_FEATURES

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.float())


def find_inception_weights(weights: str | Path | None = None) -> Path:
    """The local Inception-V3 weights file for FID, checked before any sampling (nothing is ever downloaded).

    ``weights`` is a path to torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``; ``None`` looks where
    torch-fidelity itself would, in torch's hub cache (``$TORCH_HOME/hub/checkpoints``). Raises ``ValueError``
    saying which file to put where when torch-fidelity is missing or the file is absent or another file. The file
    is hashed once per process (92 MB): a later call for the same, unchanged file only looks at its size and time.
    """
    import hashlib

    try:
        import torch_fidelity  # noqa: F401  (torchmetrics takes its Inception network from here)
    except ImportError:
        raise ValueError(
            "fid (and kid / precision-recall on data other than 8x8 digits) use Inception-V3 features from "
            "torch-fidelity, which is not installed: pip install 'ddpm-components[fid]' (it needs a torchvision "
            "built for your torch)"
        ) from None
    except Exception as error:  # e.g. a torchvision built for another torch
        raise ValueError(f"torch-fidelity is installed but does not import: {error}") from None
    if weights is None:
        path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME
        where = f"put it at {path} (torch's hub cache, where torch-fidelity looks) or pass --inception-weights FILE"
    else:
        path = Path(weights)
        where = "pass its path with --inception-weights"
    if not path.is_file():
        raise ValueError(
            f"the Inception-V3 weights for FID are not at {path} and this program never downloads: fetch "
            f"{INCEPTION_WEIGHTS_URL} (92 MB) on a machine with network access and {where}"
        )
    status = path.stat()
    identity = (str(path.resolve()), status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
    if identity in _CHECKED_INCEPTION_FILES:  # hashed already, and not changed since
        return path
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(_INCEPTION_SHA256_PREFIX):
        raise ValueError(
            f"{path} is not torch-fidelity's {INCEPTION_WEIGHTS_NAME} (its SHA-256 starts "
            f"{digest.hexdigest()[:8]}, expected {_INCEPTION_SHA256_PREFIX})"
        )
    _CHECKED_INCEPTION_FILES.add(identity)
    return path


#: Weights files :func:`find_inception_weights` hashed in this process (path, device, inode, size, modification time):
#: a second check of the same unchanged file (training's setup, then its evaluation's network) reads it no more.
_CHECKED_INCEPTION_FILES: set[tuple[str, int, int, int, int]] = set()


class InceptionFeatures(torch.nn.Module):
    """Inception-V3's 2048 pool features, the network of FID, from a local weights file.

    The network is torch-fidelity's port of the TensorFlow FID graph, as torchmetrics' FID builds it. Images in
    [-1, 1] with one or three channels and any size are quantised to 8 bits (greyscale repeated to RGB) and
    resized by the network to 299×299. The weights are read with ``torch.load(weights_only=True)``, which runs no
    code from the file, and handed to torch-fidelity (which unpickles what it is given) as a copy we wrote.
    """

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__()
        import tempfile

        from torchmetrics.image.fid import NoTrainInceptionV3

        path = find_inception_weights(weights)
        state = torch.load(path, map_location="cpu", weights_only=True)
        with tempfile.TemporaryDirectory() as folder:
            trusted = Path(folder) / INCEPTION_WEIGHTS_NAME
            torch.save(state, trusted)
            self.network = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=["2048"],
                feature_extractor_weights_path=str(trusted),
            )
        self.num_features = 2048

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        return self.network(pixels).reshape(pixels.shape[0], -1)


def _is_digits_shaped(images: torch.Tensor) -> bool:
    return tuple(images.shape[1:]) == (1, 8, 8)


def feature_space(metric: str, reference: torch.Tensor) -> str:
    """Which features ``metric`` is measured in on data like ``reference``: ``"digits"`` or ``"inception"``.

    ``fd`` and ``accuracy`` need 8×8 greyscale data (else ``ValueError``); ``fid`` is always Inception;
    ``kid`` and ``precision-recall`` follow the data (the digits classifier on 8×8 greyscale, Inception otherwise).
    """
    if metric not in SAMPLE_METRICS:
        raise ValueError(f"unknown sample metric {metric!r}; choose from {', '.join(SAMPLE_METRICS)}")
    digits = _is_digits_shaped(reference)
    if metric in ("fd", "accuracy") and not digits:
        raise ValueError(
            f"{metric} uses the digits classifier: it needs 8x8 greyscale data, and this data is "
            f"{tuple(reference.shape[1:])}; use fid (Inception features) for other data"
        )
    if metric == "fid":
        return "inception"
    return "digits" if digits else "inception"


def _check_digit_images(images: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not _is_digits_shaped(images):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(
            f"the digits FD compares 8x8 greyscale images, (N, 1, 8, 8) in [-1, 1]; {name} is {shape}: use FID "
            "(Inception features) for other data"
        )
    return _check_feature_images(images, name)


def _check_feature_images(images: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be images (N, C, H, W) in [-1, 1], got {shape}")
    if images.shape[0] < 2:
        raise ValueError(f"{name} holds {images.shape[0]} image(s); a distance between sets needs at least 2")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    return images.detach().float().cpu().clamp(-1.0, 1.0)


@torch.no_grad()
def _features(network: torch.nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    parts = [network(images[part]).double() for part in _batches(images.shape[0], batch_size)]
    return torch.cat(parts)


class SampleQuality:
    """The sample metrics of image sets against one reference set, whose features are computed once.

    ``metrics`` from :data:`SAMPLE_METRICS` (``accuracy`` needs the requested labels). ``inception`` replaces the
    Inception-V3 network (your own feature extractor, or a small stand-in in tests); by default it is built from
    ``inception_weights`` (see :func:`find_inception_weights`) when a metric needs it. The Fréchet distance and KID
    are torchmetrics' (``FrechetInceptionDistance``, ``KernelInceptionDistance`` with the network as custom
    feature extractor); precision and recall are Kynkäänniemi et al.'s (2019, k = 3 nearest neighbours), computed
    by ``prdc`` on the same features.
    """

    def __init__(
        self,
        reference: torch.Tensor,
        metrics: Sequence[str],
        *,
        inception: torch.nn.Module | None = None,
        inception_weights: str | Path | None = None,
        batch_size: int = 500,
        nearest_k: int = 3,
    ) -> None:
        self.reference = _check_feature_images(reference, "reference")
        self.metrics = tuple(metrics)
        self.spaces = {metric: feature_space(metric, self.reference) for metric in self.metrics}
        self.batch_size, self.nearest_k = batch_size, nearest_k
        if "precision-recall" in self.metrics and self.reference.shape[0] <= nearest_k:
            raise ValueError(
                f"precision-recall with k = {nearest_k} neighbours needs more than {nearest_k} reference images, "
                f"got {self.reference.shape[0]}"
            )
        self.networks: dict[str, torch.nn.Module] = {}
        if "digits" in self.spaces.values():
            self.networks["digits"] = _DigitsFeatures()
        if "inception" in self.spaces.values():
            self.networks["inception"] = (
                inception if inception is not None else InceptionFeatures(inception_weights)
            )
        self._reference_features: dict[str, torch.Tensor] = {}

    def check_sample_count(self, num_samples: int) -> None:
        """Refuse, before sampling, a number of samples the metrics cannot use."""
        needed = self.nearest_k + 1 if "precision-recall" in self.metrics else 2
        if set(self.metrics) - {"accuracy"} and num_samples < needed:
            raise ValueError(
                f"num_samples={num_samples} is too few for {', '.join(self.metrics)}: at least {needed} "
                "(a few hundred for numbers worth reading)"
            )

    def reference_features(self, space: str) -> torch.Tensor:
        if space not in self._reference_features:
            self._reference_features[space] = _features(self.networks[space], self.reference, self.batch_size)
        return self._reference_features[space]

    def __call__(self, images: torch.Tensor, requested: torch.Tensor | None = None) -> dict[str, float]:
        """The metrics of ``images`` (N, C, H, W) in [-1, 1]; ``requested``: the class each was sampled for."""
        images = _check_feature_images(images, "generated")
        numbers: dict[str, float] = {}
        for metric, space in self.spaces.items():
            if metric == "accuracy":
                if requested is not None:  # the classifier whose features the digits metrics use
                    from .digits_classifier import accuracy

                    numbers["accuracy"] = accuracy(self.networks["digits"].classifier, images, requested)
                continue
            generated = _features(self.networks[space], images, self.batch_size)
            reference = self.reference_features(space)
            if metric in ("fd", "fid"):
                numbers[metric] = frechet_distance(generated, reference)
            elif metric == "kid":
                numbers["kid"], _ = kernel_distance(generated, reference)
            else:
                numbers["precision"], numbers["recall"] = precision_recall(
                    generated, reference, self.nearest_k
                )
        return numbers


class _GivenFeatures(torch.nn.Module):
    """Identity: torchmetrics' metrics over features computed beforehand (each reference feature once)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.double()


def frechet_distance(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """torchmetrics' Fréchet distance between two feature sets (N, D): ‖μ₁-μ₂‖² + Tr(Σ₁+Σ₂-2(Σ₁Σ₂)^½)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    # sync_on_compute=False: the features given are all there is (in a multi-process training run only the main
    # process computes the metric; torchmetrics' default would wait for the other processes in a gather)
    metric = FrechetInceptionDistance(
        feature=_GivenFeatures(reference.shape[1]),
        input_img_size=(reference.shape[1],),
        sync_on_compute=False,
    )
    metric.update(reference, real=True)
    metric.update(generated, real=False)
    return float(metric.compute())


def kernel_distance(
    generated: torch.Tensor, reference: torch.Tensor, subset_size: int | None = None
) -> tuple[float, float]:
    """torchmetrics' KID between two feature sets: mean and standard deviation over 100 subsets."""
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    subset_size = subset_size or min(generated.shape[0], reference.shape[0], 1000)
    with warnings.catch_warnings():  # torchmetrics warns that KID keeps every feature: a few thousand here
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(
            feature=_GivenFeatures(reference.shape[1]), subset_size=subset_size, sync_on_compute=False
        )
    metric.update(reference.float(), real=True)
    metric.update(generated.float(), real=False)
    mean, std = metric.compute()
    return float(mean), float(std)


def precision_recall(
    generated: torch.Tensor, reference: torch.Tensor, nearest_k: int = 3
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of two feature sets, computed by ``prdc``.

    Precision: the share of generated samples inside the real manifold (the union of balls reaching each real
    sample's k-th nearest real neighbour); recall: the share of real samples inside the generated manifold.
    """
    import contextlib
    import io

    from prdc import compute_prdc

    if min(generated.shape[0], reference.shape[0]) <= nearest_k:
        raise ValueError(
            f"precision/recall with k = {nearest_k} neighbours needs more than {nearest_k} images per set"
        )
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        result = compute_prdc(reference.float().numpy(), generated.float().numpy(), nearest_k=nearest_k)
    return float(result["precision"]), float(result["recall"])


def digits_fd(generated: torch.Tensor, reference: torch.Tensor, batch_size: int = 500) -> float:
    """The digits FD between two sets of 8×8 greyscale images in [-1, 1] (lower is better; 0 for equal sets)."""
    generated = _check_digit_images(generated, "generated")
    reference = _check_digit_images(reference, "reference")
    network = _DigitsFeatures()
    return frechet_distance(
        _features(network, generated, batch_size), _features(network, reference, batch_size)
    )


def digits_kid(
    generated: torch.Tensor, reference: torch.Tensor, subset_size: int | None = None, batch_size: int = 500
) -> tuple[float, float]:
    """Kernel distance (KID: mean and standard deviation over subsets) in the digits classifier's features."""
    generated = _check_digit_images(generated, "generated")
    reference = _check_digit_images(reference, "reference")
    network = _DigitsFeatures()
    return kernel_distance(
        _features(network, generated, batch_size), _features(network, reference, batch_size), subset_size
    )


# -------------------------------------------------------------------------------------------- evaluation
EVALUATION_METRICS: tuple[str, ...] = ("bpd", *SAMPLE_METRICS)
"""What :func:`run_evaluation` measures: bits/dim on the reference data; the sample metrics of
:data:`SAMPLE_METRICS` against it (``accuracy``: the share of class-conditional samples that the digits classifier
assigns to their class; ``precision-recall`` reports ``precision`` and ``recall``)."""


def _mean_and_stderr(values: list[float]) -> tuple[float, float | None]:
    count = len(values)
    mean = sum(values) / count
    if count < 2:
        return mean, None
    variance = sum((value - mean) ** 2 for value in values) / (count - 1)
    return mean, math.sqrt(variance / count)


def reference_digits(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """The embedded digits of ``split`` (default: the held-out test split) as (images in [-1, 1], labels)."""
    from .data import digits_split_indices, digits_tensor

    images, labels = digits_tensor(8)
    indices = digits_split_indices(split)
    return images[indices], labels[indices]


def check_samplers(pipeline: Any, schedulers: Sequence[str], steps: Sequence[int | str]) -> list[Any]:
    """Parse the scheduler specs and check that each takes each step count, before any work; return the specs."""
    from .sampling import SchedulerSpec

    specs = [SchedulerSpec.parse(text) for text in schedulers]
    for spec in specs:
        for step_count in steps:
            if isinstance(step_count, str) and spec.name != "ddpm":
                raise ValueError(
                    f"steps {step_count!r} is a respacing string, which only 'ddpm' (our scheduler) takes; "
                    f"{spec.name} needs an integer number of steps"
                )
            spec.check_steps(spec.build(pipeline.scheduler), step_count)
    return specs


def evaluate_samplers(
    pipeline: Any,
    reference: torch.Tensor | SampleQuality,
    *,
    metrics: Sequence[str] = ("fd",),
    num_samples: int = 500,
    steps: Sequence[int | str] = (1000,),
    schedulers: Sequence[str] = ("ddpm",),
    labelled: bool = True,
    guidance_scale: float = 1.0,
    seeds: int = 1,
    batch_size: int = 250,
    seed: int = 0,
    show_progress: bool = True,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Sample quality for every sampler × number of steps, over ``seeds`` seeds (mean and standard error).

    The runs use the sampling seeds ``seed, seed + 1, ..., seed + seeds - 1`` (image i of the run with seed s is
    image i of ``ddpm-components sample --seed s``), so more seeds can be added to a measurement later.

    ``reference`` is the real data to compare with (in [-1, 1]), or a :class:`SampleQuality` built on it (which
    then decides the metrics and feature networks; ``metrics`` is ignored). A class-conditional model is sampled
    with balanced labels (image i gets class i mod K) unless ``labelled=False`` (the null class). Returns
    ``{spec: {steps: {"fd": mean, "fd_stderr": ..., "fd_per_seed": [...], ...}}}``.
    """
    from .sampling import sample_batches

    quality = reference if isinstance(reference, SampleQuality) else SampleQuality(reference, metrics)
    quality.check_sample_count(num_samples)
    specs = check_samplers(pipeline, schedulers, steps)
    saved_scheduler = pipeline.scheduler
    conditional = getattr(pipeline.unet.config, "num_class_embeds", None) is not None
    num_classes = pipeline.unet.config.num_class_embeds if conditional else None
    labels = None
    if conditional and labelled:
        labels = torch.arange(num_samples) % num_classes
    results: dict[str, dict[str, dict[str, Any]]] = {}
    try:
        for spec in specs:
            pipeline.scheduler = spec.build(saved_scheduler)
            for step_count in steps:
                per_seed: dict[str, list[float]] = {}
                for sample_seed in range(seed, seed + seeds):
                    batches = sample_batches(
                        pipeline,
                        range(num_samples),
                        seed=sample_seed,
                        num_inference_steps=step_count,
                        batch_size=batch_size,
                        class_label_of=None if labels is None else (lambda index: int(labels[index])),
                        guidance_scale=guidance_scale,
                        show_progress=show_progress,
                    )
                    samples = torch.cat([images for _, images in batches]).float() / 127.5 - 1.0
                    for name, value in quality(samples, labels).items():
                        per_seed.setdefault(name, []).append(value)
                summary: dict[str, Any] = {}
                for name, values in per_seed.items():
                    summary[name], summary[f"{name}_stderr"] = _mean_and_stderr(values)
                    summary[f"{name}_per_seed"] = values
                results.setdefault(spec.text, {})[str(step_count)] = summary
    finally:
        pipeline.scheduler = saved_scheduler
    return results


def reference_numbers(
    quality: SampleQuality, num_samples: int, seed: int = 0, real: torch.Tensor | None = None
) -> dict[str, float]:
    """What the Fréchet distances (``fd``, ``fid``) of ``quality`` mean at this sample size.

    Real vs real: ``num_samples`` images drawn from ``real`` (other real images, e.g. the digits' training split)
    against the reference set, or, without ``real``, one random half of the reference against the other half.
    Noise vs real: ``num_samples`` Gaussian noise images clipped to [-1, 1] against the reference set.
    """
    generator = torch.Generator().manual_seed(seed)
    reference_images = quality.reference
    if real is not None:
        chosen = real[torch.randperm(real.shape[0], generator=generator)[: min(num_samples, real.shape[0])]]
    else:
        order = torch.randperm(reference_images.shape[0], generator=generator)
        halves = order[: reference_images.shape[0] // 2], order[reference_images.shape[0] // 2 :]
    noise = torch.randn(num_samples, *reference_images.shape[1:], generator=generator).clamp(-1, 1)
    numbers: dict[str, float] = {}
    for metric in ("fd", "fid"):
        if metric not in quality.spaces:
            continue
        network = quality.networks[quality.spaces[metric]]
        reference = quality.reference_features(quality.spaces[metric])
        if real is not None:
            real_vs_real = frechet_distance(_features(network, chosen, quality.batch_size), reference)
        else:
            real_vs_real = frechet_distance(reference[halves[0]], reference[halves[1]])
        numbers[f"real_vs_real_{metric}"] = real_vs_real
        numbers[f"noise_vs_real_{metric}"] = frechet_distance(
            _features(network, noise, quality.batch_size), reference
        )
    return numbers


# ----------------------------------------------------------------------------------------------- reports
def format_report(report: dict[str, Any]) -> str:
    """The evaluation as text: bits/dim, the reference numbers, and one row per sampler and step count."""
    lines = [f"model: {report.get('model', '?')}"]
    bpd = report.get("bpd")
    if bpd:
        how = (
            "full chain"
            if not bpd.get("num_timesteps")
            else f"estimate from {bpd['num_timesteps']} timesteps"
        )
        lines.append(
            f"bits/dim ({bpd['num_images']} images, {how}): {bpd['total']:.4f} ± {bpd['stderr']:.4f} "
            f"(prior {bpd['prior']:.4f}, vb {bpd['vb']:.4f}, decoder {bpd['decoder']:.4f})"
        )
    reference = report.get("reference") or {}
    for metric, title in (("fd", "digits FD"), ("fid", "FID")):
        if f"noise_vs_real_{metric}" in reference:
            lines.append(
                f"{title} at this sample size: real vs real {reference[f'real_vs_real_{metric}']:.2f}, "
                f"noise vs real {reference[f'noise_vs_real_{metric}']:.1f}"
            )
    samplers = report.get("samplers") or {}
    names = sorted(
        {
            name
            for by_steps in samplers.values()
            for row in by_steps.values()
            for name in row
            if not name.endswith(("_stderr", "_per_seed"))
        }
    )
    if samplers:
        width = max(len(spec) for spec in samplers) + 2
        lines.append("sampler".ljust(width) + "steps".rjust(8) + "".join(name.rjust(20) for name in names))
        for spec, by_steps in samplers.items():
            for steps, row in by_steps.items():
                cells = []
                for name in names:
                    value, stderr = row.get(name), row.get(f"{name}_stderr")
                    text = (
                        ""
                        if value is None
                        else f"{value:.4g}" + ("" if stderr is None else f" ± {stderr:.2g}")
                    )
                    cells.append(text.rjust(20))
                lines.append(spec.ljust(width) + str(steps).rjust(8) + "".join(cells))
    return "\n".join(lines)


def plot_quality(report: dict[str, Any], path: str | Path, metric: str = "fd") -> None:
    """A PNG of ``metric`` against network evaluations (one line per sampler), written atomically."""
    import io

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'ddpm-components[plots]'") from error
    from .data import atomic_write_bytes

    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    for spec, by_steps in (report.get("samplers") or {}).items():
        points = sorted(
            (_network_evaluations(steps), row[metric], row.get(f"{metric}_stderr") or 0.0)
            for steps, row in by_steps.items()
            if metric in row
        )
        if points:
            x, y, error = zip(*points)
            axes.errorbar(x, y, yerr=error, marker="o", capsize=3, label=spec)
    axes.set_xscale("log")
    axes.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.set_xlabel("network evaluations (sampling steps)")
    axes.set_ylabel({"fd": "digits FD", "fid": "FID"}.get(metric, metric) + " (lower is better)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def _network_evaluations(steps: str) -> int:
    """How many U-Net calls a step setting costs: the integer, or the timesteps a respacing string keeps."""
    if steps.isdigit():
        return int(steps)
    if steps.startswith("ddim") and steps[4:].isdigit():
        return int(steps[4:])
    return sum(int(part) for part in steps.split(","))


def reference_images(pipeline: Any, data: str | Path | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The real images to evaluate against, ``(N, C, H, W)`` in [-1, 1] with labels (or ``None``).

    ``data=None`` means the embedded digits' held-out test split, which only fits a digits-shaped model (8×8,
    one channel); otherwise a folder of images as training reads them (sub-folders are classes), brought to the
    model's size and channels.
    """
    config = pipeline.unet.config
    if data is None:
        if (config.sample_size, config.in_channels) != (8, 1):
            raise ValueError(
                f"this model makes {config.in_channels}-channel {config.sample_size}px images, not 8x8 digits: pass "
                "--data FOLDER with images like its training data"
            )
        return reference_digits("test")
    from .data import ImageFolderDataset

    dataset = ImageFolderDataset(
        data, resolution=config.sample_size, color_mode="grayscale" if config.in_channels == 1 else "rgb"
    )
    items = [dataset[index] for index in range(len(dataset))]
    images = torch.stack([item["pixel_values"] for item in items])
    labels = torch.stack([item["class_labels"] for item in items]) if dataset.labels is not None else None
    return images, labels


def run_evaluation(
    pipeline: Any,
    *,
    model_name: str,
    metrics: Sequence[str] = ("bpd", "fd"),
    data: str | Path | None = None,
    num_samples: int = 500,
    steps: Sequence[int | str] = (1000,),
    schedulers: Sequence[str] = ("ddpm",),
    labelled: bool = True,
    guidance_scale: float = 1.0,
    seeds: int = 1,
    batch_size: int = 250,
    bpd_timesteps: int | None = None,
    seed: int = 0,
    inception: torch.nn.Module | None = None,
    inception_weights: str | Path | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Everything ``ddpm-components evaluate`` measures, as the JSON-ready report.

    ``bpd_timesteps=None`` runs the full chain; an integer K uses the stratified estimate from K timesteps.
    Sample metrics (:data:`SAMPLE_METRICS`) are measured for every scheduler spec × step count, with the sampling
    seeds ``seed, ..., seed + seeds - 1``. Everything is checked (metrics against the data, samplers against the
    steps, the Inception weights) before the first model call; ``inception`` replaces the Inception-V3 network.
    """
    unknown = sorted(set(metrics) - set(EVALUATION_METRICS))
    if unknown or not metrics:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(EVALUATION_METRICS)}")
    reference, reference_labels = reference_images(pipeline, data)
    sample_metrics = tuple(name for name in metrics if name != "bpd")
    quality = None
    if sample_metrics:
        check_samplers(pipeline, schedulers, steps)
        quality = SampleQuality(
            reference,
            sample_metrics,
            inception=inception,
            inception_weights=inception_weights,
            batch_size=500,
        )
        quality.check_sample_count(num_samples)
    report: dict[str, Any] = {
        "model": model_name,
        "num_samples": num_samples,
        "guidance_scale": guidance_scale,
    }
    if "bpd" in metrics:
        labels = reference_labels if labelled else None
        report["bpd"] = _evaluate_bits_per_dim(
            pipeline, reference, labels, bpd_timesteps, batch_size, seed, show_progress
        )
    if quality is not None:
        report["features"] = dict(quality.spaces)
        real = reference_digits("train")[0] if data is None else None
        report["reference"] = reference_numbers(quality, num_samples, seed=seed, real=real)
        report["samplers"] = evaluate_samplers(
            pipeline,
            quality,
            num_samples=num_samples,
            steps=steps,
            schedulers=schedulers,
            labelled=labelled,
            guidance_scale=guidance_scale,
            seeds=seeds,
            batch_size=batch_size,
            seed=seed,
            show_progress=show_progress,
        )
    return report


def _evaluate_bits_per_dim(
    pipeline: Any,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    bpd_timesteps: int | None,
    batch_size: int,
    seed: int,
    show_progress: bool,
) -> dict[str, Any]:
    """The bits/dim part of the report: the full chain, or the estimate from ``bpd_timesteps`` timesteps."""
    unet, scheduler = pipeline.unet, pipeline.scheduler
    if not getattr(unet.config, "num_class_embeds", None):
        labels = None
    device = next(unet.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    if bpd_timesteps is None:
        result = bits_per_dim(
            unet,
            scheduler,
            images.to(device),
            labels,
            batch_size=batch_size,
            generator=generator,
            show_progress=show_progress,
        )
    else:
        result = bits_per_dim_estimate(
            unet,
            scheduler,
            images.to(device),
            labels,
            num_timesteps=bpd_timesteps,
            batch_size=batch_size,
            generator=generator,
        )
    return {**result.to_dict(), "num_timesteps": bpd_timesteps, "conditional": labels is not None}
