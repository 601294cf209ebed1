"""`rollout.score_at_sampling` on GPU, in a process of its own (issue 20, defects 1 and 2): the
scored engine must be the process's first (vLLM freezes its environment, and so the choice of
its model runner, when a first engine starts), and the Megatron scoring it is compared with runs
before any engine shuts down (shutdown destroys torch.distributed). Skipped without CUDA; run by
scripts/gpu_smoke.sh."""
from __future__ import annotations

import pytest
import torch
from test_gpu_suite import TEMPERATURE, _score

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_engine_scores_at_sampling_match_megatron_self_certainty(scored_engine, policy):
    """The scored engine runs vLLM's V1 model runner; after a sync, its per-token self-certainty
    and entropy of sampled responses are those of Megatron's bf16 forward (tolerance
    uncalibrated: printed)."""
    from megatron_intuitor.batch import batch_from_rollouts
    from megatron_intuitor.models.bridge import export_hf_weights
    from megatron_intuitor.rollout.engine import SamplingConfig
    from megatron_intuitor.rollout.weight_sync import sync_weights

    hf_config, chunks, _ = policy
    assert not scored_engine._llm.llm_engine.vllm_config.use_v2_model_runner
    sync_weights(scored_engine, export_hf_weights(chunks, hf_config))
    samples = scored_engine.generate([[5, 6, 7, 8, 9, 10], [11, 12, 13]],
                                     SamplingConfig(n=2, temperature=TEMPERATURE, max_tokens=24,
                                                    seed=3, ignore_eos=True))
    batch = batch_from_rollouts(samples, pad_token_id=0)
    attention = torch.arange(batch.input_ids.shape[1]) < batch.lengths[:, None]
    scores = _score(chunks, hf_config, batch.input_ids, attention, batch.response_mask,
                    packed=True, micro=4)
    mask = batch.response_mask
    for name, engine_values in (("self_certainty", batch.sampling_self_certainty),
                                ("entropy", batch.sampling_entropy)):
        diff = (scores[name] - engine_values)[mask].abs()
        scale = scores[name][mask].abs().mean()
        print(f"scores at sampling, {name}: |vLLM - Megatron| mean {diff.mean():.4f} max "
              f"{diff.max():.3f} (mean value {scale:.3f})")
        assert diff.mean() < 0.05 * scale, name
