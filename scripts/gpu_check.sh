#!/usr/bin/env bash
# One short check of genbench on a GPU machine (under 5 minutes on one modern GPU), ending in
# one summary table:
#   1. the GPU-relevant tests (user checkpoints, CUDA generators, --device handling);
#   2. `genbench run --suite quick --device cuda --limit 16` (local executor);
#   3. NFE/s of the digits denoiser and of the CIFAR-size (35.7M, DDPM-layout) UNet2DModel in
#      fp32 and bf16 at batch 256, 1024 and 4096 (benchmark/verify/throughput.py);
#   4. the same quick run under the process executor, its worker pinned to the GPU.
#
#   scripts/gpu_check.sh                       # on the GPU machine; exits 2 without CUDA
#   scripts/gpu_check.sh --device cpu --quick  # dry run of every step on any machine: tiny sizes,
#                                              # and a two-defense suite in place of `quick`
#
# Environment: PYTHON (default .venv/bin/python, else python3), OUT (default a temporary
# folder; the run folders, logs and throughput.json stay there).
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (expected --device cuda|cpu, --quick)" >&2; exit 2 ;;
  esac
done
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
export GENBENCH_PROGRESS=plain

if [ "$DEVICE" = cuda ]; then
  if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    have=$("$PYTHON" -c 'import torch; print("torch", torch.__version__)' 2>/dev/null || echo "no torch")
    echo "gpu_check: CUDA is not available to $PYTHON ($have); this check needs a GPU (or run it as --device cpu --quick for a dry run)" >&2
    exit 2
  fi
elif [ "$DEVICE" != cpu ]; then
  echo "gpu_check: --device must be cuda or cpu, got $DEVICE" >&2
  exit 2
fi

OUT="${OUT:-$(mktemp -d -t genbench-gpu-check-XXXXXX)}"
mkdir -p "$OUT"
SUITE=quick
if [ "$QUICK" = 1 ]; then
  LIMIT=2; BATCHES=1,4; SECONDS_PER=0.05; TP_FLAGS="--quick"; STEP_TIMEOUT=300
  TESTS=(tests/test_external_models.py)
  SUITE="$OUT/mini.toml"  # the quick suite takes minutes on a CPU: the dry run checks the wiring
  cat >"$SUITE" <<'TOML'
[suite]
name = "gpu-check-mini"
dataset = "digits"
subset = "test100-v1"
k_draws = 2
batch_size = 2
shard_size = 2
unconstrained_probe = 0
single_step_probe = 0

[[defenses]]
name = "undefended"

[[defenses]]
name = "diffpure"
params = { t_star = 0.01, dt = 0.005 }

[[attacks]]
name = "pgd-eot"
params = { steps = 2, eot_draws = 1 }

[[threat_models]]
name = "linf"
eps = [0.1]
TOML
else
  # each step is stopped after 100 s (the summary says so), so the whole check stays near 5 min
  LIMIT=16; BATCHES=256,1024,4096; SECONDS_PER=1; TP_FLAGS=""; STEP_TIMEOUT=100
  TESTS=(tests/test_external_models.py
         tests/test_autoattack_adapter.py::test_attacks_run_on_cuda_with_a_cuda_generator
         tests/test_harness.py::test_run_refuses_a_device_it_cannot_use)
fi

declare -a NAMES STATUS TIMES
step() {  # step NAME COMMAND...: run it with a timeout, log it, record ok/FAIL and seconds
  local name="$1"; shift
  local log="$OUT/$name.log" t0 rc
  t0=$(date +%s)
  echo "== $name: $*" >&2
  timeout "$STEP_TIMEOUT" "$@" >"$log" 2>&1
  rc=$?
  NAMES+=("$name"); TIMES+=("$(( $(date +%s) - t0 ))")
  if [ $rc -eq 0 ]; then STATUS+=("ok"); else
    [ $rc -eq 124 ] && STATUS+=("FAIL (timeout ${STEP_TIMEOUT}s)") || STATUS+=("FAIL (rc $rc)")
    tail -n 15 "$log" >&2
  fi
}

step tests "$PYTHON" -m pytest -q -x -p no:cacheprovider "${TESTS[@]}"
step quick-local "$PYTHON" -m benchmark.cli run --suite "$SUITE" --device "$DEVICE" \
  --limit "$LIMIT" --out "$OUT/quick-local" --progress plain
step throughput "$PYTHON" -m benchmark.verify.throughput --device "$DEVICE" $TP_FLAGS \
  --batches "$BATCHES" --dtypes fp32,bf16 --seconds "$SECONDS_PER" --json "$OUT/throughput.json"
if [ "$DEVICE" = cuda ]; then
  step quick-process env CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}" "$PYTHON" -m \
    benchmark.cli run --suite "$SUITE" --executor process --device cuda --limit "$LIMIT" \
    --out "$OUT/quick-process" --progress plain
else
  step quick-process "$PYTHON" -m benchmark.cli run --suite "$SUITE" --executor process \
    --workers 1 --device cpu --limit "$LIMIT" --out "$OUT/quick-process" --progress plain
fi

echo
echo "genbench gpu_check ($DEVICE$( [ "$QUICK" = 1 ] && echo ', quick dry run'); logs in $OUT)"
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")'
printf '%-14s %-24s %s\n' step status seconds
failed=0
for i in "${!NAMES[@]}"; do
  printf '%-14s %-24s %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${TIMES[$i]}"
  [ "${STATUS[$i]}" = ok ] || failed=1
done
if [ -s "$OUT/throughput.json" ]; then
  echo
  "$PYTHON" -c 'import json, sys
from benchmark.verify.throughput import Row, render
print(render([Row(**r) for r in json.load(open(sys.argv[1]))]))' "$OUT/throughput.json"
fi
exit $failed
