"""Pretrain SmolLM2: `python train.py --config config_smollm2_135M.yaml [key=value ...] [--resume [PATH]]`.

One process per GPU under `torchrun` (DDP or FSDP, see distributed.py), or one plain process on a GPU or the CPU.
Read top to bottom: `setup()` builds a run (data, model, optimizer, and what a checkpoint restores); `train()` loops
over optimizer steps: `optimizer_step()` sets the LR, runs k micro-batches of forward and backward (each loss divided
by k), unscales, clips, skips the update if anything is non-finite, and steps; then `log_progress()`, `validate()`,
`write_samples()` and `save()` run on their intervals (a save at an `eval` step also starts the config's benchmarks
on that checkpoint, in a process beside this one: evaluate.BackgroundEvals). A checkpoint holds every part needed to
continue exactly (model, optimizer, grad scaler, step, data position, RNG states, config), so a run killed at any
moment resumes with the same losses it would have had.

What the run starts from, reads and minimises is its task: `Pretraining` here (a fresh model, the data stages, the
next-token loss); sft.py and dpo.py subclass it and run through the same loop, checkpoints, resume and distribution.
"""

import argparse
import gc
import math
import os
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml

import data
import distributed
import planner
import remote
from chat import ChatError
import stages
from checkpoint import (CheckpointError, checkpoint_name, is_sharded, latest_checkpoint, load_state_into,
                        resolve_checkpoint, rotate_checkpoints, save_atomic, training_checkpoint)
from config import Config, ConfigError, config_to_dict, load_config, notes
from evaluate import BackgroundEvals
from metrics import (MetricsLog, duration, flops_per_token, format_train_line, format_val_line, human, peak_flops,
                     plot_losses, progress_bar)
from model import SmolLM2
from optimizer import build_optimizer, lr_at
from runtime import (Runtime, StopSignals, gather, memory_gb, mean_across_ranks, rng_state, set_rng_state,
                     setup_runtime)
from sampling import SamplingParams, generate


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); the message says why and what to try."""


class StoppedAtOnce(KeyboardInterrupt):
    """A second Ctrl-C: the run stops where it is, without saving; the message names the newest checkpoint."""


QUIET_S = 60.0   # with no terminal (no progress bar), a line at least this often, however long the logging interval


@dataclass
class Run:
    """Everything a training run holds. `model` is the plain module whose parameter names checkpoints keep; `net`
    is what forward and backward go through (the same model compiled, DDP-wrapped, or sharded in place by FSDP)."""
    cfg: Config
    rt: Runtime
    run_dir: Path
    model: SmolLM2
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    tokenizer: object
    train_data: stages.StagedLoader         # every data stage's batches, and the running stage's validation sources
    accumulation: int                       # micro-batches per optimizer step on each rank
    accumulation_note: str                  # why it differs from the config's, if it does
    task: "Pretraining"                     # what the run starts from, reads and minimises
    uploader: Optional[remote.Uploader] = None
    evals: Optional[BackgroundEvals] = None   # benchmarks on saved checkpoints, in processes beside this one
    log: Optional[MetricsLog] = None
    step: int = 0                           # optimizer steps completed
    tokens_seen: int = 0
    val_loss: Optional[float] = None

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.tokens
        return t.micro_batch_size * t.sequence_length * self.accumulation * self.rt.world


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


# ---------------------------------------------------------------- the task: what a run starts from, reads, minimises


class Pretraining:
    """A freshly initialised model, the data stages of data.py, the next-token loss; sft.py and dpo.py subclass it."""
    reports_perplexity = True   # the validation loss is a per-token cross-entropy

    def tokenizer(self, cfg: Config):
        return data.load_tokenizer(cfg)   # under torchrun, data.py's file lock lets one rank train it at first use

    def data(self, cfg: Config, rt: Runtime, tokenizer):
        """The training batches, in stages.StagedLoader's interface (next_batch, begin_step, validation, state)."""
        return stages.StagedLoader(cfg, rt.rank, rt.world, tokenizer)

    def describe_data(self, cfg: Config, step: int) -> str:
        """What feeds optimizer step `step`, for the start line."""
        return stages.describe(cfg, stages.stage_at(cfg, step))

    def model(self, cfg: Config, rt: Runtime, resuming: Optional[dict]) -> SmolLM2:
        """The model before training (a checkpoint being resumed, if any, then loads its weights into it)."""
        torch.manual_seed(cfg.general.seed)   # the same initial weights on every rank: FSDP shards them as they are
        return SmolLM2(cfg.model.model_config, cfg.model.init_method.std).to(rt.device)

    def loss(self, run: "Run", batch) -> tuple[torch.Tensor, dict]:
        """One micro-batch's loss to minimise, and statistics to log beside it (tensors, averaged like the loss)."""
        x, y = (t.to(run.rt.device, non_blocking=True) for t in batch)   # ids past the vocabulary: refused by data.py
        return run.net(x, y)[1], {}

    def prompt(self, tokenizer, text: str) -> list[int]:
        """A sampling.prompts entry as the ids samples continue."""
        return tokenizer.encode(text).ids

    def stop_id(self, tokenizer) -> int:
        return data.eos_token_id(tokenizer)


