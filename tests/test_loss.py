"""The chunked loss is F.cross_entropy on the full logits (loss and every gradient, prompt positions ignored) without
ever building them, under autocast, activation checkpointing, torch.compile and with a tied or untied head."""

import pytest
import torch
import torch.nn.functional as F
from helpers import LargestTensor

from model import LOSS_CHUNK_TOKENS, ModelConfig, SmolLM2, chunked_cross_entropy
from validate_params import parity_weights

CFG = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
           vocab_size=2048, max_position_embeddings=1024)


def model(tied: bool = True, seed: int = 0) -> SmolLM2:
    torch.manual_seed(seed)
    m = SmolLM2(ModelConfig(**CFG, tie_word_embeddings=tied), init_std=0.05)
    parity_weights(m, 0.05, seed)
    return m.train()


def batch(rows: int, length: int, seed: int = 1):
    """Tokens and targets; the first row's first 37 targets and all of the last row's tail are -100 (a prompt)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CFG["vocab_size"], (rows, length), generator=g)
    targets = torch.randint(0, CFG["vocab_size"], (rows, length), generator=g)
    targets[0, :37] = -100
    targets[-1, length // 2:] = -100
    return tokens, targets


def full_loss(net, tokens, targets):
    logits = net(tokens)[0]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def loss_and_grads(m: SmolLM2, loss_fn, net=None) -> tuple[torch.Tensor, dict]:
    m.zero_grad(set_to_none=True)
    loss = loss_fn(m if net is None else net)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


def assert_relative(got: dict, want: dict, tol: float):
    """Each gradient's error, relative to its norm, is within tol."""
    assert got.keys() == want.keys()
    for name in want:
        err = ((got[name] - want[name]).norm() / want[name].norm()).item()
        assert err <= tol, f"{name}: relative error {err:.2e}"


def test_chunks_of_any_size_give_the_full_loss_and_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 41, 16, generator=g, requires_grad=True)
    w = torch.randn(100, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 100, (3, 41), generator=g)
    targets[1, 5:30] = -100
    ref = F.cross_entropy((x @ w.T).flatten(0, 1), targets.flatten())
    want = torch.autograd.grad(ref, (x, w))
    for chunk in (1, 7, 64, 123, 1000):   # one position at a time, uneven, a whole row, the exact size, one chunk
        loss = chunked_cross_entropy(x, w, targets, chunk=chunk)
        got = torch.autograd.grad(loss, (x, w))
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
        for a, b in zip(got, want):
            assert ((a - b).norm() / b.norm()).item() <= 1e-6


@pytest.mark.parametrize("tied", [True, False], ids=["tied head", "untied head"])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_model_loss_and_every_gradient_equal_full_cross_entropy_in_fp32(tied, recompute):
    tokens, targets = batch(3, 400)   # 1200 positions: a full chunk of 1024 and a partial one
    assert LOSS_CHUNK_TOKENS < tokens.numel() < 2 * LOSS_CHUNK_TOKENS
    m = model(tied)
    m.gradient_checkpointing, m.selective_recompute = recompute == "full", recompute == "selective"
    loss, grads = loss_and_grads(m, lambda net: net(tokens, targets)[1])
    ref, ref_grads = loss_and_grads(m, lambda net: full_loss(net, tokens, targets))
    assert abs(loss - ref) <= 1e-6 * ref
    assert_relative(grads, ref_grads, 1e-6)


def test_bf16_autocast_loss_is_fp32_and_matches_the_full_loss():
    tokens, targets = batch(3, 400)
    m = model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(m, lambda net: net(tokens, targets)[1])
        ref, ref_grads = loss_and_grads(m, lambda net: full_loss(net, tokens, targets))
    assert loss.dtype == torch.float32
    assert abs(loss - ref) <= 1e-5 * ref               # the same bf16 logits, an fp32 log-softmax on both sides
    assert_relative(grads, ref_grads, 2e-2)              # bf16 head gradients, summed per chunk: rounding only
    assert all(g.dtype == torch.float32 for g in grads.values())


def test_compiled_model_gives_the_full_loss_and_gradients():
    tokens, targets = batch(3, 400)
    m = model()
    loss, grads = loss_and_grads(m, lambda net: net(tokens, targets)[1], net=torch.compile(m))
    ref, ref_grads = loss_and_grads(m, lambda net: full_loss(net, tokens, targets))
    assert abs(loss - ref) <= 1e-5 * ref
    assert_relative(grads, ref_grads, 1e-5)              # compiled kernels sum in another order


def test_the_full_logits_never_exist_with_targets_but_are_returned_without():
    tokens, targets = batch(4, 1024)   # 4096 positions: four chunks
    m = model()
    full = tokens.numel() * CFG["vocab_size"]
    with LargestTensor() as rec:
        logits, loss = m(tokens, targets)
        loss.backward()
    assert logits is None
    assert rec.numel <= LOSS_CHUNK_TOKENS * CFG["vocab_size"] < full
    with LargestTensor() as rec, torch.no_grad():
        logits, loss = m(tokens)
    assert loss is None and logits.shape == (4, 1024, CFG["vocab_size"]) and rec.numel == full
