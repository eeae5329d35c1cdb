"""OBS compensation under K-FAC (nap.md s.2, issue #20): the surviving weights absorb the removed ones.

For one layer with weight matrix ``W_h`` (bias as last column) and curvature ``F ~ kron(G, A)`` the
update ``D`` minimises the quadratic model ``0.5 vec(D)^T F vec(D)`` subject to ``D_c = -W_c`` for every
removed coordinate c: the newly pruned weights AND the previously pruned ones, which are zero and must
stay zero (they are not free variables). The bias column is always free. Methods:

- ``exact``: that constrained minimiser. It is solved in the smaller of two spaces: the constraint set C
  (``lambda = ((F^-1)_CC)^-1 t``, ``(F^-1)_{(i,j),(k,l)} = [G^-1]_ik [A^-1]_jl``, ``D = F^-1 E lambda``)
  or the free set U (``D_U = -(F_UU)^-1 F_UC t``). Not row-separable when G is not diagonal. Cost
  O(k^3) with ``k = min(|C|, |U|) <= (weights of the layer) / 2``; above ``max_exact`` the layer falls back
  to ``rowwise`` (logged, and reported in :class:`Compensation.method`).
- ``rowwise``: Optimal Brain Compression / SparseGPT: G treated as diagonal, so every output row is
  solved on its own with A restricted to that row's surviving inputs (batched over rows).
- ``none``: plain zeroing.

A block-diagonal A (one block per channel, :mod:`napkit.curvature.factors`) decouples the column
blocks, so each block is solved on its own; the bias block carries no constraint and gets no update.
The update is solved with damped factors (damping regularises the solve); the returned ``predicted``
increase is the UNDAMPED K-FAC quadratic model at the applied update, ``0.5 tr(D^T G D A)``. (With
zero damping and ``exact`` this is the joint OBS loss ``0.5 t^T ((F^-1)_CC)^-1 t``.) Evaluating it on
damped factors would charge every removed weight on a dead input (``A_jj = 0``, true cost 0) the damping.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from napkit.curvature import KFACFactors
from napkit.curvature.factors import weight_with_bias
from napkit.errors import NapkitError, unknown_choice
from napkit.layers import PrunableLayer

COMPENSATIONS = ("none", "rowwise", "exact")
MAX_EXACT = 4096  # largest system the exact method factors (4096^2 float64 = 128 MiB, ~10 s on one CPU core)
_CHUNK_ELEMENTS = 2**24  # float64 elements per batched row-wise chunk (128 MiB)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Compensation:
    """Outcome for one layer: the quadratic-model loss increase of the update and the method applied."""

    predicted: float
    method: str


def check_compensation(method: str, key: str = "prune.compensation") -> str:
    """``method`` if it is a known compensation, else a NapkitError naming the valid ones."""
    if method not in COMPENSATIONS:
        raise unknown_choice(key, method, COMPENSATIONS)
    return method


def _spd_solve(m: Tensor, rhs: Tensor) -> Tensor:
    """``m^-1 rhs`` for a (batch of) symmetric positive definite ``m`` (Cholesky)."""
    chol, info = torch.linalg.cholesky_ex(m)
    if bool((info != 0).any()):
        raise NapkitError("the OBS system is not positive definite; damp the factors (prune.damping > 0)")
    return torch.cholesky_solve(rhs, chol)


def _spd_inverse(m: Tensor) -> Tensor:
    chol, info = torch.linalg.cholesky_ex(m)
    if bool((info != 0).any()):
        raise NapkitError("a K-FAC factor is not positive definite; damp the factors (prune.damping > 0)")
    return torch.cholesky_inverse(chol)


def _column_blocks(f: KFACFactors) -> list[tuple[Tensor, Tensor]]:
    """(columns of ``W_h``, dense A over them) for every block of A that can carry a constraint."""
    if f.A is not None:
        return [(torch.arange(f.d_in_h, device=f.A.device), f.A)]
    assert f.A_blocks is not None
    n, b = f.A_blocks.shape[0], f.A_blocks.shape[1]
    cols = torch.arange(n * b, device=f.A_blocks.device).reshape(n, b)
    return [(cols[c], f.A_blocks[c]) for c in range(n)]


def exact_update(w: Tensor, removed: Tensor, g: Tensor, a: Tensor) -> Tensor:
    """Minimiser of ``0.5 vec(D)^T kron(g, a) vec(D)`` s.t. ``D[removed] = -w[removed]`` (dense, any mask)."""
    r, c = torch.nonzero(removed, as_tuple=True)
    t = -w[r, c]
    ru, cu = torch.nonzero(~removed, as_tuple=True)
    if len(t) <= len(ru):  # constraint space
        g_inv, a_inv = _spd_inverse(g), _spd_inverse(a)
        lam = _spd_solve(g_inv[r][:, r] * a_inv[c][:, c], t[:, None])[:, 0]
        d = g_inv[:, r] @ (lam[:, None] * a_inv[c, :])
    else:  # free space
        d = torch.zeros_like(w)
        d[r, c] = t
        rhs = -(g @ d @ a)[ru, cu]
        d[ru, cu] = _spd_solve(g[ru][:, ru] * a[cu][:, cu], rhs[:, None])[:, 0]
    d[r, c] = t  # exact zeros where the constraints hold only up to rounding
    return d


def _padded_indices(mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per row, the first ``k`` column indices where ``mask`` holds (padded with 0) and their validity."""
    idx = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :k]
    valid = torch.arange(k, device=mask.device)[None, :] < mask.sum(1, keepdim=True)
    return idx, valid


