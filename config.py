"""Typed configuration in nanotron's YAML schema.

The official SmolLM2 pretraining configs are nanotron files; every section below keeps nanotron's key names (and
`model.model_config` keeps Hugging Face `LlamaConfig`'s), so such a file loads unmodified. What this repository adds
lives in its own sections: `run` (local training switches), `sampling` (text samples during training), `data_prep`
(raw text -> token shards), `s3` (remote checkpoints) and `eval` (benchmarks on checkpoints during training). YAML is read into these dataclasses with every key and type
checked; a mistake is one `ConfigError` naming the key path and the fix.
"""

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config problem a user can fix: the message names the key path and what is expected."""


LOG_LEVELS = ("debug", "info", "warning", "error", "critical", "passive")   # nanotron's logging levels

# Keys of nanotron's files accepted although they cannot change a run on this engine, and why (the README's config
# section lists them). Every other key is honoured, or refused by name where its value is not implemented.
NO_EFFECT = {
    "checkpoints.checkpoints_path_is_shared_file_system": "rank 0 writes every checkpoint, so no node needs to know",
    "data_stages[].data.num_loading_workers": "the loader reads memory-mapped shards in the training process; "
                                              "there is no worker to start",
    "general.step": "nanotron's record of progress, written into its saved configs; checkpoints hold it here",
    "general.consumed_train_samples": "likewise: a record, not a setting",
    "general.ignore_sanity_checks": "there are no optional sanity checks to skip: every check here is always on",
    "logging.log_level": "the log lines are the run's progress report; warnings and errors always print",
    "logging.log_level_replica": "ranks other than 0 print only warnings and errors",
    "model.model_config.is_llama_config": "a marker nanotron reads to pick its model class",
    "model.model_config.initializer_range": "weights are initialized from model.init_method.std, as nanotron does; "
                                            "it is kept for the exported config.json",
    "model.model_config.use_cache": "a transformers generation flag, kept for the exported config.json; "
                                    "generation here always uses its KV cache",
    "parallelism.pp_engine": "a pipeline-parallel setting: pp is 1 here",
    "parallelism.tp_linear_async_communication": "a tensor-parallel setting: tp is 1 here",
    "parallelism.tp_mode": "a tensor-parallel setting: tp is 1 here",
    "parallelism.tp_recompute_allgather": "a tensor-parallel setting: tp is 1 here",
    "tokenizer.tokenizer_max_length": "a truncation length for nanotron's evaluation; training packs token ids into "
                                      "blocks of tokens.sequence_length",
    "tokens.limit_test_batches": "nanotron itself never reads it",
}


# ---------------------------------------------------------------- nanotron sections


@dataclass
class CheckpointsArgs:
    checkpoint_interval: int = 1000
    checkpoints_path: str = "checkpoints"
    checkpoints_path_is_shared_file_system: bool = False
    resume_checkpoint_path: Optional[str] = None
    save_final_state: bool = True
    save_initial_state: bool = False
    load_lr_scheduler: bool = True
    load_optimizer: bool = True


@dataclass
class DatasetArgs:
    """One stage's sources: hub datasets (nanotron's PretrainDatasetsArgs) or local folders (its NanosetDatasetsArgs).

    `hf_dataset_or_datasets` names what `datasets.load_dataset` reads (a hub dataset, or a local folder laid out like
    one) or a built-in corpus (`builtin:python-stdlib`); a list mixes them equally, a {name: weight} mapping by weight.
    `dataset_folder` lists local text files, folders or globs (.txt, .jsonl, .parquet, ...), weighted by
    `dataset_weights`. data.py documents how each is read.
    """
    hf_dataset_or_datasets: Union[str, list[str], dict[str, float], None] = None
    hf_dataset_config_name: Optional[str] = None
    hf_dataset_splits: Union[str, list[str]] = "train"
    text_column_name: str = "text"
    dataset_processing_num_proc_per_process: int = 1
    dataset_overwrite_cache: bool = False
    dataset_folder: Union[str, list[str], None] = None
    dataset_weights: Optional[list[float]] = None

    def sources(self, where: str = "data_stages[0].data.dataset") -> list[tuple[str, float, bool]]:
        """(name, mixing weight, is a dataset_folder entry) for every source, hf_dataset_or_datasets' first."""
        hf = self.hf_dataset_or_datasets
        named = hf if isinstance(hf, dict) else dict.fromkeys([hf] if isinstance(hf, str) else hf or [], 1.0)
        folders = [self.dataset_folder] if isinstance(self.dataset_folder, str) else self.dataset_folder or []
        weights = self.dataset_weights or [1.0] * len(folders)
        if len(weights) != len(folders):
            raise ConfigError(f"{where}.dataset_weights: one weight per dataset_folder entry is needed, got "
                              f"{len(weights)} for {len(folders)}")
        return [(n, w, False) for n, w in named.items()] + [(f, w, True) for f, w in zip(folders, weights)]


