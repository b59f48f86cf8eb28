"""The house plan: import layers, no import cycles, no path surgery, no pointer outside the repository."""

from __future__ import annotations

import ast
import logging
import re
import subprocess
import sys

import grimp
import pytest
from importlinter.cli import lint_imports

from tests.helpers import REPO

PACKAGE = REPO / "mechdistill"
# Imports that may stay inside a function, each keeping a heavy dependency off the start-up path: an
# optional one (vLLM, DeepSpeed), one slow to import (sentence-transformers; simple-icd-10-cm and the
# adapters that need it), or the stages (for an instant `mechdistill --help`). The line must say why.
LAZY_IMPORTS = {"vllm", "deepspeed", "sentence_transformers", "simple_icd_10_cm", "mechdistill.models", "huggingface_hub",
                "torch",  # distill.launch: the Snakefile imports it to build the `distill` command
                "mechdistill.distill.backends", "transformers.integrations",  # torch, for distill.launch's DeepSpeed config
                "mechdistill.stages.data", "mechdistill.stages.teacher", "mechdistill.stages.distill", "mechdistill.data.icd10cm_controlled",
                "mechdistill.data.mimic4_icd10", "mechdistill.data.wikiseealso",
                "mechdistill.characterize.capture",  # torch: `mechdistill plan` prices memory only when asked
                # matplotlib and scipy (stages.model_free): only its figure jobs import them, not select_distill
                "mechdistill.anchors.plots", "mechdistill.characterize.plots", "mechdistill.evaluate.plots",
                "mechdistill.patching.plots",
                "snakemake.script",  # warm: its job clients (python -m mechdistill.warm run) import only the stdlib
                "scipy"}  # evaluate.significance: the Wilcoxon test only, not every job that imports the tables


def test_lint_imports_layers_contract(capsys, monkeypatch):
    """pyproject.toml's import-linter contracts: stages above the phases (in pipeline order) above the
    shared modules; stage modules independent; no cycles between siblings."""
    monkeypatch.chdir(REPO)
    enabled = [logger for logger in logging.root.manager.loggerDict.values()
               if isinstance(logger, logging.Logger) and not logger.disabled]
    exit_code = lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True, no_logo=True)
    for logger in enabled:  # import-linter configures logging with disable_existing_loggers: later tests read our logs
        logger.disabled = False
    out = capsys.readouterr().out
    assert exit_code == 0, out[-3000:]
    assert "3 kept, 0 broken" in out


def strongly_connected(graph: grimp.ImportGraph, modules: set[str]) -> list[set[str]]:
    """Tarjan's strongly connected components of the module import graph with more than one module."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in graph.find_modules_directly_imported_by(m) & modules:
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = set()
            while True:
                n = stack.pop()
                on_stack.discard(n)
                component.add(n)
                if n == m:
                    break
            if len(component) > 1:
                out.append(component)

    for m in sorted(modules):
        if m not in index:
            visit(m)
    return out


def test_no_module_is_part_of_an_import_cycle():
    """Every import counts, function-local ones included (grimp reads them all)."""
    graph = grimp.build_graph("mechdistill", cache_dir=None)
    assert strongly_connected(graph, set(graph.modules)) == []


def test_strongly_connected_finds_a_planted_cycle():
    graph = grimp.ImportGraph()
    for m in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(m)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.c")
    graph.add_import(importer="p.c", imported="p.a")
    assert strongly_connected(graph, set(graph.modules)) == [{"p.a", "p.b", "p.c"}]


def function_local_imports() -> list[tuple[str, int, str, str]]:
    """(file, line, imported module, the line's text) of every import inside a function of mechdistill/."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        lines = path.read_text().splitlines()
        for func in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:  # relative: resolve against the file's package
                        package = path.relative_to(REPO).with_suffix("").parts[:-node.level]
                        base = ".".join(package + ((base,) if base else ()))
                    names = [base]
                else:
                    continue
                around = " ".join(lines[max(0, node.lineno - 4): node.lineno])
                found += [(str(path.relative_to(REPO)), node.lineno, name, around) for name in names]
    return found


def test_function_local_imports_only_keep_heavy_dependencies_off_the_start_up_path():
    local = function_local_imports()
    unexpected = [f"{f}:{line} imports {name}" for f, line, name, _ in local if name not in LAZY_IMPORTS]
    assert unexpected == []
    unexplained = [f"{f}:{line}" for f, line, _, text in local if "#" not in text]
    assert unexplained == []  # each says why, on its line or just above its import block


@pytest.mark.parametrize("folder", ["rules", "workflow_scripts"])
def test_no_string_surgery_on_paths(folder):
    """Paths come from mechdistill.paths; nothing edits a path template with str.replace."""
    hits = [f"{p.name}:{i}" for p in sorted((REPO / folder).iterdir()) if p.is_file()
            for i, line in enumerate(p.read_text().splitlines(), 1) if ".replace(" in line]
    assert hits == []


def test_nothing_points_outside_the_repository():
    """No docstring sends the reader to a design file that is not in this repository."""
    pattern = re.compile(r"DESIGN\.md|\.\./shared")
    hits = [str(p.relative_to(REPO)) for p in sorted(PACKAGE.rglob("*.py")) if pattern.search(p.read_text())]
    assert hits == []


def test_workflow_scripts_do_their_work_only_as_the_main_script():
    """A process that vLLM (or torch) spawns imports the job's script again (as `__mp_main__`): only
    imports may run then, the work sits under `if __name__ == "__main__":`."""
    unguarded = []
    for path in sorted((REPO / "workflow_scripts").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            guarded = (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                       and ast.unparse(node.test) == "__name__ == '__main__'")
            if not (guarded or isinstance(node, (ast.Import, ast.ImportFrom))):
                unguarded.append(f"{path.name}:{node.lineno}")
    assert unguarded == []


def test_the_model_free_jobs_import_no_torch():
    """select_distill, the figures, tables and claims start in about a second: their scripts' imports
    pull in neither torch nor transformers (a model job spends ~15 s importing them on 2 cores)."""
    scripts = ["select_distill", "model_card", "head_figures", "head_comparison", "patching_figures", "figure1", "tables",
               "figure9", "claims", "prepare_dataset", "build_prompts", "clean_prompts"]
    imports = [line for name in scripts for line in (REPO / "workflow_scripts" / f"{name}.py").read_text().splitlines()
               if line.startswith(("from ", "import "))]
    code = "\n".join(imports + ["import sys", "print(sorted({'torch', 'transformers'} & set(sys.modules)))"])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert proc.stdout.strip() == "[]"


# The two modules that may name a model's lm_head / final norm: the accessors and the one that builds a model.
MODEL_LAYOUT_MODULES = {"mechdistill/characterize/attention.py", "mechdistill/models.py"}


def layout_accesses(path) -> list[int]:
    """Lines of `path` reading `<x>.lm_head` or `<x>.model.norm` as attributes (not in strings or comments)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and (
                node.attr == "lm_head"
                or (node.attr == "norm" and isinstance(node.value, ast.Attribute) and node.value.attr == "model")):
            lines.append(node.lineno)
    return lines


def test_the_final_norm_and_unembedding_are_reached_through_their_accessors():
    """`characterize.attention.final_norm` / `unembed` resolve them for every HF layout; nothing else assumes
    LLaMA's `model.model.norm` and `model.lm_head`."""
    hits = [f"{p.relative_to(REPO)}:{line}" for p in sorted(PACKAGE.rglob("*.py"))
            if str(p.relative_to(REPO)) not in MODEL_LAYOUT_MODULES for line in layout_accesses(p)]
    assert hits == []
