"""Direct preference optimisation: `python dpo.py --config CFG [key=value ...] [--resume [PATH]]`.

Starts from an SFT checkpoint (`dpo.model_name_or_path`), which is also the reference: a frozen copy, in eval mode
and without gradients, that the policy is scored against. For a prompt x with a chosen reply y+ and a rejected one y-,
each model gives the summed log-probability of a reply's tokens, and the implicit reward of the policy is
r(y) = beta * (log pi(y|x) - log ref(y|x)). The default loss is the sigmoid DPO loss (Rafailov et al., 2023):

    loss = -log sigmoid(r(y+) - r(y-))

which raises the chosen reply's probability relative to the rejected one's, while beta keeps the policy near the
reference. `dpo.loss_type` picks another of TRL's (smollm2/preference.py writes each out): ipo, hinge, apo_zero, or
the reference-free simpo and orpo, for which no reference is loaded (ORPO needs no SFT stage either). With
`dpo.precompute_ref_log_probs` the reference scores every training and held-out pair once, before step 1, and is
not kept. Logged beside the loss: the rewards of the chosen and rejected replies, their margin, the preference
accuracy (how often the margin is positive; a tie, where the policy still equals the reference, counts half, so 0.5
means nothing learned) and the policy's log-probabilities of both replies (both falling is a known failure of DPO).
Everything else is sft.py's and train.py's: the same loop, checkpoints, resume, S3, DDP and FSDP.

    python dpo.py --config configs/config_dpo_tiny.yaml
    python dpo.py --config configs/config_dpo_tiny.yaml --score runs/tiny-sft runs/tiny-dpo   # preference accuracy

Read next: evaluation.py, which scores any checkpoint on benchmarks.
"""

import copy
import dataclasses
import sys
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from model import SmolLM2
from sft import SFT, posttraining_command, start_from, tokenized
from smollm2 import chat_data
from smollm2.config import REFERENCE_FREE, Config, DPOArgs
from smollm2.preference import Replies, preference_loss
from smollm2.task import to_device


