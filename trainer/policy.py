"""The policy: a frozen (4-bit nf4) base with trainable LoRA adapters, and its per-token log-probabilities.

The reference policy for the KL term is the same model with the adapter disabled: no second copy of the base.
Log-probabilities go through TRL's `ChunkedLogProbFunction`, which projects hidden states onto the vocabulary in
tiles and never materialises the [batch, seq, vocab] logits (on CUDA it folds tiles with a Triton kernel).
This module never decides memory knobs: chunk sizes and checkpointing come from the Plan.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer import compile_shapes, hub
from trainer.errors import UserError
from trainer.plan import checkpoint_in_graph, sampler_rounding_applies

# torch.compile's shape handling for the decoder layers. None (default): a first graph for the first micro-batch's
# shape, then recompiles as lengths change until the dimensions are marked dynamic (every H200 planner run of
# 2026-12-03 spent 7-10 s more in step 2 than in steps 3-5). True (TRAINER_COMPILE_DYNAMIC=1): dynamic from the first
# compile. Rejected on the H200 (bench/results/compile_ab.json, config A at 6.6 GB, alternated in one sitting): its
# first step took 87.4 s against the default's 14.2 + 11.5 s for the first two, and steady steps were 3% slower
# (1.30 vs 1.26 s). Kept as a switch for shapes that change more than GRPO's lengths do.
COMPILE_DYNAMIC = True if os.environ.get("TRAINER_COMPILE_DYNAMIC") == "1" else None
# One compiled layer sees up to ~16 guard variants: grad mode on / off (train vs reference and old-policy passes),
# its input requiring grad or not (the first layer's does not), the adapter disabled (the reference pass), the
# attention mask None or a tensor (HF drops it when no sequence is padded), each first static, then dynamic in its
# lengths. torch's recompile_limit (8 by default; vLLM 0.26 sets 16 when it imports its flex_attention backend) was hit
# in step 2 of the H200's 1.5B num_iterations 2 + beta row (2026-12-03); every variant after it runs eager, and that
# row's train + recompute took 11.2 s a step against 3.6 predicted. On the CPU the same mix of passes settles at 15
# graphs; 64 leaves room. Policy.hidden_states raises the limit before each pass: set once at load it was back at 16
# in the next H200 run (vLLM's import comes later), which hit it again.
LAYER_RECOMPILE_LIMIT = 64
# TRAINER_COMPILE_DYNAMIC_DIMS=1: the layers' inputs marked dynamic in batch and length from the first compile
# (trainer/compile_shapes.py), so each guard variant compiles once. On the CPU (tiny recipe, one micro-batch a step,
# beta 0.04, 12 steps): 6 graphs in steps 1-2 (11.8 s) against 11 in steps 1-3 (41 s), the same losses. On an H100
# (bench/results/dynamic_dims_ab.json, 2026-12-05) no consistent win: config A at 6.6 GB's first two steps 5.35 s
# shorter, at 3.3 GB 15.07 s longer (dynamic graphs compiled slower), steady train x1.04 / x0.82; neither default run
# recompiled after step 2 there. Off. TRAINER_COMPILE_DYNAMIC_DIMS=mask: the attention masks alone marked, the first
# graphs static as the default's; a variant's mask then follows the length Dynamo marks dynamic instead of
# specialising it back (CPU, the 16 x 64 beta shape: 9 graphs in steps 1-3 against 12 in steps 1-5). Off until the
# GPU A/B (docs/benchmarks.md, 2026-12-05 22:40). TRAINER_COMPILE_DYNAMIC_DIMS=mask_always: as "mask", and a mask
# built where nothing is padded, so that micro-batch is no variant of its own (CPU: 8 graphs against "mask"'s 12).
# Unset, the plan decides (plan.compile_masks: "mask_always" where one micro-batch holds the whole step beside a
# reference or old-policy pass, since 2026-12-06, the A/Bs in plan._compile_masks; nothing marked elsewhere);
# TRAINER_COMPILE_DYNAMIC_DIMS=0 marks nothing whatever the plan says.
COMPILE_DIMS_SETTINGS = {"1": "all", "0": "", **{m: m for m in compile_shapes.MODES if m != "all"}}
COMPILE_DYNAMIC_DIMS = COMPILE_DIMS_SETTINGS.get(os.environ.get("TRAINER_COMPILE_DYNAMIC_DIMS", ""))
# The first layer's input needs grad in the train pass as the others' do, one guard variant fewer
# (compile_shapes.first_input_needs_grad; CPU 16 -> 12 graphs in six steps). On by default since 2026-12-06: on one
# H100, B (64 x 512) at 14.5 GB, inductor's caches off on both sides, compiling in steps 1-2 44.1 -> 25.4 s, steady
# step 2.34 -> 2.33 s, peak 12.82 -> 12.89 GB (plan 13.42; bench/results/queue_2026-12-06/b). TRAINER_COMPILE_INPUT_GRAD=0
# turns it off.
COMPILE_INPUT_GRAD = os.environ.get("TRAINER_COMPILE_INPUT_GRAD", "1") != "0"
# Where the checkpoint sits when the layers are compiled (plan.checkpoint_in_graph, the planner's choice since
# 2026-12-05; train.checkpoint_in_graph: false keeps HF's). HF's: torch.utils.checkpoint around each compiled
# layer call; the backward calls the compiled forward again from Python, and the non-reentrant checkpoint's hooks run
# in Python for every tensor the compiled layer saves. In graph: the checkpoint inside each layer's compiled graph
# (Dynamo traces torch.utils.checkpoint; AOTAutograd's backward recomputes the layer in the same compiled backward),
# one compiled forward and one backward a layer from Python. CPU host time (bench/layer_host.py, ms a layer and
# micro-batch, HF's -> in graph): nf4 4.47 -> 2.25, fp32 2.93 -> 1.33. On the H200 the layers then keep more for the
# backward than HF's checkpoint (~4 bytes a token x (hidden + intermediate) a layer on the nf4 base: the partitioner
# saves what it cannot recompute; memory.CKPT_IN_GRAPH_BYTES) and train faster: bench/results/ckpt_in_graph_ab.json.
# Not with activation offload or the tiled MLP, which bring their own checkpoint.
# The nf4 base layers inside the compiled layers. Default: bitsandbytes' Linear4bit, whose 4-bit ops are opaque custom
# ops with Python implementations in the graph (~107 us of host time a call on the H200, 2026-12-04).
# TRAINER_NF4_TRACED=1: trainer/nf4_linear.py's layers, the same values as torch ops that inductor compiles. CPU host
# time (bench/layer_host.py nf4), bitsandbytes -> traced: checkpoint in graph 2.25 -> 1.59 ms. On the H200 (the same
# ladder, on top of the checkpoint in graph): steady step 2.84 -> 2.68 s (train 1.46 -> 1.31), peak 3.16 GB; not
# measured on HF's checkpoint alone, so not the default yet.
NF4_TRACED = os.environ.get("TRAINER_NF4_TRACED") == "1"
# The trainer's RMSNorm, rotary and 4-bit q/k/v bias round where vLLM's CUDA kernels do (trainer/sampler_rounding.py),
# for the sampler/trainer log-prob gap: where the plan says (Plan.sampler_rounding: the trainer on the mirror's rows,
# plan.SAMPLER_ROUNDING_LINEARS has the A/Bs); TRAINER_SAMPLER_ROUNDING=1 / 0 turns it on / off wherever it applies
SAMPLER_ROUNDING = {"1": True, "0": False}.get(os.environ.get("TRAINER_SAMPLER_ROUNDING", ""))
# The compiled layers round to bf16 where eager PyTorch does. Inductor's default drops the bf16 down/up-cast pairs
# between the pointwise ops it fuses (norm, rotary, SiLU x up, residual adds, LoRA's scaling) and lets FMAs contract,
# so a compiled layer computed other numbers than HF's eager one, whose per-op rounding vLLM's kernels follow: on the
# H200 (bench/results/fidelity.json, 2026-12-03) the compiled layers added 5% (1.5B) and 9% (7B) to the
# sampler/trainer gap. With inductor's `emulate_precision_casts` a compiled bf16 Qwen2 equals eager bit for bit on
# the CPU (0.11 apart in the logits without; tests/test_compile.py), and with LoRA on every linear layer ~7x closer
# (0.14 -> 0.02; the rest flips with a reduction's order).
# Its speed on the H200 is not measured yet: TRAINER_COMPILE_EAGER_ROUNDING=0 is inductor's default, the A/B's other
# side (bench/compile_ab.py eager_rounding).
COMPILE_OPTIONS = {} if os.environ.get("TRAINER_COMPILE_EAGER_ROUNDING") == "0" else {"emulate_precision_casts": True}
# Plan.train_cudagraphs (a candidate by default since 2026-12-08, TRAINER_COMPILE_CUDAGRAPHS=0: never): the compiled
# layers' forwards and backwards replayed from CUDA graphs (inductor's cudagraph trees, what torch.compile's
# mode="reduce-overhead" turns on), each pass one tree generation (Policy.hidden_states marks its start, so the 28 layer
# calls of a pass chain in one path, no-grad passes too). The train phase at small budgets is host-bound: on one H100
# (2026-12-07) eight 286-token micro-batches of the 1.5B train in ~1.5 s of which the GPU is busy ~0.3 s, ~2.2 ms of
# Python and Triton launches a compiled layer call; a replay launches the layer's kernels in one call. Costs: a graph
# recorded per distinct input size (GRPO's lengths: trainer/graph_lengths.py pads them to one), inputs copied into the
# graph's buffers, and the trees' memory pool held for the whole run (the rollout phase too:
# memory.TRAIN_GRAPH_POOL_BYTES). Measured on one H100 (2026-12-07 16:27, bench/results/queue_2026-12-07/g, compile_ab
# train_cudagraphs): with the checkpoint inside the compiled layers (A-mb286, eight 286-token micro-batches, float16)
# the train phase 0.38-0.42 s against 1.23-1.75 s (0.28x), the step 1.8 s against 2.6-3.2 s (0.60x), nvidia-smi's peak
# 3.31 GB against 4.40 (the steady phases 3.31 against 3.23); with HF's checkpoint and offload (A at 3.3 GB) inductor
# re-recorded every step (64 graphs a step, the train phase 14-45 s) and the rollout ran out of memory in step 6, which
# is why the plan grants the graphs only where plan.cudagraphs_apply. The first failure, on 2026-12-07 14:47 (a LoRA
# gradient kept in the trees' pool, reused by the next micro-batch's generation), is mended by Policy.grads_of_our_own:
# A-mb286 ran.

log = logging.getLogger(__name__)


def lora_autocast(device: torch.device, dtype: torch.dtype):
    """LoRA's matmuls in the compute dtype (bf16 / fp16), the adapter's weights kept in fp32 for the optimizer.

    peft keeps the adapters in fp32 and, outside autocast, casts each LoRA input to fp32: an fp32 copy of every
    adapted layer's input, saved for the backward, and an fp32 output of lora_B. Seen on one H200 (2026-12-03): both
    long-context rows ran out of memory in step 1's backward asking for exactly [tokens, intermediate] in fp32 (3.25 GiB
    for Llama-3.1-8B at 60,928 tokens, 1.55 GiB for Qwen2.5-7B at 22,016), the down projection's LoRA input. Under
    autocast peft skips the cast (its 4-bit layers check for it) and the matmuls read and write the compute dtype, as
    TRL's (accelerate's bf16 autocast) and Unsloth's LoRA kernels do, and as vLLM's sampler does with the bf16 weights
    synced to it. Gradients still reach the fp32 weights. fp32 runs (the CPU tests) need nothing."""
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


@dataclass
class Policy:
    model: torch.nn.Module  # peft.PeftModel
    tokenizer: object
    device: torch.device
    compute_dtype: torch.dtype
    quantized: bool
    path: Path  # checkpoint directory of the base model
    compiled: bool = False  # decoder layers under torch.compile (plan.compile_layers)
    cudagraphs: bool = False  # and replayed from CUDA graphs (plan.train_cudagraphs)

    @property
    def backbone(self) -> torch.nn.Module:
        return self.model.get_base_model().model

    def autocast(self):
        """Every pass through the decoder stack runs in here (the trainer's passes and HF generate)."""
        return lora_autocast(self.device, self.compute_dtype)

    def hidden_states(self, **inputs) -> torch.Tensor:
        """The decoder stack's last hidden states, LoRA in the compute dtype (`lora_autocast`)."""
        if self.compiled:  # vLLM sets torch's limit to 16 when it imports its flex_attention backend, after load_policy
            from torch import _dynamo

            _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, LAYER_RECOMPILE_LIMIT)
            if self.cudagraphs:  # the pass is one generation: the previous pass's graph outputs may be reused
                torch.compiler.cudagraph_mark_step_begin()
                if torch.is_grad_enabled():
                    self.grads_of_our_own()
        with self.autocast():
            return self.backbone(**inputs).last_hidden_state

    def grads_of_our_own(self) -> None:
        """Each trainable parameter's .grad allocated here (zeros) where it has none, so that the backward adds into it.
        Without one, autograd keeps the compiled backward's output itself as .grad, and with CUDA graphs that output
        lives in the cudagraph trees' pool, which the next pass's generation reuses: the next micro-batch's backward
        then adds into freed memory ("accessing tensor output of CUDAGraphs that has been overwritten by a subsequent
        run", `train` on one H100, 2026-12-07; pytorch issues 169545 and 96693, where the same grads were also silently
        wrong). The LoRA gradients exist through the train phase either way (the plan counts them)."""
        for p in self.trainable_parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.get_base_model().get_output_embeddings().weight

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def reference(self):
        """Context in which the model is the reference policy: the base with the adapter disabled."""
        return self.model.disable_adapter()


