"""DDPMUNet2DModel <-> diffusers' UNet2DModel: conversion both ways, same outputs on the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DModel

from ddpm_components.unet_ddpm import DDPMUNet2DModel

# tiny models run faster on one thread on the shared 2-core machine (fixture in conftest.py)
pytestmark = pytest.mark.usefixtures("torch_single_thread")

# google/ddpm-cifar10-32's configuration, with smaller channel counts unless `full` is asked for
CIFAR10_CONFIG = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 256, 256),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 2,
    "downsample_padding": 0,
    "freq_shift": 1,
    "flip_sin_to_cos": False,
    "norm_eps": 1e-6,
    "attention_head_dim": None,
    "dropout": 0.1,
}
# the 256x256 DDPM models' configuration (google/ddpm-celebahq-256, -church-256, -bedroom-256, -cat-256)
LSUN256_CONFIG = {
    "sample_size": 256,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 128, 256, 256, 512, 512),
    "down_block_types": (
        "DownBlock2D",
        "DownBlock2D",
        "DownBlock2D",
        "DownBlock2D",
        "AttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    "layers_per_block": 2,
    "downsample_padding": 0,
    "freq_shift": 1,
    "flip_sin_to_cos": False,
    "norm_eps": 1e-6,
    "attention_head_dim": None,
}
TINY_CIFAR10 = {**CIFAR10_CONFIG, "block_out_channels": (32, 64, 64, 64), "norm_num_groups": 8}
TINY_LSUN256 = {
    **LSUN256_CONFIG,
    "block_out_channels": (8, 8, 16, 16, 32, 32),
    "norm_num_groups": 4,
    "sample_size": 32,
}
TOLERANCE = 1e-4  # max abs diff, float32


def random_unet2d(config: dict, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    model = UNet2DModel(**config).eval()
    with torch.no_grad():  # make the GroupNorm affine parameters non-trivial too
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


def assert_same_outputs(ours, theirs, shape, class_labels=None, timesteps=(3, 999)):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(shape, generator=generator)
    timestep = torch.tensor(timesteps)
    with torch.no_grad():
        expected = theirs(sample, timestep, class_labels=class_labels).sample
        actual = ours(sample, timestep, class_labels=class_labels).sample
    assert expected.abs().max() > 1e-2  # a meaningful comparison
    assert (actual - expected).abs().max() <= TOLERANCE


@pytest.mark.parametrize("config", [TINY_CIFAR10, TINY_LSUN256], ids=["cifar10-layout", "256-layout"])
def test_from_unet2d_matches_outputs(config):
    theirs = random_unet2d(config)
    ours = DDPMUNet2DModel.from_unet2d(theirs)
    size = config["sample_size"]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert not ours.training
    assert_same_outputs(ours, theirs, (2, 3, size, size))
    assert ours.config.downsample_padding == 0 and ours.config.freq_shift == 1


def test_configuration_mapping_of_the_cifar10_layout():
    ours = DDPMUNet2DModel.from_unet2d(random_unet2d(TINY_CIFAR10))
    assert ours.config.attention_resolutions == (16,)
    assert ours.config.block_out_channels == (32, 64, 64, 64)
    assert ours.config.use_null_class_embed is False
    assert [level.attentions is not None for level in ours.down_blocks] == [False, True, False, False]
    assert [level.attentions is not None for level in ours.up_blocks] == [False, False, True, False]


def test_to_unet2d_roundtrip_and_class_labels():
    ours = DDPMUNet2DModel(
        sample_size=16,
        block_out_channels=(16, 32),
        layers_per_block=1,
        attention_resolutions=(16, 8),
        norm_num_groups=8,
        num_class_embeds=5,
        out_channels=6,
        resnet_time_scale_shift="scale_shift",
        attention_head_dim=8,
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
    ).eval()
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    theirs = ours.to_unet2d()
    assert isinstance(theirs, UNet2DModel)
    assert theirs.config.num_class_embeds == 6  # 5 classes + the null class
    labels = torch.tensor([2, ours.null_class_label])
    assert_same_outputs(ours, theirs, (2, 3, 16, 16), class_labels=labels)
    back = DDPMUNet2DModel.from_unet2d(theirs)
    assert back.config.num_class_embeds == 6 and back.null_class_label is None
    assert_same_outputs(back, theirs, (2, 3, 16, 16), class_labels=labels)


def test_from_unet2d_class_conditional():
    theirs = random_unet2d({**TINY_CIFAR10, "num_class_embeds": 4})
    ours = DDPMUNet2DModel.from_unet2d(theirs)
    assert ours.config.num_class_embeds == 4 and ours.null_class_label is None
    assert_same_outputs(ours, theirs, (2, 3, 32, 32), class_labels=torch.tensor([0, 3]))


def test_scale_shift_needs_an_explicit_mid_attention_norm():
    config = {**TINY_CIFAR10, "resnet_time_scale_shift": "scale_shift"}
    with pytest.raises(ValueError, match="attn_norm_num_groups"):
        DDPMUNet2DModel.from_unet2d(UNet2DModel(**config))
    theirs = random_unet2d({**config, "attn_norm_num_groups": 8})
    assert_same_outputs(DDPMUNet2DModel.from_unet2d(theirs), theirs, (1, 3, 32, 32), timesteps=(50,))


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        ({"time_embedding_type": "fourier"}, "time_embedding_type"),
        ({"center_input_sample": True}, "center_input_sample"),
        ({"mid_block_scale_factor": 2.0}, "mid_block_scale_factor"),
        ({"act_fn": "mish"}, "act_fn"),
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"upsample_type": "resnet"}, "upsample_type"),
        (
            {"down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D")},
            "different levels",
        ),
        (
            {"down_block_types": ("DownBlock2D", "ResnetDownsampleBlock2D", "DownBlock2D", "DownBlock2D")},
            "ResnetDownsampleBlock2D",
        ),
        ({"attn_norm_num_groups": 4}, "attn_norm_num_groups"),
        ({"mid_block_type": None}, "mid_block_type"),
    ],
)
def test_unsupported_unet2d_options_are_named(overrides, option):
    theirs = UNet2DModel(**{**TINY_CIFAR10, **overrides})
    with pytest.raises(ValueError, match=option):
        DDPMUNet2DModel.from_unet2d(theirs)


def test_from_pretrained_converts_a_unet2d_folder(tmp_path):
    theirs = random_unet2d(TINY_CIFAR10)
    theirs.save_pretrained(tmp_path / "unet")
    assert json.loads((tmp_path / "unet" / "config.json").read_text())["_class_name"] == "UNet2DModel"
    ours = DDPMUNet2DModel.from_pretrained(tmp_path, subfolder="unet")
    assert isinstance(ours, DDPMUNet2DModel)
    assert_same_outputs(ours, theirs, (1, 3, 32, 32), timesteps=(500,))
    as_double = DDPMUNet2DModel.from_pretrained(tmp_path, subfolder="unet", torch_dtype=torch.float64)
    assert next(as_double.parameters()).dtype == torch.float64
    ours.save_pretrained(tmp_path / "ours")
    reloaded = DDPMUNet2DModel.from_pretrained(tmp_path / "ours")
    assert_same_outputs(reloaded, theirs, (1, 3, 32, 32), timesteps=(500,))


def test_runs_inside_diffusers_ddpm_pipeline():
    from diffusers import DDPMPipeline, DDPMScheduler

    theirs = random_unet2d(TINY_CIFAR10)
    scheduler = DDPMScheduler(num_train_timesteps=10)
    images = {}
    for name, unet in (("theirs", theirs), ("ours", DDPMUNet2DModel.from_unet2d(theirs))):
        pipeline = DDPMPipeline(unet=unet, scheduler=scheduler).to("cpu")
        pipeline.set_progress_bar_config(disable=True)
        images[name] = pipeline(
            batch_size=1, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np"
        ).images
    assert images["ours"].shape == (1, 32, 32, 3)
    assert abs(images["ours"] - images["theirs"]).max() < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "batch"), [(CIFAR10_CONFIG, 2), (LSUN256_CONFIG, 1)], ids=["cifar10-32", "256x256"]
)
def test_full_size_conversion(config, batch):
    theirs = random_unet2d(config)
    ours = DDPMUNet2DModel.from_unet2d(theirs)
    size = config["sample_size"]
    assert_same_outputs(ours, theirs, (batch, 3, size, size), timesteps=(3, 999)[:batch])
    if config is CIFAR10_CONFIG:
        assert sum(p.numel() for p in ours.parameters()) == 35_746_307
        preset = DDPMUNet2DModel.from_preset("cifar10", use_null_class_embed=False)
        public = {key: value for key, value in preset.config.items() if not key.startswith("_")}
        assert public == {key: value for key, value in ours.config.items() if not key.startswith("_")}
