"""Surface imitation of the teacher's trace (App. D.1): BLEU-4 and perplexity.

- BLEU-4 (sacrebleu, default 13a tokenisation, 0-100 scale) of the student trace (hypothesis)
  against the teacher trace (the one reference):
    BLEU = BP * exp(sum_{n=1..4} (1/4) log p_n),  BP = min(1, exp(1 - ref_len / hyp_len)),
  p_n = clipped n-gram precision. Corpus BLEU pools n-gram counts over documents; sentence
  BLEU uses sacrebleu's exponential smoothing with effective order (sacrebleu's recommendation
  for single sentences).
- Perplexity of the teacher trace r_1..r_T under the student, given the prompt x:
    PPL = exp(-(1/T) sum_t log p(r_t | x, r_<t))
  Only CoT tokens enter the sum; prompt tokens are context, masked out of the loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sacrebleu.metrics import BLEU

from ..models import input_device
from ..text import token_offsets


def _check_lengths(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")


def bleu4(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 (0-100) of hypotheses[i] against the single reference references[i]."""
    _check_lengths(hypotheses, references)
    return float(BLEU(max_ngram_order=4).corpus_score(list(hypotheses), [list(references)]).score)


def sentence_bleu4(hypotheses: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per-document BLEU-4 (0-100), exponential smoothing with effective order."""
    _check_lengths(hypotheses, references)
    bleu = BLEU(max_ngram_order=4, effective_order=True)
    return np.array([bleu.sentence_score(h, [r]).score for h, r in zip(hypotheses, references)])


def cot_token_ids(tokenizer, prompt: str, cot: str) -> tuple[list[int], int]:
    """Token ids of prompt + cot, and the index of the first CoT token.

    We tokenise the concatenated text (the sequence the model would actually see, as in
    `teacher_forcing.forced_sequence`) and use the offset mapping: the CoT starts at the first
    token that ends after the prompt's last character. A token straddling the boundary (BPE
    merging across it) therefore counts as CoT. No special tokens are added: `prompt` is the
    fully rendered prompt text (chat template included).
    """
    text = prompt + cot
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    offsets = token_offsets(tokenizer, text)
    start = next((i for i, (_, end) in enumerate(offsets) if end > len(prompt)), len(ids))
    return list(ids), start


@torch.no_grad()
def trace_perplexity(model, tokenizer, prompt_texts: Sequence[str], cot_texts: Sequence[str],
                     batch_size: int = 8, device: str | torch.device | None = None) -> np.ndarray:
    """Per-document perplexity of cot_texts[i] given prompt_texts[i] under a HF causal LM.

    Sequences are right-padded into batches of similar length. A CoT token at position 0 (empty
    prompt) has no context and is not scored; a document with no scored token gets NaN. Inputs go to
    `device` (default `models.input_device(model)`); sequences are not truncated (longer than the
    model's context is the caller's concern).
    """
    device = device or input_device(model)
    _check_lengths(prompt_texts, cot_texts)
    seqs = [cot_token_ids(tokenizer, p, c) for p, c in zip(prompt_texts, cot_texts)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    model.eval()
    ppl = np.full(len(seqs), np.nan)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    for b in range(0, len(order), batch_size):
        batch = [i for i in order[b:b + batch_size] if len(seqs[i][0]) > max(seqs[i][1], 1)]
        if not batch:
            continue
        width = max(len(seqs[i][0]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            tokens = seqs[i][0]
            ids[row, :len(tokens)] = torch.tensor(tokens)
            attention[row, :len(tokens)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
        for row, i in enumerate(batch):
            tokens, start = seqs[i]
            start = max(start, 1)
            # the logits at position t-1 predict token t; score t = start .. end of the CoT
            nll = F.cross_entropy(logits[row, start - 1:len(tokens) - 1].float(),
                                  ids[row, start:len(tokens)].to(logits.device))
            ppl[i] = float(torch.exp(nll))
    return ppl
