"""Which layers of a model qalora quantizes and adapts, and how it swaps them.

Used by :func:`qalora.wrap`, the checkpoint loaders and the command line's comparison
(its dense-LoRA reference row picks its layers here too), so every route selects the same
layers the same way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from .errors import NoTargetModulesError
from .layers import QALoRALinear, QuantLinear

#: A name spec: ``None``, a regex over the whole qualified name, or a list of names/suffixes.
NameSpec = str | Sequence[str] | None
#: ``filter_fn(module, qualified_name) -> bool``, as in torchao's ``quantize_``.
FilterFn = Callable[[nn.Module, str], bool]


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` or Hugging Face's ``Conv1D`` (GPT-2 family: a linear layer whose
    weight is stored transposed, (in, out))."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def dense_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, in) weight and bias of a linear-like module."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    return module.weight.t(), module.bias


def linear_like_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every linear-like module that can be swapped, by qualified name."""
    # nn.MultiheadAttention reads out_proj.weight directly instead of calling the module,
    # so its projection cannot be swapped for another module type.
    mha = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    return [
        (name, m)
        for name, m in model.named_modules()
        if name and is_linear_like(m) and not any(name.startswith(p + ".") for p in mha)
    ]


def model_embedding(model: nn.Module, getter: str) -> nn.Module | None:
    """``model.get_input_embeddings()`` / ``get_output_embeddings()`` (``getter``), or None
    where the model has no such method or its base class leaves it unimplemented."""
    get = getattr(model, getter, None)
    if not callable(get):
        return None
    try:
        return get()
    except (AttributeError, NotImplementedError):
        return None


def output_head_names(model: nn.Module) -> set:
    """The output projection (LM head) and any linear whose weight is tied to an embedding."""
    heads = set()
    head = model_embedding(model, "get_output_embeddings")
    embedding_ptrs = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, m in model.named_modules():
        if m is head or name.split(".")[-1] == "lm_head":
            heads.add(name)
        elif is_linear_like(m) and m.weight.data_ptr() in embedding_ptrs:
            heads.add(name)
    return heads


def matches(name: str, spec: NameSpec) -> bool:
    """A regex must match the whole qualified name. A list entry matches a module whose
    name, or an ancestor's, equals it or ends with "." + it (so "mlp" covers mlp.up_proj)."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    parts = name.split(".")
    paths = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(p == s or p.endswith("." + s) for p in paths for s in spec)


def select_targets(
    model: nn.Module,
    target_modules: NameSpec = None,
    exclude_modules: NameSpec = None,
    filter_fn: FilterFn | None = None,
) -> list[tuple[str, nn.Module]]:
    """The layers to quantize and adapt, in model order.

    A linear-like layer is chosen when ``target_modules`` matches it (``None``: every layer
    but the output head) and, if given, ``filter_fn(module, name)`` returns True (with
    ``target_modules=None`` the filter alone decides, so it can also pick the head); then
    ``exclude_modules`` removes layers. Frozen :class:`QuantLinear` layers (e.g. imported
    from a quantized file) are candidates like dense ones.

    Raises:
        NoTargetModulesError: nothing was chosen; the message lists the candidates.
    """
    candidates = linear_like_modules(model) + list(quantized_layers(model, QuantLinear))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    candidates.sort(key=lambda item: order[item[0]])
    if target_modules is None and filter_fn is None:
        heads = output_head_names(model)
        chosen = [(n, m) for n, m in candidates if n not in heads]
    else:
        chosen = [
            (n, m)
            for n, m in candidates
            if (target_modules is None or matches(n, target_modules)) and (filter_fn is None or filter_fn(m, n))
        ]
    chosen = [(n, m) for n, m in chosen if not matches(n, exclude_modules)]
    if not chosen:
        seen = [n for n, _ in candidates]
        listing = ", ".join(seen[:40]) + (f", ... ({len(seen)} in all)" if len(seen) > 40 else "")
        rule = f"target_modules={target_modules!r}, exclude_modules={exclude_modules!r}"
        if filter_fn is not None:
            rule += f", filter_fn={getattr(filter_fn, '__name__', filter_fn)!r}"
        raise NoTargetModulesError(f"no layer matched {rule}; linear-like modules in this model: {listing or 'none'}")
    return chosen


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Puts ``new`` where the submodule ``name`` was."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantized_layers(model: nn.Module, kind=(QALoRALinear, QuantLinear)) -> Iterator[tuple[str, nn.Module]]:
    """Top-level qalora layers of the given kind(s) (a QALoRALinear's own ``base_layer`` is
    not listed separately)."""
    inside: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, (QALoRALinear, QuantLinear)):
            inside.append(name)
            if isinstance(m, kind):
                yield name, m
