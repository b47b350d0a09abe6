"""Helpers for the command line: load a pipeline from a folder or a Hub repo id, push a saved folder.

The pipeline module (``pipeline_ddpm.py``) stays self-contained because it is saved as remote code; these
helpers hold what only an installed ddpm-components needs (path checks, reading files next to a saved
pipeline, friendly error messages).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

from .pipeline_ddpm import SAMPLE_GRID_NAME, TRAINING_CONFIG_NAME, DDPMPipeline, HubError

__all__ = [
    "HubError",
    "check_pipeline_folder",
    "check_safetensors_file",
    "is_repo_id",
    "load_pipeline",
    "push_folder",
]

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+|[A-Za-z0-9][\w.\-]*")


def is_repo_id(text: str) -> bool:
    """True when ``text`` has the form of a Hub model repo id (``namespace/name`` or ``name``)."""
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text and not text.endswith((".", "-"))


def load_pipeline(model: str | Path, *, trust_remote_code: bool = False, **kwargs: Any) -> DDPMPipeline:
    """Load a saved pipeline from a folder or a Hub repo id as :class:`DDPMPipeline`.

    Our own components load from the installed ddpm-components, so no stored code runs; other custom
    components in a remote-code folder need ``trust_remote_code=True``. Weights load from safetensors only:
    pickle (``.bin``) loading is off by default because unpickling a file can run code; pass
    ``use_safetensors=False`` to allow it for a folder you trust.

    A folder is checked before anything is loaded (:func:`check_pipeline_folder`), so a damaged or incomplete
    one fails with a message naming the file. A path that does not exist is a Hub repo id only when it has that
    form and its first component is not a local folder (``runs/digts`` with ``runs/`` present is a typo, and the
    error suggests the closest existing name).

    Raises:
        FileNotFoundError / NotADirectoryError: ``model`` is neither a pipeline folder nor a repo id, or a file of
            the folder is missing.
        ValueError: a file of the folder is damaged (invalid JSON, a truncated weights file, pickle weights only).
        HubError: the Hub could not be reached, or the repository does not exist.
    """
    kwargs.setdefault("use_safetensors", True)
    text = str(model)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"--model {text!r} is a file; pass the folder a pipeline was saved to")
        check_pipeline_folder(path, allow_pickle=not kwargs["use_safetensors"], variant=kwargs.get("variant"))
        return _load_local_folder(path, trust_remote_code=trust_remote_code, **kwargs)
    if _is_local_path(text):
        not_hub = "" if is_repo_id(text) else ", and it is not a Hub repo id (namespace/name)"
        raise FileNotFoundError(f"--model {text!r}: no such folder{not_hub}{_close_match_hint(text)}")
    try:
        return DDPMPipeline.from_pretrained(text, trust_remote_code=trust_remote_code, **kwargs)
    except HubError as error:
        guess = _close_local_match(
            text
        ).guess  # "bsae" beside a folder "base": more likely a typo than a Hub repo
        if guess is not None:
            raise HubError(f"{error}; or did you mean the local folder {str(guess)!r}?") from error
        raise


def _is_local_path(text: str) -> bool:
    """True when a path that does not exist can only be meant as a local folder (not a Hub repo id)."""
    if text.startswith((".", "/", "~")) or "\\" in text or not is_repo_id(text):
        return True
    parts = Path(text).parts
    return len(parts) > 1 and os.path.lexists(parts[0])  # "runs/digts" beside a folder "runs"


class _LocalMatch(NamedTuple):
    """What exists of a local path that does not: the closest existing name, or the folder that lacks it."""

    guess: Path | None = None  # the existing path closest to the one given
    parent: Path | None = (
        None  # else the deepest existing folder of the path given (not the working folder) ...
    )
    missing: str = ""  # ... and its missing sub-folder


def _close_local_match(text: str) -> _LocalMatch:
    """The existing name closest to the first missing part of ``text`` (``runs/digts``: ``runs/digits``)."""
    parts = Path(text).expanduser().parts
    known = 0
    while known < len(parts) and os.path.isdir(Path(*parts[: known + 1])):
        known += 1
    if known == len(parts):
        return _LocalMatch()
    parent = Path(*parts[:known]) if known else Path(".")
    try:
        names = sorted(
            entry.name for entry in os.scandir(parent) if entry.is_dir() and not entry.name.startswith(".")
        )
    except OSError:
        return _LocalMatch()
    matches = difflib.get_close_matches(parts[known], names, n=1, cutoff=0.6)
    if not matches:
        return _LocalMatch(parent=parent, missing=parts[known]) if known else _LocalMatch()
    guess = Path(*parts[:known], matches[0])
    if Path(*parts[:known], matches[0], *parts[known + 1 :]).exists():
        guess = Path(*parts[:known], matches[0], *parts[known + 1 :])
    return _LocalMatch(guess=guess)


def _close_match_hint(text: str) -> str:
    """``"; did you mean 'runs/digits'?"`` (or ``"; 'runs' has no sub-folder 'zebra'"``) for a missing path."""
    match = _close_local_match(text)
    if match.guess is not None:
        return f"; did you mean {str(match.guess)!r}?"
    if match.parent is not None:
        return f"; {str(match.parent)!r} has no sub-folder {match.missing!r}"
    return ""


def _load_local_folder(path: Path, **kwargs: Any) -> DDPMPipeline:
    """Load a checked folder; a failure of the loader becomes a ``ValueError`` naming the folder."""
    try:
        return DDPMPipeline.from_pretrained(str(path), **kwargs)
    except (OSError, RuntimeError) as error:
        if isinstance(error, (FileNotFoundError, NotADirectoryError, HubError)):
            raise
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"could not load the pipeline saved in {str(path)!r}: {first}") from error


# -------------------------------------------------------------------------------------- folder checks
WEIGHTS_NAME = "diffusion_pytorch_model"
"""diffusers' file name stem of a model's weights (``.safetensors``, or ``.safetensors.index.json`` when sharded)."""


def _read_json_file(path: Path) -> dict:
    """A JSON object from ``path``; ``FileNotFoundError`` / ``ValueError`` naming the file otherwise."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is missing: the pipeline folder is incomplete (save it again)"
        )
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{str(path)!r} is not a text file ({error.reason}): it is damaged") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{str(path)!r} is not valid JSON ({error.msg}: line {error.lineno} column {error.colno}): it is damaged "
            "(save the pipeline again, or fix the file)"
        ) from None
    if not isinstance(value, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(value).__name__}: it is damaged")
    return value


