"""Building blocks shared by every decoder layer: RMSNorm, rotary embeddings, attention, KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in fp32 and cast back (as Llama/Mixtral do)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Low precision: normalize in fp32, round, then scale, exactly as HF Llama/Mixtral.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class RotaryEmbedding:
    """Rotate-half (NeoX-style), full-width rotary position embedding.

    Keeps a cos/sin table (fp32 math, then cast) that grows on demand; it is not a module
    parameter or buffer, so it never appears in checkpoints and survives meta-device init.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        self.head_dim = head_dim
        self.theta = theta
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def _build(self, length: int, device: torch.device) -> None:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64,
                                                       device=device).float() / self.head_dim))
        positions = torch.arange(length, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        # The sin table carries rotate-half's sign: rotate_half(x) * sin == roll(x) * signed_sin.
        self._cos = torch.cat((freqs, freqs), dim=-1).cos()
        self._sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)

    def cos_sin(self, start: int, length: int, device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for positions ``start .. start+length-1``, [length, head_dim]."""
        end = start + length
        if self._cos is None or self._cos.shape[0] < end or self._cos.device != device:
            self._build(max(end, 2 * (self._cos.shape[0] if self._cos is not None else 0), 256),
                        device)
        return self._cos[start:end].to(dtype), self._sin[start:end].to(dtype)


    def cos_sin_at(self, positions_BT: torch.Tensor,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin at per-row positions [B, T], shaped [B, 1, T, head_dim] (for
        sequences of a batch that sit at different positions)."""
        end = int(positions_BT.max()) + 1
        self.cos_sin(0, end, positions_BT.device, dtype)  # grow the tables if needed
        return (self._cos[positions_BT].to(dtype).unsqueeze(1),
                self._sin[positions_BT].to(dtype).unsqueeze(1))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of ``x`` [B, heads, T, D] with tables [T, D] from
    ``RotaryEmbedding.cos_sin``: ``x * cos + rotate_half(x) * sin`` in two fused-friendly ops."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class KVCache:
    """Preallocated key/value cache for all layers: [B, kv_heads, max_len, head_dim] each.

    All sequences of a batch share one write position (``length``); the engine of a later
    issue adds per-sequence slots on top of this.
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, start: int, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, kv_heads, T, D] at ``start`` and return the cache up to ``start + T``."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class SlotKVCache:
    """KV cache of ``slots`` independent sequences, each at its own length (for continuous
    batching: sequences join and leave between steps).

    A forward runs on some of the slots: ``begin(slots, t)`` names them (one per batch row,
    each row adding ``t`` tokens at its slot's current length); layers then ``update`` and read
    their keys through a per-row causal ``mask``, and ``finish`` advances the lengths.
    ``release(slot)`` frees a slot for a new sequence.
    """

    def __init__(self, num_layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (slots, max_len, kv_heads, head_dim)  # position-major: one scatter per update
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.max_len = max_len
        self._rows: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None

    def begin(self, slots: torch.Tensor, t: int) -> torch.Tensor:
        """Start a forward of ``t`` tokens for each slot in ``slots`` [B]; returns the
        positions [B, t] the tokens take."""
        positions = self.lengths[slots][:, None] + torch.arange(t, device=slots.device)
        if int(positions.max()) >= self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions per sequence; asked to "
                             f"write position {int(positions.max())}")
        self._rows, self._positions = slots, positions
        return positions

    def update(self, layer: int, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, kv_heads, t, D] of the current rows; return each row's keys and values
        up to the longest row, [B, kv_heads, L, D] (positions past a row's end are masked)."""
        rows, pos = self._rows, self._positions
        self.keys[layer][rows[:, None], pos] = k.transpose(1, 2)
        self.values[layer][rows[:, None], pos] = v.transpose(1, 2)
        end = int(pos.max()) + 1
        return (self.keys[layer][rows, :end].transpose(1, 2),
                self.values[layer][rows, :end].transpose(1, 2))

    def current(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of the forward in progress: (cache slots [B], positions [B, t])."""
        if self._rows is None:
            raise RuntimeError("no SlotKVCache forward in progress (call begin first)")
        return self._rows, self._positions

    def mask(self, window: int | None = None) -> torch.Tensor:
        """[B, 1, t, L] boolean: a query sees the keys at or before its own position (and
        within the last ``window`` positions)."""
        pos = self._positions
        keys = torch.arange(int(pos.max()) + 1, device=pos.device)
        visible = keys[None, None, :] <= pos[:, :, None]
        if window is not None:
            visible &= keys[None, None, :] > pos[:, :, None] - window
        return visible[:, None]

    def finish(self) -> None:
        self.lengths[self._rows] = self._positions[:, -1] + 1
        self._rows = self._positions = None

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0

    def truncate(self, slot: int, length: int) -> None:
        """Keep the first ``length`` positions of ``slot`` (after a right-padded forward: the
        padding's keys are overwritten by the positions that follow)."""
        self.lengths[slot] = length


def _single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Decode attention (one query per sequence, no mask) as two batched matmuls.

    CPU's flash-attention kernel is 2-4x slower than this for a single query over many keys.
    The query heads of a GQA group ride along as rows, so K/V are never repeated.
    """
    b, heads, _, d = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    # Cache slices [B, kv, :L, D] fold to [B*kv, L, D] as views (no copy).
    k3, v3 = k.reshape(b * kv_heads, length, d), v.reshape(b * kv_heads, length, d)
    scores = torch.bmm(q.reshape(b * kv_heads, heads // kv_heads, d), k3.transpose(1, 2))
    probs = torch.softmax(scores * d**-0.5, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.bmm(probs, v3).view(b, heads, 1, d)


def packed_causal_mask(position_ids_BT: torch.Tensor, window: int | None = None
                       ) -> torch.Tensor:
    """[B, 1, T, T] boolean attention mask of packed rows: a new sequence starts wherever the
    position restarts at 0, and a query sees only the keys of its own sequence at or before
    it (within the last ``window`` positions), so packed sequences do not see each other."""
    b, t = position_ids_BT.shape
    seq_BT = (position_ids_BT == 0).cumsum(dim=1)
    same = seq_BT[:, :, None] == seq_BT[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids_BT.device).tril()
    visible = same & causal
    if window is not None:
        pos = position_ids_BT
        visible &= pos[:, None, :] > pos[:, :, None] - window
    return visible[:, None]


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention through ``scaled_dot_product_attention``."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int,
                 layer_idx: int, sliding_window: int | None = None) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.layer_idx, self.sliding_window = layer_idx, sliding_window
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)

    def forward(self, x_BTH: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | SlotKVCache | None = None, start: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` [B, 1, T, T] (boolean, True = visible) replaces the causal mask when given
        (packed rows: ``packed_causal_mask``); it is for forwards without a cache."""
        b, t, _ = x_BTH.shape
        q = self.q_proj(x_BTH).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BTH).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BTH).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                 enable_gqa=self.kv_heads != self.heads)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
        if isinstance(cache, SlotKVCache):  # rows at different positions: an explicit mask
            k, v = cache.update(self.layer_idx, k, v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask(self.sliding_window),
                                                 enable_gqa=self.kv_heads != self.heads)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
        if cache is not None:
            k, v = cache.update(self.layer_idx, start, k, v)
        mask, causal = self._mask(start, t, k.shape[2], x_BTH.device)
        if t == 1 and mask is None and q.device.type == "cpu" and b * k.shape[2] >= 256:
            out = _single_query_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                 enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))

    def _mask(self, start: int, t: int, kv_len: int,
              device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """(boolean mask, is_causal) for queries at ``start..start+t-1`` over the last
        ``kv_len`` positions; SDPA's own causal flag covers the plain prefill case."""
        end = start + t
        windowed = self.sliding_window is not None and end > self.sliding_window
        if not windowed:
            if kv_len == t:
                return None, t > 1
            if t == 1:
                return None, False
        q_pos = torch.arange(start, end, device=device)[:, None]
        k_pos = torch.arange(end - kv_len, end, device=device)[None, :]
        mask = k_pos <= q_pos
        if windowed:
            mask &= k_pos > q_pos - self.sliding_window  # HF: keys within the last `window`
        return mask, False
