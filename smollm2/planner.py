"""Plan a training run before renting GPUs: memory per GPU, whether it fits, the largest micro-batch that does, and
the time and cost of `tokens.train_steps` at a stated MFU.

    python train.py --config config_smollm2_135M.yaml --plan --gpu a10g --price_per_gpu_hour 1.0
    python train.py --config configs/config_smollm2_1.7B.yaml --plan --gpu l4 --nproc 4

Nothing is allocated and no data is read: the parameter counts are the real model's, built on the meta device, and
the rest is arithmetic on the config. Per GPU, for P parameters on N processes:
- weights and gradients in fp32, 4P bytes each, and AdamW's two fp32 moments, 8P. optimizer.zero_stage 0 (DDP) keeps
  all of it on every GPU, plus DDP's gradient buckets (another 4P) when N > 1; zero_stage >= 1 (FSDP2) shards it /N.
- compute copies of the weights: bf16 autocast caches a cast of every matmul weight until the forward ends (DDP)
  when nothing is recomputed, and casts them per use otherwise (one layer's and the head's at a time);
  FSDP2 gathers each layer's bf16 weights and keeps them until that layer's backward (zero_stage 1-2: every layer
  at the peak) or frees them after each use (zero_stage 3: about two layers, plus the embedding and head).
- activations: what the backward needs from the forward, tensor by tensor, in one of three modes (`RECOMPUTE`):
  everything autograd keeps (`layer_bytes`, run.recompute none); with selective the outputs of the matmuls and of
  attention only, the rest rebuilt layer by layer in the backward; with full (or parallelism.recompute_layer) only
  each layer's input, and one whole layer at a time is rebuilt. run.recompute auto (the default) takes the first of
  none, selective, full whose peak fits (`resolve_recompute`): recompute costs host time per layer in eager mode,
  so a run that fits without it should not pay it.
- the loss path: what the final norm keeps, and one chunk of model.LOSS_CHUNK_TOKENS positions' logits, log-softmax
  and gradient, never more.
- the KV cache of the training samples, taken after a step, when activations and gradients are gone.
The activation counts match peaks measured on the CPU within a few percent (tests/test_planner.py). Flash attention
(on GPUs, and torch's CPU kernel for causal attention) keeps no T x T score matrix, so none is counted. Masked rows
(run.document_masking) run CUDA's memory-efficient kernel (model.attention_kernels): no scores either, but k and v
repeated to every query head, and the mask as an additive (B, 1, T, T) bias in the compute dtype, per layer.
"""

import argparse
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from model import LOSS_CHUNK_TOKENS, ModelConfig, SmolLM2
from smollm2.config import Config
from smollm2.distributed import accumulation
from smollm2.errors import ConfigError
from smollm2.metrics import GPU, GPUS, duration, flops_per_token, human
from smollm2.sampling import MIN_CACHE, bucket

GiB = 2 ** 30
RECOMPUTE = ("none", "selective", "full")   # what a layer keeps for its backward: everything, matmul outputs, input
RESERVED_GIB = 1.0   # CUDA context, cuBLAS and NCCL workspaces: on the GPU, never available to tensors
HEADROOM = 0.9       # of the rest: the caching allocator's fragmentation takes some of what is free


@dataclass(frozen=True)
class Params:
    total: int        # every parameter once (a tied matrix once)
    layer: int        # one decoder layer
    layer_cast: int   # one decoder layer's matmul weights
    head: int         # the output head (the embedding matrix when tied)
    cast: int         # every matmul weight: what bf16 autocast casts


def count_parameters(m: ModelConfig) -> Params:
    with torch.device("meta"):   # shapes only: even 1.7B costs no memory
        model = SmolLM2(m)
    matmul = lambda module: {id(mod.weight): mod.weight.numel() for mod in module.modules()
                             if isinstance(mod, nn.Linear)}
    layer = model.model.layers[0]
    return Params(model.num_parameters(), sum(p.numel() for p in layer.parameters()), sum(matmul(layer).values()),
                  model.lm_head.weight.numel(), sum(matmul(model).values()))


