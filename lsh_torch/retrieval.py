"""What :meth:`LSHLinear.topk <lsh_torch.nn.LSHLinear.topk>` searches: an index of its own, built
from the weight when topk first needs it and kept until the weight changes.

The index has two parts, one per kind of row that a top-k over direction-hashing tables misses:

* **hash tables of its own**: ``num_tables`` tables of ``bits``-bit signed random projections of
  the rows' directions, more and finer than a wide layer's training tables. A training step needs
  the batch's few thousand best outputs, which 20 coarse tables find; a top-k query needs each
  row's own best 5. At 670K outputs on rows in clusters, recall of the exact top 5 was 0.910 from
  tables like the training ones (L=20, K=12, 32 probes, 1,024 candidates rescored: 105K rows
  scanned per query) and 0.961 from 60 tables of K=13 probed 12 times each, 768 candidates
  rescored (59K rows scanned), in less time;
* **the largest-norm rows**, scored exactly for every input (one matrix product). A row's output
  is at most its norm times the input's, so the rows with the largest norms are the likeliest
  winners, and tables of directions rank them no higher than any other row of their direction.
  On the XMC demo's trained 670K-label head (row norms: median 0.59, 99th percentile 1.39,
  largest 3.70) all of the exact top 5 were among the 7,700 largest-norm rows, while the tables
  alone recalled 0.21-0.52 of them. This is Norm-Ranging LSH (Yan et al., NeurIPS 2018)
  with two ranges, the top one small enough to score whole.

Where the index fails its check (:meth:`TopkIndex.topk`), the likeliest rows, scored alone, stand in
for it: the rows by an estimate of their output for the inputs it was checked on, their mean's
output plus their spread times the row's norm (:meth:`TopkIndex.order_alone`; the norm order for
inputs centred on the origin). The demo's 100K-label heads need it: their tables found 0.362
(trained shared) and 0.653 (per row, 3 epochs) of the checked top 5, and 6,248 and 781 of these
rows recall 0.993 and 0.998 of the exact top 5, where the norm order took 12,496 rows (0.980) and
more than a quarter of the rows (exact answers).

Also measured, at 670K outputs (L=40, K=14, 32 probes, tables alone): the asymmetric MIPS transform
(one ``M`` for every row) recalled 0.750 against 0.966 by direction on clustered rows, 0.167
against 0.327 on the trained head, whose small rows it crowds into few buckets; centering the
rows, 0.291 against 0.321 on the trained head. Details: ``benchmarks/bench_topk.py``, docs/results.md.
"""
from __future__ import annotations

import copy
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from . import hashing, ops
from ._checks import MAX_BITS, MAX_PROBES, MAX_TABLES, check_int, int_or_float, user_stacklevel
from .optim import LazyAdam

TOPK_BUDGET = 768  # candidates per row that LSHLinear.topk scores by default (see topk_budget)
# Candidates per answer where k passes TOPK_BUDGET's share: not measured beyond the recall check, which answers
# exactly where they find too little of the top k.
TOPK_CANDIDATES_PER_ANSWER = 4
TOPK_TABLES = 60
TOPK_BUCKETS = 2 ** 13  # topk's tables: N / TOPK_BUCKETS rows per bucket, clamped to TOPK_ROWS_PER_BUCKET
TOPK_ROWS_PER_BUCKET = (8, 80)  # (see topk_settings)
TOPK_PROBES = 12
TOPK_NORM_SHARE = 128  # the largest 1/128 of the rows by norm are scored for every input
TOPK_ALONE_SHARE = 4  # the likeliest rows alone stand in for a failed index up to a quarter of the rows
TOPK_MIN_RECALL = 0.95  # an index that recalls less of the exact top-k than this is not used (TopkIndex.topk)
TOPK_CHECKED_INPUTS = 64  # an index is judged by its answers on the last 64 inputs compared with the exact top-k
# After the first 64, one input in every TOPK_AUDIT_EVERY that an index answers is checked too, so that inputs unlike
# the first ones (a stream that drifts, heavy users after light ones) still get the recall they were promised. Those
# keep the index's answers and are checked TOPK_AUDIT_BATCH at a time: an exact answer reads every row, for one input
# nearly as long as for 64 (670K x 128: 0.16 s for 1 input, 1.5 s for 64, 20 s for 1,024, 2 busy cores; checking
# one input of each 1,024-query call at once measured 1.4-2x slower calls there). One in every TOPK_RETRY_EVERY inputs
# answered exactly after a failed check is also searched in the index (next to nothing beside the exact scores),
# which takes over again once the last 64 checked say it may (a random warm-up batch failed it for good).
TOPK_AUDIT_EVERY = 1024
TOPK_AUDIT_BATCH = 16
TOPK_RETRY_EVERY = 16
EXACT_BLOCK = 2 ** 26  # scores that exact_topk holds at once (256 MB in float32)


def topk_budget(out_features: int, k: int = 0) -> int:
    """Candidates per row that :meth:`LSHLinear.topk` scores by default for the top ``k``: :data:`TOPK_BUDGET`,
    or :data:`TOPK_CANDIDATES_PER_ANSWER` times ``k`` where larger (from k = 193; a larger k was refused), at
    most every output (the exact computation). Measured at 670K outputs on rows in clusters with the
    default index and 12 probes (``benchmarks/bench_topk.py --budgets``): recall of the exact top 5 0.930 /
    0.961 / 0.967 / 0.971 with 512 / 768 / 1,024 / 2,048 candidates, in 1.03 / 1 / 1.14 / 1.46 the time of
    768. Independent of the training budget ``active``: inference is another trade-off."""
    out_features = check_int("out_features", out_features, 1, 2 ** 62)
    return min(out_features, max(TOPK_BUDGET, TOPK_CANDIDATES_PER_ANSWER * k))


