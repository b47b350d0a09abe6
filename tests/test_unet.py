"""DDPMUNet2DModel: shapes, conditioning, input validation, presets, saving/loading, checkpointing, compile."""

from __future__ import annotations

import json

import pytest
import torch

from ddpm_components.unet_ddpm import PRESETS, DDPMUNet2DModel, DDPMUNet2DOutput

# tiny models run faster on one thread on the shared 2-core machine (fixture in conftest.py)
pytestmark = pytest.mark.usefixtures("torch_single_thread")

TINY = {
    "sample_size": 16,
    "in_channels": 3,
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "attention_resolutions": (8,),
    "norm_num_groups": 8,
}


def make(**overrides) -> DDPMUNet2DModel:
    torch.manual_seed(0)
    model = DDPMUNet2DModel(**{**TINY, **overrides}).eval()
    # zero-initialised layers would hide bugs: perturb every parameter
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


@pytest.fixture(scope="module")
def tiny() -> DDPMUNet2DModel:
    return make()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_forward_shape_and_output_type(tiny, batch):
    with torch.no_grad():
        out = tiny(batch, 10)
    assert isinstance(out, DDPMUNet2DOutput)
    assert out.sample.shape == batch.shape
    assert torch.isfinite(out.sample).all()
    assert tiny.config.out_channels == 3  # None resolves to in_channels and is stored resolved
    with torch.no_grad():
        as_tuple = tiny(batch, 10, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.sample)


def test_learned_variance_doubles_output_channels(batch):
    model = make(out_channels=6)
    with torch.no_grad():
        assert model(batch, 3).sample.shape == (2, 6, 16, 16)


def test_timestep_forms_agree(tiny, batch):
    with torch.no_grad():
        reference = tiny(batch, torch.tensor([7, 7])).sample
        for timestep in (7, 7.0, torch.tensor(7), torch.tensor([7]), torch.tensor([7.0, 7.0])):
            torch.testing.assert_close(tiny(batch, timestep).sample, reference, atol=1e-6, rtol=0)
        per_sample = tiny(batch, torch.tensor([7, 500])).sample
        other = tiny(batch, 500).sample
    torch.testing.assert_close(per_sample[0], reference[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(per_sample[1], other[1], atol=1e-6, rtol=0)
    assert (reference[1] - other[1]).abs().max() > 1e-3


def test_samples_in_a_batch_are_independent(tiny, batch):
    with torch.no_grad():
        together = tiny(batch, torch.tensor([3, 900])).sample
        alone = tiny(batch[1:], 900).sample
    torch.testing.assert_close(together[1:], alone, atol=1e-5, rtol=0)


def test_class_conditioning_and_null_class(batch):
    model = make(num_class_embeds=10)
    assert model.null_class_label == 10
    assert model.class_embedding.num_embeddings == 11
    with torch.no_grad():
        a = model(batch, 5, class_labels=torch.tensor([1, 2])).sample
        b = model(batch, 5, class_labels=torch.tensor([1, 3])).sample
        null = model(batch, 5, class_labels=model.null_class_label).sample
        null_1d = model(batch, 5, class_labels=torch.tensor([10, 10])).sample
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)
    assert (a[1] - b[1]).abs().max() > 1e-4
    torch.testing.assert_close(null, null_1d, atol=1e-6, rtol=0)
    without_null = make(num_class_embeds=10, use_null_class_embed=False)
    assert without_null.null_class_label is None
    assert without_null.class_embedding.num_embeddings == 10
    assert make().null_class_label is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sample": torch.randn(2, 1, 16, 16)}, "expected in_channels=3"),
        ({"sample": torch.randn(2, 3, 9, 16)}, "multiples of 2"),
        ({"sample": torch.randn(3, 16, 16)}, "batch, channels, height, width"),
        ({"timestep": torch.tensor([1, 2, 3])}, "batch size (2)"),
        ({"timestep": torch.ones(2, 1)}, "batch size (2)"),
        ({"timestep": "7"}, "timestep must be"),
        ({"class_labels": torch.tensor([1, 2])}, "unconditional"),
    ],
)
def test_bad_input_raises_value_error(tiny, batch, kwargs, message):
    arguments = {"sample": batch, "timestep": 1, **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny(**arguments)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (None, "class_labels are required"),
        (torch.tensor([1.0, 2.0]), "integer"),
        (torch.tensor([1, 2, 3]), "batch size"),
    ],
)
def test_bad_class_labels_raise_value_error(batch, labels, message):
    model = make(num_class_embeds=10)
    with pytest.raises(ValueError, match=message):
        model(batch, 1, class_labels=labels)


