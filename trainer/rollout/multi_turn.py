"""Multi-turn rollouts: conversations with tools or an environment, every live conversation of a step sampled in one
batched engine call per turn, and only the model's own tokens marked for the loss.

A row's trajectory is everything after its prompt, in token space: the model's sampled tokens exactly as sampled
(never re-tokenized), then the tokens the chat template renders for the tool results or the environment's reply
(up to the next assistant header), then the model's next message, and so on. `sampled` marks the model's tokens:
the loss, the KL, the sampler/trainer log-prob gap and the importance-sampling correction read only those (the
sampler's log-prob of every other token is NaN, which the gap and the correction already leave out).

Tools (`rollout.tools`, module:function) run in worker processes (trainer/rewards/pool.py) under
`tool_timeout_s`, all calls of a turn at once; their JSON schemas come from their signatures and docstrings
(transformers' get_json_schema) and go to the chat template. An environment (`rollout.environment`, module:Class)
is one object per conversation, in this process: `reset(example)` -> opening messages (None, a string or a list of
messages, appended to the prompt), `step(assistant_message)` -> (reply messages, done[, reward]).

A message that stops at grpo.max_completion_length before its EOS, or at another of the engine's stop tokens (e.g.
Qwen's <|endoftext|>, an eos_token_id of its generation_config.json beside the template's <|im_end|>), is read as it
stands, and the template's EOS closes it after the model's tokens. A conversation ends when the model answers without
a tool call (no environment), the environment says done, `max_turns` assistant messages were sampled ("truncated" when the last one was cut), or on a
failure that fixes its total reward: a tool call that does not parse (`parse_failure_reward`), the
trajectory running past `max_trajectory_tokens` (`overflow_reward`), a tool or the environment raising, timing out
or returning something that is not text or JSON (`tool_error_reward`).
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from trainer.data import chat_ids
from trainer.errors import UserError
from trainer.types import Generations, Sampling

log = logging.getLogger(__name__)
FAILURES = ("parse_failure", "overflow", "tool_error")  # ends whose total reward the recipe fixes
_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_PROBE = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]


@dataclass
class Tool:
    name: str
    ref: str
    schema: dict  # {"type": "function", "function": {"name", "description", "parameters"}}
    pool: object  # rewards.pool.WorkerPool


@dataclass
class Conversation:
    example: dict  # the dataset row: "prompt" and the other columns
    prompt_ids: list[int]
    env: object = None
    ids: list[int] = field(default_factory=list)  # the trajectory after the prompt
    sampled: list[int] = field(default_factory=list)  # 1: the model sampled this token
    logps: list[float] = field(default_factory=list)  # the sampler's log-prob (NaN for tool / environment tokens)
    messages: list[dict] = field(default_factory=list)  # the conversation after the prompt, as chat messages
    env_reward: float | None = None
    end: str | None = None  # answer, done, max_turns, truncated, parse_failure, overflow, tool_error
    turns: int = 0
    tool_calls: int = 0
    reply_from: int = 0  # messages[reply_from:]: the latest reply (tool results or the environment's)
    cut: bool = False  # the latest message stopped at grpo.max_completion_length, before an EOS
    closed: bool = True  # the latest message ended with the template's EOS (not cut, nor at another stop token)


def load_tools(recipe) -> list[Tool]:
    """Import each tool and read its schema (before any weight loads); each gets its worker pool (started on first
    use)."""
    from transformers.utils import get_json_schema

    from trainer.rewards import load_callable
    from trainer.rewards.pool import WorkerPool

    mt, out = recipe.rollout.multi_turn, []
    for i, ref in enumerate(recipe.rollout.tools):
        where = f"rollout.tools[{i}]"
        fn = load_callable(ref, Path(recipe.base_dir), where)
        try:
            schema = get_json_schema(fn)
        except Exception as e:
            raise UserError(where, f"cannot read the JSON schema of {ref}: {e}",
                            "give the function type hints and a Google-style docstring: a description, then "
                            "'Args:' with one line per argument") from None
        name = schema["function"]["name"]
        if any(t.name == name for t in out):
            raise UserError(where, f"two tools are named {name!r}", "give each tool function its own name")
        pool = WorkerPool(name, ref, recipe.base_dir, where, mt.tool_workers, mt.tool_timeout_s, 1, kind="tool")
        out.append(Tool(name, ref, schema, pool))
    return out


def load_environment(recipe):
    """The environment class of `rollout.environment` (module:Class or file.py:Class), checked for reset and step."""
    from trainer.rewards import load_callable

    if not recipe.rollout.environment:
        return None
    cls = load_callable(recipe.rollout.environment, Path(recipe.base_dir), "rollout.environment")
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if missing:
        raise UserError("rollout.environment", f"{recipe.rollout.environment} has no {' or '.join(missing)} method",
                        "give the class reset(self, example) -> messages and step(self, message) -> "
                        "(messages, done, reward)")
    return cls


def call_format(tokenizer, wanted: str) -> str:
    """hermes (Qwen's <tool_call> blocks) or json (Llama 3.1's bare JSON message), from the chat template on auto."""
    if wanted != "auto":
        return wanted
    template = str(getattr(tokenizer, "chat_template", "") or "")
    return "json" if "ipython" in template and "<tool_call>" not in template else "hermes"


def parse_calls(text: str, fmt: str) -> tuple[list[dict] | None, str | None]:
    """The tool calls in an assistant message: ([{"name", "arguments"}], None), ([], None) when there are none, or
    (None, why) when the message tries to call and the call does not parse."""
    if fmt == "hermes":
        if "<tool_call>" not in text:
            return [], None
        blocks = _HERMES.findall(text)
        if not blocks or len(blocks) != text.count("<tool_call>"):
            return None, "an unclosed <tool_call>"
        raw = [b.strip() for b in blocks]
        key = "arguments"
    else:
        stripped = text.strip()
        if not stripped.startswith("{"):
            return [], None
        raw, key = [stripped], "parameters"
    calls = []
    for r in raw:
        try:
            obj = json.loads(r)
        except ValueError as e:
            return None, f"not JSON ({e})"
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None, "no tool name"
        args = obj.get(key, obj.get("arguments", obj.get("parameters", {})))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None, "arguments are not JSON"
        if not isinstance(args, dict):
            return None, "arguments are not an object"
        calls.append({"name": obj["name"], "arguments": args})
    return calls, None


def check_arguments(call: dict, tools: dict[str, Tool]) -> str | None:
    """Why a parsed call cannot be made (unknown tool, unknown or missing arguments), or None."""
    tool = tools.get(call["name"])
    if tool is None:
        return f"no tool named {call['name']!r}"
    params = tool.schema["function"].get("parameters", {})
    unknown = set(call["arguments"]) - set(params.get("properties", {}))
    missing = set(params.get("required", [])) - set(call["arguments"])
    if unknown or missing:
        return f"{call['name']}: unknown arguments {sorted(unknown)}, missing {sorted(missing)}"
    return None


def tool_text(value) -> str | None:
    """A tool's return value as the text the model reads, or None when it is neither text nor JSON."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, (bool, int, float, list, dict)):
        try:
            return json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            return None
    return None


