"""The chat format: one template equal to SmolLM2's as transformers renders it, targets on the assistant's tokens only,
packed conversations computed as if alone, chat tokens added to a tokenizer that lacks them, the template in an
export's tokenizer files, and `generate.py --chat` holding a conversation."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CHATS, byte_bpe
from tokenizers import Tokenizer

import convert_hf
import generate as G
from model import ModelConfig, SmolLM2
from smollm2 import chat, chat_data
from smollm2.checkpoint import save_atomic
from smollm2.config_load import config_from_dict, config_to_dict
from smollm2.sampling import SamplingParams, generate

# SmolLM2-Instruct's tokenizer format, as published on the Hub: the special tokens of its tokenizer.json in id order,
# and these entries of its tokenizer_config.json. The chat_template value is the JSON string of
# HuggingFaceTB/SmolLM2-1.7B-Instruct's tokenizer_config.json as its commit e4f7834 ("chat template") set it, spelled
# here as JSON, independently of chat.py.
SMOLLM2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
                   "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>",
                   "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>"]
SMOLLM2_TEMPLATE_JSON = '"' + (
    r"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    r"You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>'"
    r" + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt"
    r" %}{{ '<|im_start|>assistant\n' }}{% endif %}") + '"'
SMOLLM2_TOKENIZER_CONFIG = {"add_prefix_space": False, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                            "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>",
                            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                            "clean_up_tokenization_spaces": False, "model_max_length": 8192,
                            "tokenizer_class": "GPT2Tokenizer", "chat_template": json.loads(SMOLLM2_TEMPLATE_JSON)}

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Café ou thé ?"},
     {"role": "assistant", "content": "Un café, s'il vous plaît. ☕"}, {"role": "user", "content": "Et après?"}],
    [{"role": "user", "content": "two\n\nlines  and  spaces "}, {"role": "assistant", "content": "\nok\n"}],
]
TEXT = " ".join(m["content"] for c in CONVERSATIONS for m in c) + " You are a helpful AI assistant named SmolLM"


@pytest.fixture(scope="module")
def smollm2_format(tmp_path_factory) -> Path:
    """A directory AutoTokenizer reads as SmolLM2-Instruct's tokenizer: same special tokens and ids, same config."""
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    byte_bpe([TEXT] * 10, 400, tuple(SMOLLM2_SPECIAL)).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(SMOLLM2_TOKENIZER_CONFIG))
    return folder


def test_the_template_is_smollm2s_published_string():
    assert chat.CHAT_TEMPLATE == json.loads(SMOLLM2_TEMPLATE_JSON)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_equals_transformers_rendering_with_the_smollm2_tokenizer(smollm2_format, add_generation_prompt):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(smollm2_format))
    ours = Tokenizer.from_file(str(smollm2_format / "tokenizer.json"))
    for messages in CONVERSATIONS:
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert chat.render(messages, add_generation_prompt) == text
        ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                     return_dict=False)
        assert ids == ours.encode(text, add_special_tokens=False).ids
        if add_generation_prompt:
            assert chat.prompt_ids(ours, messages) == ids
        else:
            assert chat.encode(ours, messages)[0] == ids


def test_only_the_assistants_tokens_are_targets(smollm2_format):
    tok = Tokenizer.from_file(str(smollm2_format / "tokenizer.json"))
    for messages in CONVERSATIONS[1:]:
        ids, mask = chat.encode(tok, messages)
        replies = "".join(m["content"] + chat.IM_END for m in messages if m["role"] == "assistant")
        assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == replies
        prompt_side = tok.decode([i for i, m in zip(ids, mask) if not m], skip_special_tokens=False)
        assert all(m["content"] in prompt_side for m in messages if m["role"] != "assistant")
        x, y = chat_data._inputs_and_targets(ids, mask)   # what training sees: a target only where the next is theirs
        assert [int(t) for t in y if t != chat_data.IGNORE] == [i for i, m in zip(ids[1:], mask[1:]) if m]
        assert list(x) == ids[:-1]
    ids, mask = chat.encode(tok, CONVERSATIONS[2] + [{"role": "assistant", "content": "Du thé."}],
                            last_reply_only=True)   # DPO scores the final reply alone
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == "Du thé." + chat.IM_END


def test_a_reply_opening_with_newlines_keeps_every_token_a_target_and_the_prompt_generation_sees():
    tok = byte_bpe(["a\n\n\nb\n\n"] * 20, 300, ("<|endoftext|>", *chat.CHAT_TOKENS))   # "\n\n" is one token
    messages = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "\n\nHi there.\n"}]
    ids, mask = chat.encode(tok, messages)
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == "\n\nHi there.\n<|im_end|>"
    start = mask.index(True)   # the targets follow exactly the ids a reply is generated from
    assert ids[:start] == chat.prompt_ids(tok, messages[:1]) and all(mask[start:-1])


