"""What a training run tells its user: log lines, throughput and MFU, a metrics JSONL file and a loss-curve PNG.

Everything is appended to `<run dir>/metrics.jsonl` (one JSON object per line, `kind` = train | val | sample | eval;
train and val records name the data `stage`, val records hold each source's loss in `sources`, an eval record holds
one benchmark's scores at a step); TensorBoard and Weights & Biases receive the same numbers only when installed and
asked for in the config.
"""

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from model import ModelConfig


@dataclass(frozen=True)
class GPU:
    """A GPU: the memory it reports (less than its data sheet's round figure: the A10G and L4 sold as 24 GB report
    23,028 MiB, 22.5 GiB), and the data sheet's dense bf16 tensor-core peak (no sparsity; the headline figure with
    sparsity is twice this). V100 and T4 have no bf16: their fp16 peak."""
    key: str            # the name `--plan --gpu` takes
    match: str          # a substring of torch.cuda.get_device_name()
    memory_mib: int     # total memory as torch.cuda.get_device_properties / nvidia-smi report it
    bf16_tflops: float

    @property
    def memory_gib(self) -> float:
        return self.memory_mib / 1024


# One table for MFU (metrics) and the planner. gpu_by_name() takes the first entry whose `match` is in the device
# name, so the more specific names come first (H100 PCIe before H100, A10G before A10, L40S before L40 before L4).
# On a GPU, train.py's recompute choice reads the device itself (planner.device_usable_bytes), not this table.
GPUS = [GPU("h200", "H200", 143771, 989.0), GPU("h100-pcie", "H100 PCIe", 81559, 756.0),
        GPU("h100-nvl", "H100 NVL", 95830, 835.0), GPU("h100", "H100", 81559, 989.0),
        GPU("a100-80", "A100", 81920, 312.0), GPU("a100-40", "A100", 40960, 312.0),
        GPU("a10g", "A10G", 23028, 70.0), GPU("a10", "A10", 23028, 125.0), GPU("l40s", "L40S", 46068, 362.0),
        GPU("l40", "L40", 46068, 181.0), GPU("l4", "L4", 23028, 121.0), GPU("rtx4090", "4090", 24564, 165.2),
        GPU("rtx3090", "3090", 24576, 71.0), GPU("v100", "V100", 16160, 125.0), GPU("t4", "T4", 15360, 65.0)]


def gpu_by_name(device_name: str) -> Optional[GPU]:
    """The GPUS entry for a torch.cuda.get_device_name() string, e.g. 'NVIDIA A10G'; None when unknown."""
    return next((gpu for gpu in GPUS if gpu.match in device_name), None)


def peak_flops(device: torch.device) -> tuple[Optional[float], str]:
    """(peak FLOP/s, what it is) for the current GPU, or (None, reason) where MFU means nothing (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None, f"no MFU on {device.type}"
    name = torch.cuda.get_device_name(device)
    gpu = gpu_by_name(name)
    if gpu is None:
        return None, f"{name}: peak FLOP/s unknown, MFU not reported"
    return gpu.bf16_tflops * 1e12, f"{name}: {gpu.bf16_tflops:g} TFLOP/s dense bf16 peak"


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight (forward 2, backward 4) plus attention's scores and mixing,
    6 * 2 * n_layers * hidden * seq_len (PaLM appendix B). The embedding lookup is no matmul, but the tied
    lm_head is, so the one shared matrix is counted once."""
    h, L = cfg.hidden_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * cfg.head_dim
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * cfg.intermediate_size
    weights = L * per_layer + cfg.vocab_size * h
    return 6 * weights + 12 * L * h * seq_len


