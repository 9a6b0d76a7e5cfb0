"""HF `generate` backend: samples with the training model itself, so it needs no weight sync and no extra memory.

Slow next to vLLM (no paged KV, no continuous batching) but exact: the sampler is the policy. It records the
logprob of each sampled token under logits / temperature (the distribution the loss uses) without keeping the
[steps, batch, vocab] scores that `output_logits=True` would hold.

Eager, each decode step is host-bound: Python dispatches every module of every layer (~2.4 ms a layer and token on
the H200's host, trainer/cost.py HF_MS_PER_LAYER), far above what the GPU spends. With plan.hf_compiled_decode
(rollout.hf_compile) the engine keeps one static KV cache of hf_batch_size x max_model_len for the run and HF's
generate compiles the decode step over it (CUDA graphs on a GPU: mode reduce-overhead); every chunk is padded to
hf_batch_size rows so that one graph serves every call. The prefill stays eager.
"""
from __future__ import annotations

import contextlib

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from trainer.policy import Policy, eval_mode
from trainer.types import Generations, Sampling


class _SampledLogprobs(LogitsProcessor):
    """Keeps the previous step's log-softmax; on the next call the sampled token is known, so it gathers it."""

    def __init__(self, temperature: float):
        self.temperature, self.prev, self.out = temperature, None, []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._collect(input_ids)
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _collect(self, input_ids: torch.LongTensor) -> None:
        if self.prev is not None:
            self.out.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
            self.prev = None

    def finish(self, sequences: torch.LongTensor) -> torch.Tensor:
        self._collect(sequences)
        return torch.stack(self.out, dim=1) if self.out else sequences.new_zeros(sequences.size(0), 0).float()


def _static_quant_states(model: torch.nn.Module) -> None:
    """bitsandbytes' quantisation state (absmax, code, the nested absmax) as inputs at fixed addresses of the captured
    decode graph: plain tensors, not parameters or buffers, which the CUDA graph trees would otherwise copy into
    buffers of their own before every replay (four tensors per linear layer)."""
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        while qs is not None:
            for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
                if isinstance(t, torch.Tensor):
                    torch._dynamo.mark_static_address(t)
            qs = getattr(qs, "state2", None)


def stop_ids(eos: int | None, generation_config) -> list[int]:
    """The tokens a completion ends at, as vLLM takes them (SamplingParams.update_from_generation_config): the
    tokenizer's EOS and every EOS id of the checkpoint's generation_config.json (Qwen2.5-Instruct's <|im_end|> and
    <|endoftext|>; Llama 3.1 Instruct's <|end_of_text|>, <|eom_id|> and <|eot_id|>)."""
    extra = getattr(generation_config, "eos_token_id", None)
    extra = [extra] if isinstance(extra, int) else list(extra or [])
    return list(dict.fromkeys(([eos] if eos is not None else []) + extra))


