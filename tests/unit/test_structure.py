"""Architecture checks: import layering, registries agree with the schema, every example config loads."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tunelab.config import load_config
from tunelab.config.schema import ADAPTER_CONFIGS, METHOD_CONFIGS

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "tunelab"

# Each package may import its own modules and packages of lower layers only: never one of the same layer or above.
LAYERS = {
    "errors": 0, "utils": 0, "resources": 0,
    "config": 1,
    "data": 2,
    "models": 3,
    "methods": 4,
    "engine": 5, "infer": 5,
    "api": 6,
    "cli": 7, "quickstart": 7, "__init__": 7,
    "__main__": 8,
}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
        if module.endswith(".__init__"):
            module = module[: -len(".__init__")]
        found[module if "." in module else "tunelab.__init__"] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> list[str]:
    """Every tunelab module `path` imports, at module level, inside functions, or inside a string of Python code it
    runs (`python -c "from tunelab.cli import main"`); `from tunelab.models import quant` counts as
    tunelab.models.quant."""
    return _imports_of(ast.parse(path.read_text()), modules)


def _imports_of(tree: ast.AST, modules: dict[str, Path]) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("tunelab.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tunelab"):
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
            found += subs or ([node.module] if node.module != "tunelab" else [])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "tunelab" in node.value \
                and "import " in node.value:
            try:
                code = ast.parse(node.value)
            except SyntaxError:
                continue  # prose that mentions an import, not code
            found += _imports_of(code, modules)
    return found


def test_imports_point_only_downward():
    modules = _modules()
    violations = []
    for module, path in modules.items():
        mine = _package(module)
        for imported in _imports(path, modules):
            theirs = _package(imported)
            if theirs != mine and LAYERS[theirs] >= LAYERS[mine]:
                violations.append(f"{module} imports {imported}")
    assert not violations, violations


def test_imports_inside_code_strings_count():
    """A string of code the package runs is held to the same layers as the module holding it."""
    modules = _modules()
    code = ast.parse('RUN = """\nimport sys\nfrom tunelab.cli import main\nmain(sys.argv[1:])\n"""')
    assert _imports_of(code, modules) == ["tunelab.cli"]
    assert _imports_of(ast.parse('DOC = "see from tunelab import x for why"'), modules) == []


def test_no_import_cycles():
    """No module imports, directly or through others, a module that imports it back (importing inside a function
    only hides a cycle; a package importing its own submodules is not one)."""
    modules = _modules()
    graph = {m: {i for i in _imports(p, modules) if i in modules and not m.startswith(i + ".") and i != m}
             for m, p in modules.items()}
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_registries_match_the_schema():
    from tunelab.data.kinds import KINDS
    from tunelab.methods import METHODS
    from tunelab.models.adapters import ADAPTERS

    assert set(METHODS) == set(METHOD_CONFIGS)
    assert set(ADAPTERS) == set(ADAPTER_CONFIGS)
    for name, method in METHODS.items():
        assert method.name == name and method.data_kind in KINDS and method.batch_kind in KINDS


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_loads(path):
    cfg = load_config(path)
    for spec in cfg.data.train:
        assert (ROOT / spec.path).exists(), f"{path.name}: {spec.path} does not exist"
    assert cfg.method.type in METHOD_CONFIGS


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_benchmark_config_loads(path):
    """The benchmark configs are strict-valid and describe the standard workload (data and models are generated by
    benchmarks/make_workload.py, so only their paths are checked)."""
    cfg = load_config(path)
    assert [s.path for s in cfg.data.train] == ["benchmarks/data/alpaca_2k.json"]
    assert cfg.model.path == "benchmarks/models/tiny-7m" and not cfg.model.gradient_checkpointing
    assert (cfg.adapter.type, cfg.adapter.r, cfg.train.batch_size, cfg.data.max_length) == ("lora", 8, 8, 512)
    assert cfg.train.precision == "fp32" and path.stem == f"tunelab_{cfg.data.packing}"


def test_adapter_capabilities_agree_with_the_config_rules():
    """The config layer names the adapters that train the base and those that cannot carry a score head (it cannot
    import models/); AdapterKind answers the same questions for everything above it."""
    from tunelab.config.schema import BASE_TRAINING_ADAPTERS, NO_SCORE_HEAD_ADAPTERS
    from tunelab.models.adapters import ADAPTERS

    assert {n for n, kind in ADAPTERS.items() if kind.trains_base} == set(BASE_TRAINING_ADAPTERS)
    assert {n for n, kind in ADAPTERS.items() if not kind.carries_score_head} == set(NO_SCORE_HEAD_ADAPTERS)


def _kind_names() -> set[str]:
    from tunelab.data.kinds import KINDS

    return set(KINDS)


def _string_constants(node: ast.AST) -> set[str]:
    """The strings a comparison operand is, or holds (a tuple, list or set of them)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return set()


def test_no_module_compares_data_kind_names():
    """What depends on a data kind is declared by the kind (data/kinds.py) and looked up: no module compares a
    kind's name (`kind == "pairs"`, `data_kind in ("chat", "text")`) or keys a table by kind names."""
    kinds = _kind_names()
    found = []
    for module, path in _modules().items():
        if module == "tunelab.data.kinds":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                named = any("kind" in ast.unparse(o) for o in operands)
                strings = set().union(*(_string_constants(o) for o in operands))
                if named and strings & kinds:
                    found.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
                if len(keys & kinds) >= 2:
                    found.append(f"{module}:{node.lineno}: a table keyed by data kinds {sorted(keys & kinds)}")
    assert not found, found


def test_the_engine_names_no_method_and_no_data_kind():
    """engine/ runs every method through the method contract (methods/base.py) and every data kind through its
    declaration (data/kinds.py): no engine module holds a method's or a kind's name as a string, names an identifier
    after a method, or reads a method's options (`cfg.method.<option>`: only `type` picks the method)."""
    from tunelab.methods import METHODS

    methods, kinds = set(METHODS), _kind_names()
    found = []
    for path in sorted((SRC / "engine").rglob("*.py")):
        where = path.relative_to(SRC).as_posix()
        tree = ast.parse(path.read_text())
        # safetensors names torch "pt": framework="pt" is a library's word, not the pt method
        library_words = {id(k.value) for k in ast.walk(tree) if isinstance(k, ast.keyword) and k.arg == "framework"}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in methods | kinds
                    and id(node) not in library_words):
                found.append(f"{where}:{node.lineno}: the string {node.value!r}")
            names = []
            if isinstance(node, ast.Name):
                names = [node.id]
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.arg):
                names = [node.arg]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
                if (isinstance(node.value, ast.Attribute) and node.value.attr == "method" and node.attr != "type"
                        and ast.unparse(node.value.value).split(".")[-1] == "cfg"):
                    found.append(f"{where}:{node.lineno}: reads a method option: {ast.unparse(node)}")
            for name in names:
                if set(name.lower().split("_")) & methods:
                    found.append(f"{where}:{node.lineno}: the identifier {name}")
            if (isinstance(node, ast.Call) and ast.unparse(node.func) == "getattr" and len(node.args) >= 2
                    and ast.unparse(node.args[0]).endswith("cfg.method")):
                found.append(f"{where}:{node.lineno}: reads a method option: {ast.unparse(node)}")
    assert not found, found
