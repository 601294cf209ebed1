#!/usr/bin/env bash
# Qwen2.5-7B on MATH with the INTUITOR paper's 7B recipe: lr 1e-6, 64 prompts x 14 responses per
# step, KL 0.01 (k3), prompts <= 512 / responses <= 3072 tokens. Megatron TP=4 x PP=2 inside each
# 8-GPU node, data parallel across nodes; BF16, FP8 (Transformer Engine) with FP8=hybrid.
#
#   ./examples/run_qwen7b_math.sh [--dry-run] [HYDRA_OVERRIDES...]
#
# Several nodes (default N_NODES=2): start one Ray cluster first, with the same environment
# (this repo installed, same python) and the same data/model paths on every node:
#   head node:     ray start --head --port=6379 --num-gpus=8
#   other nodes:   ray start --address=<head-node-ip>:6379 --num-gpus=8
#   check:         ray status          # N_NODES nodes, N_NODES x 8 GPUs
# then run this script on the head node only. `ray stop` on every node ends the cluster.
# Model and data must be readable on every node (a shared filesystem, or the same paths): each
# rank reads its own slice of the weights.
#
# Environment (default): N_NODES (2), N_GPUS (8 per node), MODEL_PATH (Qwen/Qwen2.5-7B),
# DATA_ROOT (data: DATA_ROOT/math/train.parquet, DATA_ROOT/math500/test.parquet, as written by
# `python tools/prepare_data.py math ... --output-dir DATA_ROOT` and `... math500`),
# FP8 (null | hybrid | e4m3), EXPERIMENT_NAME (qwen7b_math_intuitor), RAY_ADDRESS (auto),
# WANDB_API_KEY.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/common.sh"

mi_parse_args "$@"
N_NODES=${N_NODES:-2}
N_GPUS=${N_GPUS:-8}
MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2.5-7B}
DATA_ROOT=${DATA_ROOT:-data}
FP8=${FP8:-null}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-qwen7b_math_intuitor}

MI_OVERRIDES=(
    task=math_math500
    "model.path=$(mi_quote "$MODEL_PATH")"
    "data.root=$(mi_quote "$DATA_ROOT")"
    data.prompts_per_step=64
    data.max_prompt_length=512
    data.max_response_length=3072
    rollout.n=14
    actor.lr=1e-6
    algorithm.kl_coef=0.01
    algorithm.kl_type=low_var_kl
    # 28 heads / 4 KV heads and 28 layers: TP=4 x PP=2 fills a node; DP = N_NODES.
    actor.tensor_model_parallel_size=4
    actor.pipeline_model_parallel_size=2
    actor.ppo_micro_batch_size_per_gpu=4
    actor.log_prob_micro_batch_size_per_gpu=8
    actor.recompute=true
    actor.precision=bf16
    "actor.fp8=$FP8"
    rollout.tensor_parallel_size=2
    rollout.gpu_memory_utilization=0.6  # the policy's shards and optimizer share the GPU
    rollout.dtype=bfloat16
    trainer.total_epochs=1
    "trainer.experiment_name=$EXPERIMENT_NAME"
)
mi_cluster_overrides  # N_GPUS, N_NODES, and the Ray cluster to join when N_NODES > 1
mi_title "$EXPERIMENT_NAME, $MODEL_PATH on $N_NODES node(s) x $N_GPUS GPUs"
mi_launch "${MI_OVERRIDES[@]}" "${MI_ARGS[@]}"