def human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def format_train_line(r: dict, extra: dict = {}) -> str:
    """One line a user scans at a glance: step 120/500 | loss 3.412 | lr 3.0e-04 | ... | eta 2m13s, then the task's
    statistics in `extra` (DPO's accuracy and margins)."""
    parts = [f"step {r['step']}/{r['train_steps']}", f"loss {r['loss']:.3f}", f"lr {r['lr']:.1e}",
             f"gnorm {r['grad_norm']:.2f}", f"{human(r['tok_per_s'])} tok/s"]
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    parts.append(f"eta {duration(r['eta_s'])}")
    if r.get("mem_reserved_gib") is not None:   # a GPU's peaks since the last line
        parts.append(f"mem {r['mem_gib']:.1f} allocated, {r['mem_reserved_gib']:.1f} reserved GiB")
    elif r.get("mem_gib") is not None:           # the CPU's peak resident memory
        parts.append(f"mem {r['mem_gib']:.1f} GiB")
    return " | ".join(parts + [f"{key} {value:.3f}" for key, value in extra.items()])


def short_names(names) -> dict[str, str]:
    """Source name -> what a log line or a legend shows: the last part of a path or hub id, the whole name where
    two sources would read alike."""
    short = {name: os.path.basename(name.rstrip("/")) or name for name in names}
    return {name: s if list(short.values()).count(s) == 1 else name for name, s in short.items()}


def format_val_line(r: dict, extra: dict = {}) -> str:
    """step 500 | val loss 3.412 | ppl 30.3 | web 3.301 · code 2.957 (each source's loss when there are several), or
    with DPO's loss, no perplexity and its statistics (`extra`): step 500 | val loss 0.512 | val accuracy 0.781 | ..."""
    line = f"step {r['step']} | val loss {r['loss']:.3f}" + (f" | ppl {r['ppl']:.1f}" if "ppl" in r else "")
    line += "".join(f" | val {key} {value:.3f}" for key, value in extra.items())
    if len(r.get("sources") or {}) > 1:
        names = short_names(r["sources"])
        line += " | " + " · ".join(f"{names[n]} {loss:.3f}" for n, loss in r["sources"].items())
    return line


def progress_bar(step: int, total: int, width: int = 30) -> str:
    filled = width * step // max(total, 1)
    return f"[{'#' * filled}{'.' * (width - filled)}] {step}/{total}"


