"""The methods compared, each turned into a runner over one case's inputs.

Every loss method computes ``sum_k loss(q, g_k)`` over the case's K galleries
(K separate calls; ``sdm_triton_multi`` is the batched ``sdm_loss_multi``). A
runner offers the three timed modes and, for the correctness gate, the loss and
the gradients of the leaves.

    floor               the matmuls any implementation must do, with cuBLAS (see NOTES.md)
    sdm_triton          sdm_triton.sdm_loss(backend="triton", tile_config=variant)
    sdm_torch           sdm_triton.sdm_loss(backend="torch"), the chunked pure-PyTorch backend
    reference           reference.sdm_loss, eager, the N x M matrix materialised
    reference_compiled  torch.compile(reference.sdm_loss)
    inf_cl              Inf-CL's cal_inf_loss (optional import), unique ids only
    sdm_triton_multi    sdm_triton.sdm_loss_multi(...).sum(): K galleries against one anchor in one call
                        (``sdm_triton`` on the same case is K separate calls)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from sdm_triton import reference
import sdm_triton

from .cases import EPS, TEMPERATURE, Case, Inputs

METHODS = ("floor", "sdm_triton", "sdm_torch", "reference", "reference_compiled", "inf_cl",
           "sdm_triton_multi")
#: Methods whose variants are the named Triton tile configs.
TRITON_METHODS = ("sdm_triton", "sdm_triton_multi")
NO_VARIANT = "-"

#: Bytes per element of S that the eager reference keeps alive through forward and backward
#: (S, labels, the kept copies, log P, Y, masks and where() temporaries). Used only to skip
#: sizes that cannot fit; an OOM that still happens is caught and recorded.
#: Measured on an H200 (torch 2.11): 52 bytes per element at 4096^2, 50 at 16384^2.
REFERENCE_BYTES_PER_NM = 14 * 4
#: The float64 truth of the correctness gate is the same graph in float64.
TRUTH_BYTES_PER_NM = 14 * 8
#: Workspace bound passed to sdm_loss (its default).
WORKSPACE_BYTES = 64 * 2**20


class SkipMethod(Exception):
    """This method does not apply to this case (the message says why)."""


# ---------------------------------------------------------------------------------------------
# runners


class LossRunner:
    """A loss method as a function of the case's leaves."""

    is_loss = True

    def __init__(self, loss_fn: Callable[[], torch.Tensor], leaves: List[torch.Tensor], note: str = ""):
        self.loss_fn = loss_fn
        self.leaves = leaves
        self.note = note    # written to the CSV rows (e.g. the tile shape actually used)

    def fwd(self):
        return self.loss_fn()

    def fwd_bwd(self):
        self.loss_fn().backward()

    def bwd_setup(self) -> Callable[[], None]:
        """Run the forward once (untimed); the returned callable is the timed backward.

        ``retain_graph=True`` keeps the saved tensors so the same backward can be
        replayed; gradients accumulate into the preallocated ``.grad`` buffers.
        """
        loss = self.loss_fn()

        def bwd():
            loss.backward(retain_graph=True)
        return bwd

    def loss_and_grads(self):
        for x in self.leaves:
            x.grad = None
        loss = self.loss_fn()
        loss.backward()
        return loss.detach(), [x.grad for x in self.leaves]


class FloorRunner:
    """cuBLAS matmuls of the loss's shape: forward S = q g^T; backward S again, dS g and dS^T q."""

    is_loss = False
    note = "cuBLAS: fwd 1 matmul, bwd 3, per gallery, in the input dtype"

    def __init__(self, inputs: Inputs):
        self.q = inputs.q.detach()
        self.gs = [g.detach() for g in inputs.gs]
        n, m = self.q.shape[0], self.gs[0].shape[0]
        # An upstream dS in the input dtype (allocated here, counted as the floor's input).
        self.ds = torch.randn(n, m, device=self.q.device).to(self.q.dtype)

    def fwd(self):
        for g in self.gs:
            torch.mm(self.q, g.T)

    def _bwd(self):
        for g in self.gs:
            torch.mm(self.q, g.T)
            torch.mm(self.ds, g)
            torch.mm(self.ds.T, self.q)

    def fwd_bwd(self):
        self.fwd()
        self._bwd()

    def bwd_setup(self):
        return self._bwd


# ---------------------------------------------------------------------------------------------
# the methods


def _sum_over_galleries(one: Callable, inputs: Inputs) -> Callable[[], torch.Tensor]:
    kw = inputs.label_kwargs()

    def loss():
        total = None
        for g in inputs.gs:
            val = one(inputs.q, g, **kw)
            total = val if total is None else total + val
        return total
    return loss


def _sdm_kwargs(case: Case):
    return dict(temperature=TEMPERATURE, kl=case.kl, eps=EPS)