def resolve_model_path(model_section) -> Path:
    """A local directory with config.json for the recipe's model (a shape is built on first use)."""
    if model_section.shape:
        from trainer.shapes import model_dir

        return model_dir(model_section.shape, model_section.seed)
    p = local_checkpoint(model_section)
    if p is not None:
        return p
    hub.offline()  # an offline machine reads the cache at once
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_section.name, revision=model_section.revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # network, auth, missing repo: all fixable by the user
        raise UserError("model.name", *(hub.why_not("model", model_section.name) or (
            f"cannot fetch {model_section.name!r} from the Hugging Face hub ({e.__class__.__name__})",
            "check the name and your network, or download it and give the local path"))) from None


def local_checkpoint(model_section) -> Path | None:
    """model.name as a local checkpoint directory (None: a hub name); a directory without config.json is refused."""
    p = Path(model_section.name).expanduser()
    if not p.is_dir():
        return None
    if not (p / "config.json").is_file():
        raise UserError("model.name", f"{p} has no config.json", "point at a Hugging Face checkpoint directory")
    return p


def read_config(model_section) -> dict:
    """The model's config.json as a dict, without loading (or, for a shape, building) any weights."""
    import json

    if model_section.shape:
        from trainer.shapes import config_dict

        return config_dict(model_section.shape)
    p = local_checkpoint(model_section)
    if p is not None:
        return json.loads((p / "config.json").read_text())
    hub.offline()
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(model_section.name, "config.json",
                                               revision=model_section.revision)).read_text())
    except Exception as e:
        raise UserError("model.name", *(hub.why_not("model", model_section.name) or (
            f"cannot fetch the config of {model_section.name!r} from the Hugging Face hub ({e.__class__.__name__})",
            "check the name and your network, or give a local path"))) from None


