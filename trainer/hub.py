"""Whether the Hugging Face hub can be reached from this machine: where it cannot (a Slurm compute node, an
air-gapped box), models and datasets come from the local cache at once instead of each file being retried for a
minute, and what is not cached is one clear error."""
from __future__ import annotations

import functools
import logging
import os
import socket
import sys
from urllib.parse import urlparse

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@functools.cache
def offline() -> bool:
    """True when offline mode is on (HF_HUB_OFFLINE=1) or the hub's host does not take a connection; then offline
    mode is turned on for huggingface_hub, transformers and datasets in this process (and its children). Behind a
    proxy no probe is made: the proxy decides."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    if any(os.environ.get(v) for v in PROXY_VARS):
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)),
                                 timeout=PROBE_TIMEOUT_S).close()
        return False
    except OSError as e:
        log.warning("the Hugging Face hub (%s) is not reachable from here (%s): using the local cache only",
                    constants.ENDPOINT, e)
        _go_offline()
        return True


def _go_offline() -> None:
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"  # libraries imported later and child processes
    constants.HF_HUB_OFFLINE = True  # huggingface_hub and transformers (is_offline_mode reads it)
    if "datasets" in sys.modules:  # datasets keeps its own copy, read at import
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


def why_not(what: str, name: str) -> tuple[str, str] | None:
    """(message, fix) for a hub `what` ("model", "dataset") that could not be loaded while offline; None when the
    hub was reachable (the caller's own message applies)."""
    if not offline():
        return None
    kind = "datasets" if what == "dataset" else "models"
    return (f"{name!r} is not in this machine's Hugging Face cache, and the hub is not reachable from here (offline)",
            f"download it where the hub is reachable (`hf download {name}{' --repo-type dataset' if what == 'dataset' else ''}`"
            f" with the same HF_HOME, shared with this machine) or give a local path; cached {kind} load offline")
