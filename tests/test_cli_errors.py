"""User mistakes on the command line (issue 9): one line on stderr, the right exit code, no traceback, nothing written,
and every check that needs no model done before the model is loaded.

Exit codes: 2 for a mistake in the options or the input files, 1 for a failure of the environment (a full disk, the
Hub) or a bug (whose line says how to see the traceback), 130 for Ctrl-C. The cases that used to end in a traceback
also run through the real command line in a subprocess (a real SIGINT for Ctrl-C).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_pipeline, tiny_unet
from PIL import Image

from ddpm_components import DDPMPipeline, DDPMScheduler, hub
from ddpm_components.cli import main
from ddpm_components.sampling import image_seed

pytestmark = pytest.mark.usefixtures("torch_single_thread")

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_error_models")
    tiny_pipeline().save_pretrained(root / "unconditional")
    unet = tiny_unet(3, class_names=["cat", "dog", "fox"])
    named = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50))
    named.save_pretrained(root / "named")
    return {"unconditional": root / "unconditional", "named": root / "named"}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working folder of a case: a few input files (a file, a folder, bad images, a good image)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "adir").mkdir()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("this is text, not an image")
    Image.new("L", (8, 8), 100).save(tmp_path / "init.png")
    return tmp_path


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and folder under ``folder``."""
    return {
        str(path.relative_to(folder)): path.read_bytes() if path.is_file() else None
        for path in sorted(folder.rglob("*"))
    }


def _cli(args: list[str], capsys: pytest.CaptureFixture, progress: bool = False) -> tuple[int, list[str]]:
    """Run main() in-process; the exit code (argparse's SystemExit included) and the lines on stderr (without the
    denoising progress bar's when ``progress``: the failures after sampling)."""
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as exit_info:
        code = exit_info.code
    except KeyboardInterrupt:  # would stop pytest itself
        pytest.fail("KeyboardInterrupt escaped main()")
    lines = capsys.readouterr().err.splitlines()
    if progress:
        lines = [line for line in lines if line.strip() and "%|" not in line]
    return code, lines


def _no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading the model fail loudly: a check that runs after loading shows up as a wrong exit code."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(hub, "load_pipeline", refuse)


SAMPLE_CASES = [
    (["--out", "adir.png"], "--out 'adir.png' is a folder; pass a file name"),
    (
        ["--out", "/proc/ddpm-components-test/x.png"],
        "--out '/proc/ddpm-components-test/x.png': cannot write into '/proc'",
    ),
    (["--out", "afile/x.png"], "--out 'afile/x.png': 'afile' is a file, not a folder"),
    (["--save-individual", "afile"], "--out-dir 'afile' must be a folder, but it is a file"),
    (
        ["--save-individual", "afile/each"],
        "--out-dir 'afile/each' must be a folder, but 'afile' is a file",
    ),
    (["--save-individual", "/proc/ddpm-components-test"], "cannot write into '/proc'"),
    (["--init-image", "missing.png"], "--init-image 'missing.png': no such file"),
    (["--init-image", "empty.png"], "--init-image 'empty.png' is empty (0 bytes); pass an image file"),
    (
        ["--init-image", "notes.png"],
        "--init-image 'notes.png' is not an image Pillow can read (UnidentifiedImageError",
    ),
    (["--init-image", "adir"], "--init-image 'adir' is a folder; pass an image file"),
    (["--device", "cuda:99"], "--device 'cuda:99' is not available here ("),
    (
        ["--device", "meta"],
        "--device 'meta' is not available here (meta tensors hold no values); available: cpu",
    ),
    (["--device", "nonsense"], "--device 'nonsense' is not a torch device"),
    (["--seed", str(2**64)], f"argument --seed: the seed must be an integer in [0, 2**64 - 1], got {2**64}"),
    (["--seed", "-1"], "argument --seed: the seed must be an integer in [0, 2**64 - 1], got -1"),
    (["--guidance-scale", "nan"], "argument --guidance-scale: expected a finite number, got 'nan'"),
    (["--guidance-scale=-inf"], "argument --guidance-scale: expected a finite number, got '-inf'"),
    (
        ["--init-image", "init.png", "--strength", "nan"],
        "argument --strength: expected a finite number, got 'nan'",
    ),
    (
        ["--class-label", "1", "--class-name", "cat"],
        "argument --class-name: not allowed with argument --class-label",
    ),
]


