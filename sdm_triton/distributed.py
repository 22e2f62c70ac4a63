"""The SDM loss of a batch spread over the ranks of a process group (``torch.distributed``).

    from sdm_triton.distributed import sdm_loss_distributed
    loss = sdm_loss_distributed(img_local, txt_local, pid_local, pid_local, logit_scale=scale)

Each rank passes its LOCAL rows: ``q`` [N_r, D], ``g`` [M_r, D], their ids (or
``labels`` [N_r, M]: this rank's rows of the global label matrix, columns in
global rank order, M = sum of M_r) and masks. The global batch is the
concatenation of the ranks' rows in rank order.

layout="global" (default): the loss of the global batch
    Every rank returns the same value: the loss that ``sdm_triton.sdm_loss`` gives
    on the concatenated batch (both directions, every option; positives count
    across ranks). ``reduction="none"`` returns the per-row losses of this rank's
    rows (``q2g`` [N_r], ``g2q`` [M_r]) and their validity.

layout="local_rows": TBPS-CLIP's layout
    Rank r's value is the loss of its local rows against all gathered columns of
    the other side (q2g: local q x all g; g2q: local g x all q), each direction
    averaged over its local valid rows only. Values differ between ranks.

Gradient convention (``grad_convention``)
    "global" (default): the gradient of the objective J, where J is the global loss
        (layout "global"; with ``reduction="none"``, J is the sum over ranks of
        what each rank backpropagates, i.e. a weighting of the global rows) or the
        mean over ranks of the per-rank values (layout "local_rows"). Each rank
        receives dJ/d(its local q, g): its slice of the global gradient, NOT
        multiplied by the world size; a ``logit_scale`` tensor receives the full
        dJ/ds, the same on every rank (all-reduced).
    "ddp": the same, with the gradients of q and g multiplied by the world size P.
        DistributedDataParallel averages parameter gradients over ranks, which is
        right for a replicated parameter such as ``logit_scale`` (it holds dJ/ds on
        every rank) but divides the encoder gradients, which are sums over ranks
        of the per-rank feature gradients, by P. With "ddp", DDP's average is
        exactly dJ/d(parameter) for every parameter. Scaling the loss by P instead
        also fixes the encoders but makes the logit_scale gradient P times too large.
        Without DDP (gradients all-reduced by hand with SUM), use "global".

        # a DDP training step, on every rank:
        loss = sdm_loss_distributed(img, txt, pid, pid, logit_scale=model.logit_scale.exp(),
                                    grad_convention="ddp")
        loss.backward()   # after DDP's averaging: d(global loss)/d(every parameter)

Strategies (layout "global")
    "allgather": g (and the small per-sample vectors) are all-gathered; each rank
        runs the tile primitives on its q rows against all M columns. Row
        statistics are then complete; column statistics are partial over the
        rank's rows and are merged after an all-gather of the [5, M] partials.
        Backward: dS [N_r, M] chunks give dq locally and a partial (inverse-norm scaled) dL/dg_hat for
        every column, reduce-scattered to the owners. Memory: O(M * D) per rank
        (the gathered g is kept for backward) plus O(P * M) for the partials.
    "ring": each rank's g block travels around the ring with point-to-point
        sends (``batch_isend_irecv``), overlapped with the tile work on the block
        in hand; its column statistics (forward) and its g-gradient accumulator
        (backward) follow one step behind and come home after P steps. Memory:
        O((N_r + max M_r) * D) per rank plus O(N + M) for ids / label masses.
    Both give the numbers of the single-process computation (up to rounding order).

Costs and requirements
    * One small metadata all-gather (D, dtype, sizes, options, requires_grad flags,
      the logit scale's value) starts every call and is read on the host (one
      synchronisation: the uneven sizes are needed to allocate the buffers). Any
      disagreement, or a local validation error on any rank, raises on every rank
      instead of hanging: ValueError naming the field (the failing rank itself
      raises its own TypeError / ValueError).
    * Every rank must call forward and, if any does, backward (the backward runs
      collectives). ``requires_grad`` of q, g and logit_scale must agree across ranks.
    * The group's backend must support the tensors' device: NCCL for CUDA, gloo for CPU.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .options import (
    SDMOptions,
    SDMRowLosses,
    check_values as _check_values,
    compute_dtype,
    resolve_scale,
    validate_inputs,
)

from .api import SDMStats, _pick_tiles, reduce_rows, sdm_loss
from .autograd import (
    DEFAULT_WORKSPACE_BYTES,
    grad_pass,
    scale_tensor,
    stats_pass,
    upstream_rows,
)
from .prepare import Side, _finish_side, _id_counts, input_gradient, product_operand, row_powers
from .stats import finish_rows, merge_partials, merge_two, split_lse

STRATEGIES = ("allgather", "ring")
LAYOUTS = ("global", "local_rows")
GRAD_CONVENTIONS = ("global", "ddp")

_TAG_BLOCK, _TAG_ACC = 0, 1   # gloo matches point-to-point messages by tag; NCCL by posting order
_OPTION_NAMES = ("kl", "eps", "direction", "combine", "reduction", "normalize", "strategy", "layout",
                 "grad_convention", "backend", "return_stats", "temperature")
# torch >= 2.12 renamed the single-tensor collectives (the old names warn).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.float64: 4}


# --------------------------------------------------------------------------------------------
# Communication context and collectives
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Comm:
    group: object
    rank: int                   # rank within the group
    world: int
    q_sizes: tuple              # N_r of every rank
    g_sizes: tuple              # M_r of every rank
    grad_factor: float          # multiplies the q / g gradients (grad_convention)

    def g_offset(self, r: int) -> int:
        return sum(self.g_sizes[:r])

    def q_offset(self, r: int) -> int:
        return sum(self.q_sizes[:r])

    def peer(self, r: int) -> int:
        """Global rank of group rank ``r`` (mod world): what P2POp expects."""
        return dist.get_global_rank(self.group, r % self.world)


def _all_gather_rows(x: torch.Tensor, sizes: Sequence[int], comm: _Comm) -> torch.Tensor:
    """Concatenate every rank's ``x`` [sizes[r], ...] along dim 0 (padded all-gather for uneven sizes)."""
    if comm.world == 1:
        return x
    n_max = max(sizes)
    x = x.contiguous()
    if x.shape[0] != n_max:
        pad = x.new_zeros((n_max,) + tuple(x.shape[1:]))
        pad[: x.shape[0]] = x
        x = pad
    out = x.new_empty((comm.world * n_max,) + tuple(x.shape[1:]))
    _all_gather_single(out, x, group=comm.group)
    if all(s == n_max for s in sizes):
        return out
    return torch.cat([out[i * n_max: i * n_max + s] for i, s in enumerate(sizes)])


