"""Recipe fields named like TRL's GRPOConfig fields have TRL 1.16's defaults, except the rows of README.md's table
"Where our defaults differ from TRL's", which must name our default and TRL's exactly (no stale rows)."""
from __future__ import annotations

import ast
import dataclasses
import re
from typing import get_args

from pydantic import BaseModel

from tests.conftest import ROOT
from trainer.recipe import Recipe

HEADING = "## Where our defaults differ from TRL's"


def deviation_table() -> dict[str, tuple[object, object, str]]:
    """README's table: {"section.field": (ours, TRL's, why)}; values are Python literals in backticks."""
    text = (ROOT / "README.md").read_text()
    assert HEADING in text, f"README.md lacks the section {HEADING!r}"
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    table = {}
    for line in rows:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 4, f"a row needs 4 cells (field, ours, TRL, why): {line}"
        field, ours, trl, why = (re.fullmatch(r"`(.*)`", c).group(1) if i < 3 else c for i, c in enumerate(cells))
        assert why, f"{field}: say why"
        assert field not in table, f"{field} has two rows"
        table[field] = (ast.literal_eval(ours), ast.literal_eval(trl), why)
    return table


def trl_defaults() -> dict[str, object]:
    from trl import GRPOConfig

    out = {}
    for f in dataclasses.fields(GRPOConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def mirrored_fields(model: type[BaseModel] = Recipe, prefix: str = "") -> dict[str, object]:
    """Every field of every recipe section (nested ones too) whose name is a GRPOConfig field: {"section.field":
    our default}."""
    trl = trl_defaults()
    out = {}
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        subs = [a for a in (info.annotation, *get_args(info.annotation), *(x for a in get_args(info.annotation)
                                                                          for x in get_args(a)))
                if isinstance(a, type) and issubclass(a, BaseModel)]
        if subs:
            out.update(mirrored_fields(subs[0], f"{path}."))
        elif prefix and name in trl:
            out[path] = info.get_default(call_default_factory=True)
    return out


def test_the_mirror_covers_the_fields_trl_users_copy():
    fields = mirrored_fields()
    for f in ("grpo.num_generations", "grpo.max_completion_length", "grpo.beta", "grpo.loss_type",
              "grpo.vllm_importance_sampling_correction", "grpo.vllm_importance_sampling_mode",
              "grpo.vllm_importance_sampling_clip_min", "grpo.vllm_importance_sampling_clip_max",
              "train.learning_rate", "train.lr_scheduler_type", "train.optim", "train.seed"):
        assert f in fields, f


def test_every_default_that_differs_from_trls_has_a_row_and_every_row_is_true():
    trl, table = trl_defaults(), deviation_table()
    fields = mirrored_fields()
    unexplained = {f: (ours, trl[f.rsplit(".", 1)[1]]) for f, ours in fields.items()
                   if ours != trl[f.rsplit(".", 1)[1]] and f not in table}
    assert not unexplained, (f"defaults that differ from TRL 1.16's (ours, TRL's) without a row in README.md's "
                             f"'{HEADING[3:]}': {unexplained}; match TRL's default or add a row saying why")
    for f, (ours, theirs, _) in table.items():
        assert f in fields, f"README row {f}: not a recipe field named like a GRPOConfig field"
        name = f.rsplit(".", 1)[1]
        assert (ours, theirs) == (fields[f], trl[name]), (
            f"README row {f} says ours {ours!r}, TRL {theirs!r}; the code says {fields[f]!r}, {trl[name]!r}")
        assert fields[f] != trl[name], f"README row {f}: the defaults agree now; remove the row"
