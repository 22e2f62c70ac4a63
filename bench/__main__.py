"""``python -m bench``: run a preset (default: cpu without CUDA, else gpu-quick), print the table last.

Presets: cpu (tiny, a minute on a laptop), gpu-latency (training batch sizes: IRRA, bf16
forward, ReID5o's 15 galleries), gpu-throughput (N = M = 16384 to 131072), gpu-full (both, and
dense labels), gpu-quick (one case of each, a few minutes). The options below narrow or
reshape the preset's cases; bench/NOTES.md explains the methods and columns.
"""

import os

import torch

# Without CUDA the Triton kernels can only run interpreted, and Triton reads this when the
# kernels are defined: set it here, for this process only, before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402

from bench.cases import COMBINES, DTYPES, KL_KINDS, LABEL_KINDS, MODES, PRESETS, family_names  # noqa: E402
from bench.methods import METHODS, check_variant  # noqa: E402
from bench.suite import Config, default_preset, run  # noqa: E402


def _items(text):
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _choices(choices):
    """An argparse type: a comma list whose every item is one of ``choices``."""
    def parse(text):
        items = _items(text)
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        for item in items:
            if item not in choices:
                raise argparse.ArgumentTypeError(f"invalid choice {item!r} (choose from {', '.join(choices)})")
        return items
    parse.__name__ = "comma list"
    return parse


def _variants(text):
    items = _items(text)
    for item in items:
        try:
            check_variant(item)
        except (ValueError, TypeError) as exc:
            raise argparse.ArgumentTypeError(f"invalid variant {item!r} ('default' or a kernel config): {exc}") \
                from None
    return items or ("default",)


def _sizes(text):
    out = []
    for item in _items(text):
        n, _, m = item.lower().partition("x")
        try:
            size = (int(n), int(m or n))
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid size {item!r} (N or NxM)") from None
        if min(size) < 1:
            raise argparse.ArgumentTypeError(f"invalid size {item!r}: must be >= 1")
        out.append(size)
    return tuple(out)


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="the cases and methods to run (default: cpu without CUDA, else gpu-quick)")
    p.add_argument("--methods", type=_choices(METHODS), metavar="M[,M...]",
                   help=f"methods, comma separated, from: {', '.join(METHODS)} (default: the preset's)")
    p.add_argument("--variants", type=_variants, default=("default",), metavar="V[,V...]",
                   help="for sdm_triton and sdm_triton_multi: 'default' (no kernel_config), or kernel_config "
                        "strings as sdm_triton.options.KernelConfig.parse reads them, e.g. chunked_m128n128k64w8s3")
    p.add_argument("--modes", type=_choices(MODES), metavar="MODE[,MODE...]",
                   help=f"from: {', '.join(MODES)} (default: all)")
    p.add_argument("--families", type=_choices(family_names()), metavar="F[,F...]",
                   help=f"keep only these case families of the preset, from: {', '.join(family_names())}")
    p.add_argument("--sizes", type=_sizes, help="replace every family's sizes: N or NxM, comma separated")
    p.add_argument("--d", type=_positive, help="replace every family's feature dim")
    p.add_argument("--dtypes", type=_choices(tuple(DTYPES)), metavar="DT[,DT...]",
                   help=f"replace every family's dtype, from: {', '.join(DTYPES)}")
    p.add_argument("--kl", type=_choices(KL_KINDS), metavar="KL[,KL...]",
                   help=f"replace every family's divergence, from: {', '.join(KL_KINDS)}")
    p.add_argument("--labels", type=_choices(LABEL_KINDS), metavar="L[,L...]",
                   help=f"replace every family's label kinds, from: {', '.join(LABEL_KINDS)}")
    p.add_argument("--combine", type=_choices(COMBINES), metavar="C[,C...]",
                   help=f"replace every family's combine of the two directions, from: {', '.join(COMBINES)}")
    p.add_argument("--galleries", type=_positive, help="K of the preset's multi-gallery families")
    p.add_argument("--out", help="output folder (default: bench/results/<gpu-or-cpu>-<date>/ when run from the "
                                 "repository root, else ./sdm_bench_results/<gpu-or-cpu>-<date>/)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up (CUDA; default 25)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench repetition time (CUDA; default 100)")
    p.add_argument("--cpu-budget-s", type=float, default=0.15,
                   help="blocked_autorange min_run_time per measurement (CPU; default 0.15)")
    p.add_argument("--list", action="store_true", help="print the cases and methods, run nothing")
    return p.parse_args(argv)


def config_from_args(args) -> Config:
    preset = PRESETS[args.preset or default_preset()]
    families = [f for f in preset.families if not args.families or f.name in args.families]
    reshaped = []
    for fam in families:
        fam = dataclasses.replace(fam, sizes=args.sizes or fam.sizes, d=args.d or fam.d,
                                  dtypes=args.dtypes or fam.dtypes, labels=args.labels or fam.labels,
                                  k=args.galleries if args.galleries and fam.k > 1 else fam.k)
        for kl in args.kl or (fam.kl,):
            for combine in args.combine or (fam.combine,):
                reshaped.append(dataclasses.replace(fam, kl=kl, combine=combine))
    preset = dataclasses.replace(preset, families=tuple(reshaped))
    return Config(cases=preset.cases(), methods=args.methods or preset.methods, variants=args.variants,
                  modes=args.modes or preset.modes, out=args.out, plots=not args.no_plots,
                  triton_max_nm=preset.triton_max_nm, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                  cpu_budget_s=args.cpu_budget_s)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    if not cfg.cases:
        print(f"python -m bench: error: no case left (--families {','.join(args.families)} "
              f"is not in preset {args.preset or default_preset()})", file=sys.stderr)
        return 2
    if args.list:
        for case in cfg.cases:
            print(case.label())
        print("methods:", ", ".join(cfg.methods), "| variants:", ", ".join(cfg.variants),
              "| modes:", ", ".join(cfg.modes))
        return 0
    result = run(cfg)
    print(f"CSV: {result.csv_path}")
    for path in result.plots:
        print(f"plot: {path}")
    print()
    print(result.table)
    return 1 if any(r["status"] == "FAILED" for r in result.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
