"""Hugging Face interop: an exported checkpoint is a transformers model with our logits (and a tied head stored once),
a save_pretrained directory imports into a checkpoint with HF's logits, and validate_params.py passes on a correct
model, fails naming the check on a broken one, and refuses bad input in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import RUN_TEXT, make_run, torch_threads, write_run_tokenizer
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import convert_hf
import validate_params
from smollm2.checkpoint import checkpoint_name, load_checkpoint
from smollm2.errors import CheckpointError
from smollm2.loading import load_model

ROOT = Path(__file__).resolve().parents[1]


# a model-level bug validate_params must catch: RoPE in the interleaved (nanotron/Meta) layout on HF-layout weights
def interleaved_rope(x, cos, sin):
    half = x.shape[-1] // 2
    c, s = cos[..., :half].repeat_interleave(2, -1), sin[..., half:].repeat_interleave(2, -1)   # +sin: the 2nd half
    rotated = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    return x * c + rotated * s


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(our model, the HF directory convert_hf.py exported it to)."""
    root = tmp_path_factory.mktemp("export")
    model = make_run(root / "run")
    assert convert_hf.main(["export", "--checkpoint_path", str(root / "run"), "--out", str(root / "hf")]) == 0
    return model, root / "hf"


def hf_llama_dir(path: Path, **changes) -> LlamaForCausalLM:
    """A small Llama saved by transformers itself, as any HF checkpoint directory is."""
    fields = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, max_position_embeddings=96, rms_norm_eps=1e-6, rope_theta=500.0,
                  bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**{**fields, **changes})).eval()
    hf.save_pretrained(str(path))
    return hf


def tokens(vocab: int = 320) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(0))


def run_script(*args: str) -> subprocess.CompletedProcess:
    # one thread: these small matmuls gain little from a second, and on a busy machine OpenMP's waiting threads
    # can make a run several times slower
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------- export


@torch.no_grad()
def test_export_loads_in_transformers_with_identical_logits(exported):
    model, out = exported
    hf = AutoModelForCausalLM.from_pretrained(str(out)).float().eval()
    assert (hf(tokens()).logits - model(tokens())[0]).abs().max().item() <= 1e-6


def test_export_stores_a_tied_head_once_and_transformers_reties_it(exported):
    _, out = exported
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    hf = AutoModelForCausalLM.from_pretrained(str(out))
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


def test_export_writes_generation_config_and_a_tokenizer_autotokenizer_reads(exported):
    _, out = exported
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 0, "eos_token_id": 0}
    auto, ours = AutoTokenizer.from_pretrained(str(out)), Tokenizer.from_file(str(out / "tokenizer.json"))
    assert auto(RUN_TEXT)["input_ids"] == ours.encode(RUN_TEXT).ids
    assert (auto.eos_token, auto.eos_token_id) == ("<|endoftext|>", 0)


