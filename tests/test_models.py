"""Model registry: every model builds and runs, widths scale, configs compose, pretrained loads offline."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torchvision import models as tvm

from napkit.errors import NapkitError
from napkit.io import save_tensors
from napkit.models import create_model, list_models
from napkit.models.imagenet import pretrained_path
from napkit.models.weights import hub_path

SMALL = ["alexnet_small", "resnet50_small", "vgg16_small"]
FULL = ["alexnet", "resnet50", "vgg16", "vgg16_bn"]
CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
ORDINARY = (
    nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Linear, nn.Dropout, nn.Identity
)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_model():
    assert list_models() == sorted(SMALL + FULL + ["lenet5"])


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_small_models_forward(name, channels, size):
    model = create_model(name, num_classes=10, in_channels=channels, input_size=size)
    assert model(torch.randn(2, channels, size, size)).shape == (2, 10)


@pytest.mark.parametrize("name", FULL)
def test_full_size_models_forward(name):
    model = create_model(name, num_classes=7, in_channels=3, input_size=224).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 7)


@pytest.mark.parametrize(
    ("name", "cls"),
    [("alexnet_small", tvm.AlexNet), ("vgg16_small", tvm.VGG), ("resnet50_small", tvm.ResNet)],
)
def test_small_models_are_torchvision_classes_of_ordinary_modules(name, cls):
    model = create_model(name, num_classes=10, in_channels=3, input_size=32)
    assert isinstance(model, cls)
    leaves = [m for m in model.modules() if not list(m.children())]
    assert all(isinstance(m, ORDINARY) for m in leaves), {type(m).__name__ for m in leaves}


@pytest.mark.parametrize("name", SMALL)
def test_width_scales_parameters_quadratically(name):
    def count(width: float) -> int:
        return n_params(create_model(name, num_classes=10, in_channels=3, input_size=32, width=width))

    assert 3.0 < count(0.5) / count(0.25) < 4.2


def test_tiny_width_keeps_at_least_one_channel():
    model = create_model("vgg16_small", num_classes=10, in_channels=1, input_size=28, width=0.001)
    assert model.features[0].out_channels == 1
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_vgg16_small_without_batch_norm_and_dropout_kwarg():
    model = create_model(
        "vgg16_small", num_classes=10, in_channels=3, input_size=32, batch_norm=False, dropout=0.3
    )
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.3}


def test_full_size_model_with_one_input_channel_replaces_first_conv():
    model = create_model("alexnet", num_classes=10, in_channels=1, input_size=224).eval()
    assert model.features[0].in_channels == 1 and model.features[0].out_channels == 64
    with torch.no_grad():
        assert model(torch.randn(1, 1, 224, 224)).shape == (1, 10)


def test_unknown_model_lists_valid_names():
    with pytest.raises(NapkitError, match="unknown model 'vgg17'") as info:
        create_model("vgg17", num_classes=10, in_channels=3, input_size=32)
    assert all(name in str(info.value) for name in list_models())


def test_unknown_option_lists_valid_options():
    with pytest.raises(NapkitError, match="unknown option.*depth.*valid options: width, batch_norm, dropout"):
        create_model("vgg16_small", num_classes=10, in_channels=3, input_size=32, depth=3)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("alexnet", {"input_size": 32}, "input_size >= 63"),
        ("resnet50_small", {"width": 0.0}, "width > 0"),
        ("vgg16_small", {"num_classes": 0}, "positive integer num_classes"),
    ],
)
def test_bad_arguments_give_clear_errors(name, kwargs, message):
    args = {"num_classes": 10, "in_channels": 3, "input_size": 224} | kwargs
    with pytest.raises(NapkitError, match=message):
        create_model(name, **args)


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_model_config_composes(path):
    cfg = OmegaConf.load(path)
    assert cfg.name == path.stem or (path.stem, cfg.name) in {("timm", "timm.create_model"), ("torchvision", "resnet18")}
    small = cfg.name in SMALL
    model = create_model(**cfg, num_classes=10, in_channels=3, input_size=32 if small else 224)
    assert isinstance(model, nn.Module)


def test_every_model_has_a_config():
    """One config per registered model, plus model=timm and model=torchvision (any model of theirs by name)."""
    assert sorted(p.stem for p in CONF.glob("*.yaml")) == sorted([*list_models(), "timm", "torchvision"])


def test_model_torchvision_builds_any_classifier_for_the_dataset(compose_cfg) -> None:
    """model=torchvision model.name=<builder>: none of the default model's own keys (width, dropout) reach
    the builder, which would reject them."""
    from types import SimpleNamespace

    from napkit.schema import validate_config
    from napkit.stages.common import model_spec

    cfg = compose_cfg("model=torchvision", "model.name=mobilenet_v3_small")
    validate_config(cfg)
    spec = model_spec(cfg, SimpleNamespace(num_classes=7, in_channels=1, input_size=32))
    assert spec.kwargs == {}
    model = spec.build().eval()
    assert type(model).__name__ == "MobileNetV3" and model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_pretrained_weights_load_from_local_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = tvm.resnet50(weights=None)
    path = pretrained_path("resnet50")
    assert path.parent == tmp_path / "hub" / "checkpoints" and path.name.startswith("resnet50-")
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)

    same = create_model("resnet50", num_classes=1000, in_channels=3, input_size=224, pretrained=True)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in same.state_dict().items())

    adapted = create_model("resnet50", num_classes=10, in_channels=1, input_size=224, pretrained=True)
    assert adapted.fc.out_features == 10 and adapted.conv1.in_channels == 1
    assert torch.equal(adapted.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)
    assert torch.equal(adapted.bn1.running_var, reference.bn1.running_var)


def test_missing_or_wrong_pretrained_weights_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = pretrained_path("alexnet")
    with pytest.raises(NapkitError, match="not found at") as info:
        create_model("alexnet", num_classes=10, in_channels=3, input_size=224, pretrained=True)
    assert str(path) in str(info.value) and "torchvision.models.alexnet(weights='DEFAULT')" in str(info.value)

    path.parent.mkdir(parents=True)
    torch.save({"not.an.alexnet": torch.zeros(1)}, path)
    with pytest.raises(NapkitError, match="does not hold 'alexnet' weights"):
        create_model("alexnet", num_classes=10, in_channels=3, input_size=224, pretrained=True)


def test_lenet5_is_lenet_sized():
    model = create_model("lenet5", num_classes=10, in_channels=1, input_size=28)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert 40_000 < n_params(model) < 70_000  # LeNet-5: ~44k (5x5 convs 6 and 16, fc 120-84-10)


# --- builders by path, weights files, torchvision weights -----------------------------------


def test_torchvision_model_by_name_or_path_adapts_data_args():
    model = create_model("resnet18", num_classes=7, in_channels=1, input_size=32).eval()
    assert isinstance(model, tvm.ResNet) and model.fc.out_features == 7 and model.conv1.in_channels == 1
    vit = create_model("torchvision.models.vit_b_32", num_classes=3, in_channels=3, input_size=64,
                       dropout=0.2).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
        assert vit(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    assert vit.encoder.dropout.p == 0.2


def test_dotted_builder_gets_the_data_args_it_takes(tmp_path, monkeypatch):
    pkg = tmp_path / "my_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        "from torch import nn\n"
        "def tiny(num_classes, in_chans, hidden=4):\n"
        "    return nn.Sequential(nn.Conv2d(in_chans, hidden, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(hidden, num_classes))\n"
        "NOT_A_BUILDER = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = create_model("my_pkg.nets.tiny", num_classes=5, in_channels=2, input_size=16, hidden=6)
    assert model(torch.randn(1, 2, 16, 16)).shape == (1, 5) and model[0].out_channels == 6
    with pytest.raises(NapkitError, match="rejected its options.*depth"):
        create_model("my_pkg.nets.tiny", num_classes=5, in_channels=2, input_size=16, depth=2)
    with pytest.raises(NapkitError, match="not a callable builder"):
        create_model("my_pkg.nets.NOT_A_BUILDER", num_classes=5, in_channels=2, input_size=16)
    monkeypatch.setitem(sys.modules, "timm", None)  # timm is in the test extra: import it as if missing
    with pytest.raises(NapkitError, match="cannot be imported.*optional extra"):
        create_model("timm.create_model", num_classes=5, in_channels=3, input_size=16, model_name="resnet18")


def test_unknown_name_mentions_builder_paths():
    with pytest.raises(NapkitError, match="unknown model 'resnet19'.*torchvision model name"):
        create_model("resnet19", num_classes=10, in_channels=3, input_size=32)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_file_loads_into_any_model(tmp_path, suffix):
    torch.manual_seed(0)
    reference = create_model("mobilenet_v3_small", num_classes=4, in_channels=3, input_size=32)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_tensors(path, reference.state_dict())
    else:
        torch.save({"state_dict": reference.state_dict(), "epoch": 3}, path)
    torch.manual_seed(1)
    loaded = create_model("mobilenet_v3_small", num_classes=4, in_channels=3, input_size=32, weights=str(path))
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(NapkitError, match="do not fit.*other shapes.*classifier.3.weight"):
        create_model("mobilenet_v3_small", num_classes=5, in_channels=3, input_size=32, weights=str(path))


def test_weights_file_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": nn.Linear(2, 2)}, path)  # a module object, not a state dict
    with pytest.raises(NapkitError, match="weights_only=True"):
        create_model("resnet18", num_classes=10, in_channels=3, input_size=32, weights=str(path))


def test_torchvision_weights_by_enum_from_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    reference = tvm.resnet18(weights=None)
    path = hub_path(tvm.ResNet18_Weights.IMAGENET1K_V1)
    with pytest.raises(NapkitError, match="not found at.*ResNet18_Weights.IMAGENET1K_V1"):
        create_model("resnet18", num_classes=10, in_channels=3, input_size=32, weights="DEFAULT")
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    model = create_model("resnet18", num_classes=10, in_channels=3, input_size=32,
                         weights="ResNet18_Weights.IMAGENET1K_V1")
    assert model.fc.out_features == 10  # the new head keeps its fresh init, everything else is loaded
    assert torch.equal(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    with pytest.raises(NapkitError, match="not a weight of 'resnet18'; valid: DEFAULT, IMAGENET1K_V1"):
        create_model("resnet18", num_classes=10, in_channels=3, input_size=32, weights="IMAGENET1K_V9")


def test_pruned_torchvision_model_rebuilds_from_its_spec(tmp_path):
    from napkit.artifacts import ModelSpec, load_model, save_model
    from napkit.structured import StructuredPruner

    spec = ModelSpec("torchvision.models.mobilenet_v3_small", 10, 3, 32, {"width_mult": 0.5})
    model = spec.build().eval()
    pruned = StructuredPruner("l1", model, input_shape=(1, 3, 32, 32), step_fraction=0.5)(model, 0)
    save_model(tmp_path, pruned, spec.with_channels_of(pruned))
    rebuilt, _, _ = load_model(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), pruned(x))
