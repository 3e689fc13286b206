"""`tunelab train --nproc N [--nnodes M --node-rank R --master-addr A --master-port P]`: the launch through torchrun
(torch.distributed.run).

Each process runs the same `tunelab train` command; accelerate reads torchrun's environment and starts the process
group (NCCL on GPUs, gloo on CPU); train.distributed picks the engine (engine/engines.py). Plain
`torchrun --nproc_per_node N -m tunelab train CONFIG`, `accelerate launch --multi_gpu -m tunelab train CONFIG` (on
GPUs; on a CPU accelerate starts one process) and `deepspeed --module tunelab train CONFIG` work the same way. With several machines each one runs the command with
its own --node-rank and the same --master-addr/--master-port (machine 0's address).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass

from tunelab.errors import UserError


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Nodes:
    """The machines of a run: torchrun's --nnodes, --node_rank, --master_addr, --master_port."""

    count: int = 1
    rank: int = 0
    addr: str = "127.0.0.1"
    port: int = 0


def launch(config: str, overrides: list[str], nproc: int, *, debug: bool = False, nodes: Nodes = Nodes()) -> int:
    from tunelab.utils.hardware import cuda_available, max_processes

    limit = max_processes()
    if nproc > limit:
        what = "GPUs" if cuda_available() else "CPU cores"
        raise UserError(f"--nproc {nproc}: this machine has {limit} {what}; use --nproc {limit} or fewer")
    if nodes.count < 1 or not 0 <= nodes.rank < nodes.count:
        raise UserError(f"--node-rank {nodes.rank}: must be between 0 and --nnodes - 1 ({nodes.count - 1})")
    if nodes.count > 1 and not nodes.port:
        raise UserError("--master-port: required with --nnodes > 1 (every machine must name the same port)")
    if not 0 <= nodes.port < 65536:
        raise UserError(f"--master-port {nodes.port}: not a port number")
    # Validate the config once here, so a bad key (or an engine that cannot run it) fails with one line instead of
    # N tracebacks.
    from tunelab.config import load_config
    from tunelab.engine.dist_config import resolve_engine
    from tunelab.engine.engines import check_sharding
    from tunelab.engine.shape import resolve_run

    cfg = load_config(config, overrides)
    shape = resolve_run(cfg)
    spec = resolve_engine(cfg.train, precision=shape.precision, world=nproc * nodes.count)
    if spec.sharded:
        check_sharding(cfg, shape)
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", f"--nnodes={nodes.count}", f"--node_rank={nodes.rank}",
        f"--master_addr={nodes.addr}", f"--master_port={nodes.port or _free_port()}",
        "-m", "tunelab", "train", config, *overrides, *(["--debug"] if debug else []),
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)
