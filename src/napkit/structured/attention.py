"""Self-attention whose heads can be pruned: ``nn.MultiheadAttention``'s weights, run so a head is a channel.

torch's ``nn.MultiheadAttention`` keeps its heads inside one fused input projection and applies its output
projection through the weights, never as a module: neither the tracer nor K-FAC sees a head. :class:`HeadAttention`
holds the same parameters under the same state-dict names (``in_proj_weight``, ``in_proj_bias``,
``out_proj``), computes the same function, and calls ``out_proj`` as a module, so the output projection gets
K-FAC factors. A head is a channel of a group of its own: its ``head_dim`` rows of each of the query, key and
value projections (the "producer rows", seen per head through :attr:`HeadAttention.weight`) and the
``head_dim`` columns of ``out_proj`` that read its output (the consumer's column block). Removing a head
removes both; the attention scale ``head_dim ** -0.5`` does not change. The attention maps are explicit
matmuls, not ``F.scaled_dot_product_attention``: torch's FLOP counter counts no CPU SDPA, and the cost model
must see the FLOPs a head saves.

Any other call (masks, ``need_weights=True``, cross-attention, ``is_causal``) runs torch's own
``F.multi_head_attention_forward`` on the same weights, as long as no head was removed; the tracer leaves such an
attention's heads unpruned. :func:`prunable_attention` swaps the attentions of a model in place (torchvision's ViT;
napkit's builders do it on build), except inside torch's ``nn.Transformer*Layer``, whose fast path reads
``nn.MultiheadAttention``'s internals.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from napkit.errors import NapkitError


class HeadAttention(nn.Module):
    """Multi-head self-attention with ``num_heads`` heads of ``head_dim`` (sequence first unless
    ``batch_first``, as ``nn.MultiheadAttention``)."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, bias: bool = True, dropout: float = 0.0,
                 batch_first: bool = False) -> None:
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
                  dropout=mha.dropout, batch_first=mha.batch_first).to(mha.in_proj_weight)
        new.load_state_dict(mha.state_dict())  # copied in the source's dtype: bit for bit
        mine = dict(new.named_parameters())
        for name, p in mha.named_parameters():
            mine[name].requires_grad_(p.requires_grad)
        return new.train(mha.training)

    @property
    def pruned(self) -> bool:
        """Whether heads were removed (torch's own attention can no longer run these weights)."""
        return self.num_heads * self.head_dim != self.embed_dim

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

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """``nn.MultiheadAttention``'s call: unmasked self-attention without weights per head (the prunable
        form), anything else through torch's own function."""
        plain = key is query and value is query and key_padding_mask is None and attn_mask is None
        if not plain or need_weights or is_causal:
            return self._torch(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                               is_causal)
        x = query if self.batch_first else query.transpose(0, 1)
        batch, tokens = x.shape[0], x.shape[1]
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = (qkv[0] * self.head_dim ** -0.5) @ qkv[1].transpose(-2, -1)
        attention = F.dropout(scores.softmax(-1), self.dropout, self.training)
        heads = (attention @ qkv[2]).transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
        out = self.out_proj(heads)
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _torch(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None, need_weights: bool,
               attn_mask: Tensor | None, average_attn_weights: bool, is_causal: bool) -> tuple[Tensor, Tensor | None]:
        """``F.multi_head_attention_forward`` on these weights (only while every head is there)."""
        if self.pruned:
            raise NapkitError(f"this attention lost heads ({self.num_heads} of {self.embed_dim // self.head_dim} "
                              f"left): it runs unmasked self-attention with need_weights=False only")
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias, None, None,
            False, self.dropout, self.out_proj.weight, self.out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        return (out.transpose(0, 1) if self.batch_first else out), weights


_TORCH_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def prunable_attention(model: nn.Module) -> nn.Module:
    """Replace every plain ``nn.MultiheadAttention`` of ``model`` (no kdim/vdim, bias_kv or zero_attn; not in
    torch's own transformer layers) by the equivalent :class:`HeadAttention`, in place. Hooks on a replaced
    attention are not carried over."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.MultiheadAttention) or not _plain(module):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not isinstance(parent, _TORCH_LAYERS):
            setattr(parent, child, HeadAttention.from_torch(module))
    return model


def _plain(mha: nn.MultiheadAttention) -> bool:
    return bool(mha._qkv_same_embed_dim) and mha.bias_k is None and not mha.add_zero_attn
