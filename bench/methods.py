"""The methods compared, each turned into a runner over one case's inputs.

Every loss method computes ``sum_k loss(q, g_k)`` over the case's K galleries
(K separate calls; ``sdm_triton_multi`` is the batched ``sdm_loss_multi``). A
runner offers the three timed modes and, for the correctness gate, the loss and
the gradients of the leaves.

    floor               the matmuls any implementation must do, with cuBLAS (see NOTES.md)
    sdm_triton          sdm_triton.sdm_loss(backend="auto"), what a user gets by default (on CPU
                        tensors: backend="triton", in the Triton interpreter); a variant passes
                        kernel_config=<variant> (with backend="triton")
    sdm_torch           sdm_triton.sdm_loss(backend="torch"), the chunked pure-PyTorch backend
    reference           sdm_triton.reference.sdm_loss, eager, the N x M matrix materialised
    reference_compiled  torch.compile(reference.sdm_loss)
    formula_eager       the ten-line formula users write (IRRA's compute_sdm, the seed's
                        sdm_loss_stable), fp32 S under TF32 (float32 matmul precision "high")
    formula_compiled    torch.compile of the same function, TF32 too
    formula_autocast    torch.compile of the same function under torch.autocast(bfloat16), as a
                        CLIP step under autocast runs it: bf16 logits (q_hat @ g_hat.T in bf16).
                        Its error is reported, not gated (REPORTED_METHODS): a peer, not a target
    inf_cl              Inf-CL's cal_inf_loss (optional import), unique ids only
    sdm_triton_multi    sdm_triton.sdm_loss_multi(...).sum(): K galleries against one anchor in one call
                        (``sdm_triton`` on the same case is K separate calls)
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import subprocess
import sys
import textwrap
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from sdm_triton import reference
import sdm_triton

from .cases import EPS, TEMPERATURE, Case, Inputs

METHODS = ("floor", "sdm_triton", "sdm_torch", "reference", "reference_compiled", "formula_eager",
           "formula_compiled", "formula_autocast", "inf_cl", "sdm_triton_multi")
#: Methods whose variants are kernel_config strings.
TRITON_METHODS = ("sdm_triton", "sdm_triton_multi")
#: Methods whose products run in TF32 (10-bit mantissa) by design: their gate is at that precision.
TF32_METHODS = ("inf_cl", "formula_eager", "formula_compiled")
#: Methods whose error against the trusted result is reported beside their time but gates nothing:
#: bf16 logits by design (an error of order s 2^-9 per logit), a peer users run, not a target.
#: Only a non-finite result fails them.
REPORTED_METHODS = ("formula_autocast",)
#: The compiled peers: a torch.compile failure skips them with the reason (bench/suite.py).
COMPILED_METHODS = ("reference_compiled", "formula_compiled", "formula_autocast")
NO_VARIANT = "-"
DEFAULT_VARIANT = "default"

#: Bytes per element of S that the eager reference keeps alive through forward and backward
#: (S, labels, the kept copies, log P, Y, masks and where() temporaries). Used only to skip
#: sizes that cannot fit; an OOM that still happens is caught and recorded.
#: Measured on an H200 (torch 2.11): 52 bytes per element at 4096^2, 50 at 16384^2.
REFERENCE_BYTES_PER_NM = 14 * 4
#: The float64 truth of the correctness gate is the same graph in float64.
TRUTH_BYTES_PER_NM = 14 * 8
#: The formula, eager, per element of S (fp32): S, the 0/1 labels, the two targets, the two
#: log-softmaxes (saved for backward) and kl_div's temporaries in forward; in backward the two
#: directions' dS and their sum. Measured on an H200 (torch 2.11, bf16, forward KL, fwd+bwd peak):
#: 38 bytes per element at 4096^2, 36 at 16384^2 and 32768^2. Reverse KL keeps P and
#: log(Y + eps) as well: an estimate, not measured at large N.
FORMULA_EAGER_BYTES_PER_NM = {"forward": 40, "reverse": 56}
#: Compiled, the formula fuses most element-wise work. Measured as above: 9.0 bytes per element at
#: 4096^2, 8.3 at 16384^2, 8.1 at 32768^2 and 65536^2 (issue 13: 7.7). Reverse: an estimate.
FORMULA_COMPILED_BYTES_PER_NM = {"forward": 9, "reverse": 12}
#: Workspace bound passed to sdm_loss (its default).
WORKSPACE_BYTES = 64 * 2**20


class SkipMethod(Exception):
    """This method does not apply to this case (the message says why)."""


# ---------------------------------------------------------------------------------------------
# runners


class LossRunner:
    """A loss method as a function of the case's leaves.

    ``note`` goes to the CSV rows; ``tag`` is a short label the table shows beside the
    status (e.g. "interpreted", the path ``backend="auto"`` picked); ``precision`` is the
    float32 matmul precision the method runs under (set while it is checked, measured and
    timed, then restored), None to leave the default.
    """

    is_loss = True

    def __init__(self, loss_fn: Callable[[], torch.Tensor], leaves: List[torch.Tensor], note: str = "",
                 tag: str = "", precision: Optional[str] = None):
        self.loss_fn = loss_fn
        self.leaves = leaves
        self.note = note
        self.tag = tag
        self.precision = precision

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
        saved = [x.grad for x in self.leaves]
        for x in self.leaves:
            x.grad = None
        loss = self.loss_fn()
        loss.backward()
        grads = [x.grad for x in self.leaves]
        for x, gr in zip(self.leaves, saved):   # the preallocated buffers stay (memory 'beyond inputs')
            x.grad = gr
        return loss.detach(), grads


class FloorRunner:
    """cuBLAS matmuls of the loss's shape: forward S = q g^T; backward S again, dS g and dS^T q."""

    is_loss = False
    note = "torch.mm (cuBLAS on CUDA): fwd 1 matmul, bwd 3, per gallery, in the input dtype"
    tag = ""
    precision = None

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
# the formula users write


def formula_sdm(q: torch.Tensor, g: torch.Tensor, q_ids: Optional[torch.Tensor] = None,
                g_ids: Optional[torch.Tensor] = None, *, labels: Optional[torch.Tensor] = None,
                scale: float = 1.0 / TEMPERATURE, kl: str = "forward", eps: float = EPS,
                combine: str = "mean") -> torch.Tensor:
    """The SDM loss as training scripts write it: IRRA's ``compute_sdm``, the seed's ``sdm_loss_stable``.

    Normalise, fp32 similarities (half inputs upcast first, as the seed does under AMP), the
    target ``Y = y / y.sum(1)`` per direction, ``kl_div(log_softmax(S), Y)`` (forward) or IRRA's
    ``P * (log_softmax(S) - log(Y + eps))`` summed per row (reverse), both directions. No masks
    and no guard for rows without a positive (their target is 0 / 0): the bench runs it only
    where every row and column has one.
    """
    q_hat = F.normalize(q.float(), dim=1)
    g_hat = F.normalize(g.float(), dim=1)
    sim = scale * (q_hat @ g_hat.t())
    y = labels.float() if labels is not None else (q_ids[:, None] == g_ids[None, :]).float()
    losses = []
    for s_dir, y_dir in ((sim, y), (sim.t(), y.t())):
        target = y_dir / y_dir.sum(dim=1, keepdim=True)
        log_p = F.log_softmax(s_dir, dim=1)
        if kl == "forward":
            losses.append(F.kl_div(log_p, target, reduction="batchmean"))
        else:
            p = F.softmax(s_dir, dim=1)
            losses.append(torch.mean(torch.sum(p * (log_p - torch.log(target + eps)), dim=1)))
    return losses[0] + losses[1] if combine == "sum" else 0.5 * (losses[0] + losses[1])


#: Float32 matmul precision of the formula peers: TF32 allowed, as training scripts set it.
FORMULA_PRECISION = "high"


