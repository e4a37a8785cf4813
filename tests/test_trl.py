"""A wrapped model trains under TRL's ``SFTTrainer`` and Hugging Face's ``Trainer`` as it is
(no PEFT), with gradient checkpointing, and then merges, saves and exports like any other.

What TRL 1.x asks of the model, and what these tests hold qalora to:

* ``SFTTrainer`` turns gradient checkpointing on through ``Trainer`` (transformers 5 makes it
  non-reentrant and hooks the input embeddings so their output requires grad): checkpointed
  training must give the adapters plain training gives, dropout included (the fused layer
  draws its dropout mask from torch's generator, which checkpointing replays).
* Its loss is a fused LM head that multiplies the hidden states by ``lm_head.weight``
  itself. qalora leaves the head dense by default; a quantized or adapted head has no dense
  ``weight``, and reading one raises :class:`qalora.NoDenseWeightError` naming the reason.
* ``SFTConfig`` defaults to ``bf16=True``: the forward runs under bf16 autocast, where the
  adapters still train in float32 (on a CPU without native bf16 that is slow; pass
  ``bf16=False`` there, as these tests do except where they test autocast).
* ``Trainer`` gives every parameter one learning rate; :func:`qalora.param_groups` gives the
  trained offsets their own (the config's ``offset_lr_scale``) through ``optimizers=``.
* ``Trainer``'s checkpoints are the model's whole state dict (packed codes, scales, offsets,
  adapters): a run resumes from one into a fresh wrapped model.
"""

from __future__ import annotations

import copy

import pytest
import qalora
import torch
from qalora.targets import quantized_layers
from tiny_models import char_tokenizer, tiny_llama

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
STEPS, BATCH, LR = 3, 4, 1e-2


def tokenizer():
    tok = char_tokenizer()
    assert tok.chat_template is None  # the tiny tokenizer has none: give it one
    tok.chat_template = CHAT_TEMPLATE
    return tok


def wrapped(seed=0, **config):
    model = tiny_llama(seed, vocab=100, max_positions=128)
    config = {"bits": 4, "group_size": 32, "rank": 4, "alpha": 8, "dropout": 0.0, **config}
    return qalora.wrap(model, qalora.QALoRAConfig(**config))


def conversations():
    return datasets.Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": f"What is {i} + {i}?"},
                    {"role": "assistant", "content": f"{i} + {i} is {2 * i}."},
                ]
            }
            for i in range(2 * BATCH)
        ]
    )


def texts():
    return datasets.Dataset.from_list([{"text": f"Line {i}: to be, or not to be."} for i in range(2 * BATCH)])


def sft_config(out, **kw):
    kw = {
        "max_steps": STEPS,
        "per_device_train_batch_size": BATCH,
        "learning_rate": LR,
        "lr_scheduler_type": "constant",
        "gradient_checkpointing": True,
        "max_length": 64,
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "bf16": False,  # SFTConfig's default is True: bf16 autocast, emulated on most CPUs
        **kw,
    }
    return trl.SFTConfig(output_dir=str(out), **kw)


