"""Step-by-step attention patterns for activation patching: record them in one run, replay them
into chosen heads of another (Figs 5 and 8). Both are attention hooks (characterize.attention).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..characterize.attention import AttentionCall, AttentionHook, repeat_heads


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
        value = repeat_heads(call.value, n_rep).float()  # [b, H, kv, d]
        z = torch.einsum("xhk,bhkd->bhd", src.to(value.device), value)  # [b, H, d]
        out = call.output.clone()  # [b, q, H, d]
        mask = self.head_mask[layer].to(out.device)[:, :, None]  # [b, H, 1]
        out[:, -1] = torch.where(mask, z.to(out.dtype), out[:, -1])
        return out

    def hooks(self) -> dict[int, AttentionHook]:
        return {layer: self.patch for layer in self.head_mask}
