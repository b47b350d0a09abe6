"""DDPM scheduler (Ho et al. 2020, arXiv 2006.11239) as a diffusers scheduler.

This module is self-contained: it imports only torch, diffusers and the standard library, because a saved
pipeline carries it next to ``scheduler_config.json`` as remote code.

Map from the paper's equations to the code below (β_t the noise schedule, α_t = 1 - β_t,
ᾱ_t = ∏_{s<=t} α_s, indices are 0-based timesteps as in diffusers). Each formula is written once, in the
function named here; ``step`` (both its paths) and the training-time methods call it:

====================================================  =====================================================
Equation                                              Where
====================================================  =====================================================
Eq. 4   q(x_t | x_0) = N(√ᾱ_t x_0, (1-ᾱ_t) I)         :meth:`DDPMScheduler.add_noise`
Eq. 6-7 coefficients of μ̃_t and β̃_t from ᾱ_t, ᾱ_t'    :func:`_reverse_step_coefficients` (step tables and
                                                      full-schedule tables alike)
Eq. 7   μ̃_t(x_t, x_0) = coef1 x_0 + coef2 x_t           :func:`_posterior_mean`; the full-schedule posterior is
                                                      :meth:`DDPMScheduler.q_posterior_mean_variance`
Eq. 15  x_0 from ε_θ (and from v)                      :func:`_predict_original_sample`,
                                                      :meth:`DDPMScheduler.convert_prediction`
Eq. 11  μ_θ = μ̃_t(x_t, x̂_0(ε_θ))                       :meth:`DDPMScheduler.p_mean_variance`
Eq. 1   p_θ(x_{t-1} | x_t) = N(μ_θ, Σ_θ), Alg. 2       :meth:`DDPMScheduler.step`
Eq. 14  L_simple target (ε, x_0 or v)                   :meth:`DDPMScheduler.get_target`,
                                                      :meth:`DDPMScheduler.get_velocity`
Eq. 5   L_T, L_{t-1}, L_0 (bits per dimension)          :meth:`DDPMScheduler.prior_bpd`,
                                                      :meth:`DDPMScheduler.vlb_terms`, :func:`normal_kl`,
                                                      :func:`discretized_gaussian_log_likelihood`
SNR(t) = ᾱ_t / (1 - ᾱ_t); min-SNR-γ weights            :meth:`DDPMScheduler.snr`, :meth:`DDPMScheduler.loss_weights`
DDIM Eq. 16 σ_t(η)² = η² β̃'_t, x_t' = √ᾱ_t' x̂_0 +      :func:`_reverse_step_coefficients` (``eta`` != 1 gives
√(1-ᾱ_t'-σ_t²) ε̂ + σ_t z (DDIM Eq. 12)                  coef1, coef2 and σ_t² of DDIM's family)
Analytic-DPM Thm. 1: σ*² = λ² + coef1² (1-ᾱ_t)/ᾱ_t      :func:`_analytic_variance`; Γ_t comes from the config
(1 - Γ_t); Thm. 2's bounds                              (``analytic_moments``)
DPM-Solver++(2M): x̂_0 ← x̂_0 + h_t/(2 h_prev) (x̂_0 -     :func:`_multistep_weights` (the factor, per step);
x̂_0 of the previous step), λ = log(√ᾱ/√(1-ᾱ))         :meth:`DDPMScheduler._multistep_original`
====================================================  =====================================================

Improved DDPM (Nichol & Dhariwal 2021, arXiv 2102.09672) adds the learned variance
(``variance_type="learned_range"``: Σ_θ = exp(v log β_t + (1 - v) log β̃_t) with v = (out + 1) / 2, written as
log Σ_θ = midpoint + out · half-range in :func:`_learned_range_log_variance`) and the respacing of the schedule
into section counts (``set_timesteps("10,15,20")``, ``set_timesteps("ddim50")``).

Short chains, two config keys (issue 11):

- ``eta`` (default 1.0, DDPM): DDIM's η (Song et al. 2021, arXiv 2010.02502, Eq. 16), for ``variance_type``
  ``fixed_small``, ``fixed_small_log`` and ``analytic``; η = 0 is DDIM's deterministic sampler. It is a config key,
  not a ``step`` argument: diffusers' DDIMPipeline always passes ``eta=0.0`` to ``step``, which accepts and ignores
  it, so the scheduler samples the process it was configured with in every pipeline.
- ``variance_type="analytic"`` with ``analytic_moments`` (Γ_t, one per training timestep, JSON floats): the
  optimal reverse variance of Analytic-DPM (Bao et al. 2022, arXiv 2201.06503); ``ddpm_components.analytic`` (not
  this file) estimates Γ from a trained model.
- ``multistep_order`` (default 1): 2 replaces x̂_0 in the step's mean by its second-order multistep extrapolation
  from the previous step's x̂_0 (DPM-Solver++(2M), Lu et al. 2022, arXiv 2211.01095, Alg. 2). With η = 0 the step
  is then exactly DPM-Solver++(2M), with η = 1 (DDPM's posterior) exactly its SDE variant: the same model
  evaluations, a better use of them on short chains.
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple, get_args

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

__all__ = [
    "DDPMScheduler",
    "DDPMSchedulerOutput",
    "discretized_gaussian_log_likelihood",
    "normal_kl",
]

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]
VarianceType = Literal[
    "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range", "analytic"
]
# The variance types whose reverse step is a member of DDIM's family (Eq. 16), so that eta != 1 has a meaning.
_ETA_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "analytic")
PredictionType = Literal["epsilon", "sample", "v_prediction"]
TimestepSpacing = Literal["leading", "linspace", "trailing"]
LossWeighting = Literal["uniform", "min_snr"]

# ᾱ_t used when converting an ε-prediction to x_0 at a timestep where ᾱ_t == 0 (zero terminal SNR);
# the same floor diffusers' newer schedulers use.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24
# diffusers clamps the posterior variance before taking its log (matters only at the last step).
_POSTERIOR_VARIANCE_FLOOR = 1e-20
# Analytic-DPM (Bao et al. 2022, its experiments and code): the standard deviation of the noise of the step into
# a chain's last timestep is clipped so that E|σ z| = σ √(2/π) <= y · 2/255, here with y = 1 level of 8-bit data
# in [-1, 1] (the paper's DDIM and cosine-schedule setting; it uses y = 2 for DDPM on the linear schedule).
_ANALYTIC_LAST_STEPS_MAX_STD = 2.0 / 255.0 * math.sqrt(math.pi / 2.0)
# The schedules whose betas run from beta_start to beta_end.
_SCHEDULES_FROM_BETA_START_TO_END = ("linear", "scaled_linear", "sigmoid")

# A coefficient is a Python float on step's host path and a tensor (per timestep or gathered per batch element)
# everywhere else; the formula functions below take either.
Coefficient = float | torch.Tensor


# ------------------------------------------------------------------------------------------------------------
# Input checks (each rule in one place)
# ------------------------------------------------------------------------------------------------------------
def _check_choice(name: str, value: object, choices: tuple[object, ...]) -> None:
    """Raise a ValueError naming the option, the bad value and every valid choice unless ``value`` is one of
    ``choices``: ``beta_schedule='foo' is not supported; choose one of 'linear', 'scaled_linear', ...``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}.")


def _check_finite(name: str, value: object, positive: bool = False) -> None:
    """Raise a ValueError naming ``value`` unless it is a finite real number (and > 0 when ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number.")
    if positive and value <= 0:
        raise ValueError(f"{name}={value!r} must be positive.")


def _check_floating(name: str, tensor: object) -> None:
    """Raise a ValueError unless ``tensor`` is a floating-point tensor (an integer sample would be rounded to 0)."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a floating-point torch.Tensor, got {type(tensor).__name__}.")
    if not tensor.is_floating_point():
        raise ValueError(
            f"{name} has dtype {tensor.dtype}; it must be a floating-point tensor (e.g. call .float() on it)."
        )


def _check_same_shape(name: str, tensor: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    """Raise a ValueError naming both shapes unless they are equal (no silent broadcasting)."""
    if tensor.shape != other.shape:
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)} but {other_name} has shape {tuple(other.shape)}; "
            "they must be equal."
        )


def _check_eta(eta: object, variance_type: str) -> None:
    """``eta`` is a number in [0, 1], and != 1 only for a variance type of DDIM's family (fixed_small*, analytic):
    η > 1 can make 1 - ᾱ_t' - σ_t(η)² negative, and η has no meaning for β_t or a learned variance."""
    _check_finite("eta", eta)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta!r} must lie in [0, 1] (0: DDIM, 1: DDPM).")
    if eta != 1.0 and variance_type not in _ETA_VARIANCE_TYPES:
        raise ValueError(
            f"eta={eta!r} needs variance_type one of {', '.join(map(repr, _ETA_VARIANCE_TYPES))}, not "
            f"{variance_type!r} (eta scales the posterior variance β̃_t of DDIM's family; use eta=1.0 with "
            f"{variance_type!r})."
        )


def _config_moments64(
    moments: Sequence[float] | torch.Tensor | None, num_train_timesteps: int, variance_type: str
) -> torch.Tensor | None:
    """The ``analytic_moments`` Γ_t as a float64 tensor (None if not given), validated: one finite value >= 0 per
    training timestep; ``variance_type="analytic"`` requires them."""
    if moments is None:
        if variance_type == "analytic":
            raise ValueError(
                "variance_type='analytic' needs analytic_moments (Γ_t = E||ε_θ(x_t, t)||²/d, one per training "
                "timestep): estimate them with `ddpm-components analytic-variance --model M` or "
                "ddpm_components.analytic.estimate_analytic_moments."
            )
        return None
    try:
        values = torch.as_tensor(moments, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"analytic_moments must be a list of numbers ({error}).") from None
    if values.numel() != num_train_timesteps:
        raise ValueError(
            f"analytic_moments has {values.numel()} values but num_train_timesteps={num_train_timesteps}; "
            "give one Γ_t per training timestep."
        )
    bad = (~torch.isfinite(values) | (values < 0)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"analytic_moments[{bad[0]}]={values[bad[0]].item()!r} must be a finite number >= 0 "
            f"({len(bad)} bad value(s)); Γ_t is a mean of squares."
        )
    return values


