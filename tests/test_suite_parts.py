"""tools/gpu_suite.sh --part K/N (SDM_TEST_PART, tests/conftest.py): the parts run every test once."""

import types

import pytest

from conftest import _select_part


def _part(monkeypatch, part, ids):
    monkeypatch.setenv("SDM_TEST_PART", part)
    items = [types.SimpleNamespace(nodeid=i) for i in ids]
    dropped = []
    config = types.SimpleNamespace(hook=types.SimpleNamespace(pytest_deselected=lambda items: dropped.extend(items)))
    _select_part(config, items)
    assert sorted(i.nodeid for i in items + dropped) == sorted(ids)
    return [i.nodeid for i in items]


def test_the_parts_partition_the_suite(monkeypatch):
    ids = [f"tests/test_x.py::test_{i}[case-{j}]" for i in range(40) for j in range(5)]
    parts = [_part(monkeypatch, f"{k}/3", ids) for k in (1, 2, 3)]
    assert sorted(sum(parts, [])) == sorted(ids)
    assert all(len(p) > len(ids) // 5 for p in parts), [len(p) for p in parts]


def test_a_bad_part_is_refused(monkeypatch):
    with pytest.raises(pytest.UsageError, match="SDM_TEST_PART=3/2"):
        _part(monkeypatch, "3/2", ["a"])


def test_the_compile_log_records_and_sums_up_each_compilation(monkeypatch, tmp_path):
    """SDM_COMPILE_LOG (conftest._log_compiles): one line per Triton compilation, named by the
    kernel's own argument names; tools/compile_log.py sums them by kernel and by test."""
    import importlib.util
    import json
    import os

    from triton.runtime.jit import JITFunction

    import conftest
    from sdm_triton.kernels.stats import _stats_kernel

    calls = []
    monkeypatch.setattr(JITFunction, "_do_compile", lambda self, *a: calls.append(a) or "compiled")
    log = tmp_path / "compiles.jsonl"
    conftest._log_compiles(str(log))
    names = _stats_kernel.arg_names
    block_m, reverse = names.index("BLOCK_M"), names.index("REVERSE")
    options = types.SimpleNamespace(num_warps=8, num_stages=3)
    for rev in (True, False):
        got = JITFunction._do_compile(_stats_kernel, "key", {"q_ptr": "*bf16", "N": "i32", "BLOCK_M": "constexpr"},
                                      0, {(block_m,): 128, (reverse,): rev}, options, {}, False)
        assert got == "compiled"
    assert len(calls) == 2
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["constexprs"] for r in rows] == [{"BLOCK_M": "128", "REVERSE": "True"},
                                               {"BLOCK_M": "128", "REVERSE": "False"}]
    assert rows[0]["kernel"] == "_stats_kernel" and rows[0]["types"] == "*bf16,i32"
    assert rows[0]["options"] == {"num_warps": 8, "num_stages": 3}

    spec = importlib.util.spec_from_file_location(
        "compile_log", os.path.join(os.path.dirname(__file__), "..", "tools", "compile_log.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    text = "\n".join(tool.summarise(log.read_text().splitlines()))
    assert "2 compilations" in text and "_stats_kernel" in text and "REVERSE (2)" in text, text
