"""Untrusted checkpoints and run directories: dtn-predict, dtn-analyze and --resume run no code
from a checkpoint, refuse a differing model config or dataset before writing anything, fall back
from a damaged latest checkpoint to an older intact one, and name every damaged file."""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict

import pytest
import torch
import yaml
from inference_utils import make_dataset, run_config

from dtn_torchrec.analysis.analyze import analyze
from dtn_torchrec.data.schema import SchemaSpec
from dtn_torchrec.distributed.checkpoint import META_FILE, CheckpointManager
from dtn_torchrec.distributed.checkpoint_files import (
    CorruptCheckpointError,
    dumps_state,
    loads_state,
)
from dtn_torchrec.distributed.launch import DistributedContext
from dtn_torchrec.serving.scoring import predict
from dtn_torchrec.train.config import RunConfig, run_config_from_dict
from dtn_torchrec.train.run_dir import CONFIG_FILE, RunMismatchError, differing_keys
from dtn_torchrec.train.session import run_training

ATTACK_FILE = "pwned"


class _CreatesFile:
    """Unpickling it creates a file (what an attacker's payload would do, harmlessly)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (os.fspath(self.path), "w"))


def _config(raw: Dict[str, Any], *overrides: Dict[str, Any]) -> RunConfig:
    merged = copy.deepcopy(raw)
    for override in overrides:
        for dotted, value in override.items():
            node = merged
            *parents, last = dotted.split(".")
            for part in parents:
                node = node[part]
            node[last] = value
    return run_config_from_dict(merged)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_rank: DistributedContext) -> Dict[str, Any]:
    """A tiny dtn-train run (in process) with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("safety")
    data = make_dataset(root, train_rows=400, test_rows=150)
    raw = run_config(data, root / "run")
    raw["train"].update(
        max_steps=4,
        checkpoint_every_steps=2,
        keep_checkpoints=3,
        precision="fp32",
        pipeline="plain",
    )
    run_training(_config(raw), one_rank, resume=False)
    return {"root": root, "data": data, "raw": raw, "run": root / "run"}


def _copy_run(trained: Dict[str, Any], tmp_path: Path) -> Dict[str, Any]:
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    raw = copy.deepcopy(trained["raw"])
    raw["output"]["dir"] = str(run)
    # The copy is a run of its own: its config.yaml names its own output.dir.
    saved = yaml.safe_load((run / CONFIG_FILE).read_text())
    saved["output"]["dir"] = str(run)
    (run / CONFIG_FILE).write_text(yaml.safe_dump(saved, sort_keys=False))
    return {**trained, "run": run, "raw": raw, "steps": run / "checkpoints"}


