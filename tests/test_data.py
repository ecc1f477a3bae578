"""data.py and sources.py: the tokenizer, the sources and their mixing, packing, and the loader's rank split and
resume."""

import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import build_config, write_documents
from tokenizers import Tokenizer

import data
from smollm2 import prepare, shards, sources, streaming
from smollm2.config_load import config_to_dict
from smollm2.errors import ConfigError, DataError
from smollm2.sources import Mixer, Source
from smollm2.stages import stages_of
from smollm2.tokenizer import eos_token_id, load_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def stream_of(out) -> np.ndarray:
    """The whole token stream (validation first, then training) of a prepared folder."""
    rows = [json.loads(line) for line in open(out / "manifest.jsonl")]
    return np.concatenate([shards.open_shard(str(out / r["file"]), 2**16) for r in rows]).astype(np.int64)


def sources_of(cfg) -> list[Source]:
    """The sources of the config's first data stage."""
    return sources.sources(stages_of(cfg)[0], cfg.data_prep.max_tokens)


def texts_of(cfg, source: int = 0) -> list[str]:
    """The texts of one source of the config, in the order they are read."""
    return [text for text, _ in sources.documents(sources_of(cfg)[source], stages_of(cfg)[0])]


def documents_of(tokens: np.ndarray, tok: Tokenizer) -> list[str]:
    """Cut a stream at its EOS tokens and decode each document."""
    eos = eos_token_id(tok)
    assert tokens[-1] == eos, "the stream must end with the last document's EOS"
    cuts = np.flatnonzero(tokens == eos)
    return [tok.decode(tokens[a + 1:b].tolist()) for a, b in zip(np.r_[-1, cuts[:-1]], cuts)]


# ---------------------------------------------------------------- tokenizer


def test_trained_tokenizer_has_eos_at_id_0_and_decodes_any_text_exactly(bpe_path):
    tok = Tokenizer.from_file(bpe_path)
    assert tok.get_vocab_size() == 300
    assert eos_token_id(tok) == 0 == tok.token_to_id("<|endoftext|>")
    text = "naïve 数据 tabs\tand\nnewlines ∑ 🙂"   # byte-level: characters never seen in training still round-trip
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text


def test_tokenizer_training_is_deterministic(tmp_path, bpe_path):
    write_documents(tmp_path / "text", "doc", 200)
    cfg = build_config(tmp_path, str(tmp_path / "new" / "again.json"), {"dataset_folder": str(tmp_path / "text")})
    assert train_tokenizer(cfg).to_str() == Tokenizer.from_file(bpe_path).to_str()


def test_missing_local_tokenizer_is_trained_on_first_use(tmp_path):
    write_documents(tmp_path / "text", "doc", 50)
    path = tmp_path / "new" / "tokenizer.json"
    tok = load_tokenizer(build_config(tmp_path, str(path), {"dataset_folder": str(tmp_path / "text")}))
    assert path.exists() and tok.get_vocab_size() == 300


def test_training_a_tokenizer_says_so_before_and_after(tmp_path, capsys):
    write_documents(tmp_path / "text", "doc", 20)
    path = tmp_path / "tokenizer.json"
    load_tokenizer(build_config(tmp_path, str(path), {"dataset_folder": str(tmp_path / "text")}))
    before, after = capsys.readouterr().out.splitlines()
    assert before.startswith("data: training a 300-token BPE tokenizer on up to 100,000,000 characters")
    assert after.startswith("data: tokenizer trained in ")


def test_tokenizer_larger_than_the_model_vocab_is_an_error(tmp_path, bpe_path):
    cfg = build_config(tmp_path, bpe_path, {"dataset_folder": "x"})
    cfg.model.model_config.vocab_size = 256
    with pytest.raises(DataError, match="has 300 tokens but model.model_config.vocab_size is 256"):
        load_tokenizer(cfg)


def test_config_eos_id_must_match_the_tokenizer(tmp_path, bpe_path):
    cfg = build_config(tmp_path, bpe_path, {"dataset_folder": "x"})
    cfg.model.model_config.eos_token_id = 5
    with pytest.raises(DataError, match="set model.model_config.eos_token_id=0"):
        load_tokenizer(cfg)


# ---------------------------------------------------------------- sources and mixing


