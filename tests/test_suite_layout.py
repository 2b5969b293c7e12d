"""The test suite's own layout (issue 8): test modules never import one another (shared helpers live in
tests/helpers.py, fixtures in conftest.py, fakes in tests/fakes/), and transformers' AF3 model is loaded in one place
(tests/reference.py, through the session fixtures `ref` / `bf16_ref`), so a session loads it once per checkpoint."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _modules() -> dict[Path, ast.Module]:
    return {p: ast.parse(p.read_text()) for p in sorted(TESTS.glob("*.py"))}


def _imported(tree: ast.Module) -> set[str]:
    """Every module an import statement names, at any level (function-level imports included)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


def test_no_test_module_imports_another():
    tests = {p.stem for p in TESTS.glob("test_*.py")}
    bad = {p.name: sorted(m for m in _imported(tree) if m.split(".")[0] in tests)
           for p, tree in _modules().items()}
    assert {k: v for k, v in bad.items() if v} == {}


def test_transformers_af3_is_loaded_only_by_the_reference():
    loaders = []
    for p, tree in _modules().items():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr == "from_pretrained"
                    and isinstance(node.value, ast.Name) and node.value.id == "AudioFlamingo3ForConditionalGeneration"):
                loaders.append(p.name)
    assert loaders == ["reference.py"]


def test_the_fakes_are_in_one_package():
    assert not list(TESTS.glob("fake_*.py")) and not list(TESTS.glob("fakes_*.py"))
    assert {p.name for p in (TESTS / "fakes").iterdir() if not p.name.startswith("__pycache__")} >= {
        "__init__.py", "tensorrt", "trtllm_build.py", "pb_utils.py"}
