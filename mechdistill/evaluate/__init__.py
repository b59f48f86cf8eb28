"""Phase 7: how good and how faithful a distilled student is (App. D, E), and the paper's tables.

xmc.py           task metrics of multi-label answers: P@k, nDCG@k, PSP@k, R@k, F1, macro/micro-F1
text.py          trace imitation: BLEU-4 against the teacher's trace, perplexity of that trace
las.py           Leakage-Adjusted Simulatability: simulators, per-document contributions, the LAS table
significance.py  paired Wilcoxon signed-rank test and paired bootstrap CI of a difference
tables.py        Tables 1-4 (Δ vs best baseline, significance marks) and Figure 9's data
plots.py         Figure 9
claims.py        a verdict on each claim of the paper from this run's artifacts (results/claims.md)
card.py          a published student's model card (model/README.md): what it is, how it was made, its scores

Functions take lists, arrays and DataFrames; `mechdistill.stages.evaluate` reads the artifacts.
"""
