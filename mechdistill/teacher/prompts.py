"""Prompts: candidate label lists, the one-shot exemplar and chat rendering.

The prompt artifact is model-agnostic: `messages` is the chat (JSON) that every model renders
with its own chat template (`render_prompt`). The model is asked to reason, then to close with
`<answer>ID; ID</answer>`; `answers.AnswerParser` maps what it wrote back to label ids.
"""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pandas as pd

from ..labels import LabelSpace
from ..text import encode_windowed
from .answers import ANSWER_CLOSE, ANSWER_OPEN

# ---------------------------------------------------------------- candidates

def hierarchy_candidates(gold: list[str], space: LabelSpace, size: int, n_near_miss: int,
                         rng: random.Random, max_title_chars: int = 90) -> list[str]:
    """Gold + hierarchy near-misses + distractors from other top-level areas, shuffled.

    All gold labels are always included (even past `size`).
    """
    near = space.hierarchy_near_misses(gold, n_near_miss)
    chosen = list(dict.fromkeys(gold + near))
    gold_roots = {space.root(g) for g in gold}
    while len(chosen) < size:
        lab = space.assignable[rng.randrange(len(space.assignable))]
        if (lab not in chosen and space.root(lab) not in gold_roots
                and len(space.title[lab]) <= max_title_chars):
            chosen.append(lab)
    rng.shuffle(chosen)
    return chosen


def retrieval_candidates(texts: list[str], space: LabelSpace, size: int, embedder) -> list[list[str]]:
    """Top-`size` labels per text by cosine similarity of embeddings (label titles vs text).

    A document is embedded whole (`text.encode_windowed`: the renormalised mean of its windows'
    embeddings), not cut to the embedder's first `max_seq_length` word-pieces (MiniLM: 256, a small
    part of a MIMIC note or a Wikipedia article); a title always fits in one window."""
    label_ids = space.assignable
    lab_emb = embedder.encode([space.title[lab] for lab in label_ids])      # [labels, d], unit norm
    doc_emb = encode_windowed(embedder, texts)                              # [docs, d], unit norm
    out = []
    for row in doc_emb @ lab_emb.T:                                         # [labels] per doc
        top = np.argpartition(-row, min(size, len(row) - 1))[:size]
        out.append([label_ids[i] for i in top[np.argsort(-row[top])]])
    return out


# ---------------------------------------------------------------- rendering

def candidate_line(label_id: str, space: LabelSpace) -> str:
    """Title first, then the id: a model that copies a title from the note continues with its id."""
    return f"{space.title[label_id]} [{label_id}]"


def format_user_prompt(text: str, candidates: list[str], space: LabelSpace, instruction: str) -> str:
    lines = [instruction.strip(), "", "Document:", text.strip(), "", "Candidate labels:"]
    lines += [f"- {candidate_line(lab, space)}" for lab in candidates]
    return "\n".join(lines)


EXEMPLAR_STYLES = ("guided", "neutral")


def exemplar_answer(gold: list[str], candidates: list[str], space: LabelSpace, style: str = "guided") -> str:
    """The worked answer of the one-shot exemplar (`prompts.exemplar_style`), closed by the answer block.

    guided: shows the two phases, the broad area first ("The work-up focused on <the gold label's
    block>."), then one "<gold> fits the note rather than <near-miss>." per gold label: a teacher that
    copies it writes the phases because it was shown them. neutral: one "The document supports <gold>."
    per gold label: reasoning before the answer, with no word about areas or alternatives.
    """
    if style not in EXEMPLAR_STYLES:
        raise ValueError(f"unknown exemplar style {style!r}; allowed: {', '.join(EXEMPLAR_STYLES)}")
    answer = f"{ANSWER_OPEN}{'; '.join(gold)}{ANSWER_CLOSE}"
    if style == "neutral":
        return "\n".join(f"The document supports {candidate_line(lab, space)}." for lab in gold) + f"\n{answer}"
    parts = []
    anc = space.ancestors.get(gold[0]) or []
    if len(anc) >= 2:
        parts.append(f"The work-up focused on {space.title[anc[-2]].lower()}.")
    shortlist = [c for c in candidates if c not in gold]
    near = [c for c in space.hierarchy_near_misses(gold, 4) if c in shortlist] or shortlist[:1]
    for i, lab in enumerate(gold):
        sentence = f"{candidate_line(lab, space)} fits the note"
        if i < len(near):
            sentence += f" rather than {candidate_line(near[i], space)}"
        parts.append(sentence + ".")
    return "\n".join(parts) + f"\n{answer}"


def build_messages(user_prompt: str, system: str, exemplar: tuple[str, str] | None) -> list[dict]:
    messages = [{"role": "system", "content": system}]
    if exemplar is not None:
        messages += [{"role": "user", "content": exemplar[0]}, {"role": "assistant", "content": exemplar[1]}]
    return messages + [{"role": "user", "content": user_prompt}]


