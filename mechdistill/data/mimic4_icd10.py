"""MIMIC-IV ICD-10 adapter: discharge summaries labelled with ICD-10-CM and ICD-10-PCS codes.

Follows Edin et al. 2023, "Automated medical coding on MIMIC-III and MIMIC-IV: a critical review
and replicability study" (SIGIR), repository JoakimEdin/medical-coding-reproducibility.

Verified against that repository (prepare_data/prepare_mimiciv.py, prepare_data/utils.py,
prepare_data/generate_mimiciv_splits.py, src/data/data_pipeline.py, src/settings.py,
configs/data/mimiciv_icd10.yaml):
- Inputs: MIMIC-IV-Note `note/discharge.csv.gz` and MIMIC-IV `hosp/diagnoses_icd.csv.gz`,
  `hosp/procedures_icd.csv.gz`, read with `icd_code` as string.
- Codes: NaN codes dropped, duplicate (hadm_id, code) dropped, each admission's codes sorted.
  ICD-10 diagnoses get a dot after the 3rd character (I5022 -> I50.22); ICD-10-PCS procedures
  are left without a dot and are NOT prefixed. They cannot collide: a PCS code has 7 characters
  and no dot, a formatted diagnosis code has a dot or 3 characters (checked here anyway).
- Notes: NaN text dropped, duplicate (hadm_id, text) dropped; notes are joined to codes on
  hadm_id; notes with no ICD-10 code at all are dropped (this removes ICD-9-era admissions).
- Filtering: MIN_TARGET_COUNT = 10, counted per code system over the remaining notes (a code
  counts once per note); rarer codes are removed and notes left with no code are dropped.
- Target = procedure codes + diagnosis codes (in that order).
- Text: lower-case; `[^A-Za-z0-9]+` -> " "; `(\\s\\d+)+\\s` -> " " (stand-alone numbers);
  `\\s+` -> " "; strip.
- Split: published as `files/data/mimiciv_icd10/mimiciv_icd10_split.feather` with columns
  `_id` (= hadm_id, int64) and `split` ("train" / "val" / "test"), inner-joined on `_id`.
  It was generated at patient level (subject_id) by iterative stratification with test 0.15,
  val 0.10, hence the default fractions (0.75, 0.10, 0.15).

Deliberate differences, and what could not be verified:
- Edin's formatter turns a 3-character diagnosis such as I10 into "I10." (trailing dot); here it
  stays "I10", the form ICD-10-CM and `simple_icd_10_cm` use. Only label ids differ.
- Empty note text is an error here (Edin silently drops NaN text), so bad downloads are noticed.
- MIMIC-IV-Note has one discharge summary per admission; if an admission has several distinct
  ones they are joined in note_seq order into one document (Edin keeps them as separate rows).
- Without `split_file` the split is a seeded random permutation of subject_ids (no iterative
  stratification), so it is patient-level and reproducible but not Edin's split. The published
  feather file is binary in the repository and its content (122,279 notes and 7,942 codes,
  as Edin et al. 2023 report) could not be checked here.
- The code filter runs on all notes before the split, as Edin does.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import simple_icd_10_cm as cm

from ..errors import ConfigError, InputError
from ..io import read_csv
from . import icd10cm
from .base import SPLITS, PreparedDataset
from .sources import (
    MIMIC_D_DIAGNOSES,
    MIMIC_D_PROCEDURES,
    MIMIC_DIAGNOSES,
    MIMIC_NOTES,
    MIMIC_PROCEDURES,
    MIMIC_SUFFIXES,
    first_existing,
    resolve_split_file,
)

EDIN_SPLIT_FRACTIONS = (0.75, 0.10, 0.15)
ICD10_CODE = r"[A-Z0-9]{3,7}"  # a code without its dot

NOTES, DIAGNOSES, PROCEDURES = MIMIC_NOTES, MIMIC_DIAGNOSES, MIMIC_PROCEDURES
D_DIAGNOSES, D_PROCEDURES = MIMIC_D_DIAGNOSES, MIMIC_D_PROCEDURES

REQUIRED = {
    NOTES: ["note_id", "subject_id", "hadm_id", "text"],
    DIAGNOSES: ["subject_id", "hadm_id", "icd_code", "icd_version"],
    PROCEDURES: ["subject_id", "hadm_id", "icd_code", "icd_version"],
    D_DIAGNOSES: ["icd_code", "icd_version", "long_title"],
    D_PROCEDURES: ["icd_code", "icd_version", "long_title"],
}
PHYSIONET_FIX = ("a credentialed PhysioNet user must download MIMIC-IV (hosp/ files, "
                 "https://physionet.org/content/mimiciv/) and MIMIC-IV-Note (note/ files, "
                 "https://physionet.org/content/mimic-iv-note/) and place them under the dataset root "
                 "as note/discharge.csv.gz and hosp/*.csv.gz (plain .csv also works).")


def load_mimic4_icd10(root: str, *, min_code_count: int = 10, split_file: str | None = None,
                      include_procedures: bool = True, seed: int = 0,
                      split_fractions: tuple[float, float, float] = EDIN_SPLIT_FRACTIONS,
                      clean_text: bool = True) -> PreparedDataset:
    """Prepare MIMIC-IV ICD-10 as in Edin et al. 2023 (see the module docstring).

    root: folder holding `note/` and `hosp/`. min_code_count: keep codes seen in at least this
    many notes. split_file: Edin's split (feather, parquet or csv with columns `_id`, `split`),
    a path or a path relative to `root`; without it, a seeded patient-level split with
    `split_fractions` (train, val, test). include_procedures: also use ICD-10-PCS codes.
    clean_text: apply Edin's text normalisation (lower-case, no punctuation, no stand-alone numbers).
    """
    fractions = _check_fractions(split_fractions) if split_file is None else None
    if min_code_count < 1:
        raise ConfigError(f"min_code_count must be >= 1, got {min_code_count}.")
    stats: dict[str, object] = {}
    notes_path = _find(root, NOTES)
    docs = _notes_per_admission(_read(notes_path, REQUIRED[NOTES], ["note_seq"]), notes_path, stats)

    systems = [("diagnosis", DIAGNOSES, D_DIAGNOSES, True)]
    if include_procedures:
        systems.insert(0, ("procedure", PROCEDURES, D_PROCEDURES, False))  # Edin: target = proc + diag
    codes, first_row, code_paths = {}, {}, {}
    for kind, stem, _, is_diag in systems:
        path = _find(root, stem)
        codes[kind], first_row[kind] = _codes_per_admission(_read(path, REQUIRED[stem]), path, is_diag)
        code_paths[kind] = path

    has_code = np.zeros(len(docs), dtype=bool)
    for kind in codes:
        has_code |= docs["hadm_id"].isin(codes[kind].index).to_numpy()
    stats["notes_without_icd10_codes"] = int((~has_code).sum())
    docs = docs[has_code].reset_index(drop=True)

    docs["labels"], kept = _frequent_codes(docs["hadm_id"], codes, min_code_count, stats)
    empty = docs["labels"].apply(len) == 0
    stats["notes_without_codes_after_filter"] = int(empty.sum())
    docs = docs[~empty].reset_index(drop=True)
    if docs.empty:
        raise ConfigError(f"no note keeps a code seen in at least min_code_count={min_code_count} notes "
                          f"({stats['notes_raw']} notes read); lower min_code_count.")
    if "procedure" in kept:
        _check_no_collision(kept, first_row, code_paths)

    if clean_text:
        docs["text"] = _cleaned_text(docs, notes_path)

    split_of = (_split_from_file(docs, resolve_split_file(root, split_file), stats) if split_file is not None
                else _random_split(docs, fractions, seed))
    stats["split_source"] = str(split_file) if split_file is not None else f"random(seed={seed})"
    docs["split"] = docs["hadm_id"].map(split_of)
    stats["docs_not_in_split_file"] = int(docs["split"].isna().sum())
    splits = {}
    for name in SPLITS:
        part = docs[docs["split"] == name].sort_values("hadm_id")
        splits[name] = pd.DataFrame({"doc_id": part["hadm_id"].astype(str).tolist(),
                                     "text": part["text"].tolist(), "labels": part["labels"].tolist()})
        stats[f"n_{name}"] = len(part)
        stats[f"subjects_{name}"] = int(part["subject_id"].nunique())

    table = _label_table(kept, root, first_row, code_paths, systems)
    stats["n_labels"] = int(table["assignable"].sum())
    stats["n_hierarchy_nodes"] = int((~table["assignable"]).sum())
    stats["diagnosis_codes_outside_icd10cm"] = int(
        ((table["system"] == "icd10cm") & table["assignable"] & table["parent"].isna()).sum())
    return PreparedDataset(splits=splits, labels=table, stats=stats)


def _frequent_codes(hadm_ids: pd.Series, codes: dict[str, pd.Series], min_code_count: int,
                   stats: dict[str, object]) -> tuple[list[list[str]], dict[str, list[str]]]:
    """Each note's codes seen in at least `min_code_count` notes, filtered per code system as Edin's
    filter_codes does (procedures, then diagnoses), and the kept codes of each system (sorted).

    hadm_ids: the notes' admissions; codes: per system, hadm_id -> that admission's codes."""
    labels: list[list[str]] = [[] for _ in range(len(hadm_ids))]
    kept: dict[str, list[str]] = {}
    for kind in codes:
        of_hadm = codes[kind].to_dict()
        lists = [of_hadm.get(h, []) for h in hadm_ids]
        counts = Counter(c for lst in lists for c in lst)
        keep = {c for c, n in counts.items() if n >= min_code_count}
        kept[kind] = sorted(keep)
        stats[f"{kind}_codes_before_filter"] = len(counts)
        stats[f"{kind}_codes_after_filter"] = len(keep)
        labels = [acc + [c for c in lst if c in keep] for acc, lst in zip(labels, lists, strict=True)]
    return labels, kept


def _cleaned_text(docs: pd.DataFrame, notes_path: Path) -> pd.Series:
    """The notes' text after Edin's normalisation; an InputError names a note it leaves empty."""
    text = edin_clean_text(docs["text"])
    blank = text.str.len() == 0
    if blank.any():
        r = docs[blank].iloc[0]
        raise InputError(f"note text of hadm_id {r.hadm_id} is empty after Edin's cleaning "
                         "(no letters or digits).", file=str(notes_path), row=r.first_row,
                         fix="check that discharge.csv.gz is the unmodified MIMIC-IV-Note file.")
    return text


def format_icd10(code: str, is_diag: bool) -> str:
    """MIMIC stores codes without dots; put one after the 3rd character of a diagnosis code."""
    code = str(code).strip().upper().replace(".", "")
    return code[:3] + "." + code[3:] if is_diag and len(code) > 3 else code


def edin_clean_text(text: pd.Series) -> pd.Series:
    """Edin et al.'s TextPreprocessor as configured in prepare_mimiciv.py."""
    text = text.str.lower()
    text = text.str.replace(r"[^A-Za-z0-9]+", " ", regex=True)
    text = text.str.replace(r"(\s\d+)+\s", " ", regex=True)
    text = text.str.replace(r"\s+", " ", regex=True)
    return text.str.strip()


