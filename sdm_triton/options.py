"""The SDM loss's contract on the host: option types, result types and argument validation.

Shared by every implementation (the Triton and torch backends, the distributed entry point
and the oracle ``sdm_triton.reference``), so they raise the same errors with the same
messages. Nothing here imports Triton, and nothing here reads device memory except
``check_values``, which callers opt into: validation looks at types, shapes, dtypes and
devices only, so it never synchronises with the GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import NamedTuple, Optional, Union

import torch

#: ``F.normalize`` semantics: x / max(||x||, NORM_EPS). A zero row stays zero.
NORM_EPS = 1e-12
#: 2^64: the fp32 computation normalises rows shorter than this; a longer row's square sum
#: overflows fp32 and its raw dot products can, so normalised it gives NaN, never a wrong loss.
NORM_LIMIT = 2.0**64
#: Dense labels are multiplied by 2^24 where they are read (exact): only Y = y / ysum matters, and
#: the scaling keeps 1 / ysum finite for subnormal labels. The price is range: a weight past 2^104
#: (~2e31) is inf once scaled, and a row's scaled sums overflow sooner (sum y ln y, which forward
#: KL reads, from weights of ~1e29): the loss is NaN. The label terms of forward KL,
#: sum_j Y ln Y = ylny / ysum - ln ysum, take their logarithms of the unscaled weights (ylny =
#: sum y ln(y / LABEL_SCALE), then ln(ysum / LABEL_SCALE)): with the scaled ones both terms
#: carry ln 2^24 = 16.6, whose fp32 cancellation erred by 5e-6 in a loss of 2e-3, 10x the
#: reference (issue 26, dense binary labels on the GPU).
LABEL_SCALE = 2.0**24
#: The fp32 range every float argument (logit scale, 1 / temperature, eps) must lie in: normal
#: numbers, so that 1 / (s log2 e) and ln eps stay finite in the kernels.
FLT_MIN = float(torch.finfo(torch.float32).tiny)
#: The largest logit scale the fp32 computation can hold (1 / temperature must be finite in fp32).
MAX_SCALE = float(torch.finfo(torch.float32).max)

KL_CHOICES = ("forward", "reverse")
DIRECTION_CHOICES = ("both", "q2g", "g2q")
COMBINE_CHOICES = ("mean", "sum")
REDUCTION_CHOICES = ("mean", "sum", "none")
FEATURE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
BACKWARD_CHOICES = ("auto", "fused", "chunked")
#: KernelConfig.positives: how the forward gets the positives' terms of identity labels
#: (launch/policy.positives_path).
POSITIVES_CHOICES = ("auto", "tiles", "centroids")
#: KernelConfig.w_dtype: how the backward's products hold W = dS p_i p_j / gmax for bf16 / fp16
#: inputs (launch/policy.w_dtype_path; fp32 inputs: one fp32 product whatever it says). "split":
#: hi + lo halves of the input dtype (two products per side, exact to ~16 bits); "fp16": W
#: rounded once to fp16 and the features' operands cast to fp16 (one product per side).
W_DTYPE_CHOICES = ("auto", "split", "fp16")
#: KernelConfig.forward: the Triton forward's launches (launch/policy.forward_path). "staged":
#: prep, statistics, finish (three launches, column segments); "single": all of it in one launch
#: (kernels/single.py), a program per row block against every column.
FORWARD_CHOICES = ("auto", "staged", "single")


@dataclasses.dataclass(frozen=True)
class SDMOptions:
    """The non-tensor options of the loss, validated once and passed as one object."""

    kl: str = "forward"
    eps: float = 1e-8
    direction: str = "both"
    combine: str = "mean"
    reduction: str = "mean"
    normalize: bool = True

    def __post_init__(self):
        check_choice("kl", self.kl, KL_CHOICES)
        check_choice("direction", self.direction, DIRECTION_CHOICES)
        check_choice("combine", self.combine, COMBINE_CHOICES)
        check_choice("reduction", self.reduction, REDUCTION_CHOICES)
        if not isinstance(self.normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(self.normalize).__name__}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)):
            raise TypeError(f"eps must be a float, got {type(self.eps).__name__}")
        if not math.isfinite(self.eps) or self.eps < 0:
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps}")
        if self.eps != 0 and not FLT_MIN <= self.eps <= MAX_SCALE:
            raise ValueError(f"eps must be 0 or a normal fp32 number, in [{FLT_MIN:.4e}, {MAX_SCALE:.4e}] (the "
                             f"kernels compute in fp32: {self.eps} rounds to 0, a subnormal or inf there), got {self.eps}")
        if self.kl == "reverse" and self.eps <= 0:
            raise ValueError("eps must be > 0 for kl='reverse' (log(Y + eps) is -inf at Y = 0)")

    def name(self) -> str:
        """The canonical name, e.g. ``"kl=forward,eps=1e-08,direction=both,combine=mean,reduction=mean,
        normalize=True"``: ``SDMOptions.parse(o.name()) == o`` (the options as one value, as the
        ``torch.library`` operators take them, ops.py)."""
        return (f"kl={self.kl},eps={float(self.eps)!r},direction={self.direction},combine={self.combine},"
                f"reduction={self.reduction},normalize={self.normalize}")

    @classmethod
    def parse(cls, name: str) -> "SDMOptions":
        """The options of a name (`name`; fields left out keep their defaults), validated; parsed
        once per name (an operator parses its options on every call; not cached while
        torch.compile traces, which does not follow the cache)."""
        if not isinstance(name, str):
            raise TypeError(f"SDMOptions.parse takes a str, got {type(name).__name__}")
        return _parse_options.__wrapped__(name) if torch.compiler.is_compiling() else _parse_options(name)

    @property
    def reverse(self) -> bool:
        return self.kl == "reverse"

    @property
    def wants_q2g(self) -> bool:
        return self.direction in ("both", "q2g")

    @property
    def wants_g2q(self) -> bool:
        return self.direction in ("both", "g2q")


class SDMRowLosses(NamedTuple):
    """``reduction="none"``: per-row losses of each direction and their validity.

    Invalid rows (masked, or without any positive among the valid columns) hold 0
    and get no gradient. A direction that was not asked for is ``None``.
    """

    q2g: Optional[torch.Tensor]
    g2q: Optional[torch.Tensor]
    q2g_valid: Optional[torch.Tensor]
    g2q_valid: Optional[torch.Tensor]


@dataclasses.dataclass(frozen=True)
class SDMStats:
    """Cheap by-products of the loss, for training logs (all detached; [K] fields from
    ``sdm_loss_multi``, the anchor's norms 0-dim)."""

    valid_q2g: torch.Tensor        # number of valid query rows (int64)
    valid_g2q: torch.Tensor        # number of valid gallery rows
    pos_prob_q2g: torch.Tensor     # mean over valid rows of the softmax mass on positives
    pos_prob_g2q: torch.Tensor
    q_norm_mean: torch.Tensor      # feature norms before normalisation (present samples)
    q_norm_max: torch.Tensor
    g_norm_mean: torch.Tensor
    g_norm_max: torch.Tensor


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Expert knobs of the Triton backend, for benchmarks and tests; ``None`` = choose automatically.

    block_m, block_n, block_k, num_warps, num_stages: tile shape (rows, columns, feature
    dim step) and launch parameters of the forward statistics pass; bwd_*: the same for the
    backward's kernel (fused or chunked), but for the step along D, which is the forward's
    block_k (the backward rebuilds S step for step as the forward did); segments: column
    segments per row block in the forward; backward: "fused" (one launch, gradients accumulated in the kernel: small
    problems) or "chunked" (dL/dS written to a bounded workspace chunk by chunk and
    multiplied with cuBLAS: large problems); forward: "staged" (prep, statistics and finish,
    three launches) or "single" (one launch: training batch sizes, issue 28); positives: "tiles" (identity labels compared and
    summed inside the forward's N x M loop) or "centroids" (identity labels: counts and logit
    sums from identity centroids outside it; the negatives' softmax mass of reverse KL and the
    statistics from a compare of int32 ranks inside it; dense labels: tiles); w_dtype, for
    bf16 / fp16 inputs only (fp32 inputs ignore it): "split" (the backward's products take dL/dS
    as hi + lo halves of the input dtype: two products per side, the exact form) or "fp16"
    (dL/dS rounded once to fp16, scaled into its range, and the features' operands in fp16: one
    product per side, an error of up to a few roundings of the gradient at near-perfect fits:
    docs/contract.md, precision); "auto" is "split"
    (`launch.policy.w_dtype_path`).

    ``KernelConfig.parse("chunked_wfp16_m128n128k64w8s3_bm128bn64bw8")`` reads the same fields
    from a name (tokens ``fused``, ``chunked``, ``staged``, ``single``, ``tiles``, ``centroids``, ``wsplit``, ``wfp16``,
    ``auto`` (sets nothing), and ``m n k w s seg bm bn bw bs`` + number: ``w8`` is num_warps).
    """

    block_m: Optional[int] = None
    block_n: Optional[int] = None
    block_k: Optional[int] = None
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None
    segments: Optional[int] = None
    backward: str = "auto"
    positives: str = "auto"
    w_dtype: str = "auto"
    forward: str = "auto"
    bwd_block_m: Optional[int] = None
    bwd_block_n: Optional[int] = None
    bwd_num_warps: Optional[int] = None
    bwd_num_stages: Optional[int] = None

    def __post_init__(self):
        check_choice("backward", self.backward, BACKWARD_CHOICES)
        check_choice("positives", self.positives, POSITIVES_CHOICES)
        check_choice("KernelConfig.w_dtype", self.w_dtype, W_DTYPE_CHOICES)
        check_choice("KernelConfig.forward", self.forward, FORWARD_CHOICES)
        for name in ("block_m", "block_n", "block_k", "bwd_block_m", "bwd_block_n"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 16 or v & (v - 1)):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 16, got {v!r}")
        for name in ("num_warps", "num_stages", "segments", "bwd_num_warps", "bwd_num_stages"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"KernelConfig.{name} must be an int >= 1, got {v!r}")

    def name(self) -> str:
        """The canonical name: ``KernelConfig.parse(c.name()) == c``."""
        parts = [v for v in (self.forward, self.backward, self.positives) if v != "auto"]
        parts += [_W_DTYPE_TOKENS[self.w_dtype]] if self.w_dtype != "auto" else []
        sizes = "".join(f"{token}{getattr(self, field)}" for token, field in self._TOKENS.items()
                        if getattr(self, field) is not None)
        return "_".join(parts + ([sizes] if sizes else [])) or "auto"

    _TOKENS = {"seg": "segments", "m": "block_m", "n": "block_n", "k": "block_k", "w": "num_warps",
               "s": "num_stages", "bm": "bwd_block_m", "bn": "bwd_block_n",
               "bw": "bwd_num_warps", "bs": "bwd_num_stages"}

    @classmethod
    def parse(cls, name: str) -> "KernelConfig":
        """The config of a name (`name`), validated; parsed once per name (an operator parses
        its config on every call; not cached while torch.compile traces)."""
        if not isinstance(name, str):
            raise TypeError(f"kernel_config must be a KernelConfig or a str, got {type(name).__name__}")
        return _parse_kernel_config.__wrapped__(name) if torch.compiler.is_compiling() else _parse_kernel_config(name)


@functools.lru_cache(maxsize=256)
def _parse_options(name: str) -> SDMOptions:
    fields = {}
    if name.strip() not in ("", "default"):
        for item in name.split(","):
            key, sep, value = (x.strip() for x in item.partition("="))
            if not sep or key not in _OPTION_FIELDS:
                raise ValueError(f"SDMOptions name {name!r}: cannot read {item!r} (expected "
                                 f"'key=value' items with keys {', '.join(_OPTION_FIELDS)})")
            fields[key] = _OPTION_FIELDS[key](value)
    return SDMOptions(**fields)


def _bool_text(value: str) -> bool:
    if value not in ("True", "False"):
        raise ValueError(f"SDMOptions name: normalize must be True or False, got {value!r}")
    return value == "True"


_OPTION_FIELDS = {"kl": str, "eps": float, "direction": str, "combine": str, "reduction": str,
                  "normalize": _bool_text}


#: KernelConfig.w_dtype's name tokens: a "w" and a word, never "w" + digits (num_warps).
_W_DTYPE_TOKENS = {"split": "wsplit", "fp16": "wfp16"}


@functools.lru_cache(maxsize=256)
def _parse_kernel_config(name: str) -> KernelConfig:
    fields, rest = {}, name.strip().lower()
    if rest in ("", "auto", "default"):
        return KernelConfig()
    for token in filter(None, re.split(r"[_\-\s]+", rest)):
        if token in ("auto", "default"):         # what is not named is chosen: "auto_centroids"
            continue
        if token in ("fused", "chunked"):
            fields["backward"] = token
            continue
        if token in ("staged", "single"):
            fields["forward"] = token
            continue
        if token in ("tiles", "centroids"):
            fields["positives"] = token
            continue
        if token in _W_DTYPE_TOKENS.values():
            fields["w_dtype"] = token[1:]
            continue
        parts = re.findall(r"(seg|b[mnws]|[mnkws])(\d+)", token)
        if not parts or "".join(a + b for a, b in parts) != token:
            raise ValueError(f"kernel_config {name!r}: cannot read {token!r} (expected e.g. "
                             "'chunked_m128n128k64w8s3' or 'fused_m16n32')")
        for key, value in parts:
            fields[KernelConfig._TOKENS[key]] = int(value)
    return KernelConfig(**fields)


def as_kernel_config(value: Union[None, str, KernelConfig]) -> KernelConfig:
    """``kernel_config=`` as given by a caller: None, a name (``KernelConfig.parse``) or a KernelConfig."""
    if value is None:
        return KernelConfig()
    if isinstance(value, KernelConfig):
        return value
    return KernelConfig.parse(value)


def check_choice(name: str, value, choices) -> str:
    """``value`` if it is one of the strings ``choices``; else the ValueError every option string
    raises (the loss's options, the backend, the distributed strategy, layout and convention)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def resolve_scale(temperature, logit_scale, features: torch.Tensor, move: bool = True):
    """The logit scale ``s``: a Python float, or a 0-dim tensor on the features' device.

    ``logit_scale`` takes precedence over ``temperature`` (``s = 1 / temperature``). It may be
    a float, or a 0-dim floating tensor (which may require grad) on the features' device or
    on the CPU (IRRA keeps its scale there; it is moved, differentiably, unless ``move`` is
    False: validation only). A float scale must
    be finite, > 0 and within fp32's range; a tensor's value is only checked on the device
    (``check_values``), since reading it would synchronise.
    """
    if logit_scale is not None:
        if isinstance(logit_scale, torch.Tensor):
            if logit_scale.dim() != 0:
                raise ValueError(f"logit_scale must be a float or a 0-dim tensor, got shape "
                                 f"{tuple(logit_scale.shape)}")
            if not logit_scale.is_floating_point():
                raise TypeError(f"logit_scale must be a floating tensor, got {logit_scale.dtype}")
            if logit_scale.device != features.device:
                if logit_scale.device.type != "cpu":
                    raise ValueError(f"logit_scale is on {logit_scale.device} but the features are on "
                                     f"{features.device}")
                if move:
                    logit_scale = logit_scale.to(features.device, non_blocking=True)
            return logit_scale
        scale = _positive_float("logit_scale", logit_scale)
        if not FLT_MIN <= scale <= MAX_SCALE:
            raise ValueError(f"logit_scale must be a normal fp32 number, in [{FLT_MIN:.4e}, {MAX_SCALE:.4e}] "
                             f"(the kernels compute in fp32), got {scale}")
        return scale
    if isinstance(temperature, torch.Tensor):
        raise TypeError("temperature must be a float; pass a tensor as logit_scale= (= 1 / temperature)")
    tau = _positive_float("temperature", temperature)
    if not FLT_MIN <= 1.0 / tau <= MAX_SCALE:
        raise ValueError(f"temperature must lie in [{1 / MAX_SCALE:.4e}, {1 / FLT_MIN:.4e}]: the logit scale "
                         f"1 / temperature must be a normal fp32 number (the kernels compute in fp32), got {tau}")
    return 1.0 / tau


def resolve_ids(q: torch.Tensor, g: torch.Tensor, q_ids, g_ids):
    """(q_ids, g_ids) with the paired-batch default: when only one of them is given and
    N == M, row i of q and row i of g are the same sample (IRRA's ``compute_sdm(img, txt, pid)``).
    q and g are checked first: the default reads their row counts."""
    validate_features(q, g)
    if (q_ids is None) == (g_ids is None):
        return q_ids, g_ids
    n = q.shape[0] if isinstance(q, torch.Tensor) and q.dim() >= 1 else None
    m = g.shape[0] if isinstance(g, torch.Tensor) and g.dim() >= 1 else None
    if n is not None and n == m:
        return (q_ids, q_ids) if g_ids is None else (g_ids, g_ids)
    missing = "g_ids" if g_ids is None else "q_ids"
    raise ValueError(f"{missing} is required when N != M (got N={n}, M={m}); q_ids and g_ids may be "
                     "shared only by a paired batch")


def validate_features(q, g=None):
    """The checks of q and g (g None: q alone) made before anything else reads them (the ids'
    paired-batch default reads their row counts)."""
    for name, t in (("q", q), ("g", g)) if g is not None else (("q", q),):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [rows, D], got shape {tuple(t.shape)}")
        if t.dtype not in FEATURE_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); SDM needs at least one row and D >= 1")
    if g is None:
        return
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"q and g must have the same feature dim D, got {q.shape[1]} and {g.shape[1]}")
    if q.dtype != g.dtype:
        raise TypeError(f"q and g must have the same dtype, got {q.dtype} and {g.dtype}")
    if q.device != g.device:
        raise ValueError(f"q and g must be on the same device, got {q.device} and {g.device}")


