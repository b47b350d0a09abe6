"""DDPMPipeline.save_pretrained / from_pretrained: remote-code layout, plain diffusers layout, atomic writes.

Loading in a Python *without* ddpm_components (remote code) is checked in tests/test_hub.py, in the same
subprocess that loads from the loopback Hub.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import diffusers
import pytest
import torch
from conftest import tiny_diffusers_unet, tiny_pipeline

from ddpm_components import DDPMPipeline, DDPMScheduler, DDPMUNet2DModel

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _images(pipeline, **kwargs) -> torch.Tensor:
    pipeline.set_progress_bar_config(disable=True)
    defaults = dict(
        batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=8, output_type="pt"
    )
    return pipeline(**{**defaults, **kwargs}).images


def test_remote_code_layout_and_reload_where_installed(tmp_path: Path):
    pipeline = tiny_pipeline(num_class_embeds=3)
    target = tmp_path / "saved"
    pipeline.save_pretrained(target, training_config={"learning_rate": 2e-4, "dataset": "digits"})

    index = json.loads((target / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_ddpm", "DDPMPipeline"]
    assert index["unet"] == ["unet_ddpm", "DDPMUNet2DModel"]
    assert index["scheduler"] == ["scheduling_ddpm", "DDPMScheduler"]
    import ddpm_components

    package = Path(ddpm_components.__file__).parent
    for copied, original in [
        ("pipeline_ddpm.py", "pipeline_ddpm.py"),
        ("unet/unet_ddpm.py", "unet_ddpm.py"),
        ("scheduler/scheduling_ddpm.py", "scheduling_ddpm.py"),
    ]:
        assert (target / copied).read_bytes() == (package / original).read_bytes()
    assert (target / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(target.rglob("*.bin")) and not list(target.rglob("*.pt"))
    assert json.loads((target / "training_config.json").read_text())["dataset"] == "digits"
    card = (target / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card
    assert "pipeline_tag: unconditional-image-generation" in card and "- ddpm-components" in card
    assert 'DiffusionPipeline.from_pretrained("saved", trust_remote_code=True)' in card
    assert '"learning_rate": 0.0002' in card

    reloaded = DDPMPipeline.from_pretrained(target)
    assert type(reloaded.unet) is DDPMUNet2DModel and type(reloaded.scheduler) is DDPMScheduler
    kwargs = dict(class_labels=[1, 2], guidance_scale=2.5)
    assert torch.equal(_images(reloaded, **kwargs), _images(pipeline, **kwargs))
    # a component passed explicitly replaces the saved one
    swapped = DDPMPipeline.from_pretrained(target, scheduler=diffusers.DDPMScheduler(num_train_timesteps=50))
    assert type(swapped.scheduler) is diffusers.DDPMScheduler


def test_diffusers_components_stay_a_plain_diffusers_folder(tmp_path: Path):
    unet, scheduler = tiny_diffusers_unet(), diffusers.DDPMScheduler(num_train_timesteps=50)
    pipeline = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipeline.save_pretrained(tmp_path / "plain")
    index = json.loads((tmp_path / "plain" / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == [
        "diffusers",
        "DDPMScheduler",
    ]
    assert not list((tmp_path / "plain").rglob("*.py"))
    # plain diffusers loads it as its own DDPMPipeline (same unconditional images); we load it as ours
    theirs = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "plain")
    assert type(theirs) is diffusers.DDPMPipeline
    ours = DDPMPipeline.from_pretrained(tmp_path / "plain")
    assert type(ours) is DDPMPipeline
    assert torch.equal(_images(ours), _images(theirs))
    # layout="remote_code" forces our pipeline file (diffusers' components keep plain entries)
    pipeline.save_pretrained(tmp_path / "forced", layout="remote_code")
    index = json.loads((tmp_path / "forced" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_ddpm", "DDPMPipeline"] and index["unet"] == [
        "diffusers",
        "UNet2DModel",
    ]
    assert type(DDPMPipeline.from_pretrained(tmp_path / "forced").unet) is diffusers.UNet2DModel
    with pytest.raises(
        ValueError, match=r"layout='zip' is not supported; choose one of 'auto', 'remote_code', 'diffusers'\."
    ):
        pipeline.save_pretrained(tmp_path / "bad", layout="zip")


def test_save_replaces_atomically_and_keeps_other_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "out"
    tiny_pipeline().save_pretrained(target)
    (target / "metrics.jsonl").write_text("{}\n")  # e.g. written by training: must survive a re-save
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}

    # a crash in the middle of saving leaves the previous folder exactly as it was, and no temp folder
    def crash(self, save_directory, **kwargs):
        (Path(save_directory) / "model_index.json").write_text("half-written")
        raise RuntimeError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(diffusers.DiffusionPipeline, "save_pretrained", crash)
        with pytest.raises(RuntimeError, match="disk full"):
            tiny_pipeline().save_pretrained(target)
    after = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    # a successful re-save replaces the pipeline and keeps files it does not write
    changed = tiny_pipeline(num_train_timesteps=20)
    changed.save_pretrained(target)
    assert (
        json.loads((target / "scheduler" / "scheduler_config.json").read_text())["num_train_timesteps"] == 20
    )
    assert (target / "metrics.jsonl").read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        changed.save_pretrained(tmp_path / "a_file")
    # the current folder (or a parent) cannot be renamed into place: a clear ValueError, nothing written
    monkeypatch.chdir(target)
    for name in (".", "", "unet/.."):
        with pytest.raises(ValueError, match=rf"save_directory='{name}' is the current folder or one of"):
            changed.save_pretrained(name)
    with pytest.raises(
        ValueError, match=r"save_directory='\.\.' is the current folder or one of its parents"
    ):
        changed.save_pretrained("..")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "out"]
    # a path that only passes through other folders is normalised and saved
    changed.save_pretrained("../out/../elsewhere")
    assert (tmp_path / "elsewhere" / "model_index.json").is_file()


def test_from_pretrained_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"has no model_index\.json"):
        DDPMPipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="neither an existing folder nor a Hub repo id"):
        DDPMPipeline.from_pretrained(str(tmp_path / "missing" / "deeper" / "path"))


def test_component_modules_are_self_contained():
    """Files saved as remote code import only torch, diffusers and the standard library, never relatively."""
    import ast
    import sys

    import ddpm_components

    package = Path(ddpm_components.__file__).parent
    allowed = {"torch", "diffusers", *sys.stdlib_module_names}
    for name in ("pipeline_ddpm.py", "unet_ddpm.py", "scheduling_ddpm.py"):
        tree = ast.parse((package / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{name}: relative import of {node.module}"
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] in allowed, f"{name} imports {module}"


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_saved_file_has_the_umask_mode_the_weights_too(tmp_path: Path, umask: int):
    """safetensors 0.8 creates its files with mode 0o600 (a temporary file renamed), so the weights alone were
    unreadable by other users (a model saved as root in a Docker image); a save gives them the umask's mode."""
    previous = os.umask(umask)
    try:
        tiny_pipeline().save_pretrained(tmp_path / "saved")
    finally:
        os.umask(previous)
    modes = {
        path.relative_to(tmp_path).as_posix(): stat.S_IMODE(path.stat().st_mode)
        for path in (tmp_path / "saved").rglob("*")
        if path.is_file()
    }
    assert "saved/unet/diffusion_pytorch_model.safetensors" in modes
    assert set(modes.values()) == {0o666 & ~umask}, modes
