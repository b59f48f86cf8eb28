# Mechanistic distillation: teacher targets, the baselines' extra teacher data, one training job per (student,
# method, grid point), the choice of each method's grid point on val (select_distill), student predictions.

from mechdistill.distill.launch import local_launcher
from mechdistill.distill.methods import (
    POINT_PATTERN,
    grid_point,
    method_grid,
    methods_reading_targets,
    needs_teacher_data,
    resolve_method,
)
from mechdistill.distill.settings import (
    BaselineDataSettings,
    CardSettings,
    DistillSettings,
    SelectSettings,
    StudentPredictSettings,
    TargetSettings,
)


# student_backend (auto resolved at start-up: the teacher's backend) vllm: the rule runs in envs/vllm.yaml
STUDENTS_USE_VLLM = config["generation"]["student_backend"] == "vllm"


def grid_points(method):
    """The {point} values of `method`'s distill jobs, in grid order ("default" without a grid)."""
    return [point.name for point in method_grid(method, config["methods"][method])]


def teacher_data_methods():
    """The configured baselines whose settings ask the teacher for extra data (the {method} of baseline_teacher_data)."""
    return [m for m, s in config["methods"].items() if needs_teacher_data(m, s)]


def baseline_inputs(wc):
    """Input function of distill: the method's teacher data for train and val, if it has any."""
    if wc.method not in teacher_data_methods():
        return {}
    return {f"{split}_baseline_data": paths.baseline_data(wc.dataset, config["teacher"], wc.method, split)
            for split in ("train", "val")}


def targets_inputs(wc):
    """Input function of distill: the teacher's targets of train and val, for a method that reads them
    (its recipe needs them and distill.targets is precomputed; `methods.methods_reading_targets`)."""
    if wc.method not in methods_reading_targets(config["methods"], config["distill"]["targets"]):
        return {}
    return {f"{split}_targets": paths.targets_tensors(wc.dataset, config["teacher"], split) for split in ("train", "val")}


def grid_files(path):
    """Input function: the file `path(dataset, student, method)` of every grid point of the job's method."""
    return lambda wc: [path(wc.dataset, wc.student, paths.grid_method(wc.method, point))
                       for point in grid_points(wc.method)]


localrules:
    select_distill,


rule teacher_targets:
    input:
        unpack(lambda wc: teacher_split(wc.split)(wc)),
        coarse=paths.head_scores(model="{teacher}", kind="coarse"),
        refine=paths.head_scores(model="{teacher}", kind="refine"),
    output:
        table=paths.targets(),
        tensors=paths.targets_tensors(),
    params:  # what the targets depend on (not the loss weights or training settings)
        settings=settings_of(TargetSettings),
        model=lambda wc: canonical(config["models"][wc.teacher]),
    wildcard_constraints:
        teacher=one_of([config["teacher"]]),
        split="train|val",
    threads: workflow.cores
    resources:
        gpu=1,
    log:
        paths.log("teacher_targets", "{dataset}.{teacher}.{split}"),
    conda:
        "../envs/train.yaml"
    script:
        "../workflow_scripts/teacher_targets.py"


rule baseline_teacher_data:
    input:  # one job per method for both splits: the teacher is loaded once
        unpack(teacher_split("train", prefix="train_")),
        unpack(teacher_split("val", prefix="val_")),
    output:
        train=paths.baseline_data(split="train"),
        val=paths.baseline_data(split="val"),
    params:  # what the data depends on: the generation settings and the method's teacher-data settings
        settings=settings_of(BaselineDataSettings),
        method=lambda wc: canonical({k: v for k, v in (config["methods"][wc.method] or {}).get("params", {}).items()
                                       if k in resolve_method(wc.method, config["methods"][wc.method]).baseline.teacher_data_keys}),
        model=lambda wc: canonical(config["models"][wc.teacher]),
    wildcard_constraints:
        teacher=one_of([config["teacher"]]),
        method=one_of(teacher_data_methods()),
    threads: workflow.cores
    resources:
        gpu=generation_gpus,
    log:
        paths.log("baseline_teacher_data", "{dataset}.{teacher}.{method}"),
    conda:
        "../envs/train.yaml"
    script:
        "../workflow_scripts/baseline_teacher_data.py"