@dataclass
class DataArgs:
    dataset: DatasetArgs = field(default_factory=DatasetArgs)
    seed: int = 42
    num_loading_workers: int = 0


@dataclass
class DataStageArgs:
    name: str = "stable phase"
    start_training_step: int = 1
    data: DataArgs = field(default_factory=DataArgs)


@dataclass
class GeneralArgs:
    project: str = "smollm2"
    run: str = "smollm2"
    seed: int = 42
    step: Optional[int] = None
    consumed_train_samples: Optional[int] = None
    benchmark_csv_path: Optional[str] = None
    ignore_sanity_checks: bool = True


@dataclass
class LoggingArgs:
    iteration_step_info_interval: int = 1
    log_level: str = "info"
    log_level_replica: str = "info"


@dataclass
class ModelConfig:
    """The architecture, under Hugging Face `LlamaConfig`'s names."""
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 0
    hidden_act: str = "silu"
    hidden_size: int = 576
    initializer_range: float = 0.02
    intermediate_size: int = 1536
    is_llama_config: bool = True
    max_position_embeddings: int = 2048
    num_attention_heads: int = 9
    num_hidden_layers: int = 30
    num_key_value_heads: int = 3
    pad_token_id: Optional[int] = None
    pretraining_tp: int = 1
    rms_norm_eps: float = 1e-5
    rope_interleaved: bool = False
    rope_scaling: Optional[dict] = None
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    use_cache: bool = True
    vocab_size: int = 49152

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class InitMethod:
    std: float = 0.02


@dataclass
class ModelArgs:
    model_config: ModelConfig = field(default_factory=ModelConfig)
    init_method: InitMethod = field(default_factory=InitMethod)
    dtype: str = "bfloat16"
    make_vocab_size_divisible_by: int = 1
    ddp_bucket_cap_mb: int = 25


@dataclass
class LRSchedulerArgs:
    learning_rate: float = 3e-3
    lr_warmup_steps: int = 0
    lr_warmup_style: str = "linear"
    lr_decay_starting_step: Optional[int] = None
    lr_decay_steps: Optional[int] = None
    lr_decay_style: Optional[str] = None          # null: linear, as in nanotron
    min_decay_lr: Optional[float] = None          # null: learning_rate, i.e. no decay at all, as in nanotron


@dataclass
class OptimizerFactory:
    name: str = "adamW"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    torch_adam_is_fused: bool = True


@dataclass
class OptimizerArgs:
    learning_rate_scheduler: LRSchedulerArgs = field(default_factory=LRSchedulerArgs)
    optimizer_factory: OptimizerFactory = field(default_factory=OptimizerFactory)
    weight_decay: float = 0.01
    clip_grad: Optional[float] = 1.0
    accumulate_grad_in_fp32: bool = True
    zero_stage: int = 0


@dataclass
class ParallelismArgs:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    expert_parallel_size: int = 1
    pp_engine: str = "1f1b"
    recompute_layer: bool = False
    tp_linear_async_communication: bool = True
    tp_mode: str = "REDUCE_SCATTER"
    tp_recompute_allgather: bool = True


@dataclass
class TokenizerArgs:
    tokenizer_name_or_path: str = "HuggingFaceTB/cosmo2-tokenizer"
    tokenizer_revision: Optional[str] = None
    tokenizer_max_length: Optional[int] = None


