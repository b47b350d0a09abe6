"""Numerical parity of ddpm_components.DDPMScheduler with diffusers' DDPMScheduler (the oracle).

Two oracles are used for every comparison:

* ``d32``: diffusers' scheduler as shipped (float32 schedule and float32 arithmetic);
* ``d64``: the same diffusers code with its schedule replaced by the float64 values of the same formulas and
  float64 inputs, i.e. diffusers' algorithm without float32 round-off. The noise is drawn exactly as diffusers
  draws it (float32 ``randn_tensor`` with the caller's generator) and cast.

Ours computes its tables in float64 and casts once, so it must match ``d64`` to float32 rounding
(|ours - d64| <= 1e-5 + 1e-6 |d64|). Near t = 0 diffusers' own float32 arithmetic loses digits
(β'_t = 1 - ᾱ_t / ᾱ_{t-1} in float32 has relative errors ~3e-4 at t = 1), so against ``d32`` the bound is
|ours - d32| <= 1e-5 + 1.5 |d64 - d32|: equal to 1e-5 wherever diffusers is itself accurate, and never
further from diffusers than diffusers is from its own exact result.
"""

from __future__ import annotations

import itertools
import math

import diffusers.schedulers.scheduling_ddpm as diffusers_ddpm_module
import pytest
import torch
from diffusers import DDPMScheduler as DiffusersDDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from ddpm_components import DDPMScheduler

VARIANCE_TYPES_WITH_PARITY = ["fixed_small", "fixed_small_log", "fixed_large", "learned_range"]
PREDICTION_TYPES = ["epsilon", "sample", "v_prediction"]
BETA_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]
CLIP_MODES = {
    "clip": {"clip_sample": True},
    "clip_range_2": {"clip_sample": True, "clip_sample_range": 2.0},
    "no_clip": {"clip_sample": False},
    "threshold": {"thresholding": True, "sample_max_value": 1.5, "dynamic_thresholding_ratio": 0.9},
}


def reference_betas64(config: dict) -> torch.Tensor:
    """The beta schedules of diffusers' DDPMScheduler, written out independently in float64."""
    n = config.get("num_train_timesteps", 1000)
    start, end = config.get("beta_start", 1e-4), config.get("beta_end", 0.02)
    schedule = config.get("beta_schedule", "linear")
    if schedule == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    elif schedule == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, n, dtype=torch.float64)) * (end - start) + start
    else:

        def f(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float64
        )
    if config.get("rescale_betas_zero_snr", False):
        root = torch.cumprod(1 - betas, 0).sqrt()
        root = (root - root[-1]) * root[0] / (root[0] - root[-1])
        alphas_cumprod = root**2
        betas = 1 - torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return betas


def diffusers_float64(config: dict) -> DiffusersDDPMScheduler:
    """diffusers' scheduler whose schedule tensors are replaced by exact float64 values."""
    scheduler = DiffusersDDPMScheduler(**config)
    betas = reference_betas64(config)
    scheduler.betas = betas
    scheduler.alphas = 1 - betas
    scheduler.alphas_cumprod = torch.cumprod(1 - betas, 0)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


@pytest.fixture
def float32_noise_in_diffusers(monkeypatch):
    """Make diffusers draw its step noise in float32 and cast it, so a float64 run uses the same noise."""

    def draw(shape, generator=None, device=None, dtype=None, layout=None):
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    monkeypatch.setattr(diffusers_ddpm_module, "randn_tensor", draw)


