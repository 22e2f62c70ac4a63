"""Sum up a GPU run's Triton compilations (SDM_COMPILE_LOG, written by tests/conftest.py; tools/
gpu_suite.sh sets it): where a bare machine's suite spends its compile time (issue 26).

    python3 tools/compile_log.py compiles.jsonl [--top 12]

Prints, per kernel: compilations, seconds, distinct specialisations, and the constexpr
arguments that take the most values (the variety that multiplies the compiles); then the tests
whose compilations took the most seconds. A compile under 0.2 s is counted as a hit of Triton's
on-disk cache (another worker compiled it first).
"""

from __future__ import annotations

import argparse
import collections
import json

CACHE_HIT_S = 0.2


def summarise(lines, top=12):
    rows = [json.loads(line) for line in lines if line.strip()]
    out = []
    if not rows:
        return ["compile log: no compilations recorded"]
    total = sum(r["s"] for r in rows)
    hits = sum(r["s"] < CACHE_HIT_S for r in rows)
    out.append(f"compile log: {len(rows)} compilations ({hits} on-disk cache hits), {total:.0f} s summed over workers")
    by_kernel = collections.defaultdict(list)
    for r in rows:
        by_kernel[r["kernel"]].append(r)
    out.append(f"{'kernel':24s} {'compiles':>8s} {'seconds':>8s} {'distinct':>8s}  most varied constexprs (values)")
    for name, rs in sorted(by_kernel.items(), key=lambda kv: -sum(r["s"] for r in kv[1])):
        distinct = {(json.dumps(r["constexprs"], sort_keys=True), r["types"], r.get("attrs"),
                     json.dumps(r["options"], sort_keys=True)) for r in rs if r["s"] >= CACHE_HIT_S}
        values = collections.defaultdict(set)
        for r in rs:
            for k, v in r["constexprs"].items():
                values[k].add(v)
        varied = sorted(((len(v), k) for k, v in values.items() if len(v) > 1), reverse=True)[:5]
        out.append(f"{name:24s} {len(rs):8d} {sum(r['s'] for r in rs):8.0f} {len(distinct):8d}  "
                   + ", ".join(f"{k} ({n})" for n, k in varied))
    by_test = collections.Counter()
    for r in rows:
        by_test[r["test"]] += r["s"]
    out.append(f"tests with the most compile seconds (top {top}):")
    for test, s in by_test.most_common(top):
        out.append(f"  {s:7.0f} s  {test}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    with open(args.log) as f:
        print("\n".join(summarise(f, args.top)))


if __name__ == "__main__":
    main()
