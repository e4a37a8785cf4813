"""QALoRAConfig(quantize_embeddings=True): the quantized token embedding and the head tied to it.

References are independent of qalora's kernels: codes, scales and offsets are recomputed in
float64 with numpy (tests/reference.py) and the lookup / logits compared with them.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import qalora
import reference as ref
import torch
from ckpt_tools import resign
from qalora import QALoRAConfig
from qalora.layers import QuantEmbedding, QuantLinear
from tiny_models import tiny_llama as _tiny_llama
from torch import nn

transformers = pytest.importorskip("transformers")

EMBED, HEAD = "model.embed_tokens", "lm_head"
GROUPS = {2: (16, 32), 3: (8, 32), 4: (16, 32), 5: (8, 32), 6: (4, 32), 8: (16, 32)}


def tiny_llama(seed=0, tie=True, vocab=101, hidden=64):
    model = _tiny_llama(seed, tie=tie, vocab=vocab, hidden=hidden).eval()
    with torch.no_grad():  # a spread of values, no constant rows
        model.get_input_embeddings().weight.normal_(0.0, 0.5)
    return model


def shared(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def assert_tied(model):
    table, head = model.get_submodule(EMBED), model.get_submodule(HEAD)
    assert isinstance(table, QuantEmbedding) and isinstance(head, QuantLinear)
    for part in ("packed", "scales", "offsets"):
        assert getattr(head, part) is getattr(table, part)


# --------------------------------------------------------------------------- the lookup


@pytest.mark.parametrize("bits", sorted(GROUPS))
@pytest.mark.parametrize("vocab", [37, 101])
def test_lookup_equals_reference(bits, vocab):
    for g in GROUPS[bits]:
        torch.manual_seed(bits * 100 + vocab + g)
        emb = nn.Embedding(vocab, 64)
        with torch.no_grad():
            emb.weight.normal_(0.3, 1.7)
        table = QuantEmbedding.from_embedding(emb, bits, g)
        # float64 min-max parameters from the weight alone: offsets exact; scales within one
        # float16 step (the division may round either way before the float16 rounding).
        w = emb.weight.detach().double().numpy()
        rs, rm = ref.params(w, bits, g)
        s64, m64 = table.scales.double().numpy(), table.offsets.double().numpy()
        np.testing.assert_array_equal(m64, rm)
        np.testing.assert_allclose(s64, rs, rtol=2.0**-10, atol=0)
        # nearest codes under the stored parameters; a code on a rounding tie may go either way
        codes, tie = ref.codes_for(w, s64, m64, bits, g)
        own = ref.unpack(table.packed.numpy(), bits, 64)
        assert np.all((own == codes) | (tie < 1e-4))
        want = ref.dequantize(codes, s64, m64, g)
        ids = torch.randint(0, vocab, (3, 17))
        got = table(ids)
        assert got.shape == (3, 17, 64) and got.dtype == torch.float32
        clear = torch.from_numpy((tie >= 1e-4).all(axis=1))[ids]
        assert clear.float().mean() > 0.5
        np.testing.assert_allclose(got[clear].double().numpy(), want[ids.numpy()][clear.numpy()], rtol=0, atol=1e-6)
        # every id, against the module's own codes decoded by the numpy reference
        mine = ref.dequantize(own, s64, m64, g)
        np.testing.assert_allclose(got.double().numpy(), mine[ids.numpy()], rtol=0, atol=1e-6)


def test_lookup_keeps_the_dense_dtype_and_refuses_bad_ids():
    emb = nn.Embedding(11, 32, dtype=torch.bfloat16)
    table = QuantEmbedding.from_embedding(emb, 4, 32)
    assert table(torch.tensor([0, 10])).dtype == torch.bfloat16
    with pytest.raises(IndexError):
        table(torch.tensor([11]))


# --------------------------------------------------------------------------- wrap, tie, head


def test_tied_head_logits_equal_dense_computation_on_dequantized_table():
    model = tiny_llama()
    dense_table = model.get_input_embeddings().weight.detach().clone()
    qalora.wrap(model, QALoRAConfig(bits=4, group_size=16, quantize_embeddings=True))
    assert_tied(model)
    table = model.get_submodule(EMBED)
    assert not any(p.requires_grad for p in table.parameters())
    deq = table.dequantize(torch.float64)
    # the table is RTN at the config's settings
    np.testing.assert_allclose(
        deq.numpy(),
        ref.dequantize(
            ref.unpack(table.packed.numpy(), 4, 64), table.scales.double().numpy(), table.offsets.double().numpy(), 16
        ),
    )
    assert (deq - dense_table.double()).abs().max() < 0.5 * (dense_table.max() - dense_table.min()) / 15
    hidden = torch.randn(2, 5, 64)
    logits = model.lm_head(hidden)
    np.testing.assert_allclose(logits.double().numpy(), (hidden.double() @ deq.T).numpy(), rtol=1e-5, atol=1e-4)
    # the model's input embedding is the lookup of the quantized table
    ids = torch.randint(0, 101, (2, 5))
    np.testing.assert_allclose(table(ids).double().numpy(), deq[ids].numpy(), atol=1e-6)


def test_memory_summary_and_dense_parts():
    from qalora.cli.report import dense_parts

    plain = qalora.wrap(tiny_llama(), QALoRAConfig(group_size=16))
    quant = qalora.wrap(tiny_llama(), QALoRAConfig(group_size=16, quantize_embeddings=True))
    s0, s1 = qalora.summary(plain), qalora.summary(quant)
    assert s1.total_params == s0.total_params  # the tied table counted once in both
    assert s1.quantized_embeddings == 1 and s0.quantized_embeddings == 0
    assert s1.quantized_layers == s0.quantized_layers + 1  # the head
    table_bytes = 101 * 64 * 4
    packed_bytes = 101 * 64 // 2 + 2 * 101 * 4 * 2
    assert s0.memory_bytes - s1.memory_bytes == table_bytes - packed_bytes
    assert "quantized embeddings: 1" in str(s1)
    kinds = {p["kind"] for p in dense_parts(plain)}
    assert "embedding" in kinds
    names = [p["name"] for p in dense_parts(quant)]
    assert EMBED not in names and HEAD not in names


def test_forward_generate_train_merge_keep_the_tie():
    model = tiny_llama()
    qalora.wrap(model, QALoRAConfig(group_size=16, rank=4, quantize_embeddings=True))
    ids = torch.randint(0, 101, (2, 12))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss)
    table = model.get_submodule(EMBED)
    before = [t.clone() for t in (table.packed, table.scales, table.offsets)]
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
    qalora.merge(model)
    assert_tied(model)
    assert all(torch.equal(a, b) for a, b in zip(before, (table.packed, table.scales, table.offsets)))
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    assert ((merged - unmerged).norm() / unmerged.norm()) < 1e-2
    out = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)


def test_save_load_keeps_the_tie_and_stores_the_table_once(tmp_path):
    model = tiny_llama()
    qalora.wrap(model, QALoRAConfig(group_size=16, rank=4, quantize_embeddings=True))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    qalora.save_pretrained(model, tmp_path / "m")
    qalora.save_adapter(model, tmp_path / "a")
    from safetensors import safe_open

    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert f"{EMBED}.packed" in keys and f"{HEAD}.packed" not in keys
    meta = json.loads((tmp_path / "m" / "qalora_config.json").read_text())
    assert meta["layers"][EMBED]["type"] == "QuantEmbedding"
    assert meta["layers"][HEAD]["tied_to"] == EMBED
    assert meta["config"]["quantize_embeddings"] is True
    for loaded in (qalora.from_pretrained(tmp_path / "m"), qalora.from_pretrained(tmp_path / "m", tiny_llama(1))):
        assert_tied(loaded)
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, want)
        qalora.load_adapter(loaded, tmp_path / "a")
        qalora.merge(loaded)
        assert_tied(loaded)
        qalora.save_pretrained(loaded, tmp_path / "again")
        again = qalora.from_pretrained(tmp_path / "again")
        assert_tied(again)


def test_config_round_trip_and_default_left_out():
    assert "quantize_embeddings" not in QALoRAConfig().to_dict()
    c = QALoRAConfig(quantize_embeddings=True)
    assert QALoRAConfig.from_json(c.to_json()) == c
    with pytest.raises(qalora.ConfigError, match="quantize_embeddings"):
        QALoRAConfig(quantize_embeddings=1)


def test_default_leaves_the_embedding_dense():
    model = qalora.wrap(tiny_llama(), QALoRAConfig(group_size=16))
    assert type(model.get_submodule(EMBED)) is nn.Embedding
    assert model.lm_head.weight is model.get_submodule(EMBED).weight


def test_untied_head_stays_dense():
    model = qalora.wrap(tiny_llama(tie=False), QALoRAConfig(group_size=16, quantize_embeddings=True))
    assert isinstance(model.get_submodule(EMBED), QuantEmbedding)
    assert type(model.lm_head) is nn.Linear


# --------------------------------------------------------------------------- refusals


def _state(model):
    return {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    return set(after) == set(before) and all(torch.equal(after[k], before[k][1]) for k in after)


def test_refuses_indivisible_hidden_size_and_leaves_the_model():
    model = tiny_llama(hidden=48)  # 48 is not a multiple of 32
    before = _state(model)
    cfg = QALoRAConfig(group_size=32, quantize_embeddings=True)
    with pytest.raises(qalora.GroupSizeError, match="hidden size 48"):
        qalora.wrap(model, cfg, filter_fn=lambda m, n: n.endswith("down_proj"))  # in_features 128
    assert _unchanged(model, before) and qalora.state_of(model) is None


def test_refuses_models_without_get_input_embeddings():
    model = nn.Sequential(nn.Embedding(10, 32), nn.Linear(32, 32))
    with pytest.raises(qalora.ConfigError, match="get_input_embeddings"):
        qalora.wrap(model, QALoRAConfig(quantize_embeddings=True))
    assert type(model[0]) is nn.Embedding and type(model[1]) is nn.Linear


def test_refuses_a_scaled_embedding_subclass_and_max_norm():
    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 8.0

    model = tiny_llama()
    model.model.embed_tokens = Scaled(101, 64)
    with pytest.raises(qalora.ConfigError, match="not a plain"):
        qalora.wrap(model, QALoRAConfig(group_size=16, quantize_embeddings=True))
    model = tiny_llama(tie=False)
    model.model.embed_tokens.max_norm = 1.0
    with pytest.raises(qalora.ConfigError, match="max_norm"):
        qalora.wrap(model, QALoRAConfig(group_size=16, quantize_embeddings=True))


def test_refuses_tied_head_chosen_for_an_adapter_and_a_merged_model():
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(qalora.ConfigError, match="remove it from target_modules"):
        qalora.wrap(model, QALoRAConfig(group_size=16, target_modules=["q_proj", "lm_head"], quantize_embeddings=True))
    assert _unchanged(model, before)
    merged = qalora.merge(qalora.wrap(tiny_llama(), QALoRAConfig(group_size=16)))
    with pytest.raises(qalora.ConfigError, match="merged already"):
        qalora.wrap(merged, QALoRAConfig(group_size=16, quantize_embeddings=True))


def test_refuses_non_finite_table_and_leaves_the_model():
    model = tiny_llama()
    with torch.no_grad():
        model.get_input_embeddings().weight[3, 5] = float("nan")
    with pytest.raises(qalora.InvalidValueError):
        qalora.wrap(model, QALoRAConfig(group_size=16, quantize_embeddings=True))
    assert type(model.get_submodule(EMBED)) is nn.Embedding and type(model.lm_head) is nn.Linear
    assert not any(isinstance(m, qalora.QALoRALinear) for m in model.modules())


# --------------------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed_ckpt")
    model = qalora.wrap(tiny_llama(), QALoRAConfig(group_size=16, rank=2, quantize_embeddings=True))
    qalora.merge(model)
    qalora.save_pretrained(model, root / "m")
    return root / "m"


def _damaged(saved, tmp_path, edit):
    import shutil

    target = tmp_path / "m"
    shutil.copytree(saved, target)
    path = target / "qalora_config.json"
    data = json.loads(path.read_text())
    edit(data["layers"])
    path.write_text(json.dumps(data))
    resign(target)
    return target


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda L: L[EMBED].update(bits=7), f"layers.{EMBED}.bits"),
        (lambda L: L[EMBED].update(group_size=24), f"layers.{EMBED}.group_size"),
        (lambda L: L[EMBED].update(out_features=100), f"layers.{HEAD}.tied_to"),
        (lambda L: [L[k].update(out_features=100) for k in (EMBED, HEAD)], f"tensor '{EMBED}.packed'"),
        (lambda L: [L[k].update(in_features=32) for k in (EMBED, HEAD)], f"tensor '{EMBED}.packed'"),
        (lambda L: L[EMBED].update(bias=True), f"layers.{EMBED}.bias"),
        (lambda L: L[EMBED].update(dtype="int8"), f"layers.{EMBED}.dtype"),
        (lambda L: L[EMBED].pop("dtype"), f"layers.{EMBED}.dtype"),
        (lambda L: L[EMBED].update(padding_idx=101), f"layers.{EMBED}.padding_idx"),
        (lambda L: L[HEAD].update(tied_to="model.norm"), f"layers.{HEAD}.tied_to"),
        (lambda L: L[HEAD].update(bits=8), f"layers.{HEAD}.tied_to"),
        (lambda L: L[HEAD].pop("tied_to"), f"{HEAD}.packed"),
        (lambda L: L.update({"model.norm": dict(L[EMBED])}), "model.norm"),
        (lambda L: L.update({"model.layers.0.mlp.up_proj": dict(L[EMBED])}), "model.layers.0.mlp.up_proj"),
    ],
)
def test_damaged_embedding_metadata_is_refused(saved, tmp_path, edit, field):
    target = _damaged(saved, tmp_path, edit)
    with pytest.raises(qalora.CheckpointError, match=field.replace(".", r"\.")):
        qalora.from_pretrained(target)


def test_damaged_embedding_metadata_is_refused_by_the_two_argument_form(saved, tmp_path):
    target = _damaged(saved, tmp_path, lambda L: L[EMBED].update(bits=2))
    fresh = tiny_llama(3)
    before = _state(fresh)
    with pytest.raises(qalora.CheckpointError, match="embed_tokens"):
        qalora.from_pretrained(target, fresh)
    assert _unchanged(fresh, before)


def test_saved_directory_is_smaller(tmp_path):
    sizes = {}
    for on in (False, True):
        model = qalora.merge(qalora.wrap(tiny_llama(), QALoRAConfig(group_size=16, quantize_embeddings=on)))
        qalora.save_pretrained(model, tmp_path / str(on))
        sizes[on] = os.path.getsize(tmp_path / str(on) / "model.safetensors")
    assert sizes[False] - sizes[True] > 101 * 64 * 4 // 2


def test_dequantized_keeps_the_tie():
    from qalora.loaders import dequantized

    model = qalora.merge(qalora.wrap(tiny_llama(), QALoRAConfig(group_size=16, quantize_embeddings=True)))
    table = model.get_submodule(EMBED).dequantize(torch.float32)
    ids = torch.randint(0, 101, (1, 7))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    dequantized(model)
    emb = model.get_submodule(EMBED)
    assert type(emb) is nn.Embedding and model.lm_head.weight is emb.weight
    assert torch.equal(emb.weight, table)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-4)


def test_dtype_conversion_and_deepcopy_keep_the_tie():
    import copy

    model = qalora.wrap(tiny_llama(), QALoRAConfig(group_size=16, quantize_embeddings=True))
    ids = torch.randint(0, 101, (1, 6))
    twin = copy.deepcopy(model)
    assert_tied(twin)
    assert twin.get_submodule(EMBED).packed is not model.get_submodule(EMBED).packed
    model.to(torch.bfloat16)
    assert_tied(model)
    assert model.get_submodule(EMBED).scales.dtype == torch.bfloat16
    assert model.get_submodule(EMBED)(ids).dtype == torch.bfloat16
    with torch.no_grad():
        assert model(input_ids=ids).logits.dtype == torch.bfloat16
    model.float()
    assert_tied(model)
    assert model.get_submodule(EMBED)(ids).dtype == torch.float32


def test_int8_tiling_leaves_the_tied_head_sharing_the_table(tmp_path):
    model = tiny_llama()
    qalora.wrap(model, QALoRAConfig(group_size=32, rank=4, quantize_embeddings=True))
    qalora.merge(model)
    ids = torch.randint(0, 101, (1, 6))
    with torch.no_grad():
        exact = model(input_ids=ids).logits
    qalora.set_activations(model, "int8")
    assert_tied(model)
    assert not model.get_submodule(HEAD).is_tiled
    assert model.get_submodule("model.layers.0.self_attn.q_proj").is_tiled
    with torch.no_grad():
        fast = model(input_ids=ids).logits
    assert ((fast - exact).norm() / exact.norm()) < 5e-2
    qalora.save_pretrained(model, tmp_path / "m")
    assert_tied(qalora.from_pretrained(tmp_path / "m"))
