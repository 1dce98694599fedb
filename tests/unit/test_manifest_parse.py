"""Parsing one manifest file into its top-level documents (cluster/sources/manifests.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubeshim.cluster.sources.manifests import ParseError, parse_documents

YAML = Path("m.yaml")


@pytest.mark.parametrize(("text", "docs"), [
    pytest.param("a: 1\n---\nb: 2\n", [{"a": 1}, {"b": 2}], id="multi-document"),
    pytest.param("---\na: 1\n...\n", [{"a": 1}], id="explicit-markers"),
    # One document that is a list stays one document (and is no object: skipped later).
    pytest.param("- a: 1\n- b: 2\n", [[{"a": 1}, {"b": 2}]], id="one-list-document"),
    pytest.param("---\n- a: 1\n", [[{"a": 1}]], id="one-list-document-with-marker"),
    pytest.param("a: 1\n---\n---\n# nothing\n", [{"a": 1}], id="empty-documents-dropped"),
    pytest.param("# only a comment\n", [], id="comment-only"),
    pytest.param("", [], id="empty-file"),
    pytest.param("\ufeffa: 1\n", [{"a": 1}], id="byte-order-mark"),
    pytest.param("x: |\n  text\n", [{"x": "text\n"}], id="block-scalar-at-the-end"),
    # The API server's JSON has timestamps as strings; so does a file.
    pytest.param("t: 2024-01-01T00:00:00Z\n", [{"t": "2024-01-01T00:00:00Z"}], id="timestamp"),
    # Documents are parsed one at a time, split where a line starts with `---`; indented in
    # a block scalar it is content.
    pytest.param("a: |\n  ---\n  x\n---\nb: 1\n", [{"a": "---\nx\n"}, {"b": 1}],
                 id="marker-inside-a-block-scalar"),
    pytest.param("--- |\n  text\n--- # c\nb: 1\n", ["text\n", {"b": 1}], id="content-after-marker"),
    pytest.param("%YAML 1.2\n---\na: 1\n", [{"a": 1}], id="directive"),
])
def test_documents(text: str, docs: list[Any]) -> None:
    assert parse_documents(YAML, text.encode()) == docs


@pytest.mark.parametrize(("text", "reason"), [
    pytest.param("kind: Service\nmetadata: {name: a\n  bad: [", "line", id="syntax-error"),
    # kubectl refuses a mapping with a key twice, rather than picking one of them.
    pytest.param("metadata:\n  name: a\n  name: b\n", "duplicate", id="duplicate-key"),
    pytest.param("a: \xff\n", "utf-8", id="not-utf-8"),
    # The error names the line in the file, not in the document.
    pytest.param("a: 1\n---\nb: [\n", "line 3", id="error-in-a-later-document"),
])
def test_errors(text: str, reason: str) -> None:
    with pytest.raises(ParseError, match=reason):
        parse_documents(YAML, text.encode("latin-1"))


def test_alias_expansion_is_bounded() -> None:
    # "Billion laughs": each level refers to the one below ten times.
    lines = ['l0: &l0 "lol"']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 10)]
    with pytest.raises(ParseError):
        parse_documents(YAML, "\n".join(lines).encode())


def test_json() -> None:
    assert parse_documents(Path("m.json"), b'{"kind": "List", "items": []}') == [
        {"kind": "List", "items": []}]
    with pytest.raises(ParseError):
        parse_documents(Path("m.json"), b'{"kind": ')
