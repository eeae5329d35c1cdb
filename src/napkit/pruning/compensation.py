"""OBS weight compensation under K-FAC (nap.md s.2): the surviving weights absorb the removed ones.

For newly pruned weights m in a layer, ``dW_h = -G^-1 C A^-1`` with
``C_ij = m_ij w_ij / ([G^-1]_ii [A^-1]_jj)``: the exact OBS update for one weight under
``F ~ kron(G, A)``, summed over the pruned set. The bias column is updated too; the mask is
re-applied afterwards by the caller.
"""

from __future__ import annotations

import torch

from napkit.curvature import KFACFactors
from napkit.curvature.factors import weight_with_bias
from napkit.layers import PrunableLayer


@torch.no_grad()
def obs_compensate_(layer: PrunableLayer, factors: KFACFactors, newly_pruned: torch.Tensor) -> None:
    """Apply the OBS update for ``newly_pruned`` (bool, weight-shaped) in place; ``factors`` damped."""
    w_h = weight_with_bias(layer).to(factors.G.dtype)
    d_out, d_in = w_h.shape[0], layer.weight[0].numel()
    g_inv = factors.g_inverse()
    a_inv_diag = factors.a_inv_diag()
    m = torch.zeros_like(w_h)
    m[:, :d_in] = newly_pruned.reshape(d_out, d_in).to(w_h.dtype)
    c = m * w_h / (torch.diagonal(g_inv)[:, None] * a_inv_diag[None, :])
    delta = -factors.mul_a_inverse(g_inv @ c)
    layer.weight.add_(delta[:, :d_in].reshape(layer.weight.shape).to(layer.weight.dtype))
    if layer.bias is not None:
        layer.bias.add_(delta[:, d_in].to(layer.bias.dtype))
