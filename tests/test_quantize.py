"""quantize.py: weight-only int8 with one scale per output channel, for every Linear and the tied embedding/head.

Quality is checked on random models with validate_params.py's parity weights (unit-gain matrices, so every layer
shapes the output and an error anywhere shows in the logits) at the tiny and the 135M shape, and on a tiny model
trained here until it recites its text, where greedy decoding must agree with fp32.
"""

import pytest
import torch
from helpers import byte_bpe, tiny_config

import generate as G
from model import Attention, SmolLM2
from smollm2.config_load import load_config
from smollm2.errors import InputError
from smollm2.loading import load_model
from smollm2.quantize import (Int8Embedding, Int8Linear, QuantizedModelError, quantize_model, quantize_rows,
                              stacked)
from smollm2.sampling import SamplingParams, generate
from validate_params import parity_weights

# relative error of the logits, ||int8 - fp32|| / ||fp32||, on parity weights: int8 rounding of each matrix gives
# about 0.5% per matmul, compounded over the layers, plus the kernel's bf16 activations (measured: 3-4% tiny)
LOGIT_TOLERANCE = 0.06
GREEDY = SamplingParams(max_new_tokens=64, temperature=0)
TEXT = ("Once upon a time a small robot lived by the sea. Every morning it counted the waves and every evening it "
        "wrote the number in a blue book. One day the sea was calm and there were no waves to count, so the robot "
        "wrote a poem instead. ") * 6


def quantized_copy(model: SmolLM2) -> SmolLM2:
    twin = SmolLM2(model.config).eval()
    twin.load_state_dict(model.state_dict())
    return quantize_model(twin, "int8")


def logits_error(model: SmolLM2, batch: int, seq: int) -> float:
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(tokens)[0]
        got = quantized_copy(model)(tokens)[0]
    return ((got - ref).norm() / ref.norm()).item()


# ---------------------------------------------------------------- the scheme


def test_each_row_gets_its_own_scale_and_every_weight_is_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 64, generator=g) * torch.tensor([1e-4, 1e-2, 1.0, 3.0, 50.0, 0.0])[:, None]
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.shape == (6,)
    assert torch.equal(q.abs().amax(1)[:5], torch.full((5,), 127, dtype=torch.int8))   # the row's largest is +-127
    err = (w - q.float() * s[:, None]).abs()
    # half a step, plus the bf16 rounding of the scale that may clip the largest weight by 2^-8 of itself
    assert (err <= s[:, None] / 2 + w.abs().amax(1, keepdim=True) * 2 ** -8).all()
    assert torch.equal(q[5], torch.zeros(64, dtype=torch.int8))   # an all-zero row stays zero


def test_every_matrix_becomes_int8_and_the_tied_head_shares_the_embeddings_copy():
    torch.manual_seed(0)
    model = SmolLM2(tiny_config()).eval()
    q = quantized_copy(model)
    linears = [m for m in q.modules() if isinstance(m, Int8Linear)]
    # per layer q/k/v stacked, o, gate/up stacked, down; and the head
    assert len(linears) == 4 * q.config.num_hidden_layers + 1 and not any(isinstance(m, torch.nn.Linear)
                                                                          for m in q.modules())
    assert isinstance(q.model.embed_tokens, Int8Embedding)
    assert q.lm_head.weight is q.model.embed_tokens.weight and q.lm_head.weight.dtype == torch.int8
    assert q.num_parameters() == model.num_parameters()
    # the lookup multiplies the int8 rows back by their scales, exactly, in the compute dtype
    qw, s = quantize_rows(model.model.embed_tokens.weight)
    ids = torch.tensor([[3, 0, 319]])
    assert torch.equal(q.model.embed_tokens(ids), (qw.float() * s[:, None])[ids])


def test_a_stack_gives_each_of_its_linears_int8_product_bit_for_bit():
    torch.manual_seed(0)
    attn = Attention(load_config("config_smollm2_135M.yaml").model.model_config)
    parts = [attn.q_proj, attn.k_proj, attn.v_proj]
    x = torch.randn(3, 2, 576)
    with torch.no_grad():
        together = stacked(*parts)(x)
        alone = torch.cat([Int8Linear.of(p.weight)(x) for p in parts], dim=-1)
    assert together.shape == (3, 2, 576 + 192 + 192) and torch.equal(together, alone)


def test_int8_logits_are_close_to_fp32_on_the_tiny_model():
    model = SmolLM2(tiny_config()).eval()
    parity_weights(model, 0.02, seed=0)
    assert logits_error(model, batch=4, seq=64) <= LOGIT_TOLERANCE


def test_int8_logits_are_close_to_fp32_at_the_135M_shape():
    mc = load_config("config_smollm2_135M.yaml").model.model_config
    model = SmolLM2(mc).eval()
    parity_weights(model, 0.02, seed=0)
    assert logits_error(model, batch=1, seq=32) <= LOGIT_TOLERANCE


def test_the_compute_dtype_stays_for_activations_and_the_kv_cache():
    q = quantized_copy(SmolLM2(tiny_config()).eval())
    q.setup_cache(2, 16)
    try:
        assert q.model.layers[0].self_attn.kv_cache.k.dtype == torch.float32
        logits, _ = q(torch.tensor([[1, 2, 3], [4, 5, 6]]), cache_pos=0)
        assert logits.dtype == torch.float32
    finally:
        q.clear_cache()


