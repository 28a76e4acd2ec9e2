"""Shape rules of node/ that review alone lets slip: keyword-only constructors and module size."""

from __future__ import annotations

import ast
from pathlib import Path

NODE = Path(__file__).resolve().parents[2] / "node"
# Longer than this is usually two modules (style.md); split by responsibility.
MAX_MODULE_LINES = 450
# Published positional APIs: `Client("host:7070", ...)` is in the README.
POSITIONAL_ALLOWED = {"Client"}


def _modules() -> list[Path]:
    return [path for path in sorted(NODE.rglob("*.py")) if "_gen" not in path.parts]


def _is_exception(cls: ast.ClassDef) -> bool:
    names = {getattr(base, "id", getattr(base, "attr", "")) for base in cls.bases}
    return any(name.endswith(("Error", "Exception", "Refused")) or name in {
        "FilchError", "ClientError", "TaskNotFound", "ClickException"} for name in names)


def test_constructors_are_keyword_only() -> None:
    positional = []
    for path in _modules():
        for cls in ast.walk(ast.parse(path.read_text())):
            if (not isinstance(cls, ast.ClassDef) or cls.name in POSITIONAL_ALLOWED
                    or _is_exception(cls)):
                continue
            for function in cls.body:
                if (isinstance(function, ast.FunctionDef) and function.name == "__init__"
                        and len(function.args.posonlyargs + function.args.args) > 1):
                    positional.append(f"{path.relative_to(NODE.parent)}: {cls.name}")
    assert positional == []



def test_no_module_is_too_long() -> None:
    long = {str(path.relative_to(NODE.parent)): lines for path in _modules()
            if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}
