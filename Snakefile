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

from mechdistill import paths, warm  # noqa: E402
from mechdistill.config import config_snapshot, layer_model_entries, load_config, validate_config  # noqa: E402
from mechdistill.data.sources import adapter_files  # noqa: E402
from mechdistill.logutil import failed_job_errors  # noqa: E402
from mechdistill.errors import MechdistillError  # noqa: E402
from mechdistill.startup import check_config  # noqa: E402
from mechdistill.teacher.engines import resolve_engines  # noqa: E402

# No `configfile:` directive: Snakemake would merge the demo into --configfile (keeping its
# datasets). The demo config is the default only when no config file is given.
if "datasets" not in config:
    config.update({**load_config(f"{workflow.basedir}/config/config.yaml"), **config})
CONFIG_SOURCE = ", ".join(map(str, workflow.configfiles)) or "config/config.yaml"  # the config files, as errors name them
try:  # a mistake in the config stops here as one line naming the key, before any job
    layer_model_entries(config, workflow.configfiles)  # a model entry a later --configfile redefines replaces the earlier
    validate_config(config, source=CONFIG_SOURCE)
    validate(config, "config/schema.yaml")
    # generation.backend / student_backend auto, resolved once here: the rules (GPUs, conda env), the snapshot and the
    # jobs see the engine that runs (on a cluster, resolved where Snakemake starts: name vllm there to run it on GPUs)
    check_config(config, CONFIG_SOURCE)
    _resolved = resolve_engines(config)
except MechdistillError as err:
    logger.error(f"mechdistill: error: {type(err).__name__}: {err}")
    sys.exit(1)
if _resolved:
    logger.info(f"mechdistill: {_resolved}")
# Shell rules whose processes load the config themselves (the ranks of `distill`) read this snapshot,
# and import mechdistill from this checkout.
CONFIG_SNAPSHOT = config_snapshot(config)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [workflow.basedir, os.environ.get("PYTHONPATH")]))

report: "report/workflow.rst"


onstart:  # jobs run here start as forks of a server that imported torch and transformers once (mechdistill.warm)
    warm.start_for_workflow(len(workflow.dag), workflow.local_exec, ".snakemake/log")


onsuccess:
    warm.stop_for_workflow()


onerror:  # a job stopped by a user's mistake (ConfigError, InputError) logged it as one line: repeat it last
    warm.stop_for_workflow()
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
