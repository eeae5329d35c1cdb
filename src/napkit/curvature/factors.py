"""K-FAC factors of one layer and the linear algebra the pruning scores need (nap.md sections 1-3).

Convention (one scale for every layer, so scores compare across layers): the layer's Fisher
block over ``vec(W_h)`` is ``F ~ kron(G, A)``, where ``W_h`` is the ``d_out x d_in_h`` weight
matrix with the bias as its last column (conv weight viewed as ``C_out x (c, kh, kw)``) and
``vec`` flattens row-major, so entry ``(i, j)`` of ``W_h`` is coordinate ``i * d_in_h + j``.

Representation of A: either dense (``A`` is ``[d_in_h, d_in_h]``, the homogeneous coordinate
last) or block-diagonal (``A`` is None, ``A_blocks`` is ``[n_blocks, b, b]`` covering the
``d_in = n_blocks * b`` weight columns in order, and ``A_bias`` is the 0-d tensor for the bias
coordinate, a trailing 1x1 block; cross terms between blocks and with the bias are dropped).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from napkit.errors import NapkitError
from napkit.layers import PrunableLayer

Columns = slice | Tensor | Sequence[int]


def weight_with_bias(layer: PrunableLayer) -> Tensor:
    """The layer's ``d_out x d_in_h`` weight matrix ``W_h``: weight flattened (c, kh, kw), bias as last column."""
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    if layer.bias is None:
        return w
    return torch.cat([w, layer.bias.detach().unsqueeze(1)], dim=1)


def _cholesky_inverse(m: Tensor, what: str) -> Tensor:
    """Inverse of a (batch of) symmetric positive definite matrices via Cholesky.

    Only a failed factorisation is detected: an undamped, numerically singular factor may still
    factor and give a meaningless, huge inverse, so always damp first (the spec makes it mandatory).
    """
    chol, info = torch.linalg.cholesky_ex(m)
    if bool((info != 0).any()):
        raise NapkitError(f"{what} is not positive definite; damp the factors first (KFACFactors.damped(l) with l > 0)")
    return torch.cholesky_inverse(chol)


