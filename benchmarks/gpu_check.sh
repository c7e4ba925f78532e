#!/usr/bin/env bash
# The one prepared GPU check of lightning-mpipemoe: GPU tests and timing tables, one section per
# component. Run from anywhere on a CUDA machine; the whole script finishes in under 8 minutes,
# worst case included:
#
#     bash benchmarks/gpu_check.sh            # PYTHON=... to pick the interpreter (default python3)
#
# Results land in benchmarks/results/ (and are copied to $OUT when that is set, as on the lent
# device machine). A failing section does not stop the later ones; the exit status is non-zero
# if any section failed. To add a component: append a section at the end, in the same form, with
# its own `timeout` so that one hung step cannot eat the others' time, and keep the sum of the
# steps' timeouts (now 120 + 120 + 100 + 90 = 430 s) plus the environment section within
# BUDGET_S.
#
# Time guards: every command runs under `timeout` for the smaller of its own limit and what is
# left of BUDGET_S (450 s; a step with under 10 s left is not started and counts as failed), with
# SIGKILL 5 s after SIGTERM, so everything has ended by 455 s; the whole script also runs under
# an outer `timeout` of GUARD_S (470 s + 5 s) as a backstop. Worst case: 475 s.
set -euo pipefail
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
GUARD_S=$((BUDGET_S + 20))
if [ -z "${GPU_CHECK_GUARDED:-}" ]; then
    export GPU_CHECK_GUARDED=1
    exec timeout -k 5 "$GUARD_S" bash "$0" "$@"
fi
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p benchmarks/results
FAILED=()
START=$SECONDS

left_s() { echo $((BUDGET_S - (SECONDS - START))); }
cap() {  # cap LIMIT_S: LIMIT_S, or what is left of the budget if less (at least 1 s)
    local left
    left=$(left_s)
    [ "$left" -lt 1 ] && left=1
    echo $(($1 < left ? $1 : left))
}
section() { printf '\n========== %s (t=%ss) ==========\n' "$1" "$((SECONDS - START))"; }
step() {  # step NAME TIMEOUT_S CMD...: run (within what is left of BUDGET_S), record a failure, carry on
    local name=$1 limit=$2
    shift 2
    local left
    left=$(left_s)
    if [ "$left" -lt 10 ]; then
        echo "!!! SKIPPED (time budget of ${BUDGET_S}s spent): $name"
        FAILED+=("$name (not run: budget spent)")
        return
    fi
    if [ "$left" -lt "$limit" ]; then
        echo "(time budget: $name gets ${left}s of its ${limit}s)"
        limit=$left
    fi
    local rc=0
    timeout -k 5 "$limit" "$@" || rc=$?
    if [ "$rc" -ne 0 ]; then
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "!!! TIMED OUT after ${limit}s: $name"; fi
        echo "!!! FAILED: $name"
        FAILED+=("$name")
    fi
}
save() {  # save FILE...: copy results back from the device machine
    if [ -n "${OUT:-}" ]; then cp "$@" "$OUT/" 2>/dev/null || true; fi
}

# ---------------------------------------------------------------------------------------------
section "environment"
timeout -k 5 "$(cap 20)" nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
timeout -k 5 "$(cap 60)" "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if ! timeout -k 5 "$(cap 60)" "$PY" -c "import lightning_mpipemoe.kernels.api" 2>/dev/null; then
    # Editable install, offline and without dependencies: only maps the package folders.
    timeout -k 5 "$(cap 90)" "$PY" -m pip install -q --no-deps --no-build-isolation -e . || { echo "cannot install the package"; exit 1; }
fi
timeout -k 5 "$(cap 60)" "$PY" -c "import lightning_mpipemoe.kernels.api as k; print('kernels from', k.__file__)"
XDIST=()
if timeout -k 5 "$(cap 60)" "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 4); fi  # parallel Triton compiles

# ---------------------------------------------------------------------------------------------
# Section: kernels (issue 8) -- permute / unpermute / grouped GEMM: GPU tests, then the timing
# table against the PyTorch reference and the bounds (HBM bytes, bf16 matmul rate) at
# Mixtral-like sizes. Writes benchmarks/results/kernels_gpu.json.
section "kernels: GPU tests"
step "kernels GPU tests" 120 "$PY" -m pytest -m gpu --gpu tests/test_kernels.py -q -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"}
section "kernels: benchmark"
step "kernels benchmark" 120 "$PY" benchmarks/bench_kernels.py --out benchmarks/results/kernels_gpu.json
save benchmarks/results/kernels_gpu.json

# ---------------------------------------------------------------------------------------------
# Section: pipeline (issue 3) -- the pipelined expert-parallel executor on CUDA: its lanes
# (dispatch / combine / copy streams with events) and pinned offload against the plain path,
# on one rank and on two ranks sharing the GPU over gloo; then the memory table (n x restore)
# with the allocator's peaks beside the buffer pool's records and the analytic model.
# Writes benchmarks/results/pipeline_memory.json (the CPU run's file is overwritten there only).
# The GPU tests include the host-sync check (issue 15, tests/test_host_syncs.py): one forward +
# backward of a layer (E = 64, top-8, n = 1 and 4, restore none / s1 / s4, and a tuned call)
# under `torch.cuda.set_sync_debug_mode("error")`, where any synchronising call raises except
# the one documented copy of the exchanged counts per forward (`dispatch._to_host`).
section "pipeline: GPU tests"
step "pipeline GPU tests" 100 env OMP_NUM_THREADS=1 "$PY" -m pytest -m gpu --gpu tests/test_pipeline.py tests/test_host_syncs.py -q -p no:cacheprovider
section "pipeline: memory table"
step "pipeline memory table" 90 env OMP_NUM_THREADS=1 "$PY" benchmarks/bench_pipeline_memory.py --device cuda --partitions 1 4
save benchmarks/results/pipeline_memory.json

# ---------------------------------------------------------------------------------------------
# (next component's section goes here)

# ---------------------------------------------------------------------------------------------
section "summary"
if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'failed: %s\n' "${FAILED[@]}"
    exit 1
fi
echo "all GPU sections passed in $((SECONDS - START)) s"
