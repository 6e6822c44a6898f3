"""dtn-train end to end on a tiny synthetic Ali-CCP set: torchrun, TorchX, exact resume,
resharding between world sizes, and restart after a killed worker.

Every test here launches real multi-process jobs (gloo, 1-2 CPU ranks), one at a time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
from dist_utils import free_port
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from dtn_torchrec.data.prepare import PrepareOptions, prepare_dataset
from dtn_torchrec.data.schema import SchemaSpec
from dtn_torchrec.data.synth import SynthConfig, generate
from dtn_torchrec.train.selection import metrics_at

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 600

# A small MMoE: every test trains a handful of steps of 64 rows per rank.
TINY_CONFIG = """\
seed: 5
data:
  path: {data}
  batch_size: 64
  eval_batch_size: 128
  shuffle_buffer_rows: 256
model:
  name: mmoe
  tasks: [click, conversion]
  embedding: {{embedding_dim: 8, pooling: mean}}
  tower: {{hidden_dims: [16]}}
  mmoe:
    num_experts: 2
    expert: {{kind: mlp, hidden_dims: [16], output_dim: 16}}
train:
  epochs: 2
  log_every_steps: 2
  dense_optimizer: {{name: adam, lr: 3.0e-3, warmup_steps: 2, decay: linear, decay_steps: 10}}
  sparse_optimizer: {{name: rowwise_adagrad, lr: 0.05}}
output:
  dir: {out}
  tensorboard: false
"""
CONTRACT_TASK_KEYS = {"auc", "logloss", "ne", "calibration"}


def _env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env.pop("TORCHELASTIC_RESTART_COUNT", None)
    env.update(extra or {})
    return env


def _run(cmd: List[str], *, env: Optional[Dict[str, str]] = None, cwd: Path = REPO) -> str:
    # Own process group, so a timeout also ends torchrun's workers (and TorchX's torchrun).
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} timed out after {JOB_TIMEOUT_S} s:\n{output[-20000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-20000:]}"
    return output


def _torchrun(nproc: int, args: List[str], env: Optional[Dict[str, str]] = None) -> str:
    return _run(
        [
            str(VENV_BIN / "torchrun"),
            "--nproc_per_node",
            str(nproc),
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            "localhost:0",
            "-m",
            "dtn_torchrec.cli.train",
            *args,
        ],
        env=env,
    )


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _model_state(out: Path, step: int, tmp: Path) -> Dict[str, torch.Tensor]:
    """The model tensors of checkpoint ``step`` (DCP, any world size) as full tensors."""
    target = tmp / f"{out.name}_step{step}.pt"
    dcp_to_torch_save(out / "checkpoints" / f"step_{step}", target)
    return torch.load(target, weights_only=False)["model"]


def _assert_same_metrics(a: dict, b: dict, split: str = "test", tol: float = 1e-6) -> None:
    assert a[split].keys() == b[split].keys()
    for task in a[split]:
        for name, value in a[split][task].items():
            other = b[split][task][name]
            if value is None:
                assert other is None, (task, name)
            else:
                assert other == pytest.approx(value, abs=tol), (task, name, value, other)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    generate(
        SynthConfig(
            train_rows=900,
            test_rows=301,
            seed=20240,
            id_scale=0.001,
            history_scale=0.05,
            rows_per_user=5,
        ),
        root / "raw",
    )
    prepare_dataset(
        "aliccp-raw", root / "raw", root / "data", PrepareOptions(valid_fraction=0.15, seed=1)
    )
    return root / "data"


@pytest.fixture(scope="module")
def tiny_config(dataset: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY_CONFIG.format(data=dataset, out="unused"))
    return path


@pytest.fixture(scope="module")
def uninterrupted(tiny_config: Path, tmp_path_factory) -> Path:
    """2 ranks, 2 epochs, checkpoints every 2 steps, without interruption (the reference)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    _torchrun(
        2, ["--config", str(tiny_config), f"output.dir={out}", "train.checkpoint_every_steps=2"]
    )
    return out


