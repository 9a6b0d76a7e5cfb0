"""`train export`: the merged model is the trained policy (base + adapter) up to one bf16 rounding of each weight,
in a layout transformers (and vLLM) load; the adapter alone loads in peft; steps and mistakes are checked first."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, run_train


def _reference(run_dir, ckpt):
    """The trained policy as the trainer computes it: the run's nf4 base (float32 compute) + the checkpoint's
    adapter through peft, with bitsandbytes' CPU inference repacking off (as trainer.policy keeps it)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from trainer.policy import keep_cpu_4bit_trainable
    from trainer.shapes import model_dir

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                           bnb_4bit_use_double_quant=True, bnb_4bit_quant_storage=torch.uint8)
    base = AutoModelForCausalLM.from_pretrained(model_dir("tiny", 0), dtype=torch.float32, quantization_config=q,
                                                device_map={"": "cpu"})
    keep_cpu_4bit_trainable(base)
    return PeftModel.from_pretrained(base, str(ckpt)).eval()


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    a = run_train(["export", str(trained_run), "--merged", str(out / "bf16"), "--adapter", str(out / "adapter")])
    assert a.returncode == 0, a.stdout[-3000:] + a.stderr[-3000:]
    b = run_train(["export", str(trained_run), "--merged", str(out / "fp32"), "--dtype", "float32"])
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    return out


IDS = torch.randint(3, 380, (4, 24), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def test_merged_model_equals_base_plus_adapter_within_bf16_rounding(trained_run, exported):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ref = _reference(trained_run, trained_run / "checkpoints" / "step-0000004")
    want = _logits(ref)
    with ref.disable_adapter():
        base_only = _logits(ref)
    fp32 = AutoModelForCausalLM.from_pretrained(exported / "fp32", dtype=torch.float32).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(exported / "bf16", dtype=torch.float32).eval()
    # The merge itself is exact: W_dequant + scale * B @ A in float32 gives the peft model's logits.
    assert (_logits(fp32) - want).abs().max() < 1e-3
    # The bf16 export is that merge rounded once per weight, nothing else ...
    w16 = load_file(str(exported / "bf16" / "model.safetensors"))
    w32 = load_file(str(exported / "fp32" / "model.safetensors"))
    assert w16.keys() == w32.keys() and all(w16[k].dtype == torch.bfloat16 for k in w16)
    assert all(torch.equal(w16[k], w32[k].to(torch.bfloat16)) for k in w16)
    # ... so its logits are the policy's up to bf16 weight rounding, far closer than the base without the adapter.
    rel = float((_logits(bf16) - want).norm() / want.norm())
    assert rel < 1e-2, rel
    assert float((base_only - want).norm() / want.norm()) > 10 * rel


def test_merged_checkpoint_is_a_standard_hf_checkpoint(trained_run, exported):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    out = exported / "bf16"
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config and config["tie_word_embeddings"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # tied: written once
    assert not any("lora_" in k or "base_layer" in k or "absmax" in k for k in keys)
    assert (out / "generation_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("write only digits")["input_ids"]
    card = (out / "README.md").read_text()
    assert "step 4" in card and "eval/rewards/char_class_all/pass@4" in card and "char_class_fraction" in card
    assert "```yaml" in card and "num_generations: 8" in card


def test_adapter_export_loads_in_peft_and_is_the_trained_adapter(trained_run, exported):
    ref = _reference(trained_run, trained_run / "checkpoints" / "step-0000004")
    mine = _reference(trained_run, exported / "adapter")
    assert sorted(p.name for p in (exported / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert torch.equal(_logits(mine), _logits(ref))


def test_export_picks_the_step_and_refuses_mistakes_before_loading(trained_run, tmp_path, no_weights, capsys):
    from trainer import cli

    def export(*args):
        return cli.main(["export", *map(str, args)]), capsys.readouterr().out

    code, text = export(trained_run, "--step", "3", "--adapter", tmp_path / "a")
    assert code == 2 and "steps: 2, 4" in text, text
    code, text = export(trained_run, "--step", "2", "--adapter", tmp_path / "a")  # an adapter copy loads no weights
    assert code == 0, text
    assert "step 2 " in (tmp_path / "a" / "README.md").read_text()
    code, text = export(trained_run, "--adapter", tmp_path / "a")  # not empty now
    assert code == 2 and "not an empty directory" in text
    code, text = export(tmp_path / "no-run", "--merged", tmp_path / "m")
    assert code == 2 and "not found" in text
    code, text = export(trained_run, "--step", "3", "--merged", tmp_path / "m")
    assert code == 2 and "steps: 2, 4" in text
    code, text = export(trained_run)
    assert code == 2 and "--merged" in text
    assert no_weights == []


VLLM_DECODE = """
import json, sys
from trainer.rollout.vllm import import_vllm
vllm = import_vllm()
llm = vllm.LLM(model=sys.argv[1], dtype="float32", max_model_len=64, enforce_eager=True,
               kv_cache_memory_bytes=64 << 20, gpu_memory_utilization=0.05)
out = llm.generate([{"prompt_token_ids": json.loads(sys.argv[2])}],
                   vllm.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
print("TOKENS", json.dumps(list(out[0].outputs[0].token_ids)))
"""


@pytest.mark.slow
def test_vllm_loads_the_merged_model_and_decodes_as_transformers(exported):
    if os.environ.get("TRAINER_REQUIRE_VLLM") != "1":
        pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM

    path = exported / "fp32"
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = [5, 17, 42, 99, 7]
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, 5:].tolist()
    out = subprocess.run([sys.executable, "-c", VLLM_DECODE, str(path), json.dumps(prompt)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("TOKENS"))[len("TOKENS"):])
    assert got == want
