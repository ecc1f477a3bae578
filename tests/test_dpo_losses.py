"""dpo.loss_type, as TRL users know it: each loss equals its paper's formula written out on fixed log-probs, sigmoid
and IPO equal TRL's own value on a frozen fixture, every loss lifts held-out preference accuracy on the built-in pairs
from the shared SFT run, the reference-free ones load no reference, precomputed reference log-probs give the run
the reference would and resume exactly without keeping it, and the new keys are checked by name. Also: the statistics
logged per step (DPO's log-probs, SFT's token accuracy weighed across micro-batches as its loss is)."""

import copy
import gc
import math
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
from helpers import tiny_model, write_config

import dpo
import sft
import train
from model import SmolLM2
from smollm2.checkpoint import list_checkpoints
from smollm2 import chat_data
from smollm2.config import DPOArgs
from smollm2.config_load import config_from_dict, load_config
from smollm2.metrics import read_metrics
from smollm2.preference import Replies, preference_loss
from smollm2.progress import Progress
from smollm2.runtime import Runtime

# ---------------------------------------------------------------- each loss, written out on floats

# two pairs: the policy's and the reference's summed log-probs of each reply, and each reply's token count
PC, PR, RC, RR = [-6.0, -9.0], [-8.0, -7.5], [-6.5, -8.0], [-7.0, -8.4]   # margins not opposite: smoothing shows
NC, NR = [3, 4], [2, 5]


def log_sigmoid(h: float) -> float:
    return -math.log(1 + math.exp(-h))


def sigmoid(h: float) -> float:
    return 1 / (1 + math.exp(-h))


