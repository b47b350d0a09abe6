"""Helpers for the command line: load a pipeline from a folder or a Hub repo id, push a saved folder.

The pipeline module (``pipeline_ddpm.py``) stays self-contained because it is saved as remote code; these
helpers hold what only an installed ddpm-components needs (path checks, reading files next to a saved
pipeline, friendly error messages).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .pipeline_ddpm import SAMPLE_GRID_NAME, TRAINING_CONFIG_NAME, DDPMPipeline, HubError

__all__ = ["HubError", "is_repo_id", "load_pipeline", "push_folder"]

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+|[A-Za-z0-9][\w.\-]*")


def is_repo_id(text: str) -> bool:
    """True when ``text`` has the form of a Hub model repo id (``namespace/name`` or ``name``)."""
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text and not text.endswith((".", "-"))


def load_pipeline(model: str | Path, *, trust_remote_code: bool = False, **kwargs: Any) -> DDPMPipeline:
    """Load a saved pipeline from a folder or a Hub repo id as :class:`DDPMPipeline`.

    Our own components load from the installed ddpm-components, so no stored code runs; other custom
    components in a remote-code folder need ``trust_remote_code=True``.

    Raises:
        FileNotFoundError / NotADirectoryError: ``model`` is neither a pipeline folder nor a repo id.
        HubError: the Hub could not be reached, or the repository does not exist.
    """
    text = str(model)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"--model {text!r} is a file; pass the folder a pipeline was saved to")
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"--model {text!r} has no model_index.json: it is not a saved pipeline folder "
                "(save one with pipe.save_pretrained(...) or `ddpm-components train`)"
            )
        return DDPMPipeline.from_pretrained(str(path), trust_remote_code=trust_remote_code, **kwargs)
    if text.startswith((".", "/", "~")) or "\\" in text or not is_repo_id(text):
        raise FileNotFoundError(
            f"--model {text!r}: no such folder, and it is not a Hub repo id (namespace/name)"
        )
    return DDPMPipeline.from_pretrained(text, trust_remote_code=trust_remote_code, **kwargs)


def push_folder(
    model: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    num_sample_images: int = 16,
    sample_inference_steps: int | None = None,
    resample: bool = False,
) -> str:
    """Push a saved pipeline folder to the Hub (the remote-code layout plus a model card); return the commit URL.

    ``training_config.json`` in the folder goes into the model card; an existing ``samples.png`` is reused as
    the card's grid unless ``resample`` (else ``num_sample_images`` are sampled). The local folder is only read.
    """
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"--model {str(model)!r} is not a folder; pass the folder a pipeline was saved to"
        )
    pipeline = load_pipeline(path)
    training_config = None
    if (path / TRAINING_CONFIG_NAME).is_file():
        training_config = json.loads((path / TRAINING_CONFIG_NAME).read_text(encoding="utf-8"))
    sample_grid = None
    if (path / SAMPLE_GRID_NAME).is_file() and not resample:
        from PIL import Image

        with Image.open(path / SAMPLE_GRID_NAME) as image:
            sample_grid = image.copy()
    return pipeline.push_to_hub(
        repo_id,
        commit_message=commit_message,
        private=private,
        token=token,
        training_config=training_config,
        sample_grid=sample_grid,
        num_sample_images=num_sample_images,
        sample_inference_steps=sample_inference_steps,
    )
