"""Hash families: signed random projections (SimHash, ``"srp"``) with the asymmetric MIPS
transform, and densified winner-take-all (``"dwta"``).

SRP: a neuron's weight row ``w`` and an input ``x`` are hashed so that they collide more often the
larger ``w · x`` is: rows go through ``P(w) = [w / M, sqrt(1 - |w / M|^2)]`` and inputs through
``Q(x) = [x / |x|, 0]``; then ``K`` signs of random Gaussian projections make one table's code.

DWTA (Yagnik et al., ICCV 2011; Chen & Shrivastava, UAI 2018; the family SLIDE and BOLT use for
Amazon-670K): each of a table's ``H`` hashes is the position of the largest coordinate among a
seeded bin of ``bin_size`` dimensions, ``log2(bin_size)`` bits; the ``H`` positions concatenated
make the ``K = H * log2(bin_size)``-bit code. Rows and inputs collide when their coordinates rank
alike (a rank-correlation similarity, blind to scale: no MIPS transform). Empty bins (all zeros,
common after a ReLU) borrow another bin's hash (densification, see ``ops.dwta_codes``).

A family is one object, :class:`SRP` or :class:`DWTA` (``hash_family("srp" | "dwta")``), that
:class:`~lsh_torch.tables.LSHTables` holds: it owns its seeded buffer and turns rows and inputs
into codes; the tables, the query and everything above them are the same for both.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from . import ops
from ._checks import check_int


def make_projection(in_features: int, num_tables: int, bits: int, seed: int, device=None) -> Tensor:
    """Gaussian projection matrix ``[in_features + 1, L*K]`` (float32), the same on every device for a seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(in_features + 1, num_tables * bits, generator=gen, dtype=torch.float32, device="cpu").to(device)


def make_fingerprint_vector(in_features: int, seed: int, device=None) -> Tensor:
    """The fixed random vector ``[in_features]`` (float32) whose dot products with the rows
    (:func:`ops.row_fingerprints`) tell which rows moved since a build; the same on every device."""
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randn(in_features, generator=gen, dtype=torch.float32, device="cpu").to(device)


def row_codes(weight: Tensor, projection: Tensor, num_tables: int, bits: int, asymmetric: bool = True,
              center: bool = False, max_norm: Optional[Tensor] = None, index: Optional[Tensor] = None) -> Tensor:
    """Codes ``[N, L]`` (a transposed view of table-major storage, the layout table builds read) of
    the neurons' weight rows: the data side of the asymmetric transform, or
    with ``asymmetric=False`` the rows' directions alone (plain angular SimHash, blind to norms).
    ``center`` hashes ``w_j - mean_j(w_j)``: every output shifts by the same ``mean·x``, so a
    softmax and its top-k are unchanged, while the direction all rows share stops crowding them
    into a few buckets. ``max_norm`` fixes the transform's ``M`` (see :func:`ops.mips_transform`).
    ``index`` (int64): the codes of ``weight[index]`` alone (``row_codes(weight)[index]``), those rows
    gathered a chunk at a time."""
    # Rows are transformed in float32 and projected in float32 or bfloat16 (BF16_ROW_PROJECTIONS)
    # whatever the layer's dtype (``module.to(dtype)`` may have cast the projection; float32 values
    # survive the round trip exactly), and whatever autocast says (``out=`` calls are not autocast).
    rows = weight.detach()
    # Centering, and a transform that finds its own M, read every row first (``index`` then picks from
    # the result); with a given M the transform goes row by row, so each chunk is transformed alone,
    # but not on a GPU, where each transform waits for the device once to check the rows against M.
    whole = center or asymmetric and (max_norm is None or rows.device.type != "cpu")
    if whole:
        rows = rows.float()
        if center:
            rows = rows - rows.mean(0)
        if asymmetric:
            rows = ops.mips_transform(rows, False, max_norm)
    if not asymmetric:  # signs of projections ignore a row's scale (the transform's last column is 0)
        projection = projection[:-1]
    low = BF16_ROW_PROJECTIONS and rows.device.type == "cpu"
    dtype = torch.bfloat16 if low else torch.float32
    projection = projection.to(dtype)
    # In chunks of rows, projected into buffers made once: the projections and margins of all 670K
    # rows at once took 1.6 GB, and fresh buffers for every chunk page-faulted (ROW_CHUNK).
    chunk = min(ROW_CHUNK, rows.shape[0] if index is None else index.shape[0])
    if low:  # room for the padded products below
        chunk = min(ROW_CHUNK, _padded_rows(chunk))
    projected = rows.new_empty(chunk, projection.shape[1], dtype=dtype)
    rounded = rows.new_empty(chunk, projection.shape[0], dtype=dtype) if low else None

    def codes_of(part: Tensor) -> Tensor:
        n, part = part.shape[0], part.float()
        if asymmetric and not whole:
            part = ops.mips_transform(part, False, max_norm)
        if low and asymmetric:
            part = rounded[:n].copy_(part)
        elif low:  # rounded after scaling to unit norm: a rescaled row (weight decay) keeps its bfloat16 signs
            part = torch.div(part, torch.linalg.vector_norm(part, dim=1, keepdim=True).clamp_min_(_TINY),
                             out=rounded[:n])
        if low:  # the products of a few row counts only (the padding rows' outputs go unread): see _padded_rows
            part = rounded[:min(chunk, _padded_rows(n))]
        torch.mm(part, projection, out=projected[:part.shape[0]])
        return ops.hash_codes(projected[:n], num_tables, bits, margins=False)[0]

    return _codes_by_chunk(rows, num_tables, codes_of, index)


