"""Data: load the prompt dataset (hub or local file), render prompts (template, chat template), tokenize, batch.

The order of prompts is a pure function of (seed, step), so a resumed run sees exactly the prompts the
uninterrupted run would have seen, and every data-parallel rank can take its own slice of the same order.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer import hub
from trainer.errors import UserError

log = logging.getLogger(__name__)
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class PromptSet:
    prompts: list  # what reward functions receive as `prompts`: text, or chat messages
    prompt_ids: list[list[int]]
    columns: dict[str, list]  # the dataset's other columns, passed to reward functions
    conversational: bool
    truncated: int = 0  # prompts cut to max_prompt_length

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def indices(self, step: int, n: int, seed: int, shuffle: bool = True) -> list[int]:
        """The n prompt indices of a step: consecutive slices of per-epoch permutations."""
        out = []
        for pos in range(step * n, step * n + n):
            epoch, k = divmod(pos, len(self))
            order = np.random.RandomState(seed + epoch).permutation(len(self)) if shuffle else np.arange(len(self))
            out.append(int(order[k]))
        return out

    @property
    def max_prompt_tokens(self) -> int:
        """Tokens of the longest prompt after rendering and truncation (what a rollout's prompt side can reach)."""
        return max(map(len, self.prompt_ids), default=0)

    def longest(self, n: int) -> list[int]:
        """Indices of the n longest prompts (for a first step at worst-case shapes)."""
        return sorted(range(len(self)), key=lambda i: -len(self.prompt_ids[i]))[:n]


def load_rows(data, base_dir: Path):
    """The dataset as a `datasets.Dataset`, from a local file or the hub."""
    import datasets

    path = Path(data.dataset).expanduser()
    path = path if path.is_absolute() else base_dir / path
    suffix = Path(data.dataset).suffix.lower()
    if suffix in LOCAL_FORMATS or path.exists():
        if not path.is_file():
            raise UserError("data.dataset", f"file not found: {path}",
                            "give a path relative to the recipe file, or a hub dataset name")
        if suffix not in LOCAL_FORMATS:
            raise UserError("data.dataset", f"unsupported file type {suffix!r}", "use .jsonl, .json, .parquet or .csv")
        if path.stat().st_size < 4096 and not path.read_bytes().strip():  # datasets raises a bare StopIteration
            raise UserError("data.dataset", f"the dataset is empty: {path} has no rows", "point at a file with rows")
        try:
            return datasets.load_dataset(LOCAL_FORMATS[suffix], data_files=str(path), split="train")
        except Exception as e:
            raise UserError("data.dataset", f"cannot read {path}: {e.__class__.__name__}: {str(e)[:200]}",
                            "check the file's format") from None
    hub.offline()  # an offline machine reads the cache at once
    try:
        return datasets.load_dataset(data.dataset, data.subset, split=data.split)
    except Exception as e:
        raise UserError("data.dataset", *(hub.why_not("dataset", data.dataset) or (
            f"cannot load hub dataset {data.dataset!r} (subset={data.subset}, split={data.split}): "
            f"{e.__class__.__name__}: {str(e)[:200]}",
            "check the name, subset and split, or point at a local .jsonl/.parquet/.csv file"))) from None


def load_prompts(data, tokenizer, base_dir: Path, rows=None, tools: list[dict] | None = None) -> PromptSet:
    """Render and tokenize the prompts of `data` (or of `rows`, a `datasets.Dataset` already in hand); `tools`: the
    JSON schemas of a multi-turn rollout's tools, which the chat template writes into every prompt."""
    rows = load_rows(data, base_dir) if rows is None else rows
    columns = list(rows.column_names)
    if len(rows) == 0:
        raise UserError("data.dataset", "the dataset is empty", "point at a file or split with rows")
    if data.prompt_template is None and data.prompt_column not in columns:
        raise UserError("data.prompt_column", f"column {data.prompt_column!r} not in the dataset",
                        f"set data.prompt_column to one of {columns}, or give data.prompt_template")
    use_chat = data.chat_template if data.chat_template is not None else bool(getattr(tokenizer, "chat_template", None))
    if use_chat and not getattr(tokenizer, "chat_template", None):
        raise UserError("data.chat_template", "the tokenizer has no chat template", "set data.chat_template: false")
    prompts, ids, cut = [], [], 0
    for i, row in enumerate(rows):
        prompt = _render(data, row, i, columns)
        conversational = isinstance(prompt, list)
        if conversational and not use_chat:
            raise UserError("data.chat_template", "prompts are chat messages but chat templating is off",
                            "set data.chat_template: true (the tokenizer must have a chat template)")
        if use_chat:
            messages = prompt if conversational else [{"role": "user", "content": prompt}]
            if data.system_prompt and messages[0].get("role") != "system":
                messages = [{"role": "system", "content": data.system_prompt}] + messages
            prompt = messages
            tok = chat_ids(tokenizer, messages, tools)
        else:
            text = f"{data.system_prompt}\n{prompt}" if data.system_prompt else prompt
            tok = tokenizer(text)["input_ids"]
        if len(tok) > data.max_prompt_length:
            tok, cut = tok[-data.max_prompt_length:], cut + 1
        prompts.append(prompt)
        ids.append(tok)
    if cut:
        log.warning("%d of %d prompts were longer than data.max_prompt_length=%d and were cut from the left",
                    cut, len(ids), data.max_prompt_length)
    extra = {c: list(rows[c]) for c in columns if c != data.prompt_column}
    return PromptSet(prompts, ids, extra, conversational=use_chat, truncated=cut)


def chat_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The token ids of chat messages up to the assistant's header, as the chat template renders them."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, tools=tools)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _render(data, row: dict, i: int, columns: list[str]):
    if data.prompt_template is None:
        value = row[data.prompt_column]
        if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
            return value
        if not isinstance(value, str):
            raise UserError("data.prompt_column", f"row {i}: {data.prompt_column!r} is {type(value).__name__}, "
                            "expected text or a list of chat messages", "pick a text column or use prompt_template")
        return value
    try:
        return data.prompt_template.format(**row)
    except KeyError as e:
        raise UserError("data.prompt_template", f"refers to column {e.args[0]!r}, which the dataset lacks",
                        f"use columns from {columns}") from None
    except (IndexError, ValueError) as e:
        raise UserError("data.prompt_template", f"cannot format: {e}", "use {column} placeholders; "
                        "write literal braces as {{ and }}") from None
