"""The GPU check: training speed, memory against the planner, the attention kernel, SFT, the loss, decoding.

    python bench/bench_gpu.py                      # every row, on one GPU, in under 8 minutes
    python bench/bench_gpu.py --only train,loss    # some rows: train, kernels, loss, sft, decode
    python bench/bench_gpu.py --dry                # every row's code on the CPU at a tiny shape, in under 5 minutes:
                                                   # proves the script runs, measures nothing meaningful

Rows, each measured in a child process of its own (its own timeout, its own peak memory):
- train: the 135M shape at micro-batch 8 and at the largest the planner allows (selective recompute on this GPU's
  memory), ours and transformers' LlamaForCausalLM (SDPA) on the same weights, eager and compiled: tokens/s, MFU,
  peak allocated and reserved GiB beside the planner's prediction for the recompute mode run.recompute auto takes.
  A step is forward + backward + clip + AdamW (fused on CUDA) under bf16 autocast, on random tokens, after warm-up
  steps (which also absorb compilation). MFU = tokens/s x training FLOPs per token / the dense bf16 peak
  (smollm2/metrics.py's GPUS).
- kernels: the attention kernels torch.profiler saw in one forward + backward of ours (flash, efficient, cudnn,
  math, flex), whatever model.py's dispatch meant to call.
- loss: ours and transformers' loss on the same weights and batch, in fp32 and under bf16 autocast.
- sft: one packed SFT step (three conversations per row, model.py's `segments`).
- decode: smollm2/sampling.py's generate, compiled, bf16, batch 1 and 8.
The whole run keeps to BUDGET_S (8 minutes; 5 with --dry): a row that would start past it is reported as skipped.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BUDGET_S = {False: 470, True: 280}   # on the GPU 8 minutes, --dry 5 minutes, less what starting and printing take
ROWS = ("train", "kernels", "loss", "sft", "decode")
ATTENTION = ("flash", "efficient", "cudnn", "math", "flex", "attention")


def setting(dry: bool):
    """(config, device, steps, warm-up) of a run: the 135M shape on the GPU, the tiny one on the CPU."""
    import torch

    from smollm2.config_load import load_config
    cfg = load_config(os.path.join(ROOT, "config_tiny.yaml" if dry else "config_smollm2_135M.yaml"),
                      ["tokens.sequence_length=64", "tokens.micro_batch_size=2", "model.model_config.vocab_size=1024"]
                      if dry else [])
    return cfg, torch.device("cpu" if dry else "cuda"), (2, 1) if dry else (6, 2)


def this_gpu(device):
    """The planner's view of this device: what it reports on a GPU; on the CPU (dry) the table's A10G."""
    import torch

    from smollm2.metrics import GPU, gpu_by_name
    from smollm2.planner import find_gpu
    if device.type != "cuda":
        return find_gpu("a10g")
    name, known = torch.cuda.get_device_name(device), gpu_by_name(torch.cuda.get_device_name(device))
    total = torch.cuda.get_device_properties(device).total_memory // 2 ** 20
    return GPU("this", name, total, known.bf16_tflops if known else 0.0)


def micro_batches(cfg, gpu, dry: bool) -> dict[str, int]:
    from smollm2.planner import largest_micro_batch
    largest = largest_micro_batch(cfg, 1, gpu, "selective")
    return {"8": 2 if dry else 8, "largest": min(largest, 4) if dry else largest}


def hf_twin(model, cfg):
    """transformers' LlamaForCausalLM (SDPA) holding our weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    hf = LlamaForCausalLM(LlamaConfig(**{k: getattr(cfg, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings")},
        attn_implementation="sdpa"))
    hf.load_state_dict(model.state_dict())
    return hf


def loss_fn(impl: str):
    if impl == "hf":
        return lambda m, x, **kw: m(input_ids=x[:, :-1], labels=x[:, :-1]).loss   # HF shifts the labels itself
    return lambda m, x, **kw: m(x[:, :-1], x[:, 1:], **kw)[1]


def peaks(device) -> tuple[float, float]:
    """(allocated, reserved) peak GiB on a GPU; the process's peak resident memory twice on the CPU."""
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30, torch.cuda.max_memory_reserved(device) / 2 ** 30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30
    return rss, rss


