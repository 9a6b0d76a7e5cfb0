"""The compiled decoder layers take the batch and length dimensions of their inputs as dynamic from their first
compile (TRAINER_COMPILE_DYNAMIC_DIMS=1), instead of compiling each guard variant static first and again once its
length changes.

Each compiled layer sees several variants (grad mode on / off, its input requiring grad or not, an attention mask
present or dropped because nothing is padded, the adapter disabled for the reference pass). By default Dynamo
compiles a variant for the shape it first meets and again, dynamic, once a length changes; a step of one micro-batch
shows each variant one shape, so the compiles spread over the first steps (on the CPU, tiny recipe, one micro-batch a
step, beta 0.04: 11 graphs in steps 1-3, 41 s; the H100's 1.5B mirror rows spent 10-25 s of steps 3-5 in the train
phase). Marked here, at the decoder stack's entry where the code is eager (only the layers are compiled), each
variant compiles once, dynamic in batch and length and static in every width, as `dynamic=True` is not
(`trainer.policy.COMPILE_DYNAMIC`: rejected, all dimensions dynamic). Sizes 0 and 1 still get graphs of their own
(a micro-batch of one sequence). torch.compiler.config.dynamic_sources would say the same by name, per dimension
only from torch 2.12 on; the device's torch is 2.11.

What is marked: the input embeddings (computed here from input_ids, as the stack would), position ids, the rotary
cos / sin, and the attention masks, built here with the modeling module's own mask functions and handed to the
stack as the mapping it accepts ready-made (transformers 5.x: `create_causal_mask`, `has_sliding_layers`).

TRAINER_COMPILE_DYNAMIC_DIMS=mask marks the masks alone: the first graphs stay static (as the default's), and a
variant's mask follows the length once Dynamo has marked it dynamic; by default the first mask a variant meets is
static and SDPA's guard Eq(88, s) specialises the length back, so the variant compiles again at the next length
(CPU, tiny recipe, 16 x 64, beta 0.04: 9 graphs in steps 1-3 against 12 in steps 1-5).
TRAINER_COMPILE_DYNAMIC_DIMS=mask_always also builds a mask where nothing is padded (HF passes None there and SDPA
takes is_causal, a guard variant of its own that compiles again at each new length until marked): one variant fewer,
SDPA's masked kernel instead of its causal one (tests/test_compile.py, six steps with two unpadded: 16 graphs by
default, 12 with "mask", 8 with "mask_always"; the same log-probs).

`first_input_needs_grad` (apart from the modes): with gradients on, the first layer's
input needs grad as every other layer's does (the embeddings are frozen, so by default it does not), so the layers'
train pass is one guard variant, not two (Dynamo's "requires_grad mismatch" on args[0]: the H200's B row at 14.5 GB
compiled ten forward graphs for it in steps 1-3, 2026-12-06). CPU, tiny recipe, six steps with two unpadded: 16 ->
12 graphs by default, 8 -> 6 with "mask_always"; the same log-probs and LoRA gradients. Its cost is the first
layer's input gradient, computed and dropped. On by default since 2026-12-06 (TRAINER_COMPILE_INPUT_GRAD=0: off): one
H100, B at 14.5 GB, inductor's caches off both sides: 44.1 -> 25.4 s compiling in steps 1-2, steady 2.34 -> 2.33 s,
peak 12.82 -> 12.89 GB.

"all" is off: on one H100 (bench/results/dynamic_dims_ab.json) it saved 5.35 s of config A's first two steps at 6.6 GB
and cost 15.07 s at 3.3 GB, where its dynamic graphs compiled slower. "mask_always" is the plan's where one
micro-batch holds the whole step beside a no-grad pass (beta > 0 or num_iterations > 1; plan.compile_masks, since
2026-12-06: the A/Bs in its docstring), nothing marked elsewhere; TRAINER_COMPILE_DYNAMIC_DIMS, where set, overrides
the plan (0: nothing marked).
"""
from __future__ import annotations

import functools
import sys

import torch

BATCH_AND_LENGTH = (0, 1)
MASK_DIMS = (0, 2, 3)  # [batch, 1, query length, key length]
MODES = ("all", "mask", "mask_always")  # what install marks (TRAINER_COMPILE_DYNAMIC_DIMS: 1 is "all")


