#!/usr/bin/env bash
# The GPU suite in one command (issues 10, 20): tests/gpu/ on one GPU, installing and downloading
# nothing, each test file in a process of its own (the in-process checks; the scores at sampling
# with an engine of their own; the 2-step CLI run through Ray), each under a time limit that
# leaves nothing running, one compile cache for all, each part's time printed, a summary at the
# end and, last, one JSON line (scripts/gpu_parts.py). Without CUDA it exits at once (status 2).
#
#   bash scripts/gpu_smoke.sh            # logs and summary.json in $OUT, else /tmp/gpu_smoke_<time>
#
# Needs the GPU face installed (docs/gpu.md). It has never run on a GPU.
cd "$(dirname "$0")/.." || exit 1
exec "${PYTHON:-python}" scripts/gpu_parts.py smoke ${OUT:+--out "$OUT"}