def load_tokenizer(model_section):
    """The model's tokenizer without its weights (a shape's is trained and cached alone; a hub model's tokenizer
    files only are fetched), so prompts are rendered and checked before anything large loads."""
    from transformers import AutoTokenizer

    remote = model_section.trust_remote_code
    if model_section.shape:
        from trainer.shapes import tokenizer_dir

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(model_section.shape, model_section.seed))
    else:
        p = local_checkpoint(model_section)
        if p is None:
            hub.offline()
        try:
            tokenizer = AutoTokenizer.from_pretrained(p or model_section.name,
                                                      revision=None if p else model_section.revision,
                                                      trust_remote_code=remote)
        except Exception as e:  # no tokenizer files, network, auth, missing repo
            raise UserError("model.name", *((None if p else hub.why_not("model", model_section.name)) or (
                f"cannot load the tokenizer of {model_section.name!r} ({e.__class__.__name__}: {str(e)[:200]})",
                "check the name and your network, or give a local checkpoint directory with its tokenizer "
                "files"))) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(recipe, plan, engine=None, tokenizer=None) -> Policy:
    """The base (4-bit when the plan says so; vLLM's own when it already holds it), LoRA, checkpointing.
    `tokenizer`: the one the prompts were tokenized with (default: `load_tokenizer`)."""
    from peft import LoraConfig, get_peft_model

    path = resolve_model_path(recipe.model)
    device = torch.device(plan.device)
    dtype = getattr(torch, plan.compute_dtype)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(recipe.model)
    if getattr(engine, "vmodel", None) is not None:  # shared_nf4: the base is vLLM's, viewed in place
        from trainer.sync import build_shared_model

        model = build_shared_model(path, engine.vmodel, dtype, recipe.model.trust_remote_code)
    else:
        model = _load_own_base(recipe, plan, path, device, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    if device.type == "cpu":
        keep_cpu_4bit_trainable(model)
    if sampler_rounding_on(recipe, plan):  # before LoRA wraps the layers and they compile
        from trainer import sampler_rounding

        log.info("trainer rounds as vLLM's kernels: %d patched", sampler_rounding.install(
            model, bias=plan.weight_format == "shared_nf4"))
    if NF4_TRACED and plan.compile_layers and plan.quantized:  # before LoRA wraps them and the layers compile
        from trainer.nf4_linear import install

        log.info("nf4 layers traced by torch.compile: %d", install(model))

    target = recipe.lora.target_modules
    check_target_modules(model, target)
    lora = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.lora_alpha, lora_dropout=recipe.lora.lora_dropout,
                      target_modules=target, task_type="CAUSAL_LM")
    torch.manual_seed(recipe.train.seed)  # LoRA A's init must not depend on what ran before (e.g. building a shape)
    model = get_peft_model(model, lora)
    if plan.gradient_checkpointing:
        set_gradient_checkpointing(model, True, plan.activation_offload, checkpoint_in_graph(plan),
                                   plan.checkpoint_recompute_all)
    if plan.mlp_tile_tokens:
        from trainer.tiled_mlp import install

        install(model, plan.mlp_tile_tokens)
    if plan.compile_layers:  # each decoder layer compiled in place; all layers share one graph (same code, shapes)
        for layer in model.get_base_model().model.layers:
            layer.compile(dynamic=COMPILE_DYNAMIC, options=compile_options(plan.train_cudagraphs))
        marks = compile_marks(plan)
        if marks:
            compile_shapes.install(model.get_base_model().model, marks)
        if COMPILE_INPUT_GRAD:
            compile_shapes.first_input_needs_grad(model.get_base_model().model)
    model.train()
    return Policy(model, tokenizer, device, dtype, plan.quantized, path, compiled=plan.compile_layers,
                  cudagraphs=plan.compile_layers and plan.train_cudagraphs)


