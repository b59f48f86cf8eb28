"""Attention introspection and hooks for HF decoder-only models.

- `attention_modules(model)`: the self-attention module of every layer; `head_out_proj`: W_O per head;
  `final_norm(model)`, `unembed(model)`: the norm before the unembedding and the unembedding (lm_head).
- `attention_hooks(model, {layer: hook})`: for the duration of the context, the model's attention
  implementation is switched to a registered wrapper (`mechdistill_<base>`, e.g. `mechdistill_sdpa`)
  that calls the original implementation (`sdpa`, `eager`, `flash_attention_2`, ...) with unchanged
  arguments, then hands every hook an `AttentionCall` (post-RoPE queries, keys, values, mask and
  output). A hook may record (characterize.capture, patching.patterns.PatternTape) or return a
  replacement output (patching.patterns.PatternPatch). Contexts nest, and hooks are per thread: those
  registered by one thread fire only for its own forward calls, so several documents may run at once on
  one model in threads (`inflight.in_flight`). `forward_pre_hooks` does the same for module pre-hooks.
- `AttentionCall.rows(qpos)`: softmax rows at a few queries, recomputed in float32 from the
  queries and keys with the layer's own mask (padding, causal, sliding window), scaling and
  soft-capping, so they exist under SDPA / flash attention too:

    A^h_q = softmax(q^h_q . K^{g(h)} * scaling + mask_q)    # [seq], after GQA repeat

with g(h) = h // (n_heads // n_kv_heads) the key/value head shared by query head h (the
convention of transformers' `repeat_kv`).
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager_attention

Head = tuple[int, int]  # (layer, head index within the layer)

_PREFIX = "mechdistill_"


# ---------------------------------------------------------------------------------------------
# Model introspection


def unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside a training wrapper (a DeepSpeed engine, DDP): its `.module`."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a decoder-only HF model, in layer order (index = layer).

    Any module with `o_proj`, `q_proj` and `layer_idx` counts (LLaMA, Qwen2/3, Gemma3, Mistral, ...).
    """
    mods = [m for m in model.modules()
            if hasattr(m, "o_proj") and hasattr(m, "q_proj") and hasattr(m, "layer_idx")]
    if not mods:
        raise ValueError(f"{type(model).__name__}: no attention modules with q_proj/o_proj/layer_idx found.")
    return mods


