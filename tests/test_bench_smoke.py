"""Smoke tests of the benchmark suite (bench/) and of tools/count_ops.py, on the CPU.

The cpu preset end to end through the Python API (CSV schema, the correctness gate before
timing, floor ratios, TFLOP/s, interpreted Triton rows labelled), the command line's
answers to typos, the formula peers (their math against the reference, their TF32
precision set only while they run, torch.compile's wiring), and the environment hygiene
of ``import bench`` and ``python -m bench``.
"""

import csv
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
from bench import measure, methods as M, report
from bench.cases import Case, PRESETS, make_inputs

import sdm_triton
from sdm_triton import reference

REPO = Path(__file__).resolve().parent.parent
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _rows_of(rows, case):
    return [r for r in rows if (int(r["N"]), int(r["M"]), int(r["D"]), int(r["K"]), r["dtype"], r["kl"],
                                r["labels"], r["combine"])
            == (case.n, case.m, case.d, case.k, case.dtype, case.kl, case.labels, case.combine)]


def test_cpu_preset(tmp_path):
    cfg = bench.Config.from_preset("cpu", out=tmp_path, device="cpu", cpu_budget_s=0.01, verbose=False)
    result = bench.run(cfg)

    with open(result.csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == bench.CSV_COLUMNS
        rows = list(reader)
    assert rows == [{k: str(v) for k, v in r.items() if k in bench.CSV_COLUMNS} for r in result.rows]
    assert {r["sdm_version"] for r in rows} == {sdm_triton.__version__}
    assert all(r["torch_version"] == torch.__version__ and r["gpu"] for r in rows)

    preset = PRESETS["cpu"]
    assert {"formula_eager", "sdm_triton", "floor"} <= set(preset.methods)
    for case in preset.cases():
        sel = _rows_of(rows, case)
        floor = [r for r in sel if r["method"] == "floor"]
        assert len(floor) == 3 and all(r["status"] == "n/a" for r in floor)
        assert all(math.isclose(float(r["x_floor"]), 1.0) and float(r["tflops"]) > 0 for r in floor)

        # On a CUDA machine Triton is compiled, not interpreted: CPU tensors are skipped (with the reason).
        triton_runs = INTERPRETED and case.n * case.m <= preset.triton_max_nm
        expected = ["sdm_torch", "reference", "formula_eager"]
        expected += ["sdm_triton"] + (["sdm_triton_multi"] if case.k > 1 else []) if triton_runs else []
        for method in expected:
            got = [r for r in sel if r["method"] == method]
            assert sorted(r["mode"] for r in got) == sorted(bench.MODES), (method, case)
            for r in got:
                assert r["status"] == "ok", r
                assert r["checked_against"] == "float64 reference"
                assert float(r["loss_rel_err"]) <= 1e-5
                assert 0 < float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
                assert float(r["x_floor"]) > 0
                flops = {"fwd": 1, "bwd": 3, "fwd+bwd": 4}[r["mode"]] * 2 * case.n * case.m * case.d * case.k
                assert math.isclose(float(r["tflops"]), flops / (float(r["median_ms"]) * 1e-3) / 1e12, rel_tol=1e-4)
                if method.startswith("sdm_triton"):
                    assert "interpreted" in r["note"], r
        for r in sel:
            if r["method"].startswith("sdm_triton") and not triton_runs:
                assert r["status"] == "skipped" and r["note"] and not r["median_ms"], r
        # Inf-CL needs CUDA: recorded as skipped with the reason, never timed.
        infcl = [r for r in sel if r["method"] == "inf_cl"]
        assert infcl and all(r["status"] == "skipped" and r["note"] and not r["median_ms"] for r in infcl)

    assert {r["combine"] for r in rows if r["kl"] == "reverse" and r["labels"] == "pk4"} == {"sum"}
    assert (tmp_path / "time.png").stat().st_size > 0
    table = result.table.splitlines()
    assert table[0].startswith("| case | method | variant | fwd ms (x floor, TFLOP/s)")
    assert "ok vs float64 reference" in result.table
    if INTERPRETED:
        triton_lines = [line for line in table if "| sdm_triton |" in line and "ok vs" in line]
        assert triton_lines and all("interpreted" in line for line in triton_lines)


@pytest.mark.parametrize("argv, bad", [
    (["--methods", "floor,sdm_trtion"], "sdm_trtion"),
    (["--variants", "nope"], "nope"),
    (["--variants", "chunked_m100"], "chunked_m100"),
    (["--preset", "gpu-qick"], "gpu-qick"),
    (["--dtypes", "fp64"], "fp64"),
    (["--modes", "fwdbwd"], "fwdbwd"),
    (["--labels", "pk5"], "pk5"),
    (["--kl", "backward"], "backward"),
    (["--families", "irr"], "irr"),
    (["--sizes", "12y"], "12y"),
])
def test_cli_typos_fail_fast(argv, bad, capsys, tmp_path):
    from bench.__main__ import main
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--out", str(tmp_path / "never")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument" in err and bad in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()


def test_cli_list(capsys):
    from bench.__main__ import main
    assert main(["--preset", "gpu-full", "--list"]) == 0
    out = capsys.readouterr().out
    for label in ("131072x131072x512 bf16 forward pk4", "16384x16384x512 bf16 forward unique",
                  "64x64x512 fp32 reverse pk4 combine=sum K=15", "128x128x512 fp32 reverse pk4 combine=sum",
                  "4096x4096x512 bf16 forward pk4"):
        assert label in out
    assert "formula_compiled" in out and "reference_compiled" in out
    assert main(["--preset", "gpu-latency", "--families", "reid5o", "--galleries", "4", "--list"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "64x64x512 fp32 reverse pk4 combine=sum K=4"
    for name in ("cpu", "gpu-quick", "gpu-latency", "gpu-throughput", "gpu-full"):
        assert PRESETS[name].cases()


def test_api_rejects_unknown_names_before_writing(tmp_path):
    for bad in (dict(methods=("sdm_trtion",)), dict(methods=("floor",), modes=("fwdbwd",)),
                dict(methods=("sdm_triton",), variants=("nope",))):
        cfg = bench.Config(cases=[Case(8, 8, 8, "fp32")], out=tmp_path / "x", device="cpu", verbose=False, **bad)
        with pytest.raises(ValueError):
            bench.run(cfg)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("combine", ["mean", "sum"])
@pytest.mark.parametrize("dense", [False, True])
def test_formula_is_the_loss(kl, combine, dense):
    """The users' formula computes the reference's loss where every row has a positive."""
    case = Case(24, 24, 12, "fp32", kl, "dense" if dense else "pk4", combine=combine)
    inputs = make_inputs(case, torch.device("cpu"))
    q = inputs.q.detach().double().requires_grad_()
    g = inputs.gs[0].detach().double().requires_grad_()
    lk = {k: v.double() if k == "labels" else v for k, v in inputs.label_kwargs().items()}
    want = reference.sdm_loss(q, g, **lk, temperature=0.02, kl=kl, combine=combine)
    dq, dg = torch.autograd.grad(want, (q, g))
    got = M.formula_sdm(q, g, **lk, scale=50.0, kl=kl, combine=combine)
    fq, fg = torch.autograd.grad(got, (q, g))
    assert abs(float(got.detach()) - float(want.detach())) <= 1e-6 * abs(float(want.detach()))   # fp32 S inside the formula
    assert measure.rel_err([fq, fg], [dq, dg]) < 1e-5


def test_formula_peers_tf32_and_compiled(tmp_path, monkeypatch):
    """Both peers pass the gate, run under precision "high" (restored after), K calls summed;
    a case where some row has no positive is skipped with the reason."""
    monkeypatch.setattr(M, "COMPILE_BACKEND", "eager")     # dynamo's wiring without code generation
    monkeypatch.setattr(M, "_COMPILED", {})
    monkeypatch.setattr(M, "_compile_probe", lambda device: None)
    seen = []
    formula = M.formula_sdm

    def spy(*args, **kwargs):
        if not torch.compiler.is_compiling():
            seen.append(torch.get_float32_matmul_precision())
        return formula(*args, **kwargs)
    monkeypatch.setattr(M, "formula_sdm", spy)
    before = torch.get_float32_matmul_precision()
    cases = [Case(16, 16, 16, "fp32", "reverse", "pk4", k=2, combine="sum"), Case(16, 16, 16, "bf16"),
             Case(24, 40, 16, "fp32", "forward", "pk4")]    # pk4 ids 0..5 vs 0..9: columns without a positive
    cfg = bench.Config(cases=cases, methods=("formula_eager", "formula_compiled"), modes=("fwd+bwd",),
                       out=tmp_path, device="cpu", plots=False, cpu_budget_s=0.01, verbose=False)
    rows = bench.run(cfg).rows
    assert torch.get_float32_matmul_precision() == before
    assert seen and set(seen) == {M.FORMULA_PRECISION}
    for case in cases[:2]:
        for method in ("formula_eager", "formula_compiled"):
            (r,) = [r for r in _rows_of(rows, case) if r["method"] == method]
            assert r["status"] == "ok", r
            assert "'high'" in r["note"] and ("torch.compile" in r["note"]) == (method == "formula_compiled")
            assert ("2 calls, summed" in r["note"]) == (case.k == 2)
    skipped = _rows_of(rows, cases[2])
    assert len(skipped) == 2 and all(r["status"] == "skipped" and "positive" in r["note"] for r in skipped)


def test_tf32_gate_only_for_tf32_methods():
    assert measure.tolerances("formula_compiled", 0.0) == (measure.TF32_LOSS_RTOL, measure.TF32_GRAD_RTOL)
    assert measure.tolerances("sdm_triton", 0.0) == (measure.LOSS_RTOL, measure.GRAD_RTOL)


def test_triton_rows_skipped_with_the_reason(tmp_path, monkeypatch):
    case = Case(8, 8, 8, "fp32")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = bench.Config(cases=[case], methods=("sdm_triton",), out=tmp_path, device="cpu", plots=False,
                       verbose=False)
    rows = bench.run(cfg).rows
    assert all(r["status"] == "skipped" and "TRITON_INTERPRET=1" in r["note"] for r in rows)
    monkeypatch.setattr(M, "triton_installed", lambda: False)
    rows = bench.run(cfg).rows
    assert all(r["status"] == "skipped" and "not installed" in r["note"] for r in rows)


@pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU tensors needs the interpreter")
def test_triton_path_and_variants(tmp_path, monkeypatch):
    """The path describe_path reports is noted; a kernel_config variant runs, or is skipped with the reason."""
    calls = []

    def describe_path(q, g, **kwargs):
        calls.append(kwargs)
        return "fake-path"
    monkeypatch.setattr(sdm_triton, "describe_path", describe_path, raising=False)
    cfg = bench.Config(cases=[Case(8, 8, 8, "fp32")], methods=("sdm_triton",), modes=("fwd",),
                       variants=("default", "chunked_m16n16"), out=tmp_path, device="cpu", plots=False,
                       cpu_budget_s=0.01, verbose=False)
    result = bench.run(cfg)
    default, variant = result.rows
    assert default["status"] == "ok" and "path: fake-path" in default["note"] and "interpreted" in default["note"]
    assert "ok vs float64 reference; interpreted; path: fake-path" in result.table
    assert calls[0]["backend"] == "triton" and calls[0]["kl"] == "forward" and "q_ids" in calls[0]
    assert variant["variant"] == "chunked_m16n16"
    assert variant["status"] == "ok" or (variant["status"] == "skipped" and "kernel_config" in variant["note"]), variant


def test_failed_check_is_never_timed(tmp_path, monkeypatch):
    monkeypatch.setattr(measure, "LOSS_RTOL", -1.0)   # nothing can pass
    cfg = bench.Config(cases=[Case(16, 16, 16, "fp32")], methods=("sdm_torch",), out=tmp_path,
                       device="cpu", plots=False, verbose=False)
    rows = bench.run(cfg).rows
    assert len(rows) == 3
    assert all(r["status"] == "FAILED" and r["median_ms"] == "" and r["tflops"] == "" for r in rows)


def test_fp32_truth_fallback_agrees_with_float64():
    """Where the float64 reference would not fit, the gate uses the fp32 chunked backend."""
    case = Case(40, 24, 20, "bf16", "reverse", "pk4", k=2, combine="sum")
    inputs = make_inputs(case, torch.device("cpu"))
    f64 = measure.compute_truth(case, inputs, torch.device("cpu"))
    f32 = measure.compute_truth(case, inputs, torch.device("cpu"), memory_fraction=0.0)
    assert (f64.source, f32.source) == ("float64 reference", "fp32 sdm_torch")
    assert measure.rel_err([f32.loss], [f64.loss]) < 1e-6
    assert measure.rel_err(f32.grads, f64.grads) < 1e-5


def test_outputs_and_revision(tmp_path, monkeypatch):
    """Results go under the current directory; the git revision is the package's own checkout's, or empty."""
    cpu = torch.device("cpu")
    assert report.default_out_dir(cpu, cwd=tmp_path).parent == tmp_path / "sdm_bench_results"
    assert report.default_out_dir(cpu, cwd=REPO).parent == REPO / "bench" / "results"
    monkeypatch.delenv("BENCH_GIT_REV", raising=False)
    monkeypatch.setattr(report, "_package_in", lambda root: False)   # sdm_triton installed elsewhere
    assert report.git_revision() == ""


def _clean_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def test_import_bench_leaves_the_environment_alone():
    code = ("import os, sys, bench; bench.Config; import bench.methods, bench.suite; "
            "print(os.environ.get('TRITON_INTERPRET', 'unset'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_clean_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "unset"


def test_python_m_bench(tmp_path):
    """The entry point sets TRITON_INTERPRET itself when there is no CUDA and prints the table last."""
    out = subprocess.run([sys.executable, "-m", "bench", "--preset", "cpu", "--families", "bf16",
                          "--methods", "sdm_triton", "--modes", "fwd", "--no-plots", "--cpu-budget-s", "0.01",
                          "--out", str(tmp_path)], cwd=REPO, env=_clean_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("| 16x16x32 bf16 forward pk4 | sdm_triton | default |")
    assert "[case 1/1, 0m" in out.stderr
    if not torch.cuda.is_available():
        assert "ok vs float64 reference; interpreted" in lines[-1]


def _count_ops_module():
    spec = importlib.util.spec_from_file_location("count_ops", REPO / "tools" / "count_ops.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_count_ops_counter():
    """Views are not counted, allocations are, and the ATen ops inside a custom op count too."""
    co = _count_ops_module()

    @torch.library.custom_op("bench_smoke::twice_exp", mutates_args=())
    def twice_exp(x: torch.Tensor) -> torch.Tensor:
        return (x * 2).exp()

    a = torch.randn(8, 4, requires_grad=True)
    b = torch.randn(8, 4, requires_grad=True)

    def step():
        ((a * b).t().sum() + twice_exp(b.detach()).sum()).backward()
    c = co.count(step, [a, b], torch.device("cpu"))
    assert c.ops["aten.mul"] >= 3 and c.ops["aten.exp"] == 1 and c.ops["aten.sum"] == 2
    assert c.custom["bench_smoke.twice_exp"] == 1
    assert "aten.t" not in c.ops and c.views["aten.t"] >= 1
    assert sum(c.allocs.values()) >= sum(c.ops.values()) - 2 and c.alloc_bytes > 0
    assert not c.syncs and not c.launches
    assert "ATen ops that launch work" in co.table({"step": c})


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_a_small_step_allocates_six_storages(kl):
    """Issue 28's target: a forward + backward of sdm_loss at training sizes (the fused
    backward) allocates at most six new storages: the forward's fp32 buffers in one
    (launch/forward.forward), the loss and the rows' validity, dq and dg, and the gradient seed
    of ``.backward()``; four launches, no host synchronisation (CPU: interpreted kernels; on a
    GPU the same step, tools/count_ops.py)."""
    import sdm_triton
    from sdm_triton.dispatch import _triton_importable
    if not _triton_importable():
        pytest.skip("needs triton")
    co = _count_ops_module()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not INTERPRETED:
        pytest.skip("CPU tensors take the Triton backend only under TRITON_INTERPRET=1")
    gen = torch.Generator().manual_seed(0)
    q, g = (torch.randn(32, 16, generator=gen).to(device, torch.bfloat16).requires_grad_() for _ in range(2))
    ids = (torch.arange(32) // 4).to(device)

    def step():
        sdm_triton.sdm_loss(q, g, ids, ids, kl=kl, backend="triton").backward()
    c = co.count(step, [q, g], device)
    assert sum(c.allocs.values()) <= 6, c.allocs
    assert sum(c.launches.values()) == 4 and not c.syncs, (c.launches, c.syncs)


def test_formula_autocast_reports_its_bf16_error_without_gating(tmp_path, monkeypatch):
    """formula_autocast (issue 27's peer): the formula under torch.autocast(bfloat16), compiled;
    its error against float64 is reported in the rows and the table, gates nothing (only a
    non-finite result fails it), and is the bf16 logits' (far above the fp32 formula's)."""
    monkeypatch.setattr(M, "COMPILE_BACKEND", "eager")     # dynamo's wiring without code generation
    monkeypatch.setattr(M, "_COMPILED", {})
    monkeypatch.setattr(M, "_compile_probe", lambda device: None)
    case = Case(16, 16, 16, "fp32", "forward", "pk4")
    cfg = bench.Config(cases=[case], methods=("formula_eager", "formula_autocast"), modes=("fwd+bwd",),
                       out=tmp_path, device="cpu", plots=False, cpu_budget_s=0.01, verbose=False)
    result = bench.run(cfg)
    rows = {r["method"]: r for r in _rows_of(result.rows, case)}
    auto, eager = rows["formula_autocast"], rows["formula_eager"]
    assert auto["status"] == "ok" and "autocast" in auto["note"] and "torch.compile" in auto["note"], auto
    assert float(auto["loss_rel_err"]) > 100 * max(float(eager["loss_rel_err"]), 1e-9), (auto, eager)
    assert float(auto["loss_rel_err"]) > measure.LOSS_RTOL          # it would fail the package's gate
    line = [ln for ln in result.table.splitlines() if "formula_autocast" in ln][0]
    assert "not gated" in line and "error vs" in line, line

    finite = measure.Truth(torch.tensor(1.0, dtype=torch.float64), [torch.ones(2, dtype=torch.float64)], "t")

    class Broken:
        def loss_and_grads(self):
            return torch.tensor(float("nan")), [torch.ones(2)]
    assert not measure.check("formula_autocast", Broken(), finite, case).ok
