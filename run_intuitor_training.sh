#!/usr/bin/env bash
# INTUITOR training with every setting from environment variables (full control).
#
#   MODEL_PATH=Qwen/Qwen2.5-7B TRAIN_BATCH_SIZE=64 ROLLOUT_N=14 ./run_intuitor_training.sh
#   ./run_intuitor_training.sh --dry-run [HYDRA_OVERRIDES...]   # checks, command + config, no run
#
# Each variable becomes one Hydra override on top of task=math_math500 (MATH prompts, MATH500
# validation; files from tools/prepare_data.py); extra arguments are Hydra overrides and win.
# `./run_intuitor.sh custom_config` reads the same variables, with the same defaults, inside
# conf/task/custom_config.yaml.
#
#   variable=default                      config key
#   MODEL_PATH=Qwen/Qwen2.5-3B            model.path (a local directory or a hub id)
#   TRAIN_DATA=data/math/train.parquet    data.train_files
#   VAL_DATA=data/math500/test.parquet    data.val_files
#   DATA_FORMAT=auto                      data.format (auto: from the columns)
#   PROMPT_KEY=prompt                     data.prompt_key
#   ANSWER_KEY=null                       data.answer_key (null: the ground_truth column)
#   TRAIN_BATCH_SIZE=128                  data.prompts_per_step
#   MAX_PROMPT_LENGTH=512                 data.max_prompt_length
#   MAX_RESPONSE_LENGTH=2048              data.max_response_length
#   LEARNING_RATE=3e-6                    actor.lr
#   TOTAL_EPOCHS=1                        trainer.total_epochs
#   ROLLOUT_N=8                           rollout.n
#   N_GPUS=8                              trainer.n_gpus_per_node (ranks per node)
#   N_NODES=1                             trainer.nnodes (>1: joins a Ray cluster, RAY_ADDRESS)
#   TP_SIZE=2                             actor.tensor_model_parallel_size
#   PP_SIZE=1                             actor.pipeline_model_parallel_size
#   PPO_MICRO_BATCH_SIZE_PER_GPU=4        actor.ppo_micro_batch_size_per_gpu
#   LOG_PROB_MICRO_BATCH_SIZE_PER_GPU=4   actor.log_prob_micro_batch_size_per_gpu
#   USE_REMOVE_PADDING=true               actor.use_remove_padding
#   ENABLE_GRADIENT_CHECKPOINTING=true    actor.recompute
#   GPU_MEMORY_UTILIZATION=0.6            rollout.gpu_memory_utilization
#   EXPERIMENT_NAME=custom_intuitor       trainer.experiment_name
#   WANDB_API_KEY=                        W&B online (offline when unset)
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/common.sh"

mi_parse_args "$@"

MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2.5-3B}
TRAIN_DATA=${TRAIN_DATA:-data/math/train.parquet}
VAL_DATA=${VAL_DATA:-data/math500/test.parquet}
DATA_FORMAT=${DATA_FORMAT:-auto}
PROMPT_KEY=${PROMPT_KEY:-prompt}
ANSWER_KEY=${ANSWER_KEY:-null}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-128}
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-512}
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-2048}
LEARNING_RATE=${LEARNING_RATE:-3e-6}
TOTAL_EPOCHS=${TOTAL_EPOCHS:-1}
ROLLOUT_N=${ROLLOUT_N:-8}
N_GPUS=${N_GPUS:-8}
N_NODES=${N_NODES:-1}
TP_SIZE=${TP_SIZE:-2}
PP_SIZE=${PP_SIZE:-1}
PPO_MICRO_BATCH_SIZE_PER_GPU=${PPO_MICRO_BATCH_SIZE_PER_GPU:-4}
LOG_PROB_MICRO_BATCH_SIZE_PER_GPU=${LOG_PROB_MICRO_BATCH_SIZE_PER_GPU:-4}
USE_REMOVE_PADDING=${USE_REMOVE_PADDING:-true}
ENABLE_GRADIENT_CHECKPOINTING=${ENABLE_GRADIENT_CHECKPOINTING:-true}
GPU_MEMORY_UTILIZATION=${GPU_MEMORY_UTILIZATION:-0.6}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-custom_intuitor}

MI_OVERRIDES=(
    task=math_math500
    "model.path=$(mi_quote "$MODEL_PATH")"
    "data.train_files=[$(mi_quote "$TRAIN_DATA")]"
    "data.val_files=[$(mi_quote "$VAL_DATA")]"
    "data.format=$DATA_FORMAT"
    "data.prompt_key=$PROMPT_KEY"
    "data.answer_key=$ANSWER_KEY"
    "data.prompts_per_step=$TRAIN_BATCH_SIZE"
    "data.max_prompt_length=$MAX_PROMPT_LENGTH"
    "data.max_response_length=$MAX_RESPONSE_LENGTH"
    "actor.lr=$LEARNING_RATE"
    "trainer.total_epochs=$TOTAL_EPOCHS"
    "rollout.n=$ROLLOUT_N"
    "actor.tensor_model_parallel_size=$TP_SIZE"
    "actor.pipeline_model_parallel_size=$PP_SIZE"
    "actor.ppo_micro_batch_size_per_gpu=$PPO_MICRO_BATCH_SIZE_PER_GPU"
    "actor.log_prob_micro_batch_size_per_gpu=$LOG_PROB_MICRO_BATCH_SIZE_PER_GPU"
    "actor.use_remove_padding=$USE_REMOVE_PADDING"
    "actor.recompute=$ENABLE_GRADIENT_CHECKPOINTING"
    "rollout.gpu_memory_utilization=$GPU_MEMORY_UTILIZATION"
    "trainer.experiment_name=$EXPERIMENT_NAME"
)
mi_cluster_overrides  # N_GPUS, N_NODES (and the Ray address for several nodes)
mi_title "$EXPERIMENT_NAME, $MODEL_PATH on $N_NODES node(s) x $N_GPUS"
mi_launch "${MI_OVERRIDES[@]}" "${MI_ARGS[@]}"
