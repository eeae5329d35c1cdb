"""Prune a torchvision ResNet-18 with napkit's Python API (the README's example; under 2 minutes on 2 CPU cores).

    python examples/prune_your_model.py
"""

import torch
import torchvision

import napkit
from napkit.data import create_splits, make_loader

torch.manual_seed(0)
data = create_splits("digits", seed=0, input_size=32, val_fraction=0.25)  # in scikit-learn's wheel: no download
model = torchvision.models.resnet18(num_classes=10)
model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # grey input

# stands in for your own training: any trained classifier works
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
for epoch in range(2):
    for x, y in make_loader(data.train, batch_size=64, shuffle=True, seed=0, epoch=epoch):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

result = napkit.prune(model, data.train, data.val, method="nap", mode="structured", target=2.0,
                      overrides=["prune.finetune_epochs=0.5"])
print(result.stop_reason, {k: round(result.measures[k], 2) for k in ("val_top1", "flops_reduction", "params_reduction")})
print(result.model.layer1[0].conv1)  # physically smaller layers, per-layer widths chosen by one global ranking
