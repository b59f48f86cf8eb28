"""Real-data adapters (MIMIC-IV ICD-10, LF-WikiSeeAlso-320K) on fixtures in the upstream formats."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from mechdistill.data.base import SPLITS
from mechdistill.data.mimic4_icd10 import format_icd10, load_mimic4_icd10
from mechdistill.data.wikiseealso import load_wikiseealso
from mechdistill.errors import ConfigError, InputError
from mechdistill.io import to_table
from tests.helpers import REPO

FIXTURES = REPO / "tests" / "fixtures"
MIMIC = FIXTURES / "mimic4"
WIKI = FIXTURES / "wikiseealso"

# ---------------------------------------------------------------------------------------- helpers


def copy_fixture(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def read_csv_gz(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def write_csv_gz(path: Path, df: pd.DataFrame) -> None:
    with gzip.open(path, "wt") as fh:
        df.to_csv(fh, index=False)


def read_lines(path: Path) -> list[str]:
    with gzip.open(path, "rt") as fh:
        return fh.read().splitlines()


def write_lines(path: Path, lines: list[str]) -> None:
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")


def check_contract(ds) -> None:
    assert list(ds.splits) == list(SPLITS)
    for df in ds.splits.values():
        assert list(df.columns) == ["doc_id", "text", "labels"]
        assert all(isinstance(d, str) for d in df["doc_id"])
        assert all(isinstance(t, str) and t for t in df["text"])
        assert all(isinstance(lst, list) for lst in df["labels"])
    ids = [d for df in ds.splits.values() for d in df["doc_id"]]
    assert len(ids) == len(set(ids))
    assert {"label_id", "title", "parent", "ancestors", "assignable"} <= set(ds.labels.columns)
    assert ds.labels["label_id"].is_unique
    assignable = set(ds.labels.loc[ds.labels["assignable"], "label_id"])
    assert all(lst and set(lst) <= assignable for df in ds.splits.values() for lst in df["labels"])
    to_table(ds.labels, "labels")  # casts to the Parquet contract types or raises
    for df in ds.splits.values():
        to_table(df, "documents")


# ------------------------------------------------------------------------------------ MIMIC-IV

DOCS_MIN3 = {"22595853", "22841357", "24597018", "27703517", "20321825", "23559586", "29483621",
             "24181354", "20626031", "25058212", "22954658", "20291550", "28662225"}
DIAG_MIN3 = {"I50.22", "I13.0", "N18.30", "E11.9", "Z79.4", "E78.5", "I10", "J18.9", "N17.9", "T40.4X1A"}
PROC_MIN3 = {"5A1945Z", "0BH17EZ"}


@pytest.fixture(scope="module")
def mimic():
    return load_mimic4_icd10(str(MIMIC), min_code_count=3)


@pytest.fixture(scope="module")
def subject_of() -> dict[str, int]:
    notes = pd.read_csv(MIMIC / "note" / "discharge.csv.gz")
    return dict(zip(notes["hadm_id"].astype(str), notes["subject_id"], strict=True))


def test_mimic_docs_and_labels(mimic):
    check_contract(mimic)
    assert {d for df in mimic.splits.values() for d in df["doc_id"]} == DOCS_MIN3
    lab = mimic.labels.set_index("label_id")
    assert set(lab.index[lab["assignable"]]) == DIAG_MIN3 | PROC_MIN3
    # K21.9 is in 2 notes (+1 admission without a note), A41.9 and 02HV33Z in 1: below min_code_count.
    assert not {"K21.9", "A41.9", "02HV33Z"} & set(lab.index)
    st = mimic.stats
    assert (st["notes_raw"], st["notes_without_icd10_codes"], st["notes_without_codes_after_filter"]) == (16, 1, 1)
    assert (st["diagnosis_codes_before_filter"], st["diagnosis_codes_after_filter"]) == (12, 10)
    assert (st["procedure_codes_before_filter"], st["procedure_codes_after_filter"]) == (3, 2)
    assert st["admissions_with_several_notes"] == 1 and st["n_labels"] == 12


def test_mimic_label_rows(mimic):
    lab = mimic.labels.set_index("label_id")
    assert lab.loc["I10", "title"] == "Essential (primary) hypertension"  # long_title from d_icd_diagnoses
    assert lab.loc["5A1945Z", "title"] == "Respiratory Ventilation, 24-96 Consecutive Hours"
    assert lab.loc["I50.22", "parent"] == "I50.2"
    assert lab.loc["I50.22", "ancestors"] == ["I50.2", "I50", "I30-I5A", "9"]
    assert lab.loc["5A1945Z", "parent"] is None and lab.loc["5A1945Z", "ancestors"] == []
    # T40.4X1A was deleted from ICD-10-CM in FY2024, so it has no place in the 2026 hierarchy.
    assert lab.loc["T40.4X1A", "parent"] is None and lab.loc["T40.4X1A", "ancestors"] == []
    nodes = lab[~lab["assignable"]]
    assert len(nodes) == 22
    assert {"I50.2", "I50", "I30-I5A", "9", "N18.3", "E11", "I10-I1A"} <= set(nodes.index)
    assert lab.loc["I50", "title"] == "Heart failure" and lab.loc["I50", "parent"] == "I30-I5A"
    assert lab.loc["9", "parent"] is None and lab.loc["9", "ancestors"] == []
    assert mimic.stats["diagnosis_codes_outside_icd10cm"] == 1


def test_mimic_code_format_and_order(mimic):
    labels = {d: lst for df in mimic.splits.values() for d, lst in zip(df["doc_id"], df["labels"], strict=True)}
    # Edin et al.: target = sorted procedure codes + sorted diagnosis codes.
    assert labels["22595853"] == ["5A1945Z", "E11.9", "I13.0", "I50.22", "N18.30", "Z79.4"]
    assert labels["29483621"] == ["I10", "T40.4X1A"]  # I10 is listed twice in diagnoses_icd
    diag = re.compile(r"^[A-Z][0-9][0-9A-Z](\.[0-9A-Z]{1,4})?$")
    for code in DIAG_MIN3:
        assert diag.match(code)
    assert format_icd10("I5022", True) == "I50.22" and format_icd10("I10", True) == "I10"
    assert format_icd10("0BH17EZ", False) == "0BH17EZ"


def test_mimic_text(mimic, tmp_path):
    text = dict(zip(mimic.splits["train"]["doc_id"], mimic.splits["train"]["text"], strict=True))
    for t in text.values():
        assert t == t.lower() and re.fullmatch(r"[a-z0-9 ]+", t)
    raw = load_mimic4_icd10(str(MIMIC), min_code_count=3, clean_text=False)
    raw_text = {d: t for df in raw.splits.values() for d, t in zip(df["doc_id"], df["text"], strict=True)}
    assert "Chief Complaint:\ninsulin adjustment" in raw_text["20291550"]
    assert raw_text["20291550"].endswith("\n\n \nAddendum:\nPatient seen again prior to discharge; "
                                         "insulin sliding scale reviewed.\n")


def test_mimic_min_count_drops_codes_and_notes():
    ds = load_mimic4_icd10(str(MIMIC), min_code_count=4)
    assert set(ds.labels.loc[ds.labels["assignable"], "label_id"]) == {"E11.9", "Z79.4", "E78.5", "I10", "N17.9"}
    docs = {d for df in ds.splits.values() for d in df["doc_id"]}
    assert docs == DOCS_MIN3 - {"23559586", "20626031"}  # left with no code
    with pytest.raises(ConfigError, match="min_code_count=100"):
        load_mimic4_icd10(str(MIMIC), min_code_count=100)


def test_mimic_without_procedures():
    ds = load_mimic4_icd10(str(MIMIC), min_code_count=3, include_procedures=False)
    assert set(ds.labels.loc[ds.labels["assignable"], "label_id"]) == DIAG_MIN3
    assert sum(len(df) for df in ds.splits.values()) == 13


def test_mimic_patient_level_split_is_deterministic(subject_of):
    assignments = []
    for seed in range(4):
        ds = load_mimic4_icd10(str(MIMIC), min_code_count=3, seed=seed, split_fractions=(0.5, 0.25, 0.25))
        again = load_mimic4_icd10(str(MIMIC), min_code_count=3, seed=seed, split_fractions=(0.5, 0.25, 0.25))
        split_of = {d: name for name, df in ds.splits.items() for d in df["doc_id"]}
        assert split_of == {d: name for name, df in again.splits.items() for d in df["doc_id"]}
        assert set(split_of) == DOCS_MIN3
        subjects = {name: {subject_of[d] for d in df["doc_id"]} for name, df in ds.splits.items()}
        assert not subjects["train"] & subjects["val"] and not subjects["train"] & subjects["test"]
        assert not subjects["val"] & subjects["test"]
        # 9 subjects: round(0.25 * 9) = 2 in val, 2 in test, 5 in train
        assert [len(subjects[s]) for s in SPLITS] == [5, 2, 2]
        assignments.append(split_of)
    assert any(a != assignments[0] for a in assignments[1:])
    with pytest.raises(ConfigError, match="split_fractions"):
        load_mimic4_icd10(str(MIMIC), min_code_count=3, split_fractions=(0.8, 0.1, 0.2))


def test_mimic_edin_split_file(tmp_path):
    expected = {"train": {"22595853", "22841357", "24597018", "27703517", "20321825", "28662225", "23559586",
                          "29483621"}, "val": {"24181354", "20626031"}, "test": {"25058212", "22954658"}}
    ds = load_mimic4_icd10(str(MIMIC), min_code_count=3, split_file="mimiciv_icd10_split.feather")
    assert {name: set(df["doc_id"]) for name, df in ds.splits.items()} == expected
    assert ds.stats["docs_not_in_split_file"] == 1  # 20291550
    assert ds.stats["split_file_ids_not_found"] == 1  # 26264036 has no code left
    csv = tmp_path / "split.csv"
    pd.read_feather(MIMIC / "mimiciv_icd10_split.feather").to_csv(csv, index=False)
    ds_csv = load_mimic4_icd10(str(MIMIC), min_code_count=3, split_file=str(csv))
    assert {name: set(df["doc_id"]) for name, df in ds_csv.splits.items()} == expected


def test_mimic_plain_csv(tmp_path):
    root = copy_fixture(MIMIC, tmp_path)
    gz = root / "hosp" / "diagnoses_icd.csv.gz"
    (root / "hosp" / "diagnoses_icd.csv").write_bytes(gzip.decompress(gz.read_bytes()))
    gz.unlink()
    ds = load_mimic4_icd10(str(root), min_code_count=3)
    assert {d for df in ds.splits.values() for d in df["doc_id"]} == DOCS_MIN3


def test_mimic_missing_file(tmp_path):
    root = copy_fixture(MIMIC, tmp_path)
    (root / "hosp" / "procedures_icd.csv.gz").unlink()
    with pytest.raises(InputError, match=r"procedures_icd\.csv\.gz.*PhysioNet"):
        load_mimic4_icd10(str(root), min_code_count=3)
    assert load_mimic4_icd10(str(root), min_code_count=3, include_procedures=False).stats["n_labels"] == 10


def test_mimic_missing_column(tmp_path):
    root = copy_fixture(MIMIC, tmp_path)
    path = root / "hosp" / "diagnoses_icd.csv.gz"
    write_csv_gz(path, read_csv_gz(path).drop(columns="icd_version"))
    with pytest.raises(InputError) as err:
        load_mimic4_icd10(str(root), min_code_count=3)
    msg = str(err.value)
    assert str(path) in msg and "'icd_version'" in msg and "columns found" in msg and "'seq_num'" in msg


@pytest.mark.parametrize("blank", ["", "   \n "])
def test_mimic_empty_text(tmp_path, blank):
    root = copy_fixture(MIMIC, tmp_path)
    path = root / "note" / "discharge.csv.gz"
    notes = read_csv_gz(path)
    notes.loc[2, "text"] = blank
    write_csv_gz(path, notes)
    with pytest.raises(InputError) as err:
        load_mimic4_icd10(str(root), min_code_count=3)
    msg = str(err.value)
    assert msg.startswith(f"{path}, row 3 (note_id {notes.loc[2, 'note_id']})") and "empty text" in msg


def test_mimic_label_without_title(tmp_path):
    root = copy_fixture(MIMIC, tmp_path)
    path = root / "hosp" / "d_icd_diagnoses.csv.gz"
    titles = read_csv_gz(path)
    write_csv_gz(path, titles[titles["icd_code"] != "I10"])
    first_i10 = read_csv_gz(root / "hosp" / "diagnoses_icd.csv.gz")["icd_code"].tolist().index("I10") + 1
    with pytest.raises(InputError) as err:
        load_mimic4_icd10(str(root), min_code_count=3)
    msg = str(err.value)
    assert msg.startswith(str(path)) and "code I10 " in msg and "no long_title" in msg
    assert f"diagnoses_icd.csv.gz row {first_i10})" in msg


def test_mimic_bad_icd_version(tmp_path):
    root = copy_fixture(MIMIC, tmp_path)
    path = root / "hosp" / "diagnoses_icd.csv.gz"
    diag = read_csv_gz(path)
    diag.loc[4, "icd_version"] = "11"
    write_csv_gz(path, diag)
    with pytest.raises(InputError, match=re.escape(f"{path}, row 5: icd_version must be 9 or 10")):
        load_mimic4_icd10(str(root), min_code_count=3)


def test_mimic_malformed_code_is_named_not_dropped(tmp_path):
    """I50-22 would format to "I50.-22", count as a rare code and vanish from the gold labels unseen."""
    root = copy_fixture(MIMIC, tmp_path)
    path = root / "hosp" / "diagnoses_icd.csv.gz"
    diag = read_csv_gz(path)
    row = int(diag.index[diag["icd_version"] == "10"][0])
    diag.loc[row, "icd_code"] = "I50-22"
    write_csv_gz(path, diag)
    with pytest.raises(InputError, match=re.escape(f"{path}, row {row + 1}: icd_code 'I50-22' is not an ICD-10 code")):
        load_mimic4_icd10(str(root), min_code_count=3)


def test_wiki_empty_test_file_is_named(tmp_path):
    """An empty tst file is the error (before, filter_labels_test.txt was blamed for pointing past it)."""
    root = copy_fixture(WIKI, tmp_path)
    (root / "tst.json.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(InputError, match=re.escape(f"{root / 'tst.json.gz'}: the file holds no document")):
        load_wikiseealso(str(root))


def test_adapter_files_are_what_the_adapters_read(tmp_path):
    from mechdistill.data.sources import adapter_files

    wiki = copy_fixture(WIKI, tmp_path)
    assert adapter_files("wikiseealso", {"root": str(wiki)}) == sorted(
        str(wiki / name) for name in ("lbl.json.gz", "trn.json.gz", "tst.json.gz", "filter_labels_test.txt"))
    mimic = copy_fixture(MIMIC, tmp_path)
    files = adapter_files("mimic4_icd10", {"root": str(mimic), "include_procedures": False})
    assert files == sorted(str(mimic / f) for f in ("note/discharge.csv.gz", "hosp/diagnoses_icd.csv.gz",
                                                     "hosp/d_icd_diagnoses.csv.gz"))
    assert len(adapter_files("mimic4_icd10", {"root": str(mimic)})) == 5
    assert adapter_files("icd10cm_controlled", {"n_docs": {"train": 3}}) == []


def test_mimic_bad_split_file(tmp_path):
    bad = tmp_path / "split.csv"
    pd.DataFrame({"_id": [22595853, 20626031], "split": ["train", "dev"]}).to_csv(bad, index=False)
    with pytest.raises(InputError, match=re.escape(f"{bad}, row 2: split must be one of")):
        load_mimic4_icd10(str(MIMIC), min_code_count=3, split_file=str(bad))
    pd.DataFrame({"hadm_id": [22595853], "split": ["train"]}).to_csv(bad, index=False)
    with pytest.raises(InputError, match=r"missing column\(s\) \['_id'\]"):
        load_mimic4_icd10(str(MIMIC), min_code_count=3, split_file=str(bad))
    with pytest.raises(InputError, match="split file does not exist"):
        load_mimic4_icd10(str(MIMIC), min_code_count=3, split_file=str(tmp_path / "nope.feather"))


# ---------------------------------------------------------------------------- LF-WikiSeeAlso


@pytest.fixture(scope="module")
def wiki():
    return load_wikiseealso(str(WIKI), val_fraction=0.2, seed=0)


def test_wiki_counts_and_labels(wiki):
    check_contract(wiki)
    assert [len(wiki.splits[s]) for s in SPLITS] == [15, 4, 6]
    assert wiki.stats["docs_without_labels_dropped_trn"] == 1  # Sloth
    assert wiki.stats["docs_without_labels_dropped_tst"] == 1  # Quasar
    lab = wiki.labels.set_index("label_id")
    assert len(lab) == 12 and lab["assignable"].all()
    assert lab.loc["233488", "title"] == "Machine learning"
    assert lab.loc["233488", "parent"] is None and lab.loc["233488", "ancestors"] == []
    assert wiki.stats["n_labels"] == 12 and wiki.stats["repeated_target_ind_dropped_trn"] == 1


def test_wiki_docs(wiki):
    docs = {d: (t, lst) for df in wiki.splits.values()
            for d, t, lst in zip(df["doc_id"], df["text"], df["labels"], strict=True)}
    assert docs["4269"] == ("Wolf\n\nThe wolf is a canine native to Eurasia and North America.",
                            ["18978754", "18717338"])
    assert docs["27979"] == ("Deep learning", ["1164", "233488", "21523"])  # empty content: title alone
    assert docs["32527"][1] == ["9228", "26751"]  # target_ind [9, 11, 11]
    assert "26700" not in docs and "25052" not in docs  # no target_ind
    assert docs["19331"][1] == ["19331", "9228"]  # doc uid and label uid namespaces are separate
    test = wiki.splits["test"]
    assert test["doc_id"].tolist() == ["6678", "15562", "1164000", "2428", "24544", "9251"]


def test_wiki_excluded_pairs(wiki):
    pairs = set(map(tuple, wiki.excluded_pairs[["doc_id", "label_id"]].to_numpy().tolist()))
    assert pairs == {("1164000", "19331"), ("2428", "21523"), ("9251", "23603")}
    assert wiki.stats["excluded_pairs_of_dropped_docs"] == 1  # (6, 9): Quasar has no labels


def test_wiki_val_split_is_deterministic(wiki):
    trn_ids = [json.loads(line)["uid"] for line in read_lines(WIKI / "trn.json.gz")]
    again = load_wikiseealso(str(WIKI), val_fraction=0.2, seed=0)
    assert wiki.splits["val"]["doc_id"].tolist() == again.splits["val"]["doc_id"].tolist()
    train, val = set(wiki.splits["train"]["doc_id"]), set(wiki.splits["val"]["doc_id"])
    assert not train & val and train | val == set(trn_ids) - {"26700"}
    assert wiki.splits["train"]["doc_id"].tolist() == [u for u in trn_ids if u in train]  # file order kept
    vals = {tuple(load_wikiseealso(str(WIKI), val_fraction=0.2, seed=s).splits["val"]["doc_id"])
            for s in range(1, 4)}
    assert len(vals | {tuple(val)}) > 1
    assert len(load_wikiseealso(str(WIKI)).splits["val"]) == 1  # round(0.05 * 19)


def test_wiki_plain_json_and_no_filter(tmp_path):
    root = copy_fixture(WIKI, tmp_path)
    for stem in ("trn", "tst", "lbl"):
        gz = root / f"{stem}.json.gz"
        (root / f"{stem}.json").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    (root / "filter_labels_test.txt").unlink()
    ds = load_wikiseealso(str(root), val_fraction=0.2)
    assert [len(ds.splits[s]) for s in SPLITS] == [15, 4, 6]
    assert ds.excluded_pairs is None


def test_wiki_target_out_of_range(tmp_path):
    root = copy_fixture(WIKI, tmp_path)
    path = root / "trn.json.gz"
    lines = read_lines(path)
    row = json.loads(lines[2])
    row["target_ind"] = [0, 12]
    lines[2] = json.dumps(row)
    write_lines(path, lines)
    with pytest.raises(InputError) as err:
        load_wikiseealso(str(root))
    msg = str(err.value)
    assert msg.startswith(f"{path}, row 3: target_ind value 12 is out of range") and "has 12 rows" in msg


def test_wiki_bad_json(tmp_path):
    root = copy_fixture(WIKI, tmp_path)
    path = root / "tst.json.gz"
    lines = read_lines(path)
    lines[1] = lines[1][:-5]
    write_lines(path, lines)
    with pytest.raises(InputError, match=re.escape(f"{path}, row 2: line is not valid JSON")):
        load_wikiseealso(str(root))


def test_wiki_missing_key(tmp_path):
    root = copy_fixture(WIKI, tmp_path)
    path = root / "trn.json.gz"
    lines = read_lines(path)
    row = json.loads(lines[3])
    del row["target_ind"]
    lines[3] = json.dumps(row)
    write_lines(path, lines)
    with pytest.raises(InputError, match=re.escape(f"{path}, row 4: missing key(s) ['target_ind']")):
        load_wikiseealso(str(root))


def test_wiki_empty_text_and_blank_line(tmp_path):
    root = copy_fixture(WIKI, tmp_path)
    path = root / "tst.json.gz"
    lines = read_lines(path)
    row = json.loads(lines[4])
    row["title"], row["content"] = " ", ""
    write_lines(path, lines[:4] + [json.dumps(row)] + lines[5:])
    with pytest.raises(InputError, match=re.escape(f"{path}, row 5: document 24544 has an empty title")):
        load_wikiseealso(str(root))
    write_lines(path, lines[:2] + [""] + lines[2:])
    with pytest.raises(InputError, match=re.escape(f"{path}, row 3: blank line inside the file")):
        load_wikiseealso(str(root))


def test_wiki_bad_filter_file(tmp_path):
    root = copy_fixture(WIKI, tmp_path)
    path = root / "filter_labels_test.txt"
    path.write_text("2 10\n7 0\n")
    with pytest.raises(InputError, match=re.escape(f"{path}, row 2: pair (7, 0) is out of range")):
        load_wikiseealso(str(root))
    path.write_text("2 10\n3\n")
    with pytest.raises(InputError, match=re.escape(f"{path}, row 2: expected two integers")):
        load_wikiseealso(str(root))


def test_wiki_repeated_uid(tmp_path):
    root = copy_fixture(WIKI, tmp_path)
    path = root / "lbl.json.gz"
    lines = read_lines(path)
    write_lines(path, lines + [lines[1]])
    with pytest.raises(InputError, match=re.escape(f"{path}, row 13: label uid 18978754 repeats line 2")):
        load_wikiseealso(str(root))


def test_wiki_missing_file(tmp_path):
    root = copy_fixture(WIKI, tmp_path)
    (root / "lbl.json.gz").unlink()
    with pytest.raises(InputError, match=r"lbl\.json\.gz: missing file .*Extreme Classification Repository"):
        load_wikiseealso(str(root))


DAMAGES = [("truncated", "truncated gzip file"), ("not gzip", "not a gzip file, though its name ends in .gz"),
           ("latin-1", "not UTF-8 text")]


def _damage(path: Path, how: str) -> None:
    """A file as users break them: cut short, not compressed despite .gz, or Latin-1 bytes in UTF-8 text."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "not gzip":
        path.write_bytes(gzip.decompress(data))
    else:  # "latin-1": a 0xE9 byte (é) inside the third line
        lines = gzip.decompress(data).split(b"\n")
        lines[2] = b"\xe9" + lines[2]
        path.write_bytes(gzip.compress(b"\n".join(lines)))


