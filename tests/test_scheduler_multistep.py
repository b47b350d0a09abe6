"""multistep_order=2: DPM-Solver++(2M)'s extrapolation of x̂_0 inside our DDPM/DDIM step (issue 11).

Oracles: diffusers' DPMSolverMultistepScheduler (``dpmsolver++`` for η = 0, ``sde-dpmsolver++`` for η = 1, both
``solver_order=2``) on the same timesteps, and the exact-ε Gaussian mixture of test_scheduler_mixture.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_pipeline
from diffusers import DPMSolverMultistepScheduler
from test_scheduler_mixture import wasserstein_to_mixture
from test_scheduler_variances import (
    run_mixture_chain,
    single_thread,  # noqa: F401 (an autouse fixture: one torch thread)
)

from ddpm_components import DDPMScheduler
from ddpm_components.scheduling_ddpm import _multistep_weights


def _model(x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """A smooth, timestep-dependent stand-in for ε_θ (deterministic)."""
    weight = torch.linspace(-0.6, 0.6, x.shape[-1]).reshape(1, 1, 1, -1)
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x * weight + x.roll(1, -1)) * (0.4 + t / 1000)


def _run(
    scheduler, steps: int, x: torch.Tensor, noises: list[torch.Tensor] | None, per_element: bool = False
):
    scheduler.set_timesteps(steps)
    for i, t in enumerate(scheduler.timesteps.tolist()):
        timestep = torch.full((x.shape[0],), t) if per_element else t
        noise = None if noises is None else noises[i]
        x = scheduler.step(_model(x, t), timestep, x, variance_noise=noise).prev_sample
    return x


def _start(seed: int = 0, steps: int = 10) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 1, 4, 4, generator=generator)
    return x, [torch.randn(3, 1, 4, 4, generator=generator) for _ in range(steps)]


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize(("eta", "algorithm"), [(0.0, "dpmsolver++"), (1.0, "sde-dpmsolver++")])
def test_multistep_is_dpm_solver_plus_plus_2m(steps, eta, algorithm):
    """η = 0: DPM-Solver++(2M); η = 1 (the DDPM posterior): its SDE variant; same samples to 1e-4 relative
    (diffusers computes its coefficients in float32, ours in float64; measured ≈ 1e-6 relative), while the first-
    order step is far from both."""
    ours = DDPMScheduler(eta=eta, multistep_order=2, clip_sample=False, timestep_spacing="trailing")
    config = {key: value for key, value in ours.config.items() if key not in ("eta", "multistep_order")}
    theirs = DPMSolverMultistepScheduler.from_config(config, algorithm_type=algorithm, solver_order=2)
    x, noises = _start(steps=steps)
    noises = noises if eta else None
    expected = x
    theirs.set_timesteps(steps)
    for i, t in enumerate(theirs.timesteps):
        noise = None if noises is None else noises[i]
        expected = theirs.step(_model(expected, int(t)), t, expected, variance_noise=noise).prev_sample
    result = _run(ours, steps, x, noises)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    scale = expected.abs().max().item()
    torch.testing.assert_close(result, expected, atol=1e-4 * scale, rtol=1e-4)
    first_order = _run(
        DDPMScheduler(eta=eta, clip_sample=False, timestep_spacing="trailing"), steps, x, noises
    )
    assert (first_order - expected).abs().max().item() > 100 * 1e-4 * scale


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_the_tensor_path_and_per_element_timesteps_equal_the_host_path(eta):
    x, noises = _start(1)
    noises = noises if eta else None
    host = _run(DDPMScheduler(eta=eta, multistep_order=2), 10, x, noises)
    tensor = _run(DDPMScheduler(eta=eta, multistep_order=2), 10, x, noises, per_element=True)
    torch.testing.assert_close(tensor, host, atol=1e-6, rtol=1e-6)


def test_a_new_chain_a_jump_and_another_batch_start_first_order():
    """The first step of every chain is first order: running a chain twice without set_timesteps gives the same
    samples; a call whose timestep does not follow the previous call's (RePaint's jump back up), or whose batch
    has another shape, equals the first-order step."""
    scheduler = DDPMScheduler(eta=0.0, multistep_order=2)
    x, _ = _start(2)
    first = _run(scheduler, 10, x, None)
    scheduler.set_timesteps(10)
    timesteps = scheduler.timesteps.tolist()
    again = x
    for t in timesteps:  # no set_timesteps in between: the state of the last chain must not leak in
        again = scheduler.step(_model(again, t), t, again).prev_sample
    torch.testing.assert_close(again, first, atol=0, rtol=0)

    plain = DDPMScheduler(eta=0.0)
    plain.set_timesteps(10)
    scheduler.set_timesteps(10)
    y = x
    for t in timesteps[:4]:
        y = scheduler.step(_model(y, t), t, y).prev_sample
    jump = timesteps[1]  # back up: the next call is at the chain's 2nd timestep, not its 5th
    expected = plain.step(_model(y, jump), jump, y).prev_sample
    torch.testing.assert_close(scheduler.step(_model(y, jump), jump, y).prev_sample, expected)
    following = timesteps[2]  # and from there on it is second order again
    z = scheduler.step(_model(y, following), following, y).prev_sample
    assert not torch.allclose(z, plain.step(_model(y, following), following, y).prev_sample)
    half = y[:2]  # another batch size: first order
    torch.testing.assert_close(
        scheduler.step(_model(half, timesteps[3]), timesteps[3], half).prev_sample,
        plain.step(_model(half, timesteps[3]), timesteps[3], half).prev_sample,
    )


def test_weights_are_first_order_at_the_ends_and_finite():
    scheduler = DDPMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    alphas_cumprod = scheduler._alphas_cumprod64
    kept = torch.tensor([999, 666, 333, 0])
    prev = torch.cat([alphas_cumprod[kept[1:]], torch.ones(1, dtype=torch.float64)])
    weights = _multistep_weights(alphas_cumprod[kept], prev)
    # step 0: no history; step 1 follows a step from ᾱ = 0 (h_prev infinite); step 3 goes into ᾱ = 1
    assert weights[0] == 0 and weights[1] == 0 and weights[3] == 0 and 0 < weights[2] < math.inf


@pytest.mark.parametrize(("eta", "factor"), [(0.0, 0.9), (1.0, 0.8)])
def test_multistep_samples_the_mixture_better_at_ten_steps(eta, factor):
    """With the exact ε* of a 1-d Gaussian mixture, 10 trailing steps land closer to it (W1) with the
    second-order extrapolation than with the first-order step (measured: η = 0 0.0756 vs 0.0911, η = 1 0.0766 vs
    0.1072; W1's sampling noise at N = 4000 is ≈ 0.005). On a ``leading`` grid it is the other way round (0.256 vs
    0.089): its step into t = 0 is long in λ after a short one, and the extrapolation overshoots (docs)."""

    def sample(multistep_order: int) -> torch.Tensor:
        scheduler = DDPMScheduler(
            clip_sample=False, eta=eta, multistep_order=multistep_order, timestep_spacing="trailing"
        )
        return run_mixture_chain(scheduler, 10)

    second, first = wasserstein_to_mixture(sample(2)), wasserstein_to_mixture(sample(1))
    assert second < factor * first, (second, first)


@pytest.mark.parametrize("value", [0, 3, True, 2.5, "2"])
def test_bad_multistep_order_fails_at_construction(value):
    with pytest.raises(ValueError, match="multistep_order") as error:
        DDPMScheduler(multistep_order=value)
    assert repr(value) in str(error.value) and "choose 1" in str(error.value)


def test_config_swaps_keep_each_solver_as_configured(tmp_path):
    """Not diffusers' key ``solver_order``: DPM-Solver++ made from our config stays second order, and ours made
    from DPM-Solver++'s config stays the DDPM step; the key round-trips through save/load."""
    ours = DDPMScheduler(multistep_order=2, eta=0.0)
    assert DPMSolverMultistepScheduler.from_config(DDPMScheduler().config).config.solver_order == 2
    assert DDPMScheduler.from_config(DPMSolverMultistepScheduler().config).config.multistep_order == 1
    ours.save_config(tmp_path)
    assert DDPMScheduler.from_pretrained(tmp_path).config.multistep_order == 2


