"""Decode speed: our generate() against transformers' generate() on the same weights, greedy, on the CPU.

    python bench/bench_generate.py                                # 135M shape, batch 1 and 8, 64 new tokens
    python bench/bench_generate.py --batches 1 2 4 8 --no_compile --repeats 5

Every contender runs in this one process on the same random weights (the 135M shape of config_smollm2_135M.yaml;
HF loads our state dict), the same 32-token prompt and the same number of new tokens (HF's EOS is switched off so it
never stops early). Decode tokens/s leaves the prefill out: each side is timed generating 1 and N new tokens, and
the rate is batch x (N - 1) / (t_N - t_1). Runs alternate between the contenders and each time is the best of
--repeats, so a busy machine slows all of them alike.

The contenders: transformers, and transformers with torchao's int8 weight-only quantization (`quantize_` with
`Int8WeightOnlyConfig`, the peer a user of transformers reaches for on a CPU; `pip install -r bench/requirements.txt`,
left out with the reason when torchao cannot be imported), our fp32 model in each weight layout ("row-major" is the layout training leaves, "column-major" the
re-laid one, "packed" oneDNN's blocked copy; `*` marks the one smollm2/sampling.py's decode_layout measures fastest
for the batch, which generate.py and the app use), our int8 model (smollm2/quantize.py), and, where inductor can build
CPU code, both of ours with the decode step compiled (the compile time is printed, not counted). "tokens" compares
each contender's greedy tokens with transformers': fp32 must be identical; int8 gives the share of tokens equal up to
the first difference (bench/bench_quantize.py measures int8's quality properly).
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

from model import SmolLM2  # noqa: E402
from smollm2.config_load import load_config  # noqa: E402
from smollm2.quantize import quantize_model  # noqa: E402
from smollm2.sampling import LAYOUTS, SamplingParams, compile_unavailable, decode_layout, generate, lay_out  # noqa: E402

PROMPT_TOKENS = 32


def our_models(config_path: str) -> tuple[SmolLM2, dict]:
    """The fp32 model (random weights, training init) and name -> a model of ours holding the same weights."""
    cfg = load_config(config_path)
    mc = cfg.model.model_config
    torch.manual_seed(0)
    fp32 = SmolLM2(mc, cfg.model.init_method.std).eval()

    def twin() -> SmolLM2:
        model = SmolLM2(mc).eval()
        model.load_state_dict(fp32.state_dict())
        return model
    ours = {"fp32 row-major": fp32, "fp32 column-major": lay_out(twin(), "column")}
    if "packed" in LAYOUTS:
        ours["fp32 packed"] = lay_out(twin(), "packed")
    ours["int8"] = quantize_model(twin(), "int8")
    return fp32, ours


def transformers_twin(model: SmolLM2) -> LlamaForCausalLM:
    hf = LlamaForCausalLM(LlamaConfig(**asdict(model.config), attn_implementation="sdpa")).eval()
    hf.load_state_dict(model.state_dict())
    hf.generation_config.eos_token_id = None
    return hf


def torchao_twin(model: SmolLM2):
    """transformers' model with torchao's int8 weight-only Linear weights, or the reason it cannot be built here."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        return f"no transformers + torchao contender ({e}; pip install -r bench/requirements.txt)"
    hf = transformers_twin(model)
    quantize_(hf, Int8WeightOnlyConfig())
    return hf


def hf_runner(hf: LlamaForCausalLM):
    @torch.inference_mode()
    def run(prompt, n):
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                          pad_token_id=0)
        return out[:, prompt.shape[1]:].tolist()
    return run


def contenders(fp32: SmolLM2, ours: dict, batch: int, compiled: bool, torchao) -> dict:
    """name -> fn(prompt (B, T), new_tokens) -> new token ids, for this batch size."""
    chosen = {"row": "fp32 row-major", "column": "fp32 column-major", "packed": "fp32 packed"}[
        decode_layout(fp32, batch)]

    def run_ours(model, compile=False):
        return lambda prompt, n: generate(model, prompt.tolist(), SamplingParams(max_new_tokens=n, temperature=0),
                                          compile=compile)

    fns = {"transformers": hf_runner(transformers_twin(fp32))}
    if not isinstance(torchao, str):
        fns["transformers + torchao"] = hf_runner(torchao)
    fns.update({name + (" *" if name == chosen else ""): run_ours(model) for name, model in ours.items()})
    if compiled:
        fns["fp32 compiled *"] = run_ours(ours[chosen], compile=True)
        fns["int8 compiled"] = run_ours(ours["int8"], compile=True)
    return fns


def warm_up(fns: dict, prompt: torch.Tensor) -> None:
    """One short run each, so first-call costs (and compilation, timed here) stay out of the measurement."""
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn(prompt, 3)
        if "compiled" in name:
            print(f"       ({name}: compiled in {time.perf_counter() - t0:.0f} s, not counted)", flush=True)


def measure(fns: dict, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """name -> (decode tok/s, end-to-end tok/s, new tokens of the last run)."""
    batch = prompt.shape[0]
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


def agreement(tokens: list, ref: list) -> str:
    """'same' when every row is identical, else the share of tokens equal before each row's first difference."""
    if tokens == ref:
        return "same"
    prefix = sum(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(tokens, ref))
    return f"{prefix}/{sum(len(r) for r in ref)} before a difference"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "config_smollm2_135M.yaml"))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads for every contender (default: torch's choice)")
    ap.add_argument("--no_compile", action="store_true", help="leave out the compiled contenders (slow to build)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    fp32, ours = our_models(args.config)
    torchao = torchao_twin(fp32)
    why_not = None if args.no_compile else compile_unavailable(torch.device("cpu"))
    compiled = not args.no_compile and why_not is None
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; {PROMPT_TOKENS}-token prompt, "
          f"{args.new_tokens} new tokens, greedy, best of {args.repeats}"
          + (f"; no compiled contenders: {why_not}" if why_not else "")
          + (f"; {torchao}" if isinstance(torchao, str) else ""))
    print(f"{'batch':>5}  {'contender':<22} {'decode tok/s':>12} {'end-to-end':>10}  {'vs transformers':>15}  "
          f"{'vs ours fp32 *':>14}  tokens vs transformers")
    for batch in args.batches:
        prompt = torch.randint(1, fp32.config.vocab_size, (batch, PROMPT_TOKENS),
                               generator=torch.Generator().manual_seed(batch))
        fns = contenders(fp32, ours, batch, compiled, torchao)
        warm_up(fns, prompt)
        results = measure(fns, prompt, args.new_tokens, args.repeats)
        ref_rate, _, ref_tokens = results["transformers"]
        ours_rate = next(rate for name, (rate, _, _) in results.items() if name.startswith("fp32") and "*" in name)
        for name, (rate, e2e, tokens) in results.items():
            print(f"{batch:>5}  {name:<22} {rate:>12.1f} {e2e:>10.1f}  {rate / ref_rate:>14.2f}x  "
                  f"{rate / ours_rate:>13.2f}x  {agreement(tokens, ref_tokens)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
