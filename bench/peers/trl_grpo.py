"""TRL 1.16 GRPOTrainer with its colocated vLLM, nf4 + LoRA r16 all-linear: the TRL side of the benchmark.

    python bench/peers/trl_grpo.py MODEL_DIR UTIL OUT.json      # env GRPO_BS (8) GRPO_LEN (256) STEPS (8)
Settings as ../shared/device/reference/trl_baseline.py (the measurement the issue quotes).
"""
import dataclasses
import os
import sys
import tempfile

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import task  # noqa: E402

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

model_dir, util, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
bs, length, steps = task.env_int("GRPO_BS", 8), task.env_int("GRPO_LEN", 256), task.env_int("STEPS", 8)
fields = {f.name for f in dataclasses.fields(GRPOConfig)}
want = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=bs, gradient_accumulation_steps=1,
            num_generations=8, max_completion_length=length, max_prompt_length=128, learning_rate=1e-5,
            max_steps=steps, logging_steps=1, bf16=True, gradient_checkpointing=True,
            use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=util,
            report_to="none", save_strategy="no", temperature=1.0, beta=0.0, seed=0)
cfg = GRPOConfig(**{k: v for k, v in want.items() if k in fields})
model = AutoModelForCausalLM.from_pretrained(
    model_dir, dtype=torch.bfloat16,
    quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True))
timer = task.step_timer()
tr = GRPOTrainer(model=model, reward_funcs=task.reward_len, args=cfg, train_dataset=task.prompts_dataset(),
                 processing_class=AutoTokenizer.from_pretrained(model_dir),
                 peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
                 callbacks=[timer])
tr.train()
gap = [h[k] for h in tr.state.log_history for k in h if "sampling_logp_difference/mean" in k]
task.write_result(out, "trl", f"vllm_gpu_memory_utilization={util}", timer.ends,
                  dict(dropped=[k for k in want if k not in fields], logp_gap_mean=gap,
                       max_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
                       completion_length=[h.get("completions/mean_length") for h in tr.state.log_history
                                          if "completions/mean_length" in h]))