def formula_sdm_autocast(q: torch.Tensor, g: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`formula_sdm` under ``torch.autocast(bfloat16)`` on the inputs' device, as a CLIP-style
    training step under autocast runs it: the similarity matmul in bf16 (bf16 logits), softmax
    and KL in fp32 (autocast's float32 list)."""
    with torch.autocast(device_type=q.device.type, dtype=torch.bfloat16):
        return formula_sdm(q, g, *args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Triton availability and variants


def triton_interpreted() -> bool:
    """Triton kernels run in the interpreter when TRITON_INTERPRET=1 was set before triton was imported."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_skip_reason(device: torch.device) -> Optional[str]:
    """Why the Triton methods cannot run on ``device`` here, or None."""
    if not triton_installed():
        return "triton is not installed (it exists for Linux only; the torch backend runs without it)"
    if device.type == "cuda" or triton_interpreted():
        return None
    return ("Triton on CPU tensors runs only in its interpreter: set TRITON_INTERPRET=1 before triton is "
            "imported (python -m bench does when there is no CUDA)")


def check_variant(variant: str) -> str:
    """``variant`` if it names a kernel config (``sdm_triton.options.KernelConfig.parse``); ValueError if not."""
    if variant == DEFAULT_VARIANT:
        return variant
    from sdm_triton.options import KernelConfig
    KernelConfig.parse(variant)
    return variant


def _takes_kernel_config(fn) -> bool:
    params = inspect.signature(fn).parameters
    return "kernel_config" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _triton_call_kwargs(method: str, variant: str, device: torch.device) -> Tuple[dict, List[str]]:
    """Keyword arguments of the sdm_triton call for this variant, and the note's parts."""
    fn = sdm_triton.sdm_loss_multi if method == "sdm_triton_multi" else sdm_triton.sdm_loss
    notes = []
    if triton_interpreted():
        notes.append("interpreted (TRITON_INTERPRET=1)")
    if variant != DEFAULT_VARIANT:
        if not _takes_kernel_config(fn):
            raise SkipMethod(f"this sdm_triton's {fn.__name__} takes no kernel_config: variants need the new API")
        return dict(backend="triton", kernel_config=variant), notes + [f"kernel_config={variant!r}"]
    if device.type != "cuda":
        # backend="auto" picks the torch backend for CPU tensors: name the kernels to interpret them.
        return dict(backend="triton"), notes + ["backend='triton' (auto picks torch on CPU)"]
    return dict(backend="auto"), notes + ["backend='auto'"]


def _describe_path(q, g, kwargs) -> str:
    """``sdm_triton.describe_path(q, g, **kwargs)`` where the package has it (the path auto picks)."""
    describe = getattr(sdm_triton, "describe_path", None)
    if describe is None:
        return ""
    try:
        return str(describe(q, g, **kwargs))
    except Exception as exc:  # the label must not cost the measurement
        return f"describe_path raised {type(exc).__name__}: {str(exc)[:80]}"


def _check_triton(case: Case, device: torch.device, triton_max_nm: Optional[int]):
    reason = triton_skip_reason(device)
    if reason is not None:
        raise SkipMethod(reason)
    if triton_max_nm is not None and case.n * case.m > triton_max_nm:
        raise SkipMethod(f"Triton limited to N*M <= {triton_max_nm} in this preset"
                         + (" (interpreter)" if triton_interpreted() else ""))


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
    return dict(temperature=TEMPERATURE, kl=case.kl, eps=EPS, combine=case.combine)


def _formula_kwargs(case: Case):
    return dict(scale=1.0 / TEMPERATURE, kl=case.kl, eps=EPS, combine=case.combine)


def sdm_triton_multi_loss(q, gs, **kw):
    """K galleries against one anchor, ``sum_k sdm_loss(q, g_k)``, in one ``sdm_loss_multi`` call.

    ``gs`` is the case's K separate leaf tensors, as a user holding one embedding per
    modality has them: the call concatenates them (a K * M * D copy, included in the time).
    """
    return sdm_triton.sdm_loss_multi(q, list(gs), workspace_bytes=WORKSPACE_BYTES, **kw).sum()


def _joined(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def build(method: str, variant: str, case: Case, inputs: Inputs, device: torch.device,
          triton_max_nm: Optional[int] = None):
    """A runner for ``method`` on ``inputs``, or ``SkipMethod`` with the reason."""
    kw = _sdm_kwargs(case)
    if method == "floor":
        return FloorRunner(inputs)
    if method in TRITON_METHODS:
        if method == "sdm_triton_multi" and case.k == 1:
            raise SkipMethod("multi-gallery cases only (K > 1)")
        _check_triton(case, device, triton_max_nm)
        call_kw, notes = _triton_call_kwargs(method, variant, device)
        multi = dict(galleries=case.k) if method == "sdm_triton_multi" else {}
        path = _describe_path(inputs.q, inputs.gs[0], dict(inputs.label_kwargs(), **kw, **call_kw, **multi))
        tag = _joined("interpreted" if triton_interpreted() else "", f"path: {path}" if path else "")
        if method == "sdm_triton":
            fn = _sum_over_galleries(lambda q, g, **lk: sdm_triton.sdm_loss(
                q, g, workspace_bytes=WORKSPACE_BYTES, **lk, **kw, **call_kw), inputs)
            note = _joined(f"{case.k} sdm_loss calls" if case.k > 1 else "", *notes, f"path: {path}" if path else "")
            return LossRunner(fn, inputs.leaves, note, tag)
        lk = inputs.label_kwargs()
        return LossRunner(lambda: sdm_triton_multi_loss(inputs.q, inputs.gs, **lk, **kw, **call_kw),
                          inputs.leaves, _joined(f"one sdm_loss_multi call for K={case.k}", *notes,
                                                 f"path: {path}" if path else ""), tag)
    if method == "sdm_torch":
        fn = _sum_over_galleries(lambda q, g, **lk: sdm_triton.sdm_loss(
            q, g, backend="torch", workspace_bytes=WORKSPACE_BYTES, **lk, **kw), inputs)
        return LossRunner(fn, inputs.leaves)
    if method == "reference":
        fn = _sum_over_galleries(lambda q, g, **lk: reference.sdm_loss(q, g, **lk, **kw), inputs)
        return LossRunner(fn, inputs.leaves)
    if method == "reference_compiled":
        compiled = _compiled("reference", reference.sdm_loss, device)
        fn = _sum_over_galleries(lambda q, g, **lk: compiled(q, g, **lk, **kw), inputs)
        return LossRunner(fn, inputs.leaves, "torch.compile(reference.sdm_loss, dynamic=False)")
    if method in ("formula_eager", "formula_compiled", "formula_autocast"):
        if not inputs.every_row_has_a_positive():
            raise SkipMethod("the plain formula has no guard for rows without a positive (0 / 0 target)")
        if method == "formula_eager":
            one = formula_sdm
        elif method == "formula_compiled":
            one = _compiled("formula", formula_sdm, device)
        else:
            one = _compiled("formula_autocast", formula_sdm_autocast, device)
        fkw = _formula_kwargs(case)
        fn = _sum_over_galleries(lambda q, g, **lk: one(q, g, **lk, **fkw), inputs)
        calls = f"{case.k} calls, summed; " if case.k > 1 else ""
        compiled = "torch.compile(dynamic=False) of " if method != "formula_eager" else ""
        if method == "formula_autocast":
            what = "the user's formula under torch.autocast(bfloat16): bf16 S; error reported, not gated"
        else:
            what = f"the user's formula, fp32 S, float32 matmul precision {FORMULA_PRECISION!r} (TF32)"
        return LossRunner(fn, inputs.leaves, f"{calls}{compiled}{what}", precision=FORMULA_PRECISION)
    if method == "inf_cl":
        return _inf_cl_runner(case, inputs, device)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def estimate_bytes(method: str, case: Case) -> int:
    """Memory beyond inputs and gradients a method needs, to skip sizes that cannot fit."""
    nm = case.n * case.m
    elt = torch.empty((), dtype=case.torch_dtype).element_size()
    if method in ("reference", "reference_compiled"):
        return case.k * REFERENCE_BYTES_PER_NM * nm   # all K graphs live until backward
    if method == "formula_eager":
        return case.k * FORMULA_EAGER_BYTES_PER_NM[case.kl] * nm
    if method in ("formula_compiled", "formula_autocast"):     # bf16 S: no more than the fp32 one
        return case.k * FORMULA_COMPILED_BYTES_PER_NM[case.kl] * nm
    if method == "floor":
        return 3 * nm * elt                          # dS, S and one product's output
    if method == "inf_cl":
        return case.k * 6 * (case.n + case.m) * case.d * 4
    return 4 * WORKSPACE_BYTES + case.k * 64 * (case.n + case.m) * 4


# ---------------------------------------------------------------------------------------------
# torch.compile peers

_COMPILED = {}
_PROBED = {}
#: torch.compile backend of the compiled peers (tests swap in "eager" to skip code generation).
COMPILE_BACKEND = "inductor"


def _compile_probe(device: torch.device) -> Optional[str]:
    """Compile a tiny forward + backward in a child process; a reason to skip if it fails.

    torch.compile can crash the process natively rather than raise (seen with the
    CPU build of torch 2.13 here: 'free(): invalid next size' in the first compiled
    backward, any function), so the first try happens where a crash costs nothing.
    """
    code = textwrap.dedent(f"""
        import torch
        f = torch.compile(lambda a, b: torch.log_softmax(a @ b.t(), 1).sum(), backend={COMPILE_BACKEND!r})
        q = torch.randn(16, 8, device="{device.type}", requires_grad=True)
        g = torch.randn(16, 8, device="{device.type}", requires_grad=True)
        f(q, g).backward()
        print("ok")
    """)
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                             env=dict(os.environ))
    except subprocess.TimeoutExpired:
        return "torch.compile probe timed out"
    if res.returncode != 0 or "ok" not in res.stdout:
        tail = (res.stderr.strip().splitlines() or ["?"])[-1][:160]
        return f"torch.compile probe failed in a child process (rc={res.returncode}: {tail})"
    return None


def _compiled(name: str, fn: Callable, device: torch.device):
    key = (name, device.type, COMPILE_BACKEND)
    if key not in _COMPILED:
        probe_key = (device.type, COMPILE_BACKEND)
        if device.type == "cpu" and probe_key not in _PROBED:
            _PROBED[probe_key] = _compile_probe(device)
        reason = _PROBED.get(probe_key)
        if reason is None:
            import torch._dynamo as dynamo
            import torch._functorch.config as functorch_config
            # One compiled graph per case: keep every size specialised, never fall back to eager.
            for attr in ("recompile_limit", "cache_size_limit"):
                if hasattr(dynamo.config, attr):
                    setattr(dynamo.config, attr, 1024)
            # A compiled backward with donated buffers refuses retain_graph=True, which the bwd
            # mode needs to replay the backward; donation only lets the backward reuse saved
            # tensors' memory in place.
            if hasattr(functorch_config, "donated_buffer"):
                functorch_config.donated_buffer = False
            _COMPILED[key] = torch.compile(fn, dynamic=False, backend=COMPILE_BACKEND)
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
    factor = 1.0 if case.combine == "sum" else 0.5

    def one(q, g, **_):
        # cal_inf_loss(a, b) = mean_i [logsumexp_j(s a_i.b_j) - s a_i.b_i] on features as given
        # (no normalisation, one direction); the SDM forward loss with unique ids is the mean
        # (combine="mean"; the sum for combine="sum") of the two directions of the same on
        # normalised features.
        qn = F.normalize(q.float(), dim=1)
        gn = F.normalize(g.float(), dim=1)
        return factor * (cal_inf_loss(qn, gn, scale=scale, head_dim=head_dim)
                         + cal_inf_loss(gn, qn, scale=scale, head_dim=head_dim))
    return LossRunner(_sum_over_galleries(one, inputs), inputs.leaves,
                      f"{factor} * (cal_inf_loss(q^, g^) + cal_inf_loss(g^, q^)), head_dim={head_dim}, TF32 products")
