"""Per-head capture for HF causal LMs: attention rows, queries/keys/values and head writes.

Everything is captured at a few chosen positions only, never as a full [seq, seq] or
[seq, heads, d_model] tensor per layer, so it scales to long teacher-forced prompt + CoT
sequences, and it runs under SDPA / flash attention: the attention rows are recomputed from
the post-RoPE queries and keys that the model hands to its attention function, with the
layer's own mask (padding, causal, sliding window), scaling and soft-capping.

Notation (docs/equations.md): for query head h at query position q,

    A^h_q     = softmax(q^h_q . K^{g(h)} * scaling + mask_q)    # [seq], after GQA repeat
    z^h_q     = A^h_q V^{g(h)}                                   # [head_dim], input of o_proj
    Delta^h_q = z^h_q W_O^h                                      # [d_model], what head h writes

with g(h) = h // (n_heads // n_kv_heads) the key/value head shared by query head h (the
convention of transformers' `repeat_kv`). `sum_h Delta^h_q + o_proj.bias = o_proj(z_q)`.

How it hooks in: `head_capture(...)` records through an attention hook
(`attention.attention_hooks`), which runs after the original attention implementation with
unchanged arguments, so the model's output is unchanged. Head writes come from a forward
pre-hook on each captured layer's `o_proj` (its input z). Both kinds of hook fire only for the
capturing thread's forwards (`attention.forward_pre_hooks`), so documents in flight in threads
stay apart. The per-head writes z^h W_O^h (and v^h W_O^h) are formed when the forward is done, through `attention.head_out`, so they are right
when o_proj's weight is offloaded (accelerate device maps) or partitioned (DeepSpeed ZeRO-3):
read them after the forward (after `capture_heads` returns or the `head_capture` block ends).
Nothing runs under `torch.no_grad`: captured
tensors carry gradients when the forward does (distillation losses reuse this), detaching is
the caller's choice.

Example:
    out, cap = capture_heads(model, input_ids, attention_mask, query_positions=qpos,
                             key_positions=kpos)
    cap.rows[3]     # [batch, n_heads, n_query, seq]   attention rows of layer 3 at qpos
    cap.writes[3]   # [batch, n_query, n_heads, d_model]
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .attention import (
    AttentionCall,
    as_positions,
    attention_hooks,
    attention_modules,
    final_norm,
    forward_pre_hooks,
    gather_heads,
    head_counts,
    head_out,
    position_ids_from_mask,
    repeat_heads,
)

ALL_WHAT = ("rows", "qk", "values", "writes", "value_writes", "z")


@dataclass
class HeadCapture:
    """What `capture_heads` recorded. Every dict maps a layer index to a tensor.

    rows:         [batch, n_heads, n_query, seq]       A^h_q at query_positions (after softmax, GQA repeat)
    queries:      [batch, n_heads, n_query, head_dim]  post-RoPE (and post q_norm) queries at query_positions
    keys:         [batch, n_heads, n_key, head_dim]    post-RoPE keys at key_positions, repeated to query heads
    values:       [batch, n_heads, n_key, head_dim]    values at key_positions, repeated to query heads
    writes:       [batch, n_query, n_heads, d_model]   Delta^h_q = z^h_q W_O^h (o_proj bias excluded)
    value_writes: [batch, n_heads, n_key, d_model]     v^h_j W_O^h at key_positions
    z:            [batch, n_query, n_heads, head_dim]  z^h_q (o_proj input per head): Delta^h_q = z^h_q @
                  head_out_proj(attn)[h]; d_model/head_dim times smaller than writes, for big models
    query_positions: [batch, n_query]; key_positions: [batch, n_key] or None
    scaling: layer -> the softmax scaling the layer used (q.k * scaling).
    """

    query_positions: Tensor
    key_positions: Tensor | None
    n_heads: int
    n_kv_heads: int
    rows: dict[int, Tensor] = field(default_factory=dict)
    queries: dict[int, Tensor] = field(default_factory=dict)
    keys: dict[int, Tensor] = field(default_factory=dict)
    values: dict[int, Tensor] = field(default_factory=dict)
    writes: dict[int, Tensor] = field(default_factory=dict)
    value_writes: dict[int, Tensor] = field(default_factory=dict)
    z: dict[int, Tensor] = field(default_factory=dict)
    scaling: dict[int, float] = field(default_factory=dict)

    def select_queries(self, index: Sequence[int] | Tensor) -> HeadCapture:
        """The capture restricted to some of its queries (positions into the n_query axis), so one
        forward can serve several query sets (e.g. Phase-1 early queries and Phase-2 refinement
        positions); keys, values and value writes are shared."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.query_positions.device)
        return HeadCapture(
            query_positions=self.query_positions[:, idx], key_positions=self.key_positions,
            n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
            rows={k: v[:, :, idx] for k, v in self.rows.items()},
            queries={k: v[:, :, idx] for k, v in self.queries.items()},
            keys=self.keys, values=self.values,
            writes={k: v[:, idx] for k, v in self.writes.items()},
            value_writes=self.value_writes,
            z={k: v[:, idx] for k, v in self.z.items()},
            scaling=self.scaling)

    def nbytes(self) -> int:
        """Bytes held by all captured tensors."""
        total = 0
        for d in (self.rows, self.queries, self.keys, self.values, self.writes, self.value_writes, self.z):
            total += sum(t.numel() * t.element_size() for t in d.values())
        return total


