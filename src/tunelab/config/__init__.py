"""Typed, sectioned configuration: schema (dataclasses with help text) and strict loading."""

from tunelab.config.load import config_to_dict, load_config, save_config
from tunelab.config.schema import Config

__all__ = ["Config", "load_config", "save_config", "config_to_dict"]
