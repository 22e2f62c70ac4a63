"""SDM problems: what a problem holds, how one is built from its recipe, and the Hypothesis
strategies that draw them.

Hypothesis draws the *recipe* of a problem (sizes, dtype, identities, masks, temperature, norm
range, which rows are zero, memory layouts); the feature values come from a
``torch.Generator`` seeded by a drawn integer, because drawing thousands of floats through
Hypothesis is slow and shrinks poorly. ``problem(**recipe)`` builds the tensors from the
recipe alone, and an ``SDMProblem`` prints as that call: a failing example is a repro that can be
pasted into a Python prompt.

Memory layouts (SPEC, "Input hygiene": any strides, for every tensor argument). Features:
``transposed`` (column-major), ``strided`` (a view with gaps in both dimensions), ``expanded``
(one row broadcast with stride 0: every row equal). Ids and masks as they come in multimodal
ReID: ``column`` is column 1 of a [rows, 3] table (the pid column of a (camera, pid, clothes)
table; a modality column of a presence matrix), its neighbours holding other values;
``strided`` every second element of a buffer whose gaps hold other values; ``expanded`` one
value broadcast with stride 0 (only where every entry is equal). Dense labels: ``transposed``,
``strided`` (gaps holding NaN / the complement), ``expanded_row`` (a [1, M] row expanded to
[N, M]) and ``expanded_col`` (an [N, 1] column expanded), the expanded ones where the labels'
rows (columns) are equal, which ``label_pattern`` makes common. The values are always those of
the contiguous tensors; ``SDMProblem.contiguous()`` gives that copy.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch
from hypothesis import strategies as st

HALF_DTYPES = (torch.bfloat16, torch.float16)
FAST_DTYPES = (torch.float32,) + HALF_DTYPES
DTYPES = FAST_DTYPES + (torch.float64,)

# SPEC's property ranges: every temperature in [0.005, 10], every feature norm in [1e-4, 1e4].
TEMPERATURE_RANGE = (0.005, 10.0)
LOG10_NORM_RANGE = (-4.0, 4.0)
# problems()' defaults, the regimes this project's bugs came from: logit scales 0.05 to 200
# (a masked side at s < 0.7 once gave d/dscale = NaN), norms 1e-3 to 1e3, anti-aligned
# positives (cosine -1 at s = 200: the positives' probabilities underflow).
SCALE_TEMPERATURES = (1 / 200, 1 / 0.05)
LOG10_NORMS = (-3.0, 3.0)
SIGNALS = (0.0, 0.5, 0.9, 0.99, 1.0)
ANTI_SIGNALS = (-1.0, -0.9)

LABEL_KINDS = ("ids", "unique_ids", "binary", "soft")
MASK_KINDS = ("none", "random", "all_false", "kill_positives")
MASK_RATES = (0.1, 0.5, 0.9)
FEATURE_LAYOUTS = ("contiguous", "transposed", "strided", "expanded")
VECTOR_LAYOUTS = ("contiguous", "column", "strided", "expanded")      # ids and masks
LABEL_LAYOUTS = ("contiguous", "transposed", "strided", "expanded_row", "expanded_col")
ARG_LAYOUTS = tuple(dict.fromkeys(VECTOR_LAYOUTS + LABEL_LAYOUTS))
LABEL_PATTERNS = ("independent", "same_rows", "same_cols")
ARGUMENTS = ("q_ids", "g_ids", "labels", "q_mask", "g_mask")


@dataclasses.dataclass(frozen=True)
class SDMProblem:
    """One input of the loss: features, ids or dense labels, masks, temperature or logit scale.

    Tensors are detached and hold the values in their drawn layout for ids, labels and masks;
    features are kept contiguous and ``leaves()`` gives fresh grad-requiring copies in the
    drawn layout. ``repr()`` is the ``problem(...)`` call that rebuilds it.
    """

    q: torch.Tensor
    g: torch.Tensor
    q_ids: Optional[torch.Tensor]
    g_ids: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    q_mask: Optional[torch.Tensor]
    g_mask: Optional[torch.Tensor]
    temperature: float
    use_logit_scale: bool
    recipe: dict

    def __repr__(self):
        shown = {k: v for k, v in self.recipe.items() if k in ("N", "M", "D", "labels", "seed")
                 or (v != _RECIPE_DEFAULTS.get(k, object()) and not (k.endswith("_layout") and v == "contiguous"))}
        return "sdm_triton.testing.problem(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    def _repr_pretty_(self, printer, cycle):
        # Hypothesis prints a falsifying example with this (IPython's protocol); without it, a
        # dataclass is printed field by field, tensors and all
        printer.text(repr(self))

    @property
    def n(self):
        return self.q.shape[0]

    @property
    def m(self):
        return self.g.shape[0]

    @property
    def dtype(self):
        return self.q.dtype

    @property
    def scale_dtype(self):
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def y(self, dtype=torch.float64) -> torch.Tensor:
        """The dense [N, M] matching weights y_ij (before masks), in ``dtype``."""
        if self.labels is not None:
            return self.labels.to(dtype)
        return (self.q_ids[:, None] == self.g_ids[None, :]).to(dtype)

    def keep(self):
        """(q_keep, g_keep) bool vectors, all True where no mask was given."""
        qk = self.q_mask if self.q_mask is not None else torch.ones(self.n, dtype=torch.bool, device=self.q.device)
        gk = self.g_mask if self.g_mask is not None else torch.ones(self.m, dtype=torch.bool, device=self.q.device)
        return qk, gk

    def leaves(self, q=None, g=None):
        """Fresh grad-requiring copies of q, g (in the problem's layout) and the scale tensor (or None)."""
        layout = self.recipe["layout"]
        q_leaf = _apply_layout(self.q if q is None else q, layout).requires_grad_()
        g_leaf = _apply_layout(self.g if g is None else g, layout).requires_grad_()
        scale = None
        if self.use_logit_scale:
            scale = torch.tensor(1.0 / self.temperature, dtype=self.scale_dtype, device=self.q.device,
                                 requires_grad=True)
        return q_leaf, g_leaf, scale

    def label_kwargs(self):
        """The identity/labels and mask keyword arguments of ``sdm_loss``."""
        kw = dict(q_mask=self.q_mask, g_mask=self.g_mask)
        if self.labels is not None:
            kw["labels"] = self.labels
        else:
            kw["q_ids"], kw["g_ids"] = self.q_ids, self.g_ids
        return kw

    def call(self, fn, q, g, scale=None, **options):
        """``fn(q, g, ...)`` with this problem's labels, masks and scale (tensor or temperature)."""
        if scale is not None:
            options["logit_scale"] = scale
        else:
            options["temperature"] = self.temperature
        return fn(q, g, **self.label_kwargs(), **options)

    def scale_value(self) -> float:
        return 1.0 / self.temperature

    def contiguous(self) -> "SDMProblem":
        """The same problem with every tensor argument (features, ids, labels, masks) contiguous."""
        dense = (lambda t: None if t is None else t.contiguous().clone())
        layouts = {k: ("contiguous" if v is not None else None) for k, v in self.recipe.items()
                   if k.endswith("_layout")}
        return dataclasses.replace(
            self, q_ids=dense(self.q_ids), g_ids=dense(self.g_ids), labels=dense(self.labels),
            q_mask=dense(self.q_mask), g_mask=dense(self.g_mask),
            recipe={**self.recipe, "layout": "contiguous", **layouts})


# --------------------------------------------------------------------------- layouts

def _apply_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A detached copy of ``x`` [rows, D] with the same values in the requested memory layout."""
    x = x.detach()
    if layout == "contiguous":
        return x.clone()
    if layout == "transposed":                                # column-major [rows, D]
        return x.T.contiguous().T
    if layout == "expanded":                                  # one row, stride 0 over rows
        if not _rows_equal(x):
            raise ValueError("layout 'expanded' needs equal rows")
        return x[:1].clone().expand(x.shape)
    if layout != "strided":
        raise ValueError(f"unknown feature layout {layout!r}")
    buf = torch.zeros(2 * x.shape[0], 3 * x.shape[1], dtype=x.dtype, device=x.device)
    view = buf[::2, 1::3]                                     # both strides > the dense ones
    view.copy_(x)
    return view


def _rows_equal(x):
    return x.shape[0] == 0 or bool((x == x[:1]).all())


def _filler(x: torch.Tensor) -> torch.Tensor:
    """Values for the gaps around a strided view of ``x``: different from ``x`` wherever it
    matters, so that a kernel reading the wrong element gets a different answer."""
    if x.dtype == torch.bool:
        return ~x
    if x.is_floating_point():
        return torch.full_like(x, math.nan)
    return -1 - x                                             # ids >= 0: never an existing id


def _vector_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A 1-D tensor with the values of ``x`` (ids or a mask) in the memory layout ``layout``."""
    n = x.shape[0]
    if layout == "contiguous":
        return x.clone()
    if layout == "column":                                    # column 1 of a [n, 3] table
        table = torch.stack([_filler(x), x, _filler(x).flip(0)], dim=1)
        return table[:, 1]
    if layout == "strided":                                   # every second element, offset 1
        buf = torch.stack([_filler(x), x], dim=1).reshape(2 * n)
        return buf[1::2]
    if layout == "expanded":                                  # stride 0
        if not bool((x == x[0]).all()):
            raise ValueError("layout 'expanded' needs equal entries")
        return x[:1].expand(n)
    raise ValueError(f"unknown layout {layout!r}")


def _vector_layouts(x: torch.Tensor, allowed) -> list:
    """The layouts of ``VECTOR_LAYOUTS`` in ``allowed`` that can hold ``x`` ("contiguous" if none)."""
    possible = [layout for layout in VECTOR_LAYOUTS if layout in allowed]
    if "expanded" in possible and not bool((x == x[0]).all()):
        possible.remove("expanded")
    return possible or ["contiguous"]


def _label_layout(y: torch.Tensor, layout: str) -> torch.Tensor:
    """An [N, M] labels tensor with the values of ``y`` in the memory layout ``layout``."""
    n, m = y.shape
    if layout == "contiguous":
        return y.clone()
    if layout == "transposed":                                # column-major
        return y.T.contiguous().T
    if layout == "strided":
        buf = _filler(y).repeat(2, 3)
        view = buf[::2, 1::3]
        view.copy_(y)
        return view
    if layout == "expanded_row":                              # a [1, M] row, stride 0 over rows
        if not bool((y == y[:1]).all()):
            raise ValueError("labels layout 'expanded_row' needs equal rows")
        return y[:1].expand(n, m)
    if layout == "expanded_col":                              # an [N, 1] column, stride 0 over columns
        if not bool((y == y[:, :1]).all()):
            raise ValueError("labels layout 'expanded_col' needs equal columns")
        return y[:, :1].expand(n, m)
    raise ValueError(f"unknown labels layout {layout!r}")


def _label_layouts(y: torch.Tensor, allowed) -> list:
    possible = [layout for layout in LABEL_LAYOUTS if layout in allowed]
    if "expanded_row" in possible and not bool((y == y[:1]).all()):
        possible.remove("expanded_row")
    if "expanded_col" in possible and not bool((y == y[:, :1]).all()):
        possible.remove("expanded_col")
    return possible or ["contiguous"]


# --------------------------------------------------------------------------- building

def _dtype(name):
    return name if isinstance(name, torch.dtype) else getattr(torch, name)


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _bits(keep):
    """A mask as a string of 0 / 1 (short in a repro), None for no mask."""
    return None if keep is None else "".join("1" if k else "0" for k in keep)


def _dense_labels(gen, n, m, kind, density, label_pattern, label_dtype):
    """Dense labels (bool, or soft weights in ``label_dtype``) and their float64 values."""
    # Mostly independent entries; sometimes every row (column) equal, as labels broadcast from a
    # [1, M] row ([N, 1] column) are.
    rows, cols = {"independent": (n, m), "same_rows": (1, m), "same_cols": (n, 1)}[label_pattern]
    y = (torch.rand(rows, cols, generator=gen, dtype=torch.float64) < density).double()
    if kind == "soft":
        # Weights over four decades so the normalisation Y = y / sum(y) matters.
        y = y * torch.exp(torch.empty(rows, cols, dtype=torch.float64).uniform_(-4.6, 4.6, generator=gen))
        labels = y.expand(n, m).clone().to(_dtype(label_dtype))
        return labels, labels.double()
    y = y.expand(n, m).clone()
    return y.bool(), y


def problem(N: int, M: int, D: int, *, labels: str = "ids", seed: int = 0, dtype="float32", device="cpu",
            temperature: float = 0.02, logit_scale: bool = False, signal: float = 0.0, log10_norms=(0.0, 0.0),
            zero_q: Sequence[int] = (), zero_g: Sequence[int] = (), equal_rows: bool = False,
            q_ids: Optional[Sequence[int]] = None, g_ids: Optional[Sequence[int]] = None, id_dtype="int64",
            density: float = 0.3, label_pattern: str = "independent", label_dtype="float32",
            q_mask: Optional[str] = None, g_mask: Optional[str] = None, nan_absent: bool = False,
            layout: str = "contiguous", q_ids_layout: Optional[str] = None, g_ids_layout: Optional[str] = None,
            labels_layout: Optional[str] = None, q_mask_layout: Optional[str] = None,
            g_mask_layout: Optional[str] = None) -> SDMProblem:
    """The problem of a recipe: what ``problems()`` draws and what an ``SDMProblem`` prints as.

    * ``N``, ``M``, ``D``: rows of q, rows of g, feature dim; ``dtype`` and ``device`` of the features.
    * ``labels``: ``"ids"`` / ``"unique_ids"`` (``q_ids``, ``g_ids`` lists; default
      ``range(N)``, ``range(M)``, in ``id_dtype``), or dense ``"binary"`` / ``"soft"`` labels
      drawn from ``seed`` with ``density`` and ``label_pattern`` (``"same_rows"``,
      ``"same_cols"``: all rows / columns equal), soft weights in ``label_dtype``.
    * ``q_mask``, ``g_mask``: strings of 0 / 1 (``"0"`` = absent sample), or None;
      ``nan_absent``: absent samples' features are NaN.
    * features from ``seed``: unit vectors leaning on one prototype per identity by
      ``signal`` (1: the samples of an identity coincide; negative: q and g of an identity
      point in opposite directions), each row's norm log-uniform in ``10**log10_norms``, the
      rows ``zero_q`` / ``zero_g`` exactly zero; ``equal_rows``: every row of q (of g) equal
      to its first row (implied by ``layout="expanded"``).
    * ``temperature``; ``logit_scale=True`` passes ``1 / temperature`` as a grad-requiring
      0-dim tensor instead of the temperature.
    * memory layouts: ``layout`` for q and g, ``<name>_layout`` for ids, labels and masks.
    """
    n, m, d = N, M, D
    dtype = _dtype(dtype)
    if layout not in FEATURE_LAYOUTS:
        raise ValueError(f"layout must be one of {FEATURE_LAYOUTS}, got {layout!r}")
    gen = torch.Generator().manual_seed(seed)
    t_q_ids = t_g_ids = t_labels = None
    if labels in ("ids", "unique_ids"):
        id_type = _dtype(id_dtype)
        t_q_ids = torch.tensor(list(range(n)) if q_ids is None else list(q_ids), dtype=id_type)
        t_g_ids = torch.tensor(list(range(m)) if g_ids is None else list(g_ids), dtype=id_type)
        if t_q_ids.shape != (n,) or t_g_ids.shape != (m,):
            raise ValueError(f"q_ids / g_ids must have N = {n} / M = {m} entries")
        y = (t_q_ids[:, None] == t_g_ids[None, :]).double()
    elif labels in ("binary", "soft"):
        t_labels, y = _dense_labels(gen, n, m, labels, density, label_pattern, label_dtype)
    else:
        raise ValueError(f"labels must be one of {LABEL_KINDS}, got {labels!r}")

    def unit(x):
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)

    def noise(rows):
        return unit(torch.randn(rows, d, generator=gen, dtype=torch.float64))

    # signal < 0: anti-aligned, g = -(|signal| prototype + noise)
    a, sign = abs(signal), (-1.0 if signal < 0 else 1.0)
    if t_q_ids is not None:
        # One prototype per identity: at signal 1 the samples of an identity coincide on
        # both sides and, at a large scale, P approaches Y (near-zero losses made of
        # cancelling O(s) terms, where rounding can go below zero).
        proto = noise(int(max(t_q_ids.max(), t_g_ids.max())) + 1)
        q = a * proto[t_q_ids.long()] + (1 - a) * noise(n)
        g = sign * (a * proto[t_g_ids.long()] + (1 - a) * noise(m))
    else:
        # Gallery rows lean towards the weighted average of the queries they match.
        q = noise(n)
        g = sign * (a * unit(y.T @ q) + (1 - a) * noise(m))

    lo, hi = log10_norms

    def with_norms(x, zero):
        log10 = torch.empty(x.shape[0], 1, dtype=torch.float64).uniform_(lo, hi, generator=gen)
        x = unit(x) * 10.0 ** log10
        x[list(zero)] = 0
        return x.to(dtype).to(device)

    q, g = with_norms(q, zero_q), with_norms(g, zero_g)
    equal_rows = equal_rows or layout == "expanded"           # stride 0 needs every row equal to row 0
    if equal_rows:
        q, g = q[:1].expand(n, d).clone(), g[:1].expand(m, d).clone()

    def as_mask(bits, length, name):
        if bits is None:
            return None
        if len(bits) != length or set(bits) - set("01"):
            raise ValueError(f"{name} must be a string of {length} characters 0 / 1, got {bits!r}")
        return torch.tensor([c == "1" for c in bits], dtype=torch.bool, device=device)

    move = (lambda t: None if t is None else t.to(device))
    args = dict(q_ids=move(t_q_ids), g_ids=move(t_g_ids), labels=move(t_labels),
                q_mask=as_mask(q_mask, n, "q_mask"), g_mask=as_mask(g_mask, m, "g_mask"))
    if nan_absent:                                            # SPEC: an absent sample may hold NaN
        if layout == "expanded":
            raise ValueError("nan_absent needs rows of their own (layout 'expanded' shares one)")
        for x, keep in ((q, args["q_mask"]), (g, args["g_mask"])):
            if keep is not None:
                x[~keep] = math.nan
    # Layouts are made on the device (moving a strided tensor between devices may make it dense).
    given = dict(q_ids=q_ids_layout, g_ids=g_ids_layout, labels=labels_layout, q_mask=q_mask_layout,
                 g_mask=g_mask_layout)
    for name, t in args.items():
        if t is not None and given[name] not in (None, "contiguous"):
            args[name] = (_label_layout if name == "labels" else _vector_layout)(t, given[name])
    recipe = dict(N=n, M=m, D=d, dtype=_dtype_name(dtype), labels=labels, seed=seed, temperature=temperature,
                  logit_scale=logit_scale, signal=signal, log10_norms=tuple(log10_norms), zero_q=sorted(zero_q),
                  zero_g=sorted(zero_g), layout=layout,
                  q_ids=None if q_ids is None else list(q_ids), g_ids=None if g_ids is None else list(g_ids),
                  id_dtype=_dtype_name(_dtype(id_dtype)), density=density, label_pattern=label_pattern,
                  label_dtype=_dtype_name(_dtype(label_dtype)), q_mask=q_mask, g_mask=g_mask,
                  nan_absent=nan_absent, equal_rows=equal_rows, device=str(device),
                  **{name + "_layout": (given[name] or "contiguous") if t is not None else None
                     for name, t in args.items()})
    return SDMProblem(q=q, g=g, **args, temperature=temperature, use_logit_scale=logit_scale, recipe=recipe)


