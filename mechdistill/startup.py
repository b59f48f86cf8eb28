"""The checks that run before any job (the Snakefile and `mechdistill validate-config`): everything about a
config that can be known without loading a model or reading a dataset, each failure a ConfigError naming the key.
Imports no torch, so start-up stays quick."""

from __future__ import annotations

from .distill.methods import check_method_students, check_methods
from .distill.pool_ranges import check_pool_ranges
from .model_sources import check_model_entries
from .patching.settings import check_patching_bins
from .teacher.engines import check_engines


def check_config(config: dict, source: str) -> None:
    """Engines, model entries, head-pool bands, patching bins and method settings of a validated config."""
    check_engines(config)  # generation.backend vllm on a CPU where its CPU build cannot run
    check_model_entries(config, source)  # local folders without a model; students deeper than their base
    check_pool_ranges(config, source)  # a pool band with no layer of a model
    check_patching_bins(config, source)  # a bin past the teacher's heads
    # every method's settings and grid values against their declarations (type, range; catalog.Setting), grid keys
    # the method computes, the training budget shared by every method
    check_methods(config["methods"], config["distill"]["select"]["criterion"], source)
    check_method_students(config["methods"], list(config["students"]), source)
