"""Colocated vLLM backend: vLLM runs in the trainer's process on the same GPU and samples with the current LoRA.

The Plan sizes it in bytes (kv_cache_memory_bytes, max_num_seqs, max_num_batched_tokens, CUDA-graph sizes),
never as a fraction of the card. The base is loaded once, by vLLM (4-bit for `shared_nf4`: vLLM's bitsandbytes method,
or trainer/rollout/vllm_nf4.py's where vLLM has none; bf16 for
`bf16_mirror`); the trainer's policy is then built on top of it (trainer/sync.py). Between rollouts the KV pool
alone can be handed back to CUDA for the trainer (vLLM's own sleep would also offload the shared weights).
vllm is imported lazily: a recipe that asks for it without vllm installed or without CUDA gets a UserError.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch

from trainer import distributed
from trainer.errors import UserError
from trainer.types import Generations, Sampling

log = logging.getLogger(__name__)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values
LORA_ID = 1


def import_vllm():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine must live in this process
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
        raise UserError("rollout.engine", "VLLM_ENABLE_V1_MULTIPROCESSING is set to "
                        f"{os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']}: the colocated engine must run in-process",
                        "unset it or set it to 0")
    try:
        import vllm
        from vllm.platforms import current_platform
    except ImportError as e:
        raise UserError("rollout.engine", f"vllm is not installed ({e})",
                        'pip install ".[vllm]" in the source checkout (vllm>=0.24,<0.27), or use rollout.engine: hf'
                        ) from None
    except (OSError, RuntimeError) as e:  # e.g. libcudart.so.13 missing: vllm built for another CUDA/torch
        raise UserError("rollout.engine", f"vllm fails to load beside torch {torch.__version__} "
                        f"(CUDA {torch.version.cuda}): {str(e)[:200]}",
                        "install the vllm build that matches this torch and CUDA (vllm 0.24-0.26 need torch 2.11 + "
                        "CUDA 13), or use rollout.engine: hf") from None
    if not torch.cuda.is_available() and not current_platform.is_cpu():
        from trainer.env import unusable_gpu

        why, fix = unusable_gpu() or ("none is visible", "use rollout.engine: hf")
        raise UserError("rollout.engine", f"vllm needs a CUDA GPU, and {why}", fix)
    from trainer.rollout import vllm_internals as vi

    if not any(vllm.__version__.startswith(v) for v in vi.SUPPORTED):
        raise UserError("rollout.engine", f"vllm {vllm.__version__} is not supported (tested {vi.TESTED})",
                        'pip install "vllm>=0.24,<0.27"')
    return vllm


def engine_kwargs(recipe, plan, path: Path) -> dict:
    """Arguments of vllm.LLM, all from the Plan: KV in bytes, no fraction of the card."""
    kw = dict(model=str(path), tokenizer=str(path), dtype=plan.compute_dtype,
              kv_cache_memory_bytes=int(plan.kv_cache_memory_bytes), max_num_seqs=plan.max_num_seqs,
              max_model_len=plan.max_model_len, max_num_batched_tokens=plan.max_num_batched_tokens,
              enable_sleep_mode=plan.kv_release, logprobs_mode="processed_logprobs", seed=recipe.train.seed,
              trust_remote_code=recipe.model.trust_remote_code,
              # vLLM still refuses to start when free memory < total x this fraction; it does not size anything
              gpu_memory_utilization=0.05)
    if plan.sync != "merge":  # merge: the adapter is in the mirror's weights (trainer/sync.py MergedSync)
        kw.update(enable_lora=True, max_lora_rank=next(r for r in LORA_RANKS if r >= recipe.lora.r), max_loras=1,
                  max_cpu_loras=1)
    if recipe.is_multi_turn:  # each turn re-sends the conversation so far: its KV is reused, not recomputed
        kw["enable_prefix_caching"] = True
    if plan.max_num_batched_tokens < plan.max_model_len:  # long sequences: prefill in chunks (the plan's PREFILL_CHUNK)
        kw["enable_chunked_prefill"] = True
    if plan.weight_format == "shared_nf4":  # vLLM's bitsandbytes method, or ours where vLLM has none (vllm_nf4.py)
        from trainer.rollout import vllm_nf4

        kw["quantization"] = vllm_nf4.quantization()
    if distributed.launched_size() > 1:
        # torchrun: one engine per rank on its LOCAL_RANK's device, joining the trainer's process group (TP 1 each).
        # The default in-process executor would pick device 0 on every rank.
        kw["distributed_executor_backend"] = "external_launcher"
    if plan.enforce_eager:
        kw["enforce_eager"] = True
    elif recipe.rollout.compile:
        kw["compilation_config"] = {"cudagraph_capture_sizes": list(plan.cudagraph_capture_sizes)}
    else:
        # Full CUDA graphs for the decode batch sizes actually used, without torch.compile (saves ~40 s of start).
        kw["compilation_config"] = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                                    "cudagraph_capture_sizes": list(plan.cudagraph_capture_sizes)}
    return kw


class VLLMEngine:
    name = "vllm"

    def __init__(self, recipe, plan, path: Path):
        vllm = import_vllm()
        from trainer.rollout import vllm_internals as vi

        self.vllm, self.recipe, self.plan, self.vi, self.path = vllm, recipe, plan, vi, path
        # the plan's scratch directory (/dev/shm where it has room for what is staged: plan.scratch_dir)
        self.shm = Path(plan.scratch_dir) / f"trainer-{os.getpid()}"
        self.llm = self.vmodel = self.request = self.lora_sync = self.file_sync = self.merge_sync = None
        self.kv_released = False
        self.info: dict = {}  # what attach and start_on_mirror learn of the engine (engine.json)
        self.on_kv_change = None  # called with the KV bytes released (0 when re-mapped); the run's allocator cap
        self.startup_s = 0.0
        if plan.weight_format == "shared_nf4":  # vLLM loads (and quantises) the base; the policy shares it
            self._start(path)

    def _start(self, path: Path, dummy: bool = False) -> None:
        t0 = time.perf_counter()
        kw = engine_kwargs(self.recipe, self.plan, path)
        if dummy:  # sync.MIRROR_DIRECT: no weights in `path`; start_on_mirror writes them once vLLM is up
            kw["load_format"] = "dummy"
        if kw.get("quantization") == "bitsandbytes":  # patches of vLLM's own bitsandbytes method
            if self.plan.nf4_gemm_max_rows:
                self.vi.install_nf4_gemm(self.plan.nf4_gemm_max_rows)  # before graph capture: graphs keep this path
            if self.plan.compute_dtype != "bfloat16":
                self.vi.install_bnb_in_model_dtype()  # vLLM 0.26's 4-bit layers compute in bf16 (float32: fail to load)
        self.vi.keep_allocator_split_limit()  # torch's allocator as the trainer left it (vllm_internals)
        self.vi.inspect_models_in_process()  # a model class vLLM has not met: here, not in a fresh Python
        self.vi.count_ranks_eagerly()  # the V1 sampler's logprob ranks, which we never read: no torch.compile
        if kw.get("enable_lora") and torch.cuda.is_available() and (path / "config.json").is_file():
            from trainer.rollout import lora_kernels  # configs tuned for this card and shape, where they are shipped

            self.vi.forget_lora_op_configs()  # read again for this engine: vLLM caches them for the process
            self.info["lora_kernels"] = lora_kernels.use_tuned(json.loads((path / "config.json").read_text()),
                                                               kw["max_lora_rank"], torch.cuda.get_device_name())
            log.info("vLLM: %s", self.info["lora_kernels"])
        elif kw.get("enable_lora"):  # nothing to choose: the CPU's LoRA ops, or no config.json to read shapes from
            why = "no CUDA device" if not torch.cuda.is_available() else "no config.json to read the model's shapes from"
            self.info["lora_kernels"] = f"vLLM's default LoRA ops ({why})"
        self.llm = self.vllm.LLM(**kw)
        self.startup_s = time.perf_counter() - t0
        self.vmodel = self.vi.model(self.llm)
        if self.plan.logits_dtype == "float32":  # the sampler's logits unrounded, as the trainer's (vllm_internals)
            self.vi.set_logits_dtype(self.vmodel, "float32")

    def attach(self, policy) -> None:
        """Called once the policy exists: start vLLM on the mirror if any, then register the adapter and map its slots,
        or (rollout.sync merge) merge it into the mirror's weights."""
        from trainer import sync

        # update, not replace: _start (shared_nf4: in __init__) already wrote the LoRA kernels it chose
        self.info.update(vllm=self.vi.version(), weight_format=self.plan.weight_format, sync=self.plan.sync)
        self.start_on_mirror(policy)
        if self.plan.sync == "merge":  # no adapter in vLLM: each sync writes it into the mirror's weights
            self.merge_sync = sync.MergedSync(policy.model, self.vmodel, getattr(torch, self.plan.compute_dtype))
            self.info.update(merged_bytes=self.merge_sync.bytes, merge_ms=round(self.merge_sync.push(), 2))
            self.info["merged_rows_layers"] = self._merged_rows()  # the trainer on them (trainer/merged_linear.py)
        else:
            self._register_adapter(policy)
        copies, outside = sync.count_base_copies(policy.model, self.vmodel)
        self.info.update(startup_s=round(self.startup_s, 1), base_copies=copies, trainer_tensors_outside_vllm=outside[:8],
                         logits_dtype=self.vi.logits_dtype(self.vmodel))

    def _merged_rows(self) -> int:
        from trainer import merged_linear
        from trainer.plan import merged_rows_refusal

        if self.plan.trainer_linears != "rows":
            log.info("rollout.sync merge: the trainer keeps its nf4 path: %s", merged_rows_refusal(self.recipe))
            return 0
        return merged_linear.install(self.merge_sync.layers)

    def _register_adapter(self, policy) -> None:
        from vllm.lora.request import LoRARequest

        from trainer import sync

        path = self.shm / "v0"
        policy.model.save_pretrained(str(path), safe_serialization=True)
        self.request = LoRARequest("policy", LORA_ID, str(path))
        self.llm.llm_engine.add_lora(self.request)
        if self.plan.sync == "inplace":
            self.llm.llm_engine.pin_lora(LORA_ID)  # never evicted: its slot is written in place every step
        if LORA_ID not in list(self.vi.lora_manager(self.llm).lora_index_to_id):
            self._generate_raw([[policy.tokenizer.eos_token_id or 0]], 1, ignore_eos=True)  # activates the slot
        if self.plan.sync == "inplace":
            self.lora_sync = sync.LoraSync(policy.model, self.vi.lora_slots(self.llm, LORA_ID))
            self.info["lora_slot_bytes"] = self.lora_sync.bytes
        else:
            self.file_sync = sync.AdapterFileSync(self.shm, LORA_ID)

    def start_on_mirror(self, policy) -> None:
        """bf16_mirror (no engine yet): vLLM loads the trainer's dequantised weights, then shares its embeddings."""
        from trainer import sync

        if self.llm is not None:
            return
        if sync.MIRROR_DIRECT:  # vLLM on dummy weights, then the trainer's base written into them on the device
            mirror = sync.write_mirror_config(self.path, self.shm / "mirror")
        else:
            mirror = sync.write_mirror_checkpoint(policy.model, self.path, self.shm / "mirror", policy.compute_dtype)
        self.info["mirror_shards"] = len(list(mirror.glob("*.safetensors")))
        parked = sync.park_embeddings(policy.model.get_base_model())  # off the GPU while vLLM loads its own
        # plan.park_base: the trainer's nf4 linears in host memory while vLLM starts (sync.park_linears)
        linears = sync.park_linears(policy.model.get_base_model()) if self.plan.park_base else []
        self.info["parked_linears"] = len(linears)
        self._start(mirror, dummy=sync.MIRROR_DIRECT)
        if sync.MIRROR_DIRECT or self.plan.trainer_linears != "views":  # the nf4 is read again (load_mirror,
            sync.unpark_linears(linears)  # the merge, the trainer's nf4 path); the views let it go instead
        if sync.MIRROR_DIRECT:
            t0 = time.perf_counter()
            self.info["mirror_written_bytes"] = sync.load_mirror(policy.model, self.vmodel, policy.compute_dtype)
            self.info["mirror_write_s"] = round(time.perf_counter() - t0, 3)
        sync.share_non_linear(policy.model.get_base_model(), self.vmodel, parked)
        if self.plan.trainer_linears == "views":  # the trainer's linears: views of the mirror's rows
            self.info["nf4_freed_bytes"] = sync.view_mirror_linears(policy.model, self.vmodel, policy.compute_dtype)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        shutil.rmtree(mirror, ignore_errors=True)

    def sync(self, policy) -> dict[str, float]:
        if self.merge_sync is not None:
            ms = self.merge_sync.push()
        elif self.lora_sync is not None:
            ms = self.lora_sync.push()
        else:
            ms, self.request = self.file_sync.push(policy.model, self.llm)
        if not self.kv_released:
            self.llm.reset_prefix_cache()  # cached prompt KV was computed with the previous adapter
        return {"ms": ms}

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> Generations:
        outs = self._generate_raw(prompt_ids, sampling.n, caps=sampling.max_tokens_per_request, sampling=sampling)
        ids, lps, truncated = [], [], []
        for o in outs:
            c = o.outputs[0]
            toks = list(c.token_ids)
            ids.append(toks)
            # NaN where vLLM gave no logprob: the IS correction and the gap metric leave such tokens out, as TRL does
            lps.append([step[t].logprob for t, step in zip(toks, c.logprobs)] if c.logprobs else [math.nan] * len(toks))
            truncated.append(c.finish_reason == "length")
        return Generations(ids, lps, truncated)

    def _generate_raw(self, prompt_ids, n, caps=None, sampling: Sampling | None = None, ignore_eos=False):
        from vllm import SamplingParams

        if self.kv_released:
            raise RuntimeError("generate() while the KV pool is released: call acquire() first")
        s = sampling or Sampling(n=n, max_tokens=1, ignore_eos=ignore_eos)
        caps = caps or [s.max_tokens] * (len(prompt_ids) * n)
        prompts, params = [], []
        for i, ids in enumerate(prompt_ids):
            for j in range(n):
                prompts.append({"prompt_token_ids": list(ids)})
                params.append(SamplingParams(
                    n=1, max_tokens=caps[i * n + j], temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or 0,
                    seed=None if s.seed is None else s.seed + s.first_row + i * n + j, logprobs=0, ignore_eos=s.ignore_eos,
                    detokenize=False))
        return self.llm.generate(prompts, params, lora_request=self.request, use_tqdm=False)

    def release(self) -> None:
        if self.plan.kv_release and not self.kv_released:
            freed = self.vi.release_kv(self.llm)
            self.kv_released = True
            if self.on_kv_change is not None:  # the freed pages still count as reserved in torch's allocator
                self.on_kv_change(freed)

    def acquire(self) -> None:
        if self.kv_released:
            if self.on_kv_change is not None:
                self.on_kv_change(0)
            self.vi.restore_kv(self.llm)
            self.kv_released = False

    def close(self) -> None:
        self.acquire()  # vLLM frees its pool at exit; it must be mapped then
        shutil.rmtree(self.shm, ignore_errors=True)
        if self.llm is not None and distributed.launched_size() > 1:
            # vLLM's exit hook destroys its groups on top of the trainer's; shut it down first, in order.
            self.vi.shutdown(self.llm)