@dataclass
class TokensArgs:
    sequence_length: int = 2048
    micro_batch_size: int = 8
    batch_accumulation_per_replica: int = 1
    train_steps: int = 1000
    val_check_interval: int = -1       # validate every this many steps (and after the last); <= 0: after the last only
    limit_val_batches: int = 0         # micro-batches of each source's held-out split per validation; 0: no validation
    limit_test_batches: int = 0        # nanotron reads it nowhere; accepted for its files' sake


# ---------------------------------------------------------------- this repository's own sections


@dataclass
class RunArgs:
    """Local training switches nanotron has no key for."""
    device: str = "auto"               # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"            # auto | bf16 | fp16 | fp32
    compile: bool = False
    keep_last_checkpoints: int = 3
    max_consecutive_bad_steps: int = 5
    loss_spike_factor: float = 3.0
    weight_decay_exclude_1d: bool = False   # true: no weight decay on 1-D parameters (norm gains); nanotron decays all
    selective_recompute: bool = True   # keep only matmul/attention outputs for the backward (parallelism.recompute_layer: none)
    tensorboard: bool = False
    wandb: bool = False


@dataclass
class SamplingArgs:
    """Text generated from fixed prompts during training, so a user can watch the model learn."""
    interval: int = 0                  # 0: never
    prompts: list[str] = field(default_factory=lambda: ["Once upon a time", "The meaning of life is"])
    max_new_tokens: int = 48
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None


@dataclass
class DataPrepArgs:
    """How raw text becomes token shards (`python data.py prepare`) and how a local tokenizer is trained."""
    output_dir: Optional[str] = None   # default: data/<general.run>
    shard_tokens: int = 50_000_000     # tokens per shard file
    val_tokens: int = 1_000_000        # the first documents of the mixed stream, up to this many tokens, are held out
    max_tokens: Optional[dict[str, int]] = None   # {source name: most tokens taken from it}
    tokenizer_vocab_size: int = 8192   # for `python data.py train-tokenizer`
    tokenizer_train_chars: int = 100_000_000      # how much of the mixed text that tokenizer is trained on


@dataclass
class S3Args:
    bucket: Optional[str] = None
    prefix: str = ""
    region: Optional[str] = None
    endpoint_url: Optional[str] = None
    upload_checkpoints: bool = True
    upload_metrics: bool = True
    upload_plots: bool = True
    upload_samples: bool = True


@dataclass
class PosttrainArgs:
    """What sft.py and dpo.py start from and learn from; the key names are TRL's and the alignment handbook's."""
    model_name_or_path: Optional[str] = None   # a checkpoint file, run directory, Hugging Face model directory or s3://
    dataset_name: str = "builtin:chat-tasks"   # a .jsonl file, a Hub dataset, or the built-in tasks (chat_tasks.py)
    dataset_config: Optional[str] = None
    dataset_train_split: str = "train"
    dataset_test_split: Optional[str] = None   # a held-out split; without one, the first val_examples are held out
    val_examples: int = 200
    max_examples: Optional[int] = None         # the most training examples read (a Hub dataset is streamed)


@dataclass
class SFTArgs(PosttrainArgs):
    """Supervised fine-tuning (sft.py) on conversations: {"messages": [{"role": ..., "content": ...}, ...]}."""
    packing: bool = True                       # several conversations per row, each attending only to itself


@dataclass
class DPOArgs(PosttrainArgs):
    """Direct preference optimisation (dpo.py) on pairs: {"prompt", "chosen", "rejected"}, texts or messages. The
    starting checkpoint (an SFT one) is also the frozen reference."""
    beta: float = 0.1                          # how far the policy may move from the reference: the KL weight


@dataclass
class EvalArgs:
    """lm-evaluation-harness benchmarks run by evaluate.py on checkpoints while training goes on (a process beside it).

    Field names are evaluate.py's flags. Benchmarks run on saved checkpoints, so `interval` is a multiple of
    checkpoints.checkpoint_interval; the final checkpoint is always evaluated.
    """
    tasks: list[str] = field(default_factory=list)   # lm-eval task, group or tag names; empty: no evals
    interval: Optional[int] = None     # steps between evals; null: every checkpoint
    limit: Optional[int] = None        # at most this many items per task (faster; not a comparable score)
    num_fewshot: Optional[int] = None  # null: each task's own
    include_path: Optional[str] = None  # a folder of your own task YAML files
    batch_size: int = 8
    device: str = "auto"               # where the eval process runs: auto (the GPU if any) | cpu | cuda:N


