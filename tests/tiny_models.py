"""Small randomly initialised Hugging Face models for the tests (one definition, many users)."""

from __future__ import annotations

import string

import torch


def tiny_llama_config(
    *, tie: bool = False, layers: int = 2, vocab: int = 96, hidden: int = 64, max_positions: int = 64
):
    """A 2-layer Llama config with grouped-query attention (4 heads, 2 KV heads)."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
    )


def tiny_llama(seed: int = 0, **config):
    """A LlamaForCausalLM of :func:`tiny_llama_config` (``config``: its keywords), weights drawn
    from ``seed``."""
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_llama_config(**config))


def char_tokenizer():
    """A character-level fast tokenizer over the printable ASCII characters (ids < 100)."""
    import tokenizers
    import transformers

    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {"<eos>": 0, "<unk>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
    tk.decoder = tokenizers.decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")


def tiny_model_dir(directory):
    """Writes a Hugging Face model directory (a tiny Llama and :func:`char_tokenizer`) into
    ``directory`` and returns it."""
    tiny_llama(0, vocab=100, max_positions=128).save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory
