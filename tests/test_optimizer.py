"""The LR schedule is nanotron's, to 1e-15 relative, on the official schedules and their variants; weight decay
reaches every parameter as in nanotron, or all but the 1-D ones when asked; the optimizer state stays fp32.

nanotron on PyPI (0.4) does not import (a circular import) and predates the 1-sqrt decay, so the references here are
written from nanotron's definition: its defaults resolved as its config classes resolve them, each phase evaluated
exactly (rational arithmetic), and where nanotron's own float expression is what defines a value (cosine and 1-sqrt
near the end of a decay, where 1 + cos(x) cancels) that expression in its order of operations.
"""

import math
import random
from fractions import Fraction

import pytest
import torch
import yaml

from model import ModelConfig, SmolLM2
from smollm2.config import LRSchedulerArgs, OptimizerArgs
from smollm2.optimizer import build_optimizer, lr_at

OFFICIAL = ["tests/fixtures/smollm2/config_smollm2_135M.yaml", "tests/fixtures/smollm2/config_smollm2_360M.yaml",
            "tests/fixtures/smollm2/config_smollm2_1B.yaml"]


def sched(style="linear", **kw):
    base = dict(learning_rate=3e-3, lr_warmup_steps=10, lr_warmup_style="linear", lr_decay_starting_step=20,
                lr_decay_steps=10, lr_decay_style=style, min_decay_lr=3e-4)
    base.update(kw)
    return LRSchedulerArgs(**base)


def reference(step: int, s: LRSchedulerArgs, train_steps: int) -> float:
    """nanotron's schedule from its definition. Defaults as nanotron resolves them: lr_decay_steps null ->
    train_steps - lr_warmup_steps (Config.__post_init__, even when lr_decay_starting_step is set);
    lr_decay_starting_step null -> lr_warmup_steps; min_decay_lr null -> learning_rate; lr_decay_style null -> linear.
    Linear phases are exact rationals; cosine and 1-sqrt are nanotron's float expression."""
    lr, w = Fraction(s.learning_rate), s.lr_warmup_steps
    low = lr if s.min_decay_lr is None else Fraction(s.min_decay_lr)
    n = train_steps - w if s.lr_decay_steps is None else s.lr_decay_steps
    d = w if s.lr_decay_starting_step is None else s.lr_decay_starting_step
    if w == 0 and n == 0:
        return float(lr)   # nanotron returns lr as LambdaLR's multiplier here: it trains at lr**2, a bug not copied
    if step <= w:
        return float(lr * step / max(w, 1)) if s.lr_warmup_style == "linear" else float(lr)
    if step < d:
        return float(lr)
    if step >= d + n:
        return float(low)
    k, style = step - d, s.lr_decay_style or "linear"
    if style == "linear":
        return float(low + (lr - low) * (n - k) / n)
    lr_f, low_f = float(lr), float(low)
    if style == "cosine":
        return low_f + (lr_f - low_f) * (1 + math.cos(math.pi * k / n)) / 2
    return low_f + (lr_f - low_f) * (1 - math.sqrt(k / n))


def assert_same(steps, s, train_steps):
    for step in steps:
        want, got = reference(step, s, train_steps), lr_at(step, s, train_steps)
        assert got == pytest.approx(want, rel=1e-15, abs=0), f"step {step}: {got!r} vs {want!r}"


@pytest.mark.parametrize("path", OFFICIAL)
def test_official_schedules_equal_nanotrons_to_1e_15_to_the_last_decay_step(path):
    cfg = yaml.safe_load(open(path))
    s = LRSchedulerArgs(**cfg["optimizer"]["learning_rate_scheduler"])
    total = cfg["tokens"]["train_steps"]
    start, length = s.lr_decay_starting_step, s.lr_decay_steps
    steps = [*range(0, 2 * s.lr_warmup_steps + 5), *range(start - 5, start + 5), *range(start + length - 3000,
             total + 3), *random.Random(0).sample(range(total), 5000)]
    assert_same(steps, s, total)
    # near the end of the decay the value is tiny: 1 - p (as this repository once computed it) is off by ~1e-11 there
    last = start + length - 1
    assert lr_at(last, s, total) == pytest.approx(s.learning_rate / length, rel=1e-15)


