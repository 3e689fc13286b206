"""Models: loading base models, adapters and quantization, and building tiny random models for tests and demos."""

import logging

# bitsandbytes (imported by peft when installed) logs a warning on every import on CPUs without the optional
# `kernels` package, although its own CPU 4-bit path works; users cannot act on it, so only errors are shown.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
