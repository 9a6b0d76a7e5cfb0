"""The recipe: a YAML file validated into typed sections; it states what the user wants and never computes memory.

Field names follow TRL's GRPOConfig where the concept is the same (num_generations, max_completion_length, beta,
epsilon, epsilon_high, loss_type, temperature, scale_rewards, importance_sampling_level, learning_rate, ...), so a
TRL user can move a config over by copying lines. Knobs that the VRAM planner may choose default to ``None``
("planner decides"); a value the user sets is never overridden.
"""
from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trainer.errors import UserError

# Presets that `include:` finds by name (budgets/24gb, lora/r16-all-linear): the checkout's top-level configs/, which
# the wheel ships as trainer/configs/ (pyproject's package-dir), so `include:` works in both.
_HERE = Path(__file__).resolve().parent
PRESETS = next((d for d in (_HERE / "configs", _HERE.parent / "configs") if d.is_dir()), _HERE.parent / "configs")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    name: str | None = None  # hub id or local directory of a causal LM (bf16/fp16/fp32 checkpoint)
    shape: str | None = None  # random init from a named shape (see trainer/shapes.py), tokenizer trained locally
    seed: int = 0  # init seed for `shape`
    load_in_4bit: bool = True  # nf4 via bitsandbytes (CPU or CUDA)
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: plan.auto_dtype; float32 on CPU
    gradient_checkpointing: bool | None = None  # None: the planner decides
    trust_remote_code: bool = False
    revision: str | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.name is None) == (self.shape is None):
            raise ValueError("set exactly one of model.name (hub id or path) and model.shape (random init)")
        return self


class LoraSection(Section):
    r: int = Field(16, ge=1)
    lora_alpha: float = 32
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class DataSection(Section):
    dataset: str  # hub name, or a local .jsonl/.json/.parquet/.csv file (relative to the recipe file)
    subset: str | None = None  # hub config name, e.g. "main" for gsm8k
    split: str = "train"
    prompt_column: str = "prompt"  # text, or a list of chat messages
    prompt_template: str | None = None  # e.g. "Solve: {question}"; columns in braces
    system_prompt: str | None = None
    chat_template: bool | None = None  # None: use the tokenizer's chat template when it has one
    max_prompt_length: int = Field(512, ge=1)  # longer prompts are truncated from the left
    shuffle: bool = True


class RewardSection(Section):
    function: str  # "package.module:function" or "path/to/file.py:function" (relative to the recipe file)
    weight: float = 1.0
    kwargs: dict[str, Any] = {}
    name: str | None = None
    on_error: Literal["raise", "zero"] = "raise"  # zero: a raising call scores 0 and is counted in the metrics
    # Worker processes (trainer/rewards/pool.py) for slow or hanging rewards, e.g. code execution:
    timeout_s: float | None = Field(None, gt=0)  # a call running longer is killed; it scores per on_error
    num_workers: int = Field(0, ge=0)  # processes scoring in parallel; 0: in the training process (1 with timeout_s)
    chunk_size: int | None = Field(None, ge=1)  # completions per call (None: an equal share per worker)


