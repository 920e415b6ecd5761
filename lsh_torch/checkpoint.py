"""The training state of a model's LSHLinear layers that its state_dict leaves out, for exact resumes.

A state_dict of an LSHLinear is exactly that of ``nn.Linear`` (weight, bias), so a plain
``nn.Linear`` checkpoint loads into it and the reverse. What it leaves out is what a resumed run
needs to continue *exactly* like one that never stopped:

- ``step``: the training-step counter that drives the rebuild schedule and the per-step seeds;
- the hash tables: they were built from the weights of the last rebuild, not from the weights at
  the time of the checkpoint, so rebuilding them from the loaded weights would give other active
  sets. They are saved as they are (int32; ``L * N`` entries plus offsets, small next to the weight),
  with what the next incremental rebuild starts from: each row's codes and fingerprint, and the
  asymmetric transform's ``M``; and the hash family that built them (``"srp"``, or
  ``"dwta(bin_size=8)"``), since tables hashed by another family fit the same shapes but not the
  layer's queries.

Save::

    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "lsh": lsh_torch.lsh_state(model)}, path)

Resume (in that order: loading a state_dict marks the tables stale, loading the LSH state after it
installs the saved ones)::

    ckpt = torch.load(path)
    model.load_state_dict(ckpt["model"]); opt.load_state_dict(ckpt["optimizer"])
    lsh_torch.load_lsh_state(model, ckpt["lsh"])
"""
from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import nn

from ._checks import check_bool, check_module
from .nn import LSHLinear
from .tables import TABLE_BUFFERS, bucket_of_item


