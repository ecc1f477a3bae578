"""Hugging Face interop both ways: export a checkpoint as a transformers Llama directory, import one back.

    python convert_hf.py export --checkpoint_path runs/smollm2-135M --out hf/smollm2-135M
    python convert_hf.py import --hf_model HuggingFaceTB/SmolLM2-135M --out runs/from-hf

Export writes config.json (LlamaForCausalLM), model.safetensors, generation_config.json and the run's tokenizer, so
`AutoModelForCausalLM.from_pretrained(DIR)` gives the same logits as our model and the wider ecosystem (evaluation
harnesses, vLLM, llama.cpp converters) can read it. A tokenizer with the chat tokens gets the chat template in its
tokenizer_config.json (smollm2/chat.py's, or the one an import kept), which `apply_chat_template` and llama.cpp's
converter read; a fine-tuned checkpoint's generation_config also ends a reply at <|im_end|>. Import turns a HF Llama
directory or hub id into a training checkpoint that train.py can start from and generate.py can load, and keeps the
directory's chat template beside the run's tokenizer (chat_template.jinja), for a later export. model.py uses HF's
parameter names and rotary layout, so neither direction needs a rename map or a weight permutation.

Read next: validate_params.py, the proof that the two models agree.
"""

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from model import ModelConfig
from smollm2 import chat
from smollm2.checkpoint import checkpoint_name, list_checkpoints, run_dir_of, save_atomic
from smollm2.config_load import config_to_dict
from smollm2.errors import CheckpointError, command
from smollm2.loading import load_model

# ModelConfig fields that only nanotron reads; every other field is a LlamaConfig key of the same name and meaning
NANOTRON_ONLY = ("is_llama_config", "rope_interleaved", "rope_scaling")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def hf_config_dict(mcfg: ModelConfig, dtype: str = "float32") -> dict:
    """Our ModelConfig as a transformers LlamaForCausalLM config.json (written by hand: no transformers needed)."""
    fields = {k: getattr(mcfg, k) for k in ModelConfig.__dataclass_fields__ if k not in NANOTRON_ONLY}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **fields, "head_dim": mcfg.head_dim,
            "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            # transformers 4.x reads torch_dtype, 5.x reads dtype (and warns about torch_dtype alone)
            "torch_dtype": dtype, "dtype": dtype}


def local_hf_dir(name: str) -> Path:
    """A local HF model directory as given, or a hub id, downloaded (config, weights, tokenizer) when online."""
    path = Path(name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: not a Hugging Face model directory (no config.json)")
        return path
    if not HUB_ID.match(name):
        raise CheckpointError(f"{name}: no such directory (and not a hub id of the form org/name)")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as e:   # offline, unknown repo, gated model: all say the same thing to the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{name}: not a local directory, and fetching it from the Hugging Face Hub failed "
                              f"({first[:200]})") from None


def _refuse_existing(path: Path, force: bool) -> None:
    if path.exists() and (path.is_file() or any(path.iterdir())) and not force:
        raise CheckpointError(f"{path}: already exists; pass --force to overwrite it")


def check_outputs(files: list[Path], force: bool, problems: tuple[str, ...] = ()) -> None:
    """Everything a command will write, checked before it writes anything: a file name that is a folder, a folder
    that is a file, a folder it may not write in, or a file that exists (without --force) is refused, all together
    in one error, along with the caller's own `problems`."""
    problems, existing = list(problems), []
    for f in files:
        if f.is_dir():
            problems.append(f"{f} is a directory, not a file")
        elif f.exists():
            existing.append(str(f))
        else:
            parent = next(p for p in f.parents if p.exists())
            if not parent.is_dir():
                problems.append(f"{parent} is a file, not a folder")
            elif not os.access(parent, os.W_OK | os.X_OK):
                problems.append(f"cannot write in {parent} (permission denied)")
    if existing and not force:
        problems.append(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''} and would be "
                        "replaced; pass --force to replace")
    if problems:
        raise CheckpointError("; ".join(problems) + " (nothing was written)")


