"""DDPMScheduler interface: config compatibility, validation, respacing, batched timesteps, compilation,
low-precision samples and the training-time API (targets, SNR, loss weights, posterior, VLB terms)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from diffusers import DDPMScheduler as DiffusersDDPMScheduler
from diffusers.training_utils import compute_snr

from ddpm_components import DDPMScheduler
from ddpm_components.scheduling_ddpm import (
    ScheduleColumns,
    StepColumns,
    discretized_gaussian_log_likelihood,
    normal_kl,
)


@pytest.fixture(autouse=True)
def seeded_global_generator():
    """Tests here draw plain torch.randn inputs; seed the global generator so every run sees the same data."""
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------------------
# Config compatibility
# ---------------------------------------------------------------------------------------------------------


# Our config keys that diffusers' DDPMScheduler lacks (issue 11: DDIM's η and Analytic-DPM's moments); their
# defaults keep the DDPM step, and diffusers keeps them hidden through from_config.
OUR_EXTRA_KEYS = {"eta": 1.0, "analytic_moments": None, "multistep_order": 1}


def public_config(scheduler) -> dict:
    return {k: v for k, v in scheduler.config.items() if not k.startswith("_") and k not in OUR_EXTRA_KEYS}


def test_config_keys_and_defaults_equal_diffusers():
    assert public_config(DDPMScheduler()) == public_config(DiffusersDDPMScheduler())
    assert {key: DDPMScheduler().config[key] for key in OUR_EXTRA_KEYS} == OUR_EXTRA_KEYS
    assert DDPMScheduler.order == 1
    scheduler = DDPMScheduler()
    assert scheduler.init_noise_sigma == 1.0
    assert len(scheduler) == 1000
    assert scheduler.timesteps.tolist() == list(range(999, -1, -1))
    sample = torch.randn(1, 3, 2, 2)
    assert scheduler.scale_model_input(sample, 10) is sample
    compatible_names = {cls.__name__ for cls in scheduler.compatibles}
    assert {"DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"} <= compatible_names


def test_from_config_both_ways_and_save_load(tmp_path):
    config = {
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "v_prediction",
        "variance_type": "learned_range",
    }
    theirs = DiffusersDDPMScheduler(**config)
    ours = DDPMScheduler.from_config(theirs.config)
    assert public_config(ours) == public_config(theirs)
    back = DiffusersDDPMScheduler.from_config(ours.config)
    assert public_config(back) == public_config(theirs)
    # keys another scheduler lacks survive a round trip through it (diffusers keeps them hidden)
    ddim = DDIMScheduler.from_config(ours.config)
    assert DDPMScheduler.from_config(ddim.config).config.variance_type == "learned_range"
    euler = EulerDiscreteScheduler.from_config(ours.config)
    assert euler.config.prediction_type == "v_prediction"

    ours.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler_config.json").is_file()
    loaded = DDPMScheduler.from_pretrained(tmp_path)
    assert public_config(loaded) == public_config(ours)
    assert public_config(DiffusersDDPMScheduler.from_pretrained(tmp_path)) == public_config(ours)
    torch.testing.assert_close(loaded.alphas_cumprod, ours.alphas_cumprod, atol=0, rtol=0)


def test_trained_betas_round_trip(tmp_path):
    betas = torch.linspace(1e-4, 0.03, 50).tolist()
    scheduler = DDPMScheduler(num_train_timesteps=50, trained_betas=betas)
    theirs = DiffusersDDPMScheduler(num_train_timesteps=50, trained_betas=betas)
    torch.testing.assert_close(scheduler.alphas_cumprod, theirs.alphas_cumprod, atol=1e-6, rtol=1e-5)
    scheduler.save_pretrained(tmp_path)
    loaded = DDPMScheduler.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.betas, scheduler.betas, atol=0, rtol=0)


def test_tensor_trained_betas_save_and_atomic_config_writes(tmp_path, monkeypatch):
    """A tensor ``trained_betas`` is kept as a list in the config (JSON cannot hold a tensor), and
    ``scheduler_config.json`` is replaced atomically: a failed save leaves the previous file intact."""
    scheduler = DDPMScheduler(num_train_timesteps=50, trained_betas=torch.linspace(1e-4, 0.03, 50))
    scheduler.save_pretrained(tmp_path)
    loaded = DDPMScheduler.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.betas, scheduler.betas, atol=0, rtol=0)
    theirs = DiffusersDDPMScheduler.from_pretrained(tmp_path)
    torch.testing.assert_close(theirs.betas, scheduler.betas, atol=0, rtol=0)
    as_numpy_floats = list(scheduler.betas.numpy())  # numpy float32 scalars: not JSON serialisable either
    DDPMScheduler(num_train_timesteps=50, trained_betas=as_numpy_floats).save_pretrained(tmp_path)
    torch.testing.assert_close(DDPMScheduler.from_pretrained(tmp_path).betas, scheduler.betas, atol=0, rtol=0)
    before = (tmp_path / "scheduler_config.json").read_bytes()

    def fail(self):
        raise RuntimeError("serialisation failed")

    monkeypatch.setattr(DDPMScheduler, "to_json_string", fail)
    with pytest.raises(RuntimeError, match="serialisation failed"):
        DDPMScheduler(num_train_timesteps=20).save_pretrained(tmp_path)
    assert (tmp_path / "scheduler_config.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["scheduler_config.json"]


# ---------------------------------------------------------------------------------------------------------
# Bad input: a ValueError naming the value and what is allowed
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "choice"),
    [
        ("beta_schedule", "cosine", "squaredcos_cap_v2"),
        ("variance_type", "small", "fixed_small"),
        ("prediction_type", "eps", "v_prediction"),
        ("timestep_spacing", "uniform", "trailing"),
    ],
)
def test_unknown_option_strings(key, value, choice):
    with pytest.raises(ValueError, match=rf"{key}='{value}'.*'{choice}'"):
        DDPMScheduler(**{key: value})


def test_bad_construction_values():
    with pytest.raises(ValueError, match="num_train_timesteps=0"):
        DDPMScheduler(num_train_timesteps=0)
    with pytest.raises(ValueError, match="trained_betas has 3 values"):
        DDPMScheduler(num_train_timesteps=10, trained_betas=[0.1, 0.2, 0.3])
    with pytest.raises(
        ValueError, match=r"betas must lie in \(0, 1\).*beta_end=1\.5 gives betas in \[0\.1, 1\.5\]"
    ):
        DDPMScheduler(beta_start=0.1, beta_end=1.5)
    with pytest.raises(ValueError, match=r"dynamic_thresholding_ratio=1\.5"):
        DDPMScheduler(dynamic_thresholding_ratio=1.5)


@pytest.mark.parametrize("steps", [0, -3, 1001, True, 2.5])
def test_bad_num_inference_steps(steps):
    with pytest.raises(ValueError, match=rf"num_inference_steps={steps!r} must be an integer in \[1, 1000\]"):
        DDPMScheduler().set_timesteps(steps)


def test_bad_custom_timesteps_and_schedules():
    scheduler = DDPMScheduler()
    with pytest.raises(ValueError, match="strictly descending, but 600 follows 500"):
        scheduler.set_timesteps(timesteps=[900, 500, 600])
    with pytest.raises(ValueError, match="strictly descending, but 500 follows 500"):
        scheduler.set_timesteps(timesteps=[900, 500, 500])
    with pytest.raises(ValueError, match=r"must lie in \[0, 999\]"):
        scheduler.set_timesteps(timesteps=[1000, 10])
    with pytest.raises(ValueError, match=r"must lie in \[0, 999\]"):
        scheduler.set_timesteps(timesteps=[10, -1])
    with pytest.raises(ValueError, match="not both"):
        scheduler.set_timesteps(10, timesteps=[5, 0])
    with pytest.raises(ValueError, match="is empty"):
        scheduler.set_timesteps(timesteps=[])
    with pytest.raises(ValueError, match="steps_offset=1 and num_inference_steps=1000"):
        DDPMScheduler(steps_offset=1).set_timesteps(1000)  # diffusers: IndexError later in step
    with pytest.raises(ValueError, match="'ddim<N>'"):
        scheduler.set_timesteps("ddimx")
    with pytest.raises(ValueError, match="no integer stride gives exactly 999"):
        scheduler.set_timesteps("ddim999")
    with pytest.raises(ValueError, match="not a section-count string"):
        scheduler.set_timesteps("10,x")
    with pytest.raises(ValueError, match="section 1 has 333 timesteps, fewer than the 400"):
        scheduler.set_timesteps("10,400,5")


def test_timestep_not_in_schedule():
    scheduler = DDPMScheduler()
    scheduler.set_timesteps(10)
    sample = torch.randn(2, 3, 2, 2)
    for bad in (5, 1000, -1, torch.tensor(5), torch.tensor([900, 5])):
        with pytest.raises(
            ValueError, match=r"timestep=(5|1000|-1) is not in the scheduler's timesteps \[900, 800"
        ):
            scheduler.step(sample, bad, sample)
    with pytest.raises(ValueError, match="timestep=5 is not in"):
        scheduler.previous_timestep(5)
    with pytest.raises(ValueError, match=r"timestep has shape \(3,\)"):
        scheduler.step(sample, torch.tensor([900, 800, 700]), sample)


def test_model_output_shape_must_fit_variance_type():
    sample = torch.randn(2, 3, 4, 4)
    with pytest.raises(
        ValueError, match=r"shape \(2, 3, 4, 4\) but variance_type='learned_range'.*needs \(2, 6, 4, 4\)"
    ):
        DDPMScheduler(variance_type="learned_range").step(sample, 10, sample)
    with pytest.raises(
        ValueError, match=r"shape \(2, 6, 4, 4\) but variance_type='fixed_small'.*needs \(2, 3, 4, 4\)"
    ):
        DDPMScheduler().step(torch.randn(2, 6, 4, 4), 10, sample)
    with pytest.raises(ValueError, match=r"variance_noise has shape \(1, 3, 4, 4\)"):
        DDPMScheduler().step(sample, 10, sample, variance_noise=torch.randn(1, 3, 4, 4))


def test_training_api_bad_input():
    scheduler = DDPMScheduler()
    with pytest.raises(ValueError, match=r"weighting='snr'.*'min_snr'"):
        scheduler.loss_weights(torch.tensor([1]), weighting="snr")
    with pytest.raises(ValueError, match="snr_gamma=0"):
        scheduler.loss_weights(torch.tensor([1]), weighting="min_snr", snr_gamma=0)
    with pytest.raises(ValueError, match=r"to='x0'.*'sample'"):
        scheduler.convert_prediction(torch.zeros(1, 1), torch.zeros(1, 1), 3, to="x0")
    with pytest.raises(ValueError, match=r"timesteps \[1000\] must lie in \[0, 999\]"):
        scheduler.add_noise(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([1000]))


# ---------------------------------------------------------------------------------------------------------
# Respacing
# ---------------------------------------------------------------------------------------------------------


def test_section_count_respacing():
    scheduler = DDPMScheduler()
    scheduler.set_timesteps("10,15,20")
    kept = scheduler.timesteps.tolist()
    assert len(kept) == 45 == scheduler.num_inference_steps
    assert kept == sorted(kept, reverse=True)
    # 1000 = 334 + 333 + 333: each stretch keeps its first and last timestep and the requested count
    for (low, high), count in zip([(0, 333), (334, 666), (667, 999)], [10, 15, 20]):
        inside = [t for t in kept if low <= t <= high]
        assert len(inside) == count and min(inside) == low and max(inside) == high
    scheduler.set_timesteps("ddim50")
    assert scheduler.timesteps.tolist() == list(range(980, -1, -20))
    scheduler.set_timesteps("25")
    assert scheduler.timesteps.tolist()[0] == 999 and scheduler.timesteps.tolist()[-1] == 0


def test_learned_range_under_respacing_uses_recomputed_betas():
    """Improved DDPM: with kept timesteps S, β'_t = 1 - ᾱ_t / ᾱ_prev(t) and β̃'_t = β'_t (1 - ᾱ_prev)/(1 - ᾱ_t);
    Σ = exp(frac log β'_t + (1 - frac) log β̃'_t), frac = (v + 1)/2."""
    scheduler = DDPMScheduler(variance_type="learned_range", clip_sample=False)
    scheduler.set_timesteps("ddim10")
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    g = torch.Generator().manual_seed(0)
    kept = scheduler.timesteps.tolist()
    for t, prev in zip(kept, [*kept[1:], -1]):
        sample = torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64)
        output = torch.randn(1, 4, 3, 3, generator=g, dtype=torch.float64).tanh()
        noise = torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64)
        a_t, a_prev = alphas_cumprod[t], (alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0).double())
        beta = 1 - a_t / a_prev
        posterior_variance = beta * (1 - a_prev) / (1 - a_t)
        x0 = (sample - (1 - a_t).sqrt() * output[:, :2]) / a_t.sqrt()
        mean = a_prev.sqrt() * beta / (1 - a_t) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t) * sample
        frac = (output[:, 2:] + 1) / 2
        log_variance = frac * beta.log() + (1 - frac) * posterior_variance.log()
        expected = mean + (0.5 * log_variance).exp() * noise * (t > 0)
        got = scheduler.step(output.float(), t, sample.float(), variance_noise=noise.float()).prev_sample
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Batched timesteps, random draws, dtypes
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_one_timestep_per_batch_element_equals_separate_steps(variance_type):
    scheduler = DDPMScheduler(variance_type=variance_type, prediction_type="v_prediction")
    scheduler.set_timesteps(25)
    g = torch.Generator().manual_seed(0)
    timesteps = torch.tensor([960, 0, 480, 40])
    channels = 6 if variance_type == "learned_range" else 3
    sample = torch.randn(4, 3, 5, 5, generator=g)
    output = torch.randn(4, channels, 5, 5, generator=g).clamp(-1, 1)
    noise = torch.randn(4, 3, 5, 5, generator=g)
    batched = scheduler.step(output, timesteps, sample, variance_noise=noise)
    for i, t in enumerate(timesteps.tolist()):
        single = scheduler.step(output[i : i + 1], t, sample[i : i + 1], variance_noise=noise[i : i + 1])
        torch.testing.assert_close(batched.prev_sample[i : i + 1], single.prev_sample, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(
            batched.pred_original_sample[i : i + 1], single.pred_original_sample, atol=1e-6, rtol=1e-6
        )
    # a 1-d tensor of length 1 broadcasts over the batch
    broadcast = scheduler.step(output, torch.tensor([480]), sample, variance_noise=noise).prev_sample
    torch.testing.assert_close(
        broadcast, scheduler.step(output, 480, sample, variance_noise=noise).prev_sample
    )


def test_tensor_path_equals_host_path_for_every_option():
    """The gather-based path (tensor timesteps: accelerators, torch.compile) computes what the Python-float path
    (int timesteps) computes, for every variance type, prediction type and clipping mode, including t = 0."""
    options = itertools.product(
        ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"],
        ["epsilon", "sample", "v_prediction"],
        [{"clip_sample": True}, {"clip_sample": False}, {"thresholding": True, "sample_max_value": 2.0}],
    )
    g = torch.Generator().manual_seed(0)
    for variance_type, prediction_type, clipping in options:
        scheduler = DDPMScheduler(variance_type=variance_type, prediction_type=prediction_type, **clipping)
        scheduler.set_timesteps(7)
        channels = 6 if variance_type.startswith("learned") else 3
        for t in (scheduler.timesteps[0].item(), scheduler.timesteps[3].item(), 0):
            sample = torch.randn(2, 3, 4, 4, generator=g)
            output = torch.randn(2, channels, 4, 4, generator=g).clamp(-1, 1)
            noise = torch.randn(2, 3, 4, 4, generator=g)
            host = scheduler.step(output, t, sample, variance_noise=noise)
            tensor = scheduler.step(output, torch.tensor([t, t]), sample, variance_noise=noise)
            label = (variance_type, prediction_type, clipping, t)
            torch.testing.assert_close(
                tensor.prev_sample, host.prev_sample, atol=1e-6, rtol=1e-6, msg=str(label)
            )
            torch.testing.assert_close(
                tensor.pred_original_sample, host.pred_original_sample, atol=1e-6, rtol=1e-6, msg=str(label)
            )
            drawn = scheduler.step(
                output, torch.tensor([t, t]), sample, generator=torch.Generator().manual_seed(3)
            )
            expected = scheduler.step(output, t, sample, generator=torch.Generator().manual_seed(3))
            torch.testing.assert_close(
                drawn.prev_sample, expected.prev_sample, atol=1e-6, rtol=1e-6, msg=str(label)
            )


def test_no_draw_at_t_zero_and_one_draw_otherwise():
    scheduler = DDPMScheduler()
    sample = torch.randn(1, 3, 2, 2)
    for timestep, draws in (
        (0, 0),
        (torch.tensor(0), 0),
        (torch.tensor([0, 0]), 0),
        (5, 1),
        (torch.tensor([0, 5]), 1),
    ):
        batch = (
            sample.expand(2, -1, -1, -1) if isinstance(timestep, torch.Tensor) and timestep.ndim else sample
        )
        g, reference = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        for _ in range(draws):
            torch.randn(batch.shape, generator=reference)
        scheduler.step(batch, timestep, batch, generator=g)
        assert torch.equal(g.get_state(), reference.get_state()), timestep


def test_variance_noise_equals_generator_draw():
    scheduler = DDPMScheduler(variance_type="fixed_large")
    sample = torch.randn(2, 3, 4, 4)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(7))
    a = scheduler.step(sample, 500, sample, generator=torch.Generator().manual_seed(7)).prev_sample
    b = scheduler.step(sample, 500, sample, variance_noise=noise).prev_sample
    assert torch.equal(a, b)
    prev, original = scheduler.step(sample, 500, sample, variance_noise=noise, return_dict=False)
    assert torch.equal(prev, b) and original.shape == sample.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "config", [{}, {"rescale_betas_zero_snr": True, "clip_sample": False}, {"thresholding": True}]
)
def test_low_precision_samples(dtype, config):
    """A 20-step loop in float16/bfloat16 stays finite, keeps the dtype and tracks the float32 loop."""
    scheduler = DDPMScheduler(**config)
    scheduler.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(2, 3, 8, 8, generator=g)
    x_low = x32.to(dtype)
    for t in scheduler.timesteps:
        noise = torch.randn(2, 3, 8, 8, generator=g)
        x32 = scheduler.step(0.9 * x32, t, x32, variance_noise=noise).prev_sample
        out = scheduler.step((0.9 * x_low.float()).to(dtype), t, x_low, variance_noise=noise.to(dtype))
        x_low = out.prev_sample
        assert x_low.dtype == dtype and out.pred_original_sample.dtype == dtype
        assert torch.isfinite(x_low).all()
    tolerance = 0.05 if dtype == torch.float16 else 0.2
    assert (x_low.float() - x32).abs().max().item() < tolerance


def test_ddim_style_keywords_are_accepted():
    scheduler = DDPMScheduler()
    sample = torch.randn(1, 3, 2, 2)
    noise = torch.randn(1, 3, 2, 2)
    a = scheduler.step(sample, 10, sample, variance_noise=noise, eta=0.0, use_clipped_model_output=False)
    assert torch.equal(a.prev_sample, scheduler.step(sample, 10, sample, variance_noise=noise).prev_sample)


# ---------------------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------------------


def test_compiled_step_compiles_once_for_all_timesteps():
    """torch.compile(step, fullgraph=True) with variance_noise and tensor timesteps: one compilation runs every
    timestep of a 12-step chain (a recompilation would raise), equals eager, and an unknown timestep gives NaN
    without synchronising."""
    import torch._dynamo

    torch._dynamo.reset()
    scheduler = DDPMScheduler(variance_type="learned_range")
    scheduler.set_timesteps(12)
    compiled = torch.compile(scheduler.step, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    x_eager = x_compiled = torch.randn(2, 3, 4, 4, generator=g)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in scheduler.timesteps:
            output = torch.randn(2, 6, 4, 4, generator=g).tanh()
            noise = torch.randn(2, 3, 4, 4, generator=g)
            x_compiled = compiled(output, t, x_compiled, variance_noise=noise, return_dict=False)[0]
            x_eager = scheduler.step(output, t, x_eager, variance_noise=noise).prev_sample
            torch.testing.assert_close(x_compiled, x_eager, atol=1e-5, rtol=1e-5)
        nan_out = compiled(output, torch.tensor(5), x_compiled, variance_noise=noise, return_dict=False)[0]
    assert torch.isnan(nan_out).all()


@pytest.mark.slow
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_compiled_step_without_generator_and_with_batched_timesteps(prediction_type):
    import torch._dynamo

    torch._dynamo.reset()
    scheduler = DDPMScheduler(prediction_type=prediction_type, thresholding=True)
    scheduler.set_timesteps(8)
    compiled = torch.compile(scheduler.step, fullgraph=True)
    x = torch.randn(3, 3, 4, 4)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in scheduler.timesteps:
            x = compiled(x, torch.stack([t, t, t]), x, return_dict=False)[0]
    assert torch.isfinite(x).all()


# ---------------------------------------------------------------------------------------------------------
# Training-time API
# ---------------------------------------------------------------------------------------------------------


def test_targets_snr_and_loss_weights():
    timesteps = torch.tensor([0, 10, 300, 999])
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    theirs = DiffusersDDPMScheduler()
    for prediction_type, expected in (
        ("epsilon", noise),
        ("sample", x0),
        ("v_prediction", theirs.get_velocity(x0, noise, timesteps)),
    ):
        scheduler = DDPMScheduler(prediction_type=prediction_type)
        torch.testing.assert_close(scheduler.get_target(x0, noise, timesteps), expected, atol=1e-5, rtol=0)
        snr = scheduler.snr(timesteps)
        # diffusers' float32 1 - ᾱ_0 = β_0 carries a relative error of 1.7e-4 at t = 0
        torch.testing.assert_close(snr, compute_snr(theirs, timesteps), rtol=5e-4, atol=0)
        torch.testing.assert_close(scheduler.loss_weights(timesteps), torch.ones(4))
        gamma = torch.full_like(snr, 5.0)
        min_snr = torch.minimum(snr, gamma)
        expected_weights = {"epsilon": min_snr / snr, "v_prediction": min_snr / (snr + 1), "sample": min_snr}
        torch.testing.assert_close(
            scheduler.loss_weights(timesteps, weighting="min_snr", snr_gamma=5.0),
            expected_weights[prediction_type],
        )
    zero_snr = DDPMScheduler(rescale_betas_zero_snr=True)
    weights = zero_snr.loss_weights(torch.tensor([999, 500]), weighting="min_snr")
    assert torch.isfinite(weights).all() and weights[0].item() == 1.0


@pytest.mark.parametrize("source", ["epsilon", "sample", "v_prediction"])
def test_convert_prediction_round_trips(source):
    scheduler = DDPMScheduler(prediction_type=source)
    timesteps = torch.tensor([0, 17, 500, 999])
    x0, noise = torch.randn(4, 3, 4, 4, dtype=torch.float64), torch.randn(4, 3, 4, 4, dtype=torch.float64)
    x_t = scheduler.add_noise(x0, noise, timesteps)
    truth = {"epsilon": noise, "sample": x0, "v_prediction": scheduler.get_velocity(x0, noise, timesteps)}
    for target in truth:
        got = scheduler.convert_prediction(truth[source], x_t, timesteps, to=target)
        torch.testing.assert_close(got, truth[target], atol=1e-6, rtol=1e-6)


def test_posterior_matches_gaussian_conditioning():
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0): precision-weighted combination (Eq. 6-7)."""
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    betas = scheduler._betas64
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    timesteps = torch.tensor([1, 2, 250, 999])
    x0, x_t = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randn(4, 2, 3, 3, dtype=torch.float64)
    mean, variance, log_variance = scheduler.q_posterior_mean_variance(x0, x_t, timesteps)
    for i, t in enumerate(timesteps.tolist()):
        prior_variance = 1 - alphas_cumprod[t - 1]
        precision = 1 / prior_variance + (1 - betas[t]) / betas[t]
        expected_mean = (
            alphas_cumprod[t - 1].sqrt() * x0[i] / prior_variance + (1 - betas[t]).sqrt() * x_t[i] / betas[t]
        ) / precision
        torch.testing.assert_close(mean[i], expected_mean, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(variance[i], (1 / precision).expand_as(x0[i]), atol=1e-12, rtol=1e-9)
        torch.testing.assert_close(
            log_variance[i], (1 / precision).log().expand_as(x0[i]), atol=1e-9, rtol=1e-9
        )
    _, _, log_variance_0 = scheduler.q_posterior_mean_variance(x0, x_t, torch.zeros(4, dtype=torch.long))
    assert torch.isfinite(log_variance_0).all()  # β̃_0 = 0: the clipped log uses β̃_1


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_p_mean_variance_mean_equals_noise_free_step(prediction_type):
    scheduler = DDPMScheduler(prediction_type=prediction_type, clip_sample=True)
    x = torch.randn(1, 3, 4, 4)
    for t in (999, 500, 3, 1, 0):
        output = torch.randn(1, 3, 4, 4)
        stepped = scheduler.step(output, t, x, variance_noise=torch.zeros_like(x))
        moments = scheduler.p_mean_variance(output, x, torch.tensor([t]), clip_denoised=True)
        torch.testing.assert_close(moments["mean"], stepped.prev_sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            moments["pred_original_sample"], stepped.pred_original_sample, atol=1e-5, rtol=1e-5
        )


def test_step_and_training_tables_come_from_one_formula():
    """The chain's step table and the full-schedule table are built by the same coefficient function, so for
    the full chain their common columns agree exactly (a second copy of a formula would round differently)."""
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    step_rows = scheduler._step_table64[1:-1]  # the rows of t = 0 … T-1 (row t + 1 holds timestep t)
    schedule_rows = scheduler._schedule_table64[:-1]
    for name in (
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    ):
        step_column = step_rows[:, StepColumns._fields.index(name)]
        assert torch.equal(step_column, schedule_rows[:, ScheduleColumns._fields.index(name)]), name


@pytest.mark.parametrize("variance_type", ["learned", "learned_range", "fixed_large"])
def test_step_is_p_mean_variance_plus_noise(variance_type):
    """step's x_{t-1} = μ_θ + exp(½ log Σ_θ) z with μ_θ, Σ_θ from p_mean_variance, for t > 0 of the full chain
    (at t = 0 step adds no noise and p_mean_variance's Σ uses β̃_1, as in the DDPM code)."""
    scheduler = DDPMScheduler(variance_type=variance_type, prediction_type="v_prediction", clip_sample=False)
    g = torch.Generator().manual_seed(0)
    channels = 3 if variance_type == "fixed_large" else 6
    for t in (999, 500, 1):
        x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
        output = torch.randn(2, channels, 4, 4, generator=g, dtype=torch.float64).tanh()
        noise = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
        stepped = scheduler.step(output, t, x, variance_noise=noise).prev_sample
        moments = scheduler.p_mean_variance(output, x, torch.tensor([t, t]))
        expected = moments["mean"] + (0.5 * moments["log_variance"]).exp() * noise
        torch.testing.assert_close(stepped, expected, atol=1e-12, rtol=1e-10)


def test_vlb_terms_vanish_for_the_true_posterior_and_decoder_nll_is_correct():
    scheduler = DDPMScheduler(variance_type="learned")
    timesteps = torch.tensor([1, 100, 999])
    x0 = torch.randint(0, 256, (3, 3, 4, 4)).double() / 127.5 - 1
    noise = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    x_t = scheduler.add_noise(x0, noise, timesteps)
    _, _, log_variance = scheduler.q_posterior_mean_variance(x0, x_t, timesteps)
    perfect = torch.cat([noise, log_variance], dim=1)
    terms = scheduler.vlb_terms(perfect, x0, x_t, timesteps)
    assert terms.shape == (3,) and terms.abs().max().item() < 1e-6
    wrong = torch.cat([noise + 0.3, log_variance], dim=1)
    assert (scheduler.vlb_terms(wrong, x0, x_t, timesteps) > 1e-3).all()
    # t = 0: decoder NLL in bits/dim against a direct evaluation with math.erf
    t0 = torch.zeros(3, dtype=torch.long)
    x_1 = scheduler.add_noise(x0, noise, t0)
    output = torch.cat([noise + 0.05 * torch.randn_like(noise), torch.full_like(noise, -6.0)], dim=1)
    mean = scheduler.p_mean_variance(output, x_1, t0)["mean"]
    sigma = math.exp(-3.0)

    def cdf(z: float) -> float:
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    expected = torch.zeros(3, dtype=torch.float64)
    for index in range(x0.numel()):
        b = index // 48
        value, mu = x0.flatten()[index].item(), mean.flatten()[index].item()
        upper = 1.0 if value > 0.999 else cdf((value + 1 / 255 - mu) / sigma)
        lower = 0.0 if value < -0.999 else cdf((value - 1 / 255 - mu) / sigma)
        expected[b] += -math.log(max(upper - lower, 1e-12)) / 48 / math.log(2)
    torch.testing.assert_close(scheduler.vlb_terms(output, x0, x_1, t0), expected, atol=1e-6, rtol=1e-6)


def test_discretized_gaussian_probabilities_sum_to_one_and_normal_kl():
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, log_scale in ((0.0, -2.0), (0.7, -4.0), (-1.2, 0.5), (0.3, -9.0)):
        log_probs = discretized_gaussian_log_likelihood(
            levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale)
        )
        assert abs(log_probs.exp().sum().item() - 1.0) < 1e-6
    mean1, mean2 = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    logvar1, logvar2 = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean1, (0.5 * logvar1).exp()),
        torch.distributions.Normal(mean2, (0.5 * logvar2).exp()),
    )
    torch.testing.assert_close(normal_kl(mean1, logvar1, mean2, logvar2), expected)


def test_prior_bpd_closed_form():
    scheduler = DDPMScheduler()
    x0 = torch.rand(2, 3, 4, 4, dtype=torch.float64) * 2 - 1
    a = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[-1]
    expected = (0.5 * (-1 - torch.log(1 - a) + (1 - a) + a * x0**2)).mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(scheduler.prior_bpd(x0), expected)
    assert scheduler.prior_bpd(x0).max().item() < 1e-4  # x_T is almost pure noise for the DDPM schedule
