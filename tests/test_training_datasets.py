"""Training from `datasets` and with diffusers' command line: a diffusers user's `train_unconditional.py` command
runs unchanged against `ddpm-components train` (local data, nothing reaches the network)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from conftest import DUMMY_TOKEN, TINY_TRAINING, tiny_diffusers_unet
from hub_server import DEFAULT_USER
from test_data_datasets import offline, write_image_folder  # noqa: F401  (the fixture is used by name)

from ddpm_components.cli import DIFFUSERS_NOTES, build_parser, main
from ddpm_components.training import TrainingConfig, list_checkpoints, train

pytestmark = pytest.mark.usefixtures("torch_single_thread", "offline")

#: every flag of diffusers' examples/unconditional_image_generation/train_unconditional.py, with a value
DIFFUSERS_COMMAND = """
--dataset_name=DATA --dataset_config_name=default --model_config_name_or_path=UNET --train_data_dir=DATA
--output_dir=OUT --overwrite_output_dir --cache_dir=CACHE --resolution=16 --center_crop --random_flip
--train_batch_size=4 --eval_batch_size=9 --dataloader_num_workers=0 --num_epochs=3 --save_images_epochs=2
--save_model_epochs=2 --gradient_accumulation_steps=2 --learning_rate=1e-4 --lr_scheduler=polynomial
--lr_warmup_steps=7 --adam_beta1=0.95 --adam_beta2=0.99 --adam_weight_decay=1e-6 --adam_epsilon=1e-07 --use_ema
--ema_inv_gamma=2.0 --ema_power=0.5 --ema_max_decay=0.999 --push_to_hub --hub_token=hf_x --hub_model_id=me/model
--hub_private_repo --logger=wandb --logging_dir=elsewhere --local_rank=0 --mixed_precision=bf16
--prediction_type=sample --ddpm_num_steps=400 --ddpm_num_inference_steps=30 --ddpm_beta_schedule=squaredcos_cap_v2
--checkpointing_steps=5 --checkpoints_total_limit=3 --resume_from_checkpoint=latest
--enable_xformers_memory_efficient_attention --preserve_input_precision
"""


def test_every_diffusers_flag_parses_to_its_meaning():
    args = build_parser().parse_args(["train", *shlex.split(DIFFUSERS_COMMAND)])
    expected = {
        "dataset_name": "DATA",
        "dataset_config_name": "default",
        "model_config_name_or_path": "UNET",
        "train_data_dir": "DATA",
        "output_dir": "OUT",
        "overwrite": True,
        "cache_dir": "CACHE",
        "resolution": 16,
        "crop": "center",
        "random_flip": True,
        "train_batch_size": 4,
        "num_samples": 9,
        "dataloader_num_workers": 0,
        "num_epochs": 3,
        "save_images_epochs": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-4,
        "lr_scheduler": "polynomial",
        "lr_warmup_steps": 7,
        "adam_beta1": 0.95,
        "adam_beta2": 0.99,
        "adam_weight_decay": 1e-6,
        "adam_epsilon": 1e-7,
        "use_ema": True,
        "ema_inv_gamma": 2.0,
        "ema_power": 0.5,
        "ema_max_decay": 0.999,
        "push_to_hub": True,
        "hub_token": "hf_x",
        "hub_model_id": "me/model",
        "hub_private": True,
        "report_to": "wandb",
        "logging_dir": "elsewhere",
        "mixed_precision": "bf16",
        "prediction_type": "sample",
        "num_train_timesteps": 400,
        "num_inference_steps": 30,
        "beta_schedule": "squaredcos_cap_v2",
        "checkpointing_steps": 5,
        "checkpoints_total_limit": 3,
        "resume": "latest",
    }
    for name, value in expected.items():
        assert getattr(args, name) == value, name
    assert sorted(args.diffusers_notes) == sorted(
        DIFFUSERS_NOTES
    )  # each accepted flag without a field: a note
    flags = {word.split("=")[0] for word in shlex.split(DIFFUSERS_COMMAND)}
    assert len(flags) == 45


def test_defaults_stay_ours_and_diffusers_spellings_are_aliases():
    ours, diffusers_style = (
        build_parser().parse_args(["train", *words]) for words in ([], ["--use_ema", "--logging_dir", "logs"])
    )
    for name in ("use_ema", "crop", "resolution", "checkpoints_total_limit", "report_to", "learning_rate"):
        assert getattr(ours, name) == getattr(diffusers_style, name) == getattr(TrainingConfig(), name)
    assert diffusers_style.diffusers_notes == [] and diffusers_style.logging_dir == "logs"


def _unet_config(tmp_path: Path) -> Path:
    folder = tmp_path / "unet_config"
    tiny_diffusers_unet().save_config(
        str(folder)
    )  # diffusers' UNet2DModel: 2 levels, attention on the second
    return folder


@pytest.mark.parametrize("data_flag", ["--dataset_name", "--train_data_dir"])
def test_a_diffusers_command_line_runs_unchanged(tmp_path, capsys, data_flag):
    """The README command of diffusers' train_unconditional.py, tiny: trains, checkpoints, samples and saves;
    --num_epochs and --save_images_epochs count epochs of 8 images in batches of 4 (2 steps each)."""
    data = write_image_folder(tmp_path / "flowers", classes=("daisy", "rose"), per_class=4)
    out, unet = tmp_path / "ddpm-ema-flowers-8", _unet_config(tmp_path)
    command = f"""train {data_flag}={data} --model_config_name_or_path={unet} --resolution=8 --center_crop
        --random_flip --output_dir={out} --train_batch_size=4 --eval_batch_size=4 --num_epochs=2
        --gradient_accumulation_steps=1 --use_ema --learning_rate=1e-4 --lr_warmup_steps=1 --mixed_precision=no
        --save_images_epochs=1 --save_model_epochs=1 --checkpointing_steps=2 --checkpoints_total_limit=1
        --ddpm_num_steps=50 --ddpm_num_inference_steps=2 --logger=tensorboard --logging_dir=logs
        --cache_dir={tmp_path / "cache"} --enable_xformers_memory_efficient_attention"""
    assert main(shlex.split(command)) == 0, capsys.readouterr().err
    printed = capsys.readouterr()
    assert "note: --save_model_epochs" not in printed.err  # it does what it does in diffusers
    assert "step 2: saved the EMA pipeline" in printed.out + printed.err
    assert "note: --enable_xformers_memory_efficient_attention" in printed.err
    record = json.loads((out / "training_config.json").read_text())
    assert record["num_epochs"] == 2 and record["max_train_steps"] == 4 and record["sample_every_steps"] == 2
    assert record["save_model_steps"] == 2
    assert record["num_train_timesteps"] == 50 and record["report_to"] == "tensorboard"
    assert [path.name for path in list_checkpoints(out)] == ["checkpoint-4"]
    assert (out / "samples" / "step-0000002.png").is_file() and (out / "logs" / "ddpm-components").is_dir()
    config = json.loads((out / "unet" / "config.json").read_text())
    assert config["class_names"] == ["daisy", "rose"] and config["in_channels"] == 3
    assert list(config["block_out_channels"]) == [16, 32] and config["sample_size"] == 8
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4
    # diffusers' way to continue: --resume_from_checkpoint latest, more epochs
    resumed = command.replace("--num_epochs=2", "--num_epochs=3") + " --resume_from_checkpoint=latest"
    assert main(shlex.split(resumed)) == 0, capsys.readouterr().err
    assert [path.name for path in list_checkpoints(out)] == ["checkpoint-6"]


def test_train_from_a_parquet_file_with_an_integer_label_column(tmp_path):
    import datasets

    source = datasets.load_dataset(
        str(write_image_folder(tmp_path / "pets", per_class=8)), split="train", cache_dir=str(tmp_path / "c")
    )
    source = source.cast_column("label", datasets.Value("int64")).rename_column("label", "kind")
    source.rename_column("image", "picture").to_parquet(str(tmp_path / "pets.parquet"))
    config = TrainingConfig(
        output_dir=str(tmp_path / "out"),
        dataset_name=str(tmp_path / "pets.parquet"),
        label_column="kind",
        cache_dir=str(tmp_path / "cache"),
        resolution=8,
        max_train_steps=2,
        **TINY_TRAINING,
    )
    summary = train(config)
    assert summary["global_step"] == 2
    unet = json.loads((tmp_path / "out" / "unet" / "config.json").read_text())
    assert unet["class_names"] == ["0", "1"] and unet["num_class_embeds"] == 2
    saved = json.loads((tmp_path / "out" / "training_config.json").read_text())
    assert saved["dataset_name"] == "pets.parquet" and saved["cache_dir"] == "cache"


def test_train_streaming_for_max_train_steps(tmp_path):
    data = write_image_folder(tmp_path / "pets", per_class=4)
    options = dict(
        TINY_TRAINING, train_batch_size=4, checkpointing_steps=3, evaluate=True, eval_bpd_timesteps=2
    )
    config = TrainingConfig(
        output_dir=str(tmp_path / "out"),
        dataset_name=str(data),
        dataset_streaming=True,
        cache_dir=str(tmp_path / "cache"),
        resolution=8,
        max_train_steps=5,  # 2 batches per epoch: the stream is read three times
        **options,
    )
    summary = train(config)
    assert summary["global_step"] == 5 and "eval_bpd" in summary["evaluation"]
    resumed = TrainingConfig(**{**config.to_dict(), "max_train_steps": 6, "resume": "latest"})
    assert train(resumed)["global_step"] == 6


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["--dataset_name", "DATA", "--image_column", "photo"], "--image-column 'photo' is not a column of"),
        (
            ["--dataset_name", "DATA", "--dataset-split", "test"],
            "Unknown split \"test\". Should be one of ['train']",
        ),
        (
            ["--dataset_name", "DATA", "--dataset-streaming", "--num_epochs", "2"],
            "num_epochs needs the dataset's len",
        ),
        (["--image-column", "photo"], "image_column='photo' need(s) dataset_name"),
        (["--dataset_name", "DATA", "--train_data_dir", "DATA"], "exclude each other"),
        (
            ["--model_config_name_or_path", "./nothing"],
            "is neither a JSON file nor a folder holding config.json",
        ),
        (
            ["--logger", "comet"],
            "report_to must be one of 'none', 'tensorboard', 'wandb', 'all', got 'comet'",
        ),
        (
            ["--dataset_name", "DATA", "--dataset-streaming", "--train_batch_size", "7"],
            "the streamed dataset has fewer than one batch per process (7 x 1)",
        ),
        (
            ["--model_config_name_or_path", "BAD_UNET"],
            "cannot convert this UNet2DModel: down_block_types contains ['SkipDownBlock2D']",
        ),
    ],
)
def test_bad_data_options_are_one_line_and_exit_code_2(tmp_path, capsys, words, message):
    data = write_image_folder(tmp_path / "pets")
    bad_unet = tmp_path / "unet.json"
    bad_unet.write_text(json.dumps({"_class_name": "UNet2DModel", "down_block_types": ["SkipDownBlock2D"]}))
    words = [{"DATA": str(data), "BAD_UNET": str(bad_unet)}.get(word, word) for word in words]
    out = tmp_path / "out"
    code = main(["train", "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"), *words])
    err = capsys.readouterr().err.strip()  # (datasets' progress bars may come first)
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err, err
    assert message in err.splitlines()[-1] and err.splitlines()[-1].startswith(
        "ddpm-components train: error:"
    )
    assert not out.exists()


def test_a_hub_dataset_id_through_the_loopback_hub(hub_server, run_python, tmp_path):
    """`--dataset_name user/name` downloads through huggingface_hub (HF_ENDPOINT: the loopback Hub) and trains,
    and diffusers' `--push_to_hub` pushes the result; the same id streams."""
    import os

    data = write_image_folder(tmp_path / "pets", per_class=4)
    env = {**hub_server.env, "PYTHONPATH": str(Path(__file__).parents[1])}
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        env.pop(name, None)
    env["HF_DATASETS_CACHE"] = str(tmp_path / "datasets_cache")
    result = run_python(
        f"""
        import datasets, huggingface_hub, os
        os.makedirs("upload/data")
        datasets.load_dataset({str(data)!r}, split="train", cache_dir="prepare").to_parquet(
            "upload/data/train-00000-of-00001.parquet")
        api = huggingface_hub.HfApi()
        api.create_repo("me/pets", repo_type="dataset")
        api.upload_folder(folder_path="upload", repo_id="me/pets", repo_type="dataset")

        from ddpm_components.cli import main
        from ddpm_components.data import build_hf_image_dataset
        code = main(["train", "--dataset_name", "me/pets", "--output_dir", "out", "--resolution", "8",
                     "--train_batch_size", "4", "--max-train-steps", "2", "--block-out-channels", "8,16",
                     "--layers-per-block", "1", "--ddpm_num_steps", "20", "--ddpm_num_inference_steps", "2",
                     "--samples-per-class", "1", "--no-evaluate", "--checkpointing_steps", "0",
                     "--push_to_hub", "--hub_token", {DUMMY_TOKEN!r}])
        assert code == 0, code
        print("class_names", open("out/unet/config.json").read().count('"cat"'))
        streamed = build_hf_image_dataset("me/pets", resolution=4, streaming=True)
        print("streamed", len(list(streamed)), streamed.class_names)
        """,
        env=env,
        block_package=False,
        timeout=600,
    )
    assert "class_names 1" in result.stdout and "streamed 8 ('cat', 'dog')" in result.stdout, result.stdout
    assert any(path.startswith("/api/datasets/me/pets") for _, path in hub_server.state.requests)
    # diffusers' --push_to_hub without --hub_model_id: a repository named like the output folder, in the user's
    # namespace
    assert f"{DEFAULT_USER}/out" in hub_server.state.repos
    assert (
        os.environ.get("HF_ENDPOINT") != hub_server.endpoint
    )  # only the subprocess talked to the loopback Hub


def test_logger_wandb_logs_offline(tmp_path, monkeypatch, capsys, offline_wandb):
    """diffusers' --logger wandb: accelerate's wandb tracker (offline here: WANDB_MODE=offline, no account)."""
    monkeypatch.chdir(tmp_path)
    data = write_image_folder(tmp_path / "pets")
    command = f"""train --dataset_name {data} --cache_dir {tmp_path / "cache"} --resolution 8 --train_batch_size 2
        --max-train-steps 2 --block-out-channels 8,16 --layers-per-block 1 --ddpm_num_steps 20
        --ddpm_num_inference_steps 2 --samples-per-class 1 --no-evaluate --output_dir out --logger wandb"""
    assert main(shlex.split(command)) == 0, capsys.readouterr().err
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
