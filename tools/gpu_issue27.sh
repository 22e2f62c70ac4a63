#!/bin/bash
# One device call for issue 27 (bench/NOTES.md 25, 31, 33, 38): the tests of what the call
# measures (TESTS_K, a pytest -k expression), the yardsticks (lse_pass for the forward, w_pass
# for the backward's W pass), a profile of one forward + backward per variant at 32768 (and of
# the PROFILE_ONLY variants, which the bench skips), then
# the bf16 gradient error of the W forms by fit beside the compiled formula (tools/w_fit_check.py),
# the bench last (its compiles of the formula take the time): the VARIANTS (kernel_config
# names; "default" is none) with the floor and the compiled formula (METHODS), bf16, D = 512,
# pk4, KL directions KLS, under a BENCH_S limit (default 300 s; what it finished comes back,
# one line per measurement).
#   needs .yard/ (copies of ../shared/yardsticks/*.py: carry it) and .rev; writes under $OUT
set -u
out=${OUT:-/tmp}
variants=${VARIANTS:-default,tiles}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
python3 -m pytest tests/test_positives.py tests/test_kernels.py tests/test_launch.py tests/test_edge_values.py \
  -k "${TESTS_K:-centroids or positives or launch}" -q -p no:cacheprovider \
  -n 14 2>&1 | tail -n 5 > "$out/i27_tests.log"
timeout ${FIT_S:-150} python3 tools/w_fit_check.py --n 1024 --d 512 > "$out/i27_wfit.log" 2>&1
(cd .yard && SIZES=16384,32768 python3 lse_pass.py; SIZES=32768 CHUNK=${CHUNK:-4096} python3 w_pass.py) \
  > "$out/i27_yard.log" 2>&1
VARIANTS=$variants${PROFILE_ONLY:+,$PROFILE_ONLY} python3 - > "$out/i27_profile.log" 2>&1 <<'PY'
import os, torch, sdm_triton
from torch.profiler import profile
n = 32768
q = torch.randn(n, 512, device="cuda", dtype=torch.bfloat16).requires_grad_()
g = torch.randn(n, 512, device="cuda", dtype=torch.bfloat16).requires_grad_()
i = torch.arange(n, device="cuda") // 4
for v in os.environ["VARIANTS"].split(","):
    cfg = None if v == "default" else v
    step = lambda: sdm_triton.sdm_loss(q, g, i, i, kernel_config=cfg).backward()
    step(); torch.cuda.synchronize()
    with profile() as p:
        step(); torch.cuda.synchronize()
    print(v); print(p.key_averages().table(sort_by="cuda_time_total", row_limit=14))
PY
# the idle gap at 16384 (NOTES 39): any host sync the centroids step makes, warned by CUDA's sync debug mode
timeout 60 python3 - > "$out/i27_sync.log" 2>&1 <<'PY'
import warnings, torch, sdm_triton
n = 16384
q = torch.randn(n, 512, device="cuda", dtype=torch.bfloat16).requires_grad_()
g = torch.randn(n, 512, device="cuda", dtype=torch.bfloat16).requires_grad_()
i = torch.arange(n, device="cuda") // 4
sdm_triton.sdm_loss(q, g, i, i).backward(); torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode("warn")
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    sdm_triton.sdm_loss(q, g, i, i).backward()
torch.cuda.set_sync_debug_mode(0); torch.cuda.synchronize()
print(f"syncs in one centroids step at {n}: {len(w)}")
for x in w[:8]:
    print(" ", str(x.message)[:160], x.filename, x.lineno)
PY
# the chunked backward's workspace (workspace_bytes: its chunks' width) against time and peak, 32768
VARIANTS=$variants timeout 120 python3 - > "$out/i27_workspace.log" 2>&1 <<'PY'
import os, torch, triton, sdm_triton
n = 32768
q = torch.randn(n, 512, device="cuda", dtype=torch.bfloat16).requires_grad_()
g = torch.randn(n, 512, device="cuda", dtype=torch.bfloat16).requires_grad_()
i = torch.arange(n, device="cuda") // 4
for v in [x for x in os.environ["VARIANTS"].split(",") if x in ("default", "wfp16")]:
    for mib in (64, 128, 256):
        cfg = None if v == "default" else v
        def step():
            q.grad = g.grad = None
            sdm_triton.sdm_loss(q, g, i, i, kernel_config=cfg, workspace_bytes=mib << 20).backward()
        step(); torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        step(); torch.cuda.synchronize(); peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        print(f"{v} workspace {mib} MiB: fwd+bwd {triton.testing.do_bench(step, rep=150, return_mode='median'):.2f} ms, "
              f"peak +{peak:.0f} MiB", flush=True)
PY
timeout ${BENCH_S:-300} python3 -m bench --preset gpu-throughput --methods ${METHODS:-floor,sdm_triton,formula_compiled} \
  --variants "$variants" --sizes ${SIZES:-16384,32768} --labels pk4 --kl ${KLS:-forward} --dtypes bf16 \
  --modes fwd,fwd+bwd --no-plots --out "$out/bench27" > "$out/i27_bench.log" 2>&1
cat "$out/i27_tests.log" "$out/i27_sync.log"; grep -v -i warn "$out/i27_wfit.log" | tail -n 10; cat "$out/i27_workspace.log"; tail -n 30 "$out/i27_bench.log"; tail -n 16 "$out/i27_yard.log"
grep -E "^[a-z0-9_]+$|_kernel|gemm|Self CUDA time total" "$out/i27_profile.log" | cut -c1-60,100-200 | head -n 40
