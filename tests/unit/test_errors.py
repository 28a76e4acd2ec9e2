"""One error tree: every exception class in node/ descends from errors.FilchError."""

from __future__ import annotations

import ast
from pathlib import Path

import grpc
import pytest

from node import client
from node.core import errors
from node.core.errors import FilchError

NODE = Path(__file__).resolve().parents[2] / "node"
# click's own exit mechanism: how the CLI prints a message and exits, not a failure type.
OUTSIDE_THE_TREE = {"CommandError"}


def test_exceptions_are_defined_in_errors_py_only() -> None:
    elsewhere = []
    for path in sorted(NODE.rglob("*.py")):
        if "_gen" in path.parts or path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name not in OUTSIDE_THE_TREE and any(
                    getattr(base, "id", getattr(base, "attr", "")).endswith(
                        ("Error", "Exception", "Timeout", "Refused")) for base in node.bases):
                elsewhere.append(f"{path.relative_to(NODE.parent)}: {node.name}")
    assert elsewhere == []


@pytest.mark.parametrize("name", ["ClientError", "NotFound", "InvalidRequest", "Unauthenticated",
                                  "Unavailable", "DeadlineExceeded"])
def test_the_client_raises_the_one_tree_under_its_published_names(name: str) -> None:
    published = getattr(client, name)
    assert published is getattr(errors, name)
    assert issubclass(published, FilchError)


def test_a_client_failure_is_caught_as_a_filch_error() -> None:
    # Nothing listens on port 1: the client's own UNAVAILABLE, caught by the tree's root.
    with client.Client("127.0.0.1:1", timeout=2) as filch, pytest.raises(FilchError) as raised:
        filch.get("0" * 32)
    assert isinstance(raised.value, client.Unavailable)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE


def test_http_answers_are_in_the_tree() -> None:
    refused = errors.Refused(403, "Origin: cross-origin request refused")
    assert isinstance(refused, errors.HttpError) and isinstance(refused, FilchError)
    assert refused.status == 403 and refused.headers == []
    assert issubclass(errors.RequestReadTimeout, TimeoutError)
