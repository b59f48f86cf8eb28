"""Per-head capture for HF causal LMs: attention rows, queries/keys/values and head writes.

Everything is captured at a few chosen positions only, never as a full [seq, seq] or
[seq, heads, d_model] tensor per layer, so it scales to long teacher-forced prompt + CoT
sequences, and it runs under SDPA / flash attention: the attention rows are recomputed from
the post-RoPE queries and keys that the model hands to its attention function, with the
layer's own mask (padding, causal, sliding window), scaling and soft-capping.

Notation (DESIGN.md, "Formulas"): for query head h at query position q,

    A^h_q     = softmax(q^h_q . K^{g(h)} * scaling + mask_q)    # [seq], after GQA repeat
    z^h_q     = A^h_q V^{g(h)}                                   # [head_dim], input of o_proj
    Delta^h_q = z^h_q W_O^h                                      # [d_model], what head h writes

with g(h) = h // (n_heads // n_kv_heads) the key/value head shared by query head h (the
convention of transformers' `repeat_kv`). `sum_h Delta^h_q + o_proj.bias = o_proj(z_q)`.

How it hooks in: for the duration of `head_capture(...)` the model's attention implementation
is switched to a registered wrapper (`mechdistill_<base>`, e.g. `mechdistill_sdpa`) that
records what is asked for and then calls the original implementation (`sdpa`, `eager`,
`flash_attention_2`, ...) with unchanged arguments, so the model's output is unchanged; the
wrapper uses the original implementation's mask function too. Head writes come from a forward
pre-hook on each captured layer's `o_proj`. Nothing runs under `torch.no_grad`: captured
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
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

ALL_WHAT = ("rows", "qk", "values", "writes", "value_writes", "z")
_PREFIX = "mechdistill_"


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


# ---------------------------------------------------------------------------------------------
# Model introspection


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a decoder-only HF model, in layer order (index = layer).

    Any module with `o_proj`, `q_proj` and `layer_idx` counts (LLaMA, Qwen2/3, Gemma3, Mistral, ...).
    """
    mods = [m for m in model.modules()
            if hasattr(m, "o_proj") and hasattr(m, "q_proj") and hasattr(m, "layer_idx")]
    if not mods:
        raise ValueError(f"{type(model).__name__}: no attention modules with q_proj/o_proj/layer_idx found.")
    return mods


def head_out_proj(attn_module: nn.Module) -> Tensor:
    """W_O split per query head: [n_heads, head_dim, d_model], so Delta^h = z^h @ W_O[h]."""
    weight = attn_module.o_proj.weight  # [d_model, n_heads * head_dim]
    head_dim = attn_module.head_dim
    d_model = weight.shape[0]
    return weight.view(d_model, -1, head_dim).permute(1, 2, 0)  # [n_heads, head_dim, d_model]


def _n_heads(attn_module: nn.Module) -> tuple[int, int]:
    n_heads = attn_module.o_proj.weight.shape[1] // attn_module.head_dim
    return n_heads, n_heads // attn_module.num_key_value_groups


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that start at 0 on each row's first real token (left padding safe). [batch, seq]"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _as_positions(pos: Tensor | Sequence[int] | Sequence[Sequence[int]] | None, batch: int, seq: int,
                  device: torch.device) -> Tensor | None:
    """Normalise positions to a LongTensor [batch, n] (a 1-D list/tensor is shared by all rows)."""
    if pos is None:
        return None
    pos = torch.as_tensor(pos, dtype=torch.long, device=device)
    if pos.ndim == 1:
        pos = pos.unsqueeze(0).expand(batch, -1)
    if pos.ndim != 2 or pos.shape[0] != batch:
        raise ValueError(f"positions must be [n] or [batch={batch}, n], got shape {tuple(pos.shape)}")
    if pos.numel() and (pos.min() < 0 or pos.max() >= seq):
        raise ValueError(f"positions must lie in [0, {seq}); got min {pos.min().item()}, max {pos.max().item()}")
    return pos


