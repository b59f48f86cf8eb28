"""Teacher targets and the student's training objective (paper Sec. 3, App. B).

`teacher_targets` runs the teacher once over [prompt; CoT] and keeps what the losses need, as
flat tensors (saved with safetensors, so training never needs the teacher in memory):

    input_ids [seq], offsets [seq, 2]            the teacher's tokens and their char spans
    topk_values / topk_indices [n_cot, k]        teacher logits at CoT positions (KL term)
    p1.rows [n_early, seq], p1.align, p1.sharpness, p1.mask [n_early]  Phase 1 signals
    p1.queries [n_early]                         early query positions
    p2.loopback, p2.helpfulness, p2.mask, p2.span [n_refine]          Phase 2 signals

`student_loss` computes the student's own signals with gradients and compares them with the
targets (precomputed or computed online by the same function: both give the same loss). Both sides
use the same CoarseVariant (config heads.coarse) for the Phase-1 sharpness, and the interaction
terms are measured in units of the teacher's own scale (`targets.interaction_scales`).
Same tokenizer: positions correspond one to one. Different tokenizers: the CoT KL becomes the
cross-tokenizer loss at character-aligned positions (`losses.cross_tokenizer_kl`), Phase 1
rows are mapped onto the teacher's token spans (`map_rows_to_spans`) at early queries whose
tokens end on the same character, and Phase 2 values are paired by refinement span.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..characterize.attention import attention_modules, final_norm, unembed
from ..characterize.scores import DEFAULT_COARSE, CoarseVariant
from ..errors import InputError
from .losses import (
    TERMS,
    aligned_positions,
    cot_loss,
    cross_tokenizer_kl,
    phase1_losses,
    phase2_losses,
    topk_targets,
    total_loss,
)
from .methods import Method
from .pools import HeadPool
from .signals import Example, forward_signals

P1_KEYS = ("rows", "align", "sharpness", "mask")
P2_KEYS = ("loopback", "helpfulness", "mask")


@torch.no_grad()
def teacher_targets(model: nn.Module, ex: Example, pools: dict[str, HeadPool], tau: float, top_k: int,
                    phases: tuple[str, ...] = ("phase1", "phase2"), coarse: CoarseVariant = DEFAULT_COARSE
                    ) -> dict[str, Tensor]:
    """The teacher's side of every loss for one document (flat dict of CPU tensors)."""
    logits, signals = forward_signals(model, ex, pools, tau, phases, coarse=coarse)
    cot = torch.tensor(list(ex.cot_positions), dtype=torch.long)
    values, indices = topk_targets(logits[0, cot.to(logits.device)], top_k)  # [n_cot, k]
    out = {"input_ids": ex.input_ids.cpu(), "offsets": torch.tensor(ex.offsets, dtype=torch.long).reshape(-1, 2),
           "text": torch.tensor(list(ex.text.encode("utf-8")), dtype=torch.uint8),
           "topk_values": values.cpu(), "topk_indices": indices.to(torch.int64).cpu()}
    if "phase1" in signals:
        out.update({f"p1.{k}": signals["phase1"][k][0].detach().cpu() for k in P1_KEYS})
        out["p1.queries"] = torch.tensor(ex.early_queries, dtype=torch.long)
    if "phase2" in signals:
        out.update({f"p2.{k}": signals["phase2"][k][0].detach().cpu() for k in P2_KEYS})
        out["p2.span"] = torch.tensor(ex.refine_span, dtype=torch.long)
    return out


def _zeros(group: str, like: Tensor) -> dict[str, Tensor]:
    return {name: like.new_zeros(()) for name in TERMS[group]}


def _pick(sig: Mapping[str, Tensor], idx: Tensor, keys: tuple[str, ...]) -> dict[str, Tensor]:
    """Signals (batch 1) restricted to positions `idx` of their query axis (dim 1)."""
    return {k: sig[k].index_select(1, idx.to(sig[k].device)) for k in keys}


def _paired(t_values: list[int], s_values: list[int]) -> tuple[Tensor, Tensor]:
    """Index pairs (i, j) with t_values[i] == s_values[j]."""
    where = {v: j for j, v in enumerate(s_values)}
    pairs = [(i, where[v]) for i, v in enumerate(t_values) if v in where]
    if not pairs:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    ti, si = zip(*pairs)
    return torch.tensor(ti), torch.tensor(si)


