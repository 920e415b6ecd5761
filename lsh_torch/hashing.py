"""Signed random projections (SimHash) with the asymmetric MIPS transform.

A neuron's weight row ``w`` and an input ``x`` are hashed so that they collide more often the
larger ``w · x`` is: rows go through ``P(w) = [w / M, sqrt(1 - |w / M|^2)]`` and inputs through
``Q(x) = [x / |x|, 0]``; then ``K`` signs of random Gaussian projections make one table's code.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops


def make_projection(in_features: int, num_tables: int, bits: int, seed: int, device=None) -> Tensor:
    """Gaussian projection matrix ``[in_features + 1, L*K]`` (float32), the same on every device for a seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(in_features + 1, num_tables * bits, generator=gen, device="cpu").to(device)


def row_codes(weight: Tensor, projection: Tensor, num_tables: int, bits: int, asymmetric: bool = True,
              center: bool = False, max_norm: Optional[Tensor] = None) -> Tensor:
    """Codes ``[N, L]`` of the neurons' weight rows: the data side of the asymmetric transform, or
    with ``asymmetric=False`` the rows' directions alone (plain angular SimHash, blind to norms).
    ``center`` hashes ``w_j - mean_j(w_j)``: every output shifts by the same ``mean·x``, so a
    softmax and its top-k are unchanged, while the direction all rows share stops crowding them
    into a few buckets. ``max_norm`` fixes the transform's ``M`` (see :func:`ops.mips_transform`)."""
    # Hashing runs in float32 whatever the layer's dtype (``module.to(dtype)`` may have cast the
    # projection; float32 values survive the round trip exactly).
    rows = weight.detach().float()
    if center:
        rows = rows - rows.mean(0)
    if asymmetric:
        rows, projection = ops.mips_transform(rows, False, max_norm), projection.float()
    else:  # signs of projections ignore a row's scale: no need to normalize (the transform's last column is 0)
        projection = projection[:-1].float()
    # In chunks of rows: the projections and margins of all 670K rows at once took 1.6 GB.
    codes = [ops.hash_codes(part @ projection, num_tables, bits)[0] for part in rows.split(ROW_CHUNK)]
    return torch.cat(codes) if codes else rows.new_empty(0, num_tables, dtype=torch.int32)


ROW_CHUNK = 65536


def input_codes(x: Tensor, projection: Tensor, num_tables: int, bits: int) -> tuple[Tensor, Tensor]:
    """Codes ``[B, L]`` and bit margins ``[B, L*K]`` of a batch of inputs (query side)."""
    projected = ops.mips_transform(x.detach().float(), True) @ projection.float()
    return ops.hash_codes(projected, num_tables, bits)
