#!/usr/bin/env bash
# A GPU check for a bare GPU machine (issue 20): needs only CUDA torch (2.11-2.13), transformers,
# megatron-core and this package's pure-Python dependencies; no vLLM, Transformer Engine or Ray,
# no network, nothing installed. Three parts, each in a process of its own under a time limit
# (python -m megatron_intuitor.core_check PART; together <= 7.5 minutes):
#   logits   Megatron (local layer spec, bf16) vs transformers on a Qwen2 at Qwen2.5-0.5B widths
#            made locally, padded and packed;
#   scoring  the fused vocab-parallel scoring vs float64, and its peak memory and time at 8192
#            tokens x 152064 vocabulary against one exp pass and the naive log-softmax, with the
#            GPU's measured copy bandwidth as the floor;
#   ppo      one PPO update with Megatron's distributed optimizer, a checkpoint saved and
#            reloaded exactly.
# Each part's time is printed; the last line is one JSON object. Without CUDA it exits at once
# (status 2).
#
#   bash scripts/gpu_check_core.sh       # logs and summary.json in $OUT, else /tmp/gpu_core_<time>
#
# It has never run on a GPU.
cd "$(dirname "$0")/.." || exit 1
exec "${PYTHON:-python}" scripts/gpu_parts.py core ${OUT:+--out "$OUT"}