# --------------------------------------------------------------------------- reading


def _find(root: str, stem: str) -> Path:
    path = first_existing(root, stem, MIMIC_SUFFIXES)
    if path is not None:
        return path
    raise InputError(f"missing MIMIC file (looked for {stem}.csv.gz and {stem}.csv).",
                     file=str(Path(root) / f"{stem}.csv.gz"), fix=PHYSIONET_FIX)


def _read(path: Path, required: list[str], optional: tuple[str, ...] | list[str] = ()) -> pd.DataFrame:
    """Read the needed columns; `_row` is the 1-based data row (the header is not counted)."""
    ids = ("note_id", "hadm_id")  # what a bad row is named by, besides its number
    header = list(read_csv(path, ids, nrows=0).columns)
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(f"missing column(s) {missing}; columns found: {header}.", file=str(path),
                         fix="use the unmodified MIMIC-IV / MIMIC-IV-Note file from PhysioNet.")
    cols = required + [c for c in optional if c in header]
    df = read_csv(path, ids, usecols=cols, dtype={"icd_code": str, "note_id": str, "text": str, "long_title": str})
    df["_row"] = np.arange(1, len(df) + 1)
    return df


def _int_column(df: pd.DataFrame, col: str, path: Path) -> pd.Series:
    values = pd.to_numeric(df[col], errors="coerce")
    bad = values.isna() | (values != values.round())
    if bad.any():
        r = df[bad].iloc[0]
        raise InputError(f"column '{col}' has a missing or non-integer value {r[col]!r}.", file=str(path),
                         row=int(r["_row"]), fix="use the unmodified MIMIC-IV / MIMIC-IV-Note file.")
    return values.astype("int64")


