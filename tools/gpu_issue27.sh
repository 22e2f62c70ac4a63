#!/bin/bash
# One device call for issue 27 (bench/NOTES.md 25, 31, 33): the centroids path's tests (and the
# direct launcher's), the yardsticks (lse_pass, stats_pass), a profile of one forward per variant
# at 32768, then the bench last (its compiles of the formula take the time): the centroids path
# against the in-loop compare, both KL directions, with the floor and the compiled formula
# (METHODS, default floor,sdm_triton,formula_compiled; formula_autocast is a further peer), under
# a BENCH_S limit (default 300 s; what it finished comes back, one line per measurement).
#   needs .yard/ (copies of ../shared/yardsticks/*.py: carry it) and .rev; writes under $OUT
set -u
out=${OUT:-/tmp}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
# the centroids path's tests first (the gather kernel failed to compile on Triton 3.6 once:
# bench/NOTES.md 33), in parallel workers
python3 -m pytest tests/test_positives.py tests/test_kernels.py tests/test_launch.py -k "centroids or positives or launch" \
  -q -p no:cacheprovider \
  -n 14 2>&1 | tail -n 5 > "$out/i27_positives.log"
(cd .yard && SIZES=16384,32768 python3 lse_pass.py; SIZES=32768 python3 stats_pass.py) > "$out/i27_yard.log" 2>&1
python3 - > "$out/i27_profile.log" 2>&1 <<'PY'
import torch, sdm_triton
from torch.profiler import profile
q = torch.randn(32768, 512, device="cuda", dtype=torch.bfloat16)
i = torch.arange(32768, device="cuda") // 4
for kl in ("forward", "reverse"):
    for c in ("centroids", "tiles"):
        sdm_triton.sdm_loss(q, q, i, i, kl=kl, kernel_config=c)
    torch.cuda.synchronize()
    with profile() as p:
        for c in ("centroids", "tiles"):
            sdm_triton.sdm_loss(q, q, i, i, kl=kl, kernel_config=c)
        torch.cuda.synchronize()
    print(kl); print(p.key_averages().table(sort_by="cuda_time_total", row_limit=15))
PY
# the bench last: its compiles of the formula take the time; what it finished comes back
timeout ${BENCH_S:-300} python3 -m bench --preset gpu-throughput --methods ${METHODS:-floor,sdm_triton,formula_compiled} \
  --variants centroids,tiles --sizes 16384,32768 --labels pk4 --kl forward,reverse --dtypes bf16 \
  --modes fwd,fwd+bwd --no-plots --out "$out/bench27" > "$out/i27_bench.log" 2>&1
cat "$out/i27_positives.log"; tail -n 30 "$out/i27_bench.log"; tail -n 14 "$out/i27_yard.log"
grep -E "^(forward|reverse)$|_stats_kernel|_positive_mass|Self CUDA time total" "$out/i27_profile.log" | head -n 20
