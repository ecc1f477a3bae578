"""Checkpoints: written atomically, read without running pickled code, found by step, loaded from any source.

A training checkpoint is one file `step_00001000.pt` under `<run dir>/checkpoints/`, holding named parts:
`model`, `optimizer`, `train_state` (step, tokens seen, validation loss), `data` (loader position), `rng` and the
resolved `config`. Resume restores every part, so nothing is silently left out. A run sharded over several processes
(FSDP) writes a directory `step_00001000/` instead: each rank's shards of model and optimizer, written by
torch.distributed.checkpoint, and `train_state.pt` with the other parts (distributed.py writes it).
`load_model()` accepts either, a run directory (its newest checkpoint), any of them in a bucket (s3://..., through
remote.py) or a Hugging Face model directory (config.json + safetensors).
"""

import io
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.distributed.checkpoint import FileSystemReader

from model import ModelConfig, SmolLM2
from smollm2.config_load import config_from_dict
from smollm2.errors import CheckpointError, ConfigError

_NAME = re.compile(r"^step_(\d+)(\.pt)?$")   # a file step_N.pt, or a sharded checkpoint's directory step_N
TRAIN_STATE = "train_state.pt"               # in a sharded checkpoint: every part but the model and optimizer tensors


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


class _Writes:
    """A file's write(), remembering the OSError (a full disk...) that torch.save turns into an opaque RuntimeError."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temp file, fsync, then rename: a kill mid-save leaves the previous file intact. A save the
    disk refuses (full, read-only, ...) is a CheckpointError naming the reason, with the temp file removed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writes = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)   # whatever was left there, a link included, is never written through
        with open(tmp, "xb") as f:
            writes = _Writes(f)
            torch.save(obj, writes)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:   # a second Ctrl-C included: no temp file stays behind
        cause = writes.error if writes is not None and writes.error is not None else e
        tmp.unlink(missing_ok=True)
        if not isinstance(cause, OSError):   # interrupted, or torch.save failing for another reason than the disk
            raise
        raise CheckpointError(f"{path}: could not be written ({cause.strerror or cause}); nothing was replaced and no "
                              "partial file is left") from None
    sync_dir(path.parent)


def sync_dir(folder: Path) -> None:
    """fsync a directory, which makes a rename inside it durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def checkpoint_step(name: str) -> Optional[int]:
    """The step of a checkpoint's name (step_00001000.pt or step_00001000/ -> 1000); None for any other name."""
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def is_sharded(path) -> bool:
    """A sharded checkpoint's directory: DCP's .metadata beside train_state.pt."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / TRAIN_STATE).is_file()


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp files and folders of an interrupted save are not listed)."""
    run_dir = Path(run_dir)
    folder = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    found = [(step, p) for p in folder.glob("step_*") if (step := checkpoint_step(p.name)) is not None
             and (p.is_file() if p.suffix == ".pt" else is_sharded(p))]
    return [p for _, p in sorted(found)]


def run_dir_of(file) -> Path:
    """The run directory a checkpoint file belongs to: <run>/checkpoints/step_N.pt -> <run>, else the file's folder."""
    file = Path(file)
    return file.parent.parent if file.parent.name == "checkpoints" else file.parent


def latest_checkpoint(run_dir) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def rotate_checkpoints(run_dir, keep: int, spare: Optional[Callable[[Path], bool]] = None) -> list[Path]:
    """Delete all but the newest `keep` checkpoints, sparing those `spare(path)` holds on to (e.g. still uploading);
    return what was deleted."""
    old = [p for p in (list_checkpoints(run_dir)[:-keep] if keep > 0 else []) if not (spare and spare(p))]
    for p in old:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return old


def load_checkpoint(path) -> dict:
    """Load a training checkpoint with weights_only=True: tensors and plain containers only, never arbitrary code.
    For a sharded checkpoint this is its train_state.pt: every part but the model and optimizer tensors."""
    path = Path(path)
    if is_sharded(path):
        path = path / TRAIN_STATE
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # truncated zip, wrong file type, or a pickle that wants to run code
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a loadable checkpoint ({first[:200]}); it may be truncated, corrupt or "
                              "not a checkpoint of this repository — pick another one") from None


def training_checkpoint(path) -> dict:
    """load_checkpoint, refusing a file that is not one train.py or `convert_hf.py import` wrote (a bare
    state_dict, ...): every reader of it expects its config and, unless sharded, its model part."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "config" not in ckpt or ("model" not in ckpt and not is_sharded(path)):
        raise CheckpointError(f"{path}: not a training checkpoint of this repository (it lacks its model, config and "
                              "train_state parts; a bare state_dict cannot be resumed); give a step_*.pt that "
                              "train.py or `convert_hf.py import` wrote")
    return ckpt


# Everything the .metadata file of a checkpoint written by distributed.py holds. torch.distributed.checkpoint's own
# reader unpickles that file with no restriction; here any other class is refused before it is built, including
# BytesStorageMetadata, whose entries DCP would read back with torch.load(weights_only=False).
_DCP_CLASSES = {("torch.distributed.checkpoint.metadata", name) for name in (
    "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "MetadataIndex", "StorageMeta",
    "_MEM_FORMAT_ENCODING")} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                                ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _DCP_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                               torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(f"its .metadata names {module}.{name}, which no checkpoint of this repository holds: "
                              "refused, nothing was run")


class SafeReader(FileSystemReader):
    """torch.distributed.checkpoint's file reader, with the .metadata file unpickled through the allow-list above.
    Tensors themselves are read by DCP with torch.load(weights_only=True)."""

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
        with open(Path(self.path) / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        if not isinstance(metadata, Metadata):
            raise CheckpointError("its .metadata is not a torch.distributed.checkpoint index")
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load_sharded_state(state: dict, path: Path) -> None:
    """Fill `state`'s tensors in place from a sharded checkpoint with DCP (re-sharded to this run's world size, or
    whole in a process with no process group), reading it through SafeReader. Any failure is one CheckpointError."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        with warnings.catch_warnings():   # "no process group: assuming a single process", which is the intent
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            load(state, checkpoint_id=str(path), storage_reader=SafeReader(str(path)))
    except (CheckpointException, CheckpointError, RuntimeError, ValueError, OSError, pickle.UnpicklingError) as e:
        if isinstance(e, CheckpointException):   # DCP wraps what each rank raised, with its traceback
            e = next(iter(e.failures.values()))[0] if e.failures else e
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: not a loadable sharded checkpoint for this model ({first[:300]})") from None


