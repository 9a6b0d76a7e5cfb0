"""HF `generate` backend: samples with the training model itself, so it needs no weight sync and no extra memory.

Slow next to vLLM (no paged KV, no continuous batching) but exact: the sampler is the policy. It records the
logprob of each sampled token under logits / temperature (the distribution the loss uses) without keeping the
[steps, batch, vocab] scores that `output_logits=True` would hold.
"""
from __future__ import annotations

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


class HFEngine:
    name = "hf"

    def __init__(self, batch_size: int):
        self.policy, self.batch_size = None, batch_size
        self.info = {"engine": "hf", "base_copies": 1}

    def attach(self, policy: Policy) -> None:
        self.policy = policy

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> Generations:
        tok = self.policy.tokenizer
        eos, pad = tok.eos_token_id, tok.pad_token_id
        rows = [(p, i) for i, p in enumerate(prompt_ids) for _ in range(sampling.n)]
        caps = sampling.max_tokens_per_request or [sampling.max_tokens] * len(rows)
        ids, lps, truncated = [], [], []
        greedy = sampling.temperature == 0  # as in vLLM: temperature 0 is greedy decoding
        how = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=sampling.temperature,
                                                        top_p=sampling.top_p, top_k=sampling.top_k or 0)
        with eval_mode(self.policy.model), self.policy.autocast():  # LoRA as the trainer computes it
            for s in range(0, len(rows), self.batch_size):
                if sampling.seed is not None and not greedy:  # one RNG stream per chunk, keyed by its first global row
                    torch.manual_seed(sampling.seed + sampling.first_row + s)
                chunk = rows[s:s + self.batch_size]
                width = max(len(p) for p, _ in chunk)
                inp = torch.full((len(chunk), width), pad, dtype=torch.long)
                att = torch.zeros_like(inp)
                for r, (p, _) in enumerate(chunk):
                    inp[r, width - len(p):] = torch.tensor(p)
                    att[r, width - len(p):] = 1
                cap = _SampledLogprobs(sampling.temperature or 1.0)
                max_new = max(caps[s:s + len(chunk)])
                out = self.policy.model.generate(
                    input_ids=inp.to(self.policy.device), attention_mask=att.to(self.policy.device), **how,
                    max_new_tokens=max_new, min_new_tokens=max_new if sampling.ignore_eos else 0, eos_token_id=eos, pad_token_id=pad,
                    logits_processor=LogitsProcessorList([cap]), use_cache=True)
                gen = out[:, width:]
                logp = cap.finish(out)
                for r in range(len(chunk)):
                    row = gen[r].tolist()
                    n = len(row)
                    if eos in row:
                        n = row.index(eos) + 1
                    n = min(n, caps[s + r])
                    ids.append(row[:n])
                    lps.append(logp[r, :n].tolist())
                    truncated.append(eos not in row[:n])
        return Generations(completion_ids=ids, logprobs=lps, truncated=truncated)

    def sync(self, policy) -> dict[str, float]:
        return {}  # the sampler is the policy itself

    def release(self) -> None:
        pass

    def acquire(self) -> None:
        pass

    def close(self) -> None:
        pass
