#!/usr/bin/env bash
# The GPU check: resume is bit-exact on CUDA, with one process and (given two GPUs) with two ranks on NCCL, and
# the chaos proof holds on CUDA. One prepared script; it stops itself within BUDGET seconds (default 540).
#
# Before running it: the project installed into the `python` on PATH (`pip install -e .` in this checkout, or
# `make setup && source .venv/bin/activate`). It uses that python as it is and creates no environment. Then:
#
#   scripts/gpu_check.sh                      # writes under ./outputs/gpu_check/<timestamp>
#   OUT=/tmp/gpu BUDGET=480 scripts/gpu_check.sh
#
# Checks (each command under `timeout`, its output in $OUT/logs/<check>.log):
#   cuda.continuous   python train.py +experiment=tiny trainer.device=cuda, 30 steps straight
#   cuda.split        the same to 20 steps, then resume_from=auto to 30
#   cuda.compare      python -m resilient_train.verify continuous --compare resumed: must print "identical"
#   nccl.*            the same three with torchrun --standalone --nproc-per-node 2 (skipped with fewer than 2 GPUs)
#   chaos             python scripts/chaos_test.py --steps 30 --set trainer.device=cuda (one process)
# Prints one PASS/FAIL/SKIP line per check at the end; exits 1 if any check failed, 2 if there is no CUDA device.
set -euo pipefail

BUDGET=${BUDGET:-540}
DEADLINE=$((SECONDS + BUDGET))
OUT=${OUT:-outputs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}  # relative to the working directory, as make chaos-test
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."  # the repository root: train.py, scripts/chaos_test.py

TINY=(+experiment=tiny trainer.device=cuda checkpoint.every_n_steps=10 trainer.progress_bar=false)
TORCHRUN=(python -m torch.distributed.run --standalone --nproc-per-node 2 --max-restarts 0)  # torchrun, this python
RESULTS=()
FAILED=0

record() {  # record PASS|FAIL|SKIP CHECK [DETAIL]
    RESULTS+=("$(printf '%-4s  %-16s %s' "$1" "$2" "${3:-}")")
    if [[ $1 == FAIL ]]; then FAILED=1; fi
    return 0
}

step() {  # step NAME SECS CMD...: CMD under timeout (never past the budget), output to $OUT/logs/NAME.log
    local name=$1 secs=$2 rc=0 t0=$SECONDS
    shift 2
    local log="$OUT/logs/$name.log" left=$((DEADLINE - SECONDS))
    if ((left < 15)); then
        echo "  $name: not run, the ${BUDGET} s budget is spent" | tee -a "$log"
        return 124
    fi
    if ((secs > left)); then secs=$left; fi
    echo "\$ $*" >>"$log"
    timeout --kill-after=15 "$secs" "$@" >>"$log" 2>&1 || rc=$?
    echo "  $name: exit $rc after $((SECONDS - t0)) s (limit $secs s; log $log)"
    if ((rc != 0)); then tail -n 25 "$log" | sed 's/^/    | /'; fi
    return "$rc"
}

check() {  # check NAME SECS CMD...: one step, recorded as PASS or FAIL
    local name=$1
    if step "$@"; then record PASS "$name"; return 0; fi
    record FAIL "$name" "see $OUT/logs/$name.log"
    return 1
}

compare() {  # compare NAME A B: verify --compare must exit 0 and print "identical"
    local name=$1 a=$2 b=$3
    if step "$name" 180 python -m resilient_train.verify "$a" --compare "$b" && grep -qx identical "$OUT/logs/$name.log"
    then
        record PASS "$name" "identical"
    else
        record FAIL "$name" "$(grep -m1 '^differ\|^error' "$OUT/logs/$name.log" || echo "see $OUT/logs/$name.log")"
    fi
}

proof() {  # proof PREFIX LAUNCHER...: continuous 30 steps vs 20 + resume to 30, then the comparison
    local p=$1
    shift
    local ok=1
    check "$p.continuous" 240 "$@" train.py "${TINY[@]}" trainer.max_steps=30 "hydra.run.dir=$OUT/$p/continuous" || ok=0
    if step "$p.split" 240 "$@" train.py "${TINY[@]}" trainer.max_steps=20 "hydra.run.dir=$OUT/$p/resumed" &&
        step "$p.split" 240 "$@" train.py "${TINY[@]}" trainer.max_steps=30 "hydra.run.dir=$OUT/$p/resumed" \
            resume_from=auto; then
        record PASS "$p.split" "20 steps, then resume_from=auto to 30"
    else
        record FAIL "$p.split" "see $OUT/logs/$p.split.log"
        ok=0
    fi
    if ((ok)); then
        compare "$p.compare" "$OUT/$p/continuous" "$OUT/$p/resumed"
    else
        record FAIL "$p.compare" "not compared: a run above failed"
    fi
}

echo "== machine"
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L; then
    echo "error: nvidia-smi is missing or sees no GPU" >&2
    exit 2
fi
if ! python -c "import torch, resilient_train" 2>/dev/null; then
    echo "error: $(command -v python) cannot import torch and resilient_train: run pip install -e . first" >&2
    exit 2
fi
python - <<'EOF'
import sys

import torch

nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "-"
print(f"python {sys.version.split()[0]}  torch {torch.__version__}  CUDA {torch.version.cuda}  "
      f"cuDNN {torch.backends.cudnn.version()}  NCCL {nccl}")
print(f"torch.cuda.is_available() {torch.cuda.is_available()}  devices {torch.cuda.device_count()}")
EOF
if ! python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "error: torch sees no CUDA device (a CPU-only build, or CUDA_VISIBLE_DEVICES hides them)" >&2
    exit 2
fi
# nvidia-smi -L also lists MIG instances, and CUDA_VISIBLE_DEVICES may hide GPUs: take the smaller count.
NGPU=$(nvidia-smi -L | wc -l)
TORCH_GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if ((TORCH_GPUS < NGPU)); then NGPU=$TORCH_GPUS; fi
echo "output: $OUT   GPUs usable: $NGPU   budget: $BUDGET s"

echo "== one process on cuda: continuous vs resumed"
proof cuda python

echo "== two ranks on NCCL (torchrun): continuous vs resumed"
if ((NGPU >= 2)); then
    proof nccl "${TORCHRUN[@]}"
else
    record SKIP nccl "fewer than 2 GPUs"
fi

echo "== chaos proof on cuda (one process)"
if step chaos 330 python scripts/chaos_test.py --steps 30 --set trainer.device=cuda --out "$OUT/chaos"; then
    record PASS chaos "$(head -n1 "$OUT/chaos/report.md")"
else
    headline="no report"
    if [[ -f $OUT/chaos/report.md ]]; then headline="$(head -n1 "$OUT/chaos/report.md"), $OUT/chaos/report.md"; fi
    record FAIL chaos "$headline; log $OUT/logs/chaos.log"
fi
if [[ -f $OUT/chaos/report.md ]]; then echo "  report: $(head -n1 "$OUT/chaos/report.md")"; fi

echo "== summary ($((SECONDS)) s, output $OUT)"
printf '%s\n' "${RESULTS[@]}"
exit "$FAILED"
