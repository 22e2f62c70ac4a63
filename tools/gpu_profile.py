"""Where does the time go? Kernel-only timings, register use / spills, a profiler breakdown.

python tools/gpu_profile.py [--n 16384]
"""

import argparse

import torch
import triton

import sdm_triton
from sdm_triton.launch import TileConfig, TritonTiles
from sdm_triton.prepare import prepare_sides
from sdm_triton.stats import finish_rows

EXTRA = {}
_UNUSED = {
    "m64n128k64w4": TileConfig(64, 128, 64, 4, 3),
    "m128n128k64w8s2": TileConfig(128, 128, 64, 8, 2),
    "m64n64k128w4s2": TileConfig(64, 64, 128, 4, 2),
    "m128n64k64w8": TileConfig(128, 64, 64, 8, 3),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--d", type=int, default=512)
    args = p.parse_args()
    n, d = args.n, args.d
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
    q = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    ids = torch.randperm(n, device="cuda") // 4
    sq, sg = prepare_sides(q, g, ids, ids, None, None, None, True)
    scale_t = torch.full((1,), 50.0, device="cuda")
    from sdm_triton.launch import TILE_CONFIGS
    configs = {k: v for k, v in TILE_CONFIGS.items() if not k.startswith("interpreter")}
    configs.update(EXTRA)
    flops = 2.0 * n * n * d
    rows = []
    for name, cfg in configs.items():
        tiles = TritonTiles(cfg)
        # kernel-only: call the launcher pieces without merges
        from sdm_triton.kernels.tile_stats import _sdm_tile_stats_kernel
        from sdm_triton.kernels.tile_grad import _sdm_tile_grad_kernel
        grid, a_args, strides, flags = tiles._common(sq, sg, None, scale_t, 0, n)
        row_part = torch.empty((5, grid[1], n), device="cuda")
        col_part = torch.empty((5, grid[0], n), device="cuda")

        def stats_k():
            return _sdm_tile_stats_kernel[grid](*a_args, row_part, col_part, n, 0, n, d, *strides,
                                                row_part.stride(0), row_part.stride(1), col_part.stride(0),
                                                col_part.stride(1), 1e-8, REVERSE=False, **flags)
        h = stats_k()
        t_stats = triton.testing.do_bench(stats_k, warmup=25, rep=100)
        rs, cs = tiles.stats(sq, sg, None, scale_t, 0, n, False, 1e-8)
        _, lse_q, _ = finish_rows(rs, sq.row_valid, sq.ylogy, False)
        _, lse_g, _ = finish_rows(cs, sg.row_valid, sg.ylogy, False)
        ga = torch.full((n,), 1.0 / n, device="cuda")
        width = 4096
        ds = torch.empty((n, width), device="cuda", dtype=torch.bfloat16)
        dsp = torch.empty((1, 1), device="cuda")
        grid2 = (triton.cdiv(n, cfg.block_m), triton.cdiv(width, cfg.block_n))

        def grad_k():
            return _sdm_tile_grad_kernel[grid2](*a_args, lse_q, lse_g, lse_q, lse_g, ga, ga, ds, ds, dsp,
                                                n, 0, width, d, *strides, ds.stride(0), ds.stride(1), 1,
                                                1e-8, REVERSE=False, WANT_DSCALE=False, SPLIT=False, **flags)
        h2 = grad_k()
        t_grad = triton.testing.do_bench(grad_k, warmup=25, rep=100) * (n / width)
        rows.append((name, t_stats, flops / t_stats / 1e9, getattr(h, "n_regs", -1), getattr(h, "n_spills", -1),
                     t_grad, getattr(h2, "n_regs", -1), getattr(h2, "n_spills", -1)))

    # cuBLAS alternatives at the same shape
    def mm_bf16():
        return q @ g.T
    t_mm = triton.testing.do_bench(mm_bf16, warmup=25, rep=100)
    try:
        def mm_f32out():
            return torch.mm(q, g.T, out_dtype=torch.float32)
        t_mm32 = triton.testing.do_bench(mm_f32out, warmup=25, rep=100)
    except Exception as e:  # noqa: BLE001
        print("mm out_dtype failed:", e)
        t_mm32 = float("nan")
    S = torch.randn(n, n, device="cuda")
    t_lse = triton.testing.do_bench(lambda: torch.logsumexp(S, 1), warmup=25, rep=100)
    del S

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
    print(f"cuBLAS bf16 mm {t_mm:.3f} ms ({flops / t_mm / 1e9:.0f} TFLOP/s); fp32-out mm {t_mm32:.3f} ms; "
          f"logsumexp over fp32 [N,N] {t_lse:.3f} ms")
    print("| config | stats ms | TFLOP/s | regs | spills | grad ms (full M) | regs | spills |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.3f} | {r[2]:.0f} | {r[3]} | {r[4]} | {r[5]:.3f} | {r[6]} | {r[7]} |")


if __name__ == "__main__":
    main()
