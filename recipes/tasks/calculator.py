"""The calculator task of recipes/tool-calculator-tiny.yaml: a tool the model may call, and the task's rewards.

Tools are plain functions with type hints and a Google-style docstring (the chat template gets their JSON schema);
they run in worker processes under rollout.multi_turn.tool_timeout_s. Rewards have TRL's signature; in a multi-turn
recipe `completions` are the messages after the prompt (assistant, tool and environment turns).
"""
from __future__ import annotations

import ast
import operator
import re

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression of numbers with + - * / and parentheses.

    Args:
        expression: The expression to evaluate, e.g. "17 * 23".
    """
    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:80]}")

    value = ev(ast.parse(expression, mode="eval").body)
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def _final(messages) -> str:
    """The last assistant message's text (a plain string completion is its own final message)."""
    if isinstance(messages, str):
        return messages
    said = [m.get("content", "") for m in messages if m.get("role") == "assistant"]
    return said[-1] if said else ""


def final_answer(prompts, completions, answer, **_) -> list[float]:
    """1.0 when the last number of the final assistant message is the answer, else 0.0."""
    out = []
    for c, ref in zip(completions, answer):
        nums = re.findall(r"-?\d+", _final(c))
        out.append(1.0 if nums and int(nums[-1]) == int(ref) else 0.0)
    return out


def answer_in_digits(prompts, completions, **_) -> list[float]:
    """Shaping for a model that cannot yet answer: the fraction of the final message's characters that are digits."""
    out = []
    for c in completions:
        chars = [ch for ch in _final(c) if not ch.isspace()]
        out.append(sum(ch.isdigit() for ch in chars) / len(chars) if chars else 0.0)
    return out


def called_tool(prompts, completions, **_) -> list[float]:
    """1.0 when the conversation holds a tool result (a call that parsed and ran), else 0.0."""
    return [float(isinstance(c, list) and any(m.get("role") == "tool" for m in c)) for c in completions]
