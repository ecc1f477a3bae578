"""Pretrain SmolLM2: `python train.py --config config_smollm2_135M.yaml [key=value ...] [--resume [PATH]]`.

One process per GPU under `torchrun` (DDP), or one plain process on a GPU or the CPU. The loop, in order:
set the LR for this optimizer step -> k micro-batches of forward/backward (loss / k, gradients synced on the last
only) -> unscale, clip, skip the step if anything is non-finite -> optimizer step -> log, validate, sample, save.
A checkpoint holds every part needed to continue exactly (model, optimizer, grad scaler, step, data position,
RNG states, config), so a run killed at any moment resumes with the same losses it would have had.
"""

import argparse
import contextlib
import math
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import remote
from checkpoint import (CheckpointError, checkpoint_name, latest_checkpoint, load_checkpoint, load_state_into,
                        resolve_checkpoint, rotate_checkpoints, save_atomic)
from config import Config, ConfigError, config_to_dict, load_config
from metrics import (MetricsLog, flops_per_token, format_train_line, human, peak_flops, plot_losses,
                     progress_bar)
from model import SmolLM2
from optimizer import build_optimizer, lr_at
from runtime import Runtime, gather, memory_gb, mean_across_ranks, rng_state, set_rng_state, setup_runtime
from sampling import SamplingParams, generate


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); the message says why and what to try."""


@torch.no_grad()
def evaluate(model, loader, batches: int, rt: Runtime) -> float:
    """Mean loss over the first `batches` batches of the held-out split (the same batches every time)."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=rt.device)
    for _ in range(batches):
        x, y = loader.next_batch()
        with rt.autocast():
            _, loss = model(x.to(rt.device), y.to(rt.device))
        total += loss.float()
    model.train()
    return mean_across_ranks(total / batches, rt).item()


def write_samples(model, tokenizer, cfg: Config, eos_id: int, rt: Runtime) -> list[dict]:
    s = cfg.sampling
    prompts = [tokenizer.encode(p).ids for p in s.prompts]
    params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    with rt.autocast():
        outs = generate(model, prompts, params, eos_id=eos_id, seed=cfg.general.seed)
    return [{"prompt": p, "text": tokenizer.decode(o)} for p, o in zip(s.prompts, outs)]