def run_three(config: dict, steps, timesteps_to_check: int | None, seed: int = 0, shape=(2, 3, 4, 4)):
    """Step ours, d32 and d64 from the same x_t with the same model output and generator seed.

    Returns a list of (timestep, ours, d32, d64) for the first and last ``timesteps_to_check`` timesteps.
    """
    ours, d32, d64 = DDPMScheduler(**config), DiffusersDDPMScheduler(**config), diffusers_float64(config)
    for scheduler in (ours, d32, d64):
        if isinstance(steps, list):
            scheduler.set_timesteps(timesteps=steps)
        elif steps is not None:
            scheduler.set_timesteps(steps)
    assert ours.timesteps.tolist() == d32.timesteps.tolist()
    schedule = ours.timesteps.tolist()
    if timesteps_to_check is not None and len(schedule) > 2 * timesteps_to_check:
        schedule = schedule[:timesteps_to_check] + schedule[-timesteps_to_check:]
    learned = config.get("variance_type", "fixed_small").startswith("learned")
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(shape, generator=g)
    out_channels = 2 * shape[1] if learned else shape[1]
    results = []
    for t in schedule:
        model_output = torch.randn((shape[0], out_channels, *shape[2:]), generator=g)
        if learned:  # learned_range reads v in [-1, 1]
            model_output[:, shape[1] :] = model_output[:, shape[1] :].tanh()
        outs = [
            scheduler.step(
                model_output.to(dtype), t, sample.to(dtype), generator=torch.Generator().manual_seed(seed + t)
            ).prev_sample
            for scheduler, dtype in ((ours, torch.float32), (d32, torch.float32), (d64, torch.float64))
        ]
        results.append((t, *outs))
    return results


def assert_parity(results, label: str) -> None:
    for t, ours, d32, d64 in results:
        ours, d32 = ours.double(), d32.double()
        bound64 = 1e-5 + 1e-6 * d64.abs()
        assert torch.all((ours - d64).abs() <= bound64), (
            f"{label} t={t}: |ours - diffusers(float64)| = {(ours - d64).abs().max().item():.3g}"
        )
        bound32 = 1e-5 + 1e-6 * d64.abs() + 1.5 * (d64 - d32).abs()
        assert torch.all((ours - d32).abs() <= bound32), (
            f"{label} t={t}: |ours - diffusers| = {(ours - d32).abs().max().item():.3g}"
        )


@pytest.mark.parametrize("variance_type", VARIANCE_TYPES_WITH_PARITY)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_step_parity_over_options(float32_noise_in_diffusers, variance_type, prediction_type):
    """Every combination of schedule x clipping x zero-SNR x (full / respaced) for one variance and prediction type."""
    for schedule, clip_options, zero_snr, steps in itertools.product(
        BETA_SCHEDULES, CLIP_MODES.values(), [False, True], [None, 7]
    ):
        if zero_snr and prediction_type == "epsilon":
            continue  # diffusers divides by ᾱ_T = 0 there (NaN); tested against our own math below
        config = {
            "variance_type": variance_type,
            "prediction_type": prediction_type,
            "beta_schedule": schedule,
            "rescale_betas_zero_snr": zero_snr,
            **clip_options,
        }
        results = run_three(config, steps, timesteps_to_check=2)
        assert_parity(results, f"{config} steps={steps}")


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_step_parity_over_respacings(float32_noise_in_diffusers, spacing):
    """Inference step counts that do and do not divide num_train_timesteps, steps_offset, and trailing
    spacing whose last timestep is > 0 (diffusers then adds noise at the last step; so do we)."""
    for steps, offset, variance_type in itertools.product(
        [1, 3, 7, 10, 64, 333, 999, 1000], [0, 1], ["fixed_small", "fixed_large", "learned_range"]
    ):
        if spacing == "leading" and offset == 1 and steps > 500:
            continue  # timesteps would reach num_train_timesteps (diffusers: IndexError, ours: ValueError)
        config = {"timestep_spacing": spacing, "steps_offset": offset, "variance_type": variance_type}
        results = run_three(config, steps, timesteps_to_check=2)
        assert_parity(results, f"{config} steps={steps}")


