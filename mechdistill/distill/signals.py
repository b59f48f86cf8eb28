"""Phase signals of one model on one teacher-forced document: what the distillation losses compare.

One forward of [prompt; CoT; answer block] (the teacher's whole output) gives, at once (`forward_signals`):

    logits                                   [1, seq, vocab]        CoT loss
    phase1: rows, align, sharpness, mask     at the early queries   (losses.phase1_signals)
    phase2: loopback, helpfulness, mask      at refinement positions (losses.phase2_signals)

The capture covers only the pooled heads' layers and the few query positions the losses need
(heads.capture_heads); the margin gradient of Phase 2 comes from the residual entering the
final norm in the same forward. The teacher runs it under no_grad (teacher_targets, or the
online mode), the student with gradients; the mechanism metrics (Sharpness, AnchorAlign,
LoopBack, Helpfulness: `mechanism_metrics`) reuse it. Batch size 1: one document per call.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar, overload

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from ..characterize.attention import unembed
from ..characterize.capture import HeadCapture, capture_heads, final_residual
from ..characterize.scores import DEFAULT_COARSE, CoarseVariant, anchor_centroid, coarse_key_mask
from ..characterize.teacher_forcing import forced_sequence, margin_tokens, within_cap
from ..io import SplitArtifacts
from ..models import input_device
from ..teacher.answers import end_of_turn, supervised_output
from ..teacher.prompts import render_prompt
from ..text import char_span_to_tokens, shift_spans, token_offsets
from .launch import gather_to_all
from .losses import phase1_signals, phase2_signals, refine_margin_grad
from .pools import HeadPool

log = logging.getLogger(__name__)

PHASES = ("phase1", "phase2")
# Tables 1 and 4's mechanism metrics: (metric, phase signal it averages) per phase.
MECHANISM_METRICS = {"phase1": (("sharpness", "sharpness"), ("anchor_align", "align")),
                     "phase2": (("loopback", "loopback"), ("helpfulness", "helpfulness"))}


@dataclass
class Example:
    """One document teacher-forced for one model (its own tokenizer)."""

    doc_id: str
    input_ids: Tensor                     # [seq]
    text: str                             # the rendered prompt + CoT (this model's chat template)
    offsets: np.ndarray                   # [seq, 2] int32: char span of each token in `text`
    cot_start: int                        # first CoT token
    early_queries: list[int]              # positions producing the early CoT tokens
    refine: list[int]                     # refinement positions with an earlier S and N mention
    refine_span: list[int]                # index of the refinement span of each (cross-tokenizer pairing)
    keys: list[int]                       # shortlist (S) mention tokens, then near-miss (N) ones
    n_shortlist: int
    anchor_token_ids: list[list[int]] = field(default_factory=list)
    target_tokens: list[int] = field(default_factory=list)    # margin token of each gold label (Eq. 7)
    nearmiss_tokens: list[int] = field(default_factory=list)  # and of each near-miss
    document_positions: list[int] = field(default_factory=list)  # the document + candidate-list tokens

    @property
    def cot_positions(self) -> range:
        """Positions whose logits predict a CoT token (cot_start-1 .. seq-2)."""
        return range(max(self.cot_start - 1, 0), len(self.input_ids) - 1)


def make_example(tokenizer, doc_id: str, messages_json: str, cot: str, anchors_row, anchors: list[str],
                 gold_titles: list[str], nearmiss_titles: list[str]) -> Example:
    """Tokenise [prompt; output] for `tokenizer` and map the anchors row's char spans to its tokens.

    cot: the teacher output to force; it starts with the CoT the spans index (it may go on with the
    answer block)."""
    seq = forced_sequence(tokenizer, messages_json, cot, anchors_row)
    target_tokens, nearmiss_tokens = margin_tokens(tokenizer, gold_titles, nearmiss_titles)
    prompt = render_prompt(tokenizer, json.loads(messages_json))
    offsets = [tuple(o) for o in token_offsets(tokenizer, prompt + cot)]
    keys = seq.shortlist_positions + seq.nearmiss_positions
    refine, refine_span = [], []
    for i, span in enumerate(shift_spans(list(anchors_row["refine_spans"]), len(prompt))):
        tokens = char_span_to_tokens(offsets, tuple(span))
        if not tokens:
            continue
        t = max(tokens)
        if any(p < t for p in seq.shortlist_positions) and any(p < t for p in seq.nearmiss_positions) \
                and t not in refine:
            refine.append(t)
            refine_span.append(i)
    return Example(
        doc_id=doc_id, input_ids=seq.input_ids, text=prompt + cot,
        offsets=np.asarray(offsets, dtype=np.int32).reshape(-1, 2),  # 8 B a token (a tuple of tuples: ~128 B)
        cot_start=seq.cot_token_start,
        early_queries=list(seq.early_queries), refine=refine, refine_span=refine_span, keys=keys,
        n_shortlist=len(seq.shortlist_positions),
        anchor_token_ids=[ids for ids in (tokenizer(a, add_special_tokens=False)["input_ids"] for a in anchors) if ids],
        target_tokens=target_tokens, nearmiss_tokens=nearmiss_tokens, document_positions=seq.document_positions)


def _split_examples(tokenizer, split: SplitArtifacts) -> Iterator[tuple[int, Example]]:
    """(row of split.anchors, Example) of every document with a CoT, in anchors order; those with an empty CoT
    are named in one warning at the end."""
    cot = split.cot
    empty, stop = [], end_of_turn(tokenizer)
    for position, (_, row) in enumerate(split.anchors.iterrows()):
        doc_id = row["doc_id"]
        text = cot.loc[doc_id, "cot"] if doc_id in cot.index else ""
        if not text.strip():
            empty.append(doc_id)
            continue
        yield position, _document_example(tokenizer, split, row, stop)
    if empty:
        log.warning("%s: %d documents have an empty CoT and are skipped: %s", split.source, len(empty), empty[:5])


def _document_example(tokenizer, split: SplitArtifacts, row, stop: str) -> Example:
    """The Example of anchors row `row` (a document with a CoT): the teacher's whole output forced."""
    doc_id, cot = row["doc_id"], split.cot
    output = supervised_output(cot.loc[doc_id, "cot"], cot.loc[doc_id, "raw"] if "raw" in cot.columns else None, stop)
    return make_example(tokenizer, doc_id, split.prompts.loc[doc_id, "messages"], output, row, list(row["anchors"]),
                        [split.space.title[g] for g in split.docs.loc[doc_id, "labels"]],
                        [split.space.title[n] for n in row["near_misses"]])


