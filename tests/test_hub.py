"""Sharing on the Hub, end to end against the loopback Hub server (tests/hub_server.py), without network.

``HF_ENDPOINT`` is read when huggingface_hub is imported, so every Hub client runs in a fresh subprocess;
checks are batched to keep the number of subprocesses (about 5 s each) small.
"""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DUMMY_TOKEN, hub_env, tiny_pipeline
from PIL import Image

from ddpm_components.sampling import image_seed, png_name

pytestmark = pytest.mark.usefixtures("torch_single_thread")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# one generator per image, seeded as `ddpm-components sample --seed 0` seeds image i: (0, i)
IMAGE_SEEDS = [image_seed(0, index) for index in range(2)]
SAMPLE_CALL = (
    f"batch_size=2, generator=[torch.Generator().manual_seed(s) for s in {IMAGE_SEEDS}], num_inference_steps=8, "
    "output_type='np'"
)
GUIDED = "class_labels=[1, 2], guidance_scale=2.5"


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_push_then_load_without_the_package(tmp_path: Path, hub_server, run_python):
    """push (CLI) → the Hub → DiffusionPipeline.from_pretrained(repo, trust_remote_code=True) without our package."""
    pipeline = tiny_pipeline(num_class_embeds=3)
    local = tmp_path / "local"
    pipeline.save_pretrained(local, training_config={"learning_rate": 2e-4, "dataset": "digits"})
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(
        batch_size=2, generator=[torch.Generator().manual_seed(s) for s in IMAGE_SEEDS], num_inference_steps=8,
        output_type="np", class_labels=[1, 2], guidance_scale=2.5,
    ).images  # fmt: skip
    digest = _tree_digest(local)

    # 1. with ddpm_components installed: push through the CLI, and the Hub errors it must explain
    pushed = run_python(
        f"""
        import contextlib, io, json, os
        from ddpm_components.cli import main

        def cli(*args):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as out:
                code = main(list(args))
            return {{"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}}

        results = {{}}
        results["push"] = cli("push", "--model", {str(local)!r}, "--repo-id", "user/tiny-ddpm",
                              "--num-sample-images", "4", "--sample-steps", "3")
        results["forbidden"] = cli("push", "--model", {str(local)!r}, "--repo-id", "forbidden/tiny-ddpm",
                                   "--num-sample-images", "0")
        results["missing"] = cli("sample", "--model", "user/does-not-exist", "--num-images", "1", "--steps", "1",
                                 "--out", "x.png")
        results["sample"] = cli("sample", "--model", "user/tiny-ddpm", "--num-images", "2", "--steps", "8",
                                "--class-label", "1", "2", "--guidance-scale", "2.5",
                                "--save-individual", {str(tmp_path / "from_hub")!r}, "--out", "g.png")
        from ddpm_components import DDPMPipeline
        pipe = DDPMPipeline.from_pretrained({str(local)!r})
        pipe.save_pretrained({str(tmp_path / "via_save")!r}, push_to_hub=True, repo_id="user/via-save",
                             num_sample_images=0)
        import runpy, sys
        sys.argv = ["push_to_hub.py", "--model", {str(local)!r}, "--repo-id", "user/from-example"]
        with contextlib.redirect_stdout(io.StringIO()) as out:
            runpy.run_path({str(EXAMPLES / "push_to_hub.py")!r}, run_name="__main__")
        results["example"] = out.getvalue()
        del os.environ["HF_TOKEN"]
        results["no_token"] = cli("push", "--model", {str(local)!r}, "--repo-id", "user/other",
                                  "--num-sample-images", "0")
        results["bad_token"] = cli("push", "--model", {str(local)!r}, "--repo-id", "user/other",
                                   "--num-sample-images", "0", "--token", "invalid-token")
        print("RESULTS" + json.dumps(results))
        """,
        env=hub_server.env,
        block_package=False,
    )
    results = json.loads(pushed.stdout.split("RESULTS", 1)[1])
    assert results["push"]["code"] == 0, results["push"]
    assert "pushed" in results["push"]["stdout"] and "/user/tiny-ddpm/commit/" in results["push"]["stdout"]
    for case, code, message in [
        ("forbidden", 1, "permission denied (HTTP 403) for 'forbidden/tiny-ddpm'"),
        ("missing", 1, "repository 'user/does-not-exist' was not found on http://127.0.0.1"),
        (
            "no_token",
            1,
            "did not accept your credentials (HTTP 401): log in with `hf auth login`, set HF_TOKEN",
        ),
        ("bad_token", 1, "did not accept your credentials (HTTP 401)"),
    ]:
        assert results[case]["code"] == code, (case, results[case])
        assert message in results[case]["stderr"], (case, results[case]["stderr"])
        assert "Traceback" not in results[case]["stderr"]
        assert len(results[case]["stderr"].splitlines()) == 1, (case, results[case]["stderr"])  # one line
    assert "nothing was changed in" in results["no_token"]["stderr"]
    assert results["sample"]["code"] == 0, results["sample"]
    assert (
        "model_index.json" in hub_server.state.repos["user/via-save"].files
    )  # save_pretrained(push_to_hub=True)
    assert (
        "pushed: " in results["example"] and "README.md" in hub_server.state.repos["user/from-example"].files
    )
    assert _tree_digest(local) == digest, "a push (failed or not) must leave the local folder untouched"

    # what the Hub received: the remote-code layout, a model card, a sample grid, the training configuration
    files = hub_server.state.repos["user/tiny-ddpm"].files
    for name in [
        "model_index.json",
        "pipeline_ddpm.py",
        "unet/unet_ddpm.py",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduling_ddpm.py",
        "scheduler/scheduler_config.json",
        "README.md",
        "samples.png",
        "training_config.json",
    ]:
        assert name in files, (name, sorted(files))
    card = files["README.md"].decode()
    assert "library_name: diffusers" in card and "pipeline_tag: unconditional-image-generation" in card
    assert "- ddpm" in card and "- ddpm-components" in card and "![samples](samples.png)" in card
    assert 'DiffusionPipeline.from_pretrained("user/tiny-ddpm", trust_remote_code=True)' in card
    assert '"dataset": "digits"' in card
    assert "forbidden/tiny-ddpm" not in hub_server.state.repos and "user/other" not in hub_server.state.repos

    # 2. without ddpm_components: load from the Hub and from the local folder with remote code
    out = tmp_path / "loaded"
    loaded = run_python(
        f"""
        import numpy as np, torch
        from diffusers import DiffusionPipeline
        try:
            DiffusionPipeline.from_pretrained("user/tiny-ddpm")
        except ValueError as error:
            print("REFUSED", "trust_remote_code" in str(error))
        for name, source in [("hub", "user/tiny-ddpm"), ("local", {str(local)!r})]:
            pipe = DiffusionPipeline.from_pretrained(source, trust_remote_code=True)
            pipe.set_progress_bar_config(disable=True)
            print(name, type(pipe).__module__, type(pipe.unet).__module__, type(pipe.scheduler).__module__)
            np.save({str(out)!r} + "_" + name + ".npy", pipe({SAMPLE_CALL}, {GUIDED}).images)
        # a pipeline loaded as remote code saves the same layout again (users without our package can re-share)
        import json
        pipe.save_pretrained({str(tmp_path / "resaved")!r})
        print("RESAVED", json.dumps(json.load(open({str(tmp_path / "resaved" / "model_index.json")!r}))))
        again = DiffusionPipeline.from_pretrained({str(tmp_path / "resaved")!r}, trust_remote_code=True)
        again.set_progress_bar_config(disable=True)
        np.save({str(out)!r} + "_resaved.npy", again({SAMPLE_CALL}, {GUIDED}).images)
        """,
        env=hub_server.env,
    )
    assert "REFUSED True" in loaded.stdout
    for line in loaded.stdout.splitlines():
        if line.startswith(("hub ", "local ")):
            assert "ddpm_components" not in line and "diffusers_modules" in line, line
    resaved = json.loads(loaded.stdout.split("RESAVED ", 1)[1].splitlines()[0])
    assert resaved["_class_name"] == ["pipeline_ddpm", "DDPMPipeline"]
    assert resaved["unet"] == ["unet_ddpm", "DDPMUNet2DModel"]
    assert resaved["scheduler"] == ["scheduling_ddpm", "DDPMScheduler"]
    assert (tmp_path / "resaved" / "unet" / "unet_ddpm.py").read_bytes() == (
        local / "unet" / "unet_ddpm.py"
    ).read_bytes()
    for name in ("hub", "local", "resaved"):
        got = np.load(f"{out}_{name}.npy")
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # the CLI sampled the same images from the Hub (PNG: 8-bit rounding of the same floats)
    for index in range(2):
        png = np.asarray(Image.open(tmp_path / "from_hub" / png_name(index)), dtype=np.float32) / 255
        np.testing.assert_allclose(png, expected[index, ..., 0], atol=1 / 255 + 1e-6, rtol=0)


