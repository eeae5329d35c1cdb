"""Every stage run in-process on the real configs: all three model families through the pipeline."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from napkit.artifacts import load_model
from napkit.data import make_loader
from napkit.errors import NapkitError
from napkit.evaluation.cost import input_shape
from napkit.pruning.session import PruneData, channel_criterion, run_pruning, structured_parts
from napkit.stages import curvature, evaluate, finetune, pretrain, prune
from napkit.stages.common import checkpoint_path, load_splits, model_spec, stage_dir
from napkit.structured.attention import HeadAttention
from napkit.structured.blocks import skipped_blocks
from napkit.structured.surgery import recalibrate_bn
from napkit.training.trainer import fit

FAST = ("train.epochs=1", "finetune.epochs=1", "prune.max_iterations=2", "prune.finetune_epochs=1",
        "curvature.num_samples=64", "evaluate.latency_repeats=2", "data.subset_train=256")


@pytest.fixture
def fast_cfg(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)

    def make(*overrides: str):
        return compose_cfg(f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                           f"paths.artifacts={tmp_path / 'artifacts'}", *FAST, *overrides)

    return make


def _run_all(cfg) -> dict[str, dict[str, float]]:
    return {s.__name__.rsplit(".", 1)[-1]: s.run(cfg) for s in (pretrain, curvature, prune, finetune, evaluate)}


# ResNet-50's 53 layers make it the slow one on a CPU: narrower and fewer samples in tests
SMALLER = {"resnet50_small": ("model.width=0.125", "data.subset_train=128", "curvature.num_samples=32")}


@pytest.mark.parametrize("model,method", [("vgg16_small", "nap"), ("alexnet_small", "magnitude"),
                                          ("resnet50_small", "nap")])
def test_pipeline_runs_for_each_family(fast_cfg, model: str, method: str) -> None:
    cfg = fast_cfg(f"model={model}", f"prune={method}", "prune.tolerance=100", *SMALLER.get(model, ()))
    out = _run_all(cfg)
    ev = out["evaluate"]
    assert 0.0 < ev["sparsity"] <= 0.9 + 1e-6
    assert ev["params_nonzero"] < ev["params"] == ev["params_dense"]
    assert ev["flops_effective"] < ev["flops"] == ev["flops_dense"]
    assert 0.0 <= ev["top1"] <= 100.0
    saved = json.loads((stage_dir(cfg, "evaluate") / "metrics.json").read_text())
    assert saved["top1"] == pytest.approx(ev["top1"])
    # the final model's masked weights are exactly zero after loading
    model_, _, masks = load_model(stage_dir(cfg, "finetune"))
    modules = dict(model_.named_modules())
    for name, mask in masks.masks.items():
        assert bool((modules[name].weight[~mask] == 0).all())
    # one MLflow run holds all five stages
    client = MlflowClient(cfg.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name("napkit").experiment_id])
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    for key in ("pretrain/val_top1", "curvature/seconds", "prune/sparsity", "finetune/val_top1", "evaluate/top1"):
        assert key in metrics, key
    assert any(k.startswith("prune/density/") for k in metrics)


@pytest.mark.parametrize("model,method", [("vgg16_small", ["prune=nap_structured"]),
                                          ("alexnet_small", ["prune=l1_uniform"]),
                                          ("resnet50_small", ["prune=nap_structured"]),
                                          ("vgg16_small", ["prune=random", "prune.mode=structured"])])
def test_structured_pipeline_for_each_family(fast_cfg, model: str, method: list[str]) -> None:
    cfg = fast_cfg(f"model={model}", *method, "prune.structured.tolerance=100",
                   "prune.structured.step_fraction=0.4", *SMALLER.get(model, ()))
    ev = _run_all(cfg)["evaluate"]
    # physically smaller: fewer parameters and FLOPs than the dense model, every weight stored
    assert ev["params"] < ev["params_dense"] and ev["flops"] < ev["flops_dense"]
    assert ev["params_nonzero"] == ev["params"] and ev["sparsity"] == 0.0
    rebuilt, spec, masks = load_model(stage_dir(cfg, "finetune"))
    assert masks is None and spec.channels is not None
    assert sum(p.numel() for p in rebuilt.parameters()) == ev["params"]


def test_structured_pipeline_prunes_a_vits_heads_and_rebuilds_it(fast_cfg) -> None:
    """A torchvision ViT by builder path: its heads are channel groups through every stage, and the saved
    model (channel counts + weights) rebuilds with fewer heads."""
    cfg = fast_cfg("model=torchvision", "model.name=torchvision.models.vision_transformer.VisionTransformer",
                   "+model.patch_size=4", "+model.num_layers=2", "+model.num_heads=4", "+model.hidden_dim=16",
                   "+model.mlp_dim=32", "prune=nap_structured", "prune.structured.tolerance=100",
                   "prune.structured.step_fraction=0.5", "prune.allocation=uniform")
    ev = _run_all(cfg)["evaluate"]
    assert ev["params"] < ev["params_dense"] and ev["flops"] < ev["flops_dense"]
    rebuilt, _, _ = load_model(stage_dir(cfg, "finetune"))
    heads = [m.num_heads for m in rebuilt.modules() if isinstance(m, HeadAttention)]
    assert len(heads) == 2 and max(heads) < 4


def test_pretrain_resumes_from_its_last_checkpoint(fast_cfg) -> None:
    """Interrupt after epoch 2 of 3, rerun: the weights equal an uninterrupted run's, bit for bit."""
    def train(cfg, stop_after: int | None = None):
        torch.manual_seed(0)
        splits = load_splits(cfg)
        model = model_spec(cfg, splits).build()

        def stop(epoch: int, _row: dict) -> None:
            if stop_after is not None and epoch == stop_after:
                raise KeyboardInterrupt

        fit(model, splits.train, splits.val, cfg=cfg.train, batch_size=64, eval_batch_size=256, seed=0,
            device=torch.device("cpu"), checkpoint=checkpoint_path(cfg, "pretrain"), on_epoch=stop,
            progress=False)
        return model

    cfg = fast_cfg("model=alexnet_small", "train.epochs=3")
    reference = train(cfg)
    checkpoint_path(cfg, "pretrain").unlink()
    with pytest.raises(KeyboardInterrupt):
        train(cfg, stop_after=2)
    resumed = train(cfg)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_bad_inputs_are_named(fast_cfg, tmp_path) -> None:
    with pytest.raises(NapkitError, match="missing file"):
        curvature.run(fast_cfg(f"paths.artifacts={tmp_path / 'empty'}"))
    with pytest.raises(NapkitError, match="valid choices"):
        prune.run(fast_cfg("prune.method=obs_magic"))


