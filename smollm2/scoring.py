"""How likely the model finds a text: the numbers behind benchmark scores and perplexity.

A scoring request is a list of tokens and how many of its last tokens to score: the model reads all but the last
token, and the log-probabilities it gives the last `n` tokens are summed. A multiple-choice benchmark scores each
answer after its question; perplexity scores a whole text in windows of the model's context. Both go through
`score()`, which batches requests of similar length together, right-padded: a causal model's earlier positions never
see what comes after them, so the padding changes nothing.
"""

import math
from typing import Callable, Optional

import torch

from model import SmolLM2

Request = tuple[list[int], int]   # (tokens, how many of the last ones to score)


def rolling_windows(tokens: list[int], prefix_id: int, max_len: int) -> list[Request]:
    """Requests covering a text of any length, each at most max_len + 1 tokens, every token scored exactly once.

    The text is preceded by `prefix_id` (BOS or EOS) so that its first token is predicted too. The windows are
    disjoint chunks of max_len predictions, except the last, which reaches back for a full context and scores only
    its new tokens. This is lm-evaluation-harness's rolling log-likelihood, so perplexities compare with its scores.
    """
    seq = [prefix_id] + list(tokens)
    windows, start = [], 1
    while start < len(seq):
        end = min(start + max_len, len(seq))
        windows.append((seq[max(0, end - max_len - 1):end], end - start))
        start = end
    return windows


@torch.inference_mode()
def score(model: SmolLM2, requests: list[Request], batch_size: int,
          progress: Optional[Callable[[int], None]] = None) -> list[tuple[float, bool]]:
    """For each request: (sum of the log-probabilities of its scored tokens, whether greedy decoding gives them all).

    Requests run longest first in batches of `batch_size`, so a batch holds similar lengths and little padding;
    the answers come back in the order of `requests`. `progress(n)` is told after each batch how many it finished.
    """
    context = model.config.max_position_embeddings
    for tokens, n in requests:
        if not 1 <= n < len(tokens) <= context + 1:
            raise ValueError(f"a scoring request of {len(tokens)} tokens scoring {n} does not fit a context of "
                             f"{context} tokens (it needs 1 <= scored < tokens <= context + 1)")
    device = model.lm_head.weight.device
    was_training = model.training
    model.eval()
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    out: list[Optional[tuple[float, bool]]] = [None] * len(requests)
    try:
        for first in range(0, len(order), batch_size):
            chunk = order[first:first + batch_size]
            width = len(requests[chunk[0]][0]) - 1
            ids = torch.zeros(len(chunk), width, dtype=torch.long)           # (B, T), right-padded with token 0
            for row, i in enumerate(chunk):
                inputs = requests[i][0][:-1]
                ids[row, :len(inputs)] = torch.tensor(inputs)
            logits, _ = model(ids.to(device))                                # (B, T, V)
            for row, i in enumerate(chunk):
                tokens, n = requests[i]
                end = len(tokens) - 1                                        # logits at t predict token t + 1
                logp = logits[row, end - n:end].float().log_softmax(-1)     # (n, V), fp32 whatever the model's dtype
                target = torch.tensor(tokens[-n:], device=device)
                out[i] = (logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all()))
            if progress is not None:
                progress(len(chunk))
    finally:
        model.train(was_training)
    return out


def perplexity(model: SmolLM2, tokens: list[int], n_bytes: int, prefix_id: int, batch_size: int,
               progress: Optional[Callable[[int], None]] = None) -> dict:
    """Token-level and byte-normalised perplexity of one text (its tokens and its length in UTF-8 bytes).

    Token perplexity exp(-log p / tokens) depends on the tokenizer: one that cuts text into fewer, longer tokens has
    a higher one for the same model quality. Dividing the same log-likelihood by the text's bytes instead gives a
    figure two models with different tokenizers can be compared on: byte perplexity exp(-log p / bytes), and bits
    per byte -log2 p / bytes.
    """
    if not tokens:
        raise ValueError("the text is empty: there is nothing to score")
    windows = rolling_windows(tokens, prefix_id, model.config.max_position_embeddings)
    logprob = sum(lp for lp, _ in score(model, windows, batch_size, progress))
    return {"tokens": len(tokens), "bytes": n_bytes, "log_likelihood": logprob,
            "token_perplexity": math.exp(-logprob / len(tokens)), "byte_perplexity": math.exp(-logprob / n_bytes),
            "bits_per_byte": -logprob / (n_bytes * math.log(2))}
