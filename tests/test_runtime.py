"""Precision choice: automatic by device, overridable, and a clear error for bf16 on a GPU without it."""

import pytest
import torch

from smollm2.errors import ConfigError
from smollm2.runtime import Runtime, resolve_precision


def test_auto_precision_is_fp32_on_cpu_and_the_config_dtype_on_a_gpu(monkeypatch):
    assert resolve_precision("auto", "bfloat16", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "bfloat16", torch.device("cuda")) == "bf16"
    assert resolve_precision("auto", "float32", torch.device("cuda")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)   # e.g. a T4 or V100
    assert resolve_precision("auto", "bfloat16", torch.device("cuda")) == "fp16"
    with pytest.raises(ConfigError, match="run.precision: this GPU has no bf16 support"):
        resolve_precision("bf16", "bfloat16", torch.device("cuda"))


def test_an_explicit_precision_is_honoured_on_cpu_and_autocast_follows_it():
    assert resolve_precision("bf16", "float32", torch.device("cpu")) == "bf16"
    x = torch.randn(4, 4)
    with Runtime(torch.device("cpu"), "bf16").autocast():
        assert (x @ x).dtype == torch.bfloat16
    with Runtime(torch.device("cpu"), "fp32").autocast():
        assert (x @ x).dtype == torch.float32
