"""The import graph of af3trt: no cycles, and every import in the written direction (docs/development.md, "Layout").

    af3trt.registry     facts; imports nothing of af3trt
    runtime.assets      the embedded demo clip; imports nothing of af3trt
    runtime.host        what /proc says about processes (proc.py); imports nothing of af3trt
    runtime.stages      the tensor contract and the pure processing of each stage (audio, prompt, sampling, detok…)
    runtime.engines     ← stages                 the CPU/GPU backends a stage runs (decoder, encoder, stand-ins)
    runtime.triton      ← stages                 what every python-backend stub shares (I/O, request context, configs)
    runtime.client      ← stages                 the gRPC client library and `af3trt ask`
    runtime.openai      ← client, stages         the OpenAI-compatible front
    runtime.serve       ← openai, triton, engines, client, stages   launcher, supervisor, replicas, doctor
    runtime.batch       ← serve, client, stages  `af3trt batch`, on top of runtime
    kernels             ← runtime.stages
    triton_repo         ← runtime.{stages, engines, triton}, kernels   (the Triton models: thin adapters)
    export              ← runtime.{stages, engines}
    build               ← export, triton_repo, kernels, runtime
    perf                ← anything above, through public names only
    af3trt.cli/demo     the entry points, on top

Every import counts: the ones inside functions (they hide the graph, they do not remove an edge), and a module named
by a string that importlib loads (af3trt.cli.COMMANDS, the OpenAI front's ROUTERS): any string constant that is the
full name of one of our modules is an edge. The packages and their source folders come from pyproject.toml, so a new
package cannot slip past the test.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

RUNTIME = {"runtime.stages", "runtime.engines", "runtime.triton", "runtime.client", "runtime.openai", "runtime.serve",
           "runtime.batch"}
FOUNDATION = {"registry", "runtime", "runtime.assets", "runtime.host"}  # facts and data: anyone may import them; they import nothing of af3trt
# layer → the layers it may import (besides itself and the foundation)
ALLOWED = {
    "registry": set(),
    "runtime": set(),
    "runtime.assets": set(),
    "runtime.host": set(),
    "runtime.stages": set(),
    "runtime.engines": {"runtime.stages"},
    "runtime.triton": {"runtime.stages"},
    "runtime.client": {"runtime.stages"},
    "runtime.openai": {"runtime.client", "runtime.stages"},
    "runtime.serve": {"runtime.openai", "runtime.triton", "runtime.engines", "runtime.client", "runtime.stages"},
    "runtime.batch": {"runtime.serve", "runtime.client", "runtime.stages"},
    "kernels": {"runtime.stages"},
    "triton_repo": {"runtime.stages", "runtime.engines", "runtime.triton", "kernels"},
    "export": {"runtime.stages", "runtime.engines"},
    "build": {"export", "triton_repo", "kernels"} | RUNTIME,
    "perf": {"build", "export", "triton_repo", "kernels"} | RUNTIME,
    "entry": {"build", "export", "triton_repo", "kernels", "perf"} | RUNTIME,
}


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[:2] == ["af3trt", "registry"]:
        return "registry"
    if parts[:2] == ["af3trt", "runtime"]:
        sub = f"runtime.{parts[2]}" if len(parts) > 2 else "runtime"
        if sub not in ALLOWED:
            raise AssertionError(f"{module}: runtime/ holds only its sub-layers {sorted(RUNTIME)}; place it in one")
        return sub
    if len(parts) >= 2 and parts[1] in ALLOWED:
        return parts[1]
    return "entry"  # af3trt, af3trt.cli, af3trt.demo


def modules() -> dict[str, Path]:
    """Module name → source file, for every package pyproject.toml installs (and the Triton models' model.py)."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    out = {}
    for package, folder in tool["package-dir"].items():
        for f in sorted((ROOT / folder).glob("*.py")):
            out[package if f.stem == "__init__" else f"{package}.{f.stem}"] = f
    for f in sorted((ROOT / "triton_repo").glob("*/model.py")):  # package data, imported by Triton's python stub
        out[f"af3trt.triton_repo.{f.parent.name}.model"] = f
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported af3trt module, names taken from it, line) for every import statement in the file, at any depth, and
    every string constant that names one of our modules (importlib)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found = []
    # `python -m af3trt.x` in a command line runs a module in another process: not an import of this one
    run_by_name = {id(b) for n in ast.walk(tree) if isinstance(n, (ast.List, ast.Tuple))
                   for a, b in zip(n.elts, n.elts[1:]) if isinstance(a, ast.Constant) and a.value == "-m"}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value
                and node.value in known and id(node) not in run_by_name):
            found.append((node.value, [], node.lineno))  # loaded by importlib: cli.COMMANDS, the OpenAI ROUTERS
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("af3trt"):
                    found.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("af3trt"):
                continue
            for alias in node.names:  # `from af3trt.build import gpu_build` imports a module
                sub = f"{base}.{alias.name}"
                found.append((sub, [], node.lineno) if sub in known else (base, [alias.name], node.lineno))
    return found


def graph() -> tuple[dict[str, Path], dict[str, dict[str, list]]]:
    known = modules()
    edges: dict[str, dict[str, list]] = defaultdict(dict)
    for name, path in known.items():
        for target, names, line in imports(name, path, known):
            target = next((t for t in (target, target.rsplit(".", 1)[0]) if t in known), None)
            if target is not None and target != name:
                edges[name].setdefault(target, []).append((line, names))
    return known, edges


