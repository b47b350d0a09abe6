"""Control by noise level without retraining: inpainting (RePaint) and super-resolution (ILVR) in DDPMPipeline.

Tiny seeded models (tests/conftest.py), a few steps. Tolerances: kept pixels of an inpainted result equal the
input to 1/255 (in fact exactly once quantised to 8 bits); an ILVR result down-sampled by N equals the reference
to 1e-5 wherever clipping to [0, 1] did not act (the final low-pass replacement makes it exact before clipping).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_pipeline, tiny_unet
from PIL import Image

from ddpm_components import DDPMPipeline, DDPMScheduler
from ddpm_components.pipeline_ddpm import low_pass, mask_to_tensor, repaint_step_indices

pytestmark = pytest.mark.usefixtures("torch_single_thread")

STEPS = 6


def _images(count: int = 2, seed: int = 0) -> torch.Tensor:
    """uint8-valued images (N, 1, 8, 8) in [0, 1], so that 8-bit quantisation is exact."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 1, 8, 8), generator=generator).float() / 255.0


def _bottom_mask() -> torch.Tensor:
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:, :] = 1.0  # white = repaint
    return mask


def _generators(count: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + index) for index in range(count)]


class _Counter:
    """Counts the U-Net's forward calls."""

    def __init__(self, pipeline: DDPMPipeline) -> None:
        self.calls = 0
        forward = pipeline.unet.forward

        def counted(*args, **kwargs):
            self.calls += 1
            return forward(*args, **kwargs)

        pipeline.unet.forward = counted


def _levels(images01: torch.Tensor) -> torch.Tensor:
    return (images01.clamp(0, 1) * 255).round()


# ------------------------------------------------------------------------------------------- inpainting
@pytest.mark.parametrize("jumps", [(None, None), (2, 3)], ids=["plain", "repaint"])
@pytest.mark.parametrize(
    "steps, labels, guidance",
    [(STEPS, None, 1.0), ("ddim5", [0, 2], 1.0), ("3,2", 1, 2.5)],
    ids=["plain-steps", "respaced-labels", "sections-guidance"],
)
def test_inpainting_keeps_the_known_pixels_exactly(jumps, steps, labels, guidance):
    pipeline = tiny_pipeline(num_class_embeds=3)
    images, mask = _images(), _bottom_mask()
    jump_length, jump_n_sample = jumps
    common = dict(
        image=images, mask_image=mask, num_inference_steps=steps, class_labels=labels, guidance_scale=guidance,
        jump_length=jump_length, jump_n_sample=jump_n_sample,
    )  # fmt: skip
    out_pt = pipeline(**common, generator=_generators(2), output_type="pt").images
    out_np = pipeline(**common, generator=_generators(2), output_type="np").images
    keep = ~mask.bool().expand_as(images)
    assert torch.equal(_levels(out_pt)[keep], _levels(images)[keep])
    assert (out_pt - images)[keep].abs().max() <= 1 / 255
    assert np.abs(out_np.transpose(0, 3, 1, 2) - images.numpy())[keep.numpy()].max() <= 1 / 255
    np.testing.assert_allclose(
        out_np.transpose(0, 3, 1, 2), out_pt.numpy(), atol=1e-6
    )  # same seeds, same images
    repainted = (out_pt - images)[~keep].abs()
    assert repainted.mean() > 0.05  # the white half is new


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
def test_inpainting_and_ilvr_work_with_every_variance_type(variance_type):
    from ddpm_components import DDPMPipeline

    out_channels = 2 if variance_type.startswith("learned") else 1
    pipeline = DDPMPipeline(
        unet=tiny_unet(3, out_channels=out_channels),
        scheduler=DDPMScheduler(num_train_timesteps=50, variance_type=variance_type),
    )
    pipeline.set_progress_bar_config(disable=True)
    images = _images()
    out = pipeline(
        image=images, mask_image=_bottom_mask(), num_inference_steps=STEPS, jump_length=2, jump_n_sample=2,
        class_labels=[1, 2], guidance_scale=2.0, generator=_generators(2), output_type="pt",
    ).images  # fmt: skip
    assert torch.isfinite(out).all()
    assert torch.equal(_levels(out)[..., :4, :], _levels(images)[..., :4, :])
    reference = F.avg_pool2d(images * 2 - 1, 2)
    out = pipeline(
        reference_image=reference, num_inference_steps=STEPS, class_labels=0, guidance_scale=2.0,
        generator=_generators(2), output_type="pt",
    ).images  # fmt: skip
    assert torch.isfinite(out).all() and out.shape == (2, 1, 8, 8)


