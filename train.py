"""Pretrain SmolLM2: `python train.py --config config_smollm2_135M.yaml [key=value ...] [--resume [PATH]] [--plan]`.

One process per GPU under `torchrun` (DDP or FSDP, see smollm2/distributed.py), or one plain process on a GPU or the
CPU. Read top to bottom: `setup()` builds a run (data, model, optimizer, and what a checkpoint restores); `train()`
loops over optimizer steps: `optimizer_step()` sets the LR, runs k micro-batches of forward and backward (each loss
divided by k; SFT's weighed by its share of the step's target tokens), unscales, clips, skips the update if anything is
non-finite, and steps; then `log_progress()`, `validate()`, `write_samples()` and `save()` run on their intervals (a
save at an `eval` step also starts the config's benchmarks on that checkpoint, in a process beside this one:
smollm2/evals.py's BackgroundEvals). A checkpoint holds every part needed to continue exactly (model, optimizer, grad
scaler, step, data position, RNG states, config), so a run killed at any moment resumes with the same losses it would
have had.

What the run starts from, reads and minimises is its task (smollm2/task.py): `Pretraining` here (a fresh model, the
data stages, the next-token loss); sft.py's SFT and dpo.py's DPO are other tasks on the same loop, checkpoints,
resume and distribution. `--plan` prints memory, fit, time and cost instead of training (smollm2/planner.py).

Read next: generate.py, to hear what the checkpoints say. The loop builds on smollm2/cli.py, runtime.py,
optimizer.py, progress.py, metrics.py, checkpoint.py and remote.py.
"""

import gc
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml

import data
from model import SmolLM2
from smollm2 import cli, distributed, planner, remote, stages
from smollm2.checkpoint import (checkpoint_name, is_sharded, latest_checkpoint, load_state_into, rotate_checkpoints,
                                save_atomic, training_checkpoint)
from smollm2.config import Config
from smollm2.config_checks import notes
from smollm2.config_load import config_to_dict
from smollm2.errors import ConfigError, StoppedAtOnce, TrainingError
from smollm2.evals import BackgroundEvals
from smollm2.metrics import MetricsLog, format_val_line, plot_losses, progress_bar
from smollm2.optimizer import build_optimizer, fused_adam, lr_at
from smollm2.progress import Progress, log_progress, start_line, still_running, track_loss
from smollm2.runtime import Runtime, StopSignals, gather, mean_across_ranks, restore_rng, rng_state, setup_runtime
from smollm2.sampling import SamplingParams, generate
from smollm2.task import Task


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
    train_data: data.StagedLoader          # every data stage's batches, and the running stage's validation sources
    accumulation: int                       # micro-batches per optimizer step on each rank
    accumulation_note: str                  # why it differs from the config's, if it does
    task: Task                              # what the run starts from, reads and minimises
    recompute: tuple[str, str]              # the recompute mode (planner.RECOMPUTE) and why it was chosen
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


# ---------------------------------------------------------------- the task: what a run starts from, reads, minimises


class Pretraining(Task):
    """A freshly initialised model, the data stages of data.py, the next-token loss (the defaults of Task)."""

    def data(self, cfg: Config, rt: Runtime, tokenizer) -> data.StagedLoader:
        return data.StagedLoader(cfg, rt.rank, rt.world, tokenizer)

    def describe_data(self, cfg: Config, step: int) -> str:
        return stages.describe(cfg, stages.stage_at(cfg, step))


# ---------------------------------------------------------------- setup


