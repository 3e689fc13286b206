"""Shared test fixtures. Tests run offline: hub access is switched off and any non-loopback connection fails."""

from __future__ import annotations

import ipaddress
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import pytest

# Set before transformers / huggingface_hub are imported (they read these once, at import).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# Tokenization cache of this test session only: never the user's, never a previous session's.
os.environ["TUNELAB_CACHE"] = tempfile.mkdtemp(prefix="tunelab-test-cache-")


def _is_loopback(address: Any) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = address[0].decode() if isinstance(address[0], bytes) else str(address[0])
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def _guarded(real: Any) -> Any:
    def connect(self: socket.socket, address: Any) -> Any:
        if self.family == getattr(socket, "AF_UNIX", None) or _is_loopback(address):
            return real(self, address)
        # pytest.fail raises a BaseException, so library code that catches network errors cannot swallow it.
        pytest.fail(f"test tried to open a network connection to {address!r}; tests must stay offline")

    return connect


@pytest.fixture(autouse=True, scope="session")
def _no_network():
    """Fail any test that connects a socket to anything but loopback or a unix socket."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _guarded(socket.socket.connect))
        mp.setattr(socket.socket, "connect_ex", _guarded(socket.socket.connect_ex))
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (hidden 64, 2 layers, vocab 1000) with its tokenizer, built once per session."""
    from tunelab.models.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", hidden=64, layers=2, heads=4, vocab=1000)


@pytest.fixture(scope="session")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Calibration text for the compression commands: 32 alpaca rows (tests/helpers.py)."""
    from tests.helpers import alpaca_rows, write_json

    return write_json(tmp_path_factory.mktemp("calib") / "calib.json", alpaca_rows(32))
