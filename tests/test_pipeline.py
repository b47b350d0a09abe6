"""DDPMPipeline sampling: equality with diffusers' pipelines, image-to-image, guidance, callbacks, errors."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from conftest import tiny_diffusers_unet, tiny_pipeline, tiny_unet
from PIL import Image

from ddpm_components import DDPMPipeline, DDPMScheduler

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _seed(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _quiet(pipeline):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# -------------------------------------------------------------------------- equality with diffusers
@pytest.mark.parametrize("components", ["diffusers", "ours"])
def test_unconditional_images_equal_diffusers_ddpm_pipeline(components):
    """Same U-Net, scheduler and seed: exactly diffusers' DDPMPipeline's images (np and pt)."""
    if components == "diffusers":
        unet, scheduler = tiny_diffusers_unet(), diffusers.DDPMScheduler(num_train_timesteps=50)
    else:
        unet, scheduler = tiny_unet(), DDPMScheduler(num_train_timesteps=50)
    ours = _quiet(DDPMPipeline(unet=unet, scheduler=scheduler))
    reference = _quiet(diffusers.DDPMPipeline(unet=unet, scheduler=scheduler))
    for output_type in ("np", "pt"):
        expected = reference(
            batch_size=2, generator=_seed(3), num_inference_steps=50, output_type=output_type
        )
        got = ours(batch_size=2, generator=_seed(3), num_inference_steps=50, output_type=output_type)
        if output_type == "pt":
            assert torch.equal(got.images, expected.images)
        else:
            np.testing.assert_array_equal(got.images, expected.images)
    # the images are not trivially constant
    assert float(np.asarray(got.images).std()) > 0.01


def test_our_scheduler_matches_diffusers_scheduler_in_the_pipeline():
    """Our scheduler in place of diffusers' gives the same images up to float32 rounding (atol 1e-4)."""
    unet = tiny_unet()
    ours = _quiet(DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50)))
    theirs = _quiet(DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=50)))
    a = ours(batch_size=2, generator=_seed(1), num_inference_steps=25, output_type="pt").images
    b = theirs(batch_size=2, generator=_seed(1), num_inference_steps=25, output_type="pt").images
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_ddim_scheduler_matches_diffusers_ddim_pipeline():
    """Any diffusers scheduler whose step takes `generator` works: DDIM equals diffusers' DDIMPipeline."""
    unet = tiny_diffusers_unet()
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=50)
    reference = _quiet(diffusers.DDIMPipeline(unet=unet, scheduler=scheduler))
    ours = _quiet(DDPMPipeline(unet=unet, scheduler=scheduler))
    expected = reference(batch_size=2, generator=_seed(2), num_inference_steps=10, output_type="np").images
    got = ours(batch_size=2, generator=_seed(2), num_inference_steps=10, output_type="np").images
    np.testing.assert_array_equal(got, expected)


def test_same_seed_same_images_and_generator_list():
    pipeline = tiny_pipeline()
    first = pipeline(batch_size=2, generator=_seed(5), num_inference_steps=10, output_type="pt").images
    again = pipeline(batch_size=2, generator=_seed(5), num_inference_steps=10, output_type="pt").images
    other = pipeline(batch_size=2, generator=_seed(6), num_inference_steps=10, output_type="pt").images
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    # a generator list draws each image's noise from its own generator: image i equals a lone run with seed i
    batch = pipeline(
        batch_size=2, generator=[_seed(7), _seed(8)], num_inference_steps=10, output_type="pt"
    ).images
    for index, seed in enumerate((7, 8)):
        alone = pipeline(batch_size=1, generator=_seed(seed), num_inference_steps=10, output_type="pt").images
        torch.testing.assert_close(batch[index : index + 1], alone, atol=1e-5, rtol=0)


