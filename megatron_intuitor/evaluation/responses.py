"""Responses for evaluation: one vLLM engine on a Hugging Face model directory, its greedy
responses and groups of N sampled ones, as the checkpoint evaluator (`evaluate.py`), the
best-of-N tool (`tools/best_of_n.py`) and the experiment harness (`bench/real_experiment.py`)
draw them. The stop tokens are the trainer's (`rollout.engine.stop_token_ids`).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from megatron_intuitor.rollout.engine import (RolloutEngine, RolloutSample, SamplingConfig,
                                              stop_token_ids)


class EvalResponses:
    """A vLLM engine for evaluation, with the response settings every call shares."""

    def __init__(self, model_dir: str | Path, tokenizer, *, dtype: torch.dtype,
                 max_prompt_length: int, max_response_length: int, seed: int,
                 score_at_sampling: bool = False) -> None:
        self.max_tokens = max_response_length
        self.stop_ids = stop_token_ids(tokenizer)
        self.engine = RolloutEngine(str(model_dir), dtype=dtype,
                                    max_model_len=max_prompt_length + max_response_length,
                                    seed=seed, engine_kwargs={"load_format": "auto"},
                                    score_at_sampling=score_at_sampling)

    def greedy(self, prompt_ids: Sequence[Sequence[int]]) -> list[RolloutSample]:
        """One greedy response per prompt."""
        return self.engine.generate(prompt_ids, SamplingConfig(
            n=1, temperature=0.0, max_tokens=self.max_tokens, stop_token_ids=self.stop_ids))

    def sampled_groups(self, prompt_ids: Sequence[Sequence[int]], n: int, temperature: float,
                       top_p: float, seed: Optional[int]) -> list[list[RolloutSample]]:
        """`n` sampled responses per prompt, one list per prompt in prompt order."""
        samples = self.engine.generate(prompt_ids, SamplingConfig(
            n=n, temperature=temperature, top_p=top_p, max_tokens=self.max_tokens,
            stop_token_ids=self.stop_ids, seed=seed))
        return [samples[i * n:(i + 1) * n] for i in range(len(prompt_ids))]

    def shutdown(self) -> None:
        self.engine.shutdown()
