"""The U-Net's ``class_names`` config key (position = label): saved, reloaded, validated, carried through
diffusers' UNet2DModel (which has no such argument) and accepted by the pipeline as class labels."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import diffusers
import pytest
import torch
from conftest import tiny_unet

from ddpm_components import DDPMPipeline, DDPMScheduler, DDPMUNet2DModel

pytestmark = pytest.mark.usefixtures("torch_single_thread")

NAMES = ["cat", "dog", "bird"]


def test_class_names_are_saved_and_reloaded(tmp_path: Path):
    unet = tiny_unet(3, class_names=tuple(NAMES))  # a tuple is stored as a list
    assert unet.config.class_names == NAMES
    unet.save_pretrained(tmp_path / "unet")
    assert json.loads((tmp_path / "unet" / "config.json").read_text())["class_names"] == NAMES
    assert DDPMUNet2DModel.from_pretrained(tmp_path / "unet").config.class_names == NAMES
    assert DDPMUNet2DModel.from_config(unet.config).config.class_names == NAMES
    assert tiny_unet(3).config.class_names is None
    # and inside a saved pipeline
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(50)).save_pretrained(tmp_path / "pipe")
    assert DDPMPipeline.from_pretrained(tmp_path / "pipe").class_names == NAMES
    assert "0 = `cat`, 1 = `dog`, 2 = `bird`" in (tmp_path / "pipe" / "README.md").read_text()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"num_class_embeds": 3, "class_names": ["cat", "dog"]},
            "class_names has 2 names but num_class_embeds=3",
        ),
        (
            {"num_class_embeds": None, "class_names": ["cat"]},
            "class_names has 1 names but num_class_embeds=None",
        ),
        ({"num_class_embeds": 2, "class_names": ["cat", "cat"]}, "distinct non-empty strings"),
        ({"num_class_embeds": 2, "class_names": ["cat", ""]}, "distinct non-empty strings"),
    ],
)
def test_class_names_must_match_the_classes(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_unet(**overrides)


@pytest.mark.parametrize("use_null_class_embed", [True, False])
def test_to_unet2d_and_back_keeps_the_class_names(tmp_path: Path, caplog, use_null_class_embed: bool):
    ours = tiny_unet(3, class_names=NAMES, use_null_class_embed=use_null_class_embed)
    theirs = ours.to_unet2d()
    assert theirs.config["_class_names"] == NAMES and "class_names" not in theirs.config
    theirs.save_pretrained(tmp_path / "unet2d")
    with caplog.at_level(logging.WARNING):
        reloaded = diffusers.UNet2DModel.from_pretrained(tmp_path / "unet2d")
    assert reloaded.config["_class_names"] == NAMES
    assert "not expected" not in caplog.text  # diffusers warns about unknown keys, not about hidden ones
    back = DDPMUNet2DModel.from_unet2d(reloaded)
    public = {key: value for key, value in ours.config.items() if not key.startswith("_")}
    assert {key: back.config[key] for key in public} == public  # the null class comes back too
    x, labels = torch.randn(2, 1, 8, 8), torch.tensor([0, 3 if use_null_class_embed else 2])
    with torch.no_grad():
        torch.testing.assert_close(
            back(x, 7, class_labels=labels).sample, ours(x, 7, class_labels=labels).sample
        )
    # a pipeline of the diffusers U-Net accepts the names too
    pipeline = DDPMPipeline(unet=reloaded, scheduler=DDPMScheduler(50))
    pipeline.set_progress_bar_config(disable=True)
    kwargs = dict(batch_size=2, num_inference_steps=2, output_type="pt")
    by_name = pipeline(class_labels=["bird", "cat"], generator=torch.Generator().manual_seed(0), **kwargs)
    by_index = pipeline(class_labels=[2, 0], generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(by_name.images, by_index.images)


def test_from_unet2d_reads_visible_class_names_and_rejects_a_wrong_count():
    theirs = tiny_unet(3, use_null_class_embed=False).to_unet2d()  # 3 class embeddings
    theirs.register_to_config(class_names=NAMES)
    assert DDPMUNet2DModel.from_unet2d(theirs).config.class_names == NAMES
    theirs.register_to_config(class_names=["cat"])
    with pytest.raises(ValueError, match="class_names has 1 names but num_class_embeds=3"):
        DDPMUNet2DModel.from_unet2d(theirs)
