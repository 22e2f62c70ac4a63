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
