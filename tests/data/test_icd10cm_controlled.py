import re

import pytest
import simple_icd_10_cm as icd

from mechdistill.data import check_prepared
from mechdistill.data.icd10cm_controlled import load_icd10cm_controlled
from mechdistill.errors import InputError


def test_controlled_set_is_deterministic_and_valid():
    a = load_icd10cm_controlled({"train": 4, "val": 2, "test": 3}, (2, 4), seed=3)
    b = load_icd10cm_controlled({"train": 4, "val": 2, "test": 3}, (2, 4), seed=3)
    c = load_icd10cm_controlled({"train": 4, "val": 2, "test": 3}, (2, 4), seed=4)
    assert all(a.splits[s].equals(b.splits[s]) for s in a.splits)
    assert not a.splits["train"].equals(c.splits["train"])
    check_prepared(a, "test")  # unique ids, non-empty text, labels in label space
    assert [len(a.splits[s]) for s in ("train", "val", "test")] == [4, 2, 3]


def test_documents_mention_their_codes_and_share_a_block():
    prepared = load_icd10cm_controlled({"train": 10, "val": 0, "test": 0}, (2, 4), seed=0)
    for text, labels in zip(prepared.splits["train"]["text"], prepared.splits["train"]["labels"]):
        assert 2 <= len(labels) <= 4
        assert all(icd.is_leaf(code) for code in labels)
        assert len({icd.get_ancestors(code)[-2] for code in labels}) == 1  # one block: related codes
        for code in labels:
            phrases = [icd.get_description(code)] + icd.get_inclusion_term(code)
            assert any(re.escape(p[1:].lower()) and p[1:].lower() in text.lower() for p in phrases), (code, text)


def test_label_table_covers_icd10cm():
    labels = load_icd10cm_controlled({"train": 1, "val": 0, "test": 0}).labels
    leaves = labels[labels["assignable"]]
    assert len(leaves) > 70_000  # ICD-10-CM April 2026 has ~74.7k leaf codes
    row = labels.set_index("label_id").loc["I50.22"]
    assert row["title"] == "Chronic systolic (congestive) heart failure"
    assert row["parent"] == "I50.2" and list(row["ancestors"]) == ["I50.2", "I50", "I30-I5A", "9"]
    assert not labels.set_index("label_id").loc["I50", "assignable"]


def test_an_empty_split_is_named_at_prepare_dataset():
    """A split with no document stops prepare_dataset, naming the split and the dataset's source (it used to
    pass the data contract and fail minutes later on an empty prompt file)."""
    prepared = load_icd10cm_controlled(n_docs={"train": 2, "val": 1, "test": 1}, seed=0)
    prepared.splits["test"] = prepared.splits["test"].iloc[:0]
    with pytest.raises(InputError, match=r"the test split has no document") as err:
        check_prepared(prepared, "dataset mine (wikiseealso: /data/lf-wsa)")
    assert "/data/lf-wsa" in str(err.value) and "n_docs, max_docs" in str(err.value)


def test_icd10cm_label_table_lists_every_node_once_and_none_as_its_own_parent():
    from mechdistill.data import check_label_table
    from mechdistill.data.icd10cm import label_table

    table = label_table()
    assert len(table) == table["label_id"].nunique() == 98_466  # simple-icd-10-cm lists 98,505 names, 39 twice
    assert not (table["parent"] == table["label_id"]).any()
    assert not any(label in ancestors for label, ancestors in zip(table["label_id"], table["ancestors"]))
    by_id = table.set_index("label_id")
    # B10 names both a block and its only category: one row, the category, under chapter 1
    assert by_id.loc["B10", "parent"] == "1" and list(by_id.loc["B10.0", "ancestors"]) == ["B10", "1"]
    assert by_id.loc["B20", "assignable"]
    check_label_table(table, "icd10cm")


@pytest.mark.parametrize("rows, message", [
    ([("A", None, []), ("A", None, [])], "appears twice"),
    ([("A", "A", [])], "its own parent"),
    ([("A", None, []), ("B", "A", ["B", "A"])], "its own parent or ancestor"),
    ([("A", "B", ["B"]), ("B", "C", ["C"]), ("C", "A", ["A"])], "cycle"),
])
def test_check_label_table_rejects_duplicates_self_parents_and_cycles(rows, message):
    import pandas as pd

    from mechdistill.data import check_label_table
    from mechdistill.errors import InputError

    table = pd.DataFrame(rows, columns=["label_id", "parent", "ancestors"])
    with pytest.raises(InputError, match=message):
        check_label_table(table, "labels.parquet")
