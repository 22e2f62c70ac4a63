"""One device call that checks the kernels and times one design step (bench/NOTES.md).

    python3 tools/gpu_probe.py --out $OUT [--parts correct,yard,fwd,full,small]

correct  every path (fused / chunked backward, fp32 / bf16 / fp16, ids / dense labels, masks,
         reverse KL, K galleries, odd sizes) against the float64 reference: max relative errors
         of loss and gradients beside PyTorch's own fp32 error on the same inputs
yard     ../shared/yardsticks/lse_pass.py (row log-sum-exp pass) and cuBLAS Q @ G^T
fwd      the forward (both statistics passes) per tile shape: ms and TFLOP/s (2 matmuls)
full     forward + backward per backward variant at large N, with the four-matmul floor
small    forward + backward at training sizes (IRRA fp32 reverse sum; bf16 forward), with the
         ten-line formula eager and compiled, and a CUDA-graph replay of one step

Prints a short table per part; everything also goes to <out>/probe.log.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sdm_triton  # noqa: E402
from sdm_triton import reference  # noqa: E402

LOG_PATH = [None]


def log(*args):
    """Print and append to <out>/probe.log at once (a run cut off by its time limit keeps its lines)."""
    line = " ".join(str(a) for a in args)
    print(line, flush=True)
    if LOG_PATH[0]:
        with open(LOG_PATH[0], "a") as f:
            f.write(line + "\n")


def rel(a, b):
    if a is None or b is None:
        return 0.0
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def bench_ms(fn, rep=200):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def problem(n, m, d, dtype, seed, dense=False, masks=False, k=1, dev="cuda"):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(n, d, generator=gen) * torch.exp(torch.rand(n, 1, generator=gen) * 2 - 1)).to(dev, dtype)
    g = torch.randn(k, m, d, generator=gen).to(dev, dtype) if k > 1 else torch.randn(m, d, generator=gen).to(dev, dtype)
    kw = {}
    if dense:
        lab = torch.rand((k, n, m) if k > 1 else (n, m), generator=gen)
        kw["labels"] = torch.where(lab > 0.8, lab, torch.zeros_like(lab)).to(dev)
    else:
        kw["q_ids"] = (torch.arange(n) // 4)[torch.randperm(n, generator=gen)].to(dev)
        kw["g_ids"] = (torch.arange(m) // 4)[torch.randperm(m, generator=gen)].to(dev)
    if masks:
        kw["q_mask"] = (torch.rand(n, generator=gen) > 0.2).to(dev)
        kw["g_mask"] = (torch.rand((k, m) if k > 1 else (m,), generator=gen) > 0.2).to(dev)
    return q, g, kw


def run(fn, q, g, kw, scale=20.0, multi=False):
    qa, ga = q.clone().requires_grad_(), g.clone().requires_grad_()
    ls = torch.tensor(scale, device=q.device, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                      requires_grad=True)
    out = fn(qa, ga, logit_scale=ls, **kw)
    tot = out.double().sum() if multi else out.double() * 1.5
    tot.backward()
    return tot.detach(), qa.grad, ga.grad, ls.grad


def part_correct(subset=False):
    log("== correct: max relative error vs float64 (ours / PyTorch fp32 reference on the same inputs)")
    cases = []
    if subset:   # what failed before (dense labels, masks, reverse KL, column segments), and a bf16 baseline
        for path in ("fused", "chunked"):
            cases += [(torch.bfloat16, 513, 300, 256, path, True, True, "reverse", 1),
                      (torch.float32, 513, 300, 256, path, True, True, "reverse", 1),
                      (torch.bfloat16, 1031, 700, 96, path, False, True, "forward", 1),
                      (torch.bfloat16, 300, 457, 512, path, True, True, "forward", 3)]
    for dtype in (() if subset else (torch.bfloat16, torch.float32, torch.float16)):
        for (n, m, d) in ((300, 457, 512), (1031, 700, 96), (64, 64, 512), (129, 1, 77)):
            for path in ("fused", "chunked"):
                cases.append((dtype, n, m, d, path, False, False, "forward", 1))
    for dtype in (() if subset else (torch.bfloat16, torch.float32)):
        for path in ("fused", "chunked"):
            cases += [(dtype, 513, 300, 256, path, True, True, "reverse", 1),
                      (dtype, 200, 333, 128, path, False, True, "reverse", 1),
                      (dtype, 96, 64, 512, path, False, True, "reverse", 3),
                      (dtype, 2049, 1500, 512, path, True, False, "forward", 1)]
    worst = 0.0
    for dtype, n, m, d, path, dense, masks, kl, k in cases:
        try:
            q, g, kw = problem(n, m, d, dtype, seed=n + m, dense=dense, masks=masks, k=k)
            multi = k > 1
            fn = sdm_triton.sdm_loss_multi if multi else sdm_triton.sdm_loss
            rf = reference.sdm_loss_multi if multi else reference.sdm_loss
            ours = run(lambda *a, **x: fn(*a, backend="triton", kernel_config=path, kl=kl, **x), q, g, kw, multi=multi)
            kw64 = {a: (b.double() if a == "labels" else b) for a, b in kw.items()}
            truth = run(lambda *a, **x: rf(*a, kl=kl, **x), q.double(), g.double(), kw64, multi=multi)
            kw32 = {a: (b.float() if a == "labels" else b) for a, b in kw.items()}
            base = run(lambda *a, **x: rf(*a, kl=kl, **x), q.float(), g.float(), kw32, multi=multi)
            e = [rel(a, b) for a, b in zip(ours, truth)]
            eb = [rel(a, b) for a, b in zip(base, truth)]
            slack = 2e-6 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps / 2
            bad = [i for i in range(4) if not (e[i] <= 4 * eb[i] + (1e-5 if i == 3 else (2e-6 if i == 0 else slack)))]
            finite = all(bool(torch.isfinite(x).all()) for x in ours)
            flag = "ok" if (not bad and finite) else f"BAD {bad} finite={finite}"
            worst = max(worst, max(e[:3]))
            log(f"{str(dtype)[6:]:8s} {n:5d}x{m:5d}x{d:4d} K={k} {path:7s} dense={dense!s:5s} masks={masks!s:5s} {kl:7s} "
                f"ours {' '.join(f'{x:.1e}' for x in e)}  fp32-ref {' '.join(f'{x:.1e}' for x in eb)}  {flag}")
        except Exception as exc:  # noqa: BLE001
            log(f"{dtype} {n}x{m}x{d} {path} FAILED {type(exc).__name__}: {str(exc)[:300]}")
            traceback.print_exc()


def part_yard():
    log("== yardstick")
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "..", ".yard"), os.path.join(here, "..", "shared", "yardsticks"),
                 os.path.join(here, "..", "..", "shared", "yardsticks")):
        if os.path.isdir(cand):
            sys.path.insert(0, cand)
    try:
        import lse_pass
        for n in (16384, 32768):
            q = torch.randn(n, 512, device="cuda", dtype=torch.bfloat16)
            g = torch.randn(n, 512, device="cuda", dtype=torch.bfloat16)
            rq, rg = q.float().norm(dim=1).reciprocal(), g.float().norm(dim=1).reciprocal()
            lse_pass.lse(q, g, rq, rg, 50.0)
            t = bench_ms(lambda: lse_pass.lse(q, g, rq, rg, 50.0))
            tm = bench_ms(lambda: q @ g.T)
            tf = 2 * n * n * 512 / 1e12
            log(f"yardstick N={n}: row-lse {t:.3f} ms ({tf / t * 1e3:.0f} TFLOP/s), cuBLAS {tm:.3f} ms "
                f"({tf / tm * 1e3:.0f} TFLOP/s), ratio {t / tm:.2f}, best {lse_pass.row_lse.best_config}")
    except Exception as exc:  # noqa: BLE001
        log(f"yardstick FAILED {type(exc).__name__}: {exc}")


# The yardstick's kernel with one feature of the statistics pass added (a fixed 128x256 tile):
# int64 offsets (I64); an ids compare and the masked sum of the positives' logits (IDS).
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def lse_var(a, b, ra, rb, ai_ptr, bi_ptr, out, out2, N, M, D, scale_log2e,
            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, I64: tl.constexpr, IDS: tl.constexpr):
    pid = tl.program_id(0)
    if I64:
        offs_m = pid.to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
    else:
        offs_m = pid * BM + tl.arange(0, BM)
    rmask = offs_m < N
    r = tl.load(ra + offs_m, mask=rmask, other=0.0) * scale_log2e
    ai = tl.load(ai_ptr + offs_m, mask=rmask, other=0)
    m = tl.full((BM,), -1e30, tl.float32)
    l = tl.zeros((BM,), tl.float32)
    lin = tl.zeros((BM,), tl.float32)
    for n0 in range(0, M, BN):
        if I64:
            offs_n = n0 + tl.arange(0, BN).to(tl.int64)
        else:
            offs_n = n0 + tl.arange(0, BN)
        cmask = offs_n < M
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, D, BK):
            offs_k = k0 + tl.arange(0, BK)
            x = tl.load(a + offs_m[:, None] * D + offs_k[None, :], mask=rmask[:, None], other=0.0)
            y = tl.load(b + offs_n[None, :] * D + offs_k[:, None], mask=cmask[None, :], other=0.0)
            acc = tl.dot(x, y, acc)
        c = tl.load(rb + offs_n, mask=cmask, other=0.0)
        t = acc * c[None, :] * r[:, None]
        t = tl.where(cmask[None, :], t, -1e30)
        if IDS:
            bi = tl.load(bi_ptr + offs_n, mask=cmask, other=-1)
            lin += tl.sum(tl.where(ai[:, None] == bi[None, :], t, 0.0), 1)
        m_new = tl.maximum(m, tl.max(t, 1))
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(t - m_new[:, None]), 1)
        m = m_new
    tl.store(out + offs_m, (m + tl.log2(l)) * 0.6931471805599453, mask=rmask)
    tl.store(out2 + offs_m, lin, mask=rmask)


def part_yardvar(sizes):
    log("== yardstick + one feature (128x256x64, 8 warps, 3 stages)")
    kern = lse_var
    for n in sizes:
        q = torch.randn(n, 512, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(n, 512, device="cuda", dtype=torch.bfloat16)
        rq, rg = q.float().norm(dim=1).reciprocal(), g.float().norm(dim=1).reciprocal()
        ids = torch.arange(n, device="cuda") // 4
        out, out2 = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
        tf = 2 * n * n * 512 / 1e12
        for i64, use_ids in ((False, False), (True, False), (False, True)):
            def f():
                kern[(triton.cdiv(n, 128),)](q, g, rq, rg, ids, ids, out, out2, n, n, 512, 50 * 1.4426950408889634,
                                            BM=128, BN=256, BK=64, I64=i64, IDS=use_ids, num_warps=8, num_stages=3)
            f()
            t = bench_ms(f)
            log(f"  N={n} int64={i64!s:5s} ids={use_ids!s:5s} {t:.3f} ms ({tf / t * 1e3:.0f} TFLOP/s)")


def part_profile():
    """Where the host time of a training-size step goes (cProfile), and each forward kernel's
    GPU time alone (torch profiler) at a large size."""
    import cProfile
    import io
    import pstats
    log("== profile: host time of fwd+bwd at N=256 bf16 (cProfile, 30 steps)")
    q, g, kw = problem(256, 256, 512, torch.bfloat16, seed=6)
    qa, ga = q.clone().requires_grad_(), g.clone().requires_grad_()

    def step():
        sdm_triton.sdm_loss(qa, ga, **kw, logit_scale=50.0).backward()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(30):
        step()
    torch.cuda.synchronize()
    log(f"  wall per step {1e3 * (time.perf_counter() - t0) / 30:.3f} ms")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(30):
        step()
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
    for line in buf.getvalue().splitlines()[:40]:
        if line.strip():
            log("  " + line[:200])
    log("== profile: GPU time per kernel, forward + backward at N=32768 bf16 (torch.profiler)")
    from torch.profiler import ProfilerActivity, profile
    q, g, kw = problem(32768, 32768, 512, torch.bfloat16, seed=7)
    qa, ga = q.clone().requires_grad_(), g.clone().requires_grad_()
    sdm_triton.sdm_loss(qa, ga, **kw, logit_scale=50.0).backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof2:
        sdm_triton.sdm_loss(qa, ga, **kw, logit_scale=50.0).backward()
        torch.cuda.synchronize()
    table = prof2.key_averages().table(sort_by="cuda_time_total", row_limit=14)
    for line in table.splitlines():
        log("  " + line[:160])


def part_fwd(sizes, configs):
    log("== forward (prep + both statistics passes + finish), bf16 pk4, D=512, forward KL")
    for n in sizes:
        q, g, kw = problem(n, n, 512, torch.bfloat16, seed=1)
        tm = bench_ms(lambda: q @ g.T)
        tf = 2 * n * n * 512 / 1e12
        log(f"N={n}: cuBLAS Q@G^T {tm:.3f} ms ({tf / tm * 1e3:.0f} TFLOP/s)")
        for cfg in configs:
            try:
                with torch.no_grad():
                    f = lambda: sdm_triton.sdm_loss(q, g, **kw, temperature=0.02, kernel_config=cfg)  # noqa: E731
                    f()
                    t = bench_ms(f)
                log(f"  fwd {cfg:28s} {t:8.3f} ms  {2 * tf / t * 1e3:5.0f} TFLOP/s (2 passes)  x{t / (2 * tm):.2f} of 2 cuBLAS")
            except Exception as exc:  # noqa: BLE001
                log(f"  fwd {cfg} FAILED {type(exc).__name__}: {str(exc)[:200]}")


def part_full(sizes, configs):
    log("== forward + backward, bf16 pk4, D=512, forward KL")
    for n in sizes:
        q, g, kw = problem(n, n, 512, torch.bfloat16, seed=2)
        ds = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)

        def floor():
            torch.mm(q, g.T)
            torch.mm(q, g.T)
            torch.mm(ds, g)
            torch.mm(ds.T, q)
        t_floor = bench_ms(floor)
        del ds
        log(f"N={n}: floor (4 cuBLAS) {t_floor:.3f} ms")
        qa, ga = q.clone().requires_grad_(), g.clone().requires_grad_()
        for cfg in configs:
            try:
                def step():
                    sdm_triton.sdm_loss(qa, ga, **kw, temperature=0.02, kernel_config=cfg).backward()
                step()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                t = bench_ms(step, rep=300)
                log(f"  fwd+bwd {cfg:28s} {t:8.3f} ms  x{t / t_floor:.2f} floor  peak {peak:7.1f} MiB")
            except Exception as exc:  # noqa: BLE001
                log(f"  fwd+bwd {cfg} FAILED {type(exc).__name__}: {str(exc)[:200]}")
                traceback.print_exc()
        del qa, ga, q, g
        torch.cuda.empty_cache()


def formula(q, g, q_ids, g_ids, scale, kl="forward", eps=1e-8, combine="mean"):
    """The ten-line formula a user writes (IRRA's compute_sdm / the seed's sdm_loss_stable)."""
    import torch.nn.functional as F
    qn, gn = F.normalize(q.float(), dim=1), F.normalize(g.float(), dim=1)
    S = scale * qn @ gn.T
    y = (q_ids[:, None] == g_ids[None, :]).float()
    out = []
    for s_, y_ in ((S, y), (S.T, y.T)):
        Y = y_ / y_.sum(1, keepdim=True)
        if kl == "forward":
            out.append(F.kl_div(F.log_softmax(s_, 1), Y, reduction="batchmean"))
        else:
            p = F.softmax(s_, 1)
            out.append((p * (F.log_softmax(s_, 1) - torch.log(Y + eps))).sum(1).mean())
    return (out[0] + out[1]) if combine == "sum" else 0.5 * (out[0] + out[1])


def part_small(sizes_bf16, sizes_irra, compile_peer):
    log("== training sizes: forward + backward (do_bench median, ms)")
    torch.set_float32_matmul_precision("high")
    compiled = torch.compile(formula, dynamic=False) if compile_peer else None
    rows = []
    for label, dtype, kl, combine, sizes in (("bf16 fwd", torch.bfloat16, "forward", "mean", sizes_bf16),
                                              ("IRRA fp32 rev sum", torch.float32, "reverse", "sum", sizes_irra)):
        for n in sizes:
            torch.set_float32_matmul_precision("highest")
            q, g, kw = problem(n, n, 512, dtype, seed=3)
            qa, ga = q.clone().requires_grad_(), g.clone().requires_grad_()
            res = {}
            for cfg in ("auto", "fused", "chunked"):
                try:
                    def step(cfg=cfg):
                        sdm_triton.sdm_loss(qa, ga, **kw, logit_scale=50.0, kl=kl, combine=combine,
                                            kernel_config=cfg).backward()
                    step()
                    res[cfg] = bench_ms(step)
                except Exception as exc:  # noqa: BLE001
                    res[cfg] = float("nan")
                    log(f"{label} {n} {cfg} FAILED {type(exc).__name__}: {str(exc)[:200]}")
            torch.set_float32_matmul_precision("high")

            def f_eager():
                formula(qa, ga, kw["q_ids"], kw["g_ids"], 50.0, kl, combine=combine).backward()
            f_eager()
            res["formula_eager"] = bench_ms(f_eager)
            if compiled is not None and n in (64, 256, 1024, 4096):
                def f_comp():
                    compiled(qa, ga, kw["q_ids"], kw["g_ids"], 50.0, kl, combine=combine).backward()
                try:
                    f_comp()
                    f_comp()
                    res["formula_compiled"] = bench_ms(f_comp)
                except Exception as exc:  # noqa: BLE001
                    res["formula_compiled"] = float("nan")
                    log(f"compile failed {exc}")
            rows.append((label, n, res))
            log(f"{label:18s} N={n:5d} " + "  ".join(f"{k}={v:.3f}" for k, v in res.items()))
    torch.set_float32_matmul_precision("highest")
    # K = 15 galleries at N = 64 (ReID5o), fp32 reverse
    q, g, kw = problem(64, 64, 512, torch.float32, seed=4, k=15)
    gids = kw["g_ids"]
    qa, ga = q.clone().requires_grad_(), g.clone().requires_grad_()

    def multi():
        sdm_triton.sdm_loss_multi(qa, ga, kw["q_ids"], gids, logit_scale=50.0, kl="reverse", combine="sum").sum().backward()
    multi()
    log(f"ReID5o K=15 N=64 fp32 reverse: sdm_loss_multi {bench_ms(multi):.3f} ms")
    # CUDA-graph replay of one step at N = 256, bf16: the GPU time alone
    q, g, kw = problem(256, 256, 512, torch.bfloat16, seed=5)
    qa, ga = q.clone().requires_grad_(), g.clone().requires_grad_()

    def step():
        qa.grad = ga.grad = None
        sdm_triton.sdm_loss(qa, ga, **kw, logit_scale=50.0).backward()
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        torch.cuda.synchronize()
        log(f"CUDA graph replay N=256 bf16 fwd+bwd: {bench_ms(graph.replay):.4f} ms (GPU time)")
    except Exception as exc:  # noqa: BLE001
        log(f"graph capture FAILED {type(exc).__name__}: {str(exc)[:300]}")
    # host cost of one launch of a small kernel through the package's launcher
    t0 = time.perf_counter()
    for _ in range(200):
        with torch.no_grad():
            sdm_triton.sdm_loss(q, g, **kw, logit_scale=50.0)
    torch.cuda.synchronize()
    log(f"host: one forward call (3 launches) {1e6 * (time.perf_counter() - t0) / 200:.1f} us wall")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--parts", default="correct,yard,fwd,full,small")
    ap.add_argument("--fwd-configs", default="auto,m128n128k64w8s3,m128n64k64w8s3,m128n256k64w8s3,m256n128k64w8s3,"
                                             "m64n128k64w4s3")
    ap.add_argument("--full-configs", default="chunked,chunked_bm128bn128bw8,chunked_bm64bn128bw8,chunked_bm64bn64bw4,"
                                              "chunked_bm128bn64bw8bs4")
    ap.add_argument("--sizes", default="16384,32768")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    parts = args.parts.split(",")
    sizes = [int(x) for x in args.sizes.split(",")]
    os.makedirs(args.out, exist_ok=True)
    log(f"device {torch.cuda.get_device_name()} torch {torch.__version__} triton "
        f"{__import__('triton').__version__} sdm_triton {sdm_triton.__version__}")
    t0 = time.time()
    LOG_PATH[0] = os.path.join(args.out, "probe.log")
    try:
        if "profile" in parts:
            part_profile()
        if "correct" in parts:
            part_correct()
        if "yard" in parts:
            part_yard()
        if "yardvar" in parts:
            part_yardvar(sizes)
        if "fwd" in parts:
            part_fwd(sizes, args.fwd_configs.split(","))
        if "full" in parts:
            part_full(sizes, args.full_configs.split(","))
        if "small" in parts:
            part_small((64, 256, 1024, 4096), (64, 128, 512), not args.no_compile)
        if "correct2" in parts:
            part_correct(subset=True)
    finally:
        log(f"probe done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
