"""Known-harmless library warnings are silenced where they arise; --verbose shows them; others
still show."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.distributed as dist
from toy_model import ToyModel, ToyTrain

from dtn_torchrec.distributed.config import ShardingConfig, SparseOptimizerConfig
from dtn_torchrec.distributed.launch import init_distributed
from dtn_torchrec.distributed.library_warnings import (
    HARMLESS_LOG_LINES,
    SHOW_ENV,
    harmless_warnings,
    quiet_harmless_log_lines,
)


def _emit(*messages: str) -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with harmless_warnings("known harmless", reason="test"):
            for message in messages:
                warnings.warn(message, FutureWarning)
    return [str(w.message) for w in caught]


def test_only_the_named_warning_is_silenced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SHOW_ENV, raising=False)
    assert _emit("known harmless: details", "a real problem") == ["a real problem"]
    monkeypatch.setenv(SHOW_ENV, "1")  # --verbose
    assert _emit("known harmless: details") == ["known harmless: details"]


def test_harmless_log_lines_are_dropped_unless_verbose(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    name = "torchrec.distributed.train_pipeline.postproc"
    logger = logging.getLogger(name)
    filters = list(logger.filters)
    try:
        for f in filters:
            logger.removeFilter(f)
        monkeypatch.setenv(SHOW_ENV, "1")  # --verbose
        quiet_harmless_log_lines()
        logger.warning("Postproc module m.pair_hasher has no dist stream. This may cause ...")
        assert len(caplog.records) == 1
        monkeypatch.delenv(SHOW_ENV)
        quiet_harmless_log_lines()
        quiet_harmless_log_lines()  # idempotent
        logger.warning("Postproc module m.pair_hasher has no dist stream. This may cause ...")
        logger.warning("Result of postproc module m.pair_hasher is of type int.")
        assert [r.getMessage() for r in caplog.records[1:]] == [
            "Result of postproc module m.pair_hasher is of type int."
        ]
        assert all(logging.getLogger(n).filters for n in HARMLESS_LOG_LINES)
    finally:
        for f in list(logger.filters):
            logger.removeFilter(f)
        for f in filters:
            logger.addFilter(f)


def test_sharding_a_model_prints_no_library_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    from dtn_torchrec.distributed.build import build_sharded_model
    from dtn_torchrec.distributed.optimizers import apply_sparse_optimizer

    monkeypatch.delenv(SHOW_ENV, raising=False)
    init_distributed()
    try:
        model = ToyTrain(ToyModel(torch.device("meta")))
        apply_sparse_optimizer(model, SparseOptimizerConfig(name="sgd", lr=0.1))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build_sharded_model(
                model, ShardingConfig(), None, device=torch.device("cpu"), batch_size=8
            )
        assert [str(w.message) for w in caught] == []
    finally:
        dist.destroy_process_group()
