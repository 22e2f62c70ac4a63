"""Outputs: the long-format CSV (one row per measurement), one PNG per metric, the markdown table."""

from __future__ import annotations

import csv
import datetime
import math
import os
import platform
import re
import subprocess
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from .methods import REPORTED_METHODS

CSV_COLUMNS = (
    "timestamp", "gpu", "torch_version", "triton_version", "sdm_version", "git_rev",
    "method", "variant", "N", "M", "D", "K", "dtype", "kl", "labels", "combine", "mode",
    "median_ms", "p20_ms", "p80_ms", "x_floor", "tflops", "peak_mib",
    "status", "checked_against", "loss_rel_err", "grad_rel_err", "note",
)
#: tflops: the FLOPs of the matrix products the loss needs (2 N M D per product and gallery: 1 in
#: fwd, 3 in bwd, 4 in fwd+bwd; cases.PRODUCTS_PER_MODE) over the median time, in TFLOP/s: a
#: "TFLOP/s-equivalent" comparable across methods whatever they compute internally.
#: status values: "ok" (checked, then timed), "FAILED" (check failed or raised: never timed),
#: "skipped" (not applicable, would not fit, OOM, optional package missing; note says why),
#: "n/a" (the floor: not a loss, nothing to check).
STATUSES = ("ok", "FAILED", "skipped", "n/a")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine() or 'unknown'}, {torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def checkout_root() -> Path:
    """The repository that holds bench/ (the bench runs from the repo; it is not installed)."""
    return Path(__file__).resolve().parent.parent


def git_revision() -> str:
    """The git revision of the package's own checkout, or "" when there is none to name.

    Short hash of HEAD, '-dirty' if tracked files changed, when the repository holding
    bench/ is a git checkout (its own ``.git``, never a repository further up) and the
    imported ``sdm_triton`` comes from that checkout (an installed copy elsewhere has no
    revision we know). BENCH_GIT_REV overrides. A ``.rev`` file at the root (one line: the
    revision a working tree sent to a GPU machine was taken from, where ``.git`` may be
    absent or stale; tools/gpu_suite.sh reads it too) is used without ``.git``, and appended
    when it names another revision: "<git> (.rev <rev>)".
    """
    if os.environ.get("BENCH_GIT_REV"):
        return os.environ["BENCH_GIT_REV"]
    root = checkout_root()
    if not _package_in(root):
        return ""
    rev_file = root / ".rev"
    noted = rev_file.read_text().strip().split("\n")[0] if rev_file.is_file() else ""
    git = _git_head(root) if (root / ".git").exists() else ""
    if not git:
        return noted
    return f"{git} (.rev {noted})" if noted and not git.startswith(noted) else git


def _package_in(root: Path) -> bool:
    import sdm_triton
    try:
        Path(sdm_triton.__file__).resolve().relative_to(root)
        return True
    except (TypeError, ValueError):
        return False


def _git_head(root: Path) -> str:
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: torch.device) -> Dict[str, str]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    import sdm_triton
    return {"gpu": device_name(device), "torch_version": torch.__version__,
            "triton_version": triton_version, "sdm_version": getattr(sdm_triton, "__version__", ""),
            "git_rev": git_revision()}


def default_out_dir(device: torch.device, cwd: Optional[Path] = None) -> Path:
    """A new folder under the current directory: ``bench/results/<gpu>-<date>/`` when the current
    directory is the checkout (where runs are committed), else ``sdm_bench_results/<gpu>-<date>/``.
    Never inside an installed package."""
    cwd = Path.cwd() if cwd is None else cwd
    here = checkout_root() / "bench"
    base = cwd / "bench" / "results" if (cwd / "bench").resolve() == here else cwd / "sdm_bench_results"
    stem = f"{device_slug(device)}-{datetime.date.today().isoformat()}"
    out = base / stem
    i = 2
    while (out / "results.csv").exists():   # never overwrite an earlier run of the same day
        out = base / f"{stem}-{i}"
        i += 1
    return out


