"""One-call conversion of a model's nn.Linear layers to LSHLinear, and back."""
from __future__ import annotations

import inspect
import sys
import warnings
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._checks import check_int, check_module
from .nn import LSHLinear

Filter = Callable[[str, nn.Module], bool]


def convert(model: nn.Module, min_out_features: int = 1000, filter: Optional[Filter] = None, *,
            seed: int = 0, **lsh_kwargs) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of ``model`` that passes the filter by an
    :class:`~lsh_torch.LSHLinear` holding the very same weight and bias parameters.

    Args:
        model: any module; nested modules (``Sequential``, ``ModuleList``, a transformer's blocks
            and output head, ...) are searched recursively.
        min_out_features: the default filter: convert the layers of exact type ``nn.Linear``
            (parametrized or not) with ``out_features >= min_out_features`` (wide layers are where
            hashing pays), except the second factor of a gated MLP (see below).
        filter: ``filter(name, linear) -> bool`` instead of the default, called with the
            qualified name and each ``nn.Linear`` (subclasses included) of the model. A selected
            subclass with parameters or a forward of its own (LoRA-like) is refused.
        seed: seed of the first converted layer; the i-th converted layer (in ``named_modules``
            order) gets ``seed + i``, so layers hash with independent projections.
        **lsh_kwargs: hashing options passed to every ``LSHLinear`` (``active=``,
            ``num_tables=``, ``rebuild=``, ``mode=``, ``inference=``, ...).

    Returns:
        ``model`` (converted in place), or the new ``LSHLinear`` if ``model`` itself is a
        ``nn.Linear`` that passes the filter.

    The new layer takes over the ``nn.Linear``'s ``Parameter`` objects rather than copies, so
    weight tying, an optimizer built before the conversion and ``requires_grad`` flags keep
    working, and the model's ``state_dict`` keys do not change (a checkpoint of the original loads
    into the converted model and the reverse). The global random state is left untouched. Hooks
    registered on a replaced ``nn.Linear`` are not carried over. A module used at several places
    is replaced by one ``LSHLinear`` at all of them.

    Gated MLPs (LLaMA, Mistral, Qwen, Gemma: ``down_proj(act(gate_proj(x)) * up_proj(x))``; T5's
    ``wi_0``/``wi_1``, SwiGLU's ``w1``/``w3``; found by these names and one shape): the default filter converts
    the gate and leaves the second factor (and a fused ``gate_up_proj``) dense. Each converted layer draws its own active set, and the product is nonzero only where
    both are active: two sets of 25% of 2,048 units shared 130 (measured), so three quarters of
    the computed units reached nothing. Converted alone, ``gate_proj``'s set decides which units
    reach ``down_proj``, at its full budget.

    A layer whose weight is computed on every call (``weight_norm``, ``torch.nn.utils.parametrize``)
    is left as it is, with a warning: hash tables follow a weight Parameter updated in place, not
    one recomputed per call. Remove the parametrization first to convert it.

    Modules that read a linear layer's weight without calling it: ``nn.MultiheadAttention``'s
    ``out_proj`` (a filter that selects it is told so, and it stays an ``nn.Linear``), and the
    ``linear1``/``linear2`` of an ``nn.TransformerEncoderLayer`` in eval under ``no_grad``, where its
    settings allow torch's fused fast path (``batch_first=True``, ...), which computes them densely
    (with ``inference="lsh"`` a warning says so,
    and ``torch.backends.mha.set_fastpath_enabled(False)`` makes eval call the LSHLinear).
    """
    if filter is not None:
        filter = _checked_filter("convert", filter)
    else:
        min_out_features = check_int("min_out_features", min_out_features, 1, 2 ** 62)
        second_factors = _gated_second_factors(model) if isinstance(model, nn.Module) else set()  # else refused below
        filter = lambda name, m: (_unparametrized_type(m) is nn.Linear and m.out_features >= min_out_features  # noqa: E731
                                  and id(m) not in second_factors)
    seed = check_int("seed", seed, 0, 2 ** 31 - 1)  # (True became seed 1; a string failed in the range below)
    counter = iter(range(seed, seed + 2 ** 31))
    options = inspect.signature(LSHLinear.__init__).parameters
    unknown = sorted(set(lsh_kwargs) - {name for name, p in options.items() if p.kind is p.KEYWORD_ONLY})
    if unknown:  # checked here, not by the first layer made: with no layer converted a typo passed unseen
        raise TypeError(f"convert: unknown LSHLinear option(s) {unknown}")

    unread = _weights_read_directly(model) if isinstance(model, nn.Module) else {}

    def make(linear: nn.Linear) -> LSHLinear:
        with torch.random.fork_rng(devices=_devices(linear.weight)):  # the unused init draws no numbers
            layer = LSHLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              device=linear.weight.device, dtype=linear.weight.dtype, seed=next(counter),
                              **lsh_kwargs)
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer._mark_stale()
        return layer.train(linear.training)

    def select(name: str, m: nn.Module) -> bool:
        if not (isinstance(m, nn.Linear) and filter(name, m)):
            return False
        kind = _unparametrized_type(m)
        extra = sorted(set(m._parameters) - {"weight", "bias"})
        if kind is not nn.Linear and (extra or kind.forward is not nn.Linear.forward):
            # A LoRA-like subclass: its own parameters and forward would be dropped, silently.
            raise ValueError(f"convert: {name or kind.__name__!r} is a {kind.__name__}, an nn.Linear subclass with "
                             f"{f'parameters {extra}' if extra else 'a forward'} of its own, which an LSHLinear would "
                             "drop; leave it out of the filter; the model is unchanged")
        if not (m.in_features and m.out_features):  # (LSHLinear refuses them; the whole conversion failed)
            warnings.warn(f"convert: left {name or type(m).__name__!r} as an nn.Linear: in_features={m.in_features}, "
                          f"out_features={m.out_features}, nothing to hash", stacklevel=4)
            return False
        computed = [p for p in ("weight", "bias") if parametrize.is_parametrized(m, p)
                    or (p == "weight" and not isinstance(m._parameters.get(p), nn.Parameter))]
        if computed:
            warnings.warn(f"convert: left {name or type(m).__name__!r} as an nn.Linear: its {' and '.join(computed)} "
                          f"{'is' if len(computed) == 1 else 'are'} computed on every call (weight_norm or "
                          "torch.nn.utils.parametrize), and LSHLinear's hash tables need Parameters updated in place; "
                          "remove the parametrization to convert it", stacklevel=4)
            return False
        reader = unread.get(id(m))
        if reader == "attention":
            warnings.warn(f"convert: left {name!r} as an nn.Linear: nn.MultiheadAttention reads its out_proj's weight "
                          "and never calls it, so an LSHLinear there would compute every output anyway", stacklevel=4)
            return False
        if reader == "fast path" and lsh_kwargs.get("inference") == "lsh":
            warnings.warn(f"convert: {name!r} is a linear layer of an nn.TransformerEncoderLayer, whose eval under "
                          "no_grad takes torch's fused fast path: it reads the weight and computes every output, so "
                          "inference='lsh' applies there only with torch.backends.mha.set_fastpath_enabled(False)",
                          stacklevel=4)
        return True

    return _replace(model, select, make)


def unconvert(model: nn.Module, filter: Optional[Filter] = None) -> nn.Module:
    """The reverse of :func:`convert`: replace, in place, every :class:`~lsh_torch.LSHLinear`
    (that passes ``filter(name, layer)``, if given) by an ``nn.Linear`` holding the same weight and
    bias parameters. Returns ``model``, or the new ``nn.Linear`` if ``model`` is an ``LSHLinear``.
    """
    def make(layer: LSHLinear) -> nn.Linear:
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = layer.weight
        linear.bias = layer.bias
        return linear.train(layer.training)

    if filter is not None:
        filter = _checked_filter("unconvert", filter)
    return _replace(model, lambda name, m: isinstance(m, LSHLinear) and (filter is None or filter(name, m)), make)


def _checked_filter(op: str, filter: Filter) -> Filter:
    """``filter``, calling which returns a bool (a truthy string such as "no" would convert the layer)."""
    if not callable(filter):
        raise TypeError(f"{op}: filter must be a callable filter(name, linear) -> bool, got {filter!r}")
    numpy = sys.modules.get("numpy")
    bools = (bool, numpy.bool_) if numpy is not None else (bool,)

    def checked(name: str, m: nn.Module) -> bool:
        chosen = filter(name, m)
        if not isinstance(chosen, bools):
            raise TypeError(f"{op}: filter must return a bool, got {chosen!r} for {name or type(m).__name__!r}")
        return bool(chosen)
    return checked


def _replace(model: nn.Module, select: Callable[[str, nn.Module], bool], make) -> nn.Module:
    check_module("model", model)
    new = {}  # id(old module) -> its replacement, so a shared module stays shared
    for name, module in model.named_modules():
        if select(name, module):
            try:
                new[id(module)] = make(module)
            except (TypeError, ValueError) as error:  # an option this layer cannot take (active above its width, ...)
                kind = TypeError if isinstance(error, TypeError) else ValueError
                raise kind(f"{name or type(module).__name__!r} ({module}): {error}; the model is unchanged") from error
    if id(model) in new:
        return new[id(model)]
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):  # named_children() skips a repeated child
            if child is not None and id(child) in new:
                setattr(parent, child_name, new[id(child)])
    return model


# (gate, second factor) names of gated MLPs: LLaMA and its kin, T5's gated-GELU, SwiGLU's w1/w3 (LFM2, ...).
GATED_PAIRS = (("gate_proj", "up_proj"), ("wi_0", "wi_1"), ("w1", "w3"))


def _gated_second_factors(model: nn.Module) -> set[int]:
    """The ids of the layers whose outputs multiply another converted layer's, unit by unit, found by
    their names (:data:`GATED_PAIRS`): a gated MLP's second factor beside its gate, and fused
    ``gate_up_proj`` layers."""
    found = set()
    for name, module in model.named_modules():
        for gate, second in GATED_PAIRS:
            a, b = getattr(module, gate, None), getattr(module, second, None)
            # Of one shape, as a gate and its second factor are: an MLP of layers w1, w2, w3 in a row is none.
            if isinstance(a, nn.Linear) and isinstance(b, nn.Linear) and a.weight.shape == b.weight.shape:
                found.add(id(b))
        if name.rsplit(".", 1)[-1] == "gate_up_proj" and isinstance(module, nn.Linear):
            found.add(id(module))
    return found


def _weights_read_directly(model: nn.Module) -> dict[int, str]:
    """Linear layers that torch modules read without calling them, by id: an ``nn.MultiheadAttention``'s
    ``out_proj`` ("attention": always) and an ``nn.TransformerEncoderLayer``'s feed-forward layers
    ("fast path": its fused eval under ``no_grad``)."""
    found = {}
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            found[id(module.out_proj)] = "attention"
        if isinstance(module, nn.TransformerEncoderLayer) and _may_take_the_fast_path(module):
            found.update({id(module.linear1): "fast path", id(module.linear2): "fast path"})
    return found


def _may_take_the_fast_path(layer: nn.TransformerEncoderLayer) -> bool:
    """Whether the layer's fixed settings let torch's fused eval take over (its forward checks these, then the
    input's; the default batch_first=False never does)."""
    attention = layer.self_attn
    return (attention.batch_first and attention.in_proj_bias is not None and attention._qkv_same_embed_dim
            and layer.activation_relu_or_gelu and layer.norm1.eps == layer.norm2.eps and attention.num_heads % 2 == 0)


def _unparametrized_type(module: nn.Module) -> type:
    """The class before ``torch.nn.utils.parametrize`` wrapped it in a subclass."""
    return type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)


def _devices(tensor: torch.Tensor) -> list[int]:
    if tensor.device.type == "cuda":
        return [tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()]
    return []