def compile_options(cudagraphs: bool = False) -> dict | None:
    """The compiled layers' inductor options (with CUDA graphs: plan.train_cudagraphs), a fresh dict each call
    (torch.compile pops its keys)."""
    options = dict(COMPILE_OPTIONS) | ({"triton.cudagraphs": True} if cudagraphs else {})
    return options or None


def compile_marks(plan) -> str:
    """What compile_shapes marks on the compiled layers' inputs: TRAINER_COMPILE_DYNAMIC_DIMS where set, else the
    plan's choice ("mask_always" where plan.compile_masks; "": nothing)."""
    if COMPILE_DYNAMIC_DIMS is not None:
        return COMPILE_DYNAMIC_DIMS
    return "mask_always" if plan.compile_masks else ""


def sampler_rounding_on(recipe, plan) -> bool:
    """The plan's choice (Plan.sampler_rounding), or TRAINER_SAMPLER_ROUNDING's where set and it applies."""
    if SAMPLER_ROUNDING is None:
        return plan.sampler_rounding
    return SAMPLER_ROUNDING and sampler_rounding_applies(recipe, plan.compute_dtype)


def set_gradient_checkpointing(model: torch.nn.Module, on: bool, offload: bool = False, in_graph: bool = False,
                               recompute_all: bool = False) -> None:
    """Recompute each decoder layer's activations in backward (on) or keep them (off), with the checkpointed layer
    inputs in pinned host memory (offload, trainer/offload.py), or the checkpoint inside each layer's forward, for
    torch.compile to trace (in_graph, plan.checkpoint_in_graph; recompute_all: every op recomputed in the backward,
    plan.checkpoint_recompute_all); may change between steps."""
    for layer in model.get_base_model().model.layers:
        if (on and in_graph) or hasattr(layer, "_trainer_forward"):  # HF's path alone leaves the layers untouched
            _checkpoint_in_forward(layer, on and in_graph, recompute_all)
    if on and not in_graph:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if offload:
            from trainer.offload import install

            install(model)
    else:
        model.gradient_checkpointing_disable()