def layer_bytes(m: ModelConfig, compute: int, residual: int, mask_keys: int = 0) -> int:
    """Bytes one decoder layer keeps for its backward, per token. `compute`: the matmuls' dtype size (2 under bf16
    autocast or with bf16 weights, 4 in fp32); `residual`: the residual stream's (4 under autocast, whose weights and
    embedding stay fp32; 2 when the weights themselves are bf16, as FSDP2 gathers them); `mask_keys`: the keys of
    each query's mask row (the sequence length) when attention is masked, else 0."""
    C, I, kv = m.hidden_size, m.intermediate_size, m.num_key_value_heads * m.head_dim

    def norm(consumers: int) -> int:
        # its fp32 input (for the statistics), the normalised x (for the gain's gradient), and its output as the
        # next matmuls keep it: once, or once per matmul where autocast casts it to bf16 for each separately
        kept_output = residual * C if compute == residual else consumers * compute * C
        return 4 * C + residual * C + kept_output

    # masked: SDPA keeps k and v repeated to every query head, and the token's row of the (B, 1, T, T) bias
    k_v = 2 * kv if not mask_keys else 2 * m.num_attention_heads * m.head_dim + mask_keys
    attention = compute * (2 * C + k_v) + 4 * m.num_attention_heads   # rotated q, k; v; output; fp32 logsumexp
    mlp = 4 * compute * I                                                  # gate, silu(gate), up, their product
    return norm(3) + attention + norm(2) + mlp


def kept_bytes(m: ModelConfig, compute: int, residual: int, recompute: str, mask_keys: int = 0) -> int:
    """Bytes one decoder layer keeps for its backward, per token, under a `recompute` mode (RECOMPUTE). The repeated
    k, v and the bias of masked attention are rebuilt from q, k, v and the mask unless nothing is recomputed."""
    C, I, kv = m.hidden_size, m.intermediate_size, m.num_key_value_heads * m.head_dim
    if recompute == "full":        # the layer's input
        return residual * C
    if recompute == "selective":   # its input; q, k, v; attention's output and fp32 logsumexp; o_proj; gate, up
        return residual * C + compute * (3 * C + 2 * kv + 2 * I) + 4 * m.num_attention_heads
    return layer_bytes(m, compute, residual, mask_keys)


def loss_bytes(m: ModelConfig, tokens: int, residual: int) -> int:
    """The loss path's peak, in its backward: what the final norm keeps for every position (its fp32 input, the
    normalised x, its output), and one chunk's fp32 log-softmax, its gradient and the incoming one."""
    return tokens * (4 + 2 * residual) * m.hidden_size + 12 * min(tokens, LOSS_CHUNK_TOKENS) * m.vocab_size


def step_bytes(m: ModelConfig, tokens: int, compute: int, residual: int, recompute: str,
               p: Params, mask_keys: int = 0) -> tuple[dict[str, int], int]:
    """What the forward and backward of `tokens` positions (micro-batch x sequence) add to what is held: by part,
    and at the peak. Under autocast (compute < residual) the forward ends holding a bf16 copy of every matmul
    weight, unless layers are recomputed (then one layer's and the head's at a time, uncached). The backward peaks
    either in the loss (its first step, with everything kept) or in the last layer's MLP, once the final norm's
    tensors are gone: there the product's gradient splits into gate's and up's while the layer's rebuilt
    activations, all but the product down_proj has just used, are still held. mask_keys: as layer_bytes; the
    boolean mask itself is held once, for every layer."""
    C, I, kept = m.hidden_size, m.intermediate_size, kept_bytes(m, compute, residual, recompute, mask_keys)
    rebuilt = recompute != "none"
    parts = {"activations kept": tokens * m.num_hidden_layers * kept}
    if mask_keys:
        parts["attention mask (bool)"] = tokens * mask_keys
    if compute < residual:   # recomputed layers cast per use, uncached (model._uncached_autocast)
        parts["autocast weight copies"] = 2 * (p.layer_cast + p.head if rebuilt else p.cast)
    parts["loss path (chunked)"] = loss_bytes(m, tokens, residual)
    # the last layer's MLP backward: what its recompute rebuilt, less the product down_proj's backward has freed;
    # the residual stream's gradient; the product's gradient, and gate's and up's made from it
    rebuilds = layer_bytes(m, compute, residual, mask_keys) - kept if rebuilt else 0
    parts["one layer's backward"] = tokens * (rebuilds - compute * I + residual * C + 3 * compute * I)
    working = max(parts["loss path (chunked)"], parts["one layer's backward"])
    held = parts["activations kept"] + parts.get("autocast weight copies", 0) + parts.get("attention mask (bool)", 0)
    return parts, held + working


