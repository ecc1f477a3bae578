"""planner.py's memory model is what PyTorch does: its activation estimate is within 20% of peaks measured on the CPU
at four shapes, in each recompute mode (none, selective, full), in fp32, under bf16 autocast and with bf16 weights;
its weights, gradients and optimizer state follow the exact parameter count and divide over FSDP2 ranks; its largest
micro-batch fits and the next does not; `train.py --plan` prints it in seconds, allocating no weights and reading no
data."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import LargestTensor

import train
from model import ModelConfig, SmolLM2
from smollm2 import planner
from smollm2.config_load import load_config
from smollm2.errors import ConfigError
from smollm2.metrics import GPUS, flops_per_token, gpu_by_name

ROOT = Path(__file__).resolve().parent.parent

# name -> (model, micro-batch, sequence, precision): layer-heavy shapes, whose peak is in the last layer's backward,
# and vocabulary-heavy ones, whose peak is in the loss path; GQA 2:1 and 4:1
SHAPES = {"layers-autocast": (dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=4, vocab_size=512), 2, 512, "autocast"),
          "loss-fp32": (dict(hidden_size=192, intermediate_size=512, num_attention_heads=6, num_key_value_heads=2,
                             num_hidden_layers=4, vocab_size=4096), 1, 1024, "fp32"),
          "loss-bf16": (dict(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=1,
                             num_hidden_layers=4, vocab_size=2048), 1, 1024, "bf16 weights"),
          "layers-fp32": (dict(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=1,
                               num_hidden_layers=4, vocab_size=256), 2, 512, "fp32")}
# document-masked rows, run as CUDA runs them (model.MASKED_GQA_DEVICES emptied): k/v repeated, a (B, 1, T, T) bias
MASKED = {"masked-fp32": (dict(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=1,
                               num_hidden_layers=4, vocab_size=256), 1, 1024, "fp32")}
# (compute, residual) dtype sizes of each precision, as planner.layer_bytes takes them
DTYPES = {"fp32": (4, 4), "autocast": (2, 4), "bf16 weights": (2, 2)}

# One micro-step with gradients already there, as under accumulation (a short warm-up step allocates them and
# initialises the kernels): reset the resident set's high-water mark, run forward and backward, report what the step
# added. glibc hands each freed block of 256 kB or more back to the OS, so the resident set follows live tensors.
MEASURE = r"""
import json, re, sys, torch
import model as model_module
from model import ModelConfig
from model import SmolLM2

def resident(key):
    return int(re.search(key + r':\s+(\d+) kB', open('/proc/self/status').read()).group(1)) * 1024

def step(model, x, precision, masked):
    segments = torch.arange(x.shape[1] - 1).div(100, rounding_mode='floor').expand(x.shape[0], -1) if masked else None
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision == 'autocast'):
        loss = model(x[:, :-1], x[:, 1:], segments=segments)[1]
    loss.backward()

out = []
for kwargs, batch, seq, precision, mode, masked in json.loads(sys.argv[1]):
    model_module.MASKED_GQA_DEVICES = () if masked else ('cpu',)
    torch.manual_seed(0)
    model = SmolLM2(ModelConfig(**kwargs, max_position_embeddings=seq)).train()
    if precision == 'bf16 weights':
        model = model.bfloat16()
    model.gradient_checkpointing, model.selective_recompute = mode == 'full', mode == 'selective'
    x = torch.randint(0, kwargs['vocab_size'], (batch, seq + 1))
    step(model, x[:, :17], precision, masked)
    open('/proc/self/clear_refs', 'w').write('5')   # high-water mark := the resident set now
    before = resident('VmRSS')
    step(model, x, precision, masked)
    out.append(resident('VmHWM') - before)
    del model
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def measured() -> dict[tuple[str, str], int]:
    """(shape name, recompute mode) -> the bytes one training step added, measured in one subprocess."""
    keys = [(name, mode) for name in {**SHAPES, **MASKED} for mode in planner.RECOMPUTE]
    runs = [[*{**SHAPES, **MASKED}[name], mode, name in MASKED] for name, mode in keys]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(256 * 1024), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(runs)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return dict(zip(keys, json.loads(proc.stdout.strip().splitlines()[-1])))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("recompute", planner.RECOMPUTE)
