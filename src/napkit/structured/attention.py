"""Self-attention whose heads can be pruned: ``nn.MultiheadAttention``'s weights, run so a head is a channel.

torch's ``nn.MultiheadAttention`` keeps its heads inside one fused input projection and applies its output
projection through the weights, never as a module: neither the tracer nor K-FAC sees a head. :class:`HeadAttention`
holds the same parameters under the same state-dict names (``in_proj_weight``, ``in_proj_bias``,
``out_proj``), computes the same function, and calls ``out_proj`` as a module, so the output projection gets
K-FAC factors. A head is a channel of a group of its own: its ``head_dim`` rows of each of the query, key and
value projections (the "producer rows", seen per head through :attr:`HeadAttention.weight`) and the
``head_dim`` columns of ``out_proj`` that read its output (the consumer's column block). Removing a head
removes both; the attention scale ``head_dim ** -0.5`` does not change. :func:`prunable_attention` swaps
every self-attention of a model for it, in place (torchvision's ViT; napkit's builders do it on build).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from napkit.errors import NapkitError


class HeadAttention(nn.Module):
    """Multi-head self-attention with ``num_heads`` heads of ``head_dim`` (batch first unless told)."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, bias: bool = True, dropout: float = 0.0,
                 batch_first: bool = True) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.in_proj_weight = nn.Parameter(torch.empty(3 * num_heads * head_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * num_heads * head_dim)) if bias else None
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> HeadAttention:
        """The same attention as ``mha`` (its parameters copied), or an error for a kind this cannot hold."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise NapkitError("HeadAttention holds plain self-attention only: no kdim/vdim, add_bias_kv or add_zero_attn")
        new = cls(mha.embed_dim, mha.num_heads, mha.head_dim, bias=mha.in_proj_bias is not None,
                  dropout=mha.dropout, batch_first=mha.batch_first)
        new.load_state_dict(mha.state_dict())
        return new.to(mha.in_proj_weight).train(mha.training)

    @property
    def weight(self) -> Tensor:
        """The producer rows, one per head: its query, key and value rows side by side (``[heads, 3 * head_dim * embed_dim]``)."""
        w = self.in_proj_weight.view(3, self.num_heads, self.head_dim * self.embed_dim)
        return w.transpose(0, 1).reshape(self.num_heads, -1)

    @property
    def bias(self) -> Tensor | None:
        """The input projection's biases, one row per head (``[heads, 3 * head_dim]``)."""
        if self.in_proj_bias is None:
            return None
        return self.in_proj_bias.view(3, self.num_heads, self.head_dim).transpose(0, 1).reshape(self.num_heads, -1)

    def keep_heads(self, keep: Tensor) -> None:
        """Keep heads ``keep`` (sorted indices) of the input projection; ``out_proj``'s columns are its consumer's."""
        def take(t: Tensor) -> nn.Parameter:
            rows = t.detach().view(3, self.num_heads, self.head_dim, -1).index_select(1, keep.to(t.device))
            return nn.Parameter(rows.reshape(-1, *t.shape[1:]), requires_grad=t.requires_grad)

        self.in_proj_weight = take(self.in_proj_weight)
        if self.in_proj_bias is not None:
            self.in_proj_bias = take(self.in_proj_bias)
        self.num_heads = len(keep)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, need_weights: bool = False,
                attn_mask: Tensor | None = None, key_padding_mask: Tensor | None = None) -> tuple[Tensor, None]:
        """``nn.MultiheadAttention``'s call for self-attention without masks; returns ``(output, None)``."""
        if key is not query or value is not query or need_weights or attn_mask is not None or key_padding_mask is not None:
            raise NapkitError("HeadAttention computes unmasked self-attention only (query is key is value, need_weights=False)")
        x = query if self.batch_first else query.transpose(0, 1)
        batch, tokens = x.shape[0], x.shape[1]
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = (qkv[0] * self.head_dim ** -0.5) @ qkv[1].transpose(-2, -1)
        attention = F.dropout(scores.softmax(-1), self.dropout, self.training)
        heads = (attention @ qkv[2]).transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
        out = self.out_proj(heads)
        return (out if self.batch_first else out.transpose(0, 1)), None


def prunable_attention(model: nn.Module) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` of ``model`` by the equivalent :class:`HeadAttention` (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, HeadAttention.from_torch(module))
    return model
