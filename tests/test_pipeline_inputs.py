"""DDPMPipeline.__call__: check_inputs validates every argument before any work (diffusers' convention), class
labels by name, and a non-finite result is an error instead of black images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_pipeline, tiny_unet

from ddpm_components import DDPMPipeline, DDPMScheduler

pytestmark = pytest.mark.usefixtures("torch_single_thread")

NAMES = ["cat", "dog", "bird"]


def _seed(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _named_pipeline() -> DDPMPipeline:
    pipeline = DDPMPipeline(unet=tiny_unet(3, class_names=NAMES), scheduler=DDPMScheduler(50))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _count_unet_calls(pipeline: DDPMPipeline) -> list[int]:
    calls = [0]
    pipeline.unet.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"guidance_scale": math.nan, "class_labels": 1}, "guidance_scale=nan must be a finite number"),
        ({"guidance_scale": math.inf, "class_labels": 1}, "guidance_scale=inf must be a finite number"),
        ({"guidance_scale": "2"}, "guidance_scale='2' must be a finite number"),
        (
            {"image": torch.zeros(1, 1, 8, 8), "strength": math.nan},
            "strength=nan must be a finite number",
        ),
        ({"strength": math.inf}, "strength=inf must be a finite number"),
        ({"batch_size": True}, "batch_size must be a positive integer, got True"),
        ({"batch_size": 2.0}, "batch_size must be a positive integer, got 2.0"),
        ({"num_inference_steps": 2.5}, "num_inference_steps must be a positive integer"),
        ({"timesteps": []}, "timesteps must be a non-empty list"),
        ({"generator": [_seed(), "seed"], "batch_size": 2}, "generator must be a torch.Generator"),
        ({"generator": 0}, "generator must be a torch.Generator"),
        ({"generator": [_seed()] * 3, "image": torch.zeros(2, 1, 8, 8)}, "3 generators for 2 images"),
        ({"callback_on_step_end": "print"}, "callback_on_step_end must be callable"),
        ({"class_labels": "cat"}, "class label 'cat' is a name, but this U-Net's config has no class_names"),
        ({"class_labels": 9}, r"class label 9 is out of range: this U-Net knows classes 0..2 \(or 3"),
        ({"class_labels": [1.0]}, r"class_labels must be integers or class names, got 1.0 \(float\)"),
        ({"class_labels": []}, "class_labels is empty"),
        ({"class_labels": torch.zeros(2, 2, dtype=torch.long)}, r"0-d or 1-d, got shape \(2, 2\)"),
        ({"image": torch.zeros(3, 1, 8, 8), "batch_size": 2}, "got 3 images and batch_size=2"),
    ],
)
def test_every_argument_is_checked_before_any_work(kwargs, message):
    pipeline = DDPMPipeline(unet=tiny_unet(3), scheduler=DDPMScheduler(50))
    calls = _count_unet_calls(pipeline)
    with pytest.raises(ValueError, match=message):
        pipeline(num_inference_steps=kwargs.pop("num_inference_steps", 3), **kwargs)
    assert calls[0] == 0
    assert pipeline.scheduler.num_inference_steps is None  # not even the timesteps were set


def test_class_labels_by_name():
    pipeline = _named_pipeline()
    assert pipeline.class_names == NAMES
    kwargs = dict(num_inference_steps=3, output_type="pt")
    by_index = pipeline(batch_size=2, class_labels=[2, 0], generator=_seed(), **kwargs).images
    assert torch.equal(
        pipeline(batch_size=2, class_labels=["bird", 0], generator=_seed(), **kwargs).images, by_index
    )
    assert torch.equal(
        pipeline(batch_size=2, class_labels=np.array([2, 0]), generator=_seed(), **kwargs).images, by_index
    )
    one = pipeline(batch_size=2, class_labels=[1, 1], generator=_seed(), **kwargs).images
    assert torch.equal(pipeline(batch_size=2, class_labels="dog", generator=_seed(), **kwargs).images, one)
    guided = dict(guidance_scale=2.0, **kwargs)
    assert torch.equal(
        pipeline(class_labels="dog", generator=_seed(), **guided).images,
        pipeline(class_labels=1, generator=_seed(), **guided).images,
    )
    with pytest.raises(ValueError, match=r"unknown class name 'cow'; valid names: 'cat', 'dog', 'bird'"):
        pipeline(class_labels=["cat", "cow"], batch_size=2, num_inference_steps=3)


def test_a_non_finite_result_is_an_error_checked_once_at_the_end():
    """guidance_scale=nan once gave NaN (black) images; a U-Net that outputs NaN now raises, after the loop (no
    per-step check, so no per-step device sync)."""
    pipeline = tiny_pipeline()
    calls = _count_unet_calls(pipeline)
    with torch.no_grad():
        pipeline.unet.conv_out.bias.fill_(math.nan)
    with pytest.raises(FloatingPointError, match="sampling produced NaN or infinite values in 2 of 2 images"):
        pipeline(batch_size=2, num_inference_steps=4, generator=_seed())
    assert calls[0] == 4  # the loop ran to its end; the check is one reduction over the final samples
    unclipped = tiny_pipeline(clip_sample=False)  # (clipping x_0 would turn an infinite ε into a finite step)
    with torch.no_grad():
        unclipped.unet.conv_out.bias.fill_(math.inf)
    with pytest.raises(FloatingPointError, match="in 1 of 1 images"):
        unclipped(num_inference_steps=2, output_type="np")


def test_a_float_image_just_below_zero_is_read_as_zero_to_one():
    """Resampling overshoot (-1e-4) does not turn a [0, 1] image into a [-1, 1] one (0.2 grey stays 0.2)."""
    from ddpm_components.pipeline_ddpm import images_to_tensor

    image = torch.full((1, 1, 8, 8), 0.2)
    image[0, 0, 0, 0] = -1e-4
    pixels = images_to_tensor(image, 1)
    torch.testing.assert_close(pixels[0, 0, 1, 1], torch.tensor(0.2 * 2 - 1), atol=1e-6, rtol=0)
    minus = torch.full((1, 1, 8, 8), 0.2)
    minus[0, 0, 0, 0] = -0.5  # clearly [-1, 1]
    torch.testing.assert_close(images_to_tensor(minus, 1)[0, 0, 1, 1], torch.tensor(0.2), atol=1e-6, rtol=0)
