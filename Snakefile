# mechdistill: Characterize Then Distill, end to end.
#   snakemake --cores all                                    # the offline CPU demo (config/config.yaml)
#   snakemake --configfile config/paper.yaml --workflow-profile profiles/slurm
#   snakemake table1                                         # one target (table1..4, figure9, ...)
#   snakemake --cores 1 --report report.html                 # tables and figures with captions
import json
import os
import re
import sys

from snakemake.utils import min_version, validate

min_version("9.0")
sys.path.insert(0, workflow.basedir)
# Weights come from packages, local dirs or the HF cache; never from the network mid-run.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mechdistill import paths  # noqa: E402
from mechdistill.config import config_snapshot, layer_model_entries, load_config, validate_config  # noqa: E402
from mechdistill.data.sources import adapter_files  # noqa: E402
from mechdistill.distill.methods import check_methods  # noqa: E402
from mechdistill.distill.pool_ranges import check_pool_ranges  # noqa: E402
from mechdistill.logutil import failed_job_errors  # noqa: E402
from mechdistill.model_sources import check_model_entries  # noqa: E402
from mechdistill.patching.settings import check_patching_bins  # noqa: E402
from mechdistill.teacher.engines import check_engines, resolve_engines  # noqa: E402

# No `configfile:` directive: Snakemake would merge the demo into --configfile (keeping its
# datasets). The demo config is the default only when no config file is given.
if "datasets" not in config:
    config.update({**load_config(f"{workflow.basedir}/config/config.yaml"), **config})
layer_model_entries(config, workflow.configfiles)  # a model entry a later --configfile redefines replaces the earlier
CONFIG_SOURCE = ", ".join(map(str, workflow.configfiles)) or "config/config.yaml"  # the config files, as errors name them
validate_config(config, source=CONFIG_SOURCE)
validate(config, "config/schema.yaml")
check_engines(config)  # generation.backend vllm on a CPU where its CPU build cannot run: stop before any job
# generation.backend / student_backend auto, resolved once here: the rules (GPUs, conda env), the snapshot and the jobs
# see the engine that runs (on a cluster, resolved where Snakemake starts: name vllm there to run it on GPU nodes)
_resolved = resolve_engines(config)
if _resolved:
    logger.info(f"mechdistill: {_resolved}")
check_model_entries(config, CONFIG_SOURCE)  # local folders without a model; students deeper than their base
check_pool_ranges(config, CONFIG_SOURCE)  # a pool band with no layer of a model
check_patching_bins(config, CONFIG_SOURCE)  # a bin past the teacher's heads
# every method's settings and grid values against their declarations (type, range; catalog.Setting), grid keys the
# method computes, the training budget shared by every method
check_methods(config["methods"], config["distill"]["select"]["criterion"], CONFIG_SOURCE)
# Shell rules whose processes load the config themselves (the ranks of `distill`) read this snapshot,
# and import mechdistill from this checkout.
CONFIG_SNAPSHOT = config_snapshot(config)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [workflow.basedir, os.environ.get("PYTHONPATH")]))

report: "report/workflow.rst"


onerror:  # a job stopped by a user's mistake (ConfigError, InputError) logged it as one line: repeat it last
    for line in failed_job_errors(log):
        logger.error(f"mechdistill: {line}")

include: "rules/common.smk"


wildcard_constraints:
    dataset=one_of(config["datasets"]),
    split=one_of(paths.SPLITS) + "|" + paths.CLEAN_SPLIT_PATTERN,


rule all:
    input:
        defined_targets,
    default_target: True


include: "rules/data.smk"
include: "rules/teacher.smk"
include: "rules/anchors.smk"
include: "rules/characterize.smk"
include: "rules/patching.smk"
include: "rules/distill.smk"
include: "rules/evaluate.smk"
include: "rules/claims.smk"
