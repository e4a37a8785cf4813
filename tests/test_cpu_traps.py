"""CPU traps: bf16 autocast training on a CPU without native bf16 arithmetic, and the
bf16-activation route on a CPU without AVX-512, take the fast route with a warning unless
forced.

``qalora.cpu_features.native_bf16`` / ``wide_kernels`` are patched both ways, so every branch
runs on any CPU."""

from __future__ import annotations

import warnings

import pytest
import qalora
import torch
from qalora import QALoRAConfig, cpu_features, train
from tiny_models import tiny_llama


def _wrapped():
    return qalora.wrap(tiny_llama(seed=3), QALoRAConfig(group_size=32, rank=4), show_progress=False)


def _blocks():
    return torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(cpu_features, "native_bf16", lambda: False)


@pytest.fixture
def no_wide_kernels(monkeypatch):
    monkeypatch.setattr(cpu_features, "wide_kernels", lambda: False)


@pytest.fixture
def wide_kernels(monkeypatch):
    monkeypatch.setattr(cpu_features, "wide_kernels", lambda: True)


def _autocast_dtypes(model, monkeypatch) -> list:
    """Records the autocast state of every training forward pass."""
    seen = []
    forward = model.forward

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    return seen


def test_bf16_training_falls_back_to_float32_without_native_bf16(no_native_bf16, monkeypatch):
    model = _wrapped()
    seen = _autocast_dtypes(model, monkeypatch)
    with pytest.warns(qalora.QALoRAWarning, match=r"no native bfloat16 .* training in float32 instead"):
        result = train.finetune(model, _blocks(), 2, batch_size=2, show_progress=False, bf16=True)
    assert result.bf16 is False and seen == [False, False]


def test_bf16_training_forced_or_native_runs_autocast(no_native_bf16, monkeypatch):
    model = _wrapped()
    seen = _autocast_dtypes(model, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", qalora.QALoRAWarning)
        result = train.finetune(model, _blocks(), 1, batch_size=2, show_progress=False, bf16=True, force_bf16=True)
    assert result.bf16 is True and seen == [True]
    monkeypatch.setattr(cpu_features, "native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", qalora.QALoRAWarning)
        assert train.finetune(model, _blocks(), 1, batch_size=2, show_progress=False, bf16=True).bf16 is True


def test_float32_training_never_warns(no_native_bf16):
    with warnings.catch_warnings():
        warnings.simplefilter("error", qalora.QALoRAWarning)
        assert train.finetune(_wrapped(), _blocks(), 1, batch_size=2, show_progress=False).bf16 is False


def _modes(model) -> set[str]:
    return {m.activations for m in model.modules() if isinstance(m, qalora.QuantLinear)}


def test_bf16_activations_route_to_int8_without_avx512(no_wide_kernels):
    model = qalora.merge(_wrapped())
    x = torch.randint(0, 96, (1, 5))
    with pytest.warns(qalora.QALoRAWarning, match=r'activations="bf16": this CPU lacks AVX-512 .* get "int8"'):
        n = qalora.set_activations(model, "bf16")
    assert n > 0 and _modes(model) == {"int8"}
    int8_logits = model(input_ids=x).logits
    qalora.set_activations(model, "int8")
    assert torch.equal(model(input_ids=x).logits, int8_logits)  # the very same route
    with warnings.catch_warnings():
        warnings.simplefilter("error", qalora.QALoRAWarning)
        qalora.set_activations(model, "bf16", force=True)
    assert _modes(model) == {"bf16"}
    with pytest.warns(qalora.QALoRAWarning):
        qalora.prepare_for_generation(model, activations="bf16")
    assert _modes(model) == {"int8"}


def test_bf16_activations_kept_with_avx512(wide_kernels, no_native_bf16):
    model = qalora.merge(_wrapped())
    with warnings.catch_warnings():
        warnings.simplefilter("error", qalora.QALoRAWarning)
        qalora.set_activations(model, "bf16")
        qalora.set_activations(model, "exact")  # other modes never ask
    assert _modes(model) == {"exact"}
    qalora.set_activations(model, "bf16")
    assert _modes(model) == {"bf16"}


def test_cpu_probes_match_cpu_flags():
    """The probes agree with the CPU's flags on Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        flags = None
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags here")
    assert cpu_features.native_bf16() == ("avx512_bf16" in flags or "amx_tile" in flags)
    assert cpu_features.wide_kernels() == {"avx512f", "avx512vl", "avx512_vnni"}.issubset(flags)


def test_cli_passes_force_bf16():
    """``--bf16 --force-bf16`` reach the training loop (finetune and demo share the options)."""
    from qalora import cli

    for command in (["demo"], ["finetune", "--out", "unused"]):
        args = cli.build_parser().parse_args([*command, "--bf16", "--force-bf16"])
        assert args.bf16 and args.force_bf16
        assert not cli.build_parser().parse_args(command).force_bf16
