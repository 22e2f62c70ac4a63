"""Hypothesis strategies shared by every backend's property tests.

Hypothesis draws the *structure* of a case (sizes, dtype, identity pattern, masks,
temperature, norm range, which rows are zero, memory layouts); the feature values
themselves come from a ``torch.Generator`` seeded by a drawn integer, because
drawing thousands of floats through Hypothesis is slow and shrinks poorly. Every
drawn parameter is kept in ``SDMCase.recipe`` and printed by its ``repr``, so a
falsifying example shows every parameter of the failing input (the tensors follow
from them and the seed).

Memory layouts (SPEC, "Input hygiene": any strides, for every tensor argument, on every
backend). Features take ``LAYOUTS`` (applied by ``SDMCase.leaves``). Ids and masks are
drawn as they come in multimodal ReID: ``column`` is column 1 of a [rows, 3] table (the pid
column of a (camera, pid, clothes) table; a modality column of a presence matrix), its
neighbours holding other values; ``strided`` every second element of a buffer whose gaps
hold other values; ``expanded`` one value broadcast with stride 0 (drawn only where every
entry is equal). Dense labels: ``transposed`` (``labels.T.contiguous().T``), ``strided``
(a view with gaps holding NaN / the complement), ``expanded_row`` (a [1, M] row expanded
to [N, M]) and ``expanded_col`` (an [N, 1] column expanded), the expanded ones drawn where
the labels' rows (columns) are equal, which ``label_pattern`` makes common. The values are
always those of the contiguous tensors; ``SDMCase.contiguous()`` gives that copy.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Optional

import pytest
import torch
from hypothesis import given, seed, settings
from hypothesis import strategies as st

HALF_DTYPES = (torch.bfloat16, torch.float16)
FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

TEMPERATURE_RANGE = (0.005, 10.0)   # SPEC: every temperature in [0.005, 10]
LOG10_NORM_RANGE = (-4.0, 4.0)      # SPEC: every feature norm in [1e-4, 1e4]

LABEL_KINDS = ("ids", "unique_ids", "binary", "soft")
MASK_KINDS = ("none", "random", "all_false", "kill_positives")
LAYOUTS = ("contiguous", "transposed", "strided")
VECTOR_LAYOUTS = ("contiguous", "column", "strided", "expanded")      # ids and masks
LABEL_LAYOUTS = ("contiguous", "transposed", "strided", "expanded_row", "expanded_col")
ARG_LAYOUTS = tuple(dict.fromkeys(VECTOR_LAYOUTS + LABEL_LAYOUTS))
LABEL_PATTERNS = ("independent", "same_rows", "same_cols")


@dataclasses.dataclass(frozen=True)
class SDMCase:
    """One input of the loss. Tensors are detached; ``leaves()`` gives fresh ones to differentiate."""

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
        return "SDMCase(" + ", ".join(f"{k}={v!r}" for k, v in self.recipe.items()) + ")"

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
        """Fresh grad-requiring copies of q, g (same layout as the case) and the scale tensor (or None)."""
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
        """``fn(q, g, ...)`` with this case's labels, masks and scale (tensor or temperature)."""
        if scale is not None:
            options["logit_scale"] = scale
        else:
            options["temperature"] = self.temperature
        return fn(q, g, **self.label_kwargs(), **options)

    def scale_value(self) -> float:
        return 1.0 / self.temperature

    def contiguous(self) -> "SDMCase":
        """The same case with every tensor argument (features, ids, labels, masks) contiguous."""
        dense = (lambda t: None if t is None else t.contiguous().clone())
        layouts = {k: ("contiguous" if v is not None else None) for k, v in self.recipe.items()
                   if k.endswith("_layout")}
        return dataclasses.replace(
            self, q_ids=dense(self.q_ids), g_ids=dense(self.g_ids), labels=dense(self.labels),
            q_mask=dense(self.q_mask), g_mask=dense(self.g_mask),
            recipe={**self.recipe, "layout": "contiguous", **layouts})