def _checkpoint_in_forward(layer: torch.nn.Module, on: bool, recompute_all: bool = False) -> None:
    """The layer's forward checkpointed when `on` and gradients are being recorded (the flags are read inside the
    forward: torch.compile guards on them and recompiles once when one changes). `recompute_all`: a selective
    checkpoint policy that recomputes every op, so that AOTAutograd's partitioner keeps the layer's inputs alone
    instead of the 4-bit matmuls' outputs it chooses to save (memory.CKPT_IN_GRAPH_BYTES): HF's checkpoint's memory,
    inside the compiled graph (where CUDA graphs can replay it: plan.cudagraphs_apply)."""
    if not hasattr(layer, "_trainer_forward"):
        from torch.utils.checkpoint import checkpoint

        layer._trainer_forward = layer.forward

        def forward(*args, **kwargs):
            if layer._trainer_checkpoint and torch.is_grad_enabled():
                extra = {"context_fn": _recompute_everything} if layer._trainer_recompute_all else {}
                return checkpoint(layer._trainer_forward, *args, use_reentrant=False, **extra, **kwargs)
            return layer._trainer_forward(*args, **kwargs)

        layer.forward = forward
    layer._trainer_checkpoint, layer._trainer_recompute_all = on, recompute_all


def _recompute_everything():
    """torch.utils.checkpoint's context_fn: every op of the checkpointed forward recomputed in the backward."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(lambda ctx, op, *args, **kwargs: CheckpointPolicy.MUST_RECOMPUTE)


def _load_own_base(recipe, plan, path: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = dict(dtype=dtype, device_map={"": device}, trust_remote_code=recipe.model.trust_remote_code)
    if plan.quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=recipe.model.bnb_4bit_quant_type, bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=recipe.model.bnb_4bit_use_double_quant, bnb_4bit_quant_storage=torch.uint8)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    return model


def keep_cpu_4bit_trainable(model: torch.nn.Module) -> None:
    """bitsandbytes 0.50 repacks a CPU Linear4bit's weight into an AVX512-BF16 inference layout on its first
    eval-mode forward (our HF rollouts) and then cannot run it with autograd ("a view of a leaf Variable ... in-place
    operation" in matmul_4bit). Turning that repacking off keeps one layout for sampling and training."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def check_target_modules(model: torch.nn.Module, target) -> None:
    if target == "all-linear" or isinstance(target, str):
        return
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)}
    missing = [t for t in target if t not in names]
    if missing:
        raise UserError("lora.target_modules", f"{missing} not found in the model",
                        f"use 'all-linear' or names from: {', '.join(sorted(names - {'lm_head'}))}")


