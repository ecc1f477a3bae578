"""Proof that model.py is SmolLM2: transformers' own LlamaForCausalLM, given the same weights, agrees with it.

    python validate_params.py [--config config_smollm2_135M.yaml] [key=value ...]   random weights, copied into HF
    python validate_params.py --hf_model DIR_OR_HUB_ID                              a HF Llama checkpoint, read by both

Checks, in order: parameter count (and the published count where the shape is a released SmolLM2), state_dict keys
and shapes, identical weights, fp32 logits on random tokens (max abs difference <= 1e-4), and 64 greedy tokens from
left-padded prompts, decoded through each side's KV cache: long enough for a wrong RoPE layout to show. No network is
needed unless --hf_model names a hub id. Prints a table; exit 0 when every check holds, 1 naming the failing checks,
2 for bad input.

Read next: app.py, which shows the checkpoints to people.
"""

import argparse
import sys
from dataclasses import dataclass

import torch

from convert_hf import hf_config_dict, local_hf_dir
from model import SmolLM2
from smollm2.config import Config
from smollm2.config_load import load_config
from smollm2.errors import ConfigError, command
from smollm2.loading import load_model
from smollm2.sampling import SamplingParams, generate

LOGIT_TOLERANCE = 1e-4
# (hidden, layers, heads, kv heads, ffn, vocab) of the released SmolLM2 models -> name, parameters in its safetensors
PUBLISHED = {
    (576, 30, 9, 3, 1536, 49152): ("SmolLM2-135M", 134_515_008),
    (960, 32, 15, 5, 2560, 49152): ("SmolLM2-360M", 361_821_120),
    (2048, 24, 32, 32, 8192, 49152): ("SmolLM2-1.7B", 1_711_376_384),
}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def published_count(mcfg):
    shape = (mcfg.hidden_size, mcfg.num_hidden_layers, mcfg.num_attention_heads, mcfg.num_key_value_heads,
             mcfg.intermediate_size, mcfg.vocab_size)
    return PUBLISHED.get(shape) if mcfg.tie_word_embeddings else None


@torch.no_grad()
def parity_weights(model: SmolLM2, init_std: float, seed: int) -> None:
    """Random weights that make parity hard to pass by accident.

    Every matrix is drawn with unit gain (std 1/sqrt(fan_in)), so each block adds as much to the residual stream as
    the embedding holds: the next token then depends on the whole context and its positions. With the depth-scaled
    training init a small tied-embedding model mostly repeats its last token, and the greedy check would prove
    little. Norm gains are drawn from U(0.5, 1.5), so a norm weight ignored or applied on the wrong axis shows too.
    The embedding keeps the config's init std.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        elif name == "model.embed_tokens.weight":
            p.copy_(torch.randn(p.shape, generator=g) * init_std)
        else:
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def hf_from_config(mcfg):
    """transformers' LlamaForCausalLM for our ModelConfig, through the config.json that convert_hf.py exports. Its
    weights are left unset (whatever memory held): every caller loads ours into it, and drawing 135M random numbers
    only to overwrite them cost seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM
    try:
        from transformers.initialization import no_init_weights   # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights   # transformers 4
    hf_cfg = LlamaConfig.from_dict(hf_config_dict(mcfg), attn_implementation="sdpa")
    with no_init_weights():
        hf = LlamaForCausalLM(hf_cfg)
    hf.tie_weights()   # transformers 5 ties the head inside the init it skipped
    return hf.float().eval()


def pair_from_config(cfg: Config, seed: int):
    """Our model with parity weights, and transformers' model built from the same config (weights copied later)."""
    ours = SmolLM2(cfg.model.model_config, cfg.model.init_method.std)
    parity_weights(ours, cfg.model.init_method.std, seed)
    return ours.eval(), hf_from_config(cfg.model.model_config)


def pair_from_hf(name: str):
    """Both models read from one HF checkpoint: ours as generate.py loads it, HF's through from_pretrained."""
    path = local_hf_dir(name)
    from transformers import LlamaForCausalLM   # after the path is known good: a bad one is refused in a blink
    progress(f"loading {path} into our model and into transformers'")
    # refuses non-Llama configs, weights that do not fit and unreadable files, naming the file
    ours, _, _ = load_model(path, torch.device("cpu"), torch.float32)
    hf = LlamaForCausalLM.from_pretrained(str(path), attn_implementation="sdpa")
    return ours.eval(), hf.float().eval()