def test_config_names_sources_in_nanotrons_forms_with_weights_and_checked_caps(tmp_path):
    cfg = build_config(tmp_path, "t.json", {"hf_dataset_or_datasets": ["org/a", "org/b"], "dataset_folder": ["x", "y"],
                                            "dataset_weights": [2, 0.5]}, max_tokens={"org/b": 10})
    assert sources_of(cfg) == [Source("org/a", 1.0, None, False), Source("org/b", 1.0, 10, False),
                               Source("x", 2.0, None, True), Source("y", 0.5, None, True)]
    cfg = build_config(tmp_path, "t.json", {"hf_dataset_or_datasets": {"org/a": 0.7, "builtin:python-stdlib": 0.3}})
    assert [(s.name, s.weight) for s in sources_of(cfg)] == [("org/a", 0.7), ("builtin:python-stdlib", 0.3)]
    assert not sources.all_local(sources_of(cfg))
    for dataset, prep, error in (({"dataset_folder": ["x", "y"], "dataset_weights": [1]}, {}, "one weight per"),
                                 ({"hf_dataset_or_datasets": {"a": 0}}, {}, "weight of 'a' must be > 0"),
                                 ({"hf_dataset_or_datasets": "a"}, {"max_tokens": {"b": 5}}, "not a source")):
        with pytest.raises(ConfigError, match=error):
            build_config(tmp_path, "t.json", dataset, **prep)
    with pytest.raises(ConfigError, match="no data source"):
        sources_of(build_config(tmp_path, "t.json", {}))


def test_builtin_corpus_is_the_standard_library_without_its_tests(tmp_path, bpe_path):
    cfg = build_config(tmp_path, bpe_path, {"hf_dataset_or_datasets": "builtin:python-stdlib"})
    texts = [text for text, _ in itertools.islice(sources.documents(sources_of(cfg)[0], stages_of(cfg)[0]), 20)]
    assert len(texts) == 20 and all(("def " in t or "import " in t or '"""' in t) for t in texts)


def test_mixing_follows_the_weights_to_within_one_document_and_stops_at_caps():
    def stream(tag, n):
        return ((np.full(10 + i % 7, tag), i) for i in range(n))
    srcs = [Source("a", 3.0, None, True), Source("b", 1.0, None, True), Source("c", 1.0, 200, True)]
    mixer = Mixer([stream(1, 1000), stream(2, 1000), stream(3, 1000)], srcs)
    for _ in itertools.islice(mixer, 500):   # taken/weight of the active sources stay within one document (<= 16)
        a, b, c = mixer.taken
        assert abs(a / 3 - b) <= 16
        assert abs(b - c) <= 16 or c >= 200
    list(mixer)
    assert 200 <= mixer.taken[2] < 217, "the capped source stops after the document that reaches its cap"
    assert mixer.docs[:2] == [1000, 1000], "the uncapped sources are read to their end"


def test_mixing_continues_exactly_from_its_saved_position():
    def stream(tag, after=None):   # (document, position): the position is the document's index
        start = 0 if after is None else after + 1
        return ((np.full(5 + i % 3, tag), i) for i in range(start, 100))
    srcs = [Source("a", 2.0, None, True), Source("b", 1.0, 150, True)]
    whole = [d.tolist() for d in Mixer([stream(1), stream(2)], srcs)]
    first = Mixer([stream(1), stream(2)], srcs)
    head = [d.tolist() for d in itertools.islice(first, 37)]
    state = first.state()
    rest = [d.tolist() for d in Mixer([stream(1, state["positions"][0]), stream(2, state["positions"][1])], srcs,
                                      state)]
    assert head + rest == whole


def test_weighted_sources_share_the_prepared_tokens_by_weight(tmp_path, bpe_path):
    write_documents(tmp_path / "a", "A", 300)
    write_documents(tmp_path / "b", "B", 300)
    cfg = build_config(tmp_path, bpe_path, {"dataset_folder": [str(tmp_path / "a"), str(tmp_path / "b")],
                                            "dataset_weights": [3, 1]},
                       max_tokens={str(tmp_path / "a"): 3000})
    prepare.prepare_stages(cfg, log=lambda _: None)
    tok = Tokenizer.from_file(bpe_path)
    tokens = stream_of(tmp_path / "shards")
    docs = documents_of(tokens, tok)
    lengths = [len(tok.encode(d, add_special_tokens=False).ids) + 1 for d in docs]
    from_a = sum(n for d, n in zip(docs, lengths) if d.startswith("A-"))
    assert 3000 <= from_a < 3000 + max(lengths), "source a stops after the document that reaches its cap"
    last_a = max(i for i, d in enumerate(docs) if d.startswith("A-"))   # until then both sources are active
    from_b = sum(n for d, n in zip(docs[:last_a + 1], lengths) if d.startswith("B-"))
    assert abs(from_a / 3 - from_b) <= max(lengths), "3:1 by tokens, exact up to one document"


