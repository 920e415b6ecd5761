"""The L hash tables of one layer: built from its weight rows, queried with its inputs."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import hashing, ops
from ._checks import MAX_BITS, MAX_PROBES, MAX_TABLES, check_int


class LSHTables(nn.Module):
    """L CSR hash tables over the rows of a weight matrix; all state in non-persistent buffers.

    Buffers follow ``.to()`` and stay out of the state_dict, so a layer's state_dict is exactly
    that of ``nn.Linear``.
    """

    def __init__(self, in_features: int, num_tables: int, bits: int, probes: int, seed: int, device=None):
        super().__init__()
        check_int("num_tables", num_tables, 1, MAX_TABLES)
        check_int("bits", bits, 1, MAX_BITS)
        check_int("probes", probes, 1, min(MAX_PROBES, 2 ** bits))
        self.num_tables, self.bits, self.probes = num_tables, bits, probes
        self.register_buffer("projection", hashing.make_projection(in_features, num_tables, bits, seed, device),
                             persistent=False)
        self.register_buffer("offsets", torch.zeros(num_tables, 2 ** bits + 1, dtype=torch.int32, device=device),
                             persistent=False)
        self.register_buffer("items", torch.zeros(num_tables, 0, dtype=torch.int32, device=device), persistent=False)

    @torch.no_grad()
    def build(self, weight: Tensor) -> None:
        """Hash every row of ``weight`` [N, in_features] into the L tables."""
        if not torch.isfinite(weight).all():
            raise ValueError("weight has non-finite values (NaN or inf): the hash tables cannot be rebuilt from them")
        codes = hashing.row_codes(weight, self.projection, self.num_tables, self.bits)
        self.offsets, self.items = ops.build_tables(codes, self.bits)

    @torch.no_grad()
    def query(self, x: Tensor, budget: int, labels: Optional[Tensor] = None, seed: int = 0) -> Tensor:
        """Active neurons ``[B, budget]`` for inputs ``x`` [B, in_features]."""
        codes, margins = hashing.input_codes(x, self.projection, self.num_tables, self.bits)
        return ops.query(codes, margins, self.offsets, self.items, self.probes, budget, labels, seed)

    def extra_repr(self) -> str:
        return f"num_tables={self.num_tables}, bits={self.bits}, probes={self.probes}"