def _notes_per_admission(notes: pd.DataFrame, path: Path, stats: dict) -> pd.DataFrame:
    """One row per hadm_id: subject_id, hadm_id, text, first_row (a row of the notes file)."""
    stats["notes_raw"] = len(notes)
    blank = notes["text"].isna() | (notes["text"].fillna("").str.strip() == "")
    if blank.any():
        r = notes[blank].iloc[0]
        raise InputError(f"note {r.note_id} has empty text.", file=str(path),
                         row=f"{r._row} (note_id {r.note_id})",
                         fix="re-download discharge.csv.gz from MIMIC-IV-Note, or delete that row.")
    for col in ("subject_id", "hadm_id"):
        notes[col] = _int_column(notes, col, path)
    before = len(notes)
    notes = notes.drop_duplicates(subset=["hadm_id", "text"])
    stats["notes_duplicate_dropped"] = before - len(notes)
    order = ["hadm_id", "note_seq", "_row"] if "note_seq" in notes else ["hadm_id", "_row"]
    notes = notes.sort_values(order)
    several = notes["hadm_id"].duplicated(keep=False)
    joined = notes[several].groupby("hadm_id", sort=True).agg(
        subject_id=("subject_id", "first"), text=("text", "\n\n".join), _row=("_row", "min")).reset_index()
    stats["admissions_with_several_notes"] = len(joined)
    cols = ["hadm_id", "subject_id", "text", "_row"]
    docs = pd.concat([notes.loc[~several, cols], joined[cols]]).sort_values("hadm_id")
    return docs.rename(columns={"_row": "first_row"}).reset_index(drop=True)


