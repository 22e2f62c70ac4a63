"""Count the device operations and allocations of one forward + backward of sdm_loss and sdm_loss_multi.

At IRRA batch sizes (N = 64-512) the GPU work of a step is microseconds and its cost is
the host: every ATen op that launches work and every Triton launch costs several
microseconds of Python and driver time. This tool counts them, on any machine:

    python3 tools/count_ops.py --n 64 --d 32                 # CPU: Triton interpreted
    python3 tools/count_ops.py --n 64 --d 512 --dtype bf16   # on a GPU

What is counted, for one step ``loss = f(...); loss.backward()`` after a warm-up step
(compilation and autotuning outside the count), gradients set to None before it as
``zero_grad()`` does:

* ATen ops that launch work, seen by a ``TorchDispatchMode``: every op except views
  and metadata-only ops (``OpOverload.is_view``, ``aten.lift_fresh``, ...) and pure
  allocations (``aten.empty*``), which launch no kernel. A custom op (``torch.library``)
  is listed under its own name and the ATen ops inside it are counted as well.
* Triton launches: ``JITFunction.run`` (and the interpreter's ``InterpretedFunction.run``)
  wrapped, one count per ``kernel[grid](...)``; the tensor traffic of the interpreter
  itself during a launch is not counted.
* Allocations: outputs of ATen ops whose storage is new (not an input's, not ``out=``),
  with their bytes: what the caching allocator would hand out on a GPU. On CUDA the
  caching allocator's own count (``allocation.all.allocated``) is printed too.
* Host synchronisations: ops that read device values on the host (``.item()``,
  ``nonzero``, ``equal``...), which stall a GPU step.
"""

import argparse
import collections
import contextlib
import os

import torch

if not torch.cuda.is_available():
    # For this process only, before anything imports triton: the kernels can only be interpreted.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

import sdm_triton  # noqa: E402

#: Ops that touch metadata only (no kernel, no allocation); views are found by OpOverload.is_view.
METADATA_OPS = {"aten.lift_fresh", "aten.sym_size", "aten.sym_stride", "aten.sym_numel",
                "aten.sym_storage_offset", "aten.is_same_size", "aten.dim", "aten.set_", "aten.resize_"}
#: Ops that only allocate: they launch no kernel, and their output is counted as an allocation.
ALLOCATION_OPS = {"aten.empty", "aten.empty_strided", "aten.empty_like", "aten.new_empty",
                  "aten.new_empty_strided", "aten.empty_permuted"}
#: Ops that make the host wait for the device on a GPU.
SYNC_OPS = {"aten._local_scalar_dense", "aten.is_nonzero", "aten.equal", "aten.nonzero", "aten.masked_select",
            "aten._unique2", "aten.unique_dim", "aten.unique_consecutive", "aten.repeat_interleave",
            "aten.allclose", "aten.item"}


class Counter(TorchDispatchMode):
    """Counts ATen ops by kind, new storages and Triton launches while active."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()          # ATen ops that launch work
        self.custom = collections.Counter()       # torch.library custom ops (their insides counted in ops)
        self.views = collections.Counter()        # views and metadata-only ops (not counted)
        self.allocs = collections.Counter()       # new storages, by the op that made them
        self.alloc_bytes = 0
        self.syncs = collections.Counter()
        self.launches = collections.Counter()     # Triton launches by kernel name
        self._paused = 0

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._paused:
            return func(*args, **kwargs)
        name = str(func.overloadpacket)
        if func.namespace not in ("aten", "prims"):
            self.custom[name] += 1
            return self._inside(func, args, kwargs)
        inputs = {_storage(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        if func.is_view or name in METADATA_OPS:
            self.views[name] += 1
            return out
        if name not in ALLOCATION_OPS:
            self.ops[name] += 1
        if name in SYNC_OPS:
            self.syncs[name] += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and _storage(t) not in inputs and t.untyped_storage().nbytes() > 0:
                inputs.add(_storage(t))
                self.allocs[name] += 1
                self.alloc_bytes += t.untyped_storage().nbytes()
        return out

    def _inside(self, func, args, kwargs):
        """Run a custom op's kernel for its device with this mode active, so its ATen ops count."""
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        key = torch._C.DispatchKey.CUDA if tensors and tensors[0].is_cuda else torch._C.DispatchKey.CPU
        try:
            with self:
                return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
        except RuntimeError:
            self.custom[f"{func.overloadpacket} (insides not counted)"] += 1
            return func(*args, **kwargs)


def _storage(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr())


@contextlib.contextmanager
def counting_triton_launches(counter: Counter):
    """Wrap the Triton launch entry points (compiled and interpreted) for the duration."""
    classes = []
    try:
        from triton.runtime.jit import JITFunction
        classes.append(JITFunction)
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:
        pass
    saved = [(cls, cls.__dict__["run"]) for cls in classes if "run" in cls.__dict__]

    def wrap(orig):
        def run(self, *args, **kwargs):
            if kwargs.get("warmup"):
                return orig(self, *args, **kwargs)
            fn = getattr(self, "fn", None)
            counter.launches[getattr(fn, "__name__", type(self).__name__)] += 1
            with counter.paused():      # the interpreter's own tensor traffic is not the step's
                return orig(self, *args, **kwargs)
        return run

    for cls, orig in saved:
        cls.run = wrap(orig)
    try:
        yield
    finally:
        for cls, orig in saved:
            cls.run = orig


