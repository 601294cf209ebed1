#!/usr/bin/env bash
# INTUITOR training with every setting from environment variables (full control):
# = ./run_intuitor.sh custom_config ...; the variables, their defaults and config keys are in
# conf/task/custom_config.yaml and docs/launching.md.
#
#   MODEL_PATH=Qwen/Qwen2.5-7B TRAIN_BATCH_SIZE=64 ROLLOUT_N=14 ./run_intuitor_training.sh
#   ./run_intuitor_training.sh --dry-run [HYDRA_OVERRIDES...]   # checks, command + config, no run
exec "$(dirname "${BASH_SOURCE[0]}")/run_intuitor.sh" custom_config "$@"
