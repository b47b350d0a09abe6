"""What is published (the model card, everything push_to_hub uploads) carries no local absolute paths; the local
training_config.json keeps them (resuming needs them). The save's bookkeeping files are never uploaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import diffusers.utils.hub_utils
import pytest
from conftest import tiny_pipeline
from huggingface_hub.utils import filter_repo_objects

from ddpm_components import DDPMPipeline
from ddpm_components.pipeline_ddpm import SAVE_MANIFEST_NAME, published_training_config

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _training_config(root: Path) -> dict:
    """What training passes (TrainingConfig.to_dict()), with local paths in the usual keys and elsewhere."""
    return {
        "output_dir": str(root / "runs" / "digits"),
        "train_data_dir": str(root / "data" / "digit-folders"),
        "resume": str(root / "runs" / "digits" / "checkpoint-500"),
        "logging_dir": "logs",
        "cache_dir": "~/.cache/ddpm",
        "dataset_name": "someone/cifar10-subset",
        "notes": {"init_from": str(root / "models" / "base"), "list": ["~/x/y", "relative/kept"]},
        "windows_path": "C:\\Users\\me\\data",
        "learning_rate": 2e-4,
        "seed": 0,
    }


def test_published_training_config_keeps_last_components_only(tmp_path: Path):
    published = published_training_config(_training_config(tmp_path))
    assert published == {
        "output_dir": "digits",
        "train_data_dir": "digit-folders",
        "resume": "checkpoint-500",
        "logging_dir": "logs",
        "cache_dir": "ddpm",
        "dataset_name": "someone/cifar10-subset",  # a Hub name, not a path
        "notes": {"init_from": "base", "list": ["y", "relative/kept"]},
        "windows_path": "data",
        "learning_rate": 2e-4,
        "seed": 0,
    }
    assert published_training_config({"resume": None, "output_dir": "out/"}) == {
        "resume": None,
        "output_dir": "out",
    }


def _assert_no_local_paths(files: dict[str, bytes], root: Path) -> None:
    for name, data in files.items():
        if not name.endswith((".json", ".md", ".py", ".txt")):
            continue  # weights and images (random bytes may spell "~/")
        text = data.decode("utf-8")
        for leak in (str(root), str(Path.home()), "~/", "C:\\\\Users"):
            assert leak not in text, (name, leak)


def test_the_model_card_has_no_local_paths_but_the_local_config_keeps_them(tmp_path: Path):
    config = _training_config(tmp_path)
    tiny_pipeline().save_pretrained(tmp_path / "first", training_config=config)
    # a pipeline loaded from a local folder carries its path (diffusers' _name_or_path): not saved either
    loaded = DDPMPipeline.from_pretrained(tmp_path / "first")
    loaded.save_pretrained(tmp_path / "saved", training_config=config)
    folder = tmp_path / "saved"
    assert json.loads((folder / "training_config.json").read_text()) == config
    card = (folder / "README.md").read_text()
    assert '"output_dir": "digits"' in card and '"dataset_name": "someone/cifar10-subset"' in card
    published = {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != "training_config.json"
    }
    _assert_no_local_paths(published, tmp_path)
    assert json.loads((folder / "model_index.json").read_text())["_name_or_path"] == "first"


def test_push_to_hub_uploads_no_local_paths_and_no_bookkeeping(tmp_path: Path, monkeypatch):
    uploaded: dict[str, bytes] = {}

    class Repo:
        repo_id = "user/private-paths"

    def upload_folder(*, folder_path, ignore_patterns=None, **kwargs):
        # huggingface_hub's own filter, as upload_folder applies it
        names = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        for name in filter_repo_objects(names, ignore_patterns=ignore_patterns):
            uploaded[name] = (Path(folder_path) / name).read_bytes()
        return "https://hub.example/commit/1"

    monkeypatch.setattr(diffusers.utils.hub_utils, "create_repo", lambda *args, **kwargs: Repo())
    monkeypatch.setattr(diffusers.utils.hub_utils, "upload_folder", upload_folder)
    tiny_pipeline().save_pretrained(tmp_path / "first")
    loaded = DDPMPipeline.from_pretrained(tmp_path / "first")
    loaded.push_to_hub("user/private-paths", training_config=_training_config(tmp_path), num_sample_images=0)
    assert "training_config.json" in uploaded and "unet/diffusion_pytorch_model.safetensors" in uploaded
    assert SAVE_MANIFEST_NAME not in uploaded and not [name for name in uploaded if "ddpm_components" in name]
    assert json.loads(uploaded["training_config.json"])["output_dir"] == "digits"
    _assert_no_local_paths(uploaded, tmp_path)


def test_cli_push_of_a_trained_folder_publishes_no_local_paths(tmp_path: Path, hub_server):
    """`ddpm-components push --model FOLDER` against the loopback Hub: FOLDER/training_config.json holds the
    absolute paths a training run writes; the Hub receives none of them, nor our manifest."""
    local = tmp_path / "home" / "me" / "runs" / "digits"
    tiny_pipeline().save_pretrained(local, training_config=_training_config(tmp_path / "home" / "me"))
    code = (
        "from ddpm_components.cli import main\n"
        f"raise SystemExit(main(['push', '--model', {str(local)!r}, '--repo-id', 'user/digits', "
        "'--num-sample-images', '0']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=hub_server.env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    files = hub_server.state.repos["user/digits"].files
    assert "training_config.json" in files and SAVE_MANIFEST_NAME not in files
    assert json.loads(files["training_config.json"])["train_data_dir"] == "digit-folders"
    _assert_no_local_paths(files, tmp_path)