# ---------------------------------------------------------------- setup


def find_resume(cfg: Config, resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """--resume (or checkpoints.resume_checkpoint_path) -> a checkpoint; refuse to start over an existing run."""
    resume = resume or cfg.checkpoints.resume_checkpoint_path
    if resume == "latest":
        found = latest_checkpoint(run_dir)
        if found is None and cfg.s3.bucket:   # a new machine: go on from the newest checkpoint in the bucket
            return remote.download_checkpoint(remote.bucket_url(cfg.s3), run_dir, cfg.s3)
        if found is None:
            raise CheckpointError(f"--resume: no checkpoint in {run_dir}/checkpoints yet; start without --resume")
        return found
    if remote.is_s3_url(resume):
        return remote.download_checkpoint(resume, run_dir, cfg.s3)
    if resume:
        return resolve_checkpoint(resume)
    existing = latest_checkpoint(run_dir)
    if existing is not None:
        raise CheckpointError(f"{run_dir} already holds checkpoints (newest {existing.name}): pass --resume to "
                              "continue that run, or set checkpoints.checkpoints_path to a new directory")
    return None


def setup(cfg: Config, resume: Optional[str], explicit_accumulation: bool,
          task: Pretraining) -> tuple[Run, Optional[Path]]:
    """Runtime, data, model, optimizer; then every part a checkpoint holds, when resuming. -> (run, checkpoint)."""
    rt = setup_runtime(cfg)
    sample_params(cfg)   # refused now, not at the first sample hours in
    run_dir = Path(cfg.checkpoints.checkpoints_path)
    k, k_note = distributed.accumulation(cfg, rt.world, explicit_accumulation)
    # the eval harness and the bucket are checked first, before data preparation and step 1: a typo must not cost hours
    evals = BackgroundEvals(cfg.eval, cfg.checkpoints.checkpoint_interval) if rt.main and cfg.eval.tasks else None
    uploader = remote.Uploader(cfg.s3, run_dir, cfg.run.keep_last_checkpoints,
                               spare=evals.is_pending if evals else None) if rt.main and cfg.s3.bucket else None
    random.seed(cfg.general.seed)
    np.random.seed(cfg.general.seed)

    tokenizer = task.tokenizer(cfg)
    train_data = task.data(cfg, rt, tokenizer)

    ckpt_path = find_resume(cfg, resume, run_dir)
    ckpt = training_checkpoint(ckpt_path) if ckpt_path else None
    model = task.model(cfg, rt, ckpt)
    torch.manual_seed(cfg.general.seed + rt.rank)
    model.gradient_checkpointing = cfg.parallelism.recompute_layer
    model.selective_recompute = cfg.run.selective_recompute
    if ckpt is not None and not is_sharded(ckpt_path):   # whole weights go in before FSDP splits them
        load_state_into(model, ckpt["model"], str(ckpt_path))
    net = distributed.wrap(model, cfg, rt)
    # fused AdamW on GPUs; sharded parameters use the foreach kernels, which every DTensor op supports
    fused = rt.device.type == "cuda" and cfg.optimizer.optimizer_factory.torch_adam_is_fused
    optimizer = build_optimizer(model, cfg.optimizer, fused and not distributed.sharded(cfg, rt),
                                cfg.run.weight_decay_exclude_1d)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.precision == "fp16")
    run = Run(cfg, rt, run_dir, model, net, optimizer, scaler, tokenizer, train_data, k, k_note, task, uploader,
              evals)
    if ckpt is not None:
        restore(run, ckpt_path, ckpt)
    train_data.begin_step(run.step + 1)   # the stage of the next step, at its position (the start line names it)
    if cfg.tokens.limit_val_batches > 0:
        train_data.validation()   # its held-out data is read (or found missing) now, not at the first validation
    if rt.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        tokenizer.save(str(run_dir / "tokenizer.json"))
        run.log = MetricsLog(run_dir, run.step if ckpt_path else None, cfg.run.tensorboard,
                             cfg.general.project if cfg.run.wandb else None, cfg.general.run, config_to_dict(cfg))
    return run, ckpt_path


