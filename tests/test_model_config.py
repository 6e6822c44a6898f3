"""Model config: per-kind expert and architecture configs (tagged unions), errors naming the
dotted key, the shipped YAMLs' meaning, and MemoNet's pinned fields."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import yaml

from dtn_torchrec.data.schema import ALICCP_FIELDS, ALICCP_LABELS, FieldSpec, SchemaSpec
from dtn_torchrec.dataclass_config import ConfigError, config_to_dict
from dtn_torchrec.models.builder import build_model
from dtn_torchrec.models.config import ModelConfig, model_config_from_dict
from dtn_torchrec.models.experts import EXPERTS, ExpertConfig, MemoNetConfig, memonet_pair_hash
from dtn_torchrec.models.multitask import (
    ARCHITECTURES,
    ArchitectureConfig,
    DTNConfig,
    gates,
    towers,
)
from dtn_torchrec.models.multitask import config as multitask_config
from dtn_torchrec.models.stats import aliccp_reference_schema, count_parameters

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.yaml"))

# Each kind's own fields, nothing shared but the base's output_dim.
EXPERT_FIELDS: Dict[str, List[str]] = {
    "mlp": ["output_dim", "hidden_dims", "dropout"],
    "gdcn": ["output_dim", "num_cross_layers", "structure", "hidden_dims", "bias_init", "dropout"],
    "masknet": [
        "output_dim",
        "mode",
        "num_mask_blocks",
        "mask_block_dim",
        "mask_hidden_dim",
        "mlp_dims",
        "emb_layernorm",
        "dropout",
    ],
    "memonet": [
        "output_dim",
        "fields",
        "num_buckets",
        "num_hash",
        "codeword_dim",
        "shrink",
        "dedup_ids",
    ],
    "dcn": ["output_dim", "num_cross_layers", "low_rank"],
}
ARCHITECTURE_FIELDS: Dict[str, List[str]] = {
    "dtn": ["variant", "methods", "modules_per_method", "tsn", "gate_activation"],
    "mmoe": ["num_experts", "expert", "gate_activation", "combine"],
    "ple": ["num_levels", "task_experts", "shared_experts", "expert", "gate_activation"],
    "shared_bottom": ["expert"],
}
# `dtn-model-stats --config configs/*.yaml --json` before the per-kind configs (Ali-CCP
# reference table sizes): (embedding, dense) parameters. The YAMLs must keep their meaning.
# The MMoE/PLE demo experts grew from 64 to 256 wide (input 23 fields x 16 = 368): an expert
# 368 -> 256 -> 64 has 110,912 parameters (27,776 before), 64 -> 256 -> 64 has 33,088 (8,320);
# MMoE went from 4 to 8 experts, which adds 4 logits to each task's gate (2 x 4 x (368 + 1)).
# PLE's expert outputs then grew from 64 to 128: 368 -> 256 -> 128 has 127,360 parameters,
# 128 -> 256 -> 128 65,920, and the upper level's 2 task gates (3 logits) and the 2 towers'
# first layers read 128 inputs instead of 64.
PARAMETERS_BEFORE: Dict[str, tuple] = {
    "dtn_aliccp": (192030144, 41131924),
    "dtn_demo": (43447536, 2584180),
    "mmoe_aliccp": (43207536, 1371122),
    "mmoe_demo": (43207536, 127338 + 8 * 110912 - 4 * 27776 + 2 * 4 * 369),
    "ple_aliccp": (43207536, 2427102),
    "ple_demo": (
        43207536,
        198211 + 5 * (127360 - 27776) + 5 * (65920 - 8320) + 2 * 3 * 64 + 2 * 64 * 64,
    ),
    "shared_bottom_aliccp": (43207536, 403426),
    "shared_bottom_demo": (43207536, 68770),
}
# The reference's crossed fields in its hashing order (docs/model.md, MemoNet).
REFERENCE_MEMONET_FIELDS = [
    "101",
    "121",
    "122",
    "124",
    "125",
    "126",
    "127",
    "128",
    "129",
    "205",
    "206",
    "207",
    "216",
    "508",
    "509",
    "702",
    "301",
]


def model_section(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["model"]


def fields_of(cls: type) -> List[str]:
    return [f.name for f in dataclasses.fields(cls)]


def test_every_kind_has_only_its_own_fields() -> None:
    assert EXPERTS.names() == ["dcn", "gdcn", "masknet", "memonet", "mlp"]
    for kind, fields in EXPERT_FIELDS.items():
        cls = EXPERTS.get(kind, "kind")
        assert cls.kind == kind and fields_of(cls) == fields, kind
    assert fields_of(ExpertConfig) == ["output_dim"]
    assert sorted(ARCHITECTURES.names()) == sorted(ARCHITECTURE_FIELDS)
    for name, fields in ARCHITECTURE_FIELDS.items():
        cls = ARCHITECTURES.get(name, "name")
        assert cls.name == name and fields_of(cls) == fields, name
    assert fields_of(ArchitectureConfig) == []
    assert fields_of(ModelConfig) == ["architecture", "tasks", "embedding", "tower", "loss"]


def test_config_choices_match_what_the_modules_build() -> None:
    # The configs check names without importing the modules that map them to functions.
    assert set(multitask_config.GATE_ACTIVATIONS) == set(gates.GATE_ACTIVATIONS)
    assert set(multitask_config.TOWER_ACTIVATIONS) == set(towers.TOWER_ACTIVATIONS)


def test_model_config_from_dict_builds_nested_dataclasses() -> None:
    cfg = model_config_from_dict(
        {
            "name": "dtn",
            "tasks": ["ctr", "atc", "cvr"],
            "embedding": {"embedding_dim": 8, "pooling": "mean"},
            "dtn": {
                "variant": "paper",
                "methods": [
                    {"kind": "masknet", "output_dim": 32, "mlp_dims": [32]},
                    {"kind": "gdcn", "structure": "stacked"},
                ],
                "modules_per_method": 2,
                "tsn": {"atc": ["ctr"], "cvr": ["atc"]},
            },
            "loss": {"pos_weights": {"ctr": 200, "cvr": "3e3"}},
        }
    )
    arch = cfg.architecture
    assert cfg.name == "dtn" and isinstance(arch, DTNConfig) and arch.variant == "paper"
    assert [m.kind for m in arch.methods] == ["masknet", "gdcn"]
    assert arch.methods[0].output_dim == 32 and arch.methods[1].structure == "stacked"
    assert arch.tsn == {"atc": ["ctr"], "cvr": ["atc"]} and cfg.embedding.embedding_dim == 8
    assert cfg.loss.pos_weights == {"ctr": 200.0, "cvr": 3000.0}


def test_missing_section_takes_the_architectures_defaults() -> None:
    cfg = model_config_from_dict({"name": "mmoe"})
    assert cfg.name == "mmoe" and cfg.architecture == ARCHITECTURES.get("mmoe", "name")()
    assert model_config_from_dict({}).architecture == DTNConfig()


@pytest.mark.parametrize(
    "data,message",
    [
        ({"nmae": "dtn"}, r"^nmae: unknown key; did you mean 'name'\?"),
        ({"name": "fm"}, r"^name: 'fm' is not one of \['dtn', 'mmoe', 'ple', 'shared_bottom'\]$"),
        # a key of another expert kind
        (
            {"dtn": {"methods": [{"kind": "masknet"}, {"kind": "gdcn", "num_buckets": 9}]}},
            r"^dtn\.methods\[1\]\.num_buckets: not a field of the gdcn expert \(fields: kind, "
            r"output_dim, num_cross_layers, structure, hidden_dims, bias_init, dropout\)$",
        ),
        (
            {"name": "mmoe", "mmoe": {"expert": {"kind": "mlp", "num_cross_layers": 2}}},
            r"^mmoe\.expert\.num_cross_layers: not a field of the mlp expert",
        ),
        (
            {"dtn": {"methods": [{"kind": "xgboost"}]}},
            r"^dtn\.methods\[0\]\.kind: 'xgboost' is not",
        ),
        ({"dtn": {"methods": [{"output_dim": 8}]}}, r"^dtn\.methods\[0\]\.kind: required key"),
        # a key of another architecture, and a section of another architecture
        ({"dtn": {"num_experts": 4}}, r"^dtn\.num_experts: not a field of the dtn architecture"),
        (
            {"name": "mmoe", "dtn": {"variant": "paper"}},
            r"^dtn: settings of the 'dtn' architecture, but name is 'mmoe'; they would be "
            r"ignored: remove dtn \(override dtn=null\) or set name=dtn",
        ),
        ({"mmoe": {"num_experts": 4}}, r"^mmoe: settings of the 'mmoe' .* but name is 'dtn'"),
        # values, with the full dotted key
        (
            {"name": "mmoe", "mmoe": {"num_experts": "8"}},
            r"^mmoe\.num_experts: expected an integer",
        ),
        ({"name": "mmoe", "mmoe": {"num_experts": 0}}, r"^mmoe\.num_experts: must be >= 1, got 0"),
        ({"dtn": {"variant": "figure"}}, r"^dtn\.variant: must be one of \['reference', 'paper'\]"),
        (
            {"dtn": {"methods": [{"kind": "masknet", "output_dim": 8}]}},
            r"^dtn\.methods\[0\]\.mlp_dims: must end with output_dim=8",
        ),
        ({"dtn": {"methods": []}}, r"^dtn\.methods: must list at least one"),
        ({"tasks": "click"}, r"^tasks: expected a list"),
        ({"tower": {"hidden_dims": [64, "x"]}}, r"^tower\.hidden_dims\[1\]: expected an integer"),
        ({"tower": {"hidden_dims": [0]}}, r"^tower\.hidden_dims: must be a list of positive"),
        ({"loss": {"pos_weights": {"click": "many"}}}, r"^loss\.pos_weights\.click: expected a"),
        ({"loss": {"pos_weights": {"buy": 2.0}}}, r"unknown task"),
        ({"loss": {"relation": "esmm"}}, r"^loss\.product_of: relation 'esmm' needs it"),
        ({"dtn": None}, r"^dtn: expected a mapping"),
        (
            {"name": "ple", "ple": {"expert": {"kind": "memonet"}}},
            r"^ple\.expert: a memonet expert hashes raw field pairs",
        ),
        (
            {"embedding": {"pooling": "max"}},
            r"^embedding\.pooling: must be one of \['sum', 'mean'\]",
        ),
        ({"embedding": {"init_std": 0}}, r"^embedding\.init_std: must be > 0, got 0"),
    ],
)
def test_bad_model_config_names_the_dotted_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        model_config_from_dict(data)


def test_default_config_is_the_reference_dtn_and_round_trips() -> None:
    cfg = ModelConfig()
    assert cfg.name == "dtn" and cfg.architecture.variant == "reference"
    assert [m.kind for m in cfg.expert_configs()] == ["masknet", "memonet", "gdcn"]
    echo = config_to_dict(cfg)
    assert echo["name"] == "dtn" and [m["kind"] for m in echo["dtn"]["methods"]] == [
        "masknet",
        "memonet",
        "gdcn",
    ]
    assert model_config_from_dict(echo) == cfg


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.stem for p in CONFIG_FILES])
def test_shipped_config_keeps_its_parameter_count(path: Path) -> None:
    cfg = model_config_from_dict(model_section(path))
    assert cfg.name == path.stem.rsplit("_", 1)[0]
    assert model_config_from_dict(config_to_dict(cfg)) == cfg
    model = build_model(cfg, aliccp_reference_schema(), device=torch.device("meta"))
    assert count_parameters(model) == PARAMETERS_BEFORE[path.stem]


# ---------------------------------------------------------------------------------------------
# MemoNet's crossed fields


def schema_with_multi_valued(names: List[str]) -> SchemaSpec:
    return SchemaSpec(
        fields=[
            FieldSpec(name=f, num_embeddings=10, max_length=5 if f in names else 1)
            for f in ALICCP_FIELDS
        ],
        labels=list(ALICCP_LABELS),
    )


@pytest.mark.parametrize("stem", ["dtn_aliccp", "dtn_demo"])
def test_dtn_configs_pin_the_reference_memonet_fields(stem: str) -> None:
    cfg = model_config_from_dict(model_section(CONFIG_DIR / f"{stem}.yaml"))
    (memonet,) = [m for m in cfg.expert_configs() if isinstance(m, MemoNetConfig)]
    assert memonet.fields == REFERENCE_MEMONET_FIELDS
    # pinned: a dataset whose other fields change length does not change the crossed fields
    schema = schema_with_multi_valued(["109_14", "210", "853"])
    assert memonet_pair_hash(cfg.expert_configs(), schema).fields == REFERENCE_MEMONET_FIELDS


def test_pinned_multi_valued_field_is_an_error() -> None:
    cfg = model_config_from_dict(model_section(CONFIG_DIR / "dtn_demo.yaml"))
    with pytest.raises(
        ValueError,
        match=r"MemoNet fields: '206' is multi-valued in the dataset "
        r"\(schema\.json: longest list 5\)",
    ):
        build_model(cfg, schema_with_multi_valued(["206"]), device=torch.device("meta"))


def test_pinned_field_order_is_kept_and_unknown_field_is_an_error() -> None:
    schema = schema_with_multi_valued([])
    pinned = MemoNetConfig(fields=["301", "101", "206"])
    assert memonet_pair_hash([pinned], schema).fields == ["301", "101", "206"]
    with pytest.raises(ValueError, match=r"not in schema"):
        memonet_pair_hash([MemoNetConfig(fields=["101", "999"])], schema)
    with pytest.raises(ConfigError, match=r"^dtn\.methods\[0\]\.fields: duplicate names"):
        model_config_from_dict({"dtn": {"methods": [{"kind": "memonet", "fields": ["1", "1"]}]}})
