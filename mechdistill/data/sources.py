"""The raw files each dataset adapter reads, found without importing the adapter.

The Snakefile lists them as inputs of `prepare_dataset` (an adapter module may import a large
parser, such as simple-icd-10-cm, so this module imports nothing of theirs): editing one of them
reruns the pipeline from the dataset on. A file that is missing is left out here; the adapter names
it, with where to get it, when the job runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

MIMIC_SUFFIXES = (".csv.gz", ".csv")
MIMIC_NOTES = "note/discharge"
MIMIC_DIAGNOSES = "hosp/diagnoses_icd"
MIMIC_PROCEDURES = "hosp/procedures_icd"
MIMIC_D_DIAGNOSES = "hosp/d_icd_diagnoses"
MIMIC_D_PROCEDURES = "hosp/d_icd_procedures"

WIKI_SUFFIXES = (".json.gz", ".json")
WIKI_STEMS = ("lbl", "trn", "tst")
WIKI_FILTER = "filter_labels_test.txt"


def first_existing(root: str | Path, stem: str, suffixes: Iterable[str]) -> Path | None:
    """`root/stem+suffix` for the first suffix that names a file, else None."""
    for suffix in suffixes:
        path = Path(root) / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def resolve_split_file(root: str | Path, split_file: str) -> Path:
    """A MIMIC split file as given (absolute, or relative to the working folder), else under `root`."""
    path = Path(split_file)
    return path if path.is_absolute() or path.exists() else Path(root) / split_file


def mimic4_files(root: str, split_file: str | None = None, include_procedures: bool = True, **_) -> list[Path | None]:
    stems = [MIMIC_NOTES, MIMIC_DIAGNOSES, MIMIC_D_DIAGNOSES]
    if include_procedures:
        stems += [MIMIC_PROCEDURES, MIMIC_D_PROCEDURES]
    files = [first_existing(root, stem, MIMIC_SUFFIXES) for stem in stems]
    return files + ([resolve_split_file(root, split_file)] if split_file is not None else [])


def wikiseealso_files(root: str, **_) -> list[Path | None]:
    return [first_existing(root, stem, WIKI_SUFFIXES) for stem in WIKI_STEMS] + [Path(root) / WIKI_FILTER]


SOURCE_FILES: dict[str, Callable[..., list[Path | None]]] = {
    "icd10cm_controlled": lambda **_: [],  # generated from the ICD-10-CM package: no file of the user's
    "mimic4_icd10": mimic4_files,
    "wikiseealso": wikiseealso_files,
}


def adapter_files(adapter: str, params: dict) -> list[str]:
    """The existing raw files `adapter` reads with `params` (an adapter not listed here: none)."""
    files = SOURCE_FILES.get(adapter, lambda **_: [])(**params)
    return sorted({str(f) for f in files if f is not None and f.is_file()})
