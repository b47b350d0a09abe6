"""Sampling many images from a pipeline: in batches, each image seeded by its index, any scheduler swapped in.

- **Per-image seeds.** Image ``i`` of a run with seed ``s`` draws all its noise (x_T and every step's z) from its
  own generator seeded by :func:`image_seed` ``(s, i)``. Our pipeline draws noise per image when given one
  generator per image, so the same seed gives the same image (to float rounding, i.e. to 1/255 once quantised)
  whatever the batch size, the order, or the number of processes that share the work.
- **Scheduler specs.** ``NAME[:key=value,...]``: ``ddpm`` is the pipeline's scheduler as saved with the model;
  any diffusers scheduler class name (``DPMSolverMultistepScheduler``, ``DDIMScheduler``, ...) is built with
  ``from_config`` from the saved scheduler's configuration; ``key=value`` pairs override configuration keys
  (``ddpm:variance_type=fixed_large``, ``DDIMScheduler:eta=0``... values are read as JSON where they parse,
  else as strings).
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["SampleOutputs", "SchedulerSpec", "image_grid", "image_seed", "png_name", "sample_batches"]

_SEED_MIX = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads consecutive (seed, index) pairs apart


def image_seed(seed: int, index: int) -> int:
    """The generator seed of image ``index`` in a run seeded ``seed`` (a 63-bit mix, distinct for distinct pairs
    of non-negative 31-bit values)."""
    return ((seed * _SEED_MIX) ^ (index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB)) % (2**63 - 1)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        if lowered in ("none", "null"):
            return None
        return text


@dataclass(frozen=True)
class SchedulerSpec:
    """A sampler: ``name`` (``"ddpm"`` or a diffusers scheduler class name) and configuration overrides."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> SchedulerSpec:
        """``"DPMSolverMultistepScheduler:algorithm_type=dpmsolver++,solver_order=2"`` → a spec."""
        name, _, rest = text.strip().partition(":")
        if not name:
            raise ValueError(f"scheduler spec {text!r} has no name; use NAME[:key=value,...], e.g. 'ddpm'")
        overrides = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, equals, value = item.partition("=")
            if not equals or not key.strip():
                raise ValueError(f"scheduler spec {text!r}: {item!r} is not key=value")
            overrides[key.strip()] = _parse_value(value.strip())
        if name != "ddpm":
            cls._diffusers_class(name)  # an unknown class fails here, before any work
        return cls(name=name, overrides=overrides, text=text.strip())

    @staticmethod
    def _diffusers_class(name: str) -> type:
        import diffusers
        from diffusers import SchedulerMixin

        found = getattr(diffusers, name, None)
        if not (isinstance(found, type) and issubclass(found, SchedulerMixin)):
            known = sorted(
                n
                for n in dir(diffusers)
                if n.endswith("Scheduler") and not n.startswith(("Flax", "Scheduler"))
            )
            raise ValueError(
                f"scheduler {name!r} is neither 'ddpm' (the model's own scheduler) nor a diffusers scheduler; "
                f"choose 'ddpm' or one of {', '.join(known[:12])}, ..."
            )
        return found

    def build(self, saved_scheduler: Any) -> Any:
        """This sampler's scheduler, configured from the model's saved scheduler ``saved_scheduler``."""
        scheduler_class = type(saved_scheduler) if self.name == "ddpm" else self._diffusers_class(self.name)
        accepted = set(inspect.signature(scheduler_class.__init__).parameters) - {"self", "kwargs"}
        unknown = sorted(set(self.overrides) - accepted)
        if unknown:
            raise ValueError(
                f"scheduler spec {self.text or self.name!r}: {scheduler_class.__name__} has no option(s) {unknown}; "
                f"its options are {', '.join(sorted(accepted))}"
            )
        return scheduler_class.from_config(saved_scheduler.config, **self.overrides)

    def check_steps(self, scheduler: Any, num_inference_steps: int | str) -> None:
        """Set ``scheduler`` (built from this spec) to ``num_inference_steps`` and refuse a chain that repeats a
        timestep: diffusers' multistep solvers with ``timestep_spacing="leading"`` (the DDPM default, which
        ``from_config`` carries over) give 1000 steps of a 1000-step model as timestep 0 a thousand times and fail
        with an IndexError at the very end."""
        scheduler.set_timesteps(num_inference_steps)
        timesteps = [int(t) for t in scheduler.timesteps]
        if len(set(timesteps)) < len(timesteps):
            spacing = getattr(scheduler.config, "timestep_spacing", None)
            raise ValueError(
                f"scheduler {self.text or self.name!r} with {num_inference_steps} steps repeats timesteps "
                f"(timestep_spacing={spacing!r} gives {timesteps[:4]}...); use another spacing, e.g. "
                f"'{self.name}:timestep_spacing=trailing', or fewer steps"
            )


