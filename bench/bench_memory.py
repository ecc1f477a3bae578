"""Peak memory of one training step: our SmolLM2 (chunked loss) vs transformers' LlamaForCausalLM (SDPA).

    flock /tmp/heavy.lock python bench/bench_memory.py              # 135M at T=2048, B=1 and 2; tiny; fp32 and bf16
    python bench/bench_memory.py --shapes tiny --batch 8 --seq 256 --dtypes fp32

One step is forward + backward + AdamW step + zero_grad, on the same random tokens and the same weights (HF loads
our state dict). Each (model, shape, batch, dtype) runs in its own subprocess, so a peak belongs to that run alone.

What is measured. Before the step, the weights and AdamW's two moments already exist (the optimizer has taken one
step on zero gradients), and gradients do not (set_to_none). `before` is the memory resident then; `peak` is the
high-water mark during the measured step; `step adds` = peak - before: the gradients, every activation autograd
keeps, the loss path and the optimizer's temporaries. On the CPU, memory is the process's resident set: the
high-water mark (VmHWM) is reset through /proc/self/clear_refs just before the step, and glibc is told to hand
every allocation of 256 kB or more straight back to the OS on free (MALLOC_MMAP_THRESHOLD_), so the resident set
follows the live tensors instead of the allocator's free lists; `before` also holds the interpreter and the torch
libraries (~0.3-0.5 GB), the same for both. On a GPU, the figures are torch.cuda's allocated bytes.
"""

import argparse
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = {"135M": "config_smollm2_135M.yaml", "tiny": "config_tiny.yaml"}
MMAP_THRESHOLD = str(256 * 1024)


def resident_gb() -> tuple[float, float]:
    """(current, high-water mark) resident set of this process, in GB (Linux /proc)."""
    status = open("/proc/self/status").read()
    kb = {key: int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) for key in ("VmRSS", "VmHWM")}
    return kb["VmRSS"] * 1024 / 1e9, kb["VmHWM"] * 1024 / 1e9


def build(impl: str, shape: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from model import SmolLM2
    from smollm2.config_load import load_config

    cfg = load_config(os.path.join(ROOT, SHAPES[shape])).model.model_config
    model = SmolLM2(cfg)
    if impl == "hf":
        hf = LlamaForCausalLM(LlamaConfig(**{k: getattr(cfg, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings")},
            attn_implementation="sdpa"))
        hf.load_state_dict(model.state_dict())
        model = hf
    return model, cfg


def measure(impl: str, shape: str, batch: int, seq: int, device: str, dtype: str) -> dict:
    import torch

    torch.manual_seed(0)
    model, cfg = build(impl, shape)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():   # one step on zero gradients allocates AdamW's moments
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 1e9
    else:
        with open("/proc/self/clear_refs", "w") as f:   # "5": reset the high-water mark to the current RSS
            f.write("5")
        before = resident_gb()[0]
    with autocast:
        if impl == "hf":
            loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss   # HF shifts the labels itself
        else:
            loss = model(x[:, :-1], x[:, 1:])[1]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else resident_gb()[1]
    return {"before_gb": before, "peak_gb": peak, "step_gb": peak - before}


def run_child(impl: str, shape: str, batch: int, seq: int, device: str, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, shape, "--batch", str(batch), "--seq", str(seq),
           "--device", device, "--dtypes", dtype]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["135M", "tiny"], choices=list(SHAPES))
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="micro-batch sizes (default: 1 and 2 at 135M, the tiny config's 8 at tiny)")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default: 2048 at 135M, 256 at tiny)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", nargs=2, metavar=("IMPL", "SHAPE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a.child[0], a.child[1], a.batch[0], a.seq, a.device, a.dtypes[0])))
        return
    print(f"one training step (forward + backward + AdamW), {a.device}; GB; 'before' = weights + AdamW moments "
          f"(+ libraries on the CPU), 'adds' = peak - before")
    print(f"{'shape':>5} | {'batch x seq':>11} | {'dtype':>5} | {'ours before':>11} | {'ours peak':>9} | "
          f"{'ours adds':>9} | {'HF before':>9} | {'HF peak':>7} | {'HF adds':>7} | {'peak ratio':>10} | "
          f"{'adds ratio':>10}")
    for shape in a.shapes:
        seq = a.seq or (2048 if shape == "135M" else 256)
        for batch in a.batch or ([1, 2] if shape == "135M" else [8]):
            for dtype in a.dtypes:
                o, h = (run_child(impl, shape, batch, seq, a.device, dtype) for impl in ("ours", "hf"))
                print(f"{shape:>5} | {f'{batch} x {seq}':>11} | {dtype:>5} | {o['before_gb']:>11.2f} | "
                      f"{o['peak_gb']:>9.2f} | {o['step_gb']:>9.2f} | {h['before_gb']:>9.2f} | {h['peak_gb']:>7.2f} | "
                      f"{h['step_gb']:>7.2f} | {o['peak_gb'] / h['peak_gb']:>10.2f} | "
                      f"{o['step_gb'] / h['step_gb']:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