class MetricsLog:
    """Appends records to metrics.jsonl and mirrors scalars to TensorBoard / W&B when asked for."""

    def __init__(self, run_dir: Path, resume_step: Optional[int], tensorboard: bool, wandb_project: Optional[str],
                 run_name: str, config: dict):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # a killed run may have logged steps past its last checkpoint; those steps are about to be redone
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            self.path.write_text("")
        self.tb = self.wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                print("warning: run.tensorboard is on but tensorboard is not installed (pip install tensorboard)",
                      file=sys.stderr)
        if wandb_project:
            try:
                import wandb
                self.wandb = wandb.init(project=wandb_project, name=run_name, config=config, resume="allow")
            except ImportError:
                print("warning: run.wandb is on but wandb is not installed (pip install wandb)", file=sys.stderr)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if record["kind"] == "eval":   # eval/hellaswag/acc_norm: the scores, not the facts about them
            scalars = {f"eval/{record['task']}/{k}": v for k, v in record["scores"].items()}
        else:
            scalars = {f"{record['kind']}/{k}": v for k, v in record.items()
                       if isinstance(v, (int, float)) and k not in ("step", "kind")}
            names = short_names(record.get("sources") or {})
            scalars.update({f"{record['kind']}/loss/{names[n]}": v for n, v in (record.get("sources") or {}).items()})
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def val_curves(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Each source's validation loss against step ({} with a single source: the total is its curve)."""
    curves = {}
    for r in records:
        if r.get("kind") == "val" and len(r.get("sources") or {}) > 1:
            for name, loss in r["sources"].items():
                curves.setdefault(name, []).append((r["step"], loss))
    return curves


def smoothed(values: list[float], window: Optional[int] = None) -> list[float]:
    """An exponential moving average, s_t = b s_(t-1) + (1 - b) x_t with b = 1 - 1/window, divided by 1 - b^t as
    TensorBoard does, so the first points are not pulled toward 0. The default window is a twentieth of the points."""
    window = window or max(1, len(values) // 20)
    beta, s, out = 1 - 1 / window, 0.0, []
    for t, x in enumerate(values, 1):
        s = beta * s + (1 - beta) * x
        out.append(s / (1 - beta ** t))
    return out


def eval_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Benchmark scores against step, one series per `task metric`, from metrics.jsonl's eval records. Only scores
    between 0 and 1 (accuracies, exact match): a perplexity on the same axis would flatten them."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.get("kind") == "eval":
            for metric, value in r["scores"].items():
                series.setdefault(f"{r['task']} {metric}", []).append((r["step"], value))
    return {name: sorted(points) for name, points in series.items() if all(0 <= v <= 1 for _, v in points)}


# post-training's statistics, most on a 0-1 scale: what train records carry (GRPO's reward, its spread within a group,
# the share of groups with equal rewards, KL to the reference and clip fraction; DPO's preference accuracy; SFT's
# token accuracy) and validation records too, with the held-out accuracy per task (accuracy_<task>)
STATISTICS = ("accuracy", "token_accuracy", "reward", "reward_std", "equal_groups", "kl", "clip_fraction")


def statistic_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Post-training statistics against step, one series per "train <name>" or "val <name>" ({} for pretraining)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.get("kind") in ("train", "val"):
            for key, value in r.items():
                if key in STATISTICS or (r["kind"] == "val" and key.startswith("accuracy_")):
                    series.setdefault(f"{r['kind']} {key}", []).append((r["step"], value))
    return series


def loss_figure(records: list[dict]):
    """Train loss (its points faint, their smoothed curve on top) and validation loss (each source's dashed) by step,
    with the benchmark scores beside them once a run has some, and post-training's statistics (statistic_series)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["loss"]) for r in records if r.get("kind") == "val"]
    per_source, scores, stats = val_curves(records), eval_series(records), statistic_series(records)
    panels = 1 + bool(scores) + bool(stats)
    fig, axes = plt.subplots(1, panels, figsize=(7 + 5 * (panels - 1), 4), dpi=100, squeeze=False)
    ax, others = axes[0][0], list(axes[0][1:])
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, label="train", linewidth=0.8, alpha=0.3, color="C0")
        ax.plot(steps, smoothed(list(losses)), label="train (smoothed)", linewidth=1.5, color="C0")
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5, color="C1")
    names = short_names(per_source)
    for name, points in per_source.items():
        ax.plot(*zip(*points), "--", label=f"validation · {names[name]}", linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if scores:
        bench = others.pop(0)
        for name, points in scores.items():
            bench.plot(*zip(*points), "o-", label=name, linewidth=1.5)
        bench.set_ylabel("benchmark score")
    if stats:   # a training statistic smoothed as the train loss is, the held-out ones as measured
        held = others.pop(0)
        for name, points in stats.items():
            steps, values = zip(*points)
            if name.startswith("train "):
                held.plot(steps, smoothed(list(values)), label=f"{name} (smoothed)", linewidth=1.2)
            else:
                held.plot(steps, values, "o-", label=name, linewidth=1.5)
        held.set_ylabel("post-training statistic")
    for panel in axes[0][1:]:
        panel.set_xlabel("optimizer step")
        panel.set_xlim(ax.get_xlim())
        panel.grid(alpha=0.3)
        panel.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_losses(metrics_path, out_png) -> Optional[Path]:
    """The loss curves (and benchmark scores) as a PNG; None when matplotlib is missing or no loss is logged."""
    records = [r for r in read_metrics(metrics_path) if r.get("kind") in ("train", "val", "eval")]
    if not any(r["kind"] in ("train", "val") for r in records):
        return None
    try:
        fig = loss_figure(records)
    except ImportError:
        return None
    import matplotlib.pyplot as plt
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)