_RECIPE_DEFAULTS = dict(
    dtype="float32", device="cpu", temperature=0.02, logit_scale=False, signal=0.0, log10_norms=(0.0, 0.0),
    zero_q=[], zero_g=[], q_ids=None, g_ids=None, id_dtype="int64", density=0.3, label_pattern="independent",
    label_dtype="float32", q_mask=None, g_mask=None, nan_absent=False, equal_rows=False, layout="contiguous",
    q_ids_layout=None, g_ids_layout=None, labels_layout=None, q_mask_layout=None, g_mask_layout=None)


# --------------------------------------------------------------------------- strategies

def log_uniform(lo: float, hi: float):
    """Floats whose logarithm is uniform in [log lo, log hi], endpoints included."""
    return st.one_of(
        st.sampled_from([lo, hi]),
        st.floats(math.log(lo), math.log(hi)).map(math.exp).map(lambda v: min(max(v, lo), hi)),
    )


@st.composite
def _ids(draw, n, m, unique):
    if unique:
        # One match per row where a match exists: q ids are distinct, g ids distinct;
        # rows of the longer side without a partner have no match at all.
        pool = draw(st.permutations(range(n + m)))
        q_ids = list(pool[:n])
        n_shared = draw(st.integers(min(n, m) // 2, min(n, m)))
        shared = draw(st.permutations(q_ids))[:n_shared]
        g_ids = draw(st.permutations(list(shared) + list(pool[n:n + m - n_shared])))
        return q_ids, list(g_ids)
    pool = draw(st.integers(1, 6))
    # Ids in [pool, pool + miss) never occur on the other side: rows with no match.
    q_miss = draw(st.integers(0, 2))
    g_miss = draw(st.integers(0, 2))
    q_ids = draw(st.lists(st.integers(0, pool - 1 + q_miss), min_size=n, max_size=n))
    g_ids = draw(st.lists(st.integers(0, pool - 1 + g_miss).map(lambda v: v if v < pool else v + q_miss),
                          min_size=m, max_size=m))
    return q_ids, g_ids


@st.composite
def _mask(draw, length, kind, rates, forced_off=()):
    if kind == "all_false":
        return [False] * length
    if kind == "none" or length == 0:
        return None
    if rates is None:                                         # each sample present with probability 1/2
        keep = draw(st.lists(st.booleans(), min_size=length, max_size=length))
    else:                                                     # absent with probability `rate`
        rate = draw(st.sampled_from(rates))
        keep = draw(st.lists(st.integers(0, 99).map(lambda v: v >= 100 * rate), min_size=length, max_size=length))
    for j in forced_off:
        keep[j] = False
    return keep


@st.composite
def problems(draw, max_rows: int = 16, max_dim: int = 40, *, dtypes=(torch.float32,), label_kinds=LABEL_KINDS,
             mask_kinds=MASK_KINDS, mask_rates=MASK_RATES, layouts=FEATURE_LAYOUTS, arg_layouts=ARG_LAYOUTS,
             zero_rows: bool = True, log10_norms=LOG10_NORMS, temperatures=SCALE_TEMPERATURES,
             temperature=None, logit_scale=None, signals=SIGNALS + ANTI_SIGNALS, nan_absent: bool = True,
             fp16_grads_fit: bool = True, device="cpu"):
    """A Hypothesis strategy for SDM problems (``SDMProblem``; its repr is a repro).

    * sizes ``N, M`` in ``1..max_rows``, ``D`` in ``1..max_dim`` (any integer, so most are
      not powers of two); features in one of ``dtypes`` on ``device``;
    * ``label_kinds``: ``"ids"`` from a small pool (duplicate ids: several positives per row;
      rows with no match on either side), ``"unique_ids"`` (one match per row: CLIP),
      ``"binary"`` dense bool or ``"soft"`` dense non-negative weights with zeros;
    * ``mask_kinds``: ``"none"``, ``"random"`` (absent with a probability from
      ``mask_rates``; ``None``: each sample with a Hypothesis coin), ``"all_false"`` (a whole
      side absent), ``"kill_positives"`` (removes every positive of some row); with
      ``nan_absent`` the absent samples' features are sometimes NaN;
    * per-row norms log-uniform in a drawn sub-range of ``10**log10_norms``, some rows exactly
      zero (``zero_rows``); q and g lean towards their identities by a drawn signal from
      ``signals`` (negative ones anti-align the positives);
    * a third of the problems near-perfect fits (signal 1, temperature up to 0.05), where
      the loss is a near-zero difference of O(s) terms;
    * temperature log-uniform in ``temperatures`` (or fixed: ``temperature``); the scale is
      a float temperature or a grad-requiring 0-dim ``logit_scale`` tensor (``logit_scale``
      None draws either, True / False fixes it);
    * memory layouts: ``layouts`` for the features, ``arg_layouts`` for ids, masks and dense
      labels (the expanded ones only where the values allow them);
    * ``fp16_grads_fit``: fp16 problems get norms >= 1 and no zero rows, so that their exact
      gradients (~ s / |q| per row, 1e12 at a zero row) mostly fit fp16 (max 65504).

    The defaults are the adversarial regimes above; this project's own property tests pass
    SPEC's ranges (``TEMPERATURE_RANGE``, ``LOG10_NORM_RANGE``).
    """
    n = draw(st.integers(1, max_rows), label="N")
    m = draw(st.integers(1, max_rows), label="M")
    d = draw(st.integers(1, max_dim), label="D")
    dtype = draw(st.sampled_from(dtypes))
    if dtype == torch.float16 and fp16_grads_fit:
        log10_norms, zero_rows = (max(0.0, log10_norms[0]), max(0.0, log10_norms[1])), False
    kind = draw(st.sampled_from(label_kinds))
    seed = draw(st.integers(0, 2**32 - 1))
    near_perfect = draw(st.sampled_from([False, False, True]))
    if temperature is not None:
        tau = temperature
    elif near_perfect:
        tau = draw(log_uniform(temperatures[0], min(temperatures[1], max(temperatures[0], 0.05))))
    else:
        tau = draw(log_uniform(*temperatures))
    use_scale = draw(st.booleans()) if logit_scale is None else logit_scale
    signal = 1.0 if near_perfect else draw(st.sampled_from(signals))
    lo, hi = sorted(draw(st.lists(st.floats(*log10_norms), min_size=2, max_size=2)))
    zero_q = draw(st.sets(st.integers(0, n - 1), max_size=2)) if zero_rows and draw(st.booleans()) else set()
    zero_g = draw(st.sets(st.integers(0, m - 1), max_size=2)) if zero_rows and draw(st.booleans()) else set()
    layout = draw(st.sampled_from(layouts))

    recipe = dict(N=n, M=m, D=d, labels=kind, seed=seed, dtype=dtype, device=device, temperature=tau,
                  logit_scale=use_scale, signal=signal, log10_norms=(lo, hi), zero_q=sorted(zero_q),
                  zero_g=sorted(zero_g), layout=layout)
    if kind in ("ids", "unique_ids"):
        q_ids, g_ids = draw(_ids(n, m, kind == "unique_ids"))
        id_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
        recipe.update(q_ids=q_ids, g_ids=g_ids, id_dtype=id_dtype)
        y = (torch.tensor(q_ids)[:, None] == torch.tensor(g_ids)[None, :]).double()
    else:
        density = draw(st.sampled_from([0.1, 0.3, 0.7, 1.0]))
        label_pattern = draw(st.sampled_from(LABEL_PATTERNS[:1] * 3 + LABEL_PATTERNS[1:]))
        label_dtype = torch.float32
        if kind == "soft":
            label_dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
        recipe.update(density=density, label_pattern=label_pattern, label_dtype=label_dtype)
        # the values problem() will build (kill_positives needs them), from the same generator
        y = _dense_labels(torch.Generator().manual_seed(seed), n, m, kind, density, label_pattern, label_dtype)[1]

    q_kind = draw(st.sampled_from(mask_kinds))
    g_kind = draw(st.sampled_from(mask_kinds))
    g_off = ()
    if g_kind == "kill_positives":
        row = draw(st.integers(0, n - 1))
        g_off = tuple(int(j) for j in (y[row] > 0).nonzero().flatten())
    q_off = ()
    if q_kind == "kill_positives":
        col = draw(st.integers(0, m - 1))
        q_off = tuple(int(i) for i in (y[:, col] > 0).nonzero().flatten())
    q_mask = draw(_mask(n, q_kind, mask_rates, q_off))
    g_mask = draw(_mask(m, g_kind, mask_rates, g_off))
    recipe.update(q_mask=_bits(q_mask), g_mask=_bits(g_mask))

    # Argument layouts: drawn where the values allow them (expanded: equal entries).
    values = problem(**recipe)
    for name in ARGUMENTS:
        t = getattr(values, name)
        if t is None:
            continue
        if name == "labels":
            recipe[name + "_layout"] = draw(st.sampled_from(_label_layouts(t, arg_layouts)), label="labels_layout")
        else:
            recipe[name + "_layout"] = draw(st.sampled_from(_vector_layouts(t, arg_layouts)), label=name + "_layout")
    if nan_absent and layout != "expanded" and (q_mask is not None or g_mask is not None):
        recipe["nan_absent"] = draw(st.booleans())
    return problem(**recipe)


def eps_values(kl: str):
    """eps for a divergence: IRRA's 1e-8, TBPS-CLIP's 1e-2 and anything log-uniform in between
    for ``reverse``; for ``forward`` (which must ignore it) also 0."""
    if kl == "reverse":
        return st.one_of(st.sampled_from([1e-8, 1e-2]), log_uniform(1e-10, 0.5))
    return st.sampled_from([1e-8, 0.0, 1e-2])


@st.composite
def sdm_options(draw, kl=("forward", "reverse"), direction=("both", "q2g", "g2q"), combine=("mean", "sum"),
                reduction=("mean", "sum", "none"), normalize=(True,)):
    """The keyword options of ``sdm_loss`` as a dict (each argument lists the allowed words)."""
    chosen_kl = draw(st.sampled_from(kl))
    return dict(kl=chosen_kl, eps=draw(eps_values(chosen_kl)), direction=draw(st.sampled_from(direction)),
                combine=draw(st.sampled_from(combine)), reduction=draw(st.sampled_from(reduction)),
                normalize=draw(st.sampled_from(normalize)))
