"""Shared fixtures: a loopback Hub server, isolated Python subprocesses, tiny pipelines.

``hub_server`` starts the Hub-compatible test server (``tests/hub_server.py``) on a free port of 127.0.0.1 and
yields a :class:`HubInfo` whose ``env`` is a full environment for subprocesses that talk to it (``HF_ENDPOINT``
must be set before ``huggingface_hub``/``diffusers`` are imported, so Hub clients run in subprocesses).

``run_python(code, env=..., block_package=True)`` runs ``code`` in a fresh interpreter in which
``import ddpm_components`` fails (the package is installed editable, so it is blocked with a ``sys.meta_path``
finder and the working directory is a temporary folder), to check what users without our package get.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from hub_server import HubServer, HubState

DUMMY_TOKEN = "hf_test_token_for_the_loopback_hub"

_BLOCK_PACKAGE = textwrap.dedent(
    """
    import importlib.abc, sys

    class _BlockDDPMComponents(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "ddpm_components" or name.startswith("ddpm_components."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, _BlockDDPMComponents())
    try:
        import ddpm_components  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("test setup error: ddpm_components is still importable")
    """
)


@dataclass
class HubInfo:
    """A running test Hub: its URL, its stored state and an environment for subprocesses that use it."""

    endpoint: str
    state: HubState
    env: dict[str, str]


def hub_env(endpoint: str, home: Path, token: str | None = DUMMY_TOKEN) -> dict[str, str]:
    """Environment for a subprocess that talks to the Hub at ``endpoint`` with its own HF_HOME and module cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "DIFFUSERS_"))}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(home / "hf_home"),
        HF_MODULES_CACHE=str(home / "hf_modules"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    return env


@pytest.fixture
def hub_server(tmp_path: Path) -> Iterator[HubInfo]:
    """A Hub-compatible server on 127.0.0.1 (free port) for this test, with a matching subprocess env."""
    with HubServer() as server:
        yield HubInfo(server.endpoint, server.state, hub_env(server.endpoint, tmp_path))


@pytest.fixture
def run_python(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run Python code in a fresh interpreter (cwd: a temp folder); ``block_package`` hides ddpm_components."""

    def run(
        code: str,
        *,
        env: dict[str, str] | None = None,
        block_package: bool = True,
        check: bool = True,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess:
        workdir = tmp_path / "subprocess_cwd"
        workdir.mkdir(exist_ok=True)
        source = (_BLOCK_PACKAGE if block_package else "") + textwrap.dedent(code)
        environment = env if env is not None else hub_env("http://127.0.0.1:9", tmp_path)
        result = subprocess.run(
            [sys.executable, "-c", source],
            cwd=workdir,
            env=environment,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"subprocess failed with exit code {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
                f"\n--- stderr\n{result.stderr[-6000:]}"
            )
        return result

    return run


@pytest.fixture
def torch_single_thread() -> Iterator[None]:
    """Run a test with one torch thread (tiny models are much faster so on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# train() options for a 2-level, 8-channel U-Net on 8x8 digits: a training step takes milliseconds
TINY_TRAINING = dict(
    block_out_channels="8,16",
    layers_per_block=1,
    train_batch_size=16,
    num_inference_steps=2,
    samples_per_class=1,
    num_samples=4,
    lr_warmup_steps=0,
    logging_steps=1,
    lr_scheduler="constant",
    num_train_timesteps=50,
    evaluate=False,  # tests of the evaluation turn it on
)


def tiny_unet(num_class_embeds: int | None = None, out_channels: int = 1, **overrides):
    """Our DDPMUNet2DModel, tiny: 8x8 greyscale, two levels, seeded weights."""
    from ddpm_components import DDPMUNet2DModel

    torch.manual_seed(0)
    config = dict(
        sample_size=8,
        in_channels=1,
        out_channels=out_channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        attention_resolutions=(4,),
        norm_num_groups=8,
        num_class_embeds=num_class_embeds,
    )
    config.update(overrides)
    return DDPMUNet2DModel(**config).eval()


def tiny_diffusers_unet(**overrides):
    """diffusers' UNet2DModel, tiny: 8x8 greyscale, seeded weights."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    config = dict(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    config.update(overrides)
    return UNet2DModel(**config).eval()


def tiny_pipeline(num_class_embeds: int | None = None, num_train_timesteps: int = 50, **scheduler_kwargs):
    """A DDPMPipeline of our tiny U-Net and our scheduler (T = 50), progress bar off."""
    from ddpm_components import DDPMPipeline, DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, **scheduler_kwargs)
    pipeline = DDPMPipeline(unet=tiny_unet(num_class_embeds), scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """wandb offline (no account, no network), writing under ``tmp_path``; wandb's process-wide setup (which keeps
    the first run's settings, its folder included) is torn down before and after, so tests do not share it."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    wandb.teardown()
    yield tmp_path / "wandb"
    wandb.teardown()
