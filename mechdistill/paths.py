"""Every artifact path of the pipeline, in one place (rules, stages and tests all call these).

Each function returns the path of one artifact, relative to the working directory. An argument
left out stays a Snakemake wildcard, so one function gives both the rule's pattern and a
concrete file:

    cot()                               -> "results/{dataset}/{teacher}/cot/{split}.parquet"
    cot("icd10_demo", "smollm2", "test") -> "results/icd10_demo/smollm2/cot/test.parquet"
    cot(split="train")                  -> "results/{dataset}/{teacher}/cot/train.parquet"

`stage_targets(config)` lists the concrete files of every stage for a config, keyed by the rule
that produces them, so `rule all` asks for every target of every defined rule.
See docs/pipeline.md for what each file holds.
"""

from __future__ import annotations

RESULTS = "results"
LOGS = "logs"
SPLITS = ("train", "val", "test")
CLEAN = "clean"  # heads.split / patching.split value: the clean-prompt set of `clean_prompts.style`
CLEAN_SPLIT_PATTERN = r"clean_[a-z_]+"  # the split names of clean-prompt sets (`clean_split`)
PHASES = ("phase1", "phase2")
HEAD_SCORE_KINDS = ("coarse", "refine")
TABLES = ("table1", "table2", "table2_baselines", "table3", "table4")  # table2_baselines: Table 2 with every baseline
TABLE_FORMATS = ("md", "csv", "tex")
SPLIT_FILES = ("docs", "prompts", "cot", "anchors", "labels")  # what io.read_split reads
PATCHING_SCORES = {"phase1": "coarse", "phase2": "refine"}  # which head ranking each phase patches
FIGURE_OF_PHASE = {"phase1": 5, "phase2": 8}  # patching figure number of each phase
TEACHER_METHOD = "teacher"  # the {method} of the teacher's own evaluation: results/{dataset}/{teacher}/teacher/

D, T, M, S, SPLIT, METHOD = "{dataset}", "{teacher}", "{model}", "{student}", "{split}", "{method}"
POINT = "{point}"  # a grid point of a method (distill.methods.method_grid names them)


# ---------------------------------------------------------------- data and prompts

def data_dir(dataset: str = D) -> str:
    """Folder of a prepared dataset: the splits, the label table, stats and excluded pairs."""
    return f"{RESULTS}/{dataset}/data"


def data(dataset: str = D, split: str = SPLIT) -> str:
    """Documents of one split: doc_id, text, labels."""
    return f"{data_dir(dataset)}/{split}.parquet"


def labels(dataset: str = D) -> str:
    """The label space: label_id, title, parent, ancestors, assignable."""
    return f"{data_dir(dataset)}/labels.parquet"


def data_stats(dataset: str = D) -> str:
    return f"{data_dir(dataset)}/stats.json"


def excluded_pairs(dataset: str = D) -> str:
    """(doc_id, label) pairs left out of scoring (LF-WikiSeeAlso's filter_labels_test), if any."""
    return f"{data_dir(dataset)}/excluded_pairs.parquet"


def prompts(dataset: str = D, split: str = SPLIT) -> str:
    return f"{RESULTS}/{dataset}/prompts/{split}.parquet"


def clean_split(style: str) -> str:
    """The split name of the clean-prompt set in `style` (teacher.clean_prompts.STYLES), e.g.
    "clean_neutral": its documents, prompts, CoT and anchors live where a split's do."""
    return f"{CLEAN}_{style}"


def characterization_split(config: dict, split: str) -> str:
    """The split a characterization setting names (`heads.split`, `patching.split`): "clean" is the
    clean-prompt set of `clean_prompts.style`; train / val / test are the task splits."""
    return prompt_split(split, config["clean_prompts"]["style"])


def prompt_split(split: str, clean_style: str) -> str:
    """`characterization_split` of a split and the clean-prompt style (a stage's settings hold both)."""
    return clean_split(clean_style) if split == CLEAN else split


def clean_splits(config: dict) -> list[str]:
    """Every clean-prompt split a config builds: `clean_prompts.style` when heads or patching read
    the clean set, then `clean_prompts.compare_styles`."""
    settings = config["clean_prompts"]
    used = CLEAN in (config["heads"]["split"], config["patching"]["split"])
    styles = ([settings["style"]] if used else []) + list(settings["compare_styles"])
    return [clean_split(s) for s in dict.fromkeys(styles)]