def cycles(nodes, edges) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in nodes:
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read_whole():
    known, edges = graph()
    # every installed package has modules, and the graph sees function-level imports
    for package in ("af3trt.registry", "af3trt.runtime.client.library", "af3trt.runtime.stages.contract", "af3trt.build.build_engines", "af3trt.perf.bench",
                    "af3trt.triton_repo.fusion.model", "af3trt.kernels.table", "af3trt.export.quantize"):
        assert package in known
    assert "af3trt.build.gpu_build" in edges["af3trt.build.build_engines"]
    # imports made through importlib are seen: the CLI's commands and the OpenAI front's routers
    assert {"af3trt.runtime.serve.server", "af3trt.runtime.client.ask", "af3trt.perf.bench"} <= set(edges["af3trt.cli"])
    assert "af3trt.runtime.openai.chat" in edges["af3trt.runtime.openai.app"]
    assert sum(len(v) for v in edges.values()) > 100


def test_no_import_cycles():
    known, edges = graph()
    assert cycles(known, edges) == []


def test_imports_follow_the_layers():
    known, edges = graph()
    wrong = []
    for src, targets in edges.items():
        for dst, where in targets.items():
            a, b = layer(src), layer(dst)
            if a != b and b not in FOUNDATION and b not in ALLOWED[a]:
                wrong.append(f"{src} imports {dst} (line {where[0][0]}): {a} may not import {b}")
    assert wrong == []


def test_registry_imports_nothing_of_af3trt():
    known, edges = graph()
    assert edges.get("af3trt.registry", {}) == {}


def test_perf_uses_public_names_only():
    """perf/ is a client of the package: no `_private` name, neither imported nor reached as an attribute."""
    known, edges = graph()
    wrong = []
    for name, path in known.items():
        if layer(name) != "perf":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module_aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("af3trt"):
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in known:
                        module_aliases.add(alias.asname or alias.name)
                    elif alias.name.startswith("_") and not alias.name.endswith("__"):
                        wrong.append(f"{name}:{node.lineno} imports {node.module}.{alias.name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in module_aliases and node.attr.startswith("_")
                    and not node.attr.endswith("__")):
                wrong.append(f"{name}:{node.lineno} reaches {node.value.id}.{node.attr}")
    assert wrong == []


def test_the_check_catches_what_it_claims(tmp_path):
    """The cycle finder and the layer rule on a made-up graph: a test that cannot fail proves nothing."""
    assert cycles(["a", "b", "c"], {"a": {"b": []}, "b": {"c": []}, "c": {"a": []}}) == [["a", "b", "c"]]
    assert cycles(["a", "b"], {"a": {"b": []}}) == []
    assert "triton_repo" not in ALLOWED["runtime.stages"] and "build" not in ALLOWED["export"]
    assert layer("af3trt.runtime.client.library") == "runtime.client" and layer("af3trt.cli") == "entry"
    assert "runtime.serve" not in ALLOWED["runtime.engines"] and "runtime.openai" not in ALLOWED["runtime.client"]
    with pytest.raises(AssertionError, match="sub-layers"):
        layer("af3trt.runtime.flat_module")
    # an import inside a function is an edge
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from af3trt.build.plan import BuildPlan\n")
    known = {"af3trt.runtime.m": src, "af3trt.build.plan": src}
    assert imports("af3trt.runtime.m", src, known) == [("af3trt.build.plan", ["BuildPlan"], 2)]
    # a module named by a string (importlib) is an edge
    src.write_text('COMMANDS = {"x": "af3trt.build.plan"}\nOTHER = "af3trt.build"\n'
                   'CMD = [sys.executable, "-m", "af3trt.build.plan"]\n')  # another process: not an import
    assert imports("af3trt.runtime.m", src, known) == [("af3trt.build.plan", [], 1)]


@pytest.mark.parametrize("argv", [["--from-prepared", "/nonexistent/af3trt-build"], ["--hf-model", "/nonexistent",
                                                                                      "--out", "/tmp/x"]])
def test_script_form_reports_a_clean_error(argv):
    """`python build/build_engines.py ...` (the documented script form) prints one error line, exit 2, no
    traceback: it loads the module once, so its `except BuildError` catches what the stages raise."""
    r = subprocess.run([sys.executable, str(ROOT / "build" / "build_engines.py"), *argv], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_every_shipped_folder_is_a_declared_package():
    """setuptools ships the files of a folder below a package only as a package of its own: package data reached
    through a subfolder (`"af3trt.triton_repo" = ["*/model.py"]`, `"af3trt" = ["reference/*.json"]`) made `pip
    install` print a screen of "Package would be ignored" warnings per folder. So package data names files of its own
    package, and every tracked folder of Python modules below a package is a declared package (else its modules
    would not ship)."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages, dirs = set(tool["packages"]), tool["package-dir"]
    data = tool["package-data"]
    assert set(data) <= packages and [p for patterns in data.values() for p in patterns if "/" in p] == []

    def folder(package: str) -> str:
        base = max((p for p in dirs if package == p or package.startswith(p + ".")), key=len)
        return (Path(dirs[base]) / Path(*package[len(base):].split(".")[1:])).as_posix()

    owner = {folder(p): p for p in packages}
    tracked = subprocess.run(["git", "ls-files", "-z", "*.py"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split("\0")
    undeclared = set()
    for parent in {Path(f).parent for f in tracked if f}:
        above = next((p for p in parent.parents if p.as_posix() in owner), None)
        if parent.as_posix() not in owner and above is not None and above != Path("."):
            undeclared.add(f"{owner[above.as_posix()]}.{parent.relative_to(above).parts[0]}")
    assert sorted(undeclared) == []
