"""What a training run tells its user: log lines, throughput and MFU, a metrics JSONL file and a loss-curve PNG.

Everything is appended to `<run dir>/metrics.jsonl` (one JSON object per line, `kind` = train | val | sample | eval,
an eval record holding one benchmark's scores at a step); TensorBoard and Weights & Biases receive the same numbers
only when installed and asked for in the config.
"""

import json
import math
import sys
from pathlib import Path
from typing import Optional

import torch

from config import ModelConfig

# Dense bf16/fp16 tensor-core peak, in TFLOP/s, by substring of torch.cuda.get_device_name(); first match wins.
PEAK_TFLOPS = [("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("A10G", 70.0), ("A10", 125.0), ("L40S", 362.0),
               ("L40", 181.0), ("L4", 121.0), ("4090", 165.0), ("3090", 71.0), ("V100", 125.0), ("T4", 65.0)]


def peak_flops(device: torch.device) -> tuple[Optional[float], str]:
    """(peak FLOP/s, what it is) for the current GPU, or (None, reason) where MFU means nothing (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None, f"no MFU on {device.type}"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12, f"{name}: {tflops:.0f} TFLOP/s dense bf16 peak"
    return None, f"{name}: peak FLOP/s unknown, MFU not reported"


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


def format_train_line(r: dict) -> str:
    """One line a user scans at a glance: step 120/500 | loss 3.412 | lr 3.0e-04 | ... | eta 2m13s."""
    parts = [f"step {r['step']}/{r['train_steps']}", f"loss {r['loss']:.3f}", f"lr {r['lr']:.1e}",
             f"gnorm {r['grad_norm']:.2f}", f"{human(r['tok_per_s'])} tok/s"]
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    parts.append(f"eta {duration(r['eta_s'])}")
    if r.get("mem_gb") is not None:
        parts.append(f"mem {r['mem_gb']:.1f}GB")
    return " | ".join(parts)


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


def eval_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Benchmark scores against step, one series per `task metric`, from metrics.jsonl's eval records. Only scores
    between 0 and 1 (accuracies, exact match): a perplexity on the same axis would flatten them."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.get("kind") == "eval":
            for metric, value in r["scores"].items():
                series.setdefault(f"{r['task']} {metric}", []).append((r["step"], value))
    return {name: sorted(points) for name, points in series.items() if all(0 <= v <= 1 for _, v in points)}


def plot_losses(metrics_path, out_png) -> Optional[Path]:
    """Train and validation loss against step, as a PNG, with the benchmark scores beside them once a run has some;
    None when matplotlib is missing or nothing is logged."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["loss"]) for r in records if r.get("kind") == "val"]
    scores = eval_series(records)
    if not train and not val:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2 if scores else 1, figsize=(12 if scores else 7, 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if scores:
        bench = axes[0][1]
        for name, points in scores.items():
            bench.plot(*zip(*points), "o-", label=name, linewidth=1.5)
        bench.set_xlabel("optimizer step")
        bench.set_ylabel("benchmark score")
        bench.set_xlim(ax.get_xlim())
        bench.grid(alpha=0.3)
        bench.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)
