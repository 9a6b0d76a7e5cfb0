"""Checkpoints are atomic, pruned, validated on resume, and restore the exact training state."""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.conftest import tiny_qwen2
from trainer import checkpoint
from trainer.errors import UserError


def _model_opt(steps: int = 2):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_qwen2(vocab=128, hidden=32, layers=1), LoraConfig(r=2, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(steps):
        loss = sum((p ** 2).sum() for p in params) + sum(p.sum() for p in params)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def test_save_and_load_restore_adapter_optimizer_scheduler(tmp_path):
    model, opt, sched = _model_opt()
    path = checkpoint.save(tmp_path, 2, model, opt, sched, {"recipe": "t"}, keep=2)
    want = {k: v.clone() for k, v in model.state_dict().items() if "lora" in k}
    model2, opt2, sched2 = _model_opt(steps=0)  # fresh: no optimizer state, the scheduler at its start
    with torch.no_grad():
        for p in model2.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert not opt2.state and sched2.last_epoch == 0
    state = checkpoint.load(path, model2, opt2, sched2)
    assert state["step"] == 2
    got = {k: v for k, v in model2.state_dict().items() if "lora" in k}
    assert all(torch.equal(want[k], got[k]) for k in want)
    a, b = opt.state_dict()["state"], opt2.state_dict()["state"]  # AdamW's moments and step counts, tensor by tensor
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])
    assert sched2.last_epoch == sched.last_epoch == 2
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] != 0.1  # the scheduled lr, not the initial one


def test_adapter_is_loadable_by_peft(tmp_path):
    from peft import PeftModel

    model, opt, sched = _model_opt()
    path = checkpoint.save(tmp_path, 1, model, opt, sched, {}, keep=1)
    loaded = PeftModel.from_pretrained(tiny_qwen2(vocab=128, hidden=32, layers=1), str(path))
    x = torch.randint(0, 128, (1, 5))
    assert torch.allclose(loaded(x).logits, model(x).logits, atol=1e-6)


def test_only_the_newest_are_kept_and_partials_are_ignored(tmp_path):
    model, opt, sched = _model_opt()
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, model, opt, sched, {}, keep=2)
    root = checkpoint.ckpt_root(tmp_path)
    (root / ".tmp-step-0000004-123").mkdir()  # a crash mid-write leaves only a hidden temp dir
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["step-0000002", "step-0000003"]
    victim = root / "step-0000003" / "adapter_model.safetensors"
    with open(victim, "r+b") as f:  # truncated file: the manifest size no longer matches
        f.truncate(10)
    assert checkpoint.latest(tmp_path).name == "step-0000002"
    with pytest.raises(UserError) as e:
        checkpoint.load(root / "step-0000003", model, opt, sched)
    assert "not a complete checkpoint" in e.value.problem


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = _model_opt()
    checkpoint.save(tmp_path, 1, model, opt, sched, {}, keep=3)
    real_save = torch.save

    def full(obj, f, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError) as e:
        checkpoint.save(tmp_path, 2, model, opt, sched, {}, keep=3)
    monkeypatch.setattr(torch, "save", real_save)
    assert "disk full" in e.value.problem and "step-0000001 is intact" in e.value.problem
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["step-0000001"]
    assert not [p for p in checkpoint.ckpt_root(tmp_path).iterdir() if p.name.startswith(".tmp")]
    manifest = json.loads((checkpoint.latest(tmp_path) / "manifest.json").read_text())
    assert manifest["step"] == 1 and os.path.exists(checkpoint.latest(tmp_path) / "rng.pt")
