"""Peak memory of the real stage code on CPU against the memory model (`mechdistill.plan.memory_terms`).

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/memory_check.py            # every case at 512, 1,024, 2,048
    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/memory_check.py --sizes 512 --cases targets

Each (case, size) runs in a fresh subprocess on config/config.yaml's demo models (the SmolLM2-135M teacher,
its 24-layer student; float32 on CPU, materialised once into the config's cache_dir, offline):

    distill_{mech,vanilla}[_ckpt]  one optimizer step of `objective.student_loss` + backward + AdamW (the
                                   trainer's single-process optimizer; its moments allocated before the step, as
                                   under ZeRO-3 at every step), with the mech method's captures or none, on a
                                   random model of the demo student's shapes with 8 layers (the 24-layer student
                                   at 2,048 tokens takes too long on 2 shared cores);
                                   _ckpt: activation checkpointing (`trainer.enable_gradient_checkpointing` when
                                   it exists, else transformers' gradient_checkpointing_enable(use_reentrant=False))
    targets                        `objective.teacher_targets` on the teacher (what the teacher_targets stage runs)
    head_scores                    `head_scores.score_document` on the teacher (both captures)
    patching                       `runs.DocumentRuns`: both reference runs, then one batched patched run per
                                   direction (batch 5 head sets, 24 greedy steps)

A document of `size` tokens is synthetic (random ids; a quarter CoT; 24 early queries, 16 refinement positions,
16 + 16 mention keys): memory depends on the shapes, not the text. The measured value is the peak RSS of the
child (VmHWM, reset after the imports) minus its RSS after the imports and before the stage's model is loaded;
both are printed. The prediction is `plan.memory_terms` of the case with CPU facts: float32 values, one process
(no ZeRO: weights, gradients and AdamW's two moments in float32), SDPA's kernel (transformers' default) as the
model reports it. Writes benchmarks/results/memory_check.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SIZES = (512, 1024, 2048)
CASES = ("distill_mech", "distill_mech_ckpt", "distill_vanilla", "distill_vanilla_ckpt", "targets", "head_scores",
         "patching")
CONFIG = "config/config.yaml"
OUT = Path("benchmarks/results/memory_check.json")
EARLY, REFINE, MENTIONS, TOP_K, BATCH, STEPS = 24, 16, 16, 20, 5, 24
STUDENT_LAYERS = 8  # the distill cases: the demo student's shapes (SmolLM2-135M's) with 8 random layers


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


# ----------------------------------------------------------------------------- the child


def child(case: str, size: int) -> dict:
    import torch

    from mechdistill import plan
    from mechdistill.characterize.head_scores import score_document
    from mechdistill.characterize.teacher_forcing import ForcedSequence
    from mechdistill.config import load_config
    from mechdistill.distill import objective, trainer
    from mechdistill.distill.methods import resolve_method  # noqa: F401 (imported by the child before its baseline)
    from mechdistill.distill.pools import HeadPool
    from mechdistill.distill.signals import Example
    from mechdistill.models import ModelCatalog, load_model, resolve_model_path
    from mechdistill.patching.runs import DIRECTIONS, DocumentRuns

    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = load_config(CONFIG)
    teacher_case = case in ("targets", "head_scores", "patching")
    name = config["teacher"] if teacher_case else f"{config['students'][0]} shapes, {STUDENT_LAYERS} random layers"
    catalog = ModelCatalog.from_config(config)
    student_config = None
    if not teacher_case:  # the demo student's shapes with fewer layers, random weights: 2 shared cores afford it
        from transformers import AutoConfig, AutoModelForCausalLM

        student_config = AutoConfig.from_pretrained(resolve_model_path(catalog, config["students"][0]))
        student_config.num_hidden_layers = STUDENT_LAYERS
    note = ""
    rss_imports = rss_bytes()
    reset_peak()
    if teacher_case:
        model, tokenizer = load_model(catalog, name, device="cpu", dtype="float32")
    else:
        model, tokenizer = AutoModelForCausalLM.from_config(student_config), None
    rss_loaded = rss_bytes()
    cfg = model.config
    facts = plan.ModelFacts(params=sum(p.numel() for p in model.parameters()), n_layers=cfg.num_hidden_layers,
                            n_heads=cfg.num_attention_heads, n_kv_heads=cfg.num_key_value_heads,
                            head_dim=cfg.hidden_size // cfg.num_attention_heads, hidden_size=cfg.hidden_size,
                            vocab_size=cfg.vocab_size, intermediate_size=cfg.intermediate_size)
    flash = cfg._attn_implementation.removeprefix("mechdistill_") in ("sdpa", "flash_attention_2")

    n_cot = size // 4
    cot_start = size - n_cot
    gen = torch.Generator().manual_seed(size)
    ids = torch.randint(10, cfg.vocab_size, (size,), generator=gen)
    early = list(range(cot_start - 1, cot_start - 1 + EARLY))
    keys = sorted(torch.randperm(cot_start - 2, generator=gen)[:2 * MENTIONS].add(1).tolist())
    refine = sorted(range(cot_start + EARLY, size - 1, max(1, (n_cot - EARLY) // REFINE)))[:REFINE]
    shortlist, nearmiss = keys[::2], keys[1::2]
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    pool_cfg = config["distill"]["pools"]

    def pool(phase: str) -> HeadPool:
        lo, hi = pool_cfg[phase]["layers"]
        layers = [i for i in range(L) if lo <= i / max(L - 1, 1) <= hi]
        heads = [(layers[i % len(layers)], (i * 7) % H) for i in range(pool_cfg[phase]["k"])]
        return HeadPool(heads, torch.full((len(heads),), 1 / len(heads)))

    pools = {"phase1": pool("phase1"), "phase2": pool("phase2")}
    captured = len({layer for p in pools.values() for layer in p.layers})
    ex = Example(doc_id="d", input_ids=ids, text="x" * size, offsets=[(i, i + 1) for i in range(size)],
                 cot_start=cot_start, early_queries=early, refine=refine, refine_span=list(range(len(refine))),
                 keys=shortlist + nearmiss, n_shortlist=len(shortlist), anchor_token_ids=[[101], [202, 203]],
                 target_tokens=[300, 301], nearmiss_tokens=[400, 401], document_positions=list(range(1, cot_start)))
    mech = dict(capture=("rows", "writes", "qk", "value_writes"), n_query=EARLY + len(refine),
                n_key=2 * MENTIONS, captured_layers=captured)
    base = dict(seq=size, b=4, gpus=1, n_cot=n_cot, flash=flash)

    if case.startswith("distill"):
        method = _method(case)
        targets = {"input_ids": ids, "offsets": torch.tensor(ex.offsets).reshape(-1, 2),
                   "topk_values": torch.randn(n_cot, TOP_K), "topk_indices": torch.randint(0, cfg.vocab_size, (n_cot, TOP_K)),
                   "p1.rows": torch.softmax(torch.randn(EARLY, size), -1), "p1.align": torch.rand(EARLY),
                   "p1.sharpness": torch.rand(EARLY), "p1.mask": torch.ones(EARLY, dtype=torch.bool),
                   "p1.queries": torch.tensor(early), "p2.loopback": torch.rand(len(refine)),
                   "p2.helpfulness": torch.rand(len(refine)), "p2.mask": torch.ones(len(refine), dtype=torch.bool),
                   "p2.span": torch.arange(len(refine))}
        checkpointing = case.endswith("_ckpt")
        if checkpointing:
            enable = getattr(trainer, "enable_gradient_checkpointing", None)
            if enable is not None:
                enable(model)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                note = "transformers' gradient_checkpointing_enable (trainer.enable_gradient_checkpointing absent)"
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        for p in model.parameters():  # AdamW's moments allocated first, as they are at every step under ZeRO-3
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        terms = objective.student_loss(model, ex, targets, pools, method, tau=0.01, temperature=2.0)
        terms["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        case_ = plan.MemoryCase("train", **base, **(mech if "mech" in case else {}), checkpointing=checkpointing,
                                zero3=False)
    elif case == "targets":
        with torch.no_grad():
            out = objective.teacher_targets(model, ex, pools, tau=0.01, top_k=TOP_K)
        assert out["topk_values"].shape == (n_cot, TOP_K)
        case_ = plan.MemoryCase("forward", **base, **mech, logits="cot")
    elif case == "head_scores":
        seq = ForcedSequence(ids, 0, cot_start, early, refine, shortlist, nearmiss, list(range(1, cot_start)))
        out = score_document(model, tokenizer, seq, ["heart failure", "asthma"], ["heart failure"], ["asthma"],
                             tau=0.01, n_stages=4)
        assert "coarse" in out and "refine" in out
        case_ = plan.MemoryCase("forward", **base, **dict(mech, captured_layers=L, n_query=max(EARLY, len(refine))),
                                logits_held=0)  # score_document asks for logits_to_keep=1: no [s, V]
    elif case == "patching":
        prompt = ids[:size - STEPS]  # the prefix; the patched runs decode STEPS tokens after it
        heads = [(layer, head) for layer in range(L) for head in range(H)]
        sets = [heads[i::BATCH][:8] for i in range(BATCH)]
        runs = DocumentRuns(model, STEPS, sorted({h for s in sets for h in s}))
        runs.reference("clean", prompt)
        runs.reference("corrupt", torch.flip(prompt, [0]))
        for direction in DIRECTIONS:
            runs.patched(direction, sets)
        case_ = plan.MemoryCase("patch", **dict(base, seq=size - STEPS), batch=BATCH, new_tokens=STEPS)
    else:
        raise ValueError(case)
    peak = peak_bytes()
    return {"case": case, "size": size, "model": name, "memory_case": dataclasses.asdict(case_),
            "facts": dataclasses.asdict(facts), "attention": cfg._attn_implementation, "flash": flash,
            "rss_imports_gb": rss_imports / 1e9, "rss_loaded_gb": rss_loaded / 1e9, "peak_rss_gb": peak / 1e9,
            "measured_gb": (peak - rss_imports) / 1e9, "note": note}


def _method(case: str):
    from mechdistill.distill.methods import resolve_method  # noqa: F401 (imported by the child before its baseline)

    return resolve_method("mech" if "mech" in case else "vanilla", {})


# ----------------------------------------------------------------------------- the parent


PREPARE = """from mechdistill.config import load_config
from mechdistill.models import ModelCatalog, resolve_model_path
config = load_config("config/config.yaml")
for name in (config["teacher"], *config["students"]):
    print(resolve_model_path(ModelCatalog.from_config(config), name))"""  # materialised before any measurement


def run_case(case: str, size: int) -> dict:
    if case == "distill_mech_ckpt" and not _has_checkpointing_guard():
        return {"case": case, "size": size, "skipped": "the capture hooks record again in the recomputed forward "
                "(torch CheckpointError) until trainer.enable_gradient_checkpointing guards them"}
    cmd = [sys.executable, __file__, "--child", case, str(size)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{case} at {size}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _has_checkpointing_guard() -> bool:
    from mechdistill.distill import trainer

    return hasattr(trainer, "enable_gradient_checkpointing")


def table(rows: list[dict]) -> str:
    lines = ["| case | tokens | RSS after imports GB | peak RSS GB | measured GB | predicted GB | error % |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['case']} | {r['size']:,} | skipped: {r['skipped']} | | | | |")
            continue
        lines.append(f"| {r['case']} | {r['size']:,} | {r['rss_imports_gb']:.2f} | {r['peak_rss_gb']:.2f} | "
                     f"{r['measured_gb']:.2f} | {r['predicted_gb']:.2f} | {r['error_pct']:+.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", nargs=2, metavar=("CASE", "SIZE"))
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (each in its own process)")
    parser.add_argument("--repredict", action="store_true",
                        help="recompute the predictions of --out's measured rows with the current memory model")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return 0
    if args.repredict:  # the measured rows of an earlier run against the memory model as it is now
        saved = json.loads(args.out.read_text())
        saved["rows"] = [scored(row) for row in saved["rows"]]
        args.out.write_text(json.dumps(saved, indent=1))
        print(table(saved["rows"]))
        return report(saved["rows"])
    subprocess.run([sys.executable, "-c", PREPARE], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    rows, start = [], time.time()
    todo = [(case, size) for case in args.cases for size in args.sizes]
    with ThreadPoolExecutor(args.jobs) as pool:  # RSS is per process: concurrent children do not disturb it
        for (case, size), row in zip(todo, pool.map(lambda t: run_case(*t), todo)):
            rows.append(scored(row))
            if "skipped" in row:
                print(f"{case} {size}: skipped ({row['skipped']})", file=sys.stderr, flush=True)
                continue
            print(f"{case} {size}: measured {row['measured_gb']:.2f} GB, predicted {row['predicted_gb']:.2f} GB "
                  f"({row['error_pct']:+.0f}%) {row['note']}", file=sys.stderr, flush=True)
            save(args.out, rows, start)  # after every case: a long run keeps what it measured
    save(args.out, rows, start)
    print(table(rows))
    return report(rows)


def save(out: Path, rows: list[dict], start: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/memory_check.py",
                               "date": time.strftime("%Y-%m-%d", time.gmtime()), "machine": os.uname().nodename,
                               "cpus": os.cpu_count(), "seconds": round(time.time() - start), "rows": rows},
                              indent=1))


def report(rows: list[dict]) -> int:
    worst = max(abs(r["error_pct"]) for r in rows if "skipped" not in r)
    print(f"\nworst error {worst:.0f}% (limit 25%)")
    return 0 if worst <= 25 else 1


def scored(row: dict) -> dict:
    """`row` with the memory model's prediction (its terms and their sum) and the error."""
    from mechdistill import plan

    if "skipped" in row:
        return row

    terms = plan.memory_terms(plan.MemoryCase(**{k: tuple(v) if isinstance(v, list) else v
                                                 for k, v in row["memory_case"].items()}),
                              plan.ModelFacts(**row["facts"]))
    row["terms_gb"] = {k: v / 1e9 for k, v in terms.items() if v}
    row["predicted_gb"] = sum(terms.values()) / 1e9
    row["error_pct"] = 100 * (row["predicted_gb"] - row["measured_gb"]) / row["measured_gb"]
    return row


if __name__ == "__main__":
    sys.exit(main())
