"""The forward's launches, one of two paths (`policy.forward_path`):

    "staged"  prep (norms, label masses) -> stats (online softmax statistics, both directions,
              column segments when the row blocks alone would leave the GPU idle) -> finish
              (merge, per-row losses, reduction): 3 launches (`kernels/prep.py`,
              `kernels/stats.py`, `kernels/finish.py`).
    "single"  all of it in one launch, a program per row block against every column, the last
              program to finish doing the reduction (`kernels/single.py`).

Both write the same buffers (the prepared buffer, the saved state, the row losses, the
reduction), which the backward reads."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..backend import NUM_RED, NUM_STATS, ForwardOut, Statistics
from ..kernels.finish import _finish_kernel
from ..kernels.prep import _prep_kernel
from ..kernels.single import NUM_SUMS as _NUM_SUMS
from ..kernels.single import _single_forward_kernel
from ..kernels.stats import NUM_STATS as _KERNEL_NUM_STATS
from ..kernels.stats import SLOT_CNT, SLOT_LIN
from ..kernels.stats import _stats_kernel
from ..problem import Problem
from .policy import column_segments, forward_path, interpreting, positives_path, table_tiles
from .positives import ids_as_ranks, positives
from .tiles import (_cdiv, _dot_precision, _per_problem, _per_shape, _prep_tiles, _problem_index, _side_args,
                    _side_strides, _stats_tiles, _traceable, tracing)

assert _KERNEL_NUM_STATS.value == NUM_STATS, "kernels/stats.py and backend.py disagree on NUM_STATS"
_SLOT_LIN, _SLOT_CNT = SLOT_LIN.value, SLOT_CNT.value

#: The slots of the buffers the kernels share with the host, in order (kernels/slots.py names them
#: PRE_*, LAB_*, STATE_*; tests/test_structure.py checks that the two agree): the prepared
#: buffer's per-sample slots, then its per-softmax-row label masses; the state the finish kernel
#: saves per softmax row for the backward.
PREPARED_FIELDS = ("r", "c", "norm")
LABEL_MASS_FIELDS = ("ysum", "ylny")
STATE_FIELDS = ("m", "inv_l", "inv_ysum", "ln_l")


@_per_problem
def _prep_args(p: Problem) -> dict:
    """`_side_args` but the identity labels (the preparation reads none: the statistics pass counts
    the positives)."""
    ids = ("q_ids", "s_qid", "g_ids", "s_gid_gal", "s_gid")
    return {name: value for name, value in _side_args(p).items() if name not in ids}


#: The label masses start at a multiple of this many floats in the prepared buffer (128 bytes).
#: Triton specialises a pointer argument on its 16-byte alignment: at 3 NR floats the masses'
#: pointer was aligned for NR % 4 == 0 only, which compiled prep, stats and finish twice over
#: (91 extra specialisations in one GPU suite run: bench/NOTES.md 34).
_LABEL_MASS_ALIGN = 32


def _aligned(floats: int) -> int:
    """``floats`` rounded up to a multiple of _LABEL_MASS_ALIGN (128 bytes): where a buffer that
    follows others in one allocation starts (the label masses, `forward`'s buffers)."""
    return -(-floats // _LABEL_MASS_ALIGN) * _LABEL_MASS_ALIGN


def _label_offset(p: Problem) -> int:
    return _aligned(len(PREPARED_FIELDS) * p.num_samples)


def _parts(p: Problem, prepared: torch.Tensor):
    """(per-sample slots, label masses) of the prepared buffer."""
    slots, masses = _part_offsets(p)
    return prepared[:slots], prepared[masses:]


@_per_shape
def _part_offsets(p: Problem) -> Tuple[int, int]:
    """(end of the per-sample slots, start of the label masses) in the prepared buffer."""
    return len(PREPARED_FIELDS) * p.num_samples, _label_offset(p)


def _want_pos(p: Problem) -> bool:
    """Whether the statistics carry the positives' softmax mass (statistics asked for, or reverse
    KL with identity labels, whose loss needs it)."""
    return p.return_stats or (p.options.reverse and not p.dense)


def _prepared_size(p: Problem) -> int:
    return _label_offset(p) + len(LABEL_MASS_FIELDS) * p.num_rows


@_per_shape
def _prep_launch(p: Problem) -> Tuple[tuple, dict]:
    """(grid, the preparation kernel's arguments other than tensors and DENSE)."""
    t = _prep_tiles(p)
    n_qp = _cdiv(p.n, t.block_m) * p.galleries
    n_gp = p.galleries * _cdiv(p.m, t.block_m)
    return (n_qp + n_gp,), dict(N=p.n, M=p.m, K=p.galleries, n_q_programs=n_qp, D=p.d,
                                NORMALIZE=p.options.normalize, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                                BLOCK_K=t.block_k, num_warps=t.num_warps)


def prepare(p: Problem, label_masses: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``buf`` fp32: per sample r, c, norm (kernels/prep.py) [3 NR], then from the next multiple
    of 32 floats per softmax row ysum, ylny (dense labels; from ``label_masses`` [2, NDR] when
    given). ``out``: where to put it (`_prepared_size` floats, 128-byte aligned), else allocated."""
    buf = out if out is not None else torch.empty(_prepared_size(p), dtype=torch.float32, device=p.q.device)
    pre, lab = _parts(p, buf)
    masses_given = p.dense and label_masses is not None
    grid, static = _prep_launch(p)
    _traceable(_prep_kernel)[grid](**_prep_args(p), pre_ptr=pre, lab_ptr=lab, DENSE=p.dense and not masses_given,
                                   **static)
    if masses_given:      # summed over blocks or ranks: a mass that overflowed there is NaN
        lab.view(len(LABEL_MASS_FIELDS), p.num_rows).copy_(
            torch.where(torch.isinf(label_masses), float("nan"), label_masses))
    return buf


@_per_shape
def _segments(p: Problem) -> Tuple[int, int, int, int]:
    """(s_q, s_g, seg_q, seg_g): the q rows' and the gallery rows' numbers of column segments
    (`policy.column_segments`) and the columns a segment spans on each side."""
    t = _stats_tiles(p)
    base = _cdiv(p.n, t.block_m) * p.galleries + p.galleries * _cdiv(p.m, t.block_m)
    segs = column_segments(p, base, t.block_n)
    seg_q = _cdiv(_cdiv(p.m, segs), t.block_n) * t.block_n
    seg_g = _cdiv(_cdiv(p.n, segs), t.block_n) * t.block_n
    return _cdiv(p.m, seg_q), _cdiv(p.n, seg_g), seg_q, seg_g


def _partial_shape(p: Problem) -> Tuple[int, int, int]:
    s_q, s_g, _, _ = _segments(p)
    return max(s_q, s_g), NUM_STATS, p.num_rows


@_per_shape
def _stats_launch(p: Problem):
    """(grid, the statistics kernel's arguments other than tensors and the scale's value,
    (s_q, s_g), whether the loop sums the label terms, whether it compares ids)."""
    n, m, k = p.n, p.m, p.galleries
    o = p.options
    t = _stats_tiles(p)
    n_qp = _cdiv(n, t.block_m) * k
    n_gp = k * _cdiv(m, t.block_m)
    s_q, s_g, seg_q, seg_g = _segments(p)
    loop_terms = positives_path(p) == "tiles"
    loop_ids = loop_terms or _want_pos(p)
    static = dict(N=n, M=m, K=k, n_q_programs=n_qp * s_q, seg_cols_q=seg_q, seg_cols_g=seg_g, D=p.d, eps=o.eps,
                  REVERSE=o.reverse, DENSE=p.dense, WANT_POS=_want_pos(p), LOOP_IDS=loop_ids, LOOP_TERMS=loop_terms,
                  UPCAST=interpreting() and p.q.dtype == torch.bfloat16, DOT_PRECISION=_dot_precision(p.q.dtype),
                  INDEX=_problem_index(p), BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
                  num_warps=t.num_warps, num_stages=t.num_stages)
    return (n_qp * s_q + n_gp * s_g,), static, (s_q, s_g), loop_terms, loop_ids


def statistics(p: Problem, prepared: torch.Tensor, out: Optional[torch.Tensor] = None) -> Statistics:
    """part [S, NUM_STATS, NDR] fp32 (kernels/stats.py), in column segments
    (`policy.column_segments`). With `policy.positives_path` "centroids" the loop sums no label
    terms: the positives' lin and cnt (`positives.positives`) go into segment 0 (forward KL
    merges them by plain sums; the kernel wrote 0 in every segment), and the loop compares ids
    only for the negatives' softmax mass, when it is wanted, as int32 ranks (`positives.ranks`).
    ``out``: where to put part (`_partial_shape`, contiguous fp32), else allocated."""
    pre, lab = _parts(p, prepared)
    grid, static, segs, loop_terms, loop_ids = _stats_launch(p)
    part = out if out is not None else torch.empty(_partial_shape(p), dtype=torch.float32, device=p.q.device)
    # the q rows have s_q segments, the gallery rows s_g: the rest of a side's slots is never
    # written. Under the interpreter (the CPU tests) it holds +inf, so that a read of one shows
    # (NaN would not: tl.maximum ignores it).
    if interpreting():
        part.fill_(math.inf)
    args = _side_args(p)
    if loop_ids and not loop_terms:       # the negatives' mass alone: compare int32 ranks
        args = ids_as_ranks(p, args)
    _traceable(_stats_kernel)[grid](**args, pre_ptr=pre, lab_ptr=lab, scale_ptr=p.scale, out_ptr=part,
                                    scale_value=p.scale_value, **static)
    if not loop_terms:
        # into segment 0's slots; reverse KL's lin is the loop's
        positives(p, pre[:p.num_samples], cnt=part[0, _SLOT_CNT],
                  lin=None if p.options.reverse else part[0, _SLOT_LIN])
    s_q, s_g = segs
    return Statistics(part, s_q, s_g)


def _finish_sizes(p: Problem) -> Tuple[int, int, int]:
    """Floats of finish's fp32 outputs: the row losses, the saved state, the reduction buffer."""
    return p.num_rows, len(STATE_FIELDS) * p.num_rows, NUM_RED * p.galleries


@_per_shape
def _finish_launch(p: Problem) -> dict:
    """The finish kernel's arguments other than tensors, segments and the scale's value."""
    o = p.options
    st = _side_strides(p)
    ft = table_tiles("finish")
    return dict(s_qmsk=st["s_qmsk"], s_gmsk_gal=st["s_gmsk_gal"], s_gmsk=st["s_gmsk"], N=p.n, M=p.m, K=p.galleries,
                eps=o.eps, REVERSE=o.reverse, DENSE=p.dense, WANT_Q2G=o.wants_q2g, WANT_G2Q=o.wants_g2q,
                MEAN=o.reduction == "mean", COMBINE_MEAN=o.combine == "mean", STATS=p.return_stats,
                WANT_POS=_want_pos(p), BLOCK=ft.block_m, num_warps=ft.num_warps)


def finish(p: Problem, partial: torch.Tensor, segments_q: int, segments_g: int,
           prepared: torch.Tensor, out: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> ForwardOut:
    """kernels/finish.py over the first segments_q (q rows) / segments_g (gallery rows)
    segments of ``partial`` [S, NUM_STATS, NDR] (contiguous fp32). ``out``: where to put the row
    losses, the saved state and the reduction buffer (`_finish_sizes`, flat fp32), else allocated."""
    k, ndr = p.galleries, p.num_rows
    dev, f32 = p.q.device, torch.float32
    if partial.dtype != f32 or not partial.is_contiguous() or tuple(partial.shape[1:]) != (NUM_STATS, ndr):
        raise ValueError(f"finish: partial must be a contiguous fp32 [S, {NUM_STATS}, {ndr}] tensor, got "
                         f"{partial.dtype} {tuple(partial.shape)}")
    value = torch.empty(() if p.scalar_value else (k,), dtype=f32, device=dev)
    valid = torch.empty(ndr, dtype=torch.bool, device=dev)
    rows, saved, red = out if out is not None else (torch.empty(size, dtype=f32, device=dev)
                                                    for size in _finish_sizes(p))
    red = red.view(NUM_RED, k)
    pre, lab = _parts(p, prepared)
    _traceable(_finish_kernel)[(1,)](
        part_ptr=partial, pre_ptr=pre, lab_ptr=lab, q_msk=p.q_mask, g_msk=p.g_mask, scale_ptr=p.scale, rows_ptr=rows,
        valid_ptr=valid, saved_ptr=saved, red_ptr=red, value_ptr=value, S_q=segments_q, S_g=segments_g,
        scale_value=p.scale_value, **_finish_launch(p))
    return ForwardOut(value, rows, valid, red, (prepared, saved))


@_per_shape
def _arena_layout(p: Problem):
    """(the partial statistics' shape, the arena's floats, each buffer's (start, end)): the
    prepared buffer, the partial statistics, the row losses, the saved state, the reduction
    buffer, each from a multiple of 128 bytes."""
    part_shape = _partial_shape(p)
    return (part_shape, *_carve(_prepared_size(p), math.prod(part_shape), *_finish_sizes(p)))


def _carve(*sizes: int) -> Tuple[int, tuple]:
    """(floats of one allocation holding buffers of ``sizes`` floats, each buffer's (start, end)),
    each buffer from a multiple of 128 bytes (`_aligned`)."""
    spans, total = [], 0
    for size in sizes:
        spans.append((total, total + size))
        total += _aligned(size)
    return total, tuple(spans)


def forward(p: Problem) -> ForwardOut:
    """The forward of `policy.forward_path`: "single" (one launch, `_single_forward`; staged while
    torch.compile traces the launches: its ticket counter is state kept across calls), else
    `_staged_forward`."""
    if forward_path(p) == "single" and not tracing():
        return _single_forward(p)
    return _staged_forward(p)


def _staged_forward(p: Problem) -> ForwardOut:
    """prepare -> statistics -> finish with their fp32 buffers (the prepared buffer, the partial
    statistics, the row losses, the saved state, the reduction buffer) carved from one
    allocation (issue 28: each allocation costs 6-10 us of host time on an H100 host, and a small
    step made seven). The buffers the backward reads (prepared, saved) keep it alive until then:
    the partial statistics with them, S x NUM_STATS x NDR floats (1.5 MiB at N = M = 32768).
    Each buffer starts at a multiple of 128 bytes (`_aligned`): every pointer keeps the 16-byte
    alignment Triton specialises on, and the prepared buffer's label masses theirs."""
    part_shape, total, spans = _arena_layout(p)
    arena = torch.empty(total, dtype=torch.float32, device=p.q.device)
    prepared_buf, part, rows, saved, red = (arena[a:b] for a, b in spans)
    prepared = prepare(p, out=prepared_buf)
    st = statistics(p, prepared, out=part.view(part_shape))
    return finish(p, st.partial, st.segments_q, st.segments_g, prepared, out=(rows, saved, red))


def row_state(p: Problem, out: ForwardOut) -> torch.Tensor:
    """[6, NDR] fp32: the finish kernel's ``saved`` (`STATE_FIELDS`), loss, validity."""
    ndr = p.num_rows
    _, saved = out.state
    return torch.cat([saved.view(len(STATE_FIELDS), ndr), out.rows.view(1, ndr),
                      out.valid.view(1, ndr).to(torch.float32)])


def state_from_rows(p: Problem, prepared: torch.Tensor, rows: torch.Tensor) -> ForwardOut:
    red = torch.zeros((NUM_RED, p.galleries), dtype=torch.float32, device=p.q.device)
    s = len(STATE_FIELDS)
    return ForwardOut(None, rows[s].contiguous(), rows[s + 1] != 0, red, (prepared, rows[:s].contiguous().view(-1)))


#: The single forward's ticket counters (kernels/single.py), one int32 per (device, stream): 0
#: between launches, since the last program of a launch sets it back. Launches on one stream run
#: one after another; two streams get two counters.
_TICKETS = {}


def _ticket_counter(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        key = (device.type, device.index, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (device.type, device.index, 0)
    counter = _TICKETS.get(key)
    if counter is None:
        counter = _TICKETS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


@_per_shape
def _single_launch(p: Problem):
    """(grid, the arena's floats, each buffer's (start, end), the single forward kernel's
    arguments other than tensors and the scale's value). The arena: the prepared buffer, the
    statistics [1, NUM_STATS, NDR], the row losses, the saved state, the reduction buffer and
    the programs' sums, each from a multiple of 128 bytes (`_arena_layout`)."""
    o = p.options
    n, m, k = p.n, p.m, p.galleries
    t = _stats_tiles(p)
    n_qp = _cdiv(n, t.block_m) * k
    programs = n_qp + k * _cdiv(m, t.block_m)
    total, spans = _carve(_prepared_size(p), NUM_STATS * p.num_rows, *_finish_sizes(p), _NUM_SUMS.value * programs)
    static = dict(N=n, M=m, K=k, n_q_programs=n_qp, D=p.d, eps=o.eps, REVERSE=o.reverse, DENSE=p.dense,
                  WANT_POS=_want_pos(p), WANT_Q2G=o.wants_q2g, WANT_G2Q=o.wants_g2q, MEAN=o.reduction == "mean",
                  COMBINE_MEAN=o.combine == "mean", STATS=p.return_stats, NORMALIZE=o.normalize,
                  UPCAST=interpreting() and p.q.dtype == torch.bfloat16, DOT_PRECISION=_dot_precision(p.q.dtype),
                  INDEX=_problem_index(p), BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
                  BLOCK_KP=_prep_tiles(p).block_k, num_warps=t.num_warps, num_stages=t.num_stages)
    return (programs,), total, spans, static


def _single_forward(p: Problem) -> ForwardOut:
    """The forward in one launch (kernels/single.py), its fp32 buffers carved from one allocation
    as `_staged_forward`'s, the same ones for the backward."""
    grid, total, spans, static = _single_launch(p)
    dev, f32 = p.q.device, torch.float32
    arena = torch.empty(total, dtype=f32, device=dev)
    prepared, part, rows, saved, red, sums = (arena[a:b] for a, b in spans)
    pre, lab = _parts(p, prepared)
    value = torch.empty(() if p.scalar_value else (p.galleries,), dtype=f32, device=dev)
    valid = torch.empty(p.num_rows, dtype=torch.bool, device=dev)
    _traceable(_single_forward_kernel)[grid](
        **_side_args(p), pre_ptr=pre, lab_ptr=lab, scale_ptr=p.scale, part_ptr=part, rows_ptr=rows,
        valid_ptr=valid, saved_ptr=saved, sums_ptr=sums, red_ptr=red, value_ptr=value,
        count_ptr=_ticket_counter(dev), scale_value=p.scale_value, **static)
    return ForwardOut(value, rows, valid, red.view(NUM_RED, p.galleries), (prepared, saved))
