"""tunelab: fine-tune language models, from one CPU to GPU clusters.

The Python API lives in `tunelab.api`; its functions are re-exported here lazily so that `import tunelab` stays cheap
(no torch import until a function is called).
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

# torchao (train.qat; transformers imports it with its quantizers whenever it is installed) logs at import that its
# optional CUDA/C++ kernels do not load on this torch build, and torch then warns about two of torchao's pytree
# registrations; neither concerns tunelab, which uses torchao's plain-torch fake quantization only.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

_API = ("train", "chat", "generate", "generate_data", "evaluate_perplexity", "score", "prune", "quantize", "lowrank", "average",
        "export", "init_model", "data_check", "data_preview", "load_config")

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from tunelab import api

        return getattr(api, name)
    raise AttributeError(f"module 'tunelab' has no attribute {name!r}")