def sample_batches(
    pipeline: Any,
    indices: Sequence[int],
    *,
    seed: int,
    num_inference_steps: int | str,
    batch_size: int,
    class_label_of: Callable[[int], int | str | None] | None = None,
    guidance_scale: float = 1.0,
    show_progress: bool = True,
    progress_file: Any = None,
    **pipeline_kwargs: Any,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Sample the images ``indices`` in batches of ``batch_size``; yield ``(indices, uint8 (N, C, H, W))``.

    ``class_label_of(index)`` gives each image's class label (``None``: unconditional); image ``i``'s noise comes
    from a generator seeded :func:`image_seed` ``(seed, i)``. Other keywords go to the pipeline (e.g. ``image`` and
    ``strength`` for image-to-image: one image, repeated for every index). Progress: a bar over the images when
    there are several batches (written to ``progress_file``), else the pipeline's own bar over the steps.
    """
    from tqdm.auto import tqdm

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    indices = list(indices)
    several = len(indices) > batch_size  # one bar over the images; else the pipeline's bar over the steps
    if several or not show_progress:
        pipeline.set_progress_bar_config(disable=True)
    bar = tqdm(
        total=len(indices),
        desc="sampling",
        unit="img",
        disable=not (show_progress and several),
        file=progress_file,
    )
    try:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            generators = [torch.Generator().manual_seed(image_seed(seed, index)) for index in chunk]
            labels = None
            if class_label_of is not None:
                labels = [class_label_of(index) for index in chunk]
                labels = None if all(label is None for label in labels) else labels
            kwargs = {"class_labels": labels, "guidance_scale": guidance_scale} if labels is not None else {}
            images = pipeline(
                batch_size=len(chunk),
                generator=generators,
                num_inference_steps=num_inference_steps,
                output_type="pt",
                **kwargs,
                **pipeline_kwargs,
            ).images
            yield chunk, (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
            bar.update(len(chunk))
    finally:
        bar.close()


# ---------------------------------------------------------------------------------- resumable sample outputs
SETTINGS_NAME = "sampling.json"
_PNG_NAME = re.compile(r"(\d{6})\.png")


def png_name(index: int) -> str:
    """The file name of image ``index`` in a ``--out-dir`` folder: ``000042.png``."""
    return f"{index:06d}.png"


class SampleOutputs:
    """Where ``ddpm-components sample`` puts its images, and how a rerun resumes.

    - ``out_dir``: one PNG per image (``000000.png``, ...) and ``sampling.json`` (the settings). Images already
      there are skipped by a rerun with the same settings; other settings are refused; PNGs at our names in a
      folder without our ``sampling.json`` are never overwritten.
    - ``out``: a PNG grid or an ``.npz`` (``arr_0``: uint8 ``(N, H, W, C)``, ``arr_1``: the class labels when
      there are any; the layout FID tools read), written atomically at the end. Without ``out_dir`` the batches
      go to shards in a hidden folder beside it (``.NAME.shards/``), which a rerun resumes from and the end
      removes; with ``out_dir`` the PNGs are the shards.

    Every process of a multi-process run writes its own images; the main process assembles ``out``.
    """

    def __init__(
        self,
        out: Path | None,
        out_dir: Path | None,
        settings: dict[str, Any],
        num_images: int,
        resumable: bool = True,
    ) -> None:
        if out is not None and out.suffix.lower() not in (".png", ".npz"):
            raise ValueError(f"--out must be a .png grid or an .npz file, got {str(out)!r}")
        self.out, self.out_dir, self.num_images = out, out_dir, num_images
        self.settings = {key: value for key, value in settings.items() if key != "num_images"}
        self.shards = None  # one batch in one process (resumable=False) needs none: it is written at the end
        if out is not None and out_dir is None and resumable:
            self.shards = out.with_name(f".{out.name}.shards")
        self._kept: dict[int, Any] = {}  # the images of a run without shards, until finish()

    @property
    def _record_folder(self) -> Path | None:
        return self.out_dir if self.out_dir is not None else self.shards

    def check(self) -> None:
        """Refuse a folder sampled with other settings, or holding PNGs at our names that we did not write."""
        folder = self._record_folder
        if folder is None:
            return
        record = folder / SETTINGS_NAME
        if record.is_file():
            try:
                previous = json.loads(record.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise ValueError(
                    f"{str(record)!r} is damaged ({error}); delete it or choose another place"
                ) from None
            different = sorted(
                key
                for key in set(previous) | set(self.settings)
                if previous.get(key) != self.settings.get(key)
            )
            if different:
                shown = ", ".join(
                    f"{key}: {previous.get(key)!r} then, {self.settings.get(key)!r} now" for key in different
                )
                raise ValueError(
                    f"{str(folder)!r} holds samples made with other settings ({shown}); rerun with the same settings "
                    "to resume, or choose another output"
                )
        elif self.out_dir is not None and self.out_dir.is_dir():
            foreign = sorted(path.name for path in self.out_dir.iterdir() if _PNG_NAME.fullmatch(path.name))
            if foreign:
                raise ValueError(
                    f"--out-dir {str(self.out_dir)!r} holds {foreign[0]} and others at the names sample writes, but "
                    f"no {SETTINGS_NAME} of ours: choose another folder (nothing was overwritten)"
                )

    def prepare(self) -> None:
        """(Main process.) Create the folders and record the settings."""
        from .data import atomic_write_bytes

        folder = self._record_folder
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            text = json.dumps(self.settings, indent=2, sort_keys=True) + "\n"
            atomic_write_bytes(folder / SETTINGS_NAME, text.encode("utf-8"))

    def done_indices(self) -> set[int]:
        """The images already written (by an earlier run with the same settings)."""
        if self.out_dir is not None:
            if not self.out_dir.is_dir():
                return set()
            return {
                int(match.group(1))
                for path in self.out_dir.iterdir()
                if (match := _PNG_NAME.fullmatch(path.name))
            }
        if self.shards is None or not self.shards.is_dir():
            return set()
        return {index for (indices,) in self._read_shards("indices") for index in indices.tolist()}

    def todo(self) -> list[int]:
        done = self.done_indices()
        return [index for index in range(self.num_images) if index not in done]

    def interrupted_summary(self) -> str:
        """What an interrupted run leaves, for its one line: the images kept and how to finish them."""
        folder = self._record_folder
        if folder is None:
            return "nothing was written"
        kept = len(self.done_indices())
        return (
            f"{kept} of {self.num_images} images are kept in {str(folder)!r}; the same command samples the other "
            f"{self.num_images - kept}"
        )

    def write(self, indices: list[int], images: torch.Tensor, process_index: int = 0) -> None:
        """Write one batch (``images`` uint8 ``(N, C, H, W)``) atomically: PNGs, or one shard."""
        import io

        import numpy as np

        from .data import atomic_write_bytes, save_png

        if self.out_dir is not None:
            for index, image in zip(indices, _to_pil(images)):
                save_png(image, self.out_dir / png_name(index))
        elif self.shards is None:
            self._kept.update(zip(indices, images))
        else:
            buffer = io.BytesIO()
            np.savez(buffer, indices=np.asarray(indices, dtype=np.int64), images=images.numpy())
            atomic_write_bytes(self.shards / f"shard-{indices[0]:06d}-{process_index}.npz", buffer.getvalue())

    def _read_shards(self, *arrays: str) -> list[tuple[Any, ...]]:
        """The ``arrays`` (default ``indices`` and ``images``) of every shard; an npz reads only those asked for."""
        import numpy as np

        shards = []
        for path in sorted(self.shards.glob("shard-*.npz")):
            with np.load(path) as data:
                shards.append(tuple(data[name] for name in arrays or ("indices", "images")))
        return shards

    def _all_images(self) -> torch.Tensor:
        """Every image 0..N-1 as uint8 ``(N, C, H, W)``, from the PNGs or the shards."""
        import numpy as np
        from PIL import Image

        if self.out_dir is not None:
            arrays = []
            for index in range(self.num_images):
                with Image.open(self.out_dir / png_name(index)) as image:
                    array = np.asarray(image)
                arrays.append(array[:, :, None] if array.ndim == 2 else array)
            return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        by_index = dict(self._kept)
        for indices, images in self._read_shards() if self.shards is not None else []:
            by_index.update(zip(indices.tolist(), images))
        missing = [index for index in range(self.num_images) if index not in by_index]
        if missing:
            raise RuntimeError(
                f"images {missing[:5]} were not sampled; rerun the same command to finish them"
            )
        return torch.stack([torch.as_tensor(by_index[index]) for index in range(self.num_images)])

    def finish(self, labels: list[Any] | None) -> None:
        """(Main process, after every process is done.) Assemble ``out`` and remove the shards."""
        import io
        import shutil

        import numpy as np

        from .data import atomic_write_bytes, save_png

        if self.out is None:
            return
        images = self._all_images()
        if self.out.suffix.lower() == ".npz":
            buffer = io.BytesIO()
            arrays = [images.permute(0, 2, 3, 1).numpy()]
            if labels is not None:
                arrays.append(np.asarray(labels))
            np.savez(buffer, *arrays)
            atomic_write_bytes(self.out, buffer.getvalue())
        else:
            save_png(image_grid(_to_pil(images)), self.out)
        if self.shards is not None and self.shards.is_dir():
            shutil.rmtree(self.shards)


def _to_pil(images: torch.Tensor) -> list[Any]:
    from PIL import Image

    arrays = images.permute(0, 2, 3, 1).numpy()
    return [
        Image.fromarray(array[:, :, 0], mode="L") if array.shape[2] == 1 else Image.fromarray(array)
        for array in arrays
    ]


def image_grid(images: list[Any]) -> Any:
    """The images in a near-square grid, row by row, padded with black tiles."""
    import math

    from diffusers.utils import make_image_grid
    from PIL import Image

    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    blank = Image.new(images[0].mode, images[0].size)
    grid = make_image_grid(images + [blank] * (rows * columns - len(images)), rows=rows, cols=columns)
    return grid.convert(images[0].mode)  # make_image_grid pastes onto RGB; keep greyscale greyscale
