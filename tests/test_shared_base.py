"""The shared-base arithmetic on the CPU with bitsandbytes' own functions: a trainer projection is a byte slice
of a fused nf4 buffer laid out as vLLM lays it (q|k|v and gate|up packed per shard, one QuantState each), built
with no copy, and computing exactly x @ dequant(W_shard).T."""
from __future__ import annotations

import bitsandbytes.functional as F
import pytest
import torch

from tests.conftest import tiny_qwen2
from trainer.rollout import vllm_internals as vi
from trainer.sync import build_shared_model, count_base_copies

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class FakeVLLMLinear(torch.nn.Module):
    """What vLLM's bitsandbytes loader leaves on a (fused) linear: one uint8 buffer, byte offsets, QuantStates."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor] | None):
        super().__init__()
        packed, states, offsets = [], {}, [0]
        for k, w in enumerate(weights):
            q, qs = F.quantize_4bit(w.float().contiguous(), blocksize=64, quant_type="nf4")
            packed.append(q.view(-1))
            states[k] = qs
            offsets.append(offsets[-1] + q.numel())
        self.weight = torch.nn.Parameter(torch.cat(packed).view(-1, 1), requires_grad=False)
        self.weight.bnb_quant_state = states
        self.weight.bnb_shard_offsets = torch.tensor(offsets)
        self.bias = None if biases is None else torch.nn.Parameter(torch.cat(biases), requires_grad=False)


def fake_vllm_model(hf: torch.nn.Module) -> torch.nn.Module:
    """A module tree with vLLM's names: model.layers.i.self_attn.qkv_proj, ...mlp.gate_up_proj, norms, embedding."""
    root = torch.nn.Module()
    root.model = torch.nn.Module()
    root.model.embed_tokens = torch.nn.Embedding(*hf.model.embed_tokens.weight.shape)
    root.model.embed_tokens.weight = torch.nn.Parameter(hf.model.embed_tokens.weight.data.clone(), requires_grad=False)
    root.model.norm = torch.nn.Module()
    root.model.norm.weight = torch.nn.Parameter(hf.model.norm.weight.data.clone(), requires_grad=False)
    root.model.layers = torch.nn.ModuleList()
    for layer in hf.model.layers:
        v = torch.nn.Module()
        v.self_attn, v.mlp = torch.nn.Module(), torch.nn.Module()
        a, m = layer.self_attn, layer.mlp
        v.self_attn.qkv_proj = FakeVLLMLinear([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight],
                                              [a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        v.self_attn.o_proj = FakeVLLMLinear([a.o_proj.weight], None)
        v.mlp.gate_up_proj = FakeVLLMLinear([m.gate_proj.weight, m.up_proj.weight], None)
        v.mlp.down_proj = FakeVLLMLinear([m.down_proj.weight], None)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            n = torch.nn.Module()
            n.weight = torch.nn.Parameter(getattr(layer, norm).weight.data.clone(), requires_grad=False)
            setattr(v, norm, n)
        root.model.layers.append(v)
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = tiny_qwen2(vocab=320, hidden=128, layers=2)
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("ckpt")
    hf.save_pretrained(path)
    vmodel = fake_vllm_model(hf)
    return hf, vmodel, build_shared_model(path, vmodel, torch.float32)


def test_every_projection_is_a_byte_slice_of_the_fused_buffer(models):
    _, vmodel, shared = models
    shards = vi.packed_shards(vmodel)
    assert len(shards) == 7 * 2
    for name, shard in shards.items():
        lin = shared.get_submodule(name)
        fused = vmodel.get_submodule(name.rsplit(".", 1)[0] + "." + _fused_leaf(name)).weight
        start = fused.data_ptr()
        assert start <= lin.weight.data_ptr() < start + fused.numel()  # zero-copy: inside vLLM's buffer
        assert lin.weight.quant_state is shard.quant_state  # vLLM's own QuantState, not a rebuilt one


def _fused_leaf(name: str) -> str:
    leaf = name.rsplit(".", 1)[1]
    return next((f for f, parts in FUSED.items() if leaf in parts), leaf)


def test_projection_computes_x_times_dequantised_shard(models):
    hf, vmodel, shared = models
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"):
        lin = shared.get_submodule(name)
        x = torch.randn(5, lin.in_features)
        w = F.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
        ref = x @ w.float().T + (lin.bias if lin.bias is not None else 0)
        assert torch.allclose(lin(x), ref, atol=1e-5)
        # and the shard is the nf4 quantisation of the original weight: the same bytes bitsandbytes makes
        mine, _ = F.quantize_4bit(hf.get_submodule(name).weight.float().contiguous(), blocksize=64, quant_type="nf4")
        assert torch.equal(mine.view(-1), lin.weight.data.view(-1))


def test_whole_model_matches_a_dequantised_reference_and_holds_one_base_copy(models):
    hf, vmodel, shared = models
    ref = tiny_qwen2(vocab=320, hidden=128, layers=2)
    ref.load_state_dict(hf.state_dict())
    with torch.no_grad():
        for name, shard in vi.packed_shards(vmodel).items():
            ref.get_submodule(name).weight.copy_(F.dequantize_4bit(shard.data, shard.quant_state))
    ids = torch.randint(0, 320, (2, 9))
    assert torch.allclose(shared(ids).logits, ref(ids).logits, atol=1e-4)
    copies, outside = count_base_copies(shared, vmodel)
    assert copies == 1, outside


class FakeEmbeddingWithLoRA(torch.nn.Module):
    """vLLM's VocabParallelEmbeddingWithLoRA: the embedding of a model with `embedding_modules` (Llama), under
    enable_lora, holds the original layer as .base_layer."""

    def __init__(self, base: torch.nn.Module):
        super().__init__()
        self.base_layer = base


@pytest.mark.parametrize("mirror", [False, True])
def test_an_embedding_wrapped_for_lora_is_shared_not_copied(models, mirror, tmp_path):
    """The Llama-3.1-8B shape on the H200 (2026-12-02): vLLM names its embedding model.embed_tokens.base_layer.weight;
    the shared base refused to start, and the bf16 mirror kept its own 1.05 GB copy."""
    from trainer.sync import share_non_linear

    hf, vmodel, _ = models
    vmodel.model.embed_tokens = FakeEmbeddingWithLoRA(vmodel.model.embed_tokens)
    try:
        vemb = vmodel.model.embed_tokens.base_layer.weight
        assert "model.embed_tokens.base_layer.weight" in dict(vmodel.named_parameters())
        if mirror:
            trainer = tiny_qwen2(vocab=320, hidden=128, layers=2)
            share_non_linear(trainer, vmodel)
        else:
            hf.save_pretrained(tmp_path)
            trainer = build_shared_model(tmp_path, vmodel, torch.float32)
        assert trainer.model.embed_tokens.weight.data_ptr() == vemb.data_ptr()
    finally:
        vmodel.model.embed_tokens = vmodel.model.embed_tokens.base_layer


def test_missing_layout_names_the_vllm_version(monkeypatch):
    monkeypatch.setattr(vi, "version", lambda: "9.9.9")
    with pytest.raises(vi.LayoutError, match="vLLM 9.9.9"):
        vi.packed_shards(torch.nn.Linear(4, 4))