def _gather_heads(x: Tensor, pos: Tensor) -> Tensor:
    """x [batch, heads, seq, d], pos [batch, n] -> [batch, heads, n, d]."""
    idx = pos[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1])
    return torch.gather(x, 2, idx)


def _repeat_heads(x: Tensor, n_rep: int) -> Tensor:
    """[batch, n_kv, n, d] -> [batch, n_kv * n_rep, n, d], query head h uses kv head h // n_rep."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


# ---------------------------------------------------------------------------------------------
# Recomputing attention rows


def _row_mask(attention_mask: Tensor | None, qpos: Tensor, q_len: int, kv_len: int,
              sliding_window: int | None, dtype: torch.dtype) -> Tensor:
    """Additive mask for the chosen query rows: [batch or 1, 1, n_query, kv_len] (0 or dtype min).

    Accepts every mask form transformers hands to attention functions: None (causal, possibly
    sliding), 4D bool (sdpa: True = attend), 4D float (eager: additive), 2D padding (flash).
    """
    neg = torch.finfo(dtype).min
    if attention_mask is not None and attention_mask.ndim == 4:
        m = attention_mask[:, :1]  # [b|1, 1, q_len, kv_len]
        b = max(m.shape[0], qpos.shape[0])
        idx = qpos[:, None, :, None].expand(b, 1, -1, m.shape[-1])
        m = torch.gather(m.expand(b, -1, -1, -1), 2, idx)  # [b, 1, nq, kv_len]
        m = m[..., :kv_len]
        if m.dtype == torch.bool:
            return torch.zeros((), dtype=dtype, device=m.device).masked_fill(~m, neg).expand(m.shape)
        return m.to(dtype).clamp(min=neg)
    # Build causal (+ sliding window) from indices; queries sit at the end of the kv sequence.
    q_abs = qpos + (kv_len - q_len)  # [b, nq]
    k_idx = torch.arange(kv_len, device=qpos.device)
    allowed = k_idx[None, None, :] <= q_abs[..., None]  # [b, nq, kv]
    if sliding_window is not None:
        allowed = allowed & (q_abs[..., None] - k_idx[None, None, :] < sliding_window)
    if attention_mask is not None:  # 2D padding mask [b, kv_len]
        allowed = allowed & attention_mask[:, None, -kv_len:].bool()
    out = torch.zeros(allowed.shape, dtype=dtype, device=qpos.device).masked_fill(~allowed, neg)
    return out[:, None]  # [b, 1, nq, kv]


def attention_rows(query_sel: Tensor, key: Tensor, mask_rows: Tensor, scaling: float,
                   softcap: float | None = None) -> Tensor:
    """Softmax attention rows for a few queries, GQA without materialising repeated keys.

    query_sel: [batch, n_heads, n_query, head_dim]; key: [batch, n_kv, kv_len, head_dim];
    mask_rows: additive, broadcastable to [batch, 1, n_query, kv_len].
    Returns [batch, n_heads, n_query, kv_len] in float32.
    """
    b, n_heads, nq, d = query_sel.shape
    n_kv = key.shape[1]
    g = n_heads // n_kv
    q = query_sel.reshape(b, n_kv, g * nq, d).float()  # heads kv*g + i share kv head `kv`
    logits = torch.matmul(q, key.float().transpose(-1, -2)) * scaling  # [b, n_kv, g*nq, kv]
    logits = logits.view(b, n_heads, nq, -1)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits + mask_rows.float()
    return torch.softmax(logits, dim=-1)


# ---------------------------------------------------------------------------------------------
# Attention hooks: the wrapper, recording and pattern patching


@dataclass
class AttentionCall:
    """One call of a layer's attention function, as an attention hook sees it.

    query: [batch, n_heads, q_len, head_dim] (post-RoPE); key, value: [batch, n_kv, kv_len, head_dim]
    (the whole cache: queries sit at the end of the kv sequence); output: [batch, q_len, n_heads,
    head_dim], the attention output before o_proj (z). scaling: q.k multiplier of the softmax.
    """

    layer: int
    module: nn.Module
    query: Tensor
    key: Tensor
    value: Tensor
    attention_mask: Tensor | None
    scaling: float
    kwargs: dict
    output: Tensor

    def rows(self, qpos: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Softmax rows A^h_q at query indices `qpos` [batch, n] of this call -> [batch, n_heads, n, kv_len]
        (recomputed in float32 with the layer's own mask, sliding window and soft-capping)."""
        window = self.kwargs.get("sliding_window", getattr(self.module, "sliding_window", None))
        mask_rows = _row_mask(self.attention_mask, qpos, self.query.shape[2], self.key.shape[2], window,
                              torch.float32)
        rows = attention_rows(_gather_heads(self.query, qpos), self.key, mask_rows, self.scaling,
                              self.kwargs.get("softcap", None))
        return rows.to(dtype)

    def last_rows(self) -> Tensor:
        """Rows of the call's last query (the one that predicts the next token): [batch, n_heads, kv_len]."""
        b, q_len = self.query.shape[0], self.query.shape[2]
        qpos = torch.full((b, 1), q_len - 1, dtype=torch.long, device=self.query.device)
        return self.rows(qpos)[:, :, 0]


