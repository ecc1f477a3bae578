"""The tokenizer: a local tokenizer.json (trained here at first use), a folder holding one, or a Hub name.

`train_tokenizer` trains a byte-level BPE on the configured sources, with SmolLM2's special tokens first: EOS
(<|endoftext|>) is id 0, the chat template's <|im_start|> and <|im_end|> are 1 and 2. `load_tokenizer` checks that
the vocabulary fits the model and that its EOS is the config's.
"""

import itertools
import json
import os
import time

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from smollm2 import chat, shards, sources
from smollm2.config import Config
from smollm2.errors import DataError
from smollm2.stages import stages_of

EOS = "<|endoftext|>"
EOS_SPELLINGS = (EOS, "</s>", "<|end_of_text|>", "<eos>")


def load_tokenizer(cfg: Config) -> Tokenizer:
    """The configured tokenizer: a local tokenizer.json (trained on the sources first if it does not exist yet), a
    folder holding one, or a hub name. Its vocabulary must fit the model and its EOS must be the config's."""
    name = cfg.tokenizer.tokenizer_name_or_path
    path = os.path.join(name, "tokenizer.json") if os.path.isdir(name) else name
    if path.endswith(".json"):
        if not os.path.exists(path):
            with shards.exclusive(path + ".lock"):
                if not os.path.exists(path):
                    train_tokenizer(cfg)
        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:   # tokenizers raises a plain Exception for a malformed file
            raise DataError(f"tokenizer.tokenizer_name_or_path: cannot read {path} ({e})") from None
    else:
        tok = _hub_tokenizer(cfg)
    m = cfg.model.model_config
    if tok.get_vocab_size() > m.vocab_size:
        raise DataError(f"tokenizer '{name}' has {tok.get_vocab_size()} tokens but model.model_config.vocab_size is "
                        f"{m.vocab_size}: ids past the embedding table would crash training; raise vocab_size or use "
                        "a smaller tokenizer")
    eos = eos_token_id(tok)
    if m.eos_token_id is not None and m.eos_token_id != eos:
        raise DataError(f"model.model_config.eos_token_id is {m.eos_token_id} but tokenizer '{name}' has EOS at id "
                        f"{eos}; set model.model_config.eos_token_id={eos}")
    return tok


def _hub_tokenizer(cfg: Config) -> Tokenizer:
    """The tokenizer of a Hub repository. With the Hub unreachable, the copy in the Hugging Face cache, if any; when
    the tokenizer or a dataset the run would stream is missing, one error names both at once."""
    name, revision = cfg.tokenizer.tokenizer_name_or_path, cfg.tokenizer.tokenizer_revision or "main"
    if not sources.hub_reachable():
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(name, "tokenizer.json", revision=revision)
        needed = [] if isinstance(cached, str) else [f"the tokenizer '{name}' (tokenizer.tokenizer_name_or_path)"]
        for stage in stages_of(cfg):
            if not _prepared(stage.folder):
                needed += [f"the dataset '{d}' ({stage.where})" for d in
                           sources.hub_datasets(sources.sources(stage, cfg.data_prep.max_tokens))]
        if needed:
            raise sources.offline_error(needed)
        return Tokenizer.from_file(cached)
    try:
        return Tokenizer.from_pretrained(name, revision=revision)
    except Exception as e:
        raise DataError(f"tokenizer.tokenizer_name_or_path: cannot load '{name}' from the Hugging Face hub ({e}); "
                        "offline, give the path of a tokenizer.json") from None


def _prepared(folder: str) -> bool:
    """Whether prepare finished in a stage's folder (the loader then reads shards, no source)."""
    try:
        with open(os.path.join(folder, shards.STATE), encoding="utf-8") as f:
            return json.load(f).get("done") is True
    except (OSError, ValueError, AttributeError):
        return False


def eos_token_id(tokenizer: Tokenizer) -> int:
    """The id of the end-of-document token (SmolLM2's <|endoftext|>, or another usual spelling of EOS)."""
    for token in EOS_SPELLINGS:
        if (i := tokenizer.token_to_id(token)) is not None:
            return i
    raise DataError(f"the tokenizer has no end-of-document token (looked for {', '.join(EOS_SPELLINGS)})")


def train_tokenizer(cfg: Config) -> Tokenizer:
    """Train a byte-level BPE tokenizer of data_prep.tokenizer_vocab_size tokens on up to tokenizer_train_chars
    characters of the first data stage's mixed sources and save it at tokenizer.tokenizer_name_or_path. The special
    tokens take the first ids, as in SmolLM2: EOS is 0 (bos_token_id = eos_token_id = 0), and the chat template's
    <|im_start|> and <|im_end|> are 1 and 2, reserved so that a model pretrained here can be fine-tuned to chat
    (sft.py) with its vocabulary as it is. Byte-level: any text encodes, nothing is <unk>."""
    path, size = cfg.tokenizer.tokenizer_name_or_path, cfg.data_prep.tokenizer_vocab_size
    if not path.endswith(".json"):
        raise DataError(f"tokenizer.tokenizer_name_or_path is '{path}': a trained tokenizer is saved to a local file, "
                        "so give a path ending in .json, e.g. data/my-run/tokenizer.json")
    if os.path.exists(path):
        raise DataError(f"{path} exists; delete it to train a new tokenizer (shards made with it become unusable)")
    if size > cfg.model.model_config.vocab_size:
        raise DataError(f"data_prep.tokenizer_vocab_size ({size}) exceeds model.model_config.vocab_size "
                        f"({cfg.model.model_config.vocab_size})")
    stage = stages_of(cfg)[0]
    srcs = sources.sources(stage, cfg.data_prep.max_tokens)
    texts = sources.Mixer([sources.documents(s, stage) for s in srcs], srcs, use_caps=False)   # caps count tokens
    budget = cfg.data_prep.tokenizer_train_chars
    print(f"data: training a {size}-token BPE tokenizer on up to {budget:,} characters of the sources "
          f"(first use; {path})", flush=True)
    t0 = time.time()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=[EOS, *chat.CHAT_TOKENS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(itertools.takewhile(lambda _: sum(texts.taken) < budget, texts), trainer)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    shards.atomic_write(path, tok.to_str().encode())
    print(f"data: tokenizer trained in {time.time() - t0:.1f} s on {sum(texts.taken):,} characters", flush=True)
    return tok
