"""Direct preference optimisation: `python dpo.py --config CFG [key=value ...] [--resume [PATH]]`.

Starts from an SFT checkpoint (`dpo.model_name_or_path`), which is also the reference: a frozen copy, in eval mode
and without gradients, that the policy is scored against. For a prompt x with a chosen reply y+ and a rejected one y-,
each model gives the summed log-probability of a reply's tokens, and the implicit reward of the policy is
r(y) = beta * (log pi(y|x) - log ref(y|x)). The loss is the sigmoid DPO loss (Rafailov et al., 2023):

    loss = -log sigmoid(r(y+) - r(y-))

which raises the chosen reply's probability relative to the rejected one's, while beta keeps the policy near the
reference. Logged beside it: the reward margin r(y+) - r(y-), the preference accuracy (how often the margin is
positive; a tie, where the policy still equals the reference, counts half, so 0.5 means nothing learned), and the
mean rewards of chosen and rejected replies. Everything else is sft.py's and train.py's: the same loop, checkpoints,
resume, S3, DDP and FSDP.

    python dpo.py --config configs/config_dpo_tiny.yaml
    python dpo.py --config configs/config_dpo_tiny.yaml --score runs/tiny-sft runs/tiny-dpo   # preference accuracy

Read next: evaluation.py, which scores any checkpoint on benchmarks.
"""

import copy
import dataclasses
import sys
from typing import Optional

import torch
import torch.nn.functional as F

from model import SmolLM2
from sft import SFT, posttraining_command, start_from, tokenized
from smollm2 import chat_data
from smollm2.config import Config


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """Summed log-probabilities of each pair's replies (B,) under the policy and the reference -> (mean loss, stats)."""
    chosen = beta * (policy_chosen - ref_chosen)         # (B,) implicit rewards
    rejected = beta * (policy_rejected - ref_rejected)
    margin = chosen - rejected
    accuracy = (margin > 0).float() + 0.5 * (margin == 0).float()
    stats = {"accuracy": accuracy.mean(), "margin": margin.mean(), "chosen_reward": chosen.mean(),
             "rejected_reward": rejected.mean()}
    return -F.logsigmoid(margin).mean(), {k: v.detach() for k, v in stats.items()}


def reply_logprobs(model: torch.nn.Module, batch: tuple, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of pair rows (chosen inputs, chosen targets, rejected inputs, rejected targets) -> the summed
    log-probability of the chosen and of the rejected replies (B,) each, from one forward over both."""
    xc, yc, xr, yr = (t.to(device, non_blocking=True) for t in batch)
    _, nll = model(torch.cat([xc, xr]), torch.cat([yc, yr]), per_row=True)   # (2B,): -log p(reply | prompt)
    return (-nll).chunk(2)


class DPO(SFT):
    """SFT's start and chat format; the data are preference pairs and the loss is DPO's against a frozen reference."""
    section = "dpo"
    reports_perplexity = False   # the validation loss is DPO's, not a per-token cross-entropy
    weighs_by_targets = False    # a mean over pairs, and every micro-batch holds as many

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.reference: Optional[SmolLM2] = None

    def model(self, cfg: Config, rt, resuming: Optional[dict]) -> SmolLM2:
        policy = super().model(cfg, rt, resuming)
        # copied before a resumed run loads its trained weights into the policy: the reference is always the start
        self.reference = copy.deepcopy(policy).eval().requires_grad_(False)
        return policy

    def loss(self, run, batch) -> tuple[torch.Tensor, dict]:
        policy = reply_logprobs(run.net, batch, run.rt.device)
        with torch.no_grad():
            reference = reply_logprobs(self.reference, batch, run.rt.device)
        return dpo_loss(*policy, *reference, self.args.beta)


# ---------------------------------------------------------------- measuring: preference accuracy on held-out pairs


@torch.no_grad()
def preference_stats(policy: SmolLM2, reference: SmolLM2, rows, beta: float, batch_size: int = 32) -> dict:
    """DPO's statistics over every held-out pair (rows as chat_data.dpo_rows makes them), the loss included."""
    sums, n = {}, 0
    for i in range(0, len(rows), batch_size):
        batch = tuple(torch.from_numpy(rows[i:i + batch_size, c].astype("int64")) for c in range(4))
        loss, stats = dpo_loss(*reply_logprobs(policy, batch, "cpu"), *reply_logprobs(reference, batch, "cpu"), beta)
        size = len(batch[0])
        for key, value in {"loss": loss, **stats}.items():
            sums[key] = sums.get(key, 0.0) + value.item() * size
        n += size
    return {key: value / n for key, value in sums.items()} | {"n": n}


def score(cfg: Config, checkpoint: str) -> dict:
    """Preference accuracy (and margin) of a checkpoint on the held-out pairs, against the config's reference."""
    reference, tokenizer, _ = start_from(copy.deepcopy(cfg), cfg.dpo)
    policy, _, _ = start_from(copy.deepcopy(cfg), dataclasses.replace(cfg.dpo, model_name_or_path=checkpoint))
    _, val = chat_data.held_out(cfg.dpo, cfg.general.seed)
    rows, _ = tokenized(cfg, tokenizer, val)
    return {"checkpoint": checkpoint, **preference_stats(policy.eval(), reference.eval(), rows, cfg.dpo.beta)}


def report(cfg: Config, checkpoint: str) -> str:
    r = score(cfg, checkpoint)
    return (f"{r['checkpoint']}: preference accuracy {r['accuracy']:.3f}, reward margin {r['margin']:.3f} on {r['n']} "
            f"held-out pairs (reference {cfg.dpo.model_name_or_path})")


def main(argv=None) -> int:
    return posttraining_command(argv, __doc__, DPO, "each checkpoint's preference accuracy on the config's held-out "
                                "pairs, against the config's reference (dpo.model_name_or_path)", report)


if __name__ == "__main__":
    sys.exit(main())
