"""Export a run: its adapter merged into the dequantized base as a standard Hugging Face checkpoint, or the peft
adapter alone, each with a model card; it reads checkpoints and never writes into the run.

The merge starts from the base exactly as the trainer held it: loaded and quantized (nf4) by the same code as the
policy, at the run's compute dtype, then dequantized by bitsandbytes. Each LoRA-wrapped weight becomes
W + scale * B @ A in float32 and is rounded once to the output dtype (bfloat16 by default), so the exported model
is the trained policy up to that one rounding. The result is plain safetensors + config.json +
generation_config.json + tokenizer, with tied embeddings written once, as transformers and vLLM load them.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from trainer import checkpoint
from trainer.errors import UserError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def run_recipe(run_dir: Path):
    """The validated recipe a run was trained with (runs/<name>/recipe.json)."""
    from trainer.recipe import validate

    path = Path(run_dir) / "recipe.json"
    if not path.is_file():
        raise UserError("run dir", f"{run_dir} has no recipe.json", "give the directory of a run, e.g. runs/tiny-cpu")
    return validate(json.loads(path.read_text()))


def trained_policy(run_dir: Path, ckpt: Path):
    """The run's policy (peft model over its quantized base) with the checkpoint's adapter, on this machine.

    No rollout engine: the base is loaded by the HF path at the compute dtype and quantization the run used.
    """
    from trainer.plan import Device, make_plan, run_plan
    from trainer.policy import load_policy, read_config

    recipe = run_recipe(run_dir).model_copy(deep=True)
    recipe.rollout.engine, recipe.budget.vram_gb = "hf", None  # only the weights are needed
    plan = make_plan(read_config(recipe.model), recipe, Device.detect())
    ran = run_plan(run_dir)
    if ran is not None:  # the base must be quantized from the dtype the run used
        plan = dataclasses.replace(plan, compute_dtype=ran["compute_dtype"], quantized=ran["quantized"],
                                   gradient_checkpointing=False)
    policy = load_policy(recipe, plan)
    checkpoint.load_adapter(ckpt, policy.model)
    policy.model.eval()
    return recipe, policy


@torch.no_grad()
def merged_state_dict(peft_model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The base's tensors under their HF names, each LoRA delta merged in float32, rounded once to `dtype`, on the
    host. Each goes to the host as it is made: keeping them on the device until the end held a bf16 copy of the whole
    model beside its nf4 base (by arithmetic, an 8B's 16 GB on ~6 GB: the edge of a 24 GB card)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from peft.tuners.lora import LoraLayer
    from peft.utils import transpose

    base = peft_model.get_base_model()
    out: dict[str, torch.Tensor] = {}

    def put(key: str, t: torch.Tensor) -> None:  # to the host at once: the device holds one layer's merge at a time
        out[key] = t.detach().to(dtype).cpu().contiguous()

    for name, mod in base.named_modules():
        if name.endswith(".base_layer") or "lora_" in name:
            continue  # inside a LoRA wrapper: handled with the wrapper
        if isinstance(mod, LoraLayer):
            layer = mod.get_base_layer()
            w = _dense(layer, F, bnb)
            for adapter in mod.active_adapters:
                if adapter in mod.lora_A:  # W + scale * B @ A, in float32 whatever the adapter's dtype
                    ba = mod.lora_B[adapter].weight.float() @ mod.lora_A[adapter].weight.float()
                    w += mod.scaling[adapter] * transpose(ba, getattr(mod, "fan_in_fan_out", False))
                elif adapter in getattr(mod, "lora_embedding_A", {}):
                    w += mod.get_delta_weight(adapter).float()
            put(f"{name}.weight", w)
            if getattr(layer, "bias", None) is not None:
                put(f"{name}.bias", layer.bias)
        elif isinstance(mod, bnb.nn.Linear4bit):
            put(f"{name}.weight", _dense(mod, F, bnb))
            if mod.bias is not None:
                put(f"{name}.bias", mod.bias)
        else:
            for pname, p in mod.named_parameters(recurse=False):
                put(f"{name}.{pname}" if name else pname, p)
    if base.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)  # tied: the embedding is the output layer
    return out


def _dense(layer, F, bnb) -> torch.Tensor:
    """A base layer's weight in float32 (bitsandbytes' dequantization for a 4-bit one)."""
    if isinstance(layer, bnb.nn.Linear4bit):
        return F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    return layer.weight.detach().float().clone()


def export_merged(run_dir: Path, out: Path, step: int | None = None, dtype: str = "bfloat16") -> Path:
    """Write the merged model of a run's checkpoint to `out` (a new or empty directory); returns `out`."""
    from huggingface_hub import save_torch_state_dict
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    ckpt = checkpoint.find(run_dir, step)
    out = _empty_dir(out, "--merged")
    recipe, policy = trained_policy(run_dir, ckpt)
    torch_dtype = getattr(torch, dtype)
    state = merged_state_dict(policy.model, torch_dtype)
    trust = recipe.model.trust_remote_code
    config = AutoConfig.from_pretrained(policy.path, trust_remote_code=trust)
    config.dtype = torch_dtype
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    save_torch_state_dict(state, str(out))
    config.save_pretrained(out)
    try:
        gen = GenerationConfig.from_pretrained(policy.path)
    except OSError:
        gen = GenerationConfig.from_model_config(config)
    gen.save_pretrained(out)
    AutoTokenizer.from_pretrained(policy.path, trust_remote_code=trust).save_pretrained(out)
    (out / "README.md").write_text(model_card(recipe, run_dir, ckpt, merged=True, dtype=dtype))
    return out


