"""Configs are nanotron YAML: the official SmolLM2 file loads as it is, every mistake is one error naming its key path,
and `key=value` overrides reach any key, list items included."""

import json
import re

import pytest
import torch
import yaml

from model import SmolLM2
from smollm2.config import NO_EFFECT
from smollm2.config_checks import notes
from smollm2.config_load import config_from_dict, load_config
from smollm2.errors import ConfigError
from smollm2.stages import stages_of

OFFICIAL = {size: f"tests/fixtures/smollm2/config_smollm2_{name}.yaml"   # 1B is the file of the 1.7B run
            for size, name in (("135M", "135M"), ("360M", "360M"), ("1.7B", "1B"))}
PUBLISHED = {"135M": 134_515_008, "360M": 361_821_120, "1.7B": 1_711_376_384}   # the released models' safetensors
OUR_SECTIONS = {"run", "sampling", "data_prep", "s3"}
SHIPPED = ["config_smollm2_135M.yaml", "configs/config_smollm2_360M.yaml", "configs/config_smollm2_1.7B.yaml"]
# What this repository does with each key of the official files. "refused" keys are refused for any value other
# than the ones implemented (test_values_not_implemented_are_refused_by_key); NO_EFFECT keys are in config.NO_EFFECT
# and docs/configs.md; every other key changes the run as it does in nanotron.
REFUSED_OTHERWISE = {"general.benchmark_csv_path", "model.make_vocab_size_divisible_by",
                     "model.model_config.hidden_act", "model.model_config.pretraining_tp", "model.model_config.rope_scaling",
                     "optimizer.accumulate_grad_in_fp32", "optimizer.optimizer_factory.name",
                     "parallelism.expert_parallel_size", "parallelism.pp", "parallelism.tp", "profiler"}
HONOURED = {
    "checkpoints.checkpoint_interval", "checkpoints.checkpoints_path", "checkpoints.resume_checkpoint_path",
    "checkpoints.save_final_state", "checkpoints.save_initial_state", "data_stages[].data.dataset.dataset_folder",
    "data_stages[].data.dataset.dataset_weights", "data_stages[].data.seed", "data_stages[].name",
    "data_stages[].start_training_step", "general.project", "general.run", "general.seed",
    "logging.iteration_step_info_interval", "model.ddp_bucket_cap_mb", "model.dtype", "model.init_method.std",
    *(f"model.model_config.{k}" for k in ("bos_token_id", "eos_token_id", "hidden_size", "intermediate_size",
                                          "max_position_embeddings", "num_attention_heads", "num_hidden_layers",
                                          "num_key_value_heads", "pad_token_id", "rms_norm_eps", "rope_interleaved",
                                          "rope_theta", "tie_word_embeddings", "vocab_size")),
    "optimizer.clip_grad", "optimizer.weight_decay", "optimizer.learning_rate_scheduler.learning_rate",
    *(f"optimizer.learning_rate_scheduler.{k}" for k in ("lr_decay_starting_step", "lr_decay_steps",
                                                         "lr_decay_style", "lr_warmup_steps", "lr_warmup_style",
                                                         "min_decay_lr")),
    *(f"optimizer.optimizer_factory.{k}" for k in ("adam_beta1", "adam_beta2", "adam_eps", "torch_adam_is_fused")),
    "optimizer.zero_stage", "parallelism.dp", "parallelism.recompute_layer", "tokenizer.tokenizer_name_or_path", "tokenizer.tokenizer_revision",
    *(f"tokens.{k}" for k in ("batch_accumulation_per_replica", "limit_val_batches", "micro_batch_size",
                              "sequence_length", "train_steps", "val_check_interval")),
}


def leaf_keys(node, prefix="") -> set[str]:
    """Every key path of a YAML tree, items of a list of sections written as [] (data_stages[].name)."""
    if isinstance(node, list) and all(isinstance(item, dict) for item in node):
        return set().union(*(leaf_keys(item, prefix + "[]") for item in node))
    if isinstance(node, dict) and node:
        return set().union(*(leaf_keys(v, f"{prefix}.{k}" if prefix else k) for k, v in node.items()))
    return {prefix}


def model_config(**changes) -> dict:
    """A config dict with these model_config keys changed."""
    return {"model": {"model_config": changes}}


# ---------------------------------------------------------------- the official format


@pytest.mark.parametrize("size", OFFICIAL)
def test_official_files_load_unmodified_and_give_the_published_parameter_counts(size):
    cfg = load_config(OFFICIAL[size])
    with torch.device("meta"):   # the shapes alone: no memory for 1.7B weights
        model = SmolLM2(cfg.model.model_config, cfg.model.init_method.std)
    assert model.num_parameters() == PUBLISHED[size]
    assert cfg.data_stages[0].data.dataset.dataset_folder == ["datasets/smollm2-corpus"]
    assert [n for n in notes(cfg) if "rope_interleaved" in n] == ([] if size != "1.7B" else [notes(cfg)[0]])


def test_every_key_of_the_official_files_is_honoured_listed_as_without_effect_or_refused_otherwise():
    keys = set().union(*(leaf_keys(yaml.safe_load(open(path))) for path in OFFICIAL.values()))
    assert keys == HONOURED | set(NO_EFFECT) | REFUSED_OTHERWISE
    assert not HONOURED & set(NO_EFFECT) and not REFUSED_OTHERWISE & set(NO_EFFECT)
    page = open("docs/configs.md").read()
    for key, why in NO_EFFECT.items():
        assert f"`{key}`" in page, f"docs/configs.md must list {key} as accepted without effect"


