"""Training: configuration ↔ command line, the objectives, and tiny end-to-end runs (output layout, EMA,
checkpoint rotation, determinism of stop + resume, gradient accumulation)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAINING
from PIL import Image
from safetensors.torch import load_file

from ddpm_components.cli import build_parser, main
from ddpm_components.scheduling_ddpm import DDPMScheduler
from ddpm_components.training import TrainingConfig, list_checkpoints, train, training_loss

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TINY = TINY_TRAINING


def tiny_config(output_dir: Path, **overrides) -> TrainingConfig:
    return TrainingConfig(output_dir=str(output_dir), **{**TINY, **overrides})


# ----------------------------------------------------------------------------------- configuration and CLI
def test_the_saved_scheduler_is_the_measured_few_step_setting():
    """The saved sampler: DDPM's step with DPM-Solver++(2M)'s extrapolation on trailing timesteps (issue 11's
    measured recommendation); both keys can be set back to diffusers' plain DDPM step."""
    from ddpm_components.training import build_scheduler

    config = build_scheduler(TrainingConfig()).config
    assert (config.multistep_order, config.timestep_spacing, config.eta) == (2, "trailing", 1.0)
    plain = build_scheduler(TrainingConfig(multistep_order=1, timestep_spacing="leading")).config
    assert (plain.multistep_order, plain.timestep_spacing) == (1, "leading")


def test_every_field_is_a_flag_with_the_same_default():
    parser = build_parser()
    args = parser.parse_args(["train"])
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    flags = {option for action in train_parser._actions for option in action.option_strings}
    defaults = TrainingConfig()
    for item in dataclasses.fields(TrainingConfig):
        assert "--" + item.name.replace("_", "-") in flags, item.name
        assert getattr(args, item.name) == getattr(defaults, item.name), item.name
    for required in [
        "--output-dir",
        "--train-data-dir",
        "--resolution",
        "--train-batch-size",
        "--max-train-steps",
        "--learning-rate",
        "--seed",
        "--mixed-precision",
        "--checkpointing-steps",
        "--resume",
        "--push-to-hub",
        "--hub-model-id",
    ]:
        assert required in flags, required


def test_flags_parse_to_typed_config_values():
    args = build_parser().parse_args(
        [
            *("train", "--resolution", "16", "--learning-rate", "3e-4", "--no-use-ema", "--learned-variance"),
            *("--prediction-type", "v_prediction", "--resume", "latest", "--block-out-channels", "8,16"),
        ]
    )
    config = TrainingConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingConfig)})
    assert config.resolution == 16 and config.learning_rate == 3e-4
    assert config.use_ema is False and config.learned_variance is True
    assert config.prediction_type == "v_prediction" and config.resume == "latest"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"prediction_type": "noise"},
            "prediction_type must be one of 'epsilon', 'sample', 'v_prediction', got 'noise'",
        ),
        ({"mixed_precision": "fp8"}, "mixed_precision must be one of 'no', 'fp16', 'bf16', got 'fp8'"),
        ({"loss_weighting": "snr"}, "loss_weighting must be one of 'uniform', 'min_snr', got 'snr'"),
        ({"train_batch_size": 0}, "train_batch_size must be a positive integer, got 0"),
        ({"label_dropout": 1.0}, "label_dropout must be in"),
        ({"block_out_channels": "8,x"}, "comma-separated integers"),
        ({"push_to_hub": True}, "hub_model_id"),
        ({"cpu_threads": 0}, "cpu_threads must be a positive integer, got 0"),
        ({"process_group_timeout": 0}, "process_group_timeout must be a positive integer, got 0"),
        ({"vlb_weight": -0.5}, "vlb_weight must be zero or positive, got -0.5"),
        ({"max_grad_norm": -1.0}, "max_grad_norm must be zero or positive, got -1.0"),
        ({"adam_beta2": 1.0}, r"adam_beta2 must be in \[0, 1\), got 1.0"),
        (
            {"model_preset": "mnist"},
            "model_preset must be one of 'digits', 'cifar10', 'celebahq256', 'lsun256'",
        ),
    ],
)
def test_invalid_values_raise_value_error_naming_them(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**overrides)


