#!/bin/bash
# The test suite on a CUDA machine, in parallel processes (pytest-xdist): on a fresh
# machine Triton compilation (CPU-bound, seconds per kernel variant) dominates the run,
# and each worker compiles what its tests need into the shared Triton cache.
#
#   bash tools/gpu_suite.sh [--quick] [--part K/N] [test paths] [extra pytest args]
#
# Writes into $OUT (or /tmp): gpu_suite.log, gpu_suite_failures.log (the failures, as they
# happen) and gpu_suite_compiles.jsonl.gz (one line per Triton compilation); with --part K/N
# each name ends in _partK (gpu_suite_part3.log, ...), so parts run in one call come back apart.
#
# --part K/N: part K of N of the selection, each test by a hash of its id (tests/conftest.py):
# N such runs, one per device call, run every test once. The whole suite does not fit one
# 10-minute call (issue 26): its ~1700 distinct Triton specialisations take ~4900 compile-seconds,
# ~350 s on 14 workers before any test runs, and a hash split spreads them over every part
# (bench/NOTES.md 34). Use four parts (--part 1/4 ... 4/4): on one H100 they took 182 s (bare
# machine), 119, 178 and 134 s (bench/NOTES.md 36); two parts took 560+ s (bare) and 395 s
# (warm). `python3 tools/suite_summary.py part logs...` prints the one line for the whole suite
# (every part there once, same sources).
# --quick: the kernel-facing files only (every kernel path per dtype, the GPU-marked tests, the
# compiled steps), Hypothesis capped at 10 examples: the check after a kernel change. Without it,
# the whole suite with the gpu profile capped at SDM_HYPOTHESIS_MAX_EXAMPLES (default 10: on one
# H100 with 14 workers the whole suite reached 98% in 370 s at 10 examples, where 20 examples
# had not finished in 560 s; bench/NOTES.md 22).
# The last lines: the slowest 10 tests and a one-line summary.
#
# Needs pytest, hypothesis and pytest-xdist (the device machine's image has them).
# SDM_HYPOTHESIS_PROFILE defaults to "gpu" (200 examples per property, up to 300 rows and D 300;
# see tests/conftest.py).
set -u -o pipefail
out=${OUT:-/tmp}
quick=0
part=""
while true; do
  case "${1:-}" in
    --quick) quick=1; shift ;;
    --part) part=$2; shift 2 ;;
    *) break ;;
  esac
done
# with --part K/N every file it writes is named for its part (gpu_suite_partK.log, ...), so that
# several parts can run in one device call and come back side by side
sfx=""
if [ -n "$part" ]; then export SDM_TEST_PART=$part; sfx="_part${part%%/*}"; fi
log="$out/gpu_suite$sfx.log"
QUICK_PATHS=(tests/test_kernels.py tests/test_edge_values.py tests/test_galleries.py tests/test_training.py
             tests/test_hygiene.py)
export SDM_HYPOTHESIS_MAX_EXAMPLES=${SDM_HYPOTHESIS_MAX_EXAMPLES:-10}
# at most 14 workers: each one holds a CUDA context on the GPU (62 of them on a 64-core host
# ran the GPU out of memory before any test started)
cores=$(nproc)
workers=${SDM_TEST_WORKERS:-$(( cores > 16 ? 14 : (cores > 2 ? cores - 2 : 1) ))}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export SDM_HYPOTHESIS_PROFILE=${SDM_HYPOTHESIS_PROFILE:-gpu} SDM_HYPOTHESIS_NO_SHRINK=${SDM_HYPOTHESIS_NO_SHRINK:-1}
export SDM_FAILURE_LOG=${SDM_FAILURE_LOG:-$out/gpu_suite_failures$sfx.log}
# one line per Triton compilation (tests/conftest.py), summed up at the end (tools/compile_log.py)
export SDM_COMPILE_LOG=${SDM_COMPILE_LOG:-$out/gpu_suite_compiles$sfx.jsonl}
export SDM_REQUIRE_BACKENDS=${SDM_REQUIRE_BACKENDS:-reference,torch,triton}
rev=$(cat .rev 2>/dev/null || git rev-parse --short HEAD 2>/dev/null)
# the package's sources as they are here (a device copy's git HEAD may lag the files sent): compare
# with `find sdm_triton -name '*.py' | sort | xargs cat | sha1sum` in the checkout
src=$(find sdm_triton -name '*.py' | sort | xargs cat | sha1sum | cut -c1-12)
python3 -c "import torch, triton; print('card:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none', '| torch', torch.__version__, '| triton', triton.__version__, '| rev $rev | sources $src')" | tee "$log"
rm -f "$SDM_FAILURE_LOG" "$SDM_COMPILE_LOG" "$SDM_COMPILE_LOG.gz"
# test paths first (default: all of tests/), then any pytest options
paths=()
while [ $# -gt 0 ] && [ -e "${1%%::*}" ]; do paths+=("$1"); shift; done
if [ ${#paths[@]} -eq 0 ]; then
  if [ $quick = 1 ]; then paths=("${QUICK_PATHS[@]}"); else paths=(tests); fi
fi
# work stealing (pytest-xdist >= 3.2): an idle worker takes queued tests from a busy one, so a few
# long tests (compiles of a property test's many specialisations, 80-140 s) do not end the run
# on one worker while the others wait
dist=()
python3 -c "import sys, xdist; sys.exit(tuple(map(int, xdist.__version__.split('.')[:2])) < (3, 2))" 2>/dev/null \
  && dist=(--dist worksteal)
t0=$(date +%s)
python3 -m pytest "${paths[@]}" -q -p no:cacheprovider -p no:benchmark -n "$workers" "${dist[@]}" --durations=25 -rfE "$@" 2>&1 \
  | tee -a "$log"
rc=${PIPESTATUS[0]}
if [ -s "$SDM_COMPILE_LOG" ]; then
  python3 tools/compile_log.py "$SDM_COMPILE_LOG" --top 8 | tee -a "$log"
  gzip -f "$SDM_COMPILE_LOG"     # (a part's log is megabytes: gzipped it comes back from a device call)
fi
last=$(grep -E "[0-9]+ (passed|failed)" "$log" | tail -n 1 | tr -d '=')
echo "SUMMARY ($([ $quick = 1 ] && echo quick || echo full)${part:+, part $part}, $(( $(date +%s) - t0 )) s, ${SDM_HYPOTHESIS_MAX_EXAMPLES} examples): ${last:-no result} (pytest exit $rc)" \
  | tee -a "$log"
exit $rc