def test_output_types_and_tuple_return():
    pipeline = tiny_pipeline()
    pil = pipeline(batch_size=2, generator=_seed(), num_inference_steps=5).images
    assert len(pil) == 2 and pil[0].mode == "L" and pil[0].size == (8, 8)
    array = pipeline(batch_size=2, generator=_seed(), num_inference_steps=5, output_type="np").images
    assert array.shape == (2, 8, 8, 1) and array.min() >= 0.0 and array.max() <= 1.0
    np.testing.assert_array_equal(np.asarray(pil[1]), (array[1, ..., 0] * 255).round().astype(np.uint8))
    (tensor,) = pipeline(
        batch_size=2, generator=_seed(), num_inference_steps=5, output_type="pt", return_dict=False
    )
    assert tensor.shape == (2, 1, 8, 8)
    torch.testing.assert_close(tensor.permute(0, 2, 3, 1).numpy(), array)


def test_custom_timesteps():
    pipeline = tiny_pipeline()
    seen = []

    def record(pipe, step, timestep, kwargs):
        seen.append(int(timestep))
        return kwargs

    pipeline(generator=_seed(), timesteps=[40, 25, 10, 0], callback_on_step_end=record, output_type="pt")
    assert seen == [40, 25, 10, 0]
    assert pipeline.num_timesteps == 4
    # respacing strings go to schedulers that take them (ours)
    seen.clear()
    pipeline(generator=_seed(), num_inference_steps="ddim5", callback_on_step_end=record, output_type="pt")
    assert seen == pipeline.scheduler.timesteps.tolist() and len(seen) == 5


# ------------------------------------------------------------------------------------- callbacks
def test_callback_on_step_end_sees_and_replaces_latents():
    pipeline = tiny_pipeline()
    calls = []

    def callback(pipe, step, timestep, kwargs):
        assert pipe is pipeline
        assert set(kwargs) == {"latents"} and kwargs["latents"].shape == (2, 1, 8, 8)
        calls.append((step, int(timestep)))
        if step == pipe.num_timesteps - 1:
            return {"latents": torch.zeros_like(kwargs["latents"])}  # x_0 := 0 -> grey 0.5
        return {}

    images = pipeline(
        batch_size=2,
        generator=_seed(),
        num_inference_steps=5,
        output_type="pt",
        callback_on_step_end=callback,
    ).images
    assert [step for step, _ in calls] == [0, 1, 2, 3, 4]
    assert [t for _, t in calls] == pipeline.scheduler.timesteps.tolist()
    torch.testing.assert_close(images, torch.full_like(images, 0.5))


# --------------------------------------------------------------------------------- image-to-image
def test_image_to_image_inputs_and_strength():
    """PIL, numpy in [0, 1] and tensors in [0, 1] or [-1, 1] give the same result; strength sets the start."""
    pipeline = tiny_pipeline()
    pixels = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    as_pil = Image.fromarray((pixels * 255).round().astype(np.uint8), mode="L")
    unit = torch.from_numpy(np.asarray(as_pil, dtype=np.float32) / 255.0)[None, None]
    inputs = [as_pil, unit.numpy().transpose(0, 2, 3, 1), unit, unit * 2 - 1]
    results = []
    for image in inputs:
        steps: list[int] = []

        def record(pipe, step, timestep, kwargs, steps=steps):
            steps.append(int(timestep))
            return kwargs

        out = pipeline(
            image=image,
            strength=0.4,
            generator=_seed(4),
            num_inference_steps=10,
            output_type="pt",
            callback_on_step_end=record,
        ).images
        results.append(out)
        assert steps == pipeline.scheduler.timesteps[-4:].tolist()  # int(10 * 0.4) = 4 kept steps
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], atol=1e-6, rtol=0)
    # a low strength stays close to the input; strength 1 runs the whole schedule and forgets it
    near = pipeline(
        image=unit, strength=0.1, generator=_seed(4), num_inference_steps=50, output_type="pt"
    ).images
    far = pipeline(
        image=unit, strength=1.0, generator=_seed(4), num_inference_steps=50, output_type="pt"
    ).images
    assert (near - unit).abs().mean() < 0.5 * (far - unit).abs().mean()


