"""Train several tunelab configs one after another in the processes one torchrun launch started (one process group),
so that a test of many 2-process runs pays for the interpreter, the imports and the group once. Each run is exactly
what `tunelab train CONFIG` would do in those processes.

    python -m torch.distributed.run --nproc_per_node 2 tests/e2e/run_configs.py A.yaml B.yaml ...
"""

import sys

from tunelab import api

if __name__ == "__main__":
    from tunelab.cli import _end_process_group

    for path in sys.argv[1:]:
        api.train(path, [], echo=True)
    _end_process_group()
