"""CPU throughputs of the demo teacher, and prompt lengths, for `mechdistill plan` (mechdistill/plan.py).

    python benchmarks/throughput_cpu.py [--threads 2] [--out benchmarks/results/throughput_cpu.json]

On SmolLM2-135M-Instruct (config/config.yaml's teacher, float32, `--threads` CPU threads), on a 512-token
sequence (the first 384 tokens of a rendered demo task prompt + 128 random "CoT" tokens), the fastest of
`--repeats` timed runs after a warm-up (other jobs on shared cores only slow a run down):

    forward          one teacher-forced forward: tokens per second
    forward_capture  the same forward with per-head capture (rows, qk, values, writes) of every layer at the
                     first `anchors.early_tokens` CoT positions, as head scoring does
    train            forward, backward and an AdamW step: tokens per second
    decode           greedy decoding after those 384 prompt tokens, a batch of the demo's
                     generation.batch_size (8; mechdistill's TransformersBackend, the demo's generation settings):
                     (tokens of a 17-token generation - of a 1-token one) / (its time - the 1-token one's), i.e.
                     without the prefill, which `forward` prices

and, in SmolLM2's tokenizer (a 49,152-token vocabulary: Llama 3's 128,256 needs fewer tokens), the mean
length of rendered prompts built in memory from the demo's synthetic dataset: the demo's task prompts and
clean prompts of every style it builds, and the clean prompts of config/paper.yaml's `clean_prompts`
settings (n_labels 1,000) in each of its styles. Nothing is written under results/. Takes about 5 minutes
on 2 busy cores (the load average is recorded: other jobs slow every rate).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mechdistill.anchors.embed import SentenceEmbedder  # noqa: E402
from mechdistill.characterize.capture import capture_heads  # noqa: E402
from mechdistill.config import load_config  # noqa: E402
from mechdistill.data import prepare_dataset  # noqa: E402
from mechdistill.data.settings import DatasetSettings  # noqa: E402
from mechdistill.labels import LabelSpace  # noqa: E402
from mechdistill.models import ModelCatalog, load_model  # noqa: E402
from mechdistill.teacher.backends import TransformersBackend  # noqa: E402
from mechdistill.teacher.clean_prompts import build_clean_prompts  # noqa: E402
from mechdistill.teacher.prompts import build_prompts, render_prompt  # noqa: E402

PROMPT_TOKENS, FORCED_COT, DECODE_PROMPT, NEW_TOKENS = 384, 128, 384, 16
STARTED, LOAD_AT_START = time.perf_counter(), os.getloadavg()[0]  # other jobs on the cores slow every rate


def progress(what: str, *seconds: float) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {what}" + "".join(f" {s:.2f} s" for s in seconds),
          file=sys.stderr, flush=True)


def timed(fn, repeats: int, warm_up: bool = True) -> float:
    """Wall seconds of the fastest of `repeats` calls of fn(), after one warm-up call (other jobs on shared
    cores only ever slow a run down)."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def mean_tokens(tokenizer, messages: list[str]) -> float:
    """Mean token count of rendered chats (messages: the JSON column of a prompts table)."""
    return statistics.mean(len(tokenizer(render_prompt(tokenizer, json.loads(m)), add_special_tokens=False)["input_ids"])
                           for m in messages)


