"""Overlay the curves of several runs in one PNG (one panel per metric, one line per run).

    python tools/plot_runs.py --run healthy=runs/a --run collapsing=runs/b --out cmp.png \\
        --keys intuitor/self_certainty/mean actor/entropy intuitor/collapse/entropy_drop

A run is LABEL=DIR (reading DIR/metrics.jsonl) or LABEL=FILE.jsonl. Without --keys: the main
curves and every val/* of the first run.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from megatron_intuitor.metrics import plot_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=PATH")
    parser.add_argument("--out", required=True)
    parser.add_argument("--keys", nargs="+", default=None)
    args = parser.parse_args()
    runs = {}
    for entry in args.run:
        label, sep, path = entry.partition("=")
        if not sep or not label:
            parser.error(f"--run {entry!r}: expected LABEL=PATH")
        path = Path(path)
        path = path / "metrics.jsonl" if path.is_dir() else path
        if not path.is_file():
            parser.error(f"--run {entry!r}: {path} does not exist")
        runs[label] = path
    print(plot_runs(runs, args.out, args.keys))


if __name__ == "__main__":
    main()
