"""The buffers the kernels share with the host, slot by slot. A slot is a block of a buffer:
``slot * NR + sample`` (per sample), ``slot * NDR + softmax row`` (per softmax row) or
``row * K + gallery`` (the reduction). The host lists the same slots in the same order, and
tests/test_structure.py checks that the two agree:

    PRE_*    the prepared buffer, per sample (prep.py writes it)      launch/forward.py PREPARED_FIELDS
    LAB_*    the label masses, per softmax row (prep.py, or given)    launch/forward.py LABEL_MASS_FIELDS
    STATE_*  what finish.py saves for the backward, per softmax row   launch/forward.py STATE_FIELDS
    RED_*    the reduction buffer [NUM_RED, K] (finish.py)            backend.RED_FIELDS

(The statistics partials' slots are stats.py's own: only the kernels read them.)
"""

import triton.language as tl

PRE_R = tl.constexpr(0)            # 1 / max(|x|, NORM_EPS): the inverse norm (1 without normalising)
PRE_C = tl.constexpr(1)            # the power of two that scales x to norm [0.5, 1) (grad.py)
PRE_NORM = tl.constexpr(2)         # |x|

LAB_YSUM = tl.constexpr(0)         # sum_j y_ij over the present columns
LAB_YLNY = tl.constexpr(1)         # sum_j y_ij ln y_ij

STATE_M = tl.constexpr(0)          # the softmax's maximum (log2 domain)
STATE_INV_L = tl.constexpr(1)      # 1 / l
STATE_INV_YSUM = tl.constexpr(2)   # 1 / ysum; 0 for an invalid row
STATE_LN_L = tl.constexpr(3)       # ln l

RED_SUM_Q2G = tl.constexpr(0)      # per gallery: the q rows' summed losses,
RED_VALID_Q2G = tl.constexpr(1)    # ... their valid count,
RED_SUM_G2Q = tl.constexpr(2)      # the gallery rows' summed losses,
RED_VALID_G2Q = tl.constexpr(3)    # ... their valid count,
RED_POS_Q2G = tl.constexpr(4)      # the positives' softmax mass summed over valid q rows (STATS),
RED_POS_G2Q = tl.constexpr(5)      # ... over valid gallery rows,
RED_Q_NORM_MEAN = tl.constexpr(6)  # the present q rows' mean norm,
RED_Q_NORM_MAX = tl.constexpr(7)   # ... their largest,
RED_G_NORM_MEAN = tl.constexpr(8)  # the present gallery rows' mean norm,
RED_G_NORM_MAX = tl.constexpr(9)   # ... their largest