@pytest.mark.slow
def test_two_ranks_dtn_demo_config_writes_contract_summary(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "dtn"
    schema = SchemaSpec.load(dataset)
    # 301 test rows = 150 on rank 0 + 151 on rank 1: with 150-row eval batches rank 0's second
    # batch has 0 rows, and the sharded forward must still run on both ranks.
    assert schema.splits["test"].rows == 301
    log = _torchrun(
        2,
        [
            "--config",
            str(REPO / "configs/dtn_demo.yaml"),
            f"data.path={dataset}",
            f"output.dir={out}",
            "data.batch_size=64",
            "data.eval_batch_size=150",
            "train.max_steps=4",
            "train.eval_every_steps=2",
            "train.log_every_steps=1",
        ],
    )
    summary = _summary(out)
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert summary["throughput"]["samples_per_s"] > 0
    assert summary["throughput"]["train_samples"] == 4 * 2 * 64
    for split in ("test", "valid"):
        assert set(summary[split]) == {"click", "conversion"}
        for task in ("click", "conversion"):
            assert CONTRACT_TASK_KEYS <= set(summary[split][task])
            # every row of the split is scored exactly once over the two ranks
            assert summary[split][task]["rows"] == schema.splits[split].rows
        assert "cvr_auc" in summary[split]["conversion"]
    assert [h["step"] for h in summary["history"] if h["split"] == "test"] == [2, 4]
    assert summary["config"]["model"]["name"] == "dtn"
    assert (out / "plan.json").is_file() and (out / "config.yaml").is_file()
    assert "[train] epoch 0 step 4" in log
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("test/click/auc")] == [2, 4]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_resume_mid_epoch_is_exact(tiny_config: Path, uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    common = ["--config", str(tiny_config), f"output.dir={out}", "train.checkpoint_every_steps=2"]
    _torchrun(2, common + ["train.max_steps=3"])  # stops mid-epoch 0, checkpoint at step 3
    assert _summary(out)["steps"] == 3
    log = _torchrun(2, common + ["--resume"])
    assert "[resume] from checkpoint step 3" in log
    resumed, reference = _summary(out), _summary(uninterrupted)
    assert resumed["steps"] == reference["steps"] and resumed["resumed_from_step"] == 3
    # the resumed run also evaluated step 3 (and may select it): compare the final evaluations
    step = reference["steps"]
    for split in ("test", "valid"):
        _assert_same_metrics(
            metrics_at(reference["history"], step), metrics_at(resumed["history"], step), split
        )
    ref_state = _model_state(uninterrupted, step, tmp_path)
    new_state = _model_state(out, step, tmp_path)
    assert ref_state.keys() == new_state.keys()
    for name in ref_state:
        torch.testing.assert_close(new_state[name], ref_state[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_plain_loop_matches_pipeline(
    tiny_config: Path, uninterrupted: Path, tmp_path: Path
) -> None:
    # TrainPipelineSparseDist only reorders when the input all-to-all runs, not what is computed
    out = tmp_path / "plain"
    _torchrun(
        2,
        [
            "--config",
            str(tiny_config),
            f"output.dir={out}",
            "train.pipeline=plain",
            "train.checkpoint_every_steps=2",
        ],
    )
    assert _summary(out)["steps"] == _summary(uninterrupted)["steps"]
    _assert_same_metrics(_summary(uninterrupted), _summary(out))


@pytest.mark.slow
def test_checkpoint_reshards_between_two_ranks_and_one(tiny_config: Path, tmp_path: Path) -> None:
    two = tmp_path / "two"
    _torchrun(2, ["--config", str(tiny_config), f"output.dir={two}", "train.max_steps=5"])
    on_two = _summary(two)
    # one rank loads the two-rank checkpoint: nothing left to train, the evaluation matches
    _torchrun(
        1, ["--config", str(tiny_config), f"output.dir={two}", "train.max_steps=5", "--resume"]
    )
    assert _summary(two)["world_size"] == 1 and _summary(two)["resumed_from_step"] == 5
    _assert_same_metrics(on_two, _summary(two))

    one = tmp_path / "one"
    _torchrun(1, ["--config", str(tiny_config), f"output.dir={one}", "train.max_steps=4"])
    on_one = _summary(one)
    _torchrun(
        2, ["--config", str(tiny_config), f"output.dir={one}", "train.max_steps=4", "--resume"]
    )
    _assert_same_metrics(on_one, _summary(one))
    # and training continues on the new layout
    _torchrun(
        2, ["--config", str(tiny_config), f"output.dir={one}", "train.max_steps=6", "--resume"]
    )
    assert _summary(one)["steps"] == 6 and _summary(one)["world_size"] == 2


@pytest.mark.slow
def test_restart_after_killed_worker_matches_uninterrupted(
    tiny_config: Path, uninterrupted: Path, tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    # torchrun shares one store across restart rounds unless told not to (launchers/components.py)
    log = _run(
        [
            str(VENV_BIN / "torchrun"),
            "--nproc_per_node",
            "2",
            "--max-restarts",
            "1",
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            "localhost:0",
            str(REPO / "tests" / "train_fault_worker.py"),
            "--kill-at",
            "1:5",
            "--config",
            str(tiny_config),
            f"output.dir={out}",
            "train.checkpoint_every_steps=2",
        ],
        env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
    )
    summary = _summary(out)
    # rank 1 died after step 5 on the first attempt; the restart resumed from step 4
    assert summary["resumed_from_step"] == 4, log[-3000:]
    assert summary["steps"] == _summary(uninterrupted)["steps"]
    _assert_same_metrics(_summary(uninterrupted), summary)


@pytest.mark.slow
def test_torchx_two_nodes_of_one_rank(tiny_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "2x1"
    _run(
        [
            str(VENV_BIN / "torchx"),
            "run",
            "-s",
            "local_cwd",
            "-cfg",
            f"log_dir={tmp_path / 'logs'}",
            "launchers/components.py:train",
            "-j",
            "2x1",
            "--rdzv_port",
            str(free_port()),
            "--",
            "--config",
            str(tiny_config),
            f"output.dir={out}",
            "train.max_steps=3",
        ],
        cwd=REPO,
    )
    summary = _summary(out)
    assert summary["world_size"] == 2 and summary["steps"] == 3
