# Helpers and input functions shared by the rules. Every path comes from mechdistill/paths.py.

from mechdistill.distill.methods import methods_reading_targets


def canonical(obj) -> str:
    """Params as sorted JSON: Snakemake compares params as text, so key order must not matter."""
    return json.dumps(obj, sort_keys=True)


def settings_of(*classes):
    """A rule's `settings` param: the declared keys' values (mechdistill.settings: KEYS) of the settings
    classes its stage builds, per job (a key may name the job's wildcards), so a key a stage reads reruns it."""
    return lambda wc: "\n".join(cls.params(config, **dict(wc.items())) for cls in classes)


def group_targets(*names):
    """The targets of the named groups (all groups if none) whose rules are all defined."""
    defined = {r.name for r in workflow.rules}
    groups = paths.stage_targets(config, methods_reading_targets(config["methods"], config["distill"]["targets"]))
    return [t for name in (names or groups) if set(groups[name][0]) <= defined for t in groups[name][1]]


def defined_targets(_wildcards=None):
    """Every target of every stage that has a rule in this workflow (see mechdistill/paths.py)."""
    return group_targets()


def teacher_split(split, prefix=""):
    """Input function: a split's files as the teacher-forced stages read them (paths.split_files),
    keys prefixed; "clean" is the clean-prompt set (paths.characterization_split)."""
    split = paths.characterization_split(config, split)
    return lambda wc: {prefix + key: path for key, path in paths.split_files(wc.dataset, config["teacher"], split).items()}


def one_of(names):
    """Wildcard constraint matching exactly one of `names` (a name that matches nothing if empty)."""
    return "|".join(re.escape(n) for n in names) or "NO_MATCH"


def raw_dataset_files(wc):
    """Input function: the raw files the dataset's adapter reads (mechdistill.data.sources), so that
    editing one reruns prepare_dataset and everything after it."""
    entry = config["datasets"][wc.dataset]
    return adapter_files(entry["adapter"], entry.get("params") or {})


def trace_file(wc):
    """Input function: with generation.backend file, the split's trace file (editing it reruns the split)."""
    gen = config["generation"]
    return [gen["traces"].format(dataset=wc.dataset, split=wc.split)] if gen["backend"] == "file" else []


def generation_gpus(wc=None):
    """GPUs of a job that generates with generation.backend (resolved at start-up): vLLM's tensor-parallel GPUs."""
    return config["generation"]["tensor_parallel_size"] if config["generation"]["backend"] == "vllm" else 0
