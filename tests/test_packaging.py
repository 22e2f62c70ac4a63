"""What a user installing the package meets (issue 15): a wheel with one top-level name (its
test kit included, issue 21), and a package that imports and computes without Triton (macOS,
Windows), naming Triton and the way out when it is asked for, and without Hypothesis, whose
absence only the test kit names. They run in subprocesses, as a fresh interpreter would."""

import importlib.metadata
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_without(module: str, body: str) -> list:
    """Run ``body`` in a fresh interpreter in which ``module`` cannot be found, whatever is
    installed (importing it fails, ``importlib.util.find_spec`` says None); its stdout lines."""
    prelude = f"""
import importlib.util, sys

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {module!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Absent())
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: None if name.split(".")[0] == {module!r} else _find_spec(name, *a, **k)
"""
    out = subprocess.run([sys.executable, "-c", prelude + body], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[-1] == "OK", out.stdout
    return lines


WITHOUT_TRITON = r'''
import torch
import sdm_triton
from sdm_triton import reference

torch.manual_seed(0)
q, g = torch.randn(6, 8, dtype=torch.float64), torch.randn(7, 8, dtype=torch.float64)
ids, gids = torch.arange(6) // 2, torch.arange(7) // 2
for backend in ("auto", "torch"):
    got = sdm_triton.sdm_loss(q, g, ids, gids, backend=backend)
    want = reference.sdm_loss(q, g, ids, gids)
    torch.testing.assert_close(got, want)
try:
    sdm_triton.sdm_loss(q.float(), g.float(), ids, gids, backend="triton")
except ModuleNotFoundError as e:
    print("ERROR:", e)
assert "triton" not in sys.modules
print("OK")
'''


def test_without_triton_the_package_computes_and_names_the_way_out():
    lines = _run_without("triton", WITHOUT_TRITON)
    error = next((l for l in lines if l.startswith("ERROR:")), None)
    assert error is not None, "backend='triton' without Triton did not raise ModuleNotFoundError"
    for needed in ("triton", "pip install triton", "backend='torch'"):
        assert needed in error, (needed, error)


# the package works without hypothesis; its test kit names the extra that brings it (issue 21)
WITHOUT_HYPOTHESIS = r'''import torch
import sdm_triton
from sdm_triton import reference

q, g, ids = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
torch.testing.assert_close(sdm_triton.sdm_loss(q, g, ids), reference.sdm_loss(q, g, ids))
assert "hypothesis" not in sys.modules
try:
    import sdm_triton.testing
except ModuleNotFoundError as e:
    print("ERROR:", e)
print("OK")
'''


def test_without_hypothesis_the_package_works_and_its_test_kit_names_the_extra():
    lines = _run_without("hypothesis", WITHOUT_HYPOTHESIS)
    assert "ERROR: sdm_triton.testing needs hypothesis: pip install 'sdm_triton[testing]'" in lines, lines


def _setuptools_major():
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return 0


# pyproject.toml's build requirement; pip wheel runs without build isolation (no network needed)
@pytest.mark.skipif(_setuptools_major() < 77, reason="building the wheel offline needs setuptools >= 77 installed")
def test_the_wheel_installs_one_top_level_name(tmp_path):
    """`sdm_triton` only: the oracle ships as sdm_triton.reference, the bench and tests stay out."""
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("sdm_triton-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"sdm_triton"}, top
    for module in ("sdm_triton/reference/__init__.py", "sdm_triton/distributed/__init__.py", "sdm_triton/py.typed",
                   "sdm_triton/testing/__init__.py", "sdm_triton/testing/_problems.py"):
        assert module in names, module
