"""What the training loop remembers between optimizer steps, and the lines it prints about them.

`Progress` holds the streak of skipped updates, a loss average to spot spikes, and the clocks for tokens/s and the
ETA. The functions take train.py's Run as `run` (its step, config, runtime and metrics log) and speak on rank 0.
"""

import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from model import attention_kernels
from smollm2 import distributed
from smollm2.metrics import duration, flops_per_token, format_train_line, human, peak_flops

QUIET_S = 60.0   # with no terminal (no progress bar), a line at least this often, however long the logging interval


@dataclass
class Progress:
    """What the loop remembers between steps: the streak of skipped updates, a loss average to spot spikes, and the
    clock for tokens/s and the ETA."""
    start_step: int
    bad_streak: int = 0
    loss_ema: Optional[float] = None
    last_loss: float = float("nan")
    loss_sum: float = 0.0                   # the finite losses since the last log line, and how many
    loss_count: int = 0
    steps_since_log: int = 0
    t_log: float = field(default_factory=time.time)
    t_said: float = field(default_factory=time.time)   # when rank 0 last printed a line
    t_start: float = field(default_factory=time.time)


def track_loss(run, progress: Progress, loss: float) -> None:
    """Remember the last finite loss and warn when one jumps far above the recent average (for a task whose loss is
    a positive error, not GRPO's surrogate, which swings around 0)."""
    if not math.isfinite(loss):
        return
    progress.last_loss = loss
    progress.loss_sum, progress.loss_count = progress.loss_sum + loss, progress.loss_count + 1
    ema = progress.loss_ema
    spiked = ema is not None and loss > run.cfg.run.loss_spike_factor * ema and run.task.warns_of_spikes
    if spiked and run.rt.main:
        print(f"warning: loss spike at step {run.step}: {loss:.3f} vs recent {ema:.3f}", file=sys.stderr)
    progress.loss_ema = loss if ema is None else 0.95 * ema + 0.05 * loss


def log_progress(run, progress: Progress, grad_norm: float, lr: float, stats: dict) -> None:
    """The train log line (rank 0): the mean loss of the steps since the previous line (one step's loss swings too
    much to read), the last step's LR, gradient norm and task statistics (DPO's), tokens/s and MFU; the same record
    to metrics.jsonl."""
    cfg, rt, steps = run.cfg, run.rt, run.cfg.tokens.train_steps
    now = time.time()
    tok_s = progress.steps_since_log * run.tokens_per_step / max(now - progress.t_log, 1e-9)
    rate = (run.step - progress.start_step) / max(now - progress.t_start, 1e-9)
    peak, _ = peak_flops(rt.device)
    loss = progress.loss_sum / progress.loss_count if progress.loss_count else float("nan")
    record = {"kind": "train", "step": run.step, "train_steps": steps, "stage": run.train_data.name, "loss": loss,
              "loss_steps": progress.loss_count, "lr": lr, "grad_norm": grad_norm, "tokens_seen": run.tokens_seen,
              "tok_per_s": tok_s,
              "mfu": tok_s * flops_per_token(cfg.model.model_config, cfg.tokens.sequence_length) / (peak * rt.world)
              if peak else None,
              "eta_s": (steps - run.step) / rate if rate > 0 else float("inf"), **memory_since_last_line(rt.device),
              **stats}
    print(format_train_line(record, extra=stats), flush=True)
    run.log.write(record)
    progress.t_log, progress.t_said, progress.steps_since_log = now, now, 0
    progress.loss_sum, progress.loss_count = 0.0, 0


def memory_since_last_line(device: torch.device) -> dict:
    """The peaks since the previous log line, in GiB: on a GPU what tensors took (allocated) and what the caching
    allocator held (reserved: what the device really lost, fragmentation included), their peaks reset after reading
    so each line speaks for its own steps; on the CPU the process's peak resident memory, which never resets."""
    if device.type != "cuda":
        return {"mem_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30}   # Linux: kB
    peaks = {"mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30,
             "mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2 ** 30}
    torch.cuda.reset_peak_memory_stats(device)
    return peaks


def still_running(run, progress: Progress) -> None:
    """A line when QUIET_S passed without one and no progress bar shows the run is alive (output to a file or a
    pipe, a long logging interval)."""
    now = time.time()
    if now - progress.t_said >= QUIET_S:
        print(f"step {run.step}/{run.cfg.tokens.train_steps} | still running, {duration(now - progress.t_said)} since "
              f"the last line (logging.iteration_step_info_interval={run.cfg.logging.iteration_step_info_interval})",
              flush=True)
        progress.t_said = now


def start_line(run, ckpt_path: Optional[Path]) -> str:
    """The line a run opens with (`run`: train.py's Run), e.g.
    model 134.5M params | 1 x cuda | 1 process | bf16 | batch 8 x 2048 tokens x 16 accumulation x 1 = ... |
    recompute: none (auto, fits: 14.2 of 20.2 GiB planned) | ..."""
    cfg, rt = run.cfg, run.rt
    t = cfg.tokens
    note = run.accumulation_note
    parts = [f"model {human(run.model.num_parameters())} params", f"{rt.world} x {rt.device.type}",
             distributed.describe(cfg, rt), rt.precision,
             f"batch {t.micro_batch_size} x {t.sequence_length} tokens x {run.accumulation} accumulation x {rt.world} "
             f"= {run.tokens_per_step:,} tokens/step"]
    parts += [note] if note else []
    parts += ["recompute: {} ({})".format(*run.recompute)]
    masked = attention_kernels(rt.device.type)["masked"]
    parts += [f"document masking: a token sees only its own document ({masked})"] if cfg.run.document_masking else []
    parts += [f"{torch.get_num_threads()} CPU threads"] if rt.device.type == "cpu" else []   # docs/training.md: threads
    parts += [f"{t.train_steps} steps, warmup {cfg.optimizer.learning_rate_scheduler.lr_warmup_steps}",
              f"data {run.task.describe_data(cfg, run.step + 1)}", peak_flops(rt.device)[1]]
    every = cfg.logging.iteration_step_info_interval
    parts += [f"loss: mean of the {every} steps since the previous line"] if every > 1 else []
    parts += [f"resumed from {ckpt_path} at step {run.step}"] if ckpt_path else []
    return " | ".join(parts)
