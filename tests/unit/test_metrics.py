"""MetricsLogger backends (JSONL content, log file, W&B offline run dir, console line) and the
PNG of the curves."""
import json

import numpy as np
import pytest
import torch

from megatron_intuitor import metrics as M


def _steps():
    return [
        {M.SELF_CERTAINTY_MEAN: torch.tensor(1.5), M.PG_LOSS: np.float32(0.25),
         M.GRAD_NORM: float("nan"), M.timing("rollout"): 2, M.LR: 3e-6},
        {M.SELF_CERTAINTY_MEAN: 1.75, M.PG_LOSS: -0.5, M.GRAD_NORM: 0.5,
         M.val_accuracy("gsm8k"): 0.125},
    ]


def test_jsonl_log_file_and_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir, log_dir = tmp_path / "run", tmp_path / "logs"
    with M.MetricsLogger(run_dir, "exp1", config={"lr": 3e-6}, log_dir=log_dir) as logger:
        for step, values in enumerate(_steps(), start=1):
            logger.log(step, values)
        log_path = logger.log_path
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == [
        {"step": 1, "intuitor/self_certainty/mean": 1.5, "actor/pg_loss": 0.25,
         "actor/grad_norm": None, "timing/rollout": 2.0, "actor/lr": 3e-6},
        {"step": 2, "intuitor/self_certainty/mean": 1.75, "actor/pg_loss": -0.5,
         "actor/grad_norm": 0.5, "val/gsm8k/acc": 0.125}]

    assert log_path.parent == log_dir and log_path.name.startswith("exp1_")
    assert log_path.suffix == ".log"
    text = log_path.read_text()
    assert "step 2 intuitor/self_certainty/mean=1.75" in text and "val/gsm8k/acc=0.125" in text
    assert "actor/grad_norm=nan" in text

    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = (run_dir / "wandb_run_id").read_text()
    assert runs[0].name.endswith(run_id) and (runs[0] / f"run-{run_id}.wandb").stat().st_size > 0


def test_log_file_closed_and_backends_optional(tmp_path):
    logger = M.MetricsLogger(tmp_path / "run", "exp2", backends=("jsonl",),
                             log_dir=tmp_path / "logs")
    logger.log(1, {M.PG_LOSS: 1.0})
    logger.close()
    import logging

    logging.getLogger("megatron_intuitor.trainer").info("after close")
    assert "after close" not in logger.log_path.read_text()
    assert not (tmp_path / "run" / "wandb").exists()
    with pytest.raises(ValueError, match=r"unknown logger backends \['tensorboard'\]"):
        M.MetricsLogger(tmp_path / "run", "x", backends=("tensorboard",), log_dir=tmp_path)


def test_non_number_metric_is_named(tmp_path):
    with M.MetricsLogger(tmp_path, "exp3", backends=("jsonl",), log_dir=tmp_path) as logger:
        with pytest.raises(TypeError, match="metric 'actor/lr' is not a number"):
            logger.log(1, {M.LR: "fast"})


def test_console_line():
    line = M.MetricsLogger.console_line(
        4, {M.SELF_CERTAINTY_MEAN: 1.23456, M.THROUGHPUT: 9500.0, M.LR: 1e-6,
            M.timing("rollout"): 1.5, M.timing("update"): 0.5, M.val_accuracy("math500"): 0.25})
    assert line == ("[bold cyan]step 4[/] [dim]self_cert[/] 1.235  [dim]tok/s[/] 9500  "
                    "[dim]math500/acc[/] 0.25  [dim]s[/] 2")


def test_step_line_shows_progress_step_time_and_eta():
    values = {M.PG_LOSS: 0.5, M.timing("rollout"): 2.0, M.timing("update"): 1.0,
              M.timing("step"): 3.5, "val/gsm8k/acc": 0.25}
    line = M.MetricsLogger.console_line(3, values, total_steps=20, eta_seconds=125)
    assert line == ("[bold cyan]step 3/20[/] [dim]pg_loss[/] 0.5  [dim]gsm8k/acc[/] 0.25  "
                    "[dim]s[/] 3.5  [dim]eta[/] 2m05s")
    assert [M.format_duration(s) for s in (42, 185, 3725)] == ["42s", "3m05s", "1h02m"]


