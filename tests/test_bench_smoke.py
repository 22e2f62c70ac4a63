"""Smoke test of the benchmark suite: a tiny CPU run through the Python API.

Checks the CSV schema, that every loss method passed its correctness gate and
was timed in every mode, and that the floor ratio, the plot and the table exist.
"""

import csv
import math
import os

import torch

import bench  # sets TRITON_INTERPRET=1 when there is no CUDA, before triton is imported
from bench.cases import Case


def test_cpu_preset_tiny(tmp_path):
    cases = [Case(32, 32, 32, "fp32", "forward", "pk4"),
             Case(24, 40, 20, "bf16", "reverse", "dense"),
             Case(16, 16, 16, "fp32", "forward", "unique", k=2)]
    methods = ("floor", "sdm_triton", "sdm_torch", "reference", "inf_cl", "sdm_triton_multi")
    cfg = bench.Config(cases=cases, methods=methods, out=tmp_path, device="cpu",
                       triton_max_nm=32 * 40, cpu_budget_s=0.01, verbose=False)
    result = bench.run(cfg)

    with open(result.csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == bench.CSV_COLUMNS
        rows = list(reader)
    assert rows == [{k: str(v) for k, v in r.items() if k in bench.CSV_COLUMNS} for r in result.rows]

    # On a CUDA machine Triton is compiled, not interpreted: CPU tensors are skipped (with the reason).
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    triton_methods = ("sdm_triton", "sdm_triton_multi")
    loss_methods = ("sdm_torch", "reference") + (("sdm_triton",) if interpreted else ())
    for case in cases:
        sel = [r for r in rows if (int(r["N"]), int(r["M"]), int(r["D"]), int(r["K"])) == (case.n, case.m, case.d, case.k)]
        expected = loss_methods + (("sdm_triton_multi",) if case.k > 1 and interpreted else ())
        if not interpreted:
            skipped = [r for r in sel if r["method"] in triton_methods]
            assert skipped and all(r["status"] == "skipped" and r["note"] for r in skipped)
        for method in expected:
            got = [r for r in sel if r["method"] == method]
            assert sorted(r["mode"] for r in got) == sorted(bench.MODES), (method, case)
            for r in got:
                assert r["status"] == "ok", r
                assert r["checked_against"] == "float64 reference"
                assert float(r["loss_rel_err"]) <= 1e-5
                assert float(r["median_ms"]) > 0
                assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
                assert float(r["x_floor"]) > 0
                assert r["torch_version"] == torch.__version__ and r["gpu"] and r["git_rev"]
        floor = [r for r in sel if r["method"] == "floor"]
        assert len(floor) == 3 and all(r["status"] == "n/a" for r in floor)
        assert all(math.isclose(float(r["x_floor"]), 1.0) for r in floor)
        # Inf-CL needs CUDA: recorded as skipped with the reason, never timed.
        infcl = [r for r in sel if r["method"] == "inf_cl"]
        assert infcl and all(r["status"] == "skipped" and r["note"] and not r["median_ms"] for r in infcl)

    assert (tmp_path / "time.png").stat().st_size > 0
    assert result.table.splitlines()[0].startswith("| case | method |")
    assert "ok vs float64 reference" in result.table


def test_cli_list(capsys):
    from bench.__main__ import main
    assert main(["--preset", "gpu-full", "--list"]) == 0
    out = capsys.readouterr().out
    assert "65536x65536x512 bf16 forward pk4" in out
    assert "K=15" in out


def test_failed_check_is_never_timed(tmp_path, monkeypatch):
    from bench import measure
    monkeypatch.setattr(measure, "LOSS_RTOL", -1.0)   # nothing can pass
    cfg = bench.Config(cases=[Case(16, 16, 16, "fp32")], methods=("sdm_torch",), out=tmp_path,
                       device="cpu", plots=False, verbose=False)
    rows = bench.run(cfg).rows
    assert len(rows) == 3
    assert all(r["status"] == "FAILED" and r["median_ms"] == "" for r in rows)


def test_fp32_truth_fallback_agrees_with_float64():
    """Where the float64 reference would not fit, the gate uses the fp32 chunked backend."""
    from bench import measure
    from bench.cases import make_inputs
    case = Case(40, 24, 20, "bf16", "reverse", "pk4", k=2)
    inputs = make_inputs(case, torch.device("cpu"))
    f64 = measure.compute_truth(case, inputs, torch.device("cpu"))
    f32 = measure.compute_truth(case, inputs, torch.device("cpu"), memory_fraction=0.0)
    assert (f64.source, f32.source) == ("float64 reference", "fp32 sdm_torch")
    assert measure.rel_err([f32.loss], [f64.loss]) < 1e-6
    assert measure.rel_err(f32.grads, f64.grads) < 1e-5