# Where the final norm sits, by HF layout: LLaMA / Qwen / Mistral / Gemma (`model.norm`), Phi / Persimmon
# (`model.final_layernorm`), GPT-2 / GPT-J / Falcon (`transformer.ln_f`), GPT-NeoX (`gpt_neox.final_layer_norm`).
_FINAL_NORM_PATHS = ("model.norm", "model.final_layernorm", "transformer.ln_f", "gpt_neox.final_layer_norm")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the residual stream just before the unembedding (`model.model.norm` in LLaMA-like
    models; the other HF layouts in `_FINAL_NORM_PATHS`). A training wrapper is looked through (`unwrap`)."""
    model = unwrap(model)
    for path in _FINAL_NORM_PATHS:
        module: Any = model
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"{type(model).__name__}: no final norm found at any of {', '.join(_FINAL_NORM_PATHS)}.")


def unembed(model: nn.Module) -> nn.Module:
    """The unembedding (`lm_head`: d_model -> vocab), as HF's `get_output_embeddings()` names it. A training
    wrapper is looked through (`unwrap`)."""
    model = unwrap(model)
    get = getattr(model, "get_output_embeddings", None)
    module = get() if get is not None else None
    if not isinstance(module, nn.Module):
        raise ValueError(f"{type(model).__name__}: no output embeddings (lm_head); is it a causal LM?")
    return module


def head_out_proj(attn_module: nn.Module) -> Tensor:
    """W_O split per query head: [n_heads, head_dim, d_model], so Delta^h = z^h @ W_O[h]."""
    weight = attn_module.o_proj.weight  # [d_model, n_heads * head_dim]
    head_dim = attn_module.head_dim
    d_model = weight.shape[0]
    return weight.view(d_model, -1, head_dim).permute(1, 2, 0)  # [n_heads, head_dim, d_model]


def weight_is_local(weight: Tensor) -> bool:
    """Whether a parameter's values are here: not on the meta device (accelerate disk/CPU offload keeps
    offloaded weights there between forwards) and not partitioned away (DeepSpeed ZeRO-3 leaves an
    empty tensor and the real shape in `ds_shape` outside the module's forward)."""
    full = getattr(weight, "ds_shape", weight.shape)
    return weight.device.type != "meta" and weight.numel() == math.prod(full)


@contextlib.contextmanager
def local_values(weight: Tensor) -> Iterator[Tensor]:
    """The values of a parameter, for reading outside its module's forward: the parameter itself when
    local; under DeepSpeed ZeRO-3 its gathered values (detached: a partitioned parameter takes no
    gradient this way), valid inside the block only."""
    if weight_is_local(weight):
        yield weight
    elif hasattr(weight, "ds_id"):
        import deepspeed  # only present when the parameter was partitioned by it

        with deepspeed.zero.GatheredParameters([weight]):
            yield weight.detach()
    else:
        raise ValueError("a parameter read outside its module sits on the meta device (offloaded by a "
                         "device map); keep lm_head and the embeddings on a device in device_map")


def head_out(attn_module: nn.Module, x: Tensor) -> Tensor:
    """x^h W_O^h for every head h: x [..., n_heads, head_dim] -> [..., n_heads, d_model] (no bias).

    Reads W_O directly when its values are local; otherwise (offloaded by accelerate, partitioned by
    ZeRO-3) it calls the `o_proj` module on a block-diagonal input, so the module's own hooks bring the
    weight in and gradients reach it exactly: row h of the input holds x^h in head h's slot and zeros
    elsewhere, and o_proj(0) (the bias) is subtracted.
    """
    o_proj = attn_module.o_proj
    if weight_is_local(o_proj.weight):
        return torch.einsum("...hd,hdm->...hm", x, head_out_proj(attn_module).to(x))
    n_heads, head_dim = x.shape[-2:]
    eye = torch.eye(n_heads, dtype=x.dtype, device=x.device)[:, :, None]  # [H, H, 1]
    blocks = (x[..., None, :, :] * eye).flatten(-2)  # [..., H, H * head_dim]: head h's slot only
    out = o_proj(blocks)  # [..., H, d_model]
    if o_proj.bias is not None:
        out = out - o_proj(torch.zeros_like(blocks[..., :1, :]))
    return out


def head_counts(attn_module: nn.Module) -> tuple[int, int]:
    weight = attn_module.o_proj.weight
    n_heads = getattr(weight, "ds_shape", weight.shape)[1] // attn_module.head_dim  # ZeRO-3: the real shape
    return n_heads, n_heads // attn_module.num_key_value_groups


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that start at 0 on each row's first real token (left padding safe). [batch, seq]"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def as_positions(pos: Tensor | Sequence[int] | Sequence[Sequence[int]] | None, batch: int, seq: int,
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


def gather_heads(x: Tensor, pos: Tensor) -> Tensor:
    """x [batch, heads, seq, d], pos [batch, n] -> [batch, heads, n, d]."""
    idx = pos[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1])
    return torch.gather(x, 2, idx)


def repeat_heads(x: Tensor, n_rep: int) -> Tensor:
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
        rows = attention_rows(gather_heads(self.query, qpos), self.key, mask_rows, self.scaling,
                              self.kwargs.get("softcap", None))
        return rows.to(dtype)

    def last_rows(self) -> Tensor:
        """Rows of the call's last query (the one that predicts the next token): [batch, n_heads, kv_len]."""
        b, q_len = self.query.shape[0], self.query.shape[2]
        qpos = torch.full((b, 1), q_len - 1, dtype=torch.long, device=self.query.device)
        return self.rows(qpos)[:, :, 0]


AttentionHook = Callable[[AttentionCall], "Tensor | None"]
"""Called after the original attention function; may return a replacement for `call.output`."""

# Hooks are kept per thread: a hook registered by a thread fires only for the forward calls that thread
# makes, so several documents can run at once on one model, each in its own thread (`inflight.in_flight`),
# without recording or patching each other. `_thread_hooks.attention` maps an attention module to the
# calling thread's hooks on it; `_thread_hooks.pre` maps a module to the thread's forward pre-hooks.
# What is shared by all threads (the attention implementation switch, one dispatching forward pre-hook
# per module) is reference-counted under `_shared_lock`: set up by the first context that needs it,
# undone by the last one to leave. (An autograd thread, where CUDA backward recomputes checkpointed
# layers, is another thread: no hook fires there.)
_thread_hooks = threading.local()
_shared_lock = threading.Lock()
_impl_users: dict[int, tuple[str, int]] = {}  # id(model): (base implementation, contexts active)
_dispatchers: dict[nn.Module, tuple[RemovableHandle, int]] = {}  # module: (its dispatching pre-hook, users)


def _hooks_of_thread(kind: str) -> dict[nn.Module, list]:
    """The calling thread's hooks of one kind ("attention" or "pre"): {module: [hook, ...]}."""
    table = getattr(_thread_hooks, kind, None)
    if table is None:
        table = {}
        setattr(_thread_hooks, kind, table)
    return table


