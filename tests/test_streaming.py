"""Streamed `datasets` sources resume exactly, and at once: the checkpointed position is the library's own
iterable-dataset state, so a resumed loader reads nothing twice and gives the batches the uninterrupted run gives.

The sources are local folders of JSON-lines files, loaded by `datasets.load_dataset(folder, streaming=True)` exactly
as a hub dataset is (each file is one shard of the stream); two of them are mixed 3:1.
"""

import json
import random

import datasets
import pytest
import torch
from helpers import WORDS, build_config

import data
from smollm2 import streaming
from smollm2.tokenizer import load_tokenizer


def hub_folder(root, tag: str, files: int, rows: int):
    root.mkdir(parents=True)
    rng = random.Random(tag)
    for f in range(files):
        with open(root / f"train-{f:05d}.jsonl", "w", encoding="utf-8") as out:
            for r in range(rows):
                text = f"{tag}{f}.{r} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
                out.write(json.dumps({"text": "" if r % 17 == 5 else text}) + "\n")   # some rows are empty


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, bpe_path):
    root = tmp_path_factory.mktemp("hub")
    hub_folder(root / "web", "W", files=12, rows=40)
    hub_folder(root / "code", "C", files=6, rows=40)
    return build_config(root, bpe_path, {"hf_dataset_or_datasets": {str(root / "web"): 3.0, str(root / "code"): 1.0}},
                        val_tokens=200)


def batches(loader, n: int) -> list[list[int]]:
    out = []
    for _ in range(n):
        x, y = loader.next_batch()
        out.append(torch.cat([x, y[:, -1:]], dim=1).flatten().tolist())
    return out


@pytest.fixture
def rows_read(monkeypatch):
    """How many rows the `datasets` library has yielded since the fixture was made (all iterable datasets)."""
    count = [0]
    original = datasets.IterableDataset.__iter__

    def counting(self):
        for row in original(self):
            count[0] += 1
            yield row

    monkeypatch.setattr(datasets.IterableDataset, "__iter__", counting)
    return count


def test_a_resumed_stream_gives_the_uninterrupted_runs_batches(mixed):
    whole = data.train_loader(mixed)
    assert isinstance(whole.blocks, streaming.StreamedBlocks)
    expected = batches(whole, 70)
    for stop in (1, 23, 45):
        first = data.train_loader(mixed)
        assert batches(first, stop) == expected[:stop]
        state = json.loads(json.dumps(first.state_dict()))   # what a checkpoint holds: plain JSON-able values
        resumed = data.train_loader(mixed)
        resumed.load_state_dict(state)
        assert batches(resumed, 70 - stop) == expected[stop:], f"resumed after {stop} micro-batches"


def test_a_stream_saved_by_two_ranks_resumes_on_one(mixed):
    whole = batches(data.train_loader(mixed), 24)
    ranks = [data.train_loader(mixed, rank, 2) for rank in range(2)]
    for _ in range(5):   # 5 optimizer steps: each rank one micro-batch
        for r in ranks:
            batches(r, 1)
    single = data.train_loader(mixed)
    single.load_state_dict(ranks[0].state_dict())   # rank 0 saves for both
    assert batches(single, 14) == whole[10:]


def test_resuming_reads_as_many_rows_near_the_start_as_far_into_the_stream(tmp_path, bpe_path, rows_read):
    hub_folder(tmp_path / "web", "W", files=80, rows=40)   # more rows than the tokenizer reads ahead, at any position
    hub_folder(tmp_path / "code", "C", files=40, rows=40)
    cfg = build_config(tmp_path, bpe_path, {"hf_dataset_or_datasets": {str(tmp_path / "web"): 3.0,
                                                                       str(tmp_path / "code"): 1.0}})
    cfg.tokens.sequence_length, cfg.tokens.micro_batch_size = 63, 8
    reads, consumed = {}, {}
    for stop in (2, 150):
        loader = data.train_loader(cfg)
        batches(loader, stop)
        state = loader.state_dict()
        consumed[stop] = sum(state["stream"]["mixer"]["docs"])
        rows_read[0] = 0
        resumed = data.train_loader(cfg)
        resumed.load_state_dict(state)
        batches(resumed, 1)
        reads[stop] = rows_read[0]
    # what a resume reads ahead may differ by a row or so with where the position falls in a file; not with how far
    assert abs(reads[150] - reads[2]) <= 40, "the rows a resume reads do not depend on the position"
    assert reads[150] < consumed[150], "a resume does not read the stream again up to its position"


def test_each_sources_held_out_documents_are_its_own_and_kept_out_of_training(mixed):
    val = data.val_loaders(mixed)
    assert set(val) == set(mixed.data_stages[0].data.dataset.hf_dataset_or_datasets)
    tok = load_tokenizer(mixed)
    held = {name: tok.decode(loader.blocks.arrays[0].tolist()) for name, loader in val.items()}
    web, code = sorted(held, key=lambda name: "code" in name)
    assert "W0.0 " in held[web] and "C" not in held[web].replace("<|endoftext|>", "")[:1]
    assert held[code].startswith("C0.0 ")
    training = tok.decode(sum(batches(data.train_loader(mixed), 5), []))
    assert "W0.0 " not in training and "C0.0 " not in training
