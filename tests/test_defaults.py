"""Defaults live in config/schema.yaml only (it fills them in when the config is loaded): no library code
restates one with `.get(key, default)` on a config section.

What counts as a config section here: the receiver of `.get` is a name (or attribute) called config, cfg,
gen, generation, settings, entry or section (not yet a model `spec`: tests build specs by hand, unvalidated), or a subscript of one of them (config["heads"].get),
and the key is a string the schema declares, somewhere, as a property with a `default`. A default of None
is allowed, and so is any default of a key the schema gives none (an optional key reads as None, as
`mechdistill.settings.lookup` does; `methods.<name>.base` defaults to the name). Checked in
mechdistill/ except config.py (it applies the schema) and plan.py (the cost model of a whole config, which
reads configs that may predate a key)."""

from __future__ import annotations

import ast

import yaml

from tests.helpers import REPO

SECTION_NAMES = {"config", "cfg", "gen", "generation", "settings", "entry", "section"}
EXEMPT = {"mechdistill/config.py", "mechdistill/plan.py"}


def schema_keys() -> set[str]:
    """Every property name the schema gives a default, at any depth."""
    keys: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            properties = node.get("properties")
            if isinstance(properties, dict):
                keys.update(k for k, v in properties.items() if isinstance(v, dict) and "default" in v)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(yaml.safe_load((REPO / "config/schema.yaml").read_text()))
    return keys


def _receiver(node: ast.expr) -> str | None:
    while isinstance(node, ast.Subscript):
        node = node.value
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def restated_defaults(source: str, keys: set[str]) -> list[tuple[int, str]]:
    """(line, text) of each `.get("<schema key>", <default other than None>)` on a config section."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and len(node.args) == 2 and isinstance(node.args[0], ast.Constant)):
            continue
        key, default = node.args[0].value, node.args[1]
        if key in keys and _receiver(node.func.value) in SECTION_NAMES and not (
                isinstance(default, ast.Constant) and default.value is None):
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_check_finds_a_restated_default():
    keys = schema_keys()
    assert restated_defaults('bs = gen.get("batch_size", 8)', keys) == [(1, "gen.get('batch_size', 8)")]
    assert restated_defaults('t = config["generation"].get("temperature", 0.0)', keys)
    assert not restated_defaults('x = gen.get("max_model_len", 0)', keys)  # optional, no schema default
    assert not restated_defaults('x = counts.get("batch_size", 8)', keys)  # not a config section


def test_no_library_code_restates_a_schema_default():
    keys = schema_keys()
    found = [f"{path.relative_to(REPO)}:{line}: {text}"
             for path in sorted((REPO / "mechdistill").rglob("*.py")) if str(path.relative_to(REPO)) not in EXEMPT
             for line, text in restated_defaults(path.read_text(), keys)]
    assert not found, "defaults belong to config/schema.yaml:\n" + "\n".join(found)