@dataclass
class KFACFactors:
    """K-FAC factors of one layer: ``F ~ kron(G, A)`` over ``vec(W_h)`` (see module docstring).

    ``num_samples`` is the number of examples N, ``positions`` the output positions per
    example T (1 for a Linear layer on 2-D inputs), ``has_bias`` whether A has the trailing
    homogeneous coordinate.
    """

    A: Tensor | None
    G: Tensor
    num_samples: int
    has_bias: bool
    positions: int
    A_blocks: Tensor | None = None
    A_bias: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.A is None) == (self.A_blocks is None):
            raise NapkitError("KFACFactors needs exactly one of A (dense) and A_blocks (block-diagonal)")
        if self.A_blocks is not None and (self.A_bias is not None) != self.has_bias:
            raise NapkitError("block-diagonal KFACFactors needs A_bias exactly when has_bias is true")

    @property
    def is_block_diagonal(self) -> bool:
        """True when A is stored as per-channel blocks (``A_blocks``, ``A_bias``)."""
        return self.A_blocks is not None

    @property
    def d_out(self) -> int:
        """Rows of ``W_h``."""
        return self.G.shape[0]

    @property
    def d_in_h(self) -> int:
        """Columns of ``W_h``: weight columns plus one if the layer has a bias."""
        if self.A is not None:
            return self.A.shape[0]
        assert self.A_blocks is not None
        return self.A_blocks.shape[0] * self.A_blocks.shape[1] + int(self.has_bias)

    @property
    def d_in(self) -> int:
        """Weight columns (without the bias column)."""
        return self.d_in_h - int(self.has_bias)

    def to(self, dtype: torch.dtype) -> KFACFactors:
        """Copy with every factor cast to ``dtype`` (scores invert in float64 whatever was accumulated)."""
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return replace(self, A=cast(self.A), G=self.G.to(dtype), A_blocks=cast(self.A_blocks),
                       A_bias=cast(self.A_bias))

    # --- damping ---------------------------------------------------------------------------

    def a_mean_eig(self) -> Tensor:
        """Mean eigenvalue of A, ``tr(A) / d_in_h``."""
        if self.A is not None:
            return torch.diagonal(self.A).sum() / self.d_in_h
        assert self.A_blocks is not None
        trace = torch.diagonal(self.A_blocks, dim1=-2, dim2=-1).sum()
        if self.A_bias is not None:
            trace = trace + self.A_bias
        return trace / self.d_in_h

    def g_mean_eig(self) -> Tensor:
        """Mean eigenvalue of G, ``tr(G) / d_out``."""
        return torch.diagonal(self.G).sum() / self.d_out

    def damped(self, l: float) -> KFACFactors:
        """Factored Tikhonov (pi-)damping with strength ``l`` relative to the mean eigenvalue of kron(G, A).

        ``lambda = l * mean_eig(A) * mean_eig(G)``, ``pi = mean_eig(A) / mean_eig(G)``;
        returns ``A + sqrt(lambda * pi) I`` and ``G + sqrt(lambda / pi) I``, which equals
        ``A + sqrt(l) mean_eig(A) I`` and ``G + sqrt(l) mean_eig(G) I``.
        """
        if l < 0:
            raise NapkitError(f"damping must be >= 0, got {l}")
        mean_a, mean_g = self.a_mean_eig(), self.g_mean_eig()
        for name, mean in (("A", mean_a), ("G", mean_g)):
            if not bool(torch.isfinite(mean)) or float(mean) < 0:
                raise NapkitError(f"cannot damp relative to the mean eigenvalue: factor {name} has trace {float(mean)}")
        # A zero factor (e.g. no gradient reaches a layer behind dead ReLUs) carries no curvature:
        # damp it by the smallest normal number so it stays invertible and its scores go to ~0.
        tiny = torch.finfo(self.G.dtype).tiny
        mean_a, mean_g = mean_a.clamp(min=tiny), mean_g.clamp(min=tiny)
        # sqrt(lambda * pi) = sqrt(l) * mean_a and sqrt(lambda / pi) = sqrt(l) * mean_g, computed in
        # this form so tiny traces cannot underflow lambda
        root = l**0.5
        return self._shifted(root * mean_a, root * mean_g)

    def _shifted(self, shift_a: Tensor, shift_g: Tensor) -> KFACFactors:
        """Copy with ``A + shift_a I`` and ``G + shift_g I``."""
        eye_g = torch.eye(self.d_out, dtype=self.G.dtype, device=self.G.device)
        g = self.G + shift_g * eye_g
        if self.A is not None:
            eye_a = torch.eye(self.d_in_h, dtype=self.A.dtype, device=self.A.device)
            return replace(self, A=self.A + shift_a * eye_a, G=g)
        assert self.A_blocks is not None
        eye_b = torch.eye(self.A_blocks.shape[1], dtype=self.A_blocks.dtype, device=self.A_blocks.device)
        bias = None if self.A_bias is None else self.A_bias + shift_a
        return replace(self, A_blocks=self.A_blocks + shift_a * eye_b, A_bias=bias, G=g)

    # --- inverses --------------------------------------------------------------------------

    def g_inverse(self) -> Tensor:
        """Dense ``G^-1`` (Cholesky; damp first)."""
        return _cholesky_inverse(self.G, "G")

    def g_inv_diag(self) -> Tensor:
        """``diag(G^-1)``, shape ``[d_out]``."""
        return torch.diagonal(self.g_inverse())

    def a_inverse(self) -> Tensor:
        """``A^-1``: dense ``[d_in_h, d_in_h]``, or for block-diagonal A the inverted blocks ``[n_blocks, b, b]``.

        In the block-diagonal case the bias coordinate's inverse is ``1 / A_bias``
        (the last entry of :meth:`a_inv_diag`).
        """
        if self.A is not None:
            return _cholesky_inverse(self.A, "A")
        assert self.A_blocks is not None
        return _cholesky_inverse(self.A_blocks, "A block")

    def a_inv_diag(self) -> Tensor:
        """``diag(A^-1)``, shape ``[d_in_h]`` (blockwise for block-diagonal A)."""
        inv = self.a_inverse()
        if self.A is not None:
            return torch.diagonal(inv)
        diag = torch.diagonal(inv, dim1=-2, dim2=-1).reshape(-1)
        if self.A_bias is None:
            return diag
        return torch.cat([diag, (1.0 / self._positive_bias()).reshape(1)])

    def _positive_bias(self) -> Tensor:
        assert self.A_bias is not None
        if float(self.A_bias) <= 0:
            raise NapkitError("A_bias is not positive; the bias coordinate of A must be > 0")
        return self.A_bias

    # --- products with A and A^-1 (both representations) ----------------------------------

    def mul_a(self, x: Tensor) -> Tensor:
        """``x @ A`` for ``x`` of shape ``[..., d_in_h]`` (e.g. ``W_h @ A``)."""
        if self.A is not None:
            return x @ self.A
        assert self.A_blocks is not None
        return self._blockwise(x, self.A_blocks, lambda v: v * self.A_bias)

    def mul_a_inverse(self, x: Tensor) -> Tensor:
        """``x @ A^-1`` for ``x`` of shape ``[..., d_in_h]`` (OBS compensation, structured scores)."""
        inv = self.a_inverse()
        if self.A is not None:
            return x @ inv
        return self._blockwise(x, inv, lambda v: v / self._positive_bias())

    def _blockwise(self, x: Tensor, blocks: Tensor, on_bias: Callable[[Tensor], Tensor]) -> Tensor:
        """``x @ block_diag(blocks, bias)`` without forming the dense matrix."""
        n, b = blocks.shape[0], blocks.shape[1]
        cols = x[..., : n * b].reshape(*x.shape[:-1], n, b)
        out = torch.einsum("...nb,nbc->...nc", cols, blocks).reshape(*x.shape[:-1], n * b)
        if not self.has_bias:
            return out
        return torch.cat([out, on_bias(x[..., n * b :])], dim=-1)

    # --- dense views -----------------------------------------------------------------------

    def a_block(self, cols: Columns) -> Tensor:
        """Dense sub-matrix ``A[cols][:, cols]``; indices are homogeneous columns (bias = ``d_in``)."""
        idx = torch.arange(self.d_in_h)[cols] if isinstance(cols, slice) else torch.as_tensor(cols, dtype=torch.long)
        if self.A is not None:
            idx = idx.to(self.A.device)
            return self.A[idx][:, idx]
        assert self.A_blocks is not None
        return self._block_diagonal_entries(idx.to(self.A_blocks.device))

    def _block_diagonal_entries(self, idx: Tensor) -> Tensor:
        """Entries ``A[idx][:, idx]`` of the block-diagonal A (zero across blocks)."""
        assert self.A_blocks is not None
        b = self.A_blocks.shape[1]
        is_w = idx < self.d_in
        blk, off = torch.where(is_w, idx // b, -1), torch.where(is_w, idx % b, 0)
        vals = self.A_blocks[blk.clamp(min=0)[:, None], off[:, None], off[None, :]]
        same = (blk[:, None] == blk[None, :]) & is_w[:, None]
        out = torch.where(same, vals, torch.zeros((), dtype=vals.dtype, device=vals.device))
        if self.A_bias is not None:
            is_bias = ~is_w
            out = torch.where(is_bias[:, None] & is_bias[None, :], self.A_bias, out)
        return out

    def a_dense(self) -> Tensor:
        """The full dense A (assembled from the blocks if block-diagonal)."""
        if self.A is not None:
            return self.A
        return self.a_block(slice(None))

    def kron_dense(self) -> Tensor:
        """Dense ``kron(G, A)`` over row-major ``vec(W_h)``; for tests on tiny layers only."""
        return torch.kron(self.G, self.a_dense())
