"""What is measured: cases (shape, dtype, loss options, labels), presets, and their inputs.

A case is one loss problem: an anchor ``q`` [N, D] against ``K`` galleries
``g_k`` [M, D] (K = 1 for the ordinary call; K = 15 is ReID5o's step, 15 SDM
losses against one anchor). Every method sees the same inputs and computes the
sum of the K losses, so its gradients are directly comparable.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import List, Optional, Tuple

import torch

#: IRRA's fixed logit scale s = 50 (temperature 0.02), used by every case.
TEMPERATURE = 0.02
#: IRRA's epsilon for the reverse divergence.
EPS = 1e-8

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LABEL_KINDS = ("pk4", "unique", "dense")
KL_KINDS = ("forward", "reverse")
MODES = ("fwd", "bwd", "fwd+bwd")
KL_CHOICES_HELP = "main grid divergences from: forward, reverse"


@dataclasses.dataclass(frozen=True)
class Case:
    n: int
    m: int
    d: int
    dtype: str = "bf16"
    kl: str = "forward"
    labels: str = "pk4"     # "pk4": 4 samples per identity, "unique": arange(N), "dense": soft [N, M] labels
    k: int = 1              # galleries against the one anchor

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.labels not in LABEL_KINDS:
            raise ValueError(f"labels must be one of {LABEL_KINDS}, got {self.labels!r}")
        if self.kl not in KL_KINDS:
            raise ValueError(f"kl must be one of {KL_KINDS}, got {self.kl!r}")
        if min(self.n, self.m, self.d, self.k) < 1:
            raise ValueError(f"sizes must be >= 1: {self}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def group(self) -> Tuple:
        """Cases that differ only in size share a plot panel."""
        return (self.dtype, self.kl, self.labels, self.d, self.k)

    def label(self) -> str:
        size = f"{self.n}x{self.m}x{self.d}"
        multi = f" K={self.k}" if self.k > 1 else ""
        return f"{size} {self.dtype} {self.kl} {self.labels}{multi}"


@dataclasses.dataclass(frozen=True)
class Preset:
    """A grid of square-ish main cases plus a few extra cases, and what to run on them."""

    sizes: Tuple[Tuple[int, int], ...]
    d: int
    dtypes: Tuple[str, ...]
    kls: Tuple[str, ...]
    labels: Tuple[str, ...]
    extras: Tuple[Case, ...]
    methods: Tuple[str, ...]
    modes: Tuple[str, ...] = MODES
    #: Largest N*M at which the Triton methods run (None: no limit). Under the
    #: CPU interpreter the kernels are slow, so the cpu preset keeps them tiny.
    triton_max_nm: Optional[int] = None

    def cases(self) -> List[Case]:
        grid = [Case(n, m, self.d, dt, kl, lab)
                for (n, m), dt, kl, lab in itertools.product(self.sizes, self.dtypes, self.kls, self.labels)]
        return grid + [c for c in self.extras if c not in grid]


_GPU_METHODS = ("floor", "sdm_triton", "sdm_torch", "reference", "reference_compiled", "inf_cl",
                "sdm_triton_multi")

PRESETS = {
    # Tiny, for a machine without GPU: the chunked torch backend, the reference and the
    # interpreted Triton kernels (smallest size only). Runs in well under a minute on 2 cores.
    "cpu": Preset(
        sizes=((32, 32), (64, 64)), d=32, dtypes=("fp32",), kls=("forward",), labels=("pk4", "unique"),
        extras=(Case(32, 32, 32, "bf16", "forward", "pk4"),
                Case(32, 32, 32, "fp32", "reverse", "dense"),
                Case(32, 32, 32, "fp32", "reverse", "pk4", k=3)),
        methods=("floor", "sdm_triton", "sdm_torch", "reference", "inf_cl", "sdm_triton_multi"),
        triton_max_nm=32 * 32),
    # A few minutes on one H100: the main bf16 case at three sizes, the fp32 / reverse /
    # dense-labels case once, and ReID5o's 15 galleries against one anchor.
    "gpu-quick": Preset(
        sizes=((1024, 1024), (4096, 4096), (16384, 16384)), d=512, dtypes=("bf16",), kls=("forward",),
        labels=("pk4", "unique"),
        extras=(Case(4096, 4096, 512, "fp32", "reverse", "dense"),
                Case(256, 256, 512, "bf16", "reverse", "pk4", k=15)),
        methods=_GPU_METHODS),
    # The full sweep, where memory allows (methods that would not fit are skipped with the reason).
    "gpu-full": Preset(
        sizes=tuple((n, n) for n in (256, 1024, 4096, 16384, 32768, 65536)), d=512, dtypes=("bf16",),
        kls=("forward",), labels=("pk4", "unique"),
        extras=tuple(Case(n, n, 512, "fp32", "reverse", "dense") for n in (1024, 4096, 16384))
        + tuple(Case(n, n, 512, "bf16", "reverse", "pk4", k=15) for n in (64, 256, 512)),
        methods=_GPU_METHODS),
}


@dataclasses.dataclass
class Inputs:
    """The tensors of one case. ``q`` and each ``g`` are leaves that require grad."""

    q: torch.Tensor
    gs: List[torch.Tensor]
    q_ids: Optional[torch.Tensor]
    g_ids: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]

    @property
    def leaves(self) -> List[torch.Tensor]:
        return [self.q, *self.gs]

    def label_kwargs(self):
        if self.labels is not None:
            return dict(labels=self.labels)
        return dict(q_ids=self.q_ids, g_ids=self.g_ids)

    def allocate_grads(self):
        """Gradient buffers exist before any measurement, so memory 'beyond inputs' excludes them."""
        for x in self.leaves:
            if x.grad is None:
                x.grad = torch.zeros_like(x)

    def input_bytes(self) -> int:
        ts = [*self.leaves, self.q_ids, self.g_ids, self.labels]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def input_bytes_estimate(case: Case) -> int:
    """Inputs and their gradients, before allocating them."""
    elt = torch.empty((), dtype=case.torch_dtype).element_size()
    feats = 2 * (case.n + case.k * case.m) * case.d * elt      # features and their .grad
    labels = case.n * case.m * 4 if case.labels == "dense" else 8 * (case.n + case.m)
    return feats + labels


def _ids(count: int, kind: str, gen: torch.Generator, device) -> torch.Tensor:
    if kind == "unique":
        return torch.arange(count, device=device)
    perm = torch.randperm(count, generator=gen, device=gen.device).to(device)
    return (torch.arange(count, device=device) // 4)[perm]


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Inputs:
    """Independent Gaussian features and the case's labels.

    Independent features keep the loss well conditioned (logits s * cos with
    cos ~ N(0, 1/D)); features where matching pairs are already close make
    P_ii = 1 - O(e^-20), so the loss and gradients sit below fp32 resolution
    and no implementation could be checked on them. Timing does not depend on the values.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dt = case.torch_dtype
    q = torch.randn(case.n, case.d, generator=gen).to(device=device, dtype=dt).requires_grad_()
    gs = [torch.randn(case.m, case.d, generator=gen).to(device=device, dtype=dt).requires_grad_()
          for _ in range(case.k)]
    id_kind = "unique" if case.labels == "unique" else "pk4"
    q_ids = _ids(case.n, id_kind, gen, "cpu")
    g_ids = q_ids if case.m == case.n else _ids(case.m, id_kind, gen, "cpu")
    if case.labels == "dense":
        # Soft weights on the pk4 positives (e.g. a confidence per pair).
        eq = (q_ids[:, None] == g_ids[None, :]).float()
        labels = (eq * (0.5 + 0.5 * torch.rand(case.n, case.m, generator=gen))).to(device)
        return Inputs(q, gs, None, None, labels)
    return Inputs(q, gs, q_ids.to(device), g_ids.to(device), None)