def test_packed_conversations_give_the_logits_each_gives_alone(smollm2_format):
    tok = Tokenizer.from_file(str(smollm2_format / "tokenizer.json"))
    conversations = [{"messages": c} for c in CONVERSATIONS[1:]] * 2
    rows, counts = chat_data.sft_rows(conversations, tok, 160, packing=True, pad_id=0)
    assert len(rows) < len(conversations) and counts["examples"] == len(conversations)   # several per row
    torch.manual_seed(0)
    model = SmolLM2(ModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=tok.get_vocab_size(), max_position_embeddings=160),
                    init_std=0.3).eval()
    x, y, seg = (torch.from_numpy(rows[:, c].astype(np.int64)) for c in range(3))
    packed, _ = model(x, segments=seg)
    alone = [model(torch.tensor([chat.encode(tok, c["messages"])[0][:-1]]))[0][0] for c in conversations]
    # each row's segments in order; the padding after the last conversation of a row has no target
    order = [(r, s) for r in range(len(rows)) for s in seg[r].unique().tolist() if (y[r, seg[r] == s] != -100).any()]
    assert len(order) == len(alone)
    for (r, s), want in zip(order, alone):
        torch.testing.assert_close(packed[r, seg[r] == s], want, atol=2e-5, rtol=1e-4)
    # and the loss over the packed rows is the mean over every conversation's targets, each scored alone
    _, loss = model(x, y, segments=seg)
    per = [model(torch.from_numpy(xs)[None], torch.from_numpy(ys)[None], per_row=True)[1] for xs, ys in
           (chat_data._inputs_and_targets(*chat.encode(tok, c["messages"])) for c in conversations)]
    torch.testing.assert_close(loss, torch.cat(per).sum() / (y != -100).sum(), atol=1e-5, rtol=1e-5)


def test_a_trained_tokenizer_reserves_the_chat_tokens_after_eos(bpe_path):
    tok = Tokenizer.from_file(bpe_path)   # train_tokenizer's, in conftest
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", chat.IM_START, chat.IM_END)] == [0, 1, 2]
    assert chat.encode(tok, CONVERSATIONS[1])[0].count(1) == 3   # <|im_start|> is one token, not spelled out


def test_a_tokenizer_without_chat_tokens_gets_them_and_the_embedding_grows_with_mean_rows():
    tok = byte_bpe([TEXT], 300)
    model = SmolLM2(ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=1, vocab_size=300, max_position_embeddings=64))
    before = model.model.embed_tokens.weight.detach().clone()
    x = torch.tensor([tok.encode("What is 2 + 3?").ids])
    logits_before = model(x)[0]
    with pytest.raises(chat.ChatError, match="fine-tune the checkpoint with sft.py"):
        chat.encode(tok, CONVERSATIONS[1])
    note = chat.fit_embeddings(model, tok, chat.add_chat_tokens(tok), 300)
    assert [tok.token_to_id(t) for t in chat.CHAT_TOKENS] == [300, 301]
    assert "added as ids 300, 301" in note and "grown 300 -> 302 rows" in note and "mean embedding" in note
    w = model.model.embed_tokens.weight
    assert w.shape == (302, 32) and model.config.vocab_size == 302 and model.lm_head.weight is w   # still tied
    assert torch.equal(w[:300], before) and torch.allclose(w[300:], before.mean(0).expand(2, -1))
    torch.testing.assert_close(model(x)[0][..., :300], logits_before)   # old tokens score as before
    assert chat.encode(tok, CONVERSATIONS[1])[0].count(300) == 3
    assert chat.add_chat_tokens(tok) == [] and chat.fit_embeddings(model, tok, [], 302) is None   # only once


def test_fit_context_drops_the_oldest_turns_whole_and_keeps_the_system_message(smollm2_format):
    tok = Tokenizer.from_file(str(smollm2_format / "tokenizer.json"))
    messages = CONVERSATIONS[2]
    full = chat.prompt_ids(tok, messages)
    assert chat.fit_context(tok, messages, len(full)) == (full, 0)
    ids, dropped = chat.fit_context(tok, messages, len(full) - 1)
    assert dropped == 2 and ids == chat.prompt_ids(tok, [messages[0], messages[3]])
    with pytest.raises(chat.ChatError, match="at most 3 fit"):
        chat.fit_context(tok, messages, 3)


