"""DDPMPipeline.save_pretrained never moves or deletes what is not ours, and an interrupt at any instant leaves a
folder that loads as the old pipeline, as the new one, or refuses to load naming the interrupted save.

Fault injection: every file-system mutation of a save (os.replace/rename/unlink/rmdir/mkdir and every file opened
for writing) is counted, and the save is stopped at the k-th one, for every k: by a KeyboardInterrupt (Python
unwinds, `finally` blocks run) or by a simulated kill (that call and every later one fail, as if the process
died there). Reads and fsyncs change nothing visible, so the mutations are all the distinct instants.
A real subprocess killed with SIGKILL / SIGTERM in the middle of a save checks the same with real signals.
"""

from __future__ import annotations

import builtins
import errno
import functools
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import diffusers
import pytest
import torch
from conftest import tiny_pipeline

from ddpm_components import DDPMPipeline
from ddpm_components.pipeline_ddpm import (
    SAVE_IN_PROGRESS_NAME,
    SAVE_MANIFEST_NAME,
    remove_saved_pipeline,
    repair_interrupted_save,
    saved_pipeline_files,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

INTERRUPTED = "was interrupted"
USER_FILES = {
    "notes.txt": b"my notes\n",
    "unet/important.txt": b"do not lose me\n",
    "checkpoint-5/model.safetensors": b"weights of step 5",
    "checkpoint-5/random_states_0.pkl": b"rng",
    "logs/.hidden": b"x",
}
FOLDER_MODE = 0o751
UNET_MODE = 0o750
MUTATIONS = ("replace", "rename", "unlink", "rmdir", "mkdir")


class Killed(BaseException):
    """Raised by the fault injector in "kill" mode: at the k-th mutation and at every later one."""


class FaultInjector:
    """Count the file-system mutations of the code run under :meth:`active`; fail at the ``fail_at``-th."""

    def __init__(self, fail_at: int | None = None, mode: str = "kill"):
        self.fail_at, self.mode, self.count, self.failed = fail_at, mode, 0, False

    def _tick(self) -> None:
        self.count += 1
        if self.failed and self.mode == "kill":
            raise Killed(f"killed (mutation {self.count})")
        if self.fail_at is not None and self.count == self.fail_at:
            self.failed = True
            raise (
                KeyboardInterrupt if self.mode == "interrupt" else Killed(f"killed at mutation {self.count}")
            )

    @contextmanager
    def active(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultInjector]:
        with monkeypatch.context() as patch:
            for name in MUTATIONS:
                original = getattr(os, name)

                def wrapper(*args, _original=original, **kwargs):
                    self._tick()
                    return _original(*args, **kwargs)

                patch.setattr(os, name, wrapper)
            original_open = builtins.open

            def open_wrapper(file, mode="r", *args, **kwargs):
                if any(flag in mode for flag in "wax+"):
                    self._tick()
                return original_open(file, mode, *args, **kwargs)

            patch.setattr(builtins, "open", open_wrapper)
            patch.setattr(io, "open", open_wrapper)
            yield self


# ------------------------------------------------------------------------------------------ fixtures
def _digests(folder: Path, names) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in names}


@functools.cache
def _new_pipeline() -> DDPMPipeline:
    pipeline = tiny_pipeline(num_train_timesteps=20)
    with torch.no_grad():
        for parameter in pipeline.unet.parameters():
            parameter.add_(0.01)
    return pipeline


def _save_old(folder: Path) -> None:
    from PIL import Image

    grid = Image.new("L", (8, 8), 128)
    tiny_pipeline(num_train_timesteps=50).save_pretrained(
        folder, training_config={"run": "old"}, sample_grid=grid
    )


def _save_new(folder: Path) -> None:
    _new_pipeline().save_pretrained(folder, training_config={"run": "new"})  # no samples.png: a stale file


def _add_user_files(folder: Path) -> None:
    for name, data in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    os.chmod(folder, FOLDER_MODE)
    os.chmod(folder / "unet", UNET_MODE)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """An old save with user files (the template every case copies), and the files of old and new saves."""
    root = tmp_path_factory.mktemp("reference")
    _save_old(root / "old" / "out")
    _save_new(root / "new" / "out")
    old, new = root / "old" / "out", root / "new" / "out"
    _add_user_files(old)
    return {
        "template": old,
        "old": _digests(old, saved_pipeline_files(old)),
        "new": _digests(new, saved_pipeline_files(new)),
    }


