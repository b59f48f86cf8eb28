"""rules/patching.smk stages: patching of the tiny teacher (phase 1 patched, phase 2 with nothing to
rank), a killed job resuming, and the patching figures."""

import pandas as pd
import pytest

from mechdistill import paths
from mechdistill.patching import experiment
from mechdistill.stages.model_free import run_patching_figure
from mechdistill.stages.patching import run_patching
from tests.stages.conftest import DATASET, TEACHER

N_DOCS, BINS, SETS_PER_BIN = 2, 2, 5  # patching.max_docs 2; bins [2, 4]; top + near_zero + most_negative + 2 random


def test_patching_runs_every_head_set_in_both_directions(tiny):
    tiny.ensure("patching")
    pairs = pd.read_parquet(tiny.path(paths.patching_pairs(DATASET, TEACHER, "phase1")))
    runs = pd.read_parquet(tiny.path(paths.patching_runs(DATASET, TEACHER, "phase1")))
    summary = pd.read_parquet(tiny.path(paths.patching(DATASET, TEACHER, "phase1")))
    assert len(pairs) == N_DOCS and pairs["aligned"].all()
    assert (pairs["corruption_mode"] == "labels").all()  # the default: no ranked head chooses the words
    assert all(len(t) == len(w) > 0 for t, w in zip(pairs["terms"], pairs["term_sources"]))
    assert len(runs) == N_DOCS * (2 + 2 * BINS * SETS_PER_BIN)  # 2 references + every set, both directions
    refs = runs[runs["direction"] == "reference"]
    assert (refs.loc[refs["kind"] == "clean", "value"].to_numpy()
            == refs.loc[refs["kind"] == "clean", "clean_value"].to_numpy()).all()
    assert set(summary["k"]) == {2, 4} and set(summary["head_set"]) == {"top", "near_zero", "most_negative", "random"}
    assert (summary["ci_width"] - (summary["ci_high"] - summary["ci_low"])).abs().max() < 1e-12
    assert (summary["prompt_split"] == "clean_neutral").all()  # patching.split "clean": the clean-prompt set
    # the summary's mean "value" of a head set is the mean over documents of that set's runs
    top2 = runs[(runs["direction"] == "denoise") & (runs["kind"] == "top") & (runs["k"] == 2)]
    row = summary[(summary["direction"] == "denoise") & (summary["head_set"] == "top") & (summary["k"] == 2)
                  & (summary["metric"] == "value")]
    assert row["effect"].item() == pytest.approx(top2["value"].mean())
    assert pd.read_parquet(tiny.path(paths.patching(DATASET, TEACHER, "phase2"))).empty  # no RefineScore


def killed_after_one_document(tiny, monkeypatch, tmp_path) -> tuple[dict, list]:
    """Run phase-1 patching into tmp_path until the second document's runs, then "kill" it; from then on
    `calls` records the documents patched."""
    real, calls = experiment.generate_runs, []
    out = {"summary_path": tmp_path / "phase1.parquet", "runs_path": tmp_path / "phase1_runs.parquet",
           "pairs_path": tmp_path / "phase1_pairs.parquet"}

    def dies_on_second(*args, **kwargs):
        calls.append(args[1].doc_id)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(experiment, "generate_runs", dies_on_second)
    with tiny.inside(), pytest.raises(KeyboardInterrupt):
        run_patching(tiny.config, DATASET, "phase1", **out)
    assert len(list(tmp_path.glob(".phase1.docs-*/*.json"))) == 1
    calls.clear()
    monkeypatch.setattr(experiment, "generate_runs", lambda *a, **kw: calls.append(a[1].doc_id) or real(*a, **kw))
    return out, calls


def test_killed_patching_resumes_after_its_last_finished_document(tiny, monkeypatch, tmp_path):
    tiny.ensure("patching")  # the uninterrupted run to compare with
    out, calls = killed_after_one_document(tiny, monkeypatch, tmp_path)
    with tiny.inside():
        run_patching(tiny.config, DATASET, "phase1", **out)
    assert len(calls) == 1  # only the document the kill interrupted
    assert not list(tmp_path.glob(".phase1.docs-*"))  # pieces removed once the table is written
    pd.testing.assert_frame_equal(pd.read_parquet(out["summary_path"]),
                                  pd.read_parquet(tiny.path(paths.patching(DATASET, TEACHER, "phase1"))))
    # the pairs table too, column order included (a resumed pair is read back from JSON with sorted keys)
    pd.testing.assert_frame_equal(pd.read_parquet(out["pairs_path"]),
                                  pd.read_parquet(tiny.path(paths.patching_pairs(DATASET, TEACHER, "phase1"))))


