"""DDPMScheduler input validation (issue 9, item 10): every bad input is a ValueError naming the value, and every
input diffusers' pipelines pass (whole-number float timesteps, tensors) keeps working.

Each test of a rejection failed before the fix (the input was truncated, broadcast or accepted silently); the
"keeps working" tests guard what the checks must not break. The accelerator path (no host synchronisation, no
validation) is exercised on the CPU by making ``torch.compiler.is_compiling`` report True.
"""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch

from ddpm_components import DDPMScheduler
from ddpm_components.scheduling_ddpm import BetaSchedule, _check_choice


@pytest.fixture(autouse=True)
def seeded_global_generator():
    torch.manual_seed(0)


@pytest.fixture
def device_path(monkeypatch):
    """Take the path an accelerator tensor takes (nothing read back on the host) while on the CPU."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)


def step_output(scheduler, timestep, sample, noise):
    return scheduler.step(0.5 * sample, timestep, sample, variance_noise=noise).prev_sample


# ---------------------------------------------------------------------------------------------------------
# Timesteps: whole numbers only, never truncated
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "timestep", [40.5, torch.tensor(40.5), torch.tensor([40.5, 40.5]), float("nan"), True]
)
def test_fractional_timestep_in_step_is_rejected(timestep):
    sample = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"timestep=(40\.5|nan|True) is not a whole number"):
        DDPMScheduler().step(sample, timestep, sample)


def test_whole_float_timesteps_work_like_integers():
    """Some pipelines pass float timesteps; 40.0 (or a float tensor of whole numbers) is timestep 40."""
    scheduler = DDPMScheduler(variance_type="fixed_large")
    sample, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    expected = step_output(scheduler, 40, sample, noise)
    for timestep in (
        40.0,
        torch.tensor(40.0),
        torch.tensor([40.0, 40.0]),
        torch.tensor(40, dtype=torch.int32),
    ):
        torch.testing.assert_close(step_output(scheduler, timestep, sample, noise), expected, rtol=0, atol=0)
    scheduler.set_timesteps(timesteps=[10.0, 3.0, 0.0])
    assert scheduler.timesteps.tolist() == [10, 3, 0] and scheduler.timesteps.dtype == torch.int64
    scheduler.set_timesteps(timesteps=torch.tensor([10.0, 3.0]))
    assert scheduler.timesteps.tolist() == [10, 3]
    x0 = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(
        scheduler.add_noise(x0, noise, torch.tensor([10.0, 3.0])),
        scheduler.add_noise(x0, noise, torch.tensor([10, 3])),
        rtol=0,
        atol=0,
    )


def test_fractional_custom_timesteps_are_rejected():
    scheduler = DDPMScheduler()
    with pytest.raises(ValueError, match=r"timesteps\[0\]=10\.7 is not a whole number"):
        scheduler.set_timesteps(timesteps=[10.7])
    with pytest.raises(ValueError, match=r"timesteps\[1\]=2\.5 is not a whole number"):
        scheduler.set_timesteps(timesteps=torch.tensor([10.0, 2.5]))
    with pytest.raises(ValueError, match=r"timestep=40\.5 is not a whole number"):
        scheduler.previous_timestep(40.5)


def test_fractional_timesteps_in_the_training_api_are_rejected():
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    fractional = torch.tensor([10.5, 3.0])
    for call in (
        lambda: scheduler.add_noise(x0, noise, fractional),
        lambda: scheduler.get_velocity(x0, noise, fractional),
        lambda: scheduler.snr(fractional),
        lambda: scheduler.q_posterior_mean_variance(x0, noise, fractional),
    ):
        with pytest.raises(ValueError, match=r"timesteps \[10\.5\] are not whole numbers"):
            call()


def test_fractional_timesteps_give_nan_on_the_device_path(device_path):
    """On an accelerator nothing is read back, so a fractional timestep cannot raise; it must not be truncated
    either: it gives NaN, like any timestep outside the schedule. Whole floats still work."""
    scheduler = DDPMScheduler()
    sample, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.isnan(step_output(scheduler, torch.tensor([40.5, 40.0]), sample, noise)[0]).all()
    assert torch.isfinite(step_output(scheduler, torch.tensor([40.5, 40.0]), sample, noise)[1]).all()
    assert torch.isfinite(step_output(scheduler, torch.tensor(40.0), sample, noise)).all()
    noised = scheduler.add_noise(sample, noise, torch.tensor([10.5, 10.0]))
    assert torch.isnan(noised[0]).all() and torch.isfinite(noised[1]).all()
    assert torch.isnan(scheduler.add_noise(sample, noise, torch.tensor([-1.0, 1000.0]))).all()


# ---------------------------------------------------------------------------------------------------------
# Configuration numbers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "sigmoid"])
def test_beta_start_above_beta_end_is_rejected(beta_schedule):
    with pytest.raises(ValueError, match=r"beta_start=0\.02 is greater than beta_end=0\.0001"):
        DDPMScheduler(beta_start=0.02, beta_end=0.0001, beta_schedule=beta_schedule)
    DDPMScheduler(beta_start=0.01, beta_end=0.01, beta_schedule=beta_schedule)  # constant: allowed


def test_beta_start_above_beta_end_is_allowed_where_unused():
    DDPMScheduler(beta_start=0.02, beta_end=0.0001, beta_schedule="squaredcos_cap_v2")
    DDPMScheduler(num_train_timesteps=3, beta_start=0.02, beta_end=0.0001, trained_betas=[0.1, 0.2, 0.3])


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("beta_start", math.nan, "must be a finite number"),
        ("beta_start", math.inf, "must be a finite number"),
        ("beta_end", math.nan, "must be a finite number"),
        ("beta_end", -math.inf, "must be a finite number"),
        ("clip_sample_range", math.nan, "must be a finite number"),
        ("clip_sample_range", math.inf, "must be a finite number"),
        ("clip_sample_range", 0.0, "must be positive"),
        ("sample_max_value", 0.0, "must be positive"),
        ("sample_max_value", -1.0, "must be positive"),
        ("sample_max_value", math.nan, "must be a finite number"),
        ("dynamic_thresholding_ratio", math.nan, "must be a finite number"),
        ("steps_offset", 0.5, "must be an integer"),
        ("num_train_timesteps", True, "must be a positive integer"),
    ],
)
def test_config_numbers_must_be_finite_and_in_range(key, value, message):
    """Also for keys the chosen schedule ignores (squaredcos_cap_v2 ignores beta_start / beta_end): a saved
    config with NaN is not even valid JSON."""
    with pytest.raises(ValueError, match=rf"{key}={value!r} {message}"):
        DDPMScheduler(**{key: value, "beta_schedule": "squaredcos_cap_v2"})


def test_thresholding_with_zero_sample_max_value_is_rejected_not_nan():
    with pytest.raises(ValueError, match=r"sample_max_value=0 must be positive"):
        DDPMScheduler(thresholding=True, sample_max_value=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_trained_betas_are_named(bad):
    with pytest.raises(ValueError, match=rf"trained_betas\[1\]={bad!r} is not finite"):
        DDPMScheduler(num_train_timesteps=3, trained_betas=[0.1, bad, 0.3])


@pytest.mark.parametrize("snr_gamma", [math.nan, math.inf, 0.0])
def test_snr_gamma_must_be_finite_and_positive(snr_gamma):
    with pytest.raises(ValueError, match=rf"snr_gamma={snr_gamma!r} must be"):
        DDPMScheduler().loss_weights(torch.tensor([1, 500]), weighting="min_snr", snr_gamma=snr_gamma)


# ---------------------------------------------------------------------------------------------------------
# Tensors: dtypes and shapes
# ---------------------------------------------------------------------------------------------------------


def test_integer_sample_or_model_output_is_rejected():
    scheduler = DDPMScheduler()
    integers = torch.randint(0, 255, (1, 3, 4, 4))
    floats = torch.randn(1, 3, 4, 4)
    with pytest.raises(
        ValueError, match=r"sample has dtype torch\.int64; it must be a floating-point tensor"
    ):
        scheduler.step(floats, 10, integers)
    with pytest.raises(ValueError, match=r"model_output has dtype torch\.int64"):
        scheduler.step(integers, 10, floats)
    with pytest.raises(ValueError, match=r"variance_noise has dtype torch\.int64"):
        scheduler.step(floats, 10, floats, variance_noise=integers)
    with pytest.raises(ValueError, match=r"original_samples has dtype torch\.int64"):
        scheduler.add_noise(integers, floats, torch.tensor([10]))


def test_noise_of_another_shape_is_rejected_not_broadcast():
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    sample, noise = torch.randn(2, 1, 4, 4), torch.randn(2, 3, 4, 4)
    timesteps = torch.tensor([10, 20])
    pattern = r"noise has shape \(2, 3, 4, 4\) but (original_samples|sample) has shape \(2, 1, 4, 4\)"
    for method in (scheduler.add_noise, scheduler.get_velocity, scheduler.get_target):
        with pytest.raises(ValueError, match=pattern):
            method(sample, noise, timesteps)
    with pytest.raises(ValueError, match=r"original_sample has shape \(2, 3, 4, 4\) but sample has shape"):
        scheduler.q_posterior_mean_variance(noise, sample, timesteps)


def test_timesteps_must_match_the_batch_in_the_training_api():
    """One timestep per sample (or one for all); three timesteps for one sample used to broadcast to three."""
    scheduler = DDPMScheduler()
    x0 = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="got 3 timesteps for a batch of 1"):
        scheduler.add_noise(x0, torch.randn_like(x0), torch.tensor([1, 2, 3]))
    assert scheduler.add_noise(x0.expand(2, -1, -1, -1), x0.expand(2, -1, -1, -1), 5).shape == (2, 3, 4, 4)


@pytest.mark.parametrize("count", [1, 3])
def test_generator_list_must_match_the_batch(count):
    sample = torch.randn(2, 3, 4, 4)
    generators = [torch.Generator().manual_seed(i) for i in range(count)]
    with pytest.raises(ValueError, match=rf"list of {count} generators but the batch has 2 samples"):
        DDPMScheduler().step(sample, 10, sample, generator=generators)


def test_generator_and_variance_noise_together_are_rejected():
    sample = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="either generator or variance_noise"):
        DDPMScheduler().step(
            sample,
            10,
            sample,
            generator=torch.Generator().manual_seed(0),
            variance_noise=torch.randn(2, 3, 4, 4),
        )


# ---------------------------------------------------------------------------------------------------------
# previous_timestep and the option-check message
# ---------------------------------------------------------------------------------------------------------


def test_previous_timestep_returns_a_tensor_for_a_tensor():
    """diffusers returns a tensor for a tensor timestep, and its own test suite calls .item() on it."""
    scheduler = DDPMScheduler()
    scheduler.set_timesteps(timesteps=[100, 87, 50, 1, 0])
    assert scheduler.previous_timestep(87) == 50 and type(scheduler.previous_timestep(87)) is int
    assert scheduler.previous_timestep(87.0) == 50
    for timestep in scheduler.timesteps:
        following = scheduler.previous_timestep(timestep)
        assert isinstance(following, torch.Tensor) and following.ndim == 0
        assert following.dtype == timestep.dtype and following.device == timestep.device
    assert scheduler.previous_timestep(torch.tensor(0)).item() == -1
    batch = scheduler.previous_timestep(torch.tensor([100, 1]))
    assert batch.tolist() == [87, 0]
    with pytest.raises(ValueError, match="timestep=2 is not in the scheduler's timesteps"):
        scheduler.previous_timestep(torch.tensor([100, 2]))


def test_check_choice_message_names_option_value_and_every_choice():
    """The canonical message that the other component files copy (with a `# Copied from` marker)."""
    with pytest.raises(ValueError) as error:
        _check_choice("beta_schedule", "foo", get_args(BetaSchedule))
    assert str(error.value) == (
        "beta_schedule='foo' is not supported; choose one of 'linear', 'scaled_linear', 'squaredcos_cap_v2', "
        "'sigmoid'."
    )
    with pytest.raises(ValueError, match=r"^padding=2 is not supported; choose one of 0, 1\.$"):
        _check_choice("padding", 2, (0, 1))
    _check_choice("padding", 1, (0, 1))
    # self-contained (copied verbatim into other modules): it reads no module-level name
    assert set(_check_choice.__code__.co_names) <= {"ValueError", "join", "map", "repr"}


def test_a_beta_of_one_is_rejected_unless_zero_terminal_snr_is_asked_for():
    """β = 1 makes ᾱ_T = 0 and the ε → x_0 step divide by zero (NaN samples); rescale_betas_zero_snr sets it on
    purpose and handles it."""
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\)"):
        DDPMScheduler(num_train_timesteps=10, beta_end=1.0)
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\)"):
        DDPMScheduler(num_train_timesteps=3, trained_betas=[0.1, 0.5, 1.0])
    scheduler = DDPMScheduler(num_train_timesteps=10, rescale_betas_zero_snr=True)
    assert float(scheduler.alphas_cumprod[-1]) == 0.0
