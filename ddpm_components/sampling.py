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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["SchedulerSpec", "image_seed", "sample_batches"]

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
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Sample the images ``indices`` in batches of ``batch_size``; yield ``(indices, uint8 (N, C, H, W))``.

    ``class_label_of(index)`` gives each image's class label (``None``: unconditional); image ``i``'s noise comes
    from a generator seeded :func:`image_seed` ``(seed, i)``.
    """
    from tqdm.auto import tqdm

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    indices = list(indices)
    pipeline.set_progress_bar_config(disable=True)
    bar = tqdm(total=len(indices), desc="sampling", unit="img", disable=not show_progress)
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
            ).images
            yield chunk, (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
            bar.update(len(chunk))
    finally:
        bar.close()
