"""Collapse signals and alarms against hand-computed cases."""
import math

import pytest
import torch

from megatron_intuitor import collapse


def test_distinct_ngram_ratio_by_hand():
    # 1 2 1 2 1 2: bigrams (1,2) (2,1) (1,2) (2,1) (1,2) -> 2 distinct of 5
    assert collapse.distinct_ngram_ratio([1, 2, 1, 2, 1, 2], 2) == pytest.approx(0.4)
    # trigrams of 5 5 5 5: (5,5,5) twice -> 1 of 2
    assert collapse.distinct_ngram_ratio([5, 5, 5, 5], 3) == pytest.approx(0.5)
    assert collapse.distinct_ngram_ratio([1, 2, 3, 4], 3) == 1.0
    assert collapse.distinct_ngram_ratio([1, 2], 3) == 1.0  # no trigram: nothing repeated
    assert collapse.distinct_ngram_ratio([], 1) == 1.0


def test_repetition_share_and_mean():
    responses = [[1, 2, 1, 2, 1, 2], [1, 2, 3, 4], [7, 7, 7, 7, 7]]
    # bigram ratios: 2/5, 3/3, 1/4 -> below 0.5: two of three; mean (0.4 + 1 + 0.25) / 3
    share, mean = collapse.repetition(responses, 2, 0.5)
    assert share == pytest.approx(2 / 3)
    assert mean == pytest.approx((0.4 + 1.0 + 0.25) / 3)


def test_truncated_and_short_shares():
    assert collapse.share_truncated(["stop", "length", "length", "stop"]) == 0.5
    assert collapse.share_short([0, 1, 2, 5], short_tokens=2) == 0.5
    assert collapse.share_short([0, 1, 2, 5], short_tokens=0) == 0.0


def test_group_spread_is_mean_within_group_std():
    # group 0: 1, 3 -> std sqrt(2); group 1: 2, 2, 2 -> 0; mean sqrt(2) / 2
    rewards = torch.tensor([1.0, 2.0, 3.0, 2.0, 2.0])
    spread = collapse.group_spread(rewards, [0, 1, 0, 1, 1])
    assert spread == pytest.approx(math.sqrt(2) / 2)
    with pytest.raises(ValueError, match="single response"):
        collapse.group_spread(torch.tensor([1.0, 2.0]), [0, 1])


def _step(monitor, entropy, kl=None, responses=([1, 2, 3],) * 4):
    return monitor.step_signals(list(responses), ["stop"] * len(responses),
                                torch.tensor([1.0, 2.0, 3.0, 5.0]), [0, 0, 1, 1], entropy, kl)


def test_entropy_drop_relative_to_first_steps_and_kl_jump():
    monitor = collapse.CollapseMonitor(collapse.CollapseConfig(entropy_baseline_steps=2,
                                                               kl_window=2))
    first = _step(monitor, entropy=4.0, kl=0.0)
    assert "entropy_drop" not in first and "kl_jump" not in first
    assert first["sc_group_spread"] == pytest.approx((math.sqrt(0.5) + math.sqrt(2)) / 2)
    second = _step(monitor, entropy=2.0, kl=0.01)
    assert "entropy_drop" not in second and "kl_jump" not in second  # window not full yet
    third = _step(monitor, entropy=1.5, kl=0.02)
    assert third["entropy_drop"] == pytest.approx(1 - 1.5 / 3.0)  # baseline (4 + 2) / 2
    assert third["kl_jump"] == pytest.approx(0.02 / 0.005)  # previous window (0, 0.01)
    fourth = _step(monitor, entropy=3.0, kl=0.15)
    assert fourth["entropy_drop"] == pytest.approx(0.0)
    assert fourth["kl_jump"] == pytest.approx(0.15 / 0.015)  # window (0.01, 0.02)


def test_kl_jump_left_out_while_previous_kl_is_zero():
    monitor = collapse.CollapseMonitor(collapse.CollapseConfig(kl_window=1))
    _step(monitor, 1.0, kl=0.0)
    assert "kl_jump" not in _step(monitor, 1.0, kl=0.3)


def test_val_acc_drop_only_while_self_certainty_rises():
    monitor = collapse.CollapseMonitor(collapse.CollapseConfig())
    assert monitor.validation_signals({"a": (0.5, 6.0)}) == {"val_acc_drop": 0.0}
    assert monitor.validation_signals({"a": (0.6, 6.5)}) == {"val_acc_drop": 0.0}  # new best
    assert monitor.validation_signals({"a": (0.4, 6.2)})["val_acc_drop"] == 0.0  # certainty fell
    # dataset b starts its own history; a drops 0.15 from its best while certainty rose
    drop = monitor.validation_signals({"a": (0.45, 7.0), "b": (0.1, 9.0)})["val_acc_drop"]
    assert drop == pytest.approx(0.15)


def test_alarms_name_signal_value_threshold_step():
    config = collapse.CollapseConfig(max_repetitive_share=0.5, min_sc_group_spread=0.1,
                                     max_kl_jump=5.0)
    monitor = collapse.CollapseMonitor(config)
    signals = {"repetitive_share": 0.75, "sc_group_spread": 0.05, "kl_jump": 5.0,
               "truncated_share": 1.0}  # no threshold on truncation; kl_jump not above 5
    alarms = monitor.alarms(7, signals)
    assert [(a.signal, a.value, a.threshold, a.step) for a in alarms] == [
        ("repetitive_share", 0.75, 0.5, 7), ("sc_group_spread", 0.05, 0.1, 7)]
    assert alarms[0].message() == ("collapse alarm at step 7: intuitor/collapse/repetitive_share"
                                   " = 0.75 > threshold 0.5")
    assert "intuitor/collapse/sc_group_spread = 0.05 < threshold 0.1" in alarms[1].message()


def test_default_config_is_off_and_warn():
    config = collapse.CollapseConfig()
    assert config.action == "warn" and not config.enabled
    monitor = collapse.CollapseMonitor(config)
    assert monitor.alarms(1, {"repetitive_share": 1.0, "sc_group_spread": 0.0}) == []


def test_bad_config_names_the_key():
    with pytest.raises(ValueError, match="action='panic'"):
        collapse.CollapseConfig(action="panic")
    with pytest.raises(ValueError, match="max_kl_jump='high'"):
        collapse.CollapseConfig.from_mapping({"max_kl_jump": "high"})
    with pytest.raises(ValueError, match="max_kl: unknown key"):
        collapse.CollapseConfig.from_mapping({"max_kl": 1.0})


def test_monitor_state_round_trip():
    config = collapse.CollapseConfig(entropy_baseline_steps=1, kl_window=1)
    monitor = collapse.CollapseMonitor(config)
    _step(monitor, 2.0, kl=0.1)
    monitor.validation_signals({"a": (0.5, 6.0)})
    restored = collapse.CollapseMonitor(config)
    restored.load_state_dict(monitor.state_dict())
    assert _step(restored, 1.0, kl=0.4) == _step(monitor, 1.0, kl=0.4)
    assert restored.validation_signals({"a": (0.3, 7.0)}) == {"val_acc_drop": pytest.approx(0.2)}