def validate_inputs(q, g, q_ids, g_ids, labels, q_mask, g_mask):
    """Type, shape, dtype and device checks. Raises TypeError or ValueError naming the argument.

    Any strides are accepted for every tensor (a column of a [B, modalities] presence matrix
    as a mask, a column of a [B, 2] (pid, camera) table as ids, transposed labels).
    """
    validate_features(q, g)
    n, m = q.shape[0], g.shape[0]

    have_ids = q_ids is not None or g_ids is not None
    if have_ids and labels is not None:
        raise ValueError("pass either q_ids/g_ids or labels, not both")
    if not have_ids and labels is None:
        raise ValueError("pass identity labels (q_ids and g_ids) or a dense labels matrix")
    if have_ids:
        if q_ids is None or g_ids is None:
            raise ValueError("q_ids and g_ids must be given together (or one of them for a paired batch, N == M)")
        for name, t, length in (("q_ids", q_ids, n), ("g_ids", g_ids, m)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 1 or t.shape[0] != length:
                raise ValueError(f"{name} must have shape [{length}], got {tuple(t.shape)}")
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device} but the features are on {q.device}")
        if q_ids.dtype != g_ids.dtype and torch.uint64 in (q_ids.dtype, g_ids.dtype):
            raise TypeError(f"q_ids and g_ids compare as int64 values: uint64 ids can be mixed only with "
                            f"uint64 ones, got {q_ids.dtype} and {g_ids.dtype}")
    else:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.shape != (n, m):
            raise ValueError(f"labels must have shape [{n}, {m}], got {tuple(labels.shape)}")
        if not (labels.is_floating_point() or labels.dtype == torch.bool):
            raise TypeError(f"labels must be a float or bool tensor, got {labels.dtype}")
        if labels.device != q.device:
            raise ValueError(f"labels is on {labels.device} but the features are on {q.device}")
        if labels.requires_grad:
            raise ValueError("labels require grad, but the loss gives them no gradient (they are constants "
                             "of the loss): pass labels.detach()")

    for name, t, length in (("q_mask", q_mask, n), ("g_mask", g_mask, m)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a bool tensor, got {type(t).__name__}")
        if t.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor, got {t.dtype}")
        if t.dim() != 1 or t.shape[0] != length:
            raise ValueError(f"{name} must have shape [{length}], got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but the features are on {q.device}")


def comparable_ids(q_ids, g_ids):
    """(q_ids, g_ids) of one integer dtype: as given when they share it, else both as int64 (a
    copy of N + M values), so every backend compares them by value (int8 -1 is not uint8 255;
    PyTorch has no promotion for some unsigned pairs)."""
    if q_ids is None or g_ids is None or q_ids.dtype == g_ids.dtype:
        return q_ids, g_ids
    return q_ids.to(torch.int64), g_ids.to(torch.int64)


def validate_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def validate_workspace_bytes(workspace_bytes) -> int:
    if isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int):
        raise TypeError(f"workspace_bytes must be an int, got {type(workspace_bytes).__name__}")
    if workspace_bytes < 1:
        raise ValueError(f"workspace_bytes must be >= 1, got {workspace_bytes}")
    return workspace_bytes


