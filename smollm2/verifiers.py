"""Verifiers: programs that score a completion against the known answer, the rewards of GRPO (grpo.py).

A reward function takes (completion text, answer text, the example) and returns a float, 1.0 for a right answer.
`grpo.reward_funcs` names them: the ones registered here (exact_match, numeric, partial_list, chat_tasks), any a user
registers with `@reward("name")` in code imported before training, or `module:function`, imported at start. Several
are summed, as TRL sums its reward functions. A completion counts as correct (held-out accuracy) when every function
gives it full credit.
"""

import importlib
import math
import re
from typing import Callable

from smollm2.errors import ConfigError

RewardFn = Callable[[str, str, dict], float]
REWARDS: dict[str, RewardFn] = {}
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register a reward function under `name`, the name grpo.reward_funcs gives it."""
    def register(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn
    return register


def resolve(names: list[str]) -> list[RewardFn]:
    """The functions the config names; an unknown name is refused with the known ones."""
    fns = []
    for name in names:
        if ":" in name:   # module:function, e.g. my_rewards:length_penalty
            module, _, attr = name.partition(":")
            try:
                fns.append(getattr(importlib.import_module(module), attr))
            except (ImportError, AttributeError) as e:
                raise ConfigError(f"grpo.reward_funcs: '{name}' cannot be imported ({e}); give module:function of "
                                  "a module on the Python path") from None
        elif name in REWARDS:
            fns.append(REWARDS[name])
        else:
            raise ConfigError(f"grpo.reward_funcs: unknown verifier '{name}'; known: {', '.join(sorted(REWARDS))}, "
                              "or module:function")
    return fns


@reward("exact_match")
def exact_match(completion: str, answer: str, example: dict) -> float:
    return float(completion.strip() == answer.strip())


def last_number(text: str):
    """The number a text ends on (GSM8K's answers end "#### 42"; a model's reasoning ends on its result), or None.
    Thousands separators are dropped: "1,234" is 1234."""
    found = NUMBER.findall(text.split("####")[-1])
    try:
        return float(found[-1].replace(",", "")) if found else None
    except ValueError:
        return None


@reward("numeric")
def numeric(completion: str, answer: str, example: dict, tolerance: float = 1e-4) -> float:
    """1 when the completion's last number equals the answer's within a relative tolerance (1e-4 of its size, at
    least 1e-4 absolute): 42, 42.0 and "so the answer is 42." all match 42."""
    got, want = last_number(completion), last_number(answer)
    if got is None or want is None:
        return 0.0
    return float(math.isclose(got, want, rel_tol=tolerance, abs_tol=tolerance))


@reward("partial_list")
def partial_list(completion: str, answer: str, example: dict) -> float:
    """A comma-separated list scored position by position: the share of the answer's places the completion fills
    with the right item, over the longer of the two lists (extra items cost as missing ones do)."""
    got, want = completion.strip().split(","), answer.strip().split(",")
    return sum(g == w for g, w in zip(got, want)) / max(len(got), len(want))


# the built-in tasks (chat_tasks.py), each under the verifier its answer calls for
CHAT_TASKS = {"count": numeric, "add": numeric, "fact": exact_match, "repeat": partial_list, "reverse": partial_list,
              "sort": partial_list}


@reward("chat_tasks")
def chat_tasks(completion: str, answer: str, example: dict) -> float:
    return CHAT_TASKS.get(example.get("task"), exact_match)(completion, answer, example)
