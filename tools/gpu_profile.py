"""Where does the time go? Per-variant timings of the forward statistics and of the backward's
pieces, and a profiler breakdown of one default forward + backward step.

python tools/gpu_profile.py [--n 16384] [--configs default,onepass_m128n64w4]
Prints a short table last. Kernel variants are the names in sdm_triton.launch.TILE_CONFIGS.
"""

import argparse

import torch
import triton

import sdm_triton
from sdm_triton.autograd import DEFAULT_WORKSPACE_BYTES
from sdm_triton.launch import TILE_CONFIGS, TritonTiles
from sdm_triton.matmul import addmm_f32, mm_f32
from sdm_triton.prepare import prepare_sides, product_operand
from sdm_triton.stats import finish_rows, split_lse


def _bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--configs", default=",".join(k for k in TILE_CONFIGS if not k.startswith("interpreter")))
    args = p.parse_args()
    n, d = args.n, args.d
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
    q = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    ids = torch.randperm(n, device="cuda") // 4
    sq, sg = prepare_sides(q, g, ids, ids, None, None, None, True)
    scale_t = torch.full((1,), 50.0, device="cuda")
    flops = 2.0 * n * n * d
    t_mm = _bench(lambda: q @ g.T)
    rows = []
    for name in args.configs.split(","):
        try:
            rows.append(_profile_variant(name, sq, sg, q, scale_t, n, d, flops))
        except Exception as exc:  # noqa: BLE001 - one variant that cannot run must not end the run
            print(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[-1][:200]}")
    _profiler_table(q, g, ids)
    print(f"N = M = {n}, D = {d}, bf16. cuBLAS bf16 q @ g.T: {t_mm:.3f} ms ({flops / t_mm / 1e9:.0f} TFLOP/s)")
    print("| config | fwd stats ms | TFLOP/s (1 product) | grad kernel ms (all chunks) | dq products ms"
          " | dg products ms | chunk width |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.3f} | {r[2]:.0f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.3f} | {r[6]} |")


def _profile_variant(name, sq, sg, q, scale_t, n, d, flops):
    tiles = TritonTiles(TILE_CONFIGS[name])
    width_s = tiles.chunk_columns("stats", n, n, q.dtype, DEFAULT_WORKSPACE_BYTES)

    def stats_all():
        return [tiles.stats(sq, sg, None, scale_t, c0, min(n, c0 + width_s), False, 1e-8)
                for c0 in range(0, n, width_s)]
    t_stats = _bench(stats_all)
    rs, cs = tiles.stats(sq, sg, None, scale_t, 0, n, False, 1e-8)
    _, lse_q, _ = finish_rows(rs, sq.row_valid, sq.ylogy, False)
    _, lse_g, _ = finish_rows(cs, sg.row_valid, sg.ylogy, False)
    lq, lg = split_lse(lse_q, torch.float32), split_lse(lse_g, torch.float32)
    ga = torch.full((n,), 1.0, device="cuda")
    qx, pq, _ = product_operand(sq, q.dtype)
    gx, pg, _ = product_operand(sg, q.dtype)
    width = tiles.chunk_columns("grad", n, n, q.dtype, DEFAULT_WORKSPACE_BYTES)
    chunks = n / width

    def grad_kernel():
        return tiles.grad(sq, sg, None, scale_t, 0, width, False, 1e-8, lq, lg, ga, ga, ga, ga, pq, pg, False)
    t_grad = _bench(grad_kernel) * chunks
    ws, parts, _ = grad_kernel()
    ua = torch.zeros((n, d), device="cuda")
    ub = torch.zeros((width, d), device="cuda")
    b2 = torch.cat([gx[:width]] * parts)
    t_dq = _bench(lambda: addmm_f32(ua, ws, b2)) * chunks
    t_dg = _bench(lambda: ub.add_(mm_f32(ws.T, qx).view(parts, width, -1).sum(0))) * chunks
    return (name, t_stats, flops / t_stats / 1e9, t_grad, t_dq, t_dg, width)


def _profiler_table(q, g, ids):
    qq = q.clone().requires_grad_()
    gg = g.clone().requires_grad_()
    from torch.profiler import ProfilerActivity, profile
    for _ in range(2):
        sdm_triton.sdm_loss(qq, gg, ids, ids).backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        sdm_triton.sdm_loss(qq, gg, ids, ids).backward()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
