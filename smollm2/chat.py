"""The chat format: SmolLM2's chat template as one function, used by training, generation, the app and the export.

SmolLM2-Instruct writes a conversation in ChatML, every turn framed by two special tokens:

    <|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n
    <|im_start|>user\\nWhat is 2 + 3?<|im_end|>\\n
    <|im_start|>assistant\\n5<|im_end|>\\n

with that default system turn when a conversation brings none (a system message, even an empty one, replaces it).
`render()` writes this text; `CHAT_TEMPLATE` is the same rule as the Jinja string that transformers'
`apply_chat_template` and llama.cpp's converter read from an exported tokenizer (tests/test_chat.py renders both and
compares). Training tokenizes the rendered text, cut where each reply begins and ends, and marks the assistant's
tokens (each reply and the <|im_end|> that closes it: the model must learn to stop) as the only targets; generation
renders the conversation up to the assistant's opening line and stops at <|im_end|>.
"""

from typing import Iterator, Optional

from tokenizers import Tokenizer

from smollm2.errors import ChatError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_TOKENS = (IM_START, IM_END)
ROLES = ("system", "user", "assistant")
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# The "chat_template" of HuggingFaceTB/SmolLM2-1.7B-Instruct's tokenizer_config.json (its commit e4f7834, "chat
# template"); the 135M and 360M Instruct models and the alignment-handbook SmolLM2 recipes carry the same string. It is
# data, kept verbatim, so an exported tokenizer renders exactly what render() below writes.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def check_messages(messages, where: str = "messages") -> list[dict]:
    """A list of {"role": system|user|assistant, "content": str} -> the same list, or a ChatError naming the fault."""
    if not isinstance(messages, list) or not messages:
        raise ChatError(f"{where}: expected a non-empty list of {{role, content}} messages, got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ChatError(f"{where}[{i}]: expected {{'role': one of {', '.join(ROLES)}, 'content': text}}, "
                            f"got {m!r:.80}")
    return messages


def _pieces(messages: list[dict], add_generation_prompt: bool) -> Iterator[tuple[str, bool]]:
    """The template itself: the rendered text in pieces, each with whether it is the assistant's to write (a reply
    and its closing <|im_end|>)."""
    for i, m in enumerate(messages):
        if i == 0 and m["role"] != "system":
            yield f"{IM_START}system\n{DEFAULT_SYSTEM}{IM_END}\n", False
        yield f"{IM_START}{m['role']}\n", False
        yield m["content"] + IM_END, m["role"] == "assistant"
        yield "\n", False
    if add_generation_prompt:
        yield f"{IM_START}assistant\n", False


def render(messages: list[dict], add_generation_prompt: bool = False, continue_final_message: bool = False) -> str:
    """The conversation as SmolLM2's chat text; add_generation_prompt ends it with the assistant's opening line, where
    the model's reply begins; continue_final_message leaves the last message open, without the <|im_end|> and newline
    that close it, for the model to go on writing (transformers' flag of that name)."""
    text = "".join(piece for piece, _ in _pieces(messages, add_generation_prompt))
    return text[:-len(IM_END + "\n")] if continue_final_message else text


def has_chat_tokens(tokenizer: Tokenizer) -> bool:
    return all(tokenizer.token_to_id(t) is not None for t in CHAT_TOKENS)


def end_id(tokenizer: Tokenizer) -> int:
    """The id of <|im_end|>, where a reply ends; a ChatError if this tokenizer has no chat tokens."""
    if not has_chat_tokens(tokenizer):
        raise ChatError(f"this tokenizer has no {IM_START} / {IM_END} tokens, so it cannot hold a conversation: "
                        "fine-tune the checkpoint with sft.py first (it adds them)")
    return tokenizer.token_to_id(IM_END)


