"""The text game of recipes/text-game-tiny.yaml: guess a secret digit in a few turns, told "higher" or "lower".

An environment is a class: one object per conversation. reset(example) gets the dataset row and returns the opening
messages (None: the prompt alone); step(message) gets the model's assistant message and returns (reply messages,
done, reward). The reward reaches the recipe's reward functions as `env_reward` (trainer.rewards.builtin:
environment_reward passes it through).
"""
from __future__ import annotations

import re


class GuessDigit:
    def __init__(self, win_reward: float = 1.0, turn_cost: float = 0.1, no_digit_cost: float = 0.2):
        self.win_reward, self.turn_cost, self.no_digit_cost = win_reward, turn_cost, no_digit_cost
        self.secret, self.turn = 0, 0

    def reset(self, example: dict):
        self.secret, self.turn = int(example["secret"]), 0
        return None  # the dataset's prompt opens the game

    def step(self, message: dict):
        self.turn += 1
        found = re.search(r"\d", message["content"])
        if found is None:
            return "say one digit", False, -self.no_digit_cost
        guess = int(found.group())
        if guess == self.secret:
            return None, True, max(0.0, self.win_reward - self.turn_cost * (self.turn - 1))
        return ("higher" if guess < self.secret else "lower"), False, 0.0
