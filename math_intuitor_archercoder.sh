#!/usr/bin/env bash
# The original INTUITOR recipe (ArcherCodeR / verl's math_intuitor.sh): conf/task/math_intuitor_archercoder.yaml.
#
#   ./math_intuitor_archercoder.sh [--dry-run] [HYDRA_OVERRIDES...]
#   N_NODES=2 N_GPUS=8 ./math_intuitor_archercoder.sh       # 2 nodes of 8 GPUs (a Ray cluster)
#
# = ./run_intuitor.sh math_intuitor_archercoder ...; see its --help.
exec "$(dirname "${BASH_SOURCE[0]}")/run_intuitor.sh" math_intuitor_archercoder "$@"
