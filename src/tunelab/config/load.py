"""Strict config loading: defaults < YAML file < dotted command-line overrides.

Unknown keys and wrong types raise `ConfigError` naming the dotted key and, for unknown keys, the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from tunelab.config.schema import TAGGED, Config
from tunelab.errors import ConfigError


def _suggest(key: str, valid: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?"
    return f"; valid keys: {', '.join(sorted(valid))}"


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) if not isinstance(a, str) else a for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {int: "integer", float: "number", str: "string", bool: "true/false"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check and convert one value against a type annotation."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
            extra = f"; did you mean '{hint[0]}'?" if hint else ""
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}{extra}")
        return value
    if origin is list:
        (item,) = get_args(tp)
        if not isinstance(value, list):
            if isinstance(value, (str, int, float)) and not dataclasses.is_dataclass(item):
                value = [value]  # a single item where a list is expected: a convenience
            elif isinstance(value, dict) and dataclasses.is_dataclass(item):
                value = [value]
            else:
                raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_convert(k, kt, key): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp in TAGGED:
        return _build_tagged(tp, value, key)
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `2e-4` (no dot) as a string; accept it as the number the user meant.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _fields(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def build_section(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, strictly: unknown keys and wrong types are errors."""
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data):
        data = config_to_dict(data)
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {data!r}")
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            kind = getattr(cls, "__dataclass_fields__", {}).get("type")
            scope = f" for {prefix}.type '{kind.default}'" if kind is not None and prefix else ""
            raise ConfigError(f"{dotted}: unknown key{scope}{_suggest(str(key), list(fields), prefix)}")
        kwargs[key] = _convert(value, fields[key], dotted)
    for key, tp in fields.items():
        # Sections left out still get their defaults validated (e.g. a required model.path).
        if key not in kwargs and (tp in TAGGED or dataclasses.is_dataclass(tp)):
            kwargs[key] = _convert({}, tp, f"{prefix}.{key}" if prefix else key)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(prefix)
    return obj


