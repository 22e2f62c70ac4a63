"""List dispatched aten ops of one fwd and one bwd with the source line in sdm_triton."""
import sys, os, traceback, collections, torch
from torch.utils._python_dispatch import TorchDispatchMode
import sdm_triton
class Log(TorchDispatchMode):
    def __init__(s): super().__init__(); s.ops = []
    def __torch_dispatch__(s, func, types, args=(), kwargs=None):
        fr = [f for f in traceback.extract_stack() if "sdm_triton" in f.filename]
        loc = f"{os.path.basename(fr[-1].filename)}:{fr[-1].lineno}" if fr else "?"
        s.ops.append((str(func), loc))
        return func(*args, **(kwargs or {}))
torch.manual_seed(0)
n = int(os.environ.get("N", 64)); m = int(os.environ.get("M", n)); k = int(os.environ.get("K", 1))
kl = sys.argv[1] if len(sys.argv) > 1 else "reverse"
dt = getattr(torch, os.environ.get("DT", "float32"))
q = torch.randn(n, 32, dtype=dt, requires_grad=True); g = torch.randn(m, 32, dtype=dt, requires_grad=True)
ids = torch.arange(n) // 4; gids = torch.arange(m) // 4
def f(): return sdm_triton.sdm_loss(q, g, ids, gids, kl=kl, backend="torch", combine="sum", temperature=0.02)
f().backward()
with Log() as a: loss = f()
with Log() as b: loss.backward()
for name, lg in (("FWD", a), ("BWD", b)):
    print(name, len(lg.ops))
    if "-v" in sys.argv:
        for op, loc in lg.ops: print("  ", loc, op)
