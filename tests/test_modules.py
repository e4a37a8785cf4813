"""qalora.wrap / merge / save / load on a plain MLP and tiny Hugging Face models built offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import qalora
import torch
from qalora import QALoRAConfig
from tiny_models import tiny_llama
from torch import nn

transformers = pytest.importorskip("transformers")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 96), nn.GELU(), nn.Linear(96, 8))


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def train(model, batches, steps, lr=1e-2, loss_fn=None):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = loss_fn(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def lm_batches(seed=1, n=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (4, 24), generator=g) for _ in range(n)]


# --------------------------------------------------------------------------- plain MLP


def regression_data(seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 64, generator=g)
    target = torch.tanh(x[:, :8] * 2.0) + 0.5 * x[:, 8:16]
    return [(x[i : i + 64], target[i : i + 64]) for i in range(0, 256, 64)]


def mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("bits", [4, 5, 6])
@pytest.mark.parametrize("scale_dtype,tol", [("float32", 1e-5), ("float16", 2e-3)])
def test_mlp_trains_and_merges_exactly(scale_dtype, tol, bits):
    model = qalora.wrap(mlp(), QALoRAConfig(bits=bits, group_size=16, rank=4, alpha=8, scale_dtype=scale_dtype))
    assert all(m.base_layer.bits == bits for m in model.modules() if isinstance(m, qalora.QALoRALinear))
    assert not any(isinstance(m, nn.Linear) and not n.endswith(("lora_A", "lora_B")) for n, m in model.named_modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n or n.endswith(".delta_offsets") for n in trainable)
    data = regression_data()
    losses = train(model, data, 80, lr=2e-2, loss_fn=mse)
    assert sum(losses[-4:]) < 0.85 * sum(losses[:4])
    x = torch.randn(32, 64)
    model.eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, qalora.QALoRALinear)}
    with torch.no_grad():
        inputs = {n: torch.randn(17, m.in_features) for n, m in layers.items()}
        per_layer = {n: layers[n](inputs[n]) for n in layers}
        before = model(x)
    qalora.merge(model)
    assert not any(isinstance(m, qalora.QALoRALinear) for m in model.modules())
    assert sum(isinstance(m, qalora.QuantLinear) for m in model.modules()) == 3
    with torch.no_grad():
        for n, y in per_layer.items():
            assert rel_err(model.get_submodule(n)(inputs[n]), y) <= tol
        assert rel_err(model(x), before) <= tol


def test_merge_updates_offsets_only():
    model = qalora.wrap(mlp(), QALoRAConfig(group_size=32, rank=2))
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    packed, scales = layer.base_layer.packed.clone(), layer.base_layer.scales.clone()
    qalora.merge(model)
    assert torch.equal(model[0].packed, packed) and torch.equal(model[0].scales, scales)
    assert model[0].offsets.dtype == torch.float16


def test_merge_into_float32_offsets_keeps_small_updates(tmp_path):
    model = qalora.wrap(mlp(), QALoRAConfig(group_size=32, rank=2))  # float16 scales and offsets
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, qalora.QALoRALinear):
                m.lora_B.weight.normal_(std=1e-4)  # an update far below float16's resolution
    x = torch.randn(8, 64)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(qalora.DTypeError, match="offset_dtype"):
        qalora.merge(model, offset_dtype=torch.int8)
    qalora.merge(model, offset_dtype=torch.float32)
    assert model[0].offsets.dtype == torch.float32 and model[0].scales.dtype == torch.float16
    with torch.no_grad():
        assert rel_err(model(x), before) < 1e-5
    qalora.save_pretrained(model, tmp_path)
    fresh = qalora.from_pretrained(tmp_path, mlp(seed=5))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_qalora_requantize_reproduces_codes():
    """A QA-LoRA update is constant in each group, so RTN re-quantization keeps the codes."""
    model = qalora.wrap(mlp(), QALoRAConfig(bits=4, group_size=16, rank=4, scale_dtype="float32"))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, qalora.QALoRALinear):
                m.lora_B.weight.normal_(std=0.01)
    merged = qalora.merge(__import__("copy").deepcopy(model))
    requant = qalora.merge_requantize(model)
    for a, b in zip(
        [m for m in merged.modules() if isinstance(m, qalora.QuantLinear)],
        [m for m in requant.modules() if isinstance(m, qalora.QuantLinear)],
    ):
        agree = (
            (qalora.ops.unpack(a.packed, 4, a.in_features) == qalora.ops.unpack(b.packed, 4, b.in_features))
            .float()
            .mean()
        )
        assert agree > 0.999  # float32 rounding of min/max can flip a rare tie
        torch.testing.assert_close(a.dequantize(), b.dequantize(), rtol=1e-4, atol=1e-5)


def test_qalora_merge_beats_dense_lora_requantize():
    """Train both adapter kinds on the same data and base; QA-LoRA's exact merge error is
    at least 10x below what merging a dense LoRA and re-quantizing costs."""
    errors = {}
    x_eval = torch.randn(128, 64, generator=torch.Generator().manual_seed(9))
    for kind in ("qalora", "lora"):
        model = qalora.wrap(mlp(), QALoRAConfig(bits=4, group_size=32, rank=8, alpha=16, adapter=kind))
        train(model, regression_data(), 80, lr=5e-3, loss_fn=mse)
        model.eval()
        with torch.no_grad():
            before = model(x_eval)
            if kind == "qalora":
                qalora.merge(model)
            else:
                with pytest.raises(qalora.MergeError, match="merge_requantize"):
                    qalora.merge(model)
                qalora.merge_requantize(model)
            errors[kind] = rel_err(model(x_eval), before)
    print(f"merge error: qalora {errors['qalora']:.3e}, dense LoRA + requantize {errors['lora']:.3e}")
    assert errors["lora"] > 0
    assert errors["qalora"] * 10 <= errors["lora"]


# --------------------------------------------------------------------------- Hugging Face


def test_llama_wrap_train_merge_save_load_generate(tmp_path):
    model = tiny_llama()
    dense_bytes = qalora.memory_bytes(model)
    qalora.wrap(model, QALoRAConfig(bits=4, group_size=32, rank=4, alpha=8))
    s = qalora.summary(model)
    assert s.quantized_layers == 14 and s.adapter_layers == 14
    assert s.memory_bytes < dense_bytes and s.memory_bytes_before_wrap == dense_bytes
    assert isinstance(model.lm_head, nn.Linear)  # the output head stays dense by default
    batches = lm_batches()
    losses = train(model, batches, 20, lr=1e-2, loss_fn=lm_loss)
    assert losses[-1] < losses[0]
    model.eval()
    ids = batches[0]
    with torch.no_grad():
        logits_unmerged = model(input_ids=ids).logits
    qalora.merge(model)
    with torch.no_grad():
        logits_merged = model(input_ids=ids).logits
    assert rel_err(logits_merged, logits_unmerged) < 2e-3
    qalora.save_pretrained(model, tmp_path / "merged")
    assert sorted(os.listdir(tmp_path / "merged")) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "qalora_config.json",
    ]
    fresh = qalora.from_pretrained(tmp_path / "merged", tiny_llama(seed=123))
    fresh.eval()
    alone = qalora.from_pretrained(tmp_path / "merged")  # the architecture comes from config.json
    assert not alone.training
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, logits_merged)
        assert torch.equal(alone(input_ids=ids).logits, logits_merged)
    out = fresh.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11)


def test_set_activations_int8_for_generation():
    model = tiny_llama()
    qalora.wrap(model, QALoRAConfig(bits=4, group_size=32, rank=4, alpha=8))
    train(model, lm_batches(), 5, lr=1e-2, loss_fn=lm_loss)
    qalora.merge(model)
    model.eval()
    ids = lm_batches(seed=5)[0][:1, :12]  # 12 tokens: the small-batch path
    with torch.no_grad():
        exact = model(input_ids=ids).logits
        assert qalora.set_activations(model, "int8") == 14
        assert all(m.activations == "int8" for m in model.modules() if isinstance(m, qalora.QuantLinear))
        approx = model(input_ids=ids).logits
        out = model.generate(ids[:, :5], max_new_tokens=4, do_sample=False)
    assert 0 < rel_err(approx, exact) < 3e-2
    assert out.shape == (1, 9)
    qalora.set_activations(model, "exact")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, exact)
    with pytest.raises(qalora.InvalidValueError, match="'exact', 'int8'"):
        qalora.set_activations(model, "int4")
    with pytest.raises(qalora.ConfigError, match="no qalora layer"):
        qalora.set_activations(mlp(), "int8")


def test_llama_unmerged_save_load_round_trip(tmp_path):
    model = qalora.wrap(tiny_llama(tie=True), QALoRAConfig(bits=3, group_size=32, rank=2))
    train(model, lm_batches(), 3, loss_fn=lm_loss)
    model.eval()
    ids = lm_batches(seed=5)[0]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    qalora.save_pretrained(model, tmp_path)
    fresh = qalora.from_pretrained(tmp_path, tiny_llama(seed=7, tie=True)).eval()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, want)
    # The reloaded adapters train.
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


def test_gpt2_conv1d_wrap_train_merge(tmp_path):
    model = tiny_gpt2()
    ids = lm_batches()[0]
    model.eval()
    with torch.no_grad():
        dense_logits = model(input_ids=ids).logits
    qalora.wrap(model, QALoRAConfig(bits=8, group_size=32, rank=4))
    assert isinstance(model.transformer.h[0].attn.c_attn, qalora.QALoRALinear)
    assert model.transformer.h[0].attn.c_attn.out_features == 192
    with torch.no_grad():
        # 8-bit quantization of every Conv1D barely moves the logits.
        assert rel_err(model(input_ids=ids).logits, dense_logits) < 2e-2
    model.train()
    losses = train(model, lm_batches(), 15, lr=1e-2, loss_fn=lm_loss)
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        qalora.merge(model)
        assert rel_err(model(input_ids=ids).logits, before) < 2e-3
    qalora.save_pretrained(model, tmp_path)
    fresh = qalora.from_pretrained(tmp_path, tiny_gpt2(seed=4)).eval()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_adapter_save_load_and_mismatches(tmp_path):
    config = QALoRAConfig(bits=4, group_size=32, rank=4)
    model = qalora.wrap(tiny_llama(), config)
    train(model, lm_batches(), 5, loss_fn=lm_loss)
    model.eval()
    qalora.save_adapter(model, tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    ids = lm_batches(seed=2)[0]
    other = qalora.wrap(tiny_llama(), config).eval()
    qalora.load_adapter(other, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids).logits, model(input_ids=ids).logits)
    for bad in (
        QALoRAConfig(bits=4, group_size=32, rank=8),
        QALoRAConfig(bits=4, group_size=16, rank=4),
        QALoRAConfig(bits=8, group_size=32, rank=4),
    ):
        with pytest.raises(qalora.AdapterMismatchError, match="the adapter file has"):
            qalora.load_adapter(qalora.wrap(tiny_llama(), bad), tmp_path / "adapter")
    with pytest.raises(qalora.AdapterMismatchError, match="in the file but not the model"):
        qalora.load_adapter(
            qalora.wrap(tiny_llama(), QALoRAConfig(target_modules=["q_proj"], rank=4)), tmp_path / "adapter"
        )
    with pytest.raises(qalora.CheckpointError, match="does not exist"):
        qalora.load_adapter(other, tmp_path / "nowhere")
    with pytest.raises(qalora.ConfigError, match="not been wrapped"):
        qalora.load_adapter(tiny_llama(), tmp_path / "adapter")


def test_from_pretrained_refuses_other_architecture(tmp_path):
    model = qalora.wrap(tiny_llama(), QALoRAConfig(rank=2))
    qalora.save_pretrained(model, tmp_path)
    with pytest.raises(qalora.AdapterMismatchError):
        qalora.from_pretrained(tmp_path, tiny_gpt2())
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(qalora.CheckpointError, match="incomplete"):
        qalora.from_pretrained(tmp_path, tiny_llama())


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    model = qalora.wrap(mlp(), QALoRAConfig(group_size=32, rank=2))
    qalora.save_pretrained(model, tmp_path)
    qalora.save_pretrained(model, tmp_path)  # overwriting works
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "qalora_config.json"]
    meta = json.loads((tmp_path / "qalora_config.json").read_text())
    assert meta["format"] == "qalora" and meta["config"]["group_size"] == 32
    assert set(meta["layers"]) == {"0", "2", "4"}


def test_gradient_checkpointing_and_trainer(tmp_path):
    model = qalora.wrap(tiny_llama(), QALoRAConfig(rank=4))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = lm_batches()[0]
    lm_loss(model, ids).backward()
    # lora_B starts at zero, so at step 0 only lora_B receives a non-zero gradient.
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    model.zero_grad()

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            row = lm_batches(seed=i, n=1)[0][0]
            return {"input_ids": row, "labels": row}

    before = model.model.layers[0].self_attn.q_proj.lora_B.weight.detach().clone()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens())
    trainer.train()
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.lora_B.weight, before)


def test_autocast_bf16_on_cpu():
    model = qalora.wrap(mlp(), QALoRAConfig(group_size=32, rank=4))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, qalora.QALoRALinear):
                m.lora_B.weight.normal_(std=0.05)
    x = torch.randn(16, 64)
    with torch.no_grad():
        ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        assert y.dtype == torch.bfloat16
        y.float().pow(2).mean().backward()
    assert rel_err(y.float(), ref) < 3e-2
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


# --------------------------------------------------------------------------- bad input


def test_config_validation_and_json_round_trip(tmp_path):
    c = QALoRAConfig(
        bits=3, group_size=64, rank=8, alpha=32, target_modules=["q_proj", "v_proj"], scale_dtype="float32"
    )
    assert QALoRAConfig.from_json(c.to_json()) == c
    c.save(tmp_path / "c.json")
    assert QALoRAConfig.load(tmp_path / "c.json") == c
    assert c.scaling == 4.0
    bad = [
        dict(bits=7),
        dict(bits=True),
        dict(bits=5, group_size=4),
        dict(bits=6, group_size=6),
        dict(group_size=0),
        dict(bits=3, group_size=12),
        dict(rank=0),
        dict(dropout=1.0),
        dict(target_modules="("),
        dict(target_modules=[1]),
        dict(scale_dtype="int8"),
        dict(on_indivisible="ignore"),
        dict(adapter="dora"),
        dict(version=99),
    ]
    for kwargs in bad:
        with pytest.raises(qalora.ConfigError) as info:
            QALoRAConfig(**kwargs)
        assert next(iter(kwargs)) in str(info.value)
    with pytest.raises(qalora.ConfigError, match="unknown QALoRAConfig fields"):
        QALoRAConfig.from_dict({"bits": 4, "colour": "red"})
    with pytest.raises(qalora.ConfigError, match="not valid JSON"):
        QALoRAConfig.from_json("{bits")


def test_no_match_lists_modules():
    with pytest.raises(qalora.NoTargetModulesError) as info:
        qalora.wrap(tiny_llama(), QALoRAConfig(target_modules=["query_key_value"]))
    assert "model.layers.0.self_attn.q_proj" in str(info.value)
    model = qalora.wrap(tiny_llama(), QALoRAConfig(target_modules=r".*\.mlp\.(up|down)_proj"))
    assert qalora.summary(model).adapter_layers == 4
    model = qalora.wrap(tiny_llama(), QALoRAConfig(exclude_modules=["o_proj", "mlp"]))
    assert qalora.summary(model).adapter_layers == 6


def test_indivisible_layer_raises_or_is_skipped():
    model = nn.Sequential(nn.Linear(576, 96), nn.ReLU(), nn.Linear(96, 64))
    with pytest.raises(
        qalora.GroupSizeError, match=r"layer '0': group_size: got 128, it must divide in_features K = 576"
    ):
        qalora.wrap(model, QALoRAConfig(group_size=128))
    assert isinstance(model[0], nn.Linear)  # a refused wrap changes nothing
    with pytest.warns(qalora.QALoRAWarning, match="left unquantized"):
        qalora.wrap(model, QALoRAConfig(group_size=64, on_indivisible="skip"))
    assert isinstance(model[0], qalora.QALoRALinear) and isinstance(model[2], nn.Linear)
    assert not model[2].weight.requires_grad
    with pytest.raises(qalora.ConfigError, match="already wrapped"):
        qalora.wrap(model)
    with pytest.raises(qalora.ConfigError, match="expected a QALoRAConfig"):
        qalora.wrap(mlp(), {"bits": 4})


# --------------------------------------------------------------------------- devices


@cuda
def test_to_cuda_moves_buffers_and_trains():
    model = qalora.wrap(tiny_llama(), QALoRAConfig(rank=4)).cuda()
    assert all(b.is_cuda for b in model.buffers())
    ids = lm_batches()[0].cuda()
    losses = train(model, [ids], 5, loss_fn=lm_loss)
    assert losses[-1] < losses[0]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert model(input_ids=ids).logits.isfinite().all()
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        qalora.merge(model)
        assert rel_err(model(input_ids=ids).logits, before) < 2e-3


# --------------------------------------------------------------------------- end to end in new processes

SCRIPT_TRAIN = """
import torch, qalora, transformers
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
cfg.save_pretrained({out!r})
model = qalora.wrap(transformers.LlamaForCausalLM(cfg), qalora.QALoRAConfig(bits=4, group_size=32, rank=8))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
ids = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
for step in range(20):
    loss = model(input_ids=ids, labels=ids).loss
    opt.zero_grad(); loss.backward(); opt.step()
print("final loss", loss.item())
qalora.merge(model)
qalora.save_pretrained(model, {out!r})
from safetensors.torch import save_file
save_file({{"logits": model.eval()(input_ids=ids[:1]).logits.detach()}}, {out!r} + "/expected.safetensors")
"""

SCRIPT_LOAD = """
import torch, qalora, transformers
cfg = transformers.LlamaConfig.from_pretrained({out!r})
model = qalora.from_pretrained({out!r}, transformers.LlamaForCausalLM(cfg)).eval()
ids = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
from safetensors.torch import load_file
assert torch.equal(model(input_ids=ids[:1]).logits, load_file({out!r} + "/expected.safetensors")["logits"])
print(model.generate(ids[:1, :4], max_new_tokens=8, do_sample=False).tolist())
"""


def test_train_merge_save_reload_in_new_process(tmp_path):
    out = str(tmp_path)
    env = dict(os.environ, QALORA_NO_PROGRESS="1")
    for script in (SCRIPT_TRAIN, SCRIPT_LOAD):
        r = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script.format(out=out))], capture_output=True, text=True, env=env
        )
        assert r.returncode == 0, r.stderr[-3000:]
    assert len(json.loads(r.stdout.strip().splitlines()[-1])[0]) == 12
