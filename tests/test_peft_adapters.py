"""PEFT's QA-LoRA adapters (``LoraConfig(use_qalora=True)``) loaded onto the same GPTQ base
imported by qalora, reproducing PEFT's forward and merging exactly.

The adapters are produced by PEFT's own code on CPU: PEFT's GPTQ QA-LoRA layer
(``GPTQLoraLinear`` with ``QALoraLinearVariant``) is registered for qalora's QuantLinear,
which is the GPTQ checkpoint's layer as qalora imports it, and PEFT's ``save_pretrained``
writes the directory. PEFT's dispatch for GPTQ layers reads a ``qweight`` attribute for the
device; the test sets it as PEFT's own GPTQ dispatch does.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import qalora
import torch
from qalora.formats import gptq_checkpoint as fmt_gptq
from qalora.formats import peft_adapter
from test_gptq_format import write_hand_checkpoint

peft = pytest.importorskip("peft")
from peft.tuners.lora.gptq import GPTQLoraLinear  # noqa: E402

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gptq") / "in"
    write_hand_checkpoint(d)
    return d


def _ids(seed=0, shape=(2, 16)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def peft_qalora(base, directory, *, pool=32, r=4, alpha=8.0, steps=3, **extra):
    """PEFT's QA-LoRA on ``base`` (a qalora-imported GPTQ model), trained a few AdamW steps by
    PEFT's own forward/backward, saved with PEFT's save_pretrained. Returns the PEFT model."""
    model = copy.deepcopy(base)
    for m in model.modules():
        if isinstance(m, qalora.QuantLinear):
            m.qweight = m.packed  # the attribute PEFT's GPTQ dispatch reads for the device
    cfg = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=TARGETS,
        use_qalora=True,
        qalora_group_size=pool,
        lora_dropout=0.0,
        **extra,
    )
    cfg._register_custom_module({qalora.QuantLinear: GPTQLoraLinear})
    with warnings.catch_warnings():  # PEFT warns of any layer type it does not know by name
        warnings.filterwarnings("ignore", "Unsupported layer type", UserWarning)
        pm = peft.get_peft_model(model, cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # PEFT zero-initialises B: give it values so every layer matters
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        ids = _ids(step + 10, (4, 16))
        loss = pm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()
    pm.save_pretrained(directory)
    return pm


@pytest.mark.parametrize("pool", [32, 64])
def test_peft_qalora_adapter_reproduces_peft_and_merges_exactly(gptq_dir, tmp_path, pool):
    base = fmt_gptq.load_gptq_model(gptq_dir)
    pm = peft_qalora(base, tmp_path / "adapter", pool=pool)
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["use_qalora"] is True
    ids = _ids(1)
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-2  # the adapter changes the output

    model = qalora.load_adapter(fmt_gptq.load_gptq_model(gptq_dir), tmp_path / "adapter")
    layers = dict(qalora.targets.quantized_layers(model, qalora.QALoRALinear))
    assert len(layers) == 2 * len(TARGETS)  # two decoder blocks
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # Merged exactly: with float32 offsets the merged model is the adapted one up to float
    # rounding; with the default (the file's float16 scales, offsets as imported) the storage
    # rounding of the offsets, which merge_rounding reports.
    merged = qalora.merge(copy.deepcopy(model), offset_dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    assert not list(qalora.targets.quantized_layers(merged, qalora.QALoRALinear))
    # And out again as a GPTQ checkpoint (rounded zero points, reported).
    report = fmt_gptq.export_gptq(merged, tmp_path / "out", force=True)
    assert report.layers


def test_rslora_and_alpha_pattern(gptq_dir, tmp_path):
    base = fmt_gptq.load_gptq_model(gptq_dir)
    pm = peft_qalora(base, tmp_path / "a", use_rslora=True, alpha_pattern={"down_proj": 2.0})
    model = qalora.load_adapter(fmt_gptq.load_gptq_model(gptq_dir), tmp_path / "a")
    down = model.model.layers[0].mlp.down_proj
    q = model.model.layers[0].self_attn.q_proj
    assert down.scaling == pytest.approx(2.0 / 2.0) and q.scaling == pytest.approx(8.0 / 2.0)  # alpha / sqrt(4)
    ids = _ids(2)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_onto_a_model_already_wrapped(gptq_dir, tmp_path):
    base = fmt_gptq.load_gptq_model(gptq_dir)
    pm = peft_qalora(base, tmp_path / "a", steps=1)
    model = qalora.wrap(fmt_gptq.load_gptq_model(gptq_dir), qalora.QALoRAConfig(rank=4, target_modules=TARGETS))
    qalora.load_adapter(model, tmp_path / "a")
    ids = _ids(3)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    # A wrapped model of another rank, or adapting more layers, is refused and left as it was.
    other = qalora.wrap(fmt_gptq.load_gptq_model(gptq_dir), qalora.QALoRAConfig(rank=2, target_modules=TARGETS))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(qalora.AdapterMismatchError, match="rank 4"):
        qalora.load_adapter(other, tmp_path / "a")
    wider = qalora.wrap(fmt_gptq.load_gptq_model(gptq_dir), qalora.QALoRAConfig(rank=4))
    with pytest.raises(qalora.AdapterMismatchError, match="does not hold"):
        qalora.load_adapter(wider, tmp_path / "a")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_pooling_group_finer_than_the_quantization_group_is_refused(gptq_dir, tmp_path):
    base = fmt_gptq.load_gptq_model(gptq_dir)
    peft_qalora(base, tmp_path / "a", pool=16, steps=1)
    model = fmt_gptq.load_gptq_model(gptq_dir)
    with pytest.raises(qalora.AdapterMismatchError, match=r"groups of 16 .* groups of 32: .* multiple"):
        qalora.load_adapter(model, tmp_path / "a")
    assert not list(qalora.targets.quantized_layers(model, qalora.QALoRALinear))  # unchanged


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"use_qalora": False}, "plain PEFT LoRA adapter"),
        ({"use_dora": True}, "use_dora"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias"),
        ({"peft_type": "IA3"}, "peft_type"),
        ({"r": 0}, "'r' = 0"),
        ({"r": 8}, "rank 4, adapter_config.json says 8"),
        ({"qalora_group_size": "32"}, "qalora_group_size"),
    ],
)
def test_refusals(gptq_dir, tmp_path, changes, match):
    base = fmt_gptq.load_gptq_model(gptq_dir)
    peft_qalora(base, tmp_path / "a", steps=0)
    _edit_config(tmp_path / "a", **changes)
    with pytest.raises((qalora.AdapterMismatchError, qalora.CheckpointError), match=match):
        qalora.load_adapter(fmt_gptq.load_gptq_model(gptq_dir), tmp_path / "a")


def test_a_layer_the_model_holds_dense_is_refused(gptq_dir, tmp_path):
    base = fmt_gptq.load_gptq_model(gptq_dir)
    peft_qalora(base, tmp_path / "a", steps=0)
    from tiny_models import tiny_llama

    with pytest.raises(qalora.AdapterMismatchError, match="holds it as Linear"):
        qalora.load_adapter(tiny_llama(), tmp_path / "a")


def test_convert_layer_against_float64_reference():
    """A_q from A_p (odd rank, pooling 3x the group) against PEFT's pooled formula in float64."""
    g, t, k, r = 8, 3, 48, 5
    pool = g * t
    gen = torch.Generator().manual_seed(0)
    a_p = torch.randn(r, k // pool, generator=gen)
    b_p = torch.randn(7, r, generator=gen)
    x = torch.randn(6, k, generator=gen, dtype=torch.float64)
    peft_out = (x.view(6, k // pool, pool).mean(2) * (k / pool)) @ a_p.double().T @ b_p.double().T
    a_q = peft_adapter.convert_layer(a_p, b_p, k, g, pool, "test")
    ours = x.view(6, k // g, g).mean(2) @ a_q.double().T @ b_p.double().T
    torch.testing.assert_close(ours, peft_out, rtol=1e-6, atol=1e-6)
