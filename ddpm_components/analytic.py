"""Analytic-DPM (Bao et al., ICLR 2022, arXiv 2201.06503): the moments Γ_t that give the optimal reverse variance.

The optimal variance of a reverse step (Theorem 1, used by ``DDPMScheduler(variance_type="analytic")``) needs,
per training timestep, the moment

    Γ_t = E_{q(x_0) q(ε)} ||ε_θ(x_t, t)||² / d,   x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε,

of the trained noise predictor (the paper estimates β̄_t E||∇ log q_t||²/d this way, §3). This module estimates
it by Monte Carlo, once per model, and writes it into a saved pipeline's scheduler config
(:func:`write_analytic_scheduler`, the ``ddpm-components analytic-variance`` command).

A class-conditional model is evaluated with the data's true labels and without guidance: Γ_t is a moment of the
conditional ε_θ(x_t, t, y). Classifier-free guidance at sampling time changes the ε that the sampler uses, so the
stored Γ is that of the unguided model; with guidance the variance is an approximation.

Cost: one model call per timestep and image; all the time is in the U-Net. Measured for the 1.6M-parameter 8×8
digits U-Net on a 2-core CPU shared with other jobs: 0.23-0.28 s per call of 250 images (about 0.5 CPU-seconds),
so all 1000 timesteps with 250 images (1000 calls) take 4-5 minutes there, roughly half that on an idle machine,
and much longer when the cores are oversubscribed. ``timesteps=`` (the command's ``--timesteps K``) estimates a
subset and interpolates the rest linearly in t; ``num_samples_per_timestep`` trades Monte Carlo error (relative
standard error about √(2 / (M d)) for Gaussian-like ε) for time.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["estimate_analytic_moments", "interpolate_moments", "write_analytic_scheduler"]


def _check_timesteps(timesteps: Sequence[int] | None, num_train: int) -> list[int]:
    if timesteps is None:
        return list(range(num_train))
    kept = sorted({int(t) for t in timesteps})
    if not kept or kept[0] < 0 or kept[-1] >= num_train:
        raise ValueError(
            f"timesteps must be a non-empty set of integers in [0, {num_train - 1}], got {kept[:8]}"
        )
    return kept


def interpolate_moments(timesteps: Sequence[int], values: Sequence[float], num_train: int) -> list[float]:
    """Γ_t at every training timestep from estimates at ``timesteps`` (ascending): linear in t between them,
    constant beyond the first and the last."""
    known_t = torch.tensor(list(timesteps), dtype=torch.float64)
    known_v = torch.tensor(list(values), dtype=torch.float64)
    if known_t.numel() == 1:
        return [float(known_v[0])] * num_train
    grid = torch.arange(num_train, dtype=torch.float64).clamp(known_t[0], known_t[-1])
    right = torch.searchsorted(known_t, grid).clamp(1, known_t.numel() - 1)
    left = right - 1
    weight = (grid - known_t[left]) / (known_t[right] - known_t[left])
    return (known_v[left] + weight * (known_v[right] - known_v[left])).tolist()


@torch.no_grad()
def estimate_analytic_moments(
    unet: Any,
    scheduler: Any,
    images: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    num_samples_per_timestep: int | None = None,
    batch_size: int = 250,
    generator: torch.Generator | None = None,
    timesteps: Sequence[int] | None = None,
    show_progress: bool = False,
    progress_file: Any = None,
) -> list[float]:
    """Γ_t = E||ε_θ(x_t, t)||²/d for every training timestep, by Monte Carlo (Analytic-DPM §3).

    Args:
        unet: the noise model, called as ``unet(x_t, t, class_labels=...)`` (returning ``.sample``); its output
            is converted to ε with ``scheduler.convert_prediction`` when it predicts v or x_0. A learned-variance
            model (2×C output channels) is rejected: its variance is already learned.
        scheduler: our ``DDPMScheduler`` (its ``add_noise`` and ``convert_prediction`` are used).
        images: real data x_0, (N, C, H, W), scaled as the model was trained (e.g. [-1, 1]).
        class_labels: one label per image for a class-conditional model (its true labels; None for an
            unconditional one). Γ is that of the unguided model (see the module docstring).
        num_samples_per_timestep: M, the Monte Carlo samples per timestep (default N): images are taken
            cyclically from a random permutation, each with fresh noise.
        batch_size: model inputs per forward call; a batch mixes timesteps (one timestep per element).
        generator: for the permutation and the noise (CPU generator).
        timesteps: estimate only these (Γ elsewhere interpolated by :func:`interpolate_moments`); default all.
        show_progress, progress_file: a progress bar over the model calls (tqdm, to ``progress_file``).

    Returns:
        ``num_train_timesteps`` floats, ready for ``DDPMScheduler(variance_type="analytic",
        analytic_moments=...)``.
    """
    num_train = int(scheduler.config.num_train_timesteps)
    if not isinstance(images, torch.Tensor) or images.ndim < 2 or images.shape[0] == 0:
        raise ValueError("images must be a non-empty tensor (N, C, H, W) of real data")
    count = images.shape[0]
    samples = count if num_samples_per_timestep is None else int(num_samples_per_timestep)
    if samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples_per_timestep and batch_size must be >= 1, got {samples}, {batch_size}")
    if class_labels is not None and torch.as_tensor(class_labels).numel() != count:
        raise ValueError(f"got {torch.as_tensor(class_labels).numel()} class labels for {count} images")
    wanted = _check_timesteps(timesteps, num_train)
    tensors = (
        itertools.chain(unet.parameters(), unet.buffers()) if isinstance(unet, torch.nn.Module) else iter(())
    )
    device = next(tensors, images).device
    order = torch.randperm(count, generator=generator).repeat((samples + count - 1) // count)[:samples]
    # one flat list of (timestep, image) pairs, M per timestep, processed in batches
    pair_t = torch.tensor(wanted).repeat_interleave(samples)
    pair_i = order.repeat(len(wanted))
    sums = torch.zeros(len(wanted), dtype=torch.float64)
    from tqdm.auto import tqdm

    starts = range(0, pair_t.numel(), batch_size)
    for start in tqdm(starts, desc="Gamma_t", disable=not show_progress, file=progress_file):
        t = pair_t[start : start + batch_size]
        index = pair_i[start : start + batch_size]
        original = images[index].float()
        noise = torch.randn(original.shape, generator=generator)
        epsilon = _epsilon(unet, scheduler, original, noise, t, class_labels, index, device)
        squares = epsilon.double().pow(2).flatten(1).mean(1).cpu()
        sums.index_add_(
            0, torch.div(torch.arange(start, start + t.numel()), samples, rounding_mode="floor"), squares
        )
    values = (sums / samples).tolist()
    if not all(torch.isfinite(torch.tensor(values))):
        raise FloatingPointError("the model's ε is not finite for some timesteps; Γ cannot be estimated")
    return values if timesteps is None else interpolate_moments(wanted, values, num_train)


def _epsilon(
    unet: Any,
    scheduler: Any,
    original: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    class_labels: torch.Tensor | None,
    index: torch.Tensor,
    device: Any,
) -> torch.Tensor:
    """ε_θ(x_t, t) at x_t ~ q(x_t | x_0 = ``original``), in the scheduler's ε parametrisation."""
    sample = scheduler.add_noise(original, noise, t)
    kwargs = {} if class_labels is None else {"class_labels": torch.as_tensor(class_labels)[index].to(device)}
    dtype = getattr(unet, "dtype", torch.float32)
    output = unet(sample.to(device=device, dtype=dtype), t.to(device), **kwargs)
    output = getattr(output, "sample", output).float().cpu()
    if output.shape != sample.shape:
        raise ValueError(
            f"the model's output has shape {tuple(output.shape)} for inputs of shape {tuple(sample.shape)}: a model "
            "with a learned variance (variance_type='learned_range') already has its variance; the analytic "
            "variance is for models with a fixed one"
        )
    return scheduler.convert_prediction(output, sample, t, to="epsilon")


