"""The command line: `megatron-intuitor [task=<name>] [key=value ...]`, or
`python -m megatron_intuitor.main ...`. Without arguments it runs the tiny embedded default.

Hydra composes the config from `conf/` (`--cfg job` prints it and runs nothing, `--help` lists
the groups); it is resolved and validated before the trainer, Ray or any model is touched.
"""
import sys

import hydra
from omegaconf import DictConfig

from megatron_intuitor.config import CONF_DIR, ConfigError, resolve, validate
from megatron_intuitor.install_check import warn_if_broken


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    warn_if_broken()
    try:
        cfg = resolve(cfg)
        validate(cfg)
    except ConfigError as error:
        print(f"megatron-intuitor: {error}", file=sys.stderr)
        sys.exit(2)
    # Imported only now: the trainer pulls in Ray, Megatron-Core and vLLM.
    from megatron_intuitor import trainer
    from megatron_intuitor.data.datasets import DataError
    from megatron_intuitor.workers.group import WorkerDiedError

    try:
        trainer.run(cfg)
    except (ConfigError, DataError) as error:  # the message names the file / key: no traceback
        print(f"megatron-intuitor: {error}", file=sys.stderr)
        sys.exit(2)
    except trainer.TrainingStopped as error:
        print(f"megatron-intuitor: training stopped: {error}", file=sys.stderr)
        sys.exit(1)
    except WorkerDiedError as error:  # names the rank, its node and what ended it
        print(f"megatron-intuitor: the run stopped:\n{error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
