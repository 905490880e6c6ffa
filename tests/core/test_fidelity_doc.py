"""docs/fidelity.md names code as `src/milkit/<path>.py:Name[.attr...]`; every such
reference must point at an existing file that defines the name (ast, no import):
a top-level def / class / assignment, or a method / field / nested class of a class."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "fidelity.md"
REF = re.compile(r"`(src/milkit/[A-Za-z0-9_/]+\.py):([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)`")


def _names(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """Names bound by the statements of a module or class body."""
    out: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        out[n.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, (ast.If, ast.Try)):  # definitions under `if TYPE_CHECKING:` / try-import
            out.update(_names(node.body))
    return out


def resolve(root: Path, path: str, symbol: str) -> str | None:
    """None when ``path:symbol`` exists; otherwise what is wrong (one line)."""
    file = root / path
    if not file.is_file():
        return f"{path}: no such file"
    scope = _names(ast.parse(file.read_text(), filename=str(file)).body)
    parts = symbol.split(".")
    for i, part in enumerate(parts):
        node = scope.get(part)
        if node is None:
            where = path if i == 0 else f"{path}:{'.'.join(parts[:i])}"
            return f"{where}: defines no {part!r}"
        if i < len(parts) - 1:
            if not isinstance(node, ast.ClassDef):
                return f"{path}:{'.'.join(parts[:i + 1])} is not a class, it has no attribute {parts[i + 1]!r}"
            scope = _names(node.body)
    return None


def references(text: str) -> list[tuple[str, str]]:
    return REF.findall(text)


def test_checker_rejects_what_does_not_exist(tmp_path):
    (tmp_path / "src" / "milkit").mkdir(parents=True)
    (tmp_path / "src" / "milkit" / "m.py").write_text(
        "X = 1\nclass C:\n    f: int = 0\n    def g(self): pass\n    class Config:\n        a: int = 1\ndef h(): pass\n")
    ok = ["X", "C", "C.f", "C.g", "C.Config", "C.Config.a", "h"]
    assert all(resolve(tmp_path, "src/milkit/m.py", s) is None for s in ok)
    assert "defines no 'Y'" in resolve(tmp_path, "src/milkit/m.py", "Y")
    assert "defines no 'k'" in resolve(tmp_path, "src/milkit/m.py", "C.k")
    assert "not a class" in resolve(tmp_path, "src/milkit/m.py", "h.x")
    assert "no such file" in resolve(tmp_path, "src/milkit/n.py", "X")
    assert references("see `src/milkit/m.py:C.g` and `src/milkit/a/b.py:X`, not `m.py:C`") == [
        ("src/milkit/m.py", "C.g"), ("src/milkit/a/b.py", "X")]


def test_every_reference_in_the_fidelity_doc_exists():
    text = DOC.read_text()
    refs = references(text)
    assert len(refs) >= 60, f"docs/fidelity.md names only {len(refs)} code symbols"
    problems = sorted({p for path, sym in refs if (p := resolve(ROOT, path, sym)) is not None})
    assert not problems, "docs/fidelity.md names code that does not exist:\n" + "\n".join(problems)


@pytest.mark.parametrize("heading", ["## IKD-MIL", "## Max-Min", "## Sm"])
def test_doc_has_one_table_per_paper(heading):
    text = DOC.read_text()
    assert heading in text
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    assert "| item | paper (Eq./§) |" in section and section.count("\n|") >= 8
