# Shared by the launch scripts (run_intuitor.sh, run_intuitor_training.sh,
# math_intuitor_archercoder.sh, examples/*.sh): output, argument parsing, cluster-shape
# overrides and the checked, logged launch. Source it; it defines functions and a few MI_*
# variables and runs nothing.
#
#   source "$(dirname "${BASH_SOURCE[0]}")/scripts/common.sh"
#   mi_parse_args "$@"                      # --dry-run / --help; the rest in MI_ARGS
#   mi_launch task=math_gsm8k "${MI_ARGS[@]}"
#
# Environment read here: PYTHON (interpreter, default python3), NO_COLOR, and through
# mi_cluster_overrides N_GPUS, N_NODES, RAY_ADDRESS.

MI_REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
# A clone works without `pip install -e .` (its dependencies must still be installed).
export PYTHONPATH="$MI_REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1

# Colour only on a terminal, and never with NO_COLOR set (https://no-color.org). The preflight
# (python) follows the same decision through MI_COLOR.
if [[ -z ${NO_COLOR:-} && -t 2 ]]; then
    MI_RED=$'\e[31m' MI_GREEN=$'\e[32m' MI_YELLOW=$'\e[33m' MI_BOLD=$'\e[1m' MI_RESET=$'\e[0m'
    export MI_COLOR=1
else
    MI_RED='' MI_GREEN='' MI_YELLOW='' MI_BOLD='' MI_RESET=''
    export MI_COLOR=0
fi

# Messages go to stderr: stdout of --dry-run is the resolved config alone (valid YAML).
mi_info() { printf '%s\n' "$*" >&2; }
mi_ok() { printf '%s\n' "${MI_GREEN}$*${MI_RESET}" >&2; }
mi_warn() { printf '%s\n' "${MI_YELLOW}warning: $*${MI_RESET}" >&2; }
mi_error() { printf '%s\n' "${MI_RED}error: $*${MI_RESET}" >&2; }
mi_die() { mi_error "$@"; exit 1; }
mi_title() { printf '%s\n' "${MI_BOLD}megatron-intuitor: $*${MI_RESET}" >&2; }
mi_phase() { printf '\n%s\n' "${MI_BOLD}[$1/$2] $3${MI_RESET}" >&2; }

# mi_parse_args "$@": sets MI_DRY_RUN (0|1) and MI_ARGS (everything else, in order). --help
# prints the calling script's header comment (its lines starting with "#", after the shebang).
mi_parse_args() {
    MI_DRY_RUN=0
    MI_ARGS=()
    local arg
    for arg in "$@"; do
        case $arg in
            --dry-run) MI_DRY_RUN=1 ;;
            -h | --help) mi_usage; exit 0 ;;
            --*) mi_die "unknown option $arg (options: --dry-run, --help; everything else is a" \
                        "Hydra override such as rollout.n=16)" ;;
            *) MI_ARGS+=("$arg") ;;
        esac
    done
}

mi_usage() {
    sed -n '2,/^[^#]/{/^#/!q;s/^# \{0,1\}//;p}' "$0"
}

# mi_quote VALUE: VALUE as a quoted Hydra string, so that a path may hold spaces, commas, '='.
mi_quote() {
    printf "'%s'" "${1//\'/\\\'}"
}

# mi_cluster_overrides: appends to MI_OVERRIDES the cluster shape taken from the environment,
# for every config: N_GPUS (ranks per node) and N_NODES, when set. A multi-node run joins the
# running Ray cluster: address "auto" finds it (RAY_ADDRESS, else the one `ray start` made on this
# node) and, unlike an explicit address, makes Ray send the cluster's auth token.
mi_cluster_overrides() {
    [[ -n ${N_GPUS:-} ]] && MI_OVERRIDES+=("trainer.n_gpus_per_node=$N_GPUS")
    [[ -n ${N_NODES:-} ]] && MI_OVERRIDES+=("trainer.nnodes=$N_NODES")
    if [[ -n ${N_NODES:-} && $N_NODES != 1 ]]; then
        MI_OVERRIDES+=("trainer.ray_address=auto")
    fi
    return 0
}

# mi_launch OVERRIDES...: the checked, logged run of `python -m megatron_intuitor.main
# OVERRIDES...`. The preflight (megatron_intuitor/preflight.py) composes, resolves and validates the config
# and checks the machine; with --dry-run it then prints the command and the resolved config on
# stdout and stops. Otherwise the run's output is also written to
# <logger.log_dir>/<experiment>_<timestamp>.log. Exits with the run's status.
mi_launch() {
    local -a command=("$PYTHON" -m megatron_intuitor.main "$@")
    local printed
    printf -v printed '%q ' "${command[@]}"
    printed=${printed% }

    mi_phase 1 2 "Preflight: environment and config"
    if ((MI_DRY_RUN)); then
        "$PYTHON" -m megatron_intuitor.preflight --dry-run --command "$printed" -- "$@"
        local status=$?
        mi_phase 2 2 "Dry run: nothing started"
        if ((status == 0)); then
            mi_ok "ready: the command and the resolved config are on stdout"
        else
            mi_error "a run would be refused: fix the problems above (the resolved config, if" \
                     "there is one, is on stdout)"
        fi
        exit $status
    fi

    local log_path_file
    log_path_file=$(mktemp)
    if ! "$PYTHON" -m megatron_intuitor.preflight --command "$printed" \
            --log-path-out "$log_path_file" -- "$@"; then
        rm -f "$log_path_file"
        mi_die "preflight failed: fix the problems above (nothing was started)"
    fi
    local log
    log=$(<"$log_path_file")
    rm -f "$log_path_file"

    mi_phase 2 2 "Training"
    mi_info "command: $printed"
    mi_info "log:     $log"
    local start=$SECONDS status
    # Ctrl-C reaches the whole pipeline: tee ignores it, so that the run's last words (where it
    # was interrupted, its last checkpoint) still reach the console and the log.
    "${command[@]}" 2>&1 | (trap '' INT; tee -a "$log")
    status=${PIPESTATUS[0]}
    local elapsed=$((SECONDS - start))
    local took="$((elapsed / 3600))h $((elapsed % 3600 / 60))m $((elapsed % 60))s"
    if ((status == 0)); then
        mi_ok "finished in $took"
    elif ((status == 130)); then
        mi_info "interrupted after $took (Ctrl-C)"
    else
        mi_error "the run failed (exit status $status) after $took"
        if grep -q -E 'CUDA out of memory|OutOfMemoryError' "$log"; then
            mi_info "hint: out of GPU memory: lower actor.ppo_micro_batch_size_per_gpu /" \
                    "actor.log_prob_micro_batch_size_per_gpu (PPO_MICRO_BATCH_SIZE_PER_GPU," \
                    "LOG_PROB_MICRO_BATCH_SIZE_PER_GPU) or rollout.gpu_memory_utilization;" \
                    "see README, Troubleshooting"
        fi
    fi
    mi_info "log: $log"
    exit $status
}