def compared_splits(config: dict) -> list[str]:
    """The clean-prompt splits the teacher's heads are scored on for comparison only (`style_head_scores`):
    every one of `clean_splits` but the one `heads.split` names."""
    return [s for s in clean_splits(config) if s != characterization_split(config, config["heads"]["split"])]


def split_files(dataset: str = D, teacher: str = T, split: str = SPLIT) -> dict[str, str]:
    """A split as the teacher-forced stages read it (`io.read_split`): docs, prompts, the teacher's
    CoT and anchors, and the label space."""
    return {"docs": data(dataset, split), "prompts": prompts(dataset, split), "cot": cot(dataset, teacher, split),
            "anchors": anchors(dataset, teacher, split), "labels": labels(dataset)}


# ---------------------------------------------------------------- teacher CoT, anchors, trajectories

def cot(dataset: str = D, teacher: str = T, split: str = SPLIT) -> str:
    return f"{RESULTS}/{dataset}/{teacher}/cot/{split}.parquet"


def anchors(dataset: str = D, teacher: str = T, split: str = SPLIT) -> str:
    return f"{RESULTS}/{dataset}/{teacher}/anchors/{split}.parquet"


def trajectories(dataset: str = D, model: str = M) -> str:
    """Focus / Confusion curves of a model's CoT; `model` is the teacher or "{student}/{method}"."""
    return f"{RESULTS}/{dataset}/{model}/trajectories.parquet"


def trajectory_summary(dataset: str = D, model: str = M) -> str:
    return f"{RESULTS}/{dataset}/{model}/trajectories_summary.parquet"


# ---------------------------------------------------------------- characterization and patching

def head_scores(dataset: str = D, model: str = M, kind: str = "{kind}") -> str:
    """CoarseScore (kind="coarse") or RefineScore (kind="refine") of every head of `model`."""
    return f"{RESULTS}/{dataset}/{model}/heads/{kind}.parquet"


def style_head_scores(dataset: str = D, model: str = M, split: str = SPLIT, kind: str = "{kind}") -> str:
    """Head scores of `model` on another clean-prompt style (`clean_prompts.compare_styles`), e.g.
    split "clean_guided_exemplar": the same table as `head_scores`, for comparison only."""
    return f"{RESULTS}/{dataset}/{model}/heads/{split}/{kind}.parquet"


def head_comparison(dataset: str = D, teacher: str = T, fmt: str = "md") -> str:
    """Top heads per phase under every scoring variant and prompt style, with their layer depths."""
    return f"{RESULTS}/{dataset}/{teacher}/heads/comparison.{fmt}"


def head_example(dataset: str = D, model: str = M) -> str:
    """Figure 4's example: the top Phase-1 head's attention over one prompt."""
    return f"{RESULTS}/{dataset}/{model}/heads/coarse_example.parquet"


def patching(dataset: str = D, teacher: str = T, phase: str = "{phase}") -> str:
    """Patching effects of one phase (summary over documents, with bootstrap CIs)."""
    return f"{RESULTS}/{dataset}/{teacher}/patching/{phase}.parquet"


def patching_runs(dataset: str = D, teacher: str = T, phase: str = "{phase}") -> str:
    """Every reference and patched run of one phase: generated text and metric value."""
    return f"{RESULTS}/{dataset}/{teacher}/patching/{phase}_runs.parquet"


def patching_pairs(dataset: str = D, teacher: str = T, phase: str = "{phase}") -> str:
    """The clean / corrupted document pairs of one phase (rejected ones with the reason)."""
    return f"{RESULTS}/{dataset}/{teacher}/patching/{phase}_pairs.parquet"


# ---------------------------------------------------------------- distillation

def targets(dataset: str = D, teacher: str = T, split: str = SPLIT) -> str:
    """Teacher targets of one split: one row per document (the tensors are in `targets_tensors`)."""
    return f"{RESULTS}/{dataset}/{teacher}/targets/{split}.parquet"


def targets_tensors(dataset: str = D, teacher: str = T, split: str = SPLIT) -> str:
    """Top-k logits and pooled phase signals of the teacher, per document (safetensors)."""
    return f"{RESULTS}/{dataset}/{teacher}/targets/{split}.safetensors"


