"""ddpm-components: Denoising Diffusion Probabilistic Models (Ho et al. 2020) for Hugging Face diffusers.

The three components live in self-contained modules (they import only torch, diffusers and the standard
library, so that a saved pipeline carries them as remote code):

- :class:`DDPMScheduler` (``scheduling_ddpm.py``): the forward and reverse processes, training targets
  and variational-bound terms;
- :class:`DDPMUNet2DModel` (``unet_ddpm.py``): the noise-prediction U-Net;
- :class:`DDPMPipeline` (``pipeline_ddpm.py``): sampling, image-to-image, saving and sharing.

Exports are resolved lazily so that ``import ddpm_components`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "DDPMScheduler": "scheduling_ddpm",
    "DDPMSchedulerOutput": "scheduling_ddpm",
    "DDPMUNet2DModel": "unet_ddpm",
    "DDPMUNet2DOutput": "unet_ddpm",
    "DDPMPipeline": "pipeline_ddpm",
    "TrainingConfig": "training",
    "train": "training",
}

__all__ = [
    "DDPMPipeline",
    "DDPMScheduler",
    "DDPMSchedulerOutput",
    "DDPMUNet2DModel",
    "DDPMUNet2DOutput",
    "TrainingConfig",
    "__version__",
    "train",
]

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline_ddpm import DDPMPipeline
    from .scheduling_ddpm import DDPMScheduler, DDPMSchedulerOutput
    from .training import TrainingConfig, train
    from .unet_ddpm import DDPMUNet2DModel, DDPMUNet2DOutput


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'ddpm_components' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