@pytest.mark.parametrize(("extra", "message"), SAMPLE_CASES, ids=[" ".join(case[0]) for case in SAMPLE_CASES])
def test_sample_mistakes_are_one_line_before_the_model_loads(
    models, workdir, monkeypatch, capsys, extra, message
):
    _no_model_loading(monkeypatch)
    (workdir / "adir.png").mkdir()
    before = _tree(workdir)
    args = ["sample", "--model", str(models["unconditional"]), "--num-images", "2", "--steps", "2"]
    if "--out" not in extra:
        args += ["--out", "grid.png"]
    code, err = _cli([*args, *extra], capsys)
    assert code == 2, err
    assert len(err) == 1 and message in err[0], err
    assert err[0].startswith("ddpm-components sample: error: ")
    assert _tree(workdir) == before  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_sample_device_cuda_without_cuda(models, workdir, monkeypatch, capsys):
    _no_model_loading(monkeypatch)
    code, err = _cli(["sample", "--model", str(models["unconditional"]), "--device", "cuda"], capsys)
    assert code == 2 and len(err) == 1, err
    assert "--device 'cuda' is not available here" in err[0] and "available: cpu" in err[0]


def test_individual_file_name_that_is_a_folder_is_refused_before_sampling(
    models, workdir, monkeypatch, capsys
):
    _no_model_loading(monkeypatch)
    (workdir / "each" / "000001.png").mkdir(parents=True)
    code, err = _cli(
        ["sample", "--model", str(models["unconditional"]), "--num-images", "3", "--save-individual", "each"],
        capsys,
    )
    assert code == 2 and len(err) == 1, err
    assert "--out-dir 'each': 'each/000001.png' is a folder; it would be written as a file" in err[0]


FORWARD_CASES = [
    (["--num-images", "5000"], "--num-images 5000 is more than the 1,797 embedded digits; pass at most 1797"),
    (["--beta-schedule", "cubic"], "--beta-schedule='cubic' is not supported; choose one of 'linear', "),
    (["--out", "adir.png"], "--out 'adir.png' is a folder"),
    (["--out", "adir"], "--out must be a .png file, got 'adir'"),
    (["--out", "/proc/ddpm-components-test/x.png"], "cannot write into '/proc'"),
    (["--seed", "1e3"], "argument --seed: expected an integer seed, got '1e3'"),
]