def _integral_timestep(value: object, name: str = "timestep") -> int:
    """A timestep held on the host as an ``int``: integers and whole floats (``40.0``, as some pipelines pass)
    are accepted; a fractional value (``40.5``), NaN, inf or a bool raises a ValueError instead of truncating."""
    if type(value) is int:  # the common case, without the numbers ABCs
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if isinstance(value, numbers.Integral):
            return int(value)
        if math.isfinite(value) and float(value).is_integer():
            return int(value)
    raise ValueError(
        f"{name}={value!r} is not a whole number; DDPM timesteps are integers (40 and 40.0 are accepted, "
        "40.5 is not)."
    )


# ------------------------------------------------------------------------------------------------------------
# The reverse step's maths, written once
# ------------------------------------------------------------------------------------------------------------
class ReverseStepCoefficients(NamedTuple):
    """Coefficients of the reverse step from timestep t to its predecessor t' in the chain (t' = t - 1 in the
    full schedule, the next kept timestep under respacing; ᾱ_t' = 1 after the last step), one entry per t."""

    sqrt_alphas_cumprod: torch.Tensor  # √ᾱ_t
    sqrt_one_minus_alphas_cumprod: torch.Tensor  # √(1 - ᾱ_t)
    sqrt_recip_alphas_cumprod: torch.Tensor  # 1/√ᾱ_t, ᾱ_t floored at ZERO_SNR_ALPHA_CUMPROD
    sqrt_recipm1_alphas_cumprod: torch.Tensor  # √(1 - ᾱ_t)/√ᾱ_t, same floor
    posterior_mean_coef1: torch.Tensor  # Eq. 7: √ᾱ_t' β'_t / (1 - ᾱ_t), the weight of x_0 in μ̃_t
    posterior_mean_coef2: torch.Tensor  # Eq. 7: √α'_t (1 - ᾱ_t') / (1 - ᾱ_t), the weight of x_t in μ̃_t
    betas: torch.Tensor  # β'_t = 1 - ᾱ_t / ᾱ_t' (= β_t in the full schedule)
    posterior_variance: torch.Tensor  # Eq. 7: β̃'_t = β'_t (1 - ᾱ_t') / (1 - ᾱ_t)


