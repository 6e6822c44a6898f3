"""Run config: typed dataclass loading, dotted overrides, and errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Dict, List, Literal, Optional, Tuple

import pytest

from dtn_torchrec.dataclass_config import (
    ConfigError,
    ConfigRegistry,
    apply_overrides,
    config_to_dict,
    dataclass_from_dict,
    parse_override,
)
from dtn_torchrec.train.config import load_run_config, run_config_from_dict, run_config_to_dict


@dataclass
class Inner:
    width: int
    rate: float = 0.5
    tags: List[str] = field(default_factory=list)


@dataclass
class Outer:
    inner: Inner
    name: str = "x"
    flag: bool = False
    limit: Optional[int] = None
    mode: Literal["a", "b"] = "a"
    pair: Tuple[float, float] = (0.9, 0.999)
    tables: Dict[str, Inner] = field(default_factory=dict)


def test_nested_dataclasses_defaults_and_conversions() -> None:
    cfg = dataclass_from_dict(
        Outer,
        {
            "inner": {"width": 3, "rate": 1},  # int accepted for float
            "limit": None,
            "pair": [0.5, 1],
            "tables": {"t0": {"width": 8, "tags": ["a", "b"]}},
        },
    )
    assert cfg == Outer(
        inner=Inner(width=3, rate=1.0),
        limit=None,
        pair=(0.5, 1.0),
        tables={"t0": Inner(width=8, tags=["a", "b"])},
    )
    assert isinstance(cfg.inner.rate, float) and isinstance(cfg.pair, tuple)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"inner": {"width": 1}, "nmae": "y"}, r"^nmae: unknown key; did you mean 'name'\?"),
        (
            {"inner": {"width": 1, "rte": 2.0}},
            r"^inner\.rte: unknown key; did you mean 'inner\.rate'",
        ),
        ({"inner": {}}, r"^inner\.width: required key is missing"),
        ({"inner": {"width": "3"}}, r"^inner\.width: expected an integer, got '3'"),
        ({"inner": {"width": 2.5}}, r"^inner\.width: expected an integer"),
        ({"inner": {"width": True}}, r"^inner\.width: expected an integer, got True"),
        ({"inner": {"width": 1}, "flag": 1}, r"^flag: expected true or false, got 1"),
        ({"inner": {"width": 1}, "name": 5}, r"^name: expected a string, got 5"),
        ({"inner": {"width": 1}, "mode": "c"}, r"^mode: 'c' is not one of \['a', 'b'\]"),
        ({"inner": {"width": 1}, "limit": "many"}, r"^limit: expected an integer"),
        ({"inner": {"width": 1}, "pair": [1.0]}, r"^pair: expected 2 items, got 1"),
        ({"inner": {"width": 1, "tags": "a"}}, r"^inner\.tags: expected a list"),
        ({"inner": {"width": 1, "tags": [1]}}, r"^inner\.tags\[0\]: expected a string"),
        (
            {"inner": {"width": 1}, "tables": {"t": {"width": "w"}}},
            r"^tables\.t\.width: expected an integer",
        ),
        ({"inner": 3}, r"^inner: expected a mapping, got 3"),
    ],
)
def test_errors_name_the_dotted_key(raw, message) -> None:
    with pytest.raises(ConfigError, match=message):
        dataclass_from_dict(Outer, raw)


def test_yaml_exponent_strings_are_floats() -> None:
    # YAML 1.1 reads `1e-3` as a string; float fields accept it, other types do not.
    assert dataclass_from_dict(Inner, {"width": 1, "rate": "1e-3"}).rate == 0.001
    with pytest.raises(ConfigError, match=r"^rate: expected a number, got 'fast'"):
        dataclass_from_dict(Inner, {"width": 1, "rate": "fast"})


def test_parse_override_values_are_yaml() -> None:
    assert parse_override("train.epochs=3") == (["train", "epochs"], 3)
    assert parse_override("data.shuffle=false") == (["data", "shuffle"], False)
    assert parse_override("model.dims=[64, 32]") == (["model", "dims"], [64, 32])
    assert parse_override("train.max_steps=null") == (["train", "max_steps"], None)
    assert parse_override("output.dir=runs/a=b") == (["output", "dir"], "runs/a=b")
    assert parse_override("seed=7") == (["seed"], 7)
    for bad in ("train.epochs", "train..epochs=1", "=3"):
        with pytest.raises(ConfigError, match="expected dotted.key=value"):
            parse_override(bad)
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_override("model.dims=[1, 2")


def test_apply_overrides_creates_sections_and_keeps_input() -> None:
    raw = {"inner": {"width": 1}, "name": "x"}
    out = apply_overrides(raw, ["inner.rate=0.25", "tables.t0.width=4", "name=y", "name=z"])
    assert out == {"inner": {"width": 1, "rate": 0.25}, "name": "z", "tables": {"t0": {"width": 4}}}
    assert raw == {"inner": {"width": 1}, "name": "x"}
    cfg = dataclass_from_dict(Outer, out)
    assert cfg.tables["t0"].width == 4 and cfg.inner.rate == 0.25
    with pytest.raises(ConfigError, match=r"override 'name\.first=1': name is 'x', not a section"):
        apply_overrides(raw, ["name.first=1"])
    with pytest.raises(ConfigError, match=r"^inner\.widht: unknown key"):
        dataclass_from_dict(Outer, apply_overrides(raw, ["inner.widht=2"]))


def test_overrides_address_list_items_by_index() -> None:
    raw = {"items": [{"a": 1}, {"a": 2}], "name": "x"}
    out = apply_overrides(raw, ["items.1.a=5", "items[0].a=7", "items.0.b=[1, 2]", "items.0.b.1=3"])
    assert out["items"] == [{"a": 7, "b": [1, 3]}, {"a": 5}] and raw["items"][0] == {"a": 1}
    assert parse_override("x.m[2].k=1") == (["x", "m", "2", "k"], 1)
    for override, message in [
        ("items.2.a=1", r"^items\.2: no item '2' in items, a list of 2 \(indices 0\.\.1"),
        ("items.x.a=1", r"^items\.x: no item 'x' in items, a list of 2"),
        ("items[-1].a=1", r"^items\.-1: no item '-1' in items"),
        ("tables.0.a=1", r"^tables: not in the config, so its items cannot be addressed"),
    ]:
        with pytest.raises(ConfigError, match=message):
            apply_overrides(raw, [override])


# A tagged union in both layouts: shapes inline ({kind: ...}), a section per layout name.
@dataclass
class Shape:
    kind: ClassVar[str]
    size: int = 1


@dataclass
class Layout:
    name: ClassVar[str]


SHAPES: ConfigRegistry[Shape] = ConfigRegistry(Shape, "shape", "kind")
LAYOUTS: ConfigRegistry[Layout] = ConfigRegistry(Layout, "layout", "name", section=True)


@SHAPES.register("circle")
@dataclass
class Circle(Shape):
    radius: float = 1.0


@SHAPES.register("square")
@dataclass
class Square(Shape):
    side: float = 1.0

    def __post_init__(self) -> None:
        if self.side <= 0:
            raise ValueError(f"side: must be > 0, got {self.side}")


@LAYOUTS.register("grid")
@dataclass
class Grid(Layout):
    columns: int = 2


@LAYOUTS.register("row")
@dataclass
class Row(Layout):
    shapes: List[Shape] = field(default_factory=list)


@dataclass
class Drawing:
    layout: Layout = field(default_factory=Grid)
    title: str = ""


def test_tagged_union_in_both_layouts_round_trips() -> None:
    raw = {"name": "row", "row": {"shapes": [{"kind": "circle", "radius": 2}, {"kind": "square"}]}}
    cfg = dataclass_from_dict(Drawing, raw)
    assert cfg == Drawing(layout=Row(shapes=[Circle(radius=2.0), Square()]))
    assert cfg.layout.name == "row" and [s.kind for s in cfg.layout.shapes] == ["circle", "square"]
    echo = config_to_dict(cfg)
    assert echo == {
        "name": "row",
        "row": {
            "shapes": [
                {"kind": "circle", "size": 1, "radius": 2.0},
                {"kind": "square", "size": 1, "side": 1.0},
            ]
        },
        "title": "",
    }
    assert dataclass_from_dict(Drawing, echo) == cfg
    assert dataclass_from_dict(Drawing, {"title": "t"}).layout == Grid()
    assert dataclass_from_dict(Drawing, {"grid": {"columns": 3}}).layout == Grid(columns=3)


@pytest.mark.parametrize(
    "raw, message",
    [
        (
            {"name": "row", "row": {"shapes": [{"kind": "circle", "colour": 2}]}},
            r"^row\.shapes\[0\]\.colour: not a field of the circle shape "
            r"\(fields: kind, size, radius\)$",
        ),
        (
            {"name": "row", "row": {"shapes": [{"kind": "circle", "radus": 2}]}},
            r"^row\.shapes\[0\]\.radus: not a field of the circle shape; did you mean "
            r"'row\.shapes\[0\]\.radius'\?",
        ),
        (
            {"name": "row", "row": {"shapes": [{"size": 2}]}},
            r"^row\.shapes\[0\]\.kind: required key is missing \(one of \['circle', 'square'\]\)",
        ),
        (
            {"name": "row", "row": {"shapes": [{"kind": "cube"}]}},
            r"^row\.shapes\[0\]\.kind: 'cube' is not one of \['circle', 'square'\]",
        ),
        (
            {"name": "row", "row": {"shapes": [{"kind": "square", "side": 0}]}},
            r"^row\.shapes\[0\]\.side: must be > 0, got 0",
        ),
        (
            {"name": "row", "grid": {"columns": 3}},
            r"^grid: settings of the 'grid' layout, but name is 'row'; they would be ignored",
        ),
        ({"row": {}}, r"^row: settings of the 'row' layout, but name is 'grid'"),
        ({"name": "column"}, r"^name: 'column' is not one of \['grid', 'row'\]"),
        ({"name": "grid", "grid": {"shapes": []}}, r"^grid\.shapes: not a field of the grid "),
        ({"layout": {}}, r"^layout: unknown key"),
    ],
)
def test_tagged_union_errors_name_the_dotted_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        dataclass_from_dict(Drawing, raw)


# ---------------------------------------------------------------------------------------------
# RunConfig: the YAML files of the repository and dtn-train's command line
# ---------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_repository_configs_load(path: Path) -> None:
    cfg = load_run_config(path)
    assert cfg.model.name == path.name.rsplit("_", 1)[0]
    assert cfg.data.path and cfg.output.dir
    assert cfg.eval_batch_size >= cfg.data.batch_size


def test_overrides_reach_every_section(tmp_path: Path) -> None:
    cfg = load_run_config(
        REPO / "configs/dtn_demo.yaml",
        [
            "data.path=/data/x",
            "seed=11",
            "train.epochs=3",
            "train.max_steps=100",
            "model.dtn.methods.1.num_buckets=7",
            "model.tower.hidden_dims=[8, 4]",
            "train.dense_optimizer.lr=1e-4",
            "train.pipeline=plain",
            "sharding.sharding_types=[table_wise]",
            "output.dir=" + str(tmp_path),
        ],
    )
    assert cfg.data.path == "/data/x" and cfg.seed == 11
    assert cfg.train.epochs == 3 and cfg.train.max_steps == 100 and cfg.train.pipeline == "plain"
    assert cfg.model.architecture.methods[1].num_buckets == 7
    assert cfg.model.tower.hidden_dims == [8, 4]
    assert cfg.train.dense_optimizer.lr == pytest.approx(1e-4)
    assert cfg.sharding.sharding_types == ["table_wise"] and cfg.output.dir == str(tmp_path)
    echo = run_config_to_dict(cfg)
    assert echo["model"]["tower"]["hidden_dims"] == [8, 4] and echo["train"]["epochs"] == 3
    assert echo["model"]["dtn"]["methods"][1]["num_buckets"] == 7
    assert run_config_from_dict(echo) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=3", r"train\.epoch: unknown key; did you mean 'train\.epochs'\?"),
        ("train.epochs=two", r"train\.epochs: expected an integer, got 'two'"),
        ("train.epochs=0", r"train\.epochs: must be > 0, got 0"),
        (
            "train.pipeline=async",
            r"train\.pipeline: 'async' is not one of \['sparse_dist', 'plain'\]",
        ),
        ("data.shuffle=maybe", r"data\.shuffle: expected true or false, got 'maybe'"),
        ("data.reader_workers=0", r"data\.reader_workers: must be > 0, got 0"),
        ("output.tensorboard=1", r"output\.tensorboard: expected true or false, got 1"),
        ("model.tower.hidden_dims=abc", r"model\.tower\.hidden_dims: expected a list"),
        ("model.name=transformer", r"model\.name: 'transformer' is not one of \['dtn', "),
        (
            "model.name=mmoe",
            r"model\.dtn: settings of the 'dtn' architecture, but model\.name is 'mmoe'; they "
            r"would be ignored: remove model\.dtn \(override model\.dtn=null\) or set "
            r"model\.name=dtn",
        ),
        (
            "model.dtn.methods.2.num_buckets=3",
            r"model\.dtn\.methods\[2\]\.num_buckets: not a field of the gdcn expert \(fields: ",
        ),
        (
            "model.dtn.methods.3.num_buckets=3",
            r"model\.dtn\.methods\.3: no item '3' in "
            r"model\.dtn\.methods, a list of 3",
        ),
        ("model.dtn.methods.one.num_buckets=3", r"model\.dtn\.methods\.one: no item 'one'"),
        ("model.mmoe.num_experts=4", r"model\.mmoe: settings of the 'mmoe' architecture"),
        ("train.sparse_optimizer.name=lamb", r"train\.sparse_optimizer\.name: unknown 'lamb'"),
        ("sharding.sharding_types=[diagonal]", r"sharding\.sharding_types: unknown value"),
        ("bogus=1", r"bogus: unknown key"),
    ],
)
def test_bad_overrides_name_file_and_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"dtn_demo\.yaml: " + message):
        load_run_config(REPO / "configs/dtn_demo.yaml", [override])


def test_missing_required_and_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: mmoe}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: data: required key is missing"):
        load_run_config(path)
    path.write_text("data: {batch_size: 8}\nmodel: {name: mmoe}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: data\.path: required key is missing"):
        load_run_config(path)
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: not valid YAML"):
        load_run_config(path)
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read config"):
        load_run_config(tmp_path / "nope.yaml")


def test_architecture_switch_drops_the_other_section() -> None:
    cfg = load_run_config(REPO / "configs/dtn_demo.yaml", ["model.name=mmoe", "model.dtn=null"])
    assert cfg.model.name == "mmoe" and cfg.model.architecture.num_experts == 8
    assert cfg.model.embedding.embedding_dim == 16  # the rest of the file still applies


@pytest.mark.slow
def test_dtn_train_rejects_bad_override_with_one_line_reason() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dtn_torchrec.cli.train",
            "--config",
            str(REPO / "configs/dtn_demo.yaml"),
            "train.epoch=3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dtn-train: error: ") and "train.epoch: unknown key" in last