def topk_settings(out_features: int) -> dict:
    """The defaults of :meth:`LSHLinear.topk` for a layer of this width; one rule for every width.

    ``num_tables`` (L) 60 and ``bits`` (K) ``round(log2(N / r))`` for ``r = N / 2^13`` rows per
    bucket clamped to [8, 80]: 13 from about 46K to 927K outputs, 14 at 1M, ``round(log2(N / 8))``
    below (11 at 16K). Its 60 x 12 probed buckets then scan about ``720 / 2^K`` of the rows (9% at
    K=13; more below 46K outputs, where the dense top-k is cheap): with about 80 rows per bucket at
    100K and 300K outputs (K=10, 12; 98 and 73 rows), clustered rows were found at 0.999 / 0.988 but
    only 1.3x / 5.1x as fast as the dense top-k, with K=13 at 0.980 / 0.964 and 2.7x / 6.3x
    (``benchmarks/results/topk_narrow.json``, docs/results.md). ``probes`` 12 per table,
    ``budget`` :func:`topk_budget` (768), ``norm_rows`` ``N // 128`` (5,235 at 670K). Measured at 670,091 outputs, 1,024 queries, 2 busy cores (recall of the exact
    top 5; speed against ``F.linear`` + ``torch.topk`` in the same run; ``benchmarks/bench_topk.py``):

    * rows in clusters, L=60, K=13, 768 candidates: 8 / 12 / 16 probes 0.914 / 0.961 / 0.973 at
      7.1x / 6.1x / 4.9x. Other indexes near recall 0.97 were slower or larger (1,024
      candidates): L=40, K=14, 32 probes 0.968 at 5.6x (113 MB); with ``N // 64`` norm rows, L=80,
      K=13, 8 probes 0.972 at 5.7x (215 MB) and L=40, K=13, 24 probes 0.971 at 4.7x. More,
      smaller buckets find more per row scanned, but every probed bucket costs cache misses, so
      the time stays about the same;
    * the trained XMC head: the ``N // 128`` largest-norm rows with the tables 0.992-0.999 for
      every index above, ``N // 64`` 1.000 (about 50 ms more per 1,024 queries), none 0.21-0.52.
    """
    out_features = check_int("out_features", out_features, 1, 2 ** 31 - 1)
    low, high = TOPK_ROWS_PER_BUCKET
    rows_per_bucket = min(high, max(low, out_features / TOPK_BUCKETS))
    bits = min(MAX_BITS, max(1, round(math.log2(out_features / rows_per_bucket))))
    return {"num_tables": TOPK_TABLES, "bits": bits, "probes": min(MAX_PROBES, TOPK_PROBES, 2 ** bits),
            "budget": topk_budget(out_features), "norm_rows": out_features // TOPK_NORM_SHARE}


def check_min_recall(min_recall) -> float:
    """``min_recall`` (see :meth:`TopkIndex.topk`) as a float in [0, 1]."""
    value = int_or_float("min_recall", min_recall, "a number in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"min_recall must be in [0, 1], got {min_recall}")
    return float(value)


def among(candidates: Tensor, sets: Tensor) -> Tensor:
    """Which of ``candidates`` are in their row's set (``sets`` ``[B, M]``, negative entries are padding):
    ``[B, P]`` candidates row by row, ``[P]`` against every row's. A binary search: memory O(B x P)
    whatever M."""
    if not sets.shape[1]:
        return torch.zeros_like(candidates, dtype=torch.bool)
    ordered = (sets.sort(1) if candidates.dim() == 2 else sets.reshape(-1).sort()).values
    candidates = candidates.contiguous()  # (searchsorted copies and warns otherwise)
    at = torch.searchsorted(ordered, candidates).clamp_max_(ordered.shape[-1] - 1)
    return ordered.gather(-1, at) == candidates  # padding sorts first and equals no candidate


def exact_topk(x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int) -> tuple[Tensor, Tensor]:
    """``F.linear(x, weight, bias).topk(k, dim=1)``, a block of inputs at a time so that at most
    :data:`EXACT_BLOCK` scores exist at once (1,024 inputs at 670K outputs would be 2.7 GB)."""
    if k == 0:  # no scores needed
        return x.new_empty(x.shape[0], 0), torch.empty(x.shape[0], 0, dtype=torch.int64, device=x.device)
    block = max(1, EXACT_BLOCK // max(1, weight.shape[0]))
    if x.shape[0] <= block:
        return F.linear(x, weight, bias).topk(k, dim=1)
    parts = [F.linear(x[i:i + block], weight, bias).topk(k, dim=1) for i in range(0, x.shape[0], block)]
    return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])


def excluded_room(exclude: Optional[Tensor]) -> int:
    """Candidates a search adds per row for ``exclude`` ``[B, M]``: M rounded up to a power of two (a recommender's
    batches differ in their widest history: one recall check for widths 129-256), 0 without."""
    width = 0 if exclude is None else exclude.shape[1]
    return 1 << (width - 1).bit_length() if width else 0


def exact_topk_outside(x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int, exclude: Optional[Tensor] = None,
                       ids: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """:func:`exact_topk` where each row's ``exclude`` ids (``[B, M]``, negative entries are padding) score -inf, as
    ``torch.topk`` of the masked scores: the top ``k + M`` (at most every row of ``weight``), the excluded ones set
    to -inf, the best ``k`` of them. ``ids``: the output id of each row of ``weight`` (a subset of the layer's rows;
    default: its place)."""
    width = 0 if exclude is None or k == 0 else exclude.shape[1]  # (k = 0: no scores)
    values, best = exact_topk(x, weight, bias, min(weight.shape[0], k + width))
    indices = best if ids is None else ids[best]
    if not width:
        return values, indices
    values, keep = values.masked_fill(among(indices, exclude), -math.inf).topk(k, dim=1)
    return values, indices.gather(1, keep)


@dataclass
class RecallCheck:
    """How much of the exact top-k an index found on the last :data:`TOPK_CHECKED_INPUTS` inputs it was checked on
    (:meth:`TopkIndex.topk`): ``found`` of ``wanted``; ``inputs`` counts every input checked so far."""
    inputs: int = 0
    found: int = 0
    wanted: int = 0
    # The last 64 counted inputs (float64), their exact top k's ids, flattened, and how many of those each input's
    # answer held (a failed check sizes its stand-in by them: rows_alone; the first to fail orders the stand-ins'
    # rows: TopkIndex.order_alone).
    queries: Optional[Tensor] = field(default=None, repr=False, compare=False)
    winners: Optional[Tensor] = field(default=None, repr=False, compare=False)
    hits: Optional[Tensor] = field(default=None, repr=False, compare=False)
    answered: int = field(default=0, repr=False, compare=False)  # inputs answered since the first 64 were checked
    pending: list = field(default_factory=list, repr=False, compare=False)  # audited inputs not checked yet (wait)

    @property
    def done(self) -> bool:
        return self.inputs >= TOPK_CHECKED_INPUTS

    @property
    def recall(self) -> Optional[float]:
        return self.found / self.wanted if self.wanted else None

    def due(self, batch: int, every: int, device) -> Tensor:
        """Which of a call's ``batch`` inputs to check: until 64 are, as many as are missing, spread evenly over
        the call's; then one in every ``every`` inputs answered."""
        if not self.done:
            count = min(batch, TOPK_CHECKED_INPUTS - self.inputs)
            return torch.arange(count, device=device) * batch // count
        first = (every - 1 - self.answered) % every
        self.answered += batch
        return torch.arange(first, max(first, batch), every, device=device)

    def add(self, queries: Tensor, found: tuple[Tensor, Tensor], exact: tuple[Tensor, Tensor]) -> None:
        """Count checked inputs: ``queries [n, d]``, the answers ``found`` and the ``exact`` ones (values and ids,
        ``[n, k]`` each); the oldest beyond the last 64 are forgotten."""
        (found_values, found_indices), (exact_values, exact_indices) = found, exact
        # A hit: one of the exact top k, or a row that ties with the k-th (another row of equal score).
        # (A binary search: a [rows, k, k] comparison took 25.6 GB at k = 20,000 and 64 rows.)
        hits = among(found_indices, exact_indices) | (found_values >= exact_values[:, -1:])
        counted = ~exact_values.isnan().any(1)  # an input with NaN scores has no top k to find: not counted
        # Queries kept in float64, as order_alone reads them: calls under autocast to bfloat16 and to float16
        # would otherwise leave two dtypes that autocast's cat refuses to join.
        queries, winners, hits = queries[counted].detach().double(), exact_indices[counted].cpu(), hits[counted].cpu()
        last, k = TOPK_CHECKED_INPUTS, winners.shape[1]
        join = lambda old, new: new[-last:] if old is None else torch.cat([old, new])[-last:]
        self.inputs += hits.shape[0]
        self.queries = join(self.queries, queries)
        self.winners = join(None if self.winners is None else self.winners.view(-1, k), winners).flatten()
        self.hits = join(self.hits, hits.sum(1))
        self.found, self.wanted = int(self.hits.sum()), self.hits.numel() * k

    def wait(self, queries: Tensor, values: Tensor, indices: Tensor, exclude: Optional[Tensor]):
        """Keep audited inputs and their answers; once :data:`TOPK_AUDIT_BATCH` wait, all of them (``(queries,
        values, indices, exclude)``, ``exclude``'s rows padded to one width), to be checked at once; else None."""
        self.pending.append((queries.detach(), values, indices, exclude))
        if sum(q.shape[0] for q, *_ in self.pending) < TOPK_AUDIT_BATCH:
            return None
        queries, values, indices, seen = zip(*self.pending)
        self.pending = []
        width = max((0 if e is None else e.shape[1]) for e in seen)
        seen = None if all(e is None for e in seen) else torch.cat(
            [q.new_full((q.shape[0], width), -1, dtype=torch.long) if e is None else F.pad(e, (0, width - e.shape[1]), value=-1)
             for q, e in zip(queries, seen)])
        return torch.cat(queries), torch.cat(values), torch.cat(indices), seen


def weight_version(weight: Optional[Tensor]):
    """What tells, with the tensor's identity, whether ``weight`` (or a bias; None: none) changed since
    an index was built from it: its storage, shape, dtype, device and version counter (every in-place
    change bumps it: optimizer steps, fused ones too (see :func:`follow_optimizer_steps`), ``copy_``,
    ``load_state_dict``; not writes through ``.data``). An inference tensor has no version counter:
    then the rest only (in-place changes to it, possible under ``inference_mode``, go unseen)."""
    if weight is None:
        return None
    version = None if weight.is_inference() else weight._version
    return (weight.data_ptr(), tuple(weight.shape), weight.dtype, weight.device, version)


class _Held:
    """A strong reference called like a weak one."""
    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor):
        self.tensor = tensor

    def __call__(self) -> Tensor:
        return self.tensor


def tensor_ref(t: Tensor):
    """What an index or a layer's tables keep of the tensor they were built from, to know it again by
    identity (called, it gives the tensor, or None once freed): a Parameter held (its module holds it
    anyway, a replaced one until the next build; ``torch.utils.swap_tensors``, which ``module.to()`` and
    ``load_state_dict`` use under ``torch.__future__.set_swap_module_params_on_conversion`` and for
    tensor-subclass parameters, refuses a tensor with a weak reference), any other tensor (a substituted or
    parametrized weight, maybe with a graph) weakly, never kept alive."""
    return _Held(t) if isinstance(t, nn.Parameter) else weakref.ref(t)


_step_hooks = None
_stepped_layers: "weakref.WeakSet" = weakref.WeakSet()  # layers whose weights' steps are recorded


def _rows_written(optimizer: torch.optim.Optimizer, grad: Tensor) -> Optional[Tensor]:
    """The rows a step of ``optimizer`` wrote from ``grad``: a row-sparse gradient's rows where the optimizer is
    lazy (updates those rows only, weight decay included), else None (any row)."""
    if type(optimizer) in (LazyAdam, torch.optim.SparseAdam) and grad.layout == torch.sparse_coo \
            and grad.sparse_dim() == 1:
        return grad._indices()[0]
    return None


def follow_optimizer_steps(layer: Optional[nn.Module] = None) -> None:
    """After every optimizer step (registered once, with the first layer), two things:

    * a fused optimizer (``torch.optim.Adam(..., fused=True)`` and the like) updates its parameters in
      place without bumping their version counters, so indexes would take the old weight's answers
      for the new one's (``topk``): the counters of the parameters it updated (with a gradient) are
      bumped, as PyTorch's other in-place updates do;
    * ``layer`` (an LSHLinear) is told the version its weight has after a step that updated it
      (``_optimizer_stepped``): its eval lookups keep the tables training left, and re-hash only after
      other writes (an EMA ``copy_``, an init).

    Before the step, a lazy optimizer's rows are recorded for ``layer``'s next scheduled build (see
    ``nn._LazyWrites``). It costs a step two passes over its parameters' ids and the live layers."""
    global _step_hooks

    def stepped_layers(optimizer):
        """The live layers whose weight ``optimizer`` holds and has a gradient for (a set of every id: 44 us a
        step at 1,000 parameters), with that weight."""
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for stepped_layer in list(_stepped_layers):
            weight = stepped_layer._parameters.get("weight")  # (a parametrized weight is no Parameter)
            if weight is not None and id(weight) in ids and weight.grad is not None:
                yield stepped_layer, weight

    @torch.compiler.disable
    def before_step(optimizer, args, kwargs) -> None:
        if _stepped_layers:
            for stepped_layer, weight in stepped_layers(optimizer):
                stepped_layer._lazy_writes.step_begins(stepped_layer._weight_version(),
                                                       _rows_written(optimizer, weight.grad))

    @torch.compiler.disable  # a compiled step traced it once, recording nothing at the steps after
    def after_step(optimizer, args, kwargs) -> None:
        for group in optimizer.param_groups:
            if group.get("fused"):  # the others' in-place updates bump the versions themselves
                for p in group["params"]:  # those it stepped: a parameter without a gradient is left alone
                    if p.grad is not None and not p.is_inference():
                        torch.autograd.graph.increment_version(p)
        if _stepped_layers:
            for stepped_layer, _ in stepped_layers(optimizer):
                stepped_layer._optimizer_stepped()

    if _step_hooks is None:
        _step_hooks = (register_optimizer_step_pre_hook(before_step), register_optimizer_step_post_hook(after_step))
    if layer is not None:
        _stepped_layers.add(layer)


class TopkIndex:
    """Hash tables over the directions of a weight's rows plus its rows in order of norm.

    ``num_tables`` (L) tables of ``bits`` (K) signed random projections, seeded by ``seed``; the
    rows by decreasing norm (``order``) and each row's place in that order (``rank``). Memory at
    N rows: ``4 L N`` bytes of tables (161 MB at L=60, N=670K), ``4 L 2^K`` of offsets and
    ``12 N`` of order and rank, ``4 N`` of fingerprints (:meth:`followed`), ``12 N`` more with a bias (its
    order) and ``12 N`` more once a check fails (the stand-ins' order). Built from
    ``weight`` as it is; :meth:`matches` tells whether it still describes a weight (see
    :func:`weight_version`).
    """

    def __init__(self, weight: Tensor, num_tables: int, bits: int, seed: int, bias: Optional[Tensor] = None):
        if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise TypeError(f"weight must be a floating [N, d] tensor, got "
                            f"{f'{weight.dtype} of shape {tuple(weight.shape)}' if isinstance(weight, Tensor) else type(weight).__name__}")
        num_tables = check_int("topk_tables", num_tables, 1, MAX_TABLES)
        bits = check_int("topk_bits", bits, 1, MAX_BITS)
        seed = check_int("seed", seed, 0, 2 ** 63 - 1)
        rows = weight.detach()
        self.num_tables, self.bits, self.seed = num_tables, bits, seed
        self._weight = tensor_ref(weight)
        self.key = (weight_version(weight), num_tables, bits, seed)
        self.checked_bias = self.by_bias = None
        self.recheck(bias)  # (the recall checks measure answers with it)
        follow_optimizer_steps()
        self._order_by_norm(rows)
        self.projection = hashing.make_projection(rows.shape[1], num_tables, bits, seed, rows.device)
        codes = hashing.row_codes(rows, self.projection, num_tables, bits, asymmetric=False)
        self.offsets, self.items = ops.build_tables(codes, bits)
        # Which rows a later change moved: their dot products with a fixed random vector (see followed).
        self.fingerprint_vector = hashing.make_fingerprint_vector(rows.shape[1], seed, rows.device)
        self.fingerprints = ops.row_fingerprints(rows, self.fingerprint_vector)
        self.rehashed = rows.shape[0]  # rows hashed by the build, or by the last followed
        self.checks: dict[tuple, RecallCheck] = {}  # (k, probes, budget, norm_rows) -> its recall so far
        # The rows a stand-in scores alone, best first, and each row's place there (on the CPU: choosing a
        # stand-in reads it); ordered when the first check fails (order_alone).
        self.alone_order: Optional[Tensor] = None
        self.alone_rank: Optional[Tensor] = None
        self._warned: set = set()  # (those settings, min_recall, default norm_rows) whose exact answers were warned of

    def _order_by_norm(self, rows: Tensor) -> None:
        wide = rows.dtype in (torch.float32, torch.float64)  # reduced precision: summed in float32
        norms = torch.linalg.vector_norm(rows, dim=1, dtype=None if wide else torch.float32)
        if not bool(torch.isfinite(norms).all()):
            raise ValueError("weight has non-finite values (NaN or inf) or rows whose norm overflows: "
                             "topk cannot index it")
        self.order = norms.argsort(descending=True)
        self.rank = places(self.order)

    def followed(self, weight: Tensor, num_tables: int, bits: int, seed: int) -> Optional["TopkIndex"]:
        """This index brought up to ``weight``'s new values, as a new index (threads may be reading this
        one): only the rows that moved (their fingerprint) are re-hashed and merged into the tables
        (:func:`ops.update_tables`: the tables a new build would make), the norm order is redone and the
        recall checks start again. None where a new build is due: another tensor, shape, dtype, device
        or settings, or more than a tenth of the rows moved. A training step moves a batch's rows; at 1M x
        64 a new build took 7-10 s (a user review). A change that the float32 fingerprint cannot see, below
        about 1e-7 of the row, keeps the row's codes, as the training tables' builds do."""
        now = weight_version(weight)
        if (self._weight() is not weight or self.key[1:] != (num_tables, bits, seed)
                or self.key[0][:4] != now[:4]):
            return None
        rows = weight.detach()
        fingerprints = ops.row_fingerprints(rows, self.fingerprint_vector)
        changed = (fingerprints != self.fingerprints).nonzero().squeeze(1)
        if changed.numel() * 10 > rows.shape[0]:
            return None
        index = copy.copy(self)
        if changed.numel():
            new_codes = hashing.row_codes(rows, self.projection, num_tables, bits, asymmetric=False, index=changed)
            index.offsets, index.items = ops.update_tables(self.offsets, self.items, changed, self._codes_of(changed),
                                                           new_codes)
            index._order_by_norm(rows)
        index.key, index.fingerprints, index.rehashed = (now, num_tables, bits, seed), fingerprints, changed.numel()
        index.checks, index._warned, index.alone_order, index.alone_rank = {}, set(), None, None
        return index

    def _codes_of(self, rows: Tensor) -> Tensor:
        """The buckets that hold ``rows`` (int64, ascending), ``[R, L]`` int32, read off the tables one at a
        time (each table's places of every row: 4 N bytes, where all at once would take 4 L N)."""
        codes = [torch.searchsorted(offsets, places(items.long())[rows], right=True) - 1
                 for offsets, items in zip(self.offsets, self.items)]
        return torch.stack(codes, 1).to(torch.int32)

    def matches(self, weight: Tensor, num_tables: int, bits: int, seed: int) -> bool:
        """Was this index built from ``weight`` as it is now, with these settings?"""
        return self._weight() is weight and self.key == (weight_version(weight), num_tables, bits, seed)

    def recheck(self, bias: Optional[Tensor]) -> None:
        """Forget the recall checks if ``bias`` changed since they measured: the bias is not indexed (its
        rows' directions are the weight's), but a new one changes which outputs are the top k."""
        if weight_version(bias) != self.checked_bias:
            # An input whose exact scores hold a NaN has no top k to check against: with a NaN bias entry every
            # input's check was skipped and the index answered unchecked, silently. (A -inf entry masks an output.)
            if bias is not None and bool(torch.isnan(bias).any()):
                raise ValueError("bias has NaN values: topk cannot check its index against the exact top k")
            order = None if bias is None else bias.detach().argsort(descending=True)
            # Swapped in whole, the version last: a thread that finds it current finds them current.
            self.by_bias = None if order is None else (order, places(order))
            self.checks, self._warned = {}, set()
            self.alone_order = self.alone_rank = None  # the bias is in their estimate
            self.checked_bias = weight_version(bias)

    def order_alone(self, weight: Tensor, bias: Optional[Tensor], queries: Tensor) -> None:
        """Order the rows for the stand-ins (:attr:`alone_order`, :attr:`alone_rank`) by an estimate
        of their output for a typical one of ``queries`` (the first failed check's inputs): with
        ``m`` their mean and ``s`` their median distance from it, ``x.w + b = m.w + b + (x - m).w``,
        at most ``m.w + b + s |w|`` for an input ``s`` from ``m`` (a bound for that input, a
        heuristic for the others). The inputs are finite ones; those farther than 4 ``s`` from
        their mean are left out of ``m`` (one outlying input moved it enough to fail the stand-in).

        With inputs centred on the origin and no bias this is the order of norms. A
        softmax-trained head's are not centred: every step pushes the rows that are not the label
        away from the inputs, so the mean input points against the mean row (cosine -0.99 on the
        100K-label demo heads), and ``m.w`` tells apart rows that their norms do not. On the demo
        head trained per row (rows in a narrow cone around their mean) the exact top 5 of its test
        points needed half the rows in the norm order to hold 0.9 of them, 207 in this one; on the
        shared one 6,399 and 3,412. (In float64, in blocks of rows: about 0.2 s at 670K outputs,
        once per index, only where a check fails.)"""
        queries = queries.detach().double()
        queries = queries[torch.isfinite(queries).all(1)]
        if queries.shape[0]:
            distance = torch.linalg.vector_norm(queries - queries.mean(0), dim=1)
            queries = queries[distance <= 4 * distance.median()]
            mean = queries.mean(0)
            spread = torch.linalg.vector_norm(queries - mean, dim=1).median()
        else:  # no finite input to go by: the norm order
            mean, spread = queries.new_zeros(weight.shape[1]), queries.new_ones(())
        estimate = torch.cat([torch.mv(block, mean) + spread * torch.linalg.vector_norm(block, dim=1)
                           for block in (b.detach().double() for b in weight.split(2 ** 16))])
        if bias is not None:
            estimate += bias.detach()
        self.alone_order = estimate.argsort(descending=True)
        self.alone_rank = places(self.alone_order.cpu())

    def nbytes(self) -> int:
        """Bytes the index holds (tables, offsets, order, rank, projection; the stand-ins' order, rank; the
        bias order, rank; the fingerprints)."""
        return sum(t.numel() * t.element_size() for t in (self.items, self.offsets, self.order, self.rank,
                                                         self.projection, self.alone_order, self.alone_rank,
                                                         *(self.by_bias or ()), self.fingerprints,
                                                         self.fingerprint_vector)
                   if t is not None)

    @torch.compiler.disable  # the check's tally is Python state: eager, as the index's build is
    def topk(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int, probes: int, budget: int,
             norm_rows: Optional[int], seed: int, min_recall: float = TOPK_MIN_RECALL,
             exclude: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Top ``k`` of ``x [B, d]`` by exact score among the ``budget`` rows per input that the
        tables rank highest (most probed buckets hit; ``probes`` per table), the ``norm_rows``
        largest-norm rows and, with them, the ``k`` rows of largest bias. Only the tables' real
        candidates are scored: where they find fewer
        than ``k`` for a row, seeded uniform draws complete it (as :func:`ops.query` fills).

        Checked against the exact top-k: the first :data:`TOPK_CHECKED_INPUTS` (64) inputs that
        these settings answer (evenly spread over each call's) are also scored exactly and get the exact
        answer; after them, one in every :data:`TOPK_AUDIT_EVERY` (1,024) is checked too, keeping the index's
        answer, :data:`TOPK_AUDIT_BATCH` (16) at a time. Where the index found less than
        ``min_recall`` of the exact top-k of the last 64 checked, it is not used: the index's recall depends
        on the trained weight and the inputs, and some (the XMC demo's 100K-label head: 0.36) are not worth
        answering from. Answered exactly, one input in :data:`TOPK_RETRY_EVERY` (16) is also searched in the
        index, which answers again once the last 64 checked reach ``min_recall``. A new weight starts the
        checks again. ``min_recall=0``: no check, the index's own answers. :attr:`checks` holds what was
        measured.

        ``norm_rows=None`` (``"auto"``): ``N // 128`` norm rows beside the tables, and where that
        fails its check, the likeliest rows alone (no tables; the first rows of
        :attr:`alone_order`, ordered by the first failed check's inputs, :meth:`order_alone`;
        checked as settings ``(k, 0, 0, rows)``), as many as held ``min_recall`` of the failed
        check's exact top-k, rounded up to a doubling of ``N // 128``, at most a quarter of the
        rows (:func:`rows_alone`), and again wider if those fail their own check. Trained XMC
        heads keep their winners among few rows that the tables of directions cannot rank. Past a
        quarter, or with ``norm_rows`` given and failed: every later input is answered exactly
        (:func:`exact_topk`), with a warning.

        ``exclude`` (``[B, M]``, -1 padding): ids each row must not get, scored -inf (as ``torch.topk`` of the
        masked scores), its exact answers too; the tables give :func:`excluded_room` more candidates per row,
        and as many more rows of largest bias are scored; checked as settings of their own, ``(k, probes,
        budget, norm_rows, room)`` (a stand-in ``(k, 0, 0, rows, room)``)."""
        n = self.items.shape[1]
        if weight.dim() != 2 or weight.shape[0] != n:
            raise ValueError(f"weight must be the [N = {n}, d] weight the index was built from, got {tuple(weight.shape)}")
        budget = check_int("budget", budget, 1, n)
        k = check_int("k", k, 1, budget)
        probes = check_int("probes", probes, 1, min(MAX_PROBES, 2 ** self.bits))
        if norm_rows is not None:
            norm_rows = check_int("norm_rows", norm_rows, 0, n)
        min_recall = check_min_recall(min_recall)
        room = excluded_room(exclude)
        key = self.answering(k, probes, budget, norm_rows, min_recall, weight, bias, room)
        # Checked: the settings that answer, or, answered exactly, the asked ones, whose index may take over again.
        checked = self._asked(k, probes, budget, norm_rows, room) if key is None else key
        check = self.checks.get(checked, RecallCheck())
        rows = (check.due(x.shape[0], TOPK_RETRY_EVERY if key is None else TOPK_AUDIT_EVERY, x.device) if min_recall
                else x.new_zeros(0, dtype=torch.long))
        excluded = lambda r: None if exclude is None else exclude[r]
        if key is None:
            self._warn_exact(checked, min_recall, norm_rows is None)
            values, indices = exact_topk_outside(x, weight, bias, k, exclude)
            if rows.numel():
                self.checks[checked] = check
                check.add(x[rows], self._search(x[rows], weight, bias, *checked[:4], seed, excluded(rows)),
                          (values[rows], indices[rows]))
            return values, indices
        values, indices = self._search(x, weight, bias, *key[:4], seed, exclude)
        if not rows.numel():
            return values, indices
        self.checks[checked] = check
        answered_exactly = rows[:0]
        if check.done:  # an audit: the index's answers stand, checked once enough wait
            audited = check.wait(x[rows], values[rows], indices[rows], excluded(rows))
            if audited is None:
                return values, indices
            queries, found_values, found_indices, seen = audited
            check.add(queries, (found_values, found_indices), exact_topk_outside(queries, weight, bias, k, seen))
        else:  # the first 64: exact answers
            exact = exact_topk_outside(x[rows], weight, bias, k, excluded(rows))
            check.add(x[rows], (values[rows], indices[rows]), exact)
            values[rows], indices[rows] = exact
            answered_exactly = rows
        if check.done and check.recall < min_recall:
            # This call's other inputs as the verdict says (a stand-in is checked on them: not on the inputs
            # that chose it).
            others = torch.ones(x.shape[0], dtype=torch.bool, device=x.device).index_fill_(0, answered_exactly, False)
            if bool(others.any()):
                values[others], indices[others] = self.topk(x[others], weight, bias, k, probes, budget, norm_rows,
                                                            seed, min_recall, excluded(others))
        return values, indices

    def answering(self, k: int, probes: int, budget: int, norm_rows: Optional[int], min_recall: float,
                  weight: Tensor, bias: Optional[Tensor], room: int = 0) -> Optional[tuple]:
        """The settings ``(k, probes, budget, norm_rows)`` that answer :meth:`topk` calls with these
        now: themselves, the likeliest rows alone standing in for them (``(k, 0, 0, rows)``; of
        ``weight`` and ``bias``, ordered at the first that needs them), or None: exact scores (see
        :meth:`topk`); ``room``: :func:`excluded_room` of the call's ``exclude``, a fifth element where not 0."""
        key = self._asked(k, probes, budget, norm_rows, room)
        check = self.checks.get(key)
        while min_recall and check is not None and check.done and check.recall < min_recall:
            if norm_rows is not None:
                return None
            if self.alone_rank is None:
                self.order_alone(weight, bias, check.queries)
            rows = rows_alone(key, self.alone_rank[check.winners], min_recall, self.items.shape[1])
            if rows is None:
                return None
            key = (k, 0, 0, rows) + key[4:]
            check = self.checks.get(key)
        return key

    def _asked(self, k: int, probes: int, budget: int, norm_rows: Optional[int], room: int = 0) -> tuple:
        """The settings key of a call (``norm_rows`` None: ``N // 128``, the "auto" start; ``room`` for excluded
        ids, where not 0: a fifth element, a question of its own)."""
        key = (k, probes, budget, self.items.shape[1] // TOPK_NORM_SHARE if norm_rows is None else norm_rows)
        return key + (room,) if room else key

    def _warn_exact(self, key: tuple, min_recall: float, auto: bool) -> None:
        """Once per settings, ``min_recall`` and default ``norm_rows`` or not: topk answers exactly, and why."""
        if (key, min_recall, auto) in self._warned:
            return
        self._warned.add((key, min_recall, auto))
        check = self.checks[key]
        alone = "; nor would the likeliest rows alone, up to a quarter of them" if auto else ""
        warnings.warn(f"LSHLinear.topk: its index found {check.recall:.3f} of the exact top {key[0]} of the last "
                      f"{check.hits.numel()} inputs checked, less than min_recall={min_recall}{alone}: answering "
                      f"exactly (one input in {TOPK_RETRY_EVERY} is also searched in the index, which answers again "
                      f"once the last {TOPK_CHECKED_INPUTS} checked reach min_recall, or the weight changes; more probes "
                      "or budget may do; min_recall=0 takes the index's answers)",
                      stacklevel=user_stacklevel())  # the caller of LSHLinear.topk

    def _search(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int, probes: int, budget: int,
                norm_rows: int, seed: int, exclude: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """The index's own answer (see :meth:`topk`; ``exclude``'s ids scored -inf, with :func:`excluded_room`
        more candidates and bias rows); ``budget=0``: the first ``norm_rows`` rows of :attr:`alone_order` alone."""
        room = excluded_room(exclude)
        if budget:
            budget = min(self.items.shape[1], budget + room)
        bias_rows = self.by_bias  # (read once: another thread's recheck may swap it)
        if budget and norm_rows and bias is not None and bias_rows is not None:
            # The k rows of largest bias beside the norm rows: an input's top k as its norm goes to 0 (a
            # cold-start user's zero vector scores the bias alone), which the tables and the norm order
            # ignore (a user review: recall 0.0 for zero inputs, and a check failed by their share).
            # With norm_rows=0, the tables alone.
            bias_order, bias_rank = bias_rows
            by_bias = bias_order[:k + room]  # (a cold-start user who saw the most popular items: the next ones)
            by_bias = by_bias[self.rank[by_bias] >= norm_rows]  # those not scored as norm rows already
        else:
            by_bias = self.order[:0]
        if norm_rows or by_bias.numel():
            # Every row's k best among the norm rows, scored whole (in blocks): the candidates skip them below.
            rows = torch.cat([(self.order if budget else self.alone_order)[:norm_rows], by_bias])
            norm_values, norm_indices = exact_topk_outside(x, weight.index_select(0, rows), None if bias is None else
                                                           bias.index_select(0, rows), min(k, rows.numel()), exclude, rows)
        if not budget:
            values, indices = norm_values, norm_indices
        else:
            values, indices = self._candidates_topk(x, weight, bias, k, probes, budget, norm_rows, seed, exclude,
                                                    bias_rank if by_bias.numel() else None, k + room)
            if norm_rows or by_bias.numel():
                # k finite among the candidates left and the norm (and bias) rows together, never an id twice.
                values, best = torch.cat([values, norm_values], 1).topk(k, dim=1)
                indices = torch.cat([indices, norm_indices], 1).gather(1, best)
        # A row with fewer than k finite scores (outputs masked by a -inf bias, or excluded) ends in -inf ties, where
        # a skipped candidate could stand beside its own norm-row copy (an id twice): such rows are answered exactly
        # (a user review masked all but 10 of 20,000 outputs).
        short = values[:, -1] == float("-inf")
        if bool(short.any()):
            values[short], indices[short] = exact_topk_outside(x[short], weight, bias, k,
                                                               None if exclude is None else exclude[short])
        return values, indices

    def _candidates_topk(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int, probes: int, budget: int,
                         norm_rows: int, seed: int, exclude: Optional[Tensor], bias_rank: Optional[Tensor],
                         bias_rows: int) -> tuple[Tensor, Tensor]:
        """Each row's top ``k`` among its ``budget`` table candidates by exact score, skipping the first ``norm_rows``
        rows of the norm order and (``bias_rank`` given) the first ``bias_rows`` of the bias order, scored apart,
        and ``exclude``'s ids."""
        codes, margins = hashing.input_codes(x, self.projection, self.num_tables, self.bits)
        # Keyed by their codes, rows get the same candidates (and answers) however they are batched.
        active, head = ops.query(codes, margins, self.offsets, self.items, probes, budget, None, seed, 0,
                                 hashing.row_keys(codes))
        # Past its head a row holds uniform draws: score none of them beyond the first k, and none
        # at all in columns past every row's head.
        real = head.clamp_min(k)
        width = int(real.max()) if real.numel() else k
        active = active[:, :width]
        skip = self.rank[active] < norm_rows
        if bias_rank is not None:
            skip |= bias_rank[active] < bias_rows
        if width > k:
            skip |= torch.arange(width, device=x.device) >= real.unsqueeze(1)
        if exclude is not None:
            skip |= among(active, exclude)
        scores = ops.sparse_linear(x, weight, bias, active).masked_fill(skip, float("-inf"))
        values, best = scores.topk(k, dim=1)
        return values, active.gather(1, best)


def places(order: Tensor) -> Tensor:
    """``int32 [N]``: each row's place in ``order``, a permutation of the N rows (its inverse)."""
    return torch.empty_like(order, dtype=torch.int32).scatter_(
        0, order, torch.arange(order.numel(), dtype=torch.int32, device=order.device))


def rows_alone(key: tuple, ranks: Tensor, min_recall: float, n: int) -> Optional[int]:
    """How many rows of :attr:`TopkIndex.alone_order`, scored alone, stand in for the settings
    ``key`` (k, probes, budget, norm rows) of an index whose check found less than ``min_recall``
    (see :meth:`TopkIndex.topk`), given ``ranks``, the places there of the check's exact top-k:
    enough to hold ``min_recall`` of them, rounded up to ``N // 128`` (at least 1) times a power of
    2 (room for the inputs not checked), more than ``key``'s own if those were alone, at least
    ``k``. None past ``N // 4``: there exact scores cost at most four times as much."""
    ranks = ranks.sort().values
    needed = int(ranks[max(0, math.ceil(min_recall * ranks.numel()) - 1)]) + 1 if ranks.numel() else 1
    rows = max(1, n // TOPK_NORM_SHARE)
    while rows < needed or rows <= (key[3] if key[2] == 0 else 0) or rows < key[0]:
        rows *= 2
    return rows if rows <= n // TOPK_ALONE_SHARE else None