def _once_per_forward(record: Callable[..., None]) -> Callable[..., None]:
    """A recording hook that activation (gradient) checkpointing can recompute.

    - Under non-reentrant checkpointing, backward re-runs a layer's forward; that recompute runs
      inside the autograd engine (a graph task is running), and is not recorded again.
    - The recording's own saved tensors bypass the checkpoint's pack hooks and are kept as they are:
      the checkpoint then saves the same tensors whether these hooks run or not. A recompute after
      the capture block has ended runs without them and matches the forward.
    """
    @functools.wraps(record)
    def guarded(*args: Any) -> None:
        if torch._C._current_graph_task_id() != -1:  # inside backward: a checkpoint's recompute
            return
        with torch.autograd.graph.saved_tensors_hooks(torch.Tensor.detach, lambda saved: saved):
            record(*args)
    return guarded


class _Recorder:
    def __init__(self, capture: HeadCapture, what: set[str], rows_dtype: torch.dtype | None):
        self.capture = capture
        self.what = what
        self.rows_dtype = rows_dtype
        self.pending_z: dict[int, tuple[nn.Module, Tensor]] = {}  # layer -> (attention module, z at queries)
        self.pending_values: dict[int, tuple[nn.Module, Tensor]] = {}  # layer -> (module, values at keys)

    @_once_per_forward
    def record_attention(self, call: AttentionCall) -> None:
        cap, layer, module = self.capture, call.layer, call.module
        query, key, value = call.query, call.key, call.value
        qpos, kpos = cap.query_positions, cap.key_positions
        n_rep = query.shape[1] // key.shape[1]
        cap.scaling[layer] = call.scaling
        if "qk" in self.what:
            cap.queries[layer] = gather_heads(query, qpos)  # [b, H, nq, d]
        if kpos is not None and ("qk" in self.what or "values" in self.what or "value_writes" in self.what):
            if "qk" in self.what:
                cap.keys[layer] = repeat_heads(gather_heads(key, kpos), n_rep)  # [b, H, nk, d]
            if "values" in self.what or "value_writes" in self.what:
                v = repeat_heads(gather_heads(value, kpos), n_rep)  # [b, H, nk, d]
                if "values" in self.what:
                    cap.values[layer] = v
                if "value_writes" in self.what:  # v^h_j W_O^h once the forward is done (`finish`)
                    self.pending_values[layer] = (module, v)
        if "rows" in self.what:
            cap.rows[layer] = call.rows(qpos).to(self.rows_dtype or query.dtype)

    @_once_per_forward
    def record_write(self, layer: int, attn_module: nn.Module, z: Tensor) -> None:
        """z: input of o_proj, [batch, seq, n_heads * head_dim]."""
        qpos = self.capture.query_positions
        b, _, hd = z.shape
        idx = qpos[:, :, None].expand(-1, -1, hd)
        z_sel = torch.gather(z, 1, idx).view(b, qpos.shape[1], -1, attn_module.head_dim)  # [b, nq, H, d]
        if "z" in self.what:
            self.capture.z[layer] = z_sel
        if "writes" in self.what:  # z^h_q W_O^h once the forward is done (`finish`)
            self.pending_z[layer] = (attn_module, z_sel)

    def finish(self) -> None:
        """Head writes of the last forward, formed after it: W_O is read (or, when offloaded or
        partitioned, brought in by calling o_proj) outside o_proj's own forward."""
        for layer, (module, z_sel) in self.pending_z.items():
            self.capture.writes[layer] = head_out(module, z_sel)  # [b, nq, H, D]
        for layer, (module, v) in self.pending_values.items():
            self.capture.value_writes[layer] = head_out(module, v.transpose(1, 2)).transpose(1, 2)  # [b, H, nk, D]
        self.pending_z, self.pending_values = {}, {}