def by_hand(kind: str, beta: float, smoothing: float = 0.0, gamma: float = 0.5, alpha: float = 0.0) -> float:
    """The loss of the two pairs from the papers' definitions (as TRL's trainers take them), one pair at a time."""
    nll = -sum(PC) / sum(NC)   # the chosen replies' cross-entropy per token, over the micro-batch
    losses = []
    for pc, pr, rc, rr, nc, nr in zip(PC, PR, RC, RR, NC, NR):
        h = beta * ((pc - rc) - (pr - rr))
        if kind == "sigmoid":     # DPO (Rafailov et al. 2023, eq. 7); cDPO mixes in the flipped label
            losses.append(-(1 - smoothing) * log_sigmoid(h) - smoothing * log_sigmoid(-h))
        elif kind == "ipo":       # IPO (Azar et al. 2023, eq. 17) on per-token log-ratios, as TRL 1.x
            losses.append(((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2)
        elif kind == "hinge":     # SLiC (Zhao et al. 2023)
            losses.append(max(0.0, 1 - h))
        elif kind == "apo_zero":  # APO-zero (D'Oosterlinck et al. 2024, eq. 7)
            losses.append(1 - sigmoid(beta * (pc - rc)) + sigmoid(beta * (pr - rr)))
        elif kind == "simpo":     # SimPO (Meng et al. 2024, eq. 6): mean log-probs, a target margin gamma
            hs = beta * (pc / nc - pr / nr) - gamma
            losses.append(-(1 - smoothing) * log_sigmoid(hs) - smoothing * log_sigmoid(-hs))
        elif kind == "orpo":      # ORPO (Hong et al. 2024, eqs. 4-7): odds(y) = p / (1 - p), p the mean token prob
            a, b = pc / nc, pr / nr
            log_odds = (a - b) - (math.log(1 - math.exp(a)) - math.log(1 - math.exp(b)))
            losses.append(nll - beta * log_sigmoid(log_odds))
    return sum(losses) / len(losses) + alpha * nll


@pytest.mark.parametrize("kind, settings", [
    ("sigmoid", {}), ("sigmoid", {"label_smoothing": 0.2}), ("sigmoid", {"rpo_alpha": 0.7}), ("ipo", {}),
    ("hinge", {}), ("apo_zero", {}), ("simpo", {"simpo_gamma": 0.8}), ("simpo", {"label_smoothing": 0.1}),
    ("orpo", {}), ("ipo", {"rpo_alpha": 1.5})])
def test_each_loss_equals_its_definition_on_fixed_log_probs(kind, settings):
    args = DPOArgs(loss_type=kind, beta=0.5, **settings)
    policy = Replies(*(torch.tensor(v, dtype=torch.float64) for v in (PC, PR, NC, NR)))
    reference = None if kind in ("simpo", "orpo") else (torch.tensor(RC, dtype=torch.float64),
                                                         torch.tensor(RR, dtype=torch.float64))
    loss, stats = preference_loss(args, policy, reference)
    want = by_hand(kind, 0.5, settings.get("label_smoothing", 0.0), settings.get("simpo_gamma", 0.5),
                   settings.get("rpo_alpha", 0.0))
    assert loss.item() == pytest.approx(want, rel=1e-12)
    if reference is None:   # rewards: beta times the mean log-prob per token (TRL's CPO and ORPO trainers)
        chosen, rejected = [p / n for p, n in zip(PC, NC)], [p / n for p, n in zip(PR, NR)]
        rewards = [0.5 * c for c in chosen], [0.5 * r for r in rejected]
    else:                   # rewards: beta times the log-ratio to the reference; log-probs summed (DPOTrainer)
        chosen, rejected = PC, PR
        rewards = [0.5 * (p - r) for p, r in zip(PC, RC)], [0.5 * (p - r) for p, r in zip(PR, RR)]
    margins = [c - r for c, r in zip(*rewards)]
    assert stats["chosen_logps"].item() == pytest.approx(sum(chosen) / 2)
    assert stats["rejected_logps"].item() == pytest.approx(sum(rejected) / 2)
    assert stats["chosen_reward"].item() == pytest.approx(sum(rewards[0]) / 2)
    assert stats["margin"].item() == pytest.approx(sum(margins) / 2)
    assert stats["accuracy"].item() == sum(m > 0 for m in margins) / 2


# ---------------------------------------------------------------- parity with TRL, frozen

BETA = 0.3
# token ids of two pairs for helpers.tiny_model (320 ids): a prompt, a chosen and a rejected reply; different lengths,
# so TRL's collator pads
PAIRS = [{"prompt_ids": [5, 17, 42, 9, 100], "chosen_ids": [33, 71, 8, 2], "rejected_ids": [61, 4, 2]},
         {"prompt_ids": [250, 12, 7], "chosen_ids": [19, 2], "rejected_ids": [88, 140, 23, 301, 2]}]
# TRL 1.16.0's values (transformers 5.25.0, torch 2.13.0 CPU, fp32), computed once by a short script in a virtualenv
# with trl, which this test does not need: tiny_model(seed=11) as the policy and tiny_model(seed=12) as the reference,
# their weights loaded into transformers' LlamaForCausalLM (config from convert_hf.hf_config_dict), a DPOTrainer built
# on them with DPOConfig(beta=BETA, loss_type=[kind]), and its _compute_loss called on what TRL's own
# DataCollatorForPreference(pad_token_id=0) makes of PAIRS. Its metrics (TRL_STATS) are the same for both losses.
TRL = {"sigmoid": 0.7101712822914124, "ipo": 3.7592315673828125}
TRL_STATS = {"chosen_reward": -0.5250887274742126, "rejected_reward": -1.833061695098877,
             "margin": 1.3079729080200195, "accuracy": 0.5, "chosen_logps": -26.787979125976562,
             "rejected_logps": -37.81534957885742}


def pair_batch() -> tuple[torch.Tensor, ...]:
    """PAIRS as dpo.py's rows: (chosen inputs, chosen targets, rejected inputs, rejected targets), padded to 16."""
    rows = []
    for key in ("chosen_ids", "rejected_ids"):
        xs, ys = [], []
        for pair in PAIRS:
            ids, n = pair["prompt_ids"] + pair[key], len(pair["prompt_ids"])
            x, y = ids[:-1], [-100] * (n - 1) + pair[key]
            xs.append(x + [0] * (16 - len(x)))
            ys.append(y + [-100] * (16 - len(y)))
        rows += [torch.tensor(xs), torch.tensor(ys)]
    return tuple(rows)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_the_loss_equals_trls_on_a_frozen_tiny_model_and_two_pairs(kind):
    batch = pair_batch()
    policy, reference = tiny_model(seed=11), tiny_model(seed=12)
    with torch.no_grad():
        loss, stats = preference_loss(DPOArgs(loss_type=kind, beta=BETA), dpo.replies(policy, batch, "cpu"),
                                      dpo.reply_logprobs(reference, batch, "cpu"))
    assert loss.item() == pytest.approx(TRL[kind], rel=1e-5)
    assert {k: v.item() for k, v in stats.items()} == pytest.approx(TRL_STATS, rel=1e-5)


# ---------------------------------------------------------------- every loss learns the built-in preferences

LR = "optimizer.learning_rate_scheduler.learning_rate"
# six steps of 16 pairs each from the shared SFT run, on all six tasks. beta: the recipe's 0.5, TRL's 0.1 for IPO and
# hinge. Measured (held-out accuracy against the start, 0.5 before, 96 pairs): sigmoid 0.750, ipo 0.771, hinge
# 0.760, apo_zero 0.760.
LOSS_SETTINGS = {
    "sigmoid": {"dpo.beta": 0.5, LR: 5e-4}, "ipo": {"dpo.beta": 0.1, LR: 5e-4}, "hinge": {"dpo.beta": 0.1, LR: 5e-4},
    "apo_zero": {"dpo.beta": 0.5, LR: 5e-4}}
STEPS, LIFT = 6, 0.04
# The reference-free losses' reward is the policy's own mean log-prob, so their accuracy starts where the SFT run
# left it: 0.81 on all six tasks, with count and fact already at 1.00, where no loss can add; mixed in, the few pairs
# of the open tasks lifted it by 0.01-0.03 in 60 steps. On reverse alone (0.47 before) 20 steps of 16 pairs gave:
# simpo (beta 2, gamma 1, SimPO's scale) 0.75 at LR 1e-3, 0.72 at 2e-3; orpo (beta 0.1) 0.70 at 1e-3, 0.74 at 2e-3,
# with the chosen replies' log-probs rising, as ORPO's NLL term asks.
FREE_SETTINGS = {"simpo": {"dpo.beta": 2.0, "dpo.simpo_gamma": 1.0}, "orpo": {"dpo.beta": 0.1}}
FREE_STEPS, FREE_LIFT = 20, 0.12


def held_out_accuracy(cfg, task: dpo.DPO, policy: SmolLM2, start: Optional[SmolLM2]) -> float:
    """The loss's own preference accuracy over the held-out pairs (dpo.py --score's): against the start as the
    reference (0.5 there, every margin 0), or on the policy's own log-probs for a reference-free loss (start None)."""
    _, val = chat_data.held_out(cfg.dpo, cfg.general.seed)
    rows, _ = sft.tokenized(cfg, task.tokenizer(cfg), val)
    return dpo.preference_stats(policy.eval(), start, rows, cfg.dpo)["accuracy"]


def preference_run(sft_dir, folder, kind: str, steps: int, **settings):
    """A DPO config of `steps` steps of 16 pairs from the SFT run, held out 96, no validation or checkpoints."""
    return load_config(str(write_config(folder, "dpo", sft_dir, **{
        "dpo.loss_type": kind, "dpo.max_examples": 16 * steps, "dpo.val_examples": 96, "tokens.micro_batch_size": 16,
        "tokens.train_steps": steps, "tokens.val_check_interval": 0, "tokens.limit_val_batches": 0,
        "checkpoints.checkpoint_interval": 1000, "checkpoints.save_final_state": False,
        "optimizer.learning_rate_scheduler.lr_warmup_steps": 0, "optimizer.weight_decay": 0.0, **settings})))


@pytest.mark.parametrize("kind", list(LOSS_SETTINGS))
def test_every_loss_type_lifts_held_out_preference_accuracy(sft_run, tmp_path, kind):
    cfg = preference_run(sft_run[2], tmp_path, kind, STEPS, **LOSS_SETTINGS[kind])
    task = dpo.DPO(cfg)
    start = copy.deepcopy(task.start)   # the start as it was, kept by the test
    before = held_out_accuracy(cfg, task, start, start)
    train.train(cfg, task=task)         # the policy is task.start, trained in place
    after = held_out_accuracy(cfg, task, task.start, start)
    assert after >= before + LIFT, (kind, before, after)


@pytest.mark.parametrize("kind", list(FREE_SETTINGS))
def test_a_reference_free_loss_lifts_its_own_held_out_accuracy_where_sft_left_room(sft_run, tmp_path, kind):
    cfg = preference_run(sft_run[2], tmp_path, kind, FREE_STEPS, **{"dpo.dataset_config": "reverse", LR: 1e-3},
                         **FREE_SETTINGS[kind])
    task = dpo.DPO(cfg)
    before = held_out_accuracy(cfg, task, task.start, None)
    train.train(cfg, task=task)
    after = held_out_accuracy(cfg, task, task.start, None)
    assert before < 0.65 and after >= before + FREE_LIFT, (kind, before, after)


# ---------------------------------------------------------------- the reference: kept, precomputed or never loaded


def dpo_config(folder, start, **overrides):
    return load_config(str(write_config(folder, "dpo", start, **{
        "dpo.max_examples": 96, "dpo.val_examples": 16, "tokens.train_steps": 4, "checkpoints.checkpoint_interval": 2,
        "tokens.val_check_interval": 2, **overrides})))


@pytest.mark.parametrize("overrides, models", [
    ({}, 2), ({"dpo.precompute_ref_log_probs": True}, 1), ({"dpo.loss_type": "simpo"}, 1),
    ({"dpo.loss_type": "orpo"}, 1)])
def test_a_reference_model_is_in_memory_only_where_the_loss_reads_it(small_base, tmp_path, overrides, models):
    gc.collect()
    before = {id(o) for o in gc.get_objects() if type(o) is SmolLM2}
    cfg = dpo_config(tmp_path, small_base, **overrides)
    task = dpo.DPO(cfg)
    run, _ = train.setup(cfg, None, False, task)   # what a run holds when its first step begins
    loss, _ = task.loss(run, run.train_data.next_batch())
    run.log.close()
    gc.collect()
    assert sum(type(o) is SmolLM2 and id(o) not in before for o in gc.get_objects()) == models
    assert (task.reference is None) == (models == 1) and torch.isfinite(loss)


def test_precomputed_reference_log_probs_train_as_the_reference_does_and_resume_exactly(small_base, tmp_path, capsys):
    live, pre = (dpo_config(tmp_path / k, small_base, **{"dpo.precompute_ref_log_probs": k == "pre"})
                 for k in ("live", "pre"))
    for cfg in (live, pre):
        train.train(cfg, task=dpo.DPO(cfg))
    out = capsys.readouterr().out
    assert "reference: the log-probs of 96 training and 16 held-out pairs computed" in out
    records = {k: [r for r in read_metrics(tmp_path / k / "run" / "metrics.jsonl") if r["kind"] in ("train", "val")]
               for k in ("live", "pre")}
    keys = ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "chosen_logps", "rejected_logps")
    assert len(records["live"]) == len(records["pre"]) == 6   # 4 steps, 2 validations
    for a, b in zip(records["live"], records["pre"]):
        assert a["kind"] == b["kind"] and [a[k] for k in keys] == pytest.approx([b[k] for k in keys], abs=1e-5)
    assert records["pre"][-1]["margin"] != 0   # the policy left the reference
    # resumed at step 2 in another run directory: the rest of the run, bitwise
    resumed = dpo_config(tmp_path / "resumed", small_base, **{"dpo.precompute_ref_log_probs": True})
    train.train(resumed, resume=str(list_checkpoints(tmp_path / "pre" / "run")[0]), task=dpo.DPO(resumed))
    again = [r for r in read_metrics(tmp_path / "resumed" / "run" / "metrics.jsonl") if r["kind"] in ("train", "val")]
    assert [(r["step"], [r[k] for k in keys]) for r in again] == \
        [(r["step"], [r[k] for k in keys]) for r in records["pre"] if r["step"] > 2]


# ---------------------------------------------------------------- what a step logs


def test_each_dpo_step_logs_rewards_margin_accuracy_and_both_log_probs(small_base, tmp_path, capsys):
    cfg = dpo_config(tmp_path, small_base, **{"tokens.train_steps": 2, "dpo.rpo_alpha": 0.5})
    train.train(cfg, task=dpo.DPO(cfg))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("step 2/2"))
    record = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"][-1]
    for key in ("accuracy", "margin", "chosen_reward", "rejected_reward", "chosen_logps", "rejected_logps", "nll"):
        assert f"| {key} {record[key]:.3f}" in line
    assert record["chosen_logps"] < 0 and record["rejected_logps"] < 0
    assert record["margin"] == pytest.approx(record["chosen_reward"] - record["rejected_reward"], abs=1e-6)


