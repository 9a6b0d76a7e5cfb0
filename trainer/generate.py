"""Sampling from a trained run: prompts rendered exactly as the recipe renders its data (template, system prompt,
chat template, max_prompt_length), completions from the run's engine kind; it never changes the adapter.

Prompts come from the command line (each one the prompt text, as a dataset's prompt column would hold it) or from a
file: .jsonl/.json/.parquet/.csv files are rows rendered with the recipe's prompt_column or prompt_template, any
other file holds one prompt per line.
"""
from __future__ import annotations

from pathlib import Path

from trainer.data import LOCAL_FORMATS, PromptSet, load_prompts, load_rows
from trainer.errors import UserError
from trainer.types import Sampling


def prompt_set(recipe, tokenizer, prompts: list[str] = (), prompts_file: str | Path | None = None) -> PromptSet:
    """The prompts as the run's data section renders and tokenizes its rows."""
    import datasets

    data = recipe.data
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise UserError("--prompts-file", f"file not found: {path}", "give a text file (one prompt per line) "
                            "or a .jsonl/.json/.parquet/.csv file of rows like the recipe's dataset")
        if path.suffix.lower() in LOCAL_FORMATS:  # rows of the dataset's format
            rows = load_rows(data.model_copy(update=dict(dataset=str(path.resolve()))), Path.cwd())
            return _render(data, tokenizer, rows, "--prompts-file")
        prompts = [*prompts, *(x for x in path.read_text().splitlines() if x.strip())]
    if not prompts:
        raise UserError("--prompt", "no prompt given", 'pass --prompt "..." (repeatable) or --prompts-file FILE')
    rows = datasets.Dataset.from_dict({"prompt": list(prompts)})
    return _render(data.model_copy(update=dict(prompt_column="prompt", prompt_template=None)), tokenizer, rows,
                   "--prompt")


def _render(data, tokenizer, rows, flag: str) -> PromptSet:
    try:
        return load_prompts(data, tokenizer, Path.cwd(), rows=rows)
    except UserError as e:  # the data section's message, pointed at the command's input
        raise UserError(f"{flag} ({e.field})", e.problem, e.fix) from None


def sample(engine, ps: PromptSet, tokenizer, n: int, max_tokens: int, temperature: float, top_p: float = 1.0,
           seed: int = 0) -> list[dict]:
    """n completions per prompt (temperature 0: greedy); one record per prompt."""
    engine.acquire()
    try:
        gens = engine.generate(ps.prompt_ids, Sampling(n=n, max_tokens=max_tokens, temperature=temperature,
                                                       top_p=top_p, seed=seed))
    finally:
        engine.release()
    texts = tokenizer.batch_decode(gens.completion_ids, skip_special_tokens=True)
    return [{"prompt": p, "completions": texts[i * n:(i + 1) * n], "truncated": gens.truncated[i * n:(i + 1) * n]}
            for i, p in enumerate(ps.prompts)]
