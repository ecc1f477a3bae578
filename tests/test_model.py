"""model.py is SmolLM2: transformers' LlamaForCausalLM has its names, shapes, parameter count, logits and greedy text;
its KV cache changes nothing; and its numerics (fp32 RMSNorm, the causal mask, the loss, recompute) are what
training needs."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import GenerationConfig

import model as model_module
from model import ModelConfig, RMSNorm, SmolLM2, apply_rotary
from smollm2.config_load import load_config
from smollm2.sampling import SamplingParams, generate
from smollm2.task import document_segments
from train import Pretraining
from validate_params import hf_from_config, pair_from_config, parity_weights

TINY = ModelConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                   num_hidden_layers=2, vocab_size=256, max_position_embeddings=256)
SHIPPED = [("config_smollm2_135M.yaml", 134_515_008), ("configs/config_smollm2_360M.yaml", 361_821_120),
           ("configs/config_smollm2_1.7B.yaml", 1_711_376_384)]


def tiny_model(seed: int = 0, cfg: ModelConfig = TINY) -> SmolLM2:
    """A tiny model with parity weights: unit-gain layers and random norm gains, so every part of it matters."""
    torch.manual_seed(seed)
    model = SmolLM2(cfg, init_std=0.05)
    parity_weights(model, 0.05, seed)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_pair():
    ours = tiny_model()
    hf = hf_from_config(TINY)
    hf.load_state_dict(ours.state_dict(), strict=True)
    return ours, hf


def random_tokens(shape, vocab=TINY.vocab_size, seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- it is Hugging Face's Llama


def test_state_dict_names_and_shapes_equal_hf(tiny_pair):
    ours, hf = tiny_pair
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}


@pytest.mark.parametrize("path,published", SHIPPED)
def test_parameter_count_of_shipped_configs_equals_published_smollm2(path, published):
    mcfg = load_config(path).model.model_config
    with torch.device("meta"):   # shapes only: even 1.7B costs no memory
        ours, hf = SmolLM2(mcfg), hf_from_config(mcfg)
    assert ours.num_parameters() == published
    assert sum(p.numel() for p in hf.parameters()) == published


@torch.no_grad()
def test_logits_match_hf_at_tiny_size(tiny_pair):
    ours, hf = tiny_pair
    tokens = random_tokens((3, 48))
    assert (ours(tokens)[0] - hf(tokens).logits).abs().max().item() <= 1e-5


@torch.no_grad()
def test_logits_match_hf_at_135M_size():
    ours, hf = pair_from_config(load_config("config_smollm2_135M.yaml"), seed=0)
    hf.load_state_dict(ours.state_dict(), strict=True)
    tokens = random_tokens((2, 32), vocab=ours.config.vocab_size)
    assert (ours(tokens)[0] - hf(tokens).logits).abs().max().item() <= 1e-4


def test_greedy_64_tokens_match_hf(tiny_pair):
    ours, hf = tiny_pair
    prompt = random_tokens((1, 6)).tolist()[0]
    mine = generate(ours, [prompt], SamplingParams(max_new_tokens=64, temperature=0.0))[0]
    cfg = GenerationConfig(do_sample=False, max_new_tokens=64, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    theirs = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 6, dtype=torch.long),
                         generation_config=cfg)[0, 6:].tolist()
    assert mine == theirs
    assert len(set(mine)) > 8, "a near-constant continuation would not exercise positions"


# ---------------------------------------------------------------- the KV cache changes nothing


@torch.no_grad()
def test_kv_cache_decode_equals_full_recomputation():
    model, tokens = tiny_model(), random_tokens((2, 24))
    full = model(tokens)[0]
    model.setup_cache(2, 24)
    steps = [model(tokens[:, :10], cache_pos=0)[0]]               # prefill, then one token at a time
    steps += [model(tokens[:, t:t + 1], cache_pos=t)[0] for t in range(10, 24)]
    model.clear_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_chunked_prefill_at_nonzero_cache_position_equals_full_recomputation():
    model, tokens = tiny_model(), random_tokens((2, 20))
    full = model(tokens)[0]
    model.setup_cache(2, 20)
    chunks = [model(tokens[:, :8], cache_pos=0)[0], model(tokens[:, 8:15], cache_pos=8)[0],
              model(tokens[:, 15:], cache_pos=15)[0]]
    model.clear_cache()
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_left_padded_batch_equals_each_row_alone():
    model = tiny_model()
    prompts = [random_tokens((9,), seed=1).tolist(), random_tokens((4,), seed=2).tolist()]
    ids = torch.tensor([prompts[0], [prompts[1][0]] * 5 + prompts[1]])
    valid = torch.tensor([[True] * 9, [False] * 5 + [True] * 4])
    padded = model(ids, valid=valid)[0]
    torch.testing.assert_close(padded[1, 5:], model(torch.tensor([prompts[1]]))[0][0], atol=1e-5, rtol=1e-5)
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    together = generate(model, prompts, params)
    assert together == [generate(model, [p], params)[0] for p in prompts]


# ---------------------------------------------------------------- numerics training relies on


def test_rmsnorm_statistics_are_fp32_under_bf16_input():
    norm = RMSNorm(576, eps=1e-5).bfloat16()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(8, 576) * 4 + 1).bfloat16()
    out = norm(x)
    x32 = x.float()
    expected = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    in_bf16 = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)
    assert not torch.equal(out, in_bf16), "this input must tell fp32 statistics from bf16 ones"


def test_rotary_embedding_is_hf_rotate_half_bit_for_bit():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    hf = hf_from_config(TINY).model.rotary_emb
    assert isinstance(hf, LlamaRotaryEmbedding)
    positions = torch.tensor([[0, 5, 17, 255], [3, 3, 4, 200]])   # per-row positions, as left padding gives
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 4, TINY.head_dim, generator=g), torch.randn(2, 2, 4, TINY.head_dim, generator=g)
    theirs = apply_rotary_pos_emb(q, k, *hf(q, positions))
    cos, sin = tiny_model().model.rotary_emb(positions)
    assert torch.equal(apply_rotary(q, cos, sin), theirs[0]) and torch.equal(apply_rotary(k, cos, sin), theirs[1])


@pytest.mark.parametrize("masked", [False, True], ids=["is_causal kernel", "boolean mask"])
@torch.no_grad()
def test_future_tokens_do_not_change_past_logits(masked):
    model = tiny_model()
    a = random_tokens((1, 32), seed=3)
    b = a.clone()
    b[:, 16:] = random_tokens((1, 16), seed=4)
    valid = torch.ones(1, 32, dtype=torch.bool) if masked else None   # valid= takes the explicit-mask path
    la, lb = model(a, valid=valid)[0], model(b, valid=valid)[0]
    torch.testing.assert_close(la[:, :16], lb[:, :16], atol=1e-6, rtol=0)
    assert not torch.allclose(la[:, 16:], lb[:, 16:]), "the changed tokens themselves must see the change"


@torch.no_grad()
def test_masked_training_attention_off_the_cpu_never_asks_sdpa_for_a_mask_with_shared_heads(monkeypatch):
    """CUDA's SDPA serves a mask together with enable_gqa only by its math kernel, which holds (B*nh, T, T) fp32
    scores. A packed forward on a non-CPU device (meta: shapes only) must hand SDPA repeated k/v instead."""
    calls, sdpa = [], F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, enable_gqa=False, **kw):
        calls.append((attn_mask is not None, enable_gqa, k.shape[1] == q.shape[1]))
        return sdpa(q, k, v, attn_mask=attn_mask, enable_gqa=enable_gqa, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    with torch.device("meta"):
        model = SmolLM2(TINY)
        segments = torch.arange(16).div(5, rounding_mode="floor").expand(2, -1)   # four sequences per row
        model(torch.zeros(2, 16, dtype=torch.long), segments=segments)
    assert calls == [(True, False, True)] * TINY.num_hidden_layers   # a mask, no enable_gqa, every head's k/v
    assert model_module.attention_kernels("cuda")["masked"].startswith("memory-efficient")


@torch.no_grad()
def test_packed_rows_with_repeated_kv_give_the_logits_each_sequence_gives_alone(monkeypatch):
    """The k/v-repeating path (what CUDA runs) computes each packed sequence exactly as if it ran alone."""
    monkeypatch.setattr(model_module, "MASKED_GQA_DEVICES", ())
    model, x = tiny_model(), random_tokens((1, 24), seed=6)
    seg = torch.tensor([[0] * 10 + [1] * 14])
    packed, _ = model(x, segments=seg)
    for s, (a, b) in enumerate([(0, 10), (10, 24)]):
        torch.testing.assert_close(packed[:, a:b], model(x[:, a:b])[0], atol=2e-5, rtol=1e-4, msg=f"sequence {s}")


def test_document_segments_end_each_document_at_its_eos():
    eos = 7
    x = torch.tensor([[3, eos, 5, 5, eos, eos, 2], [eos, 1, 1, 1, 1, 1, 1]])
    assert document_segments(x, eos).tolist() == [[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]


def two_documents(seed: int = 8) -> torch.Tensor:
    """A block (1, 20) of two documents: 0..7, ending at its EOS, and 8..19."""
    x = random_tokens((1, 20), seed=seed)
    x[x == TINY.eos_token_id], x[0, 7] = 1, TINY.eos_token_id
    return x


@torch.no_grad()
def test_document_masked_pretraining_loss_is_each_documents_loss_alone():
    """run.document_masking with reset_position_ids: the pretraining loss of a packed block is the mean of each
    document's own token losses, each computed as if it ran alone."""
    model, x, y = tiny_model(), two_documents(), random_tokens((1, 20), seed=9)
    cfg = SimpleNamespace(run=SimpleNamespace(document_masking=True, reset_position_ids=True))
    tokenizer = SimpleNamespace(token_to_id=lambda t: TINY.eos_token_id if t == "<|endoftext|>" else None)
    run = SimpleNamespace(cfg=cfg, rt=SimpleNamespace(device=torch.device("cpu")), net=model, tokenizer=tokenizer)
    loss, _ = Pretraining().loss(run, (x, y))
    alone = sum(model(x[:, a:b], y[:, a:b], per_row=True)[1] for a, b in [(0, 8), (8, 20)])
    torch.testing.assert_close(loss, alone[0] / 20, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_document_masking_hides_earlier_documents_and_needs_no_position_restart():
    """A document sees none of the documents before it; and since RoPE's scores depend only on distances, positions
    continuing through the block (not restarted) give it the same logits: no switch for restarts is needed."""
    model, x = tiny_model(), two_documents()
    other = x.clone()
    other[0, :7] = random_tokens((1, 7), seed=10).clamp(min=1)   # another first document, the same EOS
    seg = document_segments(x, TINY.eos_token_id)
    la, lb = (model(t, segments=seg)[0] for t in (x, other))
    torch.testing.assert_close(la[:, 8:], lb[:, 8:], atol=1e-6, rtol=0)
    cos, sin = model.model.rotary_emb(torch.arange(8, 20)[None])          # positions 8..19, as if not restarted
    q = torch.randn(1, 2, 12, TINY.head_dim)
    k = torch.randn(1, 2, 12, TINY.head_dim)
    restarted = model.model.rotary_emb(torch.arange(12)[None])
    scores = lambda c, s: apply_rotary(q, c, s) @ apply_rotary(k, c, s).transpose(-1, -2)
    torch.testing.assert_close(scores(cos, sin), scores(*restarted), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_loss_skips_ignore_index_and_keeps_eos_as_a_target():
    model, tokens = tiny_model(), random_tokens((2, 16))
    eos = TINY.eos_token_id
    targets = random_tokens((2, 16), seed=5)
    targets[0, :4] = -100          # e.g. a prompt that is not trained on
    targets[:, -1] = eos           # end of document: something the model must learn to predict
    loss = model(tokens, targets)[1]
    logp = F.log_softmax(model(tokens)[0].float(), -1)
    keep = targets != -100
    expected = -logp[keep].gather(-1, targets[keep][:, None]).mean()
    torch.testing.assert_close(loss, expected)
    all_eos = model(tokens, torch.full_like(tokens, eos))[1]
    torch.testing.assert_close(all_eos, -logp[..., eos].mean())


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16 autocast"])
def test_recompute_modes_give_identical_gradients(autocast):
    """Selective recompute (matmul outputs kept, the rest rebuilt) and whole-layer recompute change only memory, also
    for two micro-batches forwarded in one autocast region, whose second finds the weights' casts cached."""
    tokens, targets = random_tokens((2, 32)), random_tokens((2, 32), seed=6)
    grads = {}
    for mode in ("none", "selective", "full"):
        model = tiny_model().train()
        model.gradient_checkpointing, model.selective_recompute = mode == "full", mode == "selective"
        # recomputed layers cast their weights once per use, uncached (model._uncached_autocast), and so does the
        # reference: a cached cast would sum the two micro-batches' weight gradients in bf16
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast, cache_enabled=mode != "none"):
            losses = model(tokens, targets)[1], model(targets, tokens)[1]
        sum(losses).backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
    for mode in ("selective", "full"):
        assert grads[mode].keys() == grads["none"].keys()
        for name in grads["none"]:
            torch.testing.assert_close(grads[mode][name], grads["none"][name], atol=1e-6, rtol=1e-5, msg=name)


def test_init_draws_from_init_std_with_depth_scaled_residual_projections():
    cfg = ModelConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=8, vocab_size=1024, max_position_embeddings=64)
    torch.manual_seed(0)
    model, std = SmolLM2(cfg, init_std=0.05), 0.05
    out_std = std / math.sqrt(2 * cfg.num_hidden_layers)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.all(p == 1.0), name
        else:
            want = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            assert abs(p.std().item() - want) < 0.05 * want, name
            assert abs(p.mean().item()) < 0.05 * want, name
    assert model.lm_head.weight is model.model.embed_tokens.weight   # tied: one matrix, initialised once