class TokenAccuracy(train.Pretraining):
    """SFT's loss and token accuracy, weighed as SFT weighs them, on plain (x, y) batches."""
    weighs_by_targets = True
    loss = sft.SFT.loss


def test_sft_token_accuracy_is_the_share_of_all_the_steps_targets_the_argmax_predicts():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    batches = []
    for targets, right in ((2, 2), (33, 3)):   # 2 of 2 and 3 of 33 predicted: 5 of 35, where means of means say 0.55
        x = torch.randint(0, 320, (1, 40), generator=g)
        predicted = model(x)[0].argmax(-1)
        y = (predicted + 1) % 320
        y[0, -targets:][:right] = predicted[0, -targets:][:right]
        y[0, :-targets] = -100
        batches.append((x, y))
    cfg = config_from_dict({"optimizer": {"clip_grad": None}})
    it = iter(batches)
    run = SimpleNamespace(cfg=cfg, rt=Runtime(torch.device("cpu"), "fp32"), accumulation=2, model=model, net=model,
                          task=TokenAccuracy(), step=0, train_data=SimpleNamespace(next_batch=lambda: next(it)),
                          optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                          scaler=torch.amp.GradScaler("cpu", enabled=False))
    *_, stats = train.optimizer_step(run, Progress(0))
    assert stats["token_accuracy"] == pytest.approx(5 / 35)