def _is_linear(m: torch.nn.Module) -> bool:
    return isinstance(m, torch.nn.Linear) or type(m).__name__ in ("Linear4bit", "Linear8bitLt")


def completion_logprobs(policy: Policy, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        completion_ids: torch.Tensor, completion_valid: torch.Tensor, temperature: float,
                        token_chunk: int, vocab_chunk: int, entropy: bool = False, logits_dtype: str = "model"
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and optionally entropy) of each completion token under logits / temperature.

    input_ids = [prompt (left-padded) | completion (right-padded)], shape [B, P + C]. Returns [B, C] tensors with
    zeros where `completion_valid` is 0. Peak extra memory: one [token_chunk, vocab_chunk] logits tile.
    logits_dtype: "model" rounds each logits tile to the hidden states' dtype (bf16 on the GPU), as TRL's kernel
    does and as vLLM's lm_head does by default; "float32" keeps the tiles in fp32 (the product of the same bf16
    values, not rounded; see `_fp32_logits_function`), to match an engine whose logits are fp32 (rollout.logits_dtype).
    """
    from trl.kernels import ChunkedLogProbFunction

    c = completion_ids.size(1)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = policy.hidden_states(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False)
    hidden = hidden[:, -c - 1:-1]  # the position before each completion token predicts it
    valid = completion_valid.bool()
    h, targets = hidden[valid], completion_ids[valid]
    weight = policy.lm_head_weight
    fn = ChunkedLogProbFunction
    if logits_dtype == "float32" and h.dtype != torch.float32:
        h, fn = h.float(), _fp32_logits_function()  # tiles in fp32: the kernel computes in the hidden states' dtype
    outs, ents = [], []
    for s in range(0, h.size(0), token_chunk):
        want = ("entropy",) if entropy else ()
        lp, ent, *_ = fn.apply(h[s:s + token_chunk], weight, None, targets[s:s + token_chunk], temperature, vocab_chunk,
                               None, 1.0, want)
        outs.append(lp)
        ents.append(ent)
    flat = torch.cat(outs) if outs else hidden.new_zeros(0, dtype=torch.float32)
    logps = torch.zeros(valid.shape, dtype=torch.float32, device=flat.device).masked_scatter(valid, flat)
    ent_out = None
    if entropy and outs:
        ent_out = torch.zeros(valid.shape, dtype=torch.float32, device=flat.device).masked_scatter(
            valid, torch.cat(ents).detach())
    return logps, ent_out


def tf32_matmuls_on():
    """torch's fp32 GEMMs on TF32 tensor cores from now on; returns a function that restores the previous setting."""
    m = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(m, "fp32_precision") else "allow_tf32"  # torch >= 2.9 : before
    old = getattr(m, name)
    setattr(m, name, "tf32" if name == "fp32_precision" else True)
    return lambda: setattr(m, name, old)


