"""Teacher-CoT generation with `transformers` and `vllm` on the same chats: speed, start-up, memory, agreement.

    python benchmarks/generation.py [--config config/config.yaml] [--batch-sizes 1,8,24] [--threads 2]
                                    [--engines transformers,vllm] [--json out.json]

The config's teacher generates its CoT for the first max(batch sizes) task prompts of the first dataset's
test split (built in memory from the dataset adapter: nothing is written under results/), with the
config's generation settings (greedy, max_new_tokens, repetition_penalty, dtype) and budget forcing off.
Each engine runs in its own process, on `--threads` CPU threads:

    start-up     seconds to a ready backend (model load; vLLM: engine start, KV-cache allocation)
    batch b      tokens/s generating the first b chats as one batch (prefill included), after a
                 1-chat warm-up; vLLM schedules a batch itself
    peak RSS     the largest resident memory of the engine's process tree (vLLM: front end + engine
                 core), sampled every 0.1 s
    agreement    chats whose text is identical across the engines, per batch size

`--json` writes every number and the texts. Slow on 2 cores: the transformers pass alone ran over 9 minutes
(2026-12-02; batch 24 of ~900-token prompts); `--batch-sizes 1,8` is quicker.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def chats_of(config: dict, n: int) -> list[list[dict]]:
    from mechdistill.data import prepare_dataset
    from mechdistill.data.settings import DatasetSettings
    from mechdistill.labels import LabelSpace
    from mechdistill.teacher.prompts import build_prompts

    dataset = next(iter(config["datasets"]))
    prepared = prepare_dataset(DatasetSettings.from_config(config, dataset=dataset), dataset)
    docs = prepared.splits["test"]
    if len(docs) < n:
        docs = docs.sample(n, replace=True, random_state=0)  # more chats than test documents: repeat some
    prompts = build_prompts(docs.head(n), LabelSpace(prepared.labels), config["datasets"][dataset]["candidates"],
                            config["prompts"], config["seed"], exemplar_doc=prepared.splits["train"].iloc[0])
    return [json.loads(m) for m in prompts["messages"]]


def run_engine(args) -> None:
    """Child process: one engine's start-up, then each batch size; JSON on stdout's last line."""
    import torch

    from mechdistill.config import load_config
    from mechdistill.model_sources import ModelCatalog
    from mechdistill.teacher.backends import make_backend

    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    gen = {**config["generation"], "backend": args.engine, "force_answer_tokens": 0, "device": "cpu"}
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    chats = chats_of(config, max(sizes))
    started = time.perf_counter()
    backend = make_backend(ModelCatalog.from_config(config), config["teacher"], gen)
    out = {"engine": backend.engine, "startup_s": time.perf_counter() - started, "batches": {}}
    backend(chats[:1])  # warm-up
    for b in sizes:
        started = time.perf_counter()
        generations = backend(chats[:b])
        seconds = time.perf_counter() - started
        out["batches"][b] = {"seconds": seconds, "tokens": sum(g.n_tokens for g in generations),
                             "texts": [g.text for g in generations]}
    print(json.dumps(out))


def peak_rss(pid: int, stop: threading.Event, result: list) -> None:
    import psutil

    root, peak = psutil.Process(pid), 0
    while not stop.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs))
        except psutil.Error:
            pass
        time.sleep(0.1)
    result.append(peak)


def measure(args, engine: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--child", engine, "--config", args.config, "--batch-sizes", args.batch_sizes,
           "--threads", str(args.threads)]
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, env=env, cwd=ROOT)
        stop, peak = threading.Event(), []
        watcher = threading.Thread(target=peak_rss, args=(proc.pid, stop, peak))
        watcher.start()
        code = proc.wait()
        stop.set()
        watcher.join()
        out.seek(0)
        lines = out.read().strip().splitlines()
    if code != 0 or not lines:
        raise SystemExit(f"{engine}: the benchmark process failed (exit {code}); its stderr is above")
    return {**json.loads(lines[-1]), "peak_rss_gb": peak[0] / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--batch-sizes", default="1,8,24")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default="transformers,vllm")
    ap.add_argument("--json", help="write every number and text here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.engine = args.child
        return run_engine(args)
    results = {engine: measure(args, engine) for engine in args.engines.split(",")}
    sizes = [str(b) for b in args.batch_sizes.split(",")]
    print(f"{datetime.date.today()}, {platform.machine()} {os.cpu_count()} CPUs, {args.threads} threads, "
          f"config {args.config}")
    print("| engine | start-up | " + " | ".join(f"batch {b}" for b in sizes) + " | peak RSS |")
    print("|---|---|" + "---|" * len(sizes) + "---|")
    for r in results.values():
        rates = [r["batches"][b]["tokens"] / r["batches"][b]["seconds"] for b in sizes]
        print(f"| {r['engine']} | {r['startup_s']:.0f} s | " + " | ".join(f"{x:.1f} tok/s" for x in rates)
              + f" | {r['peak_rss_gb']:.1f} GB |")
    if len(results) > 1:
        first, *others = results.values()
        for b in sizes:
            same = sum(all(o["batches"][b]["texts"][i] == t for o in others)
                       for i, t in enumerate(first["batches"][b]["texts"]))
            print(f"batch {b}: {same} of {len(first['batches'][b]['texts'])} texts identical across engines")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
