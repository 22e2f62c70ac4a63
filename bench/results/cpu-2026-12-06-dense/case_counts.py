"""Dispatched aten ops (TorchDispatchMode) of one forward and one backward, per cpu-preset case."""
import sys, os, collections, torch
from torch.utils._python_dispatch import TorchDispatchMode
sys.path.insert(0, os.getcwd())
from bench import cases, methods
class Count(TorchDispatchMode):
    n = 0
    def __torch_dispatch__(s, func, types, args=(), kwargs=None):
        s.n += 1
        return func(*args, **(kwargs or {}))
for case in cases.PRESETS["cpu"].cases():
    inputs = cases.make_inputs(case, torch.device("cpu"))
    row = []
    for meth in ("sdm_torch", "formula_eager"):
        r = methods.build(meth, "default" if meth.startswith("sdm_triton") else "-", case, inputs, torch.device("cpu"))
        r.fwd_bwd()
        with Count() as c: loss = r.fwd()
        with Count() as c2: loss.backward()
        row.append(f"{meth} {c.n}+{c2.n}")
    print(f"{case.n}x{case.m} {case.dtype} {case.kl} {case.labels} K={case.k}: " + ", ".join(row))
