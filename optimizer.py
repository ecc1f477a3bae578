"""The optimizer and its learning-rate schedule, exactly as nanotron's `optimizer` section defines them.

`lr_at(step)` is a pure function of the number of optimizer steps already taken, so the schedule needs no state of
its own: a resumed run gets the right LR from the saved step alone. It returns the learning rate itself (not a
multiplier for `LambdaLR`, a classic source of lr**2 bugs), and train.py writes it into the optimizer once per
optimizer step, never per micro-batch or per process.
"""

import math

import torch

from config import LRSchedulerArgs, OptimizerArgs


def lr_at(step: int, s: LRSchedulerArgs, train_steps: int) -> float:
    """LR for the update that follows `step` completed optimizer steps (0 for the first update, as in nanotron).

    warmup     step <= W:            lr * step / W (linear) or lr (constant)
    stable     W < step < D:         lr
    decay      D <= step < D + N:    min + (lr - min) * f(p), p = (step - D) / N
                                     f = 1 - p (linear), (1 + cos(pi p)) / 2 (cosine), 1 - sqrt(p) (1-sqrt)
    after      step >= D + N:        min
    with W = lr_warmup_steps, D = lr_decay_starting_step (default W), N = lr_decay_steps (default train_steps - D).
    A late D with a short N is warmup-stable-decay (WSD).
    """
    lr, low, warmup = s.learning_rate, s.min_decay_lr, s.lr_warmup_steps
    start = s.lr_decay_starting_step if s.lr_decay_starting_step is not None else warmup
    length = s.lr_decay_steps if s.lr_decay_steps is not None else max(train_steps - start, 1)
    if warmup > 0 and step <= warmup:
        return lr * step / warmup if s.lr_warmup_style == "linear" else lr
    if step < start:
        return lr
    if step < start + length:
        p = (step - start) / length
        if s.lr_decay_style == "linear":
            f = 1 - p
        elif s.lr_decay_style == "cosine":
            f = (1 + math.cos(math.pi * p)) / 2
        else:  # "1-sqrt"
            f = 1 - math.sqrt(p)
        return low + (lr - low) * f
    return low


def build_optimizer(model: torch.nn.Module, o: OptimizerArgs, fused: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: decaying norm gains (1-D) toward zero would fight the
    normalisation itself. The tied embedding/lm_head matrix is one parameter, so it is listed once."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    f = o.optimizer_factory
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.learning_rate_scheduler.learning_rate, betas=(f.adam_beta1, f.adam_beta2),
                             eps=f.adam_eps, fused=fused or None)