def student_dir(dataset: str = D, student: str = S, method: str = METHOD) -> str:
    """Everything of one distilled student: model/, train_log, mechanism, predictions, metrics."""
    return f"{RESULTS}/{dataset}/{student}/{method}"


def student_model_dir(dataset: str = D, student: str = S, method: str = METHOD) -> str:
    """The trained student (save_pretrained): loads with AutoModelForCausalLM.from_pretrained."""
    return f"{student_dir(dataset, student, method)}/model"


def student_model(dataset: str = D, student: str = S, method: str = METHOD) -> str:
    """The file that marks a finished student (Snakemake tracks it; the model is its folder)."""
    return f"{student_model_dir(dataset, student, method)}/config.json"


def checkpoint_dir(dataset: str = D, student: str = S, method: str = METHOD) -> str:
    """Resumable training state (removed once the student is saved)."""
    return f"{student_dir(dataset, student, method)}/ckpt"


def train_log(dataset: str = D, student: str = S, method: str = METHOD) -> str:
    return f"{student_dir(dataset, student, method)}/train_log.parquet"


def mechanism(dataset: str = D, student: str = S, method: str = METHOD) -> str:
    """The student's pooled-head Sharpness / AnchorAlign / LoopBack / Helpfulness before vs after training."""
    return f"{student_dir(dataset, student, method)}/mechanism.parquet"


def training_items(dataset: str = D, student: str = S, method: str = METHOD) -> str:
    """What the student trained and validated on, one row per item (split, epoch, doc_id, n_tokens,
    n_supervised, and a baseline recipe's own columns: selected rationales, chunks, skip labels...)."""
    return f"{student_dir(dataset, student, method)}/training_items.parquet"


def baseline_data(dataset: str = D, teacher: str = T, method: str = METHOD, split: str = SPLIT) -> str:
    """A baseline method's extra teacher output for one split (MoRSD's sampled CoTs, UniCoTT's
    structured explanations, SemCoT's condensed reasoning): `distill.baselines.<recipe>.teacher_data`."""
    return f"{RESULTS}/{dataset}/{teacher}/baseline_data/{method}/{split}.parquet"


def grid_method(method: str = METHOD, point: str = POINT) -> str:
    """The `method` argument that puts a file of one grid point of `method` in its own folder,
    `{method}/grid/{point}/`: e.g. train_log(d, s, grid_method("mech", "alpha=0.5,beta=1.0")).
    The point's distill job writes there; select_distill publishes the chosen point's files as the
    method's own (student_model, train_log, mechanism of `method`)."""
    return f"{method}/grid/{point}"


def best_step(dataset: str = D, student: str = S, method: str = METHOD) -> str:
    """The trainer's choice of the step whose weights it saved (JSON: criterion, maximize, step,
    value, last_step, evaluated_steps); `method` is a grid point's (`grid_method`)."""
    return f"{student_dir(dataset, student, method)}/best_step.json"


def provenance(dataset: str = D, student: str = S, method: str = METHOD) -> str:
    """What trained a grid point's model (JSON: command, commit), for its model card; `method` is a grid
    point's (`grid_method`). Written by the distill job, not tracked by Snakemake."""
    return f"{student_dir(dataset, student, method)}/provenance.json"


def model_card(dataset: str = D, student: str = S, method: str = METHOD) -> str:
    """The published student's model card (README.md in its model folder, `evaluate.card`), with its metrics."""
    return f"{student_model_dir(dataset, student, method)}/README.md"


def selection(dataset: str = D, student: str = S, method: str = METHOD) -> str:
    """How the method's published model was chosen (JSON): criterion, maximize, point, values,
    step, value, and `candidates` (every grid point's point, values, step, value), in grid order."""
    return f"{student_dir(dataset, student, method)}/selection.json"


def student_pred(dataset: str = D, student: str = S, method: str = METHOD, split: str = SPLIT) -> str:
    return f"{student_dir(dataset, student, method)}/pred/{split}.parquet"


# ---------------------------------------------------------------- evaluation, tables and figures

def metrics(dataset: str = D, student: str = S, method: str = METHOD) -> str:
    return f"{student_dir(dataset, student, method)}/metrics.parquet"