@contextlib.contextmanager
def _thread_registered(kind: str, hooks: Sequence[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Add (module, hook) pairs to the calling thread's hooks of `kind` for the block; removed on exit."""
    table = _hooks_of_thread(kind)
    added: list[tuple[nn.Module, Callable]] = []
    try:
        for module, hook in hooks:
            table.setdefault(module, []).append(hook)
            added.append((module, hook))
        yield
    finally:
        for module, hook in reversed(added):
            table[module].remove(hook)
            if not table[module]:
                del table[module]


def _delegate(base_impl: str, module: nn.Module):
    if base_impl == "eager":  # model-specific eager (Gemma adds soft-capping etc.)
        return getattr(sys.modules[type(module).__module__], "eager_attention_forward", llama_eager_attention)
    return ALL_ATTENTION_FUNCTIONS[base_impl]


def _make_attention_fn(base_impl: str):
    def mechdistill_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                              attention_mask: Tensor | None, *args: Any, **kwargs: Any):
        result = _delegate(base_impl, module)(module, query, key, value, attention_mask, *args, **kwargs)
        hooks = _hooks_of_thread("attention").get(module)
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
def _hooked_implementation(model: nn.Module) -> Iterator[None]:
    """The model's attention implementation switched to the `mechdistill_<base>` wrapper for the block.

    Reference-counted over all threads and nested contexts: the first context to enter switches it, the
    last one to leave restores the base implementation, so a document still running in another thread
    never sees it switched back under its forward. Calls without hooks for their thread are unchanged
    (the wrapper calls the base implementation with the same arguments, and uses its mask function).
    """
    key = id(unwrap(model))
    with _shared_lock:
        if key in _impl_users:
            base_impl, users = _impl_users[key]
        else:
            current = unwrap(model).config._attn_implementation
            if current is None:
                raise RuntimeError("attention_hooks: the model has no attention implementation set")
            base_impl, users = current.removeprefix(_PREFIX), 0
            _set_impl(model, _ensure_registered(base_impl))
        _impl_users[key] = (base_impl, users + 1)
    try:
        yield
    finally:
        with _shared_lock:
            base_impl, users = _impl_users.pop(key)
            if users > 1:
                _impl_users[key] = (base_impl, users - 1)
            else:
                _set_impl(model, base_impl)


@contextlib.contextmanager
def attention_hooks(model: nn.Module, hooks: dict[int, AttentionHook | Sequence[AttentionHook]]) -> Iterator[None]:
    """Context manager: run `hooks[layer]` after every attention call of that layer made by this thread.

    The attention implementation is switched to the registered `mechdistill_<base>` wrapper while any
    context is active (in any thread; contexts nest, e.g. a head capture inside a patched run) and
    restored when the last one exits; hooks are removed on exit, even on error. Hooks fire only for the
    forward calls of the thread that entered the context, so documents run at once in several threads
    (`inflight.in_flight`) each see their own hooks only.
    """
    mods = attention_modules(model)
    pairs: list[tuple[nn.Module, AttentionHook]] = []
    for layer, layer_hooks in hooks.items():
        if not 0 <= layer < len(mods):
            raise ValueError(f"layer {layer} out of range for {len(mods)} layers")
        pairs += [(mods[layer], hook) for hook in ([layer_hooks] if callable(layer_hooks) else layer_hooks)]
    with _hooked_implementation(model), _thread_registered("attention", pairs):
        yield


def _dispatch_pre_hooks(module: nn.Module, args: tuple) -> tuple | None:
    """The one forward pre-hook a module carries while any thread has pre-hooks on it: runs the calling
    thread's pre-hooks on that module, in order (a hook returning a value replaces the args)."""
    replaced = None
    for hook in list(_hooks_of_thread("pre").get(module, ())):
        result = hook(module, args)
        if result is not None:
            args = replaced = result if isinstance(result, tuple) else (result,)
    return replaced


@contextlib.contextmanager
def forward_pre_hooks(hooks: Sequence[tuple[nn.Module, Callable[[nn.Module, tuple], Any]]]) -> Iterator[None]:
    """Context manager: `hook(module, args)` before every forward of `module` made by this thread, for each
    (module, hook) pair; like `register_forward_pre_hook`, but a thread's hooks fire only for its own calls.

    Each module carries one dispatching pre-hook while any thread has hooks on it (reference-counted, removed
    with the last user); removed on exit, even on error.
    """
    modules = list(dict.fromkeys(module for module, _ in hooks))
    entered: list[nn.Module] = []
    try:
        with _shared_lock:
            for module in modules:
                handle, users = _dispatchers.get(module) or (module.register_forward_pre_hook(_dispatch_pre_hooks), 0)
                _dispatchers[module] = (handle, users + 1)
                entered.append(module)
        with _thread_registered("pre", hooks):
            yield
    finally:
        with _shared_lock:
            for module in entered:
                handle, users = _dispatchers.pop(module)
                if users > 1:
                    _dispatchers[module] = (handle, users - 1)
                else:
                    handle.remove()