@contextlib.contextmanager
def _recipe_sampling_only(model: torch.nn.Module, stop_at_eos: bool = True):
    """generate with the recipe's sampling and nothing from the checkpoint's generation_config.json, which transformers
    merges into every field a call leaves unset: Qwen2.5-Instruct's carries repetition_penalty 1.1 (and top_k 20,
    top_p 0.8, temperature 0.7), which would reshape the distribution sampled from, and the sampler's log-probs would no
    longer be the policy's that the loss uses. vLLM takes only the SamplingParams it is given. stop_at_eos False: no
    EOS at all (ignore_eos), so that generate samples through EOS without masking it."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig(bos_token_id=saved.bos_token_id, pad_token_id=saved.pad_token_id,
                                               eos_token_id=saved.eos_token_id if stop_at_eos else None)
    try:
        yield
    finally:
        model.generation_config = saved


class HFEngine:
    name = "hf"

    def __init__(self, batch_size: int, compiled_decode: bool = False, max_len: int = 0):
        self.policy, self.batch_size = None, batch_size
        self.compiled_decode, self.max_len = compiled_decode, max_len
        self._cache, self._cache_shape = None, (0, 0)
        self.info = {"engine": "hf", "base_copies": 1, "compiled_decode": compiled_decode}

    def attach(self, policy: Policy) -> None:
        self.policy = policy

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> Generations:
        tok, base = self.policy.tokenizer, self.policy.model.get_base_model()
        pad, stops = tok.pad_token_id, stop_ids(tok.eos_token_id, base.generation_config)
        rows = [(p, i) for i, p in enumerate(prompt_ids) for _ in range(sampling.n)]
        caps = sampling.max_tokens_per_request or [sampling.max_tokens] * len(rows)
        ids, lps, truncated = [], [], []
        greedy = sampling.temperature == 0  # as in vLLM: temperature 0 is greedy decoding
        how = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=sampling.temperature,
                                                        top_p=sampling.top_p, top_k=sampling.top_k or 0)
        # ignore_eos (the worst-case first step), as vLLM's: EOS sampled like any token, not masked (transformers'
        # min_new_tokens would mask it, and the recorded log-probs would be renormalised without its mass)
        go_on = sampling.ignore_eos
        with eval_mode(self.policy.model), self.policy.autocast(), _recipe_sampling_only(base, not go_on):
            for s in range(0, len(rows), self.batch_size):
                if sampling.seed is not None and not greedy:  # one RNG stream per chunk, keyed by its first global row
                    torch.manual_seed(sampling.seed + sampling.first_row + s)
                chunk = rows[s:s + self.batch_size]
                real = len(chunk)
                if self.compiled_decode:  # one batch shape for the one captured graph; the copies are dropped
                    chunk = chunk + [chunk[0]] * (self.batch_size - real)
                width = max(len(p) for p, _ in chunk)
                inp = torch.full((len(chunk), width), pad, dtype=torch.long)
                att = torch.zeros_like(inp)
                for r, (p, _) in enumerate(chunk):
                    inp[r, width - len(p):] = torch.tensor(p)
                    att[r, width - len(p):] = 1
                cap = _SampledLogprobs(sampling.temperature or 1.0)
                max_new = max(caps[s:s + real])
                static = self._static(width + max_new) if self.compiled_decode else contextlib.nullcontext({})
                with static as kw:
                    out = self.policy.model.generate(
                        input_ids=inp.to(self.policy.device), attention_mask=att.to(self.policy.device), **how, **kw,
                        max_new_tokens=max_new, eos_token_id=None if go_on else stops or None, pad_token_id=pad,
                        logits_processor=LogitsProcessorList([cap]), use_cache=True)
                gen = out[:, width:]
                logp = cap.finish(out)
                for r in range(real):
                    row = gen[r].tolist()
                    end = None if go_on else next((i + 1 for i, t in enumerate(row) if t in stops), None)
                    n = min(end or len(row), caps[s + r])
                    ids.append(row[:n])
                    lps.append(logp[r, :n].tolist())
                    truncated.append(end is None or end > n)
        return Generations(completion_ids=ids, logprobs=lps, truncated=truncated)

    @contextlib.contextmanager
    def _static(self, length: int):
        """generate's arguments for the compiled decode step over the engine's one static cache: built at the first
        call for max(max_model_len, this call) tokens, reset in place after (its tensors keep their addresses, which
        the captured graph reads), rebuilt only for a longer call or another batch size (the budget loop's)."""
        from transformers import StaticCache
        from transformers.generation.configuration_utils import CompileConfig

        model = self.policy.model.get_base_model()
        if self._cache is None:
            _static_quant_states(model)
        if self._cache is None or self._cache_shape[0] != self.batch_size or self._cache_shape[1] < length:
            self._cache = None  # the old one's memory first
            self._cache_shape = (self.batch_size, max(length, self.max_len))
            self._cache = StaticCache(config=model.config, max_cache_len=self._cache_shape[1])
        else:
            self._cache.reset()
        cuda = torch.device(self.policy.device).type == "cuda"
        config = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead" if cuda else "default")
        # transformers 5.17 compiles the decode step only where the quantizer allows it, and its bitsandbytes 4-bit
        # quantizer does not (HfQuantizer.is_compileable's default), although bitsandbytes' 4-bit ops are registered
        # torch ops since 0.45 that Dynamo traces into the step's one graph (tests/test_hf_engine.py). Its other
        # criteria (a GPU, a compileable cache) hold by construction here.
        model._valid_auto_compile_criteria = lambda model_kwargs, generation_config: True
        try:
            yield dict(past_key_values=self._cache, compile_config=config)
        finally:
            del model._valid_auto_compile_criteria

    def sync(self, policy) -> dict[str, float]:
        return {}  # the sampler is the policy itself

    def release(self) -> None:
        pass

    def acquire(self) -> None:
        pass

    def close(self) -> None:
        pass
