#!/bin/bash
# One device call for a session with little device time (bench/NOTES.md 41), the most needed
# first (a call that runs out of time keeps what it wrote under $OUT):
#   1. tools/gpu_smoke_positives.py: the identity positives' kernels against the in-loop compare;
#   2. tools/host_floor.py, this tree against the one in .old/ (PYTHONPATH; carry it), twice,
#      interleaved: the per-shape launch arguments' effect on a small step's host time;
#   3. tools/host_ops.py: the chunk loop's operations' host cost;
#   4. the kernel-facing tests of what changed, with SDM_TRITON_CHECK_SHAPE_CACHE=1 (conftest),
#      and the step compiled with dynamic shapes (test_training.py).
# .old/: `mkdir -p .old && git archive bb1bc78 sdm_triton | tar -x -C .old` (the tree before
# the per-shape values), git-ignored through .git/info/exclude.
set -u
out=${OUT:-/tmp}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout ${SMOKE_S:-150} python3 tools/gpu_smoke_positives.py > "$out/s8_smoke.log" 2>&1
for round in 1 2; do
  for tree in new old; do
    if [ $tree = old ]; then pp=.old; else pp=; fi
    PYTHONPATH=$pp timeout 60 python3 tools/host_floor.py --reps 200 2>&1 | sed "s/^/$tree $round | /"
  done
done > "$out/s8_floor_ab.log"
timeout 40 python3 tools/host_ops.py > "$out/s8_host_ops.log" 2>&1
timeout ${TESTS_S:-150} python3 -m pytest tests/test_launch.py tests/test_positives.py tests/test_kernels.py \
  tests/test_training.py -k "${TESTS_K:-launch or positives or centroid or fused or learnable or dynamic}" -q -p no:cacheprovider -n 14 2>&1 \
  | tail -n 4 > "$out/s8_tests.log"
tail -n 12 "$out/s8_smoke.log"; grep -E "sdm_loss|trivial|sum\(\)" "$out/s8_floor_ab.log"; cat "$out/s8_host_ops.log" "$out/s8_tests.log"
