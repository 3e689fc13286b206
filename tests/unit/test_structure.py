"""Architecture checks: import layering, registries agree with the schema, every example config loads."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tunelab.config import load_config
from tunelab.config.schema import ADAPTER_CONFIGS, METHOD_CONFIGS

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "tunelab"

LAYERS = {
    "errors": 0, "utils": 0, "resources": 0,
    "config": 1,
    "data": 2, "models": 2,
    "methods": 3, "engine": 3, "infer": 3,
    "cli": 4, "api": 4, "quickstart": 4, "__init__": 4, "__main__": 4,
}


def _layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    return LAYERS[key]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("tunelab")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tunelab"):
            found.append(node.module)
    return found


def test_imports_point_only_downward():
    violations = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(rel.parts)
        if module.endswith(".__init__"):
            module = module[: -len(".__init__")]
        mine = _layer(module if "." in module else "tunelab.__init__")
        for imported in _imports(path):
            if imported == "tunelab":
                continue
            if _layer(imported) > mine:
                violations.append(f"{module} imports {imported}")
    assert not violations, violations


def test_registries_match_the_schema():
    from tunelab.methods import METHODS
    from tunelab.models.adapters import ADAPTERS

    assert set(METHODS) == set(METHOD_CONFIGS)
    assert set(ADAPTERS) == set(ADAPTER_CONFIGS)
    for name, method in METHODS.items():
        assert method.name == name and method.data_kind in ("chat", "text")


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_loads(path):
    cfg = load_config(path)
    for spec in cfg.data.train:
        assert (ROOT / spec.path).exists(), f"{path.name}: {spec.path} does not exist"
    assert cfg.method.type in METHOD_CONFIGS