def _cached_cast(
    cache: dict[tuple[torch.device, torch.dtype], torch.Tensor],
    table64: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``table64`` (a float64 table) on ``device`` in ``dtype``, cast once and kept in ``cache``."""
    key = (device, dtype)
    table = cache.get(key)
    if table is None:
        table = cache[key] = table64.to(device=device, dtype=dtype)
    return table


def _reverse_step_coefficients(
    alphas_cumprod: torch.Tensor, alphas_cumprod_prev: torch.Tensor, eta: float = 1.0
) -> ReverseStepCoefficients:
    """The per-timestep coefficients of x̂_0 (Eq. 15), μ̃_t and β̃_t (Eq. 6-7) from ᾱ_t and ᾱ_t' (float64).

    Used for the sampling chain (``set_timesteps``, where β'_t is recomputed from the kept ᾱ's as in Improved
    DDPM's respacing) and for the full schedule of the training-time API alike.

    With ``eta`` != 1 the mean and variance are those of DDIM's family q_σ(x_t' | x_t, x_0) (DDIM Eq. 7 and 16):
    σ_t(η)² = η² β̃'_t, and x_t' = √ᾱ_t' x_0 + √(1 - ᾱ_t' - σ_t²) ε + σ_t z with ε = (x_t - √ᾱ_t x_0)/√(1-ᾱ_t)
    is the linear form coef1 x_0 + coef2 x_t with coef2 = √(1 - ᾱ_t' - σ_t²)/√(1 - ᾱ_t) and
    coef1 = √ᾱ_t' - coef2 √ᾱ_t; ``posterior_variance`` then holds σ_t(η)². At η = 1 this family member IS the
    DDPM posterior (1 - ᾱ_t' - β̃'_t = α'_t (1 - ᾱ_t')² / (1 - ᾱ_t)), so η = 1 keeps the Eq. 7 formulas above
    unchanged, bit for bit.
    """
    alphas = alphas_cumprod / alphas_cumprod_prev  # α'_t
    betas = 1.0 - alphas
    one_minus_alphas_cumprod = 1.0 - alphas_cumprod
    sqrt_recip_alphas_cumprod = torch.where(
        alphas_cumprod > 0, alphas_cumprod, ZERO_SNR_ALPHA_CUMPROD
    ).rsqrt()
    sqrt_one_minus_alphas_cumprod = one_minus_alphas_cumprod.sqrt()
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / one_minus_alphas_cumprod
    if eta == 1.0:
        posterior_mean_coef1 = alphas_cumprod_prev.sqrt() * betas / one_minus_alphas_cumprod
        posterior_mean_coef2 = alphas.sqrt() * (1.0 - alphas_cumprod_prev) / one_minus_alphas_cumprod
    else:  # DDIM Eq. 16
        posterior_variance = eta**2 * posterior_variance
        direction = (1.0 - alphas_cumprod_prev - posterior_variance).clamp(min=0.0).sqrt()
        posterior_mean_coef2 = direction / sqrt_one_minus_alphas_cumprod
        posterior_mean_coef1 = alphas_cumprod_prev.sqrt() - posterior_mean_coef2 * alphas_cumprod.sqrt()
    return ReverseStepCoefficients(
        sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
        sqrt_one_minus_alphas_cumprod=sqrt_one_minus_alphas_cumprod,
        sqrt_recip_alphas_cumprod=sqrt_recip_alphas_cumprod,
        sqrt_recipm1_alphas_cumprod=sqrt_one_minus_alphas_cumprod * sqrt_recip_alphas_cumprod,
        posterior_mean_coef1=posterior_mean_coef1,
        posterior_mean_coef2=posterior_mean_coef2,
        betas=betas,
        posterior_variance=posterior_variance,
    )


def _analytic_variance(
    coefficients: ReverseStepCoefficients, moments: torch.Tensor, original_variance_bound: float | None
) -> torch.Tensor:
    """Analytic-DPM's optimal reverse variance (Bao et al. 2022, arXiv 2201.06503, Theorem 1 with
    λ² = σ_t(η)², in its skip-step (respaced) form), clipped to its bounds (Theorem 2), float64 per step.

    σ*² = λ² + (√(β̄_t/α_{t|t'}) - √(β̄_t' - λ²))² (1 - Γ_t) (the paper, with β̄ = 1 - ᾱ, α_{t|t'} = ᾱ_t/ᾱ_t'),
    written here as λ² + coef1² · Var*(x_0 | x_t): coef1 is the weight of x_0 in the step's mean (for η = 1
    Eq. 7's √ᾱ_t' β'_t / (1 - ᾱ_t)), coef1² (1-ᾱ_t)/ᾱ_t equals the paper's squared bracket, and
    Var*(x_0 | x_t) = (1-ᾱ_t)/ᾱ_t · (1 - Γ_t) is the per-dimension posterior variance of x_0, with Γ_t = E_q ||ε*(x_t, t)||² / d (the stored
    ``moments``). Theorem 2's bounds clip that variance to [0, (1-ᾱ_t)/ᾱ_t] (from 0 <= Γ_t <= 1) and, for
    data bounded in [-b, b], to at most b² (``original_variance_bound``; None: no such bound), so
    λ² <= σ*² <= λ² + coef1² min((1-ᾱ_t)/ᾱ_t, b²).
    """
    noise_to_signal = coefficients.sqrt_recipm1_alphas_cumprod**2  # (1 - ᾱ_t)/ᾱ_t, ᾱ_t floored at 2⁻²⁴
    upper = (
        noise_to_signal
        if original_variance_bound is None
        else noise_to_signal.clamp(max=original_variance_bound)
    )
    original_variance = (noise_to_signal * (1.0 - moments)).clamp(min=0.0).minimum(upper)
    return coefficients.posterior_variance + coefficients.posterior_mean_coef1**2 * original_variance


def _half_log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """λ = log(√ᾱ / √(1-ᾱ)), the half log signal-to-noise ratio (float64; +inf at ᾱ = 1, -inf at ᾱ = 0)."""
    return 0.5 * (alphas_cumprod.log() - torch.log1p(-alphas_cumprod))


def _multistep_weights(alphas_cumprod: torch.Tensor, alphas_cumprod_prev: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2M)'s factor per step of a chain (float64): the step t → t' with h = λ_t' - λ_t, after the
    step s → t with h_prev = λ_t - λ_s, uses D = x̂_0(t) + h/(2 h_prev) (x̂_0(t) - x̂_0(s)) in place of x̂_0(t)
    (Lu et al. 2022, arXiv 2211.01095, Alg. 2: D = (1 + 1/(2r)) x̂_0(t) - 1/(2r) x̂_0(s), r = h_prev / h).

    0 (first order) at the chain's first step (no history) and where h or h_prev is infinite: the last step,
    into ᾱ = 1 (diffusers' DPM-Solver++ with ``final_sigmas_type="zero"`` also takes it first order), and the step
    after one from ᾱ = 0 (zero terminal SNR)."""
    step_sizes = _half_log_snr(alphas_cumprod_prev) - _half_log_snr(alphas_cumprod)  # h per step
    weights = torch.zeros_like(step_sizes)
    weights[1:] = step_sizes[1:] / (2.0 * step_sizes[:-1])
    return torch.where(weights.isfinite(), weights, torch.zeros_like(weights))


def _log_variance_midpoint_and_half_range(
    min_log_variance: torch.Tensor, max_log_variance: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """½(max + min) and ½(max - min) of the log-variance interval that ``learned_range`` interpolates in
    (min = log β̃_t, max = log β_t)."""
    return 0.5 * (max_log_variance + min_log_variance), 0.5 * (max_log_variance - min_log_variance)


def _learned_range_log_variance(
    model_variance: torch.Tensor, log_variance_midpoint: Coefficient, log_variance_half_range: Coefficient
) -> torch.Tensor:
    """Improved DDPM Eq. 15: log Σ_θ = frac log β_t + (1 - frac) log β̃_t with frac = (v + 1)/2, i.e.
    midpoint + v · half-range."""
    return torch.mul(model_variance, log_variance_half_range).add_(log_variance_midpoint)


def _add_scaled_(accumulator: torch.Tensor, scale: Coefficient, tensor: torch.Tensor, sign: float = 1.0):
    """``accumulator += sign · scale · tensor`` in place, one kernel for a Python-float ``scale`` (host path) and
    for a tensor ``scale`` that broadcasts against ``tensor`` alike."""
    if isinstance(scale, torch.Tensor):
        return accumulator.addcmul_(scale, tensor, value=sign)
    return accumulator.add_(tensor, alpha=sign * scale)


def _predict_original_sample(
    prediction_type: str,
    model_output: torch.Tensor,
    sample: torch.Tensor,
    coefficients: StepColumns | ScheduleColumns,
) -> torch.Tensor:
    """x̂_0 from the model output at x_t = ``sample`` (no clipping).

    ε (Eq. 15): x̂_0 = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t = x_t/√ᾱ_t - (√(1-ᾱ_t)/√ᾱ_t) ε; v: x̂_0 = √ᾱ_t x_t - √(1-ᾱ_t) v;
    ``sample``: the output itself. ``coefficients`` are floats or tensors that broadcast against ``sample``.
    """
    if prediction_type == "epsilon":
        original = torch.mul(sample, coefficients.sqrt_recip_alphas_cumprod)
        return _add_scaled_(original, coefficients.sqrt_recipm1_alphas_cumprod, model_output, -1.0)
    if prediction_type == "v_prediction":
        original = torch.mul(sample, coefficients.sqrt_alphas_cumprod)
        return _add_scaled_(original, coefficients.sqrt_one_minus_alphas_cumprod, model_output, -1.0)
    return model_output


def _posterior_mean(
    original_sample: torch.Tensor, sample: torch.Tensor, coefficients: StepColumns | ScheduleColumns
) -> torch.Tensor:
    """Eq. 7: μ̃_t(x_t, x_0) = coef1 x_0 + coef2 x_t (with x̂_0 from ε this is Eq. 11's μ_θ)."""
    mean = torch.mul(original_sample, coefficients.posterior_mean_coef1)
    return _add_scaled_(mean, coefficients.posterior_mean_coef2, sample)


class StepColumns(NamedTuple):
    """The named columns of the per-step table that ``set_timesteps`` builds, one row per kept timestep.

    On ``step``'s host path every field is a Python float; on its tensor path a gathered tensor of shape
    (B or 1, 1, ..., 1). The first six are those of :class:`ReverseStepCoefficients`.
    """

    sqrt_alphas_cumprod: Coefficient
    sqrt_one_minus_alphas_cumprod: Coefficient
    sqrt_recip_alphas_cumprod: Coefficient
    sqrt_recipm1_alphas_cumprod: Coefficient
    posterior_mean_coef1: Coefficient
    posterior_mean_coef2: Coefficient
    noise_std: Coefficient  # σ_t of the fixed variance types (√β̃'_t or √β'_t), 0 at t = 0
    log_variance_midpoint: Coefficient  # learned_range: ½(log β'_t + log β̃'_t), β̃' floored as diffusers does
    log_variance_half_range: Coefficient  # learned_range: ½(log β'_t - log β̃'_t)
    noise_mask: Coefficient  # 1 where t > 0 (noise is added), 0 at t = 0
    multistep_weight: (
        Coefficient  # multistep_order=2: h / (2 h_prev) (:func:`_multistep_weights`), 0: first order
    )
    chain_previous_timestep: Coefficient  # the chain's timestep before this one (NaN at the first step)


_NOISE_MASK_COLUMN = StepColumns._fields.index("noise_mask")


class ScheduleColumns(NamedTuple):
    """The named columns of the full ``num_train_timesteps`` table that the training-time API gathers from, one
    row per timestep (plus a NaN row). Gathered, each field has shape (B or 1, 1, ..., 1).

    As in the DDPM code, the log-variances use β̃_1 at t = 0, where β̃_0 = 0.
    """

    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    posterior_variance: torch.Tensor  # β̃_t
    posterior_log_variance_clipped: torch.Tensor  # log β̃_t, β̃_1 at t = 0
    fixed_large_log_variance: torch.Tensor  # log β_t, β̃_1 at t = 0 (fixed_large Σ of the DDPM code)
    log_variance_midpoint: torch.Tensor  # learned_range: ½(log β_t + log β̃_t), β̃_1 at t = 0
    log_variance_half_range: torch.Tensor  # learned_range: ½(log β_t - log β̃_t)
    snr: torch.Tensor  # ᾱ_t / (1 - ᾱ_t)
    analytic_log_variance: torch.Tensor  # analytic: log σ*²_t (η = 1, full schedule), NaN without moments


@dataclass
class DDPMSchedulerOutput(BaseOutput):
    """Output of :meth:`DDPMScheduler.step`.

    Args:
        prev_sample: x_{t-1}, the sample for the next (lower) timestep, same shape and dtype as ``sample``.
        pred_original_sample: x̂_0 predicted from the model output at this step (after clipping/thresholding).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (DDPM Eq. 5's L_{t-1})."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor, num_bins: int = 256
) -> torch.Tensor:
    """Elementwise log-likelihood (nats) of data ``x`` in [-1, 1], quantised to ``num_bins`` levels, under
    N(means, exp(log_scales)²) discretised into bins of width 2 / (num_bins - 1) (DDPM §3.3, the decoder L_0).

    The first and last bins extend to -∞ and +∞. Tails use ``torch.special.log_ndtr`` for accuracy.
    """
    if x.shape != means.shape:
        raise ValueError(
            f"x has shape {tuple(x.shape)} but means has shape {tuple(means.shape)}; they must match."
        )
    half_bin = 1.0 / (num_bins - 1)
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    upper = inv_stdv * (centered + half_bin)
    lower = inv_stdv * (centered - half_bin)
    log_cdf_upper = torch.special.log_ndtr(upper)  # log Φ(upper), used for the lowest bin
    log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)  # log(1 - Φ(lower)), used for the highest bin
    cdf_delta = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    # For a bin far in a tail, Φ(upper) - Φ(lower) underflows; use the difference of the tail probabilities
    # on the side where both are small: Φ(-lower) - Φ(-upper).
    cdf_delta = torch.where(lower > 0, torch.special.ndtr(-lower) - torch.special.ndtr(-upper), cdf_delta)
    log_cdf_delta = torch.log(cdf_delta.clamp(min=1e-12))
    edge = 1.0 - 1e-3
    return torch.where(
        x < -edge, log_cdf_upper, torch.where(x > edge, log_one_minus_cdf_lower, log_cdf_delta)
    )


def _betas_for_alpha_bar(num_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """GLIDE / Improved-DDPM cosine schedule: β_t = min(1 - ᾱ(t+1)/ᾱ(t), max_beta), in float64."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale √ᾱ so that ᾱ_T = 0 while ᾱ_0 is unchanged (Lin et al. 2023, arXiv 2305.08891, Alg. 1)."""
    sqrt_alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_alphas_cumprod[0].clone(), sqrt_alphas_cumprod[-1].clone()
    sqrt_alphas_cumprod = (sqrt_alphas_cumprod - last) * (first / (first - last))
    alphas_cumprod = sqrt_alphas_cumprod**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def _space_timesteps(num_train_timesteps: int, section_counts: str) -> list[int]:
    """Improved-DDPM respacing: the kept timesteps (ascending) for a section-count string.

    ``"10,15,20"`` cuts [0, num_train_timesteps) into three near-equal stretches and keeps 10, 15 and 20
    evenly spaced timesteps (first and last of each stretch included) from them. ``"ddimN"`` keeps
    ``range(0, num_train_timesteps, stride)`` for the integer stride that yields exactly N timesteps.
    """
    text = section_counts.strip().replace(" ", "")
    if text.startswith("ddim"):
        count_text = text[len("ddim") :]
        if not count_text.isdigit() or int(count_text) < 1:
            raise ValueError(
                f"num_inference_steps={section_counts!r}: expected 'ddim<N>' with N >= 1, e.g. 'ddim50'."
            )
        wanted = int(count_text)
        for stride in range(1, num_train_timesteps + 1):
            kept = list(range(0, num_train_timesteps, stride))
            if len(kept) == wanted:
                return kept
        raise ValueError(
            f"num_inference_steps={section_counts!r}: no integer stride gives exactly {wanted} of "
            f"{num_train_timesteps} timesteps; choose a count such as "
            f"{sorted({len(range(0, num_train_timesteps, s)) for s in range(1, 11)}, reverse=True)}."
        )
    parts = text.split(",")
    if not parts or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(
            f"num_inference_steps={section_counts!r} is not a section-count string; use comma-separated "
            "positive integers such as '10,15,20', or 'ddim<N>'."
        )
    counts = [int(p) for p in parts]
    base, extra = divmod(num_train_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if count > size:
            raise ValueError(
                f"num_inference_steps={section_counts!r}: section {i} has {size} timesteps, fewer than the "
                f"{count} requested; each count must be at most {base}."
            )
        stride = (size - 1) / (count - 1) if count > 1 else 0.0
        kept.extend(start + round(j * stride) for j in range(count))
        start += size
    return sorted(set(kept))


class DDPMScheduler(SchedulerMixin, ConfigMixin):
    """Ancestral DDPM sampler and the DDPM training/likelihood maths, interchangeable with diffusers' scheduler.

    The configuration keys, their defaults and ``step``'s numbers are those of diffusers'
    ``DDPMScheduler``, and the random draws are the same (one ``randn_tensor(model_output.shape,
    generator=...)`` per step with t > 0), so swapping one for the other keeps images for a seed. Schedules
    are computed in float64 and cast once: ours equals diffusers' algorithm evaluated in float64 to ≤ 1e-5,
    and equals diffusers' float32 results to ≤ 1e-5 except near t = 0, where diffusers' own float32
    β'_t = 1 - ᾱ_t/ᾱ_{t-1} is off by up to ~3e-4 (relative). Differences, all where diffusers 0.42 returns
    NaN, raises or is wrong:

    - ``variance_type="fixed_large_log"``: Σ = exp(log β_t) (GLIDE), where diffusers takes √(log β_t).
    - ``variance_type="learned"``: the extra channels are log Σ (DDPM / Improved-DDPM code), where diffusers
      takes √ of the raw output.
    - ``rescale_betas_zero_snr=True`` with ε-prediction: at ᾱ_t = 0 the ε → x_0 conversion uses
      ᾱ_t = 2⁻²⁴ instead of dividing by zero. Every other number (add_noise, posterior) uses ᾱ_T = 0.
    - ``timestep_spacing="trailing"`` keeps exactly ``num_inference_steps`` timesteps (diffusers' float
      ``arange`` appends a spurious -1 for some counts, e.g. 29 of 100).
    - invalid input raises ``ValueError`` naming the value and the valid choices: unknown options, non-finite
      or out-of-range numbers in the config, ``beta_start > beta_end``, fractional timesteps, a timestep
      outside the schedule, integer samples, tensors of mismatched shapes, a generator list that does not
      match the batch, both ``generator`` and ``variance_noise``, ``leading`` spacing whose offset reaches
      ``num_train_timesteps``.

    Kept from diffusers for identical images: noise is added whenever t > 0, also at the last step of a chain
    that ends above 0 (``trailing`` spacing, ``steps_offset=1``); Improved DDPM would add none there.

    Beyond diffusers: ``timestep`` may be a 1-d tensor (one per batch element); ``step`` takes the noise
    itself (``variance_noise=``) and then compiles with ``torch.compile(fullgraph=True)`` once for all
    timesteps; ``set_timesteps`` accepts Improved-DDPM section counts (``"10,15,20"``, ``"ddim50"``); and the
    training-time API (``get_target``, ``snr``, ``loss_weights``, posterior, ``p_mean_variance``, VLB terms),
    which always uses the full ``num_train_timesteps`` schedule.

    Random draws in ``step`` (the rule): the noise of a step whose timestep is 0 is never used. It is not drawn
    when the host knows t == 0 for free (a Python number, or a CPU tensor outside ``torch.compile``), exactly
    as diffusers; for an accelerator tensor or under compilation it is drawn and masked out, so no host-device
    synchronisation happens. ``variance_noise`` bypasses the generator altogether. With ``eta=0`` and a
    fixed_small variance no step draws noise (DDIM is deterministic).

    Args: see diffusers' ``DDPMScheduler``; the option strings are validated against ``BetaSchedule``,
    ``VarianceType``, ``PredictionType`` and ``TimestepSpacing``. Two keys of ours (defaults keep the DDPM
    step, and diffusers' schedulers keep them hidden through ``from_config``):

        eta: DDIM's η in [0, 1] (DDIM Eq. 16): the step's variance is η² β̃'_t and its mean DDIM's
            √ᾱ_t' x̂_0 + √(1 - ᾱ_t' - σ_t²) ε̂. 1.0 (default) is exactly the DDPM step (the η = 1 member of DDIM's
            family is the DDPM posterior, and the code keeps Eq. 7's formulas for it); 0.0 is diffusers'
            ``DDIMScheduler.step`` with ``set_alpha_to_one=True`` (ᾱ = 1 after the last step, as ours always) on
            a chain whose kept timesteps are T // n apart (``leading`` spacing): diffusers' DDIM steps to
            t - T // n whatever the spacing, ours to the next kept timestep, and its ``set_alpha_to_one=False``
            (ᾱ_0 after the last step, Stable Diffusion's configs) has no counterpart here. ε̂ is re-derived from
            the clipped x̂_0, i.e. diffusers' ``use_clipped_model_output=True``; with ``clip_sample=False`` (and
            no thresholding) that is diffusers' default too, while with clipping diffusers' default keeps the raw
            ε in the direction term. η != 1 needs ``variance_type``
            ``fixed_small``, ``fixed_small_log`` or ``analytic`` (ValueError otherwise: η has no meaning for β_t
            or a learned Σ_θ). ``step``'s own ``eta=`` argument is accepted and ignored.
        analytic_moments: Γ_t = E||ε_θ(x_t, t)||²/d for every training timestep (a JSON list of floats >= 0),
            needed by ``variance_type="analytic"``: the reverse variance is Analytic-DPM's optimal one
            (:func:`_analytic_variance`) for the chain's step t → t' and the configured η (λ² = η² β̃'_t), clipped
            to Theorem 2's bounds (data in ±``clip_sample_range`` when ``clip_sample``, ±1 with thresholding), and
            σ <= 2/255 · √(π/2) on the step into the chain's last timestep (Analytic-DPM's clipping, E|σ z| <= one
            8-bit level) and on the final step when it adds noise (a chain ending above t = 0; at t = 0 the
            final step adds none, as in DDPM and the paper). The
            likelihood API (``p_mean_variance``, ``vlb_terms``) uses the full schedule's η = 1 optimal variance
            with Theorem 2's bounds, including the decoder's at t = 0 (σ² = (1-ᾱ_0)/ᾱ_0 (1 - Γ_0), the paper's
            rule for the last step's variance), without the sampling clip.
        multistep_order: 1 (default) or 2. With 2, each step that directly follows the previous step of the same
            chain uses DPM-Solver++(2M)'s D = x̂_0 + h/(2 h_prev) (x̂_0 - x̂_0 of that step) in place of x̂_0 in
            its mean (:func:`_multistep_weights`; λ = log(√ᾱ/√(1-ᾱ)), h the step's increase of λ): with η = 0
            and ``fixed_small`` this is DPM-Solver++(2M) (diffusers' ``DPMSolverMultistepScheduler`` with
            ``algorithm_type="dpmsolver++"``, ``solver_order=2``, its default ``midpoint`` form and
            ``final_sigmas_type="zero"``, on the same timesteps), with η = 1 DPM-Solver++(2M) SDE (the DDPM
            posterior's coefficients are the SDE solver's); every variance type accepts it. The first step, the
            last one (into ᾱ = 1) and a step that does not follow the previous call's timestep in the chain
            (a new chain, image-to-image's start, RePaint's jumps back up, another batch size) are first order,
            so the scheduler keeps the previous x̂_0 between calls (reset by ``set_timesteps``). ``step`` still
            returns the model's x̂_0 as ``pred_original_sample``. Not named ``solver_order``, diffusers' key:
            ``DPMSolverMultistepScheduler.from_config`` would then silently take our default 1 (first order,
            i.e. DDIM), and ours would take its 2.
    """

    _compatibles: ClassVar[list[str]] = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: BetaSchedule = "linear",
        trained_betas: Sequence[float] | torch.Tensor | None = None,
        variance_type: VarianceType = "fixed_small",
        clip_sample: bool = True,
        prediction_type: PredictionType = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: TimestepSpacing = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        eta: float = 1.0,
        analytic_moments: Sequence[float] | torch.Tensor | None = None,
        multistep_order: int = 1,
    ):
        _check_choice("beta_schedule", beta_schedule, get_args(BetaSchedule))
        _check_choice("variance_type", variance_type, get_args(VarianceType))
        _check_choice("prediction_type", prediction_type, get_args(PredictionType))
        _check_choice("timestep_spacing", timestep_spacing, get_args(TimestepSpacing))
        if (
            isinstance(num_train_timesteps, bool)
            or not isinstance(num_train_timesteps, numbers.Integral)
            or num_train_timesteps < 1
        ):
            raise ValueError(f"num_train_timesteps={num_train_timesteps!r} must be a positive integer.")
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, numbers.Integral):
            raise ValueError(f"steps_offset={steps_offset!r} must be an integer.")
        _check_finite("beta_start", beta_start)
        _check_finite("beta_end", beta_end)
        _check_finite("clip_sample_range", clip_sample_range, positive=True)
        _check_finite("sample_max_value", sample_max_value, positive=True)
        _check_finite("dynamic_thresholding_ratio", dynamic_thresholding_ratio)
        if not 0.0 < dynamic_thresholding_ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio={dynamic_thresholding_ratio!r} must lie in (0, 1].")
        _check_eta(eta, variance_type)
        if isinstance(multistep_order, bool) or multistep_order not in (1, 2):
            raise ValueError(
                f"multistep_order={multistep_order!r} is not supported; choose 1 (the DDPM/DDIM step) or 2 "
                "(DPM-Solver++(2M)'s extrapolation of x̂_0)."
            )
        moments = _config_moments64(analytic_moments, num_train_timesteps, variance_type)
        if moments is not None:  # JSON holds no tensors: keep Python floats, as for trained_betas
            self.register_to_config(analytic_moments=moments.tolist())
        self._moments64 = moments
        # DDIM (η = 0) with the fixed small variance adds no noise: its steps draw none (as diffusers' DDIM)
        self._draws_noise = not (eta == 0 and variance_type in ("fixed_small", "fixed_small_log"))

        # 0. β_t in float64; everything below is derived in float64 and cast once.
        betas = self._config_betas64(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if trained_betas is not None:
            # the config is saved as JSON, which holds no tensors nor numpy float32 values: keep Python floats
            self.register_to_config(trained_betas=betas.tolist())
        # β_t = 1 makes ᾱ_T = 0 and x_0 = x_t / √ᾱ_t divide by zero (NaN samples): only the zero-terminal-SNR
        # rescaling below sets it, on purpose, and handles it
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(
                f"betas must lie in (0, 1), but beta_schedule={beta_schedule!r} with beta_start={beta_start!r}, "
                f"beta_end={beta_end!r}{' and trained_betas' if trained_betas is not None else ''} gives betas in "
                f"[{betas.min().item():.6g}, {betas.max().item():.6g}]; choose beta_start and beta_end with "
                "0 < beta_start <= beta_end < 1 (or trained_betas in (0, 1)), or rescale_betas_zero_snr=True for "
                "a terminal ᾱ_T = 0."
            )
        if rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)

        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self._betas64 = betas
        self._alphas_cumprod64 = alphas_cumprod
        # The public float32 tensors that diffusers' training scripts read (e.g. compute_snr), and diffusers'
        # attributes `one` and `init_noise_sigma`.
        self.betas = betas.float()
        self.alphas = (1.0 - betas).float()
        self.alphas_cumprod = alphas_cumprod.float()
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0

        self._schedule_table64 = self._build_schedule_table(alphas_cumprod, moments)
        self._schedule_cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

        # Full schedule until set_timesteps is called (diffusers' behaviour).
        self.custom_timesteps = False
        self.num_inference_steps: int | None = None
        self._build_step_tables(list(range(num_train_timesteps - 1, -1, -1)))

    @staticmethod
    def _config_betas64(
        num_train_timesteps: int,
        beta_start: float,
        beta_end: float,
        beta_schedule: str,
        trained_betas: Sequence[float] | torch.Tensor | None,
    ) -> torch.Tensor:
        """β_t (float64) of the configured schedule, before any zero-terminal-SNR rescaling."""
        if trained_betas is not None:
            betas = torch.as_tensor(trained_betas, dtype=torch.float64).flatten()
            if betas.numel() != num_train_timesteps:
                raise ValueError(
                    f"trained_betas has {betas.numel()} values but num_train_timesteps={num_train_timesteps}."
                )
            not_finite = (~torch.isfinite(betas)).nonzero().flatten().tolist()
            if not_finite:
                raise ValueError(
                    f"trained_betas[{not_finite[0]}]={betas[not_finite[0]].item()!r} is not finite "
                    f"({len(not_finite)} non-finite value(s)); every beta must be a number in (0, 1]."
                )
            return betas
        if beta_schedule in _SCHEDULES_FROM_BETA_START_TO_END and beta_start > beta_end:
            raise ValueError(
                f"beta_start={beta_start!r} is greater than beta_end={beta_end!r}; beta_schedule="
                f"{beta_schedule!r} needs beta_start <= beta_end (the noise level grows with t)."
            )
        if beta_schedule == "linear":
            return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        if beta_schedule == "scaled_linear":
            return (
                torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
            )
        if beta_schedule == "squaredcos_cap_v2":
            return _betas_for_alpha_bar(num_train_timesteps)
        # sigmoid (GeoDiff)
        return (
            torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps, dtype=torch.float64))
            * (beta_end - beta_start)
            + beta_start
        )

    def _build_schedule_table(
        self, alphas_cumprod: torch.Tensor, moments: torch.Tensor | None
    ) -> torch.Tensor:
        """The full-schedule table of the training-time API (Eq. 4, 6, 7): one float64 row of
        :class:`ScheduleColumns` per timestep, plus a NaN row (index T) that float timesteps outside the schedule
        map to on an accelerator."""
        num_train = alphas_cumprod.shape[0]
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        coefficients = _reverse_step_coefficients(alphas_cumprod, alphas_cumprod_prev)
        posterior_variance = coefficients.posterior_variance
        # log β̃_t is -inf at t = 0; as in the DDPM code, use β̃_1 there (and for fixed_large's first variance).
        clipped = (
            torch.cat([posterior_variance[1:2], posterior_variance[1:]])
            if num_train > 1
            else coefficients.betas
        )
        posterior_log_variance_clipped = clipped.log()
        midpoint, half_range = _log_variance_midpoint_and_half_range(
            posterior_log_variance_clipped, coefficients.betas.log()
        )
        columns = ScheduleColumns(
            sqrt_alphas_cumprod=coefficients.sqrt_alphas_cumprod,
            sqrt_one_minus_alphas_cumprod=coefficients.sqrt_one_minus_alphas_cumprod,
            sqrt_recip_alphas_cumprod=coefficients.sqrt_recip_alphas_cumprod,
            sqrt_recipm1_alphas_cumprod=coefficients.sqrt_recipm1_alphas_cumprod,
            posterior_mean_coef1=coefficients.posterior_mean_coef1,
            posterior_mean_coef2=coefficients.posterior_mean_coef2,
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=posterior_log_variance_clipped,
            fixed_large_log_variance=torch.cat([clipped[:1], coefficients.betas[1:]]).log(),
            log_variance_midpoint=midpoint,
            log_variance_half_range=half_range,
            snr=alphas_cumprod / (1.0 - alphas_cumprod),
            analytic_log_variance=(
                _analytic_variance(coefficients, moments, self._original_variance_bound())
                .clamp(min=_POSTERIOR_VARIANCE_FLOOR)
                .log()
                if moments is not None
                else torch.full_like(alphas_cumprod, float("nan"))
            ),
        )
        nan_row = torch.full((1, len(ScheduleColumns._fields)), float("nan"), dtype=torch.float64)
        return torch.cat([torch.stack(columns, dim=1), nan_row])

    # ------------------------------------------------------------------------------------------------
    # Schedules
    # ------------------------------------------------------------------------------------------------
    def scale_model_input(
        self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """DDPM needs no input scaling: returns ``sample`` unchanged (for interchangeability)."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | str | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        """Choose the timesteps of the sampling chain and precompute each step's coefficients.

        Args:
            num_inference_steps: an ``int`` (1 … num_train_timesteps) spaced by the configured
                ``timestep_spacing`` exactly as diffusers does, or an Improved-DDPM section-count string
                (``"10,15,20"``, ``"ddim50"``); either respaces the chain, with β'_t = 1 - ᾱ_t / ᾱ_prev
                recomputed from the kept ᾱ's.
            device: where ``self.timesteps`` and the step tables live.
            timesteps: custom strictly descending timesteps in [0, num_train_timesteps) (whole numbers; a
                float such as ``10.0`` is accepted, ``10.7`` is not); excludes ``num_inference_steps``.
        """
        num_train = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Pass either num_inference_steps or timesteps to set_timesteps, not both.")
        if timesteps is not None:
            kept = self._custom_timesteps(timesteps)
            self.custom_timesteps = True
            self.num_inference_steps = len(kept)
        elif num_inference_steps is None:
            raise ValueError(
                "set_timesteps needs num_inference_steps (int or section-count string) or timesteps."
            )
        elif isinstance(num_inference_steps, str):
            kept = _space_timesteps(num_train, num_inference_steps)[::-1]
            self.custom_timesteps = False
            self.num_inference_steps = len(kept)
        else:
            kept = self._spaced_timesteps(num_inference_steps)
            self.custom_timesteps = False
            self.num_inference_steps = len(kept)
        self._build_step_tables(kept, device)

    def _custom_timesteps(self, timesteps: Sequence[int] | torch.Tensor) -> list[int]:
        """Validated custom timesteps: whole numbers, strictly descending, in [0, num_train_timesteps)."""
        num_train = self.config.num_train_timesteps
        values = timesteps.tolist() if isinstance(timesteps, torch.Tensor) else list(timesteps)
        kept = [_integral_timestep(value, f"timesteps[{i}]") for i, value in enumerate(values)]
        if not kept:
            raise ValueError("timesteps=[] is empty; pass at least one timestep.")
        for previous, current in itertools.pairwise(kept):
            if current >= previous:
                raise ValueError(
                    f"timesteps must be strictly descending, but {current} follows {previous} in {kept}."
                )
        if kept[0] >= num_train or kept[-1] < 0:
            raise ValueError(
                f"timesteps={kept} must lie in [0, {num_train - 1}] (num_train_timesteps={num_train})."
            )
        return kept

    def _spaced_timesteps(self, num_inference_steps: int) -> list[int]:
        """diffusers' ``leading`` / ``linspace`` / ``trailing`` timesteps for an integer step count."""
        num_train = self.config.num_train_timesteps
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, numbers.Integral)
            or not 1 <= num_inference_steps <= num_train
        ):
            raise ValueError(
                f"num_inference_steps={num_inference_steps!r} must be an integer in [1, {num_train}] "
                f"(num_train_timesteps), or a section-count string such as '10,15,20' or 'ddim50'."
            )
        n = int(num_inference_steps)
        spacing = self.config.timestep_spacing
        if spacing == "linspace":  # as np.linspace(0, T-1, n).round()[::-1] (round half to even)
            step = (num_train - 1) / (n - 1) if n > 1 else 0.0
            kept = [round(i * step) for i in range(n - 1)] + [num_train - 1] if n > 1 else [0]
            kept = kept[::-1]
        elif spacing == "leading":
            ratio = num_train // n
            kept = [i * ratio + self.config.steps_offset for i in range(n)][::-1]
        else:  # trailing, as np.round(np.arange(T, 0, -T/n)) - 1
            ratio = num_train / n
            delta = (num_train - ratio) - num_train  # numpy's arange fills start + i * (x_1 - x_0)
            length = math.ceil(num_train / ratio)
            # numpy's float arange sometimes yields one extra value, -1, which diffusers keeps (it then
            # indexes ᾱ[-1]); keep exactly n timesteps.
            kept = [round(num_train + i * delta) - 1 for i in range(length)][:n]
        if kept[0] >= num_train or kept[-1] < 0:
            raise ValueError(
                f"timestep_spacing={spacing!r} with steps_offset={self.config.steps_offset} and "
                f"num_inference_steps={n} gives timesteps up to {kept[0]}, outside [0, {num_train - 1}]; "
                "lower steps_offset or num_inference_steps."
            )
        return kept

    def _build_step_tables(self, kept: list[int], device: str | torch.device | None = None) -> None:
        """Per-step coefficients for descending timesteps ``kept``: one float64 row of :class:`StepColumns` per
        step, addressed by timestep + 1, with NaN rows for every timestep outside the chain."""
        num_train = self.config.num_train_timesteps
        alphas_cumprod = self._alphas_cumprod64
        t = torch.tensor(kept, dtype=torch.long)
        prev = torch.tensor([*kept[1:], -1], dtype=torch.long)
        alphas_cumprod_prev = torch.where(
            prev >= 0, alphas_cumprod[prev.clamp(min=0)], torch.ones((), dtype=torch.float64)
        )
        coefficients = _reverse_step_coefficients(alphas_cumprod[t], alphas_cumprod_prev, self.config.eta)
        table = torch.stack(
            self._step_columns(coefficients, t, alphas_cumprod[t], alphas_cumprod_prev), dim=1
        )

        index_of = [-1] * num_train
        for i, value in enumerate(kept):
            index_of[value] = i
        # Rows addressed by timestep + 1: row 0 (t < 0 or fractional), row T + 1 (t >= T) and timesteps outside
        # the chain hold NaN, so one clamp and one gather serve every timestep without a search or a
        # synchronisation.
        by_timestep = torch.full((num_train + 2, len(StepColumns._fields)), float("nan"), dtype=torch.float64)
        by_timestep[t + 1] = table
        self._step_table64 = by_timestep
        self._step_rows = [StepColumns(*row) for row in table.tolist()]
        self._index_of_timestep = index_of
        self._prev_timesteps = prev.tolist()
        self._step_cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        # multistep_order=2: (the timestep of the previous step, its x̂_0); a new chain starts first order
        self._multistep_state: tuple[int | torch.Tensor, torch.Tensor] | None = None
        self.timesteps = t.to(device) if device is not None else t
        # Fill the cache ahead of time so a compiled step never sees it change (that would recompile).
        self._step_tables(self.timesteps.device, torch.float32)

    def _step_columns(
        self,
        coefficients: ReverseStepCoefficients,
        timesteps: torch.Tensor,
        alphas_cumprod: torch.Tensor,
        alphas_cumprod_prev: torch.Tensor,
    ) -> StepColumns:
        """The step table's columns (float64, one entry per step) from the chain's reverse-step coefficients at
        the chain's (descending) ``timesteps``, whose ᾱ are ``alphas_cumprod``, each stepping to
        ``alphas_cumprod_prev`` (ᾱ of the next one, 1 after the last)."""
        noise_mask = (timesteps > 0).to(torch.float64)
        # Eq. 7: β̃'_t (η² β̃'_t, DDIM Eq. 16), floored as diffusers does before its log (only t = 0 of the full
        # schedule has β̃ = 0).
        posterior_variance = coefficients.posterior_variance.clamp(min=_POSTERIOR_VARIANCE_FLOOR)
        variance_type = self.config.variance_type
        if variance_type in ("fixed_small", "fixed_small_log"):
            noise_std = posterior_variance.sqrt()
        elif variance_type == "analytic":
            moments = self._moments64[timesteps]
            noise_std = _analytic_variance(coefficients, moments, self._original_variance_bound()).sqrt()
            # the step into the last timestep (and a final step that adds noise): σ clipped as Analytic-DPM does
            noise_std[-2:] = noise_std[-2:].clamp(max=_ANALYTIC_LAST_STEPS_MAX_STD)
        elif variance_type in ("fixed_large", "fixed_large_log"):
            noise_std = coefficients.betas.sqrt()
        else:  # learned variances: σ_t comes from the model output
            noise_std = torch.zeros_like(posterior_variance)
        midpoint, half_range = _log_variance_midpoint_and_half_range(
            posterior_variance.log(), coefficients.betas.log()
        )
        return StepColumns(
            sqrt_alphas_cumprod=coefficients.sqrt_alphas_cumprod,
            sqrt_one_minus_alphas_cumprod=coefficients.sqrt_one_minus_alphas_cumprod,
            sqrt_recip_alphas_cumprod=coefficients.sqrt_recip_alphas_cumprod,
            sqrt_recipm1_alphas_cumprod=coefficients.sqrt_recipm1_alphas_cumprod,
            posterior_mean_coef1=coefficients.posterior_mean_coef1,
            posterior_mean_coef2=coefficients.posterior_mean_coef2,
            noise_std=noise_std * noise_mask,
            log_variance_midpoint=midpoint,
            log_variance_half_range=half_range,
            noise_mask=noise_mask,
            multistep_weight=_multistep_weights(alphas_cumprod, alphas_cumprod_prev),
            chain_previous_timestep=torch.cat([torch.full((1,), float("nan")), timesteps[:-1].double()]),
        )

    def _original_variance_bound(self) -> float | None:
        """b² for data in [-b, b] (Analytic-DPM Theorem 2's bound on Var(x_0 | x_t)): the range x̂_0 is clipped to
        (``clip_sample_range``, or 1 for dynamic thresholding, whose x̂_0 lies in [-1, 1]); None without clipping."""
        if self.config.thresholding:
            return 1.0
        if self.config.clip_sample:
            return float(self.config.clip_sample_range) ** 2
        return None

    def _step_tables(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The per-timestep coefficient table on ``device`` in ``dtype`` (cached)."""
        return _cached_cast(self._step_cache, self._step_table64, device, dtype)

    def previous_timestep(self, timestep: int | torch.Tensor) -> int | torch.Tensor:
        """The timestep after ``timestep`` in the current chain (-1 after the last one).

        An ``int`` for a Python number; for a tensor, a tensor of the same shape, dtype and device (as diffusers;
        reading an accelerator tensor synchronises, as diffusers' search does).
        """
        if isinstance(timestep, torch.Tensor):
            following = [
                self._prev_timesteps[self._host_index(_integral_timestep(value))]
                for value in timestep.reshape(-1).tolist()
            ]
            return torch.tensor(following, dtype=timestep.dtype, device=timestep.device).reshape(
                timestep.shape
            )
        return self._prev_timesteps[self._host_index(_integral_timestep(timestep))]

    def _host_index(self, timestep: int) -> int:
        """The step index of a timestep known on the host; ValueError naming the chain if it is not in it."""
        num_train = self.config.num_train_timesteps
        index = self._index_of_timestep[timestep] if 0 <= timestep < num_train else -1
        if index < 0:
            shown = self.timesteps.tolist()
            shown = shown if len(shown) <= 12 else [*shown[:6], "...", *shown[-6:]]
            raise ValueError(
                f"timestep={timestep} is not in the scheduler's timesteps {shown}; call set_timesteps first."
            )
        return index

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        """Write ``scheduler_config.json`` atomically (temp file + ``os.replace``): diffusers' version opens the
        target for writing before serialising, so a failure would leave it empty."""
        text = self.to_json_string()
        path = os.fspath(json_file_path)
        directory, name = os.path.split(path)
        temporary = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(temporary, "w", encoding="utf-8") as writer:
                writer.write(text)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)

    # ------------------------------------------------------------------------------------------------
    # Sampling step
    # ------------------------------------------------------------------------------------------------
    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding (Imagen, arXiv 2205.11487): per sample, s = quantile(|x_0|, ratio) clamped to
        [1, sample_max_value]; x_0 ← clamp(x_0, -s, s) / s."""
        flat = sample.reshape(sample.shape[0], -1)
        s = torch.quantile(flat.abs(), self.config.dynamic_thresholding_ratio, dim=1)
        s = s.clamp(min=1.0, max=self.config.sample_max_value).unsqueeze(1)
        return (torch.clamp(flat, -s, s) / s).reshape(sample.shape)

    def _clip_original(self, pred_original_sample: torch.Tensor) -> torch.Tensor:
        if self.config.thresholding:
            return self._threshold_sample(pred_original_sample)
        if self.config.clip_sample:
            limit = self.config.clip_sample_range
            return pred_original_sample.clamp(-limit, limit)
        return pred_original_sample

    def _split_model_output(
        self, model_output: torch.Tensor, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        channels = sample.shape[1] if sample.ndim > 1 else 1
        learned = self.config.variance_type in ("learned", "learned_range")
        expected = (sample.shape[0], 2 * channels, *sample.shape[2:]) if learned else tuple(sample.shape)
        if tuple(model_output.shape) != expected:
            raise ValueError(
                f"model_output has shape {tuple(model_output.shape)} but variance_type="
                f"{self.config.variance_type!r} with a sample of shape {tuple(sample.shape)} needs {expected}"
                + (" (mean channels then variance channels)." if learned else ".")
            )
        if learned:
            return model_output[:, :channels], model_output[:, channels:]
        return model_output, None

    @staticmethod
    def _check_step_inputs(
        model_output: torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        variance_noise: torch.Tensor | None,
    ) -> None:
        """Dtypes, the noise source and its shape (the model output's shape is checked by the split)."""
        _check_floating("sample", sample)
        _check_floating("model_output", model_output)
        if variance_noise is not None:
            if generator is not None:
                raise ValueError(
                    "Pass either generator or variance_noise to step, not both: variance_noise is the noise "
                    "itself, so a generator would not be used."
                )
            _check_floating("variance_noise", variance_noise)
            _check_same_shape("variance_noise", variance_noise, "sample", sample)
        if isinstance(generator, list) and len(generator) != sample.shape[0]:
            raise ValueError(
                f"generator is a list of {len(generator)} generators but the batch has {sample.shape[0]} "
                "samples; pass one generator per sample, or a single generator."
            )

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        variance_noise: torch.Tensor | None = None,
        eta: float | None = None,
        use_clipped_model_output: bool | None = None,
    ) -> DDPMSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One ancestral sampling step x_t → x_{t-1} ~ p_θ(x_{t-1} | x_t) (DDPM Algorithm 2).

        Recipe (all coefficients precomputed by ``set_timesteps`` with :func:`_reverse_step_coefficients`, read
        as one :class:`StepColumns` row per timestep):

        1. Split off the variance channels for ``learned``/``learned_range`` (Improved DDPM §3.1).
        2. x̂_0 from the model output (:func:`_predict_original_sample`): Eq. 15 for ε
           (x̂_0 = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t), x̂_0 = √ᾱ_t x_t - √(1-ᾱ_t) v for v-prediction, the output itself
           for ``sample``.
        3. Clip x̂_0 to ±clip_sample_range or dynamically threshold it. With ``multistep_order=2`` the mean of
           step 4 uses DPM-Solver++(2M)'s extrapolation D = x̂_0 + h/(2 h_prev) (x̂_0 - x̂_0 of the previous step)
           (:meth:`_multistep_original`).
        4. Posterior mean μ̃_t(x_t, x̂_0) = coef1 x̂_0 + coef2 x_t (:func:`_posterior_mean`, Eq. 7; with ε this
           is Eq. 11).
        5. Add σ_t z, z ~ N(0, I), for t > 0 (σ_t² = β̃_t, β'_t or the learned Σ_θ; Eq. 6 and §3.2; with
           ``eta`` DDIM's η² β̃'_t (DDIM Eq. 16), with ``analytic`` Analytic-DPM's σ*² (Theorem 1, clipped by
           Theorem 2), see :func:`_analytic_variance`).

        With ``eta`` != 1 steps 4-5 are DDIM's Eq. 12 with σ_t(η) of Eq. 16, written as coef1 x̂_0 + coef2 x_t
        + σ_t z by :func:`_reverse_step_coefficients` (ε̂ = (x_t - √ᾱ_t x̂_0)/√(1-ᾱ_t), from the clipped x̂_0).

        Args:
            model_output: the network output (2×C channels for learned variance types), floating point.
            timestep: an int (or a whole float such as ``40.0``), a 0-d tensor, or a 1-d tensor with one
                timestep per batch element, each in ``self.timesteps``.
            sample: x_t, a floating-point tensor.
            generator: RNG for z, drawn as ``randn_tensor(model_output.shape, generator)`` like diffusers; a
                list needs one generator per batch element.
            return_dict: return a :class:`DDPMSchedulerOutput` (else a tuple).
            variance_noise: z itself (shape of ``sample``; excludes ``generator``); makes ``step`` compile
                without graph breaks.
            eta, use_clipped_model_output: accepted so DDIM-style pipelines (which pass them, DDIMPipeline always
                ``eta=0.0``) can run this scheduler; they have no effect: the config's ``eta`` decides, and ε̂ is
                always the one of the clipped x̂_0.

        Returns:
            ``DDPMSchedulerOutput(prev_sample, pred_original_sample)`` or the tuple of the two.

        A timestep given as a Python number or a CPU tensor outside torch.compile is validated (ValueError if it
        is fractional or not in the schedule); a device tensor is not (that would synchronise): an unknown or
        fractional timestep then yields NaN.
        """
        del eta, use_clipped_model_output  # the config's eta decides (see the class docstring)
        self._check_step_inputs(model_output, sample, generator, variance_noise)
        # 1. split the variance channels
        mean_output, variance_output = self._split_model_output(model_output, sample)
        out_dtype = sample.dtype
        work_dtype = out_dtype if out_dtype in (torch.float32, torch.float64) else torch.float32
        compiling = torch.compiler.is_compiling()
        if isinstance(timestep, torch.Tensor):
            on_host = timestep.ndim == 0 and timestep.device.type == "cpu" and not compiling
        else:
            on_host = isinstance(timestep, numbers.Real) and not compiling
        if on_host:
            # host path: a timestep known on the host, Python-float coefficients, the fewest kernels
            host_timestep = _integral_timestep(
                timestep.item() if isinstance(timestep, torch.Tensor) else timestep
            )
            columns = self._step_rows[self._host_index(host_timestep)]
            add_noise = host_timestep > 0 and self._draws_noise
            chain_position: int | torch.Tensor = host_timestep
        else:
            # tensor path: coefficients gathered by index, no host-device synchronisation, compile friendly
            columns, any_noise = self._gather_step_columns(timestep, sample, work_dtype, compiling)
            add_noise = (any_noise or variance_noise is not None) and self._draws_noise
            chain_position = torch.as_tensor(timestep, device=sample.device).reshape(-1).to(work_dtype)
            chain_position = chain_position.reshape(-1, *([1] * (sample.ndim - 1)))
        prev_sample, pred_original_sample = self._reverse_step(
            columns,
            mean_output,
            variance_output,
            sample,
            work_dtype,
            add_noise,
            generator,
            variance_noise,
            chain_position,
        )
        prev_sample = prev_sample.to(out_dtype)
        pred_original_sample = pred_original_sample.to(out_dtype)
        if not return_dict:
            return prev_sample, pred_original_sample
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def _gather_step_columns(
        self, timestep: int | torch.Tensor, sample: torch.Tensor, work_dtype: torch.dtype, compiling: bool
    ) -> tuple[StepColumns, bool]:
        """The step columns at tensor timesteps, shaped (B or 1, 1, ..., 1), and whether any row adds noise.

        One gather from the timestep-indexed table: a timestep outside the chain (or fractional) lands on a NaN
        row. Where it is free (a CPU tensor outside torch.compile) the timesteps are validated instead, and
        ``any noise`` is read so that a step with every t == 0 draws nothing, as diffusers; elsewhere it is
        True (the noise is drawn and masked out, no synchronisation).
        """
        device = sample.device
        table = self._step_tables(device, work_dtype)
        timestep = torch.as_tensor(timestep, device=device)
        if timestep.ndim > 1 or (timestep.ndim == 1 and timestep.shape[0] not in (1, sample.shape[0])):
            raise ValueError(
                f"timestep has shape {tuple(timestep.shape)}; use an int, a 0-d tensor or a 1-d tensor of length "
                f"{sample.shape[0]} (the batch size)."
            )
        flat = timestep.reshape(-1)
        index = flat.long()
        # the row of timestep t is t + 1; a fractional timestep maps to the NaN row 0
        index = torch.where(flat == index, index + 1, 0) if flat.is_floating_point() else index + 1
        rows = table[index.clamp(0, self.config.num_train_timesteps + 1)]  # (B or 1, columns)
        any_noise = True
        if device.type == "cpu" and not compiling:
            noise_mask = rows[:, _NOISE_MASK_COLUMN].tolist()
            if any(map(math.isnan, noise_mask)):  # a timestep outside the chain: name it
                for value in flat.tolist():
                    self._host_index(_integral_timestep(value))
            any_noise = any(noise_mask)
        shape = (rows.shape[0], len(StepColumns._fields), *([1] * (sample.ndim - 1)))
        return StepColumns(*rows.reshape(shape).unbind(1)), any_noise

    def _reverse_step(
        self,
        columns: StepColumns,
        mean_output: torch.Tensor,
        variance_output: torch.Tensor | None,
        sample: torch.Tensor,
        work_dtype: torch.dtype,
        add_noise: bool,
        generator: torch.Generator | list[torch.Generator] | None,
        variance_noise: torch.Tensor | None,
        chain_position: int | torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 2-5 of :meth:`step` for either path (``columns`` holds floats or gathered tensors;
        ``chain_position`` is the timestep, an int on the host path, a broadcastable tensor on the other)."""
        x = sample.to(work_dtype)
        # 2. x̂_0, 3. clip / threshold (and the multistep extrapolation)
        pred_original_sample = self._clip_original(
            _predict_original_sample(self.config.prediction_type, mean_output.to(work_dtype), x, columns)
        )
        mean_original = pred_original_sample
        if self.config.multistep_order == 2:
            mean_original = self._multistep_original(pred_original_sample, columns, chain_position)
        # 4. posterior mean
        prev_sample = _posterior_mean(mean_original, x, columns)
        # 5. noise, for t > 0 (zero-masked per row on the tensor path)
        if not add_noise:
            return prev_sample, pred_original_sample
        noise = self._draw_noise(mean_output, generator) if variance_noise is None else variance_noise
        scale = self._noise_scale(columns, variance_output, work_dtype)
        return _add_scaled_(prev_sample, scale, noise.to(work_dtype)), pred_original_sample

    def _multistep_original(
        self, pred_original_sample: torch.Tensor, columns: StepColumns, chain_position: int | torch.Tensor
    ) -> torch.Tensor:
        """DPM-Solver++(2M)'s D = x̂_0 + w (x̂_0 - x̂_0 of the previous step), w = h/(2 h_prev), when the previous
        call stepped from the chain's previous timestep (on the tensor path checked per batch element, without a
        host synchronisation); x̂_0 itself otherwise. Remembers this step's timestep and x̂_0 for the next call."""
        state, self._multistep_state = self._multistep_state, (chain_position, pred_original_sample)
        if state is None or state[1].shape != pred_original_sample.shape:
            return pred_original_sample
        previous_position, previous_original = state
        previous_original = previous_original.to(pred_original_sample)
        if isinstance(chain_position, int):  # host path: Python numbers, decided on the host
            weight = columns.multistep_weight
            if (
                isinstance(previous_position, torch.Tensor)
                or previous_position != columns.chain_previous_timestep
            ):
                return pred_original_sample
            if weight == 0.0:
                return pred_original_sample
            return torch.add(pred_original_sample, pred_original_sample - previous_original, alpha=weight)
        follows = torch.as_tensor(previous_position, device=chain_position.device).to(chain_position.dtype)
        if follows.ndim != chain_position.ndim:
            return pred_original_sample
        weight = torch.where(
            follows == columns.chain_previous_timestep,
            columns.multistep_weight,
            torch.zeros_like(columns.multistep_weight),
        )
        return torch.addcmul(pred_original_sample, weight, pred_original_sample - previous_original)

    def _noise_scale(
        self, columns: StepColumns, variance_output: torch.Tensor | None, work_dtype: torch.dtype
    ) -> Coefficient:
        """σ_t: the fixed standard deviation, or exp(½ log Σ_θ) from the model's variance channels."""
        variance_type = self.config.variance_type
        if variance_type == "learned":
            half_log_variance = variance_output.to(work_dtype).mul(0.5)
        elif variance_type == "learned_range":
            half_log_variance = _learned_range_log_variance(
                variance_output.to(work_dtype), columns.log_variance_midpoint, columns.log_variance_half_range
            ).mul_(0.5)
        else:
            return columns.noise_std
        scale = half_log_variance.exp_()
        return scale.mul_(columns.noise_mask) if isinstance(columns.noise_mask, torch.Tensor) else scale

    def _draw_noise(
        self, mean_output: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None
    ) -> torch.Tensor:
        if generator is None:
            return torch.randn(mean_output.shape, device=mean_output.device, dtype=mean_output.dtype)
        return randn_tensor(
            mean_output.shape, generator=generator, device=mean_output.device, dtype=mean_output.dtype
        )

    # ------------------------------------------------------------------------------------------------
    # Forward process and training-time API (always the full num_train_timesteps schedule)
    # ------------------------------------------------------------------------------------------------
    def _schedule_index(self, timesteps: int | torch.Tensor, device: torch.device) -> torch.Tensor:
        """1-d row index into the full-schedule table. Validated where free (CPU, outside torch.compile: whole
        numbers in [0, T), else ValueError); on an accelerator a fractional or out-of-range float timestep maps
        to the NaN row (an out-of-range integer fails in the gather)."""
        timesteps = torch.as_tensor(timesteps, device=device).reshape(-1)
        num_train = self.config.num_train_timesteps
        if timesteps.device.type == "cpu" and not torch.compiler.is_compiling():
            values = timesteps.tolist()
            fractional = [v for v in values if not float(v).is_integer()]
            if fractional:
                raise ValueError(
                    f"timesteps {fractional[:8]} are not whole numbers; DDPM timesteps are integers in "
                    f"[0, {num_train - 1}] (10 and 10.0 are accepted, 10.5 is not)."
                )
            if any(not 0 <= v < num_train for v in values):
                raise ValueError(
                    f"timesteps {values[:16]} must lie in [0, {num_train - 1}] (num_train_timesteps={num_train})."
                )
            return timesteps.long()
        index = timesteps.long()
        if timesteps.is_floating_point():
            valid = (timesteps == index) & (index >= 0) & (index < num_train)
            index = torch.where(valid, index, num_train)
        return index

    def _schedule_table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The full-schedule table on ``device`` in ``dtype`` (cached)."""
        return _cached_cast(self._schedule_cache, self._schedule_table64, device, dtype)

    def _gather_schedule(self, timesteps: int | torch.Tensor, like: torch.Tensor) -> ScheduleColumns:
        """The full-schedule columns at ``timesteps`` (one per batch element of ``like``, or one for all),
        in ``like``'s dtype and shaped (B or 1, 1, ..., 1) to broadcast against it."""
        index = self._schedule_index(timesteps, like.device)
        if like.ndim and index.numel() not in (1, like.shape[0]):
            raise ValueError(
                f"got {index.numel()} timesteps for a batch of {like.shape[0]}; pass one timestep per sample "
                "(or a single one for all)."
            )
        rows = self._schedule_table(like.device, like.dtype)[index]
        shape = (rows.shape[0], len(ScheduleColumns._fields), *([1] * (like.ndim - 1)))
        return ScheduleColumns(*rows.reshape(shape).unbind(1))

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: int | torch.Tensor
    ) -> torch.Tensor:
        """Sample q(x_t | x_0) (Eq. 4): x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε, one timestep per batch element."""
        self._check_sample_and_noise("original_samples", original_samples, noise)
        columns = self._gather_schedule(timesteps, original_samples)
        return columns.sqrt_alphas_cumprod * original_samples + columns.sqrt_one_minus_alphas_cumprod * noise

    def get_velocity(
        self, sample: torch.Tensor, noise: torch.Tensor, timesteps: int | torch.Tensor
    ) -> torch.Tensor:
        """v = √ᾱ_t ε - √(1-ᾱ_t) x_0 (Salimans & Ho 2022, Imagen Video §2.4); ``sample`` is x_0."""
        self._check_sample_and_noise("sample", sample, noise)
        columns = self._gather_schedule(timesteps, sample)
        return columns.sqrt_alphas_cumprod * noise - columns.sqrt_one_minus_alphas_cumprod * sample

    @staticmethod
    def _check_sample_and_noise(name: str, sample: torch.Tensor, noise: torch.Tensor) -> None:
        _check_floating(name, sample)
        _check_floating("noise", noise)
        _check_same_shape("noise", noise, name, sample)

    def get_target(
        self, sample: torch.Tensor, noise: torch.Tensor, timesteps: int | torch.Tensor
    ) -> torch.Tensor:
        """Regression target of L_simple (Eq. 14) for the configured ``prediction_type``: ε, x_0 or v.

        ``sample`` is the clean x_0 and ``noise`` the ε used in :meth:`add_noise`.
        """
        self._check_sample_and_noise("sample", sample, noise)
        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "sample":
            return sample
        return self.get_velocity(sample, noise, timesteps)

    def convert_prediction(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        timesteps: int | torch.Tensor,
        to: PredictionType,
        source: PredictionType | None = None,
    ) -> torch.Tensor:
        """Convert a prediction between ε, x_0 (``"sample"``) and v at x_t = ``sample`` (Eq. 15 and its inverses).

        ``source`` defaults to the configured ``prediction_type``. No clipping is applied.
        """
        source = self.config.prediction_type if source is None else source
        _check_choice("source", source, get_args(PredictionType))
        _check_choice("to", to, get_args(PredictionType))
        _check_floating("model_output", model_output)
        _check_floating("sample", sample)
        _check_same_shape("model_output", model_output, "sample", sample)
        if source == to:
            return model_output
        columns = self._gather_schedule(timesteps, sample)
        original = _predict_original_sample(source, model_output, sample, columns)
        if to == "sample":
            return original
        a, s = columns.sqrt_alphas_cumprod, columns.sqrt_one_minus_alphas_cumprod
        if source == "epsilon":
            epsilon = model_output
        elif source == "sample":
            epsilon = (sample - a * model_output) / s  # Eq. 4 solved for ε
        else:
            epsilon = s * sample + a * model_output
        if to == "epsilon":
            return epsilon
        return a * epsilon - s * original

    def snr(self, timesteps: int | torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio SNR(t) = ᾱ_t / (1 - ᾱ_t) (float32, on the timesteps' device)."""
        timesteps = torch.as_tensor(timesteps)
        index = self._schedule_index(timesteps, timesteps.device)
        rows = self._schedule_table(timesteps.device, torch.float32)[index]
        return rows[:, ScheduleColumns._fields.index("snr")].reshape(timesteps.shape)

    def loss_weights(
        self, timesteps: int | torch.Tensor, weighting: LossWeighting = "uniform", snr_gamma: float = 5.0
    ) -> torch.Tensor:
        """Per-sample weights for the MSE loss against :meth:`get_target`.

        ``"uniform"`` gives ones (L_simple). ``"min_snr"`` is Min-SNR-γ (Hang et al. 2023, arXiv 2303.09556):
        min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v and min(SNR, γ) for x_0, i.e. the x_0-space weight
        min(SNR, γ) expressed for the configured prediction target.
        """
        _check_choice("weighting", weighting, get_args(LossWeighting))
        _check_finite("snr_gamma", snr_gamma, positive=True)
        snr = self.snr(timesteps)
        if weighting == "uniform":
            return torch.ones_like(snr)
        clipped = snr.clamp(max=snr_gamma)
        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            return torch.where(
                snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr)
            )
        if prediction_type == "v_prediction":
            return clipped / (snr + 1.0)
        return clipped

    def q_posterior_mean_variance(
        self, original_sample: torch.Tensor, sample: torch.Tensor, timesteps: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Posterior q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I) (Eq. 6-7) over the full schedule.

        Returns (mean, variance, log_variance); the log-variance uses β̃_1 at t = 0, where β̃_0 = 0.
        """
        _check_floating("original_sample", original_sample)
        _check_floating("sample", sample)
        _check_same_shape("original_sample", original_sample, "sample", sample)
        columns = self._gather_schedule(timesteps, sample)
        mean = _posterior_mean(original_sample, sample, columns)
        return (
            mean,
            columns.posterior_variance.expand_as(sample),
            columns.posterior_log_variance_clipped.expand_as(sample),
        )

    def p_mean_variance(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        timesteps: int | torch.Tensor,
        clip_denoised: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The reverse transition p_θ(x_{t-1} | x_t) = N(μ_θ, Σ_θ) (Eq. 1) from a model output, full schedule.

        μ_θ is the posterior mean at x̂_0 (Eq. 11 for ε), computed by the same functions as :meth:`step`; Σ_θ is
        β̃_t (fixed_small*), β_t (fixed_large*, β̃_1 at t = 0 as in the DDPM code), learned (Improved DDPM
        Eq. 15 for ``learned_range``) or Analytic-DPM's optimal σ*²_t (``analytic``, η = 1 whatever the config's
        ``eta``: the bound is that of the DDPM process; Theorem 2's bounds, not the sampling clip; at t = 0 the
        decoder's σ² = (1-ᾱ_0)/ᾱ_0 (1 - Γ_0)).

        Returns a dict with ``mean``, ``variance``, ``log_variance`` and ``pred_original_sample``.
        """
        _check_floating("model_output", model_output)
        _check_floating("sample", sample)
        mean_output, variance_output = self._split_model_output(model_output, sample)
        columns = self._gather_schedule(timesteps, sample)
        variance_type = self.config.variance_type
        if variance_type == "learned":
            log_variance = variance_output
        elif variance_type == "learned_range":
            log_variance = _learned_range_log_variance(
                variance_output, columns.log_variance_midpoint, columns.log_variance_half_range
            )
        elif variance_type in ("fixed_small", "fixed_small_log"):
            log_variance = columns.posterior_log_variance_clipped.expand_as(sample)
        elif variance_type == "analytic":
            log_variance = columns.analytic_log_variance.expand_as(sample)
        else:
            log_variance = columns.fixed_large_log_variance.expand_as(sample)
        pred_original_sample = _predict_original_sample(
            self.config.prediction_type, mean_output, sample, columns
        )
        if clip_denoised:
            limit = self.config.clip_sample_range
            pred_original_sample = pred_original_sample.clamp(-limit, limit)
        return {
            "mean": _posterior_mean(pred_original_sample, sample, columns),
            "variance": torch.exp(log_variance),
            "log_variance": log_variance,
            "pred_original_sample": pred_original_sample,
        }

    def vlb_terms(
        self,
        model_output: torch.Tensor,
        original_sample: torch.Tensor,
        sample: torch.Tensor,
        timesteps: int | torch.Tensor,
        clip_denoised: bool = False,
    ) -> torch.Tensor:
        """Per-sample variational-bound term in bits per dimension (DDPM Eq. 5, §3.3).

        L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_θ(x_{t-1} | x_t)) for t > 0 and the decoder NLL
        L_0 = -log p_θ(x_0 | x_1) (discretized Gaussian, 8-bit data in [-1, 1]) for t = 0. For the
        Improved-DDPM hybrid loss the caller detaches the mean channels of ``model_output``.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(original_sample, sample, timesteps)
        model = self.p_mean_variance(model_output, sample, timesteps, clip_denoised=clip_denoised)
        dims = tuple(range(1, sample.ndim))
        kl = normal_kl(true_mean, true_log_variance, model["mean"], model["log_variance"]).mean(dim=dims)
        decoder_nll = -discretized_gaussian_log_likelihood(
            original_sample, model["mean"], 0.5 * model["log_variance"]
        ).mean(dim=dims)
        timesteps = torch.as_tensor(timesteps, device=sample.device).reshape(-1)
        return torch.where(timesteps == 0, decoder_nll, kl) / math.log(2.0)

    def prior_bpd(self, original_sample: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) per sample, in bits per dimension (DDPM Eq. 5)."""
        _check_floating("original_sample", original_sample)
        last = torch.full(
            (original_sample.shape[0],), self.config.num_train_timesteps - 1, device=original_sample.device
        )
        columns = self._gather_schedule(last, original_sample)
        mean = columns.sqrt_alphas_cumprod * original_sample
        variance = columns.sqrt_one_minus_alphas_cumprod**2
        kl = normal_kl(
            mean, torch.log(variance).expand_as(mean), torch.zeros_like(mean), torch.zeros_like(mean)
        )
        return kl.mean(dim=tuple(range(1, original_sample.ndim))) / math.log(2.0)
