"""Artifact paths: one function per artifact, a wildcard pattern or a concrete file."""

from __future__ import annotations

from mechdistill import paths
from mechdistill.config import load_config
from tests.helpers import REPO


def test_left_out_arguments_stay_wildcards():
    assert paths.cot() == "results/{dataset}/{teacher}/cot/{split}.parquet"
    assert paths.cot("d", "t", "test") == "results/d/t/cot/test.parquet"
    assert paths.cot(split="train") == "results/{dataset}/{teacher}/cot/train.parquet"
    assert paths.head_scores(model="{student}", kind="coarse") == "results/{dataset}/{student}/heads/coarse.parquet"


def test_companions_live_next_to_their_artifact():
    assert paths.patching_runs("d", "t", "phase1") == "results/d/t/patching/phase1_runs.parquet"
    assert paths.patching_pairs("d", "t", "phase2") == "results/d/t/patching/phase2_pairs.parquet"
    assert paths.targets_tensors("d", "t", "val") == "results/d/t/targets/val.safetensors"
    assert paths.student_model("d", "s", "m") == paths.student_model_dir("d", "s", "m") + "/config.json"
    assert paths.train_log("d", "s", "m") == "results/d/s/m/train_log.parquet"
    assert paths.patching_figure("phase2", "d") == "results/figures/figure8_d.png"
    assert paths.table("table3", "tex") == "results/tables/table3.tex"
    assert paths.log("anchors", "{dataset}.{split}") == "logs/anchors/{dataset}.{split}.log"


def test_model_cot_is_the_teacher_trace_or_the_student_prediction():
    config = load_config(REPO / "config" / "tiny.yaml")
    assert paths.model_cot(config, "d", "tiny_llama") == "results/d/tiny_llama/cot/test.parquet"
    assert paths.model_cot(config, "d", "tiny_student/mech") == "results/d/tiny_student/mech/pred/test.parquet"


def test_stage_targets_of_the_tiny_config():
    config = load_config(REPO / "config" / "tiny.yaml")
    groups = paths.stage_targets(config)
    counts = {name: len(files) for name, (_, files) in groups.items()}
    # the clean-prompt set in 2 styles: 2 more prompts, CoT and anchors files; the compared style's 2 tables
    assert counts == {"prepare_dataset": 4, "build_prompts": 3, "clean_prompts": 2, "teacher_cot": 5, "anchors": 5,
                      "trajectories": 1, "student_trajectories": 6, "head_scores": 4, "style_head_scores": 2,
                      "head_comparison": 2, "patching": 2, "teacher_targets": 2,
                      "distill": 6, "student_predict": 6, "las_simulator": 1, "evaluate": 7, "model_card": 6, "figure1": 1,
                      "head_figures": 2, "patching_figures": 2, "tables": 5, "figure9": 1,
                      "claims": 2}
    assert "results/tiny_icd/tiny_student/vanilla/pred/test.parquet" in groups["student_predict"][1]
    assert all("{" not in f for _, files in groups.values() for f in files)  # every target is concrete


def test_teacher_targets_are_a_target_only_for_students_distilled_with_a_method_that_reads_them():
    config = load_config(REPO / "config" / "tiny.yaml")
    assert len(paths.stage_targets(config)["teacher_targets"][1]) == 2
    assert paths.stage_targets(config, target_methods=[])["teacher_targets"][1] == []
    assert paths.stage_targets({**config, "students": []})["teacher_targets"][1] == []  # before: 2 files nothing reads


def test_clean_prompt_splits_follow_the_settings():
    config = load_config(REPO / "config" / "tiny.yaml")
    assert paths.characterization_split(config, "clean") == "clean_neutral"
    assert paths.characterization_split(config, "test") == "test"
    assert paths.clean_splits(config) == ["clean_neutral", "clean_guided_exemplar"]
    assert paths.compared_splits(config) == ["clean_guided_exemplar"]
    # heads and patching on task splits: only the compared styles are built, and all are compared
    config["heads"]["split"] = config["patching"]["split"] = "train"
    assert paths.clean_splits(config) == paths.compared_splits(config) == ["clean_guided_exemplar"]
    config["clean_prompts"]["compare_styles"] = []
    assert paths.clean_splits(config) == []


def test_a_method_distils_the_students_its_entry_lists():
    config = {"students": ["a", "b", "c"], "methods": {"vanilla": {}, "abl": {"students": ["a"]},
                                                      "base": {"students": ["b", "a"]}, "none": {"students": []}}}
    assert paths.distilled_pairs(config) == [("a", "vanilla"), ("a", "abl"), ("a", "base"), ("b", "vanilla"),
                                             ("b", "base"), ("c", "vanilla")]
    assert paths.student_models(config) == ["a/vanilla", "a/abl", "a/base", "b/vanilla", "b/base", "c/vanilla"]


def test_the_paper_config_distils_as_the_paper_shows():
    """Tables 1-2: the first two students with every baseline; Tables 3-4: vanilla and mech for the others;
    Fig. 1 and 9: the ablations for the first student."""
    config = load_config(REPO / "config" / "paper.yaml")
    pairs = paths.distilled_pairs(config)
    by_student = {s: [m for t, m in pairs if t == s] for s in config["students"]}
    first, second, *others = config["students"]
    assert by_student[first] == list(config["methods"])
    assert by_student[second] == ["vanilla", "mech", "unicott", "morsd", "semcot", "cwt"]
    assert all(by_student[s] == ["vanilla", "mech"] for s in others) and len(pairs) == 14 + 6 + 2 * 2
    groups = paths.stage_targets(config)
    assert len(groups["distill"][1]) == len(groups["model_card"][1]) == 2 * 24
    assert len(groups["evaluate"][1]) == 2 * 24 + 2  # and each dataset's teacher row