def prompt_lengths(config: dict, paper: dict, tokenizer) -> dict:
    """Mean rendered-prompt tokens: demo task prompts (test split), demo clean prompts per style, and
    clean prompts with the paper's clean_prompts settings per paper style (demo documents and labels)."""
    dataset = next(iter(config["datasets"]))
    prepared = prepare_dataset(DatasetSettings.from_config(config, dataset=dataset), dataset)
    space, train, test = LabelSpace(prepared.labels), prepared.splits["train"], prepared.splits["test"]
    embedder = SentenceEmbedder(config["embedder"])
    task = build_prompts(test, space, config["datasets"][dataset]["candidates"], config["prompts"], config["seed"],
                         exemplar_doc=train.iloc[0], embedder=embedder)
    out = {"dataset": dataset, "task": mean_tokens(tokenizer, task["messages"]), "clean": {}, "paper_clean": {}}
    for key, cfg in (("clean", config), ("paper_clean", paper)):
        settings = cfg["clean_prompts"]
        for style in dict.fromkeys([settings["style"], *settings["compare_styles"]]):
            docs = prepared.splits[settings["source_split"]].head(4)
            _, prompts = build_clean_prompts(docs, space, {**settings, "n_docs": 4}, style, cfg["prompts"],
                                             cfg["seed"], embedder, exemplar_doc=train.iloc[0])
            out[key][style] = mean_tokens(tokenizer, prompts["messages"])
    return out, [json.loads(m) for m in task["messages"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/throughput_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(ROOT / "config/config.yaml")
    paper = load_config(ROOT / "config/paper.yaml")
    teacher = config["teacher"]
    model, tokenizer = load_model(ModelCatalog.from_config(config), teacher, device="cpu", dtype="float32")
    n_params, cfg = sum(p.numel() for p in model.parameters()), model.config
    lengths, chats = prompt_lengths(config, paper, tokenizer)
    progress("prompt lengths")

    ids = tokenizer(render_prompt(tokenizer, chats[0]), add_special_tokens=False, return_tensors="pt")["input_ids"]
    prompt = ids[:, :PROMPT_TOKENS]                                           # [1, 384]: a demo task prompt's start
    ids = torch.cat([prompt, torch.randint(0, len(tokenizer), (1, FORCED_COT))], dim=1)  # [1, 512]: + a forced CoT
    seq = ids.shape[1]
    early = list(range(PROMPT_TOKENS, PROMPT_TOKENS + config["anchors"]["early_tokens"]))
    with torch.no_grad():
        forward_s = timed(lambda: model(input_ids=ids, use_cache=False), args.repeats)
        capture_s = timed(lambda: capture_heads(model, ids, query_positions=early), args.repeats)
    progress("forward, forward with capture", forward_s, capture_s)

    # decoding alone: generating 1 + NEW_TOKENS tokens minus generating 1 (the prefill) from the same prompts,
    # a batch of the demo's generation.batch_size (the model is warm from the forwards above)
    backend = TransformersBackend.from_model(model, tokenizer, config["generation"])
    texts = [tokenizer.decode(prompt[0, :DECODE_PROMPT])] * config["generation"]["batch_size"]
    counts = {n: sum(g.n_tokens for g in backend.complete(texts, n)) for n in (1, 1 + NEW_TOKENS)}
    generate_s = {n: timed(lambda n=n: backend.complete(texts, n), args.repeats, warm_up=False) for n in counts}
    decode_s = generate_s[1 + NEW_TOKENS] - generate_s[1]
    progress(f"prefill + 1 token, prefill + {1 + NEW_TOKENS} tokens", *generate_s.values())

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()

    def train_step() -> None:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_s = timed(train_step, args.repeats)
    progress("train step", train_s)
    result = {
        "command": "python benchmarks/throughput_cpu.py " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "host": {"cpus": os.cpu_count(), "torch_threads": args.threads, "torch": torch.__version__,
                 "machine": platform.machine(), "processor": platform.processor(),
                 "load_average_1min_at_start_and_end": [LOAD_AT_START, os.getloadavg()[0]]},
        "model": teacher, "dtype": "float32",
        "arch": {"params": n_params, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
                 "n_kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "hidden_size": cfg.hidden_size,
                 "vocab_size": cfg.vocab_size},
        "tokens_per_s": {
            "decode": (counts[1 + NEW_TOKENS] - counts[1]) / decode_s,
            "forward": seq / forward_s,
            "forward_capture": seq / capture_s,
            "train": seq / train_s,
        },
        "settings": {"decode": {"batch": len(texts), "prompt_tokens": DECODE_PROMPT, "new_tokens": NEW_TOKENS,
                                "generated": counts},
                     "forward": {"seq_len": seq, "capture_queries": len(early)}, "train": {"seq_len": seq}},
        "seconds": {"generate_1": generate_s[1], f"generate_{1 + NEW_TOKENS}": generate_s[1 + NEW_TOKENS],
                    "forward": forward_s, "forward_capture": capture_s, "train": train_s},
        "prompt_tokens": lengths,
        "wall_s": time.perf_counter() - STARTED,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
