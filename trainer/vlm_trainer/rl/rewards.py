"""Rewards of sampled responses: a named verifier, or a `reward` stage's model (`rl.reward`).

Verifiers score the response TEXT (special tokens dropped) against the prompt's reference answer (the last
assistant turn of its conversation sample):
- exact: 1.0 if `normalise(response) == normalise(reference)`, else 0.0. `normalise`: lower case, every
  character that is not a letter, digit or space dropped, runs of spaces collapsed, ends stripped;
- regex: 1.0 if `re.search(pattern, response)` finds a match, else 0.0;
- python: `module:function`, imported in the trainer process and called once per batch as
  `function(responses: list[str], references: list[str], prompts: list[str]) -> list[float]`
  (one float per response, in order; prompts are the rendered prompt texts, image tokens included).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from vlm_core.spec.rl import RLRewardSpec

RewardFn = Callable[[list[str], list[str], list[str]], Sequence[float]]


def normalise(text: str) -> str:
    text = re.sub(r"[^\w\s]|_", "", text.lower())
    return " ".join(text.split())


def exact_match(responses: list[str], references: list[str], prompts: list[str]) -> list[float]:
    return [float(normalise(r) == normalise(ref)) for r, ref in zip(responses, references, strict=True)]


def regex_match(pattern: str) -> RewardFn:
    compiled = re.compile(pattern)

    def score(responses: list[str], references: list[str], prompts: list[str]) -> list[float]:
        return [float(compiled.search(r) is not None) for r in responses]

    return score


def entry_point(name: str) -> RewardFn:
    """The function `module:function` names; a ValueError naming rl.reward.entryPoint when it cannot be loaded."""
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"rl.reward.entryPoint: cannot load {name!r} ({err})") from None
    if not callable(fn):
        raise ValueError(f"rl.reward.entryPoint: {name!r} is not callable")
    return fn  # type: ignore[no-any-return]


def verifier(spec: RLRewardSpec) -> RewardFn:
    """The reward function of a verifier spec."""
    if spec.verifier == "exact":
        return exact_match
    if spec.verifier == "regex":
        assert spec.pattern is not None
        return regex_match(spec.pattern)
    assert spec.entry_point is not None
    return entry_point(spec.entry_point)


def checked(fn: RewardFn, responses: list[str], references: list[str], prompts: list[str],
            device: torch.device) -> torch.Tensor:
    """The rewards as a float tensor; a ValueError when the function returns the wrong number or non-numbers."""
    scores: Any = fn(responses, references, prompts)
    try:
        values = [float(s) for s in scores]
    except (TypeError, ValueError) as err:
        raise ValueError(f"rl.reward: the reward function must return numbers ({err})") from None
    if len(values) != len(responses):
        raise ValueError(f"rl.reward: the reward function returned {len(values)} rewards for {len(responses)} responses")
    return torch.tensor(values, dtype=torch.float32, device=device)