@contextlib.contextmanager
def head_capture(model: nn.Module, query_positions: Tensor, key_positions: Tensor | None = None,
                 layers: Iterable[int] | None = None, what: Iterable[str] = ("rows", "qk", "values", "writes"),
                 rows_dtype: torch.dtype | None = torch.float32) -> Iterator[HeadCapture]:
    """Context manager: every forward of `model` inside it fills the yielded HeadCapture (writes and
    value_writes, of the last forward, when the block ends).

    query_positions: LongTensor [batch, n_query] (indices into the input sequence, padding included).
    key_positions: LongTensor [batch, n_key] or None (then no keys/values are captured).
    layers: layer indices to capture (default: all). what: subset of ALL_WHAT.
    rows_dtype: dtype of the stored rows (None: the model's dtype). Rows are computed in float32.
    Inside a pattern-patched run, rows are the ones the model's own q.k give (the natural pattern);
    z and writes are what the heads actually wrote (after patching).
    On exit the attention implementation and hooks are restored, even on error.
    """
    what = set(what)
    unknown = what - set(ALL_WHAT)
    if unknown:
        raise ValueError(f"unknown capture items {sorted(unknown)}; choose from {ALL_WHAT}")
    mods = attention_modules(model)
    layer_set = set(range(len(mods))) if layers is None else set(layers)
    if not layer_set <= set(range(len(mods))):
        raise ValueError(f"layers {sorted(layer_set)} out of range for {len(mods)} layers")
    n_heads, n_kv = head_counts(mods[0])
    capture = HeadCapture(query_positions=query_positions, key_positions=key_positions,
                          n_heads=n_heads, n_kv_heads=n_kv)
    recorder = _Recorder(capture, what, rows_dtype)
    write_hooks = []
    if "writes" in what or "z" in what:
        for i in sorted(layer_set):
            def pre_hook(mod, args, _attn=mods[i], _i=i):
                recorder.record_write(_i, _attn, args[0])
            write_hooks.append((mods[i].o_proj, pre_hook))
    with forward_pre_hooks(write_hooks), \
            attention_hooks(model, {i: recorder.record_attention for i in layer_set}):
        yield capture
    recorder.finish()  # hooks off: head_out may call o_proj


def capture_heads(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                  query_positions: Tensor | Sequence[int], key_positions: Tensor | Sequence[int] | None = None,
                  layers: Iterable[int] | None = None,
                  what: Iterable[str] = ("rows", "qk", "values", "writes"),
                  position_ids: Tensor | str | None = "auto", rows_dtype: torch.dtype | None = torch.float32,
                  **model_kwargs: Any) -> tuple[Any, HeadCapture]:
    """Run one teacher-forced forward of `model` and capture per-head quantities at chosen positions.

    input_ids: [batch, seq]; attention_mask: [batch, seq] (1 = token, 0 = padding; left or right).
    query_positions: [batch, n_query] or [n_query] (shared); key_positions likewise, or None.
    position_ids: "auto" (default) derives them from attention_mask so a left-padded row sees the
    same RoPE positions as when alone (plain arange without a mask); a tensor is passed through;
    None lets the model decide. Gradients flow unless the caller disables them.
    Returns (model outputs, HeadCapture).
    """
    b, seq = input_ids.shape
    qpos = as_positions(query_positions, b, seq, input_ids.device)
    kpos = as_positions(key_positions, b, seq, input_ids.device)
    if isinstance(position_ids, str):
        if position_ids != "auto":
            raise ValueError(f"position_ids must be 'auto', a tensor or None, got {position_ids!r}")
        position_ids = position_ids_from_mask(attention_mask) if attention_mask is not None else None
    if position_ids is not None:
        model_kwargs["position_ids"] = position_ids
    with head_capture(model, qpos, kpos, layers=layers, what=what, rows_dtype=rows_dtype) as cap:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
    return out, cap


def capture_nbytes(n_layers: int, n_heads: int, head_dim: int, d_model: int, seq: int, n_query: int,
                   n_key: int = 0, batch: int = 1, bytes_per: int = 2, rows_bytes_per: int | None = None,
                   what: Iterable[str] = ("rows", "qk", "values", "writes")) -> dict[str, int]:
    """Memory held by a HeadCapture (bytes, per item), from the shapes alone:

    rows    L * B * H * nq * S * rows_bytes      queries  L * B * H * nq * dh * bytes
    keys    L * B * H * nk * dh * bytes          values   L * B * H * nk * dh * bytes
    writes  L * B * nq * H * D * bytes           value_writes  L * B * H * nk * D * bytes
    z       L * B * nq * H * dh * bytes
    Transient per layer on top: the row logits, B * H * nq * S * 4 bytes (float32).
    """
    what = set(what)
    rb = bytes_per if rows_bytes_per is None else rows_bytes_per
    base = n_layers * batch * n_heads
    out = {
        "rows": base * n_query * seq * rb if "rows" in what else 0,
        "queries": base * n_query * head_dim * bytes_per if "qk" in what else 0,
        "keys": base * n_key * head_dim * bytes_per if "qk" in what else 0,
        "values": base * n_key * head_dim * bytes_per if "values" in what else 0,
        "writes": base * n_query * d_model * bytes_per if "writes" in what else 0,
        "value_writes": base * n_key * d_model * bytes_per if "value_writes" in what else 0,
        "z": base * n_query * head_dim * bytes_per if "z" in what else 0,
        "transient_rows_fp32": batch * n_heads * n_query * seq * 4 if "rows" in what else 0,
    }
    out["total_held"] = sum(v for k, v in out.items() if k != "transient_rows_fp32")
    return out


class final_residual:
    """Context manager recording the residual stream entering the final norm: `.h` [batch, seq, d]."""

    def __init__(self, model: nn.Module) -> None:
        self.norm, self.h = final_norm(model), None

    def __enter__(self):
        self.hooks = forward_pre_hooks([(self.norm, lambda _m, args: setattr(self, "h", args[0]))])
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)
