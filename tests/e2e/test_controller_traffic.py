"""bench/controller_traffic.py at small shapes (8 prompts x 8 responses, 16 prompt tokens, 512
or 2048 response tokens): the new step sends no per-token tensor to the controller and its bytes
do not grow with the response length, while the previous flow's did (the bench's own
measurement, kept runnable)."""
import importlib.util
import sys

import pytest
from repo_paths import REPO

BENCH = REPO / "bench" / "controller_traffic.py"


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("controller_traffic", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look themselves up
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "PROMPTS", 8)
    monkeypatch.setattr(module, "PROMPT_TOKENS", 16)
    return module


def test_no_per_token_tensor_reaches_the_controller(bench):
    short, long = bench.new_path(8, 512), bench.new_path(8, 2048)
    before_short, before_long = bench.before_path(8, 512), bench.before_path(8, 2048)
    assert short["per_token_tensors_to_controller"] == 0
    assert before_short["per_token_tensors_to_controller"] > 0
    for key in ("bytes_to_controller", "bytes_from_controller"):
        # independent of the response length: 1,536 more tokens a row would add >= 98 kB (64
        # rows); what may differ is a few bytes of pickle memo (an object shared or not,
        # depending on what ran earlier in the process: seen 2-4 bytes in the suite)
        assert abs(long[key] - short[key]) <= 16, (key, short[key], long[key])
        assert before_long[key] > before_short[key] > short[key]