@pytest.mark.parametrize("how, message", DAMAGES)
def test_wiki_damaged_files_are_named(tmp_path, how, message):
    root = copy_fixture(WIKI, tmp_path)
    path = root / "trn.json.gz"
    _damage(path, how)
    with pytest.raises(InputError) as err:
        load_wikiseealso(str(root))
    assert str(err.value).startswith(str(path)) and message in str(err.value)
    if how == "latin-1":
        assert str(err.value).startswith(f"{path}, row 3: ")


@pytest.mark.parametrize("row", [1, 7])
def test_mimic_latin1_note_names_its_row_note_and_column(tmp_path, row):
    """A note with a Latin-1 byte (0xE9, é) in discharge.csv.gz: the error names the row (a record: notes span
    many lines), the note_id and the column, as the loader's other errors do."""
    root = copy_fixture(MIMIC, tmp_path)
    path = root / "note" / "discharge.csv.gz"
    notes = read_csv_gz(path)
    notes.loc[row - 1, "text"] = "Patient from a MARK with chest pain.\n" + notes.loc[row - 1, "text"]
    path.write_bytes(gzip.compress(notes.to_csv(index=False).encode().replace(b"MARK", b"caf\xe9")))
    with pytest.raises(InputError) as err:
        load_mimic4_icd10(str(root), min_code_count=3)
    assert str(err.value).startswith(f"{path}, row {row} (note_id {notes.loc[row - 1, 'note_id']}): not UTF-8 text "
                                     "(byte 0xe9 in column 'text': b'Patient from a caf\\xe9 with chest pain.")
    assert "iconv -f latin1 -t utf-8" in str(err.value)


@pytest.mark.parametrize("how, message", DAMAGES)
def test_mimic_damaged_files_are_named(tmp_path, how, message):
    root = copy_fixture(MIMIC, tmp_path)
    path = root / "hosp" / "diagnoses_icd.csv.gz"
    _damage(path, how)
    with pytest.raises(InputError) as err:
        load_mimic4_icd10(str(root), min_code_count=3)
    assert str(err.value).startswith(str(path)) and message in str(err.value)
    if how == "latin-1":  # the byte opens line 3: data row 2, named by its admission
        hadm_id = read_csv_gz(MIMIC / "hosp" / "diagnoses_icd.csv.gz")["hadm_id"][1]
        assert str(err.value).startswith(f"{path}, row 2 (hadm_id {hadm_id}): not UTF-8 text (byte 0xe9 in column ")
