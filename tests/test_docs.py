"""docs/CONTRACTS.md section 2 (the wire protocol) says what `realtime.protocol` has: every
header field it names exists with the default it gives, every field of a header is named,
and the functions and constants it lists exist with the values it gives."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import msgspec
import pytest

from realtime import protocol

CONTRACTS = Path(__file__).resolve().parents[1] / "docs" / "CONTRACTS.md"
STRUCTS = ["FrameHeader", "ResultHeader", "ReferenceHeader", "EndOfStream", "EngineCounts", "StatsMessage"]
_NAME = re.compile(r"^([a-z_][a-z0-9_]*)\s*(?::\s*(?P<type>[^=]*?))?\s*(?:=\s*(?P<value>.+))?$")


def protocol_block() -> list[str]:
    """The lines of the python block of section 2."""
    text = CONTRACTS.read_text()
    section = text[text.index("## 2. Wire protocol"):text.index("## 3.")]
    return section.split("```python\n", 1)[1].split("```", 1)[0].splitlines()


def class_lines(name: str) -> tuple[str, list[str]]:
    """(the `class NAME` line, the lines up to the next class/def) of section 2's block."""
    lines = protocol_block()
    start = next(i for i, line in enumerate(lines) if re.match(rf"class {name}\b", line))
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"(class|def) ", lines[i])), len(lines))
    return lines[start], lines[start + 1:end]


def documented_fields(name: str) -> dict[str, str | None]:
    """Field name -> the default the document gives (its text), or None."""
    out: dict[str, str | None] = {}
    for line in class_lines(name)[1]:
        for piece in line.split("#")[0].split(";"):
            m = _NAME.match(piece.strip())
            if m:
                out[m.group(1)] = m.group("value")
    return out


def literal(text: str) -> object:
    return ast.literal_eval(text.split(" (")[0].strip())


def defaults(cls: type) -> dict[str, object]:
    """Field name -> its default (a mutable one made by its factory; NODEFAULT: required)."""
    out: dict[str, object] = {}
    for f in msgspec.inspect.type_info(cls).fields:  # type: ignore[attr-defined]
        factory = f.default_factory
        out[f.name] = factory() if factory is not msgspec.NODEFAULT else f.default
    return out


@pytest.mark.parametrize("name", STRUCTS)
def test_every_documented_field_exists_with_its_default(name):
    cls = getattr(protocol, name)
    fields = defaults(cls)
    documented = documented_fields(name)
    assert documented, f"CONTRACTS section 2 lists no fields of {name}"
    assert set(documented) <= set(fields), f"{name}: documented but not in the code"
    for field, text in documented.items():
        if text is None:
            continue
        try:
            value = literal(text)
        except (ValueError, SyntaxError):
            continue  # a description, not a literal
        assert fields[field] == value, f"{name}.{field}: the document says {value!r}, the code {fields[field]!r}"


@pytest.mark.parametrize("name", STRUCTS)
def test_every_field_of_the_code_is_documented(name):
    fields = set(defaults(getattr(protocol, name))) - {"version"}  # version: on every header, in the prose
    assert fields <= set(documented_fields(name)), f"{name}: in the code but not in CONTRACTS"


@pytest.mark.parametrize("name", [n for n in STRUCTS if n != "EngineCounts"])
def test_documented_kind_tag(name):
    head = class_lines(name)[0]
    m = re.search(r'kind == "(\w+)"', head)
    assert m, head
    assert getattr(protocol, name).kind == m.group(1)


def test_documented_functions_and_constants_exist():
    lines = protocol_block()
    functions = {m.group(1) for line in lines for m in re.finditer(r"\bdef (\w+)\(", line)}
    assert functions >= {"decode", "encode_frame", "encode_stats", "new_run_id"}
    for fn in functions:
        assert callable(getattr(protocol, fn, None)), fn
    constants = {}
    for line in lines:
        m = re.match(r"([A-Z_]+) = (\S+)", line)
        if m:
            constants[m.group(1)] = literal(m.group(2))
    assert constants, "no constants in section 2"
    for name, value in constants.items():
        assert getattr(protocol, name) == value, name
