#!/usr/bin/env bash
# The original INTUITOR recipe, ported from ArcherCodeR / verl's math_intuitor.sh: Qwen2.5-3B on
# MATH, 128 prompts x 8 responses per step, lr 3e-6, KL 0.005 (k3), prompts <= 512 and responses
# <= 3072 tokens, 1 epoch, 8 GPUs on one node. Each verl setting is written as our override,
# with the verl key beside it; extra arguments are Hydra overrides and win.
#
#   ./math_intuitor_archercoder.sh [--dry-run] [HYDRA_OVERRIDES...]
#
# Data: verl's $HOME/data/math/{train,test}.parquet read as they are (data.format=auto reads
# verl's prompt / reward_model.ground_truth columns), or made by our tools/prepare_data.py:
#   python tools/prepare_data.py math --input MATH_train.jsonl --split train --output-dir ~/data
#   python tools/prepare_data.py math --input MATH500_test.jsonl --split test --output-dir ~/data
# W&B: export WANDB_API_KEY=... (offline runs without it).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/common.sh"

mi_parse_args "$@"
MI_OVERRIDES=(
    task=math_math500
    algorithm=intuitor                                   # algorithm.adv_estimator=intuitor
    "data.train_files=[$(mi_quote "$HOME/data/math/train.parquet")]"
    "data.val_files=[$(mi_quote "$HOME/data/math/test.parquet")]"
    data.prompts_per_step=128                            # data.train_batch_size
    data.max_prompt_length=512           # longer prompts dropped: filter_overlong_prompts=True
    data.max_response_length=3072
    model.path=Qwen/Qwen2.5-3B                           # actor_rollout_ref.model.path
    actor.lr=3e-6                                        # actor.optim.lr
    actor.lr_warmup_ratio=0                              # verl's optim defaults: no warm-up,
    actor.lr_scheduler=constant                          # constant lr
    actor.use_remove_padding=true                        # model.use_remove_padding
    actor.ppo_mini_batch_size=128
    actor.ppo_micro_batch_size_per_gpu=4
    algorithm.kl_coef=0.005                              # actor.use_kl_loss, kl_loss_coef
    algorithm.kl_type=low_var_kl                         # actor.kl_loss_type
    algorithm.entropy_coef=0                             # actor.entropy_coeff
    actor.recompute=true                                 # model.enable_gradient_checkpointing
    actor.log_prob_micro_batch_size_per_gpu=4            # rollout/ref log_prob micro batch
    actor.ref_offload=true                               # ref.fsdp_config.param_offload
    actor.tensor_model_parallel_size=2   # Megatron in place of FSDP: 2 KV heads allow TP <= 2
    rollout.gpu_memory_utilization=0.6  # the recipe's 0.85: vLLM here starts next to the actor
    rollout.n=8
    trainer.val_before_train=false
    trainer.n_gpus_per_node=8
    trainer.nnodes=1
    trainer.experiment_name=math_intuitor
    trainer.save_every=10                                # trainer.save_freq
    trainer.val_every=10                                 # trainer.test_freq
    trainer.total_epochs=1
)
mi_title "math_intuitor (the verl recipe), Qwen2.5-3B on 1 node x 8 GPUs"
mi_launch "${MI_OVERRIDES[@]}" "${MI_ARGS[@]}"
