"""The L hash tables of one layer: built from its weight rows, queried with its inputs."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import hashing, ops
from ._checks import MAX_BITS, MAX_PROBES, MAX_TABLES, check_int


SELECTIONS = ("lsh", "random")


class LSHTables(nn.Module):
    """L CSR hash tables over the rows of a weight matrix; all state in non-persistent buffers.

    Buffers follow ``.to()`` and stay out of the state_dict, so a layer's state_dict is exactly
    that of ``nn.Linear``. With ``selection="random"`` the tables stay empty, so a query returns
    the labels and uniformly random neurons: the baseline that shows what the hashing is worth.
    """

    def __init__(self, in_features: int, num_tables: int, bits: int, probes: int, seed: int, device=None,
                 selection: str = "lsh", asymmetric: bool = True, center: bool = False):
        super().__init__()
        check_int("num_tables", num_tables, 1, MAX_TABLES)
        check_int("bits", bits, 1, MAX_BITS)
        check_int("probes", probes, 1, min(MAX_PROBES, 2 ** bits))
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        self.num_tables, self.bits, self.probes, self.selection = num_tables, bits, probes, selection
        self.asymmetric, self.center = bool(asymmetric), bool(center)
        self.register_buffer("projection", hashing.make_projection(in_features, num_tables, bits, seed, device),
                             persistent=False)
        self.register_buffer("offsets", torch.zeros(num_tables, 2 ** bits + 1, dtype=torch.int32, device=device),
                             persistent=False)
        self.register_buffer("items", torch.zeros(num_tables, 0, dtype=torch.int32, device=device), persistent=False)

    @torch.no_grad()
    def build(self, weight: Tensor) -> None:
        """Hash every row of ``weight`` [N, in_features] into the L tables."""
        if self.selection == "random":  # one table: bucket 0 (the only one probed) empty, bucket 1 all neurons
            n = weight.shape[0]
            self.offsets = torch.tensor([[0, 0, n]], dtype=torch.int32, device=weight.device)
            self.items = torch.arange(n, dtype=torch.int32, device=weight.device)[None]
            return
        try:  # the transform checks finiteness in its pass over the rows (a separate check cost 40% of a rebuild)
            codes = hashing.row_codes(weight, self.projection, self.num_tables, self.bits, self.asymmetric,
                                        self.center)
        except RuntimeError as error:
            if "must be finite" not in str(error):
                raise
            raise ValueError("weight has non-finite values (NaN or inf): the hash tables cannot be rebuilt from them") from None
        self.offsets, self.items = ops.build_tables(codes, self.bits)

    @torch.no_grad()
    def query(self, x: Tensor, budget: int, labels: Optional[Tensor] = None, seed: int = 0,
              shared: bool = False) -> Tensor:
        """Active neurons for inputs ``x`` [B, in_features]: ``[B, budget]``, or ``[budget]`` if ``shared``."""
        if self.selection == "random":
            codes = torch.zeros(x.shape[0], 1, dtype=torch.int32, device=x.device)
            margins, probes = torch.zeros(x.shape[0], 1, device=x.device), 1
        else:
            codes, margins = hashing.input_codes(x, self.projection, self.num_tables, self.bits)
            probes = self.probes
        query = ops.query_shared if shared else ops.query
        return query(codes, margins, self.offsets, self.items, probes, budget, labels, seed)

    def extra_repr(self) -> str:
        return (f"num_tables={self.num_tables}, bits={self.bits}, probes={self.probes}, selection={self.selection!r}, "
                f"asymmetric={self.asymmetric}, center={self.center}")