def _log_examples(split: SplitArtifacts, model_name: str, n: int, n_phase1: int, n_phase2: int) -> None:
    log.info("%s: %d examples for %s (%d with Phase 1 positions, %d with Phase 2 positions)", split.source, n,
             model_name, n_phase1, n_phase2)


def make_examples(tokenizer, split: SplitArtifacts, model_name: str = "", max_tokens: int | None = None) -> list[Example]:
    """Teacher-forced examples of every document of a split (in anchors order) for `tokenizer`, all in memory
    (`SplitExamples`: the same, each built when read).

    Each forces the teacher's whole output, its CoT and then its answer block
    (`teacher.answers.supervised_output`) and the chat template's end of turn after it, so the CoT
    loss also teaches the student to answer and then stop; the Phase 1 / Phase 2 positions lie in the CoT. Documents with an empty CoT, or longer than
    `max_tokens` (`characterize.teacher_forcing.within_cap`), are skipped with a warning naming them.
    """
    examples = within_cap([ex for _, ex in _split_examples(tokenizer, split)], lambda ex: len(ex.input_ids),
                          lambda ex: ex.doc_id, max_tokens, f"{split.source} ({model_name or 'model'})")
    _log_examples(split, model_name, len(examples), sum(has_phase(e, "phase1") for e in examples),
                  sum(has_phase(e, "phase2") for e in examples))
    return examples


T = TypeVar("T")


class LazySequence(Sequence[T]):
    """A read-only sequence of `n` values, value i made by `fetch(i)` each time it is read (slices: views)."""

    def __init__(self, n: int, fetch: Callable[[int], T]) -> None:
        self.n, self.fetch = n, fetch

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, i: int) -> T: ...
    @overload
    def __getitem__(self, i: slice) -> LazySequence[T]: ...
    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(self.n)[i])
        return self.fetch(range(self.n)[i])

    def take(self, positions: Sequence[int]) -> LazySequence[T]:
        """The values at `positions` (a view: nothing is made until read)."""
        positions = list(positions)
        return LazySequence(len(positions), lambda i: self[positions[i]])


