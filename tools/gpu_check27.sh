#!/bin/bash
# One device call after a change to the identity-label path or the chunked backward (issue 27):
# the tests of what changed (TESTS_K, a pytest -k expression over the kernel-facing files, under
# TESTS_S seconds), the yardsticks of the same call (lse_pass, w_pass), the bench (default and
# fp16 W against the floor and the compiled formula, bf16, D = 512, pk4, forward KL) under BENCH_S
# seconds, then wall against GPU time of a step (tools/step_gap.py, GAP_CONFIGS) and the host cost
# of the chunk loop's operations (tools/host_ops.py): the most needed first, as a call that runs
# out of time keeps what it wrote. Needs .yard/ (carry it) and .rev; writes under $OUT.
set -u
out=${OUT:-/tmp}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout ${TESTS_S:-240} python3 -m pytest tests/test_positives.py tests/test_kernels.py tests/test_launch.py \
  tests/test_edge_values.py -k "${TESTS_K:-centroid or positives or chunked or launch}" -q -p no:cacheprovider \
  -n 14 2>&1 | tail -n 5 > "$out/c27_tests.log"
(cd .yard && SIZES=16384,32768 python3 lse_pass.py; SIZES=32768 CHUNK=4096 python3 w_pass.py) > "$out/c27_yard.log" 2>&1
timeout ${BENCH_S:-200} python3 -m bench --preset gpu-throughput --methods floor,sdm_triton,formula_compiled \
  --variants default,wfp16 --sizes 16384,32768 --labels pk4 --kl forward --dtypes bf16 \
  --modes fwd,fwd+bwd --no-plots --out "$out/bench" > "$out/c27_bench.log" 2>&1
timeout ${GAP_S:-90} python3 tools/step_gap.py --sizes 16384,32768 --configs ${GAP_CONFIGS:-default,wfp16} \
  > "$out/c27_gap.log" 2>&1
timeout 40 python3 tools/host_ops.py > "$out/c27_host_ops.log" 2>&1
cat "$out/c27_tests.log"; tail -n 4 "$out/c27_yard.log"; grep -E "^N=" "$out/c27_gap.log"; cat "$out/c27_host_ops.log"
grep -E "^\| [0-9]" "$out/c27_bench.log" | cut -c1-170