def install(backbone: torch.nn.Module, which: str = "all") -> None:
    """Hooks on the decoder stack (not compiled) and its rotary embedding that mark what the layers receive: every
    input ("all"), the attention masks alone ("mask"), or those built even where nothing is padded ("mask_always")."""
    if which not in MODES:
        raise ValueError(f"compile_shapes.install: which={which!r}, expected one of {MODES}")
    backbone.register_forward_pre_hook(functools.partial(_mark_inputs, which=which), with_kwargs=True)
    if which == "all":
        backbone.rotary_emb.register_forward_hook(_mark_outputs)


def first_input_needs_grad(backbone: torch.nn.Module) -> None:
    """With gradients on, the embeddings the first layer takes need grad (as the later layers' inputs do), through a
    zero-size tensor that does: its gradient is dropped there, not kept in a .grad as HF's enable_input_require_grads
    keeps it. With gradients off (reference and old-policy passes) nothing changes."""
    anchors: dict[torch.device, torch.Tensor] = {}

    def hook(module, args, out):
        if not torch.is_grad_enabled() or out.requires_grad:
            return None
        anchor = anchors.get(out.device)
        if anchor is None:
            anchor = anchors[out.device] = torch.empty(0, device=out.device, requires_grad=True)
        return _NeedsGrad.apply(out, anchor)

    backbone.embed_tokens.register_forward_hook(hook)


class _NeedsGrad(torch.autograd.Function):
    """A copy of x, needing grad because `anchor` does; the gradient that reaches it goes nowhere. A copy, not a view:
    Dynamo guards a view input apart from the later layers' inputs (a variant again in the second step on the CPU);
    the original is freed when the hook returns."""

    @staticmethod
    def forward(ctx, x, anchor):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, None


def _dynamic(t: torch.Tensor, dims) -> torch.Tensor:
    for d in dims:
        if d < t.dim():
            torch._dynamo.maybe_mark_dynamic(t, d)  # "maybe": a size of 1 specialises, without an error
    return t


def _mark_inputs(module, args, kwargs, which: str):
    """"all": the embeddings, position ids and masks marked; "mask" / "mask_always": the masks alone (the embeddings
    and positions left to Dynamo, and the inputs left as they came where there is no mask mapping to hand over)."""
    ids = kwargs.get("input_ids")
    if args or ids is None or kwargs.get("inputs_embeds") is not None or kwargs.get("past_key_values") is not None:
        return None  # not a trainer pass (generate's cached decode, positional inputs): left as it came
    embeds, positions = module.embed_tokens(ids), kwargs.get("position_ids")
    if which == "all":
        _dynamic(embeds, BATCH_AND_LENGTH)
        if positions is not None:
            _dynamic(positions, BATCH_AND_LENGTH)
    masks = _masks(module, embeds, kwargs.get("attention_mask"), positions, always=which == "mask_always")
    if masks is None and which != "all":
        return None
    out = {**kwargs, "input_ids": None, "inputs_embeds": embeds}
    if masks is not None:
        out["attention_mask"] = masks
    return (), out


def _masks(module, embeds, mask, positions, always: bool = False) -> dict | None:
    """The stack's own mask mapping, built as its forward builds it, the masks marked; None where this stack's
    modeling module has no such functions (then the stack builds them, unmarked). always: a mask even where nothing
    is padded (HF would pass None and let SDPA take is_causal: a guard variant of its own)."""
    modeling = sys.modules[type(module).__module__]
    make = getattr(modeling, "create_causal_mask", None)
    if make is None or isinstance(mask, dict):
        return None
    kw = {"config": module.config, "inputs_embeds": embeds, "attention_mask": mask, "past_key_values": None,
          "position_ids": positions}
    if always:
        kw["allow_is_causal_skip"] = False
    masks = {"full_attention": make(**kw)}
    if getattr(module, "has_sliding_layers", False):
        masks["sliding_attention"] = modeling.create_sliding_window_causal_mask(**kw)
    for m in masks.values():
        if isinstance(m, torch.Tensor) and m.dim() == 4:
            _dynamic(m, MASK_DIMS)
    return masks


def _mark_outputs(module, args, output):
    for t in output if isinstance(output, tuple) else (output,):
        if isinstance(t, torch.Tensor):
            _dynamic(t, BATCH_AND_LENGTH)
    return output
