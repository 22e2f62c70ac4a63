"""How much a sequential fp32 FMA chain along D errs in the cosines, against partial sums and
against PyTorch (normalise, then matmul), on the anti-aligned case of test_kernels (CPU emulation:
exact products, the running sum rounded to fp32 at each step, as one thread of an fp32 "ieee"
tl.dot accumulates). bench/NOTES.md 22 has the outcome. python3 tools/fp32_dot_emulation.py"""
import torch, numpy as np
def case(d, seed=13):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(1, d, generator=gen)
    q = (base + 0.05 * torch.randn(3, d, generator=gen))
    g = (-base + 0.05 * torch.randn(20, d, generator=gen))
    return q.numpy().astype(np.float32), g.numpy().astype(np.float32)
def seq_dot(a, b, chunk=None):
    # fp32 FMA chain: exact product, sum rounded to fp32 at each step; chunk: fresh accumulator per chunk, chunks summed
    out = np.zeros((a.shape[0], b.shape[0]), np.float32)
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            if chunk is None:
                s = np.float32(0)
                for k in range(a.shape[1]):
                    s = np.float32(np.float64(a[i,k])*np.float64(b[j,k]) + np.float64(s))
            else:
                parts = []
                for k0 in range(0, a.shape[1], chunk):
                    s = np.float32(0)
                    for k in range(k0, min(a.shape[1], k0+chunk)):
                        s = np.float32(np.float64(a[i,k])*np.float64(b[j,k]) + np.float64(s))
                    parts.append(s)
                s = np.float32(0)
                for p in parts: s = np.float32(s + p)
            out[i,j] = s
    return out
for d in (24, 160, 512):
    q, g = case(d)
    exact = (q.astype(np.float64) @ g.astype(np.float64).T) / (np.linalg.norm(q.astype(np.float64),axis=1)[:,None]*np.linalg.norm(g.astype(np.float64),axis=1)[None,:])
    rq = (np.float32(1)/np.sqrt((q.astype(np.float64)**2).sum(1))).astype(np.float32); rg = (np.float32(1)/np.sqrt((g.astype(np.float64)**2).sum(1))).astype(np.float32)
    ours = seq_dot(q, g) * (rq[:,None]*rg[None,:])
    ours16 = seq_dot(q, g, chunk=16) * (rq[:,None]*rg[None,:])
    tq = torch.nn.functional.normalize(torch.from_numpy(q), dim=1); tg = torch.nn.functional.normalize(torch.from_numpy(g), dim=1)
    pt = (tq @ tg.T).numpy()
    e = lambda x: np.abs(x.astype(np.float64) - exact).max() / np.abs(exact).max()
    print(f"D={d}: max rel cos error: sequential FMA {e(ours):.2e}, 16-chunk partial sums {e(ours16):.2e}, torch normalize+matmul (CPU) {e(pt):.2e}")
