"""Model quality on data with a planted signal: test AUC per task of each configured model against
the oracle (the true probabilities), the best model without the planted crosses, and a
logistic-regression-on-embeddings baseline, over seeds.

    dtn-synth --output SYN --train-rows 200000 --test-rows 50000 --seed 3 \
        --id-scale 0.002 --history-scale 0.1 --rows-per-user 10
    dtn-prepare --format aliccp-raw --input SYN --output DATA --valid-fraction 0.1 --quiet
    python -m benchmarks.model_quality --data DATA --truth SYN \
        --configs configs/dtn_demo.yaml configs/mmoe_demo.yaml configs/ple_demo.yaml \
        --seeds 0 1 2 --epochs 4 --out quality.json

Protocol (the same for every model): unsharded (a demo data set's tables fit anywhere: this
measures the models, not the distribution), one thread per run, one Adam optimiser over all
parameters, the same batch size, learning rate and epoch budget. By default the embedding
tables get no L2 penalty, as in ``dtn-train`` on CPU (FBGEMM's CPU kernels have no weight decay
for the fused table optimisers), so this measures the models as the product trains them.
``--embedding-l2`` adds one on whole tables, as Keras' ``embeddings_regularizer`` (under Adam the
rows of ids absent from a batch shrink too): it narrows the gap between DTN and the MLP-expert
models at ~100k rows (README, "Model quality"). When the data set has a ``valid`` split
(``dtn-prepare --valid-fraction``), each model trains until its mean valid AUC over the tasks has
not improved for ``--patience`` epochs (at most ``--epochs``) and the test AUC is that of its
best valid epoch; without one, every model trains exactly ``--epochs``. The baseline is the
first config's embedding layer and one linear logit per task. Runs are independent (each seeds
its own model and shuffle), so ``--jobs`` runs them in parallel processes.

Prints a table (mean and standard deviation over seeds, gap to the oracle) and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import yaml
from torch import nn

from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from dtn_torchrec.atomic_files import write_json_atomic
from dtn_torchrec.data.reader import ParquetBatchReader
from dtn_torchrec.data.schema import SchemaSpec
from dtn_torchrec.models.builder import build_train_model
from dtn_torchrec.models.config import ModelConfig, model_config_from_dict
from dtn_torchrec.models.embedding import SparseArch
from dtn_torchrec.models.losses import MultiTaskLoss
from dtn_torchrec.models.model import MultiTaskTrainWrapper
from dtn_torchrec.train.metrics import binary_auc

LOGISTIC_REGRESSION = "logistic_regression"
VALID_SPLIT = "valid"
TEST_SPLIT = "test"


class EmbeddingLogisticRegression(nn.Module):
    """Baseline: one linear logit per task over the flat field embeddings ``[B, F*D] -> [B, T]``."""

    def __init__(self, sparse_arch: SparseArch, tasks: List[str]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.sparse_arch = sparse_arch
        self.linear = nn.Linear(sparse_arch.num_fields * sparse_arch.embedding_dim, len(tasks))

    def forward(self, features) -> torch.Tensor:
        return self.linear(self.sparse_arch(features).flat)


@dataclass
class TrainSettings:
    """What every model is trained with.

    Args:
        epochs (int): epoch budget (the most epochs any model trains).
        patience (int): with a valid split, stop after this many epochs without a better mean
            valid AUC.
        batch_size (int): training rows per step.
        lr (float): Adam learning rate of every parameter (embeddings included).
        embedding_l2 (float): Adam ``weight_decay`` (L2 added to the gradient) of every embedding
            table (the field tables and MemoNet codebooks); 0 for the other parameters.
    """

    epochs: int = 4
    patience: int = 1
    batch_size: int = 512
    lr: float = 2e-3
    embedding_l2: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise ValueError(f"epochs, patience and batch_size must be >= 1, got {self}")
        if self.lr <= 0 or self.embedding_l2 < 0:
            raise ValueError(f"lr must be > 0 and embedding_l2 >= 0, got {self}")


@dataclass
class QualityRun:
    """One model trained with one seed.

    ``valid_auc`` per epoch (empty without a valid split); ``test_auc`` of ``best_epoch``
    (1-based).
    """

    name: str
    seed: int
    test_auc: Dict[str, float]
    valid_auc: List[Dict[str, float]]
    best_epoch: int
    seconds: float


def load_model_config(path: str) -> ModelConfig:
    with open(path) as f:
        return model_config_from_dict(yaml.safe_load(f)["model"])


def candidate_name(candidate: str) -> str:
    return candidate if candidate == LOGISTIC_REGRESSION else Path(candidate).stem


def build_candidate(candidate: str, schema: SchemaSpec, reference: ModelConfig) -> nn.Module:
    """A train wrapper (``forward(batch) -> (loss, (loss, logits, labels))``) for a config file, or
    the logistic-regression baseline on ``reference``'s embedding settings."""
    if candidate == LOGISTIC_REGRESSION:
        model = EmbeddingLogisticRegression(SparseArch(schema, reference.embedding), reference.tasks)
        loss = MultiTaskLoss(reference.tasks, reference.loss.task_weights, None)
        return MultiTaskTrainWrapper(model, loss, [schema.labels.index(t) for t in reference.tasks])
    return build_train_model(load_model_config(candidate), schema)