def test_forward_reads_no_tensor_value_on_the_host(batch, monkeypatch):
    """Class labels are validated in one place, DDPMPipeline.check_inputs (before sampling); the U-Net's forward
    checks only shapes and dtypes, so a training or sampling step never waits for the device to read a label.
    An out-of-range label still fails, in torch's embedding lookup."""
    model = make(num_class_embeds=10)
    labels = torch.tensor([1, 10])  # 10: the null class
    expected = model(batch, torch.tensor([3, 4]), class_labels=labels).sample

    def host_read(*args, **kwargs):
        raise AssertionError("forward read a tensor value on the host (a device sync)")

    with monkeypatch.context() as patch:
        for name in ("__int__", "__bool__", "__float__", "__index__", "item", "tolist"):
            patch.setattr(torch.Tensor, name, host_read)
        out = model(batch, torch.tensor([3, 4]), class_labels=labels).sample
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    with pytest.raises(IndexError):
        model(batch, 1, class_labels=torch.tensor([1, 11]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"attention_resolutions": (4,)}, "valid sizes"),
        ({"resnet_time_scale_shift": "film"}, "is not supported; choose one of"),
        ({"downsample_padding": 2}, "is not supported; choose one of"),
        ({"norm_num_groups": 12}, "must divide"),
        ({"sample_size": 15}, "multiple of 2"),
        ({"attention_head_dim": 5}, "attention_head_dim=5"),
        ({"dropout": 1.5}, "dropout"),
        ({"num_class_embeds": 0}, "num_class_embeds"),
    ],
)
def test_bad_config_raises_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        DDPMUNet2DModel(**{**TINY, **overrides})


def test_scale_shift_and_multi_head_variants_run(batch):
    model = make(resnet_time_scale_shift="scale_shift", attention_head_dim=8, downsample_padding=1)
    assert model.down_blocks[1].attentions[0].heads == 4
    with torch.no_grad():
        out = model(batch, 3).sample
    assert out.shape == batch.shape and torch.isfinite(out).all()


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_presets_match_the_paper():
    with torch.device("meta"):
        cifar10 = DDPMUNet2DModel.from_preset("cifar10")
        lsun = DDPMUNet2DModel.from_preset("lsun256")
        celebahq = DDPMUNet2DModel.from_preset("celebahq256")
    # paper: 35.7M (CIFAR-10), 114M (256x256); diffusers' google/ddpm-cifar10-32 has 35,746,307
    assert parameter_count(cifar10) == 35_746_307
    assert round(parameter_count(lsun) / 1e6) == 114
    assert (
        celebahq.config.block_out_channels == lsun.config.block_out_channels == (128, 128, 256, 256, 512, 512)
    )
    assert cifar10.config.dropout == 0.1
    assert cifar10.down_blocks[1].attentions is not None and cifar10.down_blocks[0].attentions is None
    assert lsun.down_blocks[4].attentions is not None  # 256 / 2**4 = 16


def test_digits_preset_and_overrides(batch):
    model = DDPMUNet2DModel.from_preset("digits", num_class_embeds=10, out_channels=2)
    assert model.config.in_channels == 1 and model.config.sample_size == 8
    assert model.config.out_channels == 2 and model.null_class_label == 10
    assert parameter_count(model) < 3_000_000
    with torch.no_grad():
        out = model(torch.randn(4, 1, 8, 8), 10, class_labels=torch.tensor([0, 1, 2, 10])).sample
    assert out.shape == (4, 2, 8, 8)
    bigger = DDPMUNet2DModel.from_preset("digits", sample_size=16)
    assert bigger.config.sample_size == 16
    assert PRESETS["digits"]["sample_size"] == 8  # overrides do not leak into the preset table
    with pytest.raises(ValueError, match="is not supported; choose one of"):
        DDPMUNet2DModel.from_preset("imagenet")


def test_save_load_roundtrip_safetensors(tmp_path, batch):
    model = make(num_class_embeds=4, out_channels=6)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "DDPMUNet2DModel"
    assert config["use_null_class_embed"] is True and config["out_channels"] == 6
    loaded = DDPMUNet2DModel.from_pretrained(tmp_path)
    labels = torch.tensor([0, 4])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(batch, 9, class_labels=labels).sample, model(batch, 9, class_labels=labels).sample
        )
    half = DDPMUNet2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        out = half(batch.to(torch.bfloat16), 9, class_labels=labels).sample
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), model(batch, 9, class_labels=labels).sample, atol=0.1, rtol=0.1)


