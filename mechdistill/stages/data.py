"""rules/data.smk: prepare_dataset, build_prompts, clean_prompts."""

from __future__ import annotations

import logging
import os

from .. import paths
from ..anchors.embed import SentenceEmbedder
from ..data import prepare_dataset
from ..data.settings import DatasetSettings
from ..errors import InputError
from ..io import read_parquet, write_json, write_parquet
from ..labels import LabelSpace
from ..teacher.clean_prompts import build_clean_prompts
from ..teacher.prompts import build_prompts, candidate_recall
from ..teacher.settings import CandidateSettings, CleanPromptSettings

log = logging.getLogger(__name__)
PathLike = str | os.PathLike


def run_prepare_dataset(config: dict, dataset: str) -> None:
    """Config entry -> data/{train,val,test}.parquet, data/labels.parquet, data/stats.json
    (+ data/excluded_pairs.parquet when the adapter gives some)."""
    prepared = prepare_dataset(DatasetSettings.from_config(config, dataset=dataset), dataset)
    for split in paths.SPLITS:
        write_parquet(prepared.splits[split], paths.data(dataset, split), "documents")
    if prepared.excluded_pairs is not None:
        write_parquet(prepared.excluded_pairs, paths.excluded_pairs(dataset))
    write_json(paths.data_stats(dataset), prepared.stats)
    write_parquet(prepared.labels, paths.labels(dataset), "labels")  # last: the rule's marker


def run_build_prompts(config: dict, dataset: str, split: str, *, docs_path: PathLike | None = None,
                      train_path: PathLike | None = None, labels_path: PathLike | None = None,
                      out_path: PathLike | None = None) -> None:
    """Documents of a split (+ the first training document as exemplar) -> prompts/{split}.parquet."""
    docs = read_parquet(docs_path or paths.data(dataset, split), "documents")
    space = LabelSpace(read_parquet(labels_path or paths.labels(dataset), "labels"))
    train = read_parquet(train_path or paths.data(dataset, "train"), "documents")
    settings = CandidateSettings.from_config(config, dataset=dataset)
    retrieval = settings.candidates["strategy"] == "retrieval"
    embedder = SentenceEmbedder(settings.embedder) if retrieval else None
    exemplar = train.iloc[0] if len(train) else None
    prompts = build_prompts(docs, space, settings.candidates, settings.prompts.mapping(), settings.seed,
                            exemplar_doc=exemplar, embedder=embedder)
    recall = candidate_recall(prompts)
    log.info("prompts %s/%s: %d documents, %d candidates each (%s%s); gold recall of the candidate lists "
             "(every method's ceiling): mean %.3f, every gold label offered in %.3f of the documents, none in %.3f",
             dataset, split, recall["n_docs"], settings.candidates["size"], settings.candidates["strategy"],
             ", gold forced in" if retrieval and settings.candidates.get("include_gold") else "",
             recall["mean_recall"], recall["all_gold"], recall["no_gold"])
    write_parquet(prompts, out_path or paths.prompts(dataset, split), "prompts")


def run_clean_prompts(config: dict, dataset: str, split: str, *, source_path: PathLike | None = None,
                      train_path: PathLike | None = None, labels_path: PathLike | None = None,
                      docs_path: PathLike | None = None, out_path: PathLike | None = None) -> None:
    """The clean-prompt set `split` (= paths.clean_split(style)) from `clean_prompts.source_split`
    -> data/{split}.parquet (snippets, gold labels, source_doc_id) and prompts/{split}.parquet."""
    settings = CleanPromptSettings.from_config(config)
    section, style = settings.section, split.removeprefix(f"{paths.CLEAN}_")
    source = read_parquet(source_path or paths.data(dataset, section["source_split"]), "documents")
    train = read_parquet(train_path or paths.data(dataset, "train"), "documents")
    space = LabelSpace(read_parquet(labels_path or paths.labels(dataset), "labels"))
    docs, prompts = build_clean_prompts(source, space, section, style, settings.seed, SentenceEmbedder(settings.embedder),
                                        exemplar_doc=train.iloc[0] if len(train) else None)
    if docs.empty:
        raise InputError(f"no documents for the clean-prompt set {split}: the {section['source_split']} split is "
                         "empty.", file=str(source_path or paths.data(dataset, section["source_split"])),
                         fix="set clean_prompts.source_split to a split with documents.")
    log.info("clean prompts %s/%s (%s): %d documents, %d labels each, snippets of %d characters on average",
             dataset, split, style, len(docs), section["n_labels"], int(docs["text"].str.len().mean()))
    write_parquet(docs, docs_path or paths.data(dataset, split), "documents")
    write_parquet(prompts, out_path or paths.prompts(dataset, split), "prompts")
