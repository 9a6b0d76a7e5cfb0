"""Unsloth (2026.10.9, its patched TRL 1.15) GRPO with fast_inference=True: the Unsloth side of the benchmark.

    PYTHONPATH=/root/site_unsloth:/root/site python bench/peers/unsloth_grpo.py MODEL_DIR UTIL OUT.json
Env GRPO_BS (8) GRPO_LEN (256) STEPS (8). Settings as ../shared/device/reference/unsloth_baseline.py.
"""
import os
import sys

os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from unsloth import FastLanguageModel  # noqa: E402  (must come before trl/transformers)

import dataclasses  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import task  # noqa: E402

import torch  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

model_dir, util, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
bs, length, steps = task.env_int("GRPO_BS", 8), task.env_int("GRPO_LEN", 256), task.env_int("STEPS", 8)
t_load = time.time()
model, tok = FastLanguageModel.from_pretrained(model_dir, max_seq_length=128 + length + 128, load_in_4bit=True,
                                               fast_inference=True, max_lora_rank=16, gpu_memory_utilization=util)
model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, random_state=0,
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"],
                                         use_gradient_checkpointing="unsloth")
t_ready = time.time()
fields = {f.name for f in dataclasses.fields(GRPOConfig)}
want = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=bs, gradient_accumulation_steps=1,
            num_generations=8, max_completion_length=length, max_prompt_length=128, learning_rate=1e-5,
            max_steps=steps, logging_steps=1, bf16=True, use_vllm=True, report_to="none", save_strategy="no",
            temperature=1.0, beta=0.0, seed=0)
cfg = GRPOConfig(**{k: v for k, v in want.items() if k in fields})
timer = task.step_timer()
tr = GRPOTrainer(model=model, reward_funcs=task.reward_len, args=cfg, train_dataset=task.prompts_dataset(),
                 processing_class=tok, callbacks=[timer])
tr.train()
gap = [h[k] for h in tr.state.log_history for k in h if "sampling_logp_difference/mean" in k]
task.write_result(out, "unsloth", f"gpu_memory_utilization={util}", timer.ends,
                  dict(dropped=[k for k in want if k not in fields], logp_gap_mean=gap, load_s=round(t_ready - t_load, 1),
                       max_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2)))
