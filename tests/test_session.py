"""What the pruning session adds to the loop (grid, fractional fine-tunes) and the Python API on top of it."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import napkit
from napkit.data import create_splits
from napkit.errors import NapkitError
from napkit.models import create_model
from napkit.training.trainer import fit


@pytest.fixture(scope="module")
def digits():
    return create_splits("digits", seed=0, input_size=28, val_fraction=0.25, subset_train=600)


def _opt(lr: float = 0.1):
    return OmegaConf.create({"epochs": 1, "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": lr},
                             "scheduler": {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR",
                                           "_partial_": True}})


class _Counting(nn.Module):
    """Counts the training batches it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
        self.batches = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches += int(self.training)
        return self.net(x)


@pytest.mark.parametrize("epochs", [0.25, 1.5])
def test_fractional_epochs_train_that_share_of_batches_and_decay_the_lr_per_batch(digits, tmp_path, epochs) -> None:
    model = _Counting()
    per_epoch = math.ceil(len(digits.train) / 32)
    history = fit(model, digits.train, digits.val, cfg=_opt(), epochs=epochs, batch_size=32, eval_batch_size=256,
                  seed=0, device=torch.device("cpu"), checkpoint=tmp_path / "c.pt", progress=False)
    total = round(epochs * per_epoch)
    assert model.batches == total and len(history) == math.ceil(epochs)
    # a per-batch cosine over `total` batches: the last batch trains at 0.1 * (1 + cos(pi (total-1)/total)) / 2
    last_lr = torch.load(tmp_path / "c.pt", weights_only=True)["scheduler"]["_last_lr"][0]
    assert last_lr == pytest.approx(0.05 * (1 + math.cos(math.pi * (total - 1) / total)))


def test_api_prunes_along_a_grid_without_the_stop_rule(digits) -> None:
    """napkit.prune with prune.grid: every step lands on the next grid point, even where a step of
    step_fraction 0.9 would overshoot it; the stop rule off keeps the last point."""
    model = create_model("lenet5", num_classes=10, in_channels=1, input_size=28)
    result = napkit.prune(model, digits.train, digits.val, method="magnitude", device="cpu",
                          overrides=["prune.grid=[2,3,4,8]", "prune.step_fraction=0.9",
                                     "prune.stop_on_tolerance=false", "prune.finetune_epochs=0.1"])
    # 4x is not exact in whole weights (3.9999x): the next step must still move on to 8x
    assert [round(h["compression"], 3) for h in result.history] == [1.0, 2.0, 3.0, 4.0, 8.0]
    assert result.stop_reason == "target" and result.kept_iteration == 4
    assert all("val_top1_pre_ft" in h and "measured_loss_increase" in h for h in result.history[1:])
    kept = sum(int(m.sum()) for m in result.masks.masks.values())
    total = sum(m.numel() for m in result.masks.masks.values())
    assert total / kept == pytest.approx(8.0, rel=1e-3)
    for name, mask in result.masks.masks.items():  # the masks are applied to the returned model
        weight = dict(result.model.named_modules())[name].weight
        assert torch.equal(weight[~mask.bool()], torch.zeros_like(weight[~mask.bool()]))
    assert set(result.layer_density) == set(result.masks.masks)


def test_api_structured_nap_returns_a_physically_smaller_model(digits) -> None:
    model = create_model("vgg16_small", num_classes=10, in_channels=1, input_size=28, width=0.125)
    dense_params = sum(p.numel() for p in model.parameters())
    result = napkit.prune(model, digits.train, digits.val, method="nap", mode="structured", target=2.0,
                          device="cpu", overrides=["prune.finetune_epochs=0.1", "curvature.num_samples=128",
                                                   "prune.stop_on_tolerance=false"])
    assert result.measures["flops_reduction"] >= 2.0 * (1 - 1e-9)
    assert sum(p.numel() for p in result.model.parameters()) < dense_params
    assert result.masks is None and 0 < min(result.layer_density.values()) < 1
    assert result.model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_api_refuses_a_bad_mode_in_one_line(digits) -> None:
    with pytest.raises(NapkitError, match="mode='channels': valid choices: fine_grained, structured"):
        napkit.prune(nn.Linear(2, 2), digits.train, digits.val, mode="channels")