# ---------------------------------------------------------------- greedy agreement on a trained model


@pytest.fixture(scope="module")
def trained():
    """A tiny model trained on 64-token slices of TEXT until it recites them, and TEXT's token ids."""
    ids = torch.tensor(byte_bpe([TEXT], 300).encode(TEXT).ids)
    torch.manual_seed(0)
    model = SmolLM2(tiny_config(vocab_size=300))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    windows = ids.unfold(0, 65, 16)                       # (n, 65): overlapping slices of the text
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # a model this small gains nothing from two threads and loses much on a busy machine
    try:
        for _ in range(150):
            _, loss = model(windows[:, :-1], windows[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.1   # it has learnt the text: most of its greedy choices are decisive
    return model.eval(), ids


def test_int8_greedy_decoding_agrees_with_fp32_on_a_trained_model(trained):
    model, ids = trained
    q = quantized_copy(model)
    prompts = [ids[k:k + 6].tolist() for k in (0, 37, 81, 122, 170)]
    params = SamplingParams(max_new_tokens=48, temperature=0)   # within the 64 positions it was trained on
    fp32, int8 = generate(model, prompts, params), generate(q, prompts, params)
    assert sum(a == b for a, b in zip(fp32, int8)) >= 3
    # step by step along fp32's own continuation: int8 picks another token only where fp32 itself hesitates
    # between two (its top-2 logits closer than NEAR_TIE), i.e. where int8's logit error can reorder them
    near_tie, flips, steps = 1.0, 0, 0
    with torch.no_grad():
        for prompt, row in zip(prompts, fp32):
            seq = torch.tensor([prompt + row[:-1]])
            ref, got = model(seq)[0][0, len(prompt) - 1:], q(seq)[0][0, len(prompt) - 1:]
            top2 = ref.topk(2).values
            flipped = got.argmax(-1) != torch.tensor(row)
            assert (top2[flipped, 0] - top2[flipped, 1] < near_tie).all()
            flips, steps = flips + int(flipped.sum()), steps + len(row)
    assert flips <= 0.05 * steps


def test_int8_left_padded_prompts_decode_as_each_alone(trained):
    """The stacked q/k/v path with per-row positions: a batch of prompts of different lengths, left-padded."""
    model, ids = trained
    q = quantized_copy(model)
    prompts = [ids[0:7].tolist(), ids[40:42].tolist(), ids[90:94].tolist()]
    params = SamplingParams(max_new_tokens=24, temperature=0)
    assert generate(q, prompts, params) == [generate(q, [p], params)[0] for p in prompts]


# ---------------------------------------------------------------- decoding only


def test_int8_is_refused_off_the_cpu_in_one_line_naming_why_and_the_fix():
    # a meta-device model stands in for a GPU one: whatever is not the CPU has no int8 kernel faster than bf16
    model = SmolLM2(tiny_config()).to("meta")
    with pytest.raises(InputError, match=r"--quantize int8 runs on the CPU only: on meta .* slower than bf16; drop "
                                         r"--quantize and use --dtype bf16 there"):
        quantize_model(model, "int8")


def test_a_quantized_model_refuses_to_train_or_be_saved_with_one_clear_message():
    q = quantized_copy(SmolLM2(tiny_config()))
    with pytest.raises(QuantizedModelError, match="int8 .* cannot train.*without quantize"):
        q.train()
    with pytest.raises(QuantizedModelError, match="cannot be saved as a checkpoint"):
        q.state_dict()
    assert not any(p.requires_grad for p in q.parameters())
    q.eval()   # what generate() does around its loop still works


def test_quantizing_at_load_leaves_the_checkpoint_and_its_names_alone(tiny_run):
    plain, _, _ = load_model(tiny_run)
    names = list(plain.state_dict())
    q, _, _ = load_model(tiny_run, quantize="int8")
    assert isinstance(q.lm_head, Int8Linear)
    again, _, _ = load_model(tiny_run)
    assert list(again.state_dict()) == names and all(torch.equal(again.state_dict()[k], v)
                                                      for k, v in plain.state_dict().items())


def test_cli_quantize_int8_prints_what_generate_gives_the_int8_model(tiny_run, tiny_tokenizer_file, capsys):
    code = G.main(["--checkpoint_path", str(tiny_run), "--prompt", "The quick", "--temperature", "0",
                   "--max_new_tokens", "12", "--quantize", "int8"])
    out = capsys.readouterr()
    model, _, _ = load_model(tiny_run, quantize="int8")
    tok = G.open_tokenizer(str(tiny_tokenizer_file))
    want = generate(model, [tok.encode("The quick").ids], SamplingParams(max_new_tokens=12, temperature=0), eos_id=0)
    assert code == 0 and "int8 weights" in out.err
    assert out.out == tok.decode(want[0]) + "\n"


def test_cli_refuses_an_unknown_quantization(tiny_run, capsys):
    with pytest.raises(SystemExit):
        G.main(["--checkpoint_path", str(tiny_run), "--prompt", "x", "--quantize", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_a_strided_activation_gives_what_its_contiguous_copy_gives():
    lin = Int8Linear.of(torch.randn(16, 64).bfloat16())   # bf16 in, so no cast makes the rows contiguous for it
    x = torch.randn(3, 5, 64).bfloat16()[:, -1:]           # the last position of each row, as a prefill takes it
    assert torch.equal(lin(x), lin(x.contiguous()))