def sdm_triton_multi_loss(q, gs, *, tile_config=None, **kw):
    """K galleries against one anchor, ``sum_k sdm_loss(q, g_k)``, in one ``sdm_loss_multi`` call.

    ``gs`` is the case's K separate leaf tensors, as a user holding one embedding per
    modality has them: the call concatenates them (a K * M * D copy, included in the time).
    """
    return sdm_triton.sdm_loss_multi(q, list(gs), backend="triton", tile_config=tile_config,
                                     workspace_bytes=WORKSPACE_BYTES, **kw).sum()


def _tile_config(variant: str) -> Optional[str]:
    # "default" means the library's own choice (the "interpreter" tiles under TRITON_INTERPRET=1).
    return None if variant == "default" else variant


def _tile_note(variant: str) -> str:
    import dataclasses as dc
    from sdm_triton.launch import TILE_CONFIGS, interpreting
    name = "interpreter" if variant == "default" and interpreting() else variant
    fields = ", ".join(f"{k}={v}" for k, v in dc.asdict(TILE_CONFIGS[name]).items())
    return f"tiles {name}: {fields}" + (" (TRITON_INTERPRET=1)" if interpreting() else "")


def _check_triton(case: Case, device: torch.device, variant: str, triton_max_nm: Optional[int]):
    from sdm_triton.launch import TILE_CONFIGS, interpreting
    if variant not in TILE_CONFIGS:
        raise ValueError(f"unknown variant {variant!r}; TILE_CONFIGS has {sorted(TILE_CONFIGS)}")
    if device.type != "cuda":
        from sdm_triton.kernels.tile_stats import _sdm_tile_stats_kernel
        if not interpreting() or type(_sdm_tile_stats_kernel).__name__ != "InterpretedFunction":
            raise SkipMethod("needs CUDA, or TRITON_INTERPRET=1 set before the kernels are imported")
    if triton_max_nm is not None and case.n * case.m > triton_max_nm:
        raise SkipMethod(f"Triton limited to N*M <= {triton_max_nm} in this preset (interpreter)")


def build(method: str, variant: str, case: Case, inputs: Inputs, device: torch.device,
          triton_max_nm: Optional[int] = None):
    """A runner for ``method`` on ``inputs``, or ``SkipMethod`` with the reason."""
    kw = _sdm_kwargs(case)
    if method == "floor":
        return FloorRunner(inputs)
    if method == "sdm_triton":
        _check_triton(case, device, variant, triton_max_nm)
        cfg = _tile_config(variant)
        fn = _sum_over_galleries(lambda q, g, **lk: sdm_triton.sdm_loss(
            q, g, backend="triton", tile_config=cfg, workspace_bytes=WORKSPACE_BYTES, **lk, **kw), inputs)
        return LossRunner(fn, inputs.leaves, _tile_note(variant))
    if method == "sdm_triton_multi":
        if case.k == 1:
            raise SkipMethod("multi-gallery cases only (K > 1)")
        _check_triton(case, device, variant, triton_max_nm)
        from sdm_triton.launch import TILE_CONFIGS
        cfg = _tile_config(variant)
        if cfg is not None and not TILE_CONFIGS[cfg].two_pass:
            raise SkipMethod(f"tile config {variant} has one-pass statistics: no multi-gallery support")
        lk = inputs.label_kwargs()
        return LossRunner(lambda: sdm_triton_multi_loss(inputs.q, inputs.gs, tile_config=cfg, **lk, **kw),
                          inputs.leaves, f"one sdm_loss_multi call for K={case.k}; " + _tile_note(variant))
    if method == "sdm_torch":
        fn = _sum_over_galleries(lambda q, g, **lk: sdm_triton.sdm_loss(
            q, g, backend="torch", workspace_bytes=WORKSPACE_BYTES, **lk, **kw), inputs)
        return LossRunner(fn, inputs.leaves)
    if method == "reference":
        fn = _sum_over_galleries(lambda q, g, **lk: reference.sdm_loss(q, g, **lk, **kw), inputs)
        return LossRunner(fn, inputs.leaves)
    if method == "reference_compiled":
        compiled = _compiled_reference(device)
        fn = _sum_over_galleries(lambda q, g, **lk: compiled(q, g, **lk, **kw), inputs)
        return LossRunner(fn, inputs.leaves, "torch.compile(reference.sdm_loss, dynamic=False)")
    if method == "inf_cl":
        return _inf_cl_runner(case, inputs, device)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def estimate_bytes(method: str, case: Case) -> int:
    """Memory beyond inputs and gradients a method needs, to skip sizes that cannot fit."""
    nm = case.n * case.m
    elt = torch.empty((), dtype=case.torch_dtype).element_size()
    if method in ("reference", "reference_compiled"):
        return case.k * REFERENCE_BYTES_PER_NM * nm   # all K graphs live until backward
    if method == "floor":
        return 3 * nm * elt                          # dS, S and one product's output
    if method == "inf_cl":
        return case.k * 6 * (case.n + case.m) * case.d * 4
    return 4 * WORKSPACE_BYTES + case.k * 64 * (case.n + case.m) * 4


