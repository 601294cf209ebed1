"""Training metrics: the names the trainer logs, a logger that writes every step to the console,
a JSONL file, a log file and W&B, and `plot_curves` for a PNG of the main curves at the end."""
from __future__ import annotations

import json
import logging
import math
import netrc
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence
from urllib.parse import urlparse

# Metric names (verl's where verl has one, so dashboards carry over).
SELF_CERTAINTY_MEAN = "intuitor/self_certainty/mean"  # the INTUITOR reward, per response
SELF_CERTAINTY_STD = "intuitor/self_certainty/std"
ENTROPY = "actor/entropy"  # token-mean policy entropy over response tokens
ADVANTAGES_MEAN = "critic/advantages/mean"
THROUGHPUT = "perf/throughput"  # tokens (prompt + response) per second of step time
PG_LOSS = "actor/pg_loss"
KL_LOSS = "actor/kl_loss"
GRAD_NORM = "actor/grad_norm"
LR = "actor/lr"
PG_CLIPFRAC = "actor/pg_clipfrac"
PG_CLIPFRAC_LOWER = "actor/pg_clipfrac_lower"  # dual-clip bound active
PPO_KL = "actor/ppo_kl"  # approx KL(old || new) over the update
SKIPPED_STEPS = "actor/skipped_steps"  # optimizer steps skipped for a non-finite loss/grad norm
RESPONSE_LENGTH_MEAN = "response_length/mean"
# prompts whose advantages algorithm.entropy_band zeroed this step (answer entropy outside it)
FILTERED_PROMPTS = "intuitor/filtered_prompts"
# the model whose self-certainty was the step's reward: scorer.SCORER_IDS (0 online, 1 ema,
# 2 frozen), and with the EMA scorer the policy's weight in the update that followed the step
REWARD_SCORER = "reward/scorer"
SCORER_EMA_POLICY_WEIGHT = "reward/scorer_ema_policy_weight"
ROLLOUT_LOGPROB_DIFF = "rollout/logprob_diff"  # |rollout engine - Megatron| log-prob, token mean
# the off-policy correction (algorithm.behaviour_correction), token means over the update
BEHAVIOUR_KL = "off_policy/behaviour_kl"  # k3 KL(behaviour (engine) || proximal (training))
CORRECTION_TRUNCATED = "off_policy/truncated_share"  # behaviour ratio bounded by rollout.tis_cap
CORRECTION_DROPPED = "off_policy/dropped_share"  # weight 0: outside rollout.correction_band
# separate rollout ranks (rollout/pipeline.py)
STALENESS = "off_policy/staleness"  # policy version - the version that generated the batch
BEHAVIOUR_VERSION = "off_policy/behaviour_version"  # the weights that generated the batch
SCORER_VERSION = "off_policy/scorer_version"  # the weights that scored it: always the current
IDLE_TRAINING = "idle_s/training"  # the training ranks waiting for the step's responses
IDLE_ROLLOUT = "idle_s/rollout"  # the rollout ranks between two generations (syncs included)
GENERATION_SECONDS = "timing/generation"  # the batch's generation on the rollout ranks
GENERATION_TOKENS = "rollout/generated_tokens"  # prompt + response tokens of the batch
# wall-clock (epoch seconds) phase bounds, separate placement: the overlap and its timeline
GENERATION_START, GENERATION_END = "timeline/generation_start", "timeline/generation_end"
UPDATE_START, UPDATE_END = "timeline/update_start", "timeline/update_end"


def timing(phase: str) -> str:
    """Seconds spent in a step phase (rollout, old_log_prob, ref, update, weight_sync, ...)."""
    return f"timing/{phase}"


def val_accuracy(dataset: str) -> str:
    return f"val/{dataset}/acc"


# mixture-of-experts models, over the update pass (models/moe_stats.py)
MOE_AUX_LOSS = "moe/load_balancing_loss"  # Megatron's aux loss / its coefficient, layer mean