def test_image_to_image_start_is_add_noise_at_first_kept_timestep():
    pipeline = tiny_pipeline()
    image = torch.rand(2, 1, 8, 8) * 2 - 1
    captured = {}
    original_step = pipeline.scheduler.step

    def spy_step(model_output, timestep, sample, **kwargs):
        captured.setdefault("first", (int(timestep), sample.clone()))
        return original_step(model_output, timestep, sample, **kwargs)

    pipeline.scheduler.step = spy_step
    pipeline(image=image, strength=0.5, generator=_seed(9), num_inference_steps=10, output_type="pt")
    timestep, start = captured["first"]
    assert timestep == int(pipeline.scheduler.timesteps[5])
    noise = torch.randn(image.shape, generator=_seed(9))
    expected = pipeline.scheduler.add_noise(image, noise, torch.tensor([timestep, timestep]))
    torch.testing.assert_close(start, expected, atol=1e-6, rtol=0)


def test_image_to_image_batch_rules():
    pipeline = tiny_pipeline()
    image = torch.rand(1, 1, 8, 8)
    out = pipeline(image=image, batch_size=3, strength=0.5, num_inference_steps=4, output_type="pt").images
    assert out.shape == (3, 1, 8, 8)
    out = pipeline(image=torch.rand(2, 1, 8, 8), strength=0.5, num_inference_steps=4, output_type="pt").images
    assert out.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="batch_size"):
        pipeline(image=torch.rand(2, 1, 8, 8), batch_size=3, num_inference_steps=4)


# ---------------------------------------------------------------------------- classifier-free guidance
def _manual_guided_sampling(pipeline, labels, guidance_scale, steps, seed):
    """Reference loop: ε = ε_u + g (ε_c − ε_u) on the first C channels, conditional variance channels kept."""
    unet, scheduler = pipeline.unet, pipeline.scheduler
    generator = _seed(seed)
    scheduler.set_timesteps(steps)
    x = torch.randn((len(labels), 1, 8, 8), generator=generator)
    labels = torch.tensor(labels)
    null = torch.full_like(labels, unet.null_class_label)
    with torch.no_grad():
        for t in scheduler.timesteps:
            cond = unet(x, t, class_labels=labels).sample
            uncond = unet(x, t, class_labels=null).sample
            eps = uncond[:, :1] + guidance_scale * (cond[:, :1] - uncond[:, :1])
            x = scheduler.step(torch.cat([eps, cond[:, 1:]], dim=1), t, x, generator=generator).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("learned_variance", [False, True])
