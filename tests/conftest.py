"""Shared fixtures: tiny random-init Qwen2 models and tokenizers built in seconds, no hub."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
# torch.compile's cache in one directory under /tmp that the xdist workers and the processes tests start share, not
# ~/.cache/trainer/torch_compile (trainer/compile_cache.py, which keeps a directory the environment chose): tests
# write nothing to home
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "trainer_tests_torchinductor"))


# Under pytest-xdist (README's `-n auto --maxprocesses 4 --dist loadfile`): a file's tests run on one worker, so its
# module fixtures (an engine, a model, a Slurm cluster on its fixed ports) are built once and never twice at a time.
# (`--dist loadgroup` does not group under pytest 9.2: xdist 3.8 renames item._nodeid, which pytest no longer reads.)
# Each worker, and every process a test starts, runs torch on one thread: two workers of two threads each on two
# cores spin-wait against each other (a Slurm test went 20x slower that way).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """Keep built shapes in one per-session cache unless the caller set TRAINER_CACHE."""
    if "TRAINER_CACHE" not in os.environ:
        os.environ["TRAINER_CACHE"] = str(tmp_path_factory.mktemp("trainer-cache"))
    yield


@pytest.fixture(scope="session", autouse=True)
def _scratch_room():
    """In-process plans see ample scratch space in this machine's scratch directories (trainer.plan.scratch_space):
    the tests' H100s and H200s stand for GPU machines, and a plan must not turn on how full this machine's /dev/shm
    or /tmp is. Tests of the room check patch scratch_space themselves; processes a test starts see the real one."""
    from trainer import plan

    real = plan.scratch_space
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plan, "scratch_space", lambda: {d: 10**13 for d in real()})
        yield real


@pytest.fixture(scope="session")
def tiny_model_dir(_cache) -> Path:
    from trainer.shapes import model_dir

    return model_dir("tiny", 0)


def tiny_qwen2(vocab: int = 256, hidden: int = 64, layers: int = 2, seed: int = 0, dtype=torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512,
                      tie_word_embeddings=True, initializer_range=0.1)
    return Qwen2ForCausalLM(cfg).to(dtype)


@contextlib.contextmanager
def kept_for_backward(owned=()):
    """What autograd saves for the backward inside the block, other than the storages of the `owned` tensors (a
    model's own weights): {storage address: bytes}, each storage once; sum(.values()) is what the backward holds."""
    skip = {t.untyped_storage().data_ptr() for t in owned}
    kept: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield kept


def run_train(args: list[str], cwd: Path = ROOT, env: dict | None = None, timeout: int = 600):
    """Run the `train` entry point in a subprocess, as users do."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "trainer.cli", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


# The run that the eval, export and generate tests share: the tiny recipe for 4 steps (checkpoints at 2 and 4),
# with its eval section every 2 steps and LoRA dropout on (so an evaluation that left the model in eval mode would
# change training: test_evaluate compares it with the same run without eval).
TRAINED_RUN_ARGS = ["recipes/tiny-cpu.yaml", "--set", "train.max_steps=4", "--set", "checkpoint.save_steps=2",
                    "--set", "lora.lora_dropout=0.1", "--set", "logging.wandb=false"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, _cache) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    out = run_train([*TRAINED_RUN_ARGS, "--set", "eval.every_steps=2", "--output-dir", str(run)])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run


def trl_loss_and_grads(trainer, model, inputs) -> tuple[list, torch.Tensor, list]:
    """TRL's GRPO loss on `inputs` and the gradients it gives: (trainable params, loss, their grads); grads zeroed
    after, so the caller's own backward starts clean."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    grads = [p.grad.clone() for p in params]
    model.zero_grad()
    return params, loss, grads


@pytest.fixture
def no_weights(monkeypatch, tmp_path) -> list:
    """Every way a command loads or builds weights raises instead (and TRAINER_CACHE is empty, so a shape built
    anyway would show in it): for tests that a mistake is reported, or a plan printed, before anything loads. The
    list collects what was attempted."""
    from trainer import api, grpo, policy, shapes

    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path / "empty-cache"))
    tried: list = []

    def forbidden(name):
        def spy(*a, **k):
            tried.append(name)
            raise AssertionError(f"{name} ran: weights loaded")
        return spy

    for module, name in ((policy, "load_policy"), (grpo, "load_policy"), (grpo, "make_engine"),
                         (api, "load_trained"), (shapes, "build")):
        monkeypatch.setattr(module, name, forbidden(f"{module.__name__}.{name}"))
    return tried


def vllm_split_scope():
    """vLLM's Worker._scoped_allocator_max_split as shipped: kept aside as _vllm_split_scope where an engine started in
    this process already replaced it (trainer/rollout/vllm_internals.py keep_allocator_split_limit)."""
    from vllm.v1.worker import gpu_worker

    scopes = vars(gpu_worker.Worker)
    return scopes.get("_vllm_split_scope", scopes["_scoped_allocator_max_split"])