def trainables(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def frozen(model):
    out = {n: b.detach().clone() for n, b in model.named_buffers()}
    out.update({n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad})
    return out


def count_calls(module):
    calls = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def sft_train(model, data, out, **kw):
    trainer = trl.SFTTrainer(
        model=model, args=sft_config(out, **kw), train_dataset=data, processing_class=tokenizer(), peft_config=None
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize(
    ("data", "bf16"), [(conversations, False), (texts, True)], ids=["messages-float32", "text-bf16-autocast"]
)
def test_sft_trainer_with_checkpointing_trains_the_adapters_and_leaves_the_base(data, bf16, tmp_path):
    model = wrapped()
    before, base = trainables(model), frozen(model)
    names = set(before)
    assert any(n.endswith(".delta_offsets") for n in names)  # the default config trains offsets too
    assert all(n.endswith(("lora_A.weight", "lora_B.weight", "delta_offsets")) for n in names), names
    calls = count_calls(model.model.layers[0].mlp.down_proj)
    trainer = sft_train(model, data(), tmp_path, logging_steps=1, bf16=bf16)
    assert trainer.model is model and not hasattr(model, "peft_config")  # no PEFT wrapper
    assert model.is_activation_checkpointing
    # Every step ran the layer twice: the forward, then its recomputation in the backward.
    assert len(calls) == 2 * STEPS
    for name, value in before.items():
        assert float((model.get_parameter(name).detach() - value).abs().max()) > 1e-4, f"{name} did not train"
    for name, value in frozen(model).items():
        assert torch.equal(value, base[name]), f"{name} changed"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointed_training_gives_the_adapters_plain_training_gives(reentrant, tmp_path):
    """With dropout on: a recomputed forward must draw the very same dropout mask."""
    plain = wrapped(dropout=0.1)
    sft_train(plain, conversations(), tmp_path / "plain", gradient_checkpointing=False, max_steps=2)
    checkpointed = wrapped(dropout=0.1)
    calls = count_calls(checkpointed.model.layers[1].self_attn.q_proj)
    kwargs = {"use_reentrant": reentrant}
    sft_train(checkpointed, conversations(), tmp_path / "ckpt", gradient_checkpointing_kwargs=kwargs, max_steps=2)
    assert len(calls) == 4  # checkpointing was on
    start, want, got = trainables(wrapped(dropout=0.1)), trainables(plain), trainables(checkpointed)
    assert want.keys() == got.keys() == start.keys()
    for name in want:
        assert not torch.equal(want[name], start[name]), f"{name} did not train"
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)


def test_hf_trainer_with_checkpointing_trains_the_adapters_plain_training_gives(tmp_path):
    ids = torch.randint(3, 100, (2 * BATCH, 24), generator=torch.Generator().manual_seed(0))

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": ids[i]}

    results = []
    for checkpointing in (False, True):
        model = wrapped(dropout=0.1)
        calls = count_calls(model.model.layers[0].self_attn.o_proj)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(checkpointing)),
            per_device_train_batch_size=BATCH,
            max_steps=2,
            learning_rate=LR,
            gradient_checkpointing=checkpointing,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
        )
        transformers.Trainer(model=model, args=args, train_dataset=Blocks()).train()
        assert len(calls) == (4 if checkpointing else 2)
        results.append(trainables(model))
    start = trainables(wrapped(dropout=0.1))
    for name in results[0]:
        assert not torch.equal(results[0][name], start[name]), f"{name} did not train"
        torch.testing.assert_close(results[1][name], results[0][name], rtol=0, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def sft_trained(tmp_path_factory):
    """A llama-family GGUF file (4-bit Q4_1 layers, a byte-level BPE tokenizer) loaded by
    qalora, wrapped on its own codes and trained with SFTTrainer on conversations: the
    README's route from a GGUF file back to one."""
    pytest.importorskip("gguf")
    import gguf_synthetic as syn

    tmp = tmp_path_factory.mktemp("sft-gguf")
    spec = syn.SyntheticSpec(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=300, context=128)
    syn.write_synthetic_gguf(tmp / "source.gguf", spec)
    lm = qalora.load_model(str(tmp / "source.gguf"))
    model, tok = lm.model, lm.tokenizer
    tok.chat_template = CHAT_TEMPLATE
    qalora.wrap(model, qalora.QALoRAConfig(rank=4, alpha=8, dropout=0.0))
    before = trainables(model)
    trainer = trl.SFTTrainer(
        model=model, args=sft_config(tmp / "out"), train_dataset=conversations(), processing_class=tok
    )
    trainer.train()
    assert all(not torch.equal(before[n], p) for n, p in trainables(model).items())
    return model, tok


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(3))


def test_sft_trained_model_merges_exactly_saves_and_exports(sft_trained, tmp_path):
    model, tok = sft_trained
    trained = logits(model, IDS)
    # float32 offsets hold the trained values exactly: the merged model is the trained one.
    exact = qalora.merge(copy.deepcopy(model), offset_dtype=torch.float32)
    assert qalora.state_of(exact).merge_rounding["offset"] == 0.0
    torch.testing.assert_close(logits(exact, IDS), trained, rtol=0, atol=1e-5 * float(trained.abs().max()))
    # The default float16 offsets: each offset rounded once (by well under a code step).
    merged = qalora.merge(model)
    rounding = qalora.state_of(merged).merge_rounding["offset"]
    assert 0 < rounding < 0.02
    after = logits(merged, IDS)
    assert float((after - trained).abs().max()) <= 1e-2 * float(trained.abs().max())
    assert not any(isinstance(m, qalora.QALoRALinear) for m in merged.modules())
    # Saved and loaded back in the qalora format: the same model.
    qalora.save_pretrained(merged, tmp_path / "model", tokenizer=tok)
    loaded = qalora.from_pretrained(tmp_path / "model")
    assert torch.equal(logits(loaded, IDS), after)
    # GGUF: the merged layers as Q4_1 with their own codes, scales and offsets (float16 d
    # and m hold them exactly); what training did not touch copied from the source file.
    report = qalora.export_gguf(merged, tmp_path / "model.gguf", tokenizer=tok)
    layers = dict(quantized_layers(merged))
    assert len(layers) == 14 and report.count("copied") == len(report.tensors) - len(layers)
    back = qalora.load_model(str(tmp_path / "model.gguf"))
    again = dict(quantized_layers(back.model))
    assert again.keys() == layers.keys()
    for name in layers:
        for key in ("packed", "scales", "offsets"):
            assert torch.equal(getattr(layers[name], key), getattr(again[name], key)), (name, key)
    torch.testing.assert_close(logits(back.model, IDS), after, rtol=0, atol=1e-5 * float(after.abs().max()))
    assert back.tokenizer.chat_template == CHAT_TEMPLATE


