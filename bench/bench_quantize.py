"""Quality of int8 decoding (smollm2/quantize.py) against fp32: perplexity on a text, greedy agreement over 64 tokens.

    python bench/bench_quantize.py                                           # 135M shape, random weights
    python bench/bench_quantize.py --checkpoint_path path/to/SmolLM2-135M --text some.txt    # real weights

With a checkpoint (anything generate.py loads) both models are that checkpoint, loaded as generate.py loads it
with and without --quantize int8, and the text is read with its tokenizer: the figures are the real ones.

Without one, the 135M shape gets random weights, and random weights are a weak proxy: a model that has learnt
nothing spreads its probability almost evenly, so its perplexity on any text is near the vocabulary size whatever
its weights, and the int8 ratio lands near 1 proving little. Two things make the measurement mean more. The weights
are validate_params.py's parity weights (unit-gain matrices, so every layer shapes the output and an int8 error
anywhere reaches the logits), with an embedding large enough (--logit_std) that the next-token distribution is as
peaked as a trained model's (the mean entropy is printed). And the text is the fp32 model's own samples: on them
fp32's perplexity is its entropy, and int8's is higher by how far its distribution departs from fp32's (the
log of the ratio estimates their KL divergence, which is also computed exactly, per position, with fp32's entropy
for scale: uniform is log(vocabulary), a trained model's a few nats). The text file is still measured, its UTF-8
bytes standing in for tokens. What a proxy cannot show is how int8 treats weights shaped by training (outlier
channels, for one): quote figures from a real checkpoint.
"""

import argparse
import math
import os
import sys
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model import SmolLM2  # noqa: E402
from smollm2.config_load import load_config  # noqa: E402
from smollm2.errors import (
    CheckpointError,  # noqa: E402
    InputError,  # noqa: E402
)
from smollm2.loading import load_model, open_tokenizer
from smollm2.quantize import quantize_model  # noqa: E402
from smollm2.sampling import SamplingParams, generate  # noqa: E402
from validate_params import parity_weights  # noqa: E402

GREEDY_TOKENS = 64


@torch.inference_mode()
def compare(fp32: SmolLM2, int8: SmolLM2, windows: torch.Tensor) -> dict:
    """Over windows (N, T), each predicting its tokens 1..T-1 from those before: both perplexities, the mean KL
    divergence KL(fp32 || int8) of the next-token distributions (nats), fp32's mean entropy, and how often the two
    models' most likely next tokens agree."""
    nll = {"fp32": 0.0, "int8": 0.0}
    kl = entropy = top1 = 0.0
    for w in windows:
        logp = {name: m(w[None, :-1])[0][0].float().log_softmax(-1) for name, m in (("fp32", fp32), ("int8", int8))}
        for name, lp in logp.items():
            nll[name] += -lp.gather(-1, w[1:, None]).mean().item()
        p = logp["fp32"].exp()
        kl += (p * (logp["fp32"] - logp["int8"])).sum(-1).mean().item()
        entropy += -(p * logp["fp32"]).sum(-1).mean().item()
        top1 += (logp["fp32"].argmax(-1) == logp["int8"].argmax(-1)).float().mean().item()
    n = len(windows)
    return {"ppl fp32": math.exp(nll["fp32"] / n), "ppl int8": math.exp(nll["int8"] / n), "kl": kl / n,
            "entropy": entropy / n, "top1": top1 / n}


def greedy_agreement(fp32: SmolLM2, int8: SmolLM2, prompts: list[list[int]]) -> str:
    """How many of the prompts' 64 greedy tokens int8 gets identical, and how far it goes before a first difference."""
    params = SamplingParams(max_new_tokens=GREEDY_TOKENS, temperature=0)
    a, b = generate(fp32, prompts, params), generate(int8, prompts, params)
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    prefix = [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), len(ra)) for ra, rb in zip(a, b)]
    return (f"{sum(p == len(r) for p, r in zip(prefix, a))}/{len(a)} prompts identical over {GREEDY_TOKENS} tokens; "
            f"{same}/{sum(map(len, a))} tokens equal; first difference after {sorted(prefix)} tokens")


