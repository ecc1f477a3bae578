"""Data stages: which data mixture feeds each optimizer step, as nanotron's `data_stages` define it.

SmolLM2 was trained in stages: at given steps the mixture of sources (and their weights) changes. A stage runs from
its start_training_step (the 1-based optimizer step, so the first stage starts at 1) until the next stage starts.
Each stage reads its own data from its start, in its own folder, as nanotron's per-stage dataloaders did; a stage's
position counts the micro-batches taken during that stage. What reads data is handed a Stage (stages_of): the
stage's sources, seed and folder, a small frozen value, never the whole Config.

The training loop needs one call: `begin_step(step)` before the micro-batches of optimizer step `step`. The
loader's state_dict() holds every stage's position, so a resume inside any stage continues that stage where it
stopped, and validation follows the running stage's sources.
"""

import os
import re
from dataclasses import dataclass

from smollm2.config import Config, DatasetArgs


def stage_at(cfg: Config, step: int) -> int:
    """The index of the stage that runs optimizer step `step` (1-based): the last one started by then."""
    return max(i for i, stage in enumerate(cfg.data_stages) if stage.start_training_step <= max(step, 1))


def describe(cfg: Config, index: int) -> str:
    """'stage 2/3 'decay' (from step 9000)', for the start line and the log."""
    stage = cfg.data_stages[index]
    return f"stage {index + 1}/{len(cfg.data_stages)} '{stage.name}' (from step {stage.start_training_step})"


def stage_folder(name: str) -> str:
    """A stage's name as a folder name: 'stable phase' -> 'stable-phase'."""
    return re.sub(r"[^\w.-]+", "-", name).strip("-.") or "stage"


def data_dir(cfg: Config) -> str:
    """Where the token shards go: data_prep.output_dir, or data/<general.run>."""
    return cfg.data_prep.output_dir or os.path.join("data", cfg.general.run)


@dataclass(frozen=True)
class Stage:
    """One data stage as the data path reads it: its sources (`dataset`), the seed that shuffles its files, and the
    folder of its shards. `where` is the key path that names it in messages."""
    index: int
    name: str
    dataset: DatasetArgs
    seed: int
    folder: str

    @property
    def where(self) -> str:
        return f"data_stages[{self.index}].data.dataset"


def stages_of(cfg: Config) -> list[Stage]:
    """Every data stage of the config. With one stage its folder is data_dir(cfg) itself, with several each stage
    has a subfolder named after it."""
    root, several = data_dir(cfg), len(cfg.data_stages) > 1
    return [Stage(i, stage.name, stage.data.dataset, stage.data.seed,
                  os.path.join(root, stage_folder(stage.name)) if several else root)
            for i, stage in enumerate(cfg.data_stages)]
