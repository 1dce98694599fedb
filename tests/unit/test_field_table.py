"""docs/compatibility.md's field table against the wire model: every field cluster/model.py
decodes for a Service or an EndpointSlice is listed, and every field listed as honoured is
decoded. Adding or removing a model field without updating the table fails here."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec.inspect as mi
import pytest

from kubeshim.cluster.model import EndpointSlice, Service

DOC = Path(__file__).resolve().parents[2] / "docs" / "compatibility.md"
SECTION = "## Every field of Service and EndpointSlice"
STATUSES = {"honoured", "ignored", "not applicable"}
MODELS = {"Service": Service, "EndpointSlice": EndpointSlice}


def model_fields(cls: type) -> set[str]:
    """Leaf field paths as the table writes them: `spec.ports[].port` for a list of objects,
    `spec.externalIPs` for a list of scalars."""
    out: set[str] = set()

    def walk(t: mi.Type, path: str) -> None:
        if isinstance(t, mi.StructType):
            for f in t.fields:
                walk(f.type, f"{path}.{f.encode_name}" if path else f.encode_name)
        elif isinstance(t, mi.UnionType):
            for member in t.types:
                if not isinstance(member, mi.NoneType):
                    walk(member, path)
        elif isinstance(t, mi.ListType) and isinstance(t.item_type, mi.StructType):
            walk(t.item_type, path + "[]")
        else:
            out.add(path)

    walk(mi.type_info(cls), "")
    return out


def table() -> dict[tuple[str, str], str]:
    """(kind, field) -> status, from the section's rows; `.x` continues the first field."""
    text = DOC.read_text()
    assert SECTION in text, f"{DOC} lost its section {SECTION!r}"
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows: dict[tuple[str, str], str] = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("kind", "---"):
            continue
        kind, fields, status = cells[0], re.findall(r"`([^`]+)`", cells[1]), cells[2]
        assert kind in ("both", *MODELS), line
        assert status in STATUSES, f"unknown status {status!r}: {line}"
        assert fields, line
        base = fields[0].rsplit(".", 1)[0]
        for name in fields:
            path = base + name if name.startswith(".") else name
            assert (kind, path) not in rows, f"listed twice: {kind} {path}"
            rows[(kind, path)] = status
    return rows


def listed(rows: dict[tuple[str, str], str], kind: str) -> dict[str, str]:
    return {f: s for (k, f), s in rows.items() if k in (kind, "both")}


@pytest.mark.parametrize("kind", MODELS)
def test_every_decoded_field_is_in_the_table(kind: str) -> None:
    missing = model_fields(MODELS[kind]) - set(listed(table(), kind))
    assert not missing, f"{kind} fields decoded but not in {DOC.name}: {sorted(missing)}"


@pytest.mark.parametrize("kind", MODELS)
def test_every_honoured_field_is_decoded(kind: str) -> None:
    honoured = {f for f, s in listed(table(), kind).items() if s == "honoured"}
    lost = honoured - model_fields(MODELS[kind])
    assert not lost, f"{kind} fields the table calls honoured but the model drops: {sorted(lost)}"


def test_the_table_covers_the_upstream_fields_kubeshim_acts_on() -> None:
    # A few fields of v1.37 that must appear whatever their status (the table is complete).
    rows = table()
    for kind, path in [("Service", "spec.trafficDistribution"),
                       ("Service", "spec.loadBalancerSourceRanges"),
                       ("Service", "status.conditions"),
                       ("EndpointSlice", "endpoints[].hints.forNodes[].name"),
                       ("EndpointSlice", "endpoints[].deprecatedTopology"),
                       ("both", "metadata.managedFields")]:
        assert (kind, path) in rows, path


def test_walker_sees_a_new_field() -> None:
    class Grown(Service, kw_only=True):
        extra: int = 0

    assert model_fields(Grown) - model_fields(Service) == {"extra"}
