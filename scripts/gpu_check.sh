#!/usr/bin/env bash
# The GPU acceptance run: resume is bit-exact on CUDA (one process; two ranks sharing one GPU over gloo; two
# ranks on NCCL given two GPUs), `trainer.device=auto` takes the GPU, the chaos proof holds on CUDA, and
# magvit64's throughput, memory, FLOP/s share, loop overhead and checkpoint costs on the GPU are measured
# (python -m benchmarks.gpu). One prepared script; it stops itself within BUDGET seconds (default 480).
#
# Before running it: the project installed into the `python` on PATH (`pip install -e .` in this checkout, or
# `make setup && source .venv/bin/activate`). It uses that python as it is and creates no environment. Then:
#
#   scripts/gpu_check.sh                      # writes under ./outputs/gpu_check/<timestamp>
#   OUT=/tmp/gpu BUDGET=400 scripts/gpu_check.sh
#   DEVICE=cpu scripts/gpu_check.sh           # rehearse every step on a machine without a GPU (tiny sizes)
#
# Checks, in this order (each command under `timeout`, its output in $OUT/logs/<check>.log):
#   cuda.continuous   python train.py +experiment=tiny trainer.device=cuda (EMA on, as by default), 30 steps
#   cuda.split        the same to 20 steps, then resume_from=auto to 30
#   cuda.compare      python -m resilient_train.verify continuous --compare resumed: must print "identical"
#   auto              python train.py +experiment=tiny (trainer.device left at auto): train.start says cuda:0
#   chaos             python scripts/chaos_test.py --steps 30 --set trainer.device=cuda (one process)
#   bench             python -m benchmarks.gpu: steps/s, clips/s, peak memory, FLOP/s share at batch 1, 8
#                     and 32, deterministic on and off; loop vs bare step; save time and async stall
#   shared.*          the proof under torchrun --nproc-per-node 2 with trainer.device=cuda:0: both ranks on one
#                     GPU, gradients over gloo (NCCL refuses two ranks on one device)
#   nccl.*            the proof under torchrun --nproc-per-node 2 with trainer.device=cuda (needs 2 GPUs)
#   precision         python -m benchmarks.gpu --section precision: magvit64 steps/s in 32, bf16-mixed and
#                     16-mixed, compile off and on, against float32 eager, at batch 8 (last: what budget is left)
# Prints one PASS/FAIL/SKIP line per check and the bench table, writes $OUT/gpu_check.json; exits 1 if any
# check failed, 2 if there is no CUDA device.
set -euo pipefail

BUDGET=${BUDGET:-480}
DEVICE=${DEVICE:-cuda} # cpu: a rehearsal of the script itself
DEADLINE=$((SECONDS + BUDGET))
OUT=${OUT:-outputs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}  # relative to the working directory, as make chaos-test
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."  # the repository root: train.py, scripts/chaos_test.py, benchmarks/

TINY=(+experiment=tiny trainer.ema.enabled=true data.num_workers=2 checkpoint.every_n_steps=10 trainer.progress_bar=false)
if [[ $DEVICE == cpu ]]; then ONE=cpu SHARED=cpu; else ONE=cuda SHARED=cuda:0; fi
TORCHRUN=(python -m torch.distributed.run --standalone --nproc-per-node 2 --max-restarts 0)  # torchrun, this python
RESULTS=()
JSON=()
FAILED=0

