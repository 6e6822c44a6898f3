"""TorchX components of dtn-torchrec.

``train`` runs ``dtn-train`` (the module ``dtn_torchrec.cli.train``) on every worker through
``torchrun``, exactly like ``torchx.components.dist.ddp``, which it wraps. Locally::

    PATH=.venv/bin:$PATH torchx run -s local_cwd launchers/components.py:train -j 1x2 \\
        -- --config configs/dtn_demo.yaml data.path=data/demo output.dir=runs/demo

On a cluster the same component runs with ``-s slurm`` / ``-s kubernetes`` and ``-j NODESxPROCS``.
``local_cwd`` starts the ``torchrun`` that is first on ``PATH``, so put the project's
``.venv/bin`` there.

Resources are per node (replica). Left unset, they follow the ranks on it: with ``--gpu G``
(one rank per GPU, so ``G`` must be at least PROCS) ``8 x G`` CPUs and ``64 GiB x G`` of memory,
and the workers refuse to start without CUDA (``DTN_DEVICE=cuda``); without GPUs 2 CPUs and
4 GiB per rank. Give ``--cpu`` / ``--memMB`` (or ``-h``, a named resource) when nodes differ.
"""

# No `from __future__ import annotations`: TorchX reads the parameter types at run time.
from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components.dist import ddp

TRAIN_MODULE = "dtn_torchrec.cli.train"
CPUS_PER_GPU = 8
MEM_MB_PER_GPU = 64 * 1024
CPUS_PER_CPU_RANK = 2
MEM_MB_PER_CPU_RANK = 4 * 1024


def _ranks_per_node(j: str) -> int:
    """PROCS of ``-j [MIN:]NODESxPROCS`` (TorchX's own format)."""
    nodes_and_procs = j.split("x")
    if len(nodes_and_procs) != 2 or not nodes_and_procs[1].isdigit():
        raise ValueError(f"-j {j!r}: expected NODESxPROCS, e.g. 2x8")
    return int(nodes_and_procs[1])


def node_resources(j: str, gpu: int, cpu: Optional[int], memMB: Optional[int]) -> Dict[str, int]:
    """CPUs and memory (MB) of one node: the given values, else sized from its ranks / GPUs."""
    procs = _ranks_per_node(j)
    if gpu < 0:
        raise ValueError(f"--gpu must be >= 0, got {gpu}")
    if 0 < gpu < procs:
        raise ValueError(
            f"-j {j} starts {procs} ranks per node but --gpu {gpu} gives them {gpu} GPU(s):"
            " every rank needs its own GPU (use --gpu >= PROCS, or fewer PROCS)"
        )
    if gpu > 0:
        sized_cpu, sized_mem = CPUS_PER_GPU * gpu, MEM_MB_PER_GPU * gpu
    else:
        sized_cpu, sized_mem = CPUS_PER_CPU_RANK * procs, MEM_MB_PER_CPU_RANK * procs
    return {
        "cpu": cpu if cpu is not None else sized_cpu,
        "memMB": memMB if memMB is not None else sized_mem,
    }


def train(
    *script_args: str,
    j: str = "1x2",
    max_restarts: int = 0,
    name: str = "dtn_train",
    image: str = ".",
    cpu: Optional[int] = None,
    gpu: int = 0,
    memMB: Optional[int] = None,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    rdzv_backend: str = "c10d",
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Trains a dtn-torchrec model: ``dtn-train`` on every worker, launched by ``torchrun``.

    Args:
        script_args: arguments of dtn-train: ``--config FILE [dotted.key=value ...]``
        j: {nnodes}x{nproc_per_node}, e.g. 1x2 (one host, two ranks) or 2x8
        max_restarts: times torchrun restarts the worker group after a worker fails; the
            restarted workers resume from the latest checkpoint in output.dir
        name: job name
        image: image (a directory for local_cwd, a container image on a cluster)
        cpu: cpus per replica (node); default 8 per GPU, or 2 per rank without GPUs
        gpu: gpus per replica (node), at least one per rank; the workers then require CUDA
        memMB: memory per replica (node), in MB; default 64 GiB per GPU, or 4 GiB per rank
        h: a registered named resource (takes precedence over cpu, gpu, memMB)
        env: extra environment variables, e.g. OMP_NUM_THREADS=4 (default OMP_NUM_THREADS=1)
        max_retries: scheduler-level retries of a failed replica (schedulers that support it)
        rdzv_port: port of the c10d rendezvous store on the first host (multi-node only)
        rdzv_backend: torchrun rendezvous backend
        mounts: mounts for the workers, as in dist.ddp
    """
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
    resources = node_resources(j, gpu, cpu, memMB)
    env = dict(env or {})
    env.setdefault("OMP_NUM_THREADS", "1")
    if gpu > 0:
        # A node without a usable GPU fails at start-up instead of training on CPU.
        env.setdefault("DTN_DEVICE", "cuda")
    if max_restarts:
        # torchrun's c10d rendezvous shares one TCPStore across restart rounds, and the
        # workers' process-group keys (gloo/nccl peer addresses) are not prefixed per round: a
        # restarted rank can read a dead peer's address and fail to connect. A store per round
        # avoids that.
        env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    app = ddp(
        *script_args,
        m=TRAIN_MODULE,
        name=name,
        image=image,
        cpu=resources["cpu"],
        gpu=gpu,
        memMB=resources["memMB"],
        h=h,
        j=j,
        env=env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        rdzv_backend=rdzv_backend,
        mounts=mounts,
    )
    if max_restarts:
        # dist.ddp has no torchrun --max_restarts option; its command is `bash -c "torchrun ..."`.
        for role in app.roles:
            command = role.args[1]
            if role.args[0] != "-c" or not command.startswith("torchrun "):
                raise RuntimeError(f"unexpected dist.ddp command layout: {role.args}")
            role.args[1] = f"torchrun --max_restarts {max_restarts} " + command[len("torchrun ") :]
    return app
