"""Compile every Triton kernel of sdm_triton for a GPU target without a GPU, and report
registers, spills and shared memory: catches compile errors and register pressure at no
device time. ``python3 tools/compile_check.py [--arch 90]`` (PYTHONPATH=<triton 3.6 folder>
compiles with another Triton version)."""

from __future__ import annotations

import argparse
import itertools
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sdm_triton.kernels import centroids, finish, grad, prep, single, stats  # noqa: E402

FEAT = {"q_ptr", "g_ptr", "a_ptr", "b_ptr", "x_ptr"}
F32_PTRS = {"pre_ptr", "lab_ptr", "out_ptr", "part_ptr", "rows_ptr", "saved_ptr", "red_ptr", "value_ptr",
            "scale_ptr", "dv_ptr", "drows_ptr", "dscale_ptr", "w_ptr", "gmax_ptr", "u_ptr", "u2_ptr",
            "a_r_ptr", "b_r_ptr", "r_ptr", "lin_ptr", "cnt_ptr", "sums_ptr"}
F64_PTRS = {"c_ptr"}
I64_PTRS = {"ids_ptr", "srt_ptr"}      # launch/positives.py: ids as int64, sorted
I32_PTRS = {"before_ptr", "rank_ptr", "count_ptr"}
BOOL_PTRS = {"q_msk", "g_msk", "msk", "valid_ptr", "a_msk", "b_msk"}
#: The ids' pointer type: "*i64", or the job's ``consts["_ids"]`` (not a kernel parameter): "*i32",
#: the ranks of launch/positives.py.
ID_PTRS = {"q_ids", "g_ids"}


#: Scalar argument types a launch may give the kernels: eager launches type a Python float as fp32
#: (fp64 only when it does not fit) and an int as i32 (i64 past 2^31); Inductor, launching them
#: inside a compiled graph, types every float as fp64 and may pass i64 integers. "constants":
#: every scalar a compile-time constant, as torch <= 2.11 compiles a kernel to find which tensors
#: it writes (identify_mutated_tensors): a kernel that calls ``.to()`` on a scalar argument fails
#: there, and Inductor logs a traceback and assumes every input mutated (issue 26).
SCALARS = {"eager": ("fp32", "i32"), "inductor": ("fp64", "i64"), "constants": (0.5, 2)}


def signature(kernel, dtype: str, consts: dict, nones=(), scalars: str = "eager"):
    float_t, int_t = SCALARS[scalars]
    sig, cx = {}, {}
    for p in kernel.params:
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
            cx[name] = consts[name]
        elif name in nones:
            sig[name] = "constexpr"
            cx[name] = None
        elif name in FEAT or name in ("dq_ptr", "dg_ptr") or (name == "out_ptr" and kernel.fn.__name__ != "_stats_kernel"):
            sig[name] = "*" + dtype
        elif name == "ws_ptr":     # W's workspace: the input dtype (fp32 W, hi + lo), or fp16 W (W_FP16)
            sig[name] = "*fp16" if consts.get("W_FP16") else "*" + dtype
        elif name in F32_PTRS:
            sig[name] = "*fp32"
        elif name in F64_PTRS:
            sig[name] = "*fp64"
        elif name in I64_PTRS:
            sig[name] = "*i64"
        elif name in I32_PTRS:
            sig[name] = "*i32"
        elif name in BOOL_PTRS:
            sig[name] = "*i1"
        elif name in ID_PTRS:
            sig[name] = consts.get("_ids", "*i64")
        elif name == "lab":
            sig[name] = "*fp32"
        elif name in ("scale_value", "eps", "coef_q", "coef_g"):
            sig[name] = float_t
        else:
            sig[name] = int_t
        if not isinstance(sig[name], str):      # "constants": the value, as a constexpr
            cx[name], sig[name] = sig[name], "constexpr"
    return sig, cx


def compile_one(kernel, dtype, consts, nones, target, num_warps, num_stages, scalars="eager"):
    sig, cx = signature(kernel, dtype, consts, nones, scalars)
    src = ASTSource(fn=kernel, signature=sig, constexprs=cx)
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=target, options=opts)


