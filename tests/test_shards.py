"""Resumable pieces of a long job: keyed folders, stale ones removed, cleared once the output exists."""

from __future__ import annotations

import pandas as pd

from mechdistill.shards import Shards, content_key, name_of


def test_content_key_is_stable_and_sees_every_part():
    assert content_key("a", {"x": 1, "y": 2}) == content_key("a", {"y": 2, "x": 1})  # key order free
    assert content_key("a", {"x": 1}) != content_key("a", {"x": 2}) != content_key("b", {"x": 2})
    assert len(content_key("a")) == 16


def test_pieces_round_trip_and_a_new_key_starts_afresh(tmp_path):
    out = tmp_path / "phase1.parquet"
    old = Shards(out, "docs", content_key("settings v1"))
    old.write_json("a.json", {"rows": [1.5, float("nan")]})
    old.write_parquet("b.parquet", pd.DataFrame({"doc_id": ["d"]}))
    again = Shards(out, "docs", content_key("settings v1"))  # a resumed run sees the pieces
    assert again.done("a.json") and again.read_json("a.json")["rows"][0] == 1.5
    assert again.read_parquet("b.parquet")["doc_id"].tolist() == ["d"]
    fresh = Shards(out, "docs", content_key("settings v2"))  # changed settings: old pieces removed
    assert not fresh.done("a.json") and not old.dir.exists()
    fresh.write_json("c.json", {})
    fresh.clear()
    assert list(tmp_path.iterdir()) == []


def test_name_of_any_id_is_a_safe_file_name():
    assert name_of("a/b c") != name_of("a/b d") and "/" not in name_of("a/b c")
