"""Decode speed: our generate() against transformers' generate() on the same weights, greedy, on the CPU.

    python bench/bench_generate.py                                # 135M shape, batch 1 and 8, 64 new tokens
    python bench/bench_generate.py --batches 1 --new_tokens 32 --repeats 3

Both run in this one process on the same random weights (the 135M shape of config_smollm2_135M.yaml; HF loads our
state dict), the same 32-token prompt and the same number of new tokens (HF's EOS is switched off so it never stops
early). Decode tokens/s leaves the prefill out: each side is timed generating 1 and N new tokens, and the rate is
batch x (N - 1) / (t_N - t_1). Runs alternate between the contenders and each time is the best of --repeats, so a
busy machine slows all of them alike. "ours" is the command line's path: generate() on a model in decode layout;
"ours, training layout" is the same without use_decode_layout(), to show what the layout is worth.
"""

import argparse
import os
import sys
import time
from dataclasses import asdict

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import load_config   # noqa: E402
from sampling import SamplingParams, generate, use_decode_layout   # noqa: E402
from model import SmolLM2   # noqa: E402

PROMPT_TOKENS = 32


def contenders(config_path: str) -> dict:
    """name -> fn(prompt (B, T), new_tokens) -> new token ids, all holding the same weights."""
    cfg = load_config(config_path)
    mc = cfg.model.model_config
    torch.manual_seed(0)
    plain = SmolLM2(mc, cfg.model.init_method.std).eval()
    ours = SmolLM2(mc).eval()
    ours.load_state_dict(plain.state_dict())
    use_decode_layout(ours)
    hf = LlamaForCausalLM(LlamaConfig(**asdict(mc), attn_implementation="sdpa")).eval()
    hf.load_state_dict(plain.state_dict())
    hf.generation_config.eos_token_id = None

    def run_ours(model):
        return lambda prompt, n: generate(model, prompt.tolist(), SamplingParams(max_new_tokens=n, temperature=0))

    @torch.inference_mode()
    def run_hf(prompt, n):
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                          pad_token_id=0)
        return out[:, prompt.shape[1]:].tolist()

    return {"ours": run_ours(ours), "ours, training layout": run_ours(plain), "transformers": run_hf}


def measure(fns: dict, batch: int, new_tokens: int, repeats: int, vocab_size: int) -> dict:
    """name -> (decode tok/s, end-to-end tok/s, new tokens of the last run)."""
    prompt = torch.randint(1, vocab_size, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(batch))
    best = {name: {1: float("inf"), new_tokens: float("inf")} for name in fns}
    tokens = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            for n in (1, new_tokens):
                t0 = time.perf_counter()
                tokens[name] = fn(prompt, n)
                best[name][n] = min(best[name][n], time.perf_counter() - t0)
    return {name: (batch * (new_tokens - 1) / (t[new_tokens] - t[1]), batch * new_tokens / t[new_tokens],
                   tokens[name]) for name, t in best.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "config_smollm2_135M.yaml"))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    fns = contenders(args.config)
    vocab_size = load_config(args.config).model.model_config.vocab_size
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; {PROMPT_TOKENS}-token prompt, "
          f"{args.new_tokens} new tokens, greedy, best of {args.repeats}")
    print(f"{'batch':>5}  {'contender':<22} {'decode tok/s':>12} {'end-to-end tok/s':>16}  {'vs transformers':>15}  "
          "same tokens")
    for batch in args.batches:
        results = measure(fns, batch, args.new_tokens, args.repeats, vocab_size)
        ref_rate, _, ref_tokens = results["transformers"]
        for name, (rate, e2e, tokens) in results.items():
            print(f"{batch:>5}  {name:<22} {rate:>12.1f} {e2e:>16.1f}  {rate / ref_rate:>14.2f}x  "
                  f"{'yes' if tokens == ref_tokens else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
