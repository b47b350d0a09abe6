"""cpu_memory.keep_freed_memory: glibc's malloc keeps freed memory for reuse (no page faults for each new
activation), only where it applies, never over the user's own allocator settings; the trainer and the model
commands turn it on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ddpm_components import cpu_memory
from ddpm_components.cpu_memory import OPT_OUT_VARIABLE, keep_freed_memory, why_not_keep_freed_memory


def _glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


# the settings, ours and the user's, that would make keep_freed_memory stand aside
_STAND_ASIDE = (OPT_OUT_VARIABLE, "LD_PRELOAD", "GLIBC_TUNABLES", *cpu_memory._USER_SETTINGS)


@pytest.fixture
def clean_environment(monkeypatch):
    """None of the settings that would make keep_freed_memory stand aside."""
    for name in _STAND_ASIDE:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


_FAULTS_PER_ROUND = textwrap.dedent(
    """
    import ctypes, json, resource, sys
    from ddpm_components.cpu_memory import keep_freed_memory

    in_effect = keep_freed_memory() if sys.argv[1] == "keep" else False
    libc = ctypes.CDLL(None)  # malloc itself: torch's own small allocations would make the pattern irregular
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, (ctypes.c_size_t,), (ctypes.c_void_p,)
    faults = []
    for _ in range(5):  # a training step's pattern: many MiB-sized activations, written, then all freed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [libc.malloc(1 << 20) for _ in range(40)]
        for block in blocks:
            ctypes.memset(block, 1, 1 << 20)
        for block in reversed(blocks):
            libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"in_effect": in_effect, "faults": faults[1:]}))  # the first round grows the heap
    """
)


def _faults_per_round(mode: str) -> dict:
    environment = {key: value for key, value in os.environ.items() if key not in _STAND_ASIDE}
    result = subprocess.run(
        [sys.executable, "-c", _FAULTS_PER_ROUND, mode],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults():
    """Each process is fresh (the setting is process-wide): glibc's defaults fault in the 40 MiB again every round
    (10,240 pages); with keep_freed_memory every round after the first reuses it (measured: 10,209 and 0)."""
    default = _faults_per_round("default")
    kept = _faults_per_round("keep")
    assert default["in_effect"] is False and kept["in_effect"] is True
    assert min(default["faults"]) > 5_000, default  # the premise: glibc gives the memory back every round
    assert max(kept["faults"]) < 500, kept


def test_the_opt_out_and_the_users_own_settings_are_respected(clean_environment):
    monkeypatch = clean_environment
    if _glibc():
        assert why_not_keep_freed_memory() is None
    for name, value, reason in [
        (OPT_OUT_VARIABLE, "0", f"{OPT_OUT_VARIABLE}=0"),
        ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "jemalloc is preloaded"),
        ("LD_PRELOAD", "/opt/lib/libtcmalloc_minimal.so.4", "tcmalloc is preloaded"),
        ("MALLOC_TRIM_THRESHOLD_", "0", "MALLOC_TRIM_THRESHOLD_ is set"),
        ("MALLOC_MMAP_THRESHOLD_", "131072", "MALLOC_MMAP_THRESHOLD_ is set"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0", "GLIBC_TUNABLES sets glibc.malloc"),
    ]:
        if not _glibc() and name != OPT_OUT_VARIABLE:
            continue
        with monkeypatch.context() as patch:
            patch.setenv(name, value)
            assert why_not_keep_freed_memory() == reason
            patch.setattr(cpu_memory, "_in_effect", False)
            patch.setattr(
                cpu_memory.ctypes, "CDLL", _no_library
            )  # would fail the test if mallopt were reached
            assert keep_freed_memory() is False


def test_a_c_library_that_is_not_glibc_is_left_alone(clean_environment):
    clean_environment.setattr(cpu_memory.os, "confstr", lambda name: "musl 1.2.4" if "LIBC" in name else "")
    assert why_not_keep_freed_memory() == "the C library is not glibc"
    clean_environment.setattr(cpu_memory, "_in_effect", False)
    clean_environment.setattr(cpu_memory.ctypes, "CDLL", _no_library)
    assert keep_freed_memory() is False


def _no_library(*args, **kwargs):
    raise AssertionError("mallopt must not be called here")


def test_the_model_commands_turn_it_on_and_the_others_do_not(monkeypatch, tmp_path):
    from ddpm_components import cli

    calls: list[str] = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("called") or True)
    missing = str(tmp_path / "no-such-model")
    assert cli.main(["sample", "--model", missing, "--out", str(tmp_path / "x.png")]) == 2
    assert cli.main(["evaluate", "--model", missing]) == 2
    assert cli.main(["analytic-variance", "--model", missing]) == 2
    assert calls == ["called"] * 3
    assert cli.main(["push", "--model", missing, "--repo-id", "someone/model"]) == 2
    assert calls == ["called"] * 3


@pytest.mark.usefixtures("torch_single_thread")
def test_training_on_cpu_turns_it_on(monkeypatch, tmp_path):
    from conftest import TINY_TRAINING

    from ddpm_components import training

    calls: list[str] = []
    monkeypatch.setattr(training, "keep_freed_memory", lambda: calls.append("called") or True)
    config = training.TrainingConfig(
        output_dir=str(tmp_path / "run"), **{**TINY_TRAINING, "max_train_steps": 1, "checkpointing_steps": 0}
    )
    assert training.train(config)["global_step"] == 1
    assert calls == ["called"]