def samples_kv_bytes(cfg: Config, compute: int) -> int:
    """The KV cache generate() allocates for the training samples: one row per prompt, its length rounded up as
    generate rounds it, in the compute dtype (`compute` bytes: the samples run under the run's autocast)."""
    s, m = cfg.sampling, cfg.model.model_config
    if not s.interval or not s.prompts:
        return 0
    longest = max(len(p.encode()) for p in s.prompts)   # a byte-level BPE never makes more tokens than bytes
    slots = bucket(longest + s.max_new_tokens, MIN_CACHE, m.max_position_embeddings)
    return 2 * m.num_hidden_layers * len(s.prompts) * m.num_key_value_heads * slots * m.head_dim * compute


def memory(cfg: Config, nproc: int, micro_batch: int, recompute: str, compute: int = 2,
           p: Optional[Params] = None) -> tuple[dict[str, int], int]:
    """Bytes per GPU by what holds them, and the peak. compute: 2 for bf16/fp16, 4 for fp32."""
    m, zero = cfg.model.model_config, cfg.optimizer.zero_stage
    p = p or count_parameters(m)
    shards = nproc if zero >= 1 and nproc > 1 else 1   # as distributed.sharded(): one process never shards
    held = {"weights (fp32)": 4 * p.total // shards, "gradients (fp32)": 4 * p.total // shards,
            "AdamW moments (fp32)": 8 * p.total // shards}
    if zero == 0 and nproc > 1:
        held["DDP gradient buckets"] = 4 * p.total
    if shards > 1:   # FSDP2 gathers weights in the compute dtype, and holds one layer's unsharded gradient to reduce it
        gathered = p.total if zero < 3 else 2 * p.layer + (p.total - m.num_hidden_layers * p.layer)
        held["FSDP2 gathered weights"] = compute * gathered + (compute + 4) * p.layer
    residual = compute if shards > 1 else 4   # FSDP2's bf16 weights make a bf16 residual stream
    T = cfg.tokens.sequence_length
    parts, step_peak = step_bytes(m, micro_batch * T, compute, residual, recompute, p,
                                  T if cfg.run.document_masking else 0)
    return {**held, **parts}, sum(held.values()) + step_peak


@dataclass
class Plan:
    cfg: Config
    gpu: GPU
    nproc: int
    mfu: float
    price_per_gpu_hour: Optional[float]
    parameters: int
    accumulation: int
    recompute: str                 # the mode the run would take, one of RECOMPUTE (run.recompute auto resolved)
    recompute_reason: str          # why: configured, or what auto found fits
    memory: dict[str, int]
    peak: int
    activations: dict[str, int]    # activations kept, in each recompute mode
    kv_cache: int
    usable: int
    largest: dict[str, int]        # the largest micro-batch that fits, in each recompute mode (0: none)

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.tokens
        return t.micro_batch_size * t.sequence_length * self.accumulation * self.nproc

    @property
    def tokens_per_s(self) -> float:
        per_token = flops_per_token(self.cfg.model.model_config, self.cfg.tokens.sequence_length)
        return self.mfu * self.gpu.bf16_tflops * 1e12 * self.nproc / per_token

    @property
    def seconds(self) -> float:
        return self.cfg.tokens.train_steps * self.tokens_per_step / self.tokens_per_s


def usable_bytes(gpu: GPU) -> int:
    """What tensors may use of a GPU on paper: what it reports, less the CUDA context and workspaces, less headroom."""
    return int((gpu.memory_gib - RESERVED_GIB) * HEADROOM * GiB)


def device_usable_bytes(device: torch.device) -> Optional[int]:
    """What tensors may use of the device this process runs on: what is free now plus what this process's allocator
    holds already (the context and other processes, background evals among them, are outside both), less headroom.
    None off CUDA, where no figure means the same."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int((free + torch.cuda.memory_reserved(device)) * HEADROOM)


def resolve_recompute(asked: str, peaks: dict[str, int], usable: Optional[int]) -> tuple[str, str]:
    """(mode, why) for run.recompute `asked` (auto or one of RECOMPUTE), given the planned peak in each mode and
    the usable bytes (None: no device memory figure). auto takes the first mode that fits; off a GPU, selective:
    host memory is shared with everything else and the CPU's own compute dwarfs recompute's dispatch cost."""
    of = lambda mode: f"{peaks[mode] / GiB:.1f} of {usable / GiB:.1f} GiB planned"
    if asked != "auto":
        return asked, "as configured" + (f", {of(asked)}" if usable is not None else "")
    if usable is None:
        return "selective", "auto, no device memory figure off a GPU"
    for mode in RECOMPUTE:
        if peaks[mode] <= usable:
            return mode, f"auto, fits: {of(mode)}" + (f"; none needs {of('none')}" if mode != "none" else "")
    return "full", f"auto, DOES NOT FIT even so: {of('full')}"


def asked_recompute(cfg: Config) -> str:
    """run.recompute, with nanotron's parallelism.recompute_layer true meaning full."""
    return "full" if cfg.parallelism.recompute_layer else cfg.run.recompute


def recompute_for_run(cfg: Config, nproc: int, precision_name: str, device: torch.device) -> tuple[str, str]:
    """train.py's recompute mode and why, from this device's memory (torch.cuda's figure, not the table's)."""
    compute, p = 4 if precision_name == "fp32" else 2, count_parameters(cfg.model.model_config)
    peaks = {mode: memory(cfg, nproc, cfg.tokens.micro_batch_size, mode, compute, p)[1] for mode in RECOMPUTE}
    return resolve_recompute(asked_recompute(cfg), peaks, device_usable_bytes(device))


def largest_micro_batch(cfg: Config, nproc: int, gpu: GPU, recompute: str, compute: int = 2,
                        p: Optional[Params] = None) -> int:
    """The largest micro-batch whose peak fits `gpu` (0 when not even 1 does); memory grows with it, so bisect."""
    p = p or count_parameters(cfg.model.model_config)
    fits = lambda b: memory(cfg, nproc, b, recompute, compute, p)[1] <= usable_bytes(gpu)
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi) and hi < 1 << 16:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def find_gpu(key: str) -> GPU:
    for gpu in GPUS:
        if gpu.key == key.lower():
            return gpu
    raise ConfigError(f"--gpu {key}: unknown GPU; one of {', '.join(g.key for g in GPUS)}")


