"""Parameter and FLOP counts against formulas written from docs/model.md, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dtn_torchrec.cli.model_stats import load_model_section, main
from dtn_torchrec.data.schema import ALICCP_FIELDS, FieldSpec, SchemaSpec
from dtn_torchrec.models.stats import ALICCP_VOCAB_LINES, aliccp_reference_schema, model_stats

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_reference_schema_sizes() -> None:
    schema = aliccp_reference_schema()
    assert schema.field_names == ALICCP_FIELDS
    assert schema.field("101").num_embeddings == 276_023  # vocab lines + the missing/OOV row
    # MemoNet crosses the 17 single-valued fields (docs/model.md, MemoNet)
    assert sum(1 for f in schema.fields if not f.multi_valued) == 17


def test_dtn_reference_size_matches_dtn_model_md() -> None:
    """The reference sizes of docs/model.md, written out, against the built model."""
    stats = model_stats(
        load_model_section(str(CONFIGS / "dtn_aliccp.yaml")), aliccp_reference_schema()
    )
    d, h = 23 * 64, 256  # flat input 1472, module width 256
    gdcn = 2 * (2 * d * d + d) + (
        d * h + h
    )  # 2 gated cross layers (W_c + b_c, W_g no bias) + projection
    block = (
        (d * 256 + 256) + (256 * d + d) + (d * 128 + 128) + 2 * 128
    )  # mask MLP, block Linear, LayerNorm
    masknet = 2 * block + 2 * (256 * 256 + 256)  # 2 blocks + MLP [256, 256]
    memonet = 128 * 64 + (d + 136 * 64) * h + h  # hash merge (no bias) + projection
    gates = 2 * (6 + 3) * (h + 1)  # per task: 6 other+shared and 3 own scalar gates
    towers = 2 * ((h * 128 + 128) + (128 * 64 + 64) + (64 + 1))
    assert (
        stats.dense_params == 3 * (gdcn + masknet + memonet) + gates + towers + 2 * d
    )  # + input affine
    tables = sum(v + 1 for v in ALICCP_VOCAB_LINES.values()) * 64
    assert stats.embedding_params == tables + 3 * 100_000 * 64  # + 3 MemoNet codebooks
    macs = 3 * (
        (2 * 2 * d * d + d * h)  # GDCN
        + 2 * (d * 256 + 256 * d + d * 128)
        + 2 * 256 * 256  # MaskNet
        + 136 * 128 * 64
        + (d + 136 * 64) * h  # MemoNet
    ) + 2 * (2 * (6 + 3) * h + h * 128 + 128 * 64 + 64)  # per task: gates + weighted sums, tower
    assert stats.forward_flops_per_sample == 2 * macs
    assert stats.train_flops_per_sample == 3 * stats.forward_flops_per_sample


def test_shared_bottom_counts_on_a_dataset_schema() -> None:
    schema = SchemaSpec(
        fields=[
            FieldSpec(name=f"f{i}", num_embeddings=10 * (i + 1), max_length=1) for i in range(4)
        ],
        labels=["click", "conversion"],
    )
    # emb 16, bottom 128 -> 64, towers 64-32
    cfg = load_model_section(str(CONFIGS / "shared_bottom_demo.yaml"))
    stats = model_stats(cfg, schema, batch_size=3)
    flat = 4 * 16
    linears = [(flat, 128), (128, 64)] + 2 * [(64, 64), (64, 32), (32, 1)]
    assert stats.embedding_params == (10 + 20 + 30 + 40) * 16
    assert stats.dense_params == sum(i * o + o for i, o in linears) + 2 * flat
    assert stats.forward_flops_per_sample == 2 * sum(i * o for i, o in linears)


def test_cli_without_dataset(capsys: pytest.CaptureFixture) -> None:
    assert (
        main(
            ["--config", str(CONFIGS / "mmoe_demo.yaml"), str(CONFIGS / "ple_demo.yaml"), "--json"]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["model"] for r in rows] == ["mmoe", "ple"]
    for r in rows:
        assert r["total_params"] == r["embedding_params"] + r["dense_params"]
        assert r["train_flops_per_sample"] == 3 * r["forward_flops_per_sample"] > 0


def test_cli_table_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--config", str(CONFIGS / "shared_bottom_demo.yaml")]) == 0
    out = capsys.readouterr().out
    assert "Ali-CCP reference sizes" in out and "shared_bottom" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: mmoe\n  mmoe: {num_expert: 3}\n")
    assert main(["--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.yaml: model.mmoe.num_expert: not a field of the mmoe architecture" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["--config", str(CONFIGS / "dtn_demo.yaml"), "--schema", str(tmp_path)]) == 1
    assert "schema.json" in capsys.readouterr().err