def test_classifier_free_guidance_matches_reference_loop(learned_variance):
    scheduler_kwargs = {"variance_type": "learned_range"} if learned_variance else {}
    pipeline = tiny_pipeline(num_class_embeds=3, **scheduler_kwargs)
    if learned_variance:
        pipeline.unet = tiny_unet(num_class_embeds=3, out_channels=2)
        pipeline.register_modules(unet=pipeline.unet)
    got = pipeline(
        batch_size=2,
        generator=_seed(11),
        num_inference_steps=6,
        class_labels=[0, 2],
        guidance_scale=3.0,
        output_type="pt",
    ).images
    expected = _manual_guided_sampling(pipeline, [0, 2], 3.0, 6, 11)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # guidance_scale 1 is plain conditional sampling; no labels on a model with a null class: unconditional
    conditional = pipeline(
        batch_size=2, generator=_seed(11), num_inference_steps=6, class_labels=[0, 2], output_type="pt"
    )
    unconditional = pipeline(batch_size=2, generator=_seed(11), num_inference_steps=6, output_type="pt")
    assert not torch.allclose(conditional.images, got)
    assert not torch.allclose(conditional.images, unconditional.images)


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"output_type": "jpeg"}, r"output_type='jpeg' is not supported; choose one of 'pil', 'np', 'pt'\."),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"num_inference_steps": 0}, "num_inference_steps must be a positive integer or a respacing string"),
        ({"image": torch.rand(1, 1, 8, 8), "strength": 0.0}, r"strength must be in \(0, 1\]"),
        ({"image": torch.rand(1, 1, 8, 8), "strength": 1.5}, r"strength must be in \(0, 1\]"),
        ({"strength": 0.5}, "only applies to image-to-image"),
        ({"image": torch.rand(1, 1, 8, 8), "strength": 0.01}, "keeps no denoising step"),
        ({"image": torch.rand(1, 1, 16, 16)}, r"needs \(1, 8, 8\)"),
        ({"image": torch.rand(1, 5, 8, 8)}, r"the image has 5 channels"),
        ({"image": torch.rand(1, 1, 8, 8) * 255}, r"float images must lie in \[0, 1\]"),
        ({"image": "not an image"}, "image must be a PIL image, a numpy array or a torch tensor"),
        ({"class_labels": 1}, "this U-Net is unconditional"),
        ({"guidance_scale": 2.0}, "needs class_labels"),
        ({"generator": [torch.Generator()], "batch_size": 2}, "1 generators for 2 images"),
        (
            {"callback_on_step_end_tensor_inputs": ["noise"]},
            r"\['noise'\] are not available; choose from \['latents'\]",
        ),
    ],
)
def test_bad_arguments_raise_value_errors(kwargs, message):
    pipeline = tiny_pipeline()
    with pytest.raises(ValueError, match=message):
        pipeline(num_inference_steps=kwargs.pop("num_inference_steps", 3), **kwargs)


def test_class_label_errors():
    conditional = tiny_pipeline(num_class_embeds=3)
    with pytest.raises(
        ValueError, match=r"class label 7 is out of range: this U-Net knows classes 0..2 \(or 3"
    ):
        conditional(class_labels=7, num_inference_steps=2)
    with pytest.raises(ValueError, match="class label -1 is out of range"):
        conditional(class_labels=[0, -1], batch_size=2, num_inference_steps=2)
    with pytest.raises(ValueError, match="one label or one per image"):
        conditional(class_labels=[0, 1], batch_size=3, num_inference_steps=2)
    with pytest.raises(ValueError, match="must be integers"):
        conditional(class_labels=torch.tensor([0.5]), num_inference_steps=2)
    no_null = DDPMPipeline(unet=tiny_unet(3, use_null_class_embed=False), scheduler=DDPMScheduler(50))
    with pytest.raises(ValueError, match="needs a U-Net with a null class"):
        no_null(class_labels=1, guidance_scale=2.0, num_inference_steps=2)
    with pytest.raises(ValueError, match="class-conditional and has no null class: pass class_labels"):
        no_null(num_inference_steps=2)
    with pytest.raises(ValueError, match="does not accept custom timesteps"):
        DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDIMScheduler(50))(timesteps=[10, 0])


def test_num_inference_steps_forms():
    """numpy integers count as integers; a respacing string for a scheduler that cannot take one (diffusers'
    compare it with an int: TypeError) and a bool are ValueErrors that say what is allowed."""
    pipeline = tiny_pipeline()
    a = pipeline(generator=_seed(), num_inference_steps=np.int64(3), output_type="pt").images
    b = pipeline(generator=_seed(), num_inference_steps=3, output_type="pt").images
    assert torch.equal(a, b) and pipeline.num_timesteps == 3
    with pytest.raises(ValueError, match=r"must be a positive integer or a respacing string.*got True"):
        pipeline(num_inference_steps=True)
    theirs = DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDPMScheduler(50))
    with pytest.raises(
        ValueError,
        match=r"num_inference_steps='ddim5' is a respacing string, which DDPMScheduler\.set_timesteps",
    ):
        theirs(num_inference_steps="ddim5")
