"""Multi-task architectures: gating math against direct re-computations, TSN, gradients, configs."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dtn_torchrec.data.batch import Batch
from dtn_torchrec.data.schema import ALICCP_FIELDS, ALICCP_LABELS, FieldSpec, SchemaSpec
from dtn_torchrec.models.builder import build_model, build_train_model
from dtn_torchrec.models.config import LossConfig, ModelConfig, model_config_from_dict
from dtn_torchrec.models.experts import DCNConfig, ExpertConfig, MemoNetConfig, MLPConfig
from dtn_torchrec.models.multitask import (
    DTN,
    PLE,
    DTNConfig,
    MMoE,
    MMoEConfig,
    PLEConfig,
    SharedBottom,
    SharedBottomConfig,
    TowerConfig,
)
from dtn_torchrec.models.multitask.gates import ExpertOutputGate, InputGate, task_mixtures
from dtn_torchrec.models.multitask.towers import Tower
from dtn_torchrec.models.task_graph import dependency_order
from dtn_torchrec.models.types import ExpertInputs

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
B, NF, D = 6, 3, 2  # batch, fields, embedding dim of the fake-expert tests
NO_HIDDEN = TowerConfig(hidden_dims=[])  # tower = one Linear(in, 1): easy to recompute


class LinearExpert(nn.Module):
    """Fake expert: ``flat @ W^T + b`` (no nonlinearity), so its output is recomputable by hand."""

    def __init__(self, num_fields: int, embedding_dim: int, output_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(num_fields * embedding_dim, output_dim)
        self.output_dim = output_dim

    def forward(self, inputs: ExpertInputs) -> torch.Tensor:
        return self.linear(inputs.flat)


def fake_factory(cfg: ExpertConfig, name: str, num_fields: int, embedding_dim: int) -> nn.Module:
    return LinearExpert(num_fields, embedding_dim, cfg.output_dim)


def randomize(module: nn.Module, seed: int = 0) -> None:
    """Non-zero random values everywhere (zero-initialised gate biases would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)


def make_inputs(seed: int = 1, num_fields: int = NF, dim: int = D) -> ExpertInputs:
    g = torch.Generator().manual_seed(seed)
    fields = torch.randn(B, num_fields, dim, generator=g)
    return ExpertInputs(fields=fields, flat=fields.flatten(1) * 1.5 + 0.1, pair_ids=None)