def _padded_system(m: Tensor, idx: Tensor, valid: Tensor) -> Tensor:
    """``m[idx_r][:, idx_r]`` per row r, with identity on the padding (decoupled, zero right-hand side)."""
    sub = m[idx[:, :, None], idx[:, None, :]]
    both = valid[:, :, None] & valid[:, None, :]
    eye = torch.eye(idx.shape[1], dtype=m.dtype, device=m.device).expand_as(sub)
    return torch.where(both, sub, eye)


def rowwise_update(w: Tensor, removed: Tensor, a: Tensor) -> Tensor:
    """Row by row: minimiser of ``0.5 d_i^T a d_i`` s.t. ``d_i[removed_i] = -w_i[removed_i]`` (OBC/SparseGPT).

    Each chunk of rows is solved as one batch, in the constraint space or in the free space,
    whichever is smaller for that chunk.
    """
    d = torch.where(removed, -w, torch.zeros((), dtype=w.dtype, device=w.device))
    if not bool(removed.any()):
        return d
    n_removed = removed.sum(1)
    order = torch.argsort(n_removed, stable=True)  # similar rows share a chunk: little padding
    counts, n_cols = n_removed[order].tolist(), w.shape[1]
    a_inv: Tensor | None = None
    start = 0
    while start < len(counts):
        end = start + 1  # grow the chunk while its padded systems fit the budget
        while end < len(counts) and (end + 1 - start) * min(counts[end], n_cols - counts[start]) ** 2 \
                <= _CHUNK_ELEMENTS:
            end += 1
        rows, kc, ku = order[start:end], counts[end - 1], n_cols - counts[start]
        start = end
        if kc == 0:
            continue
        dr, rr = d[rows], removed[rows]
        if kc <= ku:  # constraint space: d_i = lambda^T A^-1[C_i, :]
            a_inv = _spd_inverse(a) if a_inv is None else a_inv
            idx, valid = _padded_indices(rr, kc)
            t = dr.gather(1, idx) * valid
            lam = _spd_solve(_padded_system(a_inv, idx, valid), t[:, :, None])[:, :, 0]
            lam_rows = torch.zeros_like(dr).scatter_add_(1, idx, lam * valid)  # lambda_i on C_i, 0 elsewhere
            d[rows] = torch.where(rr, dr, lam_rows @ a_inv)
        elif ku > 0:  # free space: d_i[U_i] = -(A_UU)^-1 (A d_i^C)[U_i]
            idx, valid = _padded_indices(~rr, ku)
            rhs = -(dr @ a).gather(1, idx) * valid
            u = _spd_solve(_padded_system(a, idx, valid), rhs[:, :, None])[:, :, 0]
            d[rows] = dr.scatter_add(1, idx, u * valid)
    return d