def lsh_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The state of every LSHLinear in ``model`` (itself included) outside its state_dict, keyed by
    qualified module name (``""`` for ``model`` itself): ``{"step": int, "tables": {"offsets",
    "items", "codes", "fingerprints", "norms", "max_norm", "hash", "hashed_with", "current", "stepped"} or None}``. Tables are None when stale (they will be built from the loaded weights on
    first use, as in the run that saved them). Tensors are copies, so the state does not change as
    training goes on; it holds plain ints, dicts and tensors (``torch.load(weights_only=True)`` reads it)."""
    check_module("model", model)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, LSHLinear):
            t = module.tables
            tables = None if module._stale else {
                name: value.detach().clone()
                for name, value in ((name, getattr(t, name)) for name in TABLE_BUFFERS)}
            if tables is not None:
                if not bool(t.max_norm > 0):  # none (no asymmetric transform)
                    tables["max_norm"] = None
                tables["hash"] = str(t.hash)
                tables["hashed_with"] = _hashed_with(t)
                # Whether eval answers from them (as training left them) or re-hashes (a write since): resumed alike.
                tables["current"] = module._tables_current()
                tables["stepped"] = module._stepped_version is not None  # (a write since then: not warned of)
            state[name] = {"step": int(module.step), "tables": tables}
    return state


def load_lsh_state(model: nn.Module, state: dict[str, dict[str, Any]], strict: bool = True) -> None:
    """Restore what :func:`lsh_state` saved; call it after ``model.load_state_dict``.

    With ``strict`` (default) the LSHLinear layers of ``model`` and the entries of ``state`` must
    match one to one; otherwise layers without an entry are left alone (their tables rebuild from
    the weights on first use) and entries without a layer are ignored. Tables of the wrong shape
    (another ``num_tables``, ``bits`` or ``out_features``) raise a ValueError naming the layer.
    """
    check_module("model", model)
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict from lsh_state(), got {type(state).__name__}")
    strict = check_bool("strict", strict)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LSHLinear)}
    if strict and set(layers) != set(state):
        missing, unexpected = sorted(set(layers) - set(state)), sorted(set(state) - set(layers))
        raise KeyError(f"load_lsh_state: LSHLinear layers without state: {missing}; state without a layer: "
                       f"{unexpected}")
    updates = []  # validate every entry before changing any layer
    for name, layer in layers.items():
        if name not in state:
            continue
        entry = state[name]
        if not isinstance(entry, dict) or set(entry) != {"step", "tables"}:
            raise ValueError(f"load_lsh_state: layer {name!r}: the entry must be a dict with 'step' and 'tables', got "
                             f"{entry if not isinstance(entry, dict) else sorted(entry)!r}")
        step, tables = entry["step"], entry["tables"]
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:  # numpy ints too
            raise ValueError(f"load_lsh_state: layer {name!r}: step must be a non-negative int, got {step!r}")
        if tables is not None:
            if layer.weight.is_meta:  # moved to meta, the saved tables were lost (and a later lsh_state failed)
                raise RuntimeError(f"load_lsh_state: layer {name!r} is on the meta device: load its weights first "
                                   "(load_state_dict(..., assign=True), or to_empty() then load_state_dict), then "
                                   "load_lsh_state")
            problem = _tables_problem(layer, tables)
            if problem:
                raise ValueError(f"load_lsh_state: layer {name!r}: the saved tables do not fit this layer or are "
                                 f"corrupt: {problem}")
        updates.append((layer, int(step), tables))
    for layer, step, tables in updates:
        if tables is None:
            layer._mark_stale()
        else:
            device = layer.weight.device
            layer.tables.materialise(device)
            t = layer.tables
            saved = {name: tables.get(name) for name in TABLE_BUFFERS}
            if saved["max_norm"] is None:
                saved["max_norm"] = torch.zeros_like(t.max_norm)
            without_codes = saved["codes"] is None or not saved["codes"].numel()
            for name, value in saved.items():
                if value is not None and (value.numel() or not without_codes):
                    # (M of a float64 layer saved before it was float32 whatever the layer's dtype: rounded, it
                    # stays above every norm, within its 1e-5 slack.)
                    setattr(t, name, value.to(device, getattr(t, name).dtype).clone())
            if without_codes and t.selection != "random":
                t.forget_codes()
            if saved["norms"] is None:  # (states saved before the tables kept their rows' norms)
                t.take_norms(layer.weight)
            t.mark_built()
            layer._stale = False
            # (States saved before "current" was: the tables training left.) Eval re-hashes where the run that
            # saved them would, and training warns of a write where it would.
            # (States saved before "stepped" was: a run past its warm-up has stepped since its last build, most likely.)
            layer._restore_versions(tables.get("current", True), tables.get("stepped", step > layer.warmup))
            layer._tables_from_checkpoint = True  # a load_state_dict before their first use warns
        layer.step = step


def _hashed_with(t) -> dict:
    """What, beside the shapes and the family, decides a row's codes: tables hashed otherwise are not this layer's."""
    return {"seed": t.seed, "in_features": t.in_features, "asymmetric": t.asymmetric, "center": t.center}


def _tables_problem(layer: LSHLinear, tables) -> str:
    """What is wrong with saved tables for ``layer`` ("" if nothing): a query or rebuild reads them
    unchecked in places, so a corrupt checkpoint is refused here, not at some later step."""
    t, n = layer.tables, layer.out_features
    if not isinstance(tables, dict) or not {"offsets", "items"} <= set(tables):
        return "tables must be a dict with at least 'offsets' and 'items'"
    rows, buckets = (1, 2) if t.selection == "random" else (t.num_tables, 2 ** t.bits)
    family = tables.get("hash", "srp")  # states saved before DWTA existed were SimHash's
    if t.selection != "random" and family != str(t.hash):
        return f"they were hashed with hash={family!r}, this layer hashes with hash='{t.hash}'"
    saved = tables.get("hashed_with", {})  # absent from states saved before it was
    if t.selection != "random" and isinstance(saved, dict):
        for key, value in _hashed_with(t).items():
            if key in saved and saved[key] != value:
                return f"they were hashed with {key}={saved[key]!r}, this layer hashes with {key}={value!r}"
    offsets, items = tables["offsets"], tables["items"]
    if isinstance(items, torch.Tensor) and items.dim() == 2 and items.shape[1] != n:  # the likeliest mistakes, named
        return f"they were saved for out_features={items.shape[1]}, this layer has out_features={n}"
    if isinstance(offsets, torch.Tensor) and offsets.dim() == 2 and offsets.shape[0] != rows:
        return f"they were saved with num_tables={offsets.shape[0]}, this layer has num_tables={rows}"
    saved_buckets = offsets.shape[1] - 1 if isinstance(offsets, torch.Tensor) and offsets.dim() == 2 else buckets
    if saved_buckets != buckets and saved_buckets > 0 and saved_buckets & (saved_buckets - 1) == 0:
        return f"they were saved with bits={saved_buckets.bit_length() - 1}, this layer has bits={t.bits}"
    expected = {"offsets": (torch.int32, (rows, buckets + 1)), "items": (torch.int32, (rows, n)),
                "codes": (torch.int32, (t.num_tables, n)), "fingerprints": (torch.float32, (n,)),
                "norms": (torch.float32, (n,)),
                "max_norm": (None, ())}  # max_norm: a float of the weight's dtype, float32 or wider
    for key, (dtype, shape) in expected.items():
        value = tables.get(key)
        if value is None or (key in ("codes", "fingerprints", "norms") and isinstance(value, torch.Tensor)
                             and value.numel() == 0):  # none yet (random selection, or before a build)
            continue
        if (not isinstance(value, torch.Tensor) or tuple(value.shape) != shape
                or (value.dtype != dtype if dtype else not value.dtype.is_floating_point)):
            got = (f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__)
            return f"{key} must be {dtype or 'floating'} of shape {list(shape)}, got {got}"
    offsets, items = tables["offsets"].cpu().long(), tables["items"].cpu().long()
    sizes = offsets.diff(dim=1)
    if (offsets[:, 0] != 0).any() or (offsets[:, -1] != n).any() or (sizes < 0).any():
        return f"offsets must rise from 0 to out_features = {n} in every table"
    if not torch.equal(items.sort(dim=1).values, torch.arange(n).expand(rows, n)):
        return f"items must hold every neuron of [0, {n}) once per table"
    # Queries and incremental rebuilds rely on each bucket's ids ascending (as every build leaves them).
    bucket = bucket_of_item(offsets, items)
    same_bucket = bucket[:, 1:] == bucket[:, :-1]
    if (same_bucket & (items[:, 1:] <= items[:, :-1])).any():
        return "the ids in each bucket must ascend"
    codes = tables.get("codes")
    if codes is not None and codes.numel():
        codes = codes.cpu()
        fingerprints = tables.get("fingerprints")
        if fingerprints is None or fingerprints.numel() == 0:
            return "codes were saved without fingerprints"
        if (codes < 0).any() or (codes >= buckets).any():
            return f"codes must be in [0, 2^bits = {buckets})"
        if not torch.equal(codes.long().gather(1, items), bucket):
            return "items are not bucketed by their codes"
    norms = tables.get("norms")
    if norms is not None and norms.numel() and not bool((norms >= 0).all()):
        return "norms must be >= 0 (row norms), got a negative or NaN one"
    max_norm = tables.get("max_norm")
    if max_norm is not None and not (torch.isfinite(max_norm) and max_norm > 0):
        return f"max_norm must be positive and finite, got {max_norm.item()}"
    return ""