def write_analytic_scheduler(folder: str | os.PathLike, scheduler: Any, moments: Sequence[float]) -> Path:
    """Set ``variance_type="analytic"`` and ``analytic_moments`` in the saved pipeline ``folder``'s scheduler.

    Writes ``scheduler/scheduler_config.json`` atomically; in the remote-code layout (a
    ``scheduler/scheduling_ddpm.py`` beside it) the installed scheduler module is written there first, atomically
    too, so that the folder loads with ``trust_remote_code=True`` where ddpm-components is not installed (an older
    copy would not know the new variance type). Every other key of the config is kept. Returns the config path.
    """
    from . import scheduling_ddpm
    from .data import atomic_write_bytes
    from .scheduling_ddpm import DDPMScheduler

    target = Path(folder) / "scheduler"
    config_path = target / "scheduler_config.json"
    updated = DDPMScheduler.from_config(
        scheduler.config, variance_type="analytic", analytic_moments=list(moments)
    )
    text = updated.to_json_string()
    json.loads(text)  # valid JSON (no NaN), as diffusers reads it
    module_copy = target / "scheduling_ddpm.py"
    if module_copy.is_file():
        atomic_write_bytes(module_copy, Path(scheduling_ddpm.__file__).read_bytes())
    atomic_write_bytes(config_path, text.encode("utf-8"))
    return config_path
