"""Embedding throughput of the Focus/Confusion trajectories, without and with the text cache.

    python benchmarks/embedding_throughput.py [--docs 6] [--units 240] [--early 30] [--max-points 32]

Builds CoT-like texts in memory from a pool of clinical sentences, splits them into word-level
units (whitespace kept), and embeds with the real all-MiniLM-L6-v2 (2 torch threads):
  no cache  : every text sent to the model (focus units + confusion prefixes, duplicates included)
  cold cache: document_trajectories with an empty SentenceEmbedder cache (repeated unit texts
              across documents are embedded once)
  prefetched: empty cache, but needed_texts() of all documents encoded in one call first (batches
              length-sorted across documents: less padding), then document_trajectories
  warm cache: the same documents again (overlapping prefixes / units all hit the cache)
Throughput is in units (texts needed by the metrics) per second.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's mechdistill

import torch  # noqa: E402

from mechdistill.anchors.embed import SentenceEmbedder  # noqa: E402
from mechdistill.anchors.trajectories import document_trajectories, needed_texts  # noqa: E402

SENTENCES = [
    "The patient presents with progressive dyspnea and bilateral leg edema.",
    "Echocardiogram shows an ejection fraction of 35 percent, consistent with systolic dysfunction.",
    "This points to heart failure with reduced ejection fraction rather than preserved ejection fraction.",
    "Creatinine rose from 1.2 to 2.1 during diuresis, suggesting cardiorenal syndrome.",
    "Primary renal disease is less likely given the temporal link to volume overload.",
    "Chest x-ray shows pulmonary edema without a focal consolidation, so pneumonia is unlikely.",
    "History of prior myocardial infarction supports an ischemic cardiomyopathy.",
    "Acute myocarditis is not supported by the troponin trend or the clinical course.",
]
ANCHORS = ["Systolic heart failure", "Volume overload", "Cardiorenal syndrome"]
NEAR_MISSES = ["Heart failure with preserved ejection fraction", "Pneumonia", "Acute kidney injury"]


def cot_units(doc: int, n_units: int) -> list[str]:
    """Word-level units (leading whitespace kept) of a CoT built from the sentence pool."""
    rng = random.Random(doc)
    units: list[str] = []
    while len(units) < n_units:
        units += re.findall(r"\s*\w+|\s*[^\w\s]", " " + rng.choice(SENTENCES))
    return units[:n_units]


def run(embedder: SentenceEmbedder, docs: list[list[str]], early: int, max_points: int,
        prefetch: list[str] | None = None) -> float:
    t0 = time.perf_counter()
    if prefetch:
        embedder.encode(prefetch)
    for i, units in enumerate(docs):
        document_trajectories(f"d{i}", units[:early], units[early:], ANCHORS, "; ".join(ANCHORS), NEAR_MISSES,
                              embedder, max_points=max_points)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=6)
    ap.add_argument("--units", type=int, default=240, help="CoT units per document")
    ap.add_argument("--early", type=int, default=30, help="early-segment units")
    ap.add_argument("--max-points", type=int, default=32, help="confusion prefixes per document")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    docs = [cot_units(d, args.units) for d in range(args.docs)]
    texts = [text for units in docs  # every text the metrics need, duplicates included
             for text in needed_texts(units[:args.early], units[args.early:], ANCHORS, "; ".join(ANCHORS),
                                      NEAR_MISSES, args.max_points)]
    embedder = SentenceEmbedder()
    embedder.model.encode(SENTENCES)  # warm-up
    print(f"command: python {' '.join(sys.argv)}")
    print(f"docs={args.docs} units/doc={args.units} early={args.early} max_points={args.max_points} "
          f"threads={args.threads} texts={len(texts)} unique={len(set(texts))}")

    t0 = time.perf_counter()
    embedder.model.encode(texts, batch_size=embedder.batch_size, normalize_embeddings=True)
    no_cache = time.perf_counter() - t0
    embedder.cache.clear()
    cold = run(embedder, docs, args.early, args.max_points)
    embedder.cache.clear()
    prefetched = run(embedder, docs, args.early, args.max_points, prefetch=texts)
    warm = run(embedder, docs, args.early, args.max_points)
    for name, seconds in (("no cache", no_cache), ("cold cache", cold), ("prefetched", prefetched),
                          ("warm cache", warm)):
        print(f"{name:>10}: {seconds:7.2f} s  {len(texts) / seconds:9.0f} units/s  "
              f"speed-up vs no cache {no_cache / seconds:6.1f}x")


if __name__ == "__main__":
    main()
