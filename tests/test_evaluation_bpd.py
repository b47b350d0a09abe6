"""Bits per dimension: a closed-form case, an independent implementation of improved-diffusion's formulas, and
the stratified K-timestep estimate's unbiasedness."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_unet

from ddpm_components import DDPMScheduler
from ddpm_components.evaluation import bits_per_dim, bits_per_dim_estimate

T = 20


def _digit_like_images(count: int, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """8-bit images in [-1, 1] with both edge levels (0 and 255) present."""
    levels = torch.randint(0, 256, (count, channels, 8, 8), generator=torch.Generator().manual_seed(seed))
    levels[:, :, 0, 0] = 0
    levels[:, :, 0, 1] = 255
    return levels.double() / 127.5 - 1.0


class ExactEpsilonForOneImage:
    """The optimal ε-prediction when the data is one fixed image x*: ε = (x_t - √ᾱ_t x*) / √(1 - ᾱ_t)."""

    def __init__(self, image: torch.Tensor, alphas_cumprod: torch.Tensor):
        self.image = image
        self.alphas_cumprod = alphas_cumprod
        self.config = SimpleNamespace(num_class_embeds=None)
        self.dtype = torch.float64

    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, **kwargs) -> SimpleNamespace:
        alpha = self.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
        return SimpleNamespace(sample=(sample - alpha.sqrt() * self.image) / (1 - alpha).sqrt())


def test_one_fixed_image_with_the_exact_epsilon_gives_the_closed_form_bound():
    """Every KL term is 0 (the model's posterior is the true one); the bound is the prior KL plus the decoder
    NLL of a Gaussian of variance β̃_1 centred on the image, both in closed form (tolerance 1e-9 bits/dim)."""
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    image = _digit_like_images(1)
    scheduler = DDPMScheduler(num_train_timesteps=T, variance_type="fixed_small")
    model = ExactEpsilonForOneImage(image, alphas_cumprod)
    result = bits_per_dim(
        model,
        scheduler,
        image.repeat(3, 1, 1, 1),
        generator=torch.Generator().manual_seed(0),
        clip_denoised=False,
        show_progress=False,
    )

    mean, variance = alphas_cumprod[-1].sqrt() * image, 1 - alphas_cumprod[-1]
    prior = (0.5 * (-1 - variance.log() + variance + mean**2)).mean() / math.log(2)
    posterior_variance_1 = betas[1] * (1 - alphas_cumprod[0]) / (1 - alphas_cumprod[1])
    half_bin = 1 / 255 / posterior_variance_1.sqrt()
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    inner = normal.cdf(half_bin) - normal.cdf(-half_bin)
    edge = normal.cdf(half_bin)  # the bins of levels 0 and 255 reach to -inf and +inf
    at_edge = image.abs() > 0.999
    decoder = -torch.where(at_edge, edge.log(), inner.log()).mean() / math.log(2)

    assert result.num_images == 3
    assert abs(result.vb) < 1e-9
    assert result.prior == pytest.approx(float(prior), abs=1e-9)
    assert result.decoder == pytest.approx(float(decoder), abs=1e-9)
    assert result.total == pytest.approx(float(prior + decoder), abs=1e-9)
    assert result.stderr == pytest.approx(0.0, abs=1e-9)


# ------------------------------------------------------------- improved-diffusion's formulas, written anew
@torch.no_grad()
def _reference_bits_per_dim(model, images, betas, prediction_type, variance_type, generator, clip=True):
    """improved-diffusion's ``calc_bpd_loop`` / ``_vb_terms_bpd`` / ``p_mean_variance`` formulas (GaussianDiffusion,
    float64 numpy there, torch float64 here), with the exact normal CDF in place of its tanh approximation."""
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, 0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    posterior_log_variance_clipped = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
    coef1 = betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)
    coef2 = (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod)

    def normal_kl(mean1, logvar1, mean2, logvar2):
        return 0.5 * (
            -1.0
            + logvar2
            - logvar1
            + torch.exp(logvar1 - logvar2)
            + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
        )

    def discretized_log_likelihood(x, means, log_scales):
        centered = x - means
        inv_stdv = torch.exp(-log_scales)
        cdf_plus = torch.special.ndtr(inv_stdv * (centered + 1.0 / 255.0))
        cdf_min = torch.special.ndtr(inv_stdv * (centered - 1.0 / 255.0))
        log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
        log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
        cdf_delta = cdf_plus - cdf_min
        return torch.where(
            x < -0.999,
            log_cdf_plus,
            torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
        )

    def at(values, t):
        return values[t].reshape(-1, 1, 1, 1)

    totals = []
    prior_mean = at(alphas_cumprod.sqrt(), torch.full((images.shape[0],), T - 1)) * images
    prior_logvar = torch.log(1.0 - alphas_cumprod[-1]).expand_as(images)
    prior = normal_kl(prior_mean, prior_logvar, torch.zeros_like(images), torch.zeros_like(images))
    totals.append(prior.mean(dim=(1, 2, 3)) / math.log(2.0))
    channels = images.shape[1]
    for step in range(T - 1, -1, -1):
        t = torch.full((images.shape[0],), step)
        noise = torch.randn(images.shape, generator=generator).double()  # drawn as ours: float32
        x_t = at(alphas_cumprod.sqrt(), t) * images + at((1 - alphas_cumprod).sqrt(), t) * noise
        out = model(x_t.float(), t).sample.double()
        if variance_type == "learned_range":
            out, var_values = out[:, :channels], out[:, channels:]
            min_log = at(posterior_log_variance_clipped, t)
            max_log = at(torch.log(betas), t)
            frac = (var_values + 1) / 2
            model_log_variance = frac * max_log + (1 - frac) * min_log
        else:  # fixed_large: log of [posterior_variance[1], betas[1:]]
            model_log_variance = at(torch.log(torch.cat([posterior_variance[1:2], betas[1:]])), t).expand_as(
                x_t
            )
        if prediction_type == "epsilon":
            x_start = at((1 / alphas_cumprod).sqrt(), t) * x_t - at((1 / alphas_cumprod - 1).sqrt(), t) * out
        else:  # v
            x_start = at(alphas_cumprod.sqrt(), t) * x_t - at((1 - alphas_cumprod).sqrt(), t) * out
        if clip:
            x_start = x_start.clamp(-1, 1)
        model_mean = at(coef1, t) * x_start + at(coef2, t) * x_t
        true_mean = at(coef1, t) * images + at(coef2, t) * x_t
        true_logvar = at(posterior_log_variance_clipped, t)
        kl = normal_kl(true_mean, true_logvar, model_mean, model_log_variance).mean(dim=(1, 2, 3)) / math.log(
            2.0
        )
        nll = -discretized_log_likelihood(images, model_mean, 0.5 * model_log_variance).mean(dim=(1, 2, 3))
        totals.append(torch.where(t == 0, nll / math.log(2.0), kl))
    return torch.stack(totals).sum(0)


@pytest.mark.parametrize(
    ("prediction_type", "variance_type", "out_channels"),
    [("epsilon", "learned_range", 2), ("v_prediction", "fixed_large", 1)],
)
def test_full_bound_matches_improved_diffusion_formulas(
    torch_single_thread, prediction_type, variance_type, out_channels
):
    """Same model, same noise draws: per-image totals agree to 1e-4 bits/dim (float32 model, float64 maths)."""
    unet = tiny_unet(out_channels=out_channels)
    scheduler = DDPMScheduler(
        num_train_timesteps=T, prediction_type=prediction_type, variance_type=variance_type
    )
    images = _digit_like_images(3).float()
    ours = bits_per_dim(
        unet, scheduler, images, generator=torch.Generator().manual_seed(1), show_progress=False
    )
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    reference = _reference_bits_per_dim(
        unet, images.double(), betas, prediction_type, variance_type, torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(ours.per_image, reference, atol=1e-4, rtol=1e-5)
    assert ours.total == pytest.approx(float(reference.mean()), abs=1e-4)
    assert ours.total == pytest.approx(ours.prior + ours.vb + ours.decoder, rel=1e-12)


def test_stratified_estimate_is_unbiased(torch_single_thread):
    """The mean of many K=4 estimates equals the mean of full-chain bounds within 4 standard errors, for
    a class-conditional model with labels; the estimate's spread is reported through its standard error."""
    unet = tiny_unet(num_class_embeds=3, out_channels=2)
    scheduler = DDPMScheduler(num_train_timesteps=16, variance_type="learned_range")
    images = _digit_like_images(4).float()
    labels = torch.tensor([0, 1, 2, 0])
    generator = torch.Generator().manual_seed(3)
    full = torch.stack(
        [
            bits_per_dim(
                unet, scheduler, images, labels, generator=generator, show_progress=False
            ).per_image.mean()
            for _ in range(6)
        ]
    )
    estimates = torch.stack(
        [
            bits_per_dim_estimate(
                unet, scheduler, images, labels, num_timesteps=4, generator=generator
            ).per_image.mean()
            for _ in range(150)
        ]
    )
    difference = float(estimates.mean() - full.mean())
    stderr = math.sqrt(float(estimates.var()) / len(estimates) + float(full.var()) / len(full))
    assert abs(difference) < 4 * stderr + 1e-6, (difference, stderr)
    # the estimate with K = T strata is the full chain with one draw per timestep: same numbers, same noise order
    one = bits_per_dim_estimate(
        unet, scheduler, images, labels, num_timesteps=16, generator=torch.Generator().manual_seed(5)
    )
    assert one.total > 0 and math.isfinite(one.stderr)


def test_bad_inputs_raise_value_errors():
    unet = tiny_unet()
    scheduler = DDPMScheduler(num_train_timesteps=T)
    with pytest.raises(ValueError, match="8-bit images mapped to"):
        bits_per_dim(unet, scheduler, torch.rand(1, 1, 8, 8), show_progress=False)
    with pytest.raises(ValueError, match=r"num_timesteps must be an integer in \[1, 20\]"):
        bits_per_dim_estimate(unet, scheduler, _digit_like_images(1).float(), num_timesteps=21)
    with pytest.raises(ValueError, match="the U-Net is unconditional"):
        bits_per_dim(unet, scheduler, _digit_like_images(1).float(), torch.tensor([0]), show_progress=False)
