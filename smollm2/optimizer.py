"""The optimizer and its learning-rate schedule, with the meaning nanotron gives the `optimizer` section.

`lr_at(step)` is a pure function of the number of optimizer steps already taken, so the schedule needs no state of
its own: a resumed run gets the right LR from the saved step alone. It returns the learning rate itself (not a
multiplier for `LambdaLR`, a classic source of lr**2 bugs), and train.py writes it into the optimizer once per
optimizer step, never per micro-batch or per process.
"""

import math

import torch

from smollm2.config import LRSchedulerArgs, OptimizerArgs, OptimizerFactory


def lr_at(step: int, s: LRSchedulerArgs, train_steps: int) -> float:
    """LR for the update that follows `step` completed optimizer steps (0 for the first update, as in nanotron).

    warmup     step <= W:            lr * step / W (linear: 0 for the very first update) or lr (constant)
    stable     W < step < D:         lr
    decay      D <= step < D + N:    min + (lr - min) * f, k = step - D; f = (N - k) / N (linear),
                                     (1 + cos(pi k / N)) / 2 (cosine) or 1 - sqrt(k / N) (1-sqrt)
    after      step >= D + N:        min
    W = lr_warmup_steps; D = lr_decay_starting_step, default W; N = lr_decay_steps, default train_steps - W (nanotron's
    default, even when D is set); min = min_decay_lr, default lr (no decay at all). A late D with a short N is
    warmup-stable-decay (WSD). Each phase is computed with nanotron's own expression, in its order of operations, so
    the values agree to the last bit or two (nanotron divides by lr and LambdaLR multiplies back).

    One deliberate difference: with W = 0 and N = 0 nanotron's scheduler returns lr as the multiplier, so it trains at
    lr squared; here that case is the constant lr the config asks for.
    """
    lr, warmup = s.learning_rate, s.lr_warmup_steps
    low = lr if s.min_decay_lr is None else s.min_decay_lr
    length = train_steps - warmup if s.lr_decay_steps is None else s.lr_decay_steps
    start = warmup if s.lr_decay_starting_step is None else s.lr_decay_starting_step
    if warmup == 0 and length == 0:
        return lr
    if step <= warmup:
        return lr * step / max(warmup, 1) if s.lr_warmup_style == "linear" else lr
    if step < start:
        return lr
    if step < start + length:
        k = step - start
        style = s.lr_decay_style or "linear"
        if style == "linear":
            return low + (lr - low) * (length - k) / length
        if style == "cosine":
            return low + (lr - low) * (1 + math.cos(math.pi * k / length)) / 2
        return low + (lr - low) * (1 - math.sqrt(k / length))   # "1-sqrt"
    return low


def fused_adam(device: torch.device, f: OptimizerFactory) -> bool:
    """AdamW's fused kernel (one launch for all parameters) on GPUs when `torch_adam_is_fused`; FSDP's sharded
    parameters too: DTensor runs the fused AdamW ops shard by shard."""
    return device.type == "cuda" and f.torch_adam_is_fused


def build_optimizer(model: torch.nn.Module, o: OptimizerArgs, fused: bool,
                    exclude_1d_from_weight_decay: bool = False) -> torch.optim.AdamW:
    """AdamW with nanotron's weight decay: every parameter decays, RMSNorm gains included. With
    `exclude_1d_from_weight_decay` (run.weight_decay_exclude_1d) the 1-D parameters (norm gains) do not: decaying
    them toward zero fights the normalisation itself, the usual choice outside nanotron. The tied embedding/lm_head
    matrix is one parameter, so it is listed once."""
    params = [p for p in model.parameters() if p.requires_grad]
    exempt = [exclude_1d_from_weight_decay and p.dim() < 2 for p in params]
    groups = [{"params": [p for p, e in zip(params, exempt) if not e], "weight_decay": o.weight_decay}]
    if any(exempt):
        groups.append({"params": [p for p, e in zip(params, exempt) if e], "weight_decay": 0.0})
    f = o.optimizer_factory
    return torch.optim.AdamW(groups, lr=o.learning_rate_scheduler.learning_rate, betas=(f.adam_beta1, f.adam_beta2),
                             eps=f.adam_eps, fused=fused or None)