def shape_map(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@torch.no_grad()
def run_checks(ours: SmolLM2, hf, copy_weights: bool, seed: int, batch: int, seq_len: int,
               new_tokens: int, require_varied: bool) -> list[Check]:
    """Each check in turn; a failed key/shape check stops the run, as no weights can be compared after it."""
    mcfg = ours.config
    checks = []

    n_ours, n_hf = ours.num_parameters(), sum(p.numel() for p in hf.parameters())
    detail = f"ours {n_ours:,}, HF {n_hf:,}"
    ok = n_ours == n_hf
    if (published := published_count(mcfg)) is not None:
        detail += f", {published[0]} published {published[1]:,}"
        ok = ok and n_ours == published[1]
    checks.append(Check("parameter count", ok, detail))

    a, b = shape_map(ours), shape_map(hf)
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    checks.append(Check("state_dict keys and shapes", not differ,
                        f"{len(a)} tensors, same names and shapes" if not differ else
                        f"{len(differ)} differ, e.g. {differ[0]}: ours {a.get(differ[0])}, HF {b.get(differ[0])}"))
    if differ:
        return checks

    if copy_weights:   # same names on both sides: a plain strict load, no rename map
        hf.load_state_dict(ours.state_dict(), strict=True)
    hf_state = hf.state_dict()
    unequal = [k for k, v in ours.state_dict().items() if not torch.equal(v, hf_state[k].to(v.dtype))]
    checks.append(Check("identical weights", not unequal, f"{len(hf_state)} tensors equal" if not unequal else
                        f"{len(unequal)} differ, e.g. {unequal[0]}"))

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, mcfg.vocab_size, (batch, seq_len), generator=g)
    progress(f"logits of both models on {batch}x{seq_len} random tokens")
    ours_logits, hf_logits = ours(tokens)[0], hf(tokens).logits
    diff = (ours_logits - hf_logits).abs().max().item()
    checks.append(Check("logits (fp32)", diff <= LOGIT_TOLERANCE,
                        f"max |diff| {diff:.2e} over {batch}x{seq_len} tokens (limit {LOGIT_TOLERANCE:.0e}, "
                        f"max |logit| {ours_logits.abs().max().item():.2f})"))

    progress(f"{new_tokens} greedy tokens for 2 prompts, through each side's KV cache")
    checks.append(greedy_check(ours, hf, tokens, new_tokens, require_varied))
    return checks


def greedy_check(ours: SmolLM2, hf, tokens: torch.Tensor, new_tokens: int, require_varied: bool) -> Check:
    """Greedy continuations of two prompts of different lengths (so the shorter one is left-padded on both sides)."""
    from transformers import GenerationConfig
    prompts = [tokens[0, :8].tolist(), tokens[-1, :5].tolist()]
    mine = generate(ours, prompts, SamplingParams(max_new_tokens=new_tokens, temperature=0.0), eos_id=None)

    width = max(len(p) for p in prompts)
    pad = 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    # no EOS: both sides must produce every token, or a stop would hide a difference after it
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=new_tokens,
                               eos_token_id=None, bos_token_id=None, pad_token_id=pad)
    theirs = hf.generate(ids, attention_mask=mask, generation_config=gen_cfg)[:, width:].tolist()

    distinct = ", ".join(str(len(set(row))) for row in mine)
    for row, (a, b) in enumerate(zip(mine, theirs)):
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return Check("greedy generation", False, f"prompt {row} differs from new token {at} on "
                                                     f"(ours {a[at:at + 3]}, HF {b[at:at + 3]})")
    if require_varied and any(len(set(row)) < 2 for row in mine):
        return Check("greedy generation", False, f"identical but degenerate (one token repeated): "
                                                 f"distinct tokens per prompt {distinct}; the weights prove nothing")
    return Check("greedy generation", True, f"{len(mine)} prompts x {new_tokens} new tokens identical "
                                            f"(distinct tokens per prompt: {distinct})")


def progress(message: str) -> None:
    """What the script is doing, on stderr as it starts: at the larger shapes each step takes a while."""
    print(f"... {message}", file=sys.stderr, flush=True)


def print_table(checks: list[Check]) -> None:
    width = max(len(c.name) for c in checks)
    print(f"{'check':<{width}} | result | detail")
    print(f"{'-' * width}-|--------|-------")
    for c in checks:
        print(f"{c.name:<{width}} | {'ok' if c.ok else 'FAIL':<6} | {c.detail}")


def count(text: str) -> int:
    """argparse type: a whole number >= 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


@command
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="config_smollm2_135M.yaml", help="YAML config (nanotron schema)")
    parser.add_argument("--hf_model", default=None, help="a local HF Llama directory, or a hub id (needs network)")
    parser.add_argument("--seed", type=int, default=0, help="for the random weights and tokens")
    parser.add_argument("--batch", type=count, default=2, help="rows of random tokens for the logits check")
    parser.add_argument("--seq_len", type=count, default=64, help="tokens per row for the logits check")
    parser.add_argument("--new_tokens", type=count, default=64, help="greedy tokens generated per prompt")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.model_config.num_hidden_layers=2")
    args = parser.parse_args(argv)
    try:
        if args.hf_model and args.overrides:
            raise ConfigError(f"{' '.join(args.overrides)}: overrides change --config, which --hf_model does not read")
        if args.hf_model:
            ours, hf = pair_from_hf(args.hf_model)
            source = args.hf_model
        else:
            cfg = load_config(args.config, args.overrides)
            progress("building our model and transformers' from the config (seconds at 135M, minutes at 1.7B)")
            ours, hf = pair_from_config(cfg, args.seed)
            source = f"{args.config} {' '.join(args.overrides)}".strip() + " (random weights)"
    except OSError as e:   # a --hf_model folder transformers cannot read
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = ours.config
    print(f"validating {source}: {m.num_hidden_layers} layers, hidden {m.hidden_size}, "
          f"{m.num_attention_heads}/{m.num_key_value_heads} heads, vocab {m.vocab_size}, fp32, HF attention: sdpa")
    seq_len = min(args.seq_len, m.max_position_embeddings)
    checks = run_checks(ours, hf, copy_weights=not args.hf_model, seed=args.seed, batch=args.batch, seq_len=seq_len,
                        new_tokens=args.new_tokens, require_varied=not args.hf_model)
    print_table(checks)
    failed = [c.name for c in checks if not c.ok]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