def timed_steps(net, params, tokens, steps: int, warmup: int, device, loss_of, **kw) -> float:
    """Seconds per optimizer step, after `warmup` untimed steps; peak memory counted from the first step."""
    import torch
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda" or None)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_of(net, tokens, **kw)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def our_model(cfg, device, recompute: str = "none"):
    import torch

    from model import SmolLM2
    torch.manual_seed(0)
    model = SmolLM2(cfg.model.model_config)
    model.gradient_checkpointing, model.selective_recompute = recompute == "full", recompute == "selective"
    return model.to(device).train()


def train_row(impl: str, mode: str, which: str, dry: bool) -> dict:
    """One training measurement: ours or transformers', eager or compiled, at micro-batch `which` (8 or largest)."""
    import torch

    from smollm2 import planner
    from smollm2.metrics import flops_per_token
    cfg, device, (steps, warmup) = setting(dry)
    gpu = this_gpu(device)
    B, T, mc = micro_batches(cfg, gpu, dry)[which], cfg.tokens.sequence_length, cfg.model.model_config
    plans = {m: planner.memory(cfg, 1, B, m)[1] for m in planner.RECOMPUTE}
    recompute, why = planner.resolve_recompute("auto", plans, planner.usable_bytes(gpu))
    model = our_model(cfg, device, recompute)
    if impl == "hf":   # transformers has no selective recompute: whole layers, or nothing
        recompute = "full" if recompute == "full" else "none"
        model = hf_twin(model, mc).to(device).train()
        if recompute == "full":
            model.gradient_checkpointing_enable()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    net = model if mode == "eager" else torch.compile(model, backend="aot_eager" if dry else "inductor")
    tokens = torch.randint(0, mc.vocab_size, (B, T + 1), device=device)
    seconds = timed_steps(net, list(model.parameters()), tokens, steps, warmup, device, loss_fn(impl))
    tok_s, (allocated, reserved) = B * T / seconds, peaks(device)
    mfu = tok_s * flops_per_token(mc, T) / (gpu.bf16_tflops * 1e12) if gpu.bf16_tflops and not dry else None
    return {"batch": f"{B} x {T}", "tok_s": tok_s, "mfu": mfu, "allocated": allocated, "reserved": reserved,
            "planned": plans[recompute] / 2 ** 30, "recompute": recompute, "why": why if impl == "ours" else ""}


def kernels_row(dry: bool) -> dict:
    """The attention kernels one profiled forward + backward of ours ran, by name."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    cfg, device, _ = setting(dry)
    model = our_model(cfg, device)
    tokens = torch.randint(0, cfg.model.model_config.vocab_size, (2, cfg.tokens.sequence_length + 1), device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn("ours")(model, tokens)
        loss.backward()
    names = sorted({e.key for e in prof.key_averages() if any(k in e.key.lower() for k in ATTENTION)})
    return {"kernels": names}


def loss_row(dry: bool) -> dict:
    """Ours and transformers' loss on the same weights and batch, fp32 and bf16 autocast."""
    import torch
    cfg, device, _ = setting(dry)
    model = our_model(cfg, device).eval()
    hf = hf_twin(model, cfg.model.model_config).to(device).eval()
    tokens = torch.randint(0, cfg.model.model_config.vocab_size, (2, cfg.tokens.sequence_length + 1), device=device)
    out = {}
    with torch.no_grad():
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                ours = loss_fn("ours")(model, tokens).item()
                # the same T predictions: transformers shifts labels itself, so it reads all T + 1 tokens
                theirs = hf(input_ids=tokens, labels=tokens).loss.item()
            out[name] = {"ours": ours, "hf": theirs, "diff": abs(ours - theirs)}
    return out