def restore(run: Run, path: Path, ckpt: dict) -> None:
    """The optimizer, scaler, step, data position and RNG of a checkpoint (the weights of a single-file one are in
    already; a sharded one brings its weights here, re-sharded for this run's world size)."""
    load_optimizer = run.cfg.checkpoints.load_optimizer and ("optimizer" in ckpt or "optimizer_param_groups" in ckpt)
    if is_sharded(path):
        distributed.load_sharded(path, run.model, run.optimizer if load_optimizer else None, ckpt)
    elif load_optimizer:
        distributed.load_full_optimizer_state(run.model, run.optimizer, ckpt["optimizer"])
    if load_optimizer:
        run.scaler.load_state_dict(ckpt.get("scaler", {}))
    state = ckpt.get("train_state", {})
    run.step, run.tokens_seen, run.val_loss = state.get("step", 0), state.get("tokens_seen", 0), state.get("val_loss")
    if "data" in ckpt:   # a global position: a run may resume on a different number of processes
        run.train_data.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"][run.rt.rank % len(ckpt["rng"])])


def start_line(run: Run, ckpt_path: Optional[Path]) -> str:
    """model 134.5M params | 1 x cuda | 1 process | bf16 | batch 8 x 2048 tokens x 16 accumulation x 1 = ..."""
    cfg, rt = run.cfg, run.rt
    t = cfg.tokens
    note = run.accumulation_note
    parts = [f"model {human(run.model.num_parameters())} params", f"{rt.world} x {rt.device.type}",
             distributed.describe(cfg, rt), rt.precision,
             f"batch {t.micro_batch_size} x {t.sequence_length} tokens x {run.accumulation} accumulation x {rt.world} "
             f"= {run.tokens_per_step:,} tokens/step"]
    parts += [note] if note else []
    parts += [f"{torch.get_num_threads()} CPU threads"] if rt.device.type == "cpu" else []   # README: threads
    parts += [f"{t.train_steps} steps, warmup {cfg.optimizer.learning_rate_scheduler.lr_warmup_steps}",
              f"data {run.task.describe_data(cfg, run.step + 1)}", peak_flops(rt.device)[1]]
    every = cfg.logging.iteration_step_info_interval
    parts += [f"loss: mean of the {every} steps since the previous line"] if every > 1 else []
    parts += [f"resumed from {ckpt_path} at step {run.step}"] if ckpt_path else []
    return " | ".join(parts)


# ---------------------------------------------------------------- one optimizer step


