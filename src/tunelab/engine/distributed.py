"""`tunelab train --nproc N`: data-parallel launch through torchrun (torch.distributed.run).

Each process runs the same `tunelab train` command; accelerate reads torchrun's environment and wraps the model in
DDP (NCCL on GPUs, gloo on CPU). Plain `torchrun --nproc_per_node N -m tunelab train CONFIG` works the same way.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tunelab.errors import UserError


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, overrides: list[str], nproc: int, *, debug: bool = False) -> int:
    from tunelab.utils.hardware import cuda_available, max_processes

    limit = max_processes()
    if nproc > limit:
        what = "GPUs" if cuda_available() else "CPU cores"
        raise UserError(f"--nproc {nproc}: this machine has {limit} {what}; use --nproc {limit} or fewer")
    # Validate the config once here, so a bad key fails with one line instead of N tracebacks.
    from tunelab.config import load_config

    load_config(config, overrides)
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "tunelab", "train", config, *overrides, *(["--debug"] if debug else []),
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)
