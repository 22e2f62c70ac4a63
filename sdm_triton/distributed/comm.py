"""Collectives of the distributed loss: the group's sizes, padded gathers, the ring.

Every function here is called by every rank of the group in the same order (the callers
make sure of it: the arguments that decide which collectives run are checked to agree
across ranks before the first one, `metadata.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

# torch >= 2.12 renamed the single-tensor collectives (the old names warn).
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

_TAG_BLOCK, _TAG_ACC = 0, 1   # gloo matches point-to-point messages by tag; NCCL by posting order


@dataclasses.dataclass(frozen=True)
class Comm:
    """The process group and every rank's local sizes (from the metadata exchange)."""

    group: object
    rank: int                   # rank within the group
    world: int
    q_sizes: Tuple[int, ...]    # N_r of every rank
    g_sizes: Tuple[int, ...]    # M_r of every rank

    def g_offset(self, r: int) -> int:
        return sum(self.g_sizes[:r])

    def q_offset(self, r: int) -> int:
        return sum(self.q_sizes[:r])

    def peer(self, r: int) -> int:
        """Global rank of group rank ``r`` (mod world): what P2POp expects."""
        return dist.get_global_rank(self.group, r % self.world)


def all_gather_rows(x: torch.Tensor, sizes: Sequence[int], comm: Comm) -> torch.Tensor:
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
    all_gather_single(out, x, group=comm.group)
    if all(s == n_max for s in sizes):
        return out
    return torch.cat([out[i * n_max: i * n_max + s] for i, s in enumerate(sizes)])


def reduce_scatter_rows(x: torch.Tensor, sizes: Sequence[int], comm: Comm) -> torch.Tensor:
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
    reduce_scatter_single(out, x.contiguous(), group=comm.group)
    return out[: sizes[comm.rank]]


def all_reduce(x: torch.Tensor, comm: Comm, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In place (and returned); nothing for a group of one."""
    if comm.world > 1:
        dist.all_reduce(x, op=op, group=comm.group)
    return x


def all_to_all_columns(labels: torch.Tensor, comm: Comm) -> torch.Tensor:
    """This rank's g columns of the global label matrix, transposed: [M_r, N] from every rank's
    rows [N_r, M] (point-to-point all-to-all)."""
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
        ops.append(dist.P2POp(dist.isend, labels[:, off: off + comm.g_sizes[s]].contiguous(), comm.peer(s),
                              comm.group))
        ops.append(dist.P2POp(dist.irecv, buf, comm.peer(s), comm.group))
    for w in (dist.batch_isend_irecv(ops) if ops else []):
        w.wait()
    return torch.cat(blocks).T


class AllGatherRows(torch.autograd.Function):
    """Differentiable padded all-gather; backward sums the gradients over ranks (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, sizes, comm):
        ctx.sizes, ctx.comm = sizes, comm
        return all_gather_rows(x, sizes, comm)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_rows(grad.contiguous(), ctx.sizes, ctx.comm), None, None


class GradScale(torch.autograd.Function):
    """Identity in forward; multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class ReplicatedMean(torch.autograd.Function):
    """Identity in forward; the gradient is averaged over ranks (a parameter replicated on every rank)."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.clone(), ctx.comm) / ctx.comm.world, None


Like = List[Tuple[Tuple[int, ...], torch.dtype]]


def ring_pass(comm: Comm, block: List[torch.Tensor], block_like: Callable[[int], Like],
              compute: Callable[[int, List[torch.Tensor]], Optional[torch.Tensor]],
              combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              acc_like: Callable[[int, int], Optional[Tuple[Tuple[int, ...], torch.dtype]]]):
    """Send every rank's block once around the ring; return this rank's block's complete accumulator.

    block:        list of tensors describing this rank's block (its g rows and per-column vectors)
    block_like:   s -> list of (shape, dtype) of rank s's block (to allocate receive buffers)
    compute:      (s, block of rank s) -> this rank's contribution to block s's accumulator (or None)
    combine:      (accumulator received, own contribution) -> accumulator to pass on
    acc_like:     (s, count) -> (shape, dtype) of block s's accumulator holding the contributions
                  of ``count`` ranks, or None when nothing accumulates

    Step k holds block s = rank - k, whose accumulator holds the contributions of the k ranks
    before this one: the next block is received while block s is being computed on. Every
    step posts ONE group of point-to-point operations, the same on every rank: the
    accumulator finished in step k - 1 goes to the next rank (which holds that block now)
    and this step's incoming accumulator comes from the previous rank, beside the block
    transfers. A final group delivers each accumulator to its owner. (Sending the
    accumulator in a group of its own after the compute, as an earlier version did, made
    each rank's send wait on a receive its peer posts only after its own send: the 4-H100
    NCCL run of tools/dist_scaling.py never finished the ring at 32768 rows per rank,
    bench/NOTES.md.)
    """
    world, rank = comm.world, comm.rank
    nxt, prv = comm.peer(rank + 1), comm.peer(rank - 1)
    device = block[0].device
    accumulates = acc_like(rank, 1) is not None
    acc, acc_out = None, None
    for k in range(world):
        s = (rank - k) % world
        ops, acc_in, incoming = [], None, None
        # Per peer, the posting order matches the other side's: accumulator, then block.
        if acc_out is not None:
            ops.append(dist.P2POp(dist.isend, acc_out, nxt, comm.group, _TAG_ACC))
        if k > 0 and accumulates:
            shape, dtype = acc_like(s, k)
            acc_in = torch.empty(shape, dtype=dtype, device=device)
            ops.append(dist.P2POp(dist.irecv, acc_in, prv, comm.group, _TAG_ACC))
        if k < world - 1:
            incoming = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in block_like((s - 1) % world)]
            ops += [dist.P2POp(dist.isend, t, nxt, comm.group, _TAG_BLOCK) for t in block]
            ops += [dist.P2POp(dist.irecv, t, prv, comm.group, _TAG_BLOCK) for t in incoming]
        works = dist.batch_isend_irecv(ops) if ops else []
        contribution = compute(s, block)
        for w in works:
            w.wait()
        if accumulates:
            acc = contribution if acc_in is None else combine(acc_in, contribution)
            acc_out = acc.contiguous() if world > 1 else None
        block = incoming
    if accumulates and world > 1:
        shape, dtype = acc_like(rank, world)
        acc = torch.empty(shape, dtype=dtype, device=device)
        ops = [dist.P2POp(dist.isend, acc_out, nxt, comm.group, _TAG_ACC),
               dist.P2POp(dist.irecv, acc, prv, comm.group, _TAG_ACC)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
    return acc