def _fresh_copy(reference: dict, parent: Path) -> Path:
    folder = parent / "out"  # the same folder name as the references (the model card names it)
    shutil.copytree(reference["template"], folder)
    return folder


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------------------ invariants
def _assert_user_files_intact(folder: Path) -> None:
    for name, data in USER_FILES.items():
        assert (folder / name).read_bytes() == data, name
    assert _mode(folder) == FOLDER_MODE and _mode(folder / "unet") == UNET_MODE
    assert sorted(p.name for p in folder.parent.iterdir()) == ["out"], "nothing may appear beside the folder"


def _state(folder: Path, reference: dict, loaded: set[str] | None = None) -> str:
    """ "old", "new" or "refused"; fails when the folder would load as a mix of two saves. Each state in
    ``loaded`` (if given) is loaded only the first time (its files are compared with the reference each time)."""
    marker = (folder / SAVE_IN_PROGRESS_NAME).exists()
    index = json.loads((folder / "model_index.json").read_text())
    tombstone = "_ddpm_components_interrupted_save" in index
    if marker or tombstone:
        with pytest.raises(ValueError, match=INTERRUPTED):
            DDPMPipeline.from_pretrained(folder)
    if tombstone:
        assert "INTERRUPTED SAVE" in index["_class_name"]
        return "refused"
    # diffusers' loaders read model_index.json: what it describes must be one complete save
    for name in ("old", "new"):
        if all(
            (folder / file).is_file() and _digests(folder, [file])[file] == digest
            for file, digest in reference[name].items()
        ):
            if marker:
                return "refused"
            if loaded is None or name not in loaded:
                pipeline = DDPMPipeline.from_pretrained(folder)
                assert pipeline.scheduler.config.num_train_timesteps == (50 if name == "old" else 20)
                loaded is None or loaded.add(name)
            return name
    raise AssertionError(f"the folder holds neither the old nor the new save: {sorted(os.listdir(folder))}")


def _assert_repaired_as_new(folder: Path, reference: dict, loaded: set[str] | None = None) -> None:
    _save_new(folder)
    assert _state(folder, reference, loaded) == "new"
    leftovers = [
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.name.startswith((".ddpm_components_staging", SAVE_IN_PROGRESS_NAME)) or p.name.endswith(".tmp")
    ]
    assert leftovers == []
    assert not (folder / "samples.png").exists(), "a file of the old save that the new one does not write"
    assert set(saved_pipeline_files(folder)) == set(reference["new"])
    _assert_user_files_intact(folder)