def optimizer_step(run: Run, progress: Progress) -> tuple[float, float, float, dict]:
    """One update from k micro-batches -> (mean loss, gradient norm before clipping, LR, the task's statistics). A
    non-finite loss or gradient skips the update (fp16's GradScaler lowers its scale instead); too many in a row stop
    the run."""
    cfg, rt, k = run.cfg, run.rt, run.accumulation
    lr = lr_at(run.step, cfg.optimizer.learning_rate_scheduler, cfg.tokens.train_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    sums: dict[str, torch.Tensor] = {}
    for micro in range(k):
        batch = run.train_data.next_batch()
        with distributed.gradient_sync(run.net, last_micro_batch=micro == k - 1):
            with rt.autocast():
                loss, stats = run.task.loss(run, batch)
            # the gradients of k micro-batches add up; dividing each loss by k makes that sum a mean
            run.scaler.scale(loss / k).backward()
        add_up(sums, {"loss": loss, **stats})
    stats = mean_of(sums, k, rt)
    step_loss = stats.pop("loss")
    run.scaler.unscale_(run.optimizer)
    grad_norm = distributed.clip_grad_norm(run.model, cfg.optimizer.clip_grad or float("inf"))
    overflow = run.scaler.is_enabled() and not math.isfinite(grad_norm)
    if math.isfinite(step_loss) and (math.isfinite(grad_norm) or overflow):
        run.scaler.step(run.optimizer)
        progress.bad_streak = 0
    else:
        skip_update(run, progress, step_loss, grad_norm)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm, lr, stats


def add_up(sums: dict, values: dict) -> None:
    for key, value in values.items():
        sums[key] = sums.get(key, 0) + value.detach().float()


def mean_of(sums: dict, n: int, rt: Runtime) -> dict[str, float]:
    """Each sum over n micro-batches as a mean over them and over every rank (one all-reduce for all of them)."""
    return dict(zip(sums, mean_across_ranks(torch.stack(list(sums.values())) / n, rt).tolist()))


def skip_update(run: Run, progress: Progress, loss: float, grad_norm: float) -> None:
    progress.bad_streak += 1
    step, limit = run.step + 1, run.cfg.run.max_consecutive_bad_steps
    if run.rt.main:
        print(f"warning: step {step}: non-finite loss ({loss}) or gradient norm ({grad_norm}); update skipped "
              f"({progress.bad_streak} in a row)", file=sys.stderr, flush=True)
    if progress.bad_streak >= limit:
        raise TrainingError(f"stopped at step {step}: {progress.bad_streak} consecutive steps with a non-finite loss "
                            f"or gradient (run.max_consecutive_bad_steps={limit}). No checkpoint holds these weights; "
                            "lower the learning rate or check the data, then resume from the last checkpoint")


# ---------------------------------------------------------------- what happens between steps


def track_loss(run: Run, progress: Progress, loss: float) -> None:
    """Remember the last finite loss and warn when one jumps far above the recent average."""
    if not math.isfinite(loss):
        return
    progress.last_loss = loss
    progress.loss_sum, progress.loss_count = progress.loss_sum + loss, progress.loss_count + 1
    ema = progress.loss_ema
    if ema is not None and loss > run.cfg.run.loss_spike_factor * ema and run.rt.main:
        print(f"warning: loss spike at step {run.step}: {loss:.3f} vs recent {ema:.3f}", file=sys.stderr)
    progress.loss_ema = loss if ema is None else 0.95 * ema + 0.05 * loss


def log_progress(run: Run, progress: Progress, grad_norm: float, lr: float, stats: dict) -> None:
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
              "eta_s": (steps - run.step) / rate if rate > 0 else float("inf"), "mem_gb": memory_gb(rt.device),
              **stats}
    print(format_train_line(record, extra=stats), flush=True)
    run.log.write(record)
    progress.t_log, progress.t_said, progress.steps_since_log = now, now, 0
    progress.loss_sum, progress.loss_count = 0.0, 0


def still_running(run: Run, progress: Progress) -> None:
    """A line when QUIET_S passed without one and no progress bar shows the run is alive (output to a file or a
    pipe, a long logging interval)."""
    now = time.time()
    if now - progress.t_said >= QUIET_S:
        print(f"step {run.step}/{run.cfg.tokens.train_steps} | still running, {duration(now - progress.t_said)} since "
              f"the last line (logging.iteration_step_info_interval={run.cfg.logging.iteration_step_info_interval})",
              flush=True)
        progress.t_said = now


def validation_due(cfg: Config, step: int) -> bool:
    """nanotron's keys: tokens.limit_val_batches 0 means no validation; otherwise every tokens.val_check_interval
    steps (<= 0: never on an interval) and after the last step."""
    interval = cfg.tokens.val_check_interval
    return cfg.tokens.limit_val_batches > 0 and (
        (interval > 0 and step % interval == 0) or step == cfg.tokens.train_steps)


