"""Spec step (b): keep a layer's filters by column subset selection with leverage scores.

``X = W.reshape(C_out, -1).T`` (columns = filters); thin SVD ``X = U S V^T``; with ``k`` filters to
keep, filter j's leverage score is ``||V_k[j, :]||^2`` (rows of the top-k right singular vectors);
the k largest are kept (deterministic, ties by lower L1 rank). When ``C_in*kh*kw < C_out`` the SVD
has fewer than C_out directions and the filter L1 norms decide instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from napkit.errors import NapkitError


def filter_matrix(weight: Tensor) -> Tensor:
    """``X``: one column per output filter, float64."""
    return weight.detach().reshape(weight.shape[0], -1).T.double().cpu()


def leverage_scores(x: Tensor, k: int) -> Tensor:
    """Rank-k leverage score of every column of ``x``."""
    _, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return (vh[:k] ** 2).sum(dim=0)


def l1_keep(weight: Tensor, k: int) -> Tensor:
    """Indices (sorted) of the k filters with the largest L1 norm."""
    l1 = weight.detach().reshape(weight.shape[0], -1).abs().sum(1).double().cpu()
    return torch.sort(torch.argsort(l1, descending=True, stable=True)[:k]).values


def css_keep(weight: Tensor, k: int, active: Tensor | None = None) -> Tensor:
    """Sorted indices of the ``k`` filters to keep (leverage scores, or L1 when ``d < C_out``).

    ``active`` (bool per filter) restricts the choice to live filters; pruned ones are zero and
    carry no leverage anyway. ``k`` beyond the live filters is filled by L1 among the rest.
    """
    c_out = weight.shape[0]
    if not 0 <= k <= c_out:
        raise NapkitError(f"cannot keep {k} of {c_out} filters")
    x = filter_matrix(weight)
    if x.shape[0] < c_out:  # C_in*kh*kw < C_out: fall back to L1
        return l1_keep(weight, k)
    live = torch.arange(c_out) if active is None else torch.nonzero(active.cpu()).flatten()
    if k > live.numel():
        rest = torch.ones(c_out, dtype=torch.bool)
        rest[live] = False
        l1 = x.abs().sum(0)
        extra = torch.nonzero(rest).flatten()
        extra = extra[torch.argsort(l1[extra], descending=True, stable=True)][: k - live.numel()]
        return torch.sort(torch.cat([live, extra])).values
    lev = leverage_scores(x[:, live], k)
    # ties (e.g. degenerate spectra) broken by L1 norm, then position
    l1 = x[:, live].abs().sum(0)
    order = sorted(range(live.numel()), key=lambda j: (-round(float(lev[j]), 12), -float(l1[j]), j))
    return torch.sort(live[torch.tensor(order[:k], dtype=torch.long)]).values
