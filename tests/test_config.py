"""Configs are nanotron YAML: the official SmolLM2 file loads as it is, every mistake is one error naming its key path,
and `key=value` overrides reach any key, list items included."""

import pytest
import yaml

from config import ConfigError, ModelConfig, config_from_dict, load_config

# The sections and keys of the official SmolLM2-135M nanotron file (smollm repo, pre-training/smollm2/). Its dataset
# is a local Nanoset (dataset_folder, dataset_weights); ours streams from the hub with nanotron's other dataset keys.
NANOTRON_KEYS = {
    "checkpoints": {"checkpoint_interval", "checkpoints_path", "checkpoints_path_is_shared_file_system",
                    "resume_checkpoint_path", "save_final_state", "save_initial_state"},
    "data_stages": {"data", "name", "start_training_step"},
    "data_stages.0.data": {"dataset", "num_loading_workers", "seed"},
    "general": {"benchmark_csv_path", "consumed_train_samples", "ignore_sanity_checks", "project", "run", "seed",
                "step"},
    "logging": {"iteration_step_info_interval", "log_level", "log_level_replica"},
    "model": {"ddp_bucket_cap_mb", "dtype", "init_method", "make_vocab_size_divisible_by", "model_config"},
    "model.init_method": {"std"},
    "model.model_config": {"bos_token_id", "eos_token_id", "hidden_act", "hidden_size", "initializer_range",
                           "intermediate_size", "is_llama_config", "max_position_embeddings", "num_attention_heads",
                           "num_hidden_layers", "num_key_value_heads", "pad_token_id", "pretraining_tp",
                           "rms_norm_eps", "rope_interleaved", "rope_scaling", "rope_theta", "tie_word_embeddings",
                           "use_cache", "vocab_size"},
    "optimizer": {"accumulate_grad_in_fp32", "clip_grad", "learning_rate_scheduler", "optimizer_factory",
                  "weight_decay", "zero_stage"},
    "optimizer.learning_rate_scheduler": {"learning_rate", "lr_decay_starting_step", "lr_decay_steps",
                                          "lr_decay_style", "lr_warmup_steps", "lr_warmup_style", "min_decay_lr"},
    "optimizer.optimizer_factory": {"adam_beta1", "adam_beta2", "adam_eps", "name", "torch_adam_is_fused"},
    "parallelism": {"dp", "expert_parallel_size", "pp", "pp_engine", "recompute_layer", "tp",
                    "tp_linear_async_communication", "tp_mode", "tp_recompute_allgather"},
    "profiler": None,
    "tokenizer": {"tokenizer_max_length", "tokenizer_name_or_path", "tokenizer_revision"},
    "tokens": {"batch_accumulation_per_replica", "limit_test_batches", "limit_val_batches", "micro_batch_size",
               "sequence_length", "train_steps", "val_check_interval"},
}
OUR_SECTIONS = {"run", "sampling", "data_prep", "s3"}
SHIPPED = ["config_smollm2_135M.yaml", "config_smollm2_360M.yaml", "config_smollm2_1.7B.yaml"]


def model_config(**changes) -> dict:
    """A config dict with these model_config keys changed."""
    return {"model": {"model_config": changes}}


def official_135M(tmp_path) -> str:
    """The shipped 135M file in the official file's exact form: nanotron sections only, a local Nanoset dataset."""
    data = yaml.safe_load(open("config_smollm2_135M.yaml"))
    for section in OUR_SECTIONS:
        data.pop(section, None)
    data["data_stages"][0]["data"]["dataset"] = {"dataset_folder": ["datasets/smollm2-corpus"],
                                                 "dataset_weights": [1.0]}
    data["parallelism"]["dp"] = 64
    data["general"]["step"] = 2_000_000
    path = tmp_path / "official.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


# ---------------------------------------------------------------- the official format


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_configs_have_exactly_the_official_nanotron_keys_plus_our_sections(path):
    data = yaml.safe_load(open(path))
    assert set(data) - OUR_SECTIONS == {k for k in NANOTRON_KEYS if "." not in k}
    for section, keys in NANOTRON_KEYS.items():
        node = data
        for part in section.split("."):
            node = node[int(part)] if isinstance(node, list) else node[part]
        node = node[0] if isinstance(node, list) else node   # data_stages: every stage has the same keys
        assert (set(node) if keys is not None else node) == keys, section


