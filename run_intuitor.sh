#!/usr/bin/env bash
# INTUITOR training with a named config: the recommended entry point.
#
#   ./run_intuitor.sh [CONFIG] [--dry-run] [HYDRA_OVERRIDES...]
#
#   ./run_intuitor.sh                                  # default: the tiny job (CPU, minutes)
#   ./run_intuitor.sh math_gsm8k rollout.n=16          # a named config plus Hydra overrides
#   ./run_intuitor.sh math_math500 data.root=/data --dry-run   # print command + config, run nothing
#   MODEL_PATH=Qwen/Qwen2.5-7B N_NODES=2 N_GPUS=8 ./run_intuitor.sh custom_config  # 2 nodes x 8
#
# CONFIG is a file of conf/task/: math_gsm8k, math_math500, code_humaneval, reasoning_arc,
# math_intuitor_archercoder, default (= tiny), custom_config (every setting from environment
# variables, see docs/launching.md). It runs `python -m megatron_intuitor.main task=CONFIG
# OVERRIDES...`, the same job the console script `megatron-intuitor task=CONFIG` runs.
#
# Before anything starts, the preflight checks python and package versions, the config (every
# key, data files, model path, parallel sizes), GPUs visible against N_GPUS, the Ray cluster when
# N_NODES>1 and free disk for checkpoints, and says what to fix. The run's output also goes to
# logs/<experiment>_<timestamp>.log (logger.log_dir), whose path is printed.
#
# Environment: N_GPUS (ranks per node), N_NODES (nodes), any config; RAY_ADDRESS; W&B goes online
# with WANDB_API_KEY or after `wandb login` (WANDB_MODE, WANDB_ENTITY); PYTHON; NO_COLOR.
# Options: --dry-run (checks, then the command and resolved config on stdout), -h/--help.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/common.sh"

mi_parse_args "$@"
configs=()
for file in "$MI_REPO_ROOT"/conf/task/*.yaml; do
    configs+=("$(basename "$file" .yaml)")
done

# The first argument names the config unless it is an override (key=value); default: default.
config=default
if ((${#MI_ARGS[@]})) && [[ ${MI_ARGS[0]} != *=* ]]; then
    config=${MI_ARGS[0]}
    MI_ARGS=("${MI_ARGS[@]:1}")
fi
if [[ " ${configs[*]} " != *" $config "* ]]; then
    mi_die "unknown config '$config'; valid configs: ${configs[*]}" \
           "(files in $MI_REPO_ROOT/conf/task)"
fi

MI_OVERRIDES=("task=$config")
mi_cluster_overrides
mi_title "config $config"
mi_launch "${MI_OVERRIDES[@]}" "${MI_ARGS[@]}"