def test_process_group_timeout_reaches_accelerate(tmp_path):
    """--process-group-timeout becomes accelerate's InitProcessGroupKwargs (passed to init_process_group)."""
    from datetime import timedelta

    from accelerate.state import AcceleratorState

    from ddpm_components.training import _build_accelerator

    config = build_parser().parse_args(["train", "--process-group-timeout", "90"])
    assert config.process_group_timeout == 90
    accelerator = _build_accelerator(TrainingConfig(process_group_timeout=90), tmp_path)
    try:
        assert accelerator.init_handler.timeout == timedelta(seconds=90)
        assert accelerator.init_handler.to_kwargs() == {"timeout": timedelta(seconds=90)}
    finally:
        AcceleratorState._reset_state()


def test_a_collective_timeout_is_reported_with_the_option_that_raises_it():
    from ddpm_components.cli import describe_error

    error = RuntimeError(
        "[gloo/unbound_buffer.cc:129] Timed out waiting 2000ms for send operation to complete"
    )
    code, message = describe_error(error)
    assert code == 1 and "Timed out waiting 2000ms" in message and "raise --process-group-timeout" in message
    assert "bug" not in message


def test_cli_reports_invalid_option_with_exit_code_2(capsys):
    assert main(["train", "--lr-scheduler", "sometimes"]) == 2
    error = capsys.readouterr().err
    assert "lr_scheduler must be one of" in error and "'sometimes'" in error


def test_config_round_trips_through_dict():
    config = TrainingConfig(learning_rate=1e-4, resume="latest")
    assert TrainingConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown training option"):
        TrainingConfig.from_dict({"learning_rat": 1.0})


# -------------------------------------------------------------------------------------------- objectives
class _Recorder(torch.nn.Module):
    """A stand-in U-Net: output = a learnable tensor (broadcast); records its inputs."""

    def __init__(self, channels: int):
        super().__init__()
        self.output = torch.nn.Parameter(torch.randn(1, channels, 4, 4))
        self.calls: list[dict] = []

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        self.calls.append({"sample": sample, "timestep": timestep, "class_labels": class_labels})
        return (self.output.expand(sample.shape[0], -1, -1, -1),)


def _draws(generator_seed: int, shape, num_train_timesteps: int):
    generator = torch.Generator().manual_seed(generator_seed)
    timesteps = torch.randint(0, num_train_timesteps, (shape[0],), generator=generator)
    noise = torch.randn(shape, generator=generator)
    return timesteps, noise


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_simple_loss_matches_diffusers_forward_process(prediction_type):
    from diffusers import DDPMScheduler as DiffusersDDPMScheduler

    x0 = torch.rand(6, 2, 4, 4) * 2 - 1
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    model = _Recorder(2)
    terms = training_loss(model, scheduler, x0, generator=torch.Generator().manual_seed(3))
    assert terms.vb is None and terms.mse is terms.loss  # L_simple alone
    loss = terms.loss

    oracle = DiffusersDDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    timesteps, noise = _draws(3, x0.shape, 100)
    noisy = oracle.add_noise(x0, noise, timesteps)
    torch.testing.assert_close(model.calls[0]["sample"], noisy, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.calls[0]["timestep"], timesteps)
    target = {"epsilon": noise, "sample": x0, "v_prediction": oracle.get_velocity(x0, noise, timesteps)}
    expected = ((model.output - target[prediction_type]) ** 2).mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_min_snr_weights_the_per_sample_mse():
    x0 = torch.rand(8, 1, 4, 4) * 2 - 1
    scheduler = DDPMScheduler(num_train_timesteps=100)
    model = _Recorder(1)
    loss = training_loss(
        model,
        scheduler,
        x0,
        generator=torch.Generator().manual_seed(1),
        loss_weighting="min_snr",
        snr_gamma=2.0,
    ).loss
    timesteps, noise = _draws(1, x0.shape, 100)
    alphas_cumprod = scheduler.alphas_cumprod[timesteps].double()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    weights = snr.clamp(max=2.0) / snr  # Hang et al. 2023 for epsilon prediction
    per_sample = ((model.output - noise) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, (weights.float() * per_sample).mean(), atol=1e-5, rtol=1e-4)
    assert float(weights.min()) < 0.5  # the weighting is active in this draw


