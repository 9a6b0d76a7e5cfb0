"""trainer/hub.py: on a machine that cannot reach the Hugging Face hub, a model or dataset that is not cached is one
clear error at once (huggingface_hub alone retried each file for about a minute), a cached one loads, and behind a
proxy no probe is made."""
from __future__ import annotations

import socket
import time
import types

import pytest

from trainer import hub
from trainer.errors import UserError


def model(name: str):
    return types.SimpleNamespace(shape=None, name=name, revision=None, trust_remote_code=False, seed=0)


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """No connection to anywhere; an empty hub cache; offline mode off until the probe turns it on (all restored)."""
    import datasets.config
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    for v in hub.PROXY_VARS:
        monkeypatch.delenv(v, raising=False)
    probes = []

    def refuse(address, *a, **k):
        probes.append(address)
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    hub.offline.cache_clear()
    yield types.SimpleNamespace(probes=probes, cache=tmp_path / "hub", constants=c)
    hub.offline.cache_clear()


def test_an_uncached_model_or_dataset_is_one_clear_error_at_once_when_the_hub_is_unreachable(no_network, tmp_path):
    from trainer.data import load_rows
    from trainer.policy import load_tokenizer, read_config

    t0 = time.perf_counter()
    for load in (lambda: read_config(model("trainer-tests/not-cached")),
                 lambda: load_tokenizer(model("trainer-tests/not-cached")),
                 lambda: load_rows(types.SimpleNamespace(dataset="trainer-tests/not-cached-ds", subset=None,
                                                         split="train"), tmp_path)):
        with pytest.raises(UserError) as e:
            load()
        assert "not reachable from here" in str(e.value) and "hf download" in e.value.fix, str(e.value)
    assert time.perf_counter() - t0 < 20  # each took ~20 s of retries before (two files: ~50 s a command)
    assert len(no_network.probes) == 1 and no_network.probes[0][0] == "huggingface.co"  # probed once
    assert no_network.constants.HF_HUB_OFFLINE  # and offline mode is on for the libraries


def test_a_cached_model_loads_on_an_offline_machine(no_network):
    from trainer.policy import read_config

    repo = no_network.cache / "models--trainer-tests--cached"
    sha = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "snapshots" / sha / "config.json").write_text('{"model_type": "qwen2", "hidden_size": 64}')
    assert read_config(model("trainer-tests/cached"))["hidden_size"] == 64


def test_behind_a_proxy_the_proxy_decides(no_network, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub.offline() is False and no_network.probes == []
    assert not no_network.constants.HF_HUB_OFFLINE