@dataclass
class Config:
    checkpoints: CheckpointsArgs = field(default_factory=CheckpointsArgs)
    data_stages: list[DataStageArgs] = field(default_factory=lambda: [DataStageArgs()])
    general: GeneralArgs = field(default_factory=GeneralArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)
    model: ModelArgs = field(default_factory=ModelArgs)
    optimizer: OptimizerArgs = field(default_factory=OptimizerArgs)
    parallelism: ParallelismArgs = field(default_factory=ParallelismArgs)
    tokenizer: TokenizerArgs = field(default_factory=TokenizerArgs)
    tokens: TokensArgs = field(default_factory=TokensArgs)
    profiler: Optional[dict] = None
    lighteval: Optional[dict] = None
    s3_upload: Optional[dict] = None
    run: RunArgs = field(default_factory=RunArgs)
    sampling: SamplingArgs = field(default_factory=SamplingArgs)
    data_prep: DataPrepArgs = field(default_factory=DataPrepArgs)
    s3: S3Args = field(default_factory=S3Args)
    eval: EvalArgs = field(default_factory=EvalArgs)
    sft: Optional[SFTArgs] = None
    dpo: Optional[DPOArgs] = None


# ---------------------------------------------------------------- reading YAML into the dataclasses


_EXPONENT_FLOAT = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")
# keys this repository once had, and where their meaning lives now
MOVED = {"run.val_batches": "tokens.limit_val_batches (nanotron's key: micro-batches per validation, 0 = none)"}


def _type_name(tp) -> str:
    if isinstance(tp, type):
        return "mapping" if dataclasses.is_dataclass(tp) else tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "null")


def _convert(value: Any, tp, path: str):
    """Check `value` against the annotation `tp` and build dataclasses; raise ConfigError naming `path`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        sections = [option for option in typing.get_args(tp) if dataclasses.is_dataclass(option)]
        if isinstance(value, dict) and len(sections) == 1:   # an optional section: its own errors name the key
            return _build(sections[0], value, path)
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, path)
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            key_tp, val_tp = typing.get_args(tp) or (Any, Any)
            return {k: _convert(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    elif tp is Any:
        return value
    elif tp is float:
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            value = float(value)   # YAML 1.1 (PyYAML) reads 1e-4, with no dot, as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):   # YAML's .nan and .inf: no key here means anything by them
                raise ConfigError(f"{path}: expected a finite number, got {value}")
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")


def _build(cls, data: dict, path: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if where in MOVED:
            raise ConfigError(f"{where}: this key moved to {MOVED[where]}")
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{where}: unknown key{hint}")
        kwargs[key] = _convert(value, hints[key], where)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key.path=value, e.g. tokens.micro_batch_size=4")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set `a.b.c=value` strings (values parsed as YAML) into the nested dict; list items by index (`data_stages.0`)."""
    for text in overrides:
        keys, value = _parse_override(text)
        node = data
        for i, key in enumerate(keys):
            last = i == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise ConfigError(f"override '{text}': '{key}' is not an index of {'.'.join(keys[:i])}")
                key = int(key)
            elif not isinstance(node, dict):
                raise ConfigError(f"override '{text}': {'.'.join(keys[:i])} is not a section")
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and node.get(key) is None:
                    node[key] = {}
                node = node[key]
    return data