def student_loss(model: nn.Module, ex: Example, targets: Mapping[str, Tensor], pools: dict[str, HeadPool],
                 method: Method, tau: float, temperature: float, weights: Mapping[str, float] | None = None,
                 coarse: CoarseVariant = DEFAULT_COARSE, scales: Mapping[str, float] | None = None
                 ) -> dict[str, Tensor]:
    """Total loss and every term for one document: {"loss", "cot.ce", "cot.kl", "phase1.attn", ...}.

    coarse: the Phase-1 sharpness the targets were made with; scales: {phase: the teacher's RMS
    interaction} (`targets.interaction_scales` of the training targets; missing = 1, the raw term)."""
    phases = tuple(p for p in ("phase1", "phase2") if method.uses(p))
    same_tokens = torch.equal(targets["input_ids"].cpu(), ex.input_ids.cpu())
    if not same_tokens and is_stale(targets["input_ids"].cpu(), ex.input_ids.cpu()):
        raise InputError(f"{ex.doc_id}: the teacher targets are {len(targets['input_ids'])} tokens and a prefix of "
                         f"the student's {len(ex.input_ids)} (or the reverse): they were made from another supervised "
                         "text (e.g. before the end-of-turn token was taught)",
                         fix="rerun teacher_targets (snakemake --forcerun teacher_targets)")
    student_spans = None if same_tokens else spans_in_teacher_text(ex, targets)  # [seq, 2]
    p1_spans = None if same_tokens else (student_spans, targets["offsets"])
    logits, signals = forward_signals(model, ex, pools, tau, phases, p1_spans=p1_spans, coarse=coarse)  # [1, seq, V]
    device = logits.device
    cot = torch.tensor(list(ex.cot_positions), dtype=torch.long, device=device)
    cot_mask = torch.ones(1, len(cot), dtype=torch.bool, device=device)
    t_values, t_indices = targets["topk_values"].to(device), targets["topk_indices"].to(device)
    labels = ex.input_ids.to(device)[cot + 1]
    if same_tokens:
        terms: dict[str, dict[str, Tensor]] = {
            "cot": cot_loss(logits[:, cot], cot_mask, t_values[None], t_indices[None], temperature, labels=labels[None])}
    else:  # CE on the student's own tokens; the KL term becomes the cross-tokenizer loss
        ce = F.cross_entropy(logits[0, cot].float(), labels)
        t_pos, s_pos = aligned_positions(targets["offsets"][_teacher_cot_positions(targets)], student_spans[cot.cpu()])
        kl = cross_tokenizer_kl(logits[:, cot], t_values[None], s_pos.to(device), t_pos.to(device), temperature)
        terms = {"cot": {"ce": ce, "kl": kl}}
    zero = logits.new_zeros(())
    for phase, prefix, keys, losses_fn in (("phase1", "p1", P1_KEYS, phase1_losses),
                                           ("phase2", "p2", P2_KEYS, phase2_losses)):
        if phase not in signals or f"{prefix}.mask" not in targets:
            terms[phase] = _zeros(phase, zero)  # the document does not define this phase
            continue
        t_sig = {k: targets[f"{prefix}.{k}"][None].to(device) for k in keys}
        s_sig = signals[phase]
        if not same_tokens:
            ti, si = _cross_tokenizer_pairs(phase, ex, targets, student_spans)
            t_sig, s_sig = _pick(t_sig, ti, keys), _pick(s_sig, si, keys)
        scale = (scales or {}).get(phase, 1.0)
        terms[phase] = losses_fn(t_sig, s_sig, scale) if t_sig["mask"].numel() else _zeros(phase, zero)
    loss = total_loss(terms, weights, method.switches)
    flat = {f"{g}.{k}": v.detach() for g, group in terms.items() for k, v in group.items() if k != "loss"}
    return {"loss": loss, **flat}


def is_stale(teacher_ids: Tensor, student_ids: Tensor) -> bool:
    """Whether two different token sequences are one the other's prefix: the same tokenizer on two versions of
    the supervised text, which the cross-tokenizer path would otherwise silently align by characters."""
    n = min(len(teacher_ids), len(student_ids))
    return len(teacher_ids) != len(student_ids) and torch.equal(teacher_ids[:n], student_ids[:n])


