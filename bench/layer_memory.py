"""Peak live tensor bytes of one decoder layer's forward + backward on the CPU (eager, LoRA r16 on every linear, bf16),
against the planner's shape count (trainer.memory.layer_activation_bytes): what a layer holds beyond the tensors the
count prices, and which ops made it. No GPU: an indication, not a measurement of the CUDA path (there the layers are
compiled, RMSNorm's fp32 math is fused, and peft's 4-bit layers skip the fp32 cast of the LoRA input under autocast).

    python bench/layer_memory.py [TOKENS] [HIDDEN] [--ops]    # default 4096 512; a Llama-proportioned layer:
                                                               # intermediate 3.5 x hidden, head_dim 128, 4 q per kv head
Prints, for peft's fp32 LoRA (no autocast), LoRA under bf16 autocast (trainer.policy.lora_autocast), and the MLP in
eight tiles (trainer/tiled_mlp.py): the peak in MB and in bytes per (token x hidden), and the untiled shape count.
Counted: every tensor an aten op returns while the layer runs (a TorchDispatchMode), freed when its storage is; the
layer's weights and input are not.
"""
from __future__ import annotations

import collections
import contextlib
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class LiveBytes(TorchDispatchMode):
    """The bytes of the storages aten ops returned that are still alive, its peak, and who held them at the peak."""

    def __init__(self):
        super().__init__()
        self.live, self.who, self.now, self.peak, self.at_peak, self.op = {}, {}, 0, 0, {}, ""

    def _track(self, t):
        if not isinstance(t, torch.Tensor):
            return
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self.live or st.nbytes() == 0:
            return
        self.live[key], self.who[key] = st.nbytes(), (self.op, tuple(t.shape), str(t.dtype).removeprefix("torch."))
        self.now += st.nbytes()
        if self.now > self.peak:
            self.peak, self.at_peak = self.now, {k: (self.who[k], v) for k, v in self.live.items()}
        weakref.finalize(st, self._free, key)

    def _free(self, key):
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.op = str(func).removeprefix("aten.")
        out = func(*args, **(kwargs or {}))
        tree_map(self._track, out)
        return out

    def top(self, n: int = 12) -> list[tuple[float, tuple]]:
        by = collections.Counter()
        for who, nbytes in self.at_peak.values():
            by[who] += nbytes
        return [(v / 1e6, who) for who, v in by.most_common(n)]


def config(tokens: int, hidden: int):
    """A one-layer Llama of these proportions: intermediate 3.5 x hidden, head_dim 128, 4 query heads a KV head."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(3.5 * hidden), num_attention_heads=hidden // 128,
                      num_key_value_heads=max(1, hidden // 512), num_hidden_layers=1, vocab_size=128,
                      max_position_embeddings=tokens)
    cfg._attn_implementation = "sdpa"
    return cfg


def layer(tokens: int, hidden: int):
    from peft import LoraConfig, get_peft_model
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = config(tokens, hidden)

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.rotary = LlamaDecoderLayer(cfg, 0), LlamaRotaryEmbedding(cfg)

        def forward(self, x):
            pos = torch.arange(x.shape[1])[None]
            out = self.layer(x, position_embeddings=self.rotary(x, pos), attention_mask=None, position_ids=pos)
            return out[0] if isinstance(out, tuple) else out

    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(One().to(torch.bfloat16), LoraConfig(r=16, target_modules=targets))
    model.train()
    return model


def peak(tokens: int, hidden: int, tile: int, autocast: bool) -> LiveBytes:
    from trainer.policy import lora_autocast
    from trainer.tiled_mlp import install

    model = layer(tokens, hidden)
    install(model, tile)  # tile 0: the MLP untiled
    x = torch.randn(1, tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
    mode = LiveBytes()
    with mode:
        with lora_autocast(x.device, torch.bfloat16) if autocast else contextlib.nullcontext():
            y = model(x)
        y.float().sum().backward()
    return mode


def main(argv: list[str]) -> None:
    from trainer import memory

    nums = [int(a) for a in argv if not a.startswith("-")]
    tokens, hidden = (nums + [4096, 512][len(nums):])[:2]
    ctx = memory.Context(dims=memory.ModelDims.from_config(config(tokens, hidden).to_dict()), dtype_bytes=2, quantized=False, lora_r=16,
                         lora_targets="all-linear", optim="adamw_torch", cuda=False, engine="hf", max_len=tokens, gen=1,
                         prompt_len=0, completion_len=tokens, ref_pass=False)
    count = memory.layer_activation_bytes(ctx, tokens)
    per = tokens * hidden
    for name, tile, autocast in (("fp32 LoRA", 0, False), ("bf16 autocast", 0, True),
                                 ("bf16 autocast, MLP in 8 tiles", tokens // 8, True)):
        mode = peak(tokens, hidden, tile, autocast)
        print(f"{name:32s} peak {mode.peak / 1e6:7.1f} MB = {mode.peak / per:5.1f} B/(token x hidden); "
              f"shape count (untiled) {count / 1e6:.1f} MB = {count / per:.1f}")
        if "--ops" in argv:
            for mb, who in mode.top():
                print(f"    {mb:7.1f} MB  {who}")


if __name__ == "__main__":
    main(sys.argv[1:])