def test_hybrid_loss_vlb_gradient_reaches_only_the_variance_channels():
    x0 = torch.rand(4, 1, 4, 4) * 2 - 1
    scheduler = DDPMScheduler(num_train_timesteps=100, variance_type="learned_range")
    grads, terms = {}, {}
    for name, vlb_weight in {"hybrid": 0.001, "simple": 0.0}.items():
        torch.manual_seed(0)
        model = _Recorder(2)
        terms[name] = training_loss(
            model,
            scheduler,
            x0,
            generator=torch.Generator().manual_seed(5),
            learned_variance=True,
            vlb_weight=vlb_weight,
        )
        terms[name].loss.backward()
        grads[name] = (terms[name].loss.detach(), model.output.grad.clone())
        output = model.output.detach().expand(4, -1, -1, -1)
    # mean channel: the same gradient with and without the vlb term (stop-gradient on the mean)
    torch.testing.assert_close(grads["hybrid"][1][:, :1], grads["simple"][1][:, :1], atol=1e-7, rtol=1e-6)
    assert torch.count_nonzero(grads["simple"][1][:, 1:]) == 0
    assert torch.count_nonzero(grads["hybrid"][1][:, 1:]) > 0
    # the vlb term is vlb_weight * T * mean(L_t) in bits/dim
    timesteps, noise = _draws(5, x0.shape, 100)
    sample = scheduler.add_noise(x0, noise, timesteps)
    vlb = scheduler.vlb_terms(output, x0, sample, timesteps)
    torch.testing.assert_close(
        grads["hybrid"][0] - grads["simple"][0], 0.001 * 100 * vlb.mean(), atol=1e-5, rtol=1e-4
    )
    # the terms: loss = mse + vlb_weight * T * vb, with vb the mean L_t (also reported when not added)
    for name in ("hybrid", "simple"):
        torch.testing.assert_close(terms[name].vb.detach(), vlb.mean(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(terms[name].mse.detach(), grads["simple"][0], atol=1e-6, rtol=1e-6)


def test_label_dropout_replaces_labels_with_the_null_class():
    x0 = torch.zeros(64, 1, 4, 4)
    model = _Recorder(1)
    labels = torch.arange(64) % 10
    training_loss(
        model,
        DDPMScheduler(num_train_timesteps=10),
        x0,
        generator=torch.Generator().manual_seed(0),
        class_labels=labels,
        null_class_label=10,
        label_dropout=0.3,
    )
    seen = model.calls[0]["class_labels"]
    dropped = seen == 10
    assert 5 <= int(dropped.sum()) <= 35
    assert torch.equal(seen[~dropped], labels[~dropped])


# ------------------------------------------------------------------------------------------- end to end
def _unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def test_tiny_training_run_writes_the_loadable_pipeline_and_records(tmp_path):
    from diffusers import DiffusionPipeline

    output_dir = tmp_path / "run"
    config = tiny_config(output_dir, max_train_steps=4, checkpointing_steps=1, checkpoints_total_limit=2)
    summary = train(config)
    assert summary["global_step"] == 4 and math.isfinite(summary["loss"])

    # checkpoints: the newest two, complete, nothing temporary left
    assert [path.name for path in list_checkpoints(output_dir)] == ["checkpoint-3", "checkpoint-4"]
    assert not [p for p in output_dir.iterdir() if p.name.startswith(("tmp-", "deleting-"))]
    for checkpoint in list_checkpoints(output_dir):
        names = {p.name for p in checkpoint.iterdir()}
        assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "run.json"} <= names
        assert {"custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"} <= names  # EMA, step counter
        # safetensors creates its files 0o600: a checkpoint's files all get the mode of run.json (the umask's)
        modes = {stat.S_IMODE(p.stat().st_mode) for p in checkpoint.iterdir()}
        assert os.name != "posix" or modes == {stat.S_IMODE((checkpoint / "run.json").stat().st_mode)}, modes

    # the saved configuration (shared with the model) names folders without the local path; one run id
    saved = json.loads((output_dir / "training_config.json").read_text())
    assert TrainingConfig.from_dict(saved) == dataclasses.replace(config, output_dir="run")
    for shared in ("training_config.json", "README.md"):
        assert str(tmp_path) not in (output_dir / shared).read_text(), shared
    run_ids = {json.loads((c / "run.json").read_text())["run_id"] for c in list_checkpoints(output_dir)}
    assert run_ids == {saved["run_id"]} and len(saved["run_id"]) == 32
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["images_per_second"] > 0 and r["lr"] > 0 for r in records)
    grid = Image.open(output_dir / "samples.png")
    assert grid.size[0] > 0 and grid.size[1] == 10 * grid.size[0]  # one row per digit class, one column

    index = json.loads((output_dir / "model_index.json").read_text())
    assert index["unet"] == ["unet_ddpm", "DDPMUNet2DModel"]
    assert (output_dir / "unet" / "unet_ddpm.py").exists() and (
        output_dir / "scheduler" / "scheduling_ddpm.py"
    ).exists()
    pipeline = DiffusionPipeline.from_pretrained(str(output_dir), trust_remote_code=True)
    assert pipeline.unet.config.num_class_embeds == 10 and tuple(pipeline.unet.config.block_out_channels) == (
        8,
        16,
    )
    images = pipeline(batch_size=2, num_inference_steps=2, class_labels=[3, 7], output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


def test_train_runs_again_in_the_same_process_with_another_mixed_precision(tmp_path):
    # accelerate refused the second run: "AcceleratorState has already been initialized"
    for precision in ("no", "bf16"):
        summary = train(
            tiny_config(
                tmp_path / precision, max_train_steps=1, checkpointing_steps=0, mixed_precision=precision
            )
        )
        assert summary["global_step"] == 1 and math.isfinite(summary["loss"])


def test_saved_weights_are_the_ema_weights(tmp_path):
    with_ema = train(tiny_config(tmp_path / "ema", max_train_steps=3, checkpointing_steps=0))
    without = train(tiny_config(tmp_path / "raw", max_train_steps=3, checkpointing_steps=0, use_ema=False))
    assert with_ema["global_step"] == without["global_step"] == 3
    ema_weights, raw_weights = _unet_weights(tmp_path / "ema"), _unet_weights(tmp_path / "raw")
    assert any(not torch.equal(ema_weights[k], raw_weights[k]) for k in raw_weights)


def test_stop_and_resume_gives_the_same_weights_as_one_run(tmp_path):
    # 1797 digits // 128 = 14 batches per epoch: the first part stops mid-epoch, the whole run crosses an epoch;
    # dropout, warm-up and EMA are on, so every source of randomness and every piece of state is exercised
    common = dict(
        train_batch_size=128, model_dropout=0.1, lr_scheduler="constant_with_warmup", lr_warmup_steps=3
    )
    train(tiny_config(tmp_path / "whole", max_train_steps=18, checkpointing_steps=0, **common))
    first = train(tiny_config(tmp_path / "parts", max_train_steps=8, checkpointing_steps=4, **common))
    assert first["global_step"] == 8
    resumed = train(
        tiny_config(tmp_path / "parts", max_train_steps=18, checkpointing_steps=4, resume="latest", **common)
    )
    assert resumed["global_step"] == 18
    one_run, two_runs = _unet_weights(tmp_path / "whole"), _unet_weights(tmp_path / "parts")
    for name, tensor in one_run.items():
        torch.testing.assert_close(two_runs[name], tensor, rtol=0, atol=0, msg=name)
    # the metrics of the resumed run continue the first run's
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 19))


