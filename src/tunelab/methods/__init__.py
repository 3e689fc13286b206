"""Training methods. `METHODS` maps the names users write (`method.type`) to their implementation.

Configs for each method live in `tunelab.config.schema.METHOD_CONFIGS` (so configs validate without torch). A method
written outside tunelab joins both with `register_method` (docs/architecture.md, "Adding a method").
"""

from tunelab.config.schema import METHOD_CONFIGS, MethodBase
from tunelab.methods import grpo, kd, ppo, preference, pt, reward, sft
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
    "grpo": grpo.GRPO,
    "rloo": grpo.RLOO,
    "ppo": ppo.PPO,
    "kd": kd.KD,
}



def register_method(method: Method, config: type[MethodBase], *, replace: bool = False) -> None:
    """Make `method.type: NAME` (NAME = method.name) train `method`, configured by the section dataclass `config`
    (a `MethodBase` whose `type` defaults to NAME). A name already registered is refused unless `replace`."""
    if not (isinstance(config, type) and issubclass(config, MethodBase)):
        raise TypeError(f"config must be a MethodBase dataclass, got {config!r}")
    if config().type != method.name:
        raise ValueError(f"{config.__name__}.type defaults to {config().type!r}, not the method's name "
                         f"{method.name!r}")
    taken = METHODS.get(method.name) is not None or METHOD_CONFIGS.get(method.name) is not None
    if taken and not replace:
        raise ValueError(f"method {method.name!r} is already registered; pass replace=True to replace it")
    METHODS[method.name] = method
    METHOD_CONFIGS[method.name] = config


__all__ = ["METHODS", "Method", "LossOutput", "register_method"]
