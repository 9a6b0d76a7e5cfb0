"""Named shapes: the 7-8B shapes of issue 17 have the real models' dimensions (checked on the meta device, nothing of
16 GB is built here), and a checkpoint written in shards loads as one."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import ROOT
from trainer import shapes
from trainer.memory import ModelDims

REAL = {"qwen2.5-7b": "qwen2.5-7b-instruct", "llama-3.1-8b": "llama-3.1-8b-instruct"}
SIZE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "vocab_size", "tie_word_embeddings", "max_position_embeddings", "rope_theta",
             "rms_norm_eps", "torch_dtype")


@pytest.mark.parametrize("shape", REAL)
def test_large_shape_config_matches_the_real_model(shape):
    real = json.loads((ROOT / "tests" / "data" / "models" / f"{REAL[shape]}.json").read_text())
    ours = shapes.config_dict(shape)
    assert {k: ours[k] for k in SIZE_KEYS} == {k: real[k] for k in SIZE_KEYS}
    assert ours.get("rope_scaling") == real.get("rope_scaling")
    assert ModelDims.from_config(ours) == ModelDims.from_config(real)


@pytest.mark.parametrize("shape,billions", [("qwen2.5-7b", 7.62), ("llama-3.1-8b", 8.03)])
def test_large_shape_builds_with_the_real_parameter_count(shape, billions):
    from transformers import AutoModelForCausalLM

    cfg = shapes.model_config(shape, SimpleNamespace(eos_token_id=2, pad_token_id=0))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    d = ModelDims.from_config(shapes.config_dict(shape))
    norms_and_biases = n - d.linear_params - d.embed_params
    assert 0 <= norms_and_biases < 2e6  # the planner's linear + embedding counts are the model's parameters
    assert n / 1e9 == pytest.approx(billions, abs=0.01)
    assert next(model.parameters()).dtype == torch.bfloat16  # created in bf16: never an fp32 copy of 8B
    if shape == "llama-3.1-8b":
        assert type(model).__name__ == "LlamaForCausalLM" and model.config.rope_parameters["rope_type"] == "llama3"


def test_sharded_checkpoint_loads_like_one_file(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = shapes.model_config("tiny", SimpleNamespace(eos_token_id=2, pad_token_id=0))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    names = shapes.save_sharded(state, tmp_path, shard_bytes=200_000)
    assert len(names) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    cfg.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
