#!/bin/bash
# The first device call of the next session with a GPU (bench/NOTES.md 42), the most needed first
# (a call that runs out of time keeps what it wrote under $OUT):
#   1. the single-launch forward (kernels/single.py) on the GPU: its tests against the staged
#      forward, and the kernel-facing tests never yet run on a GPU (positives, launch layer,
#      the step compiled with dynamic shapes);
#   2. tools/host_floor.py with the staged and the single forward, interleaved, twice: the
#      host time of a step at N = 64-1024 (issue 28's prediction: ~0.1 ms less per step);
#   3. the gpu-latency bench, default (staged) and "single" variants, every method in one run;
#   4. tools/gpu_smoke_positives.py and tools/host_ops.py (gpu_session8.sh's checks).
# Carry .rev and .yard (tools/gpu_check27.sh needs .yard; this script does not).
set -u
out=${OUT:-/tmp}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout ${TESTS_S:-200} python3 -m pytest tests/test_single_forward.py tests/test_launch.py tests/test_positives.py \
  tests/test_kernels.py tests/test_training.py \
  -k "${TESTS_K:-single or launch or positives or centroid or fused or learnable or dynamic}" -q -p no:cacheprovider \
  -n 14 2>&1 | tail -n 6 > "$out/s9_tests.log"
for round in 1 2; do
  timeout 90 python3 tools/host_floor.py --reps 200 --kernel-config staged,single 2>&1 | sed "s/^/$round | /"
done > "$out/s9_floor.log"
timeout ${BENCH_S:-240} python3 -m bench --preset gpu-latency --variants default,single --modes fwd+bwd \
  --methods floor,sdm_triton,sdm_triton_multi,formula_eager,formula_compiled \
  --out "$out/s9_latency" --no-plots > "$out/s9_bench.log" 2>&1
timeout ${SMOKE_S:-90} python3 tools/gpu_smoke_positives.py > "$out/s9_smoke.log" 2>&1
timeout 40 python3 tools/host_ops.py > "$out/s9_host_ops.log" 2>&1
cat "$out/s9_tests.log"; grep -E "sdm_loss|trivial|sum\(\)" "$out/s9_floor.log"; tail -n 40 "$out/s9_bench.log"
tail -n 8 "$out/s9_smoke.log"
