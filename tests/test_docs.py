"""The README and docs agree with themselves and with the code: the numbers in the README's prose
come from the measured tables, papers are named, the optimizer list is the registry's, links
resolve.

The rule for numbers (README.md and docs/pypi.md, the pages a new user reads first): every ratio
(``1.32x``) and every percentage (``97.49%``) written outside a table, alone or as an end of a
range (``2.8-4.5x``), must appear in a table row of README.md or docs/*.md with the same unit,
at the precision it is written with (``2.78x`` in a table backs ``2.8x`` in the prose). The
tables are the output of the commands named beside them (``largebatch demo``,
``benchmarks/optimizer_step.py``, ``largebatch reproduce``); a number in the prose that no table
holds is a number nobody can regenerate. The docs' own prose reports further measurements next
to the command and run they come from; it is not checked (the check would need each run's
output kept in the repository).
"""

from __future__ import annotations

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
README = os.path.join(ROOT, "README.md")
NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))?(x|%)(?![\w\d])")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _prose_and_tables(text: str) -> tuple[list[str], list[str]]:
    prose, tables, code = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            code = not code
            continue
        if code:
            continue
        (tables if line.lstrip().startswith("|") else prose).append(line)
    return prose, tables


def _table_numbers() -> dict[str, list[float]]:
    found: dict[str, list[float]] = {"x": [], "%": []}
    for path in [README, *DOCS]:
        for line in _prose_and_tables(_read(path))[1]:
            for m in NUMBER.finditer(line):
                for g in (m.group(1), m.group(2)):
                    if g:
                        found[m.group(3)].append(float(g))
    return found


def unbacked_numbers(text: str, table: dict[str, list[float]]) -> list[str]:
    """The ratios and percentages of ``text``'s prose that no table holds (the rule above)."""
    bad = []
    for line in _prose_and_tables(text)[0]:
        for m in NUMBER.finditer(line):
            for g in (m.group(1), m.group(2)):
                if not g:
                    continue
                k = len(g.split(".")[1]) if "." in g else 0
                if not any(f"{t:.{k}f}" == g for t in table[m.group(3)]):
                    bad.append(f"{g}{m.group(3)} in: {line.strip()[:100]}")
    return bad


def test_readme_numbers_come_from_the_tables():
    table = _table_numbers()
    for path in (README, os.path.join(ROOT, "docs", "pypi.md")):
        assert unbacked_numbers(_read(path), table) == [], path


def test_the_rule_catches_a_number_no_table_holds():
    table = {"x": [2.78, 6.11], "%": [97.49]}
    assert unbacked_numbers("against 2.8-6.1x for the peers, 97.49% here", table) == []
    assert unbacked_numbers("against 2.8-6.5x for the peers", table) == ["6.5x in: against 2.8-6.5x for the peers"]
    assert unbacked_numbers("| 6.5x | a table row is a source |\n", table) == []


def test_papers_are_named_not_numbered():
    """"seed 003" reads as a random seed: docs name the paper (TVLARS paper, LALC paper, CLARS
    paper); only docs/algorithms.md's reference table keeps the old keys for older comments."""
    for path in [README, *DOCS]:
        for i, line in enumerate(_read(path).splitlines(), 1):
            if re.search(r"seed 00\d", line):
                assert path.endswith("algorithms.md") and line.startswith("| ") and line.rstrip().endswith(
                    ("| seed 000 |", "| seed 001 |", "| seed 002 |", "| seed 003 |", "| seed 004 |")), \
                    f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}"


def test_relative_links_and_images_resolve():
    for path in [README, *DOCS]:
        base = os.path.dirname(path)
        for target in re.findall(r"\]\(([^)\s]+)\)", _read(path)):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            file = target.split("#")[0]
            assert os.path.exists(os.path.join(base, file)), f"{os.path.relpath(path, ROOT)}: {target}"
