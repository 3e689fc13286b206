"""The Hugging Face Hub as seen from here: whether a path names a hub repository, and whether the hub's host can be
reached. Model and dataset loading both ask before calling transformers or datasets, which would otherwise retry an
unreachable host for half a minute before failing."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

_TRUE = ("1", "true", "yes", "on")


def looks_like_hub_id(path: str) -> bool:
    """`owner/name` that is not a local path: `models/tiny` where a local `models/` folder exists is local."""
    return ("/" in path and not path.startswith((".", "/", "~")) and path.count("/") == 1
            and not Path(path).exists() and not Path(path.split("/")[0]).is_dir())


def offline() -> bool:
    """Whether the user switched the hub off (HF_HUB_OFFLINE, or HF_DATASETS_OFFLINE for datasets)."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_host() -> tuple[str, int]:
    """(host, port) of the hub endpoint in use (HF_ENDPOINT, else huggingface.co)."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)


def unreachable_host(timeout: float = 5.0) -> str | None:
    """The hub's host name when a connection to it fails within `timeout` seconds, else None."""
    host, port = hub_host()
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return host
    return None