class _Shifted(torch.utils.data.Dataset):
    """A stand-in augmentation that moves every input: its BatchNorm statistics differ from the plain split's."""

    def __init__(self, base: torch.utils.data.Dataset, shift: float) -> None:
        self.base, self.shift = base, shift

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return x + self.shift, y


def test_structured_surgery_recalibrates_batchnorm_on_the_augmented_training_split(compose_cfg) -> None:
    """After channel surgery BatchNorm statistics come from the training split WITH its augmentation, the
    data the weights were fitted to: plain-image statistics alone cost a dense CIFAR-10 VGG 1.9 points."""
    cfg = compose_cfg("model=vgg16_small", "prune=l1", "data.subset_train=128", "model.width=0.125",
                      "prune.max_iterations=1", "prune.finetune_epochs=0", "prune.stop_on_tolerance=false")
    splits = load_splits(cfg)
    spec = model_spec(cfg, splits)
    data = PruneData(_Shifted(splits.train_plain, 3.0), splits.train_plain, splits.val)
    outcome = run_pruning(spec.build().eval(), data, cfg, factors=lambda m, it: {},
                          input_shape=input_shape(spec.in_channels, spec.input_size), device=torch.device("cpu"))
    smaller = outcome.model
    assert outcome.result.best.measures["flops_reduction"] > 1.0
    got = smaller.features[1].running_mean.clone()

    def recalibrated(data) -> torch.Tensor:
        model = copy.deepcopy(smaller)
        loader = make_loader(data, batch_size=int(cfg.data.batch_size), shuffle=True, seed=int(cfg.seed) + 1)
        recalibrate_bn(model, loader, int(cfg.prune.bn_recalibration_batches))
        return model.features[1].running_mean

    torch.testing.assert_close(got, recalibrated(data.train))
    assert not torch.allclose(got, recalibrated(splits.train_plain), atol=1e-2)


