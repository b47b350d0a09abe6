"""Sampling at scale: per-image seeds make images independent of batch size and order; scheduler specs."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_pipeline

from ddpm_components.evaluation import evaluate_samplers, reference_digits
from ddpm_components.sampling import SchedulerSpec, image_seed, sample_batches


def _all(pipeline, indices, batch_size, seed=3, steps=8, **kwargs):
    batches = sample_batches(
        pipeline,
        indices,
        seed=seed,
        num_inference_steps=steps,
        batch_size=batch_size,
        show_progress=False,
        **kwargs,
    )
    return torch.cat([images for _, images in batches])


def test_images_do_not_depend_on_batch_size_or_order(torch_single_thread):
    pipeline = tiny_pipeline()
    whole = _all(pipeline, range(6), batch_size=6)
    assert whole.dtype == torch.uint8 and whole.shape == (6, 1, 8, 8) and whole.float().std() > 10
    assert torch.equal(whole, _all(pipeline, range(6), batch_size=4))
    assert torch.equal(whole[[5, 2, 3]], _all(pipeline, [5, 2, 3], batch_size=2))
    assert not torch.equal(whole, _all(pipeline, range(6), batch_size=6, seed=4))


def test_class_labels_per_image(torch_single_thread):
    pipeline = tiny_pipeline(num_class_embeds=3)
    labelled = _all(pipeline, range(4), batch_size=4, class_label_of=lambda i: i % 3)
    assert torch.equal(labelled[[3]], _all(pipeline, [3], batch_size=1, class_label_of=lambda i: 0))
    assert not torch.equal(labelled, _all(pipeline, range(4), batch_size=4))


def test_image_seeds_are_distinct():
    seeds = {image_seed(seed, index) for seed in range(20) for index in range(500)}
    assert len(seeds) == 20 * 500 and max(seeds) < 2**63


def test_scheduler_specs():
    pipeline = tiny_pipeline()
    spec = SchedulerSpec.parse("ddpm:variance_type=fixed_large,clip_sample=false")
    built = spec.build(pipeline.scheduler)
    assert type(built) is type(pipeline.scheduler)
    assert built.config.variance_type == "fixed_large" and built.config.clip_sample is False
    assert built.config.num_train_timesteps == pipeline.scheduler.config.num_train_timesteps
    solver = SchedulerSpec.parse("DPMSolverMultistepScheduler:solver_order=3").build(pipeline.scheduler)
    assert type(solver).__name__ == "DPMSolverMultistepScheduler" and solver.config.solver_order == 3
    with pytest.raises(ValueError, match=r"neither 'ddpm'.*nor a diffusers scheduler"):
        SchedulerSpec.parse("NoSuchScheduler")
    with pytest.raises(ValueError, match=r"has no option\(s\) \['nope'\]"):
        SchedulerSpec.parse("ddpm:nope=1").build(pipeline.scheduler)
    with pytest.raises(ValueError, match="is not key=value"):
        SchedulerSpec.parse("ddpm:fixed_large")


def test_evaluate_samplers_reports_every_sampler_and_step_count(torch_single_thread):
    pipeline = tiny_pipeline(num_class_embeds=10)
    reference, _ = reference_digits()
    results = evaluate_samplers(
        pipeline,
        reference,
        metrics=("fd", "accuracy"),
        num_samples=20,
        steps=(4, "ddim5"),
        schedulers=("ddpm",),
        seeds=2,
        batch_size=10,
        show_progress=False,
    )
    for steps in ("4", "ddim5"):
        numbers = results["ddpm"][steps]
        assert len(numbers["fd_per_seed"]) == 2 and numbers["fd"] > 0 and numbers["fd_stderr"] is not None
        assert 0.0 <= numbers["accuracy"] <= 1.0
    with pytest.raises(ValueError, match="only 'ddpm' \\(our scheduler\\) takes"):
        evaluate_samplers(
            pipeline, reference, steps=("ddim5",), schedulers=("DDIMScheduler",), show_progress=False
        )
    assert type(pipeline.scheduler).__name__ == "DDPMScheduler"  # the saved scheduler is put back