def precision(cfg: Config) -> str:
    """What run.precision gives on a GPU (runtime.resolve_precision): the config's model.dtype when 'auto'."""
    if cfg.run.precision == "auto":
        return "fp32" if cfg.model.dtype in ("float32", "fp32") else "bf16"
    return cfg.run.precision


def plan(cfg: Config, gpu: str = "a10g", nproc: int = 1, price_per_gpu_hour: Optional[float] = None,
         mfu: float = 0.4, explicit_accumulation: bool = False) -> Plan:
    """Everything `--plan` prints, for `nproc` GPUs of kind `gpu` (a key of metrics.GPUS). The accumulation is the
    one train.py would use: the config's global batch kept, unless the command line set it (explicit)."""
    spec = find_gpu(gpu)
    if nproc < 1 or not 0 < mfu <= 1:
        raise ConfigError(f"--nproc must be >= 1 and --mfu in (0, 1], got {nproc} and {mfu}")
    t, k = cfg.tokens, accumulation(cfg, nproc, explicit_accumulation)[0]
    compute = 4 if precision(cfg) == "fp32" else 2
    p = count_parameters(cfg.model.model_config)
    modes = {mode: memory(cfg, nproc, t.micro_batch_size, mode, compute, p) for mode in RECOMPUTE}
    recompute, why = resolve_recompute(asked_recompute(cfg), {m: peak for m, (_, peak) in modes.items()},
                                       usable_bytes(spec))
    largest = {mode: largest_micro_batch(cfg, nproc, spec, mode, compute, p) for mode in RECOMPUTE}
    return Plan(cfg, spec, nproc, mfu, price_per_gpu_hour, p.total, k, recompute, why, *modes[recompute],
                {m: lines["activations kept"] for m, (lines, _) in modes.items()}, samples_kv_bytes(cfg, compute),
                usable_bytes(spec), largest)


