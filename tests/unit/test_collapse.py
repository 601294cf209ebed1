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
    share, mean = collapse.repetition([collapse.distinct_ngram_ratio(r, 2) for r in responses],
                                      0.5)
    assert share == pytest.approx(2 / 3)
    assert mean == pytest.approx((0.4 + 1.0 + 0.25) / 3)


def test_truncated_and_short_shares():
    assert collapse.share_truncated(torch.tensor([False, True, True, False])) == 0.5
    assert collapse.share_short([0, 1, 2, 5], short_tokens=2) == 0.5
    assert collapse.share_short([0, 1, 2, 5], short_tokens=0) == 0.0


def test_group_spread_is_mean_within_group_std():
    # group 0: 1, 3 -> std sqrt(2); group 1: 2, 2, 2 -> 0; mean sqrt(2) / 2
    rewards = torch.tensor([1.0, 2.0, 3.0, 2.0, 2.0])
    spread = collapse.group_spread(rewards, [0, 1, 0, 1, 1])
    assert spread == pytest.approx(math.sqrt(2) / 2)
    with pytest.raises(ValueError, match="single response"):
        collapse.group_spread(torch.tensor([1.0, 2.0]), [0, 1])


def _step(monitor, entropy, kl=None):
    return monitor.step_signals([1.0, 0.5, 1.0, 0.25], [False, True, False, False],
                                torch.tensor([3, 1, 4, 0]), torch.tensor([1.0, 2.0, 3.0, 5.0]),
                                [0, 0, 1, 1], entropy, kl)


def test_entropy_drop_relative_to_first_steps_and_kl_jump():
    monitor = collapse.CollapseMonitor(collapse.CollapseConfig(entropy_baseline_steps=2,
                                                               kl_window=2))
    first = _step(monitor, entropy=4.0, kl=0.005)
    assert "entropy_drop" not in first and "kl_jump" not in first
    # ratios 1, 0.5, 1, 0.25 (threshold 0.5: one below), one of four cut, two shorter than 2
    assert (first["repetitive_share"], first["distinct_ngram"]) == (0.25, 0.6875)
    assert (first["truncated_share"], first["short_share"]) == (0.25, 0.5)
    assert first["sc_group_spread"] == pytest.approx((math.sqrt(0.5) + math.sqrt(2)) / 2)
    second = _step(monitor, entropy=2.0, kl=0.01)
    assert "entropy_drop" not in second and "kl_jump" not in second  # window not full yet
    third = _step(monitor, entropy=1.5, kl=0.02)
    assert third["entropy_drop"] == pytest.approx(1 - 1.5 / 3.0)  # baseline (4 + 2) / 2
    assert third["kl_jump"] == pytest.approx(0.02 / 0.0075)  # previous window (0.005, 0.01)
    fourth = _step(monitor, entropy=3.0, kl=0.15)
    assert fourth["entropy_drop"] == pytest.approx(0.0)
    assert fourth["kl_jump"] == pytest.approx(0.15 / 0.015)  # window (0.01, 0.02)


def test_kl_jump_waits_for_a_window_without_zero_kl():
    monitor = collapse.CollapseMonitor(collapse.CollapseConfig(kl_window=2))
    _step(monitor, 1.0, kl=0.0)  # the first step: policy = reference
    _step(monitor, 1.0, kl=0.01)
    assert "kl_jump" not in _step(monitor, 1.0, kl=0.3)  # window (0, 0.01) holds a zero
    assert _step(monitor, 1.0, kl=0.6)["kl_jump"] == pytest.approx(0.6 / 0.155)


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


@pytest.mark.parametrize("key", collapse.UNIT_INTERVAL_THRESHOLDS)
@pytest.mark.parametrize("value", [1.5, -0.1])
def test_share_threshold_outside_zero_one_is_refused(key, value):
    """A share (or accuracy drop) threshold outside [0, 1] would never alarm: refused by name;
    the ends themselves are accepted."""
    with pytest.raises(ValueError, match=rf"{key}={value}: expected null \(off\) or a number in "
                                         rf"\[0, 1\]"):
        collapse.CollapseConfig.from_mapping({key: value})
    for edge in (0.0, 1.0):
        assert getattr(collapse.CollapseConfig.from_mapping({key: edge}), key) == edge