def obs_update(w_h: Tensor, removed: Tensor, f: KFACFactors, method: str,
               max_exact: int = MAX_EXACT) -> tuple[Tensor, str]:
    """The update ``D`` of ``W_h`` for removing ``removed`` (bool, shaped like ``W_h``) and the method used.

    ``f`` must be damped; work in float64. ``exact`` falls back to ``rowwise`` on a column block whose
    system would exceed ``max_exact`` unknowns.
    """
    check_compensation(method, "compensation")
    if removed.shape != w_h.shape:
        raise NapkitError(f"removed mask has shape {tuple(removed.shape)}, the weight {tuple(w_h.shape)}")
    if method == "none":
        return torch.where(removed, -w_h, torch.zeros_like(w_h)), method
    d = torch.zeros_like(w_h)
    used = method
    for cols, a in _column_blocks(f):
        wb, rb = w_h[:, cols], removed[:, cols]
        if not bool(rb.any()):
            continue
        k = min(int(rb.sum()), int((~rb).sum()))
        if method == "exact" and k <= max_exact:
            d[:, cols] = exact_update(wb, rb, f.G, a)
        else:
            if method == "exact":
                used = "rowwise"
            d[:, cols] = rowwise_update(wb, rb, a)
    if used != method:
        log.warning("exact OBS needs a system above max_exact=%d unknowns; a layer fell back to rowwise",
                    max_exact)
    return d, used


def quadratic_increase(d: Tensor, f: KFACFactors) -> float:
    """``0.5 vec(D)^T kron(G, A) vec(D) = 0.5 tr(D^T G D A)``: the quadratic model's loss increase."""
    return 0.5 * float((d * (f.G @ f.mul_a(d))).sum())


@torch.no_grad()
def obs_compensate_(layer: PrunableLayer, factors: KFACFactors, newly_pruned: Tensor, *,
                    kept: Tensor | None = None, method: str = "exact", damping: float = 0.0,
                    max_exact: int = MAX_EXACT) -> Compensation:
    """Zero ``newly_pruned`` (bool, weight-shaped) and update the surviving weights and bias in place.

    ``kept`` is the keep-mask before this step (None: every weight survives); weights outside it stay
    zero. The update solves with ``factors.damped(damping)`` (0: ``factors`` as given, which must then
    be damped already); ``predicted`` is the quadratic model on ``factors`` as given. Float64
    factors recommended. The mask is re-applied by the caller.
    """
    solve = factors.damped(damping) if damping > 0 else factors
    w_h = weight_with_bias(layer).to(factors.G.dtype)
    d_out, d_in = w_h.shape[0], layer.weight[0].numel()
    gone = newly_pruned if kept is None else newly_pruned | ~kept
    removed = torch.zeros(w_h.shape, dtype=torch.bool, device=w_h.device)
    removed[:, :d_in] = gone.reshape(d_out, d_in)
    delta, used = obs_update(w_h, removed, solve, method, max_exact)
    layer.weight.add_(delta[:, :d_in].reshape(layer.weight.shape).to(layer.weight.dtype))
    if layer.bias is not None:
        layer.bias.add_(delta[:, d_in].to(layer.bias.dtype))
    return Compensation(quadratic_increase(delta, factors), used)


@torch.no_grad()
def column_removal_update(w_h: Tensor, removed_cols: Tensor, f: KFACFactors,
                          compensate: bool = True) -> Tensor:
    """Update of ``W_h`` for removing whole input columns ``removed_cols`` (bool ``[d_in_h]``).

    With ``compensate`` this is the exact OBS update (structured pruning's consumer compensation):
    for whole columns the constraint is ``I (x) E_S`` and G cancels, ``D = -W_S ((A^-1)_SS)^-1 (A^-1)_S:``,
    the least-squares refit of the layer's output on its kept inputs (ThiNet, OBC). Without it: zeroing.
    """
    d = torch.zeros_like(w_h)
    d[:, removed_cols] = -w_h[:, removed_cols]
    if not compensate:
        return d
    for cols, a in _column_blocks(f):
        rc = removed_cols[cols]
        n_removed = int(rc.sum())
        if n_removed == 0 or n_removed == len(cols):
            continue
        s, u = cols[rc], cols[~rc]
        t = d[:, s]
        if n_removed <= len(u):  # constraint space, all rows at once
            a_inv = _spd_inverse(a)
            lam = _spd_solve(a_inv[rc][:, rc], t.T).T
            d[:, u] = lam @ a_inv[rc][:, ~rc]
        else:  # free space
            rhs = -(t @ a[rc][:, ~rc])
            d[:, u] = _spd_solve(a[~rc][:, ~rc], rhs.T).T
    return d
