"""docs/configuration.md, generated from the config tree in ``salgl/config.py``.

    .venv/bin/python -m jobs.config_docs > docs/configuration.md

Every dotted key of :class:`salgl.config.Config` with its type, its default and the comment written
beside the field (or, where there is none, the comment block just above it), grouped by section;
then the aliases and the presets. ``tests/test_config_docs.py`` checks that the file in the
repository is what :func:`render` gives, so the page cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
import typing
from typing import Any

from salgl.config import ALIASES, PRESETS, Config, to_flat

COMMAND = "python -m jobs.config_docs > docs/configuration.md"


def sections(cls: type = Config, prefix: str = "") -> list[tuple[str, type]]:
    """The leaf sections (dataclasses holding values) in field order: ``[("model.backbone", BackboneConfig), ...]``."""
    out: list[tuple[str, type]] = []
    hints = typing.get_type_hints(cls)
    values = [f for f in dataclasses.fields(cls) if not _is_section(hints[f.name])]
    if values and prefix:
        out.append((prefix.rstrip("."), cls))
    for f in dataclasses.fields(cls):
        if _is_section(hints[f.name]):
            out.extend(sections(hints[f.name], f"{prefix}{f.name}."))
    return out


def _is_section(kind: Any) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def field_comments(cls: type) -> dict[str, str]:
    """``{field: comment}`` from the class source: the trailing ``# comment`` on the field's line,
    else the comment lines directly above it (joined); fields with neither are left out."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments: dict[int, str] = {}  # line number (1-based) -> comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        name = stripped.split(":", 1)[0]
        if name not in names or line[: len(line) - len(line.lstrip())] != " " * 4:
            continue
        if number in comments:
            out[name] = comments[number]
            continue
        above: list[str] = []
        k = number - 1
        while k >= 1 and k in comments and lines[k - 1].strip().startswith("#"):
            above.insert(0, comments[k])
            k -= 1
        if above:
            out[name] = " ".join(above)
    return out


def section_doc(cls: type) -> str:
    """The section class's own docstring as Markdown (``x`` -> `x`), or "" when it has none."""
    doc = cls.__dict__.get("__doc__") or ""
    if not doc or doc.startswith(cls.__name__ + "("):  # dataclass's generated signature
        return ""
    return " ".join(inspect.cleandoc(doc).split()).replace("``", "`")


def type_name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind))


def value_text(value: Any) -> str:
    """A value as it is written on the command line or in YAML."""
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{value!r}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    """The whole of docs/configuration.md."""
    defaults = to_flat(Config())
    aliases_of: dict[str, list[str]] = {}
    for short, key in ALIASES.items():
        aliases_of.setdefault(key, []).append(short)

    out: list[str] = [
        "# Configuration",
        "",
        f"<!-- Generated from salgl/config.py by `{COMMAND}`; do not edit by hand. -->",
        "",
        "Every run is described by one typed config tree (`salgl/config.py`). Each value has a dotted",
        "key. Set it on the command line as `key=value` (`salgl train my.yaml model.head.steps=2",
        "optim.lr=3e-4`) or nested in a YAML file (`model: {head: {steps: 2}}`); a YAML file may",
        "name a `preset` (below) that fills in values first. Invalid values fail before anything",
        "starts, naming the key. The defaults are the `salgl` preset.",
        "",
        "Sections: " + ", ".join(f"[`{name}`](#{name.replace('.', '')})" for name, _ in sections()) + ".",
        "",
    ]
    for name, cls in sections():
        out += [f"## {name}", ""]
        doc = section_doc(cls)
        if doc:
            out += [doc, ""]
        hints = typing.get_type_hints(cls)
        comments = field_comments(cls)
        out += ["| key | type | default | description |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            key = f"{name}.{f.name}"
            description = comments.get(f.name, "")
            for short in aliases_of.get(key, []):
                # the comment often names the alias itself ("K", "T, gated propagation steps")
                if description == short or description.startswith(short + ", "):
                    description = description[len(short) + 2 :]
                description = f"alias `{short}`" + (f"; {description}" if description else "")
            out.append(f"| `{key}` | {type_name(hints[f.name])} | {value_text(defaults[key])} | {_cell(description)} |")
        out.append("")

    out += [
        "## Aliases",
        "",
        "Short names for the three numbers the paper sweeps; they work wherever a key does.",
        "",
        "| alias | key |",
        "|---|---|",
    ]
    out += [f"| `{short}` | `{key}` |" for short, key in ALIASES.items()]
    out.append("")

    out += [
        "## Presets",
        "",
        "A preset sets the keys listed under its name and leaves every other key at its default;",
        "overrides apply on top (`salgl.config.preset(name, overrides)`, or `preset: name` in YAML).",
        "",
    ]
    out += [f"- `{name}`: sets no key; its values are the defaults above." for name, keys in PRESETS.items() if not keys]
    out.append("")
    for name, keys in PRESETS.items():
        if not keys:
            continue
        out += [f"### {name}", "", "| key | value | default |", "|---|---|---|"]
        out += [f"| `{key}` | {value_text(value)} | {value_text(defaults[key])} |" for key, value in keys.items()]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render())
