#!/usr/bin/env bash
# The GPU suite in one command (issue 10): tests/gpu/ on one GPU, installing and downloading
# nothing, in two processes (the in-process checks, then the 2-step CLI run through Ray), with a
# summary at the end. On a machine without CUDA it exits at once.
#
#   bash scripts/gpu_smoke.sh            # logs and summary.txt in $OUT, else /tmp/gpu_smoke_<time>
#
# Needs the GPU face installed (README, "Install on GPU").
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! ls /dev/nvidia[0-9]* >/dev/null 2>&1; then  # no NVIDIA device node: no need to import torch
  echo "gpu_smoke: no CUDA device on this machine (no /dev/nvidia<N>): nothing to run" >&2
  exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_smoke: no CUDA device visible to $PY (torch.cuda.is_available() is False): nothing to run" >&2
  exit 2
fi
OUT_DIR=${OUT:-/tmp/gpu_smoke_$(date +%Y%m%d_%H%M%S)}
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, whatever is installed
START=$(date +%s)

"$PY" - <<'PYEOF' 2>&1 | tee "$OUT_DIR/environment.txt"
import importlib.metadata as md
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0),
      "capability", torch.cuda.get_device_capability(0))
for name in ("vllm", "megatron-core", "transformer_engine", "transformer_engine_cu13",
             "transformer_engine_cu12", "transformer_engine_torch", "transformers", "ray"):
    try:
        print(f"{name:26s} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name:26s} not installed")
PYEOF

run_part() {  # name, timeout in s, pytest arguments...
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$PY" -m pytest -m gpu -p no:cacheprovider -rA -s --junitxml="$OUT_DIR/$name.xml" \
    "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  echo "${PIPESTATUS[0]}" > "$OUT_DIR/$name.rc"
}
run_part suite 300 tests/gpu/test_gpu_suite.py
run_part cli 300 tests/gpu/test_cli.py

{
  echo "gpu_smoke $(date -u +%FT%TZ), $(( $(date +%s) - START )) s, $(head -1 "$OUT_DIR/environment.txt")"
  for name in suite cli; do
    echo "== $name: exit $(cat "$OUT_DIR/$name.rc")"
    grep -E "^(PASSED|FAILED|ERROR|SKIPPED) " "$OUT_DIR/$name.log"
    grep -oE "(TE bf16|vLLM runner|shard sync|streamed sync|sleep\(2\)|greedy tokens|after the step|FP8 vs).*" "$OUT_DIR/$name.log"
  done
} | tee "$OUT_DIR/summary.txt"
[ "$(cat "$OUT_DIR/suite.rc")" = 0 ] && [ "$(cat "$OUT_DIR/cli.rc")" = 0 ]