BF16_ROW_STEP = 256


def _padded_rows(count: int) -> int:
    """``count`` rounded up to a multiple of :data:`BF16_ROW_STEP`. oneDNN, which computes bfloat16 products on the
    CPU, keeps a primitive (and its reordered operands) for every shape it meets, up to 1,024 of them: the moved rows
    of each rebuild, a new count every time, grew memory by about their size per rebuild (550 KB at 20,000 x 64,
    3,000 rows moved; a user review found 250 MB over 3,000 Adam steps). Padded, a layer's products take at most
    ROW_CHUNK / BF16_ROW_STEP shapes."""
    return -(-count // BF16_ROW_STEP) * BF16_ROW_STEP


def _codes_by_chunk(rows: Tensor, num_tables: int, codes_of, index: Optional[Tensor] = None) -> Tensor:
    """Codes ``[N, L]`` of ``rows`` (or of ``rows[index]``), ``codes_of`` hashing ROW_CHUNK of them at a
    time, written into one table-major tensor (returned transposed): the layout table builds read.
    A concatenation and a transpose of every code after cost 5 and 12 ms of a 180 ms rebuild at
    670K x 40 codes, and gathering its 145K moved rows at once (74 MB, page-faulted afresh) 16-20 ms."""
    count = rows.shape[0] if index is None else index.shape[0]
    codes = torch.empty(num_tables, count, dtype=torch.int32, device=rows.device)
    gathered = None if index is None else rows.new_empty(min(ROW_CHUNK, count), rows.shape[1])
    for start in range(0, count, ROW_CHUNK):
        if index is None:
            part = rows[start:start + ROW_CHUNK]
        else:
            picked = index[start:start + ROW_CHUNK]
            part = torch.index_select(rows, 0, picked, out=gathered[:picked.shape[0]])
        codes[:, start:start + part.shape[0]] = codes_of(part).t()
    return codes.t()


_TINY = torch.finfo(torch.float32).tiny


def _cpu_has_bf16_dot_products() -> bool:
    try:  # private helpers of torch.cpu: absent from a future release means "no"
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


# Weight rows are projected in bfloat16 (float32 sums) on CPUs with bfloat16 dot products
# (AVX512-BF16 or AMX): at 670K x 128 with 20 x 12 bits, a full build's projections took 173-179 ms
# against 452-622 in float32, and 17.5K moved rows 5.2-5.4 ms against 10.1-10.3 (2 cores). Rows near a
# hyperplane may flip a sign: 99.5% of the codes are those float32 gives, which for hashing is
# another draw of the projection, not an error. Queries stay float32 (their margins order the probes).
# Directions (asymmetric=False) are scaled to unit norm before rounding: rescaling a row (weight decay)
# changed 0.5% of its bfloat16 codes otherwise.
# Set it False for codes that are the same on every machine.
BF16_ROW_PROJECTIONS = _cpu_has_bf16_dot_products()


# Rows hashed per chunk. At 670K outputs (L=20, K=12) 4,096 made a full build 947 ms against 1,222
# with 65,536, and the incremental rebuild's 20K moved rows 16 against ~30 ms, when every chunk's
# projections were fresh tensors: 4 MB reused the freed pages of the last instead of faulting in new ones.
ROW_CHUNK = 4096


def input_codes(x: Tensor, projection: Tensor, num_tables: int, bits: int) -> tuple[Tensor, Tensor]:
    """Codes ``[B, L]`` and bit margins ``[B, L*K]`` of a batch of inputs (query side)."""
    # Each row scaled by a power of two to a largest entry in [0.5, 1): the codes are x's (the transform and the
    # signs are scale-free, and a power of two rounds nothing), but a row of norm 1e19 or 1e-30 no longer over-
    # or underflows the transform's float32 squares (topk's recall 0.09 there against 0.98). float64 first
    # where x is float64 (its range is wider than float32's); float16 and bfloat16 fit float32.
    x = x.detach() if x.dtype == torch.float64 else x.detach().float()
    limit = 1000 if x.dtype == torch.float64 else 120  # 2 ** exponent within the dtype
    exponent = torch.frexp(x.abs().amax(-1, keepdim=True)).exponent.clamp(-limit, limit)
    queries = ops.mips_transform(torch.ldexp(x, -exponent).float(), True)
    # float32 under autocast too (``out=`` calls are not autocast), as the rows' side is
    projected = torch.mm(queries, projection.float(), out=queries.new_empty(queries.shape[0], projection.shape[1]))
    return ops.hash_codes(projected, num_tables, bits)


# row_keys hashes codes modulo a prime below 2^43: a code (below 2^20) times a power of the base stays
# below 2^63, and so does a sum over up to 1,024 tables.
_KEY_PRIME = 2 ** 43 - 57
_KEY_BASE = 0x9E3779B97F4A7C15 % _KEY_PRIME


def row_keys(codes: Tensor) -> Tensor:
    """A key per input row, int64 ``[B]``, from its codes ``[B, L]``: the sum over tables of
    ``codes[:, l] * G^(l+1) mod P`` (a Rabin-Karp hash, exact in int64). :func:`ops.query` keys a
    row's random choices by it instead of the row's place in the batch (eval lookups): an input then
    gets the same set however it is batched; rows with the same codes draw alike, rows with other
    codes practically never share a key."""
    weights = (_key_powers(codes.shape[1], codes.device) if torch.compiler.is_compiling()  # a traced constant
               else _cached_key_powers(codes.shape[1], codes.device))
    return (codes.long() * weights).remainder(_KEY_PRIME).sum(1)


def _key_powers(num_tables: int, device) -> Tensor:
    return torch.tensor([pow(_KEY_BASE, l + 1, _KEY_PRIME) for l in range(num_tables)], dtype=torch.int64,
                        device=device)


# Made once per device: a copy to a GPU at every lookup would synchronise (and be refused while
# capturing a CUDA graph).
_cached_key_powers = functools.lru_cache(maxsize=32)(_key_powers)


def make_bins(in_features: int, num_bins: int, bin_size: int, seed: int, device=None) -> Tensor:
    """DWTA bins ``[num_bins, bin_size]`` int64: seeded random permutations of the ``in_features``
    dimensions laid end to end (as in SLIDE), so every dimension is in about the same number of
    bins; the same on every device for a seed."""
    gen = torch.Generator().manual_seed(seed)
    total = num_bins * bin_size
    perms = [torch.randperm(in_features, generator=gen) for _ in range(-(-total // in_features))]
    return torch.cat(perms)[:total].reshape(num_bins, bin_size).to(device)


@dataclass(frozen=True)
class SRP:
    """Signed random projections (SimHash): a Gaussian projection ``[in_features + 1, L*K]``, with
    or without the asymmetric MIPS transform (``LSHTables(asymmetric=)``)."""

    name = "srp"
    buffer = "projection"  # the LSHTables buffer this family draws from the seed

    def make_buffer(self, in_features: int, num_tables: int, bits: int, seed: int, device=None) -> Tensor:
        return make_projection(in_features, num_tables, bits, seed, device)

    def buffer_bytes(self, in_features: int, num_tables: int, bits: int) -> int:
        return (in_features + 1) * num_tables * bits * 4

    def row_codes(self, rows: Tensor, buffer: Tensor, num_tables: int, bits: int, asymmetric: bool, center: bool,
                  max_norm: Optional[Tensor], index: Optional[Tensor] = None) -> Tensor:
        return row_codes(rows, buffer, num_tables, bits, asymmetric, center, max_norm, index)

    def input_codes(self, x: Tensor, buffer: Tensor, num_tables: int, bits: int) -> tuple[Tensor, Tensor]:
        return input_codes(x, buffer, num_tables, bits)

    def macs(self, in_features: int, num_tables: int, bits: int) -> int:
        """Multiply-adds (or comparisons) of hashing one input row."""
        return (in_features + 1) * num_tables * bits

    def __str__(self) -> str:
        return "srp"


@dataclass(frozen=True)
class DWTA:
    """Densified winner-take-all: ``H = bits / log2(bin_size)`` bins of ``bin_size`` seeded
    dimensions per table, each hashed to the position of its largest entry. ``bin_size`` (a power
    of two, at least 2) whose ``log2`` divides ``bits``; None picks one for the tables' ``bits``
    (:meth:`for_bits`). Hashes rows as they are (``asymmetric`` does not apply)."""

    bin_size: Optional[int] = None
    name = "dwta"
    buffer = "bins"

    def for_bits(self, bits: int) -> "DWTA":
        """This family with its ``bin_size`` fixed for ``bits`` per table: the given one (checked),
        or the power of two whose log2 divides ``bits`` nearest to 8 (3 bits per hash; 4 before 16)."""
        if self.bin_size is None:
            per_hash = min((b for b in range(1, min(bits, 5) + 1) if bits % b == 0), key=lambda b: (abs(b - 3), b))
            return DWTA(2 ** per_hash)
        size = check_int("DWTA bin_size", self.bin_size, 2, 2 ** 62)
        if size & (size - 1):
            raise ValueError(f"DWTA bin_size must be a power of two >= 2, got {size!r}")
        per_hash = size.bit_length() - 1
        if bits % per_hash:
            raise ValueError(f"bits (K = {bits}) must be a multiple of log2(bin_size) = {per_hash} for "
                             f"DWTA(bin_size={size}): each of a table's hashes takes log2(bin_size) bits")
        return DWTA(size)  # a numpy int given becomes a Python int

    @property
    def bits_per_hash(self) -> int:
        return self.bin_size.bit_length() - 1

    def make_buffer(self, in_features: int, num_tables: int, bits: int, seed: int, device=None) -> Tensor:
        return make_bins(in_features, num_tables * (bits // self.bits_per_hash), self.bin_size, seed, device)

    def buffer_bytes(self, in_features: int, num_tables: int, bits: int) -> int:
        return num_tables * (bits // self.bits_per_hash) * self.bin_size * 8

    def row_codes(self, rows: Tensor, buffer: Tensor, num_tables: int, bits: int, asymmetric: bool, center: bool,
                  max_norm: Optional[Tensor], index: Optional[Tensor] = None) -> Tensor:
        rows = rows.detach()
        if center:  # the mean of every row (index picks from the centred rows)
            rows = rows.float() - rows.float().mean(0)
        return _codes_by_chunk(rows, num_tables, lambda part: ops.dwta_codes(part, buffer, num_tables)[0], index)

    def input_codes(self, x: Tensor, buffer: Tensor, num_tables: int, bits: int) -> tuple[Tensor, Tensor]:
        return ops.dwta_codes(x.detach(), buffer, num_tables)

    def macs(self, in_features: int, num_tables: int, bits: int) -> int:
        return num_tables * (bits // self.bits_per_hash) * self.bin_size

    def __str__(self) -> str:
        return f"dwta(bin_size={self.bin_size})" if self.bin_size else "dwta"


HashFamily = Union[SRP, DWTA]
HASHES = ("srp", "dwta")


def hash_family(spec: Union[str, SRP, DWTA], bits: int) -> HashFamily:
    """The family that ``LSHLinear(hash=)`` / ``LSHTables(hash=)`` names, resolved for ``bits``
    per table: ``"srp"``, ``"dwta"``, or an :class:`SRP` / :class:`DWTA` instance."""
    if isinstance(spec, str) and spec in HASHES:
        spec = SRP() if spec == "srp" else DWTA()
    if not isinstance(spec, (SRP, DWTA)):
        raise ValueError(f"hash must be one of {HASHES} or an lsh_torch.hashing.SRP / DWTA instance, got {spec!r}")
    return spec.for_bits(bits) if isinstance(spec, DWTA) else spec
