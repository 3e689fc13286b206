"""Training methods. `METHODS` maps the names users write (`method.type`) to their implementation.

Configs for each method live in `tunelab.config.schema.METHOD_CONFIGS` (so configs validate without torch).
"""

from tunelab.methods import preference, pt, reward, sft
from tunelab.methods.base import LossOutput, Method

METHODS: dict[str, Method] = {
    "sft": sft.METHOD,
    "pt": pt.METHOD,
    "rm": reward.RM,
    "dpo": preference.DPO,
    "kto": preference.KTO,
    "orpo": preference.ORPO,
    "simpo": preference.SIMPO,
    "cpo": preference.CPO,
}

__all__ = ["METHODS", "Method", "LossOutput"]