def _codes_per_admission(df: pd.DataFrame, path: Path, is_diag: bool) -> tuple[pd.Series, dict[str, int]]:
    """hadm_id -> sorted list of formatted ICD-10 codes, and code -> first data row using it."""
    version = pd.to_numeric(df["icd_version"], errors="coerce")
    bad = ~version.isin([9, 10])
    if bad.any():
        r = df[bad].iloc[0]
        raise InputError(f"icd_version must be 9 or 10, got {r.icd_version!r}.", file=str(path),
                         row=int(r["_row"]), fix="use the unmodified MIMIC-IV hosp file.")
    df = df[(version == 10) & df["icd_code"].notna()].copy()
    df["hadm_id"] = _int_column(df, "hadm_id", path)
    df["code"] = [format_icd10(c, is_diag) for c in df["icd_code"]]
    malformed = ~df["code"].str.replace(".", "", regex=False).str.fullmatch(ICD10_CODE) & (df["code"] != "")
    if malformed.any():  # else it would be counted as a rare code and dropped from the gold labels unseen
        r = df[malformed].iloc[0]
        raise InputError(f"icd_code {r.icd_code!r} is not an ICD-10 code (3 to 7 letters and digits; MIMIC-IV "
                         f"writes them without dots); {int(malformed.sum())} row(s) like it.", file=str(path),
                         row=int(r["_row"]), fix="use the unmodified MIMIC-IV hosp file, or correct the code.")
    df = df[df["code"] != ""].drop_duplicates(subset=["hadm_id", "code"])
    first_row = df.groupby("code")["_row"].min().astype(int).to_dict()
    lists = df.sort_values(["hadm_id", "code"]).groupby("hadm_id")["code"].agg(list)
    return lists, first_row


def _check_no_collision(kept: dict, first_row: dict, paths: dict) -> None:
    both = sorted(set(kept["procedure"]) & set(kept["diagnosis"]))
    if both:
        code = both[0]
        raise InputError(f"ICD-10-PCS code {code} equals a formatted ICD-10-CM code; a PCS code has "
                         "7 characters and no dot.", file=str(paths["procedure"]),
                         row=first_row["procedure"][code], fix="correct the icd_code or icd_version.")


# --------------------------------------------------------------------------- splits


def _check_fractions(fractions: tuple[float, float, float]) -> tuple[float, float, float]:
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
        raise ConfigError(f"split_fractions must be three non-negative numbers (train, val, test) "
                          f"summing to 1, got {fractions}.")
    return fr  # type: ignore[return-value]


