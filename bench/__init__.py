"""Benchmark suite of sdm_triton: ``python -m bench`` (``--help`` for the options; bench/NOTES.md).

Methods x cases x modes (fwd, bwd, fwd+bwd), each method checked against a
trusted loss and gradients before it is timed; peak memory beyond the inputs;
a long-format CSV, one PNG per metric and a markdown table printed last.

Python API::

    import bench
    result = bench.run(bench.Config.from_preset("cpu", out="/tmp/b"))
    print(result.table)

Importing ``bench`` changes no environment variable and imports neither sdm_triton
nor triton until a name below is used. Triton rows on CPU tensors run only in the
interpreter: set ``TRITON_INTERPRET=1`` before triton is imported (``python -m bench``
does it when there is no CUDA); otherwise they are skipped with the reason.
"""

import importlib

_EXPORTS = {
    "run": "suite", "Config": "suite", "Result": "suite", "CSV_COLUMNS": "suite", "default_preset": "suite",
    "Case": "cases", "PRESETS": "cases", "MODES": "cases",
    "METHODS": "methods",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'bench' has no attribute {name!r}")