def validate(cfg: Config) -> Config:
    """Impossible or unsupported values, each named by its key path."""
    m = cfg.model.model_config
    positive = {
        "model.model_config.hidden_size": m.hidden_size,
        "model.model_config.num_attention_heads": m.num_attention_heads,
        "model.model_config.num_key_value_heads": m.num_key_value_heads,
        "model.model_config.num_hidden_layers": m.num_hidden_layers,
        "model.model_config.intermediate_size": m.intermediate_size,
        "model.model_config.vocab_size": m.vocab_size,
        "model.model_config.max_position_embeddings": m.max_position_embeddings,
        "tokens.sequence_length": cfg.tokens.sequence_length,
        "tokens.micro_batch_size": cfg.tokens.micro_batch_size,
        "tokens.batch_accumulation_per_replica": cfg.tokens.batch_accumulation_per_replica,
        "tokens.train_steps": cfg.tokens.train_steps,
        "checkpoints.checkpoint_interval": cfg.checkpoints.checkpoint_interval,   # each of these divides the step
        "logging.iteration_step_info_interval": cfg.logging.iteration_step_info_interval,
        "run.max_consecutive_bad_steps": cfg.run.max_consecutive_bad_steps,
        "sampling.max_new_tokens": cfg.sampling.max_new_tokens,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"model.model_config.hidden_size ({m.hidden_size}) must be divisible by "
                          f"num_attention_heads ({m.num_attention_heads})")
    if m.head_dim % 2:
        raise ConfigError(f"model.model_config: head size hidden_size/num_attention_heads = {m.head_dim} must be even "
                          "for rotary embeddings")
    if m.num_attention_heads % m.num_key_value_heads:
        raise ConfigError(f"model.model_config.num_key_value_heads ({m.num_key_value_heads}) must divide "
                          f"num_attention_heads ({m.num_attention_heads})")
    if m.hidden_act != "silu":
        raise ConfigError(f"model.model_config.hidden_act: only 'silu' (SwiGLU) is implemented, got '{m.hidden_act}'")
    if m.rope_scaling is not None:
        raise ConfigError("model.model_config.rope_scaling: only null (plain RoPE) is supported")
    if cfg.tokens.sequence_length > m.max_position_embeddings:
        raise ConfigError(f"tokens.sequence_length ({cfg.tokens.sequence_length}) exceeds "
                          f"model.model_config.max_position_embeddings ({m.max_position_embeddings})")
    for key in ("tp", "pp", "expert_parallel_size"):
        if getattr(cfg.parallelism, key) != 1:
            raise ConfigError(f"parallelism.{key}: {getattr(cfg.parallelism, key)} is not supported on this code path; "
                              f"set parallelism.{key}=1 (data parallelism comes from torchrun --nproc_per_node)")
    if cfg.optimizer.optimizer_factory.name.lower() != "adamw":
        raise ConfigError(f"optimizer.optimizer_factory.name: only 'adamW' is implemented, "
                          f"got '{cfg.optimizer.optimizer_factory.name}'")
    lrs = cfg.optimizer.learning_rate_scheduler
    if lrs.lr_warmup_style not in ("linear", "constant"):
        raise ConfigError(f"optimizer.learning_rate_scheduler.lr_warmup_style: 'linear' or 'constant', "
                          f"got '{lrs.lr_warmup_style}'")
    if lrs.lr_decay_style not in (None, "linear", "cosine", "1-sqrt"):
        raise ConfigError(f"optimizer.learning_rate_scheduler.lr_decay_style: 'linear', 'cosine' or '1-sqrt', "
                          f"got '{lrs.lr_decay_style}'")
    if cfg.run.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"run.precision: 'auto', 'bf16', 'fp16' or 'fp32', got '{cfg.run.precision}'")
    _validate_nanotron_values(cfg)
    _validate_stages(cfg)
    _validate_data(cfg)
    _validate_ranges(cfg)
    _validate_eval(cfg)
    _validate_posttrain(cfg)
    for key in ("profiler", "lighteval", "s3_upload"):
        if getattr(cfg, key) is not None:
            hint = "; use the s3 section for uploads" if key == "s3_upload" else ""
            raise ConfigError(f"{key}: nanotron's {key} section is not supported here, set it to null{hint}")
    return cfg


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _validate_ranges(cfg: Config) -> None:
    """Rates, counts, seeds and names that would crash a run hours in, or quietly make it another run than asked."""
    lrs, opt, s = cfg.optimizer.learning_rate_scheduler, cfg.optimizer, cfg.sampling
    lr = "optimizer.learning_rate_scheduler."
    rules = [   # (key, value, holds, what it must be); a null optional value is not checked
        (lr + "learning_rate", lrs.learning_rate, lambda v: v > 0, "> 0"),
        (lr + "min_decay_lr", lrs.min_decay_lr, lambda v: v >= 0, ">= 0"),
        (lr + "lr_warmup_steps", lrs.lr_warmup_steps, lambda v: v >= 0, ">= 0"),
        (lr + "lr_decay_steps", lrs.lr_decay_steps, lambda v: v >= 0, ">= 0"),
        (lr + "lr_decay_starting_step", lrs.lr_decay_starting_step, lambda v: v >= 0, ">= 0"),
        ("optimizer.weight_decay", opt.weight_decay, lambda v: v >= 0, ">= 0"),
        ("optimizer.clip_grad", opt.clip_grad, lambda v: v > 0, "> 0, or null for no clipping"),
        ("optimizer.optimizer_factory.adam_beta1", opt.optimizer_factory.adam_beta1, lambda v: 0 <= v < 1, "in [0, 1)"),
        ("optimizer.optimizer_factory.adam_beta2", opt.optimizer_factory.adam_beta2, lambda v: 0 <= v < 1, "in [0, 1)"),
        ("optimizer.optimizer_factory.adam_eps", opt.optimizer_factory.adam_eps, lambda v: v > 0, "> 0"),
        ("model.init_method.std", cfg.model.init_method.std, lambda v: v > 0, "> 0"),
        ("model.model_config.rms_norm_eps", cfg.model.model_config.rms_norm_eps, lambda v: v > 0, "> 0"),
        ("model.model_config.rope_theta", cfg.model.model_config.rope_theta, lambda v: v > 0, "> 0"),
        ("run.keep_last_checkpoints", cfg.run.keep_last_checkpoints, lambda v: v >= 0,
         ">= 0 (0 keeps every checkpoint)"),
        ("run.loss_spike_factor", cfg.run.loss_spike_factor, lambda v: v > 1, "> 1 (a spike is a loss this many times "
                                                                              "the recent average)"),
        ("general.seed", cfg.general.seed, lambda v: 0 <= v < 2**32, "from 0 to 2**32 - 1 (numpy's seed range)"),
        ("sampling.interval", s.interval, lambda v: v >= 0, ">= 0 (0: no samples)"),
        ("sampling.temperature", s.temperature, lambda v: v >= 0, ">= 0 (0: greedy)"),
        ("sampling.top_k", s.top_k, lambda v: v >= 1, ">= 1, or null"),
        ("sampling.top_p", s.top_p, lambda v: 0 < v <= 1, "in (0, 1], or null"),
    ]
    for key, value, holds, what in rules:
        if value is not None and not holds(value):
            raise ConfigError(f"{key}: must be {what}, got {value}")
    if cfg.model.dtype not in ("bfloat16", "float16", "float32"):
        raise ConfigError(f"model.dtype: 'bfloat16', 'float16' or 'float32', got '{cfg.model.dtype}'")
    if not DEVICE.fullmatch(cfg.run.device):
        raise ConfigError(f"run.device: 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got '{cfg.run.device}'")
    if not cfg.checkpoints.checkpoints_path.strip():
        raise ConfigError("checkpoints.checkpoints_path: empty; name the run directory, e.g. runs/my-run")
    for i, prompt in enumerate(s.prompts):
        if not prompt:
            raise ConfigError(f"sampling.prompts[{i}]: empty; give some text to continue, or remove it")