@torch.no_grad()
def validate(run: Run) -> float:
    """Each source's mean loss over the first tokens.limit_val_batches micro-batches of its held-out documents (the
    same batches every time), and their mean weighted by the running stage's mixing weights. Every rank takes part
    (each reads its own share, and FSDP's forward needs them all)."""
    run.net.eval()
    batches, losses, weights, stats = run.cfg.tokens.limit_val_batches, {}, {}, {}
    for name, weight, loader in run.train_data.validation():
        loader.reset()
        sums: dict[str, torch.Tensor] = {}
        for _ in range(batches):
            with run.rt.autocast():
                loss, batch_stats = run.task.loss(run, loader.next_batch())
            add_up(sums, {"loss": loss, **batch_stats})
        stats = mean_of(sums, batches, run.rt)   # the task's statistics (DPO's) come from its one source
        losses[name], weights[name] = stats.pop("loss"), weight
    run.net.train()
    run.val_loss = sum(weights[n] * losses[n] for n in losses) / sum(weights.values())
    if run.rt.main:
        ppl = {"ppl": math.exp(min(run.val_loss, 50))} if run.task.reports_perplexity else {}
        record = {"kind": "val", "step": run.step, "stage": run.train_data.name, "loss": run.val_loss, **ppl,
                  "sources": losses, **stats}
        print(format_val_line(record, extra=stats), flush=True)
        run.log.write(record)
        plot_losses(run.log.path, run.run_dir / "loss.png")
    return run.val_loss


def write_samples(run: Run) -> None:
    """Continue the config's prompts with the one generation path (sampling.generate). Rank 0 alone when it holds
    the whole model; every rank together when FSDP shards it (each forward gathers the weights from all ranks)."""
    if not (run.rt.main or distributed.sharded(run.cfg, run.rt)):
        return
    s = run.cfg.sampling
    room = max(1, run.cfg.model.model_config.max_position_embeddings - s.max_new_tokens)
    prompts = [run.task.prompt(run.tokenizer, p)[-room:] for p in s.prompts]   # a long prompt keeps its newest tokens
    with run.rt.autocast():
        outs = generate(run.model, prompts, sample_params(run.cfg), eos_id=run.task.stop_id(run.tokenizer),
                        seed=run.cfg.general.seed)
    if run.rt.main:
        for prompt, out in zip(s.prompts, outs):
            text = run.tokenizer.decode(out)
            print(f"sample @ {run.step} | {prompt!r} -> {text!r}", flush=True)
            run.log.write({"kind": "sample", "step": run.step, "prompt": prompt, "text": text})


def sample_params(cfg: Config) -> SamplingParams:
    s = cfg.sampling
    try:
        return SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    except ValueError as e:
        raise ConfigError(f"sampling.{e}") from None


def save(run: Run, reason: str) -> None:
    """A checkpoint of every part of the run: one file from rank 0, or one directory of shards from all ranks."""
    if not distributed.all_finite(run.model, run.rt):
        raise TrainingError(f"refusing to save step {run.step}: the weights hold NaN/Inf")
    cfg, rt = run.cfg, run.rt
    rng_states = gather(rng_state(), rt)
    train_state = {"scaler": run.scaler.state_dict(), "data": run.train_data.state_dict(), "rng": rng_states,
                   "train_state": {"step": run.step, "tokens_seen": run.tokens_seen, "val_loss": run.val_loss},
                   "config": config_to_dict(cfg)}
    path = run.run_dir / "checkpoints" / checkpoint_name(run.step)
    if distributed.sharded(cfg, rt):
        path = path.with_suffix("")
        distributed.save_sharded(path, run.model, run.optimizer, train_state, rt)
    else:
        optimizer = distributed.full_optimizer_state(run.model, run.optimizer)
        if rt.main:
            save_atomic({"model": run.model.state_dict(), "optimizer": optimizer, **train_state}, path)
    if not rt.main:
        return
    if run.uploader is not None:   # into the background uploader's queue; a file waiting there is not rotated out
        run.uploader.add_checkpoint(path)
    if run.evals is not None and run.evals.due(run.step, final=reason == "final"):
        run.evals.start(path, run.step)   # likewise kept until its benchmarks have read it
    waits = [q.is_pending for q in (run.uploader, run.evals) if q is not None]
    rotate_checkpoints(run.run_dir, cfg.run.keep_last_checkpoints, spare=lambda p: any(w(p) for w in waits))
    print(f"saved {path} ({reason})", flush=True)