DOCUMENT_HEADER = "Document:"


def document_char_span(rendered_prompt: str, messages: list[dict]) -> tuple[int, int]:
    """[start, end) characters of the final user message's document and candidate list in the
    rendered prompt: from its "Document:" line (`format_user_prompt`) through the end of the
    message (the candidate list closes it). The instruction, system prompt, exemplar turns and the
    chat template's own text lie outside. The part is searched from the end of the rendered text,
    so an exemplar's identical document is never the one found. Raises ValueError naming what is
    missing (no user message, no "Document:" line, or a chat template that rewrote the text)."""
    users = [m["content"] for m in messages if m.get("role") == "user"]
    if not users:
        raise ValueError("document_char_span: the chat has no user message")
    content = users[-1]
    header = re.search(rf"(?m)^{re.escape(DOCUMENT_HEADER)}$", content)
    if header is None:
        raise ValueError(f"document_char_span: the last user message has no {DOCUMENT_HEADER!r} line "
                         f"(prompts.format_user_prompt writes one); it starts {content[:80]!r}")
    part = content[header.start():].rstrip()
    start = rendered_prompt.rfind(part)
    if start < 0:
        raise ValueError("document_char_span: the last user message's document is not in the rendered prompt "
                         "verbatim (the chat template changed its text)")
    return start, start + len(part)


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The exact text a model sees before its CoT (its own chat template, generation prompt on)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    body = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages)
    return body + "Assistant:"


def build_prompts(docs: pd.DataFrame, space: LabelSpace, cand_cfg: dict, prompt_cfg: dict,
                  seed: int, exemplar_doc: pd.Series | None = None, embedder=None) -> pd.DataFrame:
    """One prompt row per document: doc_id, candidates, prompt, messages (JSON), gold_in_candidates.

    prompt_cfg: the `prompts` section (system, instruction, exemplar, exemplar_style: the worked
    answer's `exemplar_answer` style, guided when absent)."""
    instruction, size = prompt_cfg["instruction"], cand_cfg["size"]
    if cand_cfg["strategy"] == "retrieval":
        retrieved = retrieval_candidates(docs["text"].tolist(), space, size, embedder)
        if cand_cfg.get("include_gold"):
            retrieved = [list(dict.fromkeys(list(g) + r))[:max(size, len(g))]
                         for g, r in zip(docs["labels"], retrieved)]
        candidate_lists = retrieved
    else:
        candidate_lists = [hierarchy_candidates(list(g), space, size, cand_cfg["n_near_miss"],
                                                random.Random(f"{seed}:{d}"))
                           for d, g in zip(docs["doc_id"], docs["labels"])]
    exemplar = None
    if prompt_cfg.get("exemplar") and exemplar_doc is not None:
        gold = list(exemplar_doc["labels"])
        ex_cands = hierarchy_candidates(gold, space, min(size, 8), 3, random.Random(f"{seed}:exemplar")) \
            if space.has_hierarchy else gold
        exemplar = (format_user_prompt(exemplar_doc["text"], ex_cands, space, instruction),
                    exemplar_answer(gold, ex_cands, space, prompt_cfg.get("exemplar_style", "guided")))
    rows = []
    for (doc_id, text, gold), cands in zip(docs[["doc_id", "text", "labels"]].itertuples(index=False),
                                           candidate_lists):
        user = format_user_prompt(text, cands, space, instruction)
        msgs = build_messages(user, prompt_cfg["system"], exemplar)
        recall = len(set(gold) & set(cands)) / len(gold)
        rows.append((doc_id, cands, user, json.dumps(msgs), recall))
    return pd.DataFrame(rows, columns=["doc_id", "candidates", "prompt", "messages", "gold_in_candidates"])


def candidate_recall(prompts: pd.DataFrame) -> dict[str, float]:
    """Gold recall of a split's candidate lists: every method's ceiling (a label not offered cannot be
    chosen). prompts: rows of `build_prompts` (gold_in_candidates = |gold & candidates| / |gold| per
    document). Returns n_docs, mean_recall (the mean of gold_in_candidates), all_gold (the fraction of
    documents whose every gold label is offered) and no_gold (the fraction with none offered); NaN
    without documents."""
    recall = prompts["gold_in_candidates"].to_numpy(np.float64)                    # [docs]
    if not len(recall):
        return {"n_docs": 0, "mean_recall": float("nan"), "all_gold": float("nan"), "no_gold": float("nan")}
    return {"n_docs": len(recall), "mean_recall": float(recall.mean()), "all_gold": float((recall == 1.0).mean()),
            "no_gold": float((recall == 0.0).mean())}