def _validate_nanotron_values(cfg: Config) -> None:
    """Keys of nanotron's files whose other values this engine does not implement: refused by name, so a run never
    silently differs from the one nanotron would make. (The README lists the keys accepted without effect.)"""
    refusals = [
        (not cfg.checkpoints.load_lr_scheduler, "checkpoints.load_lr_scheduler: false is not supported; the LR here is "
         "a function of the step, restored with it, so set it to true"),
        (not cfg.optimizer.accumulate_grad_in_fp32, "optimizer.accumulate_grad_in_fp32: false is not supported; the "
         "weights and gradients stay fp32 here (autocast computes in bf16), so set it to true"),
        (cfg.model.model_config.pretraining_tp != 1, "model.model_config.pretraining_tp: only 1 is supported (it "
         "only emulates a tensor-parallel split of the matmuls)"),
        (cfg.model.model_config.vocab_size % max(cfg.model.make_vocab_size_divisible_by, 1) != 0,
         f"model.make_vocab_size_divisible_by: vocab_size {cfg.model.model_config.vocab_size} is not a multiple of "
         f"{cfg.model.make_vocab_size_divisible_by}; nanotron would pad the embedding, this repository does not: set "
         "model.model_config.vocab_size to a multiple of it"),
        (cfg.general.benchmark_csv_path is not None, "general.benchmark_csv_path: not supported, set it to null; "
         "throughput is logged to metrics.jsonl"),
    ]
    for refused, message in refusals:
        if refused:
            raise ConfigError(message)
    for key in ("log_level", "log_level_replica"):
        if getattr(cfg.logging, key) not in LOG_LEVELS:
            raise ConfigError(f"logging.{key}: one of {', '.join(LOG_LEVELS)}, got '{getattr(cfg.logging, key)}'")