def _build_tagged(base: type, data: Any, prefix: str) -> Any:
    registry = TAGGED[base]
    if dataclasses.is_dataclass(data):
        data = config_to_dict(data)
    if data is None:
        data = {}
    if isinstance(data, str):  # `adapter: lora` shorthand
        data = {"type": data}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping with a 'type' key, got {data!r}")
    kind = data.get("type", base.__dataclass_fields__["type"].default)
    if kind not in registry:
        close = difflib.get_close_matches(str(kind), list(registry), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid types: {', '.join(registry)}"
        raise ConfigError(f"{prefix}.type: unknown type {kind!r}{hint}")
    return build_section(registry[kind], data, prefix)


def config_to_dict(obj: Any) -> Any:
    """A plain-data (YAML-ready) copy of a config object."""
    if dataclasses.is_dataclass(obj):
        return {f.name: config_to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [config_to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: config_to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 1e-4). The value is read as YAML (so lists and booleans work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected section.key=value")
    try:
        value = load_yaml_text(raw) if raw.strip() else ""
    except DuplicateKeyError as e:
        raise ConfigError(f"override {text!r}: {e}") from None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_dotted(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if isinstance(child, list) and path[i + 1].isdigit():
            idx = int(path[i + 1])
            if idx >= len(child):
                raise ConfigError(f"{'.'.join(path)}: index {idx} out of range (the list has {len(child)} items)")
            if len(path) == i + 3:
                if not isinstance(child[idx], dict):
                    child[idx] = {}
                child[idx][path[-1]] = value
                return
            node = child[idx]
            path = path[i + 2:]
            return _set_dotted(node, path, value)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            child = node[part] = {"type": child} if isinstance(child, str) else {}
        node = child
    node[path[-1]] = value


class DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one YAML mapping; `key` is dotted (``train.lr``), lines are 1-based."""

    def __init__(self, key: str, line: int, first_line: int):
        super().__init__(f"{key} given twice (first at line {first_line})")
        self.key, self.line, self.first_line = key, line, first_line


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping.

    PyYAML keeps the last value silently, so a second `lr:` under `train:` would train at it without a word. Keys
    brought in by a merge (`<<: *base`) may still be overridden by explicit keys: that is what merging is for.
    """

    def construct_document(self, node):
        # Remember the dotted path of every mapping, so that the error can name `train.lr`, not just `lr`.
        self._paths: dict[int, str] = {}
        self._record_paths(node, "")
        return super().construct_document(node)

    def _record_paths(self, node, path: str) -> None:
        if id(node) in self._paths:  # an alias of a node seen before
            return
        if isinstance(node, yaml.MappingNode):
            self._paths[id(node)] = path
            for key_node, value_node in node.value:
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                self._record_paths(value_node, f"{path}.{name}" if path else str(name))
        elif isinstance(node, yaml.SequenceNode):
            self._paths[id(node)] = path
            for i, item in enumerate(node.value):
                self._record_paths(item, f"{path}[{i}]")

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            prefix = getattr(self, "_paths", {}).get(id(node), "")
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                try:
                    hash(key)
                except TypeError:
                    continue
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise DuplicateKeyError(f"{prefix}.{key}" if prefix else str(key), line, seen[key])
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml_text(text: str) -> Any:
    """Parse YAML written by a user: yaml.safe_load, but a key given twice is an error (`DuplicateKeyError`)."""
    return yaml.load(text, Loader=StrictLoader)


def path_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be opened ('not found', 'a symlink loop', ...), or None when it exists.

    `Path.exists()` answers False for a symlink loop as for a missing file; this tells them apart."""
    p = Path(path)
    try:
        p.stat()
    except FileNotFoundError:
        if p.is_symlink():
            return f"a broken symlink (it points to {os.readlink(p)}, which does not exist)"
        return "not found"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop (following its links leads back to a link already followed)"
        return f"cannot be opened: {e.strerror or e}"
    return None


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    problem = path_problem(p)
    if problem == "not found":
        raise ConfigError(f"{p}: config file not found")
    if problem:
        raise ConfigError(f"{p}: config file is {problem}" if problem.startswith("a ") else f"{p}: {problem}")
    if p.is_dir():
        raise ConfigError(f"{p}: is a folder, expected a YAML config file")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{p}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save the "
                          "config file as UTF-8") from None
    try:
        data = load_yaml_text(text)
    except DuplicateKeyError as e:
        raise ConfigError(f"{p}:{e.line}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}{where}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of sections (model, data, adapter, ...), got {type(data).__name__}")
    return data


_KEY = re.compile(r"^[A-Za-z_][\w.\[\]]*$")


def _blamed_override(message: str, overrides: list[tuple[str, str]]) -> str | None:
    """The override (text) that set the key a ConfigError message starts with (`train.lrr: unknown key`), if any."""
    key = message.split(":", 1)[0]
    if not _KEY.match(key):
        return None
    key = re.sub(r"\[(\d+)\]", r".\1", key)
    for dotted, text in reversed(overrides):  # the last override of a key is the one that counts
        if key == dotted or key.startswith(dotted + ".") or dotted.startswith(key + "."):
            return text
    return None


def load_config(
    source: str | os.PathLike | dict | Config | None = None, overrides: list[str] | dict | None = None
) -> Config:
    """Load and validate a config from a YAML path, a dict or a Config, applying dotted overrides.

    Relative data and model paths stay relative to the working directory (as users type them on the command line).
    """
    where = ""
    if source is None:
        tree: dict = {}
    elif isinstance(source, Config):
        tree = config_to_dict(source)
    elif isinstance(source, dict):
        tree = config_to_dict(source)
    else:
        tree = read_yaml(source)
        where = f"{source}: "
    if isinstance(overrides, dict):
        overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in overrides.items()]
        overrides = [o[:-4] if o.endswith("\n...") else o for o in overrides]
    # (dotted key, override text): an error in a key an override set names the override, not the YAML file.
    # Without a file (a dict or Config from code) messages stay bare, as before.
    given: list[tuple[str, str]] = []
    for text in overrides or []:
        path, value = parse_override(text)
        try:
            _set_dotted(tree, path, value)
        except ConfigError as e:
            raise ConfigError(f"command-line override {text!r}: {e.message}" if where else e.message) from None
        given.append((".".join(path), text))
    try:
        return build_section(Config, tree, "")
    except ConfigError as e:
        override = _blamed_override(e.message, given) if where else None
        if override is not None:
            raise ConfigError(f"command-line override {override!r}: {e.message}", e.details) from None
        raise ConfigError(where + e.message, e.details) from None


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")


def iter_fields(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, Any, Any, str]]:
    """Yield (dotted key, type, default, help) for every leaf field, for help output and docs."""
    for f in dataclasses.fields(cls):
        tp = _fields(cls)[f.name]
        key = f"{prefix}.{f.name}" if prefix else f.name
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(tp) and tp not in TAGGED and prefix == "":
            yield from iter_fields(tp, key)
        else:
            yield key, tp, default, f.metadata.get("help", "")