def chain(*parts: Sequence[T]) -> LazySequence[T]:
    """`parts` one after the other, as one lazy sequence (nothing is read until asked for)."""
    starts = np.cumsum([0] + [len(p) for p in parts])

    def fetch(i: int) -> T:
        part = int(np.searchsorted(starts, i, side="right")) - 1
        return parts[part][i - int(starts[part])]
    return LazySequence(int(starts[-1]), fetch)


class ExampleInfo(NamedTuple):
    """What `SplitExamples` keeps of a document without its Example."""

    row: int            # its row of split.anchors
    doc_id: str
    n_tokens: int
    n_supervised: int   # tokens after the prompt (the CoT and answer): len(Example.cot_positions)
    phase1: bool        # has_phase(example, "phase1")
    phase2: bool


class SplitExamples(LazySequence[Example]):
    """The documents of `make_examples` (same order, same skips, same Examples), each Example built from the
    split when it is read, the last `cache_size` kept: a distillation rank holds the Examples of the
    documents it is training on now, not of the whole split. Built once at construction to find the
    documents kept (their lengths against `max_tokens`); `info` keeps a few numbers per document."""

    def __init__(self, tokenizer, split: SplitArtifacts, model_name: str = "", max_tokens: int | None = None,
                 cache_size: int = 4) -> None:
        self.tokenizer, self.split, self.cache_size, self.stop = tokenizer, split, cache_size, end_of_turn(tokenizer)
        info = [ExampleInfo(row, ex.doc_id, len(ex.input_ids), len(ex.cot_positions), has_phase(ex, "phase1"),
                            has_phase(ex, "phase2")) for row, ex in _split_examples(tokenizer, split)]
        self.info: list[ExampleInfo] = within_cap(info, lambda e: e.n_tokens, lambda e: e.doc_id, max_tokens,
                                                  f"{split.source} ({model_name or 'model'})")
        self.positions = {e.doc_id: i for i, e in enumerate(self.info)}
        self.cache: OrderedDict[int, Example] = OrderedDict()
        _log_examples(split, model_name, len(self.info), sum(e.phase1 for e in self.info),
                      sum(e.phase2 for e in self.info))
        super().__init__(len(self.info), self._example)

    @property
    def doc_ids(self) -> list[str]:
        return [e.doc_id for e in self.info]

    def by_doc_id(self, doc_id: str) -> Example:
        return self[self.positions[doc_id]]

    def _example(self, i: int) -> Example:
        if i in self.cache:
            self.cache.move_to_end(i)
            return self.cache[i]
        ex = _document_example(self.tokenizer, self.split, self.split.anchors.iloc[self.info[i].row], self.stop)
        if self.cache_size:
            self.cache[i] = ex
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return ex


def has_phase(ex: Example, phase: str) -> bool:
    """Whether the document defines the phase's signals (early queries and anchors; refinement
    positions with target and near-miss margin tokens)."""
    if phase == "phase1":
        return bool(ex.early_queries and ex.anchor_token_ids)
    return bool(ex.refine and ex.target_tokens and ex.nearmiss_tokens)


