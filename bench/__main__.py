"""``python -m bench``: run a preset (default: cpu without CUDA, else gpu-quick), print the table last."""

import argparse
import dataclasses
import sys

import bench  # noqa: F401  (sets TRITON_INTERPRET=1 first when there is no CUDA)
from bench.cases import DTYPES, KL_CHOICES_HELP, LABEL_KINDS, MODES, PRESETS
from bench.methods import METHODS
from bench.suite import Config, default_preset, run


def _csv(text):
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _sizes(text):
    out = []
    for item in _csv(text):
        n, _, m = item.lower().partition("x")
        out.append((int(n), int(m or n)))
    return tuple(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="size preset (default: cpu without CUDA, else gpu-quick)")
    p.add_argument("--methods", type=_csv, help=f"comma list from: {', '.join(METHODS)}")
    p.add_argument("--variants", type=_csv, default=("default",),
                   help="Triton tile configs (sdm_triton.launch.TILE_CONFIGS names), for sdm_triton*; 'all' for every one")
    p.add_argument("--modes", type=_csv, help=f"comma list from: {', '.join(MODES)}")
    p.add_argument("--sizes", type=_sizes, help="replace the preset's main grid sizes: N or NxM, comma separated")
    p.add_argument("--d", type=int, help="feature dim of the main grid")
    p.add_argument("--dtypes", type=_csv, help=f"main grid dtypes from: {', '.join(DTYPES)}")
    p.add_argument("--kl", type=_csv, help=KL_CHOICES_HELP)
    p.add_argument("--labels", type=_csv, help=f"main grid label kinds from: {', '.join(LABEL_KINDS)}")
    p.add_argument("--no-extras", action="store_true", help="drop the preset's extra cases (dense labels, K galleries)")
    p.add_argument("--galleries", type=int, help="K of the preset's multi-gallery cases")
    p.add_argument("--out", help="output folder (default bench/results/<gpu-or-cpu>-<date>/)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up (CUDA)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench repetition time (CUDA)")
    p.add_argument("--list", action="store_true", help="print the cases and methods, run nothing")
    return p.parse_args(argv)


def config_from_args(args) -> Config:
    preset = PRESETS[args.preset or default_preset()]
    grid = dict(sizes=args.sizes or preset.sizes, d=args.d or preset.d, dtypes=args.dtypes or preset.dtypes,
                kls=args.kl or preset.kls, labels=args.labels or preset.labels)
    extras = () if args.no_extras else preset.extras
    if args.galleries:
        extras = tuple(dataclasses.replace(c, k=args.galleries) if c.k > 1 else c for c in extras)
    preset = dataclasses.replace(preset, extras=extras, **grid)
    variants = args.variants
    if variants == ("all",):
        from sdm_triton.launch import TILE_CONFIGS, interpreting
        variants = tuple(v for v in TILE_CONFIGS if interpreting() or not v.startswith("interpreter"))
    return Config(cases=preset.cases(), methods=args.methods or preset.methods, variants=variants,
                  modes=args.modes or preset.modes, out=args.out, plots=not args.no_plots,
                  triton_max_nm=preset.triton_max_nm, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    for m in cfg.modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
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
