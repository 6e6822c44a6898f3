"""TorchX components of dtn-torchrec.

``train`` runs ``dtn-train`` (the module ``dtn_torchrec.cli.train``) on every worker through
``torchrun``, exactly like ``torchx.components.dist.ddp``, which it wraps. Locally::

    PATH=.venv/bin:$PATH torchx run -s local_cwd launchers/components.py:train -j 1x2 \\
        -- --config configs/dtn_demo.yaml data.path=data/demo output.dir=runs/demo

On a cluster the same component runs with ``-s slurm`` / ``-s kubernetes`` and ``-j NODESxPROCS``.
``local_cwd`` starts the ``torchrun`` that is first on ``PATH``, so put the project's
``.venv/bin`` there.
"""

# No `from __future__ import annotations`: TorchX reads the parameter types at run time.
from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components.dist import ddp

TRAIN_MODULE = "dtn_torchrec.cli.train"


def train(
    *script_args: str,
    j: str = "1x2",
    max_restarts: int = 0,
    name: str = "dtn_train",
    image: str = ".",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
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
        cpu: cpus per replica (node)
        gpu: gpus per replica (node)
        memMB: memory per replica (node), in MB
        h: a registered named resource (takes precedence over cpu, gpu, memMB)
        env: extra environment variables, e.g. OMP_NUM_THREADS=4 (default OMP_NUM_THREADS=1)
        max_retries: scheduler-level retries of a failed replica (schedulers that support it)
        rdzv_port: port of the c10d rendezvous store on the first host (multi-node only)
        rdzv_backend: torchrun rendezvous backend
        mounts: mounts for the workers, as in dist.ddp
    """
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
    env = dict(env or {})
    env.setdefault("OMP_NUM_THREADS", "1")
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
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
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