def _snapshot(directory: Path) -> Dict[str, bytes]:
    return {
        os.fspath(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _rewrite_manifest(step_dir: Path) -> None:
    """What an attacker would also do: make meta.json describe the replaced files."""
    from dtn_torchrec.distributed.checkpoint_files import file_manifest

    meta = json.loads((step_dir / META_FILE).read_text())
    meta["files"] = file_manifest(step_dir, skip=META_FILE)
    (step_dir / META_FILE).write_text(json.dumps(meta))


# -- the three loaders, each given a run directory whose latest checkpoint was tampered with --


def _predict(run: Dict[str, Any], ctx: DistributedContext, tmp_path: Path) -> None:
    predict(_config(run["raw"]), run["run"], run["data"], tmp_path / "pred", ctx)


def _analyze(run: Dict[str, Any], ctx: DistributedContext, tmp_path: Path) -> None:
    analyze(_config(run["raw"]), run["run"], run["data"], tmp_path / "analysis", max_rows=50)


def _resume(run: Dict[str, Any], ctx: DistributedContext, tmp_path: Path) -> None:
    run_training(_config(run["raw"]), ctx, resume=True)


LOADERS: Dict[str, Callable[[Dict[str, Any], DistributedContext, Path], None]] = {
    "predict": _predict,
    "analyze": _analyze,
    "resume": _resume,
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("target", [".metadata", "extra_rank0.json", "__0_0.distcp"])
@pytest.mark.parametrize("manifest", ["kept", "forged"])
def test_pickle_payload_runs_no_code(
    trained, one_rank, tmp_path: Path, loader: str, target: str, manifest: str
) -> None:
    run = _copy_run(trained, tmp_path)
    # Only one checkpoint left, so no fallback hides the refusal.
    shutil.rmtree(run["steps"] / "step_2")
    step = run["steps"] / "step_4"
    attack = tmp_path / ATTACK_FILE
    (step / target).write_bytes(pickle.dumps(_CreatesFile(attack)))
    if manifest == "forged":
        _rewrite_manifest(step)
    before = _snapshot(run["run"])
    with pytest.raises(ValueError) as info:
        LOADERS[loader](run, one_rank, tmp_path)
    message = str(info.value)
    assert not attack.exists()
    assert "\n" not in message
    # The refused file is named (a forged data file: refused by DCP's weights-only load).
    assert os.fspath(step / target) in message
    assert _snapshot(run["run"]) == before
    assert not (tmp_path / "pred").exists() and not (tmp_path / "analysis").exists()


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_to_older(
    trained, one_rank, tmp_path: Path, caplog
) -> None:
    run = _copy_run(trained, tmp_path)
    distcp = run["steps"] / "step_4" / "__0_0.distcp"
    distcp.write_bytes(distcp.read_bytes()[:1000])
    manager = CheckpointManager(run["steps"])
    with caplog.at_level(logging.WARNING):
        assert manager.latest_step() == 2
    assert f"using step 2: {distcp}: 1000 bytes" in caplog.text
    raw = copy.deepcopy(run["raw"])
    raw["train"]["max_steps"] = 4
    summary = run_training(_config(raw), one_rank, resume=True)
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda s: (s / META_FILE).write_text("{not json"), f"{META_FILE}: unreadable"),
        (
            lambda s: (s / META_FILE).write_text('{"format": 1}'),
            f"{META_FILE}: checkpoint format 1, expected 2",
        ),
        (lambda s: (s / "extra_rank0.json").unlink(), "extra_rank0.json: missing checkpoint file"),
        (
            lambda s: (s / ".metadata").write_bytes(b"x" * (s / ".metadata").stat().st_size),
            ".metadata: content differs",
        ),
    ],
)
def test_every_damaged_file_is_named(trained, tmp_path: Path, damage, reason: str) -> None:
    run = _copy_run(trained, tmp_path)
    shutil.rmtree(run["steps"] / "step_2")
    step = run["steps"] / "step_4"
    damage(step)
    with pytest.raises(CorruptCheckpointError, match=f"no intact checkpoint in .*{reason}"):
        CheckpointManager(run["steps"]).latest_step()
    with pytest.raises(CorruptCheckpointError, match=f"{step}/{reason}"):
        CheckpointManager(run["steps"]).verify(4)


# -- the run's config and dataset ------------------------------------------------------------


@pytest.mark.parametrize(
    "override, keys",
    [
        ({"model.embedding.pooling": "sum"}, "model.embedding.pooling ('mean' -> 'sum')"),
        ({"model.dtn.methods": None}, "model.dtn.methods"),
    ],
)
def test_differing_model_key_is_refused_by_name(
    trained, one_rank, tmp_path: Path, override: Dict[str, Any], keys: str
) -> None:
    run = _copy_run(trained, tmp_path)
    saved = yaml.safe_load((run["run"] / CONFIG_FILE).read_text())
    changed = copy.deepcopy(saved)
    node = changed
    *parents, last = next(iter(override)).split(".")
    for part in parents:
        node = node[part]
    if override[next(iter(override))] is None:
        node[last] = node[last][:1]  # one interaction method fewer
    else:
        node[last] = override[next(iter(override))]
    cfg = run_config_from_dict(changed)
    before = _snapshot(run["run"])
    for call in (
        lambda: predict(cfg, run["run"], run["data"], tmp_path / "pred", one_rank),
        lambda: analyze(cfg, run["run"], run["data"], tmp_path / "analysis", max_rows=50),
        lambda: run_training(cfg, one_rank, resume=True),
    ):
        with pytest.raises(RunMismatchError, match="--allow-config-change") as info:
            call()
        assert keys in str(info.value)
    assert _snapshot(run["run"]) == before
    assert not (tmp_path / "pred").exists() and not (tmp_path / "analysis").exists()


@pytest.mark.slow
def test_allowed_config_change_scores(trained, one_rank, tmp_path: Path) -> None:
    run = _copy_run(trained, tmp_path)
    cfg = _config(run["raw"], {"model.embedding.pooling": "sum"})
    summary = predict(
        cfg, run["run"], run["data"], tmp_path / "pred", one_rank, allow_config_change=True
    )
    assert summary.rows == 150


