"""Our DDPMScheduler dropped into diffusers' own pipelines (tiny random components, nothing downloaded)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDPMPipeline,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers import DDPMScheduler as DiffusersDDPMScheduler

from ddpm_components import DDPMScheduler


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads that wait for
    each other make a 5 ms forward take seconds; run this module single-threaded and restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


# our keys that diffusers' DDPMScheduler lacks (DDIM's eta, Analytic-DPM's moments), at their defaults here
OUR_EXTRA_KEYS = ("eta", "analytic_moments", "multistep_order")


def public_config(scheduler) -> dict:
    return {k: v for k, v in scheduler.config.items() if not k.startswith("_") and k not in OUR_EXTRA_KEYS}


@pytest.mark.parametrize("steps", [pytest.param(1000, marks=pytest.mark.slow), 50])
def test_ddpm_pipeline_gives_diffusers_images(tiny_unet, steps):
    """Same seed, same images as diffusers' own scheduler. Tolerance 1e-4 on [0, 1] images: diffusers' float32
    schedule arithmetic differs from the exact values by up to ~4e-4 per step near t = 0 (see the parity tests)."""
    pipe = DDPMPipeline(unet=tiny_unet, scheduler=DiffusersDDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=steps, output_type="np"
    )
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    assert isinstance(pipe.scheduler, DDPMScheduler)
    got = pipe(
        batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=steps, output_type="np"
    )
    assert got.images.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(got.images, expected.images, atol=1e-4, rtol=0)
    # and the 8-bit images a user saves are identical (or a single level apart where a value sits on a boundary)
    assert np.abs(np.round(got.images * 255) - np.round(expected.images * 255)).max() <= 1


def test_ddim_pipeline_runs_ddpm_sampling_after_assignment(tiny_unet):
    """DDIMPipeline.__init__ replaces any scheduler with a DDIMScheduler; assigned afterwards, ours runs DDPM
    ancestral sampling (eta / use_clipped_model_output accepted and meaningless) and reproduces DDPMPipeline."""
    ddim = DDIMPipeline(unet=tiny_unet, scheduler=DiffusersDDPMScheduler())
    ddim.set_progress_bar_config(disable=True)
    ddim.scheduler = DDPMScheduler.from_config(ddim.scheduler.config)
    assert isinstance(ddim.scheduler, DDPMScheduler)
    got = ddim(
        batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=10, output_type="np"
    )
    ddpm = DDPMPipeline(unet=tiny_unet, scheduler=DDPMScheduler.from_config(ddim.scheduler.config))
    ddpm.set_progress_bar_config(disable=True)
    expected = ddpm(
        batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=10, output_type="np"
    )
    assert np.isfinite(got.images).all()
    np.testing.assert_allclose(got.images, expected.images, atol=1e-6, rtol=0)


def byte_symbols() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the 256 byte values (GPT-2's mapping)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_tiny_clip_tokenizer(folder) -> int:
    """A byte-level BPE vocabulary without merges: every byte character (and its end-of-word form) is a token."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in byte_symbols():
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return len(vocab)


@pytest.fixture(scope="module")
def tiny_stable_diffusion(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny_clip_tokenizer")
    vocab_size = write_tiny_clip_tokenizer(folder)
    tokenizer = CLIPTokenizer(
        vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"), model_max_length=16
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()
    scheduler = PNDMScheduler(  # as in Stable Diffusion's scheduler_config.json
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_stable_diffusion_pipeline_with_our_scheduler(tiny_stable_diffusion):
    pipe = tiny_stable_diffusion
    original = pipe.scheduler
    pipe.scheduler = DDPMScheduler.from_config(original.config)
    # SD's schedule survives the swap, exactly as it does for diffusers' own DDPMScheduler
    for key in ("beta_start", "beta_end", "beta_schedule", "steps_offset", "prediction_type"):
        assert pipe.scheduler.config[key] == original.config[key], key
    assert public_config(pipe.scheduler) == public_config(DiffusersDDPMScheduler.from_config(original.config))
    call = dict(
        prompt="a red square",
        height=16,
        width=16,
        num_inference_steps=4,
        guidance_scale=2.0,
        output_type="np",
    )
    try:
        out = pipe(**call, generator=torch.Generator().manual_seed(0))
        assert out.images.shape == (1, 16, 16, 3)
        assert np.isfinite(out.images).all()
        # the same images as diffusers' own DDPMScheduler in the same pipeline (same seed, same draws)
        pipe.scheduler = DiffusersDDPMScheduler.from_config(original.config)
        expected = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        pipe.scheduler = DDPMScheduler.from_config(original.config)
        np.testing.assert_allclose(out.images, expected, atol=1e-4, rtol=0)
        assert not np.allclose(
            pipe(**call, generator=torch.Generator().manual_seed(1)).images, expected, atol=1e-3
        )  # the comparison can see a different seed
        assert pipe.scheduler.timesteps.tolist() == [751, 501, 251, 1]  # leading spacing with steps_offset=1
        # back to diffusers' scheduler: our config keeps everything the other scheduler had
        back = PNDMScheduler.from_config(pipe.scheduler.config)
        assert public_config(back) == public_config(original)
        again = DDPMScheduler.from_config(back.config)
        assert public_config(again) == public_config(pipe.scheduler)
    finally:
        pipe.scheduler = original