def test_timesteps_equal_diffusers_for_every_step_count():
    for spacing, offset in itertools.product(["leading", "linspace", "trailing"], [0, 1]):
        ours = DDPMScheduler(num_train_timesteps=100, timestep_spacing=spacing, steps_offset=offset)
        theirs = DiffusersDDPMScheduler(
            num_train_timesteps=100, timestep_spacing=spacing, steps_offset=offset
        )
        for steps in range(1, 101):
            if spacing == "leading" and offset and steps > 50:
                continue
            ours.set_timesteps(steps)
            theirs.set_timesteps(steps)
            expected = theirs.timesteps.tolist()
            if spacing == "trailing" and len(expected) == steps + 1:
                # diffusers' float arange adds a spurious -1 for some counts (e.g. 29 of 100); ours keeps n
                assert expected[-1] == -1
                expected = expected[:-1]
            assert ours.timesteps.tolist() == expected, (spacing, offset, steps)
            assert ours.timesteps.dtype == theirs.timesteps.dtype == torch.int64


def test_custom_timesteps_parity(float32_noise_in_diffusers):
    for steps in ([999, 800, 500, 499, 10, 0], [900, 450, 3], [5]):
        results = run_three({"variance_type": "fixed_large"}, list(steps), timesteps_to_check=None)
        assert [t for t, *_ in results] == list(steps)
        assert_parity(results, f"custom {steps}")


def test_full_loop_same_images_and_same_generator_consumption():
    """A 50-step loop with the same seed gives the same sample as diffusers and leaves the generator in the
    same state (one draw per step with t > 0, none at t == 0)."""
    shape = (2, 3, 8, 8)
    finals, states = [], []
    for scheduler in (DDPMScheduler(), DiffusersDDPMScheduler()):
        scheduler.set_timesteps(50)
        g = torch.Generator().manual_seed(0)
        x = randn_tensor(shape, generator=g)
        for t in scheduler.timesteps:
            model_output = 0.5 * x + 0.1 * torch.sin(x * (t + 1) / 100)  # a smooth stand-in for a network
            x = scheduler.step(model_output, t, x, generator=g).prev_sample
        finals.append(x)
        states.append(g.get_state())
    assert torch.equal(states[0], states[1])
    torch.testing.assert_close(finals[0], finals[1], atol=1e-4, rtol=0)


def test_diffusers_reference_full_loop_sum():
    """diffusers' own regression values for its DDPMScheduler (1000-step ε loop, linear 1e-4..0.02,
    ``torch.manual_seed(0)``, deterministic ramp sample, model ``x * t / (t + 1)``): sum |x| 258.9606,
    mean |x| 0.3372, tolerances 1e-2 and 1e-3 as in diffusers' test."""
    scheduler = DDPMScheduler()
    num_elements = 4 * 3 * 8 * 8
    sample = (torch.arange(num_elements).reshape(3, 8, 8, 4) / num_elements).permute(3, 0, 1, 2)
    generator = torch.manual_seed(0)
    for t in reversed(range(1000)):
        sample = scheduler.step(sample * t / (t + 1), t, sample, generator=generator).prev_sample
    assert abs(sample.abs().sum().item() - 258.9606) < 1e-2
    assert abs(sample.abs().mean().item() - 0.3372) < 1e-3


def reference_prev_sample(alphas_cumprod64, t, prev_t, model_output, sample, noise, log_variance, clip=True):
    """DDPM step written out in float64 from the equations (ε-prediction, optional clip to ±1)."""
    a_t = alphas_cumprod64[t]
    a_prev = alphas_cumprod64[prev_t] if prev_t >= 0 else torch.tensor(1.0, dtype=torch.float64)
    x0 = (sample - (1 - a_t).sqrt() * model_output) / a_t.clamp(min=2.0**-24).sqrt()
    x0 = x0.clamp(-1, 1) if clip else x0
    beta = 1 - a_t / a_prev
    mean = a_prev.sqrt() * beta / (1 - a_t) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t) * sample
    return mean + (0.5 * log_variance).exp() * noise * (t > 0)