def test_resume_puts_the_ema_weights_back_on_the_training_device(tmp_path, monkeypatch):
    """accelerate's load_state restores registered objects with map_location="cpu"; on a GPU the EMA shadow
    weights then sat on the CPU and the next EMA step failed. Here (CPU only) the test checks that the EMA
    is moved to the accelerator's device after its state was loaded."""
    from diffusers.training_utils import EMAModel

    train(tiny_config(tmp_path / "run", max_train_steps=2, checkpointing_steps=2))
    events = []
    original_load, original_to = EMAModel.load_state_dict, EMAModel.to

    def load_state_dict(self, state_dict):
        events.append("load")
        return original_load(self, state_dict)

    def to(self, device=None, dtype=None, **kwargs):
        events.append(("to", str(device)))
        return original_to(self, device=device, dtype=dtype, **kwargs)

    monkeypatch.setattr(EMAModel, "load_state_dict", load_state_dict)
    monkeypatch.setattr(EMAModel, "to", to)
    summary = train(tiny_config(tmp_path / "run", max_train_steps=3, checkpointing_steps=0, resume="latest"))
    assert summary["global_step"] == 3
    assert "load" in events and ("to", "cpu") in events[events.index("load") :]


def test_resume_with_more_steps_uses_the_new_schedule_from_the_first_resumed_step(tmp_path):
    # cosine over 4 steps ends at lr 0; resumed to 6 steps, step 5 must use the 6-step schedule's rate
    # (it used the checkpoint's 0 and changed nothing)
    common = dict(lr_scheduler="cosine", checkpoints_total_limit=None, use_ema=False)
    train(tiny_config(tmp_path / "run", max_train_steps=4, checkpointing_steps=4, **common))
    train(tiny_config(tmp_path / "run", max_train_steps=6, checkpointing_steps=1, resume="latest", **common))
    step4 = load_file(tmp_path / "run" / "checkpoint-4" / "model.safetensors")
    step5 = load_file(tmp_path / "run" / "checkpoint-5" / "model.safetensors")
    assert any(not torch.equal(step4[name], step5[name]) for name in step4)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # the rate logged after step 5 is the 6-step cosine's for step 6: lr * (1 + cos(pi * 5 / 6)) / 2
    expected = 2e-3 * (1 + math.cos(math.pi * 5 / 6)) / 2
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[4]["lr"] == pytest.approx(expected, rel=1e-6)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    summary = train(
        tiny_config(
            tmp_path / "acc",
            max_train_steps=3,
            gradient_accumulation_steps=2,
            checkpointing_steps=3,
            debug_record=True,
        )
    )
    assert summary["global_step"] == 3
    first = json.loads((tmp_path / "acc" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    # 3 optimizer steps consumed 2 micro-batches each, and AdamW stepped once per optimizer step
    lines = (tmp_path / "acc" / "debug" / "sample_indices.jsonl").read_text().splitlines()
    assert [json.loads(line)["micro_step"] for line in lines] == list(range(6))
    state = torch.load(tmp_path / "acc" / "checkpoint-3" / "optimizer.bin", weights_only=True)["state"]
    assert state and all(int(entry["step"]) == 3 for entry in state.values())


def test_folder_data_learned_variance_v_prediction_min_snr_checkpointing_tensorboard(tmp_path):
    rng = np.random.default_rng(0)
    for label in ["circle", "square"]:
        for index in range(6):
            path = tmp_path / "images" / label / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(path)
    config = tiny_config(
        tmp_path / "out",
        train_data_dir=str(tmp_path / "images"),
        resolution=8,
        train_batch_size=4,
        max_train_steps=3,
        learned_variance=True,
        prediction_type="v_prediction",
        loss_weighting="min_snr",
        random_flip=True,
        crop="random",
        checkpointing_steps=0,
        samples_per_class=2,
        gradient_checkpointing=True,
        report_to="tensorboard",
    )
    summary = train(config)
    assert summary["global_step"] == 3 and math.isfinite(summary["loss"])
    unet_config = json.loads((tmp_path / "out" / "unet" / "config.json").read_text())
    assert (
        unet_config["in_channels"] == 3
        and unet_config["out_channels"] == 6
        and unet_config["num_class_embeds"] == 2
    )
    assert list((tmp_path / "out" / "logs").rglob("events.out.tfevents.*"))  # tensorboard through accelerate
    # both terms of the hybrid loss are logged: loss = mse + vlb_weight * T * vb (T = 50)
    for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["vb"] > 0 and record["mse"] > 0
        assert record["loss"] == pytest.approx(record["mse"] + 0.001 * 50 * record["vb"], rel=1e-5)
    scheduler_config = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert (
        scheduler_config["variance_type"] == "learned_range"
        and scheduler_config["prediction_type"] == "v_prediction"
    )


def test_empty_data_folder_fails_before_training(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["train", "--train-data-dir", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert "no image files" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_resume_from_a_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(tiny_config(tmp_path / "out", resume=str(tmp_path / "checkpoint-7")))
    assert not (tmp_path / "out").exists()


def test_evaluation_during_and_after_training(tmp_path, capsys):
    """--eval-every-steps logs the digits FD and a bits/dim estimate to metrics.jsonl; the final numbers are printed
    and go into the model card with how they were measured."""
    folder = tmp_path / "run"
    flags = ["--block-out-channels", "8,16", "--layers-per-block", "1", "--train-batch-size", "16"]
    flags += ["--num-inference-steps", "2", "--samples-per-class", "1", "--num-train-timesteps", "50"]
    flags += ["--max-train-steps", "4", "--eval-every-steps", "2", "--eval-num-samples", "20"]
    flags += ["--eval-inference-steps", "5", "--eval-bpd-timesteps", "3", "--checkpointing-steps", "0"]
    assert main(["train", "--output-dir", str(folder), *flags]) == 0
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    evaluations = [record for record in records if "eval_fd" in record]
    assert [record["step"] for record in evaluations] == [2, 4]
    for record in evaluations:
        assert record["eval_fd"] > 0 and record["eval_bpd"] > 0 and record["eval_bpd_stderr"] >= 0
        assert record["eval_fd_few_steps"] > 0 and record["eval_fd_few_steps"] != record["eval_fd"]
    few = f"{evaluations[-1]['eval_fd_few_steps']:.2f} at 10 steps"  # the default --eval-few-steps
    assert "evaluation: digits FD" in printed and f"(20 samples, 5 steps; {few})" in printed, printed
    assert "bits/dim" in printed
    card = (folder / "README.md").read_text()
    assert "## Evaluation" in card and "digits FD, 20 samples, 5 steps of the model's scheduler" in card
    assert f"{evaluations[-1]['eval_fd']:.2f}" in card
    assert "digits FD, 20 samples, 10 steps of the model's scheduler (few steps)" in card
    assert (
        "bits/dim on the digits' held-out test split (unbiased estimate from 3 timesteps per image)" in card
    )
    with pytest.raises(
        ValueError, match=r"eval_inference_steps \(60\) must be at most num_train_timesteps \(50\)"
    ):
        TrainingConfig(**{**TINY, "evaluate": True, "eval_inference_steps": 60})


def _tiny_folder_flags(tmp_path: Path) -> list[str]:
    """``train`` flags for a tiny model on the 8×8 RGB images in ``tmp_path / "images"``."""
    flags = [
        "--train-data-dir",
        str(tmp_path / "images"),
        "--resolution",
        "8",
        "--block-out-channels",
        "8,16",
    ]
    return [*flags, "--layers-per-block", "1", "--train-batch-size", "4", "--num-inference-steps", "2"]


def test_folder_data_gets_an_fid_with_inception_weights(tmp_path, capsys, monkeypatch):
    """With --inception-weights a folder dataset's evaluation adds the FID (a stand-in network here: the real
    weights cannot be downloaded in tests); a missing weights file fails before training, in one line."""
    import ddpm_components.evaluation as evaluation

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for index in range(12):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"{index}.png"
        )
    flags = _tiny_folder_flags(tmp_path)
    flags += ["--num-train-timesteps", "20", "--max-train-steps", "2", "--eval-num-samples", "6"]
    flags += ["--eval-inference-steps", "2", "--checkpointing-steps", "0", "--inception-weights"]
    code = main(["train", "--output-dir", str(tmp_path / "refused"), *flags, str(tmp_path / "missing.pth")])
    assert code == 2 and not (tmp_path / "refused").exists()
    assert len(capsys.readouterr().err.strip().splitlines()) == 1

    class StandIn(torch.nn.Module):
        num_features = 4

        def __init__(self, weights) -> None:
            super().__init__()
            self.projection = torch.randn(3 * 8 * 8, 4, generator=torch.Generator().manual_seed(0))

        def forward(self, images):
            return images.reshape(images.shape[0], -1).float() @ self.projection

    monkeypatch.setattr(evaluation, "find_inception_weights", lambda weights=None: Path(weights))
    monkeypatch.setattr(evaluation, "InceptionFeatures", StandIn)
    assert main(["train", "--output-dir", str(tmp_path / "run"), *flags, str(tmp_path / "stand-in.pth")]) == 0
    assert "evaluation: FID" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["eval_fid"] > 0 for record in records if "eval_fid" in record] == [True]
    assert "FID (Inception-V3), 6 samples" in (tmp_path / "run" / "README.md").read_text()


def test_one_inception_check_and_one_sample_quality_per_run(tmp_path, monkeypatch):
    """The Inception weights file (92 MB) is hashed once per run, not at every construction of the config (the
    command line's, train()'s, the epoch conversion's) nor at every evaluation; all the evaluations of a run share one
    SampleQuality (one feature network, reference features computed once). Stand-ins: a small file whose SHA-256
    prefix is made the expected one, and a network that checks its weights as InceptionFeatures does."""
    import hashlib
    import sys
    import types

    import ddpm_components.evaluation as evaluation

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for index in range(12):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"{index}.png"
        )
    weights = tmp_path / "stand-in.pth"
    weights.write_bytes(b"not the Inception weights")
    monkeypatch.setattr(
        evaluation, "_INCEPTION_SHA256_PREFIX", hashlib.sha256(weights.read_bytes()).hexdigest()[:8]
    )
    import torchmetrics.image.fid  # noqa: F401  (imported first: it checks whether torch_fidelity is installed)

    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    hashes, qualities, networks = [], [], []
    real_sha256, real_quality = hashlib.sha256, evaluation.SampleQuality

    def counting_sha256(*args, **kwargs):
        if sys._getframe(1).f_globals.get("__name__") == evaluation.__name__:
            hashes.append(1)
        return real_sha256(*args, **kwargs)

    class CountedQuality(real_quality):
        def __init__(self, *args, **kwargs) -> None:
            qualities.append(1)
            super().__init__(*args, **kwargs)

    class StandIn(torch.nn.Module):
        num_features = 4

        def __init__(self, weights) -> None:
            super().__init__()
            evaluation.find_inception_weights(weights)  # as InceptionFeatures does
            networks.append(1)
            self.projection = torch.randn(3 * 8 * 8, 4, generator=torch.Generator().manual_seed(0))

        def forward(self, images):
            return images.reshape(images.shape[0], -1).float() @ self.projection

    monkeypatch.setattr(hashlib, "sha256", counting_sha256)
    monkeypatch.setattr(evaluation, "SampleQuality", CountedQuality)
    monkeypatch.setattr(evaluation, "InceptionFeatures", StandIn)
    flags = _tiny_folder_flags(tmp_path)
    flags += ["--num-train-timesteps", "20", "--num-epochs", "1", "--eval-every-steps", "1"]
    flags += ["--eval-num-samples", "4", "--eval-inference-steps", "2", "--checkpointing-steps", "0"]
    flags += ["--inception-weights", str(weights)]
    assert main(["train", "--output-dir", str(tmp_path / "run"), *flags]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "eval_fid" in record] == [1, 2, 3]
    assert len(hashes) == 1 and len(networks) == 1 and len(qualities) == 1


def test_digits_evaluations_share_one_sample_quality(tmp_path, monkeypatch):
    """On the digits, the evaluations of a run share one SampleQuality: the digits classifier is loaded and the
    reference features are computed once, not at every evaluation."""
    import ddpm_components.evaluation as evaluation

    classifiers = []
    real_features = evaluation._DigitsFeatures

    class CountedFeatures(real_features):
        def __init__(self) -> None:
            classifiers.append(1)
            super().__init__()

    monkeypatch.setattr(evaluation, "_DigitsFeatures", CountedFeatures)
    config = tiny_config(
        tmp_path / "run",
        max_train_steps=3,
        evaluate=True,
        eval_every_steps=1,
        eval_num_samples=4,
        eval_inference_steps=2,
        eval_bpd_timesteps=2,
        checkpointing_steps=0,
    )
    train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "eval_fd" in record] == [1, 2, 3]
    assert len(classifiers) == 1