def las_simulator(dataset: str = D) -> str:
    """Folder of a dataset's LAS simulators, trained once on the teacher's train traces and read by
    every evaluate job: one per view (x, xr, r; safetensors or a save_pretrained folder) and
    simulator.json (evaluate/las.py, `save_view_simulators`)."""
    return f"{RESULTS}/{dataset}/las_simulator"


def tables_dir() -> str:
    return f"{RESULTS}/tables"


def table(table: str = "{table}", fmt: str = "md") -> str:
    """One of Tables 1-4 (`table` = "table1" ...) or "table2_baselines" as Markdown, CSV or LaTeX (`fmt`)."""
    return f"{tables_dir()}/{table}.{fmt}"


def figure(name: str = "{figure}") -> str:
    """A figure by name, e.g. figure("figure1_icd10_demo")."""
    return f"{RESULTS}/figures/{name}.png"


def figure1(dataset: str = D) -> str:
    return figure(f"figure1_{dataset}")


def head_figure(number: int, dataset: str = D) -> str:
    """Figure 4 (Phase-1 heads) or Figure 7 (Phase-2 heads) of a dataset."""
    return figure(f"figure{number}_{dataset}")


def patching_figure(phase: str, dataset: str = D) -> str:
    """Figure 5 (phase1) or Figure 8 (phase2) of a dataset."""
    return figure(f"figure{FIGURE_OF_PHASE[phase]}_{dataset}")


def figure9() -> str:
    return figure("figure9")


def claims(fmt: str = "md") -> str:
    """The verdict on each claim of the paper, as Markdown ("md") or one row per test ("parquet")."""
    return f"{RESULTS}/claims.{fmt}"


def log(rule: str, name: str) -> str:
    """A rule's log file; `name` joins the rule's wildcards, e.g. "{dataset}.{split}"."""
    return f"{LOGS}/{rule}/{name}.log"


# ---------------------------------------------------------------- every target of a config

def distilled_pairs(config: dict) -> list[tuple[str, str]]:
    """The (student, method) pairs a run distils, students in config order, then methods: every method for
    the students its entry lists under `students` (default: every student). The paper config trains its
    ablations for the first student only and its baselines for the first two, as its figures and tables
    show them."""
    students = list(config["students"])
    return [(s, m) for s in students for m, entry in config["methods"].items()
            if s in (entry or {}).get("students", students)]


def student_models(config: dict) -> list[str]:
    """The `{model}` values of the distilled students: "{student}/{method}" for every distilled pair."""
    return [f"{s}/{m}" for s, m in distilled_pairs(config)]


def model_cot(config: dict, dataset: str, model: str) -> str:
    """The CoT `model` wrote on the trajectory split: the teacher's traces, or the predictions of a
    distilled student (`model` = "{student}/{method}")."""
    split = config["trajectories"]["split"]
    if model == config["teacher"]:
        return cot(dataset, model, split)
    student, method = model.split("/")
    return student_pred(dataset, student, method, split)


def evaluate_inputs(config: dict, dataset: str = D, student: str = S, method: str = METHOD) -> dict[str, str]:
    """What the evaluation of one distilled student reads (the evaluate rule's inputs, the defaults
    of stages.evaluate.run_evaluate). With method "teacher" (student = the teacher's name) it is the
    teacher's own evaluation: its test CoT is the prediction, its head scores give the pools, and its
    weights come from config["models"] (no "model" input)."""
    teacher = config["teacher"]
    inputs = {"test_docs": data(dataset, "test"), "train_docs": data(dataset, "train"),
              "test_prompts": prompts(dataset, "test"), "teacher_test_cot": cot(dataset, teacher, "test"),
              "las_simulator": las_simulator(dataset), "test_anchors": anchors(dataset, teacher, "test"),
              "labels": labels(dataset), "student_coarse": head_scores(dataset, student, "coarse"),
              "student_refine": head_scores(dataset, student, "refine")}
    if method == TEACHER_METHOD:
        return inputs | {"pred": cot(dataset, teacher, "test"), "trajectory_summary": trajectory_summary(dataset, teacher)}
    return inputs | {"pred": student_pred(dataset, student, method, "test"),
                     "model": student_model(dataset, student, method),
                     "trajectory_summary": trajectory_summary(dataset, f"{student}/{method}")}


