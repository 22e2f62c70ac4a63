"""The package's structure (issue 29): its modules depend on each other one way only."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import torch

import sdm_triton

PACKAGE = Path(__file__).resolve().parent.parent / "sdm_triton"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules) -> set:
    """The package's modules that ``name`` imports by name, at module level or inside a function
    (an import of ``a.b.c`` counts as one of ``a.b.c``, not of the packages around it)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != name}


def _cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_one_that_imports_it_back():
    """No module of the package imports one that imports it back, directly or through others
    (imports inside functions count: a lazy import is still a dependency)."""
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    cycles = _cycles(graph)
    detail = [" <-> ".join(c) + ": " + "; ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in cycles]
    assert not cycles, "\n".join(detail)


def test_the_import_graph_is_read():
    """The check above sees the imports it must (relative, absolute, inside functions)."""
    modules = _modules()
    assert "sdm_triton.dispatch" in _imports("sdm_triton.api", modules["sdm_triton.api"], modules)
    assert "sdm_triton.launch" in _imports("sdm_triton.dispatch", modules["sdm_triton.dispatch"], modules)
    assert "sdm_triton.kernels.grad" in _imports("sdm_triton.launch.backward", modules["sdm_triton.launch.backward"],
                                                 modules)
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# --------------------------------------------------------------------------- the problem built once


def test_the_operators_arguments_are_the_problem_flattened():
    """ops.operator_args flattens a Problem into the operators' arguments and ops._problem reads
    them back: every field survives the round trip, the options and config as their names."""
    from sdm_triton import ops
    from sdm_triton.options import KernelConfig, SDMOptions
    from sdm_triton.problem import Problem

    q, g = torch.randn(3, 4), torch.randn(2, 5, 4)
    p = Problem(q=q, g=g, q_ids=torch.arange(3), g_ids=None, labels=None, q_mask=torch.ones(3, dtype=torch.bool),
                g_mask=None, scale=torch.tensor(7.0), scale_value=0.0,
                options=SDMOptions(kl="reverse", eps=1e-3, direction="q2g", combine="sum", reduction="none"),
                config=KernelConfig.parse("chunked_m16n16"), workspace_bytes=123, galleries=2, scalar_value=False,
                return_stats=True)
    args = ops.operator_args(p)
    assert [type(a) for a in args if not isinstance(a, torch.Tensor) and a is not None] == [
        float, str, str, int, int, bool, bool]
    back = ops._problem(args)
    for field in dataclasses.fields(Problem):
        if field.init:
            assert getattr(back, field.name) is getattr(p, field.name) or getattr(back, field.name) == getattr(
                p, field.name), field.name


def test_describe_path_refuses_a_keyword_sdm_loss_does_not_take():
    q = torch.randn(4, 8)
    assert sdm_triton.describe_path(q, q, torch.arange(4), torch.arange(4), temperature=0.1, kl="reverse") == "torch"
    with pytest.raises(TypeError, match="tempreature"):
        sdm_triton.describe_path(q, q, tempreature=0.1)


# --------------------------------------------------------------------------- the testing kit


def test_the_testing_kit_exports_what_its_docstring_documents():
    """sdm_triton.testing's public names are the ones its docstring shows users; the project's
    own tests import the rest from the kit's private modules."""
    testing = pytest.importorskip("sdm_triton.testing")
    shown = set(re.findall(r"``(?:sdm_triton\.testing\.)?(\w+)", testing.__doc__))
    documented = {name for name in shown & set(dir(testing)) if not name.startswith("_")}
    assert set(testing.__all__) == documented
    assert {"problems", "sdm_options", "problem", "assert_close_to_reference", "check_properties"} <= documented


# --------------------------------------------------------------------------- named slots


def test_the_kernels_slots_are_the_hosts():
    """Each buffer the kernels share with the host has its slots named in kernels/slots.py, in
    the order of the host's list: reordering one side alone would silently break the other
    (the statistics and the distributed weights read ``red`` by name)."""
    pytest.importorskip("triton")
    from sdm_triton.backend import RED_FIELDS
    from sdm_triton.kernels import slots
    from sdm_triton.launch.forward import LABEL_MASS_FIELDS, PREPARED_FIELDS, STATE_FIELDS

    for prefix, host in (("PRE_", PREPARED_FIELDS), ("LAB_", LABEL_MASS_FIELDS), ("STATE_", STATE_FIELDS),
                         ("RED_", RED_FIELDS)):
        kernel = {name: value.value for name, value in vars(slots).items() if name.startswith(prefix)}
        assert kernel == {prefix + field.upper(): i for i, field in enumerate(host)}, prefix


def test_every_mutant_applies_to_the_code():
    """Each one-line bug of `tools/mutants.py` still finds its text, once, in today's code: a
    refactor that moves the code must move the mutant with it (tools/mutants.py reports a stale
    one only when that mutant is run, and four had gone stale unnoticed: bench/NOTES.md 38)."""
    import importlib.util
    import sys

    root = PACKAGE.parent
    spec = importlib.util.spec_from_file_location("_sdm_tools_mutants", root / "tools" / "mutants.py")
    mutants = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mutants          # (its dataclass looks its module up there)
    try:
        spec.loader.exec_module(mutants)
    finally:
        del sys.modules[spec.name]
    stale = []
    for m in mutants.MUTANTS:
        text = (root / m.path).read_text()
        stale += [(m.name, old[:60]) for old, _ in m.edits if text.count(old) != 1]
    assert not stale, stale