def _validate_stages(cfg: Config) -> None:
    """data_stages as nanotron checks them: put in order of start_training_step, one starting at step 1, names and
    starting steps unique. A stage runs from its start_training_step (the 1-based optimizer step) until the next."""
    if not cfg.data_stages:
        raise ConfigError("data_stages: at least one stage is needed, with data.dataset naming its sources")
    cfg.data_stages.sort(key=lambda stage: stage.start_training_step)
    names = [stage.name for stage in cfg.data_stages]
    starts = [stage.start_training_step for stage in cfg.data_stages]
    if starts[0] != 1:
        raise ConfigError(f"data_stages: one stage must have start_training_step 1 (the first optimizer step); the "
                          f"first starts at {starts[0]}")
    for i, stage in enumerate(cfg.data_stages):
        if names.count(stage.name) > 1:
            raise ConfigError(f"data_stages: the name '{stage.name}' is used by {names.count(stage.name)} stages; "
                              "each stage needs its own name (checkpoints record each stage's position by name)")
        if starts.count(stage.start_training_step) > 1:
            raise ConfigError(f"data_stages: {starts.count(stage.start_training_step)} stages start at step "
                              f"{stage.start_training_step}; give each stage its own start_training_step")
    folders = [_stage_folder(name) for name in names]
    for i, folder in enumerate(folders):
        if folders.index(folder) != i:
            raise ConfigError(f"data_stages: the names '{names[folders.index(folder)]}' and '{names[i]}' give the same "
                              f"data folder '{folder}'; make them differ in a letter or digit")


def _validate_data(cfg: Config) -> None:
    """Every stage's sources and the data_prep section. A config with no source at all is fine until data is read."""
    names = []
    for i, stage in enumerate(cfg.data_stages):
        where = f"data_stages[{i}].data.dataset"
        sources = stage.data.dataset.sources(where)
        stage_names = [name for name, _, _ in sources]
        for name, weight, _ in sources:
            if weight <= 0:
                raise ConfigError(f"{where}: the weight of '{name}' must be > 0, got {weight}")
            if stage_names.count(name) > 1:
                raise ConfigError(f"{where}: '{name}' is listed twice; give it once, with the sum of its weights")
        names += [name for name in stage_names if name not in names]
    dp = cfg.data_prep
    for name, cap in (dp.max_tokens or {}).items():
        if name not in names:
            raise ConfigError(f"data_prep.max_tokens.{name}: not a source of any stage; the sources are "
                              f"{', '.join(names)}")
        if cap < 1:
            raise ConfigError(f"data_prep.max_tokens.{name}: must be >= 1, got {cap}")
    for key in ("shard_tokens", "tokenizer_train_chars"):
        if getattr(dp, key) < 1:
            raise ConfigError(f"data_prep.{key}: must be >= 1, got {getattr(dp, key)}")
    if dp.val_tokens < 0:
        raise ConfigError(f"data_prep.val_tokens: must be >= 0, got {dp.val_tokens}")
    if dp.tokenizer_vocab_size < 259:
        raise ConfigError(f"data_prep.tokenizer_vocab_size: must be >= 259 (256 bytes, EOS and the two chat tokens), "
                          f"got {dp.tokenizer_vocab_size}")


