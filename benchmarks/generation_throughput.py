"""Teacher-CoT generation throughput of the transformers backend, by batch size.

    python benchmarks/generation_throughput.py [--config config/config.yaml] [--docs 8]

Prints generated tokens per second for each batch size and the speed-up over batch size 1,
on the config's teacher and the first documents of its first dataset's test split (built
in memory; nothing is written under results/).
"""

from __future__ import annotations

import argparse
import json
import time

from mechdistill.config import load_config
from mechdistill.data import prepare_dataset
from mechdistill.labels import LabelSpace
from mechdistill.teacher.backends import TransformersBackend
from mechdistill.teacher.prompts import build_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--batch-sizes", default="1,4,8")
    args = ap.parse_args()
    config = load_config(args.config)
    dataset = next(iter(config["datasets"]))
    prepared = prepare_dataset(config, dataset)
    space = LabelSpace(prepared.labels)
    prompts = build_prompts(prepared.splits["test"].head(args.docs), space, config["datasets"][dataset]["candidates"],
                            config["prompts"], config["seed"], exemplar_doc=prepared.splits["train"].iloc[0])
    chats = [json.loads(m) for m in prompts["messages"]]
    backend = TransformersBackend(config, config["teacher"], config["generation"])
    backend(chats[:1])  # warm-up
    base = None
    print(f"teacher={config['teacher']} docs={len(chats)} max_new_tokens={config['generation']['max_new_tokens']}")
    for bs in map(int, args.batch_sizes.split(",")):
        start = time.perf_counter()
        outs = [g for i in range(0, len(chats), bs) for g in backend(chats[i:i + bs])]
        seconds = time.perf_counter() - start
        rate = sum(g.n_tokens for g in outs) / seconds
        base = base or rate
        print(f"batch_size={bs:2d}  {rate:7.1f} tokens/s  ({seconds:6.1f} s)  speed-up vs 1: {rate / base:.2f}x")


if __name__ == "__main__":
    main()