def check_values(q, g, labels, scale, q_mask=None, g_mask=None):
    """The checks that read device memory (``check_values=True``; they synchronise).

    Raises ValueError naming the first problem: NaN / Inf features in a present row, NaN /
    Inf / negative labels on a pair of present samples, a logit scale that is not finite
    and > 0. Absent samples (mask False) may hold anything. ``g``, ``g_mask`` and ``labels``
    may carry a leading gallery dimension ([K, M, D], [K, M], [K, N, M]; sdm_loss_multi).
    """
    for name, t, mask in (("q", q, q_mask), ("g", g, g_mask)):
        finite = torch.isfinite(t).all(dim=-1)
        if mask is not None:
            finite = finite | ~mask
        if not bool(finite.all()):
            raise ValueError(f"{name} contains NaN or Inf in a present row")
    if labels is not None and labels.is_floating_point():
        bad_nan, bad_neg = ~torch.isfinite(labels), labels < 0
        if q_mask is not None:                     # [N] -> [N, 1], broadcast over [.., N, M]
            bad_nan, bad_neg = bad_nan & q_mask[:, None], bad_neg & q_mask[:, None]
        if g_mask is not None:                     # [M] or [K, M] -> [.., 1, M]
            gm = g_mask.unsqueeze(-2)
            bad_nan, bad_neg = bad_nan & gm, bad_neg & gm
        if bool(bad_nan.any()):
            raise ValueError("labels contains NaN or Inf on a pair of present samples")
        if bool(bad_neg.any()):
            raise ValueError("labels must be non-negative (a negative weight on a pair of present samples)")
    if isinstance(scale, torch.Tensor):
        value = float(scale.detach())
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"logit_scale must be finite and > 0, got {value}")


def compute_dtype(features_dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 / bf16 / fp16 features (the seed's lesson), float64 for float64."""
    return torch.float64 if features_dtype == torch.float64 else torch.float32


__all__ = ["SDMOptions", "SDMRowLosses", "SDMStats", "KernelConfig", "NORM_EPS", "resolve_scale",
           "resolve_ids", "comparable_ids", "validate_features", "validate_inputs", "validate_workspace_bytes", "validate_flag", "check_values",
           "compute_dtype", "as_kernel_config"]