def test_dtype_device_and_channels_last(tiny, batch):
    with torch.no_grad():
        reference = tiny(batch, 42).sample
        model64 = make().to(torch.float64)
        torch.testing.assert_close(model64(batch.double(), 42).sample.float(), reference, atol=1e-5, rtol=0)
        channels_last = make().to(device="cpu", memory_format=torch.channels_last)
        out = channels_last(batch.contiguous(memory_format=torch.channels_last), 42).sample
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients(batch):
    def gradients(model: DDPMUNet2DModel) -> dict[str, torch.Tensor]:
        model.train()
        loss = model(batch, torch.tensor([4, 70])).sample.square().mean()
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = gradients(make(dropout=0.0))
    checkpointed_model = make(dropout=0.0)
    checkpointed_model.enable_gradient_checkpointing()
    assert checkpointed_model.gradient_checkpointing and checkpointed_model.is_gradient_checkpointing
    checkpointed = gradients(checkpointed_model)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    checkpointed_model.disable_gradient_checkpointing()
    assert not checkpointed_model.gradient_checkpointing


def test_upsample_equals_nearest_then_conv_and_follows_weight_updates():
    torch.manual_seed(0)
    upsample = make().up_blocks[0].upsample
    x = torch.randn(2, 32, 5, 7)

    def reference() -> torch.Tensor:
        return upsample.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))

    with torch.no_grad():
        torch.testing.assert_close(upsample(x), reference(), atol=1e-5, rtol=0)
        upsample.conv.weight.mul_(-2.0)  # the kernel cached by the previous call must be rebuilt
        torch.testing.assert_close(upsample(x), reference(), atol=1e-5, rtol=0)
    # with autograd: gradients reach the 3x3 weight
    upsample(x).sum().backward()
    expected_grad = torch.autograd.grad(reference().sum(), upsample.conv.weight)[0]
    torch.testing.assert_close(upsample.conv.weight.grad, expected_grad, atol=1e-4, rtol=1e-5)


def test_compiles_with_fullgraph_and_no_graph_break(batch):
    model = make(num_class_embeds=3)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    labels = torch.tensor([0, 3])
    with torch.no_grad():
        expected = model(batch, torch.tensor([5, 6]), class_labels=labels).sample
        out = compiled(batch, torch.tensor([5, 6]), class_labels=labels).sample
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_compiles_with_inductor():
    model = make(num_class_embeds=3)
    x = torch.randn(2, 3, 16, 16)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    labels = torch.tensor([0, 3])
    with torch.no_grad():
        expected = model(x, 5, class_labels=labels).sample
        out = compiled(x, 5, class_labels=labels).sample
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_module_is_self_contained():
    """Saved pipelines carry unet_ddpm.py as remote code: it may import only torch, diffusers, stdlib."""
    import ast
    import sys
    from pathlib import Path

    import ddpm_components.unet_ddpm as module

    tree = ast.parse(Path(module.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            roots.add(node.module.split(".")[0])
    assert roots - set(sys.stdlib_module_names) <= {"torch", "diffusers"}
    for name in ("ModelMixin", "ConfigMixin"):  # diffusers looks the mixins up on the module
        assert hasattr(module, name)


def test_upsample_kernel_cache_follows_writes_that_bypass_the_version_counter():
    """EMAModel.copy_to/restore write through ``param.data`` and fused AdamW updates in place without
    bumping ``weight._version``: an eval-mode call after either must use the new weights."""
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 3, 8, 8)

    def fresh() -> torch.Tensor:
        for module in model.modules():
            if hasattr(module, "_cache"):
                module._cache = None
        with torch.no_grad():
            return model(x, 10).sample

    def cached() -> torch.Tensor:
        with torch.no_grad():
            return model(x, 10).sample

    cached()  # fills the cache
    ema = EMAModel([torch.randn_like(p) for p in model.parameters()])
    ema.store(model.parameters())
    ema.copy_to(model.parameters())  # param.data.copy_
    torch.testing.assert_close(cached(), fresh(), atol=1e-5, rtol=0)
    ema.restore(model.parameters())
    torch.testing.assert_close(cached(), fresh(), atol=1e-5, rtol=0)

    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model.train()
    model(x, 10).sample.square().mean().backward()
    optimizer.step()
    model.eval()
    torch.testing.assert_close(cached(), fresh(), atol=1e-5, rtol=0)


def test_frozen_model_takes_input_gradients_after_an_inference_mode_call():
    # the kernel cached under inference_mode was an inference tensor: autograd refused it afterwards
    model = make().requires_grad_(False)
    x = torch.randn(1, 3, 8, 8)
    with torch.inference_mode():
        expected = model(x, 3).sample
    x.requires_grad_(True)
    out = model(x, 3).sample
    out.square().sum().backward()
    torch.testing.assert_close(out.detach(), expected, atol=1e-6, rtol=0)
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