def test_pipeline_with_multistep_samples_and_inpaints():
    """Our pipeline runs the multistep scheduler, also with RePaint's jumps (which restart the multistep state),
    and keeps the known pixels of an inpainted image."""
    pipeline = tiny_pipeline(eta=0.0, multistep_order=2)
    images = pipeline(batch_size=2, num_inference_steps=10, output_type="pt", generator=torch.manual_seed(0))
    assert torch.isfinite(images.images).all()
    image = torch.rand(1, 1, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:, :] = 1
    result = pipeline(
        image=image,
        mask_image=mask,
        num_inference_steps=10,
        jump_length=2,
        jump_n_sample=2,
        output_type="pt",
        generator=torch.manual_seed(0),
    ).images
    assert torch.isfinite(result).all()
    assert (result[..., :4, :] - image[..., :4, :]).abs().max() <= 1 / 255 + 1e-6


def test_compiled_multistep_step_compiles_twice_and_equals_eager():
    """torch.compile(step, fullgraph=True) with multistep_order=2: one graph for a chain's first step (no history)
    and one for every later step (a third compilation would raise), equal to eager (1e-5)."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled_scheduler = DDPMScheduler(multistep_order=2, timestep_spacing="trailing")
    eager = DDPMScheduler(multistep_order=2, timestep_spacing="trailing")
    compiled_scheduler.set_timesteps(10)
    eager.set_timesteps(10)
    compiled = torch.compile(compiled_scheduler.step, fullgraph=True)
    generator = torch.Generator().manual_seed(0)
    x = y = torch.randn(2, 1, 4, 4, generator=generator)
    for i, t in enumerate(eager.timesteps):
        output = torch.randn(2, 1, 4, 4, generator=generator).tanh()
        noise = torch.randn(2, 1, 4, 4, generator=generator)
        with torch._dynamo.config.patch(error_on_recompile=i >= 2):
            x = compiled(output, t, x, variance_noise=noise, return_dict=False)[0]
        y = eager.step(output, t, y, variance_noise=noise).prev_sample
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