def read_outside_forward(model: nn.Module, pools: Mapping[str, HeadPool]) -> list[nn.Parameter]:
    """The parameters `student_loss` reads outside their module's forward: W_O of the pooled layers (head
    writes), lm_head (the anchor centroid) and the final norm (the margin gradient). Under ZeRO-3 they
    are kept whole on every rank (`trainer.train`'s whole_params)."""
    modules = attention_modules(model)
    layers = sorted({layer for pool in pools.values() for layer in pool.layers})
    return ([p for layer in layers for p in modules[layer].o_proj.parameters()]
            + list(unembed(model).parameters()) + list(final_norm(model).parameters()))


def spans_in_teacher_text(ex: Example, targets: Mapping[str, Tensor]) -> Tensor:
    """The student's token char spans moved into the teacher's text: [seq, 2] (zero-width where a token
    covers characters the teacher's text lacks, e.g. chat-template markup of another model family).

    Texts are aligned character by character (`char_map`: difflib over lines, then over the characters of
    the unequal lines), so the same document and CoT characters get the same index whatever the two chat
    templates add.
    """
    teacher_text = bytes(targets["text"].tolist()).decode("utf-8")
    to_teacher = char_map(ex.text, teacher_text)  # [len(student text)] -> teacher index or -1
    spans = []
    for a, b in ex.offsets:
        inside = [to_teacher[i] for i in range(a, b) if to_teacher[i] >= 0]
        spans.append((min(inside), max(inside) + 1) if inside and len(inside) == b - a else (0, 0))
    return torch.tensor(spans, dtype=torch.long).reshape(-1, 2)


@functools.lru_cache(maxsize=64)
def char_map(source: str, target: str) -> tuple[int, ...]:
    """For each character of `source`, its index in `target`, or -1 (a character the target lacks).

    Two renderings of one prompt + CoT differ only in their chat templates' markup, so the alignment is
    taken in two levels: difflib's matching blocks over LINES (a few hundred, however long the lines),
    whose equal lines map character for character, then difflib over characters only inside each
    region of unequal lines (the markup and the lines it touches, a few hundred characters). About
    linear in the text's length where one difflib over all characters is quadratic (0.75 s at 11.7k
    characters), and the same map on such pairs (`tests/distill/test_objective.py`).
    """
    out = [-1] * len(source)
    a_lines, b_lines = source.splitlines(keepends=True), target.splitlines(keepends=True)
    a_start = _line_starts(a_lines)
    b_start = _line_starts(b_lines)
    a_done = b_done = 0                                  # lines aligned so far
    for block in difflib.SequenceMatcher(a=a_lines, b=b_lines, autojunk=False).get_matching_blocks():
        _align_chars(source, target, a_start[a_done], a_start[block.a], b_start[b_done], b_start[block.b], out)
        for i in range(a_start[block.a], a_start[block.a + block.size]):
            out[i] = b_start[block.b] + i - a_start[block.a]
        a_done, b_done = block.a + block.size, block.b + block.size
    return tuple(out)


def _line_starts(lines: list[str]) -> list[int]:
    """Character offset of each line and of the end: [len(lines) + 1]."""
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    return starts


def _align_chars(source: str, target: str, a0: int, a1: int, b0: int, b1: int, out: list[int]) -> None:
    """Character-level difflib inside source[a0:a1] vs target[b0:b1], written into `out`."""
    if a0 == a1 or b0 == b1:
        return
    matcher = difflib.SequenceMatcher(a=source[a0:a1], b=target[b0:b1], autojunk=False)
    for block in matcher.get_matching_blocks():
        for i in range(block.size):
            out[a0 + block.a + i] = b0 + block.b + i


def _teacher_cot_positions(targets: Mapping[str, Tensor]) -> Tensor:
    """The teacher's CoT positions (cot_start-1 .. seq-2), recovered from its targets."""
    seq, n_cot = len(targets["input_ids"]), len(targets["topk_values"])
    return torch.arange(seq - 1 - n_cot, seq - 1)


def _cross_tokenizer_pairs(phase: str, ex: Example, targets: Mapping[str, Tensor], student_spans: Tensor
                           ) -> tuple[Tensor, Tensor]:
    """Which teacher and student positions compare when tokenizers differ: Phase 1 early queries
    whose tokens end on the same character; Phase 2 refinement positions of the same span."""
    if phase == "phase2":
        return _paired(targets["p2.span"].tolist(), ex.refine_span)
    t_ends = [int(targets["offsets"][q][1]) for q in targets["p1.queries"].tolist()]
    return _paired(t_ends, [int(student_spans[q][1]) if student_spans[q][1] > 0 else -1 for q in ex.early_queries])
