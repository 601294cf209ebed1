"""Self-certainty and entropy taken by the rollout engine at sampling time
(`rollout.score_at_sampling`): the formula against the float64 oracle, the processor's batch-row
bookkeeping on hand-made batch updates, and the engine's per-token values against transformers'
logits of the same sampled tokens."""
import pytest
import torch
from safetensors.torch import load_file

from megatron_intuitor.rollout import sampling_scores
from megatron_intuitor.rollout.engine import RolloutEngine, SamplingConfig
from megatron_intuitor.rollout.weight_sync import sync_weights
from scoring_reference import reference_token_scores

SCORE_ATOL = 1e-4  # fp32 engine vs float64 over transformers' fp32 logits


def _naive(logits: torch.Tensor, temperature: float, vocab_size: int):
    """The float64 oracle's self-certainty and entropy over the first vocab_size columns."""
    scores = reference_token_scores(logits, temperature=temperature, vocab_size=vocab_size)
    return scores.self_certainty, scores.entropy


def test_token_scores_equal_the_naive_formula_over_the_real_vocabulary():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(0)) * 4
    logits[:, 32:] = 1e4  # padded columns: must not count
    temperature = [0.7, 1.0, 1.3, 0.7, 2.0]
    certainty, entropy = sampling_scores.token_scores(logits, temperature, vocab_size=32)
    for row in range(5):
        want_certainty, want_entropy = _naive(logits[row], float(temperature[row]), 32)
        assert abs(float(certainty[row]) - float(want_certainty)) < 1e-5
        assert abs(float(entropy[row]) - float(want_entropy)) < 1e-5



def test_token_scores_stay_exact_for_logits_far_from_zero():
    """Logits near 1e4 (a shift of every column, which changes neither score): each row is taken
    relative to its max, so fp32 keeps 1e-5 (the unshifted form, logsumexp(z) - sum(softmax(z)
    * z), loses ~1e-3 of entropy to cancellation here)."""
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(3)) * 4 + 1e4
    temperature = [0.7, 0.7, 0.7, 1.0, 1.0, 1.0]
    certainty, entropy = sampling_scores.token_scores(logits, temperature, vocab_size=1000)
    for row in range(6):
        want_certainty, want_entropy = _naive(logits[row], temperature[row], 1000)
        assert abs(float(certainty[row]) - float(want_certainty)) < 1e-5
        assert abs(float(entropy[row]) - float(want_entropy)) < 1e-5

class _Params:
    def __init__(self, call, prompt, seed, temperature=1.0):
        self.extra_args = {sampling_scores.SCORES_KEY: (call, prompt)}
        self.seed, self.temperature = seed, temperature


class _Config:
    class model_config:
        @staticmethod
        def get_vocab_size():
            return 8


def test_processor_files_each_request_under_its_position_through_adds_moves_and_removals():
    """Three requests; after a swap and a removal each row's values still go to its request,
    under the index of the token being sampled (its output length)."""
    from vllm.v1.sample.logits_processor import BatchUpdate
    from vllm.v1.sample.logits_processor.interface import MoveDirectionality

    call = sampling_scores.new_call()
    processor = sampling_scores.processor_class()(_Config, torch.device("cpu"), False)
    outputs = {name: [] for name in "abc"}
    processor.update_state(BatchUpdate(3, removed=[], moved=[], added=[
        (0, _Params(call, 0, 10), [1], outputs["a"]),
        (1, _Params(call, 0, 11), [1], outputs["b"]),
        (2, _Params(call, 1, 20, temperature=0.5), [2], outputs["c"])]))
    gen = torch.Generator().manual_seed(1)
    step0 = torch.randn(3, 8, generator=gen)
    processor.apply(step0)
    for name in "abc":
        outputs[name].append(5)
    processor.update_state(BatchUpdate(3, removed=[], added=[],
                                       moved=[(0, 2, MoveDirectionality.SWAP)]))
    step1 = torch.randn(3, 8, generator=gen)  # rows now: c, b, a
    processor.apply(step1)
    outputs["a"].append(6)
    processor.update_state(BatchUpdate(2, removed=[0], added=[], moved=[
        (2, 0, MoveDirectionality.UNIDIRECTIONAL)]))  # c done; a moves to row 0
    step2 = torch.randn(2, 8, generator=gen)  # rows: a, b
    processor.apply(step2)
    table = sampling_scores.take_call(call)

    def expected(logits, temperature=1.0):
        return tuple(float(v) for v in _naive(logits, temperature, 8))

    def flat(values):  # {position: (certainty, entropy)} -> {(position, 0 | 1): value}
        return {(position, k): pair[k] for position, pair in values.items() for k in (0, 1)}

    assert flat(table[(0, 10)]) == pytest.approx(
        flat({0: expected(step0[0]), 1: expected(step1[2]), 2: expected(step2[0])}), abs=1e-5)
    # b's token of step 1 is not in its outputs yet: step 2 resamples position 1 (the later
    # pass at a position wins, as for a preempted and recomputed request)
    assert flat(table[(0, 11)]) == pytest.approx(
        flat({0: expected(step0[1]), 1: expected(step2[1])}), abs=1e-5)
    assert flat(table[(1, 20)]) == pytest.approx(
        flat({0: expected(step0[2], 0.5), 1: expected(step1[0], 0.5)}), abs=1e-5)
    assert call not in sampling_scores._TABLE