# ------------------------------------------------------------------------------------------ tests
def _count_mutations(reference: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    folder = _fresh_copy(reference, tmp_path / "count")
    with FaultInjector().active(monkeypatch) as counter:
        _save_new(folder)
    assert _state(folder, reference) == "new"
    return counter.count


@pytest.mark.parametrize("mode", ["kill", "interrupt"])
def test_an_interrupt_at_every_mutation_of_a_save(reference, tmp_path: Path, monkeypatch, mode: str):
    total = _count_mutations(reference, tmp_path, monkeypatch)
    assert total > 30
    monkeypatch.setattr(
        os, "fsync", lambda handle: None
    )  # durability on power loss is not what is tested here
    states, loaded = [], set()
    for k in range(1, total + 1):
        folder = _fresh_copy(reference, tmp_path / f"case{k}")
        with FaultInjector(k, mode).active(monkeypatch), pytest.raises((Killed, KeyboardInterrupt)):
            _save_new(folder)
        _assert_user_files_intact(folder)
        states.append(_state(folder, reference, loaded))
        _assert_repaired_as_new(folder, reference, loaded)
        shutil.rmtree(folder.parent)
    # every kind of instant was hit: before the commit, during it (refused), after it
    assert states[0] == "old" and states[-1] == "new"
    if mode == "kill":
        assert "refused" in states
    else:  # an exception during the commit finishes it before it propagates: never a refused folder
        assert "refused" not in states


def test_an_interrupted_repair_is_repaired_too(reference, tmp_path: Path, monkeypatch):
    """A save killed in the middle of its commit, then the next save (which first finishes the interrupted
    one) killed at each of its own mutations: still refused or loadable, and a third save repairs it."""
    total = _count_mutations(reference, tmp_path, monkeypatch)
    monkeypatch.setattr(
        os, "fsync", lambda handle: None
    )  # durability on power loss is not what is tested here
    template = _fresh_copy(reference, tmp_path / "template")
    with FaultInjector(total // 2).active(monkeypatch), pytest.raises(Killed):
        _save_new(template)
    assert _state(template, reference) == "refused"
    folder = _fresh_copy({"template": template}, tmp_path / "count-repair")
    with FaultInjector().active(monkeypatch) as counter:
        _save_new(folder)
    loaded: set[str] = set()
    for k in range(1, counter.count + 1):
        folder = _fresh_copy({"template": template}, tmp_path / f"case{k}")
        with FaultInjector(k).active(monkeypatch), pytest.raises(Killed):
            _save_new(folder)
        _assert_user_files_intact(folder)
        assert _state(folder, reference, loaded) in ("refused", "new")
        _assert_repaired_as_new(folder, reference, loaded)
        shutil.rmtree(folder.parent)


def test_diffusers_refuses_an_interrupted_folder_naming_the_save(reference, tmp_path, monkeypatch):
    """While files are being moved, model_index.json is a tombstone: diffusers' own loaders fail on it with
    a message naming the interrupted save, instead of loading a mix of old and new weights."""
    total = _count_mutations(reference, tmp_path, monkeypatch)
    folder = _fresh_copy(reference, tmp_path / "case")
    for k in range(1, total + 1):  # the first instant at which the tombstone is in place
        shutil.rmtree(folder.parent)
        folder = _fresh_copy(reference, tmp_path / "case")
        with FaultInjector(k).active(monkeypatch), pytest.raises(Killed):
            _save_new(folder)
        if "_ddpm_components_interrupted_save" in (folder / "model_index.json").read_text():
            break
    with pytest.raises(AttributeError, match="INTERRUPTED SAVE: a save of a ddpm-components pipeline"):
        diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    with pytest.raises(ValueError, match="INTERRUPTED SAVE"):
        diffusers.DDPMPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match=rf"a save into '{folder}' {INTERRUPTED}.*repair_interrupted_save"):
        DDPMPipeline.from_pretrained(folder)
    # repair_interrupted_save finishes the interrupted save: the folder now loads as the new pipeline
    done = repair_interrupted_save(folder)
    assert any("completed the interrupted save" in line for line in done)
    assert _state(folder, reference) == "new"
    _assert_user_files_intact(folder)


def test_remove_saved_pipeline_on_an_interrupted_folder_removes_only_our_files(
    reference, tmp_path, monkeypatch
):
    total = _count_mutations(reference, tmp_path, monkeypatch)
    for k in (total // 2, total - 3):
        folder = _fresh_copy(reference, tmp_path / f"case{k}")
        (folder / "unet" / ".config.json.0123456789abcdef0123456789abcdef.tmp").write_text("stale")
        with FaultInjector(k).active(monkeypatch), pytest.raises(Killed):
            _save_new(folder)
        remove_saved_pipeline(folder)
        remaining = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        assert remaining == sorted(USER_FILES), k
        _assert_user_files_intact(folder)


def test_save_on_a_mount_point_never_renames_the_folder(reference, tmp_path, monkeypatch):
    """A mount point (Docker volume, tmpfs) cannot be renamed (EBUSY): the save never tries."""
    folder = _fresh_copy(reference, tmp_path)
    real_replace, real_rename = os.replace, os.rename

    def busy(real):
        def call(source, destination, *args, **kwargs):
            if folder.resolve() in (Path(os.path.abspath(source)), Path(os.path.abspath(destination))):
                raise OSError(errno.EBUSY, "Device or resource busy", str(folder))
            return real(source, destination, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "replace", busy(real_replace))
    monkeypatch.setattr(os, "rename", busy(real_rename))
    _save_new(folder)
    assert _state(folder, reference) == "new"
    _assert_user_files_intact(folder)


def test_a_save_keeps_user_files_modes_and_removes_only_listed_files(reference, tmp_path):
    folder = _fresh_copy(reference, tmp_path)
    (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"mine, not in the manifest")
    _save_new(folder)
    assert (
        folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    ).read_bytes() == b"mine, not in the manifest"
    assert not (folder / "samples.png").exists()  # listed by the old manifest, not written by the new save
    _assert_user_files_intact(folder)
    # a name the save needs is taken by a folder: refused before anything changes
    (folder / "README.md").unlink()
    (folder / "README.md").mkdir()
    before = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    with pytest.raises(ValueError, match=r"'README.md' there is a folder, but the pipeline writes a file"):
        _save_new(folder)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == before


def test_stale_temporary_files_of_ours_are_removed_and_no_others(reference, tmp_path):
    folder = _fresh_copy(reference, tmp_path)
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(finished.stdout)
    ours = [
        f".metrics.jsonl.{dead_pid}.tmp",
        ".README.md.0123456789abcdef0123456789abcdef.tmp",
        "unet/.config.json.fedcba9876543210fedcba9876543210.tmp",
        f"samples/.step-0000010.png.{dead_pid}.tmp",
        ".ddpm_components_staging-abc123/unet/config.json",
        ".ddpm-write-test-k2j4l5x_",
    ]
    others = [f".metrics.jsonl.{os.getppid()}.tmp", "notes.tmp", ".notes.tmp", "checkpoint-5/.x.tmp"]
    for name in ours + others:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("x")
    _save_new(folder)
    for name in ours:
        assert not (folder / name).exists(), name
    assert not (folder / ".ddpm_components_staging-abc123").exists()
    for name in others:
        assert (folder / name).read_text() == "x", name


# ------------------------------------------------------------------------- the earlier implementation
def test_leftovers_of_the_earlier_save_are_restored(reference, tmp_path):
    """The earlier save renamed the folder to `.NAME.old-*` and a staging folder `.NAME.saving-*` into place;
    an interrupt could leave the whole folder (checkpoints too) in the backup."""
    # 1. interrupted between the two renames: the folder is missing, everything is in the backup
    backup = tmp_path / ".out.old-0a1b2c3d"
    shutil.copytree(reference["template"], backup)
    staging = tmp_path / ".out.saving-ab_c12d3"
    shutil.copytree(reference["template"], staging)
    folder = tmp_path / "out"
    with pytest.raises(
        ValueError, match=r"left its contents in .*\.out\.old-0a1b2c3d.*repair_interrupted_save"
    ):
        DDPMPipeline.from_pretrained(folder)
    _save_new(folder)
    _assert_user_files_intact(folder)
    assert _state(folder, reference) == "new"

    # 2. interrupted while moving the other entries back: the new pipeline is in place; the backup holds the old
    #    folder's manifest and pipeline files, and the entries not moved yet, including a user file inside the
    #    old unet/
    shutil.rmtree(folder)
    _save_new(folder)
    backup.mkdir()
    for name in (
        SAVE_MANIFEST_NAME,
        "checkpoint-5/model.safetensors",
        "unet/important.txt",
        "unet/config.json",
    ):
        (backup / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(reference["template"] / name, backup / name)
    (backup / "notes.txt").write_text("a second notes.txt: not listed by the old manifest")
    (folder / "notes.txt").write_bytes(USER_FILES["notes.txt"])
    done = repair_interrupted_save(folder)
    assert any("moved the contents of .out.old-0a1b2c3d back" in line for line in done)
    assert (folder / "checkpoint-5" / "model.safetensors").read_bytes() == USER_FILES[
        "checkpoint-5/model.safetensors"
    ]
    assert (folder / "unet" / "important.txt").read_bytes() == USER_FILES["unet/important.txt"]
    assert _state(folder, reference) == "new"  # the new manifest and files stay as they are
    # the old copy of a file of ours (listed by the backup's manifest) is gone; a conflicting file it does not
    # list stays in the backup
    assert sorted(p.relative_to(backup).as_posix() for p in backup.rglob("*") if p.is_file()) == ["notes.txt"]


# ------------------------------------------------------------------------------------- real signals
_CHILD = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from ddpm_components import DDPMPipeline, DDPMScheduler, DDPMUNet2DModel

    torch.set_num_threads(1)
    target, pause_at = sys.argv[1], int(sys.argv[2])

    def pipeline(steps, seed):
        torch.manual_seed(seed)
        unet = DDPMUNet2DModel(sample_size=16, in_channels=3, block_out_channels=(64, 128, 128),
                               layers_per_block=2, attention_resolutions=(8,), norm_num_groups=32)
        return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=steps))

    pipeline(50, 0).save_pretrained(target)
    new = pipeline(20, 1)
    if pause_at:  # stop at the pause_at-th os.replace of the save and wait for the signal
        real_replace, calls = os.replace, [0]

        def replace(*args, **kwargs):
            calls[0] += 1
            if calls[0] == pause_at:
                print("PAUSED", flush=True)
                time.sleep(60)
            return real_replace(*args, **kwargs)

        os.replace = replace
    print("SAVING", flush=True)
    new.save_pretrained(target)
    print("DONE", flush=True)
    """
)


def _start_child(folder: Path, pause_at: int) -> subprocess.Popen:
    folder.mkdir(parents=True)
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "model.safetensors").write_bytes(b"step 5")
    (folder / "notes.txt").write_text("mine")
    os.chmod(folder, FOLDER_MODE)
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(folder), str(pause_at)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _signal_when(child: subprocess.Popen, line: str, signum: int, delay: float) -> str:
    try:
        for printed in child.stdout:
            if printed.strip() == line:
                break
        else:
            raise AssertionError(f"the child ended early: {child.stderr.read()[-3000:]}")
        time.sleep(delay)
        child.send_signal(signum)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signum, (child.returncode, child.stderr.read()[-3000:])
    return child.stdout.read()


def _load_state(folder: Path) -> str:
    try:
        pipeline = DDPMPipeline.from_pretrained(folder)
    except ValueError as error:
        assert INTERRUPTED in str(error)
        return "refused"
    return {50: "old", 20: "new"}[pipeline.scheduler.config.num_train_timesteps]


def test_a_killed_save_leaves_a_folder_that_loads_or_refuses_and_is_repaired(tmp_path: Path):
    """Two real processes (started together to share the import time) save a 6.5M-parameter pipeline over an
    earlier save: one gets SIGKILL while it pauses in the middle of moving files into place, the other SIGTERM
    0.05 s into its save, at whatever instant that is."""
    paused = _start_child(tmp_path / "sigkill" / "out", pause_at=5)  # the 5th os.replace: mid-commit
    running = _start_child(tmp_path / "sigterm" / "out", pause_at=0)
    cases = [
        (
            paused,
            tmp_path / "sigkill" / "out",
            _signal_when(paused, "PAUSED", signal.SIGKILL, 0.0),
            {"refused"},
        ),
        (running, tmp_path / "sigterm" / "out", _signal_when(running, "SAVING", signal.SIGTERM, 0.05), None),
    ]
    for _, folder, output, allowed in cases:
        state = _load_state(folder)
        print(f"{folder.parent.name}: {state}")
        assert state in (allowed or {"old", "refused", "new"}), state
        assert state == "new" or "DONE" not in output
        assert (folder / "checkpoint-5" / "model.safetensors").read_bytes() == b"step 5"
        assert (folder / "notes.txt").read_text() == "mine" and _mode(folder) == FOLDER_MODE
        assert sorted(p.name for p in folder.parent.iterdir()) == ["out"]
        if state == "refused":  # repair_interrupted_save completes the killed save
            repair_interrupted_save(folder)
            assert _load_state(folder) == "new"
        tiny_pipeline().save_pretrained(folder)  # the next save leaves no leftovers
        leftovers = [
            p for p in folder.rglob("*") if "ddpm_components_staging" in p.name or p.name.endswith(".tmp")
        ]
        assert leftovers == [] and not (folder / SAVE_IN_PROGRESS_NAME).exists()
        assert type(DDPMPipeline.from_pretrained(folder).unet).__name__ == "DDPMUNet2DModel"
        assert (folder / "checkpoint-5" / "model.safetensors").read_bytes() == b"step 5"
        assert _mode(folder) == FOLDER_MODE


def test_a_link_to_the_working_folder_is_the_working_folder(tmp_path, monkeypatch):
    from ddpm_components.pipeline_ddpm import check_save_directory

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    os.symlink(tmp_path / "work", tmp_path / "work" / "selflink")
    os.symlink(tmp_path, tmp_path / "work" / "parentlink")
    for name in ("selflink", "parentlink"):
        with pytest.raises(ValueError, match="is the current folder or one of its parents"):
            check_save_directory(name)
    assert sorted(path.name for path in (tmp_path / "work").iterdir()) == ["parentlink", "selflink"]


def test_files_of_the_user_at_our_names_are_not_replaced_unless_asked(tmp_path):
    """README.md / model_index.json that no save of ours wrote (no manifest lists them) are a ValueError, and
    nothing changes; overwrite=True replaces them; files our manifest lists are always replaced."""
    from conftest import tiny_pipeline

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "README.md").write_text("MY NOTES\n")
    (folder / "model_index.json").write_text('{"mine": true}\n')
    pipeline = tiny_pipeline()
    with pytest.raises(ValueError, match=r"holds README\.md, model_index\.json.*overwrite=True"):
        pipeline.save_pretrained(folder)
    assert sorted(path.name for path in folder.iterdir()) == ["README.md", "model_index.json"]
    assert (folder / "README.md").read_text() == "MY NOTES\n"
    pipeline.save_pretrained(folder, overwrite=True)
    assert (folder / "README.md").read_text() != "MY NOTES\n"
    pipeline.save_pretrained(folder)  # now ours: listed in the manifest, replaced without asking


def test_pickle_weights_need_an_explicit_opt_in(tmp_path):
    from conftest import tiny_pipeline

    from ddpm_components import DDPMPipeline

    folder = tmp_path / "pickled"
    tiny_pipeline().save_pretrained(folder, safe_serialization=False)
    with pytest.raises(OSError, match=r"safetensors|diffusion_pytorch_model"):
        DDPMPipeline.from_pretrained(folder)
    assert DDPMPipeline.from_pretrained(folder, use_safetensors=False).unet is not None