rule distill:
    input:
        unpack(teacher_split("train", prefix="train_")),
        unpack(teacher_split("val", prefix="val_")),
        unpack(baseline_inputs),
        unpack(targets_inputs),
        student_coarse=paths.head_scores(model="{student}", kind="coarse"),
        student_refine=paths.head_scores(model="{student}", kind="refine"),
        teacher_coarse=paths.head_scores(model=config["teacher"], kind="coarse"),
        teacher_refine=paths.head_scores(model=config["teacher"], kind="refine"),
    output:  # one grid point's folder: {method}/grid/{point}/
        model=paths.student_model(method=paths.grid_method()),
        log=paths.train_log(method=paths.grid_method()),
        mechanism=paths.mechanism(method=paths.grid_method()),
        best=paths.best_step(method=paths.grid_method()),
        training_items=paths.training_items(method=paths.grid_method()),
    params:  # the method's entry at this point: a value added to a grid trains only the new points
        settings=settings_of(DistillSettings),
        method=lambda wc: canonical(grid_point(wc.method, config["methods"][wc.method], wc.point).settings),
        model=lambda wc: canonical(config["models"][wc.student]),
    wildcard_constraints:
        student=one_of(config["students"]),
        method=one_of(config["methods"]),
        point=POINT_PATTERN,  # safe names (methods.point_name): no config value reaches the shell command
    threads: workflow.cores
    resources:  # the launcher is a resource, not a param: moving a run to the cluster does not retrain it
        gpu=1,
        mpi=local_launcher(config["distill"]["train"]["device"]),  # profiles/slurm: "srun --ntasks"
        tasks=config["distill"]["launch"]["ranks"],
    log:
        paths.log("distill", "{dataset}.{student}.{method}.{point}"),
    conda:
        "../envs/train.yaml"
    # `tasks` ranks, started here by distill.launch (torchrun for several) or by srun under profiles/slurm, load the config snapshot and
    # write the outputs at their default paths (mechdistill.paths).
    # Every word from the config or a wildcard is quoted (:q); {resources.mpi} is the launcher command itself.
    shell:
        "{resources.mpi} {resources.tasks} python -m mechdistill distill {wildcards.dataset:q} {wildcards.student:q} "
        "{wildcards.method:q} {wildcards.point:q} --config {CONFIG_SNAPSHOT:q} --log-file {log:q}"


rule select_distill:
    input:
        logs=grid_files(paths.train_log),
        models=grid_files(paths.student_model),
        mechanisms=grid_files(paths.mechanism),
        best=grid_files(paths.best_step),
        training_items=grid_files(paths.training_items),
    output:  # the chosen point's files as the method's (weights hard-linked) + how it was chosen; its model card
        # (model/README.md, without metrics until the model_card rule adds them) is not an output here
        model=paths.student_model(),
        log=paths.train_log(),
        mechanism=paths.mechanism(),
        selection=paths.selection(),
        training_items=paths.training_items(),
    params:
        settings=settings_of(SelectSettings, CardSettings),  # the choice, and what its model card says
        points=lambda wc: canonical(grid_points(wc.method)),
    wildcard_constraints:
        student=one_of(config["students"]),
        method=one_of(config["methods"]),
    log:
        paths.log("select_distill", "{dataset}.{student}.{method}"),
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/select_distill.py"


rule student_predict:
    input:
        model=paths.student_model(),
        selection=paths.selection(),
        prompts=paths.prompts(),
        labels=paths.labels(),
    output:
        paths.student_pred(),
    params:
        settings=settings_of(StudentPredictSettings),
    wildcard_constraints:
        student=one_of(config["students"]),
        method=one_of(config["methods"]),
    threads: workflow.cores
    resources:
        gpu=1,
    log:
        paths.log("student_predict", "{dataset}.{student}.{method}.{split}"),
    conda:  # vLLM's environment when the students generate with it (generation.student_backend)
        "../envs/vllm.yaml" if STUDENTS_USE_VLLM else "../envs/train.yaml"
    script:
        "../workflow_scripts/student_predict.py"