def moe_tokens_per_expert_max(layer: int) -> str:
    """Tokens routed to the busiest expert of `layer` (1-based) in the update pass."""
    return f"moe/tokens_per_expert_max/layer_{layer}"


def moe_tokens_per_expert_mean(layer: int) -> str:
    """Tokens per expert of `layer` (1-based) in the update pass, mean over its experts."""
    return f"moe/tokens_per_expert_mean/layer_{layer}"


MAIN_CURVES = (SELF_CERTAINTY_MEAN, ENTROPY, RESPONSE_LENGTH_MEAN, PG_LOSS, KL_LOSS, GRAD_NORM,
               PG_CLIPFRAC, THROUGHPUT)
# Console columns: (metric, short label); every metric goes to the JSONL, log file and W&B.
CONSOLE_COLUMNS = ((SELF_CERTAINTY_MEAN, "self_cert"), (ENTROPY, "entropy"),
                   (RESPONSE_LENGTH_MEAN, "resp_len"), (PG_LOSS, "pg_loss"), (KL_LOSS, "kl"),
                   (GRAD_NORM, "grad_norm"), (PG_CLIPFRAC, "clipfrac"), (THROUGHPUT, "tok/s"))
BACKENDS = ("console", "jsonl", "wandb")

_PACKAGE_LOGGER = "megatron_intuitor"
log = logging.getLogger(__name__)


def _number(name: str, value: Any) -> float:
    """A metric value (Python or numpy number, one-element tensor) as a float."""
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {name!r} is not a number: {value!r:.80}") from None


