"""The uninterrupted 3-step tiny run, made once per session: several checks read it
(test_trainer.py), since each tiny run costs ~30 s of the suite."""
from pathlib import Path

import pytest

from tiny_runs import UNINTERRUPTED_EXTRA, finish, launch, overrides


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> tuple[Path, str]:
    """The run's directory and its console output."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    output = finish(launch(overrides(run_dir, 3) + UNINTERRUPTED_EXTRA))
    return run_dir, output
