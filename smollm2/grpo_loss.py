"""GRPO's maths on tensors: group-normalised advantages and the clipped policy-gradient loss with a KL penalty.

For a prompt, G completions o_1..o_G get rewards r_i; each one's advantage is its reward against the group's,
A_i = (r_i - mean(r)) / (std(r) + 1e-4) (Shao et al., 2024), or without the division (Dr. GRPO, Liu et al., 2025).
Every token t of o_i then carries, with the importance ratio rho = pi(o_t) / pi_old(o_t) of the policy against the one
that sampled it, the loss -min(rho A_i, clip(rho, 1 - eps, 1 + eps) A_i) + beta k3, where k3 = exp(d) - d - 1 with
d = log ref(o_t) - log pi(o_t) is Schulman's unbiased, always positive estimate of KL(pi || ref). grpo.py feeds it.
"""

import torch


def group_advantages(rewards: torch.Tensor, group: int, scale: bool = True) -> torch.Tensor:
    """Rewards (N,) of N / group prompts' completions, each prompt's consecutive -> advantages (N,). A group whose
    rewards are all equal gets 0 everywhere: it says nothing about which completion is better."""
    r = rewards.view(-1, group)                                    # (prompts, G)
    advantages = r - r.mean(1, keepdim=True)
    if scale:
        advantages = advantages / (r.std(1, keepdim=True) + 1e-4)   # the unbiased std, as TRL takes it
    return advantages.flatten()


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, beta: float, epsilon: float, loss_type: str,
                max_completion_length: int) -> tuple[torch.Tensor, dict]:
    """Per-token log-probs (N, T) of the completions under the policy, the policy that sampled them and the reference,
    advantages (N,), mask (N, T) True on completion tokens -> (loss, stats: kl, clip_fraction). loss_type grpo: each
    completion's mean over its tokens, then the mean over completions (a long completion's tokens each weigh less);
    dr_grpo: the sum over every token divided by N x max_completion_length, a constant (no length bias)."""
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)
    A = advantages[:, None]                                                  # (N, 1): one per completion
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon)
    per_token = -torch.min(ratio * A, clipped * A)
    d = ref_logp - logp
    kl = torch.exp(d) - d - 1                                                # k3 >= 0, 0 where pi = ref
    if beta:
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    else:
        loss = (per_token * mask).sum() / (mask.size(0) * max_completion_length)
    # a token is clipped where the clip takes its gradient away: the ratio past the bound in the advantage's direction
    was_clipped = ((ratio < 1 - epsilon) & (A < 0)) | ((ratio > 1 + epsilon) & (A > 0))
    tokens = mask.sum().clamp(min=1)
    stats = {"kl": (kl * mask).sum() / tokens, "clip_fraction": (was_clipped.float() * mask).sum() / tokens}
    return loss, {k: v.detach() for k, v in stats.items()}


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, T, V) and targets (N, T) (-100 where none) -> each target's log-probability (N, T) and the entropy
    of each position's distribution (N, T), in fp32; the entropy is only watched, so it carries no gradient."""
    logp_all = torch.log_softmax(logits.float(), -1)
    logp = logp_all.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy
