"""The config schema: nanotron's YAML sections as typed dataclasses, one per concern.

The official SmolLM2 pretraining configs are nanotron files; every section below keeps nanotron's key names (and
`model.model_config` is model.py's ModelConfig, under Hugging Face `LlamaConfig`'s names), so such a file loads
unmodified. What this repository adds lives in its own sections: `run` (local training switches), `sampling` (text
samples during training), `data_prep` (raw text -> token shards), `s3` (remote checkpoints), `eval` (benchmarks on
checkpoints during training), and `sft` / `dpo` / `grpo` (post-training, under TRL's key names). config_load.py
reads YAML into these classes, every key and type checked; config_checks.py refuses impossible values by their key
path.
"""

from dataclasses import dataclass, field
from typing import Optional, Union

from model import ModelConfig
from smollm2.errors import ConfigError

LOG_LEVELS = ("debug", "info", "warning", "error", "critical", "passive")   # nanotron's logging levels
# dpo.loss_type's values, under TRL's names (smollm2/preference.py writes each out), those that need no reference, and
# those label_smoothing applies to
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "apo_zero", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
SMOOTHED = ("sigmoid", "simpo")

# Keys of nanotron's files accepted although they cannot change a run on this engine, and why (docs/configs.md lists
# them). Every other key is honoured, or refused by name where its value is not implemented.
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
    `dataset_weights`. sources.py documents how each is read.
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
    # what each layer keeps for its backward: none (everything), selective (matmul and attention outputs), full (its
    # input: parallelism.recompute_layer true means full); auto: the first of these the planner fits on the device
    recompute: str = "auto"
    # pretraining: a token attends only to earlier tokens of its own document in a packed block (documents end at
    # EOS); SmolLM2's own runs let it see the whole block. No switch restarts positions per document: RoPE's scores
    # depend only on the distance between tokens, so a document masked off scores exactly as if it ran alone.
    document_masking: bool = False
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
    """What sft.py, dpo.py and grpo.py start from and learn from; the key names are TRL's and the alignment
    handbook's."""
    model_name_or_path: Optional[str] = None   # a checkpoint file, run directory, Hugging Face model directory or s3://
    dataset_name: str = "builtin:chat-tasks"   # a .jsonl file, a Hub dataset, or the built-in tasks (chat_tasks.py)
    dataset_config: Optional[str] = None       # a Hub dataset's subset; for the built-in tasks, which ("reverse,add")
    dataset_train_split: str = "train"
    dataset_test_split: Optional[str] = None   # a held-out split; without one, the first val_examples are held out
    val_examples: int = 200
    max_examples: Optional[int] = None         # the most training examples read (a Hub dataset is streamed)
    num_train_epochs: Optional[float] = None   # passes over the training rows: sets tokens.train_steps; null: keep it
    warmup_ratio: Optional[float] = None       # warmup as a fraction of the steps: sets lr_warmup_steps; null: keep it


@dataclass
class SFTArgs(PosttrainArgs):
    """Supervised fine-tuning (sft.py) on conversations: {"messages": [{"role": ..., "content": ...}, ...]}."""
    packing: bool = True                       # several conversations per row, each attending only to itself
    assistant_only_loss: bool = True           # the loss on the assistant's tokens only; false: on every token
    truncation_mode: str = "keep_start"        # a conversation over a row: keep_start (its first tokens) | drop it


@dataclass
class DPOArgs(PosttrainArgs):
    """Direct preference optimisation (dpo.py) on pairs: {"prompt", "chosen", "rejected"}, texts or messages. The
    starting checkpoint (an SFT one) is also the frozen reference, except for the reference-free simpo and orpo."""
    beta: float = 0.1                          # how far the policy may move from the reference: the KL weight
    max_length: Optional[int] = None           # prompt + reply, in tokens; null: tokens.sequence_length
    max_prompt_length: Optional[int] = None    # a longer prompt keeps its last tokens (TRL's order: prompt first)
    # the loss (smollm2/preference.py): sigmoid | ipo | hinge | apo_zero, and without a reference simpo | orpo
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0               # sigmoid, simpo: the share of labels taken as flipped (cDPO)
    simpo_gamma: float = 0.5                   # simpo: the target margin of the length-normalised rewards
    rpo_alpha: Optional[float] = None          # adds alpha x the NLL of the chosen replies (RPO); null: none
    precompute_ref_log_probs: bool = False     # the reference's log-probs once, before step 1; it is not kept


@dataclass
class GRPOArgs(PosttrainArgs):
    """Group relative policy optimisation (grpo.py) on prompts whose answers a verifier checks: {"prompt", "answer"}
    (or a conversation ending with the answer). Keys and meanings are TRL's GRPOConfig's; the starting checkpoint
    (an SFT one) is also the frozen reference."""
    num_generations: int = 8                   # G: completions sampled per prompt, normalised against each other
    max_completion_length: int = 256           # tokens a completion may take (its end token included)
    temperature: float = 1.0                   # sampling temperature of the completions
    top_p: float = 1.0                         # nucleus sampling of the completions; 1: off
    beta: float = 0.04                         # weight of the KL penalty to the reference (k3 estimator); 0: none
    epsilon: float = 0.2                       # the importance ratio is clipped to [1 - epsilon, 1 + epsilon]
    num_iterations: int = 1                    # mu: optimizer steps on each batch of completions
    loss_type: str = "grpo"                    # grpo: a mean per completion, then over them | dr_grpo: a sum over
    #                                            tokens divided by completions x max_completion_length (no length bias)
    scale_rewards: bool = True                 # advantages divided by their group's std; false: Dr. GRPO's, no std bias
    reward_funcs: list[str] = field(default_factory=lambda: ["exact_match"])   # verifiers.py names or module:function


@dataclass
class EvalArgs:
    """lm-evaluation-harness benchmarks that evaluation.py runs on checkpoints, in a process beside the training.

    Field names are evaluation.py's flags. Benchmarks run on saved checkpoints, so `interval` is a multiple of
    checkpoints.checkpoint_interval; the final checkpoint is always evaluated.
    """
    tasks: list[str] = field(default_factory=list)   # lm-eval task, group or tag names; empty: no evals
    interval: Optional[int] = None     # steps between evals; null: every checkpoint
    limit: Optional[int] = None        # at most this many items per task (faster; not a comparable score)
    num_fewshot: Optional[int] = None  # null: each task's own
    include_path: Optional[str] = None  # a folder of your own task YAML files
    batch_size: int = 8
    chat_template: bool = False        # prompts rendered as chats, as instruct models are scored (SFT and DPO runs)
    # where the eval process runs: auto is the CPU, because the training GPU's memory is the run's (the planner and
    # run.recompute auto count it all for training) | cpu | cuda:N (a GPU the training does not use)
    device: str = "auto"


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
    grpo: Optional[GRPOArgs] = None