def test_killed_patching_does_not_resume_on_changed_inputs(tiny, monkeypatch, tmp_path):
    """The pieces of a killed run are keyed by the bytes of the split's files too: after the teacher's CoT
    file changed, every document is patched again (before, the finished one was reused)."""
    import shutil

    tiny.ensure("patching")
    out, calls = killed_after_one_document(tiny, monkeypatch, tmp_path)
    split = paths.characterization_split(tiny.config, "clean")
    cot = tmp_path / "cot.parquet"
    shutil.copy(tiny.path(paths.cot(DATASET, TEACHER, split)), cot)
    table = pd.read_parquet(cot)
    table.loc[0, "raw"] = table.loc[0, "raw"] + " "  # another teacher run: other bytes
    table.to_parquet(cot)
    with tiny.inside():
        run_patching(tiny.config, DATASET, "phase1", inputs={"cot": cot}, **out)
    assert len(calls) == N_DOCS


def test_a_pair_longer_than_max_tokens_is_skipped_with_its_reason(tiny, tmp_path, caplog):
    """patching.max_tokens: a pair whose prompt plus generated tokens exceed it is not run; its record and
    the log say why (a runaway document costs a line, not quadratic attention over it)."""
    import copy

    tiny.ensure("patching")
    config = copy.deepcopy(tiny.config)
    config["patching"]["max_tokens"] = 16  # every tiny prompt is longer
    out = {"summary_path": tmp_path / "phase1.parquet", "runs_path": tmp_path / "phase1_runs.parquet",
           "pairs_path": tmp_path / "phase1_pairs.parquet"}
    with tiny.inside(), caplog.at_level("WARNING"):
        run_patching(config, DATASET, "phase1", **out)
    pairs = pd.read_parquet(out["pairs_path"])
    assert len(pairs) == N_DOCS and not pairs["aligned"].any()
    assert pairs["reason"].str.match(r"too long: \d+ tokens with the generated ones > max_tokens 16").all()
    assert pd.read_parquet(out["runs_path"]).empty and caplog.text.count("too long") == N_DOCS


def test_documents_in_flight_give_the_same_tables(tiny, tmp_path):
    """patching.in_flight 2: both documents' forwards run at once in threads; every table equals the one
    document at a time run's (same runs, values and texts, in document order)."""
    import copy

    tiny.ensure("patching")  # in_flight 1, the default
    config = copy.deepcopy(tiny.config)
    config["patching"]["in_flight"] = 2
    out = {"summary_path": tmp_path / "phase1.parquet", "runs_path": tmp_path / "phase1_runs.parquet",
           "pairs_path": tmp_path / "phase1_pairs.parquet"}
    with tiny.inside():
        run_patching(config, DATASET, "phase1", **out)
    for name, path in (("summary_path", paths.patching), ("runs_path", paths.patching_runs),
                       ("pairs_path", paths.patching_pairs)):
        pd.testing.assert_frame_equal(pd.read_parquet(out[name]),
                                      pd.read_parquet(tiny.path(path(DATASET, TEACHER, "phase1"))))


def test_patching_figures(tiny):
    tiny.ensure("patching")
    with tiny.inside():
        for phase in paths.PHASES:
            run_patching_figure(tiny.config, DATASET, phase)
    for phase in paths.PHASES:
        assert tiny.path(paths.patching_figure(phase, DATASET)).read_bytes()[:4] == b"\x89PNG"


def test_a_bin_larger_than_the_teacher_head_count_stops_the_job_before_the_teacher_loads(tiny_config, tmp_path,
                                                                                      monkeypatch):
    """Where the head count is not known at start-up (a hub model not yet cached), the patching job stops
    before loading the teacher: its head scores hold one row per head (8 for the tiny teacher, 2 layers x 4
    heads; a NaN score still counts). Before, bin 100 was clamped to 8 with an INFO line."""
    from mechdistill.errors import ConfigError
    from mechdistill.stages import patching as stage

    heads = pd.DataFrame({"layer": [0] * 4 + [1] * 4, "head": [0, 1, 2, 3] * 2,
                          "score": [0.5, 0.1, float("nan"), 0.3, 0.2, 0.0, 0.4, 0.6]})
    heads.to_parquet(tmp_path / "coarse.parquet")
    monkeypatch.setattr(stage, "load_model", lambda *a, **kw: pytest.fail("the teacher was loaded"))
    config = {**tiny_config, "patching": {**tiny_config["patching"], "bins": [2, 100]}}
    with pytest.raises(ConfigError) as err:
        run_patching(config, DATASET, "phase1", head_scores_path=tmp_path / "coarse.parquet")
    assert (f"{tmp_path / 'coarse.parquet'}: patching.bins has 100, but the teacher {TEACHER} has 8 attention heads "
            "in total") in str(err.value) and "give bins of at most 8" in str(err.value)