def resources(k):
    """(registers, spill bytes, shared memory) read from the cubin with the cuobjdump Triton ships."""
    import re
    import subprocess
    import tempfile
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    reg = re.search(r"REG:(\d+)", text)
    spill = re.search(r"STACK:(\d+)", text)
    return (int(reg.group(1)) if reg else -1, int(spill.group(1)) if spill else -1, k.metadata.shared)


def root_cause(exc) -> str:
    while exc.__cause__ is not None or (exc.__context__ is not None and "CompilationError" in type(exc).__name__):
        nxt = exc.__cause__ or exc.__context__
        if nxt is None:
            break
        exc = nxt
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1][:160] if text else ''}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--sweep", action="store_true", help="tile shapes of the large-problem kernels")
    ap.add_argument("--scalars", action="store_true",
                    help="only: every kernel once per scalar typing (eager and Inductor's), small tiles")
    ap.add_argument("--typings", default=",".join(SCALARS), help="with --scalars: which typings (eager,inductor,constants)")
    ap.add_argument("--only", default="", help="the default run, only the jobs whose name starts with this")
    args = ap.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    if args.sweep:
        sweep(target)
        return 0
    if args.scalars:
        return scalar_typings(target, args.typings.split(","))
    tl = triton.language
    half = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}
    rows = []
    for dtype, reverse, dense in itertools.product(["bf16", "fp32"], [False, True], [False, True]):
        common = dict(REVERSE=reverse, DENSE=dense, UPCAST=False, DOT_PRECISION="ieee",
                      INDEX=tl.int64 if dense else tl.int32)
        nones = ("lab",) if not dense else ("q_ids", "g_ids")
        jobs = [
            ("prep", prep._prep_kernel, dict(NORMALIZE=True, DENSE=dense, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), 4, 1,
             nones + ("q_msk", "g_msk")),
            ("stats128", stats._stats_kernel, dict(common, WANT_POS=reverse, LOOP_IDS=True, LOOP_TERMS=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
             8, 3, nones + ("q_msk", "g_msk", "scale_ptr")),
            ("stats256", stats._stats_kernel, dict(common, WANT_POS=reverse, LOOP_IDS=True, LOOP_TERMS=True, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64),
             8, 3, nones + ("q_msk", "g_msk", "scale_ptr")),
            ("stats32", stats._stats_kernel, dict(common, WANT_POS=reverse, LOOP_IDS=True, LOOP_TERMS=True, BLOCK_M=32, BLOCK_N=32,
             BLOCK_K=64), 4, 2, nones + ("scale_ptr",)),
            ("finish", finish._finish_kernel, dict(REVERSE=reverse, DENSE=dense, WANT_Q2G=True, WANT_G2Q=True, MEAN=True,
             COMBINE_MEAN=True, STATS=True, WANT_POS=True, INTERPRETED=False, BLOCK=1024), 4, 1,
             ("q_msk", "g_msk", "scale_ptr")),
            # the forward in one launch (kernels/single.py) at the "small" statistics tiles
            ("single32", single._single_forward_kernel, dict(common, WANT_POS=reverse, WANT_Q2G=True, WANT_G2Q=True,
             MEAN=True, COMBINE_MEAN=True, STATS=True, NORMALIZE=True, BLOCK_M=32, BLOCK_N=32, BLOCK_K=64,
             BLOCK_KP=64), 4, 2, nones + ("scale_ptr",)),
            ("single32_nomsk", single._single_forward_kernel, dict(common, WANT_POS=reverse, WANT_Q2G=True,
             WANT_G2Q=True, MEAN=True, COMBINE_MEAN=True, STATS=False, NORMALIZE=True, BLOCK_M=32, BLOCK_N=32,
             BLOCK_K=64, BLOCK_KP=64), 4, 2, nones + ("q_msk", "g_msk", "scale_ptr")),
            ("fused_d512", grad._fused_grad_kernel, dict(common, MEAN=True, NORMALIZE=True, WANT_DSCALE=True,
             SCALE_W=False, HALF=half[dtype], IS_FP32=dtype == "fp32", W_FP16=False, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64,
             BLOCK_D=512, BLOCK_W=256), 4, 1,
             nones + ("drows_ptr",)),
            # a gradient not asked for: its pointer is None and its branch must still compile
            ("fused_nodg", grad._fused_grad_kernel, dict(common, MEAN=True, NORMALIZE=True, WANT_DSCALE=True,
             SCALE_W=False, HALF=half[dtype], IS_FP32=dtype == "fp32", W_FP16=False, BLOCK_M=16, BLOCK_N=32,
             BLOCK_K=64, BLOCK_D=128, BLOCK_W=256), 4, 1, nones + ("drows_ptr", "dg_ptr")),
            ("fused_nodq", grad._fused_grad_kernel, dict(common, MEAN=True, NORMALIZE=True, WANT_DSCALE=False,
             SCALE_W=dtype == "fp16", HALF=half[dtype], IS_FP32=dtype == "fp32", W_FP16=False, BLOCK_M=16,
             BLOCK_N=32, BLOCK_K=64, BLOCK_D=128, BLOCK_W=256), 4, 1, nones + ("dv_ptr", "dq_ptr", "dscale_ptr")),
            ("chunk128", grad._grad_chunk_kernel, dict(common, WANT_DSCALE=False, HALF=half[dtype],
             IS_FP32=dtype == "fp32", W_FP16=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), 8, 3,
             nones + ("q_msk", "g_msk", "gmax_ptr", "scale_ptr")),
        ]
        if dtype != "fp32":   # KernelConfig.w_dtype="fp16" (issue 27): W rounded once to fp16, one
            # product per side, gmax scaling it (SCALE_W; the chunked kernel's gmax_ptr given)
            jobs += [("fused_d512_wfp16", grad._fused_grad_kernel, dict(common, MEAN=True, NORMALIZE=True,
                      WANT_DSCALE=True, SCALE_W=True, HALF=half[dtype], IS_FP32=False, W_FP16=True, BLOCK_M=16,
                      BLOCK_N=32, BLOCK_K=64, BLOCK_D=512, BLOCK_W=256), 4, 1, nones + ("drows_ptr",)),
                     ("chunk128_wfp16", grad._grad_chunk_kernel, dict(common, WANT_DSCALE=False, HALF=half[dtype],
                      IS_FP32=False, W_FP16=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), 8, 3,
                      nones + ("q_msk", "g_msk", "scale_ptr")),
                     # the tile table's shape for large half problems (launch/policy.py)
                     ("chunk64x128", grad._grad_chunk_kernel, dict(common, WANT_DSCALE=False, HALF=half[dtype],
                      IS_FP32=False, W_FP16=False, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64), 4, 4,
                      nones + ("q_msk", "g_msk", "gmax_ptr", "scale_ptr"))]
        if not dense and not reverse:   # forward KL's positives' logit sums from identity centroids
            # (name suffixes: m, a mask given; s, a scale tensor given)
            jobs += [("centroid_sums" + ("" if nn else "m"), centroids._centroid_sums_kernel,
                      dict(BLOCK_M=32, BLOCK_D=64), 4, 1, nn) for nn in (("msk",), ())]
            # positives: m, a row mask; s, a scale tensor; b, a column mask (present counts before
            # each sorted position); c, counts alone (reverse KL)
            jobs += [("positives" + ("" if "msk" in nn else "m") + ("" if "scale_ptr" in nn else "s")
                      + ("" if "before_ptr" in nn else "b"),
                      centroids._positives_kernel, dict(WANT_LIN=True, BLOCK_M=32, BLOCK_D=64), 4, 1, nn)
                     for nn in (("msk", "scale_ptr", "before_ptr"), ("scale_ptr", "before_ptr"), ())]
            jobs += [("positives_c", centroids._positives_kernel, dict(WANT_LIN=False, BLOCK_M=32, BLOCK_D=64), 4, 1,
                      ("x_ptr", "msk", "r_ptr", "c_ptr", "lin_ptr", "scale_ptr", "before_ptr")),
                     ("ranks", centroids._ranks_kernel, dict(BLOCK=1024), 4, 1, ())]
        if not dense:   # the centroid path (issue 27): no label terms in the loop; reverse KL's
            # negatives' mass from a compare of int32 ranks
            jobs += [(name + "c", kernel, dict(consts, LOOP_IDS=reverse, LOOP_TERMS=False, _ids="*i32"), w, s, nn)
                     for name, kernel, consts, w, s, nn in jobs if name.startswith("stats")]
        for name, kernel, consts, w, s, nn in jobs:
            if not name.startswith(args.only):
                continue
            try:
                k = compile_one(kernel, dtype, consts, nn, target, w, s)
                rows.append((name, dtype, reverse, dense, *resources(k), "ok"))
            except Exception as exc:  # noqa: BLE001
                rows.append((name, dtype, reverse, dense, "-", "-", "-", "FAILED " + root_cause(exc)))
                if os.environ.get("VERBOSE"):
                    import traceback
                    traceback.print_exc()
    for name, kernel, consts in [("weights", grad._weights_kernel, dict(MEAN=True, BLOCK=1024)),
                                 ("operand", grad._operand_kernel, dict(BLOCK_M=32, BLOCK_D=128)),
                                 ("input_grad", grad._input_grad_kernel, dict(NORMALIZE=True, BLOCK_M=32, BLOCK_D=128))]:
        try:
            k = compile_one(kernel, "bf16", consts, (), target, 4, 1)
            rows.append((name, "bf16", "-", "-", *resources(k), "ok"))
        except Exception as exc:  # noqa: BLE001
            rows.append((name, "bf16", "-", "-", "-", "-", "-", "FAILED " + root_cause(exc)))
    print(f"triton {triton.__version__}, sm_{args.arch}")
    print(f"{'kernel':16s} {'dtype':5s} {'rev':5s} {'dense':5s} {'regs':>5s} {'stack':>5s} {'smem':>7s}  status")
    for r in rows:
        print(f"{r[0]:16s} {r[1]:5s} {str(r[2]):5s} {str(r[3]):5s} {str(r[4]):>5s} {str(r[5]):>5s} {str(r[6]):>7s}  {r[7]}")
    return 1 if any(r[7] != "ok" for r in rows) else 0



def scalar_jobs(dtype: str, reverse: bool, dense: bool):
    """(name, kernel, constexprs, warps, stages, None pointers) for every kernel, small tiles, and
    each optional pointer both given and None (a scalar's type may differ from the value loaded
    through the pointer in its place: the branch that replaces it must keep the type)."""
    tl = triton.language
    half = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[dtype]
    common = dict(REVERSE=reverse, DENSE=dense, UPCAST=False, DOT_PRECISION="ieee", INDEX=tl.int32)
    labels = ("lab",) if not dense else ("q_ids", "g_ids")
    bwd = dict(common, MEAN=True, NORMALIZE=True, WANT_DSCALE=True, HALF=half, IS_FP32=dtype == "fp32", W_FP16=False)
    # KernelConfig.w_dtype="fp16" (half inputs only): W rounded once to fp16, scaled by gmax
    wfp16 = [] if dtype == "fp32" else [
        ("fused_wfp16", grad._fused_grad_kernel, dict(bwd, W_FP16=True, SCALE_W=True, BLOCK_M=16, BLOCK_N=32,
         BLOCK_K=32, BLOCK_D=64, BLOCK_W=256), 4, 1, labels + ("drows_ptr", "scale_ptr")),
        ("chunk_wfp16", grad._grad_chunk_kernel, dict(bwd, W_FP16=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), 4, 2,
         labels + ("scale_ptr",)),
    ]
    return wfp16 + [
        ("prep", prep._prep_kernel, dict(NORMALIZE=True, DENSE=dense, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16), 4, 1,
         labels),
        ("stats", stats._stats_kernel, dict(common, WANT_POS=True, LOOP_IDS=True, LOOP_TERMS=True, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32),
         4, 2, labels + ("scale_ptr",)),
        ("stats_ls", stats._stats_kernel, dict(common, WANT_POS=True, LOOP_IDS=True, LOOP_TERMS=True, BLOCK_M=32, BLOCK_N=32,
         BLOCK_K=32), 4, 2, labels + ("q_msk", "g_msk")),
        ("stats_neg", stats._stats_kernel, dict(common, WANT_POS=True, LOOP_IDS=not dense, LOOP_TERMS=dense,
         BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, _ids="*i32"), 4, 2, labels + ("scale_ptr",)),
        ("stats_lse", stats._stats_kernel, dict(common, WANT_POS=False, LOOP_IDS=False, LOOP_TERMS=False, BLOCK_M=32, BLOCK_N=32,
         BLOCK_K=32), 4, 2, labels + ("scale_ptr",)),
        ("finish", finish._finish_kernel, dict(REVERSE=reverse, DENSE=dense, WANT_Q2G=True, WANT_G2Q=True, MEAN=True,
         COMBINE_MEAN=True, STATS=True, WANT_POS=True, BLOCK=256), 4, 1, ("scale_ptr",)),
        ("single", single._single_forward_kernel, dict(common, WANT_POS=True, WANT_Q2G=True, WANT_G2Q=True, MEAN=True,
         COMBINE_MEAN=True, STATS=True, NORMALIZE=True, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, BLOCK_KP=32), 4, 2,
         labels + ("scale_ptr",)),
        ("single_ls", single._single_forward_kernel, dict(common, WANT_POS=False, WANT_Q2G=True, WANT_G2Q=False,
         MEAN=False, COMBINE_MEAN=False, STATS=False, NORMALIZE=False, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32,
         BLOCK_KP=32), 4, 2, labels + ("q_msk", "g_msk")),
        ("finish_ls", finish._finish_kernel, dict(REVERSE=reverse, DENSE=dense, WANT_Q2G=True, WANT_G2Q=True,
         MEAN=False, COMBINE_MEAN=False, STATS=False, WANT_POS=False, BLOCK=256), 4, 1, ("q_msk", "g_msk")),
        ("fused", grad._fused_grad_kernel, dict(bwd, SCALE_W=dtype == "fp16", BLOCK_M=16, BLOCK_N=32, BLOCK_K=32,
         BLOCK_D=64, BLOCK_W=256), 4, 1, labels + ("drows_ptr", "scale_ptr")),
        ("fused_ls", grad._fused_grad_kernel, dict(bwd, SCALE_W=False, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32,
         BLOCK_D=64, BLOCK_W=256), 4, 1, labels + ("dv_ptr", "dg_ptr")),
        # rows not normalised: fp16 W's bound walks the rows' scale factors (grad.scale_product_bound)
        ("fused_raw", grad._fused_grad_kernel, dict(bwd, NORMALIZE=False, SCALE_W=dtype == "fp16", BLOCK_M=16,
         BLOCK_N=32, BLOCK_K=32, BLOCK_D=64, BLOCK_W=256), 4, 1, labels + ("drows_ptr", "scale_ptr")),
        ("chunk", grad._grad_chunk_kernel, dict(bwd, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), 4, 2,
         labels + ("gmax_ptr", "scale_ptr")),
        ("chunk_ls", grad._grad_chunk_kernel, dict(bwd, WANT_DSCALE=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), 4, 2,
         labels + ("q_msk", "g_msk", "dscale_ptr")),
        ("weights", grad._weights_kernel, dict(MEAN=True, BLOCK=256), 4, 1, ("drows_ptr",)),
        ("centroid_sums", centroids._centroid_sums_kernel, dict(BLOCK_M=16, BLOCK_D=16), 4, 1, ()),
        ("positives", centroids._positives_kernel, dict(WANT_LIN=True, BLOCK_M=16, BLOCK_D=16), 4, 1,
         ("scale_ptr", "before_ptr")),
        ("ranks", centroids._ranks_kernel, dict(BLOCK=16), 4, 1, ()),
        ("operand", grad._operand_kernel, dict(BLOCK_M=32, BLOCK_D=64), 4, 1, ()),
        ("input_grad", grad._input_grad_kernel, dict(NORMALIZE=True, BLOCK_M=32, BLOCK_D=64), 4, 1,
         ("u2_ptr", "scale_ptr")),
        ("input_grad_ls", grad._input_grad_kernel, dict(NORMALIZE=True, BLOCK_M=32, BLOCK_D=64), 4, 1,
         ("gmax_ptr", "msk")),
    ]


def scalar_typings(target, typings=tuple(SCALARS)) -> int:
    """Every kernel compiled with the scalar types of eager launches and of Inductor's (fp64
    floats, i64 integers): a loop-carried value whose type follows a scalar argument must not
    change type (issue 18: ``m`` became fp64 inside the statistics loop under torch.compile);
    and with every scalar a constant (`SCALARS`, issue 26)."""
    failed = 0
    print(f"triton {triton.__version__}: scalar typings")
    for scalars, (dtype, reverse, dense) in itertools.product(
            typings, [("bf16", True, False), ("fp16", False, False), ("fp32", False, True)]):
        for name, kernel, consts, w, s, nones in scalar_jobs(dtype, reverse, dense):
            try:
                compile_one(kernel, dtype, consts, nones, target, w, s, scalars)
                status = "ok"
            except Exception as exc:  # noqa: BLE001
                failed += 1
                status = "FAILED " + root_cause(exc)
            print(f"{scalars:9s} {name:14s} {dtype:5s} rev={reverse!s:5s} dense={dense!s:5s} {status}", flush=True)
    print(f"{failed} failed")
    return 1 if failed else 0


def sweep(target):
    """Registers / stack of the large-problem kernels over tile shapes (bf16, forward KL, ids):
    the statistics kernel with the ids in its loop ("stats") and without ("stats_lse", issue 27)."""
    tl = triton.language
    common = dict(REVERSE=False, DENSE=False, UPCAST=False, DOT_PRECISION="ieee", INDEX=tl.int32)
    nones = ("lab", "q_msk", "g_msk", "scale_ptr")
    print(f"triton {triton.__version__}: kernel (BM, BN, BK, warps, stages) -> (regs, stack bytes, smem)")
    for cfg in [(128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4),
                (128, 64, 64, 8, 3), (64, 128, 64, 4, 3), (256, 128, 64, 8, 3)]:
        bm, bn, bk, w, s = cfg
        for label, loop_ids in (("stats", True), ("stats_lse", False)):
            k = compile_one(stats._stats_kernel, "bf16", dict(common, WANT_POS=False, LOOP_IDS=loop_ids, LOOP_TERMS=loop_ids, BLOCK_M=bm,
                            BLOCK_N=bn, BLOCK_K=bk), nones, target, w, s)
            print(label, cfg, resources(k))
    for cfg in [(128, 128, 64, 8, 3), (128, 64, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3),
                (64, 64, 64, 4, 3), (128, 128, 64, 8, 2), (64, 128, 64, 8, 3)]:
        bm, bn, bk, w, s = cfg
        for w_fp16 in (False, True):     # hi + lo halves, or W rounded once to fp16 (KernelConfig.w_dtype)
            k = compile_one(grad._grad_chunk_kernel, "bf16", dict(common, WANT_DSCALE=False, HALF=tl.bfloat16,
                            IS_FP32=False, W_FP16=w_fp16, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk),
                            nones + (() if w_fp16 else ("gmax_ptr",)), target, w, s)
            print("chunk" + ("_wfp16" if w_fp16 else ""), cfg, resources(k))
    for cfg in [(16, 32, 512, 4, 1), (16, 64, 512, 4, 1), (32, 32, 512, 4, 1), (16, 32, 512, 4, 2), (32, 32, 512, 8, 1),
                (64, 32, 128, 4, 1), (32, 64, 128, 4, 2)]:
        bm, bn, bd, w, s = cfg
        for w_fp16 in (False, True):
            k = compile_one(grad._fused_grad_kernel, "bf16", dict(common, MEAN=True, NORMALIZE=True, WANT_DSCALE=False,
                            SCALE_W=w_fp16, HALF=tl.bfloat16, IS_FP32=False, W_FP16=w_fp16, BLOCK_M=bm, BLOCK_N=bn,
                            BLOCK_K=64, BLOCK_D=bd, BLOCK_W=256),
                            ("lab", "q_msk", "g_msk", "scale_ptr", "drows_ptr"), target, w, s)
            print("fused" + ("_wfp16" if w_fp16 else ""), cfg, resources(k))


if __name__ == "__main__":
    sys.exit(main())