def _tokenizer_file(source: Optional[str]) -> Optional[Path]:
    """The tokenizer.json behind a run's tokenizer setting, when it is on this machine (a hub name is not)."""
    if not source:
        return None
    path = Path(source)
    if path.is_dir():
        path = path / "tokenizer.json"
    return path if path.is_file() and path.suffix == ".json" else None


KEPT_TEMPLATE = "chat_template.jinja"   # beside a run's tokenizer.json: the chat template an import found


def _tokenizer_config(tokenizer_json: Path, mcfg: ModelConfig) -> dict:
    """tokenizer_config.json: bos/eos/pad by their token strings and, for a tokenizer with the chat tokens, the chat
    template (kept from an import, else chat.py's) with those tokens named as special."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer_json))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": mcfg.max_position_embeddings}
    for key in ("bos", "eos", "pad"):
        token_id = getattr(mcfg, f"{key}_token_id")
        text = tok.id_to_token(token_id) if token_id is not None else None
        if text is not None:
            config[f"{key}_token"] = text
    kept = tokenizer_json.parent / KEPT_TEMPLATE
    if kept.is_file():
        config["chat_template"] = kept.read_text(encoding="utf-8")
    elif chat.has_chat_tokens(tok):
        config["chat_template"] = chat.CHAT_TEMPLATE
    if chat.has_chat_tokens(tok):
        config["additional_special_tokens"] = list(chat.CHAT_TOKENS)
    return config


def _hf_chat_template(folder: Path) -> Optional[str]:
    """The chat template of a HF model directory: chat_template.jinja, or tokenizer_config.json's chat_template."""
    if (folder / KEPT_TEMPLATE).is_file():
        return (folder / KEPT_TEMPLATE).read_text(encoding="utf-8")
    try:
        template = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    return template if isinstance(template, str) else None


