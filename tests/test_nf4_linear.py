"""trainer/nf4_linear.py: the policy's nf4 layers as torch ops give bitsandbytes' exact outputs and gradients, compile
without bitsandbytes' ops in the graph, and keep nothing of the dequantised weight for the backward."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import kept_for_backward, tiny_qwen2
from trainer import nf4_linear

LAYERS, HIDDEN, TOKENS = 2, 64, 48  # TOKENS is no weight dimension, so no activation has a weight's shape


def _nf4_model(tmp_path, nested: bool, dtype: torch.dtype, traced: bool):
    """The tiny Qwen2 as HF loads it in 4 bits on the CPU, LoRA r8 all-linear with a non-zero B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from trainer.policy import keep_cpu_4bit_trainable

    d = tmp_path / "base"
    if not d.exists():
        tiny_qwen2(hidden=HIDDEN, layers=LAYERS).save_pretrained(d)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                           bnb_4bit_use_double_quant=nested, bnb_4bit_quant_storage=torch.uint8)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, quantization_config=q, device_map={"": "cpu"})
    keep_cpu_4bit_trainable(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if traced:
        assert nf4_linear.install(model) == 7 * LAYERS  # q k v o gate up down
        assert nf4_linear.install(model) == 0  # once
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    model.train()
    return model


def _step(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids, use_cache=False).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


IDS = torch.randint(0, 256, (2, TOKENS), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("nested,dtype", [(False, torch.bfloat16), (True, torch.bfloat16), (True, torch.float32)])
def test_traced_nf4_layers_give_bitsandbytes_exact_logits_and_lora_gradients(tmp_path, nested, dtype):
    ref_logits, ref_grads = _step(_nf4_model(tmp_path, nested, dtype, traced=False), IDS)
    logits, grads = _step(_nf4_model(tmp_path, nested, dtype, traced=True), IDS)
    assert torch.equal(logits, ref_logits), (logits - ref_logits).abs().max()
    assert len(grads) == len(ref_grads) == 2 * 7 * LAYERS
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))


def test_a_layer_of_other_levels_or_not_quantised_is_left_to_bitsandbytes(tmp_path):
    model = _nf4_model(tmp_path, False, torch.float32, traced=False).get_base_model()
    lin = model.model.layers[0].self_attn.q_proj.base_layer
    assert nf4_linear.eligible(lin)
    lin.weight.quant_state.code = lin.weight.quant_state.code.flip(0)  # fp4-like: other levels
    assert not nf4_linear.eligible(lin)
    assert not nf4_linear.eligible(torch.nn.Linear(4, 4)) and not nf4_linear.eligible(model.lm_head)


@pytest.mark.parametrize("nested", [False, True])
def test_compiled_traced_layers_run_no_bitsandbytes_4bit_op_and_keep_no_dequantised_weight(tmp_path, nested):
    """Compiled without checkpointing (where a kept weight would cost most): the layers' graphs call no bitsandbytes
    4-bit op (a double-quantised absmax still goes through its blockwise op, by design), the tensors they keep for
    the backward (less the parameters and buffers, each storage once) are no more than bitsandbytes' layers keep
    compiled the same way, and the gradients agree with eager bitsandbytes'. Kept dequantised weights (fp32 here,
    4 bytes a parameter) would add 4 x 7 weights x LAYERS to the traced side."""
    torch._dynamo.reset()

    def run(traced: bool):
        model = _nf4_model(tmp_path, nested, torch.float32, traced)
        for layer in model.get_base_model().model.layers:
            layer.compile()
        _step(model, IDS)  # compile
        model.zero_grad()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            with kept_for_backward([*model.parameters(), *model.buffers()]) as kept:
                logits = model(input_ids=IDS, use_cache=False).logits
            logits.float().pow(2).mean().backward()
        ops = {e.key for e in prof.key_averages()}
        return sum(kept.values()), ops, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    bnb_kept, bnb_ops, _ = run(False)
    kept, ops, grads = run(True)
    assert "bitsandbytes::gemm_4bit" in bnb_ops or "bitsandbytes::dequantize_4bit" in bnb_ops, sorted(bnb_ops)[:40]
    assert not {o for o in ops if o.startswith("bitsandbytes::") and "4bit" in o}, sorted(ops)
    assert ("bitsandbytes::dequantize_blockwise" in ops) == nested
    weights = sum(m.weight.numel() * 2 for m in _nf4_model(tmp_path, nested, torch.float32, False).modules()
                  if nf4_linear.eligible(m))  # packed: 2 parameters a byte
    assert kept <= bnb_kept + 0.1 * 4 * weights, (kept, bnb_kept, 4 * weights)
    _, ref = _step(_nf4_model(tmp_path, nested, torch.float32, traced=False), IDS)
    assert all(torch.allclose(g, r, rtol=1e-4, atol=1e-6) for g, r in zip(grads, ref))