@contextlib.contextmanager
def _tf32_matmuls():
    """fp32 GEMMs on TF32 tensor cores. Exact for our logits: the operands are bf16 values upcast (7 mantissa bits;
    TF32 keeps 10) and the products accumulate in fp32, so this equals a bf16 GEMM with an unrounded fp32 output at
    about half the bf16 rate, instead of the ~15x slower IEEE fp32 path."""
    restore = tf32_matmuls_on()
    try:
        yield
    finally:
        restore()


_FP32_FN = None


def _fp32_logits_function():
    """TRL's ChunkedLogProbFunction with fp32 hidden states (so fp32 tiles), its forward and backward under
    `_tf32_matmuls` on CUDA (backward runs later, from loss.backward(), outside any context set here)."""
    global _FP32_FN
    if _FP32_FN is None:
        from trl.kernels import ChunkedLogProbFunction as Base

        class Fp32Logits(Base):
            @staticmethod
            def forward(ctx, hidden, *args):
                ctx.tf32 = hidden.is_cuda
                with _tf32_matmuls() if ctx.tf32 else contextlib.nullcontext():
                    return Base.forward(ctx, hidden, *args)

            @staticmethod
            def backward(ctx, *grads):
                with _tf32_matmuls() if ctx.tf32 else contextlib.nullcontext():
                    return Base.backward(ctx, *grads)

        _FP32_FN = Fp32Logits
    return _FP32_FN


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Dropout off and KV cache on while sampling with the training model; restores training mode after. The decoder
    layers compiled for training (plan.compile_layers) are uncompiled meanwhile: a KV cache that grows each token
    would recompile them at every length (a 32-token generate of the tiny model compiled six graphs in 19.5 s on the
    CPU; eager, 0.13 s, the same tokens). Not torch.compiler.set_stance("force_eager"): that would also stop the
    compiled decode step (rollout.hf_compile) that traces through these layers."""
    was_training = model.training
    model.eval()
    cfg = model.get_base_model().config
    old = cfg.use_cache
    cfg.use_cache = True
    # nn.Module.compile keeps the compiled callable in _compiled_call_impl; None makes the module call its forward
    compiled = {m: m._compiled_call_impl for m in model.modules() if getattr(m, "_compiled_call_impl", None)}
    try:
        for m in compiled:
            m._compiled_call_impl = None
        yield
    finally:
        for m, fn in compiled.items():
            m._compiled_call_impl = fn
        cfg.use_cache = old
        model.train(was_training)