def build_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Adam:
    """Adam over every parameter; the embedding tables' group (field tables, MemoNet codebooks)
    carries the L2 penalty."""
    tables = {
        id(p): p
        for m in model.modules()
        if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))
        for p in m.parameters()
    }
    dense = [p for p in model.parameters() if id(p) not in tables]
    return torch.optim.Adam(
        [{"params": dense, "weight_decay": 0.0},
         {"params": list(tables.values()), "weight_decay": settings.embedding_l2}],
        lr=settings.lr,
    )


@torch.no_grad()
def evaluate(model: nn.Module, data: str, split: str, tasks: List[str]) -> Dict[str, float]:
    """Exact AUC per task of ``model`` on a whole split."""
    model.eval()
    logits, labels = [], []
    for batch in ParquetBatchReader(data, split, 4096):
        _, (_, batch_logits, batch_labels) = model(batch)
        logits.append(batch_logits)
        labels.append(batch_labels)
    scores, targets = torch.cat(logits), torch.cat(labels)
    auc = {}
    for i, task in enumerate(tasks):
        value = binary_auc(scores[:, i], targets[:, i])
        if value is None:
            raise ValueError(f"{data}: split {split!r} has no positive or no negative {task!r} label")
        auc[task] = float(value)
    return auc


def train_and_evaluate(
    candidate: str, data: str, seed: int, settings: TrainSettings, reference: ModelConfig
) -> QualityRun:
    """Trains one model (early stopping on the valid split when there is one), returns its test AUC."""
    schema = SchemaSpec.load(data)
    tasks = reference.tasks
    torch.manual_seed(seed)
    model = build_candidate(candidate, schema, reference)
    optimizer = build_optimizer(model, settings)
    reader = ParquetBatchReader(
        data, "train", settings.batch_size, shuffle=True, shuffle_buffer_rows=8 * settings.batch_size, seed=seed
    )
    select = VALID_SPLIT in schema.splits
    valid_auc: List[Dict[str, float]] = []
    best_score, best_epoch, best_state = float("-inf"), settings.epochs, None
    start = time.perf_counter()
    for epoch in range(settings.epochs):
        model.train()
        reader.set_epoch(epoch)
        for batch in reader:
            loss, _ = model(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if not select:
            continue
        valid_auc.append(evaluate(model, data, VALID_SPLIT, tasks))
        score = statistics.fmean(valid_auc[-1].values())
        if score > best_score:
            best_score, best_epoch, best_state = score, epoch + 1, copy.deepcopy(model.state_dict())
        elif epoch + 1 - best_epoch >= settings.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    test_auc = evaluate(model, data, TEST_SPLIT, tasks)
    return QualityRun(candidate_name(candidate), seed, test_auc, valid_auc, best_epoch, time.perf_counter() - start)


def summarise(runs: List[QualityRun], tasks: List[str]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Model -> task -> ``{"mean", "std"}`` of the test AUC over the model's seeds."""
    summary: Dict[str, Dict[str, Dict[str, float]]] = {}
    for name in dict.fromkeys(r.name for r in runs):
        values = {t: [r.test_auc[t] for r in runs if r.name == name] for t in tasks}
        summary[name] = {
            t: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}
            for t, v in values.items()
        }
    return summary


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def compare(
    data: str,
    configs: List[str],
    seeds: List[int],
    settings: TrainSettings,
    truth_dir: Optional[str] = None,
    jobs: int = 1,
    threads: int = 1,
    log: Optional[Callable[[str], None]] = None,
) -> Dict[str, Any]:
    """Trains the baseline and every config with every seed in ``jobs`` processes of ``threads``
    threads each; the result JSON (see the module doc), runs in (candidate, seed) order."""
    reference = load_model_config(configs[0])
    tasks = reference.tasks
    truth = json.loads((Path(truth_dir) / "truth.json").read_text()) if truth_dir else {}
    work: List[Tuple[str, int]] = [(c, seed) for c in [LOGISTIC_REGRESSION, *configs] for seed in seeds]
    runs: Dict[Tuple[str, int], QualityRun] = {}
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_set_threads, initargs=(threads,)) as pool:
        # The baseline, much the quickest, goes last so that no long run starts at the end.
        futures = {key: pool.submit(train_and_evaluate, key[0], data, key[1], settings, reference)
                   for key in work[len(seeds):] + work[:len(seeds)]}
        for key, future in futures.items():
            run = future.result()
            runs[key] = run
            if log is not None:
                log(f"{run.name:<20} seed {run.seed}: best epoch {run.best_epoch}  "
                    + "  ".join(f"{t} {v:.4f}" for t, v in run.test_auc.items()) + f"  ({run.seconds:.0f} s)")
    ordered = [runs[key] for key in work]
    return {
        "tasks": tasks,
        "test_auc": summarise(ordered, tasks),
        "oracle_test_auc": truth.get("oracle_auc", {}).get(TEST_SPLIT, {}),
        "no_cross_test_auc": truth.get("no_cross_auc", {}).get(TEST_SPLIT, {}),
        "selection": "best valid epoch" if VALID_SPLIT in SchemaSpec.load(data).splits else "last epoch",
        "seeds": list(seeds),
        "settings": asdict(settings),
        "configs": list(configs),
        "runs": [asdict(r) for r in ordered],
    }


