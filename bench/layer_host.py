"""Host time of a micro-batch's forward + backward through many small decoder layers (compute negligible): what each
way of checkpointing the compiled layers costs the Python side (trainer/policy.py CKPT_IN_GRAPH). CPU or GPU.

    python bench/layer_host.py OUT.json [nf4] [ROUNDS]   # every variant in a process of its own, ROUNDS (default 1)
                                                         # times in turn; ~4 minutes a round on 2 CPU cores

A Qwen2 of 28 layers, hidden 64 (fp32, or its nf4 base through bitsandbytes with `nf4`), LoRA r16 all-linear, one
48-token sequence a micro-batch; 10 micro-batches timed after 4 warm-up. Variants: hf_ckpt_eager, hf_ckpt_compiled
(HF's checkpoint around each compiled layer: the default), ckpt_in_graph_compiled (plan.checkpoint_in_graph),
nockpt_compiled; with nf4 also the two checkpointed compiled ones with the nf4 layers traced
(trainer/nf4_linear.py, TRAINER_NF4_TRACED): *_nf4_traced. OUT.json: {"device", "base", "command", "ms_per_layer":
{variant: median over the rounds}, "rounds": {variant: [ms, ...]}}. The 2-core machine's timings move by up to 40%
between runs: compare variants within a round.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYERS, HIDDEN, TOKENS, WARMUP, TIMED = 28, 64, 48, 4, 10
VARIANTS = ("hf_ckpt_eager", "hf_ckpt_compiled", "ckpt_in_graph_compiled", "nockpt_compiled")
NF4_VARIANTS = ("hf_ckpt_compiled_nf4_traced", "ckpt_in_graph_compiled_nf4_traced")


def one(variant: str, nf4: bool, device: str) -> float:
    """Seconds of host time a layer and micro-batch (synchronised each micro-batch on the GPU)."""
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Qwen2Config, Qwen2ForCausalLM

    from trainer.policy import set_gradient_checkpointing

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg)
    if nf4:
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, device_map={"": device},
                                                         quantization_config=BitsAndBytesConfig(
                                                             load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                             bnb_4bit_compute_dtype=torch.float32))
    model = model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    if variant.endswith("_nf4_traced"):
        from trainer.nf4_linear import install

        install(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    if not variant.startswith("nockpt"):
        set_gradient_checkpointing(model, True, in_graph=variant.startswith("ckpt_in_graph"))
    if "_compiled" in variant:
        for layer in model.get_base_model().model.layers:
            layer.compile()
    model.train()
    ids = torch.randint(0, 256, (1, TOKENS), device=device)

    def micro_batch():
        model(input_ids=ids, use_cache=False).logits.float().mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(WARMUP):
        micro_batch()
    t0 = time.perf_counter()
    for _ in range(TIMED):
        micro_batch()
    return (time.perf_counter() - t0) / TIMED / LAYERS


def main(out: Path, nf4: bool, rounds: int = 1) -> dict:
    import statistics

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs: dict[str, list[float]] = {}
    for k in range(rounds):
        for v in VARIANTS + (NF4_VARIANTS if nf4 else ()):  # a process each: compiled code and caches do not carry over
            r = subprocess.run([sys.executable, __file__, "--one", v, device] + (["nf4"] if nf4 else []),
                               capture_output=True, text=True, check=True)
            runs.setdefault(v, []).append(round(float(r.stdout.strip().splitlines()[-1]) * 1e3, 2))
            print(f"round {k + 1} {v:34s} {runs[v][-1]:6.2f} ms a layer and micro-batch", flush=True)
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "base": "nf4" if nf4 else "fp32",
           "command": f"python bench/layer_host.py {out}" + (" nf4" if nf4 else "") + (f" {rounds}" if rounds > 1 else ""),
           "ms_per_layer": {v: round(statistics.median(x), 2) for v, x in runs.items()}, "rounds": runs}
    out.write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(one(sys.argv[2], "nf4" in sys.argv[4:], sys.argv[3]))
    elif len(sys.argv) > 1:
        main(Path(sys.argv[1]), "nf4" in sys.argv[2:], int(next((a for a in sys.argv[2:] if a.isdigit()), "1")))
    else:
        raise SystemExit(__doc__)