def test_param_groups_give_the_offsets_their_rate_under_the_trainer(tmp_path):
    model = wrapped(offset_lr_scale=10.0)
    groups = qalora.param_groups(model, LR)
    rates = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert len(rates) == len(trainables(model))
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert rates[id(p)] == (10 * LR if name.endswith(".delta_offsets") else LR), name
    optimizer = torch.optim.AdamW(groups)
    trainer = trl.SFTTrainer(
        model=model,
        args=sft_config(tmp_path, max_steps=1),
        train_dataset=texts(),
        processing_class=tokenizer(),
        optimizers=(optimizer, None),
    )
    trainer.train()
    assert len(optimizer.state) == len(rates)  # the trainer stepped this optimizer
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([LR, 10 * LR])
    # Refused: a rate that is not a finite positive number, a model with nothing to train.
    for bad in (0, -1.0, float("nan"), True, "1e-3"):
        with pytest.raises(qalora.ConfigError, match="lr"):
            qalora.param_groups(model, bad)
    with pytest.raises(qalora.ConfigError, match="no trainable parameters"):
        qalora.param_groups(tiny_llama(0).requires_grad_(False), LR)


@pytest.mark.parametrize("head", ["tied-quantized", "adapted"])
def test_quantized_or_adapted_head_is_refused_with_the_reason(head, tmp_path):
    if head == "tied-quantized":
        model = qalora.wrap(
            tiny_llama(0, vocab=100, max_positions=128, tie=True),
            qalora.QALoRAConfig(bits=4, group_size=32, rank=4, quantize_embeddings=True),
        )
        kind = qalora.QuantLinear
        table = model.get_input_embeddings()
        assert not hasattr(table, "weight")
        with pytest.raises(qalora.NoDenseWeightError, match=r"QuantEmbedding \(100 x 64\).*dequantize"):
            getattr(table, "weight")  # noqa: B009
    else:
        model = wrapped(target_modules=["q_proj", "lm_head"])
        kind = qalora.QALoRALinear
    lm_head = model.get_output_embeddings()
    assert isinstance(lm_head, kind) and not hasattr(lm_head, "weight")
    with pytest.raises(qalora.NoDenseWeightError, match="SFTTrainer") as caught:
        sft_train(model, texts(), tmp_path, max_steps=1)
    assert isinstance(caught.value, AttributeError)
    assert ("adapter out" in str(caught.value)) == (head == "adapted")


def test_trainer_checkpoint_resumes_into_a_fresh_wrapped_model(tmp_path):
    """Trainer's own checkpoints (``save_strategy="steps"``) hold the whole wrapped model,
    packed codes included: resumed into a fresh wrapped model (even one quantized from other
    weights), the run ends where the uninterrupted run ended."""
    kw = {"max_steps": 4, "lr_scheduler_type": "linear"}
    whole = wrapped()
    sft_train(whole, texts(), tmp_path, save_strategy="steps", save_steps=2, **kw)
    assert (tmp_path / "checkpoint-2" / "model.safetensors").is_file()
    fresh = wrapped(seed=1)
    packed = "model.layers.0.mlp.up_proj.base_layer.packed"
    assert not torch.equal(fresh.get_buffer(packed), whole.get_buffer(packed))
    trainer = trl.SFTTrainer(
        model=fresh, args=sft_config(tmp_path, **kw), train_dataset=texts(), processing_class=tokenizer()
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    for name, value in trainables(whole).items():
        assert torch.equal(fresh.get_parameter(name), value), name
    resumed = frozen(fresh)
    for name, value in frozen(whole).items():
        assert torch.equal(resumed[name], value), name