def mention_masks(ex: Example, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Earlier shortlist / near-miss mention masks over the keys: two [1, n_refine, n_key] bool."""
    keys = torch.tensor(ex.keys, device=device)
    refine = torch.tensor(ex.refine, device=device)
    before = keys[None, None, :] < refine[None, :, None]  # [1, nr, nk]
    is_s = torch.arange(len(ex.keys), device=device) < ex.n_shortlist  # [nk]
    return before & is_s, before & ~is_s


def forward_signals(model: nn.Module, ex: Example, pools: dict[str, HeadPool], tau: float,
                    phases: tuple[str, ...] = PHASES, p1_spans: tuple[Tensor, Tensor] | None = None,
                    coarse: CoarseVariant = DEFAULT_COARSE) -> tuple[Tensor, dict[str, dict[str, Tensor]]]:
    """One teacher-forced forward -> (logits [1, seq, vocab], {phase: signals}) for the phases
    asked for that the document defines. Gradients flow unless the caller disables them.
    p1_spans: (this model's token char spans, shared unit spans) maps Phase-1 rows onto shared
    units (a student whose tokenizer differs from the teacher's). coarse: the Phase-1 sharpness
    (its keys and kind; config heads.coarse, the variant that ranked the heads). Under a device map
    the signals are formed on the input device (`models.input_device`)."""
    device = input_device(model)
    ids = ex.input_ids[None].to(device)
    active = [p for p in phases if p in pools and has_phase(ex, p)]
    if not active:
        return model(input_ids=ids, use_cache=False).logits, {}
    early = ex.early_queries if "phase1" in active else []
    refine = ex.refine if "phase2" in active else []
    what = set()
    if early:
        what |= {"rows", "writes"}
    if refine:
        what |= {"rows", "qk", "value_writes"}
    layers = sorted({layer for p in active for layer in pools[p].layers})
    with final_residual(model) as residual:
        out, cap = capture_heads(model, ids, query_positions=[early + refine],
                                 key_positions=[ex.keys] if refine else None, layers=layers, what=what)
    cap = capture_on(cap, device)  # pools sum over layers, which a device map may spread over devices
    signals: dict[str, dict[str, Tensor]] = {}
    if early:
        # [d], the student's own unembedding, as a fixed direction: the loss moves the heads' writes
        # towards it, not the unembedding towards them (and a ZeRO-3 partitioned lm_head reads the same)
        centroid = anchor_centroid(unembed(model), ex.anchor_token_ids).detach()
        document = ex.document_positions if coarse.keys == "document" else None
        key_mask = coarse_key_mask(torch.tensor([early], device=device), len(ex.input_ids), document)  # [1, nq, seq]
        signals["phase1"] = phase1_signals(model, cap.select_queries(range(len(early))), pools["phase1"], centroid,
                                           key_mask=key_mask, spans=p1_spans, kind=coarse.sharpness)
    if refine:
        h_refine = residual.h[:, refine].to(device)  # [1, nr, d], from the last layer's device
        grad = refine_margin_grad(model, h_refine, ex.target_tokens, ex.nearmiss_tokens)  # [1, nr, d]
        s_mask, n_mask = mention_masks(ex, device)
        signals["phase2"] = phase2_signals(model, cap.select_queries(range(len(early), len(early) + len(refine))),
                                           pools["phase2"], grad, s_mask, n_mask, tau)
    return out.logits, signals


def capture_on(cap: HeadCapture, device: torch.device) -> HeadCapture:
    """`cap` with every captured tensor on `device` (differentiable; no copy where it is already there)."""
    def move(value):
        if isinstance(value, Tensor):
            return value.to(device)
        return {k: move(v) for k, v in value.items()} if isinstance(value, dict) else value
    return dataclasses.replace(cap, **{f.name: move(getattr(cap, f.name)) for f in dataclasses.fields(cap)})


@torch.no_grad()
def mechanism_metrics(model: nn.Module, examples: Sequence[Example], pools: dict[str, HeadPool], tau: float,
                      coarse: CoarseVariant = DEFAULT_COARSE) -> pd.DataFrame:
    """Sharpness, AnchorAlign (Phase 1) and LoopBack, Helpfulness (Phase 2) of the model's pooled heads,
    per document: the mean over the document's valid positions of sharpness (the `coarse` variant's:
    its keys and kind), align, loopback and helpfulness from `forward_signals` -> doc_id, metric,
    value. Runs in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    rows = []
    try:
        for ex in examples:
            _, signals = forward_signals(model, ex, pools, tau, coarse=coarse)
            for phase, names in MECHANISM_METRICS.items():
                sig = signals.get(phase)
                if sig is None or not sig["mask"].any():
                    continue
                mask = sig["mask"][0]
                rows += [(ex.doc_id, metric, float(sig[key][0][mask].double().mean())) for metric, key in names]
    finally:
        model.train(was_training)
    return pd.DataFrame(rows, columns=["doc_id", "metric", "value"])


def gathered_mechanism_metrics(model: nn.Module, examples: Sequence[Example], pools: dict[str, HeadPool], tau: float,
                               coarse: CoarseVariant = DEFAULT_COARSE) -> pd.DataFrame:
    """`mechanism_metrics` of this rank's examples, gathered from every rank (one row set per document)."""
    frames = gather_to_all(mechanism_metrics(model, examples, pools, tau, coarse))
    return pd.concat(frames, ignore_index=True).drop_duplicates(["doc_id", "metric"], ignore_index=True)
