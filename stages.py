"""Data stages: which data mixture feeds each optimizer step, as nanotron's `data_stages` define it.

SmolLM2 was trained in stages: at given steps the mixture of sources (and their weights) changes. A stage runs from
its start_training_step (the 1-based optimizer step, so the first stage starts at 1) until the next stage starts.
Each stage reads its own data from its start, in its own folder (config.stage_view), as nanotron's per-stage
dataloaders did; a stage's position counts the micro-batches taken during that stage.

The training loop needs one call: `begin_step(step)` before the micro-batches of optimizer step `step`. The
loader's state_dict() holds every stage's position, so a resume inside any stage continues that stage where it
stopped, and validation follows the running stage's sources.
"""

from typing import Callable, Optional

from tokenizers import Tokenizer

import data
from config import Config, stage_view
from shards import DataError


def stage_at(cfg: Config, step: int) -> int:
    """The index of the stage that runs optimizer step `step` (1-based): the last one started by then."""
    return max(i for i, stage in enumerate(cfg.data_stages) if stage.start_training_step <= max(step, 1))


def describe(cfg: Config, index: int) -> str:
    """'stage 2/3 'decay' (from step 9000)', for the start line and the log."""
    stage = cfg.data_stages[index]
    return f"stage {index + 1}/{len(cfg.data_stages)} '{stage.name}' (from step {stage.start_training_step})"


class StagedLoader:
    """One rank's micro-batches through every data stage, and the running stage's validation sources."""

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1, tokenizer: Optional[Tokenizer] = None,
                 log: Callable[[str], None] = print):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.tokenizer = tokenizer or data.load_tokenizer(cfg)
        self.log = log if rank == 0 else (lambda _: None)
        self.index: Optional[int] = None
        self.loader: Optional[data.TokenLoader] = None
        self.positions: dict[str, dict] = {}   # by stage name: the saved position of each stage not running now
        self.validation_sets: dict[int, list] = {}

    @property
    def name(self) -> str:
        return self.cfg.data_stages[self.index or 0].name

    def begin_step(self, step: int) -> bool:
        """Select the stage of optimizer step `step` (1-based); True when it differs from the one running before."""
        index = stage_at(self.cfg, step)
        if index == self.index:
            return False
        if self.loader is not None:
            self.positions[self.name] = self.loader.state_dict()
        self.index = index
        self.loader = data.train_loader(stage_view(self.cfg, index), self.rank, self.world_size, self.tokenizer)
        if self.name in self.positions:
            self.loader.load_state_dict(self.positions.pop(self.name))
        self.validation_sets.pop(index - 1, None)   # the stage before is over: free its held-out data
        return True

    def next_batch(self):
        if self.loader is None:
            self.begin_step(1)
        return self.loader.next_batch()

    def validation(self) -> list[tuple[str, float, data.TokenLoader]]:
        """(source name, mixing weight, loader of its held-out blocks) for every source of the running stage."""
        index = self.index or 0
        if index not in self.validation_sets:
            view = stage_view(self.cfg, index)
            weights = {name: weight for name, weight, _ in view.data_stages[0].data.dataset.sources()}
            loaders = data.val_loaders(view, self.rank, self.world_size, self.tokenizer)
            if not loaders:
                raise DataError(f"tokens.limit_val_batches is {self.cfg.tokens.limit_val_batches} but nothing is held "
                                "out for validation (data_prep.val_tokens is 0): raise data_prep.val_tokens or set "
                                "tokens.limit_val_batches=0")
            self.validation_sets[index] = [(name, weights.get(name, 1.0), loader) for name, loader in loaders.items()]
        return self.validation_sets[index]

    def state_dict(self) -> dict:
        positions = dict(self.positions)
        if self.loader is not None:
            positions[self.name] = self.loader.state_dict()
        return {"stages": positions}

    def load_state_dict(self, state: dict) -> None:
        """Every stage's position; a checkpoint from before stages were read holds the first stage's alone."""
        self.positions = dict(state["stages"]) if "stages" in state else {self.cfg.data_stages[0].name: state}
        unknown = set(self.positions) - {stage.name for stage in self.cfg.data_stages}
        if unknown:
            raise DataError(f"the checkpoint holds the data position of stage(s) {', '.join(sorted(unknown))}, which "
                            "data_stages no longer names; resume with the stages the run was started with")
        self.index, self.loader = None, None   # begin_step() opens the stage of the next step at its position
