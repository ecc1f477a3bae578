"""Training speed and memory on a GPU: tokens/s, MFU and peak memory of real training steps.

    python bench/bench_gpu.py                      # 135M at its config's micro-batch: ours vs transformers,
                                                   # eager and compiled; then 1.7B under FSDP on every visible GPU
    python bench/bench_gpu.py --skip_fsdp --steps 20
    python bench/bench_gpu.py --dry                # the same code on the CPU at the tiny shape (gloo for FSDP):
                                                   # proves the script runs, measures nothing meaningful

A step is forward + backward + clip + AdamW (fused on CUDA) under bf16 autocast, on random tokens, after warm-up
steps (which also absorb compilation). MFU = tokens/s x training FLOPs per token / the GPU's dense bf16 peak
(smollm2/metrics.py's GPUS table, from the vendors' data sheets). Each measurement runs in its own process, so peak
memory (torch.cuda.max_memory_allocated) belongs to it alone. The FSDP part runs train.py's own wrapping
(smollm2/distributed.py's wrap: optimizer.zero_stage, parallelism.recompute_layer and run.selective_recompute from
the 1.7B config) under torchrun.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def hf_twin(model, cfg):
    """transformers' LlamaForCausalLM (SDPA) holding our weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    hf = LlamaForCausalLM(LlamaConfig(**{k: getattr(cfg, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings")},
        attn_implementation="sdpa"))
    hf.load_state_dict(model.state_dict())
    return hf


def timed_steps(net, params, tokens, steps: int, warmup: int, device, loss_of) -> float:
    """Seconds per optimizer step, after `warmup` untimed steps."""
    import torch
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda" or None)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_of(net, tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def single(impl: str, compiled: bool, config: str, steps: int, warmup: int) -> dict:
    """One process, one device: our model (ours-stored: with run.selective_recompute off) or transformers', eager
    or compiled, at the config's micro-batch."""
    import torch

    from model import SmolLM2
    from smollm2.config_load import load_config
    from smollm2.metrics import flops_per_token, peak_flops
    from smollm2.runtime import memory_gb
    cfg = load_config(os.path.join(ROOT, config))
    mc, B, T = cfg.model.model_config, cfg.tokens.micro_batch_size, cfg.tokens.sequence_length
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = SmolLM2(mc)
    model.gradient_checkpointing = cfg.parallelism.recompute_layer
    model.selective_recompute = cfg.run.selective_recompute and impl != "ours-stored"
    if impl == "hf":
        model = hf_twin(model, mc)
        if cfg.parallelism.recompute_layer:
            model.gradient_checkpointing_enable()
    model.to(device).train()
    net = torch.compile(model) if compiled else model
    tokens = torch.randint(0, mc.vocab_size, (B, T + 1), device=device)
    if impl == "hf":
        def loss_of(m, x):
            return m(input_ids=x[:, :-1], labels=x[:, :-1]).loss   # HF shifts the labels itself
    else:
        def loss_of(m, x):
            return m(x[:, :-1], x[:, 1:])[1]
    seconds = timed_steps(net, list(model.parameters()), tokens, steps, warmup, device, loss_of)
    tok_s = B * T / seconds
    peak, _ = peak_flops(device)
    return {"tok_s": tok_s, "mfu": tok_s * flops_per_token(mc, T) / peak if peak else None,
            "mem_gb": memory_gb(device), "batch": f"{B} x {T}"}