def setup(cfg: Config, resume: Optional[str], explicit_accumulation: bool,
          task: Task) -> tuple[Run, Optional[Path]]:
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
    schedule = task.fit_schedule(cfg, cfg.tokens.micro_batch_size * k * rt.world)   # e.g. sft.num_train_epochs
    if schedule and rt.main:
        print(schedule, flush=True)

    ckpt_path = remote.find_resume(resume or cfg.checkpoints.resume_checkpoint_path, run_dir, cfg.s3)
    ckpt = training_checkpoint(ckpt_path) if ckpt_path else None
    model = task.model(cfg, rt, ckpt)
    torch.manual_seed(cfg.general.seed + rt.rank)
    recompute = planner.recompute_for_run(cfg, rt.world, rt.precision, rt.device)   # (mode, why): the start line
    model.gradient_checkpointing, model.selective_recompute = recompute[0] == "full", recompute[0] == "selective"
    if ckpt is not None and not is_sharded(ckpt_path):   # whole weights go in before FSDP splits them
        load_state_into(model, ckpt["model"], str(ckpt_path))
    net = distributed.wrap(model, cfg, rt)
    if model.lm_head.weight.is_meta:   # sharded now: each rank fills its own shards (a checkpoint's, next, if any)
        distributed.materialize(model, rt.device, None if ckpt else cfg.general.seed)
    optimizer = build_optimizer(model, cfg.optimizer, fused_adam(rt.device, cfg.optimizer.optimizer_factory),
                                cfg.run.weight_decay_exclude_1d)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.precision == "fp16")
    run = Run(cfg, rt, run_dir, model, net, optimizer, scaler, tokenizer, train_data, k, k_note, task, recompute,
              uploader, evals)
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
        restore_rng(ckpt["rng"], run.rt.rank, run.cfg.general.seed)


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
    batches = [run.train_data.next_batch() for _ in range(k)]
    weights = run.task.weights(run.rt, batches)   # None: each micro-batch's loss weighs the same
    for micro, batch in enumerate(batches):
        with distributed.gradient_sync(run.net, last_micro_batch=micro == k - 1):
            with rt.autocast():
                loss, stats = run.task.loss(run, batch)
            loss, stats = weighed(loss, stats, weights, micro)
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


def weighed(loss: torch.Tensor, stats: dict, weights: Optional[list[float]], micro: int) -> tuple[torch.Tensor, dict]:
    """A micro-batch's loss and statistics times its weight (Task.weights; None: each weighs 1), so their means over
    the micro-batches are SFT's means over every target token of the step (its token accuracy as its loss)."""
    if weights is None:
        return loss, stats
    return loss * weights[micro], {key: value * weights[micro] for key, value in stats.items()}


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
        held_out = [loader.next_batch() for _ in range(batches)]
        shares = run.task.weights(run.rt, held_out)   # SFT's: the mean over every held-out target token
        for i, batch in enumerate(held_out):
            with run.rt.autocast():
                loss, batch_stats = weighed(*run.task.loss(run, batch), shares, i)
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
    the whole model; every rank together when FSDP shards it (each forward gathers the weights from all ranks). The
    sharded ranks then all take max_new_tokens steps, cut at EOS afterwards: a rank stopping at an EOS its peers did
    not sample (their numerics may differ) would leave them waiting in the next forward's all-gather."""
    sharded = distributed.sharded(run.cfg, run.rt)
    if not (run.rt.main or sharded):
        return
    s, eos = run.cfg.sampling, run.task.stop_id(run.tokenizer)
    room = max(1, run.cfg.model.model_config.max_position_embeddings - s.max_new_tokens)
    prompts = [run.task.prompt(run.tokenizer, p)[-room:] for p in s.prompts]   # a long prompt keeps its newest tokens
    # eager: the layers compiled for training (run.compile under FSDP) would recompile for every cached decode shape
    with run.rt.autocast(), torch.compiler.set_stance("force_eager"):
        outs = generate(run.model, prompts, sample_params(run.cfg), eos_id=None if sharded else eos,
                        seed=run.cfg.general.seed)
    if run.rt.main:
        for prompt, out in zip(s.prompts, outs):
            text = run.tokenizer.decode(out[:out.index(eos) + 1] if eos in out else out)
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
          task: Optional[Task] = None) -> dict:
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


def pretraining(cfg: Config) -> Pretraining:
    for name in ("sft", "dpo", "grpo"):
        if getattr(cfg, name) is not None:
            raise ConfigError(f"{name}: this config fine-tunes a checkpoint; run it with {name}.py, not train.py")
    return Pretraining()


def main(argv=None) -> int:
    parser = cli.arg_parser(__doc__, "config_tiny.yaml")
    planner.add_arguments(parser)
    return cli.training_command(parser.parse_args(argv), pretraining, "train.py", train)


if __name__ == "__main__":
    sys.exit(main())
