"""One line for the whole GPU suite run in parts (issue 26): the parts' SUMMARY lines
(tools/gpu_suite.sh --part K/N) summed, with a check that every part K of N is there once and
that all parts ran the same sources (the hash in each log's header).

    python3 tools/suite_summary.py gpu_suite_part1.log gpu_suite_part2.log ...
"""

from __future__ import annotations

import re
import sys

_SUMMARY = re.compile(r"^SUMMARY \((?P<kind>\w+)(?:, part (?P<k>\d+)/(?P<n>\d+))?, (?P<s>\d+) s, (?P<ex>\d+) examples\): "
                      r"(?P<result>.*?) \(pytest exit (?P<rc>-?\d+)\)\s*$")
_COUNTS = ("passed", "failed", "errors", "skipped")


def summarise(texts) -> str:
    parts, totals, seconds, rcs, sources = {}, dict.fromkeys(_COUNTS, 0), [], [], set()
    for text in texts:
        src, rev = re.search(r"\| sources (\w+)", text), re.search(r"\| rev (\w+)", text)
        sources.add(f"sources {src.group(1)}" if src else f"rev {rev.group(1)}" if rev else "unknown")
        lines = [m for m in map(_SUMMARY.match, text.splitlines()) if m]
        if not lines:
            raise ValueError("a log without a SUMMARY line (cut off before pytest finished?)")
        m = lines[-1]
        key = (int(m["k"] or 1), int(m["n"] or 1))
        if key in parts:
            raise ValueError(f"part {key[0]}/{key[1]} given twice")
        parts[key] = m
        for name in _COUNTS:
            found = re.search(rf"(\d+) {name if name != 'errors' else 'error'}", m["result"])
            totals[name] += int(found.group(1)) if found else 0
        seconds.append(int(m["s"]))
        rcs.append(int(m["rc"]))
    if len(sources) > 1:
        raise ValueError(f"parts run on different sources: {sorted(sources)}")
    ns = {n for _, n in parts}
    if len(ns) != 1:
        raise ValueError(f"parts of different splits: {sorted(parts)}")
    n = ns.pop()
    missing = sorted(set(range(1, n + 1)) - {k for k, _ in parts})
    whole = "whole suite" if not missing else f"INCOMPLETE (missing part(s) {', '.join(f'{k}/{n}' for k in missing)})"
    counts = ", ".join(f"{totals[c]} {c}" for c in _COUNTS if totals[c] or c in ("passed", "failed"))
    ok = "ok" if not missing and all(rc == 0 for rc in rcs) and not totals["failed"] and not totals["errors"] else "NOT OK"
    return (f"SUITE {ok}: {whole} in {len(parts)} part(s) of {n} ({sources.pop()}): {counts}; "
            f"{' + '.join(map(str, seconds))} = {sum(seconds)} s; longest part {max(seconds)} s")


def main(paths) -> int:
    texts = []
    for path in paths:
        with open(path) as f:
            texts.append(f.read())
    try:
        line = summarise(texts)
    except ValueError as exc:
        line = f"SUITE NOT OK: {exc}"
    print(line)
    return 0 if line.startswith("SUITE ok") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
