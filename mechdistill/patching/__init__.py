"""Phase 5 (beside distillation): activation patching of the teacher's attention patterns (Figures 5 and 8).

corruptions.py  token-aligned Phase-1 (neutral terms) and Phase-2 (near-miss swaps) corruptions
head_sets.py    cumulative bins of top-ranked heads and count-matched near-zero / most-negative / random controls
patterns.py     step-by-step pattern recording (PatternTape) and replacement (PatternPatch)
runs.py         cached reference runs and batched patched greedy runs of one document
experiment.py   one document's clean/corrupted pair (Phase-1 words never chosen by the ranked heads), its
                metric and all of its runs
effects.py      restoration, disruption and relative change, per document and summarised
plots.py        Figures 5 and 8
"""