@pytest.mark.parametrize("steps", [None, 10])
def test_learned_and_fixed_large_log_are_finite_and_correct(steps):
    """diffusers gives NaN for these two; ours follows the DDPM / Improved-DDPM code (log-variance)."""
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    for variance_type in ("learned", "fixed_large_log"):
        scheduler = DDPMScheduler(variance_type=variance_type)
        if steps:
            scheduler.set_timesteps(steps)
        alphas_cumprod = torch.cumprod(1 - reference_betas64({}), 0)
        schedule = scheduler.timesteps.tolist()
        for i, t in enumerate(schedule):
            prev_t = schedule[i + 1] if i + 1 < len(schedule) else -1
            out = torch.randn(
                2, 6 if variance_type == "learned" else 3, 4, 4, generator=g, dtype=torch.float64
            )
            noise = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
            if variance_type == "learned":
                log_variance = out[:, 3:]
            else:
                a_prev = alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0, dtype=torch.float64)
                log_variance = torch.log(1 - alphas_cumprod[t] / a_prev).expand_as(sample)
            expected = reference_prev_sample(
                alphas_cumprod, t, prev_t, out[:, :3], sample, noise, log_variance
            )
            got = scheduler.step(out.float(), t, sample.float(), variance_noise=noise.float()).prev_sample
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
        theirs = DiffusersDDPMScheduler(variance_type=variance_type)
        nan_out = theirs.step(
            torch.randn(1, 6 if variance_type == "learned" else 3, 2, 2), 500, torch.randn(1, 3, 2, 2)
        )
        assert torch.isnan(nan_out.prev_sample).any(), (
            "diffusers fixed this; revisit the documented difference"
        )


def test_zero_terminal_snr_epsilon_is_finite_at_t_max():
    """With ᾱ_T = 0 diffusers divides by zero (±inf, or NaN where x_t == ε) unless clipping hides it; ours
    converts ε to x_0 with ᾱ_T = 2^-24 and is finite either way."""
    g = torch.Generator().manual_seed(0)
    sample, out, noise = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    alphas_cumprod = torch.cumprod(1 - reference_betas64({"rescale_betas_zero_snr": True}), 0)
    a_t, a_prev = alphas_cumprod[999], alphas_cumprod[998]
    log_variance = torch.log((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).expand_as(sample)
    for clip_sample in (False, True):
        scheduler = DDPMScheduler(rescale_betas_zero_snr=True, clip_sample=clip_sample)
        assert scheduler.alphas_cumprod[-1].item() == 0.0
        got = scheduler.step(out.float(), 999, sample.float(), variance_noise=noise.float()).prev_sample
        assert torch.isfinite(got).all()
        expected = reference_prev_sample(
            alphas_cumprod, 999, 998, out, sample, noise, log_variance, clip_sample
        )
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    theirs = DiffusersDDPMScheduler(rescale_betas_zero_snr=True, clip_sample=False)
    assert not torch.isfinite(theirs.step(out.float(), 999, sample.float()).prev_sample).all()


def test_forward_process_and_velocity_parity():
    for config in ({}, {"beta_schedule": "squaredcos_cap_v2"}, {"rescale_betas_zero_snr": True}):
        ours, theirs = DDPMScheduler(**config), DiffusersDDPMScheduler(**config)
        torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, atol=2e-6, rtol=2e-5)
        g = torch.Generator().manual_seed(0)
        x0, noise = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
        timesteps = torch.tensor([0, 1, 10, 500, 998, 999])
        torch.testing.assert_close(
            ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            ours.get_velocity(x0, noise, timesteps),
            theirs.get_velocity(x0, noise, timesteps),
            atol=1e-5,
            rtol=0,
        )


def test_generator_list_draws_like_diffusers():
    """A list of generators (one per batch element, as DDPMPipeline accepts) draws the same noise."""
    sample = torch.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    outputs = []
    for scheduler in (DDPMScheduler(), DiffusersDDPMScheduler()):
        generators = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
        outputs.append(scheduler.step(0.3 * sample, 500, sample, generator=generators).prev_sample)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=0)
