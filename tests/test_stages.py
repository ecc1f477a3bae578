"""Data stages: each stage's mixture from its start_training_step, every stage's position in the loader's state,
resume inside and across a switch, the rank split within a stage, and validation following the running stage; the
data path is handed each stage as a frozen Stage, never a copy of the Config."""

import dataclasses

import pytest
from helpers import write_documents
from tokenizers import Tokenizer

import data
from smollm2 import prepare, stages
from smollm2.config import Config
from smollm2.config_load import config_from_dict
from smollm2.errors import DataError
from smollm2.stages import data_dir, stages_of

K = 2   # micro-batches per optimizer step (accumulation)


@pytest.fixture
def staged(tmp_path, bpe_path):
    """Stage 'warm' reads A-documents from step 1, 'decay' B- and C-documents 1:1 from step 5."""
    for tag in "ABC":
        write_documents(tmp_path / tag, tag, 80)
    folder = lambda tag: str(tmp_path / tag)   # noqa: E731
    return config_from_dict({
        "data_stages": [
            {"name": "decay", "start_training_step": 5,
             "data": {"dataset": {"dataset_folder": [folder("B"), folder("C")], "dataset_weights": [1, 1]}}},
            {"name": "warm", "start_training_step": 1, "data": {"dataset": {"dataset_folder": folder("A")}}}],
        "model": {"model_config": {"vocab_size": 512, "max_position_embeddings": 64, "hidden_size": 32,
                                   "num_attention_heads": 2, "num_key_value_heads": 1}},
        "tokenizer": {"tokenizer_name_or_path": bpe_path},
        "tokens": {"sequence_length": 15, "micro_batch_size": 2, "train_steps": 12},
        "data_prep": {"output_dir": str(tmp_path / "shards"), "shard_tokens": 1000, "val_tokens": 200},
    })


def run_steps(loader, first: int, last: int, k: int = K) -> list[list[list[int]]]:
    """The blocks of optimizer steps first..last (1-based), as the training loop takes them."""
    steps = []
    for step in range(first, last + 1):
        loader.begin_step(step)
        steps.append([loader.next_batch()[0].tolist() for _ in range(k)])
    return steps


def stage_blocks(cfg, index: int, first: int, count: int) -> list[list[int]]:
    """Blocks first.. of one stage's own training split, inputs only (as next_batch() gives them)."""
    blocks = data.train_loader(cfg, stage=stages_of(cfg)[index]).blocks
    return [block[:-1].tolist() for block in blocks.read(first, count)]


def test_each_stage_runs_from_its_start_step_with_its_own_mixture(staged, bpe_path):
    tok = Tokenizer.from_file(bpe_path)
    loader = data.StagedLoader(staged, tokenizer=tok, log=lambda _: None)
    steps = [sum(micro, []) for micro in run_steps(loader, 1, 9)]   # each step: K micro-batches of 2 blocks
    per_step = 2 * K
    assert sum(steps[:4], []) == stage_blocks(staged, 0, 0, 4 * per_step), "steps 1-4: the first stage, in order"
    assert sum(steps[4:], []) == stage_blocks(staged, 1, 0, 5 * per_step), "from step 5: the second, from its start"
    assert loader.name == "decay" and stages.stage_at(staged, 4) == 0 and stages.stage_at(staged, 5) == 1
    assert stages.describe(staged, 1) == "stage 2/2 'decay' (from step 5)"


@pytest.mark.parametrize("stop", [2, 4, 7])   # inside the first stage, right at the switch, inside the second
def test_a_resume_continues_every_stage_where_it_stopped(staged, bpe_path, stop):
    tok = Tokenizer.from_file(bpe_path)
    whole = run_steps(data.StagedLoader(staged, tokenizer=tok, log=lambda _: None), 1, 10)
    first = data.StagedLoader(staged, tokenizer=tok, log=lambda _: None)
    run_steps(first, 1, stop)
    state = first.state_dict()
    assert set(state["stages"]) == ({"warm"} if stop < 5 else {"warm", "decay"})
    resumed = data.StagedLoader(staged, tokenizer=tok, log=lambda _: None)
    resumed.load_state_dict(state)
    assert run_steps(resumed, stop + 1, 10) == whole[stop:]