def find_resume(cfg: Config, resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """--resume (or checkpoints.resume_checkpoint_path) -> a checkpoint file; refuse to start over a finished run."""
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


def train(cfg: Config, resume: Optional[str] = None) -> dict:
    """Run (or continue) training; returns the final step, train loss and validation loss."""
    rt = setup_runtime(cfg)
    run_dir = Path(cfg.checkpoints.checkpoints_path)
    # the bucket is checked first, before data preparation and step 1: a typo must not cost hours
    uploader = remote.Uploader(cfg.s3, run_dir, cfg.run.keep_last_checkpoints) if rt.main and cfg.s3.bucket else None
    T, B, k = cfg.tokens.sequence_length, cfg.tokens.micro_batch_size, cfg.tokens.batch_accumulation_per_replica
    steps = cfg.tokens.train_steps
    random.seed(cfg.general.seed)
    np.random.seed(cfg.general.seed)
    torch.manual_seed(cfg.general.seed + rt.rank)

    tokenizer = data.load_tokenizer(cfg)   # under torchrun, data.py's file lock lets one rank train it at first use
    eos_id = data.eos_token_id(tokenizer)
    train_data = data.train_loader(cfg, rt.rank, rt.world, tokenizer)
    val_data = data.val_loader(cfg, rt.rank, rt.world, tokenizer)

    mcfg = cfg.model.model_config
    model = SmolLM2(mcfg, cfg.model.init_method.std).to(rt.device)
    model.gradient_checkpointing = cfg.parallelism.recompute_layer
    fused = rt.device.type == "cuda" and cfg.optimizer.optimizer_factory.torch_adam_is_fused
    optimizer = build_optimizer(model, cfg.optimizer, fused)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.precision == "fp16")
    step, tokens_seen, val_loss = 0, 0, None

    ckpt_path = find_resume(cfg, resume, run_dir)
    if ckpt_path is not None:
        ck = load_checkpoint(ckpt_path)
        load_state_into(model, ck["model"], str(ckpt_path))
        if "optimizer" in ck and cfg.checkpoints.load_optimizer:
            optimizer.load_state_dict(ck["optimizer"])
            scaler.load_state_dict(ck.get("scaler", {}))
        state = ck.get("train_state", {})
        step, tokens_seen, val_loss = state.get("step", 0), state.get("tokens_seen", 0), state.get("val_loss")
        if "data" in ck:   # a global position: a run may resume on a different number of processes
            train_data.load_state_dict(ck["data"])
            set_rng_state(ck["rng"][rt.rank % len(ck["rng"])])

    log = None
    if rt.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        tokenizer.save(str(run_dir / "tokenizer.json"))
        log = MetricsLog(run_dir, step if ckpt_path else None, cfg.run.tensorboard,
                         cfg.general.project if cfg.run.wandb else None, cfg.general.run, config_to_dict(cfg))

    net = torch.compile(model) if cfg.run.compile else model   # checkpoints always read `model`: no _orig_mod.
    if rt.world > 1:
        net = DDP(net, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                  bucket_cap_mb=cfg.model.ddp_bucket_cap_mb)

    tokens_per_step = B * T * k * rt.world
    flops_tok = flops_per_token(mcfg, T)
    peak, peak_note = peak_flops(rt.device)
    if rt.main:
        if cfg.parallelism.dp not in (1, rt.world):
            print(f"note: parallelism.dp={cfg.parallelism.dp} but {rt.world} process(es) run; the data-parallel size "
                  "is the number of processes", file=sys.stderr)
        print(f"model {human(model.num_parameters())} params | {rt.world} x {rt.device.type} | {rt.precision} | "
              f"batch {B} x {T} tokens x {k} accumulation x {rt.world} = {tokens_per_step:,} tokens/step | "
              f"{steps} steps, warmup {cfg.optimizer.learning_rate_scheduler.lr_warmup_steps} | {peak_note}"
              + (f" | resumed from {ckpt_path} at step {step}" if ckpt_path else ""), flush=True)

    def save(reason: str):
        rng_states = gather(rng_state(), rt)
        if not rt.main:
            return
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise TrainingError(f"refusing to save step {step}: the weights hold NaN/Inf")
        path = run_dir / "checkpoints" / checkpoint_name(step)
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "train_state": {"step": step, "tokens_seen": tokens_seen, "val_loss": val_loss},
                     "data": train_data.state_dict(), "rng": rng_states, "config": config_to_dict(cfg)}, path)
        if uploader is not None:   # into the background uploader's queue; a file waiting there is not rotated out
            uploader.add_checkpoint(path)
        rotate_checkpoints(run_dir, cfg.run.keep_last_checkpoints, spare=uploader.is_pending if uploader else None)
        print(f"saved {path} ({reason})", flush=True)

    stop_signal = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop_signal.append(signum))

    clip = cfg.optimizer.clip_grad or float("inf")
    bad_streak, loss_ema, last_loss = 0, None, float("nan")
    t_log, steps_since_log, t_start, start_step = time.time(), 0, time.time(), step
    show_bar = rt.main and sys.stderr.isatty()
    net.train()
    while step < steps:
        lr = lr_at(step, cfg.optimizer.learning_rate_scheduler, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=rt.device)
        for micro in range(k):
            x, y = train_data.next_batch()
            if int(y.max()) >= mcfg.vocab_size:   # on the CPU, before the GPU would fail with an opaque assert
                raise data.DataError(f"step {step + 1}: token id {int(y.max())} is outside the model's vocabulary "
                                     f"({mcfg.vocab_size}); the data was tokenized with another tokenizer")
            x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
            # DDP all-reduces gradients inside backward(); skip it on every micro-step but the last
            sync = rt.world == 1 or micro == k - 1
            with (contextlib.nullcontext() if sync else net.no_sync()):
                with rt.autocast():
                    _, loss = net(x, y)
                # the gradients of k micro-batches add up; dividing each loss by k makes that sum a mean
                scaler.scale(loss / k).backward()
            loss_sum += loss.detach().float()
        step_loss = mean_across_ranks(loss_sum / k, rt).item()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
        overflow = scaler.is_enabled() and not math.isfinite(grad_norm)   # fp16: GradScaler lowers its scale
        if math.isfinite(step_loss) and (math.isfinite(grad_norm) or overflow):
            scaler.step(optimizer)
            bad_streak = 0
        else:
            bad_streak += 1
            if rt.main:
                print(f"warning: step {step + 1}: non-finite loss ({step_loss}) or gradient norm ({grad_norm}); "
                      f"update skipped ({bad_streak} in a row)", file=sys.stderr, flush=True)
            if bad_streak >= cfg.run.max_consecutive_bad_steps:
                raise TrainingError(f"stopped at step {step + 1}: {bad_streak} consecutive steps with a non-finite loss "
                                    f"or gradient (run.max_consecutive_bad_steps={cfg.run.max_consecutive_bad_steps}). "
                                    "No checkpoint holds these weights; lower the learning rate or check the data, "
                                    "then resume from the last checkpoint")
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        steps_since_log += 1

        if math.isfinite(step_loss):
            last_loss = step_loss
            spike = loss_ema is not None and step_loss > cfg.run.loss_spike_factor * loss_ema
            if spike and rt.main:
                print(f"warning: loss spike at step {step}: {step_loss:.3f} vs recent {loss_ema:.3f}", file=sys.stderr)
            loss_ema = step_loss if loss_ema is None else 0.95 * loss_ema + 0.05 * step_loss

        if show_bar:
            sys.stderr.write(f"\r{progress_bar(step, steps)}")
            sys.stderr.flush()
        if rt.main and (step % cfg.logging.iteration_step_info_interval == 0 or step == steps):
            if show_bar:
                sys.stderr.write("\r\033[K")   # clear the bar; the log line takes its place
            now = time.time()
            tok_s = steps_since_log * tokens_per_step / max(now - t_log, 1e-9)
            rate = (step - start_step) / max(now - t_start, 1e-9)
            record = {"kind": "train", "step": step, "train_steps": steps, "loss": step_loss, "lr": lr,
                      "grad_norm": grad_norm, "tokens_seen": tokens_seen, "tok_per_s": tok_s,
                      "mfu": tok_s * flops_tok / (peak * rt.world) if peak else None,
                      "eta_s": (steps - step) / rate if rate > 0 else float("inf"), "mem_gb": memory_gb(rt.device)}
            print(format_train_line(record), flush=True)
            log.write(record)
            t_log, steps_since_log = now, 0

        if step % cfg.tokens.val_check_interval == 0 or step == steps:
            val_loss = evaluate(net, val_data, cfg.run.val_batches, rt)
            if rt.main:
                print(f"step {step} | val loss {val_loss:.3f} | val ppl {math.exp(min(val_loss, 50)):.1f}", flush=True)
                log.write({"kind": "val", "step": step, "loss": val_loss, "ppl": math.exp(min(val_loss, 50))})
                plot_losses(log.path, run_dir / "loss.png")
        if rt.main and cfg.sampling.interval and (step % cfg.sampling.interval == 0 or step == steps):
            for s in write_samples(model, tokenizer, cfg, eos_id, rt):
                print(f"sample @ {step} | {s['prompt']!r} -> {s['text']!r}", flush=True)
                log.write({"kind": "sample", "step": step, **s})
        if step % cfg.checkpoints.checkpoint_interval == 0 or (step == steps and cfg.checkpoints.save_final_state):
            save("interval" if step < steps else "final")
        if stop_signal:
            if step % cfg.checkpoints.checkpoint_interval:
                save("SIGTERM")
            if rt.main:
                print(f"stopped by SIGTERM at step {step}; continue with --resume", file=sys.stderr)
            break

    if rt.main:
        plot_losses(log.path, run_dir / "loss.png")
        log.close()
    if rt.world > 1:
        dist.destroy_process_group()
    if uploader is not None and not uploader.finish():
        raise TrainingError(f"training reached step {step}, but not every file reached the bucket (see above); "
                            f"what is missing there is kept in {run_dir}")
    return {"step": step, "train_loss": last_loss, "val_loss": val_loss}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a nanotron-format YAML file, e.g. config_tiny.yaml")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue from the newest checkpoint of the run (no value; the bucket's when the run dir "
                             "has none), from this checkpoint file, or from s3://bucket/prefix[/checkpoints/step_N.pt]")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. tokens.micro_batch_size=4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg, args.resume)
    except (ConfigError, CheckpointError, data.DataError, remote.RemoteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") != "0":   # under torchrun, rank 0 speaks for the run
        return 0
    val = f"{result['val_loss']:.3f}" if result["val_loss"] is not None else "n/a"
    print(f"done: step {result['step']} | train loss {result['train_loss']:.3f} | val loss {val}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