# ---------------------------------------------------------------------------------------------
# torch.compile(reference)

_COMPILED = {}


def _compile_probe(device: torch.device) -> Optional[str]:
    """Compile a tiny forward + backward in a child process; a reason to skip if it fails.

    torch.compile can crash the process natively rather than raise (seen with the
    CPU build of torch 2.13 here: 'free(): invalid next size' in the first compiled
    backward, any function), so the first try happens where a crash costs nothing.
    """
    code = textwrap.dedent(f"""
        import torch, reference
        f = torch.compile(reference.sdm_loss)
        q = torch.randn(16, 8, device="{device.type}", requires_grad=True)
        g = torch.randn(16, 8, device="{device.type}", requires_grad=True)
        ids = torch.arange(16, device="{device.type}") // 4
        f(q, g, ids, ids).backward()
        print("ok")
    """)
    env = dict(os.environ)
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except subprocess.TimeoutExpired:
        return "torch.compile probe timed out"
    if res.returncode != 0 or "ok" not in res.stdout:
        tail = (res.stderr.strip().splitlines() or ["?"])[-1][:160]
        return f"torch.compile probe failed in a child process (rc={res.returncode}: {tail})"
    return None


def _compiled_reference(device: torch.device):
    key = device.type
    if key not in _COMPILED:
        reason = _compile_probe(device) if device.type == "cpu" else None
        if reason is None:
            import torch._dynamo as dynamo
            import torch._functorch.config as functorch_config
            # One compiled graph per case: keep every size specialised, never fall back to eager.
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(dynamo.config, name):
                    setattr(dynamo.config, name, 1024)
            # A compiled backward with donated buffers refuses retain_graph=True, which the bwd
            # mode needs to replay the backward; donation only lets the backward reuse saved
            # tensors' memory in place.
            if hasattr(functorch_config, "donated_buffer"):
                functorch_config.donated_buffer = False
            _COMPILED[key] = torch.compile(reference.sdm_loss, dynamic=False)
        else:
            _COMPILED[key] = SkipMethod(reason)
    if isinstance(_COMPILED[key], SkipMethod):
        raise _COMPILED[key]
    return _COMPILED[key]


# ---------------------------------------------------------------------------------------------
# Inf-CL (optional)


def _inf_cl_head_dim(d: int) -> Optional[int]:
    # cal_inf_loss views [B, D] as [B, D / head_dim, head_dim]; its kernels take a power-of-two
    # head_dim in [16, 256] (default 256).
    for hd in (256, 128, 64, 32, 16):
        if d % hd == 0:
            return hd
    return None


def _inf_cl_runner(case: Case, inputs: Inputs, device: torch.device):
    if device.type != "cuda":
        raise SkipMethod("Inf-CL's kernels need CUDA (they assert q.is_cuda)")
    if case.labels != "unique" or case.kl != "forward" or case.n != case.m:
        raise SkipMethod("Inf-CL computes contrastive CE with one positive per row (labels = arange(N)): "
                         "equal to SDM only for forward KL with unique ids and N = M")
    head_dim = _inf_cl_head_dim(case.d)
    if head_dim is None:
        raise SkipMethod(f"Inf-CL needs D divisible by a power-of-two head_dim in [16, 256]; D = {case.d}")
    try:
        from inf_cl import cal_inf_loss
    except Exception as exc:  # optional dependency: any import failure is a skip
        raise SkipMethod(f"inf_cl not importable ({type(exc).__name__}: {exc})") from None
    # A plain tensor scale: cal_inf_loss wraps a given scale in GradientGather, whose backward
    # all-reduces and so needs torch.distributed; a scale that needs no grad never reaches it.
    scale = torch.tensor(1.0 / TEMPERATURE, device=device)

    def one(q, g, **_):
        # cal_inf_loss(a, b) = mean_i [logsumexp_j(s a_i.b_j) - s a_i.b_i] on features as given
        # (no normalisation, one direction); the SDM forward loss with unique ids is the mean
        # of the two directions of the same on normalised features.
        qn = F.normalize(q.float(), dim=1)
        gn = F.normalize(g.float(), dim=1)
        return 0.5 * (cal_inf_loss(qn, gn, scale=scale, head_dim=head_dim)
                      + cal_inf_loss(gn, qn, scale=scale, head_dim=head_dim))
    return LossRunner(_sum_over_galleries(one, inputs), inputs.leaves,
                      f"0.5 * (cal_inf_loss(q^, g^) + cal_inf_loss(g^, q^)), head_dim={head_dim}, TF32 products")
