"""The frozen bundle every path takes: the caller's tensors, the options, and the index spaces.

One SDM problem is an anchor ``q`` [N, D] against K galleries of M rows (K = 1 for
``sdm_loss``). The caller's tensors are kept as given (any strides; nothing is copied):

    g        [M, D] (K = 1) or [K, M, D]
    g_ids    [M] (shared by the galleries) or [K, M]
    g_mask   [M] or [K, M]
    labels   [N, M] (shared) or [K, N, M]

and ``*_strides`` give the kernels a uniform (gallery, row, col) view of each, with stride 0
over a shared dimension. Index spaces (kernels/tiles.py): samples NR = N + K M, softmax rows
NDR = K N + K M.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .options import KernelConfig, SDMOptions


@dataclasses.dataclass(frozen=True)
class Problem:
    q: torch.Tensor
    g: torch.Tensor
    q_ids: Optional[torch.Tensor]
    g_ids: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    q_mask: Optional[torch.Tensor]
    g_mask: Optional[torch.Tensor]
    scale: Optional[torch.Tensor]      # 0-dim logit_scale on the device, or None: scale_value
    scale_value: float
    options: SDMOptions
    config: KernelConfig
    workspace_bytes: int
    galleries: int                     # K
    scalar_value: bool                 # the value is 0-dim (sdm_loss) rather than [K]
    return_stats: bool
    #: What a backend derives from the problem alone (kernel arguments, tile shapes), filled on
    #: first use: the forward and the backward of one call share this object, and a training
    #: step's host time is made of such small pieces (issue 14). Not an init field, so
    #: ``dataclasses.replace`` starts a new one.
    derived: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    # ------------------------------------------------------------------ sizes
    @property
    def n(self) -> int:
        return self.q.shape[0]

    @property
    def m(self) -> int:
        return self.g.shape[-2]

    @property
    def d(self) -> int:
        return self.q.shape[1]

    @property
    def num_samples(self) -> int:
        return self.n + self.galleries * self.m

    @property
    def num_rows(self) -> int:
        return self.galleries * (self.n + self.m)

    @property
    def dense(self) -> bool:
        return self.labels is not None

    def signature(self) -> tuple:
        """Everything but the tensors' data and the logit scale's value: what a launch's grid,
        tiles, sizes and non-tensor arguments are derived from (`launch.tiles._per_shape`
        keeps them across calls by this key). Shapes, strides, dtypes and devices of every
        tensor (None where absent), the options, the kernel config, the workspace bound."""
        return (_meta(self.q), _meta(self.g), _meta(self.q_ids), _meta(self.g_ids), _meta(self.labels),
                _meta(self.q_mask), _meta(self.g_mask), _meta(self.scale), self.options, self.config,
                self.workspace_bytes, self.galleries, self.scalar_value, self.return_stats)

    # ------------------------------------------------------------------ strides
    def g_strides(self):
        """(gallery, row, d) strides of g."""
        s = self.g.stride()
        return (0, *s) if self.g.dim() == 2 else s

    def g_ids_strides(self):
        return _gallery_row_strides(self.g_ids)

    def g_mask_strides(self):
        return _gallery_row_strides(self.g_mask)

    def label_strides(self):
        """(q row, gallery, gallery row) strides of the labels."""
        lab = self.labels
        if lab is None:
            return (0, 0, 0)
        if lab.dim() == 2:
            return (lab.stride(0), 0, lab.stride(1))
        return (lab.stride(1), lab.stride(0), lab.stride(2))


def _meta(t: Optional[torch.Tensor]):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def _gallery_row_strides(t: Optional[torch.Tensor]):
    if t is None:
        return (0, 0)
    return (0, t.stride(0)) if t.dim() == 1 else (t.stride(0), t.stride(1))
