"""The TorchX component: the torchrun command it builds and its environment."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _components():
    spec = importlib.util.spec_from_file_location("components", REPO / "launchers/components.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_component_runs_dtn_train_under_torchrun() -> None:
    app = _components().train("--config", "c.yaml", "train.epochs=2", j="2x4")
    (role,) = app.roles
    assert role.num_replicas == 2 and role.entrypoint == "bash" and role.args[0] == "-c"
    command = role.args[1]
    assert command.startswith("torchrun --rdzv_backend c10d ")
    assert "--nnodes 2 --nproc_per_node 4" in command
    assert command.endswith("-m dtn_torchrec.cli.train --config c.yaml train.epochs=2")
    assert "--max_restarts" not in command
    assert role.env["OMP_NUM_THREADS"] == "1"
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in role.env


def test_max_restarts_reaches_torchrun_with_a_store_per_round() -> None:
    app = _components().train("--config", "c.yaml", max_restarts=3, env={"OMP_NUM_THREADS": "4"})
    (role,) = app.roles
    assert role.args[1].startswith("torchrun --max_restarts 3 --rdzv_backend c10d ")
    assert role.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert role.env["OMP_NUM_THREADS"] == "4"
    with pytest.raises(ValueError, match="max_restarts must be >= 0"):
        _components().train(max_restarts=-1)


def test_demo_report_puts_model_auc_next_to_oracle() -> None:
    spec = importlib.util.spec_from_file_location("demo_report", REPO / "launchers/demo_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary = {
        "test": {"click": {"auc": 0.61234}, "conversion": {"auc": 0.7, "cvr_auc": 0.55}},
        "throughput": {"samples_per_s": 1234.4},
        "world_size": 2,
        "steps": 58,
    }
    truth = {
        "oracle_auc": {"test": {"click": 0.8, "conversion": 0.85}},
        "oracle_auc_conversion_given_click": {"test": 0.79},
    }
    lines = [line.split() for line in module.report(truth, {"dtn": summary}).splitlines()]
    assert lines[0] == ["test", "AUC", "oracle", "dtn"]
    assert lines[1] == ["click", "0.8000", "0.6123"]
    assert lines[2] == ["conversion", "0.8500", "0.7000"]
    assert lines[3] == ["conversion", "|", "click", "0.7900", "0.5500"]
    # The gap to the oracle: 0.8 - 0.61234, 0.85 - 0.7, 0.79 - 0.55.
    assert lines[6:9] == [
        ["click", "0.1877"],
        ["conversion", "0.1500"],
        ["conversion", "|", "click", "0.2400"],
    ]
    assert ["samples/s", "(2", "ranks)", "1,234"] in lines
    assert ["reported", "step", "58"] in lines


def test_gpu_nodes_are_sized_from_their_gpus() -> None:
    components = _components()
    app = components.train("--config", "c.yaml", j="8x8", gpu=8)
    (role,) = app.roles
    assert role.num_replicas == 8
    assert role.resource.gpu == 8
    assert role.resource.cpu == 8 * components.CPUS_PER_GPU == 64
    assert role.resource.memMB == 8 * components.MEM_MB_PER_GPU == 8 * 64 * 1024
    assert "--nnodes 8 --nproc_per_node 8" in role.args[1]
    assert role.env["DTN_DEVICE"] == "cuda"


def test_given_resources_win_and_cpu_jobs_are_sized_per_rank() -> None:
    components = _components()
    (role,) = components.train(j="8x8", gpu=8, cpu=96, memMB=1_000_000).roles
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (96, 8, 1_000_000)
    (role,) = components.train(j="2x4").roles
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (8, 0, 4 * 4096)
    assert "DTN_DEVICE" not in role.env


def test_fewer_gpus_than_ranks_are_refused() -> None:
    with pytest.raises(ValueError, match="starts 8 ranks per node but --gpu 1"):
        _components().train(j="2x8", gpu=1)