@pytest.mark.slow
def test_resume_on_another_schema_fails_before_writing(trained, one_rank, tmp_path: Path) -> None:
    run = _copy_run(trained, tmp_path)
    other = make_dataset(tmp_path / "other", train_rows=300, test_rows=100, seed=7)
    sizes = {f.name: f.num_embeddings for f in SchemaSpec.load(run["data"]).fields}
    changed = [f.name for f in SchemaSpec.load(other).fields if sizes[f.name] != f.num_embeddings]
    assert changed, "the other dataset must differ in some table size"
    before = _snapshot(run["run"])
    with pytest.raises(RunMismatchError, match=f"field '{changed[0]}': {sizes[changed[0]]} -> "):
        run_training(_config(run["raw"], {"data.path": str(other)}), one_rank, resume=True)
    assert _snapshot(run["run"]) == before


# -- pieces ----------------------------------------------------------------------------------


def test_run_state_round_trips_exactly_through_json(tmp_path: Path) -> None:
    import random

    import numpy as np

    from dtn_torchrec.distributed.checkpoint import capture_rng_state

    state = {
        "rng": capture_rng_state(),
        "reader": {"epoch": 1, "batches": 3},
        "history": [{"loss": float("nan"), "auc": 0.5}],
        "empty": torch.zeros(0, 3, dtype=torch.int64),
        "tensors": [torch.tensor(3.5), torch.tensor([True, False]), torch.ones(2, 3).bfloat16()],
    }
    back = loads_state(dumps_state(state), tmp_path / "x.json")
    assert back["rng"]["python"] == random.getstate()
    np.testing.assert_array_equal(back["rng"]["numpy"][1], np.random.get_state()[1])
    assert back["rng"]["numpy"][0] == "MT19937"
    assert torch.equal(back["rng"]["torch"], torch.get_rng_state())
    assert back["reader"] == {"epoch": 1, "batches": 3}
    assert back["empty"].shape == (0, 3) and back["empty"].dtype == torch.int64
    for saved, loaded in zip(state["tensors"], back["tensors"]):
        assert loaded.dtype == saved.dtype and torch.equal(loaded, saved)
    with pytest.raises(CorruptCheckpointError, match="x.json: unreadable run state"):
        loads_state(b'{"a": {"$ndarray": "|O", "shape": [1], "bytes": ""}}', tmp_path / "x.json")


def test_differing_keys_lists_dotted_paths() -> None:
    saved = {"a": 1, "b": {"c": [1, {"d": 2}], "e": "x"}}
    current = {"a": 1, "b": {"c": [1, {"d": 3}], "f": "y"}}
    assert differing_keys(saved, current, "model") == ["model.b.c.1.d", "model.b.e", "model.b.f"]
    assert differing_keys([1, 2], [1], "m") == ["m"]


# -- the commands: one-line errors, overrides after --resume -----------------------------------


def _cli(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(
        [str(Path(sys.executable).parent / name), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_cli_resume_with_overrides_after_it_refuses_a_model_change(trained, tmp_path: Path) -> None:
    run = _copy_run(trained, tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(run["raw"], sort_keys=False))
    before = _snapshot(run["run"])
    result = _cli(
        "dtn-train",
        "--config",
        str(config),
        "--resume",
        "train.max_steps=6",
        "model.embedding.pooling=sum",
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"dtn-train: error: rank 0: the model config differs from the run's "
        f"{run['run'] / CONFIG_FILE}: model.embedding.pooling ('mean' -> 'sum'); pass "
        "--allow-config-change to use it anyway"
    )
    assert _snapshot(run["run"]) == before


@pytest.mark.slow
def test_cli_predict_runs_no_payload_and_names_the_file(trained, tmp_path: Path) -> None:
    run = _copy_run(trained, tmp_path)
    step = run["steps"] / "step_4"
    attack = tmp_path / ATTACK_FILE
    (step / ".metadata").write_bytes(pickle.dumps(_CreatesFile(attack)))
    _rewrite_manifest(step)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(run["raw"], sort_keys=False))
    result = _cli(
        "dtn-predict",
        "--config",
        str(config),
        "--checkpoint",
        str(step),
        "--input",
        str(run["data"]),
        "--output",
        str(tmp_path / "pred"),
    )
    assert result.returncode == 1 and not attack.exists()
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"dtn-predict: error: {step / '.metadata'}: unreadable checkpoint")
    assert "global io.open is not allowed" in last
    assert not (tmp_path / "pred").exists()
