"""Text generation with a preallocated KV cache: one prefill over the prompts, then one token per step.

`generate()` is the one generation path of the repository: generate.py's command line, train.py's samples,
validate_params.py's greedy check and app.py all call it.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from model import SmolLM2


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0          # 0: greedy
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: float = 1.0


def sample(logits: torch.Tensor, p: SamplingParams, generator: Optional[torch.Generator] = None,
           seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pick the next token from logits (B, V) -> (B,).

    Repetition penalty divides the positive logits (multiplies the negative ones) of tokens already in `seen`;
    top-k keeps the k largest logits; top-p keeps the smallest set of tokens whose probability reaches p.
    """
    logits = logits.float()
    if seen is not None and p.repetition_penalty != 1.0:
        picked = logits.gather(-1, seen)
        picked = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        logits = logits.scatter(-1, seen, picked)
    if p.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / p.temperature
    if p.top_k is not None and p.top_k < logits.size(-1):
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p is not None and p.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= p.top_p        # the mass before this token already reached p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: SmolLM2, prompts: list[list[int]], params: SamplingParams, eos_id: Optional[int] = None,
             seed: Optional[int] = None, on_tokens: Optional[Callable[[torch.Tensor], bool]] = None) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to params.max_new_tokens tokens; return the new tokens.

    Prompts of different lengths are left-padded; the padding is masked out and positions count real tokens only,
    so each row comes out exactly as if it had been generated alone. A row ends at `eos_id` (kept in its output).
    `on_tokens(tokens (B,))` is called after every step (for streaming); returning True stops generation.
    """
    if not prompts or any(len(t) == 0 for t in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.lm_head.weight.device
    B, T = len(prompts), max(len(t) for t in prompts)
    max_len = min(T + params.max_new_tokens, model.config.max_position_embeddings)
    steps = max_len - T
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    valid = torch.zeros(B, max_len, dtype=torch.bool, device=device)
    for i, toks in enumerate(prompts):
        ids[i] = toks[0]   # padding repeats a real token, so a repetition penalty sees nothing foreign
        ids[i, T - len(toks):] = torch.tensor(toks, device=device)
        valid[i, T - len(toks):] = True
    valid[:, T:] = True
    padded = bool((~valid[:, :T]).any())
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    was_training = model.training
    model.eval()
    model.setup_cache(B, max_len)
    try:
        out = []
        seen = ids
        done = torch.zeros(B, dtype=torch.bool, device=device)
        logits, _ = model(ids, cache_pos=0, valid=valid if padded else None, last_only=True)
        for step in range(steps):
            tok = sample(logits[:, -1], params, generator, seen)
            if eos_id is not None:
                tok = torch.where(done, torch.full_like(tok, eos_id), tok)
                done = done | (tok == eos_id)
            out.append(tok)
            if on_tokens is not None and on_tokens(tok):
                break
            if bool(done.all()) or step == steps - 1:
                break
            if params.repetition_penalty != 1.0:
                seen = torch.cat([seen, tok[:, None]], dim=1)
            logits, _ = model(tok[:, None], cache_pos=T + step, valid=valid if padded else None)
    finally:
        model.clear_cache()
        model.train(was_training)
    if not out:
        return [[] for _ in prompts]
    new = torch.stack(out, dim=1).tolist()
    if eos_id is not None:   # cut each row after its first EOS
        new = [row[: row.index(eos_id) + 1] if eos_id in row else row for row in new]
    return new
