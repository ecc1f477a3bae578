"""Folders tokenized by the real `datatrove` package (its tokenizer step, on local text, offline) are read as tokens:
every document once, exactly as datatrove tokenized it, ending in EOS; mixed with text sources; trainable."""

import json

import numpy as np
import pytest
from helpers import build_config, byte_bpe, datatrove_tokenize, write_documents
from tokenizers import Tokenizer

import data
from smollm2 import datatrove_folder, prepare, shards, sources
from smollm2.errors import DataError
from smollm2.stages import stages_of
from smollm2.tokenizer import eos_token_id


def prepared_documents(cfg, tok) -> list[list[int]]:
    """The documents of a prepared folder's whole stream (validation first), cut at EOS."""
    prepare.prepare_stages(cfg, log=lambda _: None)
    out = cfg.data_prep.output_dir
    rows = [json.loads(line) for line in open(f"{out}/manifest.jsonl")]
    stream = np.concatenate([shards.open_shard(f"{out}/{r['file']}", 2**16) for r in rows]).tolist()
    docs, start = [], 0
    for i, t in enumerate(stream):
        if t == eos_token_id(tok):
            docs.append(stream[start:i + 1])
            start = i + 1
    assert start == len(stream)
    return docs


@pytest.fixture
def texts(tmp_path):
    return write_documents(tmp_path / "text", "doc", 120)


@pytest.mark.parametrize("eos", [True, False])
def test_a_datatrove_folder_is_read_as_its_tokens_one_eos_per_document(tmp_path, bpe_path, texts, eos):
    datatrove_tokenize(texts, tmp_path / "tokens", bpe_path, eos=eos)
    assert datatrove_folder.is_tokenized(str(tmp_path / "tokens"))
    cfg = build_config(tmp_path, bpe_path, {"dataset_folder": [str(tmp_path / "tokens")]})
    tok = Tokenizer.from_file(bpe_path)
    [src] = sources.sources(stages_of(cfg)[0], cfg.data_prep.max_tokens)
    assert src.tokens and src.local
    docs = prepared_documents(cfg, tok)
    want = sorted(tok.encode(t, add_special_tokens=False).ids + [0] for t in texts)
    assert sorted(docs) == want, "every document once, its tokens as datatrove wrote them, EOS added where missing"


def test_a_datatrove_folder_mixes_with_text_by_weight_and_trains(tmp_path, bpe_path, texts):
    datatrove_tokenize(texts[:60], tmp_path / "tokens", bpe_path)
    cfg = build_config(tmp_path, bpe_path, {"dataset_folder": [str(tmp_path / "tokens"), str(tmp_path / "text")],
                                            "dataset_weights": [1.0, 1.0]})
    loader = data.train_loader(cfg)   # prepared at first use, like any local source
    x, y = loader.next_batch()
    assert x.shape == (2, 15) and int(y.max()) < 300
    assert set(data.val_loaders(cfg)) == {str(tmp_path / "tokens"), str(tmp_path / "text")}


def test_a_datatrove_folder_of_another_tokenizer_is_refused_by_name(tmp_path, bpe_path, texts):
    other = tmp_path / "other.json"
    byte_bpe(texts, 280).save(str(other))
    datatrove_tokenize(texts, tmp_path / "tokens", str(other), tasks=1)
    cfg = build_config(tmp_path, bpe_path, {"dataset_folder": str(tmp_path / "tokens")})
    with pytest.raises(DataError, match=f"was tokenized with '{other}' but tokenizer.tokenizer_name_or_path is"):
        prepare.prepare_stages(cfg, log=lambda _: None)


@pytest.mark.parametrize("damage, message", [
    ("index", r"no .*\.ds\.index beside it.*datatrove-tokenized folder holds"),
    ("metadata", r"no .*\.ds\.metadata beside it"),
    ("binary", r"not UTF-8 text .*or a folder tokenized by datatrove \(\.ds files with their \.ds\.index"),
])
def test_a_folder_that_is_neither_text_nor_datatrove_tokens_says_what_was_expected(tmp_path, bpe_path, texts,
                                                                                    damage, message):
    folder = tmp_path / "in"
    if damage == "binary":
        folder.mkdir()
        (folder / "weights.bin").write_bytes(bytes(range(256)))
    else:
        datatrove_tokenize(texts, folder, bpe_path, tasks=1)
        next(folder.glob(f"*.ds.{damage}")).unlink()
    cfg = build_config(tmp_path, bpe_path, {"dataset_folder": str(folder)})
    with pytest.raises(DataError, match=message):
        prepare.prepare_stages(cfg, log=lambda _: None)