def test_activation_estimate_is_within_20_percent_of_the_measured_cpu_peak(measured, shape, recompute):
    kwargs, batch, seq, precision = SHAPES[shape]
    m = ModelConfig(**kwargs, max_position_embeddings=seq)
    compute, residual = DTYPES[precision]
    _, estimate = planner.step_bytes(m, batch * seq, compute, residual, recompute, planner.count_parameters(m))
    got = measured[shape, recompute]
    assert got > 20e6, "too small a step to measure against the process's noise"
    assert abs(estimate - got) <= 0.2 * got, f"estimate {estimate / 1e6:.1f} MB, measured {got / 1e6:.1f} MB"


@pytest.mark.parametrize("recompute", planner.RECOMPUTE)
def test_masked_attention_estimate_counts_repeated_kv_and_the_bias(measured, recompute):
    """run.document_masking's attention keeps k, v repeated to every head and a (B, 1, T, T) bias per layer, about
    15% of this shape's step: the estimate must count them to come within 10%."""
    kwargs, batch, seq, precision = MASKED["masked-fp32"]
    m = ModelConfig(**kwargs, max_position_embeddings=seq)
    _, estimate = planner.step_bytes(m, batch * seq, 4, 4, recompute, planner.count_parameters(m), mask_keys=seq)
    got = measured["masked-fp32", recompute]
    assert abs(estimate - got) <= 0.1 * got, f"estimate {estimate / 1e6:.1f} MB, measured {got / 1e6:.1f} MB"
    cfg = config(**{"run.document_masking": "true"})
    assert planner.memory(cfg, 1, 8, recompute)[1] > planner.memory(config(), 1, 8, recompute)[1]


def test_attention_keeps_no_score_matrix_on_the_cpu():
    """The estimate counts no T x T scores: torch's CPU flash kernel serves the model's causal attention."""
    torch.manual_seed(0)
    m = SmolLM2(ModelConfig(hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                            num_hidden_layers=1, vocab_size=64, max_position_embeddings=1024)).train()
    x = torch.randint(0, 64, (1, 1025))
    with LargestTensor() as rec:
        m(x[:, :-1], x[:, 1:])[1].backward()
    assert rec.numel < 4 * 1024 * 1024 / 8, "a (heads, T, T) score matrix was built"


# ---------------------------------------------------------------- arithmetic


def config(path="config_smollm2_135M.yaml", **overrides):
    return load_config(str(ROOT / path), [f"{k}={v}" for k, v in overrides.items()])


def test_weights_gradients_and_optimizer_follow_the_exact_parameter_count():
    cfg = config()
    with torch.device("meta"):
        model = SmolLM2(cfg.model.model_config)
    n = sum(p.numel() for p in model.parameters())   # the tied matrix once
    matmul = {id(mod.weight): mod.weight.numel() for mod in model.modules() if isinstance(mod, nn.Linear)}
    lines, _ = planner.memory(cfg, nproc=1, micro_batch=1, recompute="none")
    assert lines["weights (fp32)"] == lines["gradients (fp32)"] == 4 * n
    assert lines["AdamW moments (fp32)"] == 8 * n
    assert lines["autocast weight copies"] == 2 * sum(matmul.values())
    assert "DDP gradient buckets" not in lines
    assert "autocast weight copies" not in planner.memory(config(**{"run.precision": "fp32"}), 1, 1, "none", 4)[0]


def test_fsdp_shards_over_the_ranks_and_ddp_replicates():
    ddp, _ = planner.memory(config(), nproc=4, micro_batch=1, recompute="none")
    zero2, peak2 = planner.memory(config(**{"optimizer.zero_stage": 1}), nproc=4, micro_batch=1, recompute="none")
    zero3, peak3 = planner.memory(config(**{"optimizer.zero_stage": 3}), nproc=4, micro_batch=1, recompute="none")
    for key in ("weights (fp32)", "gradients (fp32)", "AdamW moments (fp32)"):
        assert zero2[key] == zero3[key] == ddp[key] // 4
    assert ddp["DDP gradient buckets"] == ddp["gradients (fp32)"]
    assert zero3["FSDP2 gathered weights"] < zero2["FSDP2 gathered weights"] and peak3 < peak2
    # FSDP2's weights are bf16, so the residual stream is too: fewer activation bytes than under DDP's autocast
    assert zero2["activations kept"] < ddp["activations kept"]


