"""The official recipe through train.py: data stages switching at their step (and resumed inside and across the
switch), a datatrove-tokenized folder trained on unchanged, each source's validation loss, nanotron's keys."""

import json

import pytest
import torch
import yaml
from helpers import ROOT, datatrove_tokenize, losses, make_config, run_train, write_code_corpus

import train
from smollm2.checkpoint import list_checkpoints, load_checkpoint
from smollm2.config_load import config_from_dict, load_config
from smollm2.metrics import read_metrics
from smollm2.tokenizer import load_tokenizer

SWITCH = 5   # the second stage's start_training_step


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """Stage 'stable' reads a text folder from step 1; stage 'decay', from step 5, a datatrove-tokenized folder and
    another text folder, 2:1. The datatrove folder is made with the run's tokenizer, trained first."""
    root = tmp_path_factory.mktemp("recipe")
    write_code_corpus(root / "text")
    (root / "other").mkdir()
    (root / "other" / "notes.txt").write_text((ROOT / "README.md").read_text())
    path = make_config(root / "cfg", root, **{"tokens.train_steps": 10, "checkpoints.checkpoint_interval": 4,
                                              "tokens.val_check_interval": 5,
                                              "model.model_config.rope_interleaved": True,
                                              "checkpoints.save_initial_state": True,
                                              "run.weight_decay_exclude_1d": True})
    config = yaml.safe_load(path.read_text())
    load_tokenizer(load_config(str(path)))   # trained on the first stage's text, at first use
    texts = [p.read_text() for p in sorted((root / "text").glob("*.py"))]
    datatrove_tokenize([t[i:i + 3000] for t in texts for i in range(0, len(t), 3000)], root / "tokens",
                       str(root / "tokenizer.json"))
    config["data_stages"] = [
        {"name": "stable", "start_training_step": 1, "data": {"seed": 1, "dataset": {"dataset_folder": [
            str(root / "text")]}}},
        {"name": "decay", "start_training_step": SWITCH, "data": {"seed": 1, "dataset": {
            "dataset_folder": [str(root / "tokens"), str(root / "other")], "dataset_weights": [2.0, 1.0]}}}]
    path.write_text(yaml.safe_dump(config))
    out = run_train(path)
    return root, path, out


def test_each_stage_runs_from_its_step_and_the_log_says_which(recipe):
    root, _, out = recipe
    records = read_metrics(root / "cfg" / "run" / "metrics.jsonl")
    stages = [(r["step"], r["stage"]) for r in records if r["kind"] == "train"]
    assert stages == [(s, "stable" if s < SWITCH else "decay") for s in range(1, 11)]
    assert "data stage 1/2 'stable' (from step 1)" in out.stdout
    assert "data: stage 2/2 'decay' (from step 5) starts" in out.stdout
    assert "note: model.model_config.rope_interleaved is true" in out.stderr


def test_each_sources_validation_loss_is_logged_and_the_total_weighs_them_by_the_mixture(recipe):
    root, _, out = recipe
    val = {r["step"]: r for r in read_metrics(root / "cfg" / "run" / "metrics.jsonl") if r["kind"] == "val"}
    assert sorted(val) == [5, 10] and {val[5]["stage"], val[10]["stage"]} == {"decay"}
    sources = val[10]["sources"]
    assert set(sources) == {str(root / "tokens"), str(root / "other")}
    assert val[10]["loss"] == pytest.approx((2 * sources[str(root / "tokens")] + sources[str(root / "other")]) / 3)
    assert f"step 10 | val loss {val[10]['loss']:.3f}" in out.stdout and " · other " in out.stdout


def test_an_initial_checkpoint_and_weight_decay_spared_on_1d_parameters_when_asked(recipe):
    root, _, _ = recipe
    first = load_checkpoint(list_checkpoints(root / "cfg" / "run")[0])
    assert first["train_state"]["step"] == 0
    decay, spared = load_checkpoint(list_checkpoints(root / "cfg" / "run")[-1])["optimizer"]["param_groups"]
    assert decay["weight_decay"] == 0.01 and spared["weight_decay"] == 0.0
    assert spared["params"] and all(name.endswith("norm.weight") for name in spared["params"])


@pytest.mark.parametrize("stop", [4, 8])   # the last checkpoint before the switch, and one inside the second stage
def test_a_resume_before_or_after_the_switch_gives_the_uninterrupted_losses(recipe, tmp_path, stop):
    root, path, _ = recipe
    whole = losses(root / "cfg" / "run")
    config = yaml.safe_load(path.read_text())
    config["checkpoints"]["checkpoints_path"] = str(tmp_path / "run")
    again = tmp_path / "config.yaml"
    again.write_text(yaml.safe_dump(config))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    ckpt = list_checkpoints(root / "cfg" / "run")[stop // 4]
    assert load_checkpoint(ckpt)["train_state"]["step"] == stop
    (tmp_path / "run" / "checkpoints" / ckpt.name).write_bytes(ckpt.read_bytes())
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in read_metrics(root / "cfg" / "run" / "metrics.jsonl") if r["step"] <= stop))
    positions = load_checkpoint(ckpt)["data"]["stages"]
    assert set(positions) == ({"stable"} if stop < SWITCH else {"stable", "decay"})
    run_train(again, "--resume")
    assert losses(tmp_path / "run") == whole
    assert losses(tmp_path / "run", "val") == losses(root / "cfg" / "run", "val")
    weights = load_checkpoint(list_checkpoints(tmp_path / "run")[-1])["model"]
    for key, value in load_checkpoint(list_checkpoints(root / "cfg" / "run")[-1])["model"].items():
        assert torch.equal(value, weights[key])


def test_no_validation_when_limit_val_batches_is_0_as_in_the_official_files(tmp_path, recipe, capsys):
    root, _, _ = recipe
    path = make_config(tmp_path, root, **{"tokens.train_steps": 3, "tokens.limit_val_batches": 0})
    assert train.main(["--config", str(path)]) == 0
    assert not [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "val"]
    assert "val loss n/a" in capsys.readouterr().out


@pytest.mark.parametrize("interval", [0, -1])
def test_a_val_check_interval_below_1_validates_after_the_last_step_only(interval):
    """nanotron's default is -1; neither it nor 0 may divide the step (a ZeroDivisionError once)."""
    cfg = config_from_dict({"tokens": {"train_steps": 12, "val_check_interval": interval, "limit_val_batches": 2}})
    assert [step for step in range(1, 13) if train.validation_due(cfg, step)] == [12]
    cfg = config_from_dict({"tokens": {"train_steps": 12, "val_check_interval": 5, "limit_val_batches": 2}})
    assert [step for step in range(1, 13) if train.validation_due(cfg, step)] == [5, 10, 12]
