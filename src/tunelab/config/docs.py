"""Help text for every config key, rendered for the terminal (`tunelab config`, `tunelab train --help`) and as
docs/config.md (`python -m tunelab.config.docs > docs/config.md`). Written once, in the schema."""

from __future__ import annotations

import dataclasses
import difflib
import textwrap

from tunelab.config.load import _type_name, iter_fields
from tunelab.config.schema import ADAPTER_CONFIGS, METHOD_CONFIGS, Config
from tunelab.errors import ConfigError

SECTIONS = ("model", "data", "adapter", "method", "train", "output")


def _default(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if dataclasses.is_dataclass(v):
        return ""
    return repr(v) if isinstance(v, str) else str(v)


def _rows(section: str):
    """(key, type, default, help) rows of one section; tagged sections list each type's own keys."""
    from tunelab.config.load import _fields

    tp = _fields(Config)[section]
    if section == "adapter" or section == "method":
        registry = ADAPTER_CONFIGS if section == "adapter" else METHOD_CONFIGS
        seen = set()
        for kind, cls in registry.items():
            for key, ftp, default, hlp in iter_fields(cls, section):
                if key == f"{section}.type":
                    if key in seen:
                        continue
                    default = "lora" if section == "adapter" else "sft"
                    ftp = str
                    seen.add(key)
                else:  # the same key can mean different things for different types: list it per type
                    hlp = f"[{kind}] {hlp}"
                yield key, ftp, default, hlp
        return
    if section == "data":
        for key, ftp, default, hlp in iter_fields(tp, section):
            yield key, ftp, default, hlp
            if key == "data.train":
                from tunelab.config.schema import DatasetSpec

                yield from iter_fields(DatasetSpec, "data.train[]")
        return
    yield from iter_fields(tp, section)


def _matches(key: str, query: str, exact: bool) -> bool:
    """`query` names this key: the whole dotted key (or a prefix of it: `data.train`) or its last part (`lr`);
    when not `exact`, also any part of its name (`smoothing`)."""
    q = query.lower().strip()
    k = key.lower().replace("[]", "")
    if k == q or k.startswith(q + ".") or k.rsplit(".", 1)[-1] == q:
        return True
    return not exact and q in k


def options_text(section: str | None = None, indent: str = "") -> str:
    """Every config key with its type, default and help; `section` is a section name (`train`) or a key query
    (`train.lr`, `lr`, `smoothing`) that keeps only the matching keys. A query that matches nothing is a
    ConfigError with the closest key names."""
    lines = []
    query = section if section and section not in SECTIONS else None
    # `lr` shows train.lr, not every key with "lr" in its name; a part of a name matches when nothing is exact
    exact = query is not None and any(_matches(r[0], query, True) for sec in SECTIONS for r in _rows(sec))
    for sec in SECTIONS:
        if section and not query and sec != section:
            continue
        rows = [r for r in _rows(sec) if query is None or _matches(r[0], query, exact)]
        if not rows:
            continue
        lines.append(f"{indent}{sec}:")
        for key, tp, default, hlp in rows:
            d = _default(default)
            head = f"{indent}  {key} ({_type_name(tp)}" + (f", default {d}" if d else "") + ")"
            lines.append(head)
            lines.extend(textwrap.wrap(hlp, width=100, initial_indent=indent + "      ",
                                       subsequent_indent=indent + "      "))
    if query and not lines:
        keys = sorted({r[0].replace("[]", "") for sec in SECTIONS for r in _rows(sec)})
        names = list(dict.fromkeys([*SECTIONS, *keys, *sorted({k.rsplit(".", 1)[-1] for k in keys})]))
        close = difflib.get_close_matches(query, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else \
            f"; sections: {', '.join(SECTIONS)} (or a key name such as lr, or train.lr)"
        raise ConfigError(f"config: no section or key matches {query!r}{hint}")
    return "\n".join(lines)


def markdown() -> str:
    out = [
        "# Configuration reference",
        "",
        "Generated from the schema (`src/tunelab/config/schema.py`) by `make docs`; do not edit by hand.",
        "A config is YAML with the sections below. Precedence: defaults < YAML < `section.key=value` overrides on the",
        "command line (`tunelab train config.yaml train.lr=1e-4`). Unknown keys and wrong types are errors that name",
        "the key and suggest the closest valid one. The resolved config is saved as `OUTPUT_DIR/config.yaml`.",
        "`adapter` and `method` are chosen by their `type`; keys marked `[lora]` etc. apply to that type only.",
        "",
    ]
    for sec in SECTIONS:
        out += [f"## {sec}", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for key, tp, default, hlp in _rows(sec):
            cell = _type_name(tp).replace("|", "\\|")  # a literal's choices, not table columns
            out.append(f"| `{key}` | {cell} | `{_default(default)}` | {hlp} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown())