# ---------------------------------------------------------------- the export, and generate.py --chat


def test_the_export_holds_the_template_and_transformers_renders_it_as_we_do(chat_model_run, tmp_path):
    from transformers import AutoTokenizer
    ckpt = next((chat_model_run / "checkpoints").glob("*.pt"))
    state = torch.load(ckpt, weights_only=True)
    state["config"]["sft"] = {"model_name_or_path": "base", "dataset_name": "chats.jsonl"}   # as sft.py saves it
    save_atomic(state, tmp_path / "sft" / "checkpoints" / ckpt.name)
    (tmp_path / "sft" / "tokenizer.json").write_bytes((chat_model_run / "tokenizer.json").read_bytes())
    out = convert_hf.export_hf(str(tmp_path / "sft"), str(tmp_path / "hf"))
    auto, ours = AutoTokenizer.from_pretrained(str(out)), Tokenizer.from_file(str(out / "tokenizer.json"))
    for messages in CONVERSATIONS:
        text = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == chat.render(messages, add_generation_prompt=True)
        assert auto(text, add_special_tokens=False)["input_ids"] == chat.prompt_ids(ours, messages)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [0, ours.token_to_id(chat.IM_END)]   # a reply ends at <|im_end|>


def test_import_keeps_the_chat_template_of_the_hf_directory_for_the_next_export(chat_model_run, tmp_path):
    exported = convert_hf.export_hf(str(chat_model_run), str(tmp_path / "hf"))
    config = json.loads((exported / "tokenizer_config.json").read_text())
    assert config["chat_template"] == chat.CHAT_TEMPLATE   # a tokenizer with the chat tokens gets ours
    custom = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    (exported / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": custom}))
    convert_hf.import_hf(str(exported), str(tmp_path / "imported"))
    again = convert_hf.export_hf(str(tmp_path / "imported"), str(tmp_path / "hf2"))
    assert json.loads((again / "tokenizer_config.json").read_text())["chat_template"] == custom


def test_generate_chat_holds_a_conversation_and_each_reply_ends_at_im_end(chat_model_run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"hello\nhow are you?\n")))
    code = G.main(["--checkpoint_path", str(chat_model_run), "--chat", "--temperature", "0", "--max_new_tokens", "40"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.splitlines() == ["hi there, friend", "very well, thanks"]   # CHATS[0], its second turn in context
    # the second reply is what the one generation path gives for the whole conversation so far
    model = torch.load(next((chat_model_run / "checkpoints").glob("*.pt")), weights_only=True)
    tok = Tokenizer.from_file(str(chat_model_run / "tokenizer.json"))
    smol = SmolLM2(config_from_dict(model["config"]).model.model_config)
    smol.load_state_dict(model["model"])
    reply = generate(smol.eval(), [chat.prompt_ids(tok, CHATS[0][:3])], SamplingParams(40, temperature=0.0),
                     eos_id=chat.end_id(tok))[0]
    assert reply[-1] == chat.end_id(tok) and len(reply) < 40 and tok.decode(reply) == "very well, thanks"


def test_generate_chat_with_an_empty_system_message_sends_an_empty_system_turn(monkeypatch):
    tok = byte_bpe(["hello"], 300, ("<|endoftext|>", *chat.CHAT_TOKENS))
    prompts = []

    class Session:   # what converse() asks of a loaded model: a tokenizer, and a reply to the conversation so far
        tokenizer = tok

        def reply(self, messages, printer):
            prompts.append(chat.render(messages, add_generation_prompt=True))
            return "hi"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"hello\n")))
    G.converse(Session(), "")
    assert prompts == ["<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"]


def test_generate_chat_refuses_a_checkpoint_whose_tokenizer_cannot_chat(tmp_path, monkeypatch, capsys):
    tok = byte_bpe([TEXT], 300)
    cfg = config_from_dict({"model": {"model_config": {"hidden_size": 32, "intermediate_size": 64,
                                                       "num_hidden_layers": 1, "num_attention_heads": 2,
                                                       "num_key_value_heads": 1, "vocab_size": 300,
                                                       "max_position_embeddings": 64}},
                            "tokens": {"sequence_length": 64}})
    save_atomic({"model": SmolLM2(cfg.model.model_config).state_dict(), "config": config_to_dict(cfg)},
                tmp_path / "checkpoints" / "step_00000001.pt")
    tok.save(str(tmp_path / "tokenizer.json"))
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"hello\n")))
    assert G.main(["--checkpoint_path", str(tmp_path), "--chat"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: this tokenizer has no <|im_start|>") and "sft.py" in err[-1]