@pytest.mark.parametrize("warmup_style", ["linear", "constant"])
@pytest.mark.parametrize("decay_style", ["linear", "cosine", "1-sqrt", None])
@pytest.mark.parametrize("warmup, start, length, low", [
    (10, 20, 10, 3e-4),      # warmup, stable, decay to a floor (warmup-stable-decay)
    (10, None, None, 0.0),   # decay right after warmup, to the end of training
    (10, 40, None, 0.0),     # a late start with the default length: train_steps - warmup, not train_steps - start
    (10, 20, 10, None),      # min_decay_lr null: nanotron's default is the peak LR, so nothing decays
    (0, 5, 30, 1e-4),        # no warmup
    (7, 3, 4, 0.0),          # a decay "starting" inside the warmup begins after it, on the remaining steps
    (10, None, 0, 0.0),      # no decay steps: the floor right after warmup
    (80, None, None, 0.0),   # warmup longer than training: the default length is negative, the floor follows
])
def test_every_variant_equals_nanotrons_schedule(warmup_style, decay_style, warmup, start, length, low):
    s = sched(decay_style, lr_warmup_style=warmup_style, lr_warmup_steps=warmup, lr_decay_starting_step=start,
              lr_decay_steps=length, min_decay_lr=low)
    assert_same(range(0, 100), s, train_steps=60)


def test_hand_values_of_a_warmup_stable_decay_schedule():
    s = sched()
    expected = {0: 0.0, 5: 1.5e-3, 10: 3e-3, 15: 3e-3, 20: 3e-3, 25: 1.65e-3, 29: 5.7e-4, 30: 3e-4, 1000: 3e-4}
    for step, lr in expected.items():
        assert lr_at(step, s, 100) == pytest.approx(lr, abs=1e-15)
    assert lr_at(25, sched("cosine"), 100) == pytest.approx(1.65e-3)
    assert lr_at(25, sched("1-sqrt"), 100) == pytest.approx(3e-4 + 2.7e-3 * (1 - math.sqrt(0.5)))


def test_nanotron_edge_cases():
    # no warmup with linear style: nanotron's first update falls in the warmup branch (step 0 <= 0) and gets 0
    assert lr_at(0, sched(lr_warmup_steps=0), 100) == 0.0
    assert lr_at(1, sched(lr_warmup_steps=0), 100) == 3e-3
    assert lr_at(0, sched(lr_warmup_steps=0, lr_warmup_style="constant"), 100) == 3e-3
    # min_decay_lr left out: nanotron sets it to learning_rate, so the "decay" stays at the peak
    assert {lr_at(k, sched(min_decay_lr=None), 100) for k in range(10, 100)} == {3e-3}
    # lr_decay_starting_step set, lr_decay_steps null: nanotron decays over train_steps - warmup = 90 steps
    s = sched(lr_decay_starting_step=40, lr_decay_steps=None, min_decay_lr=0.0)
    assert lr_at(40 + 45, s, 100) == pytest.approx(1.5e-3, rel=1e-15)
    assert lr_at(129, s, 100) > 0 and lr_at(130, s, 100) == 0.0
    # warmup 0 and lr_decay_steps 0: nanotron trains at lr**2 (its lambda returns lr as the multiplier); here, lr
    assert {lr_at(k, sched(lr_warmup_steps=0, lr_decay_steps=0), 100) for k in range(50)} == {3e-3}


def test_lr_is_absolute_not_a_multiplier():
    # the lr**2 pitfall: a LambdaLR lambda that returned the absolute LR would give 9e-6 here
    assert lr_at(15, sched(), 100) == pytest.approx(3e-3)


def tiny_model():
    return SmolLM2(ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=100))


def test_weight_decay_reaches_every_parameter_as_in_nanotron_and_the_tied_matrix_once():
    model = tiny_model()
    [group] = build_optimizer(model, OptimizerArgs(weight_decay=0.1), fused=False).param_groups
    assert group["weight_decay"] == 0.1
    assert {id(p) for p in group["params"]} == {id(p) for p in model.parameters()}
    assert any(p.dim() == 1 for p in group["params"]), "RMSNorm gains decay too"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert len(group["params"]) == len(list(model.parameters()))
    assert sum(p.numel() for p in group["params"]) == model.num_parameters()


def test_weight_decay_can_exclude_1d_parameters():
    model = tiny_model()
    decay, exempt = build_optimizer(model, OptimizerArgs(weight_decay=0.1), fused=False,
                                    exclude_1d_from_weight_decay=True).param_groups
    assert decay["weight_decay"] == 0.1 and exempt["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in exempt["params"])
    assert len(decay["params"]) + len(exempt["params"]) == len(list(model.parameters()))


def test_optimizer_state_stays_fp32_under_bf16_autocast():
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50)
    model = SmolLM2(cfg)
    opt = build_optimizer(model, OptimizerArgs(), fused=False)
    x = torch.randint(0, 50, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(x)[0], model(x, x)[1]
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    opt.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(t.dtype == torch.float32 for s in opt.state.values() for k, t in s.items() if k != "step")
