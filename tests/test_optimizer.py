"""The LR schedule against values worked out by hand, and the optimizer's parameter groups."""

import math

import pytest
import torch

from config import LRSchedulerArgs, ModelConfig, OptimizerArgs
from model import SmolLM2
from optimizer import build_optimizer, lr_at


def sched(style="linear", **kw):
    base = dict(learning_rate=3e-3, lr_warmup_steps=10, lr_warmup_style="linear", lr_decay_starting_step=20,
                lr_decay_steps=10, lr_decay_style=style, min_decay_lr=3e-4)
    base.update(kw)
    return LRSchedulerArgs(**base)


@pytest.mark.parametrize("step, expected", [
    (0, 0.0),            # nanotron: the first update uses lr_lambda(0) = 0
    (5, 1.5e-3),         # halfway through warmup
    (10, 3e-3),          # warmup ends at its peak
    (15, 3e-3),          # stable phase
    (20, 3e-3),          # decay starts at p = 0
    (25, 1.65e-3),       # 3e-4 + 2.7e-3 * 0.5
    (29, 5.7e-4),        # 3e-4 + 2.7e-3 * 0.1
    (30, 3e-4),          # floor
    (1000, 3e-4),
])
def test_linear_warmup_stable_decay_matches_hand_values(step, expected):
    assert lr_at(step, sched(), train_steps=100) == pytest.approx(expected, abs=1e-12)


def test_cosine_and_1_sqrt_decay_match_hand_values():
    assert lr_at(22, sched("cosine"), 100) == pytest.approx(3e-4 + 2.7e-3 * (1 + math.cos(0.2 * math.pi)) / 2)
    assert lr_at(25, sched("cosine"), 100) == pytest.approx(1.65e-3)
    assert lr_at(25, sched("1-sqrt"), 100) == pytest.approx(3e-4 + 2.7e-3 * (1 - math.sqrt(0.5)))
    assert lr_at(30, sched("1-sqrt"), 100) == pytest.approx(3e-4)


def test_constant_warmup_and_default_decay_window():
    s = sched(lr_warmup_style="constant", lr_decay_starting_step=None, lr_decay_steps=None, min_decay_lr=0.0)
    assert lr_at(0, s, 110) == 3e-3
    # decay defaults to starting after warmup and ending at train_steps
    assert lr_at(60, s, 110) == pytest.approx(3e-3 * 0.5)
    assert lr_at(110, s, 110) == 0.0


def test_lr_is_absolute_not_a_multiplier():
    # the lr**2 pitfall: a LambdaLR lambda that returned the absolute LR would give 9e-6 here
    assert lr_at(15, sched(), 100) == pytest.approx(3e-3)


def test_weight_decay_applies_to_matrices_only_and_tied_matrix_once():
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    model = SmolLM2(cfg)
    opt = build_optimizer(model, OptimizerArgs(weight_decay=0.1), fused=False)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_parameters()


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