def test_periodic_saves_leave_a_loadable_pipeline_during_training(tmp_path, monkeypatch):
    """--save-model-steps 2 of 5: the EMA pipeline is saved at steps 2 and 4 and at the end; the save of step 2
    loads with diffusers' DiffusionPipeline and samples, and the checkpoints are untouched."""
    import shutil

    from diffusers import DiffusionPipeline

    from ddpm_components.pipeline_ddpm import DDPMPipeline

    saved: list[Path] = []
    original = DDPMPipeline.save_pretrained

    def save_and_copy(self, save_directory, **kwargs):
        result = original(self, save_directory, **kwargs)
        saved.append(
            shutil.copytree(save_directory, tmp_path / f"save-{len(saved)}", ignore=_only_the_pipeline)
        )
        return result

    monkeypatch.setattr(DDPMPipeline, "save_pretrained", save_and_copy)
    config = tiny_config(
        tmp_path / "out", max_train_steps=5, save_model_steps=2, checkpointing_steps=2, evaluate=False
    )
    train(config)
    assert len(saved) == 3  # steps 2 and 4, then the final save
    pipeline = DiffusionPipeline.from_pretrained(saved[0], trust_remote_code=True)
    images = pipeline(batch_size=1, num_inference_steps=2, output_type="np", class_labels=[0]).images
    assert images.shape[0] == 1 and np.isfinite(images).all()
    assert [path.name for path in list_checkpoints(tmp_path / "out")][-1] == "checkpoint-5"
    with pytest.raises(ValueError, match="save_model_steps must be zero or positive"):
        tiny_config(tmp_path / "other", save_model_steps=-1)


