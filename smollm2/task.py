"""What a training run starts from, reads and minimises: the task train.py's loop runs.

The loop (train.py) asks its task eight things: the tokenizer, the batches, the step count they make (where a config
counts epochs), the model before training, one micro-batch's loss and its weight in the step, and how to turn a
sampling prompt into ids and where a sample ends. train.py's Pretraining answers with a fresh model, the data stages
and the next-token loss; sft.py's SFT and dpo.py's DPO answer otherwise, and run through the same loop, checkpoints,
resume and distribution.
"""

from abc import ABC, abstractmethod
from typing import Optional

import torch
import torch.distributed as dist

from model import SmolLM2
from smollm2.config import Config
from smollm2.distributed import sharded
from smollm2.runtime import Runtime
from smollm2.tokenizer import eos_token_id, load_tokenizer


def to_device(batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """A micro-batch's same-shaped tensors on `device` in one host-to-device copy, stacked (x and y: one (2, B, T)).
    On CUDA from pinned memory: that copy is asynchronous, so the host goes on to read the next micro-batch while the
    GPU still computes this one; from pageable memory the copy would first wait for the GPU to finish its queue."""
    stacked = torch.stack(batch)
    if device.type == "cuda":
        stacked = stacked.pin_memory()
    return tuple(stacked.to(device, non_blocking=True).unbind(0))


class Task(ABC):
    """The defaults are pretraining's; a task overrides what it does otherwise."""
    reports_perplexity = True   # the validation loss is a per-token cross-entropy
    weighs_by_targets = False   # see weights()
    warns_of_spikes = True      # a loss far above its recent mean is worth a warning (a positive loss: not GRPO's)

    def tokenizer(self, cfg: Config):
        return load_tokenizer(cfg)   # under torchrun, a file lock lets one rank train it at first use

    @abstractmethod
    def data(self, cfg: Config, rt: Runtime, tokenizer):
        """The training batches, in data.StagedLoader's interface (next_batch, begin_step, validation, state)."""

    def fit_schedule(self, cfg: Config, rows_per_step: int) -> Optional[str]:
        """Set cfg's step count or warmup from the data, once read (sft.num_train_epochs, warmup_ratio), and say so
        for the log; rows_per_step: the rows one optimizer step reads on all ranks together."""
        return None

    @abstractmethod
    def describe_data(self, cfg: Config, step: int) -> str:
        """What feeds optimizer step `step`, for the start line."""

    def model(self, cfg: Config, rt: Runtime, resuming: Optional[dict]) -> SmolLM2:
        """The model before training (a checkpoint being resumed, if any, then loads its weights into it). One that
        FSDP will shard is built on the meta device, with no storage: each rank fills its own shards once sharded
        (distributed.materialize), unless a single-file checkpoint is to go in whole before."""
        if sharded(cfg, rt) and not (resuming and "model" in resuming):
            with torch.device("meta"):
                return SmolLM2(cfg.model.model_config, cfg.model.init_method.std)
        torch.manual_seed(cfg.general.seed)   # the same initial weights on every rank and as materialize() draws
        return SmolLM2(cfg.model.model_config, cfg.model.init_method.std).to(rt.device)

    def loss(self, run, batch) -> tuple[torch.Tensor, dict]:
        """One micro-batch's loss to minimise (run is train.py's Run), and statistics to log beside it (tensors,
        averaged like the loss)."""
        x, y = to_device(batch, run.rt.device)   # ids past the vocabulary: refused by data.py
        if not run.cfg.run.document_masking:
            return run.net(x, y)[1], {}
        segments = document_segments(x, eos_token_id(run.tokenizer))
        return run.net(x, y, segments=segments)[1], {}

    def weights(self, rt: Runtime, batches: list) -> Optional[list[float]]:
        """For a task whose loss is a mean over a micro-batch's target tokens, whose number varies (SFT's replies):
        each micro-batch's share of the target tokens that these micro-batches hold on every rank, times their number.
        The mean of the losses so weighted (over the micro-batches, and over ranks, as DDP and FSDP average
        gradients) is the mean over every target token, as if they were one batch. None where every micro-batch
        weighs the same: pretraining's (every position a target), DPO's (a mean over pairs, as many in each)."""
        if not self.weighs_by_targets:
            return None
        counts = [int((batch[1] != -100).sum()) for batch in batches]   # batch[1]: the targets, -100 where none
        total = torch.tensor(sum(counts), dtype=torch.int64, device=rt.device)
        if rt.world > 1:
            dist.all_reduce(total)
        return [c * len(batches) * rt.world / max(int(total), 1) for c in counts]

    def prompt(self, tokenizer, text: str) -> list[int]:
        """A sampling.prompts entry as the ids samples continue."""
        return tokenizer.encode(text).ids

    def stop_id(self, tokenizer) -> int:
        return eos_token_id(tokenizer)


def document_segments(x: torch.Tensor, eos: int) -> torch.Tensor:
    """Block ids (B, T) -> the document of each token (B, T), counted from 0 in each row: a document ends with its
    EOS, so the token after an EOS starts the next one."""
    ends = (x == eos).long()
    return ends.cumsum(-1) - ends
