"""Merge [5, K, L] partial statistics over K disjoint column sets into [5, L] (one launch).

The same formulas as `sdm_triton/stats.py::merge_partials` (the torch version, used by
the torch backend and the distributed path), with shift_k = m_k - m, alpha_k = exp(shift_k):

    m = max_k m_k,  l = sum alpha l_k,  pos = sum alpha pos_k
    forward KL:  A = sum (A_k + shift_k B_k),          B = sum B_k
    reverse KL:  A = sum alpha (A_k + shift_k l_k),    B = sum alpha B_k

Two passes over K (the max, then the sums); each program owns BLOCK_L entries.
"""

import triton
import triton.language as tl


# Sizes change from batch to batch (last batch, chunk bounds): no divisibility
# specialisation on them, or every new size would compile a new kernel.
@triton.jit(do_not_specialize=["K", "L"])
def _sdm_merge_stats_kernel(
    part_ptr, out_ptr, K, L,
    stride_ps, stride_pk, stride_os,
    REVERSE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_l = pid * BLOCK_L + tl.arange(0, BLOCK_L)
    l_in = offs_l < L

    m = tl.full((BLOCK_L,), -float("inf"), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_k < K)[:, None] & l_in[None, :]
        m_k = tl.load(part_ptr + offs_k[:, None] * stride_pk + offs_l[None, :], mask=mask, other=-float("inf"))
        m = tl.maximum(m, tl.max(m_k, axis=0))

    l_acc = tl.zeros((BLOCK_L,), dtype=tl.float32)
    pos_acc = tl.zeros((BLOCK_L,), dtype=tl.float32)
    a_acc = tl.zeros((BLOCK_L,), dtype=tl.float32)
    b_acc = tl.zeros((BLOCK_L,), dtype=tl.float32)
    m_safe = tl.where(l_in, m, 0.0)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_k < K)[:, None] & l_in[None, :]
        base = part_ptr + offs_k[:, None] * stride_pk + offs_l[None, :]                 # [BLOCK_K, BLOCK_L]
        shift = tl.load(base, mask=mask, other=0.0) - m_safe[None, :]
        shift = tl.where(mask, shift, 0.0)
        alpha = tl.where(mask, tl.exp(shift), 0.0)
        l_k = tl.load(base + stride_ps, mask=mask, other=0.0)
        pos_k = tl.load(base + 2 * stride_ps, mask=mask, other=0.0)
        a_k = tl.load(base + 3 * stride_ps, mask=mask, other=0.0)
        b_k = tl.load(base + 4 * stride_ps, mask=mask, other=0.0)
        l_acc += tl.sum(alpha * l_k, axis=0)
        pos_acc += tl.sum(alpha * pos_k, axis=0)
        if REVERSE:
            a_acc += tl.sum(alpha * (a_k + shift * l_k), axis=0)
            b_acc += tl.sum(alpha * b_k, axis=0)
        else:
            a_acc += tl.sum(a_k + shift * b_k, axis=0)
            b_acc += tl.sum(b_k, axis=0)

    out = out_ptr + offs_l
    tl.store(out, m, mask=l_in)
    tl.store(out + stride_os, l_acc, mask=l_in)
    tl.store(out + 2 * stride_os, pos_acc, mask=l_in)
    tl.store(out + 3 * stride_os, a_acc, mask=l_in)
    tl.store(out + 4 * stride_os, b_acc, mask=l_in)