def count(step, leaves, device: torch.device) -> Counter:
    """One warm-up ``step()``, then the counted one (gradients set to None before each)."""
    for x in leaves:
        x.grad = None
    step()
    for x in leaves:
        x.grad = None
    counter = Counter()
    cuda_before = torch.cuda.memory_stats(device).get("allocation.all.allocated", 0) if device.type == "cuda" else 0
    with counting_triton_launches(counter), counter:
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        counter.cuda_allocations = torch.cuda.memory_stats(device).get("allocation.all.allocated", 0) - cuda_before
    return counter


def table(results) -> str:
    """ops by name (most frequent first), then the totals, one column per counted step."""
    names = list(results)
    ops = collections.Counter()
    for c in results.values():
        ops.update(c.ops)
    rows = [("op", names)]
    rows += [(op, [results[n].ops.get(op, 0) for n in names]) for op, _ in ops.most_common()]
    launches = collections.Counter()
    for c in results.values():
        launches.update(c.launches)
    rows += [(f"triton: {k}", [results[n].launches.get(k, 0) for n in names]) for k, _ in launches.most_common()]
    customs, alloc_only = collections.Counter(), collections.Counter()
    for c in results.values():
        customs.update(c.custom)
        alloc_only.update({k: v for k, v in c.allocs.items() if k in ALLOCATION_OPS})
    rows += [(f"custom op: {k}", [results[n].custom.get(k, 0) for n in names]) for k, _ in customs.most_common()]
    rows += [(f"{k} (allocates only)", [results[n].allocs.get(k, 0) for n in names])
             for k, _ in alloc_only.most_common()]
    rows.append(None)
    rows += [
        ("ATen ops that launch work", [sum(results[n].ops.values()) for n in names]),
        ("Triton launches", [sum(results[n].launches.values()) for n in names]),
        ("device operations (sum)", [sum(results[n].ops.values()) + sum(results[n].launches.values())
                                     for n in names]),
        ("allocations (new storages, any op)", [sum(results[n].allocs.values()) for n in names]),
        ("allocated KiB", [f"{results[n].alloc_bytes / 1024:.1f}" for n in names]),
        ("host synchronisations", [sum(results[n].syncs.values()) for n in names]),
        ("views / metadata (not counted)", [sum(results[n].views.values()) for n in names]),
    ]
    if any(hasattr(c, "cuda_allocations") for c in results.values()):
        rows.append(("CUDA caching-allocator allocations", [getattr(results[n], "cuda_allocations", "")
                                                            for n in names]))
    width = max(len(row[0]) for row in rows if row is not None) + 2
    col = max(12, *(len(n) + 2 for n in names))
    lines = []
    for row in rows:
        if row is None:
            lines.append("-" * (width + col * len(names)))
            continue
        label, values = row
        lines.append(f"{label:<{width}}" + "".join(f"{str(v):>{col}}" for v in values))
    syncs = {n: results[n].syncs for n in names if results[n].syncs}
    if syncs:
        lines.append("")
        lines.append("host synchronisations by op: " + "; ".join(
            f"{n}: " + ", ".join(f"{k} {v}" for k, v in c.most_common()) for n, c in syncs.items()))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64, help="rows of q and of each gallery (default 64)")
    p.add_argument("--d", type=int, default=64, help="feature dim (default 64)")
    p.add_argument("--galleries", type=int, default=15, help="K of the sdm_loss_multi step (default 15, ReID5o)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--kl", choices=("forward", "reverse"), default="forward")
    p.add_argument("--combine", choices=("mean", "sum"), default="mean")
    p.add_argument("--backend", choices=("triton", "auto", "torch"), default="triton",
                   help="sdm_loss backend (default triton: on CPU 'auto' would pick the torch backend)")
    p.add_argument("--kernel-config", default=None,
                   help="KernelConfig name, e.g. 'centroids' (the identity centroids' path at any size)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    gen = torch.Generator().manual_seed(0)

    def feats():
        return torch.randn(args.n, args.d, generator=gen).to(device, dtype).requires_grad_()
    q, g = feats(), feats()
    gs = [feats() for _ in range(args.galleries)]
    ids = (torch.arange(args.n) // 4)[torch.randperm(args.n, generator=gen)].to(device)
    kw = dict(temperature=0.02, kl=args.kl, combine=args.combine, backend=args.backend)
    if args.kernel_config:
        kw["kernel_config"] = args.kernel_config
    steps = {
        "sdm_loss": (lambda: sdm_triton.sdm_loss(q, g, ids, ids, **kw).backward(), [q, g]),
        f"sdm_loss_multi K={args.galleries}":
            (lambda: sdm_triton.sdm_loss_multi(q, gs, ids, ids, **kw).sum().backward(), [q, *gs]),
    }
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    print(f"sdm_triton {getattr(sdm_triton, '__version__', '?')}, torch {torch.__version__}, {device.type}"
          f"{' (Triton interpreted)' if interpreted and args.backend != 'torch' else ''}: {str(dtype)[6:]}, "
          f"N = M = {args.n}, D = {args.d}, kl={args.kl}, combine={args.combine}, backend={args.backend!r}; "
          "one forward + backward after a warm-up")
    describe = getattr(sdm_triton, "describe_path", None)
    if describe is not None:
        try:
            print(f"path: {describe(q, g, q_ids=ids, g_ids=ids, **kw)}")
        except Exception as exc:  # informative only
            print(f"path: describe_path raised {type(exc).__name__}: {exc}")
    results = {name: count(step, leaves, device) for name, (step, leaves) in steps.items()}
    print()
    print(table(results))


if __name__ == "__main__":
    main()