def encode(tokenizer: Tokenizer, messages: list[dict], last_reply_only: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is the assistant's (a training target);
    last_reply_only keeps only the final reply's tokens (DPO scores one reply).

    The text is cut where each reply begins and ends, and each stretch is tokenized on its own, so a token never
    straddles the boundary: the reply's tokens are those the model writes after the prompt that generation tokenizes
    up to `<|im_start|>assistant\\n`. (Tokenized whole, a reply opening with newlines would merge them with the one
    ending that line, and masking by characters would then drop them from the targets.)"""
    end_id(tokenizer)   # refuses a tokenizer that would spell the markers out as ordinary text
    stretches: list[tuple[str, bool]] = []   # alternating: the template's text, a reply
    for piece, mine in _pieces(messages, add_generation_prompt=False):
        if stretches and stretches[-1][1] == mine:
            stretches[-1] = (stretches[-1][0] + piece, mine)
        else:
            stretches.append((piece, mine))
    replies = [i for i, (_, mine) in enumerate(stretches) if mine]
    targets = set(replies[-1:] if last_reply_only else replies)
    ids, mask = [], []
    for i, enc in enumerate(tokenizer.encode_batch([text for text, _ in stretches], add_special_tokens=False)):
        ids += enc.ids
        mask += [i in targets] * len(enc.ids)
    return ids, mask


def prompt_ids(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """The ids a reply is generated from: the conversation so far and the assistant's opening line."""
    end_id(tokenizer)
    return tokenizer.encode(render(messages, add_generation_prompt=True), add_special_tokens=False).ids


def fit_context(tokenizer: Tokenizer, messages: list[dict], room: int) -> tuple[list[int], int]:
    """The ids of the longest recent part of a conversation whose prompt fits in `room` tokens: the oldest turns go
    first (a system message stays), whole, so the template stays intact -> (prompt ids, turns dropped). A ChatError
    when even the last message alone does not fit."""
    system, turns = (messages[:1], messages[1:]) if messages and messages[0]["role"] == "system" else ([], messages)
    ids = []
    for dropped in [i for i, m in enumerate(turns) if m["role"] == "user"] or [0]:   # start at a user's message
        ids = prompt_ids(tokenizer, system + turns[dropped:])
        if len(ids) <= room:
            return ids, dropped
    raise ChatError(f"the last message is {len(ids)} tokens with the template; at most {room} fit beside the reply")


# ---------------------------------------------------------------- giving a pretrained checkpoint the chat tokens


def add_chat_tokens(tokenizer: Tokenizer) -> list[str]:
    """Add <|im_start|> and <|im_end|> as special tokens where missing (new ids follow the vocabulary); return the
    ones added. A tokenizer trained here (tokenizer.py), or SmolLM2's, already has them as ids 1 and 2."""
    missing = [t for t in CHAT_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        tokenizer.add_special_tokens(missing)
    return missing


def fit_embeddings(model, tokenizer: Tokenizer, added: list[str], used_before: int) -> Optional[str]:
    """Give the tokens just added to the tokenizer rows of the embedding (and of an untied head): the matrix grows
    when an id lies past it, and each new row starts as the mean of the rows the tokenizer used before, a neutral
    point the model already reads as text, rather than noise. Returns the log line, or None if nothing was added."""
    import torch  # here, not at the top: data.py reads this file's token names and must stay light to import
    if not added:
        return None
    ids = [tokenizer.token_to_id(t) for t in added]
    tied = model.config.tie_word_embeddings
    matrices = [model.model.embed_tokens] + ([] if tied else [model.lm_head])   # (vocab, hidden) each
    old = matrices[0].weight.shape[0]
    size = max(old, max(ids) + 1)
    for module in matrices:
        w = module.weight.detach()
        if size > old:
            w = torch.cat([w, w.new_zeros(size - old, w.shape[1])])
            module.weight = torch.nn.Parameter(w)
        w[ids] = w[:used_before].float().mean(0).to(w.dtype)
    if size > old:
        model.model.embed_tokens.num_embeddings = model.lm_head.out_features = model.config.vocab_size = size
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
    grew = f"the embedding grown {old} -> {size} rows" if size > old else f"within the {old}-row embedding"
    head = " (the tied head with it)" if tied else " and the output head"
    return (f"chat: the tokenizer had no {', '.join(added)}: added as id{'s' if len(ids) > 1 else ''} "
            f"{', '.join(map(str, ids))}, {grew}{head}, each new row set to the mean embedding")