def read_sharded_model(path: Path, model: SmolLM2) -> None:
    """Consolidate a sharded checkpoint's model shards into `model` (the tensors of its state_dict, in place)."""
    load_sharded_state({"model": model.state_dict()}, path)


def resolve_checkpoint(path) -> Path:
    """A checkpoint (file or sharded directory), or a run directory -> its newest checkpoint."""
    path = Path(path)
    if path.is_dir() and not is_sharded(path):
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path}: no step_*.pt checkpoint in this directory or its checkpoints/ folder")
        return latest
    return path


def is_hf_dir(path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def model_config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """A Hugging Face Llama config.json -> ModelConfig, refusing what this model does not implement."""
    if hf.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{where}: model_type '{hf.get('model_type')}' is not a Llama model")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise CheckpointError(f"{where}: {key}=true is not supported (SmolLM2 has no biases)")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise CheckpointError(f"{where}: scaled RoPE is not supported, only plain rotary embeddings")
    fields = {k: hf[k] for k in ModelConfig.__dataclass_fields__ if k in hf}
    if "rope_theta" not in fields and "rope_theta" in rope:
        fields["rope_theta"] = rope["rope_theta"]
    for key in ("rope_theta", "rms_norm_eps", "initializer_range"):
        if key in fields:
            fields[key] = float(fields[key])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):   # HF allows a list of ids; we keep the first
        if isinstance(fields.get(key), list):
            fields[key] = fields[key][0] if fields[key] else None
    fields.pop("rope_scaling", None)
    try:
        seq = fields.get("max_position_embeddings", ModelConfig.max_position_embeddings)
        cfg = config_from_dict({"model": {"model_config": fields},
                                "tokens": {"sequence_length": seq}}).model.model_config
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != cfg.head_dim:
        raise CheckpointError(f"{where}: head_dim {head_dim} != hidden_size/num_attention_heads ({cfg.head_dim})")
    return cfg


def files_to_load(path) -> list[Path]:
    """Every file load_model(path) reads from a local path: a checkpoint file (a run directory's newest), a sharded
    checkpoint's index, train_state.pt and every shard file the index names, or a Hugging Face directory's
    config.json and safetensors weights. A caller that must keep reads inside one folder checks these before loading
    (app.py does); a new checkpoint layout lists its files here."""
    path = Path(path)
    if is_hf_dir(path):
        return [path / "config.json", *hf_weight_files(path)]
    file = resolve_checkpoint(path)
    if not is_sharded(file):
        return [file]
    try:   # the index through the same allow-list as SafeReader: reading it runs no code
        with open(file / ".metadata", "rb") as f:
            index = _MetadataUnpickler(io.BytesIO(f.read())).load()
        names = {info.relative_path for info in index.storage_data.values()}
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: its .metadata is not a readable checkpoint index ({e})") from None
    return [file / ".metadata", file / TRAIN_STATE, *(file / name for name in sorted(names))]


def hf_weight_files(path) -> list[Path]:
    return sorted(Path(path).glob("*.safetensors"))


def read_hf_state_dict(path) -> dict:
    """Every tensor of a HF directory's model.safetensors (or its shards), keyed by HF name."""
    from safetensors.torch import load_file
    path = Path(path)
    files = hf_weight_files(path)
    if not files:
        raise CheckpointError(f"{path}: no .safetensors weights next to config.json")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:   # safetensors raises its own SafetensorError for a truncated or foreign file
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    return state


def load_state_into(model: SmolLM2, state: dict, where: str) -> None:
    """Strict load with messages that say which tensors are missing, unexpected or of the wrong shape."""
    state = dict(state)
    if model.config.tie_word_embeddings:   # HF writes a tied head once, under the embedding's name
        state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))
        head, embed = state["lm_head.weight"], state.get("model.embed_tokens.weight")
        # our head IS the embedding: loading both would silently keep whichever is written last
        if head is not None and embed is not None and not torch.equal(head, embed):
            raise CheckpointError(f"{where}: tie_word_embeddings is true but lm_head.weight differs from "
                                  "model.embed_tokens.weight; set tie_word_embeddings to false in its config")
    own = model.state_dict()
    missing = [k for k in own if state.get(k) is None]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if state.get(k) is not None and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
                 f"shape mismatch (file vs config) {wrong[:3]}" if wrong else ""]
        raise CheckpointError(f"{where}: weights do not match the model its config describes: "
                              + "; ".join(p for p in parts if p))
    model.load_state_dict(state)