def _random_split(docs: pd.DataFrame, fractions: tuple[float, float, float], seed: int) -> dict[int, str]:
    """Seeded patient-level split: whole subjects go to one split; sizes count subjects."""
    subjects = np.array(sorted(docs["subject_id"].unique()))
    order = subjects[np.random.default_rng(seed).permutation(len(subjects))]
    n_test = int(round(fractions[2] * len(subjects)))
    n_val = int(round(fractions[1] * len(subjects)))
    split_of_subject = {s: "test" for s in order[:n_test]}
    split_of_subject.update({s: "val" for s in order[n_test:n_test + n_val]})
    split_of_subject.update({s: "train" for s in order[n_test + n_val:]})
    return dict(zip(docs["hadm_id"], docs["subject_id"].map(split_of_subject), strict=True))


def _split_from_file(docs: pd.DataFrame, path: Path, stats: dict) -> dict[int, str]:
    fix = ("use Edin et al.'s files/data/mimiciv_icd10/mimiciv_icd10_split.feather from "
           "github.com/JoakimEdin/medical-coding-reproducibility (columns _id, split).")
    if not path.is_file():
        raise InputError("split file does not exist.", file=str(path), fix=fix)
    name = path.name.lower()
    if name.endswith(".feather"):
        df = pd.read_feather(path)
    elif name.endswith(".parquet"):
        df = pd.read_parquet(path)
    elif name.endswith((".csv", ".csv.gz")):
        df = read_csv(path)
    else:
        raise InputError("unknown split file type (expected .feather, .parquet or .csv).",
                         file=str(path), fix=fix)
    missing = [c for c in ("_id", "split") if c not in df.columns]
    if missing:
        raise InputError(f"missing column(s) {missing}; columns found: {list(df.columns)}.",
                         file=str(path), fix=fix)
    df["_row"] = np.arange(1, len(df) + 1)
    df["_id"] = _int_column(df, "_id", path)
    bad = ~df["split"].isin(SPLITS)
    if bad.any():
        r = df[bad].iloc[0]
        raise InputError(f"split must be one of {list(SPLITS)}, got {r.split!r} for _id {r._id}.",
                         file=str(path), row=int(r["_row"]), fix=fix)
    dup = df["_id"].duplicated()
    if dup.any():
        r = df[dup].iloc[0]
        raise InputError(f"_id {r._id} appears more than once.", file=str(path), row=int(r["_row"]), fix=fix)
    stats["split_file_ids_not_found"] = int((~df["_id"].isin(docs["hadm_id"])).sum())
    return dict(zip(df["_id"], df["split"], strict=True))


# --------------------------------------------------------------------------- labels


def _titles(root: str, stem: str) -> tuple[dict[str, str], Path]:
    path = _find(root, stem)
    df = _read(path, REQUIRED[stem])
    df = df[pd.to_numeric(df["icd_version"], errors="coerce") == 10]
    titles = {str(c).strip().upper().replace(".", ""): t for c, t in zip(df["icd_code"], df["long_title"], strict=True)
              if isinstance(t, str) and t.strip()}
    return titles, path


def _label_table(kept: dict[str, list[str]], root: str, first_row: dict, code_paths: dict,
                 systems: list) -> pd.DataFrame:
    rows = []
    for kind, _, d_stem, is_diag in systems:
        titles, d_path = _titles(root, d_stem)
        for code in kept[kind]:
            title = titles.get(code.replace(".", ""))
            if title is None:
                raise InputError(f"ICD-10 {kind} code {code} (first used in {code_paths[kind]} row "
                                 f"{first_row[kind][code]}) has no long_title.", file=str(d_path),
                                 fix=f"use the unmodified {Path(d_stem).name} file from MIMIC-IV.")
            parent, ancestors = None, []
            if is_diag and cm.is_valid_item(code):
                parent, ancestors = icd10cm.lineage(code)
            rows.append((code, title.strip(), parent, ancestors, True,
                         "icd10cm" if is_diag else "icd10pcs"))
    assignable = {r[0] for r in rows}
    nodes = sorted({a for r in rows for a in r[3]} - assignable)
    for node in nodes:
        rows.append((node, cm.get_description(node), *icd10cm.lineage(node), False, "icd10cm"))
    rows.sort(key=lambda r: (not r[4], r[0]))
    cols = ["label_id", "title", "parent", "ancestors", "assignable", "system"]
    return pd.DataFrame({c: pd.Series([r[i] for r in rows], dtype=bool if c == "assignable" else object)
                         for i, c in enumerate(cols)})