def test_ranks_share_no_block_and_two_ranks_equal_one_process_with_twice_the_accumulation(staged, bpe_path):
    tok = Tokenizer.from_file(bpe_path)
    one = run_steps(data.StagedLoader(staged, tokenizer=tok, log=lambda _: None), 1, 8, k=2 * K)
    ranks = [run_steps(data.StagedLoader(staged, r, 2, tok, log=lambda _: None), 1, 8) for r in range(2)]
    for step in range(8):
        a, b = ranks[0][step], ranks[1][step]
        rows = lambda micro: [tuple(row) for m in micro for row in m]   # noqa: E731
        assert not set(rows(a)) & set(rows(b))
        assert sorted(rows(a) + rows(b)) == sorted(rows(one[step]))


def test_validation_follows_the_running_stage_source_by_source(staged, bpe_path):
    tok = Tokenizer.from_file(bpe_path)
    loader = data.StagedLoader(staged, tokenizer=tok, log=lambda _: None)
    loader.begin_step(1)
    [(name, weight, val)] = loader.validation()
    assert name.endswith("/A") and weight == 1.0 and tok.decode(val.blocks.arrays[0].tolist()).startswith("A-")
    loader.begin_step(5)
    held = {name.rsplit("/", 1)[1]: val for name, _, val in loader.validation()}
    assert set(held) == {"B", "C"}
    for tag, val in held.items():   # each source's held-out documents, and only its own
        docs = tok.decode(val.blocks.arrays[0].tolist(), skip_special_tokens=False).split("<|endoftext|>")[:-1]
        assert docs and all(doc.startswith(f"{tag}-") for doc in docs)


def test_prepare_prepares_every_stage_in_its_own_folder(staged):
    states = prepare.prepare_stages(staged, log=lambda _: None)
    assert [s["done"] for s in states] == [True, True]
    assert [stage.folder for stage in stages_of(staged)] == [f"{data_dir(staged)}/warm", f"{data_dir(staged)}/decay"]
    assert {r["source"].rsplit("/", 1)[1] for r in states[1]["shards"] if r["split"] == "val"} == {"B", "C"}


def test_checkpoints_from_before_stages_resume_the_first_stage_and_unknown_stages_are_refused(staged, bpe_path):
    tok = Tokenizer.from_file(bpe_path)
    single = data.train_loader(staged, tokenizer=tok, stage=stages_of(staged)[0])
    single.next_batch()
    loader = data.StagedLoader(staged, tokenizer=tok, log=lambda _: None)
    loader.load_state_dict(single.state_dict())   # the data position of a checkpoint written before stages
    assert loader.state_dict() == {"stages": {"warm": single.state_dict()}}
    with pytest.raises(DataError, match="stage\\(s\\) stable phase, which data_stages no longer names"):
        loader.load_state_dict({"stages": {"stable phase": single.state_dict()}})


def test_the_data_path_is_handed_frozen_stages_and_never_a_copy_of_the_config(staged, bpe_path, monkeypatch):
    decay = stages_of(staged)[1]
    assert (decay.index, decay.name, decay.where) == (1, "decay", "data_stages[1].data.dataset")
    with pytest.raises(dataclasses.FrozenInstanceError):
        decay.seed = 3
    assert not hasattr(stages, "stage_view"), "a Config copy per stage, with its index patched on, is gone"
    built, init = [], Config.__init__   # every Config made from here on (dataclasses.replace calls __init__ too)

    def counted(self, *args, **kwargs):
        built.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(Config, "__init__", counted)
    dataclasses.replace(staged)   # what stage_view did, once per stage: it is counted
    assert len(built) == 1
    built.clear()
    prepare.prepare_stages(staged, log=lambda _: None)
    loader = data.StagedLoader(staged, tokenizer=Tokenizer.from_file(bpe_path), log=lambda _: None)
    for step in (1, 5):   # each stage's training and validation data
        run_steps(loader, step, step)
        loader.validation()
    assert loader.name == "decay" and built == []
