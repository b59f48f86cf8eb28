"""rules/characterize.smk stages: head_scores of the tiny teacher and student, head_figures."""

import copy

import pandas as pd
import pytest

from mechdistill import paths
from mechdistill.stages.characterize import run_head_scores
from mechdistill.stages.model_free import run_head_figures
from tests.stages.conftest import DATASET, STUDENT, TEACHER


def test_head_scores_cover_every_head_and_agree_on_the_shared_layer(tiny):
    tiny.ensure("head_scores")
    tables = {}
    for model, n_layers in [(TEACHER, 2), (STUDENT, 1)]:
        coarse = pd.read_parquet(tiny.path(paths.head_scores(DATASET, model, "coarse")))
        refine = pd.read_parquet(tiny.path(paths.head_scores(DATASET, model, "refine")))
        grid = [(layer, head) for layer in range(n_layers) for head in range(4)]
        assert list(zip(coarse["layer"], coarse["head"])) == grid == list(zip(refine["layer"], refine["head"]))
        assert coarse["score"].notna().all() and (coarse["n_queries"] > 0).all()
        assert (coarse["prompt_split"] == "clean_neutral").all()  # heads.split "clean": the clean-prompt set
        assert refine["score"].isna().all()  # a random model's CoT has no refinement positions
        tables[model] = coarse
    # The student IS the teacher's layer 0 (same embeddings, same unembedding): that layer's heads see
    # the same inputs on the same teacher-forced sequences, so their CoarseScores are the teacher's.
    teacher_l0 = tables[TEACHER][tables[TEACHER]["layer"] == 0]
    assert tables[STUDENT]["score"].tolist() == pytest.approx(teacher_l0["score"].tolist(), rel=1e-4)
    example = pd.read_parquet(tiny.path(paths.head_example(DATASET, TEACHER)))
    top = tables[TEACHER].loc[tables[TEACHER]["score"].idxmax()]
    assert (example["layer"] == top["layer"]).all() and (example["head"] == top["head"]).all()
    assert example["weight"].between(0, 1).all() and 0 < example["weight"].sum() <= 1 + 1e-6


def test_head_figures(tiny):
    tiny.ensure("head_scores")
    with tiny.inside():
        run_head_figures(tiny.config, DATASET)
    for number in (4, 7):
        assert tiny.path(paths.head_figure(number, DATASET)).read_bytes()[:4] == b"\x89PNG"


def test_compared_style_and_the_comparison_table(tiny):
    tiny.ensure("head_comparison")
    style = pd.read_parquet(tiny.path(paths.style_head_scores(DATASET, TEACHER, "clean_guided_exemplar", "coarse")))
    main = pd.read_parquet(tiny.path(paths.head_scores(DATASET, TEACHER, "coarse")))
    assert (style["prompt_split"] == "clean_guided_exemplar").all() and len(style) == len(main)
    assert not style["score"].equals(main["score"])  # other prompts, other attention
    top = pd.read_parquet(tiny.path(paths.head_comparison(DATASET, TEACHER, "parquet")))
    k = tiny.config["heads"]["compare_top_k"]
    score_top = top[(top["variant"] == "score") & (top["phase"] == "phase1")]
    for split, table in [("clean_neutral", main), ("clean_guided_exemplar", style)]:
        expected = table.nlargest(min(k, len(table)), "score")
        got = score_top[score_top["prompt_split"] == split]
        assert list(zip(got["layer"], got["head"])) == list(zip(expected["layer"], expected["head"]))
        assert got["depth"].tolist() == pytest.approx((expected["layer"] / 1).tolist())  # 2 layers: depth = layer
    md = tiny.path(paths.head_comparison(DATASET, TEACHER, "md")).read_text()
    assert "clean_guided_exemplar" in md
    assert "clean_neutral phase2, clean_guided_exemplar phase2" in md  # a random teacher never refines: said


def test_head_scores_with_a_device_map_equal_those_on_one_device(tiny, tmp_path):
    """heads.device_map: the teacher's layer 1 and final norm offloaded to disk, the same tables."""
    tiny.ensure("head_scores")
    config = copy.deepcopy(tiny.config)
    config["heads"].update(device_map={"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                                       "model.layers.1": "disk", "model.norm": "disk", "lm_head": "cpu"},
                           offload_folder=str(tmp_path / "offload"))
    out = {kind: tmp_path / f"{kind}.parquet" for kind in ("coarse", "refine", "example")}
    with tiny.inside():
        run_head_scores(config, DATASET, TEACHER, coarse_path=out["coarse"], refine_path=out["refine"],
                        example_path=out["example"])
    one_device = {kind: tiny.path(paths.head_scores(DATASET, TEACHER, kind)) for kind in ("coarse", "refine")}
    one_device["example"] = tiny.path(paths.head_example(DATASET, TEACHER))
    for kind, path in out.items():
        pd.testing.assert_frame_equal(pd.read_parquet(path), pd.read_parquet(one_device[kind]), rtol=1e-5)


def test_documents_longer_than_max_tokens_are_skipped_and_named(tiny, tmp_path, caplog):
    """heads.max_tokens (and distill.max_tokens through make_examples): the longest clean-prompt document is
    over the cap, so it is left out, by name, and the tables count the queries of the others only."""
    from mechdistill.characterize.head_scores import forced_documents
    from mechdistill.distill.signals import make_examples
    from mechdistill.io import read_split
    from mechdistill.models import ModelCatalog, load_tokenizer

    tiny.ensure("head_scores")
    split = paths.characterization_split(tiny.config, "clean")
    with tiny.inside():
        data = read_split(paths.split_files(DATASET, TEACHER, split))
    tokenizer = load_tokenizer(ModelCatalog.from_config(tiny.config), TEACHER)
    lengths = {d["doc_id"]: len(d["seq"].input_ids) for d in forced_documents(tokenizer, data)}
    longest = max(lengths, key=lengths.get)
    cap = lengths[longest] - 1
    assert sorted(lengths.values())[-2] <= cap  # only the longest is over
    with caplog.at_level("WARNING"):
        kept = [d["doc_id"] for d in forced_documents(tokenizer, data, cap)]
        examples = [ex.doc_id for ex in make_examples(tokenizer, data, TEACHER, cap)]
    assert longest not in kept and len(kept) == len(lengths) - 1
    assert f"{longest} ({lengths[longest]} tokens)" in caplog.text
    assert longest not in examples  # make_examples forces the answer block too: at least this one is over

    config = copy.deepcopy(tiny.config)
    config["heads"]["max_tokens"] = cap
    out = {kind: tmp_path / f"{kind}.parquet" for kind in ("coarse", "refine", "example")}
    with tiny.inside():
        run_head_scores(config, DATASET, TEACHER, coarse_path=out["coarse"], refine_path=out["refine"],
                        example_path=out["example"])
    full = pd.read_parquet(tiny.path(paths.head_scores(DATASET, TEACHER, "coarse")))
    capped = pd.read_parquet(out["coarse"])
    assert (capped["n_queries"] < full["n_queries"]).all() and (capped["n_queries"] > 0).all()