def windows_of(ids: list[int], length: int, max_tokens: int) -> torch.Tensor:
    ids = ids[:max_tokens]
    n = len(ids) // length
    if n == 0:
        raise InputError(f"the text has {len(ids)} tokens, fewer than one window of {length}; give a longer --text")
    return torch.tensor(ids[:n * length]).view(n, length)


def report(name: str, fp32: SmolLM2, int8: SmolLM2, windows: torch.Tensor) -> None:
    r = compare(fp32, int8, windows)
    print(f"{name:<30} {windows.numel():>6} {r['ppl fp32']:>10.3f} {r['ppl int8']:>10.3f} "
          f"{100 * (r['ppl int8'] / r['ppl fp32'] - 1):>+7.2f}% {r['kl']:>9.5f} {r['entropy']:>8.2f} "
          f"{100 * r['top1']:>7.1f}%", flush=True)


def random_pair(config: str, logit_std: float, seed: int) -> tuple[SmolLM2, SmolLM2]:
    """Parity weights whose tied head gives logits of std ~logit_std: the final norm leaves the hidden state with
    norm ~sqrt(hidden), so each logit, its dot product with an embedding row, has std ~sqrt(hidden) x embedding std."""
    mc = load_config(config).model.model_config
    fp32 = SmolLM2(mc).eval()
    parity_weights(fp32, logit_std / mc.hidden_size ** 0.5, seed)
    int8 = SmolLM2(mc).eval()
    int8.load_state_dict(fp32.state_dict())
    return fp32, quantize_model(int8, "int8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint_path", help="real weights: a checkpoint, run directory or HF directory")
    ap.add_argument("--tokenizer", help="for --checkpoint_path (default: the one found with it)")
    ap.add_argument("--text", default=os.path.join(ROOT, "README.md"), help="text file for the perplexity")
    ap.add_argument("--config", default=os.path.join(ROOT, "config_smollm2_135M.yaml"), help="shape without weights")
    ap.add_argument("--logit_std", type=float, default=3.0, help="random weights: the spread of the logits, which "
                    "sets how peaked the next-token distribution is (the embedding gets std logit_std/sqrt(hidden))")
    ap.add_argument("--seq_len", type=int, default=256, help="tokens per perplexity window")
    ap.add_argument("--max_tokens", type=int, default=2048, help="tokens of the text measured")
    ap.add_argument("--prompts", type=int, default=8, help="prompts for the greedy agreement")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        text = Path(args.text).read_text(encoding="utf-8")
        if args.checkpoint_path:
            fp32, _, info = load_model(args.checkpoint_path)
            int8, _, _ = load_model(args.checkpoint_path, quantize="int8")
            ids = open_tokenizer(args.tokenizer or info["tokenizer"]).encode(text).ids
            source = info["source"]
        else:
            fp32, int8 = random_pair(args.config, args.logit_std, args.seed)
            ids = list(text.encode("utf-8"))
            source = f"{args.config}, random parity weights, logit std {args.logit_std}"
        length = min(args.seq_len, fp32.config.max_position_embeddings)
        windows = windows_of(ids, length, args.max_tokens)
    except (OSError, UnicodeDecodeError, CheckpointError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    print(f"int8 vs fp32 on {source}")
    print(f"{'text':<30} {'tokens':>6} {'ppl fp32':>10} {'ppl int8':>10} {'change':>8} {'KL nats':>9} "
          f"{'entropy':>8} {'top-1 =':>8}")
    report(Path(args.text).name + ("" if args.checkpoint_path else " (bytes as tokens)"), fp32, int8, windows)
    if not args.checkpoint_path:
        prompts = windows[:args.prompts, :16].tolist()
        samples = generate(fp32, prompts, SamplingParams(max_new_tokens=length - 16, temperature=1.0),
                           seed=args.seed)
        own = torch.tensor([p + s for p, s in zip(prompts, samples)])
        report("fp32's own samples", fp32, int8, own)
        windows = own
    print("greedy:", greedy_agreement(fp32, int8, windows[:args.prompts, :16].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