@pytest.fixture(scope="module")
def engine(tiny_qwen2):
    torch.set_num_threads(1)
    engine = RolloutEngine(tiny_qwen2, dtype=torch.float32, max_model_len=256, seed=0,
                           score_at_sampling=True)
    sync_weights(engine, load_file(tiny_qwen2 / "model.safetensors").items())
    yield engine
    engine.shutdown()


def test_engine_scores_equal_transformers_on_the_sampled_tokens(engine, tiny_qwen2):
    """n=3 sampled responses of 2 prompts (one ending at a stop token): every token's engine
    self-certainty and entropy equal float64 scores of transformers' logits at T=0.8; greedy
    responses carry none."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32).eval()
    vocab_size = reference.config.vocab_size
    prompts = [[5, 17, 230, 41], [9, 300, 12]]
    samples = engine.generate(prompts, SamplingConfig(n=3, temperature=0.8, max_tokens=10,
                                                      seed=7, stop_token_ids=(11, 12, 13)))
    assert len(samples) == 6 and len({tuple(s.response_token_ids) for s in samples}) > 1
    for sample in samples:
        tokens = sample.prompt_token_ids + sample.response_token_ids
        with torch.no_grad():
            logits = reference(torch.tensor([tokens])).logits[0, len(sample.prompt_token_ids)
                                                              - 1:-1]
        want_certainty, want_entropy = _naive(logits, 0.8, vocab_size)
        assert len(sample.self_certainty) == len(sample.response_token_ids)
        assert torch.allclose(torch.tensor(sample.self_certainty, dtype=torch.float64),
                              want_certainty, atol=SCORE_ATOL, rtol=0)
        assert torch.allclose(torch.tensor(sample.entropy, dtype=torch.float64), want_entropy,
                              atol=SCORE_ATOL, rtol=0)
    greedy = engine.generate(prompts, SamplingConfig(temperature=0.0, max_tokens=4))
    assert all(s.self_certainty is None and s.entropy is None for s in greedy)
    assert not sampling_scores._TABLE  # every call's values taken back


def test_engine_scores_need_a_seed(engine):
    with pytest.raises(ValueError, match="need a seed"):
        engine.generate([[5, 6]], SamplingConfig(n=2, temperature=1.0, max_tokens=2))


def test_engine_options_add_the_processor_and_the_synchronous_scheduler():
    """Scores at sampling need the processor and positions that match the logits: vLLM's
    asynchronous scheduler (placeholder tokens ahead of the logits) is turned off."""
    from megatron_intuitor.rollout.engine import engine_options

    common = dict(gpu=True, dtype=torch.bfloat16, max_model_len=64, tensor_parallel_size=1,
                  gpu_memory_utilization=0.5, seed=0, cpu_kv_cache_gib=1.0, enforce_eager=None,
                  engine_kwargs=None)
    plain = engine_options(**common)
    scored = engine_options(**common, score_at_sampling=True)
    assert "logits_processors" not in plain and "async_scheduling" not in plain
    [processor] = scored["logits_processors"]
    assert processor.__name__ == "SamplingScores" and scored["async_scheduling"] is False
    assert {k: v for k, v in scored.items() if k not in ("logits_processors",
                                                         "async_scheduling")} == plain
