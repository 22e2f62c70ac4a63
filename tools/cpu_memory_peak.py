"""Peak of live CPU allocations during one forward and one backward, from the torch profiler's
allocation records: the allocation pattern of the autograd layer, seen without a GPU.

    python tools/cpu_memory_peak.py --backend torch --n 1024 --d 16 --workspace-cols 256

On CPU the torch backend's chunks behave like the GPU path's (one workspace per column
chunk); the interpreted Triton kernels copy their arguments, which hides the pattern.
Used for bench/NOTES.md §16: with the previous chunk's workspace still bound while the next
one was allocated, the backward peak held two workspaces (1 MiB more here at 256 columns).
Peaks count allocations made after profiling starts; the inputs and saved tensors are not in them.
"""

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch._C._profiler import _EventType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import sdm_triton  # noqa: E402


def _peak_bytes(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = []

    def walk(nodes):
        for node in nodes:
            if node.tag == _EventType.Allocation:
                sizes.append((node.start_time_ns, node.extra_fields.alloc_size))
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    live = peak = 0
    for _, size in sorted(sizes):
        live += size
        peak = max(peak, live)
    return peak


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("torch", "triton"), default="torch")
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--d", type=int, default=16)
    p.add_argument("--workspace-cols", type=int, default=256, help="columns per backward chunk")
    args = p.parse_args()
    torch.manual_seed(0)
    q = torch.randn(args.n, args.d, requires_grad=True)
    g = torch.randn(args.n, args.d, requires_grad=True)
    ids = torch.arange(args.n) // 4
    # bytes per column of one chunk: the torch backend keeps ~8 fp32 [N, C] temporaries, the
    # Triton workspace is W's hi + lo halves (4 bytes per element)
    per_col = (8 * 4 if args.backend == "torch" else 4) * args.n
    kw = dict(backend=args.backend, workspace_bytes=per_col * args.workspace_cols)
    loss = sdm_triton.sdm_loss(q, g, ids, ids, **kw)
    loss.backward(retain_graph=True)   # compile / warm up
    fwd = _peak_bytes(lambda: sdm_triton.sdm_loss(q, g, ids, ids, **kw))
    bwd = _peak_bytes(lambda: loss.backward(retain_graph=True))
    print(f"{args.backend} backend, N = M = {args.n}, D = {args.d}, {args.workspace_cols} columns per chunk: "
          f"peak live CPU allocations: forward {fwd / 2**10:.0f} KiB, backward {bwd / 2**10:.0f} KiB")


if __name__ == "__main__":
    main()