def test_files_are_shuffled_by_the_seed_and_each_read_exactly_once(tmp_path, bpe_path):
    texts = write_documents(tmp_path / "text", "doc", 60)
    orders = []
    for seed in (1, 1, 2):
        cfg = build_config(tmp_path, bpe_path, {"dataset_folder": str(tmp_path / "text")})
        cfg.data_stages[0].data.seed = seed
        orders.append(texts_of(cfg))
    assert orders[0] == orders[1] != orders[2]
    assert sorted(orders[0]) == sorted(orders[2]) == sorted(texts)


def test_jsonl_and_parquet_rows_are_documents(tmp_path, bpe_path):
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "a.jsonl").write_text('{"body": "one"}\n\n{"body": "two"}\n{"body": null}\n')
    pq.write_table(pa.table({"body": ["three", "  ", "four"]}), tmp_path / "rows" / "b.parquet")
    cfg = build_config(tmp_path, bpe_path, {"dataset_folder": str(tmp_path / "rows"), "text_column_name": "body"})
    assert sorted(texts_of(cfg)) == ["four", "one", "three", "two"]


def test_a_hub_style_dataset_is_read_through_datasets_and_streams_the_same_blocks_as_prepared_shards(
        tmp_path, bpe_path):
    texts = write_documents(tmp_path / "texts", "H", 120)
    (tmp_path / "hub" / "data").mkdir(parents=True)   # the layout of a dataset repository on the hub
    pq.write_table(pa.table({"content": texts[:80]}), tmp_path / "hub" / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"content": texts[80:]}), tmp_path / "hub" / "data" / "train-00001-of-00002.parquet")
    cfg = build_config(tmp_path, bpe_path, {"hf_dataset_or_datasets": str(tmp_path / "hub"),
                                            "hf_dataset_splits": "train", "text_column_name": "content"})
    assert texts_of(cfg) == texts

    streamed = data.train_loader(cfg)   # a datasets source is streamed when it has not been prepared
    assert isinstance(streamed.blocks, streaming.StreamedBlocks)
    [streamed_val] = data.val_loaders(cfg).values()
    prepare.prepare_stages(cfg, log=lambda _: None)
    prepared, [prepared_val] = data.train_loader(cfg), data.val_loaders(cfg).values()
    assert isinstance(prepared.blocks, data._Blocks)
    for _ in range(prepared.blocks.n_blocks // 2 + 3):   # into the second epoch
        assert all(torch.equal(a, b) for a, b in zip(streamed.next_batch(), prepared.next_batch()))
    assert all(torch.equal(a, b) for a, b in zip(streamed_val.next_batch(), prepared_val.next_batch()))

    pq.write_table(pa.table({"content": ["a test row"]}), tmp_path / "hub" / "data" / "test-00000-of-00001.parquet")
    cfg.data_stages[0].data.dataset.hf_dataset_splits = ["test", "train"]
    assert texts_of(cfg) == ["a test row"] + texts

    cfg.data_stages[0].data.dataset.text_column_name = "text"
    with pytest.raises(DataError, match="no column 'text' .*it has content"):
        texts_of(cfg)


@pytest.mark.parametrize("name, content, error", [
    ("bad.txt", b"caf\xe9 au lait", r"bad.txt: not UTF-8 text"),
    ("rows.jsonl", b'{"body": "x"}\n', r"rows.jsonl line 1: no field 'text' \(it has body\)"),
    ("rows.jsonl", b'{"text": "x"}\n{"text": broken\n', r"rows.jsonl: cannot read it"),
    ("rows.jsonl", b'{"text": 3}\n', r"holds int, not text"),
    ("empty.txt", b"  \n", r"has no text"),
])
def test_bad_input_is_one_clear_error_naming_the_file(tmp_path, bpe_path, name, content, error):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / name).write_bytes(content)
    cfg = build_config(tmp_path, bpe_path, {"dataset_folder": str(tmp_path / "in")})
    with pytest.raises(DataError, match=error):
        prepare.prepare_stages(cfg, log=lambda _: None)


