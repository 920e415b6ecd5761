"""The training state of a model's LSHLinear layers that its state_dict leaves out, for exact resumes.

A state_dict of an LSHLinear is exactly that of ``nn.Linear`` (weight, bias), so a plain
``nn.Linear`` checkpoint loads into it and the reverse. What it leaves out is what a resumed run
needs to continue *exactly* like one that never stopped:

- ``step``: the training-step counter that drives the rebuild schedule and the per-step seeds;
- the hash tables: they were built from the weights of the last rebuild, not from the weights at
  the time of the checkpoint, so rebuilding them from the loaded weights would give other active
  sets. They are saved as they are (int32; ``L * N`` entries plus offsets, small next to the weight),
  with what the next incremental rebuild starts from: each row's codes and fingerprint, and the
  asymmetric transform's ``M``.

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

from typing import Any

import torch
from torch import nn

from .nn import LSHLinear


def lsh_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The state of every LSHLinear in ``model`` (itself included) outside its state_dict, keyed by
    qualified module name (``""`` for ``model`` itself): ``{"step": int, "tables": {"offsets",
    "items", "codes", "fingerprints", "max_norm"} or None}``. Tables are None when stale (they will be built from the loaded weights on
    first use, as in the run that saved them). Tensors are copies, so the state does not change as
    training goes on; it holds plain ints, dicts and tensors (``torch.load(weights_only=True)`` reads it)."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, LSHLinear):
            t = module.tables
            tables = None if module._stale else {
                name: None if value is None else value.detach().clone()
                for name, value in (("offsets", t.offsets), ("items", t.items), ("codes", t.codes),
                                    ("fingerprints", t.fingerprints), ("max_norm", t.max_norm))}
            state[name] = {"step": int(module.step), "tables": tables}
    return state


def load_lsh_state(model: nn.Module, state: dict[str, dict[str, Any]], strict: bool = True) -> None:
    """Restore what :func:`lsh_state` saved; call it after ``model.load_state_dict``.

    With ``strict`` (default) the LSHLinear layers of ``model`` and the entries of ``state`` must
    match one to one; otherwise layers without an entry are left alone (their tables rebuild from
    the weights on first use) and entries without a layer are ignored. Tables of the wrong shape
    (another ``num_tables``, ``bits`` or ``out_features``) raise a ValueError naming the layer.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict from lsh_state(), got {type(state).__name__}")
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
        step, tables = entry["step"], entry["tables"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"load_lsh_state: layer {name!r}: step must be a non-negative int, got {step!r}")
        if tables is not None:
            offsets, items = tables["offsets"], tables["items"]
            t = layer.tables
            rows, cols = (1, 3) if t.selection == "random" else (t.num_tables, 2 ** t.bits + 1)
            if (tuple(offsets.shape) != (rows, cols) or tuple(items.shape) != (rows, layer.out_features)
                    or offsets.dtype != torch.int32 or items.dtype != torch.int32):
                raise ValueError(f"load_lsh_state: layer {name!r}: saved tables (offsets {tuple(offsets.shape)}, "
                                 f"items {tuple(items.shape)}) do not fit this layer (int32 offsets "
                                 f"{[rows, cols]}, items {[rows, layer.out_features]})")
            tables = {**tables, "offsets": offsets, "items": items}
            codes, fingerprints = tables.get("codes"), tables.get("fingerprints")
            if codes is not None and codes.numel() and (tuple(codes.shape) != (t.num_tables, layer.out_features)
                                      or fingerprints is None or tuple(fingerprints.shape) != (layer.out_features,)):
                raise ValueError(f"load_lsh_state: layer {name!r}: saved codes {tuple(codes.shape)} do not fit this "
                                 f"layer ([{t.num_tables}, {layer.out_features}], with fingerprints "
                                 f"[{layer.out_features}])")
        updates.append((layer, step, tables))
    for layer, step, tables in updates:
        if tables is None:
            layer._mark_stale()
        else:
            device = layer.weight.device
            for name in ("offsets", "items", "codes", "fingerprints", "max_norm"):
                value = tables.get(name)
                if name in ("offsets", "items") or value is not None:
                    setattr(layer.tables, name, value.to(device).clone())
                elif name == "codes":  # a state without codes: the next rebuild hashes every row
                    layer.tables.codes = layer.tables.codes.new_zeros(layer.tables.num_tables, 0)
            layer._stale = False
        layer.step = step