@pytest.mark.parametrize("key, value, message", [
    ("general.benchmark_csv_path", "bench.csv", "general.benchmark_csv_path: not supported"),
    ("model.make_vocab_size_divisible_by", 7, "model.make_vocab_size_divisible_by: vocab_size 49152 is not a multiple"),
    ("model.model_config.hidden_act", "gelu", "model.model_config.hidden_act: only 'silu'"),
    ("model.model_config.pretraining_tp", 2, "model.model_config.pretraining_tp: only 1"),
    ("model.model_config.rope_scaling", {"type": "linear", "factor": 2.0}, "model.model_config.rope_scaling: only null"),
    ("optimizer.accumulate_grad_in_fp32", False, "optimizer.accumulate_grad_in_fp32: false is not supported"),
    ("optimizer.optimizer_factory.name", "sgd", "optimizer.optimizer_factory.name: only 'adamW'"),
    ("parallelism.expert_parallel_size", 2, "parallelism.expert_parallel_size: 2 is not supported"),
    ("profiler", {"profiler_export_path": "x"}, "profiler: nanotron's profiler section is not supported"),
    ("checkpoints.load_lr_scheduler", False, "checkpoints.load_lr_scheduler: false is not supported"),
    ("logging.log_level", "loud", "logging.log_level: one of debug, info"),
])
def test_values_not_implemented_are_refused_by_key(key, value, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        load_config(OFFICIAL["135M"], [f"{key}={json.dumps(value)}"])


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_configs_have_exactly_the_official_keys_plus_our_sections(path):
    data = yaml.safe_load(open(path))
    official = yaml.safe_load(open(OFFICIAL["135M"]))
    assert leaf_keys({k: v for k, v in data.items() if k not in OUR_SECTIONS} | {"data_stages": []}) == \
        leaf_keys(official | {"data_stages": []})


def test_shipped_135M_config_is_the_smollm2_recipe():
    cfg = load_config("config_smollm2_135M.yaml")
    lrs, opt = cfg.optimizer.learning_rate_scheduler, cfg.optimizer.optimizer_factory
    assert (lrs.learning_rate, lrs.lr_warmup_steps, lrs.lr_warmup_style, lrs.lr_decay_style) == (3e-3, 2000, "linear",
                                                                                                "linear")
    assert (opt.name, opt.adam_beta1, opt.adam_beta2) == ("adamW", 0.9, 0.95)
    assert (cfg.optimizer.weight_decay, cfg.optimizer.clip_grad) == (0.01, 1.0)
    assert cfg.tokens.sequence_length == 2048
    assert cfg.tokenizer.tokenizer_name_or_path == "HuggingFaceTB/cosmo2-tokenizer"


# ---------------------------------------------------------------- data stages


def stages(*stages) -> dict:
    return {"data_stages": [{"name": name, "start_training_step": start,
                             "data": {"dataset": {"hf_dataset_or_datasets": f"org/{name}"}}} for name, start in stages],
            "tokens": {"train_steps": 100}}


def test_data_stages_are_put_in_order_of_their_starting_step_as_nanotron_does():
    cfg = config_from_dict(stages(("decay", 80), ("stable", 1), ("anneal", 95)))
    assert [s.name for s in cfg.data_stages] == ["stable", "decay", "anneal"]
    assert notes(config_from_dict(stages(("stable", 1), ("late", 101)))) == [
        "note: data stage 'late' starts at step 101, after tokens.train_steps (100): it will not run"]


@pytest.mark.parametrize("spec, message", [
    ((("stable", 2), ("decay", 80)), "one stage must have start_training_step 1"),
    ((("stable", 1), ("stable", 80)), "the name 'stable' is used by 2 stages"),
    ((("stable", 1), ("decay", 1)), "2 stages start at step 1"),
    ((("a b", 1), ("a-b", 50)), "the names 'a b' and 'a-b' give the same data folder"),
])
def test_data_stages_are_validated_as_nanotron_does(spec, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(stages(*spec))


def test_each_stage_has_its_own_data_folder_and_its_sources_are_checked_by_index():
    cfg = config_from_dict(stages(("stable phase", 1), ("decay", 80)) | {"data_prep": {"output_dir": "d"}})
    assert [stage.folder for stage in stages_of(cfg)] == ["d/stable-phase", "d/decay"]
    decay = stages_of(cfg)[1]
    assert decay.where == "data_stages[1].data.dataset" and decay.dataset is cfg.data_stages[1].data.dataset
    assert [stage.folder for stage in stages_of(config_from_dict(stages(("only", 1))))] == ["data/smollm2"]
    bad = stages(("stable", 1), ("decay", 80))
    bad["data_stages"][1]["data"]["dataset"] = {"dataset_folder": ["x", "y"], "dataset_weights": [1.0]}
    with pytest.raises(ConfigError, match=re.escape("data_stages[1].data.dataset.dataset_weights: one weight per")):
        config_from_dict(bad)


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


def test_interleaved_rope_loads_with_a_one_line_note():
    cfg = config_from_dict(model_config(rope_interleaved=True))
    [note] = notes(cfg)
    assert "rope_interleaved" in note and "rotate-half" in note and "\n" not in note


def test_a_key_that_moved_says_where_to():
    with pytest.raises(ConfigError, match=r"^run\.val_batches: this key moved to tokens\.limit_val_batches"):
        config_from_dict({"run": {"val_batches": 5}})


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
    ("logging.iteration_step_info_interval=0", r"^logging\.iteration_step_info_interval: must be >= 1, got 0"),
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
