"""float16 compute (a T4) scales the loss: the LoRA gradient comes back to float32's, the scale follows
torch.amp.GradScaler's rule, an overflow skips one update without stopping the run, and a resume keeps the scale."""
from __future__ import annotations

import json

import torch

from bench.fp16_grad import compare, lora_grads, lora_model, random_batch
from tests.conftest import run_train
from trainer.loss_scale import LossScale


def test_scaled_float16_gradient_matches_float32_where_unscaled_does_not():
    # 64 x 128 completion tokens: each token weighs 1/8192 in the loss, the float16 backward underflows without
    # the scale (1.8% off float32 on this CPU, 0.5% of lora_A entries zero) and not with it (0.08%)
    model, batch = lora_model(256, 64, 2), random_batch(256, 64, 128)
    ref = lora_grads(model, batch, torch.float32, None)
    unscaled = compare(ref, lora_grads(model, batch, torch.float16, None))
    scaled = compare(ref, lora_grads(model, batch, torch.float16, LossScale(True)))
    assert scaled["rel_err"] < 0.003 and scaled["lora_A_zero_frac"] == 0.0, scaled
    assert unscaled["rel_err"] > 5 * scaled["rel_err"], (unscaled, scaled)


def test_scale_follows_grad_scalers_rule():
    """The same overflow pattern through torch.amp.GradScaler and LossScale gives the same scale after every step."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.0)
    torch_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=3)
    ours = LossScale(True, growth_interval=3)
    pattern = [1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1]  # 1: finite gradient, 0: overflow
    for finite in pattern:
        torch_scaler.scale(torch.ones(()))  # GradScaler starts its scale on the first loss it scales
        p.grad = torch.full((3,), 1.0 if finite else float("inf"))
        torch_scaler.unscale_(opt)
        torch_scaler.step(opt)
        torch_scaler.update()
        ours.update(bool(finite))
        assert ours.scale == torch_scaler.get_scale()
        assert ours.overflowed == (not finite)


def test_unscale_divides_gradients_exactly_and_off_is_a_plain_backward():
    w = torch.nn.Parameter(torch.tensor([3.0, -5.0]))
    on = LossScale(True)
    on.backward((w * w).sum())
    assert torch.equal(w.grad, torch.tensor([6.0, -10.0]) * 2 ** 16)
    on.unscale([w])
    assert torch.equal(w.grad, torch.tensor([6.0, -10.0]))
    w.grad = None
    off = LossScale(False)
    off.backward((w * w).sum())
    off.unscale([w])
    off.update(False)
    assert torch.equal(w.grad, torch.tensor([6.0, -10.0])) and off.scale == 2 ** 16 and not off.overflowed


def test_overflow_at_scale_one_is_not_an_overflow():
    s = LossScale(True, init=2.0)
    s.update(False)
    assert s.overflowed and s.scale == 1.0
    s.update(False)  # non-finite without any scale to blame: the model's, counted as a bad step by the loop
    assert not s.overflowed and s.scale == 0.5


def test_float16_run_scales_its_loss_and_checkpoints_the_scale_float32_does_not(tmp_path):
    runs = {}
    for dtype in ("float16", "float32"):
        out = run_train(["recipes/tiny-cpu.yaml", "--set", f"model.dtype={dtype}", "--set", "train.max_steps=2",
                         "--set", "checkpoint.save_steps=2", "--set", "eval=null", "--output-dir", str(tmp_path / dtype)])
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert ("float16: the loss is scaled" in out.stdout) == (dtype == "float16")
        m = [json.loads(x) for x in (tmp_path / dtype / "metrics.jsonl").read_text().splitlines()]
        state = json.loads(next((tmp_path / dtype).glob("checkpoints/step-*/state.json")).read_text())
        runs[dtype] = m, state
        # the start-up range check (trainer/fp16_range.py) ran in float16 only, and found the tiny model's headroom
        seen = json.loads((tmp_path / dtype / "engine.json").read_text()).get("float16_largest_activation")
        assert (seen is not None) == (dtype == "float16"), seen
        assert seen is None or (seen["finite"] and 0 < seen["max_abs"] < 65504 and seen["layer"] in (0, 1)), seen
    (m16, state16), (m32, state32) = runs["float16"], runs["float32"]
    assert [x["loss_scale"] for x in m16] == [2.0 ** 16] * 2 and [x["loss_scale_overflow"] for x in m16] == [0, 0]
    assert state16["loss_scale"] == {"scale": 2.0 ** 16, "good_steps": 2}
    assert "loss_scale" not in m32[0]
    # the norm is taken after the scale is divided out: the same size as float32's (2**16 off if either half of
    # scale-then-unscale were missing; the two runs sample different completions, hence the factor)
    assert 0.5 < m16[0]["grad_norm"] / m32[0]["grad_norm"] < 2, (m16[0]["grad_norm"], m32[0]["grad_norm"])
    # a resume takes the checkpoint's scale (edited to another of the same length: the manifest holds file sizes)
    path = next((tmp_path / "float16").glob("checkpoints/step-*/state.json"))
    text = path.read_text()
    path.write_text(text.replace('"scale": 65536.0', '"scale": 32768.0'))
    assert path.read_text() != text
    out = run_train(["recipes/tiny-cpu.yaml", "--set", "model.dtype=float16", "--set", "train.max_steps=3",
                     "--set", "checkpoint.save_steps=2", "--set", "eval=null", "--output-dir", str(tmp_path / "float16"),
                     "--resume"])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    m = [json.loads(x) for x in (tmp_path / "float16" / "metrics.jsonl").read_text().splitlines()]
    assert m[-1]["step"] == 3 and m[-1]["loss_scale"] == 32768.0
