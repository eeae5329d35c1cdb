"""Self-attention whose heads can be pruned: ``nn.MultiheadAttention``'s weights, run so a head is a channel.

torch's ``nn.MultiheadAttention`` keeps its heads inside one fused input projection and applies its output
projection through the weights, never as a module: neither the tracer nor K-FAC sees a head. :class:`HeadAttention`
holds the same parameters under the same state-dict names (``in_proj_weight``, ``in_proj_bias``,
``out_proj``), computes the same function, and calls both projections as modules (``in_proj``, ``out_proj``),
so they get K-FAC factors and the input projection is a consumer of the tokens' channels. A head is a channel of a group of its own: its ``head_dim`` rows of each of the query, key and
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

torchvision's Swin (V1) window attention has the same trouble (``qkv`` and ``proj`` applied through their
weights, the head width taken from the input width): :class:`WindowHeadAttention` is the same module, same
state, computing the same windows, shifts and relative position bias, with ``qkv`` and ``proj`` called as
modules and a fixed ``head_dim``; a head also owns its column of the relative position bias table. Swin V2's
(:class:`WindowHeadAttentionV2`) computes cosine attention with a logit scale per head and its bias from a small
MLP: a head also owns its logit scale and its output row of that MLP. MaxViT's (:class:`GridHeadAttention`) is
the same idea over its windows and grids.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

from napkit.errors import NapkitError


class _Heads(nn.Module):
    """What the tracer, the cost model and the surgery ask of a prunable attention: its heads are the rows of a
    fused query/key/value projection (the layer ``input``, which reads the tokens), read back in ``head_dim``
    column blocks by the layer ``output``."""

    input: str
    output: str
    constant: tuple[str, ...] = ()  # layers inside whose FLOPs do not depend on the heads
    num_heads: int

    @property
    def weight(self) -> Tensor:
        """The producer rows, one per head: its query, key and value rows side by side."""
        return _per_head(self.get_submodule(self.input).weight, self.num_heads)

    @property
    def bias(self) -> Tensor | None:
        """Per head, every parameter besides its weight rows: its query, key and value biases, then what
        :meth:`_head_parameters` adds."""
        qkv, own = self.get_submodule(self.input).bias, self._head_parameters()
        parts = ([] if qkv is None else [_per_head(qkv, self.num_heads)]) + ([] if own is None else [own])
        return torch.cat(parts, 1) if parts else None

    def _head_parameters(self) -> Tensor | None:
        """Parameters a head owns outside the projections (``[heads, k]``), e.g. its relative position bias."""
        return None

    def keep_heads(self, keep: Tensor) -> None:
        """Keep heads ``keep`` (sorted indices): their projection rows and own parameters; ``output``'s columns are
        its consumer's."""
        projection = self.get_submodule(self.input)
        projection.weight = _head_rows(projection.weight, self.num_heads, keep)
        if projection.bias is not None:
            projection.bias = _head_rows(projection.bias, self.num_heads, keep)
        projection.out_features = projection.weight.shape[0]
        self._keep_head_parameters(keep)
        self.num_heads = len(keep)

    def _keep_head_parameters(self, keep: Tensor) -> None:
        """Keep the own parameters (:meth:`_head_parameters`) of heads ``keep``."""


class _Swapped(_Heads):
    """A torchvision attention class (``source``) run as its prunable stand-in: same module, same state."""

    source: type[nn.Module]

    @classmethod
    def from_torchvision(cls, module: nn.Module) -> _Swapped:
        """The same attention, sharing ``module``'s parameters and buffers (the old object is not to be used)."""
        if type(module) is not cls.source:
            raise NapkitError(f"{cls.__name__} holds {cls.source.__name__}, not {type(module).__name__}")
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        return new