@torch.no_grad()
def test_untied_model_exports_its_own_head(tmp_path):
    model = make_run(tmp_path / "run", tied=False)
    assert convert_hf.main(["export", "--checkpoint_path", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in set(f.keys())
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).float().eval()
    assert (hf(tokens()).logits - model(tokens())[0]).abs().max().item() <= 1e-6


def test_export_refuses_to_overwrite_without_force(exported, tmp_path, capsys):
    _, out = exported
    run = str(out.parent / "run")
    assert convert_hf.main(["export", "--checkpoint_path", run, "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "already exists; pass --force" in err[0]
    assert convert_hf.main(["export", "--checkpoint_path", run, "--out", str(out), "--force"]) == 0


# ---------------------------------------------------------------- import


@torch.no_grad()
def test_import_of_a_save_pretrained_directory_gives_hf_logits_and_loads_with_no_random_init(tmp_path):
    hf = hf_llama_dir(tmp_path / "hf")
    write_run_tokenizer(tmp_path / "hf" / "tokenizer.json")
    assert convert_hf.main(["import", "--hf_model", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    file = tmp_path / "run" / "checkpoints" / checkpoint_name(0)
    ckpt = load_checkpoint(file)
    assert set(ckpt) == {"model", "config", "train_state"} and ckpt["train_state"]["step"] == 0
    rng = torch.get_rng_state()
    model, cfg, info = load_model(tmp_path / "run")       # what generate.py and a resume both go through
    assert torch.equal(torch.get_rng_state(), rng)        # no random init drawn, only to be overwritten
    assert (model(tokens())[0] - hf(tokens()).logits).abs().max().item() <= 1e-6
    assert (cfg.model.model_config.rms_norm_eps, cfg.model.model_config.rope_theta) == (1e-6, 500.0)
    assert info["tokenizer"] == str(tmp_path / "run" / "tokenizer.json")
    assert cfg.tokens.sequence_length <= cfg.model.model_config.max_position_embeddings


def test_import_refuses_to_overwrite_and_refuses_non_llama_directories(tmp_path, capsys):
    hf_llama_dir(tmp_path / "hf")
    out = str(tmp_path / "ckpt.pt")
    assert convert_hf.main(["import", "--hf_model", str(tmp_path / "hf"), "--out", out]) == 0
    assert convert_hf.main(["import", "--hf_model", str(tmp_path / "hf"), "--out", out]) == 2
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    assert convert_hf.main(["import", "--hf_model", str(tmp_path / "gpt2"), "--out", str(tmp_path / "x")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "already exists and would be replaced; pass --force" in err[0]
    assert "model_type 'gpt2' is not a Llama model" in err[1]


def snapshot(folder: Path) -> dict:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("out", ["run", "run/checkpoints/step_00000000.pt", "run/imported.pt"])
def test_import_never_replaces_or_adds_to_what_it_did_not_create_without_force(tmp_path, capsys, out):
    hf_llama_dir(tmp_path / "hf")
    write_run_tokenizer(tmp_path / "hf" / "tokenizer.json")
    make_run(tmp_path / "run")                      # a run with its own checkpoint and tokenizer
    before = snapshot(tmp_path / "run")
    assert convert_hf.main(["import", "--hf_model", str(tmp_path / "hf"), "--out", str(tmp_path / out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "pass --force" in err[0] and "tokenizer.json" in err[0], err
    assert snapshot(tmp_path / "run") == before, "a refused import wrote something"
    assert convert_hf.main(["import", "--hf_model", str(tmp_path / "hf"), "--out", str(tmp_path / out), "--force"]) == 0
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == (tmp_path / "hf" / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("make,message", [
    (lambda out: out.mkdir(parents=True), "is a directory"),                       # --out x.pt names a folder
    (lambda out: out.parent.parent.mkdir() or out.parent.write_text("x"), "is a file"),   # a parent is a file
])
def test_import_to_a_path_it_cannot_write_is_one_line_and_writes_nothing(tmp_path, capsys, make, message):
    hf_llama_dir(tmp_path / "hf")
    out = tmp_path / "dest" / "sub" / "model.pt"
    make(out)
    before = snapshot(tmp_path / "dest")
    assert convert_hf.main(["import", "--hf_model", str(tmp_path / "hf"), "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], err
    assert snapshot(tmp_path / "dest") == before


def test_export_to_a_path_it_cannot_write_or_onto_its_own_source_is_one_line_and_writes_nothing(exported, tmp_path,
                                                                                                  capsys):
    _, hf = exported
    (tmp_path / "a_file").write_text("x")
    before = snapshot(hf)
    for args, message in ((["--checkpoint_path", str(hf.parent / "run"), "--out", str(tmp_path / "a_file" / "hf")],
                           "a_file is a file, not a folder"),
                          (["--checkpoint_path", str(hf), "--out", str(hf), "--force"], "the folder it reads from"),
                          (["--checkpoint_path", str(hf.parent / "run"), "--out", ""], "--out is empty")):
        assert convert_hf.main(["export", *args]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and message in err[0], err
    assert snapshot(hf) == before and (tmp_path / "a_file").read_text() == "x"


def test_import_to_an_empty_out_is_refused_instead_of_writing_into_the_current_folder(tmp_path, capsys, monkeypatch):
    hf_llama_dir(tmp_path / "hf")
    write_run_tokenizer(tmp_path / "hf" / "tokenizer.json")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert convert_hf.main(["import", "--hf_model", str(tmp_path / "hf"), "--out", ""]) == 2
    assert "--out is empty" in capsys.readouterr().err and not any((tmp_path / "cwd").iterdir())


def test_tied_config_with_a_different_head_in_the_file_is_refused(tmp_path):
    hf_llama_dir(tmp_path / "hf", tie_word_embeddings=False)   # writes lm_head.weight of its own
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(CheckpointError, match="tie_word_embeddings is true but lm_head.weight differs"):
        load_model(tmp_path / "hf")


# ---------------------------------------------------------------- validate_params.py


def validate(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """validate_params.main in the test's process (a process of its own paid ~5 s to import torch and transformers),
    in the repository root, where its default --config is, on one thread as the process had: (exit code, stdout)."""
    monkeypatch.chdir(ROOT)
    with torch_threads(1):
        code = validate_params.main(args)
    return code, capsys.readouterr().out


def test_validate_params_passes_on_the_tiny_config_and_prints_the_table(capsys, monkeypatch):
    code, out = validate(["--config", "config_tiny.yaml"], monkeypatch, capsys)
    assert code == 0, out
    rows = [line for line in out.splitlines() if " | " in line]
    assert rows[0].split(" | ")[:2] == ["check                     ", "result"]
    assert [r.split(" | ")[1].strip() for r in rows[1:]] == ["ok"] * 5
    assert "all checks passed" in out


def test_validate_params_passes_at_135M_with_the_published_parameter_count(capsys, monkeypatch):
    # the default config (config_smollm2_135M.yaml); 16 greedy tokens, not 64: each decode step at this size reads
    # all 540 MB of weights on both sides (~0.15 s a token), and the tiny config's tests check the 64-token default
    code, out = validate(["--new_tokens", "16"], monkeypatch, capsys)
    assert code == 0, out
    assert "SmolLM2-135M published 134,515,008" in out and "2 prompts x 16 new tokens identical" in out


def test_validate_params_passes_against_an_exported_directory(exported, capsys):
    _, out = exported
    assert validate_params.main(["--hf_model", str(out)]) == 0
    assert "logits (fp32)              | ok" in capsys.readouterr().out


def test_validate_params_says_what_it_is_doing_before_each_slow_step(capsys):
    assert validate_params.main(["--config", "config_tiny.yaml", "--new_tokens", "8"]) == 0
    steps = [line for line in capsys.readouterr().err.splitlines() if line.startswith("... ")]
    assert [s.split()[1] for s in steps] == ["building", "logits", "8"], steps


def test_validate_params_fails_naming_the_checks_when_rope_is_interleaved(monkeypatch, capsys):
    monkeypatch.setattr("model.apply_rotary", interleaved_rope)
    code, out = validate(["--config", "config_tiny.yaml"], monkeypatch, capsys)
    assert code == 1, out
    assert "FAILED: logits (fp32), greedy generation" in out


@pytest.mark.parametrize("args,message", [
    (["--hf_model", "no/such/dir"], "no/such/dir: no such directory"),
    (["--config", "config_tiny.yaml", "model.model_config.num_attention_heads=5"], "must be divisible"),
])
def test_validate_params_bad_input_is_one_line_and_exit_2(args, message):
    result = run_script("validate_params.py", *args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


@pytest.mark.parametrize("flag", ["--new_tokens", "--seq_len", "--batch"])
def test_validate_params_counts_below_one_are_refused_by_argparse(flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        validate_params.main(["--config", "config_tiny.yaml", flag, "0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {flag}: must be a whole number >= 1, got '0'" in err