def _only_the_pipeline(folder, names):
    return [name for name in names if name.startswith("checkpoint-") or name in ("samples", "logs")]


def test_bf16_on_a_cpu_without_amx_warns_before_training(monkeypatch, caplog, tmp_path):
    """bfloat16 is emulated (slower than float32) on CPUs without AMX: one warning; none with AMX or in float32."""
    import logging

    from ddpm_components.training import TrainingConfig, _warn_if_bf16_is_slow_here

    cpu = torch.device("cpu")
    bf16 = TrainingConfig(output_dir=str(tmp_path), mixed_precision="bf16")
    with caplog.at_level(logging.WARNING, logger="ddpm_components.training"):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        _warn_if_bf16_is_slow_here(bf16, cpu)
        _warn_if_bf16_is_slow_here(TrainingConfig(output_dir=str(tmp_path)), cpu)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
        _warn_if_bf16_is_slow_here(bf16, cpu)
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and "without AMX" in warnings[0] and "--mixed-precision no" in warnings[0]


@pytest.mark.parametrize("max_norm", [0.5, 1e6, math.inf])
@pytest.mark.parametrize("poison", [None, math.nan])
def test_clipping_equals_torch_clip_grad_norm(max_norm, poison):
    """_clip_grad_norm is torch's clip_grad_norm_ without its wrappers: the same norm and the same gradient bits, also
    where it skips multiplying by a factor of exactly 1 (no clipping needed) and where the norm is NaN."""
    from types import SimpleNamespace

    from ddpm_components.training import _clip_grad_norm

    generator = torch.Generator().manual_seed(0)
    ours = [
        torch.randn(shape, generator=generator).requires_grad_() for shape in [(8, 3), (5,), (4, 4, 3, 3)]
    ]
    theirs = [parameter.detach().clone().requires_grad_() for parameter in ours]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn(a.shape, generator=generator)
        b.grad = a.grad.clone()
    if poison is not None:
        ours[1].grad[0] = theirs[1].grad[0] = poison
    accelerator = SimpleNamespace(unscale_gradients=lambda: None)
    norm = _clip_grad_norm(accelerator, ours, max_norm, plain=True)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, foreach=True)
    assert torch.equal(norm, expected) or (norm.isnan() and expected.isnan())
    for a, b in zip(ours, theirs):
        assert torch.equal(a.grad.nan_to_num(7.0), b.grad.nan_to_num(7.0))