def _json_value(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None  # JSON has no NaN / inf


def wandb_mode(environ: Mapping[str, str]) -> str:
    """WANDB_MODE when set; else online when W&B has a key: WANDB_API_KEY, or the netrc entry
    `wandb login` writes for the W&B host (WANDB_BASE_URL, default api.wandb.ai; the file is
    NETRC or ~/.netrc); else offline."""
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"]
    if environ.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = Path(environ.get("NETRC") or Path(environ.get("HOME") or Path.home()) / ".netrc")
    try:
        logged_in = netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    return "online" if logged_in else "offline"


class MetricsLogger:
    """Writes each step's metrics to the chosen backends:

    - console: one compact rich line per step (the `CONSOLE_COLUMNS` present, plus val/*);
    - jsonl: `<run_dir>/metrics.jsonl`, {"step": n, name: value} per step (non-finite -> null),
      appended to, so a resumed run continues the file;
    - wandb: online with a W&B key (`WANDB_API_KEY` or `wandb login`), else offline
      (`wandb_mode`; WANDB_MODE, when set, wins; WANDB_ENTITY is read by W&B), files under
      `<run_dir>/wandb`, the run id kept in `<run_dir>/wandb_run_id` so a resumed run continues
      the same W&B run.
    Always: `<log_dir>/<experiment>_<timestamp>.log`, a python-logging file that takes every
    `megatron_intuitor.*` log record, each step's full metrics included; and `plot_curves`.
    """

    def __init__(self, run_dir: str | Path, experiment: str,
                 config: Optional[Mapping[str, Any]] = None,
                 backends: Sequence[str] = BACKENDS, wandb_project: str = "megatron-intuitor",
                 log_dir: str | Path = "logs"):
        unknown = set(backends) - set(BACKENDS)
        if unknown:
            raise ValueError(f"unknown logger backends {sorted(unknown)}; choose from {BACKENDS}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.experiment = experiment
        self.log_path = Path(log_dir) / f"{experiment}_{time.strftime('%Y%m%d_%H%M%S')}.log"
        self._file_handler = self._attach_log_file(self.log_path)
        self.jsonl_path = self.run_dir / "metrics.jsonl" if "jsonl" in backends else None
        self._logged: dict[str, dict[int, float]] = {}  # this process's steps, for plot_curves
        self._console = None
        if "console" in backends:
            from rich.console import Console

            # soft_wrap: a step's line stays one line whatever the terminal's width.
            self._console = Console(highlight=False, soft_wrap=True)
        self._total_steps: Optional[int] = None
        self._clock: Optional[tuple[int, float]] = None  # (step, time) progress counts from
        self._status = None  # the live phase line on a terminal
        self._last_step: Optional[int] = None
        self._wandb_run = self._start_wandb(config, wandb_project) if "wandb" in backends \
            else None
        log.info("experiment %s: metrics to %s, log file %s", experiment,
                 self.jsonl_path or "(no jsonl)", self.log_path)

    @staticmethod
    def _attach_log_file(path: Path) -> logging.Handler:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package = logging.getLogger(_PACKAGE_LOGGER)
        if package.level == logging.NOTSET or package.level > logging.INFO:
            package.setLevel(logging.INFO)
        package.addHandler(handler)
        return handler

    def _start_wandb(self, config: Optional[Mapping[str, Any]], project: str):
        import wandb

        mode = wandb_mode(os.environ)
        id_file = self.run_dir / "wandb_run_id"
        run = wandb.init(project=project, name=self.experiment,
                         id=id_file.read_text().strip() if id_file.exists() else None,
                         resume="allow", dir=str(self.run_dir), mode=mode,
                         config=dict(config) if config is not None else None,
                         settings=wandb.Settings(console="off", quiet=True, silent=True))
        id_file.write_text(run.id)
        return run

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._last_step = step
        values = {name: _number(name, value) for name, value in metrics.items()}
        for name, value in values.items():
            if math.isfinite(value):
                self._logged.setdefault(name, {})[step] = value
        if self.jsonl_path is not None:
            row = {"step": step, **{k: _json_value(v) for k, v in values.items()}}
            with open(self.jsonl_path, "a", encoding="utf-8") as out:
                out.write(json.dumps(row) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)
        log.info("step %d %s", step, " ".join(f"{k}={v:.6g}" for k, v in values.items()))
        if self._console is not None:
            self._console.print(self.console_line(step, values, self._total_steps,
                                                  self._eta_seconds(step)))

    def start_progress(self, first_step: int, total_steps: int) -> None:
        """Steps after `first_step` up to `total_steps` are to come: step lines show k/N and the
        estimated time left (wall time per step so far, validation and saves included)."""
        self._total_steps = total_steps
        self._clock = (first_step, time.monotonic())

    def _eta_seconds(self, step: int) -> Optional[float]:
        if self._clock is None or self._total_steps is None or step <= self._clock[0]:
            return None
        first, started = self._clock
        return (time.monotonic() - started) / (step - first) * (self._total_steps - step)

    def announce(self, message: str) -> None:
        """A line for the user (run start and end): on the console and in the log file."""
        log.info("%s", message)
        if self._console is not None:
            self._console.print(message, markup=False)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """While a phase runs, a transient status line names it (on a terminal only: a log or
        a pipe gets the step lines alone)."""
        if self._console is None or not self._console.is_terminal:
            yield
            return
        label = f"step {self._next_step()}: {name}" if self._clock else name
        if self._status is None:
            self._status = self._console.status(label)
            self._status.start()
        else:
            self._status.update(label)
        try:
            yield
        finally:
            self._status.stop()
            self._status = None

    def _next_step(self) -> str:
        done = self._last_step if self._last_step is not None else self._clock[0]
        total = f"/{self._total_steps}" if self._total_steps else ""
        return f"{done + 1}{total}"

    def alert(self, step: int, title: str, text: str) -> None:
        """An event to notice (a collapse alarm): a warning on the console and in the log file,
        one line {"step", "title", "text"} in `<run_dir>/alerts.jsonl`, a W&B alert."""
        log.warning("%s", text)
        if self._console is not None:
            self._console.print(f"[bold red]{title}[/] {text}")
        with open(self.run_dir / "alerts.jsonl", "a", encoding="utf-8") as out:
            out.write(json.dumps({"step": step, "title": title, "text": text}) + "\n")
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.alert(title=title, text=text, level=wandb.AlertLevel.WARN)

    @staticmethod
    def console_line(step: int, values: Mapping[str, float], total_steps: Optional[int] = None,
                     eta_seconds: Optional[float] = None) -> str:
        columns = [(label, values[name]) for name, label in CONSOLE_COLUMNS if name in values]
        columns += [(name[len("val/"):], v) for name, v in values.items()
                    if name.startswith("val/")]
        step_time = values.get(timing("step"))
        if step_time is None:
            step_time = sum(v for name, v in values.items() if name.startswith("timing/"))
        if step_time:
            columns.append(("s", step_time))
        of_total = f"/{total_steps}" if total_steps else ""
        eta = f"  [dim]eta[/] {format_duration(eta_seconds)}" if eta_seconds is not None else ""
        return f"[bold cyan]step {step}{of_total}[/] " + "  ".join(
            f"[dim]{label}[/] {value:.4g}" for label, value in columns) + eta

    def plot_curves(self, png_path: str | Path, keys: Optional[Iterable[str]] = None) -> Path:
        """The curves of `keys` (default: the main ones) as a PNG: from the JSONL (a resumed
        run's earlier steps included), or without the jsonl backend from the steps this logger
        logged."""
        if self.jsonl_path is not None:
            return plot_curves(self.jsonl_path, png_path, keys)
        return _plot_series({"": {name: sorted(points.items())
                                  for name, points in self._logged.items()}},
                            png_path, keys, f"experiment {self.experiment}")

    def close(self) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        logging.getLogger(_PACKAGE_LOGGER).removeHandler(self._file_handler)
        self._file_handler.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def read_metrics(jsonl_path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} from a metrics JSONL; a step logged again (a resumed run
    repeating steps after its checkpoint) keeps its last value."""
    by_step: dict[str, dict[int, float]] = {}
    with open(jsonl_path, encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                row = json.loads(line)
                step = row.pop("step")
                for name, value in row.items():
                    if value is not None:
                        by_step.setdefault(name, {})[step] = value
    return {name: sorted(points.items()) for name, points in by_step.items()}


def plot_curves(jsonl_path: str | Path, png_path: str | Path,
                keys: Optional[Iterable[str]] = None) -> Path:
    """Draw one panel per metric (default: `MAIN_CURVES` and every val/*/acc) against the step
    into a PNG; metrics absent from the file are skipped, none present is an error."""
    return _plot_series({"": read_metrics(jsonl_path)}, png_path, keys, str(jsonl_path))


def plot_runs(runs: Mapping[str, str | Path], png_path: str | Path,
              keys: Optional[Iterable[str]] = None) -> Path:
    """`plot_curves` with several runs overlaid, one line per `{label: metrics.jsonl}` and a
    legend; the default keys are those of the first run."""
    return _plot_series({label: read_metrics(path) for label, path in runs.items()}, png_path,
                        keys, ", ".join(map(str, runs.values())))


def _plot_series(runs: Mapping[str, Mapping[str, list[tuple[int, float]]]],
                 png_path: str | Path, keys: Optional[Iterable[str]], source: str) -> Path:
    """One panel per key, one line per run ({label: {metric: [(step, value)]}}; a legend when
    the labels are not empty)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    first = next(iter(runs.values()))
    if keys is None:
        keys = list(MAIN_CURVES) + sorted(k for k in first if k.startswith("val/"))
    keys = [k for k in keys if any(k in series for series in runs.values())]
    if not keys:
        raise ValueError(f"{source}: none of the metrics to plot has a value")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    figure = Figure(figsize=(4.5 * cols, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    for index, key in enumerate(keys):
        axes = figure.add_subplot(rows, cols, index + 1)
        for label, series in runs.items():
            if key in series:
                steps, values = zip(*series[key])
                axes.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3,
                          label=label or None)
        axes.set_title(key, fontsize=10)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if index == 0 and any(runs):
            axes.legend(fontsize=8)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, dpi=100)
    return png_path
