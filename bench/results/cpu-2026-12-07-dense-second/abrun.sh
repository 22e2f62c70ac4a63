#!/bin/bash
# alternate base (/tmp/i28/base) and the worktree, N rounds; JSON lines into $1
out=$1; rounds=${2:-2}
: > $out
for r in $(seq $rounds); do
  for tree in /tmp/i28/base /work/wt-torch; do
    echo "$tree $(cd /work/wt-torch && OMP_NUM_THREADS=1 PYTHONPATH=$tree python /tmp/i28/ab.py)" >> $out
  done
done
python - $out <<'PY'
import sys, json, statistics, collections
rows = collections.defaultdict(lambda: collections.defaultdict(list))
for line in open(sys.argv[1]):
    tree, js = line.split(" ", 1)
    for case, d in json.loads(js).items():
        for k, v in d.items(): rows[case][(tree, k)].append(v)
print("| case | base sdm fwd | new sdm fwd | formula fwd | base sdm f+b | new sdm f+b | formula f+b |")
for case, d in rows.items():
    med = lambda t, k: statistics.median(d[(t, k)])
    B, N = "/tmp/i28/base", "/work/wt-torch"
    fq = lambda k: statistics.median(d[(B, k)] + d[(N, k)])
    print(f"| {case} | {med(B,'sdm_torch fwd'):.3f} | {med(N,'sdm_torch fwd'):.3f} | {fq('formula_eager fwd'):.3f} | "
          f"{med(B,'sdm_torch fwd+bwd'):.3f} | {med(N,'sdm_torch fwd+bwd'):.3f} | {fq('formula_eager fwd+bwd'):.3f} |")
PY