def format_table(result: Dict[str, Any]) -> str:
    """Markdown table: mean +- std test AUC per task and its gap to the oracle."""
    tasks, oracle, no_cross = result["tasks"], result["oracle_test_auc"], result["no_cross_test_auc"]
    header = "| model |" + "".join(f" {t} AUC | {t} gap to oracle |" for t in tasks)
    lines = [header, "|---|" + "---:|---:|" * len(tasks)]
    for name, per_task in result["test_auc"].items():
        row = f"| {name} |"
        for t in tasks:
            gap = f"{oracle[t] - per_task[t]['mean']:.4f}" if t in oracle else "-"
            row += f" {per_task[t]['mean']:.4f} ± {per_task[t]['std']:.4f} | {gap} |"
        lines.append(row)
    for label, values in (("no planted cross (truth)", no_cross), ("oracle (truth)", oracle)):
        if values:
            lines.append(f"| {label} |" + "".join(f" {values[t]:.4f} | |" for t in tasks))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset written by dtn-prepare")
    p.add_argument("--truth", help="dtn-synth output dir (oracle and no-cross AUC from its truth.json)")
    p.add_argument("--configs", nargs="+", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=TrainSettings.epochs)
    p.add_argument("--patience", type=int, default=TrainSettings.patience)
    p.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    p.add_argument("--lr", type=float, default=TrainSettings.lr)
    p.add_argument("--embedding-l2", type=float, default=TrainSettings.embedding_l2)
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    # One thread per run by default: these models are small, and more threads than free cores
    # slow a shared machine down several-fold (intra-op threads spin waiting for each other).
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out", help="JSON output path")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be >= 1")
    settings = TrainSettings(args.epochs, args.patience, args.batch_size, args.lr, args.embedding_l2)
    result = compare(args.data, args.configs, args.seeds, settings, args.truth, args.jobs, args.threads,
                     log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_table(result))
    if args.out:
        write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
