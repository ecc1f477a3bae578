"""Preference losses on the log-probabilities of replies, under TRL's names (`dpo.loss_type`); dpo.py minimises them.

Each pair gives the summed log-probability of its chosen reply y+ and its rejected reply y- (and their token counts).
Against a frozen reference, with the log-ratios u+ = log pi(y+) - log ref(y+) and u- likewise (DPOTrainer's losses):

    sigmoid   -log sigmoid(beta (u+ - u-))        DPO; with label_smoothing e: (1 - e) times it + e times the flipped
                                                   label's, -log sigmoid(-beta (u+ - u-)) (conservative DPO, cDPO)
    ipo       ((u+ / |y+| - u- / |y-|) - 1 / (2 beta))^2        IPO, on per-token log-ratios as TRL takes them
    hinge     max(0, 1 - beta (u+ - u-))                         SLiC
    apo_zero  1 - sigmoid(beta u+) + sigmoid(beta u-)            APO-zero: chosen up, rejected down, each on its own

Without a reference, on the mean log-probability of a reply's tokens, a+ = log pi(y+) / |y+| and a- likewise:

    simpo     -log sigmoid(beta (a+ - a-) - simpo_gamma)         SimPO (TRL's CPOTrainer, loss_type simpo)
    orpo      NLL(y+) - beta log sigmoid(log odds(y+) - log odds(y-)),  log odds(y) = a - log(1 - e^a)   (ORPOTrainer)

NLL(y+) is the cross-entropy of the chosen replies' tokens, their mean over the micro-batch; `rpo_alpha` adds alpha
times it to any loss (RPO). The implicit rewards logged are beta u (beta a without a reference).
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from smollm2.config import REFERENCE_FREE


@dataclass
class Replies:
    """One micro-batch of pairs under one model: the summed log-probability of each chosen and rejected reply (B,),
    and how many tokens each has (B,)."""
    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each reply's mean log-probability per token (B,) x 2: SimPO's and ORPO's length normalisation."""
        return self.chosen / self.chosen_tokens.clamp(min=1), self.rejected / self.rejected_tokens.clamp(min=1)

    def chosen_nll(self) -> torch.Tensor:
        """The cross-entropy of the chosen replies' tokens: its mean over every such token of the micro-batch."""
        return -self.chosen.sum() / self.chosen_tokens.sum().clamp(min=1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, without the cancellation of either form alone (split at -log 2)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def smoothed(h: torch.Tensor, smoothing: float) -> torch.Tensor:
    """-log sigmoid(h), a fraction `smoothing` of it replaced by the flipped label's -log sigmoid(-h)."""
    return -(1 - smoothing) * F.logsigmoid(h) - smoothing * F.logsigmoid(-h)


def preference_loss(args, policy: Replies, reference: Optional[tuple[torch.Tensor, torch.Tensor]]
                    ) -> tuple[torch.Tensor, dict]:
    """The loss args.loss_type names (args: the dpo section: beta, label_smoothing, simpo_gamma, rpo_alpha), the mean
    over the pairs, and its statistics: rewards, margin, preference accuracy (a tie counts half), log-probs. reference:
    the reference's summed log-probabilities of the chosen and rejected replies, None for simpo and orpo."""
    kind, beta = args.loss_type, args.beta
    if kind in REFERENCE_FREE:
        chosen, rejected = policy.means()   # TRL's CPO and ORPO trainers log these as logps/chosen, logps/rejected
        chosen_reward, rejected_reward = beta * chosen, beta * rejected
    else:
        chosen, rejected = policy.chosen, policy.rejected
        u_chosen, u_rejected = chosen - reference[0], rejected - reference[1]
        chosen_reward, rejected_reward = beta * u_chosen, beta * u_rejected
    stats = {}
    if kind == "sigmoid":
        losses = smoothed(chosen_reward - rejected_reward, args.label_smoothing)
    elif kind == "ipo":
        per_token = u_chosen / policy.chosen_tokens.clamp(min=1) - u_rejected / policy.rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    elif kind == "hinge":
        losses = torch.relu(1 - (chosen_reward - rejected_reward))
    elif kind == "apo_zero":
        losses = 1 - torch.sigmoid(chosen_reward) + torch.sigmoid(rejected_reward)
    elif kind == "simpo":
        losses = smoothed(chosen_reward - rejected_reward - args.simpo_gamma, args.label_smoothing)
    elif kind == "orpo":
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        stats["nll"] = policy.chosen_nll()
        losses = stats["nll"] - beta * F.logsigmoid(log_odds)
    else:
        raise ValueError(f"unknown loss_type {kind!r}")   # config_checks refuses it by name first
    loss = losses.mean()
    if args.rpo_alpha:
        stats["nll"] = policy.chosen_nll()
        loss = loss + args.rpo_alpha * stats["nll"]
    margin = chosen_reward - rejected_reward
    accuracy = (margin > 0).float() + 0.5 * (margin == 0).float()
    stats = {"accuracy": accuracy.mean(), "margin": margin.mean(), "chosen_reward": chosen_reward.mean(),
             "rejected_reward": rejected_reward.mean(), "chosen_logps": chosen.mean(),
             "rejected_logps": rejected.mean(), **stats}
    return loss, {k: v.detach() for k, v in stats.items()}
