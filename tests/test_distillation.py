"""Progressive distillation (``ddpm_components.distillation``, ``ddpm-components distill``): the target against two
DDIM steps of diffusers' DDIMScheduler, a tiny round's fidelity, the saved few-step pipeline loaded without our
package, stop + resume, and the command line's one-line errors."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAINING
from diffusers import DDIMScheduler
from safetensors.torch import load_file

from ddpm_components import DDPMPipeline
from ddpm_components.cli import main
from ddpm_components.distillation import (
    DistillationConfig,
    Grid,
    _DistillLoop,
    distill,
    plan_rounds,
    sample_on_grid,
    student_scheduler,
    student_targets,
    trailing_grid,
    v_from_x0,
    x0_and_eps,
)
from ddpm_components.scheduling_ddpm import DDPMScheduler
from ddpm_components.training import TrainingConfig, train

pytestmark = pytest.mark.usefixtures("torch_single_thread")


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unconditional ε-prediction teacher on 8×8 digits, T = 32, trained for 100 tiny steps (about 2 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = tmp_path_factory.mktemp("distill") / "teacher"
        options = {**TINY_TRAINING, "num_train_timesteps": 32, "max_train_steps": 100, "conditioning": "none"}
        train(TrainingConfig(output_dir=str(folder), **options))
    finally:
        torch.set_num_threads(threads)
    return folder


def tiny_distill(teacher: Path, output: Path, **overrides) -> DistillationConfig:
    options = dict(
        model=str(teacher),
        output_dir=str(output),
        teacher_steps=4,
        target_steps=2,
        steps_per_round=4,
        train_batch_size=16,
        logging_steps=1,
        checkpointing_steps=0,
        evaluate=False,
    )
    return DistillationConfig(**{**options, **overrides})


# ---------------------------------------------------------------------------------------------- the target
class GaussianOptimalEpsilon(torch.nn.Module):
    """The exact E[ε | z_t] for data x_0 ~ N(0, s² I): ε̂ = σ_t z_t / (α_t² s² + σ_t²)."""

    def __init__(self, alphas_cumprod: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.alphas_cumprod = alphas_cumprod.double()
        self.scale = scale

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        bar = self.alphas_cumprod[timesteps.cpu().long()].to(sample.dtype).reshape(-1, 1, 1, 1)
        sigma = (1 - bar).sqrt()
        return sigma * sample / (bar * self.scale**2 + 1 - bar)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_one_student_step_from_the_target_lands_on_two_teacher_ddim_steps(prediction_type):
    """The target x̃ (as v) fed to the saved student sampler (diffusers' DDIMScheduler, trailing, η = 0) reproduces two
    DDIM steps of the teacher, computed by an independent DDIMScheduler at twice the steps, to 1e-5."""
    num_train = 32
    teacher_scheduler = DDPMScheduler(num_train_timesteps=num_train, beta_schedule="squaredcos_cap_v2")
    alphas_cumprod = teacher_scheduler._alphas_cumprod64
    epsilon = GaussianOptimalEpsilon(alphas_cumprod, scale=0.7)
    if prediction_type == "epsilon":
        teacher = epsilon
    else:  # the same exact teacher, as v = α ε − σ x_0 with x_0 = (z − σ ε)/α

        def teacher(sample, timesteps):
            bar = alphas_cumprod[timesteps.cpu()].to(sample.dtype).reshape(-1, 1, 1, 1)
            eps = epsilon(sample, timesteps)
            x0 = (sample - (1 - bar).sqrt() * eps) / bar.sqrt()
            return bar.sqrt() * eps - (1 - bar).sqrt() * x0

    oracle = DDIMScheduler(
        num_train_timesteps=num_train,
        beta_schedule="squaredcos_cap_v2",
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        clip_sample=False,
        prediction_type=prediction_type,
    )
    oracle.set_timesteps(8)
    saved = student_scheduler(teacher_scheduler, alphas_cumprod, 4)
    assert (saved.config.eta, saved.config.multistep_order) == (
        0.0,
        2,
    )  # sampling adds DPM-Solver++'s extrapolation
    # the target is defined by single DDIM steps (first order): each call below starts from an unrelated sample
    student = type(saved).from_config(saved.config, multistep_order=1)
    student.set_timesteps(4)
    assert student.timesteps.tolist() == trailing_grid(num_train, 4) == [31, 23, 15, 7]
    assert oracle.timesteps.tolist() == trailing_grid(num_train, 8)

    teacher_grid, student_grid = Grid(alphas_cumprod, 8), Grid(alphas_cumprod, 4)
    generator = torch.Generator().manual_seed(0)
    for position, t in enumerate(student.timesteps.tolist()):
        index = 4 - position
        sample = torch.randn((3, 1, 4, 4), generator=generator, dtype=torch.float64)
        _, v_target = student_targets(
            teacher, prediction_type, teacher_grid, student_grid, sample, torch.full((3,), index)
        )
        # two teacher steps with diffusers' DDIM
        z = sample
        for teacher_t in oracle.timesteps.tolist()[2 * position : 2 * position + 2]:
            output = teacher(z, torch.full((3,), teacher_t))
            z = oracle.step(output, teacher_t, z, eta=0.0).prev_sample
        one_step = student.step(v_target, t, sample, eta=0.0).prev_sample
        torch.testing.assert_close(one_step, z, rtol=0, atol=1e-5)
        # the naive target (the teacher's own x̂_0 at t, one teacher step) misses the two-step result: the test can fail
        alpha, sigma = student_grid.at(torch.full((3,), index), sample)
        x0_teacher, _ = x0_and_eps(
            teacher(sample, torch.full((3,), t)), sample, alpha, sigma, prediction_type
        )
        naive = student.step(v_from_x0(x0_teacher, sample, alpha, sigma), t, sample, eta=0.0).prev_sample
        assert (naive - z).abs().max() > 1e-3


def test_the_rounds_halve_down_to_the_target_and_the_bridge_keeps_the_step_count():
    config = DistillationConfig(model="m", output_dir="o", target_steps=4, steps_per_round=10)
    rounds = plan_rounds(config, 256, "epsilon")
    assert [(r.teacher_steps, r.student_steps) for r in rounds] == [(256 >> k, 128 >> k) for k in range(6)]
    assert [r.teacher_prediction_type for r in rounds] == ["epsilon"] + ["v_prediction"] * 5
    bridged = plan_rounds(DistillationConfig(model="m", output_dir="o", bridge_steps=7), 16, "epsilon")
    assert [(r.teacher_steps, r.student_steps, r.num_optimizer_steps) for r in bridged] == [
        (16, 16, 7),
        (16, 8, 300),
        (8, 4, 300),
    ]


# ------------------------------------------------------------------------------------------- a tiny round
def test_a_tiny_round_halves_the_steps_and_matches_the_teachers_two_step_samples(teacher_dir, tmp_path):
    """Measure: mean squared difference between the student's 2-step samples and the ε-teacher's 4-step samples from
    the same noise. It must fall well below its value before training (the teacher's weights read as v) and be tiny
    against the difference between teacher samples from different noise."""
    teacher = DDPMPipeline.from_pretrained(teacher_dir)
    alphas_cumprod = teacher.scheduler._alphas_cumprod64
    teacher_grid, student_grid = Grid(alphas_cumprod, 4), Grid(alphas_cumprod, 2)
    generator = torch.Generator().manual_seed(1)
    noise, other_noise = torch.randn((2, 64, 1, 8, 8), generator=generator)
    reference = sample_on_grid(teacher.unet, teacher_grid, noise, prediction_type="epsilon")
    other = sample_on_grid(teacher.unet, teacher_grid, other_noise, prediction_type="epsilon")
    between_samples = ((reference - other) ** 2).mean().item()
    before = ((sample_on_grid(teacher.unet, student_grid, noise) - reference) ** 2).mean().item()

    summary = distill(
        tiny_distill(
            teacher_dir, tmp_path / "student", steps_per_round=100, train_batch_size=32, learning_rate=1e-3
        )
    )
    assert summary["rounds"] == [
        {
            "teacher_steps": 4,
            "student_steps": 2,
            "teacher_prediction_type": "epsilon",
            "num_optimizer_steps": 100,
        }
    ]
    student = DDPMPipeline.from_pretrained(tmp_path / "student")
    after = ((sample_on_grid(student.unet, student_grid, noise) - reference) ** 2).mean().item()
    assert after < 0.6 * before, (after, before)
    assert after < 0.05 * between_samples, (after, between_samples)


# ---------------------------------------------------------------------------------------- the saved model
def test_the_distilled_pipeline_samples_in_its_steps_by_default_where_our_package_is_absent(
    teacher_dir, tmp_path, run_python, capsys
):
    output = tmp_path / "student"
    distill(tiny_distill(teacher_dir, output, teacher_steps=8, target_steps=2, steps_per_round=2))
    scheduler_config = json.loads((output / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["_default_num_inference_steps"] == 2
    assert scheduler_config["prediction_type"] == "v_prediction"
    assert scheduler_config["timestep_spacing"] == "trailing"
    # the eta path is taken only when our DDPMScheduler has an `eta` config key; else diffusers' DDIM (η = 0 default)
    expected = "DDPMScheduler" if "eta" in DDPMScheduler().config else "DDIMScheduler"
    assert scheduler_config["_class_name"] == expected

    # in-process, with our package: the default is 2 steps, and the pipeline's samples are the grid sampler's
    pipeline = DDPMPipeline.from_pretrained(output)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.default_num_inference_steps == 2
    noise = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    images = pipeline(batch_size=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    expected_images = sample_on_grid(pipeline.unet, Grid(pipeline.scheduler.alphas_cumprod, 2), noise)
    torch.testing.assert_close(images, ((expected_images + 1) / 2).clamp(0, 1), rtol=0, atol=1e-4)
    # `ddpm-components sample` without --steps: the model's own count
    assert (
        main(["sample", "--model", str(output), "--num-images", "2", "--out", str(tmp_path / "g.png")]) == 0
    )
    assert "2 images, 2 steps" in capsys.readouterr().out

    result = run_python(
        f"""
        import json, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(output)!r}, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        calls = []
        pipe.unet.register_forward_hook(lambda module, args, output: calls.append(1))
        images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="np").images
        print(json.dumps({{"calls": len(calls), "timesteps": pipe.scheduler.timesteps.tolist(),
                          "scheduler": type(pipe.scheduler).__name__, "shape": list(images.shape),
                          "module": type(pipe).__module__}}))
        """
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["calls"] == 2
    assert report["timesteps"] == [31, 15]
    assert report["shape"] == [2, 8, 8, 1]
    assert not report["module"].startswith("ddpm_components")


def test_an_undistilled_pipeline_still_defaults_to_1000_steps(tmp_path):
    from conftest import tiny_pipeline

    pipeline = tiny_pipeline()
    assert pipeline.default_num_inference_steps == 1000
    pipeline.scheduler.register_to_config(_default_num_inference_steps=3)
    pipeline.save_pretrained(tmp_path / "p")
    loaded = DDPMPipeline.from_pretrained(tmp_path / "p")
    assert loaded.default_num_inference_steps == 3
    loaded.set_progress_bar_config(disable=True)
    loaded(batch_size=1, output_type="np")
    assert loaded.num_timesteps == 3


# ------------------------------------------------------------------------------------------------- resume
def _unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def test_stop_and_resume_in_a_later_round_gives_the_same_student(teacher_dir, tmp_path, monkeypatch):
    """Two rounds of 4 steps; the run is stopped (as by Ctrl-C) after step 5, in the second round, resumed from
    checkpoint-4 (written after the round change: the teacher is the first round's student), and ends with the weights
    of an uninterrupted run."""
    common = dict(teacher_steps=8, target_steps=2, steps_per_round=4, checkpointing_steps=2)
    distill(tiny_distill(teacher_dir, tmp_path / "whole", **common))

    original = _DistillLoop.run_step

    def stop_after_five(self, micro_step, batch):
        done = original(self, micro_step, batch)
        if done and self.progress.global_step == 5:
            self.stop.received = signal.SIGINT
        return done

    monkeypatch.setattr(_DistillLoop, "run_step", stop_after_five)
    with pytest.raises(KeyboardInterrupt) as stopped:
        distill(tiny_distill(teacher_dir, tmp_path / "parts", **common))
    assert "ddpm-components distill" in str(stopped.value) and "--resume latest" in str(stopped.value)
    monkeypatch.setattr(_DistillLoop, "run_step", original)
    resumed = distill(tiny_distill(teacher_dir, tmp_path / "parts", resume="latest", **common))
    assert resumed["global_step"] == 8
    whole, parts = _unet_weights(tmp_path / "whole"), _unet_weights(tmp_path / "parts")
    for name, tensor in whole.items():
        torch.testing.assert_close(parts[name], tensor, rtol=0, atol=0, msg=name)


# -------------------------------------------------------------------------------------------- the CLI
def _cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target-steps", "3"], "--target-steps must be a power of two"),
        (["--target-steps", "0"], "--target-steps must be a power of two"),
        (["--teacher-steps", "100"], "--teacher-steps must be a power of two"),
        (["--teacher-steps", "4", "--target-steps", "4"], "must be below --teacher-steps"),
        (["--teacher-steps", "64"], "more than the teacher's T = 32"),
        (["--target-steps", "32"], "must be below the teacher's steps (32)"),
        (["--loss-weighting", "snr"], "loss_weighting must be one of"),
        (["--resume", "latest", "--overwrite"], "exclude each other"),
    ],
)
def test_distill_mistakes_are_one_line_with_exit_code_2(teacher_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code, err = _cli(["distill", "--model", str(teacher_dir), "--output-dir", str(out), *extra], capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert err[0].startswith("ddpm-components distill: error:")
    assert not out.exists()


def test_distill_refuses_a_missing_model_and_its_own_folder(teacher_dir, tmp_path, capsys):
    code, err = _cli(
        ["distill", "--model", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o")], capsys
    )
    assert code == 2 and len(err) == 1 and "is not a folder" in err[0], err
    code, err = _cli(["distill", "--model", str(teacher_dir), "--output-dir", str(teacher_dir)], capsys)
    assert code == 2 and len(err) == 1 and "must differ from --model" in err[0], err
    code, err = _cli(["distill", "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err) == 1 and "--model" in err[0], err


def test_distill_refuses_an_output_folder_that_holds_another_run(teacher_dir, tmp_path, capsys):
    out = tmp_path / "student"
    distill(tiny_distill(teacher_dir, out, steps_per_round=1))
    before = sorted(path.name for path in out.iterdir())
    code, err = _cli(
        [
            "distill",
            "--model",
            str(teacher_dir),
            "--output-dir",
            str(out),
            "--teacher-steps",
            "4",
            "--target-steps",
            "2",
        ],
        capsys,
    )
    assert (
        code == 2 and len(err) == 1 and "holds another training run" in err[0] and "--overwrite" in err[0]
    ), err
    assert sorted(path.name for path in out.iterdir()) == before


def test_bridge_round_truncated_snr_and_evaluations_during_distillation(teacher_dir, tmp_path):
    """A bridge round (4 → 4, the ε → v conversion), then 4 → 2; evaluations every 2 steps report the digits FD at the
    step count of the round that just ended; the final evaluation is in the model card."""
    output = tmp_path / "student"
    summary = distill(
        tiny_distill(
            teacher_dir,
            output,
            bridge_steps=2,
            steps_per_round=2,
            loss_weighting="truncated_snr",
            evaluate=True,
            eval_every_steps=2,
            eval_num_samples=20,
        )
    )
    assert [(r["teacher_steps"], r["student_steps"]) for r in summary["rounds"]] == [(4, 4), (4, 2)]
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    evaluations = [(r["step"], r["eval_steps"]) for r in records if "eval_fd" in r]
    assert evaluations == [(2, 4), (4, 2)]
    assert all(r["loss"] is not None and r["loss"] >= 0 for r in records if "loss" in r)
    assert "steps (distilled)" in (output / "README.md").read_text()
    assert "pipe(num_inference_steps=2).images[0]" in (output / "README.md").read_text()
    # the final evaluation samples as the saved pipeline does (its multistep scheduler, not first-order DDIM)
    from ddpm_components import DDPMPipeline
    from ddpm_components.evaluation import SampleQuality, reference_digits
    from ddpm_components.training import sample_shared

    saved = DDPMPipeline.from_pretrained(output)
    assert saved.scheduler.config.multistep_order == 2
    images = sample_shared(saved, list(range(20)), seed=0, num_inference_steps=2)
    fd = SampleQuality(reference_digits("test")[0], ["fd"])(images.float() / 127.5 - 1.0)["fd"]
    assert records[-1]["step"] == 4 and records[-1]["eval_fd"] == pytest.approx(fd, rel=1e-6)


def test_ctrl_c_in_a_real_process_keeps_the_checkpoint_and_the_printed_command_finishes(
    teacher_dir, tmp_path
):
    """SIGINT to the process group of a running `ddpm-components distill`: exit 130, one line naming the kept
    checkpoint and the resume command, which (run again) finishes the distillation."""
    import os
    import shlex
    import subprocess
    import sys
    import time

    from ddpm_components.training import list_checkpoints

    folder = tmp_path / "run"
    arguments = ["--model", str(teacher_dir), "--output-dir", str(folder), "--teacher-steps", "4"]
    arguments += ["--target-steps", "2", "--steps-per-round", "150", "--checkpointing-steps", "3"]
    arguments += ["--train-batch-size", "8", "--no-evaluate", "--logging-steps", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ACCELERATE_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "ddpm_components", "distill", *arguments],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not list_checkpoints(folder):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-3000:]
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("ddpm-components")]
    assert len(lines) == 1 and lines[0].startswith(
        "ddpm-components distill: interrupted by SIGINT at step "
    ), lines
    assert "kept " in lines[0] and "Traceback" not in stderr
    command = shlex.split(lines[0].split("Resume with: ", 1)[1])
    assert (
        command[:2] == ["ddpm-components", "distill"] and command[command.index("--resume") + 1] == "latest"
    )
    assert main(command[1:]) == 0
    assert (
        json.loads((folder / "scheduler" / "scheduler_config.json").read_text())[
            "_default_num_inference_steps"
        ]
        == 2
    )
