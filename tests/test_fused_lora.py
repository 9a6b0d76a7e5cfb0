"""The fused LoRA-over-4-bit forward/backward (trainer/fused_lora.py) equals peft's on bitsandbytes' real 4-bit
layers: outputs, adapter gradients and input gradients, on a tiny Qwen2 with biases, through the whole model and
with gradient checkpointing; peft's forward comes back for a disabled adapter and for dropout."""
from __future__ import annotations

import copy

import pytest
import torch

from trainer import fused_lora

bnb = pytest.importorskip("bitsandbytes")


def _model(dropout=0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    dense = Qwen2ForCausalLM(cfg)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        dense.save_pretrained(d)
        m = Qwen2ForCausalLM.from_pretrained(d, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                     task_type="CAUSAL_LM"))
    for n, p in m.named_parameters():
        if "lora_B" in n:  # non-zero B so the adapter path contributes to outputs and input gradients
            torch.nn.init.normal_(p, std=0.1)
    return m


def _run(m, ids, checkpointing=False):
    m.zero_grad(set_to_none=True)
    if checkpointing:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()  # transformers checkpoints only in training mode
    emb = m.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = m(inputs_embeds=emb).logits
    (out.float().pow(2).mean()).backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    return out.detach(), grads, emb.grad.clone()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_equals_peft(checkpointing, monkeypatch):
    ref = _model()
    fused = copy.deepcopy(ref)
    assert fused_lora.install(fused) == 2 * 7  # every linear of both layers
    ids = torch.randint(0, 96, (3, 11))
    o1, g1, x1 = _run(ref, ids, checkpointing)
    calls = []
    apply = fused_lora._LoraLinear4bit.apply
    monkeypatch.setattr(fused_lora._LoraLinear4bit, "apply", lambda *a: calls.append(1) or apply(*a))
    o2, g2, x2 = _run(fused, ids, checkpointing)
    assert len(calls) == 14 * (2 if checkpointing else 1)  # the fused path ran (twice per layer when recomputed)
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x2, x1, rtol=1e-4, atol=1e-6)
    assert g1.keys() == g2.keys() and len(g1) == 2 * 2 * 7
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-6, msg=k)


def test_disabled_adapter_and_dropout_keep_peft():
    m = _model()
    fused_lora.install(m)
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        with m.disable_adapter():
            base = m(ids).logits
        on = m(ids).logits
    assert not torch.allclose(base, on)  # the adapter contributes when enabled, and is skipped when disabled
    ref = _model()
    with torch.no_grad(), ref.disable_adapter():
        torch.testing.assert_close(base, ref(ids).logits)
    d = _model(dropout=0.5)
    fused_lora.install(d)
    layer = d.base_model.model.model.layers[0].self_attn.q_proj
    calls = []
    layer._peft_forward = (lambda f: (lambda *a, **k: calls.append(1) or f(*a, **k)))(layer._peft_forward)
    d(ids)
    assert calls  # dropout > 0: peft's own forward