@pytest.mark.parametrize(
    ("extra", "message"), FORWARD_CASES, ids=[" ".join(case[0]) for case in FORWARD_CASES]
)
def test_forward_mistakes_are_one_line(workdir, capsys, extra, message):
    (workdir / "adir.png").mkdir()
    before = _tree(workdir)
    args = ["forward", "--resolution", "8", "--num-columns", "3"]
    if "--out" not in extra:
        args += ["--out", "strip.png"]
    code, err = _cli([*args, *extra], capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert _tree(workdir) == before


def test_the_digits_count_matches_the_embedded_dataset():
    from ddpm_components.data import DIGITS_NUM_IMAGES, load_digits_arrays

    assert len(load_digits_arrays()[0]) == DIGITS_NUM_IMAGES == 1797


# ---------------------------------------------------------------------------------------- loading errors
def _damage(model: Path, target: Path, how: str) -> Path:
    """A copy of the saved pipeline ``model`` at ``target``, damaged in one way."""
    shutil.copytree(model, target)
    weights = target / WEIGHTS
    if how == "no weights":
        weights.unlink()
    elif how == "no unet config":
        (target / "unet" / "config.json").unlink()
    elif how == "no scheduler config":
        (target / "scheduler" / "scheduler_config.json").unlink()
    elif how == "no unet folder":
        shutil.rmtree(target / "unet")
    elif how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "garbage weights":
        weights.write_bytes(b"\x00" * 64)
    elif how == "broken model_index.json":
        (target / "model_index.json").write_text("")
    elif how == "broken scheduler_config.json":
        (target / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": 50,')
    elif how == "broken config.json":
        (target / "unet" / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    elif how == "pickle weights only":
        from safetensors.torch import load_file

        torch.save(load_file(weights), weights.with_suffix(".bin"))
        weights.unlink()
    else:  # pragma: no cover
        raise ValueError(how)
    return target


LOADING_CASES = [
    ("no weights", f"'bad/{WEIGHTS}' is missing: the pipeline folder has no weights for 'unet'"),
    ("no unet config", "'bad/unet/config.json' is missing"),
    ("no scheduler config", "'bad/scheduler/scheduler_config.json' is missing"),
    ("no unet folder", "'bad/unet' is missing: model_index.json lists the component 'unet'"),
    ("truncated weights", f"'bad/{WEIGHTS}' is truncated or damaged: "),
    ("garbage weights", f"'bad/{WEIGHTS}' is damaged: not a safetensors file, or truncated (64 bytes)"),
    ("broken model_index.json", "'bad/model_index.json' is not valid JSON (Expecting value: line 1 column 1)"),
    ("broken scheduler_config.json", "'bad/scheduler/scheduler_config.json' is not valid JSON"),
    ("broken config.json", "'bad/unet/config.json' is not a text file"),
    ("pickle weights only", "'bad/unet' holds only pickle weights (.bin), no diffusion_pytorch_model.safetensors: "
     "pickle loading is off by default"),
]  # fmt: skip


@pytest.mark.parametrize(("how", "message"), LOADING_CASES, ids=[case[0] for case in LOADING_CASES])
def test_a_damaged_model_folder_names_the_file(models, workdir, capsys, how, message):
    _damage(models["unconditional"], workdir / "bad", how)
    before = _tree(workdir)
    for command in (["sample", "--out", "grid.png", "--steps", "2"], ["push", "--repo-id", "user/x"]):
        code, err = _cli([command[0], "--model", "bad", *command[1:]], capsys)
        assert code == 2 and len(err) == 1 and message in err[0], (command[0], err)
    assert _tree(workdir) == before


def test_pickle_weights_load_when_allowed_explicitly(models, tmp_path):
    folder = _damage(models["unconditional"], tmp_path / "bin", "pickle weights only")
    with pytest.raises(ValueError, match="pickle loading is off by default"):
        hub.load_pipeline(folder)
    pipeline = hub.load_pipeline(folder, use_safetensors=False)
    reference = DDPMPipeline.from_pretrained(models["unconditional"])
    for (name, got), expected in zip(
        pipeline.unet.state_dict().items(), reference.unet.state_dict().values()
    ):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=name)


def test_a_typo_in_a_local_model_path_suggests_the_folder(models, workdir, capsys):
    shutil.copytree(models["unconditional"], workdir / "runs" / "digits")
    cases = [
        ("runs/digts", "--model 'runs/digts': no such folder; did you mean 'runs/digits'?"),
        ("runs/zebra", "--model 'runs/zebra': no such folder; 'runs' has no sub-folder 'zebra'"),
        (
            "./runs/digts",
            "--model './runs/digts': no such folder, and it is not a Hub repo id (namespace/name); did "
            "you mean 'runs/digits'?",
        ),
        (
            str(workdir / "runs" / "digit"),
            f"did you mean {str(workdir / 'runs' / 'digits')!r}?",
        ),
    ]
    for model, message in cases:
        code, err = _cli(["sample", "--model", model, "--out", "grid.png"], capsys)
        assert code == 2 and len(err) == 1 and message in err[0], (model, err)
        assert "could not reach" not in err[0]


# ------------------------------------------------------------------------------ environment and bugs
def _full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: every fsync fails as on a full disk (after the temporary file was written)."""

    def no_space(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)


@pytest.mark.parametrize("command", ["forward", "sample"])
def test_a_full_disk_is_one_line_with_exit_code_1_and_leaves_nothing(
    models, workdir, monkeypatch, capsys, command
):
    _full_disk(monkeypatch)
    before = _tree(workdir)
    args = {
        "forward": ["forward", "--resolution", "8", "--num-images", "2", "--out", "out/strip.png"],
        "sample": ["sample", "--model", str(models["unconditional"]), "--num-images", "1", "--steps", "2",
                   "--out", "out/grid.png"],
    }[command]  # fmt: skip
    code, err = _cli(args, capsys, progress=True)
    assert code == 1 and len(err) == 1, err
    assert err[0] == f"ddpm-components {command}: error: No space left on device: '{args[-1]}'"
    after = _tree(workdir)
    assert {name: value for name, value in after.items() if name != "out"} == before  # no file, no .tmp left
    assert not any((workdir / "out").iterdir())


def test_ctrl_c_in_process_is_one_line_with_exit_code_130(models, workdir, monkeypatch, capsys):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(DDPMPipeline, "__call__", interrupted)
    before = _tree(workdir)
    code, err = _cli(["sample", "--model", str(models["unconditional"]), "--out", "grid.png"], capsys)
    assert (code, err) == (130, ["ddpm-components sample: interrupted; nothing was written"])
    assert _tree(workdir) == before


@pytest.mark.parametrize("where", ["--out-dir", "--out"])
def test_ctrl_c_in_sample_says_what_is_kept_and_the_same_command_finishes(
    where, models, workdir, monkeypatch, capsys
):
    """An interrupt after the first of two batches: the line counts the images kept and says how to finish; the
    same command then samples only the rest, and the result equals an uninterrupted run's."""
    target = {"--out-dir": "pngs", "--out": "grid.npz"}[where]
    args = ["sample", "--model", str(models["unconditional"]), "--num-images", "4", "--batch-size", "2",
            "--steps", "2", where, target]  # fmt: skip
    original_call = DDPMPipeline.__call__
    calls = []

    def interrupted_at_the_second_batch(self, *call_args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original_call(self, *call_args, **kwargs)

    monkeypatch.setattr(DDPMPipeline, "__call__", interrupted_at_the_second_batch)
    code, err = _cli(args, capsys, progress=True)
    kept_in = {"--out-dir": "pngs", "--out": ".grid.npz.shards"}[where]
    assert (code, err) == (
        130,
        [f"ddpm-components sample: interrupted; 2 of 4 images are kept in '{kept_in}'; the same command samples "
         "the other 2"],
    )  # fmt: skip
    assert _cli(args, capsys, progress=True) == (0, [])
    assert len(calls) == 3  # the rerun sampled the second batch only
    monkeypatch.setattr(DDPMPipeline, "__call__", original_call)
    uninterrupted = ["--out-dir", "again"] if where == "--out-dir" else ["--out", "again.npz"]
    assert _cli(args[:-2] + uninterrupted, capsys, progress=True) == (0, [])
    if where == "--out-dir":
        for index in range(4):
            assert np.array_equal(
                np.asarray(Image.open(f"pngs/{index:06d}.png")),
                np.asarray(Image.open(f"again/{index:06d}.png")),
            )
    else:
        with np.load("grid.npz") as resumed, np.load("again.npz") as whole:
            assert np.array_equal(resumed["arr_0"], whole["arr_0"])


def test_a_bug_is_one_line_that_says_how_to_see_the_traceback(models, workdir, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise TypeError("unsupported operand type(s)\nsecond line")

    monkeypatch.setattr("ddpm_components.sampling.image_grid", broken)
    args = ["sample", "--model", str(models["unconditional"]), "--num-images", "1", "--steps", "1"]
    code, err = _cli(args, capsys, progress=True)
    assert code == 1 and len(err) == 1, err
    assert err[0] == (
        "ddpm-components sample: error: unexpected TypeError: unsupported operand type(s) (probably a bug in "
        "ddpm-components: run again with DDPM_COMPONENTS_DEBUG=1 for the traceback and report it)"
    )
    monkeypatch.setenv("DDPM_COMPONENTS_DEBUG", "1")
    with pytest.raises(TypeError, match="unsupported operand"):
        main(args)
    assert not (workdir / "samples.png").exists()


def test_a_nan_result_is_one_line_with_exit_code_1_and_writes_nothing(models, workdir, tmp_path, capsys):
    """A model whose output is NaN (here: NaN weights) makes sampling raise FloatingPointError, not black images."""
    import torch

    from ddpm_components import DDPMPipeline

    broken = DDPMPipeline.from_pretrained(models["unconditional"])
    with torch.no_grad():
        broken.unet.conv_out.bias.fill_(float("nan"))
    broken.save_pretrained(tmp_path / "nan-model")
    args = ["sample", "--model", str(tmp_path / "nan-model"), "--num-images", "2", "--steps", "2"]
    code, err = _cli(args, capsys, progress=True)
    assert code == 1 and len(err) == 1, err
    assert "unexpected" not in err[0] and ("NaN" in err[0] or "finite" in err[0]), err[0]
    assert not (workdir / "samples.png").exists()


# ------------------------------------------------------------------------------ real processes
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "DDPM_COMPONENTS_"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    return env


def _default_sigint() -> None:  # a child of a shell without job control may inherit SIGINT ignored
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ddpm_components", *args],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def _former_traceback_cases(model: str) -> list[tuple[list[str], int, str]]:
    """Cases that printed a traceback on the starting commit: arguments, exit code, part of the one line."""
    return [
        (["sample", "--model", model, "--init-image", "empty.png"], 2, "is empty (0 bytes)"),
        (["sample", "--model", "bad"], 2, f"'bad/{WEIGHTS}' is truncated or damaged"),
        (["sample", "--model", model, "--save-individual", "afile"], 2, "must be a folder, but it is a file"),
        (["sample", "--model", model, "--init-image", "notes.png"], 2, "is not an image Pillow can read"),
        (["sample", "--model", model, "--device", "cuda:99"], 2, "--device 'cuda:99' is not available here"),
        (["forward", "--num-images", "5000"], 2, "--num-images 5000 is more than the 1,797 embedded digits"),
        (["forward", "--out", "adir.png"], 2, "--out 'adir.png' is a folder"),
    ]


def _run_real_processes(workdir: Path, cases: list[tuple[list[str], int, str]]) -> None:
    """Run the cases through `python -m ddpm_components` (all at once); one line each, no traceback, nothing written."""
    (workdir / "adir.png").mkdir()
    before = _tree(workdir)
    processes = [_start(args, workdir) for args, _, _ in cases]
    for process, (args, code, message) in zip(processes, cases):
        _, stderr = process.communicate(timeout=600)
        lines = stderr.splitlines()
        assert process.returncode == code, (args, stderr)
        assert len(lines) == 1 and message in lines[0], (args, stderr)
        assert "Traceback" not in stderr
    assert _tree(workdir) == before


def test_former_tracebacks_in_real_processes(models, workdir):
    """Two of them (an input-file check, a loading check) in the default run; all of them in the slow one."""
    _damage(models["unconditional"], workdir / "bad", "truncated weights")
    _run_real_processes(workdir, _former_traceback_cases(str(models["unconditional"]))[:2])


@pytest.mark.slow
def test_all_former_tracebacks_in_real_processes(models, workdir):
    _damage(models["unconditional"], workdir / "bad", "truncated weights")
    _run_real_processes(workdir, _former_traceback_cases(str(models["unconditional"])))


@pytest.mark.slow
def test_ctrl_c_during_sampling_in_a_real_process(workdir):
    """A real SIGINT while the denoising loop runs: exit code 130, one line, no traceback, no output file."""
    model = workdir / "long"
    tiny_pipeline(num_train_timesteps=1000).save_pretrained(model)
    before = _tree(workdir)
    process = _start(["sample", "--model", str(model), "--num-images", "64", "--steps", "1000"], workdir)
    stderr: list[str] = []
    started = threading.Event()

    def read() -> None:
        while chunk := process.stderr.read(1):
            stderr.append(chunk)
            if "it/s]" in "".join(stderr[-200:]) or "s/it]" in "".join(stderr[-200:]):
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(timeout=300), "".join(stderr)
    process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    process.wait(timeout=60)
    reader.join(timeout=10)
    text = "".join(stderr)
    assert process.returncode == 130, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert text.rstrip("\n").splitlines()[-1] == "ddpm-components sample: interrupted; nothing was written"
    # besides the progress bar (carriage returns), the interrupt line is the only thing on stderr
    assert [line for line in text.splitlines() if line.strip() and "%|" not in line] == [
        "ddpm-components sample: interrupted; nothing was written"
    ]
    assert time.monotonic() - sent < 30
    assert _tree(workdir) == before  # no samples.png, no temporary file


# ------------------------------------------------------------------------------ what still works
def test_init_image_goes_through_the_one_image_path(models, workdir):
    """16-bit greyscale (was ~95% white) and transparency (the hidden colour showed) as the pipeline reads them."""
    model = str(models["unconditional"])
    Image.fromarray(np.full((12, 12), 128 * 257, dtype=np.uint16)).save(workdir / "grey16.png")
    rgba = np.zeros((12, 12, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent: black once composited
    Image.fromarray(rgba, mode="RGBA").save(workdir / "clear.png")
    pipeline = DDPMPipeline.from_pretrained(model)
    pipeline.set_progress_bar_config(disable=True)
    for file, grey in (("grey16.png", 128), ("clear.png", 0)):
        assert main(["sample", "--model", model, "--num-images", "1", "--steps", "4", "--seed", "3",
                     "--init-image", file, "--strength", "0.5", "--out", "got.png"]) == 0  # fmt: skip
        expected = pipeline(
            batch_size=1,
            generator=[torch.Generator().manual_seed(image_seed(3, 0))],  # image i is seeded by (seed, i)
            num_inference_steps=4,
            image=Image.new("L", (8, 8), grey),
            strength=0.5,
        ).images[0]
        np.testing.assert_array_equal(np.asarray(Image.open("got.png")), np.asarray(expected), err_msg=file)


def test_class_names_from_the_model(models, workdir, capsys):
    """`--class-name` takes the model's class_names (needs the pipeline's name support, merged separately)."""
    model = str(models["named"])
    common = ["sample", "--model", model, "--num-images", "2", "--steps", "3", "--seed", "5"]
    assert main([*common, "--class-name", "dog", "--out", "names.png"]) == 0
    assert main([*common, "--class-label", "1", "--out", "labels.png"]) == 0
    assert (workdir / "names.png").read_bytes() == (workdir / "labels.png").read_bytes()
    assert main([*common, "--class-name", "fox", "cat", "--out", "two_names.png"]) == 0
    assert main([*common, "--class-label", "2", "0", "--out", "two_labels.png"]) == 0
    assert (workdir / "two_names.png").read_bytes() == (workdir / "two_labels.png").read_bytes()
    capsys.readouterr()
    assert main([*common, "--class-name", "wolf", "--out", "x.png"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "wolf" in err[0] and "'cat'" in err[0] and "'fox'" in err[0], err
    assert not (workdir / "x.png").exists()
    assert json.loads((models["named"] / "unet" / "config.json").read_text())["class_names"] == [
        "cat",
        "dog",
        "fox",
    ]


def test_sharded_weights_are_checked_shard_by_shard(models, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(models["unconditional"], folder)
    (folder / WEIGHTS).unlink()
    DDPMPipeline.from_pretrained(models["unconditional"]).unet.save_pretrained(
        folder / "unet", max_shard_size="20KB"
    )
    index = json.loads((folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    hub.check_pipeline_folder(folder)  # whole
    last = folder / "unet" / shards[-1]
    last.write_bytes(last.read_bytes()[:-10])
    with pytest.raises(ValueError, match=f"'{last}' is truncated or damaged"):
        hub.check_pipeline_folder(folder)
    last.unlink()
    with pytest.raises(FileNotFoundError, match=f"'{last}' \\(listed in .*index.json'\\) is missing"):
        hub.check_pipeline_folder(folder)