def test_plot_curves_png(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    with M.MetricsLogger(tmp_path, "exp4", backends=("jsonl",), log_dir=tmp_path) as logger:
        for step in range(1, 6):
            logger.log(step, {M.SELF_CERTAINTY_MEAN: 1 + 0.1 * step, M.ENTROPY: 2 - 0.1 * step,
                              M.val_accuracy("gsm8k"): 0.1 * step})
        logger.log(5, {M.SELF_CERTAINTY_MEAN: 9.0})  # a resumed run repeats step 5
    series = M.read_metrics(jsonl)
    assert series[M.SELF_CERTAINTY_MEAN][-1] == (5, 9.0) and len(series[M.ENTROPY]) == 5
    png = M.plot_curves(jsonl, tmp_path / "plots" / "curves.png")
    from matplotlib.image import imread

    image = imread(png)
    # three panels (self-certainty, entropy, val acc) side by side at 4.5 x 3.2 inches, 100 dpi
    assert image.shape[:2] == (320, 1350)
    assert image[..., :3].std() > 0.05  # not a blank canvas
    with pytest.raises(ValueError, match="none of the metrics to plot has a value"):
        M.plot_curves(jsonl, tmp_path / "x.png", keys=["actor/kl_loss"])


def test_plot_runs_overlays_runs_and_alerts_are_recorded(tmp_path):
    paths = {}
    for label, slope in (("healthy", 0.1), ("collapsing", 1.0)):
        run_dir = tmp_path / label
        with M.MetricsLogger(run_dir, label, backends=("jsonl",), log_dir=tmp_path) as logger:
            for step in range(1, 4):
                logger.log(step, {M.ENTROPY: 6 - slope * step})
            if label == "collapsing":
                logger.alert(3, "alarm", "entropy fell")
        paths[label] = run_dir / "metrics.jsonl"
    png = M.plot_runs(paths, tmp_path / "cmp.png", keys=[M.ENTROPY, M.SELF_CERTAINTY_MEAN])
    from matplotlib.image import imread

    assert imread(png).shape[:2] == (320, 450)  # one panel: the metric no run has is skipped
    assert json.loads((tmp_path / "collapsing" / "alerts.jsonl").read_text()) == {
        "step": 3, "title": "alarm", "text": "entropy fell"}
    assert not (tmp_path / "healthy" / "alerts.jsonl").exists()


def test_curves_without_the_jsonl_backend(tmp_path):
    """The run ends with curves.png whatever the backends: without the JSONL, from the steps
    the logger logged (non-finite values left out)."""
    with M.MetricsLogger(tmp_path / "run", "exp5", backends=("console",),
                         log_dir=tmp_path) as logger:
        for step, values in enumerate(_steps(), start=1):
            logger.log(step, values)
        png = logger.plot_curves(tmp_path / "curves.png")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    from matplotlib.image import imread

    # self-certainty, pg_loss, grad_norm (step 2 only) and val acc: 3 columns x 2 rows
    assert imread(png).shape[:2] == (640, 1350)


def test_wandb_goes_online_after_wandb_login(tmp_path):
    """`wandb login` writes a netrc entry, not WANDB_API_KEY: either key makes the run online;
    WANDB_MODE wins over both."""
    from megatron_intuitor.metrics import wandb_mode

    home = {"HOME": str(tmp_path)}
    assert wandb_mode(home) == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n"
                                     "  password k" + "0" * 39 + "\n")
    assert wandb_mode(home) == "online"
    assert wandb_mode({**home, "WANDB_MODE": "offline"}) == "offline"
    assert wandb_mode({**home, "WANDB_BASE_URL": "https://wandb.example.com"}) == "offline"
    assert wandb_mode({"HOME": str(tmp_path / "nobody"), "WANDB_API_KEY": "k"}) == "online"