def reply_logprobs(model: torch.nn.Module, batch: tuple, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of pair rows (chosen inputs, chosen targets, rejected inputs, rejected targets) -> the summed
    log-probability of the chosen and of the rejected replies (B,) each, from one forward over both."""
    xc, yc, xr, yr = to_device(batch[:4], torch.device(device))
    _, nll = model(torch.cat([xc, xr]), torch.cat([yc, yr]), per_row=True)   # (2B,): -log p(reply | prompt)
    return (-nll).chunk(2)


def replies(model: torch.nn.Module, batch: tuple, device) -> Replies:
    """reply_logprobs, with each reply's token count (its targets)."""
    lengths = ((batch[i] != -100).sum(-1).to(device) for i in (1, 3))
    return Replies(*reply_logprobs(model, batch, device), *lengths)


@torch.no_grad()
def reference_log_probs(model: SmolLM2, rows: np.ndarray, rt, batch_size: int) -> np.ndarray:
    """The model's summed log-probabilities of every pair's chosen and rejected reply (n, 2), in eval mode and the
    run's precision: each rank scores its share of the rows, and the shares add up to the whole table on every rank."""
    model.eval()
    table = torch.zeros(len(rows), 2, device=rt.device)
    for i in range(rt.rank * batch_size, len(rows), batch_size * rt.world):
        batch = tuple(torch.from_numpy(rows[i:i + batch_size, c].astype(np.int64)) for c in range(4))
        with rt.autocast():
            table[i:i + batch_size] = torch.stack(reply_logprobs(model, batch, rt.device), -1).float()
    if rt.world > 1:
        dist.all_reduce(table)
    return table.cpu().numpy()


class DPO(SFT):
    """SFT's start and chat format; the data are preference pairs and the loss is dpo.loss_type's, against a frozen
    reference (or its log-probabilities, precomputed) unless the loss needs none."""
    section = "dpo"
    reports_perplexity = False   # the validation loss is DPO's, not a per-token cross-entropy
    weighs_by_targets = False    # a mean over pairs, and every micro-batch holds as many

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.reference: Optional[SmolLM2] = None

    def data(self, cfg: Config, rt, tokenizer):
        chat_rows = super().data(cfg, rt, tokenizer)
        if self.args.precompute_ref_log_probs:   # the start is the reference: it scores the pairs before it trains
            for loader in (chat_rows.train, chat_rows.val):
                loader.blocks.scores = reference_log_probs(self.start.to(rt.device), loader.blocks.rows, rt,
                                                           cfg.tokens.micro_batch_size)
            if rt.main:
                print(f"reference: the log-probs of {chat_rows.rows:,} training and {len(chat_rows.val.blocks.rows):,} "
                      "held-out pairs computed (dpo.precompute_ref_log_probs); no reference model is kept", flush=True)
        return chat_rows

    def model(self, cfg: Config, rt, resuming: Optional[dict]) -> SmolLM2:
        policy = super().model(cfg, rt, resuming)
        if self.args.loss_type not in REFERENCE_FREE and not self.args.precompute_ref_log_probs:
            # copied before a resumed run loads its trained weights into the policy: the reference is always the start
            self.reference = copy.deepcopy(policy).eval().requires_grad_(False)
        return policy

    def loss(self, run, batch) -> tuple[torch.Tensor, dict]:
        device = run.rt.device
        reference = None
        if len(batch) == 5:   # the rows' precomputed reference log-probs (B, 2)
            reference = batch[4].to(device).unbind(-1)
        elif self.reference is not None:
            with torch.no_grad():
                reference = reply_logprobs(self.reference, batch, device)
        return preference_loss(self.args, replies(run.net, batch, device), reference)


# ---------------------------------------------------------------- measuring: preference accuracy on held-out pairs


@torch.no_grad()
def preference_stats(policy: SmolLM2, reference: Optional[SmolLM2], rows, args: DPOArgs, batch_size: int = 32) -> dict:
    """The loss's statistics over every held-out pair (rows as chat_data.dpo_rows makes them), the loss included;
    reference: None for a reference-free loss."""
    sums, n = {}, 0
    for i in range(0, len(rows), batch_size):
        batch = tuple(torch.from_numpy(rows[i:i + batch_size, c].astype("int64")) for c in range(4))
        ref = None if reference is None else reply_logprobs(reference, batch, "cpu")
        loss, stats = preference_loss(args, replies(policy, batch, "cpu"), ref)
        size = len(batch[0])
        for key, value in {"loss": loss, **stats}.items():
            sums[key] = sums.get(key, 0.0) + value.item() * size
        n += size
    return {key: value / n for key, value in sums.items()} | {"n": n}


def score(cfg: Config, checkpoint: str) -> dict:
    """Preference accuracy (and margin) of a checkpoint on the held-out pairs, by the rewards of the config's loss:
    against the config's reference, or without one for simpo and orpo."""
    policy, tokenizer, _ = start_from(copy.deepcopy(cfg), dataclasses.replace(cfg.dpo, model_name_or_path=checkpoint))
    reference = None
    if cfg.dpo.loss_type not in REFERENCE_FREE:
        reference = start_from(copy.deepcopy(cfg), cfg.dpo)[0].eval()
    _, val = chat_data.held_out(cfg.dpo, cfg.general.seed)
    rows, _ = tokenized(cfg, tokenizer, val)
    return {"checkpoint": checkpoint, **preference_stats(policy.eval(), reference, rows, cfg.dpo)}


def report(cfg: Config, checkpoint: str) -> str:
    r, loss = score(cfg, checkpoint), cfg.dpo.loss_type
    against = f"no reference: {loss}" if loss in REFERENCE_FREE else f"reference {cfg.dpo.model_name_or_path}"
    return (f"{r['checkpoint']}: preference accuracy {r['accuracy']:.3f}, reward margin {r['margin']:.3f} on {r['n']} "
            f"held-out pairs ({against})")


def main(argv=None) -> int:
    return posttraining_command(argv, __doc__, DPO, "each checkpoint's preference accuracy on the config's held-out "
                                "pairs, against the config's reference (dpo.model_name_or_path)", report)


if __name__ == "__main__":
    sys.exit(main())
