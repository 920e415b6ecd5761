"""The L hash tables of one layer: built from its weight rows, queried with its inputs."""
from __future__ import annotations

import functools
import itertools
import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import hashing, ops
from ._checks import MAX_BITS, MAX_PROBES, MAX_TABLES, check_int


SELECTIONS = ("lsh", "random")
_MAX_BUFFER_BYTES = 2 ** 30  # per table buffer: far above any measured setting (670K outputs, L=50, K=12: 0.8 MB)
_NON_FINITE = "weight has non-finite values (NaN or inf): the hash tables cannot be rebuilt from them"


def _uniform_tables(n: int, device) -> tuple[Tensor, Tensor]:
    """One table whose bucket 0, the only one probed, is empty and whose bucket 1 holds every
    neuron: the query op then returns the labels plus seeded uniformly random neurons."""
    offsets = torch.tensor([[0, 0, n]], dtype=torch.int32, device=device)
    return offsets, torch.arange(n, dtype=torch.int32, device=device)[None]


@functools.lru_cache(maxsize=8)
def _cached_uniform_tables(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """:func:`_uniform_tables`, kept for the uniform queries of every training step (building the
    N ids cost 0.3 ms a step at 670K outputs). Never handed out as a module's buffers, which may
    be changed in place."""
    with torch.inference_mode(False):
        return _uniform_tables(n, device)


def _query_uniform(x: Tensor, offsets: Tensor, items: Tensor, budget: int, labels: Optional[Tensor], seed: int,
                   shared: bool, row_keys: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    codes = torch.zeros(x.shape[0], 1, dtype=torch.int32, device=x.device)
    margins = torch.zeros(x.shape[0], 1, dtype=torch.float32, device=x.device)
    if shared:
        return ops.query_shared(codes, margins, offsets, items, 1, budget, labels, seed)
    return ops.query(codes, margins, offsets, items, 1, budget, labels, seed, 0, row_keys)


def _norms(rows: Tensor) -> Tensor:
    """Row norms in float32 or wider (the dtype argument saves reduced-precision rows a float copy). Where the
    largest one's squares leave float32's range (rows all below about 1e-16 read 0, or above 1e19 inf), summed
    in float64: the transform's kernel scales such rows, and ``M`` must be the norms it finds."""
    wide = rows.dtype in (torch.float32, torch.float64)
    norms = torch.linalg.vector_norm(rows, dim=1, dtype=None if wide else torch.float32)
    if rows.dtype == torch.float64 or not rows.shape[0]:
        return norms
    largest = norms.max()
    if torch.compiler.is_compiling():  # no host read in a graph: both sums, the float64 one where it is needed
        in_range = (largest > 1e-15) & (largest < 1e19)
        return torch.where(in_range, norms, torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64).float())
    if not 1e-15 < float(largest) < 1e19:
        norms = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64).float()
    return norms


_probes = itertools.count()


def _keeps_values(fn, device) -> bool:
    """Whether ``fn`` (what ``Module._apply`` maps over the tensors) keeps their values, as ``.to()``,
    ``.half()`` or ``.cuda()`` do and ``to_empty()`` does not: tried on a few values exact in every
    floating dtype, other ones at each call (comparing the buffers themselves failed when uninitialised
    memory held the very values, a freed copy of them: seen in CI)."""
    k = next(_probes) % 64
    probe = torch.tensor([k + 0.5, -k - 0.25, 0.125, 3.0], device=device)
    out = fn(probe)
    return not out.is_meta and out.is_floating_point() and torch.equal(out.float().to(device), probe)


TABLE_BUFFERS = ("offsets", "items", "codes", "fingerprints", "norms", "max_norm")  # what a build writes
# An incremental build keeps the asymmetric transform's M while the largest row norm is at least M / this. Rows that
# shrank (weight decay, a user's weight.mul_) hash closer to the transform's constant coordinate as M outgrows
# them: recall of the exact top quarter of 4,000 rows fell from 0.308 (M the largest norm) to 0.305 / 0.295 /
# 0.275 / 0.259 at 1.05 / 1.25 / 2 / 4 times it, the random set's 0.25 (seeds 0 and 1 alike).
MAX_NORM_SHRINK = 1.25


