"""Values that would crash a run hours in, or quietly make it another run than asked, refused before it starts.

`validate(cfg)` checks a Config built by config_load.py: sizes and counts, rates and seeds, keys of nanotron's files
whose other values this engine does not implement, the data stages and their sources, the eval and post-training
sections. Each refusal is one ConfigError naming the key path and the fix. `notes(cfg)` lists what a valid config
does otherwise than a reader of the file might expect.
"""

import re

from smollm2.chat_data import BUILTIN, builtin_tasks
from smollm2.chat_tasks import TASKS
from smollm2.config import LOG_LEVELS, LOSS_TYPES, REFERENCE_FREE, SMOOTHED, Config, DPOArgs, GRPOArgs
from smollm2.errors import ConfigError
from smollm2.stages import stage_folder, stages_of


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
    # a fine-tuning config takes its model from the checkpoint: sft.start_from checks the context against that one
    finetuning = cfg.sft is not None or cfg.dpo is not None or cfg.grpo is not None
    if not finetuning and cfg.tokens.sequence_length > m.max_position_embeddings:
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
    if cfg.run.recompute not in ("auto", "none", "selective", "full"):
        raise ConfigError(f"run.recompute: 'auto', 'none', 'selective' or 'full', got '{cfg.run.recompute}'")
    if cfg.parallelism.recompute_layer and cfg.run.recompute not in ("auto", "full"):
        raise ConfigError(f"parallelism.recompute_layer true means run.recompute full, but run.recompute is "
                          f"'{cfg.run.recompute}': set one of them")
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
    silently differs from the one nanotron would make. (docs/configs.md lists the keys accepted without effect.)"""
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
    folders = [stage_folder(name) for name in names]
    for i, folder in enumerate(folders):
        if folders.index(folder) != i:
            raise ConfigError(f"data_stages: the names '{names[folders.index(folder)]}' and '{names[i]}' give the same "
                              f"data folder '{folder}'; make them differ in a letter or digit")


def _validate_data(cfg: Config) -> None:
    """Every stage's sources and the data_prep section. A config with no source at all is fine until data is read."""
    names = []
    for stage in stages_of(cfg):
        sources = stage.dataset.sources(stage.where)
        stage_names = [name for name, _, _ in sources]
        for name, weight, _ in sources:
            if weight <= 0:
                raise ConfigError(f"{stage.where}: the weight of '{name}' must be > 0, got {weight}")
            if stage_names.count(name) > 1:
                raise ConfigError(f"{stage.where}: '{name}' is listed twice; give it once, with the sum of its weights")
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
    given = [name for name in ("sft", "dpo", "grpo") if getattr(cfg, name) is not None]
    if len(given) > 1:
        raise ConfigError(f"{', '.join(given)}: a config runs one of them; keep the section of the script you run")
    for name, args in (("sft", cfg.sft), ("dpo", cfg.dpo), ("grpo", cfg.grpo)):
        if args is None:
            continue
        if not args.model_name_or_path:
            raise ConfigError(f"{name}.model_name_or_path: the checkpoint to fine-tune is needed (a checkpoint file, "
                              "run directory or Hugging Face model directory)")
        if args.val_examples < 1:
            raise ConfigError(f"{name}.val_examples: must be >= 1, got {args.val_examples}")
        if args.max_examples is not None and args.max_examples < 1:
            raise ConfigError(f"{name}.max_examples: must be >= 1 or null, got {args.max_examples}")
        if args.dataset_name.endswith(".jsonl") and args.dataset_test_split:
            raise ConfigError(f"{name}.dataset_test_split: a .jsonl file has no splits, so the held-out examples "
                              f"would be its first lines, trained on too; remove dataset_test_split (the first "
                              f"{name}.val_examples of the shuffled examples are then held out)")
        if args.num_train_epochs is not None and not args.num_train_epochs > 0:
            raise ConfigError(f"{name}.num_train_epochs: must be > 0 or null, got {args.num_train_epochs}")
        if args.warmup_ratio is not None and not 0 <= args.warmup_ratio < 1:
            raise ConfigError(f"{name}.warmup_ratio: must be in [0, 1) or null, got {args.warmup_ratio}")
        if args.dataset_name == BUILTIN and args.dataset_config:
            _validate_builtin_tasks(name, builtin_tasks(args))
        if args.dataset_name.startswith("builtin:") and args.max_examples is None:
            raise ConfigError(f"{name}.max_examples: {args.dataset_name} is an endless stream of new examples; "
                              "set how many to train on, e.g. 20000")
    if cfg.sft is not None and cfg.sft.truncation_mode not in ("keep_start", "drop"):
        raise ConfigError(f"sft.truncation_mode: 'keep_start' or 'drop', got '{cfg.sft.truncation_mode}'")
    if cfg.dpo is not None:
        _validate_dpo(cfg.dpo, cfg.tokens.sequence_length)
    if cfg.grpo is not None:
        _validate_grpo(cfg.grpo, cfg.tokens)