# ---------------------------------------------------------------- the loop


def train(cfg: Config, resume: Optional[str] = None, explicit_accumulation: bool = False,
          task: Optional[Pretraining] = None) -> dict:
    """Run (or continue) training; returns the final step, train and validation loss, and `stopped_by` (a signal's
    name) or `complete` (a resumed run had nothing left to do).
    explicit_accumulation: the command line set tokens.batch_accumulation_per_replica, which then wins over keeping
    parallelism.dp's global batch. task: pretraining unless given (sft.py, dpo.py)."""
    run, ckpt_path = setup(cfg, resume, explicit_accumulation, task or Pretraining())
    rt, steps = run.rt, cfg.tokens.train_steps
    if run.step >= steps:
        finish(run)
        return {"step": run.step, "complete": True}
    if rt.main:
        for line in notes(cfg):
            print(line, file=sys.stderr, flush=True)
        print(start_line(run, ckpt_path), flush=True)
    if ckpt_path is None and cfg.checkpoints.save_initial_state:
        save(run, "initial state")
    progress = Progress(run.step)
    try:
        with StopSignals(rt) as signals:
            stopped_by = loop(run, progress, signals.asked)
    except KeyboardInterrupt:   # a second Ctrl-C
        if run.evals is not None:
            run.evals.finish(wait=False)
        newest = latest_checkpoint(run.run_dir)
        raise StoppedAtOnce(f"stopped by a second Ctrl-C at step {run.step}, without saving; "
                            + (f"the newest checkpoint is {newest}" if newest else "no checkpoint was saved")) from None
    finish(run, stopped=stopped_by is not None)
    return {"step": run.step, "train_loss": progress.last_loss, "val_loss": run.val_loss, "stopped_by": stopped_by}


def loop(run: Run, progress: Progress, stop_asked) -> Optional[str]:
    """Optimizer steps until tokens.train_steps, or until stop_asked() names a signal that reached some rank: then a
    checkpoint of that step is saved and the signal's name returned."""
    cfg, rt, steps = run.cfg, run.rt, run.cfg.tokens.train_steps
    show_bar = rt.main and sys.stderr.isatty()
    run.net.train()
    while run.step < steps:
        if run.train_data.begin_step(run.step + 1) and rt.main:   # a new data stage starts with this step
            print(f"data: {stages.describe(cfg, stages.stage_at(cfg, run.step + 1))} starts", flush=True)
        loss, grad_norm, lr, stats = optimizer_step(run, progress)
        run.step += 1
        run.tokens_seen += run.tokens_per_step
        progress.steps_since_log += 1
        track_loss(run, progress, loss)
        if show_bar:
            sys.stderr.write(f"\r{progress_bar(run.step, steps)}")
            sys.stderr.flush()
        last = run.step == steps
        if rt.main and (run.step % cfg.logging.iteration_step_info_interval == 0 or last):
            if show_bar:
                sys.stderr.write("\r\033[K")   # clear the bar; the log line takes its place
            log_progress(run, progress, grad_norm, lr, stats)
        elif rt.main and not show_bar:
            still_running(run, progress)
        if validation_due(cfg, run.step):
            validate(run)
        if cfg.sampling.interval and (run.step % cfg.sampling.interval == 0 or last):
            write_samples(run)
        if run.step % cfg.checkpoints.checkpoint_interval == 0 or (last and cfg.checkpoints.save_final_state):
            save(run, "interval" if not last else "final")
        if run.evals is not None:
            log_evals(run, run.evals.poll())
        if stopped_by := stop_asked():
            if run.step % cfg.checkpoints.checkpoint_interval:
                save(run, stopped_by)
            return stopped_by
    return None


def log_evals(run: Run, records: list[dict]) -> None:
    """Benchmark results that came back from BackgroundEvals: to metrics.jsonl and the plot."""
    for record in records:
        run.log.write(record)
    if records:
        plot_losses(run.log.path, run.run_dir / "loss.png")


