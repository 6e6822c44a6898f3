"""Model selection (dtn_torchrec.train.selection), its config and the summary it feeds."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import pytest

from dtn_torchrec.dataclass_config import ConfigError
from dtn_torchrec.train.config import SelectConfig, run_config_from_dict
from dtn_torchrec.train.selection import Selection, last_evaluation, select, selection_score
from dtn_torchrec.train.summary import build_summary


def _metrics(click: Optional[float], conversion: Optional[float], loss: float = 0.5) -> Dict:
    return {
        "click": {"auc": click, "logloss": loss},
        "conversion": {"auc": conversion, "logloss": 2 * loss},
    }


def _history(valid: List[Dict], test: Optional[List[Dict]] = None, every: int = 10) -> List[Dict]:
    """Evaluations at steps every, 2 * every, ...; epoch = step // 20."""
    history: List[Dict[str, Any]] = []
    for i, metrics in enumerate(valid):
        step = every * (i + 1)
        history.append({"step": step, "epoch": step // 20, "split": "valid", "metrics": metrics})
        if test is not None:
            history.append({"step": step, "epoch": step // 20, "split": "test", "metrics": test[i]})
    return history


def test_score_is_the_task_metric_or_its_mean_over_tasks() -> None:
    metrics = _metrics(0.7, 0.8, loss=0.4)
    assert selection_score(metrics, SelectConfig()) == pytest.approx(0.75)
    assert selection_score(metrics, SelectConfig(task="conversion")) == 0.8
    assert selection_score(metrics, SelectConfig(metric="logloss", mode="min")) == pytest.approx(
        0.6
    )
    # an undefined AUC (a split without positives) makes the mean undefined
    assert selection_score(_metrics(0.7, None), SelectConfig()) is None
    assert selection_score(_metrics(0.7, None), SelectConfig(task="click")) == 0.7


def test_select_takes_the_best_valid_evaluation_and_counts_the_stale_ones() -> None:
    # mean valid AUC 0.60, 0.75, 0.70, 0.75 (a tie: the earlier one stays), 0.72
    history = _history(
        [
            _metrics(0.6, 0.6),
            _metrics(0.7, 0.8),
            _metrics(0.7, 0.7),
            _metrics(0.8, 0.7),
            _metrics(0.72, 0.72),
        ],
        # test would pick the last one: it is never looked at
        test=[_metrics(0.5, 0.5)] * 4 + [_metrics(0.99, 0.99)],
    )
    assert select(history, "valid", SelectConfig()) == Selection(
        step=20, epoch=1, score=pytest.approx(0.75), stale=3
    )
    # lowest mean log-loss: all equal but the last, which is lower
    history[-2]["metrics"] = _metrics(0.5, 0.5, loss=0.1)
    assert select(history, "valid", SelectConfig(metric="logloss", mode="min")).step == 50
    assert select(history, "valid", SelectConfig(task="click")).step == 40


def test_select_orders_by_step_and_skips_undefined_scores() -> None:
    history = _history([_metrics(None, 0.9), _metrics(0.6, 0.6), _metrics(0.5, 0.5)])
    assert select(list(reversed(history)), "valid", SelectConfig()) == Selection(
        step=20, epoch=1, score=pytest.approx(0.6), stale=1
    )
    # no defined score at all: the last evaluation, with no score
    undefined = _history([_metrics(None, 0.9), _metrics(0.6, None)])
    assert select(undefined, "valid", SelectConfig()) == Selection(
        step=20, epoch=1, score=None, stale=0
    )
    with pytest.raises(ValueError, match="no evaluation of split 'valid'"):
        select(_history([]), "valid", SelectConfig())


def test_should_stop_after_patience_evaluations_without_improvement() -> None:
    selection = Selection(step=20, epoch=1, score=0.7, stale=2)
    assert selection.should_stop(2) and selection.should_stop(1)
    assert not selection.should_stop(3)
    assert not selection.should_stop(None)


def test_last_evaluation_is_the_newest_of_any_split() -> None:
    history = [
        {"step": 30, "epoch": 1, "split": "test", "metrics": {}},
        {"step": 10, "epoch": 0, "split": "test", "metrics": {}},
    ]
    assert last_evaluation(history) == Selection(step=30, epoch=1, score=None, stale=0)


def _summary(selection: Selection, history: List[Dict], valid_split: Optional[str]) -> Dict:
    return build_summary(
        selection=selection,
        select=SelectConfig(),
        valid_split=valid_split,
        stopped_early=True,
        train_samples=100,
        train_seconds=2.0,
        world_size=1,
        steps=50,
        epochs=2,
        resumed_from_step=0,
        tasks=["click", "conversion"],
        history=history,
        config={},
    )


def test_summary_reports_every_split_at_the_selected_step() -> None:
    valid = [_metrics(0.6, 0.6), _metrics(0.8, 0.8), _metrics(0.7, 0.7)]
    test = [_metrics(0.61, 0.62), _metrics(0.81, 0.82), _metrics(0.9, 0.9)]
    history = _history(valid, test)
    summary = _summary(select(history, "valid", SelectConfig()), history, "valid")
    assert summary["test"] == test[1] and summary["valid"] == valid[1]
    assert summary["selected"] == {
        "step": 20,
        "epoch": 1,
        "valid": valid[1],
        "score": pytest.approx(0.8),
        "rule": "max mean valid auc",
        "stopped_early": True,
    }
    assert summary["steps"] == 50 and summary["history"] == history
    assert summary["throughput"]["samples_per_s"] == 50.0


def test_summary_without_valid_split_reports_the_last_evaluation() -> None:
    history = [
        {"step": s, "epoch": 0, "split": "test", "metrics": _metrics(a, a)}
        for s, a in ((10, 0.9), (20, 0.6))
    ]
    summary = _summary(last_evaluation(history), history, None)
    assert summary["test"] == _metrics(0.6, 0.6) and "valid" not in summary
    assert summary["selected"]["step"] == 20 and summary["selected"]["valid"] is None
    assert summary["selected"]["rule"] == "last evaluation (no valid split)"


def _config(select: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "data": {"path": "unused"},
        "model": {"name": "mmoe", "tasks": ["click", "conversion"]},
        "train": {"select": select},
    }


def test_select_config_is_checked_with_the_dotted_key() -> None:
    cfg = run_config_from_dict(_config({"task": "conversion", "patience": 2}))
    assert cfg.train.select == SelectConfig(task="conversion", patience=2)
    for section, message in (
        ({"task": "purchase"}, "train.select.task: 'purchase' is neither 'mean' nor one of"),
        ({"metric": "cvr_auc"}, "train.select.metric: must be one of"),
        ({"mode": "largest"}, "train.select.mode"),
        ({"patience": 0}, "train.select.patience: must be > 0"),
        ({"metrc": "auc"}, "train.select.metrc"),
    ):
        with pytest.raises(ConfigError, match=message):
            run_config_from_dict(_config(section))