def test_each_image_with_its_own_generator_equals_it_sampled_alone():
    pipeline = tiny_pipeline()
    images, mask = _images(3), _bottom_mask()
    kwargs = dict(
        mask_image=mask, num_inference_steps=STEPS, jump_length=2, jump_n_sample=2, output_type="pt"
    )
    batch = pipeline(image=images, generator=_generators(3), **kwargs).images
    for index in range(3):
        alone = pipeline(image=images[index : index + 1], generator=_generators(3)[index], **kwargs).images
        torch.testing.assert_close(alone[0], batch[index], atol=1e-5, rtol=0)


def test_strength_with_a_mask_runs_the_last_part_of_the_chain():
    pipeline = tiny_pipeline()
    counter = _Counter(pipeline)
    images = _images(1)
    out = pipeline(
        image=images, mask_image=_bottom_mask(), strength=0.5, num_inference_steps=10, output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert counter.calls == 5 and pipeline.num_timesteps == 5
    assert torch.equal(_levels(out)[..., :4, :], _levels(images)[..., :4, :])


# ------------------------------------------------------------------------------------------- RePaint counts
def _repaint_reference_calls(num_steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """The step indices of the U-Net calls of RePaint's reference code (github.com/andreas128/RePaint,
    ``get_schedule_jump`` and ``p_sample_loop_progressive``: a call at t_last where t_cur < t_last)."""
    jumps = {j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)}
    t, times = num_steps, []
    while t >= 1:
        t -= 1
        times.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                times.append(t)
    times.append(-1)
    return [num_steps - 1 - last for last, current in itertools.pairwise(times) if current < last]


def _diffusers_repaint_call_count(num_steps: int, jump_length: int, jump_n_sample: int) -> int:
    """The U-Net calls of diffusers' RePaintPipeline (its loop: a call where t < t_last). Its schedule is RePaint's
    shifted by one step (it also resamples the last step); the count is the same."""
    from diffusers import RePaintScheduler

    scheduler = RePaintScheduler(num_train_timesteps=num_steps)
    scheduler.set_timesteps(num_steps, jump_length=jump_length, jump_n_sample=jump_n_sample)
    timesteps = scheduler.timesteps.tolist()
    return sum(t < last for last, t in zip([timesteps[0] + 1, *timesteps[:-1]], timesteps))


@pytest.mark.parametrize(
    "num_steps, jump_length, jump_n_sample", [(6, 2, 3), (10, 3, 2), (7, 10, 4), (12, 1, 2), (9, 4, 1)]
)
def test_repaint_unet_calls_follow_the_formula_and_repaints_schedule(num_steps, jump_length, jump_n_sample):
    expected = num_steps + (jump_n_sample - 1) * jump_length * ((num_steps - 1) // jump_length)
    order = repaint_step_indices(num_steps, jump_length, jump_n_sample)
    assert len(order) == expected
    assert order == _repaint_reference_calls(num_steps, jump_length, jump_n_sample)
    assert len(order) == _diffusers_repaint_call_count(num_steps, jump_length, jump_n_sample)
    assert order[-1] == num_steps - 1 and order.count(num_steps - 1) == 1  # the last step runs once
    pipeline = tiny_pipeline(num_class_embeds=3)
    counter = _Counter(pipeline)
    pipeline(
        image=_images(), mask_image=_bottom_mask(), num_inference_steps=num_steps, jump_length=jump_length,
        jump_n_sample=jump_n_sample, class_labels=1, guidance_scale=2.0, generator=_generators(2),
    )  # fmt: skip
    assert counter.calls == expected == pipeline.num_timesteps  # guidance is one batched call per step


def test_repaint_jump_is_the_forward_process_between_kept_timesteps():
    """The jump back up from s to t is q(x_t | x_s) = N(√(ᾱ_t/ᾱ_s) x_s, (1 − ᾱ_t/ᾱ_s) I)."""
    from ddpm_components.pipeline_ddpm import NoiseLevelControl

    scheduler = DDPMScheduler(num_train_timesteps=50)
    control = NoiseLevelControl(scheduler, mask=torch.ones(1, 1, 8, 8, dtype=torch.bool))
    x = torch.full((4000, 1, 8, 8), 0.7)
    jumped = control.jump(x, 10, 30, torch.Generator().manual_seed(0))
    ratio = float(scheduler.alphas_cumprod[30] / scheduler.alphas_cumprod[10])
    assert abs(float(jumped.mean()) - 0.7 * ratio**0.5) < 0.01
    assert abs(float(jumped.var()) - (1 - ratio)) < 0.01


# ------------------------------------------------------------------------------------------------- ILVR
@pytest.mark.parametrize("steps, labels, guidance", [(STEPS, None, 1.0), ("ddim5", [0, 1], 3.0)])
def test_ilvr_result_downsampled_matches_the_reference(steps, labels, guidance):
    pipeline = tiny_pipeline(num_class_embeds=3)
    images = _images() * 2 - 1
    reference = F.avg_pool2d(images, 2)  # 4x4
    out = pipeline(
        reference_image=reference, reference_factor=2, num_inference_steps=steps, class_labels=labels,
        guidance_scale=guidance, generator=_generators(2), output_type="pt",
    ).images  # fmt: skip
    result = out * 2 - 1
    down = F.avg_pool2d(result, 2)
    # exact before clipping: where no pixel of a 2x2 block was clipped to [0, 1], the block's mean is the reference's
    unclipped = F.avg_pool2d(((out > 0) & (out < 1)).float(), 2) == 1
    assert unclipped.float().mean() > 0.5
    torch.testing.assert_close(down[unclipped], reference[unclipped], atol=1e-5, rtol=0)
    assert (down - reference).abs().mean() < 0.05
    # the result is not the reference's nearest up-sampling: the model adds the high frequencies
    assert (result - low_pass(result, 2)).abs().mean() > 0.01


def test_ilvr_reference_until_leaves_the_last_steps_free():
    pipeline = tiny_pipeline()
    reference = F.avg_pool2d(_images(1) * 2 - 1, 2)
    kwargs = dict(reference_image=reference, num_inference_steps=STEPS, output_type="pt")
    full = pipeline(**kwargs, generator=torch.Generator().manual_seed(0)).images * 2 - 1
    half = pipeline(**kwargs, reference_until=0.5, generator=torch.Generator().manual_seed(0)).images * 2 - 1
    assert (F.avg_pool2d(full, 2) - reference).abs().mean() < (F.avg_pool2d(half, 2) - reference).abs().mean()


def test_low_pass_is_a_projection_that_keeps_the_downsampled_image():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for factor in (1, 2, 4, 8):
        torch.testing.assert_close(low_pass(low_pass(x, factor), factor), low_pass(x, factor))
        torch.testing.assert_close(F.avg_pool2d(low_pass(x, factor), factor), F.avg_pool2d(x, factor))


def test_ilvr_infers_the_factor_and_takes_pil_numpy_and_tensor_references():
    pipeline = tiny_pipeline()
    reference = np.array([[0, 255], [128, 64]], dtype=np.uint8)  # 2x2 -> factor 4
    outs = []
    for given in (reference, Image.fromarray(reference, mode="L"), torch.from_numpy(reference)[None]):
        outs.append(
            pipeline(
                reference_image=given,
                num_inference_steps=STEPS,
                output_type="pt",
                generator=torch.Generator().manual_seed(0),
            ).images
        )
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)  # the same reference, read three ways
    torch.testing.assert_close(outs[2], outs[0], atol=1e-5, rtol=0)
    down = F.avg_pool2d(outs[0] * 255, 4)[0, 0]
    assert (down - torch.from_numpy(reference).float()).abs().mean() < 0.05 * 255


# ------------------------------------------------------------------------------------------ mask conventions
def test_mask_white_is_repainted_resized_nearest_thresholded_at_half():
    # 4x4 mask: one white pixel at the top left, resized to 8x8 -> the 2x2 block at the top left
    small = np.zeros((4, 4), dtype=np.uint8)
    small[0, 0] = 255
    mask = mask_to_tensor(small, 8, 8)
    expected = torch.zeros(1, 1, 8, 8)
    expected[..., :2, :2] = 1
    assert torch.equal(mask, expected)
    # PIL (L and RGB), numpy uint8 / bool / float, torch float / uint8 / bool: the same mask
    full = np.zeros((8, 8), dtype=np.uint8)
    full[:2, :2] = 255
    for given in (
        Image.fromarray(small, mode="L"),
        Image.fromarray(np.repeat(small[:, :, None], 3, axis=2), mode="RGB"),
        full,
        full > 0,
        full.astype(np.float32) / 255,
        torch.from_numpy(full)[None],
        torch.from_numpy(full > 0)[None, None],
        torch.from_numpy(full).float()[None] / 255,
    ):
        assert torch.equal(mask_to_tensor(given, 8, 8), expected), type(given)
    # threshold 0.5: 0.5 and 128/255 are repainted, 0.49 and 127/255 kept
    values = torch.tensor([[[[0.49, 0.5, 127 / 255, 128 / 255]]]])
    assert mask_to_tensor(values, 1, 4).flatten().tolist() == [0.0, 1.0, 0.0, 1.0]
    # downsizing with nearest picks the pixel centres (PIL's convention)
    big = np.zeros((16, 16), dtype=np.uint8)
    big[1::2, 1::2] = 255  # centres of each 2x2 cell are at odd indices
    assert mask_to_tensor(big, 8, 8).min() == 1


def test_pipeline_mask_conventions():
    pipeline = tiny_pipeline()
    images = _images(1)
    kwargs = dict(image=images, num_inference_steps=STEPS, output_type="pt")
    black = pipeline(
        **kwargs, mask_image=np.zeros((8, 8), np.uint8), generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(_levels(black.images), _levels(images))  # nothing to repaint: the input itself
    small = np.zeros((4, 4), dtype=np.uint8)
    small[0, 0] = 255
    out = pipeline(
        **kwargs, mask_image=Image.fromarray(small, mode="L"), generator=torch.Generator().manual_seed(0)
    ).images
    changed = _levels(out) != _levels(images)
    assert changed[..., :2, :2].any() and not changed[..., 2:, :].any() and not changed[..., :, 2:].any()


def test_one_image_with_several_masks_makes_the_batch():
    pipeline = tiny_pipeline()
    masks = torch.zeros(3, 1, 8, 8)
    for index in range(3):
        masks[index, :, index * 2 : index * 2 + 2] = 1
    out = pipeline(
        image=_images(1),
        mask_image=masks,
        num_inference_steps=STEPS,
        generator=_generators(3),
        output_type="pt",
    ).images
    assert out.shape == (3, 1, 8, 8)
    for index in range(3):
        keep = ~masks[index].bool()
        assert torch.equal(_levels(out[index])[keep], _levels(_images(1)[0])[keep])


# ----------------------------------------------------------------------------------------- other schedulers
def test_ddim_and_dpm_solver_inpaint_and_keep_the_known_pixels():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    pipeline = tiny_pipeline()
    images = _images()
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    out = pipeline(
        image=images, mask_image=_bottom_mask(), num_inference_steps=STEPS, jump_length=2, jump_n_sample=2,
        generator=_generators(2), output_type="pt",
    ).images  # fmt: skip
    assert torch.equal(_levels(out)[..., :4, :], _levels(images)[..., :4, :])
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    out = pipeline(
        image=images,
        mask_image=_bottom_mask(),
        num_inference_steps=STEPS,
        generator=_generators(2),
        output_type="pt",
    ).images  # fmt: skip  (plain replacement works with a multistep solver)
    assert torch.equal(_levels(out)[..., :4, :], _levels(images)[..., :4, :])


# ------------------------------------------------------------------------------------------------- errors
def _error(pipeline: DDPMPipeline, match: str, **kwargs) -> None:
    counter = _Counter(pipeline)
    with pytest.raises(ValueError, match=match):
        pipeline(num_inference_steps=STEPS, **kwargs)
    assert counter.calls == 0  # refused before any U-Net call


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reference_image=torch.zeros(1, 1, 3, 3)), r"3x3, which is not this U-Net's 8x8 divided by one"),
        (dict(reference_image=torch.zeros(1, 1, 4, 4), reference_factor=4), r"gives 16x16, but this U-Net makes 8x8"),
        (dict(reference_image=torch.zeros(1, 1, 4, 4), reference_factor=3), r"reference_factor in \[1, 2, 4, 8\]"),
        (dict(reference_image=torch.zeros(1, 1, 4, 4), reference_factor=0), "reference_factor must be a positive"),
        (dict(reference_image=torch.zeros(1, 1, 4, 4), reference_until=1.5), r"reference_until must be in \(0, 1\]"),
        (dict(reference_image=torch.zeros(1, 1, 4, 4), reference_until=float("nan")), "reference_until=nan must"),
        (dict(reference_image=torch.full((1, 1, 4, 4), float("nan"))), "reference_image: .*NaN"),
        (dict(reference_image=torch.zeros(3, 1, 4, 4), batch_size=2), "reference_image holds 3 images for a batch of 2"),
        (dict(reference_factor=2), "reference_factor=2 only applies to ILVR: pass reference_image="),
        (dict(mask_image=torch.ones(1, 1, 8, 8)), "mask_image needs image="),
        (dict(image=torch.zeros(2, 1, 8, 8), mask_image=torch.ones(3, 1, 8, 8)), "mask_image holds 3 images for a batch of 2"),
        (dict(image=torch.zeros(1, 1, 8, 8), mask_image=torch.full((1, 1, 8, 8), float("nan"))), "mask_image: .*NaN"),
        (dict(image=torch.zeros(1, 1, 8, 8), mask_image=torch.ones(1, 1, 8, 8), jump_length=0), "jump_length must be a positive integer, got 0"),
        (dict(image=torch.zeros(1, 1, 8, 8), mask_image=torch.ones(1, 1, 8, 8), jump_n_sample=1.5), "jump_n_sample must be a positive integer"),
        (dict(image=torch.zeros(1, 1, 8, 8), mask_image=torch.ones(1, 1, 8, 8), strength=1.5), r"strength must be in \(0, 1\]"),
        (dict(image=torch.zeros(1, 1, 8, 8), mask_image=torch.ones(1, 1, 8, 8), strength=0.0), r"strength must be in \(0, 1\]"),
        (dict(image=torch.zeros(1, 1, 8, 8), mask_image=torch.ones(1, 1, 8, 8), strength=float("nan")), "strength=nan must be a finite"),
        (dict(jump_n_sample=3), "jump_n_sample=3 only applies to inpainting: pass mask_image="),
        (dict(image=torch.zeros(1, 1, 8, 8), mask_image=torch.ones(1, 1, 8, 8), reference_image=torch.zeros(1, 1, 4, 4)), "cannot be combined"),
    ],
)  # fmt: skip
def test_bad_control_arguments_are_refused_before_any_work(kwargs, match):
    _error(tiny_pipeline(), match, **kwargs)


