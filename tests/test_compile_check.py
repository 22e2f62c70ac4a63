"""Every kernel compiles for sm_90 (no GPU needed) with the scalar argument types that Inductor
gives them under ``torch.compile``: fp64 floats, i64 integers (issue 18: an fp64 ``scale_value``
made the statistics loop's running maximum fp64 and the compile failed on CUDA only; CI has no
GPU, so this is where that class of bug shows); and with every scalar a constant, as torch 2.11
compiles them to find the tensors they write (issue 26: ``scale_value.to(...)`` failed there, and
each compile logged 23 tracebacks and took every input as mutated). ``tools/compile_check.py
--scalars`` runs every typing, eager's too."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_compile_with_inductor_scalar_types():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}    # compile, not interpret
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "compile_check.py"), "--scalars",
                        "--typings", "inductor,constants"], env=env, capture_output=True, text=True, timeout=600)
    failed = [ln for ln in r.stdout.splitlines() if "FAILED" in ln]
    assert r.returncode == 0 and not failed, "\n".join(failed) or (r.stdout + r.stderr)[-3000:]
    # 2 typings x (21 kernels x 3 dtype / label cases + the 2 fp16-W variants x 2 half dtypes)
    assert r.stdout.count(" ok") == 2 * (63 + 4), r.stdout