def _apply_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A detached copy of ``x`` with the same values in the requested memory layout."""
    x = x.detach()
    if layout == "contiguous":
        return x.clone()
    if layout == "transposed":                                # column-major [rows, D]
        return x.T.contiguous().T
    buf = torch.zeros(2 * x.shape[0], 3 * x.shape[1], dtype=x.dtype, device=x.device)
    view = buf[::2, 1::3]                                     # both strides > the dense ones
    view.copy_(x)
    return view


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
        assert bool((x == x[0]).all()), "expanded needs equal entries"
        return x[:1].expand(n)
    raise ValueError(layout)


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
        assert bool((y == y[:1]).all()), "expanded_row needs equal rows"
        return y[:1].expand(n, m)
    if layout == "expanded_col":                              # an [N, 1] column, stride 0 over columns
        assert bool((y == y[:, :1]).all()), "expanded_col needs equal columns"
        return y[:, :1].expand(n, m)
    raise ValueError(layout)


def _label_layouts(y: torch.Tensor, allowed) -> list:
    possible = [layout for layout in LABEL_LAYOUTS if layout in allowed]
    if "expanded_row" in possible and not bool((y == y[:1]).all()):
        possible.remove("expanded_row")
    if "expanded_col" in possible and not bool((y == y[:, :1]).all()):
        possible.remove("expanded_col")
    return possible or ["contiguous"]


def log_uniform(lo: float, hi: float):
    """Floats whose logarithm is uniform in [log lo, log hi], endpoints included."""
    return st.one_of(
        st.sampled_from([lo, hi]),
        st.floats(math.log(lo), math.log(hi)).map(math.exp).map(lambda v: min(max(v, lo), hi)),
    )


def temperatures():
    return log_uniform(*TEMPERATURE_RANGE)


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
        return q_ids, g_ids
    pool = draw(st.integers(1, 6))
    # Ids in [pool, pool + miss) never occur on the other side: rows with no match.
    q_miss = draw(st.integers(0, 2))
    g_miss = draw(st.integers(0, 2))
    q_ids = draw(st.lists(st.integers(0, pool - 1 + q_miss), min_size=n, max_size=n))
    g_ids = draw(st.lists(st.integers(0, pool - 1 + g_miss).map(lambda v: v if v < pool else v + q_miss),
                          min_size=m, max_size=m))
    return q_ids, g_ids


@st.composite
def _mask(draw, length, kind, forced_off=()):
    if kind == "all_false":
        return [False] * length
    if kind == "none" or length == 0:
        return None
    keep = draw(st.lists(st.booleans(), min_size=length, max_size=length))
    for j in forced_off:
        keep[j] = False
    return keep


@st.composite
def sdm_cases(draw, max_rows: int, max_dim: int = 80, *, dtypes=(torch.float32,), label_kinds=LABEL_KINDS,
              mask_kinds=MASK_KINDS, layouts=LAYOUTS, arg_layouts=ARG_LAYOUTS, zero_rows: bool = True,
              log10_norms=LOG10_NORM_RANGE, temperature=None, logit_scale=None, fp16_grads_fit=True,
              device="cpu"):
    """A complete ``SDMCase``.

    * sizes ``N, M`` in ``1..max_rows``, ``D`` in ``1..max_dim`` (any integer, so most are
      not powers of two);
    * labels: ids from a small pool (several positives per row, rows with no match on
      either side), unique ids (one match per row), dense bool, or dense non-negative
      soft weights with zeros;
    * masks: none, random, all-False on one side, or ones that remove every positive of
      some row; ``mask_kinds`` restricts them;
    * per-row norms log-uniform in a drawn sub-range of ``10**log10_norms``, some rows
      exactly zero; q and g are correlated through the labels by a drawn ``signal`` so
      that near-perfect matches (the cancellation-prone regime) occur;
    * a third of the cases near-perfect fits (signal 1, temperature in [0.005, 0.05]);
    * temperature log-uniform in [0.005, 10]; the scale is a float or a grad-requiring
      0-dim ``logit_scale`` tensor (``logit_scale=None`` draws either);
    * memory layouts: ``layouts`` for the features (``LAYOUTS``), ``arg_layouts`` for ids,
      masks and dense labels (``VECTOR_LAYOUTS``, ``LABEL_LAYOUTS``; the expanded ones only
      where the values allow them); dense labels sometimes have equal rows or equal columns
      (``label_pattern``), the values that stride-0 labels hold;
    * ``fp16_grads_fit``: fp16 cases get norms >= 1 and no zero rows, so that their exact
      gradients (~ s / |q| per row, 1e12 at a zero row) mostly fit fp16 (max 65504);
      tests of values only turn it off to cover the whole norm range.
    """
    n = draw(st.integers(1, max_rows), label="N")
    m = draw(st.integers(1, max_rows), label="M")
    d = draw(st.integers(1, max_dim), label="D")
    dtype = draw(st.sampled_from(dtypes))
    if dtype == torch.float16 and fp16_grads_fit:
        log10_norms, zero_rows = (max(0.0, log10_norms[0]), max(0.0, log10_norms[1])), False
    kind = draw(st.sampled_from(label_kinds))
    seed = draw(st.integers(0, 2**32 - 1))
    # A third of the cases fit their labels almost perfectly: samples of an identity
    # coincide (signal 1) at a large scale, so P ~ Y and the loss is a near-zero
    # difference of O(s) terms, the regime where rounding can push it below zero.
    near_perfect = draw(st.sampled_from([False, False, True]))
    if temperature is not None:
        tau = temperature
    else:
        tau = draw(log_uniform(TEMPERATURE_RANGE[0], 0.05) if near_perfect else temperatures())
    use_scale = draw(st.booleans()) if logit_scale is None else logit_scale
    signal = 1.0 if near_perfect else draw(st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]))
    lo, hi = sorted(draw(st.lists(st.floats(*log10_norms), min_size=2, max_size=2)))
    zero_q = draw(st.sets(st.integers(0, n - 1), max_size=2)) if zero_rows and draw(st.booleans()) else set()
    zero_g = draw(st.sets(st.integers(0, m - 1), max_size=2)) if zero_rows and draw(st.booleans()) else set()
    layout = draw(st.sampled_from(layouts))

    gen = torch.Generator().manual_seed(seed)
    q_ids = g_ids = labels = label_pattern = None
    if kind in ("ids", "unique_ids"):
        qi, gi = draw(_ids(n, m, kind == "unique_ids"))
        id_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
        q_ids = torch.tensor(qi, dtype=id_dtype)
        g_ids = torch.tensor(gi, dtype=id_dtype)
        y = (q_ids[:, None] == g_ids[None, :]).double()
    else:
        density = draw(st.sampled_from([0.1, 0.3, 0.7, 1.0]))
        # Mostly independent entries; sometimes every row (column) equal, as labels broadcast
        # from a [1, M] row ([N, 1] column) are.
        label_pattern = draw(st.sampled_from(LABEL_PATTERNS[:1] * 3 + LABEL_PATTERNS[1:]))
        rows, cols = {"independent": (n, m), "same_rows": (1, m), "same_cols": (n, 1)}[label_pattern]
        y = (torch.rand(rows, cols, generator=gen, dtype=torch.float64) < density).double()
        if kind == "soft":
            label_dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
            # Weights over four decades so the normalisation Y = y / sum(y) matters.
            y = y * torch.exp(torch.empty(rows, cols, dtype=torch.float64).uniform_(-4.6, 4.6, generator=gen))
            y = y.expand(n, m).clone()
            labels = y.to(label_dtype)
            y = labels.double()
        else:
            y = y.expand(n, m).clone()
            labels = y.bool()

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
    q_mask = draw(_mask(n, q_kind, q_off))
    g_mask = draw(_mask(m, g_kind, g_off))

    def unit(x):
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)

    def noise(rows):
        return unit(torch.randn(rows, d, generator=gen, dtype=torch.float64))

    if q_ids is not None:
        # One prototype per identity: at signal 1 the samples of an identity coincide on
        # both sides and, at a large scale, P approaches Y (near-zero losses made of
        # cancelling O(s) terms, where rounding can go below zero).
        proto = noise(int(max(q_ids.max(), g_ids.max())) + 1)
        q = signal * proto[q_ids.long()] + (1 - signal) * noise(n)
        g = signal * proto[g_ids.long()] + (1 - signal) * noise(m)
    else:
        # Gallery rows lean towards the weighted average of the queries they match.
        q = noise(n)
        g = signal * unit(y.T @ q) + (1 - signal) * noise(m)

    def with_norms(x, zero):
        log10 = torch.empty(x.shape[0], 1, dtype=torch.float64).uniform_(lo, hi, generator=gen)
        x = unit(x) * 10.0 ** log10
        x[list(zero)] = 0
        return x.to(dtype).to(device)

    q, g = with_norms(q, zero_q), with_norms(g, zero_g)
    as_mask = (lambda v: None if v is None else torch.tensor(v, dtype=torch.bool, device=device))
    move = (lambda t: None if t is None else t.to(device))
    # Layouts are made on the device (moving a strided tensor between devices may make it dense).
    args = dict(q_ids=move(q_ids), g_ids=move(g_ids), labels=move(labels), q_mask=as_mask(q_mask),
                g_mask=as_mask(g_mask))
    arg_layout = {}
    for name, t in args.items():
        if t is None:
            arg_layout[name] = None
        elif name == "labels":
            arg_layout[name] = draw(st.sampled_from(_label_layouts(t, arg_layouts)), label="labels_layout")
            args[name] = _label_layout(t, arg_layout[name])
        else:
            arg_layout[name] = draw(st.sampled_from(_vector_layouts(t, arg_layouts)), label=name + "_layout")
            args[name] = _vector_layout(t, arg_layout[name])
    recipe = dict(N=n, M=m, D=d, dtype=str(dtype).replace("torch.", ""), labels=kind, seed=seed,
                  temperature=tau, logit_scale=use_scale, signal=signal, log10_norms=(lo, hi),
                  zero_q=sorted(zero_q), zero_g=sorted(zero_g), q_mask=q_kind, g_mask=g_kind, layout=layout,
                  label_pattern=label_pattern,
                  **{name + "_layout": value for name, value in arg_layout.items()})
    return SDMCase(q=q, g=g, **args, temperature=tau, use_logit_scale=use_scale, recipe=recipe)


def eps_values(kl: str):
    """eps for a divergence: IRRA's 1e-8, TBPS-CLIP's 1e-2 and anything log-uniform in between
    for ``reverse``; for ``forward`` (which must ignore it) also 0."""
    if kl == "reverse":
        return st.one_of(st.sampled_from([1e-8, 1e-2]), log_uniform(1e-10, 0.5))
    return st.sampled_from([1e-8, 0.0, 1e-2])


@st.composite
def sdm_options(draw, kl=("forward", "reverse"), direction=("both", "q2g", "g2q"), combine=("mean", "sum"),
                reduction=("mean", "sum", "none"), normalize=(True,)):
    """The keyword options of ``sdm_loss`` (each argument lists the allowed words)."""
    chosen_kl = draw(st.sampled_from(kl))
    return dict(kl=chosen_kl, eps=draw(eps_values(chosen_kl)), direction=draw(st.sampled_from(direction)),
                combine=draw(st.sampled_from(combine)), reduction=draw(st.sampled_from(reduction)),
                normalize=draw(st.sampled_from(normalize)))


def backend_property(examples: float = 1.0):
    """Decorator: run ``body(sdm_impl, data)`` as a Hypothesis property, once per backend.

    Hypothesis fixes ``max_examples`` per test function, but the interpreted Triton
    backend must draw fewer examples than the others, so the ``@given`` function is
    built inside the test with ``sdm_impl.examples(examples)`` (``examples`` scales the
    profile's count for properties that need more or fewer). ``data`` is
    ``st.data()``: the body draws its case and options with ``data.draw``, sized by
    ``sdm_impl.max_rows`` / ``sdm_impl.max_dim``. Under a derandomized profile each
    (test, backend) pair gets its own fixed seed.
    """
    def decorate(body):
        def test(sdm_impl):
            def run(data):
                body(sdm_impl, data)

            run = given(data=st.data())(run)
            run = settings(settings.default, max_examples=sdm_impl.examples(examples))(run)
            if settings.default.derandomize:
                run = seed(zlib.crc32(f"{body.__module__}.{body.__qualname__}/{sdm_impl.name}".encode()))(run)
            run()

        for attr in ("__name__", "__qualname__", "__doc__", "__module__"):
            setattr(test, attr, getattr(body, attr))
        if hasattr(body, "pytestmark"):
            test.pytestmark = body.pytestmark
        return test

    return decorate


def cases(sdm_impl, dtypes=(torch.float32,), **kwargs):
    """``sdm_cases`` sized for the backend, on its device, over the ``dtypes`` it supports
    (skips the test when it supports none of them)."""
    supported = tuple(t for t in dtypes if t in sdm_impl.dtypes)
    if not supported:
        pytest.skip(f"backend {sdm_impl.name} supports none of {dtypes}")
    return sdm_cases(sdm_impl.max_rows, sdm_impl.max_dim, dtypes=supported, device=sdm_impl.device, **kwargs)
