"""Peak RSS of `score_heads` against the number of documents, each count in a fresh process.

A random LLaMA (16 layers x 32 heads, eager attention) scores N copies of a document with a 512-token prompt
and a 120-token CoT (4 early queries, 2 refinement positions); its Fig. 4 rows are 16 * 32 * 512 * 4 bytes =
1 MiB a document. Each process first scores one document (reaching one document's peak), then N, and prints
how far the N-document run raised the peak RSS. A score_heads that kept every document's rows would rise by
about N - 1 MiB more.

    PYTHONPATH=$PWD python benchmarks/head_scores_memory.py 4 16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

LAYERS, HEADS, PROMPT, COT = 16, 32, 512, 120


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measure(n_docs: int) -> dict:
    """In this process: the rise of the peak RSS of score_heads over n_docs documents above one document's."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mechdistill.characterize.head_scores import score_heads
    from mechdistill.characterize.teacher_forcing import ForcedSequence
    from mechdistill.models import byte_tokenizer

    torch.set_num_threads(1)
    tok = byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=2 * HEADS, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=8, max_position_embeddings=PROMPT + COT,
                         tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()  # CPU SDPA: slow at head_dim 2
    seq = ForcedSequence(input_ids=torch.randint(0, 256, (PROMPT + COT,)), prompt_chars=0, cot_token_start=PROMPT,
                         early_queries=list(range(PROMPT, PROMPT + 4)), refine_positions=[PROMPT + 60, PROMPT + 100],
                         shortlist_positions=[10, 11, PROMPT + 20], nearmiss_positions=[40, 41, PROMPT + 30],
                         document_positions=list(range(PROMPT)))
    docs = [dict(doc_id=f"d{i}", seq=seq, anchors=["fits"], gold_titles=["A"], nearmiss_titles=["B"])
            for i in range(n_docs)]
    score_heads(model, tok, docs[:1], desc="one document")
    before = _peak_rss_bytes()
    score_heads(model, tok, docs, desc=f"{n_docs} documents")
    return {"n_docs": n_docs, "peak_rise_mb": round((_peak_rss_bytes() - before) / 2**20, 1),
            "peak_mb": round(_peak_rss_bytes() / 2**20, 1), "rows_mb_per_doc": LAYERS * HEADS * PROMPT * 4 / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n_docs", nargs="+", type=int)
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)  # one measurement, this process
    args = ap.parse_args()
    if args.inside:
        print(json.dumps(measure(args.n_docs[0])))
        return
    for n in args.n_docs:
        run = subprocess.run([sys.executable, __file__, "--inside", str(n)], capture_output=True, text=True, check=True)
        print(run.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