def bucket_of_item(offsets: Tensor, items: Tensor) -> Tensor:
    """The bucket that holds each entry of ``items`` ``[L, N]`` (CSR tables with ``offsets`` ``[L, 2^K + 1]``), int64."""
    sizes = offsets.diff(dim=1).flatten().long()
    buckets = torch.arange(offsets.shape[1] - 1, device=items.device).repeat(offsets.shape[0])
    return torch.repeat_interleave(buckets, sizes, output_size=items.numel()).reshape(items.shape)


class LSHTables(nn.Module):
    """L CSR hash tables over the rows of a weight matrix; all state in non-persistent buffers.

    Buffers follow ``.to()`` and stay out of the state_dict, so a layer's state_dict is exactly
    that of ``nn.Linear``. With ``selection="random"`` the tables stay empty, so a query returns
    the labels and uniformly random neurons: the baseline that shows what the hashing is worth.
    """

    def __init__(self, in_features: int, out_features: int, num_tables: int, bits: int, probes: int, seed: int,
                 device=None, selection: str = "lsh", asymmetric: bool = True, center: bool = False,
                 hash: str | hashing.HashFamily = "srp"):
        super().__init__()
        num_tables = check_int("num_tables", num_tables, 1, MAX_TABLES)
        bits = check_int("bits", bits, 1, MAX_BITS)
        probes = check_int("probes", probes, 1, min(MAX_PROBES, 2 ** bits))
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        # The hash family: its seeded buffer (``projection`` for srp, ``bins`` for dwta) and how
        # rows and inputs become codes. Tables, query and rebuild bookkeeping are shared.
        self.hash = hashing.hash_family(hash, bits)
        # Settings in range can still ask for gigabytes (L = 1024 tables of 2^20 buckets: 4 GiB of
        # offsets whatever the width; DWTA bins of 2^20 dimensions): refused before allocating.
        buffer = f"the {self.hash.name} hash's {self.hash.buffer}"
        for what, size in (("the tables' bucket offsets", num_tables * (2 ** bits + 1) * 4),
                           (buffer, self.hash.buffer_bytes(in_features, num_tables, bits))):
            if size > _MAX_BUFFER_BYTES:
                raise ValueError(f"num_tables={num_tables} and bits={bits} need {size / 2 ** 30:.1f} GiB for {what} "
                                 f"(at most {_MAX_BUFFER_BYTES // 2 ** 30} GiB): lower bits (K) or num_tables (L)")
        if asymmetric and self.hash.name != "srp":
            raise ValueError(f"asymmetric=True needs hash='srp' (the MIPS transform is for signed random projections); "
                             f"hash={self.hash.name!r} ranks coordinates and is blind to scale: pass asymmetric=False")
        self.num_tables, self.bits, self.probes, self.selection = num_tables, bits, probes, selection
        self.asymmetric, self.center = bool(asymmetric), bool(center)
        self.in_features, self.out_features, self.seed = in_features, out_features, seed
        self.reset(device)
        self.rehashed = 0  # rows hashed by the last build (N for a full one)

    def reset(self, device) -> None:
        """A new layer's state on ``device``: the seeded buffers drawn from the seed, no tables (the
        next build hashes every row). Also what ``to_empty()`` leaves (see :meth:`_apply`).

        Every buffer has its final shape from the start (a build assigns tensors of the same shapes):
        ``AveragedModel.update_parameters`` and other code that copies one module's buffers into
        another's, made before the first build, need that."""
        try:
            self._allocate(device)
        except RuntimeError as error:  # torch.OutOfMemoryError too; the CPU allocator's is a plain RuntimeError
            if not isinstance(error, torch.OutOfMemoryError) and "can't allocate memory" not in str(error):
                raise
            n, tables = self.out_features, 1 if self.selection == "random" else 2 * self.num_tables
            need = (tables + 2 * (self.selection != "random")) * n * 4  # items (and codes), fingerprints, norms
            raise RuntimeError(
                f"LSHLinear(out_features={self.out_features:,}, num_tables={self.num_tables}): its hash tables need "
                f"{need / 2 ** 30:.3g} GiB (items and codes, num_tables x out_features int32 each), which could not be "
                f"allocated on {device or torch.get_default_device()}: lower num_tables, or shard the layer over "
                "processes (lsh_torch.distributed.ShardedLSHLinear)") from error

    def _allocate(self, device) -> None:
        n, num_tables = self.out_features, self.num_tables
        hash_buffer, fingerprint_vector = self._seeded_buffers(device)
        self.register_buffer(self.hash.buffer, hash_buffer, persistent=False)
        if self.selection == "random":  # the uniform tables are the tables: a build leaves them
            offsets, items = _uniform_tables(n, device)
        else:
            offsets = torch.zeros(num_tables, 2 ** self.bits + 1, dtype=torch.int32, device=device)
            items = torch.zeros(num_tables, n, dtype=torch.int32, device=device)
        self.register_buffer("offsets", offsets, persistent=False)
        self.register_buffer("items", items, persistent=False)
        # Incremental rebuilds: each row's codes and a fingerprint (its dot product with a fixed
        # random vector) as of the last build; a row whose fingerprint moved is re-hashed, the
        # others keep their codes. (None kept with random selection.)
        hashed = 0 if self.selection == "random" else n
        self.register_buffer("fingerprint_vector", fingerprint_vector, persistent=False)
        self.register_buffer("codes", torch.zeros(num_tables, hashed, dtype=torch.int32, device=device),
                             persistent=False)
        self.register_buffer("fingerprints", torch.full((hashed,), math.nan, dtype=torch.float32, device=device),
                             persistent=False)
        # Each row's norm as of the last build (float32): tables of directions cannot see norms, so a lookup may
        # add the largest-norm rows to their candidates (:meth:`largest_norm_rows`).
        self.register_buffer("norms", torch.zeros(hashed, dtype=torch.float32, device=device), persistent=False)
        self._largest = None  # (norms, their version, count, the count largest-norm rows): largest_norm_rows' cache
        # The asymmetric transform's M since the last full build (0: none, without the transform or a build).
        self.register_buffer("max_norm", torch.zeros((), dtype=torch.float32, device=device), persistent=False)
        self._built = False  # the next build hashes every row; until then the tables are not to be queried
        self._built_versions = None  # the TABLE_BUFFERS' version counters then (None: unknown)

    @property
    def built(self) -> bool:
        """Were the tables hashed (a build, or a load of saved ones), and not written in place since? Such
        writes come from outside: ``AveragedModel(use_buffers=True)`` averages every buffer, integer tables
        included; a ``copy_`` of another layer's buffers. Then the next build hashes every row."""
        if not self._built:
            return False
        # Not read while tracing (a guard on the counters would recompile the caller after every rebuild): a
        # compiled lookup does not see such writes, as it does not see the weight's (call rebuild()). Built
        # while tracing, the counters are unknown: the next eager lookup builds them again.
        return torch.compiler.is_compiling() or self._built_versions == self._versions()

    def mark_built(self) -> None:
        """The tables now answer for the weight they were hashed (or loaded) from."""
        self._built = True
        self._built_versions = None if torch.compiler.is_compiling() else self._versions()

    def _versions(self) -> tuple:
        return tuple(None if t.is_inference() else t._version for t in map(self.__getattr__, TABLE_BUFFERS))

    def __getstate__(self):
        return {**self.__dict__, "_built": self.built, "_largest": None}  # (False after writes in place)

    def __setstate__(self, state):  # a copy's tensors count versions anew
        super().__setstate__({**state, "_largest": None})
        if "norms" not in self._buffers:  # pickled before the tables kept them: the layer takes its weight's
            hashed = 0 if self.selection == "random" else self.items.shape[1]
            self.register_buffer("norms", torch.zeros(hashed, dtype=torch.float32, device=self.items.device),
                                 persistent=False)
            self._norms_missing = True  # (see LSHLinear.__setstate__)
        if self.__dict__.get("_built"):  # (absent from pickles before it was: see upgrade)
            self.mark_built()

    def upgrade(self, out_features: int) -> None:
        """Tables pickled before every buffer had its final shape from construction on: unbuilt ones had
        ``[L, 0]`` items and codes, and ``M`` was None where there was none."""
        self.out_features = out_features
        if not self.items.shape[1]:
            self.reset(self.hash_buffer.device)
            return
        if self.max_norm is None:
            self.max_norm = torch.zeros((), dtype=torch.float32, device=self.items.device)
        if self.selection != "random" and self.codes.shape[1] != out_features:  # built, saved without codes
            self.forget_codes()
        self.mark_built()

    def take_norms(self, weight: Tensor) -> None:
        """Row norms taken from ``weight`` as it is now, for tables saved before they kept the norms of their
        build (pickles, :func:`~lsh_torch.load_lsh_state` states): the nearest thing to them that is kept."""
        self.__dict__.pop("_norms_missing", None)
        hashed = self.fingerprints.shape[0]
        norms = _norms(weight.detach()).float() if hashed and not weight.is_meta else torch.zeros(hashed)
        built = self.built  # (the new buffer's version is not the one marked)
        self.norms = norms.to(self.fingerprints.device, torch.float32)
        if built:
            self.mark_built()

    def largest_norm_rows(self, count: int) -> Tensor:
        """The ``count`` rows with the largest norms at the last build, largest first (int64; ties by
        :func:`torch.topk`). Taken once per build and count (a top-k over every row: 1 ms at 670K)."""
        count = min(count, self.norms.shape[0])
        if torch.compiler.is_compiling():
            return self.norms.topk(count).indices
        norms, cached = self.norms, self._largest
        version = None if norms.is_inference() else norms._version
        if cached is None or cached[0] is not norms or cached[1] != version or cached[2] != count:
            self._largest = cached = (norms, version, count, norms.topk(count).indices)
        return cached[3]

    def forget_codes(self) -> None:
        """Tables without their rows' codes (an old checkpoint's, or pickle's): codes read off the tables, so
        that they agree (a checkpoint saved now must reload), and no fingerprints or M, so that the next build
        hashes every row with a new M."""
        buckets = bucket_of_item(self.offsets, self.items).int()
        self.codes = torch.empty_like(self.items).scatter_(1, self.items.long(), buckets)
        self.fingerprints = torch.full((self.out_features,), math.nan, dtype=torch.float32, device=self.items.device)
        self.max_norm = torch.zeros((), dtype=torch.float32, device=self.items.device)

    def materialise(self, device) -> None:
        """Draw the seeded buffers on ``device`` if they are still on the meta device:
        ``load_state_dict(assign=True)`` after a meta-device construction moves the weights, not these
        non-persistent buffers."""
        if self.hash_buffer.is_meta:
            self.reset(device)

    def _seeded_buffers(self, device) -> tuple[Tensor, Tensor]:
        """The hash family's buffer (the projection or the bins) and the fingerprint vector:
        functions of the seed alone, drawn on the CPU (device None: the default device, which
        ``with torch.device(...)`` sets)."""
        device = torch.get_default_device() if device is None else device
        return (self.hash.make_buffer(self.in_features, self.num_tables, self.bits, self.seed, device),
                hashing.make_fingerprint_vector(self.in_features, self.seed, device))

    @property
    def hash_buffer(self) -> Tensor:
        """The family's seeded buffer: ``projection`` (srp) or ``bins`` (dwta)."""
        return getattr(self, self.hash.buffer)

    def _apply(self, fn, recurse=True):
        before, built = dict(self._buffers), self.built
        super()._apply(fn, recurse)
        # Every buffer keeps its dtype: the seeded ones, the fingerprints and M are float32 or wider whatever
        # the weight's dtype (as in a layer built in that dtype), the tables int32 (the kernels' contract).
        # .to(dtype) must not round the first (the same seed would hash differently, every fingerprint look
        # changed), nor Module.type() cast the others.
        for name, old in before.items():
            new = self._buffers[name]
            if old is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        seeded, old = self.hash_buffer, before[self.hash.buffer]
        if not seeded.is_meta and (old.is_meta or not _keeps_values(fn, old.device)):
            # Values not kept (to_empty(), from the meta device or not: uninitialised memory): a new layer's.
            self.reset(seeded.device)
        elif built:  # new tensors count versions anew
            self.mark_built()
        else:  # (written in place before the move)
            self._built = False
        return self

    @torch.no_grad()
    def build(self, weight: Tensor, full: bool = False, written: Optional[Tensor] = None) -> None:
        """Hash the rows of ``weight`` [N, in_features] into the L tables (every row if ``full``).

        Only rows that changed since the last build are re-hashed (their fingerprint moved, or they are
        among ``written``: int64 rows, increasing, known to hold every row written since), when
        the codes of the others are still valid. The asymmetric transform scales every row by one
        ``M``: a full build sets it to the largest row norm and later builds keep it, until a
        changed row outgrows it or the largest norm falls below ``M /`` :data:`MAX_NORM_SHRINK`
        (then every row is re-hashed with a new ``M``). (An ``M`` with room
        to grow, 1.1x the largest norm, made fewer builds full but cost the transformer LM example
        perplexity 458 against 337: every row's collisions with its queries drop.)
        ``center`` subtracts the mean row, which every change moves: there every build is full.
        Re-hashing is O(changed rows x in_features x L x K); the fingerprints cost one pass over
        the weight (the written rows' only, given ``written``); up to a tenth of the rows moved are merged
        into the tables (:func:`ops.update_tables`, one sequential pass over the L x N entries), more are re-sorted
        with every row's code (:func:`ops.build_tables`, faster than the merge there; the same tables).
        """
        n = weight.shape[0]
        if n != self.out_features:
            raise ValueError(f"weight must have out_features = {self.out_features} rows, got {tuple(weight.shape)}")
        if self.selection == "random":
            self.mark_built()
            return
        rows = weight.detach()
        compiling = torch.compiler.is_compiling()  # a traced build: no data-dependent branch, every row hashed
        incremental = not compiling and not full and not self.center and self.built
        gathered = None  # the changed rows, gathered at once
        # (Up to half the rows: their copy costs less than the pass over every row, 70 against 79 ms at 100K x 128
        # with 18% written; more would copy most of the weight.)
        if incremental and written is not None and written.numel() * 2 <= n:
            gathered = rows.index_select(0, written)
            moved_fingerprints = self._checked_fingerprints(gathered, written)
            differs = moved_fingerprints != self.fingerprints.index_select(0, written)  # (a step at lr=0 moves none)
            changed = written
            if not bool(differs.all()):  # (a copy of the gathered rows otherwise: 10 MB at 670K)
                changed, gathered, moved_fingerprints = written[differs], gathered[differs], moved_fingerprints[differs]
            fingerprints = self.fingerprints.index_copy(0, changed, moved_fingerprints)
        else:
            fingerprints = self._checked_fingerprints(rows)
        if incremental:
            if gathered is not None:
                moved, index = gathered, None
            else:
                changed = (fingerprints != self.fingerprints).nonzero().squeeze(1)
                moved, index = rows, changed  # hashed a chunk at a time, gathered as it goes
                if self.asymmetric and changed.numel():
                    # Gathered at once (3x faster than rows[changed]): M checked and applied on one snapshot,
                    # which Hogwild writers to a shared weight cannot change in between.
                    moved, index = rows.index_select(0, changed), None
            if index is None:
                moved_norms = _norms(moved)
            elif changed.numel() * 8 <= n:
                moved_norms = _norms(rows.index_select(0, changed))
            else:  # most rows moved: every row's norm, one pass over the weight rather than a copy of most of it
                moved_norms = _norms(rows)[changed]
            norms = self.norms.index_copy(0, changed, moved_norms.float()) if changed.numel() else self.norms
            if self.asymmetric and changed.numel():
                incremental = bool((self.max_norm > 0) & (moved_norms.max() <= self.max_norm)
                                   & (norms.max() * MAX_NORM_SHRINK >= self.max_norm))
        # Codes, tables and fingerprints are assigned together, after every op that may fail
        # (out of memory, an interrupt): an incremental build trusts that they agree. (The one
        # exception, codes patched before a re-sort, marks the tables unbuilt first: see below.)
        if incremental:  # only the moved rows re-hashed, M kept
            codes, tables = self.codes, (self.offsets, self.items)
            if changed.numel():
                new_codes = self._row_codes(moved, self.max_norm if self.asymmetric else None, index)
                # (gather and scatter along the rows: 3x and 1.4x faster than index_select and index_copy_.)
                columns = changed.expand(codes.shape[0], -1)
                # Codes are patched in place, but not codes that other processes may read (Hogwild workers
                # share tables built before share_memory(); each keeps its own from its first build on).
                # (is_shared() is True for every CUDA tensor; Hogwild, sharing them, is CPU-only.)
                shared = codes.device.type == "cpu" and codes.is_shared()
                if shared or codes.is_inference() and not torch.is_inference_mode_enabled():
                    codes = codes.clone()
                if changed.numel() * 10 > n:
                    # Past a tenth of the rows moved, a counting sort of every row's code beats merging the
                    # moved ones in (real rebuilds, medians of 6: 100K rows, L=20, 10% moved 6.3-7.2 against
                    # 8.8-11.2 ms; 670K, L=20 and L=40: even at 10%, the sort ahead from 15-22%; the merge
                    # ahead at 6% everywhere). The same tables either way.
                    # Patched before the sort (a copy of 670K x 40 codes cost 25 ms): should the sort fail,
                    # the codes no longer match the tables, so the next build must be full.
                    self._built = False
                    codes.scatter_(1, columns, new_codes)
                    tables = ops.build_tables(codes.t(), self.bits)
                else:
                    tables = ops.update_tables(*tables, changed, codes.gather(1, columns).t(), new_codes.t())
                    codes.scatter_(1, columns, new_codes)
            self.rehashed = changed.numel()  # (norms kept where no row moved: largest_norm_rows' cache of its order holds)
        else:  # every row hashed with a new M (a full build, or a moved row outgrew M)
            codes, norms, max_norm = self._every_row_codes(rows)
            tables = ops.build_tables(codes.t(), self.bits)
            if max_norm is not None:
                self.max_norm = max_norm
            self.rehashed = n
        self.codes, (self.offsets, self.items), self.fingerprints, self.norms = codes, tables, fingerprints, norms
        self.mark_built()

    def _checked_fingerprints(self, rows: Tensor, index: Optional[Tensor] = None) -> Tensor:
        """The fingerprints of the weight's ``rows`` (those numbered ``index``, or all), checked finite."""
        fingerprints = ops.row_fingerprints(rows, self.fingerprint_vector.float())
        if torch.compiler.is_compiling():
            torch._assert_async(torch.isfinite(fingerprints).all(), _NON_FINITE)
        # One pass over the fingerprints: their sum is finite unless one is not (or finite ones
        # overflow it: then the exact check decides).
        elif not bool(torch.isfinite(fingerprints.sum())) and not bool(torch.isfinite(fingerprints).all()):
            at = int((~torch.isfinite(fingerprints)).nonzero()[0, 0])
            row, shape = ((at, tuple(rows.shape)) if index is None
                          else (int(index[at]), (self.out_features, rows.shape[1])))
            if bool(torch.isfinite(rows[at]).all()):  # (a reviewer's 3e38 row was called NaN or inf)
                raise ValueError(f"weight row {row} is finite but its fingerprint (its product with a random vector) "
                                 f"overflows float32: the hash tables cannot be rebuilt from it (a diverged weight of "
                                 f"shape {shape}: lower the learning rate or clip gradients)")
            raise ValueError(f"{_NON_FINITE} (the weight of shape {shape})")  # which layer, in a model
        return fingerprints

    def _every_row_codes(self, rows: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Codes and norms (float32) of every row, and the asymmetric transform's new M (None without one)."""
        # M is the largest norm, raised by a few float32 roundings (the op sums each norm in its
        # own order and must find none above M), positive even for all-zero rows. With ``center``
        # every build is full and the op finds its own M.
        # Other processes may write a shared weight meanwhile (Hogwild): M and the codes from one snapshot.
        # (is_shared() is True for every CUDA tensor: there the copy would buy nothing.)
        if rows.device.type == "cpu" and not torch.compiler.is_compiling() and rows.is_shared():
            rows = rows.clone()
        norms = _norms(rows)
        if self.asymmetric and not torch.compiler.is_compiling() and not bool(torch.isfinite(norms).all()):
            row = int((~torch.isfinite(norms)).nonzero()[0])
            raise ValueError(f"weight row {row} is finite but its norm overflows {norms.dtype}: the asymmetric "
                             "(MIPS) hashing scales rows by their norms and cannot hash it. The weights have probably "
                             "diverged (lower the learning rate or clip gradients); asymmetric=False hashes "
                             "directions only")
        max_norm = None
        if self.asymmetric and rows.shape[0] and not self.center:
            # float32 whatever the weight's dtype (rows hash in float32; the slack covers the rounding): the
            # buffer keeps one dtype, as AveragedModel(use_buffers=True)'s averages of it need.
            max_norm = (norms.max().float() * (1 + 1e-5)).clamp_min(torch.finfo(torch.float32).tiny)
        return self._row_codes(rows, max_norm), norms.float(), max_norm

    def _row_codes(self, rows: Tensor, max_norm: Optional[Tensor], index: Optional[Tensor] = None) -> Tensor:
        """Codes of ``rows`` (or ``rows[index]``), table-major ``[L, n]``: the layout the table build reads
        (the families write it so: the transpose is a view)."""
        return self.hash.row_codes(rows, self.hash_buffer, self.num_tables, self.bits, self.asymmetric,
                                   self.center, max_norm, index).t().contiguous()

    @torch.no_grad()
    def query(self, x: Tensor, budget: int, labels: Optional[Tensor] = None, seed: int = 0,
              shared: bool = False, probes: Optional[int] = None, tail: int = 0,
              keyed: bool = False) -> tuple[Tensor, Tensor]:
        """Active neurons for inputs ``x`` [B, in_features]: ``[B, budget]``, or ``[budget]`` if
        ``shared``, and their heads (labels + hashed candidates; the rest, at least ``tail``
        entries, are uniform draws): see :func:`ops.query`. ``probes`` overrides the tables'
        buckets probed per table for this call. ``keyed`` (per row only): each row's random
        choices follow its codes (:meth:`row_keys`), not its place in the batch."""
        if self.selection == "random":
            return _query_uniform(x, self.offsets, self.items, budget, labels, seed, shared,
                                  self.row_keys(x) if keyed else None)
        codes, margins = self.hash.input_codes(x, self.hash_buffer, self.num_tables, self.bits)
        probes = self.probes if probes is None else probes
        if shared:
            return ops.query_shared(codes, margins, self.offsets, self.items, probes, budget, labels, seed, tail)
        return ops.query(codes, margins, self.offsets, self.items, probes, budget, labels, seed, tail,
                         hashing.row_keys(codes) if keyed else None)

    @torch.no_grad()
    def row_keys(self, x: Tensor) -> Tensor:
        """Keys of the rows of ``x`` [B, in_features] from their codes (:func:`hashing.row_keys`), for
        :meth:`query`: an input keyed by them gets the same set wherever it sits in a batch."""
        return hashing.row_keys(self.hash.input_codes(x, self.hash_buffer, self.num_tables, self.bits)[0])

    @staticmethod
    def query_uniform(x: Tensor, n: int, budget: int, labels: Optional[Tensor] = None, seed: int = 0,
                      shared: bool = False, row_keys: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """The labels plus uniformly random neurons of ``n``, without built tables (a warm-up).
        ``row_keys`` (per row only; e.g. :meth:`row_keys`) key the rows' draws instead of their
        places in the batch (:func:`ops.query`)."""
        tables = _uniform_tables if torch.compiler.is_compiling() else _cached_uniform_tables
        return _query_uniform(x, *tables(n, x.device), budget, labels, seed, shared, row_keys)

    def extra_repr(self) -> str:
        return (f"num_tables={self.num_tables}, bits={self.bits}, probes={self.probes}, selection={self.selection!r}, "
                f"hash='{self.hash}', asymmetric={self.asymmetric}, center={self.center}")