def export_hf(checkpoint_path: str, out: str, force: bool = False) -> Path:
    """Write a checkpoint (file or run directory) as a HF directory; return the directory."""
    if not out:
        raise CheckpointError("--out is empty: name the directory to write")
    out = Path(out)
    if out.is_file():
        raise CheckpointError(f"{out}: is a file; --out names the directory to write")
    _refuse_existing(out, force)
    check_outputs([out / "config.json"], force=True)   # a parent that is a file or that cannot be written in
    model, cfg, info = load_model(checkpoint_path, torch.device("cpu"), torch.float32)
    mcfg = model.config
    tokenizer = _tokenizer_file(info["tokenizer"])
    read = [Path(info["source"]).resolve()] + ([tokenizer.resolve()] if tokenizer else [])
    if any(out.resolve() in (f, f.parent) for f in read):
        raise CheckpointError(f"{out}: is the folder it reads from; export to another folder (nothing was written)")
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), *out.glob("*.safetensors.index.json")]:
        stale.unlink()   # transformers would read leftover shards of an earlier model as part of this one

    from safetensors.torch import save_file
    state = model.state_dict()
    if mcfg.tie_word_embeddings:
        # one matrix under two names: safetensors refuses shared memory, and HF stores a tied head once, under
        # the embedding's name, re-tying lm_head at load time from tie_word_embeddings
        del state["lm_head.weight"]
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config_dict(mcfg), indent=2) + "\n")
    generation = {k: getattr(mcfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if getattr(mcfg, k) is not None}
    tokenizer = _tokenizer_file(info["tokenizer"])
    tok_cfg = _tokenizer_config(tokenizer, mcfg) if tokenizer is not None else {}
    chat_model = (cfg.sft or cfg.dpo or cfg.grpo) is not None
    if chat_model and "chat_template" in tok_cfg:   # a chat model's reply ends at <|im_end|>
        from tokenizers import Tokenizer
        end = Tokenizer.from_file(str(tokenizer)).token_to_id(chat.IM_END)
        generation["eos_token_id"] = [e for e in (mcfg.eos_token_id, end) if e is not None]
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / "tokenizer.json")
        (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
        kept = " and its chat template" if "chat_template" in tok_cfg else ""
        print(f"tokenizer: copied {tokenizer}{kept}")
    else:
        print(f"tokenizer: '{info['tokenizer']}' is not a local file, not copied; "
              "load it with AutoTokenizer.from_pretrained of that name")
    print(f"exported {info['source']} (step {info['step']}) -> {out}")
    return out


def import_hf(hf_model: str, out: str, force: bool = False) -> Path:
    """Write a HF Llama directory or hub id as a training checkpoint; return the checkpoint file.

    `out` is a checkpoint file (*.pt) or a run directory (the checkpoint goes to out/checkpoints/step_00000000.pt).
    A tokenizer.json found beside the HF weights is copied to the run directory, where load_model looks for it.
    """
    if not out:
        raise CheckpointError("--out is empty: name the .pt file or run directory to write")
    out = Path(out)
    file = out if out.suffix == ".pt" else out / "checkpoints" / checkpoint_name(0)
    run_dir = run_dir_of(file)
    source = local_hf_dir(hf_model)
    writes = [file, run_dir / "tokenizer.json"] if (source / "tokenizer.json").is_file() else [file]
    others = [p.name for p in list_checkpoints(run_dir) if p != file] if run_dir.is_dir() else []
    # a run directory holding other checkpoints: the import would put another model beside them
    check_outputs(writes, force, (f"{run_dir} already holds checkpoints ({', '.join(others[-2:])}); an import "
                                  "there would sit beside another model: choose a new --out or pass --force",)
                  if others and not force else ())
    model, cfg, info = load_model(source, torch.device("cpu"), torch.float32)
    if info["tokenizer"] is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(info["tokenizer"], run_dir / "tokenizer.json")
        cfg.tokenizer.tokenizer_name_or_path = str(run_dir / "tokenizer.json")
        template = _hf_chat_template(source)
        if template is not None:   # kept for a later export; training and chat here use chat.py's template
            (run_dir / KEPT_TEMPLATE).write_text(template, encoding="utf-8")
            same = "SmolLM2's" if template == chat.CHAT_TEMPLATE else "not SmolLM2's: sft.py trains chat.py's"
            print(f"chat template: kept in {run_dir / KEPT_TEMPLATE} ({same})")
    elif not Path(hf_model).exists():
        cfg.tokenizer.tokenizer_name_or_path = hf_model   # a hub id names its own tokenizer
    else:
        print(f"tokenizer: none in {source}; the checkpoint's config keeps "
              f"'{cfg.tokenizer.tokenizer_name_or_path}' (change tokenizer.tokenizer_name_or_path if that is wrong)")
    save_atomic({"model": model.state_dict(), "config": config_to_dict(cfg),
                 "train_state": {"step": 0, "tokens_seen": 0, "val_loss": None}}, file)
    print(f"imported {source} ({model.num_parameters():,} parameters) -> {file}")
    return file


@command
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="our checkpoint -> Hugging Face directory")
    exp.add_argument("--checkpoint_path", required=True, help="a step_*.pt file or a run directory (its newest)")
    exp.add_argument("--out", required=True, help="directory to write")
    imp = sub.add_parser("import", help="Hugging Face Llama directory or hub id -> our training checkpoint")
    imp.add_argument("--hf_model", required=True, help="local HF directory, or a hub id when the network is up")
    imp.add_argument("--out", required=True, help="a .pt file, or a run directory")
    for p in (exp, imp):
        p.add_argument("--force", action="store_true", help="overwrite an existing output")
    args = parser.parse_args(argv)
    if args.command == "export":
        export_hf(args.checkpoint_path, args.out, args.force)
    else:
        import_hf(args.hf_model, args.out, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