def sft_row(dry: bool) -> dict:
    """One packed SFT step: three conversations per row, each attending only to itself (model.py's segments)."""
    import torch
    cfg, device, _ = setting(dry)
    model, B, T = our_model(cfg, device, "selective"), 8 if not dry else 2, cfg.tokens.sequence_length
    tokens = torch.randint(0, cfg.model.model_config.vocab_size, (B, T + 1), device=device)
    segments = (torch.arange(T, device=device) * 3 // T).expand(B, T)
    seconds = timed_steps(model, list(model.parameters()), tokens, 1, 1, device, loss_fn("ours"), segments=segments)
    return {"batch": f"{B} x {T}", "tok_s": B * T / seconds, "allocated": peaks(device)[0]}


def decode_row(dry: bool) -> dict:
    """smollm2/sampling.py's generate, compiled (the decode step), bf16 weights, batch 1 and 8."""
    import torch

    from smollm2.sampling import SamplingParams, generate
    cfg, device, _ = setting(dry)
    model = our_model(cfg, device).to(torch.bfloat16).eval()
    new = 8 if dry else 128
    out = {}
    for batch in (1, 8):
        prompts = torch.randint(0, cfg.model.model_config.vocab_size, (batch, 32)).tolist()
        params = SamplingParams(max_new_tokens=new, temperature=0.0)
        generate(model, prompts, params, compile=True)   # compiles; not timed
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = generate(model, prompts, params, compile=True)
        out[str(batch)] = sum(len(o) for o in outs) / (time.perf_counter() - t0)
    return out


def children(only: list[str]) -> list[tuple[str, list[str]]]:
    """(label, child arguments) of each measurement the rows asked for make."""
    jobs = []
    for row in only:
        if row == "train":
            jobs += [(f"train {impl} {mode} {which}", ["train", impl, mode, which])
                     for which in ("8", "largest") for impl in ("ours", "hf") for mode in ("eager", "compiled")]
        else:
            jobs.append((row, [row]))
    return jobs


def run_child(args: list[str], dry: bool, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *args] + (["--dry"] if dry else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:160]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def line(label: str, r: dict) -> str:
    if "error" in r:
        return f"{label:<32} | failed: {r['error']}"
    if label.startswith("train"):
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        return (f"{label:<32} | {r['batch']:>10} | {r['tok_s']:>9,.0f} tok/s | MFU {mfu:>6} | {r['allocated']:5.1f} "
                f"allocated, {r['reserved']:5.1f} reserved, {r['planned']:5.1f} planned GiB | recompute "
                f"{r['recompute']}" + (f" ({r['why']})" if r["why"] else ""))
    if label == "kernels":
        return f"{label:<32} | " + (", ".join(r["kernels"]) or "no attention kernel seen")
    if label == "loss":
        return f"{label:<32} | " + " | ".join(f"{k}: ours {v['ours']:.6f}, transformers {v['hf']:.6f}, "
                                              f"|diff| {v['diff']:.1e}" for k, v in r.items())
    if label == "sft":
        return f"{label:<32} | {r['batch']:>10} | {r['tok_s']:>9,.0f} tok/s | {r['allocated']:5.1f} allocated GiB"
    return f"{label:<32} | " + " | ".join(f"batch {b}: {t:,.1f} tok/s" for b, t in r.items())


def child_main(args: list[str], dry: bool) -> None:
    row, rest = args[0], args[1:]
    result = train_row(*rest, dry=dry) if row == "train" else globals()[f"{row}_row"](dry)
    print(json.dumps(result), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(ROWS), help=f"rows, comma-separated: {', '.join(ROWS)}")
    p.add_argument("--timeout", type=float, default=150, help="seconds each child may take")
    p.add_argument("--dry", action="store_true", help="CPU, tiny shape: checks the script, measures nothing")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child_main(a.child, a.dry)
    only = a.only.split(",")
    if unknown := [r for r in only if r not in ROWS]:
        sys.exit(f"--only {','.join(unknown)}: unknown row; rows are {', '.join(ROWS)}")
    start, budget = time.perf_counter(), BUDGET_S[a.dry]
    print(f"{'dry run on the CPU, tiny shape (measures nothing)' if a.dry else 'GPU check'}: "
          f"bf16 autocast, forward+backward+clip+AdamW; rows {', '.join(only)}", flush=True)
    for label, args in children(only):
        left = budget - (time.perf_counter() - start)
        if left < 20:
            print(f"{label:<32} | skipped: the {budget} s budget is spent", flush=True)
            continue
        print(line(label, run_child(args, a.dry, min(a.timeout, left))), flush=True)
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