def test_hub_unreachable_gives_clear_errors(tmp_path: Path, run_python):
    """Nothing listening at HF_ENDPOINT: push and sample say the Hub cannot be reached (exit code 1)."""
    pipeline = tiny_pipeline()
    local = tmp_path / "local"
    pipeline.save_pretrained(local)
    digest = _tree_digest(local)
    with socket.socket() as probe:  # a free port with nothing listening on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = hub_env(f"http://127.0.0.1:{port}", tmp_path, token=DUMMY_TOKEN)
    result = run_python(
        f"""
        import contextlib, io, json, os
        from ddpm_components.cli import main
        os.chdir({str(tmp_path)!r})
        results = {{}}
        for name, args in [
            ("push", ["push", "--model", {str(local)!r}, "--repo-id", "user/x", "--num-sample-images", "0"]),
            ("sample", ["sample", "--model", "user/x", "--num-images", "1", "--steps", "1", "--out", "x.png"]),
            ("typo", ["sample", "--model", "locl", "--num-images", "1", "--steps", "1", "--out", "x.png"]),
        ]:
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(args)
            results[name] = {{"code": code, "stderr": err.getvalue()}}
        print("RESULTS" + json.dumps(results))
        """,
        env=env,
        block_package=False,
    )
    results = json.loads(result.stdout.split("RESULTS", 1)[1])
    for name in ("push", "sample", "typo"):
        assert results[name]["code"] == 1, results[name]
        assert f"could not reach the Hub at http://127.0.0.1:{port}" in results[name]["stderr"], results[name]
        assert "check your network connection" in results[name]["stderr"]
        assert len(results[name]["stderr"].splitlines()) == 1, results[name]["stderr"]
        # a bare name that is a Hub id in form but close to a local folder: the typo is suggested too
        assert ("or did you mean the local folder 'local'?" in results[name]["stderr"]) == (name == "typo")
    assert _tree_digest(local) == digest
