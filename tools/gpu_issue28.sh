#!/bin/bash
# One device call for issue 28 (bench/NOTES.md 27, 34, 38): the host floor
# (tools/host_floor.py), then the gpu-latency preset REPEATS times (default 3: host-bound
# timings move +-0.3 ms run to run; the issue compares medians of whole-preset repeats), each
# into its own folder, and the CUDA-graph replay at N = 256. Writes under $OUT.
set -u
out=${OUT:-/tmp}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout 120 python3 tools/host_floor.py > "$out/i28_host_floor.log" 2>&1
for r in $(seq 1 ${REPEATS:-3}); do
  timeout ${PRESET_S:-150} python3 -m bench --preset gpu-latency --no-plots --out "$out/lat$r" > "$out/i28_latency_$r.log" 2>&1
done
timeout 90 python3 tools/gpu_graph_latency.py --sizes 256 > "$out/i28_graph.log" 2>&1
tail -n 12 "$out/i28_host_floor.log"; for r in $(seq 1 ${REPEATS:-3}); do tail -n 14 "$out/i28_latency_$r.log"; done
tail -n 6 "$out/i28_graph.log"