class GRPOSection(Section):
    num_generations: int = Field(8, ge=2)
    max_completion_length: int = Field(512, ge=1)
    beta: float = Field(0.0, ge=0)
    use_bias_correction_kl: bool = True  # TRL's default: the KL term times the importance ratio
    epsilon: float = Field(0.2, gt=0)
    epsilon_high: float | None = None  # None: same as epsilon
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo"] = "dapo"
    importance_sampling_level: Literal["token", "sequence"] = "token"  # "sequence" = GSPO
    scale_rewards: Literal["group", "batch", "none"] = "group"
    mask_truncated_completions: bool = False
    num_iterations: int = Field(1, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0: no top-k filtering
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    # Correction for the sampler/trainer logprob gap (trainer/is_correction.py): TRL 1.16's names, defaults, modes.
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_mode: Literal[
        "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = "sequence_mask"
    vllm_importance_sampling_clip_max: float | None = Field(3.0, gt=0)  # None: no upper bound
    vllm_importance_sampling_clip_min: float | None = Field(None, ge=0)  # None: no lower bound

    @model_validator(mode="before")
    @classmethod
    def _deprecated_cap(cls, data):
        """TRL's deprecated `vllm_importance_sampling_cap` (TRL >= 1.6) sets clip_max, as TRL still does."""
        if isinstance(data, dict) and "vllm_importance_sampling_cap" in data:
            data = dict(data)
            cap = data.pop("vllm_importance_sampling_cap")
            if cap is not None:
                warnings.warn("grpo.vllm_importance_sampling_cap is deprecated (as in TRL); it sets "
                              "grpo.vllm_importance_sampling_clip_max, use that name", FutureWarning, stacklevel=2)
                data["vllm_importance_sampling_clip_max"] = cap
        return data

    @model_validator(mode="after")
    def _is_bounds(self):
        lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if lo is not None and hi is not None and lo >= hi:
            raise ValueError(f"vllm_importance_sampling_clip_min ({lo}) must be less than "
                             f"vllm_importance_sampling_clip_max ({hi})")
        if (self.vllm_importance_sampling_correction and self.vllm_importance_sampling_mode.endswith("truncate")
                and lo is None and hi is None):
            raise ValueError("a *_truncate vllm_importance_sampling_mode needs vllm_importance_sampling_clip_min or "
                             "vllm_importance_sampling_clip_max (or both)")
        return self


class LengthMix(Section):
    """Per-completion max_tokens ~ log-normal(median, sigma), clipped to [min_tokens, max_completion_length]."""
    median: float = Field(gt=0)
    sigma: float = Field(1.0, ge=0)
    min_tokens: int = Field(8, ge=1)


class MultiTurnSection(Section):
    """Limits and rewards of conversations with tools or an environment (rollout.tools / rollout.environment)."""
    max_turns: int = Field(4, ge=1)  # assistant messages per conversation
    # every token after the prompt: the model's, the tools' and the environment's (what the VRAM plan sizes)
    max_trajectory_tokens: int = Field(1024, ge=16)
    tool_timeout_s: float = Field(10.0, gt=0)  # per tool call; the worker running a call that overruns is killed
    tool_output_max_tokens: int = Field(256, ge=1)  # a tool's output is cut to this many tokens
    tool_workers: int = Field(4, ge=1)  # worker processes per tool (tools never run in the training process)
    # how the model writes a call: hermes = Qwen's <tool_call>{"name", "arguments"}</tool_call>; json = Llama 3.1's
    # bare {"name", "parameters"} message; auto = from the tokenizer's chat template
    tool_call_format: Literal["auto", "hermes", "json"] = "auto"
    # a conversation that ends so gets this total reward (its reward functions are still logged)
    parse_failure_reward: float = -1.0  # a tool call that does not parse, names no tool or gives wrong arguments
    overflow_reward: float = -1.0  # the trajectory ran past max_trajectory_tokens
    tool_error_reward: float = -1.0  # a tool or the environment raised, timed out or returned something not text
    environment_kwargs: dict[str, Any] = {}  # passed to the environment's constructor


class RolloutSection(Section):
    engine: Literal["hf", "vllm"] = "hf"
    # Multi-turn rollouts (trainer/rollout/multi_turn.py): tools as module:function or file.py:function (typed
    # arguments and a docstring: the chat template gets their JSON schema), and/or an environment class.
    tools: list[str] = []
    environment: str | None = None  # module:Class with reset(example) -> messages and step(message) -> (...)
    multi_turn: MultiTurnSection = MultiTurnSection()
    # vLLM only; None lets the planner choose.
    weight_format: Literal["shared_nf4", "bf16_mirror"] | None = None
    # LoRA to vLLM each step: inplace = A and B*scaling into vLLM's LoRA slot (its LoRA kernels run in every decode
    # step); add_lora = a new adapter file each step (the fallback); merge = bf16 mirror only: vLLM runs without LoRA
    # and its 16-bit weights become the trainer's dequantised nf4 + scaling x B @ A, rewritten in place each step
    # (trainer/sync.py MergedSync); auto = the planner decides (trainer/plan.py LORA_MERGE_PREFERRED).
    sync: Literal["auto", "inplace", "add_lora", "merge"] = "auto"
    kv_release: bool | None = None  # free the KV pool while the trainer steps
    kv_cache_memory_bytes: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enforce_eager: bool | None = None
    cudagraph_capture_sizes: list[int] | None = None
    compile: bool = False  # vLLM's torch.compile (+~40 s start); off: full CUDA graphs of the decode sizes only
    # shared_nf4 decode matmuls: our fused nf4 kernel (trainer/kernels/nf4_gemm.py) or bitsandbytes' own path
    nf4_gemm: Literal["auto", "fused", "bitsandbytes"] = "auto"
    # Logits behind the sampler/trainer log-prob gap, on both sides (vLLM's lm_head and the trainer's tiles):
    # model = the compute dtype (bf16 on the GPU; today's behaviour), float32 = unrounded fp32 logits, auto = the
    # planner decides (trainer/plan.py LOGITS_DTYPE_PREFERRED; `model` until bench/fidelity.py has measured it).
    # TRL's nearest, cast_lm_head_to_fp32, is the trainer's side alone and refuses tied heads (Qwen2.5's are tied).
    logits_dtype: Literal["auto", "float32", "model"] = "auto"
    # HF generate: sequences generated at once (None: the planner decides).
    hf_batch_size: int | None = None
    # HF generate with a static KV cache and its decode step compiled (CUDA graphs on a GPU): the eager decode step is
    # host-bound (~2.4 ms a layer and token on the H200 host). None: off (not yet measured on a GPU).
    hf_compile: bool | None = None
    length_mix: LengthMix | None = None  # benchmarks only: stop completions at drawn lengths


class BudgetSection(Section):
    vram_gb: float | Literal["auto"] | None = None  # None: no budget (CPU, or plan for the whole card)
    margin_gb: float = 0.5  # kept free by `auto`
    # After the first (worst-case) step the closed loop (trainer/budget.py) shrinks a phase's runtime knobs when it
    # measured above plan. speed: the budget, not the plan, is the limit, and measured slack buys a faster setting.
    adapt: Literal["off", "speed"] = "off"


class TrainSection(Section):
    max_steps: int = Field(100, ge=1)
    learning_rate: float = Field(1e-5, gt=0)
    generation_batch_size: int | None = None  # completions per optimizer step (all processes)
    per_device_train_batch_size: int | None = None  # completions per micro-batch (None: planner)
    micro_batch_tokens: int | None = None  # token budget per micro-batch (None: planner)
    # checkpointed layer inputs kept in pinned host memory while training (None: planner; on where they would not fit)
    activation_offload: bool | None = None
    # one long sequence's MLPs in tiles of 8,192 tokens, recomputed tile by tile in the backward (trainer/tiled_mlp.py;
    # None: planner, on only where nothing untiled fits; true: on CUDA, wherever a micro-batch is one sequence of at
    # least two tiles)
    mlp_tiles: bool | None = None
    # the checkpoint inside each compiled layer's graph instead of HF's around it: faster, the layers keep more for the
    # backward (None: planner, weighed against HF's checkpoint and none; true: wherever the layers compile on CUDA
    # with checkpointing and neither offload nor tiles; false: HF's)
    checkpoint_in_graph: bool | None = None
    torch_compile: bool | None = None  # torch.compile the decoder layers (None: planner; on with vLLM on CUDA)
    # where the compiled layers' graphs and kernels are kept across runs (trainer/compile_cache.py; None:
    # $TORCHINDUCTOR_CACHE_DIR where set, else ~/.cache/trainer/torch_compile, not torch's /tmp default)
    compile_cache_dir: str | None = None
    gradient_accumulation_steps: int | None = None  # TRL-style alternative to generation_batch_size
    lr_scheduler_type: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    optim: Literal["adamw_torch_fused", "adamw_torch", "adamw_8bit"] = "adamw_torch_fused"
    seed: int = 42
    output_dir: str | None = None  # default: runs/<recipe file stem>
    worst_case_first_step: bool = True  # first step at the longest prompts and full completion length
    max_nonfinite_steps: int = Field(5, ge=1)  # stop after this many consecutive NaN/inf steps (each is skipped)


class LoggingSection(Section):
    wandb: bool | Literal["auto"] = "auto"  # auto: on when wandb is installed; offline without an API key
    wandb_project: str = "trainer"
    plots: bool = True
    print_completions: int = 0  # show this many completions every log line


class CheckpointSection(Section):
    save_steps: int = Field(50, ge=1)
    save_total_limit: int = Field(2, ge=1)
    save_final: bool = True


class EvalSection(Section):
    """Held-out evaluation (trainer/evaluate.py): every `every_steps` steps and at the end, with the run's engine."""
    dataset: str | None = None  # None: data.dataset (a hub dataset; a local file has no other split)
    subset: str | None = None  # None: data.subset when the dataset is the data section's
    split: str = "test"  # hub datasets only
    prompt_column: str | None = None  # None: data.prompt_column (rendering otherwise as in the data section)
    prompt_template: str | None = None  # None: data.prompt_template
    max_prompts: int | None = Field(None, ge=1)  # the first N prompts of the split; None: all
    every_steps: int | None = Field(None, ge=1)  # None: only at the end of training
    num_samples: int = Field(1, ge=1)  # completions per prompt (pass@k needs k <= num_samples)
    temperature: float = Field(0.0, ge=0)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    max_completion_length: int | None = Field(None, ge=1)  # None: grpo.max_completion_length
    pass_k: list[int] | None = None  # None: powers of two up to num_samples
    seed: int = 0  # sampled eval: the same seeds at every evaluation, so curves compare policies, not luck


class Recipe(Section):
    name: str | None = None
    description: str | None = None
    model: ModelSection
    lora: LoraSection = LoraSection()
    data: DataSection
    rewards: list[RewardSection] = Field(min_length=1)
    grpo: GRPOSection = GRPOSection()
    rollout: RolloutSection = RolloutSection()
    budget: BudgetSection = BudgetSection()
    train: TrainSection = TrainSection()
    logging: LoggingSection = LoggingSection()
    checkpoint: CheckpointSection = CheckpointSection()
    eval: EvalSection | None = None
    success: dict[str, float] = {}  # e.g. {"min_last10_reward": 0.5}: what the recipe promises (checked by tests)
    base_dir: str = "."  # set by the loader: where relative paths in the recipe are resolved

    @model_validator(mode="after")
    def _batch(self):
        t, g = self.train, self.grpo.num_generations
        if t.generation_batch_size is None:
            if t.per_device_train_batch_size and t.gradient_accumulation_steps:
                t.generation_batch_size = t.per_device_train_batch_size * t.gradient_accumulation_steps
            else:
                t.generation_batch_size = g
        if t.generation_batch_size % g:
            raise ValueError(f"train.generation_batch_size ({t.generation_batch_size}) must be a multiple of "
                             f"grpo.num_generations ({g})")
        ro = self.rollout
        if self.is_multi_turn:
            if self.data.chat_template is False:
                raise ValueError("rollout.tools / rollout.environment hold chat conversations: data.chat_template must "
                                 "not be false (the tokenizer's chat template renders the turns)")
            if self.grpo.max_completion_length > ro.multi_turn.max_trajectory_tokens:
                raise ValueError(f"grpo.max_completion_length ({self.grpo.max_completion_length}, the cap of one "
                                 f"assistant message) exceeds rollout.multi_turn.max_trajectory_tokens "
                                 f"({ro.multi_turn.max_trajectory_tokens}, the whole conversation after the prompt); "
                                 "lower the first or raise the second")
        if self.budget.adapt == "speed" and not t.worst_case_first_step:
            raise ValueError("budget.adapt: speed measures the slack at the first step's worst-case shapes; set "
                             "train.worst_case_first_step: true, or budget.adapt: off")
        return self

    @model_validator(mode="after")
    def _eval(self):
        ev = self.eval
        if ev is None:
            return self
        from trainer.data import LOCAL_FORMATS

        if ev.dataset is None and Path(self.data.dataset).suffix.lower() in LOCAL_FORMATS:
            raise ValueError("eval.dataset is required: data.dataset is a local file, which has no held-out split "
                             "(name a held-out file, or the same file to evaluate on the training prompts)")
        if ev.max_completion_length is not None and ev.max_completion_length > self.grpo.max_completion_length:
            raise ValueError(f"eval.max_completion_length ({ev.max_completion_length}) exceeds "
                             f"grpo.max_completion_length ({self.grpo.max_completion_length}), for which the VRAM "
                             "plan sizes rollouts; raise grpo.max_completion_length or lower it")
        if ev.temperature == 0 and ev.num_samples > 1:
            raise ValueError(f"eval.num_samples is {ev.num_samples} with greedy decoding (eval.temperature 0), "
                             "which gives the same completion each time; set eval.temperature > 0 or num_samples: 1")
        bad = [k for k in ev.pass_k or [] if not 1 <= k <= ev.num_samples]
        if bad:
            raise ValueError(f"eval.pass_k {bad} must lie in 1..eval.num_samples ({ev.num_samples})")
        return self

    @property
    def is_multi_turn(self) -> bool:
        """Conversations with tools or an environment rather than one completion per prompt."""
        return bool(self.rollout.tools or self.rollout.environment)

    @property
    def completion_tokens(self) -> int:
        """The most tokens a row holds after its prompt: what memory and the sampler's context are planned for."""
        return self.rollout.multi_turn.max_trajectory_tokens if self.is_multi_turn else self.grpo.max_completion_length

    def resolve(self, path: str) -> Path:
        """A path from the recipe, relative to the recipe's directory."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p


# ---------------------------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a recipe file, apply `include:` presets and `--set key=value` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise UserError("recipe", f"file not found: {path}", "pass the path of a recipe YAML, e.g. recipes/tiny-cpu.yaml")
    raw = _read_yaml(path)
    raw = _apply_includes(raw, path.parent, seen=[path.resolve()])
    for item in overrides:
        _apply_override(raw, item)
    raw.setdefault("base_dir", str(path.parent.resolve()))
    raw.setdefault("name", path.stem)
    return validate(raw)


def validate(raw: dict) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise _user_error(e, raw) from None


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise UserError(str(path), f"YAML syntax error{where}: {problem}", "fix the YAML at that position") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(str(path), "the top level must be a mapping of sections (model:, data:, ...)",
                        "see recipes/tiny-cpu.yaml for the layout")
    return data


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a BOM is allowed); binary files and other encodings are user errors naming it."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(str(path), f"cannot read the file: {e.strerror or e}", "check the path and its permissions"
                        ) from None
    fix = "save the recipe as UTF-8 text (YAML)"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(str(path), "the file is UTF-16 text, not UTF-8", fix)
    if b"\x00" in data:  # UTF-16 without a BOM lands here too
        raise UserError(str(path), f"a binary file, not text (NUL byte at offset {data.index(0)})", fix)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(str(path), f"not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} (a binary file, "
                        "or another encoding such as latin-1)", fix) from None
    return text


def _apply_includes(raw: dict, base: Path, seen: list[Path]) -> dict:
    includes = raw.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for inc in includes:
        name = str(inc).removeprefix("configs/")  # the presets' old home in the source tree
        candidates = [base / str(inc), PRESETS / name]
        candidates += [c.with_suffix(".yaml") for c in candidates if c.suffix != ".yaml"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            shipped = sorted(str(p.relative_to(PRESETS).with_suffix("")) for p in PRESETS.glob("*/*.yaml"))
            raise UserError("include", f"preset not found: {inc}",
                            f"give a path relative to the recipe, or a shipped preset: {', '.join(shipped)}")
        if found.resolve() in seen:
            raise UserError("include", f"include cycle through {found}", "remove the circular include")
        sub = _apply_includes(_read_yaml(found), found.parent, seen + [found.resolve()])
        merged = _deep_merge(merged, sub)
    return _deep_merge(merged, raw)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise UserError("--set", f"expected key=value, got {item!r}", "write e.g. --set grpo.beta=0.04")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        if not isinstance(node.setdefault(p, {}), dict):
            raise UserError(f"--set {key}", f"{p} is not a section", "override a field inside a section")
        node = node[p]
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = value


def _fields_at(loc: tuple) -> list[str]:
    """Valid field names of the model that sits at `loc` (the location of an unknown key)."""
    model: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        model = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return [f for f in model.model_fields if f != "base_dir"] if isinstance(model, type) else []


def _user_error(e: ValidationError, raw: dict) -> UserError:
    err = e.errors()[0]
    loc = tuple(err["loc"])
    field = ".".join(str(p) for p in loc) or "recipe"
    if err["type"] == "extra_forbidden":
        valid = _fields_at(loc)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys here: {', '.join(valid)}"
        return UserError(field, "unknown key", hint)
    if err["type"] == "missing":
        return UserError(field, "required but missing", f"add '{loc[-1]}:' to the recipe")
    value = err.get("input")
    shown = repr(value)[:80]
    problem = err["msg"].replace("Value error, ", "")
    more = f" (and {len(e.errors()) - 1} more problem(s))" if len(e.errors()) > 1 else ""
    return UserError(field, f"{problem}; got {shown}{more}", "correct the value in the recipe or with --set")
