"""timm models (``model=timm``, i.e. ``model.name=timm.create_model``): built from the real config, pruned
structurally to 2x fewer FLOPs and fine-grained to 2x compression. Random weights only (no download).
timm is in the test extra: without it the imports below fail, nothing is skipped."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_structured import forward, masked
from test_zoo import random_plan, randomize
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import napkit
from napkit.data import create_splits
from napkit.errors import NapkitError
from napkit.models import create_model
from napkit.schema import validate_config
from napkit.stages.common import model_spec
from napkit.structured import apply, count_params
from napkit.structured.groups import trace_groups
from napkit.structured.zoo import build_timm, check_model, main

DATA = SimpleNamespace(num_classes=7, in_channels=1, input_size=32)  # what model_spec reads of DataSplits


def spec(compose_cfg, name: str, *extra: str):
    """The ModelSpec the stages build from ``model=timm model.model_name=<name>`` for DATA."""
    cfg = compose_cfg("model=timm", f"model.model_name={name}", *extra)
    validate_config(cfg)
    return model_spec(cfg, DATA)


@pytest.mark.parametrize("name,extra,cls", [
    ("resnet18", [], ResNet),
    ("efficientnet_b0", [], EfficientNet),
    ("vit_tiny_patch16_224", ["+model.patch_size=8"], VisionTransformer),
])
def test_config_builds_timm_models_for_the_dataset(compose_cfg, name, extra, cls) -> None:
    s = spec(compose_cfg, name, *extra)
    assert s.name == "timm.create_model" and s.kwargs["model_name"] == name
    assert s.kwargs["pretrained"] is False  # nothing downloads
    model = s.build()
    assert type(model) is cls
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1  # in_chans from the dataset
    assert forward(model, torch.randn(2, 1, 32, 32)).shape == (2, 7)
    if cls is VisionTransformer:  # built for 32 px (img_size from the dataset), patch_size from the config
        assert model.patch_embed.img_size == (32, 32) and model.patch_embed.grid_size == (4, 4)


def test_img_size_goes_only_to_fixed_size_models_and_the_config_wins(compose_cfg) -> None:
    vit = spec(compose_cfg, "test_vit", "+model.img_size=64").build()  # timm's test ViT: 16 px patches
    assert vit.patch_embed.img_size == (64, 64)
    assert forward(vit, torch.randn(1, 1, 64, 64)).shape == (1, 7)
    resnet = spec(compose_cfg, "test_resnet").build()  # a CNN takes no img_size: it would reject one
    assert forward(resnet, torch.randn(1, 1, 48, 48)).shape == (1, 7)


# --- structured: the zoo's one L1 step to 2x fewer FLOPs --------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "vit_tiny_patch16_224"])
def test_timm_family_prunes_to_half_the_flops_and_runs(name: str) -> None:
    row = check_model(name, builder=build_timm)  # also checks the pruned model's (1, 1000) logits
    assert row.ok, row
    assert 2.0 <= row.flops_reduction < 2.2 and row.params_reduction > 1.5


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "regnetx_002"])
def test_timm_batchnorm_act_models_prune(name: str) -> None:
    """timm's BatchNormAct2d (BatchNorm2d with its activation inside: EfficientNet, MobileNetV3, RegNet,
    DenseNet, ByobNet) traces as a per-channel leaf, not as an F.batch_norm that freezes its channels."""
    row = check_model(name, builder=build_timm)
    assert row.ok, row.error


@pytest.mark.parametrize("name", ["test_efficientnet", "vit_tiny_patch16_224"])
def test_timm_models_prune_with_nap_scores(name: str) -> None:
    """NAP's K-FAC channel scores and consumer refits on timm models (SE blocks, BatchNormAct2d, a ViT whose
    attention projections run as plain Linear modules in timm)."""
    row = check_model(name, builder=build_timm, criterion="nap", allocation="global")
    assert row.ok, row.error


def test_zoo_cli_runs_timm_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--timm", "test_resnet,test_convnext", "--no-torch-pruning"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "zoo_ok=2/2"
    assert [line.split()[:2] for line in lines[1:3]] == [["test_resnet", "ok"], ["test_convnext", "ok"]]


def test_dynamic_img_size_vit_is_refused_clearly(compose_cfg) -> None:
    """timm's dynamic_img_size resamples the position embedding under a data-dependent ``if``, which
    torch.fx cannot trace (timm's test_vit turns it on); model.dynamic_img_size=false is the way out."""
    model = spec(compose_cfg, "test_vit").build()
    with pytest.raises(NapkitError, match="cannot trace VisionTransformer with torch.fx.*control flow"):
        trace_groups(model)
    assert trace_groups(spec(compose_cfg, "test_vit", "+model.dynamic_img_size=false").build()).groups


@pytest.mark.parametrize("name,extra", [
    ("test_resnet", []),
    ("test_convnext", ["+model.depths=[1,1,1,1]", "+model.dims=[8,16,24,32]"]),  # list options pass through
    ("test_vit", ["+model.dynamic_img_size=false"]),
])
def test_removal_equals_masking_and_the_spec_rebuilds_it(compose_cfg, name: str, extra: list[str]) -> None:
    """Physically pruned == the dense model with those channels zeroed; the artifact's spec (channel
    counts) rebuilds the same timm model, as a later stage loading it does."""
    gen = torch.Generator().manual_seed(1)
    s = spec(compose_cfg, name, *extra)
    model = s.build().double().eval()
    randomize(model, gen)
    groups = trace_groups(model).groups
    assert groups, "every family has prunable groups"
    plan = random_plan(groups, gen)
    pruned = apply(model, plan, groups=groups)
    assert count_params(pruned) < count_params(model)
    x = torch.randn(2, 1, 32, 32, generator=gen, dtype=torch.float64)
    out = forward(pruned, x)
    torch.testing.assert_close(out, forward(masked(model, groups, plan), x), rtol=1e-9, atol=1e-10)
    rebuilt = s.with_channels_of(pruned).build().double()
    rebuilt.load_state_dict(pruned.state_dict())
    assert torch.equal(forward(rebuilt, x), out)


# --- the Python API ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    return create_splits("digits", seed=0, input_size=32, val_fraction=0.25, subset_train=300)


@pytest.mark.parametrize("name,cls", [("test_resnet", ResNet), ("test_efficientnet", EfficientNet)])
def test_api_prunes_a_timm_model_fine_grained(digits, name: str, cls: type) -> None:
    """Fine-grained pruning needs no tracing: BatchNormAct2d models (EfficientNet) prune too."""
    model = create_model("timm.create_model", model_name=name, num_classes=10, in_channels=1, input_size=32)
    result = napkit.prune(model, digits.train, digits.val, method="magnitude", mode="fine_grained", target=2,
                          tolerance=100.0, device="cpu",
                          overrides=["prune.finetune_epochs=0.1", "prune.bn_recalibration_batches=1"])
    assert result.stop_reason == "target" and type(result.model) is cls
    assert result.measures["compression"] >= 2.0 * (1 - 1e-3)
    kept = sum(int(m.sum()) for m in result.masks.masks.values())
    total = sum(m.numel() for m in result.masks.masks.values())
    assert total / kept >= 2.0 * (1 - 1e-3)
    for name, mask in result.masks.masks.items():  # the masks are applied to the returned model
        weight = result.model.get_submodule(name).weight
        assert not weight[~mask.bool()].any()
    assert forward(result.model, torch.randn(2, 1, 32, 32)).shape == (2, 10)