def claims_inputs(config: dict) -> dict[str, list[str]]:
    """What the claims rule reads: the teacher's head scores and patching files of every dataset,
    and the metrics of every distilled student (the defaults of stages.claims.run_claims)."""
    datasets, teacher = list(config["datasets"]), config["teacher"]
    return {"head_scores": [head_scores(d, teacher, k) for d in datasets for k in HEAD_SCORE_KINDS],
            "patching": [f(d, teacher, p) for d in datasets for p in PHASES
                         for f in (patching, patching_runs, patching_pairs)],
            "metrics": [metrics(d, s, m) for d in datasets for s, m in distilled_pairs(config)]}


def stage_targets(config: dict, target_methods: list[str] | None = None) -> dict[str, tuple[tuple[str, ...], list[str]]]:
    """target group -> (rules that must all be defined, the concrete files of that group).

    A group is requested by `rule all` once every rule it needs exists; e.g. the students'
    trajectories need both `trajectories` and `student_predict`. Students are distilled with the methods of
    `distilled_pairs`. The teacher's targets are planned only for a distilled pair whose method reads them:
    `target_methods` (default: every method; the workflow gives `methods.methods_reading_targets`), so
    `students: []` plans none.
    """
    datasets = list(config["datasets"])
    teacher = config["teacher"]
    students = list(config["students"])
    pairs = distilled_pairs(config)
    distilled = [(d, s, m) for d in datasets for s, m in pairs]
    reading = {m for _, m in pairs} & set(config["methods"] if target_methods is None else target_methods)
    clean = tuple(clean_splits(config))
    return {
        "prepare_dataset": (("prepare_dataset",), [data(d, s) for d in datasets for s in SPLITS]
                            + [labels(d) for d in datasets]),
        "build_prompts": (("build_prompts",), [prompts(d, s) for d in datasets for s in SPLITS]),
        "clean_prompts": (("clean_prompts",), [prompts(d, s) for d in datasets for s in clean]),
        "teacher_cot": (("teacher_cot",), [cot(d, teacher, s) for d in datasets for s in SPLITS + clean]),
        "anchors": (("anchors",), [anchors(d, teacher, s) for d in datasets for s in SPLITS + clean]),
        "trajectories": (("trajectories",), [trajectories(d, teacher) for d in datasets]),
        "student_trajectories": (("trajectories", "student_predict"),
                                 [trajectories(d, m) for d in datasets for m in student_models(config)]),
        "head_scores": (("head_scores",), [head_scores(d, m, k) for d in datasets for m in [teacher] + students
                                           for k in HEAD_SCORE_KINDS]),
        "style_head_scores": (("style_head_scores",), [style_head_scores(d, teacher, s, k) for d in datasets
                                                       for s in compared_splits(config) for k in HEAD_SCORE_KINDS]),
        "head_comparison": (("head_comparison",), [head_comparison(d, teacher, f) for d in datasets
                                                   for f in ("md", "parquet")]),
        "patching": (("patching",), [patching(d, teacher, p) for d in datasets for p in PHASES]),
        "teacher_targets": (("teacher_targets",), [targets(d, teacher, s) for d in datasets for s in ("train", "val")
                                                   if reading]),
        "distill": (("distill", "select_distill"), [student_model(*x) for x in distilled]),
        "student_predict": (("student_predict",), [student_pred(*x, "test") for x in distilled]),
        "las_simulator": (("las_simulator",), [las_simulator(d) for d in datasets]),
        "evaluate": (("evaluate",), [metrics(*x) for x in distilled]
                     + [metrics(d, teacher, TEACHER_METHOD) for d in datasets]),
        "model_card": (("model_card",), [model_card(*x) for x in distilled]),
        "figure1": (("figure1",), [figure1(d) for d in datasets]),
        "head_figures": (("head_figures",), [head_figure(n, d) for n in (4, 7) for d in datasets]),
        "patching_figures": (("patching_figures",), [patching_figure(p, d) for p in PHASES for d in datasets]),
        "tables": (("tables",), [table(t) for t in TABLES]),
        "figure9": (("figure9",), [figure9()]),
        "claims": (("claims",), [claims("md"), claims("parquet")]),
    }
