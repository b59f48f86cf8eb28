"""Answer parsing: the reasoning before `<answer>`, and the label ids of the answer block.

A model closes its chain of thought with `<answer>ID; ID</answer>`. Each item of the block is
mapped to a label id (`AnswerParser.map_item`); items that map to nothing are kept as `unmapped`.

Several blocks (a model that answers, then revises): the CoT ends before the first `<answer>`, so no
answer text is read as reasoning (a shortlist mention), and the last complete block is the answer
(the last block when none is closed); `n_answer_blocks` counts them so the row can be flagged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from rapidfuzz import fuzz, process

from ..labels import LabelSpace

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


@dataclass
class ParsedAnswer:
    cot: str
    answer: str
    pred_labels: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    has_answer_block: bool = False
    n_answer_blocks: int = 0
    outside_candidates: list[str] = field(default_factory=list)  # pred_labels not on the candidate list


_ITEM_SPLIT = re.compile(r"[;\n,]+")
_ID_HEAD = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:[:(\-–]|$)")
_ID_BRACKET = re.compile(r"\[([A-Za-z0-9][A-Za-z0-9._-]*)\]\s*$")


def _norm_id(s: str) -> str:
    return re.sub(r"[\s.]", "", s).upper()


def _norm_text(s: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", s.casefold()).split())


class AnswerParser:
    """Maps answer items to label ids: exact id, normalised id, exact title, then fuzzy title.

    Exact and normalised matches search the whole label space; fuzzy matching searches only
    the document's candidates (score >= `fuzzy_threshold`, rapidfuzz WRatio, 0-100).
    """

    def __init__(self, space: LabelSpace, fuzzy_threshold: float = 90.0) -> None:
        self.space = space
        self.threshold = fuzzy_threshold
        self.by_norm_id = {_norm_id(lab): lab for lab in space.assignable}
        self.by_norm_title: dict[str, str] = {}
        for lab in space.assignable:
            self.by_norm_title.setdefault(_norm_text(space.title[lab]), lab)

    def map_item(self, item: str, candidates: list[str]) -> str | None:
        item = item.strip().strip("-*•\"'`[]").strip()
        if not item:
            return None
        if item in self.space:
            return item
        ids = [m.group(1) for m in (_ID_BRACKET.search(item), _ID_HEAD.match(item)) if m]
        for key in [_norm_id(i) for i in ids] + [_norm_id(item)]:
            if key in self.by_norm_id:
                return self.by_norm_id[key]
        if _norm_text(item) in self.by_norm_title:
            return self.by_norm_title[_norm_text(item)]
        if candidates:
            choices = {lab: self.space.title.get(lab, "") for lab in candidates}
            best = process.extractOne(item, choices, scorer=fuzz.WRatio)
            if best is not None and best[1] >= self.threshold:
                return best[2]
        return None

    def parse(self, output: str, candidates: list[str] | None = None) -> ParsedAnswer:
        """Split a generation into CoT and answer; map the answer items to label ids. A label mapped
        outside `candidates` stays a prediction and is listed in `outside_candidates`."""
        opens = answer_opens(output)
        if not opens:
            return ParsedAnswer(cot=output.strip(), answer="")
        start = answer_block_start(output)
        answer = output[start + len(ANSWER_OPEN):]
        end = answer.find(ANSWER_CLOSE)
        answer = (answer[:end] if end >= 0 else answer).strip()
        parsed = ParsedAnswer(cot=output[:opens[0]].strip(), answer=answer, has_answer_block=True,
                              n_answer_blocks=len(opens))
        for item in _ITEM_SPLIT.split(answer):
            if not item.strip():
                continue
            lab = self.map_item(item, candidates or [])
            if lab is None:
                parsed.unmapped.append(item.strip())
            elif lab not in parsed.pred_labels:
                parsed.pred_labels.append(lab)
        if candidates:
            allowed = set(candidates)
            parsed.outside_candidates = [lab for lab in parsed.pred_labels if lab not in allowed]
        return parsed


def answer_opens(output: str) -> list[int]:
    """Offsets of every `<answer>` in `output`."""
    return [m.start() for m in re.finditer(re.escape(ANSWER_OPEN), output)]


def answer_block_start(output: str) -> int:
    """Offset of the answer block: the last `<answer>` closed before the next one opens, else the
    last `<answer>`; -1 without one."""
    opens = answer_opens(output)
    for k in range(len(opens) - 1, -1, -1):
        limit = opens[k + 1] if k + 1 < len(opens) else len(output)
        if output.find(ANSWER_CLOSE, opens[k] + len(ANSWER_OPEN), limit) >= 0:
            return opens[k]
    return opens[-1] if opens else -1


def end_of_turn(tokenizer) -> str:
    """The token that ends an assistant turn in `tokenizer`'s chat template ("<|im_end|>" for SmolLM2 /
    Qwen, "<|eot_id|>" for Llama 3, "<end_of_turn>" for Gemma), as text; tokenizer.eos_token without
    a chat template or where the template's turn end is no special token; "" without either.

    Found by rendering an assistant turn around a marker: the first special token after the marker.
    """
    marker = "\x00turn-content\x00"
    eos = tokenizer.eos_token or ""
    if not getattr(tokenizer, "chat_template", None):
        return eos
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "q"},
                                                  {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # a template that rejects this chat (e.g. one that wants a system turn): the fallback
        return eos
    at = rendered.find(marker)
    if at < 0:
        return eos
    special = set(tokenizer.all_special_tokens) | {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
                                                   if getattr(t, "special", False)}
    tail = rendered[at + len(marker):]
    found = [(tail.find(t), t) for t in special if t and tail.find(t) >= 0]
    return min(found)[1] if found else eos


def supervised_output(cot: str, raw: str | None, end_of_turn: str = "") -> str:
    """What a student is taught to write: the CoT, then the teacher's answer block through its
    `</answer>`, then `end_of_turn` (the chat template's turn end, `end_of_turn(tokenizer)`), so the
    student learns to stop after answering.

    `cot` is the reasoning before `<answer>` (stripped, as `AnswerParser.parse` leaves it) and `raw`
    the whole generation; the result starts with `cot` exactly, so character spans into the CoT
    (the anchors artifact) stay valid. Without an answer block in `raw` it is the CoT alone; with
    several, the one `parse` reads (the blocks before it are not taught). Text after the block's
    `</answer>` is not taught (students stop there, `backends.student_generation`); a block that is
    never closed is taught as written, with no end of turn.
    """
    start = -1 if not raw else answer_block_start(raw)
    if start < 0:
        return cot
    block = raw[start:]
    close = block.find(ANSWER_CLOSE)
    if close < 0:
        return f"{cot}\n{block.strip()}"
    return f"{cot}\n{block[:close + len(ANSWER_CLOSE)].strip()}{end_of_turn}"