def _as_messages(value, where: str) -> list[dict]:
    """An environment's reply (a string, a message or a list of messages) as chat messages."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [dict(m) for m in value]
    raise ValueError(f"{where} returned {type(value).__name__}, not a string or chat messages")


class MultiTurn:
    """Runs a step's conversations on a rollout engine; one per recipe (tools, environment class, chat template)."""

    def __init__(self, recipe, tokenizer, tools: list[Tool], env_cls=None):
        self.cfg, self.tok, self.tools, self.env_cls = recipe.rollout.multi_turn, tokenizer, tools, env_cls
        self.by_name = {t.name: t for t in tools}
        self.fmt = call_format(tokenizer, self.cfg.tool_call_format)
        self.max_prompt = recipe.data.max_prompt_length
        self.turn_cap = recipe.grpo.max_completion_length
        self.eos_text, self.eos_id = tokenizer.eos_token or "", tokenizer.eos_token_id
        self._probe = tokenizer.apply_chat_template(_PROBE, tokenize=False)  # what each reply's rendering extends
        self._tail = self._template_tail()

    @classmethod
    def build(cls, recipe, tokenizer) -> "MultiTurn | None":
        if not recipe.is_multi_turn:
            return None
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("rollout.tools", "multi-turn rollouts render turns with the tokenizer's chat template, and "
                            "this tokenizer has none", "use a chat model's tokenizer (e.g. an -Instruct model)")
        return cls(recipe, tokenizer, load_tools(recipe), load_environment(recipe))

    @property
    def schemas(self) -> list[dict] | None:
        return [t.schema for t in self.tools] or None

    def close(self) -> None:
        for t in self.tools:
            t.pool.close()

    # -------------------------------------------------------------------------------- rendering

    def _template_tail(self) -> str:
        """What the template writes after an assistant message's EOS (e.g. Qwen's newline): the start of the tokens
        that follow a sampled message. Checks that the template renders a conversation as a growing prefix."""
        a = self._probe
        b = self.tok.apply_chat_template(_PROBE + [{"role": "user", "content": "z"}], tokenize=False,
                                         add_generation_prompt=True)
        if not b.startswith(a):
            raise UserError("rollout.tools", "the tokenizer's chat template does not render a conversation as a prefix "
                            "of its continuation, so the tokens of a tool or environment reply cannot be told apart",
                            "use a chat template that renders earlier messages the same whatever follows")
        if self.eos_text and self.eos_text in a:
            return a[a.rfind(self.eos_text) + len(self.eos_text):]
        return ""

    def reply_ids(self, messages: list[dict], closed: bool = True) -> list[int]:
        """The tokens after a sampled assistant message up to the next assistant header: the template's EOS when the
        message did not end with it (closed=False: cut, or ended at another stop token), its tail, the reply messages,
        the generation prompt."""
        b = self.tok.apply_chat_template(_PROBE + messages, tokenize=False, add_generation_prompt=True)
        head = self._tail if closed else self.eos_text + self._tail
        return self.tok(head + b[len(self._probe):], add_special_tokens=False)["input_ids"]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return chat_ids(self.tok, messages, self.schemas)[-self.max_prompt:]  # cut from the left, as data.py cuts

    def cut(self, text: str) -> str:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.cfg.tool_output_max_tokens:
            return text
        return self.tok.decode(ids[:self.cfg.tool_output_max_tokens]) + " ...[cut]"

    # -------------------------------------------------------------------------------- the loop

    def start(self, prompts, idx: list[int], n: int) -> list[Conversation]:
        convs = []
        for k, i in enumerate(idx):
            example = {"prompt": prompts.prompts[i], **{c: v[i] for c, v in prompts.columns.items()}}
            for j in range(n):
                c = Conversation(example, list(prompts.prompt_ids[i]))
                if self.env_cls is not None:
                    try:
                        c.env = self.env_cls(**self.cfg.environment_kwargs)
                        opening = _as_messages(c.env.reset(dict(example)), "reset()")
                    except Exception as e:
                        raise UserError("rollout.environment", f"{self.env_cls.__name__} failed to start a "
                                        f"conversation: {e.__class__.__name__}: {e}",
                                        "fix the environment's constructor or reset(example)") from None
                    if opening:  # the prompt is chat messages (multi-turn recipes render with the chat template)
                        c.prompt_ids = self.prompt_ids(list(example["prompt"]) + opening)
                convs.append(c)
        return convs

    def generate(self, engine, prompts, idx: list[int], sampling: Sampling) -> Generations:
        """The step's conversations: G per prompt, prompt-major, as `Generations` with per-row prompts, the model's
        token mask, the messages after the prompt, and the fixed rewards of failed conversations."""
        convs = self.start(prompts, idx, sampling.n)
        budget, turns = self.cfg.max_trajectory_tokens, self.cfg.max_turns
        if sampling.ignore_eos:  # the worst-case first step: one message fills the whole trajectory
            turns = 1
        stats = {"engine_calls": 0, "tool_calls": 0, "tool_timeouts": 0}
        for turn in range(turns):
            live = [c for c in convs if c.end is None]
            if not live:
                break
            caps = [min(budget if sampling.ignore_eos else self.turn_cap, budget - len(c.ids)) for c in live]
            seed = None if sampling.seed is None else sampling.seed + 7919 * turn
            step = Sampling(n=1, max_tokens=max(caps), temperature=sampling.temperature, top_p=sampling.top_p,
                            top_k=sampling.top_k, seed=seed, first_row=sampling.first_row,
                            max_tokens_per_request=caps, ignore_eos=sampling.ignore_eos)
            gens = engine.generate([c.prompt_ids + c.ids for c in live], step)
            stats["engine_calls"] += 1
            pending: list[tuple[Conversation, list[dict]]] = []
            for c, ids, lps, cut in zip(live, gens.completion_ids, gens.logprobs or [None] * len(live),
                                        gens.truncated):
                c.turns += 1
                c.ids += ids
                c.sampled += [1] * len(ids)
                c.logps += list(lps) if lps is not None else [math.nan] * len(ids)
                text = self.tok.decode(ids, skip_special_tokens=True)
                message = {"role": "assistant", "content": text}
                c.messages.append(message)
                c.cut = cut  # stopped at grpo.max_completion_length: the message is read as it stands
                c.closed = not cut and bool(ids) and ids[-1] == self.eos_id
                if cut and len(c.ids) >= budget:
                    c.end = "overflow"
                    continue
                calls, why = parse_calls(text, self.fmt) if self.tools else ([], None)
                why = why or next((w for w in (check_arguments(k, self.by_name) for k in calls or []) if w), None)
                if why is not None:
                    c.end = "parse_failure"
                    continue
                if calls:
                    message["tool_calls"] = [{"type": "function", "function": k} for k in calls]
                    pending.append((c, calls))
                elif c.env is not None:
                    self._env_step(c, message)
                else:
                    c.end = "truncated" if cut else "answer"
            self._run_tools(pending, stats)
            for c in live:
                if c.end is not None:
                    continue
                if turn == turns - 1:
                    c.end = "truncated" if c.cut else "max_turns"
                    continue
                reply = self.reply_ids(c.messages[c.reply_from:], closed=c.closed)
                if len(c.ids) + len(reply) >= budget:  # no room left for the model's next message
                    c.end = "overflow"
                    continue
                c.ids += reply
                c.sampled += [0] * len(reply)
                c.logps += [math.nan] * len(reply)
        for c in convs:
            c.end = c.end or "max_turns"
        return self._generations(convs, stats)

    def _env_step(self, c: Conversation, message: dict) -> None:
        try:
            out = c.env.step(dict(message))
            if not isinstance(out, tuple) or len(out) not in (2, 3):
                raise ValueError(f"step() returned {type(out).__name__}, not (messages, done[, reward])")
            reply, done = _as_messages(out[0], "step()"), bool(out[1])
            reward = out[2] if len(out) == 3 else None
            if reward is not None:
                reward = float(reward)
                if not math.isfinite(reward):
                    raise ValueError(f"step() returned the reward {reward}")
                c.env_reward = (c.env_reward or 0.0) + reward
        except Exception as e:  # the conversation ends with tool_error_reward; the first error of a run is logged
            log.warning("environment %s: %s: %s (conversation ended: tool_error_reward)",
                        type(c.env).__name__, e.__class__.__name__, e)
            c.end = "tool_error"
            return
        if done:
            c.end = "done"
            return
        c.reply_from = len(c.messages)
        c.messages += reply

    def _run_tools(self, pending: list[tuple[Conversation, list[dict]]], stats: dict) -> None:
        """Every tool call of this turn, across conversations, in the tools' worker pools at once."""
        from trainer.rewards.pool import Batch

        if not pending:
            return
        batch, per_pool = Batch(), {}
        for ci, (c, calls) in enumerate(pending):
            for k, call in enumerate(calls):
                pool = self.by_name[call["name"]].pool
                per_pool.setdefault(pool, []).append((ci, k, call))
        for pool, items in per_pool.items():
            batch.add(pool, [(range(n, n + 1), call["arguments"]) for n, (_, _, call) in enumerate(items)])
        try:
            outcomes = batch.start().finish()
        except BaseException:
            batch.abort()
            raise
        results: dict[tuple[int, int], str | None] = {}
        for pool, outs in outcomes.items():
            for (ci, k, call), out in zip(per_pool[pool], outs):
                stats["tool_calls"] += 1
                stats["tool_timeouts"] += int(out.timed_out)
                results[ci, k] = None if out.error or out.timed_out else tool_text(out.values)
        for ci, (c, calls) in enumerate(pending):
            c.tool_calls += len(calls)
            texts = [results[ci, k] for k in range(len(calls))]
            if any(t is None for t in texts):
                c.end = "tool_error"
                continue
            c.reply_from = len(c.messages)
            c.messages += [{"role": "tool", "name": call["name"], "content": self.cut(t)}
                           for call, t in zip(calls, texts)]

    def _generations(self, convs: list[Conversation], stats: dict) -> Generations:
        fixed = {"parse_failure": self.cfg.parse_failure_reward, "overflow": self.cfg.overflow_reward,
                 "tool_error": self.cfg.tool_error_reward}
        ends = [c.end for c in convs]
        model = sum(sum(c.sampled) for c in convs)
        stats.update({f"ends/{e}": ends.count(e) / len(convs) for e in
                      ("answer", "done", "max_turns", "truncated", *FAILURES)})
        stats.update(turns_mean=sum(c.turns for c in convs) / len(convs),
                     model_token_frac=model / max(1, sum(len(c.ids) for c in convs)))
        return Generations(
            completion_ids=[c.ids for c in convs], logprobs=[c.logps for c in convs],
            truncated=[c.end in ("truncated", "overflow") for c in convs],
            prompt_ids=[c.prompt_ids for c in convs], sampled=[c.sampled for c in convs],
            messages=[c.messages for c in convs], fixed_reward=[fixed.get(c.end) for c in convs],
            columns={"env_reward": [c.env_reward for c in convs], "trajectory_end": ends},
            stats={f"multi_turn/{k}": float(v) for k, v in stats.items()})