class CsvWriter:
    """Appends rows as they are measured, so an interrupted run keeps what it measured."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_COLUMNS).writeheader()

    def write(self, row: Dict):
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_COLUMNS).writerow({k: _fmt_csv(row.get(k, "")) for k in CSV_COLUMNS})


def _fmt_csv(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def read_csv(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _method_key(r) -> str:
    return r["method"] if r["variant"] in ("", "-") else f"{r['method']}:{r['variant']}"


def _group_label(r) -> str:
    k = f" K={r['K']}" if str(r["K"]) != "1" else ""
    combine = " sum" if r.get("combine") == "sum" else ""
    return f"{r['dtype']} {r['kl']} {r['labels']}{combine} D={r['D']}{k}"


# ---------------------------------------------------------------------------------------------
# plots


def plot(rows: Sequence[Dict], out_dir: Path, modes: Sequence[str]) -> List[Path]:
    """time.png, tflops.png and memory.png: one panel per (case group, mode), a line per method, against N."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r["status"] in ("ok", "n/a") and not math.isnan(_num(r["median_ms"]))]
    groups = list(OrderedDict.fromkeys(_group_label(r) for r in measured))
    palette = plt.get_cmap("tab10").colors
    colors = {key: palette[i % len(palette)]
              for i, key in enumerate(OrderedDict.fromkeys(_method_key(r) for r in measured if r["method"] != "floor"))}
    colors["floor"] = "black"
    paths = []
    for metric, col, ylabel in (("time", "median_ms", "median ms (p20-p80 bars)"),
                                ("tflops", "tflops", "TFLOP/s-equivalent (loss's products / time)"),
                                ("memory", "peak_mib", "peak MiB beyond inputs")):
        have = [r for r in measured if not math.isnan(_num(r[col])) and _num(r[col]) > 0]
        if not have or not groups:
            continue   # e.g. memory on CPU: not measured
        fig, axes = plt.subplots(len(groups), len(modes), figsize=(5 * len(modes), 3.6 * len(groups)),
                                 squeeze=False)
        for gi, group in enumerate(groups):
            for mi, mode in enumerate(modes):
                ax = axes[gi][mi]
                sel = [r for r in have if _group_label(r) == group and r["mode"] == mode]
                for key in OrderedDict.fromkeys(_method_key(r) for r in sel):
                    pts = sorted(((int(r["N"]), _num(r[col]), _num(r["p20_ms"]), _num(r["p80_ms"]))
                                  for r in sel if _method_key(r) == key))
                    xs = [p[0] for p in pts]
                    ys = [p[1] for p in pts]
                    style = dict(marker="o", label=key, color=colors[key])
                    if key == "floor":
                        style.update(linestyle="--")
                    if metric == "time":
                        err = [[max(0.0, y - p[2]) for y, p in zip(ys, pts)],
                               [max(0.0, p[3] - y) for y, p in zip(ys, pts)]]
                        ax.errorbar(xs, ys, yerr=err, capsize=2, **style)
                    else:
                        ax.plot(xs, ys, **style)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_title(f"{group} | {mode}", fontsize=9)
                ax.set_xlabel("N (= rows of q)")
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
                if sel:
                    ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# the markdown table


def _ms(v: float) -> str:
    if math.isnan(v):
        return "-"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _tflops(v: float) -> str:
    if math.isnan(v):
        return ""
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def markdown_table(rows: Iterable[Dict], modes: Sequence[str]) -> str:
    """One line per (case, method, variant): per mode, the median ms with its ratio to the floor
    and its TFLOP/s-equivalent; the peak memory; the status with its short tag (interpreted,
    the path backend="auto" picked) or the reason of a skip."""
    rows = list(rows)
    lines = OrderedDict()
    for r in rows:
        key = (r["N"], r["M"], r["D"], r["K"], r["dtype"], r["kl"], r["labels"], r.get("combine", "mean"),
               r["method"], r["variant"])
        lines.setdefault(key, {})[r["mode"]] = r
    head = (["case", "method", "variant"] + [f"{m} ms (x floor, TFLOP/s)" for m in modes]
            + ["peak MiB (fwd+bwd)" if "fwd+bwd" in modes else "peak MiB", "status"])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, by_mode in lines.items():
        n, m, d, k, dtype, kl, labels, combine, method, variant = key
        first = next(iter(by_mode.values()))
        case = (f"{n}x{m}x{d} {dtype} {kl} {labels}" + (" sum" if combine == "sum" else "")
                + (f" K={k}" if str(k) != "1" else ""))
        cells = []
        for mode in modes:
            r = by_mode.get(mode)
            if r is None:
                cells.append("")
                continue
            med, ratio, tf = _num(r["median_ms"]), _num(r["x_floor"]), _num(r.get("tflops"))
            extra = [] if math.isnan(ratio) or method == "floor" else [f"{ratio:.3g}x"]
            extra += [_tflops(tf)] if not math.isnan(tf) else []
            cells.append(_ms(med) + (f" ({', '.join(extra)})" if extra and not math.isnan(med) else ""))
        mem_row = by_mode.get("fwd+bwd", first)
        mem = _num(mem_row["peak_mib"])
        status = first["status"]
        if status == "ok" and method in REPORTED_METHODS:     # its error is the point, not a gate
            status = (f"error vs {first['checked_against']}: loss {_num(first['loss_rel_err']):.1e}, "
                      f"grad {_num(first['grad_rel_err']):.1e} (not gated)")
        elif status == "ok":
            status = f"ok vs {first['checked_against']}" + (f"; {first['tag']}" if first.get("tag") else "")
        elif first.get("note"):
            status = f"{status}: {first['note']}"
        out.append("| " + " | ".join([case, method, variant, *cells,
                                      "-" if math.isnan(mem) else f"{mem:.0f}", status.replace("|", "/")]) + " |")
    return "\n".join(out)