def _validate_builtin_tasks(section: str, names: list[str]) -> None:
    if unknown := [n for n in names if n not in TASKS]:
        raise ConfigError(f"{section}.dataset_config: {', '.join(map(repr, unknown))} is not a built-in task; "
                          f"{BUILTIN} has {', '.join(TASKS)} (name one or several, comma-separated, or null for all)")


def _validate_dpo(dpo: DPOArgs, sequence_length: int) -> None:
    if not dpo.beta > 0:
        raise ConfigError(f"dpo.beta: must be > 0, got {dpo.beta}")
    length = dpo.max_length or sequence_length
    if dpo.max_length is not None and not 2 <= dpo.max_length <= sequence_length:
        raise ConfigError(f"dpo.max_length: from 2 to tokens.sequence_length ({sequence_length}), the row that "
                          f"holds a prompt and its reply; got {dpo.max_length}")
    if dpo.max_prompt_length is not None and not 1 <= dpo.max_prompt_length < length:
        raise ConfigError(f"dpo.max_prompt_length: from 1 to below dpo.max_length ({length}), which leaves the "
                          f"reply room; got {dpo.max_prompt_length}")
    kind = dpo.loss_type
    if kind not in LOSS_TYPES:
        raise ConfigError(f"dpo.loss_type: one of {', '.join(LOSS_TYPES)}, got '{kind}'")
    refusals = [
        (not 0 <= dpo.label_smoothing < 0.5, f"dpo.label_smoothing: must be in [0, 0.5), got {dpo.label_smoothing}"),
        (dpo.label_smoothing > 0 and kind not in SMOOTHED, f"dpo.label_smoothing: only {' and '.join(SMOOTHED)} "
         f"use it, not {kind}; set it to 0"),
        (dpo.simpo_gamma < 0, f"dpo.simpo_gamma: must be >= 0, got {dpo.simpo_gamma}"),
        (dpo.rpo_alpha is not None and dpo.rpo_alpha < 0, f"dpo.rpo_alpha: must be >= 0 or null, got {dpo.rpo_alpha}"),
        (dpo.rpo_alpha is not None and kind == "orpo", "dpo.rpo_alpha: orpo already adds the chosen replies' NLL; "
         "set rpo_alpha to null"),
        (dpo.precompute_ref_log_probs and kind in REFERENCE_FREE, f"dpo.precompute_ref_log_probs: {kind} has no "
         "reference model; set it to false"),
    ]
    for refused, message in refusals:
        if refused:
            raise ConfigError(message)


def _validate_grpo(grpo: GRPOArgs, tokens) -> None:
    from smollm2 import verifiers   # here: a reward function named by module:function is imported only for GRPO
    G = grpo.num_generations
    problems = [(G < 2, f"num_generations: at least 2 completions per prompt are compared, got {G}"),
                (tokens.micro_batch_size % G != 0,
                 f"num_generations: {G} must divide tokens.micro_batch_size ({tokens.micro_batch_size}), the "
                 "completions of one micro-batch: each holds whole groups"),
                (not 1 <= grpo.max_completion_length < tokens.sequence_length,
                 f"max_completion_length: from 1 to below tokens.sequence_length ({tokens.sequence_length}), the row "
                 f"that holds a prompt and its completion; got {grpo.max_completion_length}"),
                (not grpo.temperature > 0, f"temperature: must be > 0 (the G completions must differ), got "
                                           f"{grpo.temperature}"),
                (not 0 < grpo.top_p <= 1, f"top_p: must be in (0, 1], got {grpo.top_p}"),
                (not grpo.beta >= 0, f"beta: must be >= 0, got {grpo.beta}"),
                (not 0 < grpo.epsilon < 1, f"epsilon: must be in (0, 1), got {grpo.epsilon}"),
                (grpo.num_iterations < 1, f"num_iterations: must be >= 1, got {grpo.num_iterations}"),
                (grpo.loss_type not in ("grpo", "dr_grpo"), f"loss_type: 'grpo' or 'dr_grpo', got '{grpo.loss_type}'"),
                (not grpo.reward_funcs, "reward_funcs: name at least one verifier, e.g. [exact_match]")]
    for bad, message in problems:
        if bad:
            raise ConfigError(f"grpo.{message}")
    verifiers.resolve(grpo.reward_funcs)