def test_official_135M_file_loads_into_the_smollm2_135M_model_config(tmp_path):
    cfg = load_config(official_135M(tmp_path))
    std = 0.041666666666666664
    assert cfg.model.model_config == ModelConfig(
        bos_token_id=0, eos_token_id=0, hidden_act="silu", hidden_size=576, initializer_range=std,
        intermediate_size=1536, is_llama_config=True, max_position_embeddings=2048, num_attention_heads=9,
        num_hidden_layers=30, num_key_value_heads=3, pad_token_id=None, pretraining_tp=1, rms_norm_eps=1e-5,
        rope_interleaved=False, rope_scaling=None, rope_theta=10000.0, tie_word_embeddings=True, use_cache=True,
        vocab_size=49152)
    assert cfg.model.init_method.std == std
    assert cfg.data_stages[0].data.dataset.dataset_folder == ["datasets/smollm2-corpus"]
    assert cfg.parallelism.dp == 64


def test_shipped_135M_config_is_the_smollm2_recipe():
    cfg = load_config("config_smollm2_135M.yaml")
    lrs, opt = cfg.optimizer.learning_rate_scheduler, cfg.optimizer.optimizer_factory
    assert (lrs.learning_rate, lrs.lr_warmup_steps, lrs.lr_warmup_style, lrs.lr_decay_style) == (3e-3, 2000, "linear",
                                                                                                "linear")
    assert (opt.name, opt.adam_beta1, opt.adam_beta2) == ("adamW", 0.9, 0.95)
    assert (cfg.optimizer.weight_decay, cfg.optimizer.clip_grad) == (0.01, 1.0)
    assert cfg.tokens.sequence_length == 2048
    assert cfg.tokenizer.tokenizer_name_or_path == "HuggingFaceTB/cosmo2-tokenizer"


# ---------------------------------------------------------------- mistakes are named


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"^model\.model_config\.hiden_size: unknown key; did you mean 'hidden_size'"):
        config_from_dict(model_config(hiden_size=576))


def test_unknown_section_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"^tokenz: unknown key; did you mean 'tokens'"):
        config_from_dict({"tokenz": {"micro_batch_size": 4}})


@pytest.mark.parametrize("value", ["eight", True, 8.5])
def test_wrong_type_is_named(value):
    with pytest.raises(ConfigError, match=r"^tokens\.micro_batch_size: expected int, got"):
        config_from_dict({"tokens": {"micro_batch_size": value}})


def test_hidden_size_not_divisible_by_heads_is_refused():
    with pytest.raises(ConfigError, match=r"hidden_size \(100\) must be divisible by num_attention_heads \(3\)"):
        config_from_dict(model_config(hidden_size=100, num_attention_heads=3, num_key_value_heads=1))


def test_kv_heads_that_do_not_divide_heads_are_refused():
    with pytest.raises(ConfigError, match=r"num_key_value_heads \(4\) must divide num_attention_heads \(9\)"):
        config_from_dict(model_config(num_key_value_heads=4))


@pytest.mark.parametrize("key", ["tp", "pp"])
def test_tensor_and_pipeline_parallelism_are_refused_with_the_way_out(key):
    way_out = rf"^parallelism\.{key}: 2 is not supported.*set parallelism\.{key}=1.*torchrun"
    with pytest.raises(ConfigError, match=way_out):
        config_from_dict({"parallelism": {key: 2}})


def test_interleaved_rope_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r"^model\.model_config\.rope_interleaved: set it to false.*rotate-half"):
        config_from_dict(model_config(rope_interleaved=True))


# ---------------------------------------------------------------- key=value overrides


def test_overrides_set_nested_keys_list_items_and_typed_values():
    cfg = load_config("config_smollm2_135M.yaml", [
        "tokens.micro_batch_size=4", "data_stages.0.data.seed=3", "checkpoints.resume_checkpoint_path=runs/x",
        "optimizer.learning_rate_scheduler.learning_rate=1e-4", "sampling.prompts=[a, b]"])
    assert cfg.tokens.micro_batch_size == 4
    assert cfg.data_stages[0].data.seed == 3
    assert cfg.checkpoints.resume_checkpoint_path == "runs/x"
    assert cfg.optimizer.learning_rate_scheduler.learning_rate == 1e-4   # YAML 1.1 alone would read a string
    assert cfg.sampling.prompts == ["a", "b"]


def test_overrides_are_checked_like_the_file():
    with pytest.raises(ConfigError, match=r"^tokens\.micro_batch_sise: unknown key; did you mean 'micro_batch_size'"):
        load_config("config_tiny.yaml", ["tokens.micro_batch_sise=4"])
    with pytest.raises(ConfigError, match=r"num_key_value_heads \(4\) must divide num_attention_heads \(6\)"):
        load_config("config_tiny.yaml", ["model.model_config.num_key_value_heads=4"])


