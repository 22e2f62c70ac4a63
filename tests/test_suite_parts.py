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


def _suite_summary():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "tools", "suite_summary.py")
    spec = importlib.util.spec_from_file_location("suite_summary", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _log(k, n, result, rc=0, seconds=200, sources="abc123"):
    return (f"card: H100 | torch 2.11 | triton 3.6.0 | rev 1234567 | sources {sources}\n....\n"
            f"SUMMARY (full, part {k}/{n}, {seconds} s, 10 examples): {result} (pytest exit {rc})\n")


def test_the_suite_summary_sums_the_parts_and_wants_them_all():
    """tools/suite_summary.py: one line for a suite run in parts, ok only when every part K of N
    ran once, on the same sources, with no failure and exit 0."""
    summarise = _suite_summary().summarise
    ok = summarise([_log(2, 2, "10 passed, 2 skipped in 9s", seconds=150),
                    _log(1, 2, "7 passed, 1 skipped, 3 warnings in 9s", seconds=250)])
    assert ok.startswith("SUITE ok: whole suite in 2 part(s) of 2 (sources abc123): 17 passed, 0 failed, 3 skipped")
    assert "250 + 150 = 400 s" in ok or "150 + 250 = 400 s" in ok
    bad = summarise([_log(1, 2, "1 failed, 7 passed in 9s", rc=1), _log(2, 2, "10 passed in 9s")])
    assert bad.startswith("SUITE NOT OK") and "1 failed" in bad
    assert "INCOMPLETE (missing part(s) 2/3, 3/3)" in summarise([_log(1, 3, "5 passed in 9s")])
    with pytest.raises(ValueError, match="different sources"):
        summarise([_log(1, 2, "5 passed in 9s"), _log(2, 2, "5 passed in 9s", sources="def456")])
    with pytest.raises(ValueError, match="given twice"):
        summarise([_log(1, 2, "5 passed in 9s"), _log(1, 2, "5 passed in 9s")])
    with pytest.raises(ValueError, match="without a SUMMARY"):
        summarise(["card: H100\n.... [ 40%]\n"])
