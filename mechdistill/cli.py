"""`mechdistill <stage> ...`: run one stage by hand, outside Snakemake.

Paths default to the artifact layout of `mechdistill.paths` (results/..., see docs/pipeline.md),
so a stage run by hand and by Snakemake write the same files.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from .config import load_config
from .distill.launch import rendezvous_env
from .errors import MechdistillError
from .logutil import rule_logging
from .plan import (
    CPU_THROUGHPUT,
    GPU_SOURCES,
    load_cpu_throughput,
    load_gpu_sources,
    plan_table,
    render_markdown,
    stage_summary,
)
from .startup import check_config
from .teacher.engines import resolve_engines

STAGES = {
    "validate-config": "check a config file against config/schema.yaml and print it with defaults",
    "prepare-model": "materialise a model entry (GGUF conversion, layer subset, random init) into cache_dir",
    "prepare-dataset": "build results/{dataset}/data/{split}.parquet and labels.parquet",
    "build-prompts": "build results/{dataset}/prompts/{split}.parquet",
    "teacher-cot": "generate results/{dataset}/{teacher}/cot/{split}.parquet (resumable)",
    "plan": "the cost model of a config: per stage the tokens generated / teacher-forced / trained on, patched "
            "runs, GPU-hours (with the cited source of each throughput), CPU-hours at the throughputs measured "
            "here, peak memory per GPU and host memory per node (docs/scale.md, 'The memory model'; mechdistill/plan.py; docs/plan.md)",
    "distill": "train one grid point of a method: results/{dataset}/{student}/{method}/grid/{point}/ "
               "(the `distill` rule starts one per rank with torchrun or srun; resumes from its checkpoint)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mechdistill",
        description="Characterize Then Distill: run one pipeline stage by hand. "
                    "The whole pipeline runs with `snakemake --cores all`.",
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, help_text in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", "--configfile", dest="config", default="config/config.yaml",
                       help="config YAML (default: %(default)s; --configfile as for snakemake)")
        if name == "prepare-model":
            p.add_argument("model", help="key of config 'models'")
        if name in ("prepare-dataset", "build-prompts", "teacher-cot"):
            p.add_argument("dataset", help="key of config 'datasets'")
        if name in ("build-prompts", "teacher-cot"):
            p.add_argument("split", choices=["train", "val", "test"])
        if name == "teacher-cot":
            p.add_argument("--model", help="key of config 'models' (default: the config's teacher)")
        if name == "distill":
            p.add_argument("dataset", help="key of config 'datasets'")
            p.add_argument("student", help="key of config 'models' listed in 'students'")
            p.add_argument("method", help="key of config 'methods'")
            p.add_argument("point", nargs="?", default="default",
                           help="grid point name (default: %(default)s, a method without a grid)")
            p.add_argument("--log-file", help="log file (rank 0; the other ranks log to stderr)")
        if name == "plan":
            p.add_argument("--detail", action="store_true",
                           help="one row per stage, dataset and model instead of one per stage")
            p.add_argument("--gpu-sources", default=GPU_SOURCES,
                           help="cited GPU throughputs and hardware (default: %(default)s)")
            p.add_argument("--cpu-throughput", default=CPU_THROUGHPUT,
                           help="throughputs measured by benchmarks/throughput_cpu.py (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        for key in ("dataset", "model"):
            value = getattr(args, key, None)
            section = "datasets" if key == "dataset" else "models"
            if value is not None and value not in config[section]:
                raise MechdistillError(f"{key} {value!r} is not a key of '{section}' in {args.config} "
                                       f"(defined: {', '.join(config[section])}).")
        if args.stage == "distill":
            for value, section in ((args.student, "students"), (args.method, "methods")):
                if value not in config[section]:
                    raise MechdistillError(f"{value!r} is not in '{section}' of {args.config} "
                                           f"(there: {', '.join(config[section])}).")
            return _distill(config, args)
        if args.stage == "plan":
            gpu = load_gpu_sources(args.gpu_sources)
            resolved = resolve_engines(config)  # as the Snakefile does: the plan costs the engine that runs
            if resolved:
                print(f"mechdistill: {resolved}", file=sys.stderr)
            table = plan_table(config, gpu=gpu, cpu=load_cpu_throughput(args.cpu_throughput))
            print(render_markdown(table if args.detail else stage_summary(table), gpu))
            return 0
        with rule_logging(None):
            if args.stage == "validate-config":
                check_config(config, args.config)
                print(yaml.safe_dump(config, sort_keys=False))
                return 0
            # The stages import torch and transformers (seconds): only a command that runs one loads them.
            from .models import ModelCatalog, resolve_model_path
            from .stages.data import run_build_prompts, run_prepare_dataset
            from .stages.teacher import run_teacher_cot

            if args.stage == "prepare-model":
                print(resolve_model_path(ModelCatalog.from_config(config), args.model))
            elif args.stage == "prepare-dataset":
                run_prepare_dataset(config, args.dataset)
            elif args.stage == "build-prompts":
                run_build_prompts(config, args.dataset, args.split)
            elif args.stage == "teacher-cot":
                run_teacher_cot(config, args.dataset, args.split, model=args.model)
    except MechdistillError as exc:
        print(f"mechdistill: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _distill(config: dict, args: argparse.Namespace) -> int:
    """One rank of a distillation run: rank 0 logs to --log-file, the others to stderr."""
    from .stages.distill import run_distill  # torch, transformers, deepspeed: only when a run starts

    rank = int(rendezvous_env(os.environ)["RANK"])
    with rule_logging(args.log_file if rank == 0 else None):
        run_distill(config, args.dataset, args.student, args.method, args.point)
    return 0
