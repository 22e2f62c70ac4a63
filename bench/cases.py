"""What is measured: cases (shape, dtype, loss options, labels), presets, and their inputs.

A case is one loss problem: an anchor ``q`` [N, D] against ``K`` galleries
``g_k`` [M, D] (K = 1 for the ordinary call; K = 15 is ReID5o's step, 15 SDM
losses against one anchor). Every method sees the same inputs and computes the
sum of the K losses, so its gradients are directly comparable.

A preset is a few case families (one loss setting at several sizes, e.g. IRRA's)
and the methods and modes to run on them.
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
COMBINES = ("mean", "sum")
MODES = ("fwd", "bwd", "fwd+bwd")
#: Matrix products of shape [N, D] x [D, M] the loss needs per gallery in each mode (the floor's):
#: forward S = q g^T; backward S again (recomputed), dS g and dS^T q.
PRODUCTS_PER_MODE = {"fwd": 1, "bwd": 3, "fwd+bwd": 4}


@dataclasses.dataclass(frozen=True)
class Case:
    n: int
    m: int
    d: int
    dtype: str = "bf16"
    kl: str = "forward"
    labels: str = "pk4"     # "pk4": 4 samples per identity, "unique": arange(N), "dense": soft [N, M] labels
    k: int = 1              # galleries against the one anchor
    combine: str = "mean"   # how the two directions combine: "mean" (the seed, CLIP) or "sum" (IRRA)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.labels not in LABEL_KINDS:
            raise ValueError(f"labels must be one of {LABEL_KINDS}, got {self.labels!r}")
        if self.kl not in KL_KINDS:
            raise ValueError(f"kl must be one of {KL_KINDS}, got {self.kl!r}")
        if self.combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {self.combine!r}")
        if min(self.n, self.m, self.d, self.k) < 1:
            raise ValueError(f"sizes must be >= 1: {self}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def group(self) -> Tuple:
        """Cases that differ only in size share a plot panel."""
        return (self.dtype, self.kl, self.labels, self.combine, self.d, self.k)

    def flops(self, mode: str) -> float:
        """FLOPs of the matrix products the loss needs in ``mode`` (2 N M D per product, K galleries)."""
        return PRODUCTS_PER_MODE[mode] * 2.0 * self.n * self.m * self.d * self.k

    def label(self) -> str:
        size = f"{self.n}x{self.m}x{self.d}"
        combine = " combine=sum" if self.combine == "sum" else ""
        multi = f" K={self.k}" if self.k > 1 else ""
        return f"{size} {self.dtype} {self.kl} {self.labels}{combine}{multi}"


@dataclasses.dataclass(frozen=True)
class Family:
    """One loss setting at several sizes (square unless a size says N x M)."""

    name: str
    sizes: Tuple[Tuple[int, int], ...]
    d: int
    dtypes: Tuple[str, ...]
    kl: str
    labels: Tuple[str, ...]
    combine: str = "mean"
    k: int = 1

    def cases(self) -> List[Case]:
        return [Case(n, m, self.d, dt, self.kl, lab, self.k, self.combine)
                for (n, m), dt, lab in itertools.product(self.sizes, self.dtypes, self.labels)]


def _square(*ns: int) -> Tuple[Tuple[int, int], ...]:
    return tuple((n, n) for n in ns)


# The published settings (docs/contract.md, "Settings of published users"; issues 13 and 14), D = 512 on the GPU.
#: IRRA (also MLLM4Text-ReID): fp32, reverse KL, eps 1e-8, s = 50, the two directions summed, P x K
#: batches, B = 64-512 per GPU (256 and 1024 too: the latency targets name them).
IRRA = Family("irra", _square(64, 128, 256, 512, 1024), 512, ("fp32",), "reverse", ("pk4",), "sum")
#: The seed's corrected loss (forward KL, mean of the directions) on bf16 features, training batch sizes.
BF16 = Family("bf16", _square(64, 256, 1024, 4096), 512, ("bf16",), "forward", ("pk4",))
#: ReID5o: one anchor against 15 modality galleries at B = 64, IRRA's loss 15 times a step.
REID5O = Family("reid5o", _square(64), 512, ("fp32",), "reverse", ("pk4",), "sum", k=15)
#: Large batches (gathered across GPUs): bf16, forward KL, 4 per identity and CLIP's unique ids.
LARGE = Family("large", _square(16384, 32768, 65536, 131072), 512, ("bf16",), "forward", ("pk4", "unique"))
#: Dense soft labels, fp32, reverse (the general-label path).
DENSE = Family("dense", _square(1024, 4096), 512, ("fp32",), "reverse", ("dense",))

@dataclasses.dataclass(frozen=True)
class Preset:
    """Case families and what to run on them."""

    description: str
    families: Tuple[Family, ...]
    methods: Tuple[str, ...]
    modes: Tuple[str, ...] = MODES
    #: Largest N*M at which the Triton methods run (None: no limit). Under the
    #: CPU interpreter the kernels are slow, so the cpu preset keeps them tiny.
    triton_max_nm: Optional[int] = None

    def cases(self) -> List[Case]:
        out: List[Case] = []
        for fam in self.families:
            out += [c for c in fam.cases() if c not in out]
        return out


_GPU_METHODS = ("floor", "sdm_triton", "sdm_torch", "reference", "reference_compiled",
                "formula_eager", "formula_compiled", "formula_autocast", "inf_cl", "sdm_triton_multi")


def _only(fam: Family, *ns: int, labels: Optional[Tuple[str, ...]] = None) -> Family:
    return dataclasses.replace(fam, sizes=_square(*ns), labels=labels or fam.labels)


PRESETS = {
    # Tiny, for a machine without GPU: every family's setting at 16-64 rows, D = 32; the Triton
    # kernels interpreted at N*M <= 256 only. Well under a minute on 2 cores. Not compiled peers:
    # torch.compile spends ~20 s per graph on a CPU.
    "cpu": Preset(
        "tiny CPU run of every setting (Triton interpreted at the smallest sizes)",
        (Family("irra", _square(16, 64), 32, ("fp32",), "reverse", ("pk4",), "sum"),
         Family("bf16", _square(16), 32, ("bf16",), "forward", ("pk4",)),
         Family("unique", _square(64), 32, ("fp32",), "forward", ("unique",)),
         Family("dense", _square(64), 32, ("fp32",), "reverse", ("dense",)),
         Family("reid5o", _square(16), 32, ("fp32",), "reverse", ("pk4",), "sum", k=3)),
        ("floor", "sdm_triton", "sdm_torch", "reference", "formula_eager", "inf_cl", "sdm_triton_multi"),
        triton_max_nm=16 * 16),
    # Issue 14: training batch sizes, where the host dominates.
    "gpu-latency": Preset("training batch sizes (IRRA, bf16 forward, ReID5o K = 15)", (IRRA, BF16, REID5O),
                          _GPU_METHODS),
    # Issue 13: large batches, where the N x M passes dominate. Methods that would not fit are
    # skipped with the reason (estimate per method, bench/methods.py::estimate_bytes).
    "gpu-throughput": Preset("large batches, bf16 forward, pk4 and unique ids", (LARGE,), _GPU_METHODS),
    "gpu-full": Preset("gpu-latency + gpu-throughput + dense labels", (IRRA, BF16, REID5O, LARGE, DENSE),
                       _GPU_METHODS),
    # A few minutes on one H200 (most of it compiling the two torch.compile peers): one case of each.
    "gpu-quick": Preset(
        "one case of each setting, a few minutes",
        (_only(IRRA, 128), _only(BF16, 4096), REID5O, _only(LARGE, 16384)), _GPU_METHODS),
}


def family_names() -> Tuple[str, ...]:
    """Every family name of every preset (the choices of ``--families``)."""
    return tuple(sorted({f.name for p in PRESETS.values() for f in p.families}))


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

    def every_row_has_a_positive(self) -> bool:
        """Rows and columns all have a positive (the plain formula divides by the count)."""
        if self.labels is not None:
            return bool((self.labels.sum(1) > 0).all()) and bool((self.labels.sum(0) > 0).all())
        return bool(torch.isin(self.q_ids, self.g_ids).all()) and bool(torch.isin(self.g_ids, self.q_ids).all())

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