AttentionHook = Callable[[AttentionCall], "Tensor | None"]
"""Called after the original attention function; may return a replacement for `call.output`."""

_HOOKS_ATTR = "_mechdistill_hooks"


def _delegate(base_impl: str, module: nn.Module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base_impl == "eager":  # model-specific eager (Gemma adds soft-capping etc.)
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            from transformers.models.llama.modeling_llama import eager_attention_forward as fn
        return fn
    return ALL_ATTENTION_FUNCTIONS[base_impl]


def _make_attention_fn(base_impl: str):
    def mechdistill_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                              attention_mask: Tensor | None, *args: Any, **kwargs: Any):
        result = _delegate(base_impl, module)(module, query, key, value, attention_mask, *args, **kwargs)
        hooks = getattr(module, _HOOKS_ATTR, None)
        if not hooks:
            return result
        scaling = kwargs.get("scaling", args[1] if len(args) > 1 else None)
        scaling = module.head_dim ** -0.5 if scaling is None else float(scaling)
        call = AttentionCall(module.layer_idx, module, query, key, value, attention_mask, scaling, kwargs, result[0])
        for hook in list(hooks):
            replaced = hook(call)
            if replaced is not None:
                call.output = replaced
        return (call.output, *result[1:])

    mechdistill_attention.__name__ = f"mechdistill_attention_{base_impl}"
    return mechdistill_attention