def test_structured_stage_ranks_per_millisecond_with_a_latency_batch(compose_cfg, tmp_path) -> None:
    """``prune.structured.latency_batch`` times the dense model's layers here once per run fingerprint (a
    resumed run reads the same timings back) and ranks NAP per millisecond (plain NAP scores, not per
    FLOP); every measurement carries the table's latency of the model."""
    cfg = compose_cfg("model=vgg16_small", "prune=nap_structured", "data.subset_train=128", "model.width=0.125",
                      "prune.structured.latency_batch=1")
    assert channel_criterion(cfg.prune, int(cfg.seed)).name == "nap"
    cfg = compose_cfg("model=vgg16_small", "prune=l1", "data.subset_train=128", "model.width=0.125",
                      "prune.structured.latency_batch=1", f"paths.artifacts={tmp_path}")
    splits = load_splits(cfg)
    spec = model_spec(cfg, splits)
    dense = spec.build().eval()
    table = prune.latency_table(cfg, dense, spec, "run-a")
    again = prune.latency_table(cfg, dense, spec, "run-a")  # read back, not re-timed: identical to the last bit
    assert again.model_ms(dense) == table.model_ms(dense)
    other = prune.latency_table(cfg, dense, spec, "run-b")  # another run (new inputs): timed afresh
    assert other.model_ms(dense) != table.model_ms(dense)
    parts, _, _ = structured_parts(cfg, dense, input_shape(spec.in_channels, spec.input_size), None, table, None,
                                   torch.device("cpu"))
    smaller, _ = parts["step"](dense, None, 1)
    before, after = parts["measure"](dense, None), parts["measure"](smaller, None)
    assert 0 < after["latency_table_ms"] < before["latency_table_ms"]
    assert after["flops_reduction"] > 1.0


def test_structured_stage_removes_emptied_bottlenecks_and_rebuilds_them(compose_cfg) -> None:
    """``prune.structured.remove_blocks``: emptied bottlenecks leave the model, their layers report density 0,
    and the stage's architecture description rebuilds the shallower model exactly."""
    cfg = compose_cfg("model=resnet50_small", "prune=l1", "data.subset_train=128", "model.width=0.125",
                      "prune.structured.remove_blocks=true", "prune.structured.step_fraction=1.0",
                      "prune.structured.target_flops_reduction=null")
    splits = load_splits(cfg)
    spec = model_spec(cfg, splits)
    dense = spec.build().eval()
    parts, _, _ = structured_parts(cfg, dense, input_shape(spec.in_channels, spec.input_size), None, None, None,
                                   torch.device("cpu"))
    smaller, _ = parts["step"](dense, None, 1)
    assert len(skipped_blocks(smaller)) == 16  # every inner group ranked out entirely
    density = parts["density"](smaller, None)
    assert density["layer2.1.conv1"] == 0.0 and 0.0 < density["layer2.0.conv3"] < 1.0
    rebuilt = parts["rebuild"](parts["describe"](smaller))
    rebuilt.load_state_dict(smaller.state_dict())
    x = torch.randn(2, spec.in_channels, spec.input_size, spec.input_size)
    assert torch.equal(rebuilt.eval()(x), smaller.eval()(x))