def test_a_folder_or_glob_with_no_file_is_an_error(tmp_path, bpe_path):
    cfg = build_config(tmp_path, bpe_path, {"dataset_folder": str(tmp_path / "nothing" / "*.txt")})
    with pytest.raises(DataError, match=r"nothing/\*.txt' is no file or folder"):
        prepare.prepare_stages(cfg, log=lambda _: None)


# ---------------------------------------------------------------- packing


@pytest.fixture
def prepared(tmp_path, bpe_path):
    texts = write_documents(tmp_path / "text", "doc", 150)
    cfg = build_config(tmp_path, bpe_path, {"dataset_folder": str(tmp_path / "text")})
    prepare.prepare_stages(cfg, log=lambda _: None)
    return cfg, texts, Tokenizer.from_file(bpe_path)


def test_packing_puts_eos_after_every_document_with_nothing_lost_repeated_or_padded(prepared, tmp_path):
    cfg, texts, tok = prepared
    tokens = stream_of(tmp_path / "shards")
    docs = documents_of(tokens, tok)
    assert sorted(docs) == sorted(texts), "every document exactly once, decoded exactly"
    assert (tokens == 0).sum() == len(texts), "one EOS per document and no other (no padding token anywhere)"


def test_blocks_are_full_length_and_their_concatenation_is_the_training_stream(prepared, tmp_path):
    cfg, _, _ = prepared
    train = np.concatenate([shards.open_shard(str(p), 512) for p in sorted((tmp_path / "shards").glob(
        "train_*.bin"))]).astype(np.int64)
    loader = data.train_loader(cfg)
    L, n_blocks = 16, len(train) // 16
    batches = [loader.next_batch() for _ in range(n_blocks // 2)]
    assert all(x.shape == y.shape == (2, 15) and x.dtype == y.dtype == torch.int64 for x, y in batches)
    x = np.concatenate([b[0].numpy() for b in batches])
    y = np.concatenate([b[1].numpy() for b in batches])
    blocks = np.concatenate([x, y[:, -1:]], axis=1)
    assert (blocks.reshape(-1) == train[:len(blocks) * L]).all()
    assert (x[:, 1:] == y[:, :-1]).all(), "y is x shifted by one token"
    assert (y == 0).any() and not (y < 0).any(), "EOS is a target, and nothing is masked out (-100)"


def test_validation_split_is_held_out_whole_documents(prepared, tmp_path):
    cfg, _, tok = prepared
    rows = [json.loads(line) for line in open(tmp_path / "shards" / "manifest.jsonl")]
    val = [r for r in rows if r["split"] == "val"]
    val_docs = documents_of(shards.open_shard(str(tmp_path / "shards" / val[0]["file"]), 512), tok)
    last = len(tok.encode(val_docs[-1], add_special_tokens=False).ids) + 1
    assert len(val) == 1 and val[0]["tokens"] - last < 300 <= val[0]["tokens"], "whole documents up to val_tokens"
    train = np.concatenate([shards.open_shard(str(tmp_path / "shards" / r["file"]), 512)
                            for r in rows if r["split"] == "train"])
    assert not set(val_docs) & set(documents_of(train, tok))


# ---------------------------------------------------------------- loader


def blocks_of(loader, n) -> list[tuple]:
    return [tuple(row) for _ in range(n) for row in loader.next_batch()[0].tolist()]


def test_ranks_read_disjoint_blocks_that_together_are_what_one_process_reads(prepared):
    cfg, _, _ = prepared
    k, W = 3, 2
    one = data.train_loader(cfg)
    ranks = [data.train_loader(cfg, rank, W) for rank in range(W)]
    for _ in range(4):   # optimizer steps: one process with accumulation W*k == W ranks with accumulation k
        step = [blocks_of(r, k) for r in ranks]
        assert not set(step[0]) & set(step[1])
        assert sorted(step[0] + step[1]) == sorted(blocks_of(one, W * k))


def test_loader_resumes_exactly_where_it_stopped_also_under_another_world_size(prepared):
    cfg, _, _ = prepared
    a = data.train_loader(cfg, 1, 2)
    blocks_of(a, 5)
    state = a.state_dict()
    assert all(isinstance(v, int) for v in state.values())
    b = data.train_loader(cfg, 1, 2)
    b.load_state_dict(state)
    assert blocks_of(b, 7) == blocks_of(a, 7)

    single, pair = data.train_loader(cfg), [data.train_loader(cfg, r, 2) for r in range(2)]
    for r in pair:
        blocks_of(r, 3)
    mid = pair[0].state_dict()   # 6 micro-batches taken by the pair
    single.load_state_dict(mid)
    assert blocks_of(single, 2) == blocks_of(pair[0], 1) + blocks_of(pair[1], 1)
    with pytest.raises(DataError, match="cannot be split evenly over 4 ranks"):
        data.train_loader(cfg, 0, 4).load_state_dict(mid)
    cfg.tokens.micro_batch_size = 3
    with pytest.raises(DataError, match="micro_batch_size 2"):
        data.train_loader(cfg).load_state_dict(state)


def test_loader_cycles_through_epochs_and_validation_restarts_on_reset(prepared):
    cfg, _, _ = prepared
    loader = data.train_loader(cfg)
    first = blocks_of(loader, 1)
    blocks_of(loader, loader.blocks.n_blocks - 1)   # n_blocks micro-batches of 2 blocks: two whole epochs
    assert blocks_of(loader, 1) == first
    [val] = data.val_loaders(cfg).values()
    once = blocks_of(val, 3)
    val.reset()
    assert blocks_of(val, 3) == once


def test_a_token_id_past_the_vocabulary_is_refused_wherever_it_sits_in_a_block(prepared):
    cfg, _, _ = prepared
    for position in (0, 7, 15):   # an input only, both, a target only (block = sequence_length + 1 = 16 tokens)
        tokens = np.zeros(64, np.uint16)
        tokens[16 + position] = 600   # the second block; model vocab_size is 512
        loader = data.TokenLoader(data._Blocks([tokens], 16, "test"), cfg.tokens, cfg.model.model_config.vocab_size)
        with pytest.raises(DataError, match="token id 600 is outside the model's vocabulary \\(512\\)"):
            loader.next_batch()   # micro-batch of 2 blocks: blocks 0 and 1


# ---------------------------------------------------------------- no network


def offline(tmp_path) -> dict:
    """The environment of a machine where the Hub does not answer: its endpoint is a closed local port, and the
    Hugging Face cache is an empty folder of its own."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf_home")}


def test_the_135M_config_with_no_network_fails_at_once_naming_the_tokenizer_and_the_dataset(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", "config_smollm2_135M.yaml",
                           f"checkpoints.checkpoints_path={tmp_path / 'run'}",
                           f"data_prep.output_dir={tmp_path / 'd'}"],
                          cwd=ROOT, env=offline(tmp_path), capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "Retrying" not in proc.stdout + proc.stderr
    for needed in ("tokenizer 'HuggingFaceTB/cosmo2-tokenizer'", "dataset 'HuggingFaceTB/smollm-corpus'",
                   "HF_HUB_OFFLINE=1", "python data.py prepare", "dataset_folder", "config_tiny.yaml"):
        assert needed in lines[0], needed


def test_offline_a_tokenizer_in_the_hugging_face_cache_and_a_local_dataset_still_train(tmp_path, bpe_path):
    env = offline(tmp_path)
    snapshot = tmp_path / "hf_home" / "hub" / "models--org--tok" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)   # the cache's own layout, as huggingface_hub leaves it after a download
    (snapshot / "tokenizer.json").write_bytes(open(bpe_path, "rb").read())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    texts = write_documents(tmp_path / "texts", "H", 60)
    (tmp_path / "hub" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": texts}), tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    cfg = build_config(tmp_path, "org/tok", {"hf_dataset_or_datasets": str(tmp_path / "hub")})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    script = ("import data; from smollm2.config_load import load_config; cfg = load_config('cfg.yaml'); "
              "x, y = data.train_loader(cfg).next_batch(); print('batch', tuple(x.shape))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "batch (2, 15)" in proc.stdout, proc.stderr
    assert "Retrying" not in proc.stderr