def test_largest_micro_batch_fits_the_next_does_not_and_grows_with_memory_and_recompute():
    cfg = config()
    p = planner.count_parameters(cfg.model.model_config)   # once: each count builds the model on the meta device
    by_memory = sorted({g.memory_gib: g for g in GPUS}.values(), key=lambda g: g.memory_gib)   # 16 ... 141 GiB
    largest = {rec: [planner.largest_micro_batch(cfg, 1, g, rec, p=p) for g in by_memory] for rec in planner.RECOMPUTE}
    for recompute, sizes in largest.items():
        assert sizes == sorted(sizes) and sizes[0] >= 1
        for gpu, b in zip(by_memory, sizes):
            assert planner.memory(cfg, 1, b, recompute, p=p)[1] <= planner.usable_bytes(gpu)
            assert planner.memory(cfg, 1, b + 1, recompute, p=p)[1] > planner.usable_bytes(gpu)
    for less, more in zip(planner.RECOMPUTE, planner.RECOMPUTE[1:]):   # each mode keeps less than the one before
        assert all(r > s for r, s in zip(largest[more], largest[less])), f"{more} must make room for more"


def test_time_and_cost_scale_with_gpus_mfu_and_price():
    cfg = config("configs/config_smollm2_1.7B.yaml", **{"optimizer.zero_stage": 1, "tokens.batch_accumulation_per_replica": 8})
    one = planner.plan(cfg, "l4", 1, price_per_gpu_hour=0.8, mfu=0.4)
    four = planner.plan(cfg, "l4", 4, price_per_gpu_hour=0.8, mfu=0.4)
    fast = planner.plan(cfg, "l4", 4, price_per_gpu_hour=0.8, mfu=0.5)
    assert one.tokens_per_step == four.tokens_per_step      # the config's global batch, whatever runs it
    assert one.accumulation == 4 * four.accumulation
    assert four.seconds == pytest.approx(one.seconds / 4) and fast.seconds == pytest.approx(four.seconds * 0.4 / 0.5)
    per_token = flops_per_token(cfg.model.model_config, cfg.tokens.sequence_length)
    assert four.tokens_per_s * per_token == pytest.approx(0.4 * 121e12 * 4)
    assert four.seconds * four.tokens_per_s == pytest.approx(cfg.tokens.train_steps * four.tokens_per_step)
    assert "$" + f"{four.seconds / 3600 * 4 * 0.8:,.0f}" in planner.format_plan(four)


def test_device_names_resolve_to_their_data_sheet_entry():
    names = {"NVIDIA H200": "h200", "NVIDIA H100 PCIe": "h100-pcie", "NVIDIA H100 NVL": "h100-nvl",
             "NVIDIA H100 80GB HBM3": "h100", "NVIDIA A100-SXM4-40GB": "a100-80", "NVIDIA A10G": "a10g",
             "NVIDIA A10": "a10", "NVIDIA L40S": "l40s", "NVIDIA L40": "l40", "NVIDIA L4": "l4",
             "NVIDIA GeForce RTX 4090": "rtx4090", "Tesla T4": "t4", "Tesla V100-SXM2-16GB": "v100"}
    assert {name: gpu_by_name(name).key for name in names} == names   # A100s share one peak: the first entry's
    assert gpu_by_name("Some Future GPU") is None


# ---------------------------------------------------------------- the command


def peak_resident_kb() -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def test_plan_prints_in_seconds_without_data_or_weights(capsys, monkeypatch):
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("--plan must not train"))
    Path("/proc/self/clear_refs").write_text("5")   # the high-water mark starts from here
    start, before = time.perf_counter(), peak_resident_kb()
    rc = train.main(["--config", str(ROOT / "configs/config_smollm2_1.7B.yaml"), "--plan", "--gpu", "l4", "--nproc", "4",
                     "--price_per_gpu_hour", "0.8"])
    out = capsys.readouterr().out
    assert rc == 0 and time.perf_counter() - start < 30
    assert peak_resident_kb() - before < 200_000, "1.7B weights would be 6.8 GB; --plan must allocate none"
    assert "4 x l4" in out and "peak" in out and "largest micro-batch that fits" in out and "$" in out


