"""Latency of one SDM forward + backward at IRRA batch sizes, eager and replayed from a CUDA graph.

    python tools/gpu_graph_latency.py [--sizes 256,1024] [--out $OUT/graph_latency.txt]

At N = 256-1024 a step is bound by the host (bench/NOTES.md §16: ~4 ms eager on an H100
host for microseconds of GPU work; 193 ATen ops and 3 Triton launches per step,
tools/count_ops.py). The loss has no host synchronisation, so a training step that captures
it in a CUDA graph pays only the GPU time. For each size this captures
``loss = sdm_loss(q, g, ids, ids); loss.backward()`` (bf16, D = 512, pk4 ids, gradients
accumulating into preallocated .grad, as the bench does), checks that a replay gives the
eager loss and gradients (bitwise, same kernels on the same inputs), and times eager and
replay with triton.testing.do_bench, next to the eager reference and the floor (four cuBLAS
products). Needs CUDA. Written in the third session of 2026-11-26 without a GPU to run it on.
"""

import argparse

import torch


def _step(q, g, ids, fn):
    def step():
        fn(q, g, ids, ids, temperature=0.02).backward()
    return step


def _graphed(step):
    """A CUDA graph of ``step`` (warmed up on a side stream first, as capture requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def main():
    import triton.testing

    from sdm_triton import reference
    import sdm_triton

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="256,1024")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--out", default=None, help="also write the table here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA (CUDA graphs)")
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, D = {args.d}, pk4 ids, fwd+bwd (ms)",
             "", "| N = M | floor | reference eager | sdm_triton eager | sdm_triton CUDA graph | replay == eager |",
             "|---|---|---|---|---|---|"]
    for n in (int(x) for x in args.sizes.split(",")):
        gen = torch.Generator().manual_seed(n)
        q = torch.randn(n, args.d, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
        g = torch.randn(n, args.d, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
        ids = (torch.arange(n) // 4)[torch.randperm(n, generator=gen)].cuda()
        q.grad, g.grad = torch.zeros_like(q), torch.zeros_like(g)

        # eager result on zeroed grads, then the graph's replay on zeroed grads: must agree
        q.grad.zero_(), g.grad.zero_()
        _step(q, g, ids, sdm_triton.sdm_loss)()
        eager = (q.grad.clone(), g.grad.clone())
        graph = _graphed(_step(q, g, ids, sdm_triton.sdm_loss))
        q.grad.zero_(), g.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        same = torch.equal(q.grad, eager[0]) and torch.equal(g.grad, eager[1])

        a, b = q.detach(), g.detach()
        dy = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)

        def floor():
            return a @ b.T, dy @ b, dy.T @ a, a @ b.T

        times = [triton.testing.do_bench(f, warmup=25, rep=100) for f in (
            floor, _step(q, g, ids, reference.sdm_loss), _step(q, g, ids, sdm_triton.sdm_loss), graph.replay)]
        lines.append(f"| {n} | " + " | ".join(f"{t:.4f}" for t in times) + f" | {'yes' if same else 'NO'} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