def _ensure_registered(base_impl: str) -> str:
    """Register `mechdistill_<base>` with transformers' attention and mask interfaces; return the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = _PREFIX + base_impl
    if name not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(name, _make_attention_fn(base_impl))
    mask_map = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    if name not in mask_map and base_impl in mask_map:
        AttentionMaskInterface.register(name, mask_map[base_impl])
    return name


def _set_impl(model: nn.Module, impl: str) -> None:
    """Set the attention implementation on the model and every sub-config, without re-validation."""
    seen: set[int] = set()
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal") and id(cfg) not in seen:
            seen.add(id(cfg))
            cfg._attn_implementation_internal = impl


@contextlib.contextmanager
def attention_hooks(model: nn.Module, hooks: dict[int, AttentionHook | Sequence[AttentionHook]]) -> Iterator[None]:
    """Context manager: run `hooks[layer]` after every attention call of that layer.

    The attention implementation is switched to the registered `mechdistill_<base>` wrapper for
    the duration (only by the outermost context: contexts nest, e.g. a head capture inside a
    patched run) and restored on exit, hooks removed, even on error.
    """
    mods = attention_modules(model)
    base_impl = model.config._attn_implementation
    if base_impl is None:
        raise RuntimeError("attention_hooks: the model has no attention implementation set")
    outermost = not base_impl.startswith(_PREFIX)
    added: list[tuple[nn.Module, AttentionHook]] = []
    try:
        for layer, layer_hooks in hooks.items():
            if not 0 <= layer < len(mods):
                raise ValueError(f"layer {layer} out of range for {len(mods)} layers")
            for hook in [layer_hooks] if callable(layer_hooks) else layer_hooks:
                mods[layer].__dict__.setdefault(_HOOKS_ATTR, []).append(hook)
                added.append((mods[layer], hook))
        if outermost:
            _set_impl(model, _ensure_registered(base_impl))
        yield
    finally:
        if outermost:
            _set_impl(model, base_impl)
        for module, hook in added:
            module.__dict__[_HOOKS_ATTR].remove(hook)
            if not module.__dict__[_HOOKS_ATTR]:
                del module.__dict__[_HOOKS_ATTR]


class _Recorder:
    def __init__(self, capture: HeadCapture, what: set[str], rows_dtype: torch.dtype | None):
        self.capture = capture
        self.what = what
        self.rows_dtype = rows_dtype

    def record_attention(self, call: AttentionCall) -> None:
        cap, layer, module = self.capture, call.layer, call.module
        query, key, value = call.query, call.key, call.value
        qpos, kpos = cap.query_positions, cap.key_positions
        n_rep = query.shape[1] // key.shape[1]
        cap.scaling[layer] = call.scaling
        if "qk" in self.what:
            cap.queries[layer] = _gather_heads(query, qpos)  # [b, H, nq, d]
        if kpos is not None and ("qk" in self.what or "values" in self.what or "value_writes" in self.what):
            if "qk" in self.what:
                cap.keys[layer] = _repeat_heads(_gather_heads(key, kpos), n_rep)  # [b, H, nk, d]
            if "values" in self.what or "value_writes" in self.what:
                v = _repeat_heads(_gather_heads(value, kpos), n_rep)  # [b, H, nk, d]
                if "values" in self.what:
                    cap.values[layer] = v
                if "value_writes" in self.what:
                    w_o = head_out_proj(module).to(v.dtype)  # [H, d, D]
                    cap.value_writes[layer] = torch.einsum("bhkd,hdm->bhkm", v, w_o)
        if "rows" in self.what:
            cap.rows[layer] = call.rows(qpos).to(self.rows_dtype or query.dtype)

    def record_write(self, layer: int, attn_module: nn.Module, z: Tensor) -> None:
        """z: input of o_proj, [batch, seq, n_heads * head_dim]."""
        qpos = self.capture.query_positions
        b, _, hd = z.shape
        idx = qpos[:, :, None].expand(-1, -1, hd)
        z_sel = torch.gather(z, 1, idx).view(b, qpos.shape[1], -1, attn_module.head_dim)  # [b, nq, H, d]
        if "z" in self.what:
            self.capture.z[layer] = z_sel
        if "writes" not in self.what:
            return
        w_o = head_out_proj(attn_module).to(z.dtype)  # [H, d, D]
        self.capture.writes[layer] = torch.einsum("bqhd,hdm->bqhm", z_sel, w_o)  # [b, nq, H, D]


@contextlib.contextmanager
def head_capture(model: nn.Module, query_positions: Tensor, key_positions: Tensor | None = None,
                 layers: Iterable[int] | None = None, what: Iterable[str] = ("rows", "qk", "values", "writes"),
                 rows_dtype: torch.dtype | None = torch.float32) -> Iterator[HeadCapture]:
    """Context manager: every forward of `model` inside it fills the yielded HeadCapture.

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
    n_heads, n_kv = _n_heads(mods[0])
    capture = HeadCapture(query_positions=query_positions, key_positions=key_positions,
                          n_heads=n_heads, n_kv_heads=n_kv)
    recorder = _Recorder(capture, what, rows_dtype)
    handles = []
    try:
        if "writes" in what or "z" in what:
            for i in sorted(layer_set):
                def pre_hook(mod, args, _attn=mods[i], _i=i):
                    recorder.record_write(_i, _attn, args[0])
                handles.append(mods[i].o_proj.register_forward_pre_hook(pre_hook))
        with attention_hooks(model, {i: recorder.record_attention for i in layer_set}):
            yield capture
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# Step-by-step pattern recording and patching (activation patching, Figs 5 and 8)