def test_plan_of_an_unknown_gpu_is_a_one_line_error(capsys):
    assert train.main(["--config", str(ROOT / "config_tiny.yaml"), "--plan", "--gpu", "b200x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --gpu b200x: unknown GPU; one of h200,") and err.count("\n") == 1


# ---------------------------------------------------------------- run.recompute auto


def test_auto_recompute_is_none_where_it_fits_selective_then_full(capsys):
    """135M at micro-batch 8 on an A10G fits without recompute; larger micro-batches need selective, then full;
    what a user sets is kept, and parallelism.recompute_layer means full."""
    chosen = {b: planner.plan(config(**{"tokens.micro_batch_size": b}), "a10g").recompute for b in (8, 12, 32)}
    assert chosen == {8: "none", 12: "selective", 32: "full"}
    assert planner.plan(config(**{"run.recompute": "selective"}), "a10g").recompute == "selective"
    assert planner.plan(config(**{"parallelism.recompute_layer": True}), "a10g").recompute == "full"
    assert train.main(["--config", str(ROOT / "config_smollm2_135M.yaml"), "--plan", "--gpu", "a10g"]) == 0
    assert "recompute: none (auto, fits: " in capsys.readouterr().out


def test_auto_recompute_reads_the_device_memory_at_the_boundary(monkeypatch):
    """On a GPU the choice follows what the device has free (plus what this process holds), not the table: one
    byte less than the no-recompute peak needs turns it to selective. Off a GPU: selective, and it says why."""
    cfg = config()
    peak = planner.memory(cfg, 1, cfg.tokens.micro_batch_size, "none")[1]
    held = 3 * 2 ** 30
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: held)
    for free, mode in ((int(peak / planner.HEADROOM) + 2 - held, "none"), (int(peak / planner.HEADROOM) - held - 2, "selective")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 80 * 2 ** 30))
        assert planner.recompute_for_run(cfg, 1, "bf16", torch.device("cuda"))[0] == mode
    assert planner.recompute_for_run(cfg, 1, "bf16", torch.device("cpu")) == (
        "selective", "auto, no device memory figure off a GPU")


def test_a10g_and_l4_plan_with_the_memory_they_report_not_24_gib():
    """A micro-batch whose peak fits 24 GiB but not the 23,028 MiB an A10G reports is refused."""
    cfg = config(**{"run.recompute": "full"})
    on_24, p = int((24 - planner.RESERVED_GIB) * planner.HEADROOM * planner.GiB), planner.count_parameters(cfg.model.model_config)
    peak = lambda b: planner.memory(cfg, 1, b, "full", p=p)[1]
    b = next(b for b in range(1, 200) if peak(b) > planner.usable_bytes(planner.find_gpu("a10g")))
    assert peak(b) <= on_24, "no micro-batch lies between the two figures"
    for gpu in ("a10g", "l4"):
        assert not planner.plan(config(**{"run.recompute": "full", "tokens.micro_batch_size": b}), gpu).fits


def test_the_old_selective_recompute_key_is_refused_with_the_new_one():
    with pytest.raises(ConfigError, match=r"run.selective_recompute: this key moved to run.recompute"):
        config(**{"run.selective_recompute": False})
    with pytest.raises(ConfigError, match="run.recompute"):
        config(**{"run.recompute": "some"})


def test_the_gpu_check_runs_on_the_cpu_and_our_loss_equals_transformers():
    """bench/bench_gpu.py --dry --only loss: the script cannot rot unseen, and its loss row holds (fp32, same T
    predictions: equal to float precision)."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--dry", "--only", "loss"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("loss "))
    assert float(re.search(r"fp32: .*?\|diff\| ([0-9.e+-]+)", row).group(1)) < 1e-5, row


@pytest.mark.parametrize("precision,compute", [("bf16", 2), ("fp32", 4)])
def test_samples_kv_cache_estimate_is_what_generate_allocates_under_the_runs_autocast(precision, compute):
    from smollm2.sampling import SamplingParams, generate
    cfg = load_config("config_tiny.yaml")
    model = SmolLM2(cfg.model.model_config).eval()
    prompts = [[1] * len(p.encode()) for p in cfg.sampling.prompts]   # the most tokens a prompt can make
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        generate(model, prompts, SamplingParams(max_new_tokens=cfg.sampling.max_new_tokens, temperature=0))
    held = sum(t.numel() * t.element_size() for layer in model.model.layers
               for t in (layer.self_attn.kv_cache.k, layer.self_attn.kv_cache.v))
    assert held == planner.samples_kv_bytes(cfg, compute)