def _stage_folder(name: str) -> str:
    return re.sub(r"[^\w.-]+", "-", name).strip("-.") or "stage"


def data_dir(cfg: Config) -> str:
    """Where the token shards go: data_prep.output_dir, or data/<general.run>."""
    return cfg.data_prep.output_dir or os.path.join("data", cfg.general.run)


def stage_view(cfg: Config, index: int) -> Config:
    """The config as data stage `index` sees it: data_stages holds that stage alone, and data_prep.output_dir is
    its own folder (data_dir(cfg) itself when there is one stage, else a subfolder named after the stage). Whatever
    reads data (sources.py, data.py) reads data_stages[0] of a view; its `stage_index` names the stage in messages."""
    folder = data_dir(cfg)
    if len(cfg.data_stages) > 1:
        folder = os.path.join(folder, _stage_folder(cfg.data_stages[index].name))
    view = dataclasses.replace(cfg, data_stages=[cfg.data_stages[index]],
                               data_prep=dataclasses.replace(cfg.data_prep, output_dir=folder))
    view.stage_index = index
    return view


def notes(cfg: Config) -> list[str]:
    """One line for each thing in a valid config that runs otherwise than a reader of the file might expect."""
    lines = []
    if cfg.model.model_config.rope_interleaved:
        lines.append("note: model.model_config.rope_interleaved is true (nanotron's layout); this model applies "
                     "rotary embeddings in Hugging Face's rotate-half layout, which trained from scratch is the same "
                     "model up to a fixed permutation of the q/k rows")
    for stage in cfg.data_stages:
        if stage.start_training_step > cfg.tokens.train_steps:
            lines.append(f"note: data stage '{stage.name}' starts at step {stage.start_training_step}, after "
                         f"tokens.train_steps ({cfg.tokens.train_steps}): it will not run")
    return lines


def _validate_eval(cfg: Config) -> None:
    ev, every = cfg.eval, cfg.checkpoints.checkpoint_interval
    for key, least in (("interval", 1), ("limit", 1), ("batch_size", 1), ("num_fewshot", 0)):
        value = getattr(ev, key)
        if value is not None and value < least:
            raise ConfigError(f"eval.{key}: must be >= {least}, got {value}")
    if ev.tasks and ev.interval is not None and ev.interval % every:
        raise ConfigError(f"eval.interval ({ev.interval}) must be a multiple of checkpoints.checkpoint_interval "
                          f"({every}): benchmarks run on saved checkpoints")


def _validate_posttrain(cfg: Config) -> None:
    if cfg.sft is not None and cfg.dpo is not None:
        raise ConfigError("sft, dpo: a config runs one of them; keep the section of the script you run")
    for name, args in (("sft", cfg.sft), ("dpo", cfg.dpo)):
        if args is None:
            continue
        if not args.model_name_or_path:
            raise ConfigError(f"{name}.model_name_or_path: the checkpoint to fine-tune is needed (a checkpoint file, "
                              "run directory or Hugging Face model directory)")
        if args.val_examples < 1:
            raise ConfigError(f"{name}.val_examples: must be >= 1, got {args.val_examples}")
        if args.max_examples is not None and args.max_examples < 1:
            raise ConfigError(f"{name}.max_examples: must be >= 1 or null, got {args.max_examples}")
        if args.dataset_name.startswith("builtin:") and args.max_examples is None:
            raise ConfigError(f"{name}.max_examples: {args.dataset_name} is an endless stream of new examples; "
                              "set how many to train on, e.g. 20000")
    if cfg.dpo is not None and not cfg.dpo.beta > 0:
        raise ConfigError(f"dpo.beta: must be > 0, got {cfg.dpo.beta}")


def config_from_dict(data: dict) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping of sections at the top level, got {type(data).__name__}")
    return validate(_build(Config, data, ""))


def load_config(path: str, overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML config, apply `key=value` overrides, check everything."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        data = yaml.safe_load(raw.decode("utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; --config names a YAML file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); save it as "
                          "UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    return config_from_dict(apply_overrides(data, overrides or []))


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
