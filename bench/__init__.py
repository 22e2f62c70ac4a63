"""Benchmark suite of sdm_triton: ``python -m bench`` (``--help`` for the options; bench/NOTES.md).

Methods x cases x modes (fwd, bwd, fwd+bwd), each method checked against a
trusted loss and gradients before it is timed; peak memory beyond the inputs;
a long-format CSV, one PNG per metric and a markdown table printed last.

Python API::

    import bench
    result = bench.run(bench.Config.from_preset("cpu", out="/tmp/b"))
    print(result.table)
"""

import os

import torch

# Without CUDA the Triton kernels can only run interpreted, and Triton reads this
# when the kernels are defined: set it before anything imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .cases import MODES, PRESETS, Case  # noqa: E402
from .methods import METHODS  # noqa: E402
from .suite import CSV_COLUMNS, Config, Result, default_preset, run  # noqa: E402

__all__ = ["run", "Config", "Result", "Case", "PRESETS", "METHODS", "MODES", "CSV_COLUMNS", "default_preset"]
