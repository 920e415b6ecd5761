"""Argument checks with messages that name the argument, shared by the Python layer."""
from __future__ import annotations

import numbers
import os
import sys
import weakref

import torch

MAX_BITS = 20  # the limits of csrc/lsh_common.h
MAX_TABLES = 1024
MAX_PROBES = 128
MAX_TRIES = 64  # draws per tail entry of proposal_draw


def check_int(name: str, value, low: int, high: int) -> int:
    """``value`` as a Python int: an int, or an integer scalar such as ``numpy.int64`` (not a bool, not
    a tensor). An int is returned as it is: under ``torch.compile`` a symbolic size stays symbolic."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not isinstance(value, int):
        value = int(value)
    if not low <= value <= high:
        bounds = f"at least {low}" if high >= 2 ** 62 else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def integer_scalar(value):
    """A 0-dim integer tensor as a Python int (``torch.topk`` takes one for ``k``); anything else unchanged,
    for :func:`check_int` to judge."""
    if (isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool
            and not value.is_floating_point() and not value.is_complex()):
        return int(value)
    return value


def refuse(bad: torch.Tensor, message: str, detail=None, synced: bool = False) -> None:
    """Raise ``ValueError(message)`` if any entry of ``bad`` is true: on the CPU at once (one host read;
    ``detail(bad)``, if given, adds what was found), under ``torch.compile`` or on another device as an
    assertion on the device (no host sync, no graph break; but a failed one ends the CUDA context).
    ``synced``: the caller waits for the device anyway (a boolean mask's indexing), so the host read
    costs nothing more and a failure raises on every device."""
    if torch.compiler.is_compiling() or (bad.device.type != "cpu" and not synced):
        torch._assert_async(~bad.any(), message)
    elif bool(bad.any()):
        raise ValueError(message + (detail(bad) if detail is not None else ""))


# vouch()'s marks: id(tensor) -> (a weak reference to it, its version when marked). Kept here, not on the tensor: an
# attribute would travel with a copy (pickle, torch.save, deepcopy) whose version restarts at 0, so a set edited
# and then saved could pass unchecked.
_vouched: dict[int, tuple[weakref.ref, int]] = {}


def vouch(*tensors) -> None:
    """Marks tensors valid by construction (forward_sparse's indices and log-weights) so that the loss does not
    check them again: sorting a per-row set to find a repeated neuron was 60% of sparse_cross_entropy's forward
    (1,024 rows of 256). Eager only; an in-place change (a new version) drops the mark, a copy does not carry it,
    and an inference tensor, which has no version, is not marked. (Writes that bypass the version counter,
    ``.data`` or a NumPy view, are not seen.)"""
    if torch.compiler.is_compiling():
        return
    for t in tensors:
        if t is not None and not t.is_inference():
            key = id(t)
            _vouched[key] = (weakref.ref(t, lambda _, key=key: _vouched.pop(key, None)), t._version)


def vouched(t) -> bool:
    """Was ``t`` marked by :func:`vouch` and not changed since?"""
    if torch.compiler.is_compiling() or not isinstance(t, torch.Tensor) or t.is_inference():
        return False
    mark = _vouched.get(id(t))
    return mark is not None and mark[0]() is t and mark[1] == t._version


def autocast_on(device_type: str) -> bool:
    """Is autocast enabled for ``device_type`` (False where it has none: meta)?"""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def check_module(name: str, value) -> None:
    """``value`` must be an ``nn.Module`` (a list of layers fails later, with an AttributeError)."""
    if not isinstance(value, torch.nn.Module):
        raise TypeError(f"{name} must be an nn.Module, got {type(value).__name__}")


def check_bool(name: str, value) -> bool:
    """``value`` as a Python bool: a bool, a numpy bool or a 0-dim bool tensor (what numpy ints and 0-dim int tensors
    are to :func:`check_int`); ``bool("no")`` is True, so no other truthy stand-in is taken."""
    numpy = sys.modules.get("numpy")
    if (isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype == torch.bool
            or numpy is not None and isinstance(value, numpy.bool_)):
        return bool(value)
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def int_or_float(name: str, value, expected: str) -> int | float:
    """``value`` as a Python int (a count) or float (a fraction), numpy scalars included; ``expected``
    completes the TypeError's "must be ..."."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def user_stacklevel() -> int:
    """``warnings.warn``'s ``stacklevel`` for the first frame outside this package and torch, called
    from the function that warns: the user's line, however many wrappers (``torch.compiler.disable``,
    autograd, module calls) lie between."""
    package, torch_dir = os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith((package + os.sep, torch_dir + os.sep)):
        frame, level = frame.f_back, level + 1
    return level

