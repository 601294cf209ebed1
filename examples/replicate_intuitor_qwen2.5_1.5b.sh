#!/usr/bin/env bash
# The INTUITOR paper's main small-model result (arXiv 2505.19590): Qwen2.5-1.5B base trained on
# MATH, one epoch (58 steps of 128 prompts x 7 responses), lr 3e-6 cosine with 10% warm-up,
# KL 0.005 (k3), temperature 0.9, prompts <= 512 / responses <= 3072 tokens; greedy MATH500 and
# GSM8K before training and every 10 steps. One arm per run (ARM):
#   intuitor  the self-certainty reward (the paper: MATH500 0.090 -> 0.368 at step 10, 0.530 at
#             the end; GSM8K 0.002 -> 0.711)
#   grpo      the verifiable 0/1 reward (the paper: MATH500 0.560, GSM8K 0.747 at the end)
#   random    an i.i.d. normal reward with the same normalisation, clip and KL (the control
#             that separates the direction of the reward from mere movement, arXiv 2506.10947)
# Then: python tools/compare_to_paper.py runs/<experiment>   (the curve against the paper's)
#
#   ARM=intuitor ./examples/replicate_intuitor_qwen2.5_1.5b.sh [--dry-run] [HYDRA_OVERRIDES...]
#
# One node of 8 GPUs (Qwen2.5-1.5B: 12 heads / 2 KV heads, 28 layers; TP=1 x DP=8). Never run
# here: this machine has no GPU; the config is dry-run tested on CPU
# (tests/e2e/test_replication.py).
#
# Environment (default): ARM (intuitor), N_GPUS (8), MODEL_PATH (Qwen/Qwen2.5-1.5B), DATA_ROOT
# (data: DATA_ROOT/math/train.parquet, DATA_ROOT/math500/test.parquet,
# DATA_ROOT/gsm8k/test.parquet, as written by `python tools/prepare_data.py math ...
# --output-dir DATA_ROOT`, `... math500`, `... gsm8k`), EXPERIMENT_NAME
# (qwen2.5_1.5b_math_<ARM>), WANDB_API_KEY.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/common.sh"

mi_parse_args "$@"
ARM=${ARM:-intuitor}
case $ARM in
    intuitor | grpo | random) ;;
    *) mi_die "ARM=$ARM: expected intuitor, grpo or random" ;;
esac
N_GPUS=${N_GPUS:-8}
MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2.5-1.5B}
DATA_ROOT=${DATA_ROOT:-data}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-qwen2.5_1.5b_math_$ARM}

MI_OVERRIDES=(
    task=math_math500
    "algorithm=$ARM"
    "model.path=$(mi_quote "$MODEL_PATH")"
    "data.root=$(mi_quote "$DATA_ROOT")"
    "data.val_files=[$(mi_quote "$DATA_ROOT/math500/test.parquet"),$(mi_quote "$DATA_ROOT/gsm8k/test.parquet")]"
    data.prompts_per_step=128
    data.max_prompt_length=512
    data.max_response_length=3072
    rollout.n=7
    rollout.temperature=0.9
    actor.lr=3e-6
    actor.lr_scheduler=cosine
    actor.lr_warmup_ratio=0.1
    algorithm.kl_coef=0.005
    algorithm.kl_type=low_var_kl
    actor.tensor_model_parallel_size=1
    actor.pipeline_model_parallel_size=1
    actor.ppo_micro_batch_size_per_gpu=8
    actor.log_prob_micro_batch_size_per_gpu=16
    actor.recompute=true
    actor.precision=bf16
    rollout.tensor_parallel_size=1
    rollout.dtype=bfloat16
    trainer.total_steps=58
    trainer.val_before_train=true
    trainer.val_every=10
    trainer.save_every=10
    "trainer.experiment_name=$EXPERIMENT_NAME"
)
MI_OVERRIDES+=("trainer.n_gpus_per_node=$N_GPUS")
mi_title "$EXPERIMENT_NAME: $MODEL_PATH on MATH, arm $ARM, $N_GPUS GPUs"
mi_launch "${MI_OVERRIDES[@]}" "${MI_ARGS[@]}"
