"""How far float16 compute puts the LoRA gradient from float32's, with and without the loss scale (trainer/loss_scale.py).

A random-init Qwen2 of the given shape with LoRA r16 on every linear layer (B ~ N(0, 0.01)), one GRPO (dapo) loss
over SEQS x COMPLETION tokens with random advantages, computed by the trainer's completion_logprobs and policy_loss:
once in float32 (the reference), then under float16 autocast (as a T4 runs it) unscaled and with LossScale's 2**16.
Prints and writes the relative error of the whole LoRA gradient, its cosine and the share of lora_A entries that
came out exactly zero. The GRPO loss weighs each token by 1/tokens, so the more tokens a step trains on, the smaller
the gradients the float16 backward carries.

    python bench/fp16_grad.py OUT.json [VOCAB HIDDEN LAYERS SEQS COMPLETION]   # default 151936 256 2 32 256 (~90 s)
"""
from __future__ import annotations

import json
import sys
import time

import torch


def lora_model(vocab: int, hidden: int, layers: int, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 32), num_key_value_heads=max(1, hidden // 128),
                      max_position_embeddings=4096, tie_word_embeddings=True)
    model = get_peft_model(Qwen2ForCausalLM(cfg), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    return model


def lora_grads(model, batch: dict, dtype: torch.dtype, scale) -> dict[str, torch.Tensor]:
    """The LoRA gradient of one GRPO loss, the forward/backward under `dtype` (the trainer's autocast); `scale` is
    a trainer.loss_scale.LossScale (or None: the plain backward)."""
    from trainer.loss import LossConfig, policy_loss, token_weights
    from trainer.policy import Policy, completion_logprobs

    model.zero_grad(set_to_none=True)
    policy = Policy(model, None, torch.device("cpu"), dtype, False, None)
    logps, _ = completion_logprobs(policy, batch["ids"], torch.ones_like(batch["ids"]), batch["completion"],
                                   batch["valid"], 1.0, 512, 8192, entropy=False)
    cfg, mask = LossConfig(loss_type="dapo"), batch["valid"].float()
    weights = token_weights(mask, cfg, total_tokens=float(mask.sum()), num_sequences=len(mask))
    loss, _ = policy_loss(logps, batch["advantages"], mask, weights, cfg, None, None, None)
    params = [p for p in model.parameters() if p.requires_grad]
    if scale is None:
        loss.backward()
    else:
        scale.backward(loss)
        scale.unscale(params)
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def random_batch(vocab: int, seqs: int, completion: int, prompt: int = 16, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (seqs, prompt + completion), generator=g)
    return {"ids": ids, "completion": ids[:, prompt:], "valid": torch.ones(seqs, completion, dtype=torch.bool),
            "advantages": torch.randn(seqs, generator=g)}


def compare(ref: dict, got: dict) -> dict:
    dot = sum(float((got[n] * ref[n]).sum()) for n in ref)
    ref_norm = sum(float(ref[n].norm() ** 2) for n in ref) ** 0.5
    got_norm = sum(float(got[n].norm() ** 2) for n in ref) ** 0.5
    err = sum(float((got[n] - ref[n]).norm() ** 2) for n in ref) ** 0.5
    a = [n for n in ref if "lora_A" in n]
    return {"rel_err": err / ref_norm, "cosine": dot / (ref_norm * got_norm),
            "lora_A_zero_frac": sum(int(((got[n] == 0) & (ref[n] != 0)).sum()) for n in a) /
            sum(ref[n].numel() for n in a), "ref_norm": ref_norm}


def measure(vocab: int, hidden: int, layers: int, seqs: int, completion: int) -> dict:
    from trainer.loss_scale import LossScale

    model, batch = lora_model(vocab, hidden, layers), random_batch(vocab, seqs, completion)
    out = {"shape": dict(vocab=vocab, hidden=hidden, layers=layers, seqs=seqs, completion=completion),
           "tokens": seqs * completion}
    t0 = time.perf_counter()
    ref = lora_grads(model, batch, torch.float32, None)
    out["time_fp32_s"] = time.perf_counter() - t0
    for name, scale in (("fp16_unscaled", None), ("fp16_scaled", LossScale(True))):
        t0 = time.perf_counter()
        out[name] = {**compare(ref, lora_grads(model, batch, torch.float16, scale)),
                     "time_s": time.perf_counter() - t0}
        if scale is not None:
            out[name]["scale"] = scale.scale
    return out


def main(argv: list[str]) -> None:
    shape = [int(x) for x in argv[1:6]] if len(argv) > 2 else [151936, 256, 2, 32, 256]
    res = {"device": "cpu", "torch": torch.__version__, **measure(*shape)}
    print(json.dumps(res, indent=2))
    with open(argv[0], "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