def check_safetensors_file(path: Path) -> None:
    """Raise ``ValueError`` naming ``path`` unless it is a whole safetensors file: an 8-byte header length, a JSON
    header, and exactly as many bytes as the header's tensors need (a truncated download or copy fails here)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        length_bytes = handle.read(8)
        header_length = int.from_bytes(length_bytes, "little") if len(length_bytes) == 8 else -1
        if not 0 < header_length <= size - 8:
            raise ValueError(
                f"{str(path)!r} is damaged: not a safetensors file, or truncated ({size} bytes); download or copy "
                "it again"
            )
        try:
            header = json.loads(handle.read(header_length))
            ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise ValueError(
                f"{str(path)!r} is damaged: its safetensors header is unreadable; download or copy it again"
            ) from None
    expected = 8 + header_length + max(ends, default=0)
    if size != expected:
        raise ValueError(
            f"{str(path)!r} is truncated or damaged: {size} bytes, its header describes {expected} (download or copy "
            "it again)"
        )


def _check_model_weights(folder: Path, allow_pickle: bool, variant: str | None) -> None:
    """The weights of one model component: a whole safetensors file (or every shard of a sharded one)."""
    stem = WEIGHTS_NAME if variant is None else f"{WEIGHTS_NAME}.{variant}"
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        check_safetensors_file(single)
        return
    if index.is_file():
        weight_map = _read_json_file(index).get("weight_map")
        shards = sorted({name for name in (weight_map or {}).values() if isinstance(name, str)})
        for shard in shards:
            if not (folder / shard).is_file():
                raise FileNotFoundError(f"{str(folder / shard)!r} (listed in {str(index)!r}) is missing")
            check_safetensors_file(folder / shard)
        return
    if allow_pickle and any(folder.glob(f"{stem}*.bin")):
        return
    if any(folder.glob("*.bin")):
        raise ValueError(
            f"{str(folder)!r} holds only pickle weights (.bin), no {single.name}: pickle loading is off by default "
            "because unpickling a file can run code; convert the weights to safetensors (save the pipeline again "
            "with save_pretrained), or, for a file you trust, load with load_pipeline(..., use_safetensors=False)"
        )
    raise FileNotFoundError(
        f"{str(single)!r} is missing: the pipeline folder has no weights for {folder.name!r}"
    )


def check_pipeline_folder(
    folder: str | Path, *, allow_pickle: bool = False, variant: str | None = None
) -> None:
    """Check a saved pipeline folder before loading it; every error names the missing or damaged file.

    ``model_index.json`` must be a JSON object; each component it lists needs its sub-folder, a scheduler its
    ``scheduler_config.json``, a model its ``config.json`` and whole safetensors weights
    (``diffusion_pytorch_model.safetensors``, or every shard of a sharded file). Pickle weights (``.bin``)
    count only with ``allow_pickle``.

    Raises:
        FileNotFoundError: a file or component folder is missing (a folder without ``model_index.json`` is not a
            pipeline folder).
        ValueError: a file is damaged (invalid JSON, a truncated safetensors file) or only pickle weights exist.
    """
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"--model {str(folder)!r} has no model_index.json: it is not a saved pipeline folder "
            "(save one with pipe.save_pretrained(...) or `ddpm-components train`)"
        )
    index = _read_json_file(folder / "model_index.json")
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            continue
        component = folder / name
        if not component.is_dir():
            raise FileNotFoundError(
                f"{str(component)!r} is missing: model_index.json lists the component {name!r} = {entry}"
            )
        if (component / "scheduler_config.json").exists() or "Scheduler" in str(entry[1]):
            _read_json_file(component / "scheduler_config.json")
        else:
            _read_json_file(component / "config.json")
            _check_model_weights(component, allow_pickle, variant)


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
        training_config = _read_json_file(path / TRAINING_CONFIG_NAME)
    sample_grid = None
    if (path / SAMPLE_GRID_NAME).is_file() and not resample:
        from .data import read_image_file

        sample_grid = read_image_file(path / SAMPLE_GRID_NAME, "the sample grid")
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
