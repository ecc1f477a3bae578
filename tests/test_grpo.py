"""grpo.py as a user runs it: its advantages, clipped loss and KL equal the formulas written out on floats; a group of
equal rewards gives no gradient; the reference never moves; a SIGKILL'd run resumes exactly and two FSDP ranks equal
one process (from conftest's SFT run); the verifiers score as documented, and GSM8K-style rows are read."""

import copy
import json
import math
import signal

import pytest
import torch
from helpers import ROOT, run_at_once, run_script, signalled_at, tiny_model, train_command, write_config

import grpo
import train
from smollm2 import chat_data, verifiers
from smollm2.checkpoint import list_checkpoints, load_checkpoint
from smollm2.config_load import load_config
from smollm2.errors import ConfigError, DataError
from smollm2.grpo_loss import group_advantages, policy_loss, token_logprobs
from smollm2.metrics import read_metrics

# ---------------------------------------------------------------- the maths, against the formulas on floats


def test_advantages_are_each_reward_against_its_groups_mean_over_its_std():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5]   # two prompts, G = 4; the second's rewards all equal
    expected = []
    for group in (rewards[:4], rewards[4:]):
        mean = sum(group) / 4
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 3)   # unbiased, as TRL
        expected += [(r - mean) / (std + 1e-4) for r in group]
    got = group_advantages(torch.tensor(rewards), 4)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6), got
    assert got[4:].eq(0).all()
    unscaled = group_advantages(torch.tensor(rewards), 4, scale=False)   # Dr. GRPO: no division by the std
    assert unscaled.tolist() == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]


LOGP = [[-1.0, -2.0, -0.5], [-0.3, -1.2, -9.0]]
OLD = [[-1.5, -1.5, -0.4], [-0.3, -0.2, -9.0]]   # ratios e^.5 (clipped: A > 0), e^-.5, e^-.1; 1, e^-1 (clipped: A < 0)
REF = [[-1.2, -2.0, -0.1], [-0.5, -1.0, -9.0]]
MASK = [[1, 1, 1], [1, 1, 0]]                        # the second completion has two tokens
ADV = [1.5, -0.7]


def by_hand(beta: float, eps: float, loss_type: str, L: int) -> tuple[float, float, float]:
    """GRPO's loss, mean k3 KL and clip fraction written out token by token."""
    per_seq, total, kls, clipped, n = [], 0.0, 0.0, 0, 0
    for lp, old, ref, mask, a in zip(LOGP, OLD, REF, MASK, ADV):
        terms = []
        for l, o, r, m in zip(lp, old, ref, mask):
            if not m:
                continue
            rho = math.exp(l - o)
            kl = math.exp(r - l) - (r - l) - 1
            terms.append(-min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a) + beta * kl)
            kls, n = kls + kl, n + 1
            clipped += (rho > 1 + eps and a > 0) or (rho < 1 - eps and a < 0)
        per_seq.append(sum(terms) / len(terms))
        total += sum(terms)
    loss = sum(per_seq) / len(per_seq) if loss_type == "grpo" else total / (len(LOGP) * L)
    return loss, kls / n, clipped / n


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_the_clipped_loss_and_kl_equal_the_formula_token_by_token(loss_type):
    t = {k: torch.tensor(v) for k, v in dict(logp=LOGP, old=OLD, ref=REF, mask=MASK, adv=ADV).items()}
    loss, stats = policy_loss(t["logp"], t["old"], t["ref"], t["adv"], t["mask"].bool(), beta=0.1, epsilon=0.2,
                              loss_type=loss_type, max_completion_length=5)
    want_loss, want_kl, want_clip = by_hand(0.1, 0.2, loss_type, 5)
    assert loss.item() == pytest.approx(want_loss, rel=1e-5)
    assert stats["kl"].item() == pytest.approx(want_kl, rel=1e-5)
    assert stats["clip_fraction"].item() == pytest.approx(want_clip) and want_clip == 0.4   # 2 of 5 tokens


def test_a_clipped_token_passes_no_gradient_and_a_padding_token_none():
    logp = torch.tensor(LOGP, requires_grad=True)
    loss, _ = policy_loss(logp, torch.tensor(OLD), logp.detach(), torch.tensor(ADV), torch.tensor(MASK).bool(),
                          beta=0.0, epsilon=0.2, loss_type="grpo", max_completion_length=5)
    loss.backward()
    # e^0.5 > 1.2 with A > 0, e^-1 < 0.8 with A < 0: clipped; [1, 2] lies outside the mask
    assert logp.grad[0, 0] == 0 and logp.grad[1, 1] == 0 and logp.grad[1, 2] == 0
    assert logp.grad[0, 1] != 0 and logp.grad[1, 0] != 0


def test_token_logprobs_and_entropy_equal_log_softmax():
    logits = torch.randn(2, 3, 7)
    targets = torch.tensor([[1, 6, -100], [0, 2, 3]])
    logp, entropy = token_logprobs(logits, targets)
    p = logits.softmax(-1)
    assert torch.allclose(logp[1, 2], p[1, 2, 3].log()) and torch.allclose(logp[0, 1], p[0, 1, 6].log())
    assert torch.allclose(entropy, -(p * p.log()).sum(-1), atol=1e-6)


def test_a_group_whose_rewards_are_all_equal_gives_no_gradient():
    policy = tiny_model(seed=3)
    reference = copy.deepcopy(policy).requires_grad_(False)
    x = torch.randint(0, 320, (4, 10))
    y = torch.where(torch.arange(10) >= 6, torch.randint(0, 320, (4, 10)), -100)   # the last 4 positions: completion

    def grads(rewards: list[float]) -> list[torch.Tensor]:
        policy.zero_grad()
        logp, _ = token_logprobs(policy(x)[0], y)
        ref, _ = token_logprobs(reference(x)[0], y)
        loss, _ = policy_loss(logp, logp.detach(), ref, group_advantages(torch.tensor(rewards), 4), y != -100,
                              beta=0.04, epsilon=0.2, loss_type="grpo", max_completion_length=4)
        loss.backward()
        return [p.grad for p in policy.parameters()]

    assert all(g.abs().max() == 0 for g in grads([1.0, 1.0, 1.0, 1.0]))   # at the reference: the KL's is 0 too
    assert any(g.abs().max() > 0 for g in grads([1.0, 0.0, 1.0, 0.0]))


# ---------------------------------------------------------------- verifiers


def test_verifiers_score_exact_numeric_and_partial_answers():
    assert verifiers.exact_match(" blue ", "blue", {}) == 1.0 and verifiers.exact_match("Blue", "blue", {}) == 0.0
    assert verifiers.numeric("so the answer is 1,234.", "Natalia sold ... #### 1234", {}) == 1.0
    assert verifiers.numeric("42.00001", "42", {}) == 1.0 and verifiers.numeric("43", "42", {}) == 0.0
    assert verifiers.numeric("no number", "42", {}) == 0.0
    assert verifiers.partial_list("owl,sun,tree", "owl,tree,sun", {}) == pytest.approx(1 / 3)
    assert verifiers.partial_list("owl,sun", "owl,sun,tree", {}) == pytest.approx(2 / 3)
    assert verifiers.chat_tasks("3", "3", {"task": "count"}) == 1.0
    assert verifiers.chat_tasks("a,c", "a,b", {"task": "sort"}) == 0.5


def test_a_reward_registered_by_name_or_given_as_module_function_is_used(tmp_path):
    @verifiers.reward("test_length")
    def length(completion, answer, example):
        return -len(completion)
    assert verifiers.resolve(["test_length", "smollm2.verifiers:numeric"]) == [length, verifiers.numeric]
    with pytest.raises(ConfigError, match="unknown verifier 'nope'; known: .*exact_match"):
        verifiers.resolve(["nope"])


@pytest.mark.parametrize("overrides, message", [
    (["grpo.num_generations=3"], "grpo.num_generations: 3 must divide tokens.micro_batch_size"),
    (["grpo.loss_type=dapo"], "grpo.loss_type: 'grpo' or 'dr_grpo'"),
    (["grpo.max_completion_length=96"], "grpo.max_completion_length: from 1 to below tokens.sequence_length"),
    (["grpo.kl_beta=0.1"], "grpo.kl_beta: unknown key"),
    (["grpo.temperature=0"], "grpo.temperature: must be > 0")])
def test_a_bad_grpo_config_is_refused_by_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(str(ROOT / "configs" / "config_grpo_tiny.yaml"), overrides)


def test_prompts_are_read_from_trls_gsm8ks_and_sfts_layouts():
    assert grpo.as_prompt({"prompt": "2+2?", "answer": 4}, "x") == ([{"role": "user", "content": "2+2?"}], "4", "all")
    gsm = {"question": "How many?", "answer": "Twice 3 is 6.\n#### 6"}
    assert grpo.as_prompt(gsm, "x")[1] == gsm["answer"] and verifiers.numeric("6", gsm["answer"], gsm) == 1.0
    conversation = {"task": "add", "messages": [{"role": "user", "content": "1+1?"},
                                                {"role": "assistant", "content": "2"}]}
    assert grpo.as_prompt(conversation, "x") == ([{"role": "user", "content": "1+1?"}], "2", "add")


# ---------------------------------------------------------------- runs


def grpo_config(folder, start, **overrides):
    settings = {"grpo.num_generations": 4, "grpo.max_completion_length": 8, "grpo.reward_funcs": ["chat_tasks"],
                "grpo.max_examples": 400, "grpo.val_examples": 24, "tokens.micro_batch_size": 8,
                "tokens.sequence_length": 80, "general.seed": 5, **overrides}
    return write_config(folder, "grpo", start, **settings)


def records(run, kind="train") -> list:
    return [{k: v for k, v in r.items() if k not in ("tok_per_s", "eta_s", "mem_gib")}
            for r in read_metrics(run / "metrics.jsonl") if r["kind"] == kind]


def test_resume_after_sigkill_inside_a_batchs_mu_steps_reproduces_the_uninterrupted_run(sft_run, tmp_path):
    _, _, sft_dir = sft_run
    # mu = 2: steps 3 and 4 train on the completions sampled at step 3; the checkpoint of step 3 must hold them
    settings = {"grpo.num_iterations": 2, "tokens.train_steps": 6, "checkpoints.checkpoint_interval": 3,
                "tokens.val_check_interval": 3, "tokens.limit_val_batches": 1}
    straight, killed = (grpo_config(tmp_path / k, sft_dir, **settings) for k in "ab")
    done, kill = run_at_once(train_command(straight, script="grpo.py"),
                             signalled_at(5, "SIGKILL", "grpo.py", "--config", killed), check=False)
    assert done.returncode == 0 and kill.returncode == -signal.SIGKILL, (done.stderr[-3000:], kill.stderr[-3000:])
    out = run_script("grpo.py", "--config", killed, "--resume").stdout
    assert "resumed from" in out and "step_00000003" in out
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    assert records(b) == records(a) and len(records(a)) == 6                    # every statistic, bitwise
    assert records(b, "val") == records(a, "val")
    assert any(r["clip_fraction"] > 0 or r["reward_std"] > 0 for r in records(a))   # the steps had a signal
    final = [load_checkpoint(list_checkpoints(run)[-1])["model"] for run in (a, b)]
    assert all(torch.equal(final[0][key], final[1][key]) for key in final[0])


def test_grpo_under_fsdp_on_two_ranks_equals_one_process(sft_run, tmp_path):
    # the same global batch: prompt batch n and its sampling seed are the same whichever rank or micro-batch reads it
    _, _, sft_dir = sft_run
    settings = {"tokens.train_steps": 3, "tokens.batch_accumulation_per_replica": 2, "tokens.limit_val_batches": 0,
                "checkpoints.checkpoint_interval": 3}
    single = grpo_config(tmp_path / "one", sft_dir, **settings)
    fsdp = grpo_config(tmp_path / "two", sft_dir, **settings, **{"optimizer.zero_stage": 3})
    _, proc = run_at_once(train_command(single, script="grpo.py"), train_command(fsdp, ranks=2, script="grpo.py"))
    assert "FSDP2 over 2 processes (ZeRO-3" in proc.stdout and "x 1 accumulation x 2" in proc.stdout
    one, two = records(tmp_path / "one" / "run"), records(tmp_path / "two" / "run")
    assert len(one) == len(two) == 3 and one[-1]["kl"] > 0                       # the policy left the reference
    for a, b in zip(one, two):
        for key in ("loss", "reward", "reward_std", "equal_groups", "completion_length", "kl", "entropy"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a, b)

def test_the_reference_never_changes_while_the_policy_learns(sft_run, tmp_path):
    _, _, sft_dir = sft_run
    cfg = load_config(str(grpo_config(tmp_path, sft_dir, **{"tokens.train_steps": 3, "tokens.limit_val_batches": 0,
                                                            "checkpoints.checkpoint_interval": 100})))
    task = grpo.GRPO(cfg)
    start = {k: v.clone() for k, v in task.start.state_dict().items()}
    train.train(cfg, task=task)
    assert not task.reference.training and not any(p.requires_grad for p in task.reference.parameters())
    assert all(torch.equal(task.reference.state_dict()[k], start[k]) for k in start)
    assert any(not torch.equal(task.policy.state_dict()[k], start[k]) for k in start)



def test_grpo_raises_held_out_fact_from_a_half_trained_sft_model_without_lowering_another_task(sft_run, tmp_path):
    # the SFT run's step 400: count whole, fact partly learnt. Measured here: held-out fact 0.28 -> 0.47 in 40 steps
    # (81 prompts; 0.27 -> 0.51-0.53 on 50 under other seeds, 0.40 at LR 1e-4 or on fact prompts alone), the other
    # tasks within one prompt, KL 0.065 per token on average (0.25 at most)
    start = list_checkpoints(sft_run[2])[0]
    assert start.name == "step_00000400.pt"
    cfg = load_config(str(grpo_config(tmp_path, start, **{
        "grpo.dataset_config": "count,fact", "grpo.num_generations": 8, "grpo.max_completion_length": 16,
        "grpo.max_examples": 1000, "grpo.val_examples": 160, "tokens.sequence_length": 96,
        "tokens.micro_batch_size": 64, "tokens.batch_accumulation_per_replica": 2, "tokens.train_steps": 40,
        "tokens.val_check_interval": 0, "tokens.limit_val_batches": 0, "checkpoints.checkpoint_interval": 40,
        "optimizer.learning_rate_scheduler.learning_rate": 2e-4, "optimizer.learning_rate_scheduler.min_decay_lr": None,
        "optimizer.learning_rate_scheduler.lr_warmup_steps": 0, "optimizer.weight_decay": 0.0})))
    others = load_config(str(grpo_config(tmp_path / "others", start, **{   # the tasks GRPO never saw
        "grpo.dataset_config": "add,repeat,reverse,sort", "grpo.max_completion_length": 16, "grpo.val_examples": 160,
        "tokens.sequence_length": 96})))
    before = grpo.score(cfg, str(start))["tasks"] | grpo.score(others, str(start))["tasks"]
    train.train(cfg, task=grpo.GRPO(cfg))
    end = str(list_checkpoints(tmp_path / "run")[-1])
    after = grpo.score(cfg, end)["tasks"] | grpo.score(others, end)["tasks"]
    assert after["fact"] >= before["fact"] + 0.10, (before, after)
    assert all(after[t] >= before[t] - 0.05 for t in before), (before, after)   # 40 prompts a task: 0.025 each
    kl = [r["kl"] for r in records(tmp_path / "run")]
    assert 0 < sum(kl) / len(kl) < 0.15 and max(kl) < 0.5, kl   # per token; spiky, as rare samples are far from ref


def test_gsm8k_style_rows_from_a_jsonl_file_become_prompts_and_long_ones_are_counted_out(small_base, tmp_path):
    rows = [{"question": f"Ann has {n} apples and buys {n} more. How many now?",
             "answer": f"She has {n} + {n} = {2 * n} apples.\n#### {2 * n}"} for n in range(9)]
    rows.append({"question": "word " * 200, "answer": "#### 1"})                    # leaves no room for a completion
    (tmp_path / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(str(grpo_config(tmp_path, small_base, **{"grpo.dataset_name": str(tmp_path / "math.jsonl"),
                                                               "grpo.max_examples": None, "grpo.val_examples": 2,
                                                               "grpo.reward_funcs": ["numeric"]})))
    tok = grpo.GRPO(cfg).tokenizer(cfg)   # the start's, with the chat tokens added
    train_rows, val_rows = chat_data.held_out(cfg.grpo, cfg.general.seed)
    assert len(val_rows) == 2 and not {r["question"] for r in val_rows} & {r["question"] for r in train_rows}
    prompts = grpo.read_prompts(train_rows + val_rows, tok, 80 - 8, "math.jsonl")
    assert len(prompts.ids) == 9 and prompts.too_long == 1
    for ids, answer, example in zip(prompts.ids, prompts.answers, prompts.examples):
        text = tok.decode(ids, skip_special_tokens=False)
        assert example["question"] in text and text.endswith("<|im_start|>assistant\n")   # the reply's turn opened
        right = str(int(answer.split("####")[1]))
        assert verifiers.numeric(f"The total is {right}.", answer, example) == 1.0
        assert verifiers.numeric(f"The total is {int(right) + 1}.", answer, example) == 0.0
    with pytest.raises(DataError, match=r"math.jsonl\[0\]: expected an 'answer'"):
        grpo.read_prompts([{"question": "no answer"}], tok, 72, "math.jsonl")

