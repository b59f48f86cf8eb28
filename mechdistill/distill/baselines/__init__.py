"""The CoT-distillation baselines the paper compares with, one module each (kind "baseline").

catalog   names, settings and teacher needs of the four, without torch (what Snakemake and the config checks read)
recipe    the interface (Item, Recipe) and the causal-LM pieces the four share
unicott   UniCoTT: structured explanations, node contrastive + structural-consistency losses
morsd     MoRSD: sampled rationales selected by the student's Rationale Difficulty
semcot    SemCoT: implicit thought tokens aligned with the reasoning, answered from them
cwt       CWT / Skip-Thinking: chunk-wise CoT supervision, then learning to skip chunks
"""
