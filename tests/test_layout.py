"""dvc.yaml says exactly what each stage reads: the modules it imports and the
params keys it reads. A stale list makes DVC skip a stage whose code or params
changed (or re-run one that nothing concerns), so both are checked here rather
than kept by hand."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
from pathlib import Path

import pytest
import yaml

import synth
import tinyproject
from transferlab import config

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
STAGES = ["prepare", "features", "head", "finetune", "evaluate"]


def dvc_stages(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict:
    return yaml.safe_load(dvc_yaml.read_text())["stages"]


def stage_module(stage: dict) -> str:
    match = re.fullmatch(r"python -m (transferlab\.stages\.\w+)", stage["cmd"])
    assert match, f"cmd {stage['cmd']!r}: a stage runs its own module, `python -m transferlab.stages.<name>`"
    return match.group(1)


# --------------------------------------------------------------------------- modules


def module_file(module: str, src: Path = SRC) -> Path:
    path = src / Path(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def package_imports(module: str, src: Path = SRC) -> set[str]:
    """The transferlab modules `module` imports anywhere (top level or inside a
    function: either runs when the stage does)."""
    path = module_file(module, src)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]  # `from pkg import module`
        else:
            continue
        found |= {n for n in names if n.split(".")[0] == "transferlab" and module_file(n, src).exists()}
    return found


def import_closure(module: str, src: Path = SRC) -> set[str]:
    """Source files that run when `module` runs: its imports, theirs, and the
    packages they sit in, relative to the project root."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += package_imports(name, src)
    return {str(module_file(name, src).relative_to(src.parent)) for name in seen}


def listed_modules(stage: dict) -> set[str]:
    return {d for d in stage["deps"] if d.startswith("src/")}


@pytest.mark.parametrize("name", STAGES)
def test_dvc_yaml_lists_exactly_the_modules_each_stage_imports(name):
    stage = dvc_stages()[name]
    imported = import_closure(stage_module(stage))
    listed = listed_modules(stage)
    assert not imported - listed, f"dvc.yaml stage {name} does not list {sorted(imported - listed)}, which it imports"
    assert not listed - imported, f"dvc.yaml stage {name} lists {sorted(listed - imported)}, which it never imports"


def test_the_import_walk_sees_imports_inside_functions(tmp_path):
    """The walk is only as good as its parser: a function-level import counts."""
    pkg = tmp_path / "src" / "transferlab"
    (pkg / "stages").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "stages" / "__init__.py").write_text("")
    (pkg / "helper.py").write_text("")
    (pkg / "other.py").write_text("")
    (pkg / "stages" / "x.py").write_text("def main():\n    from transferlab import helper\n")
    files = import_closure("transferlab.stages.x", tmp_path / "src")
    assert "src/transferlab/helper.py" in files and "src/transferlab/other.py" not in files


# --------------------------------------------------------------------------- params keys


class Recorder:
    """A params object that records every key read through it: a leaf by its
    dotted name, a whole section when its `__wrapped__` is taken (config.subset)."""

    def __init__(self, obj, seen: set[str], path: str = ""):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_seen", seen)
        object.__setattr__(self, "_path", path)

    def __getattr__(self, name: str):
        if name == "__wrapped__":
            self._seen.add(self._path)
            return self._obj
        value = getattr(self._obj, name)
        key = f"{self._path}.{name}" if self._path else name
        if dataclasses.is_dataclass(value):
            return Recorder(value, self._seen, key)
        self._seen.add(key)
        return value


def covered(key: str, entries) -> bool:
    return any(key == e or key.startswith(e + ".") for e in entries)


def check_params(name: str, stage: dict, read: set[str]) -> None:
    listed = stage["params"]
    missing = sorted(k for k in read if not covered(k, listed))
    assert not missing, f"dvc.yaml stage {name} does not list {missing}, which it reads"
    unread = [e for e in listed if not any(covered(k, [e]) or e.startswith(k + ".") for k in read)]
    assert not unread, f"dvc.yaml stage {name} lists {unread}, which it never reads"
    interpolated = re.findall(r"\$\{([\w.]+)\}", yaml.safe_dump([stage.get("deps"), stage.get("outs")]))
    assert all(covered(k, listed) for k in interpolated), f"{name}: ${{...}} keys not in its params"


@pytest.fixture(scope="module")
def keys_read(tmp_path_factory):
    """Each stage run on the tiny config through a Recorder, in order."""
    import os

    folder = tmp_path_factory.mktemp("layout")
    synth.make_image_folder(folder / "tiny-images", per_class=6, test_per_class=2, size=16)
    raw = tinyproject.full_params({**tinyproject.TINY, "finetune": {**tinyproject.TINY["finetune"], "epochs": 1},
                                   "head": {**tinyproject.TINY["head"], "epochs": 1}})
    params = config.from_dict(raw)
    cwd, uri = os.getcwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(folder)
    read = {}
    try:
        for name in STAGES:
            seen: set[str] = set()
            importlib.import_module(f"transferlab.stages.{name}").main(Recorder(params, seen))
            read[name] = seen
    finally:
        os.chdir(cwd)
        if uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = uri
    return read


@pytest.mark.parametrize("name", STAGES)
def test_dvc_yaml_lists_exactly_the_params_each_stage_reads(keys_read, name):
    check_params(name, dvc_stages()[name], keys_read[name])


def test_the_params_check_fails_on_a_key_left_out_or_never_read():
    stage = {"params": ["seed", "finetune"], "deps": [], "outs": []}
    check_params("x", stage, {"seed", "finetune.epochs"})
    with pytest.raises(AssertionError, match="does not list"):
        check_params("x", stage, {"seed", "finetune.epochs", "head.units"})
    with pytest.raises(AssertionError, match="never reads"):
        check_params("x", stage, {"finetune"})
