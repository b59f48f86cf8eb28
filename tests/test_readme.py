"""The README is a user's guide: its set-up block is the two commands CI runs, it stays short, and its
links lead somewhere. The docs it links keep their links working and carry no issue numbers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"
MAX_README_LINES = 350

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target): the target, without a title
ISSUE_REFERENCE = re.compile(r"\bissues?\s*#?\d+", re.IGNORECASE)
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def setup_commands(readme_text: str) -> list[str]:
    """The commands of the first fenced block under the '## Set-up' heading, comments and blank lines dropped."""
    after_heading = re.split(r"^## Set-up\b.*$", readme_text, maxsplit=1, flags=re.MULTILINE)
    if len(after_heading) != 2:
        raise AssertionError("README.md has no '## Set-up' heading")
    block = re.search(r"^```[a-z]*\n(.*?)^```", after_heading[1], flags=re.MULTILINE | re.DOTALL)
    if block is None:
        raise AssertionError("README.md's set-up section has no fenced code block")
    commands = [re.sub(r"\s+#.*$", "", line).strip() for line in block.group(1).splitlines()]
    return [command for command in commands if command and not command.startswith("#")]


def ci_commands(script_text: str) -> list[str]:
    """The lines of a shell script that run something (comments, blank lines and `set`/`cd` set-up dropped)."""
    lines = [line.strip() for line in script_text.splitlines()]
    return [line for line in lines
            if line and not line.startswith("#") and not line.startswith(("set ", "cd "))]


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"`", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of(markdown: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", markdown.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {github_anchor(m.group(1)) for line in text.splitlines() if (m := HEADING.match(line))}


def broken_links(markdown: Path) -> list[str]:
    """Relative links of `markdown` whose file, or whose #fragment in a Markdown file, does not exist."""
    broken = []
    for target in LINK.findall(markdown.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path_part, _, fragment = target.partition("#")
        path = (markdown.parent / path_part).resolve() if path_part else markdown
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif fragment and path.suffix == ".md" and fragment not in anchors_of(path):
            broken.append(f"{target}: no heading '#{fragment}' in {path.name}")
    return broken


def guide_pages() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def test_setup_block_is_the_demo_then_the_tests() -> None:
    commands = setup_commands(README.read_text())
    assert len(commands) == 2, f"the set-up block must hold exactly two commands, found {commands}"
    demo, tests = commands
    assert demo.startswith("./install.sh && ") and demo.endswith("snakemake --cores all"), demo
    assert "--configfile" not in demo, "the first command runs the demo, the default config"
    assert tests.startswith("./install.sh && ") and tests.endswith("python -m pytest"), tests


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    tests_command = setup_commands(README.read_text())[1]
    ci = ci_commands(CI_RUN.read_text())
    runs_it = [line for line in ci if line == tests_command or line.startswith(tests_command + " && ")]
    assert runs_it, f".ci/run must run the README's {tests_command!r} verbatim; it runs {ci}"


def test_setup_block_parser_reads_what_it_should() -> None:
    text = ("# x\n\n## Set-up: two commands\n\nprose\n\n```bash\n./install.sh && a   # one\n\n"
            "# a comment\n./install.sh && b\n```\n\n```bash\nc\n```\n")
    assert setup_commands(text) == ["./install.sh && a", "./install.sh && b"]
    assert ci_commands("#!/usr/bin/env bash\n# c\nset -euo pipefail\ncd x\n./a && b\nc\n") == ["./a && b", "c"]


def test_readme_is_short() -> None:
    n_lines = len(README.read_text().splitlines())
    assert n_lines <= MAX_README_LINES, f"README.md has {n_lines} lines; move details to docs/"


@pytest.mark.parametrize("page", guide_pages(), ids=lambda p: p.name)
def test_no_issue_numbers(page: Path) -> None:
    found = ISSUE_REFERENCE.findall(page.read_text())
    assert not found, f"{page.relative_to(ROOT)} refers to issues by number: {found}"


@pytest.mark.parametrize("page", guide_pages(), ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    assert not broken_links(page), f"{page.relative_to(ROOT)}: {broken_links(page)}"


def test_link_checker_finds_a_broken_link(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# A heading\n\n## The `x` part, here\n")
    page = tmp_path / "p.md"
    page.write_text("[ok](a.md) [ok](a.md#the-x-part-here) [web](https://e.org/x) "
                    "[gone](b.md) [bad](a.md#nowhere)\n")
    assert broken_links(page) == ["b.md: no such file", "a.md#nowhere: no heading '#nowhere' in a.md"]
