"""Loading a model to use it: the device and dtype a command asks for, the one checkpoint loader, the tokenizer.

`load_model(path)` reads any checkpoint this repository writes (a step_N.pt file, a sharded step_N/ directory, a
run directory's newest), a Hugging Face model directory, or an s3:// run or checkpoint (downloaded first) ->
(model, config, info). generate.py, app.py, evaluation.py, convert_hf.py, validate_params.py and sft.py all load
through it.
"""

import json
import sys
from pathlib import Path
from typing import Optional

import torch
from tokenizers import Tokenizer

from model import SmolLM2
from smollm2.checkpoint import (is_hf_dir, is_sharded, load_state_into, model_config_from_hf, read_hf_state_dict,
                                read_sharded_model, resolve_checkpoint, run_dir_of, training_checkpoint)
from smollm2.config import Config
from smollm2.config_load import config_from_dict
from smollm2.errors import CheckpointError, ConfigError, InputError, RemoteError
from smollm2.quantize import quantize_model
from smollm2.runtime import gpu_has_bf16


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name}: not a device torch knows; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InputError(f"--device {name}: torch sees {torch.cuda.device_count()} GPU(s), numbered from 0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {name}: torch sees no Apple GPU (MPS) here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"--device {name}: generation runs on cpu, cuda or mps; use auto, cpu, cuda or cuda:N")
    return device


def pick_dtype(device: torch.device, name: str) -> torch.dtype:
    """fp32 on CPU (half-precision matmuls there are slow or emulated); bf16 on a GPU that has it, else fp16."""
    if device.type != "cuda":
        if name not in ("auto", "fp32"):
            raise InputError(f"--dtype {name} is for GPUs; on {device.type} generation runs in fp32")
        return torch.float32
    if name == "auto":
        name = "bf16" if gpu_has_bf16() else "fp16"
    if name == "bf16" and not gpu_has_bf16():
        raise InputError("--dtype bf16: this GPU has no bf16 support (compute capability < 8.0); use --dtype fp16")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def tokenizer_file(name: str) -> Optional[Path]:
    """The local file a tokenizer name means: the file itself, or a directory's tokenizer.json; None for a hub name."""
    path = Path(name)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file() and name.endswith(".json"):
        raise InputError(f"tokenizer {path}: file not found; pass --tokenizer FILE")
    return path if path.is_file() else None


def open_tokenizer(name: Optional[str]) -> Tokenizer:
    """A tokenizer.json file, a directory holding one, or a Hugging Face hub name (downloaded once, then cached)."""
    if not name:
        raise InputError("no tokenizer.json beside the checkpoint and none named in its config; pass --tokenizer FILE")
    path = tokenizer_file(name)
    try:
        return Tokenizer.from_file(str(path)) if path is not None else Tokenizer.from_pretrained(name)
    except Exception as e:
        raise InputError(f"tokenizer '{name}' could not be loaded ({e}); pass --tokenizer FILE") from None


def eos_id_for(cfg, tokenizer: Tokenizer) -> Optional[int]:
    """The token that ends a completion: the model config's eos_token_id, else the tokenizer's <|endoftext|>."""
    eos = cfg.model.model_config.eos_token_id
    return eos if eos is not None else tokenizer.token_to_id("<|endoftext|>")


def load_model(path, device="cpu", dtype: Optional[torch.dtype] = None,
               quantize: Optional[str] = None) -> tuple[SmolLM2, Config, dict]:
    """Load a model from a training checkpoint, a run directory or a HF directory -> (model, config, info).

    The model comes on `device`, in `dtype` (default: as stored, fp32), and with `quantize="int8"` its matrices in
    int8 for decoding (quantize.py), which the file itself never holds.

    info holds `source` (the file read), `step` and `val_loss` when known, and `tokenizer` (a tokenizer.json found
    beside the weights, or the config's tokenizer name). An s3:// path (a run's prefix or one checkpoint's key) is
    downloaded first, into a local cache, with the run's tokenizer.json.
    """
    if str(path).startswith("s3://"):
        from smollm2 import remote  # boto3 is loaded only by those who name a bucket
        try:
            path = remote.download_checkpoint(str(path))
        except RemoteError as e:
            raise CheckpointError(str(e)) from None
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    model, cfg, info = _from_hf_dir(path) if is_hf_dir(path) else _from_training_checkpoint(resolve_checkpoint(path))
    return quantize_model(model.to(device, dtype).eval(), quantize), cfg, info


def _from_hf_dir(path: Path) -> tuple[SmolLM2, Config, dict]:
    where = path / "config.json"
    try:
        hf = json.loads(where.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{where}: expected a JSON object of config keys")
    mcfg = model_config_from_hf(hf, str(where))
    cfg = Config()
    cfg.model.model_config = mcfg
    cfg.tokens.sequence_length = min(cfg.tokens.sequence_length, mcfg.max_position_embeddings)
    model = unfilled(mcfg)
    load_state_into(model, read_hf_state_dict(path), str(path))
    tok = path / "tokenizer.json"
    return model, cfg, {"source": str(path), "step": None, "val_loss": None,
                        "tokenizer": str(tok) if tok.is_file() else None}


def unfilled(mcfg) -> SmolLM2:
    """A model whose weights a checkpoint fills next, given storage on the CPU but no random init (seconds at 1.7B);
    load_state_into refuses a checkpoint that lacks any of its tensors, so none is left unfilled."""
    with torch.device("meta"):
        model = SmolLM2(mcfg)
    return model.to_empty(device="cpu")


def _from_training_checkpoint(file: Path) -> tuple[SmolLM2, Config, dict]:
    """A step_N.pt file, or a sharded step_N/ directory whose shards are consolidated into one model."""
    ckpt = training_checkpoint(file)
    try:
        cfg = config_from_dict(ckpt["config"])
    except ConfigError as e:
        raise CheckpointError(f"{file}: its stored config is invalid: {e}") from None
    model = unfilled(cfg.model.model_config)
    if is_sharded(file):
        read_sharded_model(file, model)
    else:
        load_state_into(model, ckpt["model"], str(file))
    state = ckpt.get("train_state", {})
    tok = run_dir_of(file) / "tokenizer.json"
    return model, cfg, {"source": str(file), "step": state.get("step"), "val_loss": state.get("val_loss"),
                        "tokenizer": str(tok) if tok.is_file() else cfg.tokenizer.tokenizer_name_or_path}