class PatternTape:
    """Attention rows of chosen heads at the last query of every forward call, step by step.

    In cached greedy generation the first call (prefill) predicts generated token 1 from the last
    prompt position and call t predicts token t+1, so `rows[layer][t]` is the pattern that produced
    token t+1: [batch, n_heads, kv_len] (float32; heads not in `heads[layer]` are zero). kv_len grows
    by one per step. Use `hooks()` with `attention_hooks`.
    """

    def __init__(self, heads: dict[int, Sequence[int]]):
        self.heads = {int(layer): sorted(int(h) for h in hs) for layer, hs in heads.items() if len(hs)}
        self.rows: dict[int, list[Tensor]] = {layer: [] for layer in self.heads}

    def record(self, call: AttentionCall) -> None:
        rows = call.last_rows()  # [b, H, kv]
        keep = torch.zeros(rows.shape[1], dtype=torch.bool, device=rows.device)
        keep[self.heads[call.layer]] = True
        self.rows[call.layer].append(torch.where(keep[None, :, None], rows, 0.0).detach())

    def hooks(self) -> dict[int, AttentionHook]:
        return {layer: self.record for layer in self.heads}

    @property
    def n_steps(self) -> int:
        return min((len(r) for r in self.rows.values()), default=0)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for steps in self.rows.values() for t in steps)


class PatternPatch:
    """Replace the attention pattern of chosen heads by a recorded one, at the last query of each call.

    For batch row b and head h with `head_mask[layer][b, h]` True, step t:
        z^h = A_src^h(t) V^{g(h)}       # A_src from `source` (its row 0), V: this run's values
    replaces the head's attention output; every other head is computed normally. The source's key
    length at step t must equal this run's (same prompt length, same number of steps), which is
    why corrupted prompts are token-aligned with the clean ones. Steps are counted per layer from
    the first call; `source` must hold every patched head.
    """

    def __init__(self, source: PatternTape, head_mask: dict[int, Tensor]):
        for layer, mask in head_mask.items():
            recorded = set(source.heads.get(layer, []))
            wanted = set(torch.nonzero(mask.any(0)).flatten().tolist())
            if not wanted <= recorded:
                raise ValueError(f"layer {layer}: heads {sorted(wanted - recorded)} are not in the source tape")
        self.source = source
        self.head_mask = {layer: m for layer, m in head_mask.items() if bool(m.any())}  # [batch, H] bool
        self.step = dict.fromkeys(self.head_mask, 0)

    def patch(self, call: AttentionCall) -> Tensor:
        layer = call.layer
        t = self.step[layer]
        if t >= len(self.source.rows[layer]):
            raise RuntimeError(f"layer {layer}: patched run is longer than the source ({t} steps recorded)")
        self.step[layer] = t + 1
        src = self.source.rows[layer][t][:1]  # [1, H, kv]
        if src.shape[-1] != call.key.shape[2]:
            raise RuntimeError(f"layer {layer}, step {t}: source key length {src.shape[-1]} != run's "
                               f"{call.key.shape[2]} (prompts not token-aligned?)")
        n_rep = call.query.shape[1] // call.key.shape[1]
        value = _repeat_heads(call.value, n_rep).float()  # [b, H, kv, d]
        z = torch.einsum("xhk,bhkd->bhd", src.to(value.device), value)  # [b, H, d]
        out = call.output.clone()  # [b, q, H, d]
        mask = self.head_mask[layer].to(out.device)[:, :, None]  # [b, H, 1]
        out[:, -1] = torch.where(mask, z.to(out.dtype), out[:, -1])
        return out

    def hooks(self) -> dict[int, AttentionHook]:
        return {layer: self.patch for layer in self.head_mask}


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
    qpos = _as_positions(query_positions, b, seq, input_ids.device)
    kpos = _as_positions(key_positions, b, seq, input_ids.device)
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