def lin(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def softmax_rows(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def expert_out(expert: LinearExpert, x: torch.Tensor) -> torch.Tensor:
    return lin(x, expert.linear)


def stack_group(group: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    return [expert_out(e, x) for e in group.experts.values()]


def mix(outputs: List[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    total = torch.zeros_like(outputs[0])
    for k, e in enumerate(outputs):
        total = total + weights[:, k : k + 1] * e
    return total


# ---------------------------------------------------------------------------------------------
# Gates and towers
# ---------------------------------------------------------------------------------------------


def test_tower_is_relu_mlp_then_linear() -> None:
    tower = Tower(5, TowerConfig(hidden_dims=[4, 3]))
    randomize(tower)
    x = torch.randn(B, 5)
    layers = [m for m in tower.modules() if isinstance(m, nn.Linear)]
    assert [(layer.in_features, layer.out_features) for layer in layers] == [(5, 4), (4, 3), (3, 1)]
    expected = lin(torch.relu(lin(torch.relu(lin(x, layers[0])), layers[1])), layers[2])
    torch.testing.assert_close(tower(x), expected)


@pytest.mark.parametrize("activation", ["none", "relu"])
def test_input_gate_softmax(activation: str) -> None:
    gate = InputGate(4, 3, activation)
    randomize(gate)
    x = torch.randn(B, 4)
    z = lin(x, gate.linear)
    expected = softmax_rows(torch.relu(z) if activation == "relu" else z)
    torch.testing.assert_close(gate(x), expected)


def test_expert_output_gate_is_per_expert_scalar_relu_softmax() -> None:
    gate = ExpertOutputGate(3, 4, "relu")
    randomize(gate)
    experts = torch.randn(B, 3, 4)
    scalars = torch.stack(
        [torch.relu(experts[:, k] @ gate.weight[k] + gate.bias[k]) for k in range(3)], dim=1
    )
    torch.testing.assert_close(gate(experts), softmax_rows(scalars))


@pytest.mark.parametrize("fused_layout", [True, False])
def test_task_mixtures_match_the_per_task_weighted_sums(fused_layout: bool) -> None:
    num_experts, tasks, hidden = 3, 2, 5
    stored = (
        torch.randn(num_experts, hidden, B) if fused_layout else torch.randn(num_experts, B, hidden)
    )
    experts = (stored.transpose(1, 2) if fused_layout else stored).requires_grad_()
    weights = softmax_rows(torch.randn(tasks * B, num_experts)).view(tasks, B, num_experts)
    weights.requires_grad_()
    out = task_mixtures(experts, weights, num_experts)
    expected = torch.stack(
        [
            sum(weights[t, :, k : k + 1] * experts[k] for k in range(num_experts))
            for t in range(tasks)
        ]
    )
    torch.testing.assert_close(out, expected)
    if fused_layout:  # kept for the towers' batched GEMMs
        assert out.stride() == (hidden * B, 1, B)
    grad = torch.randn(tasks, B, hidden)
    got = torch.autograd.grad(out, (experts, weights), grad)
    want = torch.autograd.grad(expected, (experts, weights), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# ---------------------------------------------------------------------------------------------
# Shared-bottom and MMoE
# ---------------------------------------------------------------------------------------------


def test_shared_bottom_matches_manual() -> None:
    arch = SharedBottom(
        SharedBottomConfig(MLPConfig(output_dim=5)),
        ["click", "conversion"],
        NF,
        D,
        NO_HIDDEN,
        fake_factory,
    )
    randomize(arch)
    inputs = make_inputs()
    h = expert_out(arch.bottom, inputs.flat)
    expected = torch.cat([lin(h, arch.towers[t].output) for t in ["click", "conversion"]], dim=1)
    torch.testing.assert_close(arch(inputs), expected)


@pytest.mark.parametrize("combine", ["sum", "concat"])
@pytest.mark.parametrize("activation", ["none", "relu"])
def test_mmoe_gates_and_fusion_match_manual(combine: str, activation: str) -> None:
    tasks = ["click", "conversion", "atc"]
    expert = MLPConfig(output_dim=5)
    cfg = MMoEConfig(num_experts=4, expert=expert, gate_activation=activation, combine=combine)
    arch = MMoE(cfg, tasks, NF, D, NO_HIDDEN, fake_factory)
    randomize(arch)
    inputs = make_inputs()
    outs = stack_group(arch.experts, inputs.flat)
    columns = []
    for t in tasks:
        z = lin(inputs.flat, arch.gates[t].linear)
        g = softmax_rows(torch.relu(z) if activation == "relu" else z)
        if combine == "sum":
            task_input = mix(outs, g)
        else:
            task_input = torch.cat([g[:, k : k + 1] * e for k, e in enumerate(outs)], dim=1)
        columns.append(lin(task_input, arch.towers[t].output))
    torch.testing.assert_close(arch(inputs), torch.cat(columns, dim=1))


# ---------------------------------------------------------------------------------------------
# PLE
# ---------------------------------------------------------------------------------------------


def ple_arch(tasks: List[str], levels: int = 2) -> PLE:
    cfg = PLEConfig(
        num_levels=levels, task_experts=2, shared_experts=3, expert=MLPConfig(output_dim=4)
    )
    arch = PLE(cfg, tasks, NF, D, NO_HIDDEN, fake_factory)
    randomize(arch)
    return arch


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_ple_cgc_levels_match_manual(levels: int) -> None:
    tasks = ["click", "conversion"]
    arch = ple_arch(tasks, levels)
    inputs = make_inputs()
    x_task: Dict[str, torch.Tensor] = {t: inputs.flat for t in tasks}
    x_shared = inputs.flat
    for level in range(levels):
        own = {t: stack_group(arch.task_experts[level][t], x_task[t]) for t in tasks}
        shared = stack_group(arch.shared_experts[level], x_shared)
        y_task = {
            t: mix(own[t] + shared, softmax_rows(lin(x_task[t], arch.task_gates[level][t].linear)))
            for t in tasks
        }
        if level < levels - 1:
            every = own["click"] + own["conversion"] + shared
            x_shared = mix(every, softmax_rows(lin(x_shared, arch.shared_gates[level].linear)))
        x_task = y_task
    expected = torch.cat([lin(x_task[t], arch.towers[t].output) for t in tasks], dim=1)
    assert len(arch.shared_gates) == levels - 1  # no shared gate at the last level
    torch.testing.assert_close(arch(inputs), expected)


def test_ple_gates_are_real_softmaxes_over_experts() -> None:
    """The reference TF code softmaxes an axis of size 1 (every weight == 1): must not happen here."""
    arch = ple_arch(["click", "conversion"], levels=2)
    captured: Dict[str, torch.Tensor] = {}
    for name, module in arch.named_modules():
        if isinstance(module, InputGate):
            module.register_forward_hook(
                lambda m, i, o, name=name: captured.__setitem__(name, o.detach())
            )
    arch(make_inputs())
    # level 0: 2 task gates over 2 own + 3 shared, 1 shared gate over 2*2 + 3; level 1: 2 task gates.
    assert sorted((k, v.shape[1]) for k, v in captured.items()) == [
        ("shared_gates.0", 7),
        ("task_gates.0.click", 5),
        ("task_gates.0.conversion", 5),
        ("task_gates.1.click", 5),
        ("task_gates.1.conversion", 5),
    ]
    for name, w in captured.items():
        torch.testing.assert_close(w.sum(dim=1), torch.ones(B), msg=name)
        assert (w > 0).all() and (w < 1).all(), name
        assert w.std(dim=1).min() > 1e-3, f"{name}: uniform weights, gate ignores its input"


def test_ple_rejects_memonet_above_first_level() -> None:
    with pytest.raises(ValueError, match="^expert: a memonet expert .* use num_levels: 1"):
        PLEConfig(num_levels=2, expert=MemoNetConfig())
    assert PLEConfig(num_levels=1, expert=MemoNetConfig()).num_levels == 1


# ---------------------------------------------------------------------------------------------
# DTN
# ---------------------------------------------------------------------------------------------

DTN_METHODS = [MLPConfig(output_dim=4), DCNConfig(output_dim=4)]


def dtn_arch(tasks: List[str], tsn: Dict[str, List[str]], variant: str, j: int = 2) -> DTN:
    cfg = DTNConfig(variant=variant, methods=DTN_METHODS, modules_per_method=j, tsn=tsn)
    arch = DTN(cfg, tasks, NF, D, NO_HIDDEN, fake_factory)
    randomize(arch)
    return arch


def dtn_manual(
    arch: DTN, tasks: List[str], tsn: Dict[str, List[str]], variant: str, inputs: ExpertInputs
):
    """Direct recomputation of DTN (docs/model.md: reference / paper) from the parameters."""
    groups = {g: stack_group(arch.groups[g], inputs.flat) for g in tasks + ["shared"]}
    logits: Dict[str, torch.Tensor] = {}
    pending = list(tasks)
    while pending:  # any order in which every TSN source is computed first
        task = next(t for t in pending if all(s in logits for s in tsn.get(t, [])))
        pending.remove(task)
        other: List[torch.Tensor] = []
        for s in tasks:
            if s == task:
                continue
            scale = torch.sigmoid(logits[s]).detach() if s in tsn.get(task, []) else 1.0
            other += [e * scale for e in groups[s]]
        other += groups["shared"]  # shared modules never scaled
        own = groups[task]
        if variant == "reference":

            def scalar_gates(gate: ExpertOutputGate, experts: List[torch.Tensor]) -> torch.Tensor:
                a = [torch.relu(e @ gate.weight[k] + gate.bias[k]) for k, e in enumerate(experts)]
                return softmax_rows(torch.stack(a, dim=1))

            alpha = scalar_gates(arch.other_gates[task], other)
            beta = scalar_gates(arch.own_gates[task], own)
            h = mix(other, alpha) + mix(own, beta)  # sum of the two groups, total mass 2
        else:
            g_own = softmax_rows(torch.relu(lin(inputs.flat, arch.own_gates[task].linear)))
            g_other = softmax_rows(torch.relu(lin(inputs.flat, arch.other_gates[task].linear)))
            h = torch.cat([mix(own, g_own), mix(other, g_other)], dim=1)
        logits[task] = lin(h, arch.towers[task].output)
    return torch.cat([logits[t] for t in tasks], dim=1)


@pytest.mark.parametrize("variant", ["reference", "paper"])
def test_dtn_two_tasks_matches_manual(variant: str) -> None:
    tasks, tsn = ["click", "conversion"], {"conversion": ["click"]}
    arch = dtn_arch(tasks, tsn, variant)
    assert len(arch.groups["click"]) == len(DTN_METHODS) * 2  # J = 2 modules per method
    # other + shared gate: 4 conversion modules + 4 shared modules; own gate: 4 modules.
    gate = arch.other_gates["click"]
    assert (gate.weight.shape[0] if variant == "reference" else gate.linear.out_features) == 8
    inputs = make_inputs()
    torch.testing.assert_close(arch(inputs), dtn_manual(arch, tasks, tsn, variant, inputs))


@pytest.mark.parametrize("variant", ["reference", "paper"])
@pytest.mark.parametrize(
    "tasks,tsn",
    [
        (
            ["ctr", "atc", "cvr"],
            {"atc": ["ctr"], "cvr": ["atc"]},
        ),  # the paper's CTR -> ATC -> CVR chain
        (
            ["cvr", "atc", "ctr"],
            {"atc": ["ctr"], "cvr": ["atc", "ctr"]},
        ),  # config order != dependency order
        (["ctr", "atc", "cvr"], {}),  # no TSN
    ],
)
def test_dtn_three_tasks_any_order(
    variant: str, tasks: List[str], tsn: Dict[str, List[str]]
) -> None:
    arch = dtn_arch(tasks, tsn, variant, j=1)
    inputs = make_inputs()
    out = arch(inputs)
    assert out.shape == (B, 3)
    torch.testing.assert_close(out, dtn_manual(arch, tasks, tsn, variant, inputs))


def test_dtn_tsn_really_scales_other_task_modules() -> None:
    """Guard against a manual recomputation that is blind to TSN: the TSN model differs from a
    no-TSN model with the same weights, and only in the conversion column."""
    tasks = ["click", "conversion"]
    with_tsn = dtn_arch(tasks, {"conversion": ["click"]}, "reference")
    without = dtn_arch(tasks, {}, "reference")
    without.load_state_dict(with_tsn.state_dict())
    inputs = make_inputs()
    a, b = with_tsn(inputs), without(inputs)
    torch.testing.assert_close(a[:, 0], b[:, 0])
    assert (a[:, 1] - b[:, 1]).abs().max() > 1e-4


def test_dtn_tsn_stop_gradient() -> None:
    """The conversion loss must not reach the click tower through sg(p_click); it does reach the
    click modules (they are conversion's 'other' modules) and the shared modules."""
    tasks = ["click", "conversion"]
    arch = dtn_arch(tasks, {"conversion": ["click"]}, "reference")
    logits = arch(make_inputs())
    loss_cvr = F.binary_cross_entropy_with_logits(logits[:, 1], torch.tensor([1.0, 0, 1, 0, 0, 1]))
    tower = list(arch.towers["click"].parameters())
    grads = torch.autograd.grad(loss_cvr, tower, retain_graph=True, allow_unused=True)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)
    click_modules = list(arch.groups["click"].parameters())
    shared_modules = list(arch.groups["shared"].parameters())
    for params in (click_modules, shared_modules):
        grads = torch.autograd.grad(loss_cvr, params, retain_graph=True)
        assert all(torch.count_nonzero(g) > 0 for g in grads)


def test_dtn_tsn_stop_gradient_on_click_logit() -> None:
    """d logit_conversion / d logit_click == 0: the only path between them is the detached p_click."""
    tasks = ["click", "conversion"]
    arch = dtn_arch(tasks, {"conversion": ["click"]}, "paper")
    seen: List[torch.Tensor] = []
    click_logit: Dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, args, output: torch.Tensor) -> None:
        output.register_hook(lambda grad: seen.append(grad))
        click_logit["value"] = output

    arch.towers["click"].register_forward_hook(keep)
    logits = arch(make_inputs())
    logits[:, 1].sum().backward()
    # The hook on the click logit either never fires or sees an exactly zero gradient.
    assert all(torch.count_nonzero(g) == 0 for g in seen)
    (g,) = torch.autograd.grad(arch(make_inputs())[:, 0].sum(), [click_logit["value"]])
    assert torch.count_nonzero(g) == B  # sanity: the hook point is the click logit


def test_dtn_tsn_validation() -> None:
    tasks = ["click", "conversion"]
    for tsn, message in [
        ({"purchase": ["click"]}, "not a task"),
        ({"conversion": ["buy"]}, "not a task"),
        ({"click": ["click"]}, "itself"),
        ({"click": ["conversion"], "conversion": ["click"]}, "cycle"),
    ]:
        with pytest.raises(ValueError, match=message):
            dtn_arch(tasks, tsn, "reference")
    with pytest.raises(ValueError, match="reserved"):
        dtn_arch(["click", "shared"], {}, "reference")


def test_dependency_order_is_stable() -> None:
    chain = {"cvr": ["atc"], "atc": ["ctr"]}
    assert dependency_order(["cvr", "atc", "ctr"], chain, "x") == ["ctr", "atc", "cvr"]
    assert dependency_order(["a", "b", "c"], {}, "x") == ["a", "b", "c"]
    assert dependency_order(["c", "a", "b"], {"c": ["b"]}, "x") == ["a", "b", "c"]


# ---------------------------------------------------------------------------------------------
# Full models: schema, batches, every config file
# ---------------------------------------------------------------------------------------------

CONFIG_FILES = sorted(CONFIG_DIR.glob("*.yaml"))
DEMO_CONFIGS = [p for p in CONFIG_FILES if p.stem.endswith("_demo")]


def small_schema(labels: Optional[List[str]] = None, rows: int = 40) -> SchemaSpec:
    """Ali-CCP field names with tiny tables; the six history/intention fields are multi-valued."""
    multi = {"109_14", "110_14", "127_14", "150_14", "210", "853"}
    fields = [
        FieldSpec(name=f, num_embeddings=rows, max_length=4 if f in multi else 1)
        for f in ALICCP_FIELDS
    ]
    return SchemaSpec(fields=fields, labels=list(labels or ALICCP_LABELS))


def random_batch(schema: SchemaSpec, batch_size: int = 8, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths, values = [], []
    for f in schema.fields:
        low = 0 if f.max_length > 1 else 1  # empty lists occur in multi-valued fields
        n = torch.randint(low, f.max_length + 1, (batch_size,), generator=g)
        lengths.append(n)
        values.append(torch.randint(0, f.num_embeddings, (int(n.sum()),), generator=g))
    kjt = KeyedJaggedTensor(
        keys=schema.field_names, values=torch.cat(values), lengths=torch.cat(lengths)
    )
    labels = torch.randint(0, 2, (batch_size, len(schema.labels)), generator=g).float()
    return Batch(sparse_features=kjt, labels=labels, sample_ids=torch.arange(batch_size))


def load_model_section(path: Path) -> ModelConfig:
    return model_config_from_dict(yaml.safe_load(path.read_text())["model"])


def test_every_architecture_has_both_configs() -> None:
    names = {p.stem for p in CONFIG_FILES}
    for arch in ("dtn", "mmoe", "ple", "shared_bottom"):
        assert {f"{arch}_aliccp", f"{arch}_demo"} <= names
        assert load_model_section(CONFIG_DIR / f"{arch}_demo.yaml").name == arch


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.stem for p in CONFIG_FILES])
def test_build_model_on_meta_for_every_config(path: Path) -> None:
    cfg = load_model_section(path)
    model = build_train_model(cfg, small_schema(), device=torch.device("meta"))
    params = list(model.parameters())
    assert params and all(p.device.type == "meta" for p in params)


def materialize_like_dmp(module: nn.Module) -> None:
    """What DistributedModelParallel does to meta modules: allocate, then each module's
    ``reset_parameters``. Allocation fills NaN so that a parameter nobody re-initialises shows."""
    for m in module.modules():
        has_meta = False
        for name, p in list(m._parameters.items()):
            if p is not None and p.device.type == "meta":
                nan = torch.full(p.shape, float("nan"))
                m._parameters[name] = nn.Parameter(nan, requires_grad=p.requires_grad)
                has_meta = True
        if has_meta and hasattr(m, "reset_parameters"):
            m.reset_parameters()


@pytest.mark.parametrize("path", DEMO_CONFIGS, ids=[p.stem for p in DEMO_CONFIGS])
def test_meta_model_is_fully_reinitialised_like_dmp(path: Path) -> None:
    schema = small_schema()
    model = build_train_model(load_model_section(path), schema, device=torch.device("meta"))
    materialize_like_dmp(model)
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    assert not bad, f"not re-initialised by reset_parameters: {bad}"
    loss, _ = model(random_batch(schema))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("path", DEMO_CONFIGS, ids=[p.stem for p in DEMO_CONFIGS])
def test_demo_config_forward_backward_reaches_every_parameter(path: Path) -> None:
    torch.manual_seed(0)
    schema = small_schema()
    cfg = load_model_section(path)
    model = build_train_model(cfg, schema)
    batch = random_batch(schema, batch_size=16)
    loss, (loss_detached, logits, labels) = model(batch)
    assert logits.shape == (16, len(cfg.tasks)) and labels.shape == (16, len(cfg.tasks))
    assert not loss_detached.requires_grad and not logits.requires_grad
    torch.testing.assert_close(loss_detached, loss.detach())
    loss.backward()
    no_grad = [
        n for n, p in model.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0
    ]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    # the embedding tables and the gates are among them (names as built)
    names = [n for n, _ in model.named_parameters()]
    assert any("embedding_bag_collection" in n for n in names)
    if cfg.name != "shared_bottom":
        assert any("gate" in n for n in names)


@pytest.mark.parametrize("path", DEMO_CONFIGS, ids=[p.stem for p in DEMO_CONFIGS])
def test_demo_model_traces_with_fx_like_the_train_pipeline(path: Path) -> None:
    """TrainPipelineSparseDist fx-traces the model; the traced graph must compute the same loss."""
    import torchrec.fx

    torch.manual_seed(0)
    schema = small_schema()
    model = build_train_model(load_model_section(path), schema).eval()
    batch = random_batch(schema)
    traced = torchrec.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(batch)[0], model(batch)[0])


def test_label_columns_follow_task_names() -> None:
    schema = small_schema(labels=["conversion", "click"])  # dataset stores labels in another order
    torch.manual_seed(0)
    model = build_train_model(ModelConfig(SharedBottomConfig()), schema)
    batch = random_batch(schema)
    _, (_, _, labels) = model(batch)
    torch.testing.assert_close(labels, batch.labels[:, [1, 0]])
    with pytest.raises(ValueError, match="not labels"):
        build_train_model(ModelConfig(MMoEConfig(), tasks=["click", "atc"]), schema)


def test_esmm_relation_in_model_multiplies_probabilities() -> None:
    torch.manual_seed(0)
    schema = small_schema()
    cfg = ModelConfig(
        SharedBottomConfig(), loss=LossConfig(relation="esmm", product_of={"conversion": ["click"]})
    )
    model = build_model(cfg, schema)
    features = random_batch(schema).sparse_features
    heads = model.dense_arch(model.sparse_arch(features))
    out = model(features)
    torch.testing.assert_close(out[:, 0], heads[:, 0])
    p_click, p_cvr = torch.sigmoid(heads[:, 0]), torch.sigmoid(heads[:, 1])
    torch.testing.assert_close(torch.sigmoid(out[:, 1]), p_click * p_cvr)