def test_monitor_state_round_trip():
    config = collapse.CollapseConfig(entropy_baseline_steps=1, kl_window=1)
    monitor = collapse.CollapseMonitor(config)
    _step(monitor, 2.0, kl=0.1)
    monitor.validation_signals({"a": (0.5, 6.0)})
    restored = collapse.CollapseMonitor(config)
    restored.load_state_dict(monitor.state_dict())
    assert _step(restored, 1.0, kl=0.4) == _step(monitor, 1.0, kl=0.4)
    assert restored.validation_signals({"a": (0.3, 7.0)}) == {"val_acc_drop": pytest.approx(0.2)}


# ---------------------------------------------------------------- the trainer's guard decisions


class _FakeActor:
    def __init__(self):
        self.loaded, self.saved = [], []

    def load_checkpoint(self, path):
        self.loaded.append(path)
        return {}

    def save_checkpoint(self, root, step, extra, keep_last, keep_steps=()):
        self.saved.append((step, keep_last, keep_steps, extra["best"]))


class _FakeLogger:
    def __init__(self):
        self.alerts = []

    def alert(self, step, title, text):
        self.alerts.append((step, title, text))


class _FakeLoader:
    def state_dict(self):
        return {}


def _trainer(tmp_path, *overrides):
    from types import SimpleNamespace

    from megatron_intuitor.config import load
    from megatron_intuitor.trainer import Trainer

    cfg = load([f"trainer.output_dir={tmp_path}", "trainer.guard.max_entropy_drop=0.2",
                "trainer.best_metric=val/x/acc", *overrides])
    tokenizer = SimpleNamespace(eos_token_id=1, pad_token_id=0)
    return Trainer(cfg, None, _FakeActor(), _FakeLoader(), [], _FakeLogger(), tokenizer)


DROP = {collapse.signal_name("entropy_drop"): 0.5}


def test_rollback_then_continue_until_max_rollbacks(tmp_path):
    trainer = _trainer(tmp_path, "trainer.guard.action=rollback", "trainer.guard.max_rollbacks=1")
    assert trainer._is_new_best(2, {"val/x/acc": 0.25}) and trainer.best == {"step": 2,
                                                                           "value": 0.25}
    assert not trainer._is_new_best(4, {"val/x/acc": 0.25})  # not better: the first stays
    assert not trainer._is_new_best(5, {"actor/entropy": 1.0})  # no validation this step
    trainer.save(4)
    assert trainer.actor.saved == [(4, 2, (2,), {"step": 2, "value": 0.25})]
    assert trainer._guard(5, DROP) is False  # rolled back, continues
    assert trainer.actor.loaded == [str(tmp_path / "checkpoints" / "step_2")]
    assert trainer.logger.alerts[0] == (5, "INTUITOR collapse alarm",
                                        "collapse alarm at step 5: intuitor/collapse/entropy_drop"
                                        " = 0.5 > threshold 0.2")
    assert "rolled back to" in trainer.logger.alerts[1][2]
    assert trainer._guard(6, {collapse.signal_name("entropy_drop"): 0.1}) is False  # no alarm
    assert trainer._guard(7, DROP) is True  # max_rollbacks reached: stops
    assert "cannot roll back (1 rollback(s) already" in trainer.logger.alerts[-1][2]
    assert len(trainer.actor.loaded) == 1


def test_rollback_without_a_best_checkpoint_stops_and_warn_never_acts(tmp_path):
    trainer = _trainer(tmp_path, "trainer.guard.action=rollback")
    assert trainer._guard(3, DROP) is True
    assert "cannot roll back (no best checkpoint yet)" in trainer.logger.alerts[-1][2]
    warn = _trainer(tmp_path, "trainer.guard.action=warn")
    assert warn._guard(3, DROP) is False and len(warn.logger.alerts) == 1
    assert warn.actor.loaded == []