def test_schedulers_lacking_what_is_needed_are_refused_by_name():
    from diffusers import DDIMInverseScheduler, DPMSolverMultistepScheduler, HeunDiscreteScheduler

    pipeline = tiny_pipeline()
    inpaint = dict(image=torch.zeros(1, 1, 8, 8), mask_image=_bottom_mask())
    config = pipeline.scheduler.config
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(config)
    _error(pipeline, r"DPMSolverMultistepScheduler's step depends on its earlier steps \(it keeps _step_index",
           **inpaint, jump_n_sample=2)  # fmt: skip
    pipeline.scheduler = DDIMInverseScheduler.from_config(config)
    _error(pipeline, "DDIMInverseScheduler has no add_noise", **inpaint)
    _error(pipeline, "DDIMInverseScheduler has no add_noise", reference_image=torch.zeros(1, 1, 4, 4))
    pipeline.scheduler = HeunDiscreteScheduler.from_config(config)
    _error(pipeline, "HeunDiscreteScheduler has order 2", **inpaint)

    class NoAlphas(DDPMScheduler):
        @property
        def alphas_cumprod(self):  # a scheduler without ᾱ
            return None

        @alphas_cumprod.setter
        def alphas_cumprod(self, value):
            pass

    pipeline.scheduler = NoAlphas(num_train_timesteps=50)
    _error(pipeline, "NoAlphas has no alphas_cumprod", **inpaint, jump_n_sample=2)
    pipeline(**inpaint, num_inference_steps=2, output_type="pt")  # plain replacement needs only add_noise


# ------------------------------------------------------------------------------------------- remote code
def test_saved_pipeline_inpaints_and_upsamples_without_the_package(tmp_path, run_python):
    folder = tmp_path / "saved"
    tiny_pipeline().save_pretrained(folder)
    result = run_python(
        f"""
        import torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        image = torch.rand(1, 1, 8, 8)
        mask = torch.zeros(1, 1, 8, 8); mask[..., 4:, :] = 1
        out = pipe(image=image, mask_image=mask, num_inference_steps=4, jump_length=2, jump_n_sample=2,
                   output_type="pt", generator=torch.Generator().manual_seed(0)).images
        assert ((out - image)[..., :4, :].abs().max() <= 1 / 255), "known pixels changed"
        out = pipe(reference_image=torch.rand(1, 1, 4, 4), num_inference_steps=4, output_type="pt").images
        print(type(pipe).__module__, tuple(out.shape))
        """
    )
    assert "(1, 1, 8, 8)" in result.stdout and "ddpm_components" not in result.stdout