@pytest.mark.parametrize("override,message", [
    ("tokens.micro_batch_size", r"expected key\.path=value"),
    ("data_stages.5.data.seed=1", r"'5' is not an index of data_stages"),
    ("tokens.micro_batch_size.x=1", r"tokens\.micro_batch_size is not a section"),
])
def test_malformed_overrides_say_what_is_wrong(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("config_tiny.yaml", [override])


def test_missing_config_file_is_named():
    with pytest.raises(ConfigError, match=r"^nope\.yaml: config file not found"):
        load_config("nope.yaml")


# ---------------------------------------------------------------- values that would crash or mislead a run later


@pytest.mark.parametrize("override,message", [
    ("checkpoints.checkpoint_interval=0", r"^checkpoints\.checkpoint_interval: must be >= 1, got 0"),
    ("tokens.val_check_interval=0", r"^tokens\.val_check_interval: must be >= 1, got 0"),
    ("logging.iteration_step_info_interval=0", r"^logging\.iteration_step_info_interval: must be >= 1, got 0"),
    ("run.val_batches=0", r"^run\.val_batches: must be >= 1"),
    ("run.max_consecutive_bad_steps=0", r"^run\.max_consecutive_bad_steps: must be >= 1"),
    ("run.keep_last_checkpoints=-1", r"^run\.keep_last_checkpoints: must be >= 0 \(0 keeps every checkpoint\)"),
    ("sampling.interval=-1", r"^sampling\.interval: must be >= 0 \(0: no samples\)"),
    ("optimizer.learning_rate_scheduler.learning_rate=.nan", r"learning_rate: expected a finite number, got nan"),
    ("optimizer.learning_rate_scheduler.learning_rate=-3e-3", r"learning_rate: must be > 0, got -0\.003"),
    ("optimizer.learning_rate_scheduler.learning_rate=0", r"learning_rate: must be > 0, got 0"),
    ("optimizer.learning_rate_scheduler.min_decay_lr=-1e-5", r"min_decay_lr: must be >= 0"),
    ("optimizer.learning_rate_scheduler.lr_warmup_steps=-5", r"lr_warmup_steps: must be >= 0"),
    ("optimizer.learning_rate_scheduler.lr_decay_steps=-5", r"lr_decay_steps: must be >= 0"),
    ("optimizer.learning_rate_scheduler.lr_decay_starting_step=-1", r"lr_decay_starting_step: must be >= 0"),
    ("optimizer.weight_decay=.inf", r"^optimizer\.weight_decay: expected a finite number, got inf"),
    ("optimizer.weight_decay=-0.1", r"^optimizer\.weight_decay: must be >= 0"),
    ("optimizer.clip_grad=0", r"^optimizer\.clip_grad: must be > 0, or null for no clipping"),
    ("optimizer.optimizer_factory.adam_beta2=1.0", r"adam_beta2: must be in \[0, 1\), got 1\.0"),
    ("optimizer.optimizer_factory.adam_eps=0", r"adam_eps: must be > 0"),
    ("model.init_method.std=-0.02", r"^model\.init_method\.std: must be > 0"),
    ("model.model_config.rms_norm_eps=0", r"rms_norm_eps: must be > 0"),
    ("model.model_config.rope_theta=-1", r"rope_theta: must be > 0"),
    ("model.dtype=bfloat61", r"^model\.dtype: 'bfloat16', 'float16' or 'float32', got 'bfloat61'"),
    ("run.device=bogus", r"^run\.device: 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'bogus'"),
    ("run.device=cuda:x", r"^run\.device: .* got 'cuda:x'"),
    ("run.loss_spike_factor=0.5", r"^run\.loss_spike_factor: must be > 1"),
    ("general.seed=-1", r"^general\.seed: must be from 0 to 2\*\*32 - 1"),
    ("general.seed=4294967296", r"^general\.seed: must be from 0 to 2\*\*32 - 1"),
    ("checkpoints.checkpoints_path=''", r"^checkpoints\.checkpoints_path: empty"),
    ("sampling.temperature=.nan", r"^sampling\.temperature: expected a finite number"),
    ("sampling.temperature=-1", r"^sampling\.temperature: must be >= 0"),
    ("sampling.top_k=0", r"^sampling\.top_k: must be >= 1, or null"),
    ("sampling.top_p=1.5", r"^sampling\.top_p: must be in \(0, 1\], or null"),
    ("sampling.max_new_tokens=0", r"^sampling\.max_new_tokens: must be >= 1"),
    ("sampling.prompts=['ok', '']", r"^sampling\.prompts\[1\]: empty"),
])
def test_values_that_would_crash_or_silently_mislead_a_run_are_refused_by_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("config_tiny.yaml", [override])


def test_a_config_that_is_not_utf8_text_or_is_a_folder_is_one_error(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes("tokens: {}\ngeneral: {run: caf\xe9}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text \(byte 0xe9 on line 2\); save it as UTF-8"):
        load_config(str(tmp_path / "latin1.yaml"))
    with pytest.raises(ConfigError, match=r": is a directory; --config names a YAML file"):
        load_config(str(tmp_path))