# ---------------------------------------------------------------- the keys, checked by name


@pytest.mark.parametrize("overrides, message", [
    ({"dpo.loss_type": "kto"}, "dpo.loss_type: one of sigmoid, ipo, hinge, apo_zero, simpo, orpo, got 'kto'"),
    ({"dpo.label_smoothing": 0.5}, "dpo.label_smoothing: must be in [0, 0.5), got 0.5"),
    ({"dpo.loss_type": "ipo", "dpo.label_smoothing": 0.1}, "dpo.label_smoothing: only sigmoid and simpo use it, not ipo"),
    ({"dpo.simpo_gamma": -1.0}, "dpo.simpo_gamma: must be >= 0, got -1.0"),
    ({"dpo.rpo_alpha": -0.5}, "dpo.rpo_alpha: must be >= 0 or null, got -0.5"),
    ({"dpo.loss_type": "orpo", "dpo.rpo_alpha": 1.0}, "dpo.rpo_alpha: orpo already adds the chosen replies' NLL"),
    ({"dpo.loss_type": "simpo", "dpo.precompute_ref_log_probs": True},
     "dpo.precompute_ref_log_probs: simpo has no reference model"),
])
def test_a_bad_dpo_loss_setting_is_one_line_naming_the_key(small_base, tmp_path, overrides, message, capsys):
    assert dpo.main(["--config", str(write_config(tmp_path, "dpo", small_base, **overrides))]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines
