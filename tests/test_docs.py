"""The user docs: docs/configuration.md names every params.yaml key once, the
README stays short, and no page cites an issue number."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGURATION = ROOT / "docs" / "configuration.md"
README_MAX_LINES = 250

# A table row whose first cell is a key in backticks: | `finetune.augment.flip` | ... |
_KEY_ROW = re.compile(r"^\|\s*`([A-Za-z0-9_.]+)`\s*\|")
# "#35", "owner/repo#35", "issue 12", "Issue #7"; not a heading's "# Title" or a link's "/issues/20585"
_ISSUE = re.compile(r"#\d+|\bissues?\s+#?\d+", re.IGNORECASE)


def flat_keys(tree: dict, prefix: str = "") -> list[str]:
    """Nested mappings -> dotted keys of their leaves (any value that is not a mapping)."""
    keys = []
    for name, value in tree.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        keys += flat_keys(value, key) if isinstance(value, dict) else [key]
    return keys


def documented_keys(text: str) -> list[str]:
    return [m.group(1) for line in text.splitlines() if (m := _KEY_ROW.match(line.strip()))]


def key_mismatches(params: dict, doc_text: str) -> list[str]:
    """What is wrong between params and the configuration page, one line per key."""
    in_params = flat_keys(params)
    in_docs = documented_keys(doc_text)
    problems = [f"{k}: in params.yaml, not in docs/configuration.md" for k in in_params if k not in in_docs]
    problems += [f"{k}: in docs/configuration.md, not in params.yaml" for k in in_docs if k not in in_params]
    problems += [f"{k}: documented {in_docs.count(k)} times in docs/configuration.md"
                 for k in sorted(set(in_docs)) if in_docs.count(k) > 1]
    return problems


def test_flat_keys():
    assert flat_keys({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == ["a.b", "a.c.d", "e"]


def test_configuration_names_every_params_key_once():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    problems = key_mismatches(params, CONFIGURATION.read_text())
    assert not problems, "\n".join(problems)


def test_a_key_in_one_place_only_is_named():
    params = {"seed": 1, "finetune": {"augment": {"flip": True}}}
    doc = "| key | values |\n| --- | --- |\n| `seed` | int |\n| `finetune.augment.flip` | bool |\n"
    assert key_mismatches(params, doc) == []
    assert key_mismatches({**params, "extra": 2}, doc) == ["extra: in params.yaml, not in docs/configuration.md"]
    assert key_mismatches({"seed": 1}, doc) == [
        "finetune.augment.flip: in docs/configuration.md, not in params.yaml"]
    assert key_mismatches(params, doc + "| `seed` | again |\n") == ["seed: documented 2 times in docs/configuration.md"]


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines, at most {README_MAX_LINES}"


USER_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", USER_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_issue_numbers_in_user_docs(path):
    hits = [f"{path.name}:{n}: {m.group(0)!r}" for n, line in enumerate(path.read_text().splitlines(), 1)
            for m in _ISSUE.finditer(line)]
    assert not hits, "issue numbers belong in the tracker, not the docs:\n" + "\n".join(hits)


@pytest.mark.parametrize("text, found", [
    ("see #35 for why", ["#35"]), ("keras-team/keras#20585", ["#20585"]),
    ("as issue 12 says", ["issue 12"]), ("Issues #3", ["Issues #3"]),
    ("# Title", []), ("https://github.com/keras-team/keras/issues/20585", []), ("[x](#several-workers)", []),
])
def test_issue_pattern(text, found):
    assert [m.group(0) for m in _ISSUE.finditer(text)] == found