def export_adapter(run_dir: Path, out: Path, step: int | None = None) -> Path:
    """Copy a checkpoint's peft adapter (adapter_config.json + adapter_model.safetensors) and a model card."""
    ckpt = checkpoint.find(run_dir, step)
    out = _empty_dir(out, "--adapter")
    for name in ADAPTER_FILES:
        shutil.copy2(ckpt / name, out / name)
    (out / "README.md").write_text(model_card(run_recipe(run_dir), run_dir, ckpt, merged=False))
    return out


def _empty_dir(out: Path, flag: str) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(flag, f"{out} exists and is not an empty directory", "give a new directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def final_rewards(run_dir: Path) -> dict:
    """The run's last logged numbers: step, mean reward over the last 10 steps, per-function means, last eval."""
    from trainer.metrics import read_metrics

    if not (Path(run_dir) / "metrics.jsonl").is_file():
        return {}
    lines = read_metrics(run_dir)
    if not lines:
        return {}
    last = lines[-10:]
    out = {"step": lines[-1]["step"], "reward_mean_last10": sum(m["reward_mean"] for m in last) / len(last)}
    out.update({k: v for k, v in lines[-1].items() if k.startswith("rewards/") and k.endswith("/mean")})
    evals = [m for m in lines if any(k.startswith("eval/") for k in m)]
    if evals:
        out["eval_step"] = evals[-1]["step"]
        out.update({k: v for k, v in evals[-1].items() if k.startswith("eval/") and k != "eval/time_s"})
    return out


def model_card(recipe, run_dir: Path, ckpt: Path, merged: bool, dtype: str = "bfloat16") -> str:
    """README.md for the export: what it is, how it was trained (the recipe), its final rewards, how to load it."""
    import yaml

    state = json.loads((ckpt / "state.json").read_text()) if (ckpt / "state.json").is_file() else {}
    step = state.get("step", "?")
    base = recipe.model.name or f"random-init shape {recipe.model.shape!r} (seed {recipe.model.seed})"
    rewards = final_rewards(run_dir)
    front = {"library_name": "transformers" if merged else "peft", "tags": ["grpo", "lora", "trainer"]}
    if recipe.model.name and not Path(recipe.model.name).expanduser().exists():
        front["base_model"] = recipe.model.name
    kind = (f"the LoRA adapter merged into the base (dequantized from nf4, merged in float32, saved in {dtype})"
            if merged else "the LoRA adapter alone (peft format)")
    load = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(PATH)\ntokenizer = AutoTokenizer.from_pretrained(PATH)"
            if merged else
            "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
            f"base = AutoModelForCausalLM.from_pretrained({str(recipe.model.name or 'BASE')!r})\n"
            "model = PeftModel.from_pretrained(base, PATH)")
    d = recipe.data
    chat = d.chat_template if d.chat_template is not None else "the tokenizer's, when it has one"
    fmt = [f"- chat template: {chat}",
           f"- system prompt: {d.system_prompt!r}" if d.system_prompt else "- system prompt: none",
           f"- prompt template: {d.prompt_template!r}" if d.prompt_template
           else f"- prompt column: {d.prompt_column!r}"]
    shown = {k: v for k, v in recipe.model_dump(mode="json", exclude_none=True).items() if k != "base_dir"}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {recipe.name}: GRPO + LoRA", "",
             f"This is {kind}, from checkpoint step {step} of run `{Path(run_dir).name}`, trained by "
             f"`trainer` (GRPO + LoRA on a 4-bit base).", "",
             f"- base model: {base}", f"- LoRA: r={recipe.lora.r}, alpha={recipe.lora.lora_alpha}, "
             f"target modules {recipe.lora.target_modules}",
             f"- GRPO: loss {recipe.grpo.loss_type}, {recipe.grpo.num_generations} generations per prompt, "
             f"beta {recipe.grpo.beta}, {recipe.train.max_steps} steps planned, "
             f"learning rate {recipe.train.learning_rate}",
             "- rewards: " + ", ".join(f"{r.name or r.function} (weight {r.weight})" for r in recipe.rewards), "",
             "## Prompt format", "", *fmt, "", "## Final rewards (metrics.jsonl)", ""]
    lines += (["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                                                      for k, v in rewards.items()]) if rewards else ["(no metrics)"]
    lines += ["", "## Load", "", "```python", "PATH = \"path/to/this/directory\"", load, "```", "",
              "## Recipe", "", "```yaml", yaml.safe_dump(shown, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)