class HeadAttention(_Heads):
    """Multi-head self-attention with ``num_heads`` heads of ``head_dim`` (sequence first unless
    ``batch_first``, as ``nn.MultiheadAttention``)."""

    output = "out_proj"  # the layer that reads the heads
    input = "in_proj"  # the layer that reads the tokens

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, bias: bool = True, dropout: float = 0.0,
                 batch_first: bool = False) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.in_proj = nn.Linear(embed_dim, 3 * num_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj.weight)
        if bias:
            nn.init.zeros_(self.in_proj.bias)
        self.register_state_dict_post_hook(_torch_names)
        self.register_load_state_dict_pre_hook(_our_names)

    @property
    def in_proj_weight(self) -> Tensor:
        """``nn.MultiheadAttention``'s name for the input projection's weight (state dicts use it too)."""
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> Tensor | None:
        return self.in_proj.bias

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
            mine[_RENAMED.get(name, name)].requires_grad_(p.requires_grad)
        return new.train(mha.training)

    @property
    def pruned(self) -> bool:
        """Whether heads were removed (torch's own attention can no longer run these weights)."""
        return self.num_heads * self.head_dim != self.embed_dim

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
        qkv = self.in_proj(x)
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


class _TableHeads(_Swapped):
    """A head also owns its column of the relative position bias table (Swin V1, MaxViT)."""

    def _head_parameters(self) -> Tensor:
        return self.relative_position_bias_table.t()

    def _keep_head_parameters(self, keep: Tensor) -> None:
        self.relative_position_bias_table = _kept(self.relative_position_bias_table, keep, 1)


