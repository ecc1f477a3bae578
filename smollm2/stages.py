"""Data stages: which data mixture feeds each optimizer step, as nanotron's `data_stages` define it.

SmolLM2 was trained in stages: at given steps the mixture of sources (and their weights) changes. A stage runs from
its start_training_step (the 1-based optimizer step, so the first stage starts at 1) until the next stage starts.
Each stage reads its own data from its start, in its own folder (stage_view), as nanotron's per-stage
dataloaders did; a stage's position counts the micro-batches taken during that stage.

The training loop needs one call: `begin_step(step)` before the micro-batches of optimizer step `step`. The
loader's state_dict() holds every stage's position, so a resume inside any stage continues that stage where it
stopped, and validation follows the running stage's sources.
"""

import dataclasses
import os
import re

from smollm2.config import Config


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


def stage_view(cfg: Config, index: int) -> Config:
    """The config as data stage `index` sees it: data_stages holds that stage alone, and data_prep.output_dir is
    its own folder (data_dir(cfg) itself when there is one stage, else a subfolder named after the stage). Whatever
    reads data (sources.py, prepare.py, data.py) reads data_stages[0] of a view; its `stage_index` names the stage in
    messages."""
    folder = data_dir(cfg)
    if len(cfg.data_stages) > 1:
        folder = os.path.join(folder, stage_folder(cfg.data_stages[index].name))
    view = dataclasses.replace(cfg, data_stages=[cfg.data_stages[index]],
                               data_prep=dataclasses.replace(cfg.data_prep, output_dir=folder))
    view.stage_index = index
    return view
