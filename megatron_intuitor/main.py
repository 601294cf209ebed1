"""The command line: `megatron-intuitor [task=<name>] [key=value ...]`, or
`python -m megatron_intuitor.main ...`. Without arguments it runs the tiny embedded default.

Hydra composes the config from `conf/` (`--cfg job` prints it and runs nothing, `--help` lists
the groups); it is resolved and validated before the trainer, Ray or any model is touched.
"""
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from megatron_intuitor.config import CONF_DIR, ConfigError, resolve, validate
from megatron_intuitor.install_check import warn_if_broken


class OutputDirCheck(Callback):
    """Hydra makes its run directory inside trainer.output_dir before `main` runs: an output
    directory that cannot be written is named here first, in a sentence (exit status 2),
    instead of Hydra's traceback. Registered in conf/config.yaml (hydra.callbacks)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from megatron_intuitor.input_files import output_dir_problem

        output_dir = Path(config.trainer.output_dir).expanduser().absolute()
        problem = output_dir_problem("trainer.output_dir", output_dir)
        if problem:
            print(f"megatron-intuitor: {problem}", file=sys.stderr)
            sys.exit(2)


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
    from megatron_intuitor import interrupt, trainer
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
    except WorkerDiedError as error:  # names the rank, its role and node, what ended it
        where = "" if error.step is None else f" at step {error.step}"
        print(f"megatron-intuitor: the run stopped{where}:\n{error}\n"
              f"{interrupt.resume_hint(cfg.trainer.output_dir)}", file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, interrupt.RunInterrupted) as error:  # Ctrl-C
        print(f"megatron-intuitor: {interrupt.message(error, cfg.trainer.output_dir)}",
              file=sys.stderr)
        sys.exit(interrupt.EXIT_STATUS)


if __name__ == "__main__":
    main()