class WindowHeadAttention(_TableHeads, ShiftedWindowAttention):
    """torchvision's ``ShiftedWindowAttention`` (Swin V1) with prunable heads of ``head_dim`` (module docstring)."""

    output = "proj"
    input = "qkv"  # a Linear called as a module: a consumer of the tokens' channels
    source = ShiftedWindowAttention
    head_dim: int

    @classmethod
    def from_torchvision(cls, module: nn.Module) -> WindowHeadAttention:
        """The same attention with a fixed ``head_dim`` (torchvision's takes it from the input width)."""
        new = super().from_torchvision(module)
        new.head_dim = module.proj.in_features // module.num_heads
        return new  # type: ignore[return-value]

    def _scores(self, q: Tensor, k: Tensor) -> Tensor:
        """Attention logits of every head: scaled dot products plus the relative position bias."""
        return (q * self.head_dim ** -0.5) @ k.transpose(-2, -1) + self.get_relative_position_bias()

    def _qkv(self, windows: Tensor) -> Tensor:
        return self.qkv(windows)

    def forward(self, x: Tensor) -> Tensor:
        """Attention within (shifted) windows of a ``[B, H, W, C]`` map, as torchvision's, returning ``[B, H, W, C]``."""
        batch, height, width, _ = x.shape
        wh, ww = self.window_size
        x = F.pad(x, (0, 0, 0, (ww - width % ww) % ww, 0, (wh - height % wh) % wh))
        ph, pw = x.shape[1], x.shape[2]
        shift = [0 if wh >= ph else self.shift_size[0], 0 if ww >= pw else self.shift_size[1]]
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = _windows(x, wh, ww)  # [B * nW, wh * ww, C]
        tokens = windows.shape[1]
        qkv = self._qkv(windows).view(windows.shape[0], tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = self._scores(qkv[0], qkv[1])
        if sum(shift) > 0:
            n = (ph // wh) * (pw // ww)
            scores = scores.view(batch, n, self.num_heads, tokens, tokens) + _shift_mask(ph, pw, wh, ww, shift, x)
            scores = scores.view(-1, self.num_heads, tokens, tokens)
        attention = F.dropout(scores.softmax(-1), self.attention_dropout, self.training)
        heads = (attention @ qkv[2]).transpose(1, 2).reshape(windows.shape[0], tokens, self.num_heads * self.head_dim)
        out = F.dropout(self.proj(heads), self.dropout, self.training)
        out = out.view(batch, ph // wh, pw // ww, wh, ww, -1).permute(0, 1, 3, 2, 4, 5).reshape(batch, ph, pw, -1)
        if sum(shift) > 0:
            out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
        return out[:, :height, :width, :].contiguous()


class WindowHeadAttentionV2(WindowHeadAttention, ShiftedWindowAttentionV2):
    """torchvision's ``ShiftedWindowAttentionV2`` (Swin V2: cosine attention with a logit scale per head, relative
    position bias from a small MLP) with prunable heads. A head also owns its logit scale and its output row of the
    bias MLP's last layer; the MLP's first layer is shared by all heads."""

    constant = ("cpb_mlp.0",)
    source = ShiftedWindowAttentionV2

    def _head_parameters(self) -> Tensor:
        """Its logit scale and its row of the bias MLP's last layer."""
        return torch.cat([self.logit_scale.view(self.num_heads, 1), self.cpb_mlp[2].weight], 1)

    def _keep_head_parameters(self, keep: Tensor) -> None:
        self.logit_scale = _kept(self.logit_scale, keep, 0)
        last = self.cpb_mlp[2]
        last.weight = _kept(last.weight, keep, 0)
        last.out_features = len(keep)

    def _scores(self, q: Tensor, k: Tensor) -> Tensor:
        """Cosine similarities times each head's (clamped) logit scale, plus the relative position bias."""
        scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        return F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * scale + \
            self.get_relative_position_bias()

    def _qkv(self, windows: Tensor) -> Tensor:
        """``qkv`` as a module, without its key biases: torchvision's V2 never uses them (zeroed on every call)."""
        out = self.qkv(windows)
        if self.qkv.bias is None:
            return out
        keys = torch.zeros_like(self.qkv.bias).view(3, -1)
        keys[1] = self.qkv.bias.view(3, -1)[1]
        return out - keys.view(-1)


class GridHeadAttention(_TableHeads, RelativePositionalMultiHeadAttention):
    """torchvision's MaxViT attention (``RelativePositionalMultiHeadAttention``, over ``[B, G, P, D]`` windows or
    grids) with prunable heads: ``to_qkv`` and ``merge`` are its projections, a head also owns its column of the
    relative position bias table. Its logit scale stays ``feat_dim ** -0.5`` of the dense width, as built."""

    output = "merge"
    input = "to_qkv"
    source = RelativePositionalMultiHeadAttention

    @property  # type: ignore[override]
    def num_heads(self) -> int:
        """torchvision's ``n_heads``, under the name the other attentions use."""
        return self.n_heads

    @num_heads.setter
    def num_heads(self, heads: int) -> None:
        self.n_heads = heads

    def forward(self, x: Tensor) -> Tensor:
        """As torchvision's, with the heads' width (not the input's) between the projections."""
        b, g, p, _ = x.shape
        qkv = self.to_qkv(x).view(b, g, p, 3, self.n_heads, self.head_dim).permute(3, 0, 1, 4, 2, 5)
        scores = qkv[0] @ (qkv[1] * self.scale_factor).transpose(-2, -1) + self.get_relative_positional_bias()
        heads = scores.softmax(-1) @ qkv[2]  # [B, G, H, P, DH]
        return self.merge(heads.permute(0, 1, 3, 2, 4).reshape(b, g, p, self.n_heads * self.head_dim))


def _kept(p: Tensor, keep: Tensor, dim: int) -> nn.Parameter:
    """Entries ``keep`` of parameter ``p`` along ``dim``, as a new parameter."""
    return nn.Parameter(p.detach().index_select(dim, keep.to(p.device)), requires_grad=p.requires_grad)


_RENAMED = {"in_proj_weight": "in_proj.weight", "in_proj_bias": "in_proj.bias"}  # torch's name -> ours


def _torch_names(module: nn.Module, state: dict[str, Tensor], prefix: str, local_metadata: dict) -> None:
    """State-dict hook: save the input projection under ``nn.MultiheadAttention``'s names, in its place."""
    names = {prefix + ours: prefix + theirs for theirs, ours in _RENAMED.items()}
    items = list(state.items())
    state.clear()
    state.update((names.get(key, key), value) for key, value in items)


def _our_names(module: nn.Module, state: dict[str, Tensor], prefix: str, *args: object) -> None:
    """Load-state-dict pre-hook: read ``nn.MultiheadAttention``'s names into the input projection."""
    for theirs, ours in _RENAMED.items():
        if prefix + theirs in state:
            state[prefix + ours] = state.pop(prefix + theirs)


def _per_head(t: Tensor, heads: int) -> Tensor:
    """A fused query/key/value projection's weight or bias ``[3 * heads * head_dim, ...]`` as one row per head:
    its query, key and value entries side by side."""
    return t.view(3, heads, -1).transpose(0, 1).reshape(heads, -1)


def _head_rows(t: Tensor, heads: int, keep: Tensor) -> nn.Parameter:
    """The rows of heads ``keep`` of a fused query/key/value projection's weight or bias, as a new parameter."""
    kept = t.detach().view(3, heads, -1, *t.shape[1:]).index_select(1, keep.to(t.device))
    return nn.Parameter(kept.reshape(-1, *t.shape[1:]), requires_grad=t.requires_grad)


def _windows(x: Tensor, wh: int, ww: int) -> Tensor:
    """``[B, H, W, C]`` -> ``[B * windows, wh * ww, C]``, windows in row-major order."""
    b, h, w, c = x.shape
    return x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, c)


def _shift_mask(ph: int, pw: int, wh: int, ww: int, shift: list[int], like: Tensor) -> Tensor:
    """``[1, windows, 1, N, N]``: -100 between tokens of a shifted window that came from different regions of
    the map (the cyclic shift put them side by side), else 0."""
    def bands(size: int, window: int, s: int) -> Tensor:  # 0, 1, 2: before size - window, before size - s, after
        at = torch.arange(size, device=like.device)
        return (at >= size - window).long() + (at >= size - s).long()

    region = (bands(ph, wh, shift[0])[:, None] * 3 + bands(pw, ww, shift[1])[None, :]).to(like.dtype)
    region = _windows(region[None, :, :, None], wh, ww)[..., 0]  # [windows, N]
    mask = (region[:, None, :] != region[:, :, None]).to(like.dtype) * -100.0
    return mask[None, :, None]


ATTENTIONS = (_Heads,)  # heads as channels: ``weight`` rows, ``keep_heads``, ``input``, ``output``
_TORCH_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_SWAPPED = {cls.source: cls for cls in (WindowHeadAttention, WindowHeadAttentionV2, GridHeadAttention)}


def prunable_attention(model: nn.Module) -> nn.Module:
    """Replace every plain ``nn.MultiheadAttention`` of ``model`` (no kdim/vdim, bias_kv or zero_attn; not in
    torch's own transformer layers) by the equivalent :class:`HeadAttention`, every Swin V1 / V2
    ``ShiftedWindowAttention(V2)`` by :class:`WindowHeadAttention(V2)` and every MaxViT attention by
    :class:`GridHeadAttention`, in place. Hooks on a replaced attention are
    not carried over."""
    for name, module in list(model.named_modules()):
        torch_mha = isinstance(module, nn.MultiheadAttention) and _plain(module)
        if not torch_mha and type(module) not in _SWAPPED:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not torch_mha:
            setattr(parent, child, _SWAPPED[type(module)].from_torchvision(module))
        elif not isinstance(parent, _TORCH_LAYERS):
            setattr(parent, child, HeadAttention.from_torch(module))
    return model


def attention_input_of(model: nn.Module, name: str) -> str | None:
    """The prunable attention whose input projection layer ``name`` is (Swin's ``attn.qkv``), else None."""
    owner, _, child = name.rpartition(".")
    module = model.get_submodule(owner) if owner else None
    return owner if isinstance(module, ATTENTIONS) and module.input == child else None


def _plain(mha: nn.MultiheadAttention) -> bool:
    return bool(mha._qkv_same_embed_dim) and mha.bias_k is None and not mha.add_zero_attn