def format_plan(p: Plan) -> str:
    cfg, t, g = p.cfg, p.cfg.tokens, p.gpu
    zero = cfg.optimizer.zero_stage
    mode = "DDP" if zero == 0 or p.nproc == 1 else ("FSDP2, ZeRO-3" if zero >= 3 else "FSDP2, ZeRO-2")
    others = lambda values: ", ".join(f"{m}: {values[m]}" for m in RECOMPUTE if m != p.recompute)
    row = lambda name, n, note="": f"  {name:<30}{n / GiB:7.2f} GiB{note}"
    lines = [f"plan: {human(p.parameters)} parameters on {p.nproc} x {g.key} "
             f"({g.memory_gib:.1f} GiB, {g.bf16_tflops:g} TFLOP/s dense bf16) | {precision(cfg)} | {mode} "
             f"(optimizer.zero_stage {zero}) | recompute: {p.recompute} ({p.recompute_reason})",
             f"batch {t.micro_batch_size} x {t.sequence_length} tokens x {p.accumulation} accumulation x {p.nproc} "
             f"GPU(s) = {p.tokens_per_step:,} tokens/step",
             "memory per GPU (at the peak, the loss path and one layer's backward come one after the other):"]
    for name, n in p.memory.items():
        note = ""
        if name == "activations kept":
            note = "   (" + others({m: f"{n / GiB:.2f} GiB" for m, n in p.activations.items()}) + ")"
        elif name == "loss path (chunked)":
            note = f"   (the final norm; the logits {LOSS_CHUNK_TOKENS} positions at a time)"
        elif name == "one layer's backward" and p.recompute != "none":
            note = "   (rebuilt from what it kept)"
        elif name == "autocast weight copies" and p.recompute != "none":
            note = "   (one layer's and the head's at a time)"
        lines.append(row(name, n, note))
    lines += [row("peak", p.peak, f" of {p.usable / GiB:.1f} usable: " + ("fits" if p.fits else "DOES NOT FIT")),
              row("samples' KV cache", p.kv_cache, "   (after a step, when activations are gone)"),
              f"largest micro-batch that fits: {p.largest[p.recompute] or 'none'} (recompute {p.recompute}; "
              + others({m: n or "none" for m, n in p.largest.items()}) + ")"]
    cost = (f", ${p.seconds / 3600 * p.nproc * p.price_per_gpu_hour:,.0f} at ${p.price_per_gpu_hour:g}/GPU-hour"
            if p.price_per_gpu_hour is not None else "; --price_per_gpu_hour gives the cost")
    lines.append(f"at {100 * p.mfu:.0f}% MFU: {human(p.tokens_per_s)} tokens/s, {t.train_steps} steps in "
                 f"{duration(p.seconds)}{cost}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """train.py's --plan flags."""
    parser.add_argument("--plan", action="store_true", help="print memory, fit, time and cost for the config; no "
                        "training, no data, no weights allocated")
    parser.add_argument("--gpu", default="a10g", help=f"with --plan: {', '.join(g.key for g in GPUS)}")
    parser.add_argument("--nproc", type=int, default=1, help="with --plan: number of GPUs (processes)")
    parser.add_argument("--price_per_gpu_hour", type=float, default=None, help="with --plan: for the cost, in $")
    parser.add_argument("--mfu", type=float, default=0.4, help="with --plan: model FLOPs utilisation to assume")


def report(cfg: Config, args: argparse.Namespace, explicit_accumulation: bool = False) -> str:
    return format_plan(plan(cfg, args.gpu, args.nproc, args.price_per_gpu_hour, args.mfu, explicit_accumulation))
