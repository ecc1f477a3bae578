"""Training throughput and peak memory: our SmolLM2 vs transformers' LlamaForCausalLM (SDPA), same shapes.

    python bench/bench_train.py                         # 135M and tiny shapes, CPU, fp32
    python bench/bench_train.py --shapes tiny --steps 20 --batch 8 --seq 256

Each (model, shape) runs in its own subprocess so that peak RSS (CPU) or peak allocated memory (GPU) belongs to that
model alone; both run the same optimizer step (forward, backward, AdamW) on the same random tokens, one after the
other in this one invocation, and the ratio ours/HF is printed. Weights are shared: HF loads our state dict.
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

SHAPES = {"135M": "config_smollm2_135M.yaml", "tiny": "config_tiny.yaml"}


def measure(impl: str, shape: str, steps: int, batch: int, seq: int, device: str, dtype: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from model import SmolLM2
    from smollm2.config_load import load_config

    torch.manual_seed(0)
    cfg = load_config(os.path.join(ROOT, SHAPES[shape])).model.model_config
    model = SmolLM2(cfg)
    if impl == "hf":
        hf_cfg = LlamaConfig(**{k: getattr(cfg, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings")},
            attn_implementation="sdpa")
        hf = LlamaForCausalLM(hf_cfg)
        hf.load_state_dict(model.state_dict())
        model = hf
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step():
        with autocast:
            if impl == "hf":
                loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss   # HF shifts labels itself
            else:
                loss = model(x[:, :-1], x[:, 1:])[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    mem = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"tok_per_s": steps * batch * seq / seconds, "peak_mem_gb": mem / 1e9}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["135M", "tiny"], choices=list(SHAPES))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--child", nargs=2, metavar=("IMPL", "SHAPE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a.child[0], a.child[1], a.steps, a.batch, a.seq, a.device, a.dtype)))
        return
    print(f"training step (forward + backward + AdamW), batch {a.batch} x {a.seq} tokens, {a.device}, {a.dtype}, "
          f"{a.steps} timed steps after 2 warm-up steps")
    print(f"{'shape':>6} | {'ours tok/s':>10} | {'HF tok/s':>10} | {'ratio':>5} | {'ours peak GB':>12} | {'HF peak GB':>10}")
    for shape in a.shapes:
        res = {}
        for impl in ("ours", "hf"):
            cmd = [sys.executable, __file__, "--child", impl, shape, "--steps", str(a.steps), "--batch", str(a.batch),
                   "--seq", str(a.seq), "--device", a.device, "--dtype", a.dtype]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res[impl] = json.loads(out.strip().splitlines()[-1])
        o, h = res["ours"], res["hf"]
        print(f"{shape:>6} | {o['tok_per_s']:>10.0f} | {h['tok_per_s']:>10.0f} | {o['tok_per_s'] / h['tok_per_s']:>5.2f} | "
              f"{o['peak_mem_gb']:>12.2f} | {h['peak_mem_gb']:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
