#!/bin/bash
# One device call for issue 27 after the W pass's tiles changed: the chunked W kernel's table
# tiles against the previous 128 x 64 (w8 s3) for reverse KL and for dense labels (bool), where
# compile_check shows more stack than forward KL's; more shapes for forward KL at 32768; then the largest sizes (65536, 131072:
# default and fp16 W against the floor, fwd+bwd, peak memory). Writes under $OUT.
set -u
out=${OUT:-/tmp}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
for lab in "--kl reverse" "--labels dense"; do
  timeout ${SWEEP_S:-110} python3 tools/w_tiles_sweep.py --sizes 16384,32768 --variants default \
    --tiles ,bm128bn64bw8bs3 $lab 2>&1 | tail -n 8
done > "$out/large_tiles.log"
# more shapes around the table's 64 x 128 (w4 s4) for forward KL (the W pass is 1.26x w_pass)
timeout ${SWEEP_S:-110} python3 tools/w_tiles_sweep.py --sizes 32768 --variants default,wfp16 \
  --tiles ,bm64bn128bw8bs3,bm64bn128bw8bs4,bm64bn128bw4bs5 2>&1 | tail -n 12 >> "$out/large_tiles.log"
timeout ${BENCH_S:-240} python3 -m bench --preset gpu-throughput --methods floor,sdm_triton \
  --variants default,wfp16 --sizes 65536,131072 --labels pk4 --kl forward --dtypes bf16 \
  --modes fwd+bwd --no-plots --out "$out/bench_large" > "$out/large_bench.log" 2>&1
cat "$out/large_tiles.log"; grep -E "^\| [0-9]" "$out/large_bench.log" | cut -c1-170; tail -n 3 "$out/large_bench.log"