def fsdp(config: str, steps: int, warmup: int, zero_stage) -> dict:
    """Under torchrun: train.py's wrapping of the model (DDP or FSDP by optimizer.zero_stage), every rank's step."""
    import torch
    import torch.distributed as dist

    from model import SmolLM2
    from smollm2 import distributed
    from smollm2.config_load import load_config
    from smollm2.metrics import flops_per_token, peak_flops
    from smollm2.runtime import memory_gb, setup_runtime
    overrides = ["run.precision=bf16"] + ([f"optimizer.zero_stage={zero_stage}"] if zero_stage is not None else [])
    cfg = load_config(os.path.join(ROOT, config), overrides)
    rt = setup_runtime(cfg)
    mc, B, T = cfg.model.model_config, cfg.tokens.micro_batch_size, cfg.tokens.sequence_length
    torch.manual_seed(0)
    model = SmolLM2(mc).to(rt.device)
    model.gradient_checkpointing = cfg.parallelism.recompute_layer
    model.selective_recompute = cfg.run.selective_recompute
    net = distributed.wrap(model, cfg, rt)
    tokens = torch.randint(0, mc.vocab_size, (B, T + 1), device=rt.device)
    seconds = timed_steps(net, list(model.parameters()), tokens, steps, warmup, rt.device,
                          lambda m, x: m(x[:, :-1], x[:, 1:])[1])
    tok_s = B * T * rt.world / seconds
    peak, _ = peak_flops(rt.device)
    mem = torch.tensor(memory_gb(rt.device), device=rt.device)
    if rt.world > 1:
        dist.all_reduce(mem, op=dist.ReduceOp.MAX)
        dist.destroy_process_group()
    return {"tok_s": tok_s, "mfu": tok_s * flops_per_token(mc, T) / (peak * rt.world) if peak else None,
            "mem_gb": mem.item(), "batch": f"{rt.world} x {B} x {T}", "how": distributed.describe(cfg, rt),
            "rank": rt.rank}


def child(cmd: list[str], env=None) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:160]}
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return next((r for r in rows if r.get("rank", 0) == 0), rows[-1])


def row(name: str, r: dict) -> str:
    if "error" in r:
        return f"{name:<28} | failed: {r['error']}"
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
    return f"{name:<28} | {r['batch']:>14} | {r['tok_s']:>10,.0f} | {mfu:>6} | {r['mem_gb']:>7.1f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="config_smollm2_135M.yaml")
    p.add_argument("--fsdp_config", default="configs/config_smollm2_1.7B.yaml")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--zero_stage", type=int, help="override the FSDP config's optimizer.zero_stage")
    p.add_argument("--skip_fsdp", action="store_true")
    p.add_argument("--dry", action="store_true", help="CPU, tiny shape: checks the script, measures nothing")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        impl, compiled = a.child.split(":")
        result = fsdp(a.fsdp_config, a.steps, a.warmup, a.zero_stage) if impl == "fsdp" else \
            single(impl, compiled == "1", a.config, a.steps, a.warmup)
        print(json.dumps(result), flush=True)
        return
    import torch
    if a.dry:
        a.config = a.fsdp_config = "config_tiny.yaml"
        a.steps, a.warmup, a.zero_stage = 2, 1, 1 if a.zero_stage is None else a.zero_stage
    elif not torch.cuda.is_available():
        sys.exit("bench_gpu.py measures CUDA GPUs and none is visible; `--dry` runs its code on the CPU")
    base = [sys.executable, __file__, "--config", a.config, "--fsdp_config", a.fsdp_config, "--steps", str(a.steps),
            "--warmup", str(a.warmup)] + (["--zero_stage", str(a.zero_stage)] if a.zero_stage is not None else [])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)"
    print(f"{device}: {a.steps} timed steps after {a.warmup} warm-up, bf16 autocast, forward+backward+clip+AdamW")
    print(f"{'what':<28} | {'batch':>14} | {'tok/s':>10} | {'MFU':>6} | {'peak GB':>7}")
    for impl in ("ours", "ours-stored", "hf"):   # ours-stored: run.selective_recompute off, what it costs
        for compiled in ("0", "1"):
            mode = "compiled" if compiled == "1" else "eager"
            name = f"{a.config.split('_')[-1].removesuffix('.yaml')} {impl} {mode}"
            print(row(name, child(base + ["--child", f"{impl}:{compiled}"])), flush=True)
    if not a.skip_fsdp:
        n = max(torch.cuda.device_count(), 1) if not a.dry else 2
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *base[1:],
               "--child", "fsdp:0"]
        r = child(cmd, env)
        name = f"{a.fsdp_config.split('_')[-1].removesuffix('.yaml')} on {n} device(s)"
        print(row(name, r) + (f" | {r['how']}" if "how" in r else ""), flush=True)


if __name__ == "__main__":
    main()