record() {  # record PASS|FAIL|SKIP CHECK [DETAIL]
    RESULTS+=("$(printf '%-4s  %-16s %s' "$1" "$2" "${3:-}")")
    JSON+=("$(python -c 'import json, sys; print(json.dumps(dict(zip(("status", "check", "detail"), sys.argv[1:]))))' \
        "$1" "$2" "${3:-}")")
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

proof() {  # proof PREFIX DEVICE LAUNCHER...: continuous 30 steps vs 20 + resume to 30, then the comparison
    local p=$1 dev=$2
    shift 2
    local ok=1 run=("$@" train.py "${TINY[@]}" "trainer.device=$dev")
    check "$p.continuous" 240 "${run[@]}" trainer.max_steps=30 "hydra.run.dir=$OUT/$p/continuous" || ok=0
    if step "$p.split" 240 "${run[@]}" trainer.max_steps=20 "hydra.run.dir=$OUT/$p/resumed" &&
        step "$p.split" 240 "${run[@]}" trainer.max_steps=30 "hydra.run.dir=$OUT/$p/resumed" resume_from=auto; then
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
if [[ $DEVICE == cuda ]] && { ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L; }; then
    echo "error: nvidia-smi is missing or sees no GPU" >&2
    exit 2
fi
if ! python -c "import torch, resilient_train" 2>/dev/null; then
    echo "error: $(command -v python) cannot import torch and resilient_train: run pip install -e . first" >&2
    exit 2
fi
python -c '
import sys

import torch

nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "-"
print(f"python {sys.version.split()[0]}  torch {torch.__version__}  CUDA {torch.version.cuda}  "
      f"cuDNN {torch.backends.cudnn.version()}  NCCL {nccl}")
print(f"torch.cuda.is_available() {torch.cuda.is_available()}  devices {torch.cuda.device_count()}")
'
NGPU=0
if [[ $DEVICE == cuda ]]; then
    if ! python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
        echo "error: torch sees no CUDA device (a CPU-only build, or CUDA_VISIBLE_DEVICES hides them)" >&2
        exit 2
    fi
    # nvidia-smi -L also lists MIG instances, and CUDA_VISIBLE_DEVICES may hide GPUs: take the smaller count.
    NGPU=$(nvidia-smi -L | wc -l)
    TORCH_GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
    if ((TORCH_GPUS < NGPU)); then NGPU=$TORCH_GPUS; fi
else
    TINY+=(trainer.num_threads=1)  # two ranks on a small CPU machine: one thread each
fi
echo "output: $OUT   device: $DEVICE   GPUs usable: $NGPU   budget: $BUDGET s"

echo "== one process on $ONE: continuous vs resumed"
proof cuda "$ONE" python

echo "== trainer.device=auto (the default) takes the GPU"
want="device=cuda:0 "
if [[ $DEVICE == cpu ]]; then want="device=cpu "; fi
if step auto 120 python train.py "${TINY[@]}" trainer.max_steps=2 "hydra.run.dir=$OUT/auto"; then
    line=$(grep -o "device=.*" "$OUT/auto/train.log" | head -n1 || true)
    if [[ $line == "$want"* ]]; then record PASS auto "$line"; else record FAIL auto "train.start: '$line'"; fi
else
    record FAIL auto "see $OUT/logs/auto.log"
fi

echo "== chaos proof on $ONE (one process)"
if step chaos 240 python scripts/chaos_test.py --steps 30 --set "trainer.device=$ONE" --out "$OUT/chaos"; then
    record PASS chaos "$(head -n1 "$OUT/chaos/report.md")"
else
    headline="no report"
    if [[ -f $OUT/chaos/report.md ]]; then headline="$(head -n1 "$OUT/chaos/report.md"), $OUT/chaos/report.md"; fi
    record FAIL chaos "$headline; log $OUT/logs/chaos.log"
fi

echo "== magvit64 on $ONE: throughput, loop vs bare step, checkpoint costs"
quick=()
if [[ $DEVICE == cpu ]]; then quick=(--quick); fi
if step bench 200 python -m benchmarks.gpu --device "$ONE" --out "$OUT/bench" "${quick[@]}"; then
    record PASS bench "$OUT/bench/gpu_bench.json"
else
    record FAIL bench "see $OUT/logs/bench.log"
fi

echo "== two ranks sharing one device ($SHARED, gloo): continuous vs resumed"
proof shared "$SHARED" "${TORCHRUN[@]}"

echo "== two ranks on NCCL (torchrun, a GPU each): continuous vs resumed"
if ((NGPU >= 2)); then
    proof nccl cuda "${TORCHRUN[@]}"
else
    record SKIP nccl "fewer than 2 GPUs"
fi

echo "== precision x compile on $ONE: steps/s against float32 eager"
if ((DEADLINE - SECONDS < 90)); then
    record SKIP precision "under 90 s of the ${BUDGET} s budget left"
elif step precision 300 python -m benchmarks.gpu --section precision --device "$ONE" --out "$OUT/bench" "${quick[@]}"
then
    record PASS precision "$OUT/bench/gpu_precision.json"
else
    record FAIL precision "see $OUT/logs/precision.log"
fi

echo "== summary ($SECONDS s, output $OUT)"
printf '%s\n' "${RESULTS[@]}"
if [[ -f $OUT/logs/bench.log ]]; then sed -n '/ on .* (torch /,$p' "$OUT/logs/bench.log"; fi
if [[ -f $OUT/logs/precision.log ]]; then sed -n '/precision x compile against/,$p' "$OUT/logs/precision.log"; fi
printf '%s\n' "${JSON[@]}" | python -c '
import json, sys
checks = [json.loads(line) for line in sys.stdin if line.strip()]
print(json.dumps({"checks": checks, "failed": any(c["status"] == "FAIL" for c in checks)}, indent=1))
' >"$OUT/gpu_check.json"
echo "wrote $OUT/gpu_check.json"
exit "$FAILED"
