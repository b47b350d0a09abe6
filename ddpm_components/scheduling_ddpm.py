"""DDPM scheduler (Ho et al. 2020, arXiv 2006.11239) as a diffusers scheduler.

This module is self-contained: it imports only torch, diffusers and the standard library, because a saved
pipeline carries it next to ``scheduler_config.json`` as remote code.

Map from the paper's equations to the methods below (β_t the noise schedule, α_t = 1 - β_t,
ᾱ_t = ∏_{s<=t} α_s, indices are 0-based timesteps as in diffusers):

====================================================  =====================================================
Equation                                              Method
====================================================  =====================================================
Eq. 4   q(x_t | x_0) = N(√ᾱ_t x_0, (1-ᾱ_t) I)         :meth:`DDPMScheduler.add_noise`
Eq. 6-7 q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I)         :meth:`DDPMScheduler.q_posterior_mean_variance`
Eq. 11  μ_θ from ε_θ;  Eq. 15  x_0 from ε_θ             :meth:`DDPMScheduler.convert_prediction`,
                                                      :meth:`DDPMScheduler.p_mean_variance`
Eq. 1   p_θ(x_{t-1} | x_t) = N(μ_θ, Σ_θ), Alg. 2       :meth:`DDPMScheduler.step`
Eq. 14  L_simple target (ε, x_0 or v)                   :meth:`DDPMScheduler.get_target`,
                                                      :meth:`DDPMScheduler.get_velocity`
Eq. 5   L_T, L_{t-1}, L_0 (bits per dimension)          :meth:`DDPMScheduler.prior_bpd`,
                                                      :meth:`DDPMScheduler.vlb_terms`, :func:`normal_kl`,
                                                      :func:`discretized_gaussian_log_likelihood`
SNR(t) = ᾱ_t / (1 - ᾱ_t); min-SNR-γ weights            :meth:`DDPMScheduler.snr`, :meth:`DDPMScheduler.loss_weights`
====================================================  =====================================================

Improved DDPM (Nichol & Dhariwal 2021, arXiv 2102.09672) adds the learned variance
(``variance_type="learned_range"``: Σ_θ = exp(v log β_t + (1 - v) log β̃_t) with v = (out + 1) / 2) and the
respacing of the schedule into section counts (``set_timesteps("10,15,20")``, ``set_timesteps("ddim50")``).
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

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
    "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"
]
PredictionType = Literal["epsilon", "sample", "v_prediction"]
TimestepSpacing = Literal["leading", "linspace", "trailing"]
LossWeighting = Literal["uniform", "min_snr"]

# ᾱ_t used when converting an ε-prediction to x_0 at a timestep where ᾱ_t == 0 (zero terminal SNR);
# the same floor diffusers' newer schedulers use.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24
# diffusers clamps the posterior variance before taking its log (matters only at the last step).
_POSTERIOR_VARIANCE_FLOOR = 1e-20

# Columns of the per-step coefficient table built by set_timesteps.
_K1, _K2, _COEF1, _COEF2, _STD, _LR_A, _LR_B, _MASK = range(8)
_NUM_COLUMNS = 8


def _check_choice(name: str, value: object, choices_type: object) -> None:
    """The one place where option strings are validated: raise a ValueError naming the value and the choices."""
    choices = get_args(choices_type)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}.")


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
    - invalid input (unknown options, a timestep outside the schedule, a model output of the wrong shape,
      ``leading`` spacing whose offset reaches ``num_train_timesteps``) raises ``ValueError`` naming the value
      and the valid choices.

    Kept from diffusers for identical images: noise is added whenever t > 0, also at the last step of a chain
    that ends above 0 (``trailing`` spacing, ``steps_offset=1``); Improved DDPM would add none there.

    Beyond diffusers: ``timestep`` may be a 1-d tensor (one per batch element); ``step`` takes the noise
    itself (``variance_noise=``) and then compiles with ``torch.compile(fullgraph=True)`` once for all
    timesteps; ``set_timesteps`` accepts Improved-DDPM section counts (``"10,15,20"``, ``"ddim50"``); and the
    training-time API (``get_target``, ``snr``, ``loss_weights``, posterior, ``p_mean_variance``, VLB terms),
    which always uses the full ``num_train_timesteps`` schedule.

    Random draws in ``step`` (the rule): the noise of a step whose timestep is 0 is never used. It is not drawn
    when the host knows t == 0 for free (a Python int, or a CPU tensor outside ``torch.compile``), exactly as
    diffusers; for an accelerator tensor or under compilation it is drawn and masked out, so no host-device
    synchronisation happens. ``variance_noise`` bypasses the generator altogether.

    Args: see diffusers' ``DDPMScheduler``; the option strings are validated against ``BetaSchedule``,
    ``VarianceType``, ``PredictionType`` and ``TimestepSpacing``.
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
    ):
        _check_choice("beta_schedule", beta_schedule, BetaSchedule)
        _check_choice("variance_type", variance_type, VarianceType)
        _check_choice("prediction_type", prediction_type, PredictionType)
        _check_choice("timestep_spacing", timestep_spacing, TimestepSpacing)
        if not isinstance(num_train_timesteps, numbers.Integral) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps={num_train_timesteps!r} must be a positive integer.")
        if not 0.0 < dynamic_thresholding_ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio={dynamic_thresholding_ratio!r} must lie in (0, 1].")

        # 0. β_t in float64; everything below is derived in float64 and cast once.
        if trained_betas is not None:
            betas = torch.as_tensor(trained_betas, dtype=torch.float64).flatten()
            if betas.numel() != num_train_timesteps:
                raise ValueError(
                    f"trained_betas has {betas.numel()} values but num_train_timesteps={num_train_timesteps}."
                )
            # the config is saved as JSON, which holds no tensors nor numpy float32 values: keep Python floats
            self.register_to_config(trained_betas=betas.tolist())
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        elif beta_schedule == "scaled_linear":
            betas = (
                torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
            )
        elif beta_schedule == "squaredcos_cap_v2":
            betas = _betas_for_alpha_bar(num_train_timesteps)
        else:  # sigmoid (GeoDiff)
            betas = (
                torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps, dtype=torch.float64))
                * (beta_end - beta_start)
                + beta_start
            )
        if rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError(
                f"betas must lie in (0, 1], but beta_schedule={beta_schedule!r} with beta_start={beta_start!r}, "
                f"beta_end={beta_end!r}{' and trained_betas' if trained_betas is not None else ''} gives betas in "
                f"[{betas.min().item():.6g}, {betas.max().item():.6g}]; choose beta_start and beta_end with "
                "0 < beta_start <= beta_end <= 1 (or trained_betas in (0, 1])."
            )

        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self._betas64 = betas
        self._alphas_cumprod64 = alphas_cumprod
        # The public float32 tensors that diffusers' training scripts read (e.g. compute_snr).
        self.betas = betas.float()
        self.alphas = (1.0 - betas).float()
        self.alphas_cumprod = alphas_cumprod.float()
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0

        # Full-schedule tables for the training-time API (Eq. 4, 6, 7), float64.
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # log β̃_t is -inf at t = 0; as in the DDPM code, use β̃_1 there.
        clipped = (
            torch.cat([posterior_variance[1:2], posterior_variance[1:]]) if num_train_timesteps > 1 else betas
        )
        fixed_large_variance = torch.cat([clipped[:1], betas[1:]])
        self._train_tables64 = {
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": torch.where(
                alphas_cumprod > 0, alphas_cumprod, ZERO_SNR_ALPHA_CUMPROD
            ).rsqrt(),
            "snr": alphas_cumprod / (1.0 - alphas_cumprod),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": clipped.log(),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev)
            * (1.0 - betas).sqrt()
            / (1.0 - alphas_cumprod),
            "log_betas": betas.log(),
            "fixed_large_variance": fixed_large_variance,
            "fixed_large_log_variance": fixed_large_variance.log(),
        }
        self._device_cache: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

        # Full schedule until set_timesteps is called (diffusers' behaviour).
        self.custom_timesteps = False
        self.num_inference_steps: int | None = None
        self._build_step_tables(list(range(num_train_timesteps - 1, -1, -1)))

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
            timesteps: custom strictly descending timesteps in [0, num_train_timesteps); excludes
                ``num_inference_steps``.
        """
        num_train = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Pass either num_inference_steps or timesteps to set_timesteps, not both.")
        if timesteps is not None:
            kept = [
                int(t) for t in (timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)
            ]
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
            self.custom_timesteps = False
            self.num_inference_steps = n
        self._build_step_tables(kept, device)

    def _build_step_tables(self, kept: list[int], device: str | torch.device | None = None) -> None:
        """Per-step coefficients for descending timesteps ``kept`` (float64, one row per step, plus a NaN row
        that any timestep outside the schedule maps to on the device path)."""
        num_train = self.config.num_train_timesteps
        alphas_cumprod = self._alphas_cumprod64
        t = torch.tensor(kept, dtype=torch.long)
        prev = torch.tensor([*kept[1:], -1], dtype=torch.long)
        alpha_prod_t = alphas_cumprod[t]
        alpha_prod_prev = torch.where(
            prev >= 0, alphas_cumprod[prev.clamp(min=0)], torch.ones((), dtype=torch.float64)
        )
        beta_prod_t = 1.0 - alpha_prod_t
        current_alpha = alpha_prod_t / alpha_prod_prev
        current_beta = 1.0 - current_alpha  # β'_t, recomputed from the kept ᾱ's under respacing

        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":  # Eq. 15: x_0 = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t
            k1 = torch.where(alpha_prod_t > 0, alpha_prod_t, ZERO_SNR_ALPHA_CUMPROD).rsqrt()
            k2 = beta_prod_t.sqrt()
        elif prediction_type == "v_prediction":  # x_0 = √ᾱ_t x_t - √(1-ᾱ_t) v
            k1 = alpha_prod_t.sqrt()
            k2 = beta_prod_t.sqrt()
        else:
            k1 = torch.zeros_like(alpha_prod_t)
            k2 = torch.zeros_like(alpha_prod_t)
        # Eq. 7: μ̃_t = coef1 x_0 + coef2 x_t
        coef1 = alpha_prod_prev.sqrt() * current_beta / beta_prod_t
        coef2 = current_alpha.sqrt() * (1.0 - alpha_prod_prev) / beta_prod_t
        # Eq. 7: β̃_t, floored as diffusers does before its log.
        posterior_variance = ((1.0 - alpha_prod_prev) / beta_prod_t * current_beta).clamp(
            min=_POSTERIOR_VARIANCE_FLOOR
        )
        variance_type = self.config.variance_type
        if variance_type in ("fixed_small", "fixed_small_log"):
            std = posterior_variance.sqrt()
        elif variance_type in ("fixed_large", "fixed_large_log"):
            std = current_beta.sqrt()
        else:
            std = torch.zeros_like(current_beta)
        # learned_range: σ = exp(½[frac log β'_t + (1 - frac) log β̃_t]), frac = (v + 1)/2  =>  σ = exp(A v + B)
        min_log, max_log = posterior_variance.log(), current_beta.log()
        lr_a = (max_log - min_log) / 4.0
        lr_b = (max_log + min_log) / 4.0
        mask = (t > 0).to(torch.float64)
        table = torch.stack([k1, k2, coef1, coef2, std * mask, lr_a, lr_b, mask], dim=1)

        index_of = [-1] * num_train
        for i, value in enumerate(kept):
            index_of[value] = i
        # Rows addressed by timestep + 1: row 0 (t < 0), row T + 1 (t >= T) and timesteps outside the chain
        # hold NaN, so one clamp and one gather serve every timestep without a search or a synchronisation.
        by_timestep = torch.full((num_train + 2, _NUM_COLUMNS), float("nan"), dtype=torch.float64)
        by_timestep[t + 1] = table
        self._step_table64 = by_timestep
        self._step_rows: list[tuple[float, ...]] = [tuple(row) for row in table.tolist()]
        self._index_of_timestep = index_of
        self._prev_timesteps = prev.tolist()
        self._step_cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.timesteps = t.to(device) if device is not None else t
        # Fill the cache ahead of time so a compiled step never sees it change (that would recompile).
        self._step_tables(self.timesteps.device, torch.float32)

    def _step_tables(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The per-timestep coefficient table on ``device`` in ``dtype`` (cached)."""
        key = (device, dtype)
        cached = self._step_cache.get(key)
        if cached is None:
            cached = self._step_table64.to(device=device, dtype=dtype)
            self._step_cache[key] = cached
        return cached

    def previous_timestep(self, timestep: int | torch.Tensor) -> int:
        """The timestep after ``timestep`` in the current chain (-1 after the last one)."""
        return self._prev_timesteps[self._host_index(int(timestep))]

    def _host_index(self, timestep: int) -> int:
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

        Recipe (all coefficients precomputed by ``set_timesteps``, looked up by step index):

        1. Split off the variance channels for ``learned``/``learned_range`` (Improved DDPM §3.1).
        2. x̂_0 from the model output: Eq. 15 for ε (x̂_0 = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t), x̂_0 = √ᾱ_t x_t - √(1-ᾱ_t) v
           for v-prediction, the output itself for ``sample``.
        3. Clip x̂_0 to ±clip_sample_range or dynamically threshold it.
        4. Posterior mean μ̃_t(x_t, x̂_0) = coef1 x̂_0 + coef2 x_t (Eq. 7; with ε this is Eq. 11).
        5. Add σ_t z, z ~ N(0, I), for t > 0 (σ_t² = β̃_t, β'_t or the learned Σ_θ; Eq. 6 and §3.2).

        Args:
            model_output: the network output (2×C channels for learned variance types).
            timestep: an int, a 0-d tensor, or a 1-d tensor with one timestep per batch element, each in
                ``self.timesteps``.
            sample: x_t.
            generator: RNG for z, drawn as ``randn_tensor(model_output.shape, generator)`` like diffusers.
            return_dict: return a :class:`DDPMSchedulerOutput` (else a tuple).
            variance_noise: z itself (shape of ``sample``); makes ``step`` compile without graph breaks.
            eta, use_clipped_model_output: accepted so DDIM-style pipelines (which pass them) can run the
                DDPM sampler; they have no effect on ancestral DDPM sampling.

        Returns:
            ``DDPMSchedulerOutput(prev_sample, pred_original_sample)`` or the tuple of the two.

        A Python-int timestep or CPU tensor outside torch.compile is validated (ValueError if not in the
        schedule); a device tensor is not (that would synchronise): an unknown timestep then yields NaN.
        """
        del eta, use_clipped_model_output  # no meaning for ancestral DDPM sampling
        # 1. split the variance channels
        mean_output, variance_output = self._split_model_output(model_output, sample)
        if variance_noise is not None and variance_noise.shape != sample.shape:
            raise ValueError(
                f"variance_noise has shape {tuple(variance_noise.shape)}; it must match sample {tuple(sample.shape)}."
            )
        out_dtype = sample.dtype
        work_dtype = out_dtype if out_dtype in (torch.float32, torch.float64) else torch.float32
        compiling = torch.compiler.is_compiling()
        host_timestep = None
        if not compiling and (
            isinstance(timestep, numbers.Integral)
            or (isinstance(timestep, torch.Tensor) and timestep.ndim == 0 and timestep.device.type == "cpu")
        ):
            host_timestep = int(timestep)

        if host_timestep is not None:
            prev_sample, pred_original_sample = self._step_host(
                mean_output, variance_output, host_timestep, sample, generator, variance_noise, work_dtype
            )
        else:
            prev_sample, pred_original_sample = self._step_tensor(
                mean_output,
                variance_output,
                timestep,
                sample,
                generator,
                variance_noise,
                work_dtype,
                compiling,
            )
        prev_sample = prev_sample.to(out_dtype)
        pred_original_sample = pred_original_sample.to(out_dtype)
        if not return_dict:
            return prev_sample, pred_original_sample
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def _draw_noise(
        self, mean_output: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None
    ) -> torch.Tensor:
        if generator is None:
            return torch.randn(mean_output.shape, device=mean_output.device, dtype=mean_output.dtype)
        return randn_tensor(
            mean_output.shape, generator=generator, device=mean_output.device, dtype=mean_output.dtype
        )

    def _step_host(
        self,
        mean_output: torch.Tensor,
        variance_output: torch.Tensor | None,
        timestep: int,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        variance_noise: torch.Tensor | None,
        work_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eager path for a timestep known on the host: Python-float coefficients, fewest kernels."""
        k1, k2, coef1, coef2, std, lr_a, lr_b, _mask = self._step_rows[self._host_index(timestep)]
        x = sample.to(work_dtype)
        out = mean_output.to(work_dtype)
        # 2. x̂_0
        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            pred_original_sample = torch.sub(x, out, alpha=k2).mul_(k1)
        elif prediction_type == "v_prediction":
            pred_original_sample = torch.mul(x, k1).sub_(out, alpha=k2)
        else:
            pred_original_sample = out
        # 3. clip / threshold
        pred_original_sample = self._clip_original(pred_original_sample)
        # 4. posterior mean
        prev_sample = torch.mul(pred_original_sample, coef1).add_(x, alpha=coef2)
        # 5. noise, only for t > 0
        if timestep > 0:
            noise = self._draw_noise(mean_output, generator) if variance_noise is None else variance_noise
            noise = noise.to(work_dtype)
            variance_type = self.config.variance_type
            if variance_type == "learned":
                prev_sample.addcmul_(variance_output.to(work_dtype).mul(0.5).exp_(), noise)
            elif variance_type == "learned_range":
                prev_sample.addcmul_(variance_output.to(work_dtype).mul(lr_a).add_(lr_b).exp_(), noise)
            else:
                prev_sample.add_(noise, alpha=std)
        return prev_sample, pred_original_sample

    def _step_tensor(
        self,
        mean_output: torch.Tensor,
        variance_output: torch.Tensor | None,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        variance_noise: torch.Tensor | None,
        work_dtype: torch.dtype,
        compiling: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tensor path: coefficients gathered by index, no host-device synchronisation, compile friendly."""
        device = sample.device
        table = self._step_tables(device, work_dtype)
        timestep = torch.as_tensor(timestep, device=device)
        if timestep.ndim > 1 or (timestep.ndim == 1 and timestep.shape[0] not in (1, sample.shape[0])):
            raise ValueError(
                f"timestep has shape {tuple(timestep.shape)}; use an int, a 0-d tensor or a 1-d tensor of length "
                f"{sample.shape[0]} (the batch size)."
            )
        num_train = self.config.num_train_timesteps
        # 1-d index (a gather, never a data-dependent select); t outside [0, T) lands on a NaN row
        rows = table[(timestep.reshape(-1).long() + 1).clamp(0, num_train + 1)]  # (B or 1, columns)
        host_checkable = device.type == "cpu" and not compiling
        any_noise = True
        if host_checkable:  # free on the CPU: validate and skip the draw when every t == 0, as diffusers
            mask_values = rows[:, _MASK].tolist()
            if any(math.isnan(value) for value in mask_values):
                values = timestep.reshape(-1).tolist()
                self._host_index(next(v for v, m in zip(values, mask_values) if math.isnan(m)))
            any_noise = any(mask_values)
        coefficients = rows.reshape(rows.shape[0], _NUM_COLUMNS, *([1] * (sample.ndim - 1))).unbind(1)
        k1, k2, coef1, coef2, std, lr_a, lr_b, mask = coefficients
        x = sample.to(work_dtype)
        out = mean_output.to(work_dtype)
        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            pred_original_sample = torch.addcmul(x, k2, out, value=-1.0) * k1
        elif prediction_type == "v_prediction":
            pred_original_sample = torch.addcmul(x * k1, k2, out, value=-1.0)
        else:
            pred_original_sample = out + 0.0 * k1  # + 0·k1 propagates NaN for a timestep outside the schedule
        pred_original_sample = self._clip_original(pred_original_sample)
        prev_sample = torch.addcmul(x * coef2, coef1, pred_original_sample)

        if variance_noise is None:
            if not any_noise:
                return prev_sample, pred_original_sample  # t == 0 everywhere: no draw, as diffusers
            variance_noise = self._draw_noise(mean_output, generator)
        noise = variance_noise.to(work_dtype)
        variance_type = self.config.variance_type
        if variance_type == "learned":
            scale = torch.exp(0.5 * variance_output.to(work_dtype)) * mask
        elif variance_type == "learned_range":
            scale = torch.exp(variance_output.to(work_dtype) * lr_a + lr_b) * mask
        else:
            scale = std
        return torch.addcmul(prev_sample, scale, noise), pred_original_sample

    # ------------------------------------------------------------------------------------------------
    # Forward process and training-time API (always the full num_train_timesteps schedule)
    # ------------------------------------------------------------------------------------------------
    def _extract(self, name: str, timesteps: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Gather a full-schedule table at ``timesteps`` and shape it to broadcast against ``like``."""
        dtype = like.dtype if like.is_floating_point() else torch.float32
        key = (name, like.device, dtype)
        table = self._device_cache.get(key)
        if table is None:
            table = self._train_tables64[name].to(device=like.device, dtype=dtype)
            self._device_cache[key] = table
        timesteps = torch.as_tensor(timesteps, device=like.device).long()
        if timesteps.device.type == "cpu" and not torch.compiler.is_compiling():
            num_train = self.config.num_train_timesteps
            if timesteps.numel() and not bool(((timesteps >= 0) & (timesteps < num_train)).all()):
                raise ValueError(
                    f"timesteps {timesteps.reshape(-1).tolist()[:16]} must lie in [0, {num_train - 1}] "
                    f"(num_train_timesteps={num_train})."
                )
        values = table[timesteps].reshape(-1)
        return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: int | torch.Tensor
    ) -> torch.Tensor:
        """Sample q(x_t | x_0) (Eq. 4): x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε, one timestep per batch element."""
        sqrt_alpha = self._extract("sqrt_alphas_cumprod", timesteps, original_samples)
        sqrt_one_minus_alpha = self._extract("sqrt_one_minus_alphas_cumprod", timesteps, original_samples)
        return sqrt_alpha * original_samples + sqrt_one_minus_alpha * noise

    def get_velocity(
        self, sample: torch.Tensor, noise: torch.Tensor, timesteps: int | torch.Tensor
    ) -> torch.Tensor:
        """v = √ᾱ_t ε - √(1-ᾱ_t) x_0 (Salimans & Ho 2022, Imagen Video §2.4); ``sample`` is x_0."""
        sqrt_alpha = self._extract("sqrt_alphas_cumprod", timesteps, sample)
        sqrt_one_minus_alpha = self._extract("sqrt_one_minus_alphas_cumprod", timesteps, sample)
        return sqrt_alpha * noise - sqrt_one_minus_alpha * sample

    def get_target(
        self, sample: torch.Tensor, noise: torch.Tensor, timesteps: int | torch.Tensor
    ) -> torch.Tensor:
        """Regression target of L_simple (Eq. 14) for the configured ``prediction_type``: ε, x_0 or v.

        ``sample`` is the clean x_0 and ``noise`` the ε used in :meth:`add_noise`.
        """
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
        _check_choice("source", source, PredictionType)
        _check_choice("to", to, PredictionType)
        if source == to:
            return model_output
        a = self._extract("sqrt_alphas_cumprod", timesteps, sample)
        s = self._extract("sqrt_one_minus_alphas_cumprod", timesteps, sample)
        if source == "epsilon":
            epsilon = model_output
            original = (sample - s * model_output) * self._extract(
                "sqrt_recip_alphas_cumprod", timesteps, sample
            )
        elif source == "sample":
            original = model_output
            epsilon = (sample - a * model_output) / s
        else:
            original = a * sample - s * model_output
            epsilon = s * sample + a * model_output
        if to == "epsilon":
            return epsilon
        if to == "sample":
            return original
        return a * epsilon - s * original

    def snr(self, timesteps: int | torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio SNR(t) = ᾱ_t / (1 - ᾱ_t) (float32, on the timesteps' device)."""
        timesteps = torch.as_tensor(timesteps)
        return self._extract("snr", timesteps, torch.empty(0, device=timesteps.device)).reshape(
            timesteps.shape
        )

    def loss_weights(
        self, timesteps: int | torch.Tensor, weighting: LossWeighting = "uniform", snr_gamma: float = 5.0
    ) -> torch.Tensor:
        """Per-sample weights for the MSE loss against :meth:`get_target`.

        ``"uniform"`` gives ones (L_simple). ``"min_snr"`` is Min-SNR-γ (Hang et al. 2023, arXiv 2303.09556):
        min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v and min(SNR, γ) for x_0, i.e. the x_0-space weight
        min(SNR, γ) expressed for the configured prediction target.
        """
        _check_choice("weighting", weighting, LossWeighting)
        if snr_gamma <= 0:
            raise ValueError(f"snr_gamma={snr_gamma!r} must be positive.")
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
        mean = (
            self._extract("posterior_mean_coef1", timesteps, sample) * original_sample
            + self._extract("posterior_mean_coef2", timesteps, sample) * sample
        )
        variance = self._extract("posterior_variance", timesteps, sample)
        log_variance = self._extract("posterior_log_variance_clipped", timesteps, sample)
        return mean, variance.expand_as(sample), log_variance.expand_as(sample)

    def p_mean_variance(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        timesteps: int | torch.Tensor,
        clip_denoised: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The reverse transition p_θ(x_{t-1} | x_t) = N(μ_θ, Σ_θ) (Eq. 1) from a model output, full schedule.

        μ_θ is the posterior mean at x̂_0 (Eq. 11 for ε); Σ_θ is β̃_t (fixed_small*), β_t (fixed_large*, β̃_1 at
        t = 0 as in the DDPM code) or learned (Improved DDPM Eq. 15 for ``learned_range``).

        Returns a dict with ``mean``, ``variance``, ``log_variance`` and ``pred_original_sample``.
        """
        mean_output, variance_output = self._split_model_output(model_output, sample)
        variance_type = self.config.variance_type
        if variance_type == "learned":
            log_variance = variance_output
        elif variance_type == "learned_range":
            min_log = self._extract("posterior_log_variance_clipped", timesteps, sample)
            max_log = self._extract("log_betas", timesteps, sample)
            frac = (variance_output + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
        elif variance_type in ("fixed_small", "fixed_small_log"):
            log_variance = self._extract("posterior_log_variance_clipped", timesteps, sample).expand_as(
                sample
            )
        else:
            log_variance = self._extract("fixed_large_log_variance", timesteps, sample).expand_as(sample)
        pred_original_sample = self.convert_prediction(mean_output, sample, timesteps, to="sample")
        if clip_denoised:
            limit = self.config.clip_sample_range
            pred_original_sample = pred_original_sample.clamp(-limit, limit)
        mean, _, _ = self.q_posterior_mean_variance(pred_original_sample, sample, timesteps)
        return {
            "mean": mean,
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
        last = torch.full(
            (original_sample.shape[0],), self.config.num_train_timesteps - 1, device=original_sample.device
        )
        mean = self._extract("sqrt_alphas_cumprod", last, original_sample) * original_sample
        variance = self._extract("sqrt_one_minus_alphas_cumprod", last, original_sample) ** 2
        kl = normal_kl(
            mean, torch.log(variance).expand_as(mean), torch.zeros_like(mean), torch.zeros_like(mean)
        )
        return kl.mean(dim=tuple(range(1, original_sample.ndim))) / math.log(2.0)