def finish(run: Run, stopped: bool = False) -> None:
    """The evals still running waited for (stopped, when a signal asked to end quickly), the last plot, the log
    closed, the process group ended, and every upload waited for."""
    if run.evals is not None:
        log_evals(run, run.evals.finish(wait=not stopped))
    if run.rt.main:
        plot_losses(run.log.path, run.run_dir / "loss.png")
        run.log.close()
    if run.rt.world > 1:
        # DDP's reducer holds the process group. Freed after the group was unregistered, it would destroy gloo's
        # group under the GIL while a gloo thread waits for the GIL to free a tensor: a hang at exit (pytorch#56297).
        # Dropped first, the group is destroyed by destroy_process_group, whose binding releases the GIL.
        run.net = None
        gc.collect()
        dist.destroy_process_group()
    if run.uploader is not None and not run.uploader.finish():
        raise TrainingError(f"training reached step {run.step}, but not every file reached the bucket (see above); "
                            f"what is missing there is kept in {run.run_dir}")


def arg_parser(doc: str, example: str) -> argparse.ArgumentParser:
    """The command line of train.py, sft.py and dpo.py: --config, --resume and key=value overrides."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=f"a nanotron-format YAML file, e.g. {example}")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue from the newest checkpoint of the run (no value; the bucket's when the run dir "
                             "has none), from this checkpoint file, or from s3://bucket/prefix[/checkpoints/step_N.pt]")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. tokens.micro_batch_size=4")
    return parser


def run_command(args, make_task: Callable[[Config], Pretraining], script: str) -> int:
    """Load the config, build the task, train (or plan, --plan); problems a user can fix are one line and exit 2."""
    if args.resume and "=" in args.resume and not os.path.exists(args.resume):
        args.overrides.append(args.resume)   # `--resume key=value`: argparse took the override for a checkpoint
        args.resume = "latest"
    explicit = any(o.split("=", 1)[0].strip() == "tokens.batch_accumulation_per_replica" for o in args.overrides)
    try:
        cfg = load_config(args.config, args.overrides)
        if getattr(args, "plan", False):   # train.py --plan: memory, fit, time and cost on --gpu; nothing is trained
            print(planner.report(cfg, args, explicit))
            return 0
        result = train(cfg, args.resume, explicit, make_task(cfg))
    except (ConfigError, CheckpointError, ChatError, data.DataError, remote.RemoteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except StoppedAtOnce as e:
        print(e, file=sys.stderr)
        return 130
    except KeyboardInterrupt:   # before the first step: nothing to save yet
        print("interrupted before training started; nothing was saved", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") != "0":   # under torchrun, rank 0 speaks for the run
        return 0
    again = shlex.join(["python", script, "--config", args.config, *args.overrides, "--resume"])
    if result.get("complete"):
        steps = cfg.tokens.train_steps
        more = shlex.join(["python", script, "--config", args.config, *args.overrides,
                           f"tokens.train_steps={2 * max(steps, result['step'])}", "--resume"])   # the last one wins
        print(f"the run is complete: step {result['step']} of tokens.train_steps={steps}. To train further, resume "
              f"with more steps, e.g. {more} (the LR schedule follows the new length)", flush=True)
        return 0
    if result["stopped_by"]:
        print(f"stopped by {result['stopped_by']} at step {result['step']}; continue with: {again}", file=sys.stderr)
        return 130 if result["stopped_by"] == "Ctrl-C" else 0
    val = f"{result['val_loss']:.3f}" if result["val_loss"] is not None else "n/a"
    print(f"done: step {result['step']} | train loss {result['train_loss']:.3f} | val loss {val}", flush=True)
    return 0


def pretraining(cfg: Config) -> Pretraining:
    for name in ("sft", "dpo"):
        if getattr(cfg, name) is not None:
            raise ConfigError(f"{name}: this config fine-tunes a checkpoint; run it with {name}.py, not train.py")
    return Pretraining()


def main(argv=None) -> int:
    parser = arg_parser(__doc__, "config_tiny.yaml")
    planner.add_arguments(parser)
    return run_command(parser.parse_args(argv), pretraining, "train.py")


if __name__ == "__main__":
    sys.exit(main())