def _reduce_scatter_rows(x: torch.Tensor, sizes: Sequence[int], comm: _Comm) -> torch.Tensor:
    """Sum ``x`` [sum(sizes), ...] over ranks and return this rank's rows [sizes[rank], ...]."""
    if comm.world == 1:
        return x
    n_max = max(sizes)
    if any(s != n_max for s in sizes):
        buf = x.new_zeros((comm.world * n_max,) + tuple(x.shape[1:]))
        off = 0
        for i, s in enumerate(sizes):
            buf[i * n_max: i * n_max + s] = x[off: off + s]
            off += s
        x = buf
    out = x.new_empty((n_max,) + tuple(x.shape[1:]))
    _reduce_scatter_single(out, x.contiguous(), group=comm.group)
    return out[: sizes[comm.rank]]


def _all_reduce(x: torch.Tensor, comm: _Comm, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if comm.world > 1:
        dist.all_reduce(x, op=op, group=comm.group)
    return x


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks in forward; the gradient passes through unchanged.

    Every rank backpropagates the same reduced value, and each rank's graph only
    reaches its own share, so the identity gives dJ/d(local share) on every rank.
    """

    @staticmethod
    def forward(ctx, x, comm):
        return _all_reduce(x.clone(), comm)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _AllGatherRows(torch.autograd.Function):
    """Differentiable padded all-gather; backward sums the gradients over ranks (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, sizes, comm):
        ctx.sizes, ctx.comm = sizes, comm
        return _all_gather_rows(x, sizes, comm)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_rows(grad.contiguous(), ctx.sizes, ctx.comm), None, None


class _GradScale(torch.autograd.Function):
    """Identity in forward; multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class _ReplicatedMean(torch.autograd.Function):
    """Identity in forward; the gradient is averaged over ranks (a parameter replicated on every rank)."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.comm) / ctx.comm.world, None


def _ring_pass(comm: _Comm, block, block_like, compute, combine, acc_like):
    """Send every rank's block once around the ring; return this rank's block's complete accumulator.

    block:        list of tensors describing this rank's block (its g rows and per-column vectors)
    block_like:   s -> list of (shape, dtype) of rank s's block (to allocate receive buffers)
    compute:      (s, block of rank s) -> this rank's contribution to block s's accumulator (or None)
    combine:      (accumulator received, own contribution) -> accumulator to pass on
    acc_like:     s -> (shape, dtype) of block s's accumulator, or None when nothing accumulates

    Step k holds block s = rank - k: the next block is received while block s is being
    computed on. Every step posts ONE group of point-to-point operations, the same on every
    rank: the accumulator finished in step k - 1 goes to the next rank (which holds that
    block now) and this step's incoming accumulator comes from the previous rank, beside
    the block transfers. A final group delivers each accumulator to its owner. (Sending
    the accumulator in a group of its own after the compute, as an earlier version did,
    made each rank's send wait on a receive its peer posts only after its own send: the
    4-H100 NCCL run of tools/dist_scaling.py never finished the ring at 32768 rows per
    rank, bench/NOTES.md.)
    """
    world, rank = comm.world, comm.rank
    nxt, prv = comm.peer(rank + 1), comm.peer(rank - 1)
    device = block[0].device
    accumulates = acc_like(rank) is not None
    acc, acc_out = None, None
    for k in range(world):
        s = (rank - k) % world
        ops, acc_in, incoming = [], None, None
        # Per peer, the posting order matches the other side's: accumulator, then block.
        if acc_out is not None:
            ops.append(dist.P2POp(dist.isend, acc_out, nxt, comm.group, _TAG_ACC))
        if k > 0 and accumulates:
            shape, dtype = acc_like(s)
            acc_in = torch.empty(shape, dtype=dtype, device=device)
            ops.append(dist.P2POp(dist.irecv, acc_in, prv, comm.group, _TAG_ACC))
        if k < world - 1:
            incoming = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in block_like(s - 1)]
            ops += [dist.P2POp(dist.isend, t, nxt, comm.group, _TAG_BLOCK) for t in block]
            ops += [dist.P2POp(dist.irecv, t, prv, comm.group, _TAG_BLOCK) for t in incoming]
        works = dist.batch_isend_irecv(ops) if ops else []
        contribution = compute(s, block)
        for w in works:
            w.wait()
        if accumulates:
            acc = contribution if acc_in is None else combine(acc_in, contribution)
            acc_out = acc if world > 1 else None
        block = incoming
    if accumulates and world > 1:
        shape, dtype = acc_like(rank)
        acc = torch.empty(shape, dtype=dtype, device=device)
        ops = [dist.P2POp(dist.isend, acc_out, nxt, comm.group, _TAG_ACC),
               dist.P2POp(dist.irecv, acc, prv, comm.group, _TAG_ACC)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
    return acc


# --------------------------------------------------------------------------------------------
# Preparation: the sides of the problem with global label masses
# --------------------------------------------------------------------------------------------

def _slice_side(side: Side, a: int, b: int) -> Side:
    values = (getattr(side, f.name) for f in dataclasses.fields(side))
    return Side(*(None if v is None else v[a:b] for v in values))


def _block_side(feats, vec, ids) -> Side:
    """A travelling g block as a Side: only what the tile primitives read (feats, inv_norm, present, ids, inv_ysum)."""
    present = vec[2] > 0.5
    return Side(feats, vec[0], None, present, ids, vec[1], None, None)


def _prepare(q, g, q_ids, g_ids, labels, q_mask, g_mask, opts: SDMOptions, comm: _Comm, gather_g: bool):
    """side_q (local rows), side_g (all M rows if ``gather_g``, else the local rows), g ids / presence of all M.

    The label masses need the global batch: with ids, one all-gather of (id, present)
    of both sides and a count (``_id_counts``); with dense labels, an all-reduce of
    the column sums of this rank's label rows.
    """
    ct = compute_dtype(q.dtype)
    dev = q.device
    n, m = q.shape[0], g.shape[0]
    q_present = q_mask if q_mask is not None else torch.ones(n, dtype=torch.bool, device=dev)
    g_present = g_mask if g_mask is not None else torch.ones(m, dtype=torch.bool, device=dev)
    g0, g1 = comm.g_offset(comm.rank), comm.g_offset(comm.rank) + m
    both_sizes = [a + b for a, b in zip(comm.q_sizes, comm.g_sizes)]
    if labels is None:
        qi, gi = q_ids.to(torch.int64), g_ids.to(torch.int64)
        local = torch.stack([torch.cat([qi, gi]), torch.cat([q_present, g_present]).to(torch.int64)], dim=1)
        rows = _all_gather_rows(local, both_sizes, comm).split(both_sizes)
        q_all = torch.cat([r[:nq] for r, nq in zip(rows, comm.q_sizes)])
        g_all = torch.cat([r[nq:] for r, nq in zip(rows, comm.q_sizes)])
        q_ids_all, q_present_all = q_all[:, 0].contiguous(), q_all[:, 1].bool()
        g_ids_all, g_present_all = g_all[:, 0].contiguous(), g_all[:, 1].bool()
        ysum_q = _id_counts(qi, g_ids_all, g_present_all, ct)
        ysum_g = _id_counts(g_ids_all if gather_g else gi, q_ids_all, q_present_all, ct)
        ylogy_q, ylogy_g = torch.zeros_like(ysum_q), torch.zeros_like(ysum_g)   # binary: y log y = 0
    else:
        qi = gi = g_ids_all = None
        g_present_all = _all_gather_rows(g_present.to(torch.int64), comm.g_sizes, comm).bool()
        y = labels.to(ct) * (q_present[:, None] & g_present_all[None, :])
        ylogy = torch.xlogy(y, y)
        ysum_q, ylogy_q = y.sum(1), ylogy.sum(1)
        cols = _all_reduce(torch.stack([y.sum(0), ylogy.sum(0)]), comm)       # [2, M] over every rank's rows
        ysum_g, ylogy_g = (cols[0], cols[1]) if gather_g else (cols[0, g0:g1], cols[1, g0:g1])
    side_q = _finish_side(q, opts.normalize, q_present, qi, ysum_q, ylogy_q)
    if gather_g:
        g_feats = _all_gather_rows(g, comm.g_sizes, comm)
        side_g = _finish_side(g_feats, opts.normalize, g_present_all, g_ids_all, ysum_g, ylogy_g)
    else:
        side_g = _finish_side(g, opts.normalize, g_present, gi, ysum_g, ylogy_g)
    return side_q, side_g


def _label_block(labels, comm: _Comm, s: int):
    if labels is None:
        return None
    off = comm.g_offset(s)
    return labels[:, off: off + comm.g_sizes[s]]


# --------------------------------------------------------------------------------------------
# The autograd function (layout "global")
# --------------------------------------------------------------------------------------------

class _SDMDistributedRows(torch.autograd.Function):
    """(local q, local g, logit_scale) -> per-row losses of the local rows of both directions of the global problem."""

    @staticmethod
    def forward(ctx, q, g, logit_scale, scale_value, q_ids, g_ids, labels, q_mask, g_mask,
                opts: SDMOptions, tiles, workspace_bytes: int, comm: _Comm, strategy: str):
        ct = compute_dtype(q.dtype)
        scale_t = scale_tensor(logit_scale, scale_value, ct, q.device)
        m = g.shape[0]
        g0 = comm.g_offset(comm.rank)
        if strategy == "allgather":
            side_q, side_g_all = _prepare(q, g, q_ids, g_ids, labels, q_mask, g_mask, opts, comm, gather_g=True)
            row_stats, col_part = stats_pass(tiles, side_q, side_g_all, labels, scale_t, opts, workspace_bytes)
            parts = _all_gather_rows(col_part, [col_part.shape[0]] * comm.world, comm)      # [P * 5, M]
            col_stats = merge_partials(parts.view(comm.world, *col_part.shape).transpose(0, 1), opts.reverse)
            loss_q, lse_q, pos_q = finish_rows(row_stats, side_q.row_valid, side_q.ylogy, opts.reverse)
            loss_g_all, lse_g_all, pos_g_all = finish_rows(col_stats, side_g_all.row_valid, side_g_all.ylogy,
                                                           opts.reverse)
            # lse as hi + lo in the compute dtype (stats.split_lse): it travels through
            # collectives stacked with other compute-dtype vectors
            lse_q, lse_g_all = split_lse(lse_q, ct), split_lse(lse_g_all, ct)
            side_g = _slice_side(side_g_all, g0, g0 + m)
            loss_g, pos_g = loss_g_all[g0: g0 + m].clone(), pos_g_all[g0: g0 + m].clone()
            ctx.side_g_all = side_g_all
            ctx.save_for_backward(*lse_q, loss_q, *lse_g_all, loss_g_all)
        else:
            side_q, side_g = _prepare(q, g, q_ids, g_ids, labels, q_mask, g_mask, opts, comm, gather_g=False)
            block = [side_g.feats.contiguous(),
                     torch.stack([side_g.inv_norm, side_g.inv_ysum, side_g.present.to(ct)])]
            if side_g.ids is not None:
                block.append(side_g.ids.contiguous())
            state = {"rows": None}

            def compute(s, blk):
                rows, cols = stats_pass(tiles, side_q, _block_side(blk[0], blk[1], blk[2] if len(blk) > 2 else None),
                                        _label_block(labels, comm, s), scale_t, opts, workspace_bytes)
                prev = state["rows"]
                state["rows"] = rows if prev is None else merge_two(prev, rows, opts.reverse)
                return cols

            col_stats = _ring_pass(comm, block, lambda s: _block_like(comm, s, q, ct, side_g.ids is not None, 3),
                                   compute, lambda acc, c: merge_two(acc, c, opts.reverse),
                                   lambda s: ((5, comm.g_sizes[s % comm.world]), ct))
            loss_q, lse_q, pos_q = finish_rows(state["rows"], side_q.row_valid, side_q.ylogy, opts.reverse)
            loss_g, lse_g, pos_g = finish_rows(col_stats, side_g.row_valid, side_g.ylogy, opts.reverse)
            lse_q, lse_g = split_lse(lse_q, ct), split_lse(lse_g, ct)   # see the allgather branch
            ctx.save_for_backward(*lse_q, loss_q, *lse_g, loss_g)

        ctx.sides = (side_q, side_g)
        ctx.labels, ctx.scale_t, ctx.opts, ctx.tiles = labels, scale_t, opts, tiles
        ctx.workspace_bytes, ctx.comm, ctx.strategy = workspace_bytes, comm, strategy
        ctx.scale_dtype = logit_scale.dtype if logit_scale is not None else None
        ctx.mark_non_differentiable(side_q.row_valid, side_g.row_valid, pos_q, pos_g)
        return loss_q, loss_g, side_q.row_valid, side_g.row_valid, pos_q, pos_g

    @staticmethod
    def backward(ctx, d_loss_q, d_loss_g, _vq, _vg, _pq, _pg):
        side_q, side_g = ctx.sides
        opts, tiles, comm = ctx.opts, ctx.tiles, ctx.comm
        q = side_q.feats
        n, d = q.shape
        # requires_grad agrees across ranks (checked in forward), so every rank runs the same collectives.
        want_q, want_g, want_scale = ctx.needs_input_grad[:3]
        lse_q_hi, lse_q_lo, loss_q, lse_g_hi, lse_g_lo, loss_g = ctx.saved_tensors
        lse_q = (lse_q_hi, lse_q_lo)
        ct = loss_q.dtype
        ga = upstream_rows(d_loss_q, side_q.row_valid, loss_q)                # [N_r]
        gb = upstream_rows(d_loss_g, side_g.row_valid, side_g.inv_ysum)      # [M_r]
        q_op = product_operand(side_q, tiles.gemm_dtype(q.dtype) or ct)
        u_q = torch.zeros((n, d), dtype=ct, device=q.device) if want_q else None
        dscale = torch.zeros((n,), dtype=ct, device=q.device) if want_scale else None
        # One scale for the upstream gradients of every rank, so that dS is O(1) (fp16 workspaces)
        # and the partial gradients of different ranks add up in the same units.
        g_max = torch.maximum(ga.abs().amax(), gb.abs().amax()).clamp_min(torch.finfo(ct).tiny)
        g_max = _all_reduce(g_max.reshape(1), comm, dist.ReduceOp.MAX)[0]
        ga = ga / g_max

        if ctx.strategy == "allgather":
            side_g_all = ctx.side_g_all
            gb_all = _all_gather_rows(gb / g_max, comm.g_sizes, comm)
            u_g_all = torch.zeros((side_g_all.feats.shape[0], d), dtype=ct, device=q.device) if want_g else None
            grad_pass(tiles, side_q, side_g_all, ctx.labels, ctx.scale_t, opts, lse_q, (lse_g_hi, lse_g_lo),
                      loss_q, loss_g, ga, gb_all, u_q, u_g_all, dscale, ctx.workspace_bytes, a_op=q_op[:2])
            u_g = _reduce_scatter_rows(u_g_all, comm.g_sizes, comm) if want_g else None
        else:
            block = [side_g.feats.contiguous(),
                     torch.stack([side_g.inv_norm, side_g.inv_ysum, side_g.present.to(ct), lse_g_hi, lse_g_lo,
                                  loss_g, gb / g_max])]
            if side_g.ids is not None:
                block.append(side_g.ids.contiguous())

            def compute(s, blk):
                vec = blk[1]
                side_s = _block_side(blk[0], vec, blk[2] if len(blk) > 2 else None)
                contribution = torch.zeros((blk[0].shape[0], d), dtype=ct, device=q.device) if want_g else None
                grad_pass(tiles, side_q, side_s, _label_block(ctx.labels, comm, s), ctx.scale_t, opts,
                          lse_q, (vec[3], vec[4]), loss_q, vec[5], ga, vec[6], u_q, contribution, dscale,
                          ctx.workspace_bytes, a_op=q_op[:2])
                return contribution

            u_g = _ring_pass(comm, block, lambda s: _block_like(comm, s, q, ct, side_g.ids is not None, 7),
                                compute, lambda acc, c: c.add_(acc),
                                lambda s: ((comm.g_sizes[s % comm.world], d), ct) if want_g else None)

        factor = ctx.scale_t * g_max   # dS was divided by g_max; dS/dx_hat carries the scale s
        dq = dg = d_scale = None
        factor = factor * comm.grad_factor
        if want_q:
            dq = input_gradient(side_q, u_q, q_op[2], factor, opts.normalize, q.dtype)
        if want_g:
            dg = input_gradient(side_g, u_g, 1.0 / row_powers(side_g.inv_norm), factor, opts.normalize,
                                side_g.feats.dtype)
        if want_scale:
            d_scale = _all_reduce((dscale.sum() * g_max).reshape(1), comm)[0].to(ctx.scale_dtype)
        return dq, dg, d_scale, *([None] * 11)


def _block_like(comm: _Comm, s: int, q: torch.Tensor, ct, has_ids: bool, n_vec: int):
    m = comm.g_sizes[s % comm.world]
    like = [((m, q.shape[1]), q.dtype), ((n_vec, m), ct)]
    if has_ids:
        like.append(((m,), torch.int64))
    return like


# --------------------------------------------------------------------------------------------
# Validation and the cross-rank agreement check
# --------------------------------------------------------------------------------------------

def _validate_local(q, g, q_ids, g_ids, labels, q_mask, g_mask, temperature, logit_scale, check_values,
                    strategy, layout, grad_convention):
    for name, value, choices in (("strategy", strategy, STRATEGIES), ("layout", layout, LAYOUTS),
                                 ("grad_convention", grad_convention, GRAD_CONVENTIONS)):
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    if layout == "local_rows" and strategy != "allgather":
        raise ValueError("layout='local_rows' gathers the other side's features: use strategy='allgather'")
    probe = labels
    if isinstance(labels, torch.Tensor) and isinstance(q, torch.Tensor) and isinstance(g, torch.Tensor):
        if labels.dim() != 2 or labels.shape[0] != q.shape[0] or labels.shape[1] < 1:
            raise ValueError(f"labels must have shape [N_local, M_global] = [{q.shape[0]}, sum of every rank's "
                             f"g rows] (this rank's rows of the global label matrix), got {tuple(labels.shape)}")
        if g.dim() == 2:   # the width is checked against the global M after the metadata exchange
            probe = labels[:, :1].expand(labels.shape[0], g.shape[0])
    validate_inputs(q, g, q_ids, g_ids, probe, q_mask, g_mask)
    scale = resolve_scale(temperature, logit_scale, q)
    if check_values:
        _check_values(q, g, labels, scale)
    return scale


def _comm_device(group, q) -> torch.device:
    if isinstance(q, torch.Tensor):
        return q.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _crc(value) -> int:
    return zlib.crc32(repr(value).encode())


def _exchange_metadata(group, q, g, labels, logit_scale, fields, error: Optional[BaseException]):
    """All-gather (ok, N_r, M_r, label width, D, dtype, options..., flags) and check agreement on every rank.

    ``fields``: (name, this rank's value as an int, shown value) compared across ranks.
    Returns the per-rank N_r and M_r.
    """
    device = _comm_device(group, q)
    world = dist.get_world_size(group)
    ok = error is None
    head = [int(ok), q.shape[0] if ok else 0, g.shape[0] if ok else 0,
            labels.shape[1] if ok and labels is not None else -1]
    meta = torch.tensor(head + [v if ok else 0 for _, v, _ in fields], dtype=torch.int64, device=device)
    scale_bits = torch.zeros(1, dtype=torch.int64, device=device)
    if ok and logit_scale is not None:   # the value of the logit scale must agree as well (no host read here)
        scale_bits = logit_scale.detach().to(device=device, dtype=torch.float64).reshape(1).view(torch.int64)
    meta = torch.cat([meta, scale_bits])
    out = torch.empty(world * meta.numel(), dtype=torch.int64, device=device)
    _all_gather_single(out, meta, group=group)
    table = out.view(world, -1).tolist()     # the one host synchronisation of the call

    if error is not None:
        raise error
    bad = [r for r, row in enumerate(table) if row[0] == 0]
    if bad:
        raise ValueError(f"sdm_loss_distributed: rank(s) {bad} rejected their inputs (see the error raised "
                         "there); every rank stops")
    names = [f[0] for f in fields] + ["logit_scale value"]
    shown = [f[2] for f in fields] + [None]
    for i, name in enumerate(names):
        col = [row[4 + i] for row in table]
        if len(set(col)) > 1:
            this = f" (this rank: {shown[i]!r})" if shown[i] is not None else ""
            per_rank = f"; per rank: {col}" if name == "D" else ""
            raise ValueError(f"sdm_loss_distributed: ranks disagree on {name}{this}{per_rank}. "
                             "Every rank must pass the same D, dtype, device type, options and logit scale, "
                             "and the same requires_grad for q, g and logit_scale")
    q_sizes = tuple(row[1] for row in table)
    g_sizes = tuple(row[2] for row in table)
    widths = [row[3] for row in table]
    if labels is not None and any(w != sum(g_sizes) for w in widths):
        raise ValueError(f"sdm_loss_distributed: labels must be [N_local, M_global] with M_global = "
                         f"{sum(g_sizes)} (the g rows of all ranks); label widths per rank: {widths}")
    return q_sizes, g_sizes


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------

def sdm_loss_distributed(
    q: torch.Tensor,
    g: torch.Tensor,
    q_ids: Optional[torch.Tensor] = None,
    g_ids: Optional[torch.Tensor] = None,
    *,
    labels: Optional[torch.Tensor] = None,
    q_mask: Optional[torch.Tensor] = None,
    g_mask: Optional[torch.Tensor] = None,
    group=None,
    strategy: str = "allgather",
    layout: str = "global",
    grad_convention: str = "global",
    temperature: float = 0.02,
    logit_scale: Optional[torch.Tensor] = None,
    kl: str = "forward",
    eps: float = 1e-8,
    direction: str = "both",
    combine: str = "mean",
    reduction: str = "mean",
    normalize: bool = True,
    backend: str = "auto",
    check_values: bool = False,
    return_stats: bool = False,
    tile_config: Optional[str] = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
):
    """SDM loss of the global batch whose rows are spread over the ranks of ``group`` (see the module docstring).

    Local arguments: ``q`` [N_r, D], ``g`` [M_r, D], ``q_ids`` [N_r] and ``g_ids`` [M_r], or
    ``labels`` [N_r, M] (this rank's rows of the global label matrix); ``q_mask``, ``g_mask``.
    Every rank must call with the same options and D / dtype / logit scale.

    group:           the process group (default: the world).
    strategy:        "allgather" or "ring" (layout "global" only).
    layout:          "global" (the loss of the concatenated batch, the same on every rank) or
                     "local_rows" (TBPS-CLIP: local rows x all gathered columns, per-rank value).
    grad_convention: "global" (dJ/d local inputs) or "ddp" (q, g gradients times the world size,
                     so that DistributedDataParallel's averaging gives the exact gradient).
    Other arguments: as ``sdm_triton.sdm_loss``. ``return_stats`` gives global statistics.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sdm_loss_distributed needs an initialised torch.distributed process group")
    group = group if group is not None else dist.group.WORLD
    opts = tiles = scale = error = None
    fields = []
    try:
        opts = SDMOptions(kl=kl, eps=eps, direction=direction, combine=combine, reduction=reduction,
                          normalize=normalize)
        scale = _validate_local(q, g, q_ids, g_ids, labels, q_mask, g_mask, temperature, logit_scale,
                                check_values, strategy, layout, grad_convention)
        tiles = _pick_tiles(backend, q, tile_config)
        grad_on = torch.is_grad_enabled()
        flags = (grad_on and q.requires_grad, grad_on and g.requires_grad,
                 grad_on and logit_scale is not None and logit_scale.requires_grad)
        option_values = dict(kl=kl, eps=float(eps), direction=direction, combine=combine, reduction=reduction,
                             normalize=normalize, strategy=strategy, layout=layout, grad_convention=grad_convention,
                             backend=tiles.name, return_stats=return_stats,
                             temperature=None if logit_scale is not None else float(temperature))
        assert tuple(option_values) == _OPTION_NAMES
        fields = [("D", q.shape[1], q.shape[1]), ("dtype", _DTYPE_CODES[q.dtype], str(q.dtype)),
                  ("device type", _crc(q.device.type), q.device.type),
                  ("label kind (ids or labels)", int(labels is not None), "labels" if labels is not None else "ids"),
                  ("requires_grad of (q, g, logit_scale)", flags[0] + 2 * flags[1] + 4 * flags[2], flags)]
        fields += [(k, _crc(v), v) for k, v in option_values.items()]
    except Exception as exc:   # noqa: BLE001 -- reported to every rank before it is raised here
        error = exc
        fields = [("", 0, None)] * (5 + len(_OPTION_NAMES))
    q_sizes, g_sizes = _exchange_metadata(group, q, g, labels, logit_scale, fields, error)

    world = dist.get_world_size(group)
    if layout == "local_rows":
        comm = _Comm(group, dist.get_rank(group), world, q_sizes, g_sizes, 1.0 / world)
        return _local_rows_loss(q, g, q_ids, g_ids, labels, q_mask, g_mask, temperature, logit_scale, opts, comm,
                                grad_convention,
                                dict(backend=backend, tile_config=tile_config, workspace_bytes=workspace_bytes),
                                return_stats)
    comm = _Comm(group, dist.get_rank(group), world, q_sizes, g_sizes,
                 float(world) if grad_convention == "ddp" else 1.0)
    logit_scale_t = scale if isinstance(scale, torch.Tensor) else None
    scale_value = None if logit_scale_t is not None else scale
    loss_q, loss_g, valid_q, valid_g, pos_q, pos_g = _SDMDistributedRows.apply(
        q, g, logit_scale_t, scale_value, q_ids, g_ids, labels, q_mask, g_mask, opts, tiles, workspace_bytes,
        comm, strategy)
    if opts.reduction == "none":
        out = reduce_rows(loss_q if opts.wants_q2g else None, valid_q if opts.wants_q2g else None,
                          loss_g if opts.wants_g2q else None, valid_g if opts.wants_g2q else None, opts)
    else:
        # Global sums and valid-row counts (float64: exact counts), then the single-process reduction.
        local = torch.stack([loss_q.sum(), loss_g.sum()]).to(torch.float64)
        counts = torch.stack([valid_q.sum(), valid_g.sum()]).to(torch.float64)
        tot = _AllReduceSum.apply(torch.cat([local, counts]), comm).to(loss_q.dtype)
        out = reduce_rows(tot[0:1] if opts.wants_q2g else None, tot[2:3] if opts.wants_q2g else None,
                          tot[1:2] if opts.wants_g2q else None, tot[3:4] if opts.wants_g2q else None, opts)
    if not return_stats:
        return out
    return out, _global_stats(q, g, q_mask, g_mask, valid_q.sum(), valid_g.sum(), pos_q.sum(), pos_g.sum(), comm)


def _global_stats(q, g, q_mask, g_mask, n_valid_q, n_valid_g, pos_sum_q, pos_sum_g, comm: _Comm) -> SDMStats:
    """SDMStats of the global batch from this rank's sums (one SUM and one MAX all-reduce)."""
    norms = []
    for x, mask in ((q, q_mask), (g, g_mask)):
        nx = torch.linalg.vector_norm(x.detach().float(), dim=1)
        keep = mask if mask is not None else torch.ones_like(nx, dtype=torch.bool)
        kept = torch.where(keep, nx, torch.zeros_like(nx))
        norms.append((kept.sum(), keep.sum(), kept.max()))
    sums = torch.stack([n_valid_q.double(), n_valid_g.double(), pos_sum_q.double(), pos_sum_g.double(),
                        norms[0][0].double(), norms[0][1].double(), norms[1][0].double(), norms[1][1].double()])
    _all_reduce(sums, comm)
    maxes = _all_reduce(torch.stack([norms[0][2], norms[1][2]]), comm, dist.ReduceOp.MAX)
    ct = pos_sum_q.dtype
    n_q, n_g = sums[0].to(torch.int64), sums[1].to(torch.int64)
    return SDMStats(
        valid_q2g=n_q, valid_g2q=n_g,
        pos_prob_q2g=(sums[2] / sums[0].clamp_min(1)).to(ct), pos_prob_g2q=(sums[3] / sums[1].clamp_min(1)).to(ct),
        q_norm_mean=(sums[4] / sums[5].clamp_min(1)).float(), q_norm_max=maxes[0],
        g_norm_mean=(sums[6] / sums[7].clamp_min(1)).float(), g_norm_max=maxes[1])


# --------------------------------------------------------------------------------------------
# layout="local_rows" (TBPS-CLIP)
# --------------------------------------------------------------------------------------------

def _label_columns(labels: torch.Tensor, comm: _Comm) -> torch.Tensor:
    """This rank's g columns of the global label matrix, transposed: [M_r, N] (point-to-point all-to-all)."""
    r = comm.rank
    g0 = comm.g_offset(r)
    own = labels[:, g0: g0 + comm.g_sizes[r]]
    blocks, ops = [], []
    for s in range(comm.world):
        if s == r:
            blocks.append(own)
            continue
        buf = labels.new_empty((comm.q_sizes[s], comm.g_sizes[r]))
        blocks.append(buf)
        off = comm.g_offset(s)
        ops.append(dist.P2POp(dist.isend, labels[:, off: off + comm.g_sizes[s]].contiguous(), comm.peer(s), comm.group))
        ops.append(dist.P2POp(dist.irecv, buf, comm.peer(s), comm.group))
    for w in (dist.batch_isend_irecv(ops) if ops else []):
        w.wait()
    return torch.cat(blocks).T


def _local_rows_loss(q, g, q_ids, g_ids, labels, q_mask, g_mask, temperature, logit_scale, opts: SDMOptions,
                     comm: _Comm, grad_convention: str, call_kwargs: dict, return_stats: bool):
    """Rank r: q_r against all g (q2g) and g_r against all q (g2q), each averaged over local rows.

    J = mean over ranks of the per-rank values. The gathered features carry their
    gradient back to their owners (reduce-scatter); ``grad_factor`` = 1 / P turns the
    sum over ranks into the mean ("global"); "ddp" keeps the sum (DDP divides by P).
    """
    factor = comm.grad_factor if grad_convention == "global" else 1.0
    q_in = _GradScale.apply(q, factor)
    g_in = _GradScale.apply(g, factor)
    q_all = _AllGatherRows.apply(q_in, comm.q_sizes, comm)
    g_all = _AllGatherRows.apply(g_in, comm.g_sizes, comm)
    dev = q.device
    q_present = q_mask if q_mask is not None else torch.ones(q.shape[0], dtype=torch.bool, device=dev)
    g_present = g_mask if g_mask is not None else torch.ones(g.shape[0], dtype=torch.bool, device=dev)
    q_mask_all = _all_gather_rows(q_present.to(torch.int64), comm.q_sizes, comm).bool()
    g_mask_all = _all_gather_rows(g_present.to(torch.int64), comm.g_sizes, comm).bool()
    kw = dict(call_kwargs, kl=opts.kl, eps=opts.eps, direction="q2g", reduction=opts.reduction,
              normalize=opts.normalize, return_stats=return_stats)
    if logit_scale is not None:
        kw["logit_scale"] = _ReplicatedMean.apply(logit_scale, comm)
    else:
        kw["temperature"] = temperature
    if labels is None:
        ids_q = dict(q_ids=q_ids, g_ids=_all_gather_rows(g_ids.to(torch.int64), comm.g_sizes, comm))
        ids_g = dict(q_ids=g_ids, g_ids=_all_gather_rows(q_ids.to(torch.int64), comm.q_sizes, comm))
    else:
        ids_q = dict(labels=labels)
        ids_g = dict(labels=_label_columns(labels, comm))
    parts = {}
    if opts.wants_q2g:
        parts["q2g"] = sdm_loss(q_in, g_all, q_mask=q_present, g_mask=g_mask_all, **ids_q, **kw)
    if opts.wants_g2q:
        parts["g2q"] = sdm_loss(g_in, q_all, q_mask=g_present, g_mask=q_mask_all, **ids_g, **kw)
    stats = {}
    if return_stats:
        stats = {k: v[1] for k, v in parts.items()}
        parts = {k: v[0] for k, v in parts.items()}
    if opts.reduction == "none":
        out = SDMRowLosses(*(parts[k].q2g if k in parts else None for k in ("q2g", "g2q")),
                           *(parts[k].q2g_valid if k in parts else None for k in ("q2g", "g2q")))
    else:
        values = list(parts.values())
        out = values[0] if len(values) == 1 else (
            0.5 * (values[0] + values[1]) if opts.combine == "mean" else values[0] + values[1])
    if not return_stats:
        return out
    return out, _local_rows_stats(q, g, q_mask, g_mask, stats, comm)


def _local_rows_stats(q, g, q_mask, g_mask, stats: dict, comm: _Comm) -> SDMStats:
    ct = next(iter(stats.values())).pos_prob_q2g.dtype
    zero_i = torch.zeros((), dtype=torch.int64, device=q.device)
    zero_f = torch.zeros((), dtype=ct, device=q.device)
    n, pos = {}, {}
    for k in ("q2g", "g2q"):
        s = stats.get(k)
        n[k] = s.valid_q2g if s is not None else zero_i
        pos[k] = s.pos_prob_q2g * n[k] if s is not None else zero_f
    return _global_stats(q, g, q_mask, g_mask, n["q2g"], n["g2q"], pos["q2g"], pos["g2q"], comm)


__all__ = ["sdm_loss_distributed", "STRATEGIES", "LAYOUTS", "GRAD_CONVENTIONS"]
