"""Built-in reward functions with TRL's signature: math answer match, output format, length, and toy tasks.

Reference them from a recipe as `trainer.rewards.builtin:<name>`. Completions may be plain strings or chat
message lists (`[{"role": "assistant", "content": ...}]`), as TRL passes them for conversational datasets.
"""
from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)


def _text(c) -> str:
    if isinstance(c, list):
        return "".join(m.get("content", "") for m in c if isinstance(m, dict))
    return str(c)


def extract_answer(text: str) -> str | None:
    r"""The final answer of a solution: after the last '####', else inside the last \boxed{}, else in <answer>."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    m = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    return m[-1].strip() if m else None


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def _normalize(ans: str | None) -> str | None:
    if ans is None:
        return None
    nums = _NUMBER.findall(ans)
    if nums:
        v = nums[-1].replace(",", "")
        try:
            f = float(v)
            return str(int(f)) if f == int(f) else str(f)
        except ValueError:
            return v
    return ans.strip().strip(".").lower()


def math_answer(prompts, completions, answer, **_) -> list[float]:
    """1.0 when the completion's final answer equals the reference (gsm8k '#### 72' or a bare '72'), else 0.0."""
    out = []
    for c, ref in zip(completions, answer):
        ref_ans = extract_answer(str(ref)) or str(ref)
        got = _normalize(extract_answer(_text(c)))
        out.append(1.0 if got is not None and got == _normalize(ref_ans) else 0.0)
    return out


def think_answer_format(prompts, completions, **_) -> list[float]:
    """1.0 when the completion is exactly '<think>...</think><answer>...</answer>', else 0.0."""
    return [1.0 if _FORMAT.match(_text(c)) else 0.0 for c in completions]


def length(prompts, completions, target: int = 200, **_) -> list[float]:
    """Closeness of the completion's length in characters to `target`: 1 at the target, down to -1."""
    return [max(-1.0, 1.0 - abs(len(_text(c)) - target) / target) for c in completions]


def char_class_fraction(prompts, completions, target=None, **_) -> list[float]:
    """Toy task: the fraction of non-space characters of the class the prompt asks for ('digits' or 'vowels')."""
    out = []
    for k, c in enumerate(completions):
        want = target[k] if target is not None else "digits"
        chars = [ch for ch in _text(c) if not ch.isspace()]
        if not chars:
            out.append(0.0)
            continue
        hit = str.isdigit if want == "digits" else (lambda ch: ch in "aeiou")
        out.append(sum(1 for ch in chars if hit(ch)) / len(chars))
    return out


def char_class_all(prompts, completions, target=None, **_) -> list[float]:
    """Toy task, pass/fail: 1.0 when every non-space character is of the asked class (and there is one), else 0.0."""
    return [1.0 if f == 1.0 else 0.0 for f in char_class_fraction(prompts, completions, target)]


def environment_reward(prompts, completions, env_reward=None, **_) -> list[float | None]:
    """A multi-turn environment's own reward: the sum of what its step() returned over the conversation (None where
    it gave none). Only in a recipe with rollout.environment, which passes `env_reward`."""
    if env_reward is None:
        raise ValueError("environment_reward needs rollout.environment: no env_reward was passed")
    return list(env_reward)
