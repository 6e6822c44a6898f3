"""Dense precision (models/multitask/precision.py): how ``auto`` resolves, and a bf16 model step
against the fp32 one (fp32 logits, fp32 master weights and gradients, close outputs)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from dtn_torchrec.data.schema import ALICCP_FIELDS, ALICCP_LABELS, FieldSpec, SchemaSpec
from dtn_torchrec.dataclass_config import ConfigError
from dtn_torchrec.models.builder import build_train_model
from dtn_torchrec.models.config import model_config_from_dict
from dtn_torchrec.models.experts.memonet import MemoNetExpert
from dtn_torchrec.models.multitask import precision as precision_module
from dtn_torchrec.models.multitask.precision import configure_dense_arch, resolve_precision
from dtn_torchrec.models.stats import random_features
from dtn_torchrec.train.config import load_run_config

REPO = Path(__file__).resolve().parent.parent


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n")
    assert {"avx512_bf16", "amx_tile"} <= precision_module._cpu_flags(cpuinfo)
    assert precision_module._cpu_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_is_bf16_exactly_where_the_cpu_has_bf16_gemm(
    monkeypatch: pytest.MonkeyPatch, has_bf16: bool
) -> None:
    flags = {"avx512f", "avx512_bf16"} if has_bf16 else {"avx512f"}
    monkeypatch.setattr(precision_module, "_cpu_flags", lambda: flags)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if has_bf16 else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", cpu)


def test_train_precision_key(tmp_path: Path) -> None:
    config = REPO / "configs" / "mmoe_demo.yaml"
    assert load_run_config(config).train.precision == "auto"
    assert load_run_config(config, ["train.precision=bf16"]).train.precision == "bf16"
    with pytest.raises(ConfigError, match="train.precision"):
        load_run_config(config, ["train.precision=fp16"])


@pytest.mark.parametrize("name", ["mmoe", "dtn"])
def test_bf16_step_keeps_fp32_weights_grads_and_logits_close_to_fp32(name: str) -> None:
    schema = SchemaSpec(
        fields=[FieldSpec(name=f, num_embeddings=50, max_length=1) for f in ALICCP_FIELDS[:6]],
        labels=list(ALICCP_LABELS),
    )
    section = {"name": name, "tasks": ["click", "conversion"], "embedding": {"embedding_dim": 8}}
    torch.manual_seed(0)
    fp32 = build_train_model(model_config_from_dict(section), schema, device=torch.device("cpu"))
    bf16 = copy.deepcopy(fp32)
    assert configure_dense_arch(bf16.model, "bf16", False, torch.device("cpu")) == "bf16"
    features = random_features(schema, 64)
    with torch.no_grad():
        want = fp32.model(features)
        got = bf16.model(features)
        inputs = bf16.model.sparse_arch(features)
    assert got.dtype == torch.float32 and inputs.flat.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: logits agree to about 1e-2 relative.
    torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)
    # Evaluation (and so the reported metrics) runs the dense arch in fp32: equal to fp32.
    fp32.eval(), bf16.eval()
    with torch.no_grad():
        assert torch.equal(bf16.model(features), fp32.model(features))
    bf16.train()
    bf16.model(features).sum().backward()
    for param_name, param in bf16.named_parameters():
        assert param.dtype == torch.float32, param_name
        if param.grad is not None:
            assert param.grad.dtype == torch.float32, param_name


def test_bf16_model_traces_like_the_train_pipeline() -> None:
    """TrainPipelineSparseDist fx-traces the model to find its sharded modules; autocast must
    not read traced values (the device type is fixed when the precision is set)."""
    import torchrec.fx

    schema = SchemaSpec(
        fields=[FieldSpec(name=f, num_embeddings=50, max_length=1) for f in ALICCP_FIELDS[:6]],
        labels=list(ALICCP_LABELS),
    )
    section = {"name": "mmoe", "tasks": ["click", "conversion"], "embedding": {"embedding_dim": 8}}
    model = build_train_model(model_config_from_dict(section), schema, device=torch.device("cpu"))
    configure_dense_arch(model.model, "bf16", False, torch.device("cpu"))
    graph = torchrec.fx.symbolic_trace(model)
    assert any(node.op == "call_module" for node in graph.graph.nodes)


def test_cuda_training_looks_memonet_ids_up_without_dedup() -> None:
    """The distinct-id lookup needs the id count on the host: off on CUDA, kept on CPU."""
    schema = SchemaSpec(
        fields=[FieldSpec(name=f, num_embeddings=50, max_length=1) for f in ALICCP_FIELDS[:6]],
        labels=list(ALICCP_LABELS),
    )
    section = {"name": "dtn", "tasks": ["click", "conversion"], "embedding": {"embedding_dim": 8}}
    cfg = model_config_from_dict(section)
    for device, dedup_kept in ((torch.device("cpu"), True), (torch.device("cuda"), False)):
        model = build_train_model(cfg, schema, device=torch.device("meta"))
        configure_dense_arch(model.model, "fp32", False, device)
        experts = [m for m in model.modules() if isinstance(m, MemoNetExpert)]
        assert experts and all((m.dedup is not None) == dedup_kept for m in experts), device
