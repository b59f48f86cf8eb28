"""The stages read the config through the settings their rules declare (docs/layout.md, "Settings"):
a stage module indexes the config dict only for what is a per-wildcard param or the run's identity
(the teacher's name, the methods' entries), never a section a settings class declares."""

from __future__ import annotations

import ast

from tests.helpers import REPO

ALLOWED = {"teacher", "methods"}  # the teacher's name and a method's entry at a job's grid point


def config_reads(source: str) -> list[tuple[int, str]]:
    """(line, text) of each `config[...]` or `config.get(...)` whose key is not in ALLOWED."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "config":
            key = node.slice.value if isinstance(node.slice, ast.Constant) else None
            if key not in ALLOWED:
                found.append((node.lineno, ast.unparse(node)))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and isinstance(node.func.value, ast.Name) and node.func.value.id == "config"):
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_check_finds_a_direct_read():
    assert config_reads('x = config["distill"]["top_k"]') == [(1, "config['distill']")]
    assert config_reads('x = config.get("seed")')
    assert not config_reads('t = config["teacher"]; m = config["methods"].get(name)')


def test_stages_read_settings_not_the_config_dict():
    found = [f"{path.relative_to(REPO)}:{line}: {text}" for path in sorted((REPO / "mechdistill/stages").glob("*.py"))
             for line, text in config_reads(path.read_text())]
    assert not found, "a stage reads the config dict; build its settings class (from_config) instead:\n" + "\n".join(found)
