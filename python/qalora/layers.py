"""The two module types qalora puts into a model.

* :class:`QuantLinear`: a frozen group-wise INT-b linear layer (packed codes, scales,
  offsets as buffers, optional bias). What a merged model is made of.
* :class:`QALoRALinear`: a ``QuantLinear`` (``base_layer``) plus a trainable adapter
  (``lora_A``, ``lora_B``). For ``adapter="qalora"`` the adapter reads the group means of the
  input, so its update is constant inside each quantization group and folds exactly into
  the offsets (:meth:`QALoRALinear.merged`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import _core, ops
from ._dispatch import SMALL_BATCH_ROWS as SMALL_BATCH_ROWS  # the small-batch threshold, kept importable here
from ._dispatch import tiled_route_applies
from .errors import (
    DeviceError,
    DTypeError,
    GroupSizeError,
    InvalidValueError,
    MergeError,
    NoDenseWeightError,
    ShapeError,
)

#: How a quantized layer can multiply small CPU batches (see :func:`qalora.ops.qmatmul`).
ACTIVATION_MODES = ("exact", "int8", "bf16")


def _no_dense_weight(module: nn.Module) -> NoDenseWeightError:
    """The error for code that reads ``module.weight`` off a layer holding no dense matrix
    (code written for ``nn.Linear``, such as TRL's ``SFTTrainer``, whose fused LM head
    multiplies the hidden states by ``lm_head.weight`` itself)."""
    kind = type(module).__name__
    if isinstance(module, QALoRALinear):
        what = (
            "a frozen quantized base and a trainable adapter; a product with a dense weight would leave the "
            "adapter out (qalora.merge(model) first makes it a QuantLinear)"
        )
    else:
        what = (
            f"{module.bits}-bit codes with per-group scales and offsets (groups of {module.group_size}); "
            "dequantize() gives the dense matrix"
        )
    if isinstance(module, QuantEmbedding):
        shape = f"{module.out_features} x {module.in_features}"
    else:
        shape = f"{module.in_features} -> {module.out_features}"
    return NoDenseWeightError(
        f"this {kind} ({shape}) has no dense `weight`: it holds {what}. "
        "Code that multiplies by `module.weight` itself cannot run such a layer. TRL's SFTTrainer does that with "
        "the output head (its fused LM head): keep the head dense there, as qalora.wrap does by default (it is "
        "quantized only when target_modules names it, or by quantize_embeddings=True when it is tied to the "
        "embedding table)"
    )


def check_activations(mode: str) -> None:
    """Raises InvalidValueError unless ``mode`` is one of :data:`ACTIVATION_MODES`."""
    if mode not in ACTIVATION_MODES:
        raise InvalidValueError(f"mode: got {mode!r}, allowed: " + ", ".join(repr(m) for m in ACTIVATION_MODES))


_CANONICAL = ("packed", "scales", "offsets")
# A factored layer's group parameters (docs/design.md §2): integers times float16 factors,
# in factor_'s argument order.
_FACTORED = ("sub_scales", "super_scales", "sub_offsets", "super_offsets")

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def check_group_size(in_features: int, bits: int, group_size: int, layer: str) -> None:
    """Raises GroupSizeError, naming ``layer``, unless the layer can be stored at these settings
    (the checks and the message are the kernels' own, :func:`qalora.ops.check_layout`)."""
    try:
        ops.check_layout(in_features, bits, group_size)
    except (GroupSizeError, ShapeError) as e:
        raise GroupSizeError(
            f"layer {layer!r}: {e}; choose another group_size, exclude the layer, "
            f"or set on_indivisible='skip' to leave it unquantized"
        ) from None


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    # Custom kernels are invisible to autocast: apply its dtype by hand so that
    # torch.autocast behaves as it does for nn.Linear.
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        target = torch.get_autocast_dtype(device_type)
        if x.is_floating_point() and x.dtype != target:
            return x.to(target)
    return x


class QuantLinear(nn.Module):
    """A frozen linear layer y = x W^T + b with W stored as b-bit codes per group.

    Buffers: ``packed`` uint8 (out, in*bits/8), ``scales`` and ``offsets`` (out, in/group_size).
    ``bias`` is a frozen parameter (or None). A layer imported from a GGUF K-quant holds its
    group parameters factored instead, as the file does (see :meth:`factor_`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = True,
        scale_dtype: torch.dtype = torch.float16,
        device=None,
        layer_name: str = "",
        offset_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_group_size(in_features, bits, group_size, layer_name or "QuantLinear")
        offset_dtype = offset_dtype or scale_dtype
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        # "exact", "int8" or "bf16" (see ops.qmatmul); a run-time choice, not saved with the model.
        self.activations = "exact"
        groups = in_features // group_size
        self.register_buffer(
            "packed", torch.zeros(out_features, in_features * bits // 8, dtype=torch.uint8, device=device)
        )
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=scale_dtype, device=device))
        self.register_buffer("offsets", torch.zeros(out_features, groups, dtype=offset_dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.register_state_dict_post_hook(_canonical_state_dict)
        self.register_load_state_dict_pre_hook(_layout_of_loaded_state)

    # ---- factored group parameters (GGUF K-quants) ---------------------------------------

    @property
    def is_factored(self) -> bool:
        """Whether the group parameters are held factored (see :meth:`factor_`)."""
        return "super_scales" in self._buffers

    @torch.no_grad()
    def factor_(
        self,
        sub_scales: torch.Tensor,
        super_scales: torch.Tensor,
        sub_offsets: torch.Tensor | None,
        super_offsets: torch.Tensor,
    ) -> None:
        """Hold the group parameters factored, the way GGUF's K-quants store them, in place
        of float ``scales`` / ``offsets``: ``scales[n, l] = super_scales[n, l // p] *
        sub_scales[n, l]`` and ``offsets[n, l] = super_offsets[n, l // p] * sub_offsets[n, l]``
        (``sub_offsets`` None: the offsets reuse ``sub_scales``, as Q6_K's and Q3_K's implied
        minimums do), with uint8 / int8 integers (out, L) and float16 factors (out, L / p).
        Exact in float32, and about the file's size: a Q4_K layer holds 4.6 bits a weight
        instead of 6 with float32 parameters.

        The kernels read this form directly. Reading ``layer.scales`` / ``layer.offsets``
        (or :meth:`canonical`) gives a float32 copy derived on each access, so write to them
        only after :meth:`unfactor_`. A state dict (and a qalora checkpoint) holds the
        factored buffers; loading one into a plain layer factors it, and float ones loaded
        into a factored layer make it plain."""
        _check_factored(self, sub_scales, super_scales, sub_offsets, super_offsets)
        self.untile_()
        for name in ("scales", "offsets", *_FACTORED):
            self._buffers.pop(name, None)
        self.register_buffer("sub_scales", sub_scales)
        self.register_buffer("super_scales", super_scales)
        if sub_offsets is not None:
            self.register_buffer("sub_offsets", sub_offsets)
        self.register_buffer("super_offsets", super_offsets)

    @torch.no_grad()
    def unfactor_(self) -> None:
        """Back to float32 ``scales`` / ``offsets`` (the same values; see :meth:`factor_`)."""
        if not self.is_factored:
            return
        scales, offsets = self._derived_params()
        for name in _FACTORED:
            self._buffers.pop(name, None)
        self.register_buffer("scales", scales)
        self.register_buffer("offsets", offsets)

    def _derived_params(self, rows=slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        b = self._buffers
        sub_offsets = b.get("sub_offsets", b["sub_scales"])
        per = b["sub_scales"].shape[1] // max(b["super_scales"].shape[1], 1)

        def times(ints, factors):
            return factors[rows].float().repeat_interleave(per, dim=1) * ints[rows].float()

        return times(b["sub_scales"], b["super_scales"]), times(sub_offsets, b["super_offsets"])

    def row_params(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scales, offsets)`` of the rows ``rows`` (a slice or an index tensor): on a
        factored layer derived for those rows alone, so code that walks a large layer a
        slice of rows at a time does not derive the whole layer for every slice."""
        if self.is_factored:
            return self._derived_params(rows)
        _, scales, offsets = self.canonical()
        return scales[rows], offsets[rows]

    def _apply(self, fn, recurse=True):
        # A factored layer's float16 factors move with the layer but keep their dtype:
        # .float() / .half() / .to(dtype) convert the model's floating tensors, and these
        # are part of an integer layout (the kernels take float16 factors only).
        if not self.is_factored:
            return super()._apply(fn, recurse)
        factors = {name: self._buffers.pop(name) for name in ("super_scales", "super_offsets")}
        try:
            return super()._apply(fn, recurse)
        finally:
            for name, t in factors.items():
                self._buffers[name] = t.to(fn(torch.empty(0, dtype=t.dtype, device=t.device)).device)

    def kernel_weight(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(packed, scales, offsets, scale_factors, offset_factors)`` as the ops take them:
        the canonical tensors and two Nones, or a factored layer's codes, integers and factors."""
        if self.is_factored:
            b = self._buffers
            sub_offsets = b.get("sub_offsets", b["sub_scales"])
            return b["packed"], b["sub_scales"], sub_offsets, b["super_scales"], b["super_offsets"]
        return (*self.canonical(), None, None)

    @property
    def param_dtypes(self) -> tuple[torch.dtype, torch.dtype]:
        """The dtypes of ``scales`` and ``offsets`` as read (float32 for a factored layer,
        float16 for a tiled one), without deriving them."""
        if self.is_factored:
            return torch.float32, torch.float32
        if self.is_tiled:
            return torch.float16, torch.float16
        return self.scales.dtype, self.offsets.dtype

    # ---- tiled storage (the int8 route's layout) ----------------------------------------

    @property
    def is_tiled(self) -> bool:
        """Whether the weight is stored in the int8 route's tiled layout (see :meth:`tile_`)."""
        return "tiled" in self._buffers

    def can_tile(self) -> bool:
        """Whether :meth:`tile_` applies: a 4-bit CPU weight, group size a multiple of 32,
        out_features a multiple of 8, float16 scales and offsets."""
        if self.is_tiled:
            return True
        return (
            not self.is_factored
            and self.bits == 4
            and self.group_size % 32 == 0
            and self.out_features % 8 == 0
            and self.packed.device.type == "cpu"
            and self.scales.dtype == torch.float16
            and self.offsets.dtype == torch.float16
        )

    @torch.no_grad()
    def tile_(self) -> bool:
        """Store the weight in the int8 route's tiled layout, in place of the canonical
        ``packed``/``scales``/``offsets`` (the same number of bytes; never both at once).

        Small batches (up to 16 rows) then multiply with int8 activations straight from the
        tiled layout, the fastest route for generation on CPU. Anything else (larger
        batches, gradients, ``dequantize``, merging) derives the canonical tensors for the
        call and drops them afterwards; reading ``layer.packed`` (or ``scales``/``offsets``)
        returns such a derived copy, so write to them only after :meth:`untile_`. A saved
        state dict holds the canonical tensors, and loading one into a tiled layer tiles it.

        Returns:
            True if the layer is tiled, False if its layout cannot be (see :meth:`can_tile`).
        """
        if self.is_tiled:
            return True
        if not self.can_tile():
            return False
        tiled = _core.repack_tiles(self.packed, self.scales, self.offsets, self.bits, self.group_size)
        for name in _CANONICAL:
            del self._buffers[name]
        self.register_buffer("tiled", tiled)
        return True

    @torch.no_grad()
    def untile_(self) -> None:
        """Back to the canonical layout (the exact inverse of :meth:`tile_`)."""
        if not self.is_tiled:
            return
        canonical = self._canonical()
        del self._buffers["tiled"]
        for name, t in zip(_CANONICAL, canonical):
            self.register_buffer(name, t)

    def _canonical(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _core.unrepack_tiles(self._buffers["tiled"], self.out_features, self.in_features, self.group_size)

    def canonical(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(packed, scales, offsets)``: the buffers themselves, or for a tiled layer one
        derived copy of all three, for a factored one float32 scales and offsets derived
        (reading the attributes one by one derives each anew)."""
        if self.is_tiled:
            return self._canonical()
        if self.is_factored:
            return (self.packed, *self._derived_params())
        return self.packed, self.scales, self.offsets

    def __getattr__(self, name: str):
        # A tiled layer derives its canonical tensors on request (see tile_), a factored one
        # its float32 scales and offsets (see factor_).
        buffers = self.__dict__.get("_buffers", {})
        if name in _CANONICAL and "tiled" in buffers:
            return self._canonical()[_CANONICAL.index(name)]
        if name in ("scales", "offsets") and "super_scales" in buffers:
            return self._derived_params()[name == "offsets"]
        if name == "weight":
            return _weight_or_error(self)
        return super().__getattr__(name)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        bits: int,
        group_size: int,
        scale_dtype: torch.dtype = torch.float16,
        layer_name: str = "",
    ) -> QuantLinear:
        """Quantizes a dense (out, in) weight with min-max RTN."""
        out_features, in_features = weight.shape
        layer = cls(
            in_features, out_features, bits, group_size, bias is not None, scale_dtype, weight.device, layer_name
        )
        with torch.no_grad():
            packed, scales, offsets = ops.quantize(weight.detach(), bits, group_size, scale_dtype)
            layer.packed.copy_(packed)
            layer.scales.copy_(scales)
            layer.offsets.copy_(offsets)
            if bias is not None:
                layer.bias.data = bias.detach().clone()
        return layer

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (out, in) weight this layer computes with."""
        p, s, m, sf, mf = self.kernel_weight()
        return ops.dequantize(p, s, m, self.bits, self.group_size, dtype, scale_factors=sf, offset_factors=mf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _autocast_input(x)
        if self.is_tiled and tiled_route_applies(x, self.in_features):
            y = ops.qmatmul_tiled(x, self._buffers["tiled"], self.out_features, self.group_size)
        else:
            p, s, m, sf, mf = self.kernel_weight()
            kw = dict(activations=self.activations, scale_factors=sf, offset_factors=mf)
            y = ops.qmatmul(x, p, s, m, self.bits, self.group_size, **kw)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        # Printing derives nothing (see param_dtypes).
        scale_dtype, offset_dtype = self.param_dtypes
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, scale_dtype={scale_dtype}, "
            f"offset_dtype={offset_dtype}"
        )
        return text + (", factored=True" if self.is_factored else "")


def _codes_device(layer: QuantLinear) -> torch.device:
    """Where the layer's codes are (``packed``, or ``tiled``; read without deriving anything)."""
    return (layer._buffers.get("tiled") if layer.is_tiled else layer._buffers["packed"]).device


def _check_factored(layer: QuantLinear, sub_scales, super_scales, sub_offsets, super_offsets) -> None:
    """factor_'s arguments, all checked before the layer changes: torch tensors on the
    layer's device, integers uint8/int8 (out, L), float16 factors (out, F) with F dividing L."""
    groups = layer.in_features // layer.group_size
    named = {"sub_scales": sub_scales, "super_scales": super_scales, "super_offsets": super_offsets}
    if sub_offsets is not None:
        named["sub_offsets"] = sub_offsets
    device = _codes_device(layer)
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{name}: got {type(t).__name__}, expected a torch.Tensor")
        if t.device != device:
            raise DeviceError(f"{name}: on {t.device}, the layer's codes are on {device}; move it there")
    for name in ("sub_scales", "sub_offsets"):
        t = named.get(name)
        if t is None:
            continue
        if t.dtype not in (torch.uint8, torch.int8):
            raise DTypeError(f"{name}: got {t.dtype}, allowed: torch.uint8, torch.int8")
        if tuple(t.shape) != (layer.out_features, groups):
            raise ShapeError(
                f"{name}: got shape {tuple(t.shape)}, expected (out_features, K/group_size) = ({layer.out_features}, {groups})"
            )
    for name in ("super_scales", "super_offsets"):
        if named[name].dtype != torch.float16:
            raise DTypeError(f"{name}: got {named[name].dtype}, allowed: torch.float16")
    shape = tuple(super_scales.shape)
    if len(shape) != 2 or shape[0] != layer.out_features or shape[1] == 0 or groups % shape[1]:
        raise ShapeError(
            f"super_scales: got shape {shape}, expected (out_features, a divisor of {groups}) with out_features = {layer.out_features}"
        )
    if tuple(super_offsets.shape) != shape:
        raise ShapeError(f"super_offsets: got shape {tuple(super_offsets.shape)}, expected super_scales' {shape}")


#: The name :func:`qalora._dispatch.tiled_route_applies` had here.
_tiled_route_applies = tiled_route_applies


def _weight_or_error(module: nn.Module):
    # A "weight" registered by someone else is returned; otherwise a typed error that says why
    # there is none (an AttributeError still, so hasattr(module, "weight") is False).
    try:
        return nn.Module.__getattr__(module, "weight")
    except AttributeError:
        raise _no_dense_weight(module) from None


def _canonical_state_dict(module: QuantLinear, state_dict: dict, prefix: str, local_metadata) -> None:
    # Files always hold the canonical layout (docs/design.md §2).
    if prefix + "tiled" in state_dict:
        del state_dict[prefix + "tiled"]
        for name, t in zip(_CANONICAL, module._canonical()):
            state_dict[prefix + name] = t


def _empty_like_entry(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else torch.empty(t.shape, dtype=t.dtype, device=device)


def _layout_of_loaded_state(module: QuantLinear, state_dict: dict, prefix: str, *args) -> None:
    # A layer takes the form the state holds: factored parameters make a plain layer a
    # factored one (buffers of the state's dtypes and shapes, then filled as usual),
    # float ones a factored layer a plain one; canonical tensors loaded into a tiled
    # layer are tiled.
    if not module.is_factored and prefix + "super_scales" in state_dict:
        device = _codes_device(module)
        module.factor_(*(_empty_like_entry(state_dict.get(prefix + name), device) for name in _FACTORED))
    if module.is_factored and prefix + "scales" in state_dict:
        module.unfactor_()
    keys = [prefix + name for name in _CANONICAL]
    if module.is_tiled and all(k in state_dict for k in keys):
        p, s, o = (state_dict.pop(k) for k in keys)
        state_dict[prefix + "tiled"] = _core.repack_tiles(
            p.cpu().contiguous(), s.cpu().to(torch.float16), o.cpu().to(torch.float16), module.bits, module.group_size
        )


class QALoRALinear(nn.Module):
    """``base_layer(x) + scaling * lora_B(lora_A(pool(dropout(x))))``.

    ``lora_A``: (rank, in/group_size) for ``adapter="qalora"``, (rank, in) for ``"lora"``;
    ``lora_B``: (out, rank), zero-initialised so a fresh adapter changes nothing.
    """

    def __init__(
        self,
        base_layer: QuantLinear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        adapter: str = "qalora",
        train_scales: bool = False,
        train_offsets: bool = False,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.rank, self.alpha, self.adapter = rank, float(alpha), adapter
        self.scaling = self.alpha / rank
        adapter_in = base_layer.in_features // base_layer.group_size if adapter == "qalora" else base_layer.in_features
        device = base_layer.packed.device
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(adapter_in, rank, bias=False, device=device)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        # Trained group parameters (docs/design.md §1), float32, zero at the start:
        #   scales  s' = s·(1 + delta_scales)          (a relative change)
        #   offsets m' = m + s·delta_offsets            (in steps of the group's code grid)
        # Both are what the deployed layout stores, so the merge folds them in exactly.
        shape = (base_layer.out_features, base_layer.in_features // base_layer.group_size)
        self.delta_scales = nn.Parameter(torch.zeros(shape, device=device)) if train_scales else None
        self.delta_offsets = nn.Parameter(torch.zeros(shape, device=device)) if train_offsets else None

    @property
    def trains_group_params(self) -> bool:
        return self.delta_scales is not None or self.delta_offsets is not None

    def group_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scales and offsets the layer computes with: the base layer's, or with trained
        group parameters the float32 ``s·(1 + delta_scales)`` and ``m + s·delta_offsets``
        (differentiable in the deltas)."""
        _, scales, offsets = self.base_layer.canonical()
        if not self.trains_group_params:
            return scales, offsets
        s = scales.float()
        m = offsets.float()
        if self.delta_offsets is not None:
            m = m + s * self.delta_offsets
        if self.delta_scales is not None:
            s = s + s * self.delta_scales
        return s, m

    def __getattr__(self, name: str):
        if name == "weight":
            return _weight_or_error(self)
        return super().__getattr__(name)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def _fused_route_applies(self, x: torch.Tensor) -> bool:
        # A QA-LoRA adapter on an untiled base, run eagerly (hooks on base_layer, lora_A,
        # lora_B and lora_dropout do not fire on this route).
        return (
            self.adapter == "qalora"
            and type(self.lora_dropout) in (nn.Identity, nn.Dropout)
            and not self.base_layer.is_tiled
            and x.dim() >= 1
            and ops.eager_route_applies(x, self.lora_A.weight, self.lora_B.weight, *self._deltas())
        )

    def _deltas(self) -> list[torch.Tensor]:
        return [d for d in (self.delta_scales, self.delta_offsets) if d is not None]

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lora_dropout(x)
        if self.adapter == "qalora":
            return ops.group_pool(x, self.base_layer.group_size)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self._fused_route_applies(x):
            # One autograd node for the whole layer (ops.qalora_linear); same arithmetic.
            x = _autocast_input(x)
            autocast = torch.is_autocast_enabled(x.device.type)
            if self.trains_group_params:
                scales, offsets, scale_factors, offset_factors = *self.group_params(), None, None
            else:  # the base layer's own (a factored layer's integers and factors)
                _, scales, offsets, scale_factors, offset_factors = base.kernel_weight()
            y = ops.qalora_linear(
                x,
                base.packed,
                scales,
                offsets,
                base.bits,
                base.group_size,
                self.lora_A.weight,
                self.lora_B.weight,
                self.scaling,
                activations=base.activations,
                adapter_dtype=torch.get_autocast_dtype(x.device.type) if autocast else None,
                dropout=getattr(self.lora_dropout, "p", 0.0) if self.lora_dropout.training else 0.0,
                scale_factors=scale_factors,
                offset_factors=offset_factors,
            )
            return y if base.bias is None else y + base.bias.to(y.dtype)
        if self.trains_group_params:
            # The base product with the trained scales/offsets (qmatmul differentiates them).
            x = _autocast_input(x)
            y = ops.qmatmul(x, base.canonical()[0], *self.group_params(), base.bits, base.group_size)
            if base.bias is not None:
                y = y + base.bias.to(y.dtype)
        else:
            y = self.base_layer(x)
        x = _autocast_input(x)
        a_in = self.adapter_input(x)
        if not torch.is_autocast_enabled(x.device.type):
            # Adapters train in their own dtype (float32 by default) whatever x is.
            a_in = a_in.to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(a_in)) * self.scaling
        return y + update.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The adapter's dense update (out, in) in float32: scaling * B A, expanded per group
        (and divided by group_size, the pooling mean) for a QA-LoRA adapter."""
        ba = self.lora_B.weight.float() @ self.lora_A.weight.float()
        if self.adapter == "qalora":
            g = self.base_layer.group_size
            ba = ba.repeat_interleave(g, dim=1) / g
        return self.scaling * ba

    @torch.no_grad()
    def merged(self, offset_dtype: torch.dtype | None = None) -> QuantLinear:
        """A QuantLinear with the adapter folded into its offsets (exact; codes unchanged).

        ``offset_dtype`` (default: the current offsets' dtype) stores the merged offsets in
        another precision, e.g. torch.float32 so that a small update is not rounded away."""
        if self.adapter != "qalora":
            raise MergeError(
                "a dense LoRA adapter (adapter='lora') varies inside quantization groups and cannot be merged "
                "into the offsets; use qalora.merge_requantize(model), which re-quantizes the merged weight"
            )
        base = self.base_layer
        packed, stored_scales, stored_offsets = base.canonical()
        offset_dtype = offset_dtype or stored_offsets.dtype
        out = QuantLinear(
            base.in_features,
            base.out_features,
            base.bits,
            base.group_size,
            base.bias is not None,
            stored_scales.dtype,
            packed.device,
            offset_dtype=offset_dtype,
        )
        out.packed.copy_(packed)
        scales, offsets = self.group_params()
        out.scales.copy_(scales)  # trained scales: rounded once to their storage dtype
        a, b = self.lora_A.weight.detach(), self.lora_B.weight.detach()
        if self.trains_group_params:
            # Trained offsets are float32: merge the adapter in float32, then round once.
            out.offsets.copy_(ops.merge_offsets(offsets.detach(), a, b, self.scaling, base.group_size))
        else:
            # Straight into the new layer's offsets: no intermediate (N, L) tensor.
            ops.merge_offsets(offsets.to(offset_dtype), a, b, self.scaling, base.group_size, out=out.offsets)
        if base.bias is not None:
            out.bias.data = base.bias.detach().clone()
        return out

    @torch.no_grad()
    def storage_rounding(self, merged: QuantLinear) -> dict[str, float]:
        """How far ``merged`` (this layer's :meth:`merged`) moved from what was trained, from
        rounding its group parameters to their storage dtypes: the largest relative change
        of a scale, and the largest change of an offset in steps of its group's scale."""
        scales, offsets = self.group_params()
        s, m = scales.detach().float(), offsets.detach().float()
        if self.adapter == "qalora":
            m = ops.merge_offsets(
                m, self.lora_A.weight.detach(), self.lora_B.weight.detach(), self.scaling, self.base_layer.group_size
            )
        # An offset's change in steps of its group's code grid; a group whose scale is 0 (a
        # K-quant sub-block can have one) is measured in its row's largest step instead.
        step = s.abs()
        row_step = step.amax(dim=-1, keepdim=True).expand_as(step) if step.numel() else step
        step = torch.where(step > 0, step, row_step).clamp_min(torch.finfo(torch.float32).tiny)
        return {
            "scale": float(((merged.scales.float() - s).abs() / step).max()) if s.numel() else 0.0,
            "offset": float(((merged.offsets.float() - m).abs() / step).max()) if m.numel() else 0.0,
        }

    @torch.no_grad()
    def merged_dense(self) -> nn.Linear:
        """The dense float32 layer this one computes: dequantized base + adapter update (what
        a QLoRA-style deployment quantizes again)."""
        base = self.base_layer
        dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=base.packed.device)
        scales, offsets = self.group_params()
        weight = ops.dequantize(base.canonical()[0], scales.detach(), offsets.detach(), base.bits, base.group_size)
        dense.weight.copy_(weight + self.delta_weight())
        if base.bias is not None:
            dense.bias.copy_(base.bias)
        return dense.requires_grad_(False)

    @torch.no_grad()
    def requantized(self) -> QuantLinear:
        """QLoRA-style deployment: dense base + adapter update, re-quantized with RTN at the
        same bits and group size. Lossy for a dense adapter; for a QA-LoRA adapter it gives back
        the same codes (the update is constant per group)."""
        base, dense = self.base_layer, self.merged_dense()
        return QuantLinear.from_weight(dense.weight, dense.bias, base.bits, base.group_size, base.param_dtypes[0])

    def extra_repr(self) -> str:
        text = f"adapter={self.adapter}, rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}"
        if self.trains_group_params:
            text += f", train_scales={self.delta_scales is not None}, train_offsets={self.delta_offsets is not None}"
        return text


def scale_dtype_of(name: str) -> torch.dtype:
    return _DTYPES[name]


class QuantEmbedding(nn.Module):
    """A frozen embedding table stored like a :class:`QuantLinear` weight: row ``i`` of the
    (num_embeddings, embedding_dim) table is quantized in groups of ``group_size`` columns.

    Buffers ``packed`` (V, D*bits/8), ``scales`` and ``offsets`` (V, D/group_size): the
    layout of a ``QuantLinear(in_features=D, out_features=V)``, so a head tied to this table
    can be a ``QuantLinear`` holding the very same tensors. A lookup gathers the rows of the
    ids asked for and dequantizes only those (the table is never made dense). ``dtype`` is
    the dtype of the vectors returned (the one the dense table had).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bits: int,
        group_size: int,
        scale_dtype: torch.dtype = torch.float16,
        device=None,
        layer_name: str = "",
        offset_dtype: torch.dtype | None = None,
        dtype: torch.dtype = torch.float32,
        padding_idx: int | None = None,
    ) -> None:
        super().__init__()
        check_group_size(embedding_dim, bits, group_size, layer_name or "QuantEmbedding")
        offset_dtype = offset_dtype or scale_dtype
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.group_size = bits, group_size
        self.dtype, self.padding_idx = dtype, padding_idx
        # Heads holding this table's tensors (a plain list, not submodules: they belong where
        # the model put them). Kept so that .to() / .half() / .cuda() leave them sharing.
        self._tied_heads: list[QuantLinear] = []
        groups = embedding_dim // group_size
        self.register_buffer(
            "packed", torch.zeros(num_embeddings, embedding_dim * bits // 8, dtype=torch.uint8, device=device)
        )
        self.register_buffer("scales", torch.zeros(num_embeddings, groups, dtype=scale_dtype, device=device))
        self.register_buffer("offsets", torch.zeros(num_embeddings, groups, dtype=offset_dtype, device=device))

    def __getattr__(self, name: str):
        if name == "weight":
            return _weight_or_error(self)
        return super().__getattr__(name)

    # The names a QuantLinear over the same table has (its in/out features): the GGUF
    # writer and the tied head read them.
    @property
    def in_features(self) -> int:
        return self.embedding_dim

    @property
    def out_features(self) -> int:
        return self.num_embeddings

    @classmethod
    def from_embedding(
        cls,
        embedding: nn.Embedding,
        bits: int,
        group_size: int,
        scale_dtype: torch.dtype = torch.float16,
        layer_name: str = "",
    ) -> QuantEmbedding:
        """Quantizes ``embedding.weight`` with min-max RTN (as :meth:`QuantLinear.from_weight`)."""
        weight = embedding.weight
        layer = cls(
            weight.shape[0],
            weight.shape[1],
            bits,
            group_size,
            scale_dtype,
            weight.device,
            layer_name,
            dtype=weight.dtype,
            padding_idx=embedding.padding_idx,
        )
        with torch.no_grad():
            packed, scales, offsets = ops.quantize(weight.detach(), bits, group_size, scale_dtype)
            layer.packed.copy_(packed)
            layer.scales.copy_(scales)
            layer.offsets.copy_(offsets)
        return layer

    def tied_head(self, bias: torch.Tensor | None = None) -> QuantLinear:
        """A :class:`QuantLinear` output head (hidden -> vocabulary logits) that holds this
        table's own ``packed``/``scales``/``offsets`` tensors: no second copy, and the tie
        stays a tie."""
        head = QuantLinear(
            self.embedding_dim,
            self.num_embeddings,
            self.bits,
            self.group_size,
            bias is not None,
            self.scales.dtype,
            "meta",
            offset_dtype=self.offsets.dtype,
        )
        self.share_into(head)
        if bias is not None:
            head.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return head

    def share_into(self, head: QuantLinear) -> None:
        """Makes ``head`` hold this table's tensors (the same objects)."""
        for name in ("packed", "scales", "offsets"):
            head._buffers[name] = self._buffers[name]
        if not any(h is head for h in self._tied_heads):
            self._tied_heads.append(head)

    def _apply(self, fn, recurse=True):
        # nn.Module converts each module's buffers on its own, which would give a tied head
        # converted copies of its own: hand it the table's converted tensors again (a head
        # converted later gets them back unchanged, .to() of a converted tensor is itself).
        out = super()._apply(fn, recurse)
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype  # the lookup follows .half() etc.
        for head in self._tied_heads:
            self.share_into(head)
        return out

    @property
    def param_dtypes(self) -> tuple[torch.dtype, torch.dtype]:
        """The dtypes of ``scales`` and ``offsets`` (as :attr:`QuantLinear.param_dtypes`)."""
        return self.scales.dtype, self.offsets.dtype

    def row_params(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scales, offsets)`` of the rows ``rows`` (as :meth:`QuantLinear.row_params`)."""
        return self.scales[rows], self.offsets[rows]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (num_embeddings, embedding_dim) table (for tests and exports)."""
        return ops.dequantize(self.packed, self.scales, self.offsets, self.bits, self.group_size, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = ops.dequantize(
            self.packed.index_select(0, flat),
            self.scales.index_select(0, flat),
            self.offsets.index_select(0, flat),
            self.bits,
            self.group_size,
            self.dtype,
        )
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}, "
            f"scale_dtype={self.scales.dtype}, offset_dtype={self.offsets.dtype}, dtype={self.dtype}"
        )
