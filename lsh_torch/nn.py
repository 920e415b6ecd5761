"""LSHLinear: nn.Linear that, in training, computes only the neurons an LSH lookup selects."""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import numbers
import sys
import warnings
import weakref
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn.utils import parametrize, prune
from torch.nn.utils.weight_norm import WeightNorm

from . import hashing, ops
from ._checks import (MAX_BITS, MAX_PROBES, autocast_on, check_bool, check_int, int_or_float, integer_scalar, refuse,
                      user_stacklevel, vouch)
from .losses import _label_rows
from .proposal import Proposal, check_proposal, draw_tail, proposal_log_weights
from .retrieval import (TOPK_BUDGET, TOPK_MIN_RECALL, RecallCheck, TopkIndex, check_min_recall,  # noqa: F401 (re-exported)
                        among, exact_topk_outside, excluded_room, follow_optimizer_steps, tensor_ref, topk_budget, topk_settings)
from .schedules import RebuildSchedule, as_schedule
from .tables import LSHTables

_INFERENCE_MODES = ("dense", "lsh")
_MODES = ("auto", "per_row", "shared")


class SparseOutput(NamedTuple):
    """Output of :meth:`LSHLinear.forward_sparse`: ``values[..., a]`` is the output of neuron
    ``indices[..., a]`` (per-row mode, ``[*, A]``) or ``indices[a]`` (shared mode, ``[A]``).

    ``log_weights`` (float32, the shape of ``indices``, or None for none) is what the active set
    stands for: 0 for labels and hashed candidates, ``log(rest / drawn)`` for the uniform tail
    drawn from the rest. :func:`lsh_torch.sparse_cross_entropy` adds it to the logits, which makes
    the sampled softmax an unbiased estimate of the full one (``docs/estimator.md``).
    """

    values: Tensor
    indices: Tensor
    log_weights: Optional[Tensor] = None


# Per-row training: the rows' top sets come from one pool of this many rows' worth of candidates
# (LSHLinear._best_of_the_batch_pool), scored a block of rows at a time, at most _POOL_SCORES scores (64 MB in float32).
BATCH_POOL_ROWS = 16
_POOL_SCORES = 2 ** 24
WIDE = 8192  # out_features from which a layer gets the output-layer defaults (see auto_settings)


def auto_bits(out_features: int, wide: Optional[bool] = None) -> int:
    """Bits per table: about 16 neurons per bucket below :data:`WIDE` outputs (the paper's K=6 at
    1000 neurons), about 200 from there (K=8 at 50K, 12 at 670K): there the tables must find the
    largest logits of a softmax, whose rows have low cosine with the input, and small buckets
    miss them (recall of the exact top 64 on the LM example's 50K-word head: 0.13 with K=12, 0.50
    with K=8, after rescoring 256 candidates from L=40 tables). ``wide`` overrides the width's
    kind: a shard of a wide output layer (``ShardedLSHLinear``) keeps the wide rule."""
    wide = out_features >= WIDE if wide is None else wide
    per_bucket = 200 if wide else 16
    return min(20, max(1 if wide else 6, round(math.log2(max(1, out_features) / per_bucket))))


def auto_settings(out_features: int, mode: str = "auto", hash="srp") -> dict:
    """What ``"auto"`` means for a layer of this width, mode and hash family; one rule, documented in the README.

    Below :data:`WIDE` outputs (hidden layers): the paper's L=5 tables, 10 probes, the MIPS
    transform, 25% of the neurons active (:meth:`LSHLinear.forward_sparse`, a softmax's path,
    computes every output up to :data:`WIDE`: :attr:`LSHLinear.exact_softmax`). From :data:`WIDE` (softmax output layers): 2 probes,
    direction-only hashing (``asymmetric=False``), 2,048 active neurons (half of them the
    corrected uniform tail in :meth:`LSHLinear.forward_sparse`), and L=40 tables where each row
    needs its own top set (``mode="per_row"``: LM example, 128 words per token, perplexity 178.4
    with L=40 against 195.1 with L=20) but L=20 where the batch shares one (``"shared"``, and
    ``"auto"``, whose training path is shared: XMC demo P@1 0.729 with L=20 against 0.731 with
    L=40, at half the query and rebuild cost).
    The MIPS transform is SimHash's: with ``hash="dwta"`` (or a DWTA instance) ``asymmetric`` is False,
    and a DWTA of a given ``bin_size`` gets K rounded to a multiple of its ``log2(bin_size)`` bits per
    hash. (An explicit K below ``log2(probes)`` caps the auto probes at its ``2**K`` buckets.)
    """
    wide = out_features >= WIDE
    srp = isinstance(hash, hashing.SRP) or hash == "srp"
    tables = (40 if mode == "per_row" else 20) if wide else 5
    return {"num_tables": tables, "bits": fit_bits(auto_bits(out_features), hash), "probes": 2 if wide else 10,
            "asymmetric": srp and not wide, "active": min(out_features, 2048) if wide else 0.25}


def fit_bits(bits: int, hash) -> int:
    """An auto K fitted to the hash family: a DWTA of a given ``bin_size`` hashes ``log2(bin_size)``
    bits at a time, so K becomes the nearest multiple of that, within the kernels' 20 bits."""
    bin_size = hash.bin_size if isinstance(hash, hashing.DWTA) else None
    if isinstance(bin_size, numbers.Integral) and bin_size >= 2 and not bin_size & (bin_size - 1):
        per_hash = int(bin_size).bit_length() - 1
        bits = max(per_hash, min(round(bits / per_hash), MAX_BITS // per_hash) * per_hash)
    return bits


def cap_probes(probes: int, bits) -> int:
    """Auto probes within a given K's ``2**K`` buckets (a small explicit K has fewer than the auto
    probes); a K out of range is left for the tables' check to name."""
    if isinstance(bits, numbers.Integral) and not isinstance(bits, bool) and 1 <= bits <= MAX_BITS:
        return min(probes, 2 ** int(bits))
    return probes


# Forward pre-hooks that compute the weight: torch.nn.utils.prune's and the legacy weight_norm's.
_WEIGHT_HOOKS = (prune.BasePruningMethod, WeightNorm)


def _reads_weight(method):
    """For the methods that read the weight. A parametrized weight (torch.nn.utils.parametrize) is computed once
    per call, not at every read: nn.Linear's forward reads it once, and spectral_norm runs a power iteration at
    each computation. A weight that a forward pre-hook computes (prune, the legacy weight_norm) is recomputed
    first by the methods ``__call__`` does not run (forward_sparse, topk, active_set): they read the weight of
    the last forward, stale or without grad, and the weight silently stopped training."""
    hooks_ran = method.__name__ == "forward"

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if not hooks_ran:
            for hook in self._forward_pre_hooks.values():
                if isinstance(hook, _WEIGHT_HOOKS):
                    hook(self, args)
        if not parametrize.is_parametrized(self, "weight"):
            return method(self, *args, **kwargs)
        with parametrize.cached():
            return method(self, *args, **kwargs)
    return call


def _eager_under_compile(reason: str):
    """``torch.compiler.disable``, with the reason dynamo's fullgraph error then gives (its ``reason=`` came in torch
    2.8; before it, the error gives none)."""
    try:
        return torch.compiler.disable(reason=reason)
    except TypeError:
        return torch.compiler.disable


class LSHLinear(nn.Module):
    r"""A drop-in for :class:`torch.nn.Linear` whose training step touches only the active neurons.

    Every output neuron's weight row is hashed into ``num_tables`` (L) tables with ``bits`` (K)
    signed random projections after the asymmetric MIPS transform (or of the rows' directions; or
    with densified winner-take-all hashes, ``hash="dwta"``). For each input row the layer
    probes ``probes`` buckets per table and takes the ``active`` neurons most often found (filling
    up with random ones), computes those outputs only, and sends gradients to those only.

    Args:
        in_features, out_features, bias, device, dtype: as for :class:`torch.nn.Linear`.
        num_tables, bits, probes, asymmetric, active: ``"auto"`` (each one's default) chooses them
            from ``out_features`` by :func:`auto_settings`: the paper's hidden-layer settings below
            8,192 outputs, output-layer settings from there.
        num_tables: L, the number of hash tables (auto: 5, as in the paper; 20 for wide layers, 40
            with ``mode="per_row"``).
        bits: K, bits per table code; each table has ``2**K`` buckets (auto: :func:`auto_bits`).
        probes: buckets probed per table: the input's own plus its nearest by multi-probe (auto: 10 or 2).
        tail: how much of the budget :meth:`forward_sparse` reserves for the uniform tail: an int
            count or a float fraction of the budget. The active set is the labels, then the
            tables' best candidates, then uniform draws from the remaining neurons (at least
            ``tail`` of them), whose logits the loss corrects by ``log(remaining / drawn)``
            (:class:`SparseOutput`). Default ``"auto"``: half the budget in :meth:`forward_sparse`
            and none in :meth:`forward`, whose outputs no loss corrects (hidden layers); an
            explicit count or fraction applies to both (``forward``'s set is then ``forward_sparse``'s, its tail uniform),
            and turns off :attr:`exact_softmax` of layers up to 8,192 outputs.
            A fraction above 0 draws at least one; 0 draws none (a softmax over the set alone, biased).
            Labels come first: where they and the tail would not fit the budget (8 x 1,024 Zipf-distributed
            targets over GPT-2's 50,257 words held 3,357 distinct ones), the set grows to hold them all,
            with no room for hashed candidates (a warning says so once).
        tail_proposal: None (default: the tail is uniform draws without replacement), or a tensor of
            ``out_features`` counts >= 0, how often each output is a label in the training data (for a
            language model, the words' counts in the corpus). In training each tail entry then draws output
            ``j`` with probability proportional to ``sqrt(counts[j] + 1)``, again while it lands on the labels
            or the top set (up to ``proposal.TRIES``, 16), and is corrected by one over its chance of ending
            where it did (``-inf`` if all its tries hit), so that frequent outputs, which hold most of a
            softmax's mass outside the top set, are drawn more often and weigh less. The estimate stays
            unbiased (``lsh_torch.proposal``, ``docs/estimator.md``). LM example at a rate of 6e-3, per
            token: perplexity 174.0 (128 words) and 172.6 (256) against 180.6 and 179.2 with the uniform
            tail and 178.5 dense (seeds 0-2), 4-9% more per step (the draws and weights are the ops
            ``proposal_draw`` and ``proposal_log_weights``); a batch-shared set of 2,048 is worse with it (186.2
            against 180.4; 190.2 drawn without replacement). Eval sets and :meth:`forward` keep the uniform tail (an eval set must
            not depend on its batch). Not in the state dict: pass it again when re-creating the layer.
        rescore: with a tail, the top set is chosen by exact scores among ``rescore`` times as
            many hashed candidates (their outputs computed without gradient), not by bucket hits
            alone; 1 ranks by bucket hits. Default 4. Per row in training, the rows share one pool of
            :data:`BATCH_POOL_ROWS` (16) times that many, the most bucket hits over the batch, scored
            for every row by one matrix product (a pool per row held 0.07 of the XMC demo head's exact
            top 64, the batch's 0.47); eval lookups keep a pool per row, so that an input's set does not
            depend on its batch. In shared mode the candidates are found and
            scored for an evenly spaced sample of the batch's rows, as many as keep the exact scores
            within :attr:`top_set_scores` ("auto": a quarter of the set's own outputs, rows x
            budget, and at most 256 rows x 3,072 candidates; the pool, and so the sample, moves
            with the batch's count of distinct labels): a batch's rows share their likely outputs
            (LM example, 1,024 tokens: labels and the top set of a 2,048 set from 171 rows held
            80.6% of the softmax mass, from all 1,024 80.5%; an 8,192 set's pool is 5x larger, so
            49 rows: 87.1% against 88.3% from 256; XMC demo, 128 points: 26 of them choose as well
            as all 128 and save a sixth of the step; ``docs/estimator.md``). Where the tables hash
            directions only (``asymmetric=False``: wide layers' default), a shared pool's first
            :attr:`norm_rows_share` (a quarter; 0: none) are the rows of largest norm at the last
            build, which such tables cannot tell apart from the rest, then the hashed candidates.
        active: budget of active neurons per row (or per batch in shared mode): an int count, or
            a float fraction of ``out_features``. Auto: 0.25 below 8,192 outputs (in 3x1000 MLPs
            on MNIST the paper's 5% cost 50 points of test accuracy, 25% cost 3.6 and 50% 0.5,
            docs/paper_reproduction.md), 2,048 from there.
        rebuild: when to re-hash the weights: a :class:`RebuildSchedule`, a callable
            ``step -> bool``, an int period, or None for manual :meth:`rebuild` calls only
            (default 10: every 10 steps). A rebuild re-hashes only the rows that changed since the
            last one (unless ``center=True``, see :meth:`LSHTables.build`), so with row-sparse
            updates it costs a pass over the weight plus the changed rows, not a full hash. Fresh tables
            matter for output layers: on the XMC demo (100K labels) P@1 after 2 epochs was 0.681
            rebuilding every 10 steps, 0.672 every 25 and 0.648 with a schedule growing from 50,
            no better than a random active set (0.645).
        seed: seeds the projections and every random choice; same seed and inputs, same outputs.
        sparse_grad: weight and bias gradients as sparse COO tensors of the touched rows
            (like ``nn.Embedding(sparse=True)``; use :class:`~lsh_torch.optim.LazyAdam` (which takes
            ``weight_decay``), ``SparseAdam``, or ``torch.optim.SGD`` without ``weight_decay``, which
            torch refuses on sparse gradients, as AdamW's are).
        inference: ``"dense"`` (exact, equal to ``nn.Linear``; default) or ``"lsh"`` (eval
            output computed on the active set only, zero elsewhere; per row, an input's set
            follows its hash codes and the seed, not its batch).
        mode: ``"per_row"`` (each row its own ``active`` neurons, as in the paper), ``"shared"``
            (one set of ``active`` neurons for the whole batch: the union of the rows' labels and
            candidates, computed as one gathered matrix product), or ``"auto"`` (default): per row
            in :meth:`forward`, shared in :meth:`forward_sparse`, which measured faster to the same
            accuracy for large output layers (``benchmarks/bench_output_layer.py``, ``examples/xmc.py``).
        selection: ``"lsh"`` (default) or ``"random"``: uniformly random active neurons (labels
            still forced), the baseline that shows what the hashing is worth.
        asymmetric: hash weight rows through the asymmetric MIPS transform (auto: below 8,192 outputs), so that
            large inner products collide, norms included; ``False`` hashes their directions alone
            (cosine SimHash). Which is better depends on the layer. Where row norms carry the
            answer, the transform is essential: on the transformer LM example's 50K-word head
            (frequent words have large rows) held-out perplexity was 337 with it and 903
            without. Where a few rows grow far beyond the rest, it crowds them into few buckets:
            on the XMC demo (100K labels, 18K of them ever trained) one bucket held 52,788 rows
            against 705 without it, and P@1 after 2 epochs was 0.670 against 0.681 at 30 against
            21 ms per step; with the corrected tail and rescored top set the LM head too does
            better without it (perplexity 178.4 against 194.1), hence the output-layer default.
        center: hash the rows minus their mean row. For softmax output layers this changes no
            probability or ranking (every logit moves by the same ``mean·x``) and undoes the
            direction trained rows share (a 50K-word LM head: one bucket held 14K words; centering
            raised top-10 recall from 0.4-2.4% to 11% in a quick check). Off by default: a ReLU
            hidden layer's outputs do depend on it.
        hash: the hash family (:mod:`lsh_torch.hashing`): ``"srp"`` (default), signed random
            projections (SimHash), with the MIPS transform if ``asymmetric``; or ``"dwta"``,
            densified winner-take-all (as SLIDE uses for Amazon-670K): each table's ``bits`` are
            ``bits / log2(bin_size)`` argmax positions of seeded bins of ``bin_size`` input
            dimensions, an all-zero bin borrowing another's (bin_size 8 where 3 divides ``bits``;
            ``lsh_torch.hashing.DWTA(bin_size=16)`` chooses it). DWTA ranks coordinates and is blind
            to scale, so ``asymmetric`` does not apply (auto: False). Measured against srp in
            ``docs/estimator.md`` ("Hash families").
        warmup: training steps that use uniformly random active neurons (labels still forced)
            before the hash tables are built and take over (default 0). Early in training hard
            negatives do not help: on the XMC demo even the exact top-scoring ones (an oracle)
            trailed random ones through the first epoch, while LSH cost 1.3x a random step; from
            the second epoch on LSH led random by 3-4 P@1 points per step. The rebuild schedule
            counts from step 0 all the same (a schedule is a function of the step): with
            ``warmup=5, rebuild=4`` the tables are built at step 5 and rebuilt at 8, 12, ...

    Shape:
        Input ``[*, in_features]``, output ``[*, out_features]``. In training, outputs outside a
        row's active set are zero and get no gradient.

    Attributes:
        The settings as resolved from the arguments: ``budget`` (``active``, a count), ``tail``,
        ``rescore``, ``mode``, ``schedule`` (``rebuild``; :meth:`rebuild` is the method),
        ``tables.num_tables``, ``tables.bits``, ``tables.probes``, ``tables.asymmetric``; ``step``,
        the index of the next training forward.
    """

    __constants__ = ["in_features", "out_features"]
    # Exact scores (sampled rows x rescored pool) that choose a shared top set: an int, or "auto" (see rescore).
    top_set_scores: int | str = "auto"
    # The share of a shared top set's rescored pool given to the rows of largest norm (at the last build), where
    # the tables hash directions only and cannot see norms (asymmetric=False; 0: none). See _with_largest_norm_rows.
    norm_rows_share: float = 0.25

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 num_tables: int | str = "auto", bits: int | str = "auto", probes: int | str = "auto",
                 active: int | float | str = "auto",
                 rebuild=10, seed: int = 0, sparse_grad: bool = False, inference: str = "dense",
                 mode: str = "auto", selection: str = "lsh", asymmetric: bool | str = "auto", center: bool = False,
                 warmup: int = 0, tail: int | float | str = "auto", rescore: int = 4,
                 hash: str | hashing.HashFamily = "srp", tail_proposal: Optional[Tensor] = None):
        super().__init__()
        in_features = check_int("in_features", in_features, 1, 2 ** 31 - 1)
        out_features = check_int("out_features", out_features, 1, 2 ** 31 - 2)  # the kernels' int32 ids, below INT32_MAX
        seed = check_int("seed", seed, 0, 2 ** 31 - 1)
        warmup = check_int("warmup", warmup, 0, 2 ** 62)
        if inference not in _INFERENCE_MODES:
            raise ValueError(f"inference must be one of {_INFERENCE_MODES}, got {inference!r}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        sparse_grad, center = check_bool("sparse_grad", sparse_grad), check_bool("center", center)
        if not (isinstance(asymmetric, str) and asymmetric == "auto"):
            asymmetric = check_bool("asymmetric", asymmetric)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype}")
        auto = auto_settings(out_features, mode, hash)
        auto_active = isinstance(active, str) and active == "auto"
        auto_probes = isinstance(probes, str) and probes == "auto"
        num_tables, bits, probes, asymmetric, active = (auto[name] if value == "auto" else value for name, value in (
            ("num_tables", num_tables), ("bits", bits), ("probes", probes), ("asymmetric", asymmetric),
            ("active", active)))
        if auto_probes:
            probes = cap_probes(probes, bits)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.budget = _budget(active, out_features)
        # forward_sparse (a softmax's training path) computes every output, one matrix product and no
        # lookup, where a sparse set cannot pay: the budget is every output, or it and the tail are left
        # to "auto" at most WIDE outputs, where the default set would be a quarter of them or more (its
        # step was no faster than nn.Linear's and trained worse: benchmarks/bench_narrow.py). An explicit
        # tail asks for the sampled estimator, which forward then shares.
        auto_tail = isinstance(tail, str) and tail == "auto"
        self.exact_softmax = self.budget == out_features or (auto_active and auto_tail and out_features <= WIDE)
        self.tail = _check_tail(tail, self.budget)
        self.rescore = check_int("rescore", rescore, 1, 2 ** 20)
        self.tail_proposal = check_proposal(tail_proposal, out_features)
        self.schedule: Optional[RebuildSchedule] = as_schedule(rebuild)
        self.seed, self.sparse_grad, self.inference, self.mode = seed, bool(sparse_grad), inference, mode
        self.warmup = warmup
        self.step = 0  # index of the next training forward pass; drives the rebuild schedule and the seeds
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.tables = LSHTables(in_features, out_features, num_tables, bits, probes, seed, device=device,
                                selection=selection, asymmetric=asymmetric, center=center, hash=hash)
        self._hashed_from = None  # the weight the tables were built from (a tensor_ref)
        self._stale = True
        self._stale_marks = 0  # loads and re-initialisations so far (a build running in another thread: see _build)
        topk = topk_settings(out_features)  # topk's own index (lsh_torch.retrieval), built when first needed
        self.topk_tables, self.topk_bits = topk["num_tables"], topk["bits"]
        self._topk_index: Optional[TopkIndex] = None
        self._loss_checked = False  # see _warn_if_full_width_loss
        self._warned_training_no_grad = False  # see _warn_if_evaluating_in_training_mode
        self._draws = _RecordedDraws()  # for activation checkpointing's recomputation
        self._warned_write = False  # see _warn_written_before_a_step
        self.register_load_state_dict_post_hook(_stale_after_load)  # a module-level function: picklable
        # The weight's versions when the tables were built and after the last optimizer step that updated
        # it: eval lookups re-hash after other writes only (see _moved_since_build).
        self._hashed_version = self._stepped_version = None
        self._lazy_writes = _LazyWrites()  # the rows lazy steps wrote since the build (see _build)
        follow_optimizer_steps(self)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise like ``nn.Linear`` (Kaiming-uniform weight, uniform bias); tables rebuild on next use."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_features
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self._mark_stale()

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "LSHLinear":
        """An LSHLinear with a copy of ``linear``'s weight and bias (and their ``requires_grad``), on
        its device and dtype unless ``device=`` / ``dtype=`` say otherwise; the other ``kwargs`` are
        the hashing options."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        kwargs = {"device": linear.weight.device, "dtype": linear.weight.dtype, **kwargs}
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, **kwargs)
        with torch.no_grad():
            for name in ("weight", "bias"):
                if getattr(linear, name) is not None:
                    getattr(layer, name).copy_(getattr(linear, name))
                    getattr(layer, name).requires_grad_(getattr(linear, name).requires_grad)
        layer._mark_stale()
        return layer

    def _mark_stale(self) -> None:
        """The weights were replaced (a load, a re-initialisation): the next build hashes every row, as a
        process resuming from a checkpoint saved now would (its state holds no tables: :func:`lsh_state`).
        The rebuild schedule's builds are incremental: they only set ``_stale``."""
        self._stale = True
        self._stale_marks += 1
        self._hashed_from = None
        self._tables_from_checkpoint = False
        self._topk_index = None  # rebuilt by the next topk, from the weight as it is then

    @property
    def _stale(self) -> bool:
        """Do the tables need a rebuild: marked stale, none there (``to_empty()`` leaves none), or hashed
        from another tensor than ``weight`` (``torch.func.functional_call`` substitutes the weight for one
        call). Not while tracing: ``torch.export`` substitutes fake weights, and prebuilt tables become the
        program's."""
        return (self._marked_stale or not self.tables.built
                or not (torch.compiler.is_compiling() or self._hashed_from_weight()))

    @_stale.setter
    def _stale(self, stale: bool) -> None:
        self._marked_stale = stale
        if not stale:  # (a substituted weight is referenced weakly: see tensor_ref)
            self._hashed_from = tensor_ref(self.weight)
            self._stepped_version = None  # another weight's counter (a replaced Parameter) could reach it
            # (None while tracing, where versions are not read: the next eager eval lookup re-checks the rows)
            self._hashed_version = None if torch.compiler.is_compiling() else self._weight_version()

    def _moved_since_build(self) -> bool:
        """Has the weight changed in place since the tables were built, other than by the optimizer steps
        since (its version counter; an inference tensor has none)? Checked by eval lookups: training follows the
        schedule (and warns once of a write before any optimizer step). Eval keeps the tables training left: the
        layers after a hidden layer adapted to the sets they give (bench_paper's MNIST network at 10% active,
        3 seeds: 73.7% on them, 64.9% on re-hashed ones)."""
        version = self._weight_version()
        return version is not None and version not in (self._hashed_version, self._stepped_version)

    def _weight_version(self) -> Optional[int]:
        """The weight's version counter, which every in-place write bumps (not ``param.data =``, nor writes
        through ``.data``); None for an inference tensor, which has none. (Not its storage's address: FSDP2
        re-allocates the unsharded weight at every all-gather, share_memory() moves it, and no value changes.)"""
        return None if self.weight.is_inference() else self.weight._version

    def _warn_written_before_a_step(self) -> None:
        """Training follows its schedule, also after writes outside an optimizer step: pretrained rows copied in
        place after a first forward were used with the tables of the old ones until the next scheduled build
        (near-random sets: 0.016 of each row's top 64 in a review's run, against 0.76), silently. Re-hashing at
        such writes doubled the builds of setups that write every step (DeepSpeed's and apex's master weights, an
        EMA target network, a hand-written update), and broke exact resumes; said once instead."""
        self._warned_write = True
        warnings.warn(f"{self.__class__.__name__}(out_features={self.out_features}): the weight was written in place "
                      "since the hash tables were built, and no optimizer step came since (pretrained weights copied in "
                      "after a first forward?): training keeps these tables until the next scheduled rebuild. Call "
                      "rebuild() after writing the weights. (Where the weights are written every step outside a "
                      "torch.optim step, e.g. master weights or an EMA target, this is expected: the schedule "
                      "re-hashes them.)", stacklevel=user_stacklevel())

    def _tables_current(self) -> bool:
        """Do the tables answer for the weight as it is (what a copy or a checkpoint keeps of the versions)?"""
        return not self._stale and not self._moved_since_build()

    def _optimizer_stepped(self) -> None:
        """An optimizer step updated the weight (see :func:`retrieval.follow_optimizer_steps`): the tables
        answer for it as training's next forward would use them, once training has used them (not during
        ``warmup``, whose draws are uniform). A write before the step counts as training's too. The rows a
        lazy step wrote are recorded for the next scheduled build (see :class:`_LazyWrites`)."""
        used = self.step > self.warmup
        self._stepped_version = self._weight_version() if used else None
        self._lazy_writes.step_ended(self._weight_version(), self.out_features)

    def _hashed_from_weight(self) -> bool:
        return self._hashed_from is not None and self._hashed_from() is self.weight

    def _restore_versions(self, current: bool, stepped: bool) -> None:
        """After a copy or a resume, whose weight counts versions anew: do the tables answer for the weight as it
        is (``current``: eval keeps them), and did an optimizer step come since they were built (``stepped``: a
        write since is one training expected, not warned of; a resumed run warned where its original did not)."""
        self._hashed_version = self._weight_version() if current else None
        self._stepped_version = -1 if stepped else None  # (-1: a step, its version unknown; counters start at 0)
        self._lazy_writes.start(None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Whether this load replaces the layer's weight or bias (see _stale_after_load): a partial one
        # (strict=False) that leaves them keeps the tables, unless the weight was written since the build other
        # than by optimizer steps: a tied weight loaded under its other module's key (transformers saves a tied
        # head's weight as the input embedding's, which its models load first).
        self._loaded_own_parameters = any(prefix + name in state_dict for name, p in self._parameters.items()
                                          if p is not None) or self._moved_since_build()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()  # a weak reference does not pickle: keep whether it was to weight
        state["_hashed_from"] = self._hashed_from_weight()
        # This process's counters (a loaded weight's restart): kept is whether the tables answer for the weight.
        state["_hashed_version"] = state["_stepped_version"] = None
        state["_tables_current"] = self._tables_current()
        state["_tables_stepped"] = self._stepped_version is not None
        state["_topk_index"] = None  # a cache: the next topk rebuilds it
        state.pop("_proposals", None)  # a cache too
        return state

    def __setstate__(self, state):
        own, current = state.pop("_hashed_from"), state.pop("_tables_current", False)
        stepped = state.pop("_tables_stepped", state.get("step", 0) > state.get("warmup", 0))  # (older pickles: likely)
        topk = topk_settings(state["out_features"])  # pickles from before topk had an index of its own
        state = {"topk_tables": topk["num_tables"], "topk_bits": topk["bits"], "_topk_index": None,
                 "_draws": _RecordedDraws(), "_lazy_writes": _LazyWrites(), "_stepped_version": None,
                 "_warned_write": False, "_stale_marks": 0, "_warned_training_no_grad": False,
                 # pickles from before exact_softmax: what they did (whether active was "auto" is not kept)
                 "exact_softmax": state["budget"] == state["out_features"], "_tail_proposal": None, **state}
        if state["exact_softmax"] and state["tail"] != "auto" and state["budget"] < state["out_features"]:
            state["exact_softmax"] = False  # pickled before an explicit tail turned the narrow exact softmax off
        if "_built" not in state["_modules"]["tables"].__dict__:
            state["_modules"]["tables"].upgrade(state["out_features"])
        super().__setstate__(state)
        if getattr(self.tables, "_norms_missing", False):  # pickled before the tables kept their rows' norms
            self.tables.take_norms(self.weight)
        follow_optimizer_steps(self)  # a process that only unpickles layers (torch.load of a model, spawned workers)
        self._hashed_from = tensor_ref(self.weight) if own else None
        self._restore_versions(current, stepped)

    def _apply(self, fn, recurse=True):
        weight = self.weight
        if not weight.is_meta:  # loaded with assign=True after a meta construction: tables to draw before a move
            self.tables.materialise(weight.device)
            # Refused before anything moves (Module.to casts floating tensors to a complex dtype it is given,
            # Module.type to any dtype).
            cast = fn(torch.zeros((), dtype=weight.dtype, device=weight.device)).dtype
            if not cast.is_floating_point:
                raise TypeError(f"{self.__class__.__name__} computes in floating-point dtypes (its hash tables and "
                                f"kernels), not {cast}")
        self._lazy_writes.start(None)  # a cast (.half()) rounds every row and keeps the version counter (.data =)
        return super()._apply(fn, recurse)

    def rebuild(self) -> None:
        """Re-hash the current weights into the tables and topk's index (say so after writes through
        ``weight.data``, which the version counter misses)."""
        self._build(trust_versions=False)
        self._topk_index = None

    def _build(self, trust_versions: bool = True) -> None:
        """The tables' (re)build that the schedule and lookups run: topk's index follows the weight's version itself.
        ``trust_versions``: where lazy optimizer steps were the only writes since the last build (the version
        counter says so), the rows they wrote are the moved ones (see :class:`_LazyWrites`)."""
        self._materialise_tables()
        if self.weight.shape[0] != self.tables.out_features:  # (transformers' resize rewrites out_features too)
            raise ValueError(
                f"{self.__class__.__name__}: the weight has {self.weight.shape[0]} rows, but the layer was built for "
                f"{self.tables.out_features} outputs (its hash tables, budget and settings). Resizing a layer after "
                "construction (transformers' resize_token_embeddings after lsh_torch.integrations.transformers.patch "
                "or lsh_torch.convert) is not supported: resize first, then patch or convert (on a patched model: unpatch, "
                "resize, patch again; the weight and its training carry over, the tables are built anew).")
        # Codes hashed from another tensor (a substituted weight) cannot be patched incrementally.
        compiling = torch.compiler.is_compiling()  # (versions are not read while tracing)
        marks, version = self._stale_marks, None if compiling else self._weight_version()
        written = None
        # (not a shared weight: Hogwild's other processes write it too, and their writes reach no counter here)
        if trust_versions and not compiling and not (self.weight.device.type == "cpu" and self.weight.is_shared()):
            written = self._lazy_writes.rows(version, self.weight.device)
        self.tables.build(self.weight, full=not self._hashed_from_weight(), written=written)
        if self._stale_marks != marks:
            return  # another thread loaded or re-initialised the weight meanwhile: stale still, for the next lookup
        self._stale = False
        if not compiling:  # the version hashed: a write made during the build counts as a move
            self._hashed_version = version
        self._lazy_writes.start(version)

    def _materialise_tables(self) -> None:
        _check_not_meta(self.weight)
        self.tables.materialise(self.weight.device)

    @_reads_weight
    def active_set(self, x: Tensor, labels: Optional[Tensor] = None, shared: Optional[bool] = None,
                   sparse: bool = False) -> Tensor:
        """Active neurons for ``x`` [B, in_features]: ``[B, A]`` per row, or ``[A]`` shared.

        ``labels`` (int64 ``[B]``, or ``[B, M]`` padded with -1) are forced in first. ``sparse``
        chooses the path: :meth:`forward_sparse`'s set (True: its tail; every output where
        :attr:`exact_softmax`) or :meth:`forward`'s. ``shared`` defaults to that path's: one set
        for the batch in ``forward_sparse`` unless ``mode="per_row"``, in ``forward`` if
        ``mode="shared"``. In training: the next step's draws (uniform ones during ``warmup``), from
        the tables as they are (a rebuild the schedule has due at that step is left to it).
        """
        x, _, _ = self._operands(x)
        if x.dim() != 2:
            raise ValueError(f"x must have shape [B, in_features={self.in_features}], got {tuple(x.shape)}")
        labels = _label_matrix(labels, x.shape[:1], x.device)
        sparse = check_bool("sparse", sparse)
        if shared is not None:
            shared = check_bool("shared", shared)
        if sparse and self.exact_softmax:
            if labels is not None:
                _check_label_range(labels, self.out_features)
            return torch.arange(self.out_features, device=x.device)
        if shared is None:
            shared = self.mode != "per_row" if sparse else self.mode == "shared"
        if self.training:  # the next training step's (uniform draws during the warm-up)
            return self._training_set(x, labels, shared, sparse)[0]
        return self._lookup(x, labels, shared, sparse)[0]

    def _lookup(self, x: Tensor, labels: Optional[Tensor], shared: bool, sparse: bool) -> tuple[Tensor, Tensor]:
        """The active set and its head (see :func:`ops.query`)."""
        _check_not_meta(self.weight)
        if torch.jit.is_tracing():
            self._refuse_what_jit_trace_cannot(labels, sparse)
        self._tables_from_checkpoint = False  # in use: a later load_state_dict is a deliberate reload
        if self._stale:
            self._warn_if_parametrized()
            self._build()
        elif not self.training and not torch.compiler.is_compiling() and self._moved_since_build():
            # Eval after an EMA copy_, an init (not after optimizer steps alone): the rows that moved re-hashed
            # (an incremental build, which training goes on from).
            self._build()
        elif self.training and self._stepped_version is None and not self._warned_write \
                and not torch.compiler.is_compiling() and self._moved_since_build():
            self._warn_written_before_a_step()
        seed = self._step_seed() if self.training else self.seed
        # Eval rows draw by their codes, not their places in the batch: an input gets the same set (and
        # output) however it is batched. Training rows draw apart by position; a shared set is the batch's.
        keyed = not (self.training or shared)
        labels, tail = _as_label_matrix(labels, x.shape[0]), self._tail_count(sparse)
        if self.rescore <= 1 or not tail or self.tables.selection == "random" or not x.shape[0]:
            return self.tables.query(x, self._set_size(labels, shared, tail), labels, seed, shared=shared, tail=tail,
                                     keyed=keyed)
        return self._rescored_lookup(x, labels, shared, seed, tail, keyed)

    def _refuse_what_jit_trace_cannot(self, labels: Optional[Tensor], sparse: bool) -> None:
        """torch.jit.trace records tensors, not Python numbers: the rescored top set's sizes (from the batch's)
        became tensors that the query refused (a reviewer's "budget must be an int, got tensor(512)"), and a
        build in the traced call made the trace's own check fail ("Graphs differed across invocations")."""
        layer = f"{self.__class__.__name__}(out_features={self.out_features})"
        if self._stale or not self.training and self._moved_since_build():
            raise RuntimeError(f"{layer}: its hash tables are not built for the weight as it is (a new or loaded layer, "
                               "or a weight written since the build): torch.jit.trace would record the build in the "
                               "first call only. Call rebuild() (or run one eager forward) before tracing; or use "
                               "torch.export or torch.compile, which build the tables per call.")
        if self._tail_count(sparse) and self.rescore > 1 and self.tables.selection != "random":
            raise RuntimeError(f"{layer}: an eval lookup with a tail (forward_sparse, or inference='lsh' with tail=) "
                               "chooses its top set by exact scores, sized from the batch, which torch.jit.trace cannot "
                               "record. Use torch.export or torch.compile, or trace forward() with inference='dense' "
                               "or with the default tail.")

    @torch.no_grad()
    def _rescored_lookup(self, x: Tensor, labels: Optional[Tensor], shared: bool, seed: int, tail: int,
                         keyed: bool) -> tuple[Tensor, Tensor]:
        """The top set chosen by exact scores: ``rescore`` hashed candidates per slot are computed
        and the best that are not labels kept (bucket-hit counts rank the true top logits poorly);
        then the labels and that top set are forced into a uniform query, which draws the tail from
        everything else."""
        if labels is None:
            labels = torch.full((x.shape[0], 0), -1, dtype=torch.int64, device=x.device)
        x = x.to(self.weight.dtype)  # scored in the layer's dtype: the input may be autocast's
        if shared and labels.numel() and torch.compiler.is_compiling():
            _refuse_shared_labels_in_a_graph(self)
        room = None  # per row, where rows hold different numbers of labels: each row's top set
        if shared:
            forced = _distinct_labels(labels)
            size = self._set_size(labels, shared, tail, forced)
        else:
            size, forced = self._set_size(labels, shared, tail), labels.shape[1]
            if forced > 1:
                # Rows padded past their labels (-1) give those columns to their top set, not to the tail:
                # each row's is the best of a pool sized as for a row without labels (the same whatever
                # the batch, and no host read), cut to the room the row's own labels leave.
                room, forced = size - tail - _labels_per_row(labels), 0
        top, pool = self._top_set_sizes(size, forced, tail)
        if shared:  # one row of forced labels: a uniform query reads no input codes
            labels = labels.reshape(1, -1)
            # A sample of the rows, another each step: every stride-th from an offset that moves with the
            # seed; a single row is taken twice (which chooses as once, up to rounding), so that a traced
            # batch dimension is never specialised to a sample of 1.
            stride = self._top_set_stride(x.shape[0], pool)
            first = seed % stride
            rows = first + stride * torch.arange(torch.sym_max(2, -(-(x.shape[0] - first) // stride)), device=x.device)
            x = x.index_select(0, torch.where(rows < x.shape[0], rows, first))
        if top and not shared and not keyed:
            best = self._best_of_the_batch_pool(x, labels, seed, top, pool)
        elif top:
            candidates, _ = self.tables.query(x, pool, None, seed, shared=shared, keyed=keyed)
            if shared and not self.tables.asymmetric:
                candidates = self._with_largest_norm_rows(candidates, tail)
            if shared:  # the candidates carrying the most of the batch's softmax mass
                scores = ops.shared_linear(x, self.weight, self.bias, candidates).float().logsumexp(0)
            else:
                scores = ops.sparse_linear(x, self.weight, self.bias, candidates)
            # The labels go in ahead of the top set (below): a pool entry that is one must not take a top-set slot.
            scores.masked_fill_(among(candidates, labels), -math.inf)
            best = candidates.gather(-1, scores.topk(top).indices).reshape(labels.shape[0], -1)
        if top:
            if room is not None:  # each row keeps the best that fit beside its own labels
                best.masked_fill_(torch.arange(top, device=best.device) >= room[:, None], -1)
            labels = torch.cat([labels, best], 1)
        # Another seed for the tail: the pool's random fill must not steer its draws. Keyed, the rows'
        # keys cost one more hashing of x, small beside the pool's scores.
        return LSHTables.query_uniform(x[:1] if shared else x, self.out_features, size, labels, seed ^ 2 ** 62,
                                       shared, self.tables.row_keys(x) if keyed else None)

    def _best_of_the_batch_pool(self, x: Tensor, labels: Tensor, seed: int, top: int, pool: int) -> Tensor:
        """Per-row top sets in training: each row's ``top`` best by exact score, not labels, among one pool for the
        whole batch, :data:`BATCH_POOL_ROWS` rows' worth of per-row pools (the candidates with the most bucket hits
        over the batch), scored by one matrix product per block of rows (at most :data:`_POOL_SCORES` scores).
        A pool per row missed most of each row's exact top set (XMC demo head, 128 points: recall of the exact top
        64 was 0.07 with a pool of 256 per row and 0.29 with 1,024 and 8 probes; 0.47 from a batch pool of 4,096);
        a batch's rows share their likely outputs, and a gathered GEMM scores 4-5x as many candidates in the time
        (docs/estimator.md). ``[B, top]``, -1 where a row's pool holds fewer than ``top`` that are not its labels.
        (Labels are dropped after the selection, not masked in the scores: a [B, pool] search for them took 2.6 ms
        of a 14 ms XMC step.)"""
        candidates, _ = self.tables.query(x, min(self.out_features, BATCH_POOL_ROWS * pool), None, seed, shared=True)
        # The k best of the pool, k = top plus the row's label columns, less the labels among them: the top set.
        k = min(candidates.shape[0], top + labels.shape[1])
        rows = max(1, _POOL_SCORES // candidates.shape[0])  # (a traced batch: one graph per count of blocks)
        picked = torch.cat([candidates[ops.row_topk(ops.shared_linear(block, self.weight, self.bias, candidates), k)]
                            for block in x.split(rows)])
        is_label = among(picked, labels)
        order = is_label.to(torch.uint8).argsort(dim=1, stable=True)[:, :top]  # the non-labels first, by score
        return picked.gather(1, order).masked_fill_(is_label.gather(1, order), -1)

    def _with_largest_norm_rows(self, candidates: Tensor, tail: int) -> Tensor:
        """A shared pool whose first :attr:`norm_rows_share` are the rows of largest norm at the last build, then
        the hashed ``candidates`` that are not among them, as many as the pool holds (the same exact scores).
        Tables of directions cannot see the norms, which spread as training goes on: at 670,091 XMC labels the
        hashed pool held 0.09 of the exact top 64 after 5 epochs, with a quarter of it norm rows 0.28, and P@1
        rose by 0.014-0.026 at every epoch (3 seeds; docs/results.md, "Largest-norm rows in the shared pool")."""
        pool = candidates.shape[0]
        share = self.norm_rows_share
        if not (isinstance(share, numbers.Real) and 0 <= share <= 1):
            raise ValueError(f"LSHLinear.norm_rows_share must be a fraction in [0, 1], got {share!r}")
        count = int(share * pool)
        if not count:
            return candidates
        # One top-k per build: as many as the largest pool of this budget and tail takes (a pool that fewer
        # slots leave beside the labels takes the first of them), so that a resumed run finds the same rows.
        most = int(share * self._top_set_sizes(self.budget, 0, tail)[1])
        largest = self.tables.largest_norm_rows(max(most, count))[:count]
        # Hashed candidates among them go to the end (a binary search: torch.isin took twice as long here).
        repeated = among(candidates, largest.reshape(1, -1)).to(torch.uint8)
        others = candidates.index_select(0, repeated.sort(stable=True).indices[:pool - count])
        return torch.cat([largest, others])

    def _warn_if_parametrized(self) -> None:
        """A weight computed on every access (torch.nn.utils.parametrize, parametrizations.weight_norm) or
        forward (the hooks of the legacy weight_norm and of prune) is a new tensor at every lookup: the tables
        are rebuilt from all rows each time (62 against 4 ms per forward_sparse at 100K outputs). Such a weight
        is no registered Parameter (functional_call's substitutes are). Said once per layer; convert() refuses
        such layers."""
        if not getattr(self, "_warned_parametrized", False) and "weight" not in self._parameters:
            self._warned_parametrized = True
            warnings.warn(f"LSHLinear(out_features={self.out_features}): its weight is parametrized (computed on every "
                          "access, or by a hook on every forward: weight_norm, prune), so every lookup re-hashes every "
                          "row into new tables, every topk call builds a new index, and sparse_grad=True gives a "
                          "parametrized one a dense gradient (its backward needs one): slow. Hash tables follow a "
                          "weight Parameter updated in place; remove the parametrization.",
                          stacklevel=user_stacklevel())

    @property
    def _sparse_grad(self) -> bool:
        """``sparse_grad``, but a weight that parametrize or the legacy weight_norm compute gets a dense gradient:
        their backward needs one (weight_norm's and orthogonal's refuse a sparse one; prune's mask takes it)."""
        return self.sparse_grad and not (parametrize.is_parametrized(self, "weight") or any(
            isinstance(hook, WeightNorm) for hook in self._forward_pre_hooks.values()))

    def _step_seed(self) -> int:
        """The training step's draws: another seed each step, within int64 however long the run."""
        return (self.seed * 2 ** 32 + self.step) % 2 ** 63

    def _top_set_sizes(self, size: int, forced: int, tail: int) -> tuple[int, int]:
        """The top set's size in a set of ``size`` beside ``forced`` labels and the ``tail``, and its rescored pool's."""
        top = max(0, size - tail - forced)
        return top, min(self.out_features, self.rescore * top)

    def _top_set_stride(self, rows: int, pool: int) -> int:
        """Every how many of a batch's ``rows`` the shared top set's ``pool`` is scored: as many rows as
        keep the scores within :attr:`top_set_scores`. ``"auto"``: a quarter of the set's own outputs
        (rows x budget; the pool's scores then cost at most a twelfth of the step's products, forward and
        backward), and at most 256 x 3,072. (``torch.sym_*``: a traced batch dimension stays free.)"""
        cap = self.top_set_scores
        if isinstance(cap, str) and cap == "auto":
            cap = torch.sym_max(1, torch.sym_min(256 * 3_072, rows * self.budget // 4))
        else:
            cap = check_int("LSHLinear.top_set_scores (exact scores per shared top set, or 'auto')", cap, 1, 2 ** 62)
        return -(-rows // torch.sym_max(1, cap // max(1, pool)))

    def _tail_count(self, sparse: bool) -> int:
        if self.tail == "auto":
            return max(1, self.budget // 2) if sparse else 0  # (a budget of 1: the labels alone summed to a loss of 0)
        if isinstance(self.tail, int):
            return self.tail
        return max(1, round(self.tail * self.budget)) if self.tail > 0 else 0  # a fraction > 0 draws at least one

    def _set_size(self, labels: Optional[Tensor], shared: bool, tail: int, forced: Optional[int] = None) -> int:
        """The active set's size: the budget, or more where the labels and the tail would not fit in it,
        so that a batch's labels never crowd out the tail, which stands for every output outside the
        set (without it the loss's normaliser sums the labels alone: 80-99% low, measured). The labels
        are the batch's distinct ones in shared mode (``forced``, if counted already; a host read, made
        only where ``labels`` could pass the budget), a row's label columns per row. At most every
        output. Zipf-distributed targets over GPT-2's 50,257 words, against the default 2,048: 2 x 1,024
        of them held 1,091 distinct ones, 8 x 1,024 3,357. Said once per layer where the labels leave no
        room for a hashed top set. In a traced graph (eval lookups; training's are eager) a shared set keeps
        the budget, as before: its size cannot follow the data there."""
        if labels is None or not labels.numel():
            return self.budget
        compiling = torch.compiler.is_compiling()
        if shared and compiling:  # the distinct count is data: a graph keeps the budget (the op refuses more labels)
            return self.budget
        if (labels.numel() if shared else labels.shape[1]) + tail < self.budget:
            return self.budget
        if forced is None:
            forced = _distinct_labels(labels) if shared else labels.shape[1]
        size = torch.sym_max(self.budget, torch.sym_min(self.out_features, forced + tail))  # a traced width stays free
        if not compiling and forced + tail >= self.budget and not getattr(self, "_warned_set_size", False):
            self._warned_set_size = True
            what = f"a batch's {forced:,} distinct labels" if shared else f"rows of {forced:,} label columns"
            what += f" and the {tail:,}-output uniform tail" if tail else ""
            grown = f"grows to {size:,} outputs" if size > self.budget else "is full"
            warnings.warn(f"{self.__class__.__name__}(out_features={self.out_features}, active={self.budget}): "
                          f"{what} leave no room for hashed candidates: the set {grown}, and the hashing does no "
                          "work there (it trains as a corrected uniform sampled softmax; at 8,192 LM tokens per "
                          "batch 256 hashed candidates added nothing at equal time: docs/results.md, 'Large LM "
                          "batches'). To give the hashing room, raise active= above the labels' count plus the "
                          "tail (in shared mode, the batch's distinct labels), or use smaller batches.",
                          stacklevel=user_stacklevel())
        return size

    @_reads_weight
    def forward(self, input: Tensor) -> Tensor:
        """``[*, in_features]`` -> ``[*, out_features]``, as :class:`nn.Linear`.

        Training: each row's (or, in shared mode, the batch's) active neurons are computed and the other
        outputs are 0; gradients reach the active neurons only. Each training forward counts a step of the
        rebuild schedule. Its output is for hidden layers: a softmax loss over it never scores a target
        outside the active set (a warning says so once); a wide output layer trains with
        :meth:`forward_sparse` and :func:`lsh_torch.sparse_cross_entropy`.

        Eval: ``nn.Linear``'s output exactly (``inference="dense"``), or the active set's
        (``inference="lsh"``: the tables as they are, no step counted)."""
        input, weight, bias = self._operands(input)
        if not self.training and self.inference == "dense":
            return F.linear(input, weight, bias)
        self._check_not_under_ddp()
        if self.budget == self.out_features:  # every neuron active: nothing to hash or scatter
            values = ops.linear(input.reshape(-1, self.in_features), weight, bias, sparse_grad=self._sparse_grad)
            return values.reshape(*input.shape[:-1], self.out_features)
        values, active, _ = self._sparse(input.reshape(-1, self.in_features), weight, bias, None, self.mode == "shared",
                                         False)
        out = values.new_zeros(values.shape[0], self.out_features)
        out = out.index_copy_(1, active, values) if active.dim() == 1 else out.scatter_(1, active, values)
        if not self._loss_checked and out.requires_grad and not torch.compiler.is_compiling():
            self._loss_checked = True  # the first backward tells what the output feeds; later steps pay nothing
            out.register_hook(lambda grad: self._warn_if_full_width_loss(grad, active))
        return out.reshape(*input.shape[:-1], self.out_features)

    def _warn_if_evaluating_in_training_mode(self) -> None:
        """A training forward of an output-layer width with gradients off is most likely an evaluation
        without ``.eval()``, which nn.Linear answers exactly: here every output outside the active set is 0,
        above every score of a softmax-trained head (all negative: a user review's recall@10 was 0.0), and
        the call counts a training step. Said once per layer."""
        if (self.training and self.out_features >= WIDE and not torch.is_grad_enabled()
                and not self._warned_training_no_grad and not _in_autograd_function_forward()):  # (a reentrant checkpoint's first pass: training)
            self._warned_training_no_grad = True
            warnings.warn(f"{self.__class__.__name__}(out_features={self.out_features}) is in training mode under "
                          "torch.no_grad(): forward computes only the active neurons and returns 0 for the others "
                          "(which outrank negative scores), and counts a training step. To evaluate, call .eval() "
                          "first (nn.Linear's exact output), or use topk(x, k) for the best outputs.",
                          stacklevel=user_stacklevel())

    def _warn_if_full_width_loss(self, grad: Tensor, active: Tensor) -> None:
        """Warn if the zero-filled training output feeds a softmax cross-entropy over all outputs: its
        gradient (probabilities minus the target) sums to zero per row and is positive at every neuron
        outside the active set but the target, which an un-forced target often is."""
        if torch._C._functorch.is_legacy_batchedtensor(grad):  # batched gradients (is_grads_batched): not checked
            return
        grad = grad.detach().float()
        outside = torch.ones_like(grad, dtype=torch.bool)
        outside = outside.index_fill_(1, active, False) if active.dim() == 1 else outside.scatter_(1, active, False)
        reached = (outside & grad.ne(0)).any(1)
        softmax_like = (((outside & (grad <= 0)).sum(1) <= 1)
                        & (grad.sum(1).abs() <= 1e-3 * grad.abs().sum(1)))
        if reached.any() and (reached & softmax_like).sum() * 2 > reached.sum():
            warnings.warn(f"{self.__class__.__name__}(out_features={self.out_features}): the output of a training "
                          "forward() feeds a loss over all outputs (a softmax cross-entropy?), but only the active "
                          "neurons were computed and the rest are 0, so targets outside the active set are never "
                          "scored and the model trains badly. Use forward_sparse(x, labels) with "
                          "lsh_torch.sparse_cross_entropy, or for a transformers causal LM "
                          "lsh_torch.integrations.transformers.patch(model).", stacklevel=2)

    @_reads_weight
    def forward_sparse(self, input: Tensor, labels: Optional[Tensor] = None) -> SparseOutput:
        """The outputs of the active neurons only, never ``[B, out_features]``.

        ``labels`` (int64 ``[*]``, or ``[*, M]``; -1 and -100 are padding) are forced into the
        active set; train with :func:`lsh_torch.sparse_cross_entropy`. Returns ``values [*, A]`` and
        ``indices``: ``[*, A]`` per row, or ``[A]`` in shared mode.

        Where :attr:`exact_softmax` (at most 8,192 outputs with ``active`` and ``tail`` left to ``"auto"``,
        or a budget of every output) it computes every output in one matrix product, ``indices`` ``arange(N)`` (``[N]``
        in every mode), no ``log_weights``: the exact softmax, about as fast as ``nn.Linear``'s there.
        """
        input, weight, bias = self._operands(input)
        self._check_not_under_ddp()
        batch_shape = input.shape[:-1]
        labels = _label_matrix(labels, batch_shape, input.device)
        # Checked here, not in the query kernel, whose message names its own N. On a GPU the hashed paths leave
        # it to the kernel, a clean ValueError, where this one would be a device assertion, which ends the CUDA
        # context; the exact path has no kernel that checks labels, so it keeps the assertion.
        if labels is not None and (self.exact_softmax or labels.device.type == "cpu"):
            _check_label_range(labels, self.out_features)
        if self.exact_softmax:
            every = torch.arange(self.out_features, device=input.device)  # every row's set: shared in every mode
            values = ops.linear(input.reshape(-1, self.in_features), weight, bias, sparse_grad=self._sparse_grad)
            return SparseOutput(values.reshape(*batch_shape, self.out_features), every, None)
        values, active, head = self._sparse(input.reshape(-1, self.in_features), weight, bias, labels,
                                            self.mode != "per_row", True)
        size = active.shape[-1]  # the budget, or more for labels that would crowd out the tail (_set_size)
        if self.training and self.tail_proposal is not None:
            log_weights = proposal_log_weights(active, head, self._proposal(active.device))
        else:
            log_weights = ops.tail_log_weights(head, size, self.out_features)
        values = values.reshape(*batch_shape, values.shape[-1])
        if active.dim() > 1:
            active = active.reshape(*batch_shape, active.shape[-1])
        log_weights = log_weights.reshape(active.shape)
        # Valid neurons and weights (distinct, but for a proposal's repeated draws): the loss need not check again.
        vouch(active, log_weights)
        return SparseOutput(values, active, log_weights)

    def _sparse(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Optional[Tensor], shared: bool,
                sparse: bool) -> tuple[Tensor, Tensor, Tensor]:
        if not torch.compiler.is_compiling() and any(t is not None and (
                torch._C._functorch.is_functorch_wrapped_tensor(t)
                or forward_ad._current_level >= 0 and forward_ad.unpack_dual(t).tangent is not None)
                for t in (x, weight, bias)):
            raise RuntimeError(
                "LSHLinear's sparse path (training, inference='lsh') does not support torch.func transforms "
                "(grad, vmap, jacrev, ...) or forward-mode AD (torch.autograd.forward_ad, jvp): its custom "
                "operators have no functorch or jvp rules, and its active sets depend on the whole batch. Use "
                "torch.autograd (loss.backward(), torch.autograd.grad), or eval with inference='dense', which "
                "is nn.Linear's computation.")
        if self.training:
            active, head = self._training_active_set(x, labels, shared, sparse, torch.compiler.is_compiling())
        else:
            active, head = self._lookup(x, labels, shared, sparse)
        linear = ops.shared_linear if active.dim() == 1 else ops.sparse_linear
        values = linear(x, weight, bias, active, sparse_grad=self._sparse_grad)
        if self.training and not torch.compiler.is_compiling() and _may_be_recomputed():
            self._draws.record(x, (active, head), values)
        return values, active, head

    @_eager_under_compile("LSHLinear's training lookup runs eagerly (a Python step counter, its rebuild "
                          "schedule, random draws): one graph break per training forward, so "
                          "fullgraph=True cannot compile a training step; eval forwards compile whole")
    def _training_active_set(self, x: Tensor, labels: Optional[Tensor], shared: bool, sparse: bool,
                             compiled: bool = False) -> tuple[Tensor, Tensor]:
        """One training step's bookkeeping and lookup: rebuild if the schedule says so, query with
        the step's seed, count the step. Always eager: under ``torch.compile`` this is one graph
        break per layer and training forward (the schedule branches on a Python step counter, which
        would otherwise recompile every step, and a rebuild reads every weight row); the lookup
        carries no gradient, so the differentiable part around it is compiled in full."""
        if torch.compiler.is_exporting() or torch.jit.is_tracing():  # a graph would freeze one step
            raise RuntimeError(
                f"{self.__class__.__name__}(out_features={self.out_features}): torch.export (or torch.jit.trace) of a "
                "training forward is not supported: each training step advances a step counter, reseeds its draws and rebuilds the hash "
                "tables on a schedule, Python state that an exported graph would freeze at one step. Export the "
                "model in eval() mode (its lookup is a function of the input and the tables), and train eagerly or "
                "under torch.compile.")
        if torch._C._current_graph_task_id() != -1 and self.step > 0:
            # Inside backward: activation checkpointing (torch.utils.checkpoint, transformers' gradient
            # checkpointing) recomputing a training forward. It must use that forward's set, not count a step
            # (counted anew, it drew another set than the loss's: wrong gradients).
            found = self._draws.replay(x)
            if found is not None:
                return found
            self._warn_replaying_last_step()
            self.step -= 1
            try:
                return self._training_set(x, labels, shared, sparse)
            finally:
                self.step += 1
        if not sparse:  # forward's zero-filled output (checked here: eager under torch.compile too)
            self._warn_if_evaluating_in_training_mode()
        if self.step == self.warmup > 0:
            # The first tables training uses: every row hashed (a new M), whatever an eval lookup during the
            # warm-up built (kept, they changed the training that followed: a reviewer's).
            self._hashed_from = None
            self._stale = True
        elif self.step >= self.warmup and self.schedule is not None and _rebuild_now(self.schedule, self.step):
            self._stale = True  # an incremental build: the rows that moved since the last
        found = self._training_set(x, labels, shared, sparse)
        self.step += 1
        if compiled and _may_be_recomputed():  # a compiled caller's output is out of reach: kept without it
            self._draws.record(x, found, None)
        return found

    def _warn_replaying_last_step(self) -> None:
        if not getattr(self, "_warned_replay", False):
            self._warned_replay = True
            warnings.warn(f"{self.__class__.__name__}(out_features={self.out_features}): a recomputation inside "
                          "backward (activation checkpointing) got an input that matches none of this layer's "
                          "recorded training forwards (its upstream computation is not deterministic, or the "
                          f"forwards since the backward outnumber the {_RecordedDraws.WITHOUT_GRAPH} kept without a "
                          "graph), so it re-draws the last step's set, which may not be the forward's: its "
                          "gradients may differ from those without checkpointing.", stacklevel=user_stacklevel())

    def _training_set(self, x: Tensor, labels: Optional[Tensor], shared: bool, sparse: bool) -> tuple[Tensor, Tensor]:
        """The set of training step :attr:`step` (uniformly random neurons during the warm-up: no tables to build
        or query yet), its tail drawn from :attr:`tail_proposal` where there is one."""
        found = (self._warmup_draws(x, labels, shared, sparse) if self.step < self.warmup
                 else self._lookup(x, labels, shared, sparse))
        if sparse and self.tail_proposal is not None:
            active, head = found
            found = draw_tail(active, head, self._proposal(active.device), self._step_seed()), head
        return found

    @property
    def tail_proposal(self) -> Optional[Tensor]:
        """The counts the training tail is drawn from (the layer's own float64 CPU copy), or None: uniform draws.
        Assigned, checked as the constructor's argument."""
        return self.__dict__.get("_tail_proposal")

    @tail_proposal.setter
    def tail_proposal(self, counts) -> None:
        self.__dict__["_tail_proposal"] = check_proposal(counts, self.out_features)

    def _proposal(self, device: torch.device) -> Proposal:
        """The draw weights of :attr:`tail_proposal` on ``device``, kept while the counts are (in-place edits too)."""
        counts, cached = self.tail_proposal, self.__dict__.get("_proposals")
        if cached is None or cached[0] is not counts or cached[1] != counts._version:
            cached = self._proposals = (counts, counts._version, {})
        if device not in cached[2]:
            cached[2][device] = Proposal.of(counts, device)
        return cached[2][device]

    def _warmup_draws(self, x: Tensor, labels: Optional[Tensor], shared: bool, sparse: bool) -> tuple[Tensor, Tensor]:
        """A warm-up step's set: the labels and uniform draws, seeded by the step."""
        labels = _as_label_matrix(labels, x.shape[0])
        return self.tables.query_uniform(x, self.out_features, self._set_size(labels, shared, self._tail_count(sparse)),
                                         labels, self._step_seed(), shared)

    @_reads_weight
    @torch.no_grad()
    def topk(self, input: Tensor, k: int, exact: bool = False, probes: Optional[int] = None,
             budget: Optional[int] = None, norm_rows: Optional[int] = None,
             min_recall: float = TOPK_MIN_RECALL, exclude: Optional[Tensor] = None) -> torch.return_types.topk:
        """The ``k`` largest outputs per row and their neuron indices, ``[*, k]`` each, best first:
        ``(values, indices)``, a named tuple like :func:`torch.topk`'s.

        ``exclude`` (int64 ``[*]`` or ``[*, M]``, -1 and -100 padding): neurons each row must not get (a
        user's items already seen). They score -inf, as in ``torch.topk`` of the masked scores (a row left
        fewer than ``k`` outputs gets -inf for the rest); the index searches ``M`` (rounded up to a power of
        two) more candidates per row, so that seen items, often a row's first candidates, leave room for the
        others. Excluding from every row is a ``-inf`` bias entry.

        ``exact=True``: the dense computation, like ``torch.topk(linear(input), k)``.
        ``exact=False``: the best ``k`` by exact score among two sets of candidates per row, from an
        index that topk keeps for itself (:class:`lsh_torch.retrieval.TopkIndex`; built at the first
        call, and again after the weight changes, e.g. an optimizer step or ``load_state_dict``):

        * ``budget`` neurons that its hash tables rank highest (most probed buckets hit;
          ``probes`` per table). Only real candidates are scored: where the tables find fewer
          than ``budget`` for a row, the row's top k comes from those it found (completed with
          uniformly random neurons only when they are fewer than ``k``);
        * the ``norm_rows`` neurons whose weight rows have the largest norms, for every row (one
          matrix product): the likeliest winners, which tables of directions rank like any other;
          with them, the ``k`` of largest bias: the top k of an input near zero (a cold-start user's
          zero vector scores the bias alone).

        The index is checked before it is trusted and while it answers: 64 of the first rows it answers after each
        build (for these ``k``, ``probes``, ``budget`` and ``norm_rows``) are also computed exactly and get the
        exact answer, and after them one row in 1,024 is checked too (keeping the index's answer); where it found
        less than ``min_recall`` (default 0.95) of the exact top k of the last 64 checked, it is not used (the
        index's recall depends on the trained rows and the inputs: rows unlike the first ones are noticed). With
        the default ``norm_rows``, the likeliest rows alone then stand in
        for it (by an estimate of their output for the checked rows: their mean's output plus
        their spread times the row's norm, :meth:`~lsh_torch.retrieval.TopkIndex.order_alone`),
        as many as held ``min_recall`` of the checked top k (rounded up to a doubling of
        ``out_features // 128``), checked on 64 other rows in turn, and widened if they fail, up
        to a quarter of the outputs; past that, or with ``norm_rows`` given, rows are answered exactly, with a
        warning, and one in 16 is also searched in the index, which answers again once the last 64 checked reach
        ``min_recall`` (a random warm-up batch fails it). :attr:`topk_checks` holds the measured recall (a stand-in
        as settings ``(k, 0, 0, rows)``); ``min_recall=0`` skips the check.

        Defaults (:func:`lsh_torch.retrieval.topk_settings`): ``probes`` :attr:`inference_probes`
        (12), ``budget`` :attr:`topk_budget` (768) or ``4 * k`` where larger, at most ``out_features`` (the
        exact computation there), ``norm_rows``
        :attr:`topk_norm_rows` (``out_features // 128``); 60 tables (:attr:`topk_tables`) of
        ``out_features / 2^13`` rows per bucket clamped to [8, 80] (:attr:`topk_bits`: 13 from about 46K
        to 927K outputs; :func:`~lsh_torch.retrieval.topk_settings`), hashing directions, independent of the
        training tables; set those two attributes to index otherwise. ``k <= budget <=
        out_features`` and ``0 <= norm_rows <= out_features``; a budget or ``norm_rows`` of every
        output is the exact computation. A ``selection="random"`` layer scores ``budget``
        uniformly random neurons (the baseline) and builds no index. The index holds about ``4 *
        topk_tables * out_features`` bytes (163 MB at 670K outputs, whose weight is 343 MB) and
        takes seconds to build at that width (5-9 s on 2 cores: every row hashed 780 times).
        Weight changes made through ``weight.data``, or in place to a weight created under
        ``torch.inference_mode`` (an inference tensor has no version counter), go unseen: call
        :meth:`rebuild` after them. Never differentiable (no graph is recorded, even with ``exact=True``).

        Measured at 670,091 outputs (1,024 queries, k=5, ``benchmarks/bench_topk.py``, docs/results.md):
        recall of the exact top 5 0.961 on rows in clusters and 0.996 on the trained XMC demo
        head, 11.9x and 13.8x faster than ``F.linear`` + ``torch.topk`` in the same runs (medians of
        three, 2 quiet cores). Tables like the training ones (20, K=12, 32 probes, 1,024
        candidates, no norm rows) gave 0.910 and 0.241 (at 5.0x and 5.3x on busy cores, before
        the query's speed-ups). Harder: the default XMC demo's head (100K labels; the top 5 at
        cosines 0.2-0.6 with the input), where the index found 0.36 of the checked top 5 (0.56 with
        the former K=10 tables) and its 6,248 likeliest rows alone stand in for it: 0.993 at 21x
        (the 12,496 largest-norm rows before: 0.980 at 6.5x); trained per row, 0.998 / 0.993 at
        94x / 20x after 3 / 5 epochs, where the largest-norm rows would need more than a quarter.
        Clustered rows at 100K / 300K outputs: 0.980 / 0.964 at 2.7x / 6.3x.
        """
        exact = check_bool("exact", exact)
        min_recall, k = check_min_recall(min_recall), integer_scalar(k)
        input, weight, bias = self._operands(input)
        x = input.reshape(-1, self.in_features)
        if exclude is not None:
            exclude = _label_matrix(exclude, input.shape[:-1], input.device, "exclude")
            _check_label_range(exclude, self.out_features, "exclude")
        if not exact:
            k, probes, budget, norm_rows, exact = self._topk_arguments(k, probes, budget, norm_rows)
        else:  # unused, but checked as the index's call checks them (a bad value passed silently)
            self._topk_arguments(0, probes, budget, norm_rows)
        if exact or k == 0:  # also the approximation's answer when its candidates are every output
            k = check_int("k", k, 0, self.out_features)
            values, indices = exact_topk_outside(x, weight, bias, k, exclude)
        elif self.tables.selection == "random":
            self._materialise_tables()
            active = LSHTables.query_uniform(x, self.out_features, min(self.out_features, budget + excluded_room(exclude)),
                                             None, self.seed, row_keys=self.tables.row_keys(x))[0]
            scores = ops.sparse_linear(x, weight, bias, active)
            if exclude is not None:
                scores = scores.masked_fill(among(active, exclude), -math.inf)
            values, best = scores.topk(k, dim=1)
            indices = active.gather(1, best)
        else:
            index = self._topk_index_of(self.weight, self.bias)
            values, indices = index.topk(x, weight, bias, k, probes, budget, norm_rows, self.seed, min_recall, exclude)
        shape = (*input.shape[:-1], k)
        return torch.return_types.topk((values.reshape(shape), indices.reshape(shape)))

    @_eager_under_compile("LSHLinear.topk(exact=False) builds, checks and consults its index eagerly: "
                          "fullgraph=True and export cannot include it; topk(exact=True) compiles whole")
    def _topk_index_of(self, weight: Tensor, bias: Optional[Tensor]) -> TopkIndex:
        """topk's index, rebuilt if ``weight`` or ``bias`` (the layer's, not autocast copies) changed since."""
        # Non-strict export runs this with fake weights; a jit trace recorded the first call's checks and builds
        # into the graph (every traced call re-checked, or rebuilt, the index: 30x slower, silently).
        if torch.compiler.is_exporting() or torch.jit.is_tracing():
            raise RuntimeError("LSHLinear.topk(exact=False) cannot be exported or traced (torch.export, torch.jit.trace): "
                               "its index is built, checked and consulted eagerly, outside any graph. Export or trace "
                               "topk(exact=True), or call topk eagerly (torch.compile without fullgraph runs the "
                               "index eagerly).")
        index = self._topk_index_describes(weight, bias)
        if index is None:
            _check_not_meta(weight)
            self._warn_if_parametrized()
            old = self._topk_index
            index = None if old is None else old.followed(weight, self.topk_tables, self.topk_bits, self._topk_seed)
            if index is None:
                self._topk_index = None  # the old index goes first: two at once would double the memory
                index = TopkIndex(weight, self.topk_tables, self.topk_bits, self._topk_seed, bias)
            index.recheck(bias)
            self._topk_index = index
        return index

    def _topk_index_describes(self, weight: Tensor, bias: Optional[Tensor]) -> Optional[TopkIndex]:
        """topk's index if it describes ``weight`` and ``bias``, else None: read once (another thread may
        replace it meanwhile; a second read found None)."""
        index = self._topk_index
        if index is None or not index.matches(weight, self.topk_tables, self.topk_bits, self._topk_seed):
            return None
        index.recheck(bias)
        return index

    @property
    def _topk_seed(self) -> int:
        return self.seed + 2 ** 32  # projections of their own, unlike the training tables'

    @property
    def topk_checks(self) -> dict[tuple, RecallCheck]:
        """What :meth:`topk` measured of its current index: ``{(k, probes, budget, norm_rows):
        RecallCheck(inputs, found, wanted, queries, winners, hits)}`` (``.recall``: found / wanted over the last
        64 inputs checked; the likeliest rows alone, standing in for a failed index, as ``(k, 0, 0, rows)``; calls with
        ``exclude`` under keys of their own, with a fifth element, the room searched for it); empty
        before the first call and after the weight changed."""
        index = self._topk_index_describes(self.weight, self.bias)
        if index is None:
            return {}
        def copy(check: RecallCheck) -> RecallCheck:  # (the index's own go on changing)
            tensors = {name: getattr(check, name) for name in ("queries", "winners", "hits")}
            return dataclasses.replace(check, pending=list(check.pending),
                                       **{name: None if t is None else t.clone() for name, t in tensors.items()})
        return {key: copy(check) for key, check in list(index.checks.items())}

    def topk_answered_by(self, k: int, probes: Optional[int] = None, budget: Optional[int] = None,
                         norm_rows: Optional[int] = None, min_recall: float = TOPK_MIN_RECALL,
                         exclude: Optional[Tensor] = None) -> Optional[tuple]:
        """Who answers ``topk(x, k, probes=..., budget=..., norm_rows=..., min_recall=..., exclude=...)`` now, by
        what its checks measured: the index's settings ``(k, probes, budget, norm_rows)``, the
        likeliest rows alone standing in for them (``(k, 0, 0, rows)``), or None: exact scores
        (also where the candidates are every output, or ``k=0``); with ``exclude`` (only its width
        counts: the last dimension of ``[*, M]``), a fifth element, the room searched for it (:func:`~lsh_torch.retrieval.excluded_room`).
        Before the index is built or checked, and for a ``selection="random"`` layer (no index): the
        settings asked for."""
        min_recall = check_min_recall(min_recall)
        if exclude is not None and not isinstance(exclude, Tensor):
            raise TypeError(f"exclude must be a Tensor, got {type(exclude).__name__}")
        room = excluded_room(None if exclude is None else exclude.reshape(-1, exclude.shape[-1] if exclude.dim() > 1 else 1))
        k, probes, budget, norm_rows, exact = self._topk_arguments(integer_scalar(k), probes, budget, norm_rows)
        if exact or k == 0:
            return None
        index = None if self.tables.selection == "random" else self._topk_index_describes(self.weight, self.bias)
        if index is None:
            return (k, probes, budget, self.topk_norm_rows if norm_rows is None else norm_rows) + ((room,) if room else ())
        return index.answering(k, probes, budget, norm_rows, min_recall, self.weight, self.bias, room)

    def _topk_arguments(self, k, probes, budget, norm_rows) -> tuple:
        """topk's ``k``, ``probes``, ``budget`` and ``norm_rows`` (None: the index's "auto", see
        TopkIndex.topk) checked and defaulted, and whether those candidates are every output (exact)."""
        if budget is None:  # the default grows with k (topk_budget)
            budget = topk_budget(self.out_features, check_int("k (at most out_features)", k, 0, self.out_features))
        budget = check_int("budget", budget, 1, self.out_features)
        k = check_int(f"k (at most the index's candidates, budget={budget}; exact=True takes any k up to "
                      f"out_features)", k, 0, budget)
        probes = check_int("probes", self.inference_probes if probes is None else probes, 1,
                           min(MAX_PROBES, 2 ** self.topk_bits))
        if norm_rows is not None:
            norm_rows = check_int("norm_rows", norm_rows, 0, self.out_features)
        exact = (max(budget, self.topk_norm_rows if norm_rows is None else norm_rows) == self.out_features
                 and self.tables.selection != "random")
        return k, probes, budget, norm_rows, exact

    @property
    def inference_probes(self) -> int:
        """Buckets per table that :meth:`topk` probes by default: 12 (:func:`lsh_torch.retrieval.topk_settings`),
        at most as many as its tables have (``2 ** topk_bits``)."""
        return min(MAX_PROBES, topk_settings(self.out_features)["probes"], 2 ** self.topk_bits)

    @property
    def topk_norm_rows(self) -> int:
        """Largest-norm neurons that :meth:`topk` scores for every row by default: ``out_features // 128``."""
        return topk_settings(self.out_features)["norm_rows"]

    @property
    def topk_budget(self) -> int:
        """Candidates per row that :meth:`topk` scores by default: :func:`topk_budget` of the
        layer's width for a small ``k`` (independent of the training budget ``active``; a larger ``k`` takes
        more: :func:`~lsh_torch.retrieval.topk_budget`)."""
        return topk_budget(self.out_features)

    def _operands(self, input: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """The checked input, weight and bias of a call. Under autocast all three are cast to its
        dtype, as ``nn.Linear``'s matmul is (float64 stays): the sparse kernels then run in it
        (accumulating in float32), and the casts' backward returns the gradients in the
        parameters' own dtype."""
        weight, bias = self.weight, self.bias
        device_type = input.device.type if isinstance(input, Tensor) else None
        if device_type is not None and autocast_on(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            sparse = self._sparse_grad and torch.is_grad_enabled()  # (the parameters' gradients may be sparse)
            input = _autocast(input, dtype, False)
            weight, bias = _autocast(weight, dtype, sparse), _autocast(bias, dtype, sparse)
        self._check_input(input, weight)
        if weight.shape != (self.out_features, self.in_features) or bias is not None and bias.shape != weight.shape[:1]:
            what = f"weight {tuple(weight.shape)}" + (f" and bias {tuple(bias.shape)}" if bias is not None else "")
            layer = f"{self.__class__.__name__}(in_features={self.in_features}, out_features={self.out_features})"
            raise ValueError(f"{layer} holds {what}; a replaced weight must keep the shape [out_features, in_features] (the "
                             "hash tables, budget and top-k index are sized by it): make a new layer for another width")
        return input, weight, bias

    def _check_not_under_ddp(self) -> None:
        """DistributedDataParallel cannot reduce sparse gradients: its backward fails with "Cannot access
        storage of SparseTensorImpl". Refused at the forward that DDP runs (where sparse gradients would be
        recorded: forward_sparse, forward's sparse paths) and whose backward syncs, with the way out. (A
        layer called outside DDP's forward, or managed by an outer DDP around an inner one, goes unseen.)"""
        if not torch.is_grad_enabled():
            return
        ddp = _ddp_managing(p for p in (self.weight, self.bias) if p is not None and p.requires_grad)
        if (ddp is None or not self._sparse_grad  # (a frozen parameter gets no gradient)
                or not getattr(ddp, "require_backward_grad_sync", True)):  # no_sync(): DDP reduces nothing yet
            return
        raise RuntimeError(f"{self.__class__.__name__}(sparse_grad=True) runs inside DistributedDataParallel, which "
                           "cannot reduce its sparse gradients (its backward would fail). Wrap the model with "
                           "lsh_torch.distributed.data_parallel(model), which leaves sparse parameters out of DDP for "
                           "lsh_torch.distributed.all_reduce_sparse_grads.")

    def _check_input(self, input: Tensor, weight: Tensor) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
        if input.dim() == 0 or input.shape[-1] != self.in_features:
            raise ValueError(f"input must have shape [*, in_features={self.in_features}], got {tuple(input.shape)}")
        if input.dtype != weight.dtype:
            raise TypeError(f"input has dtype {input.dtype} but the layer's weight has {weight.dtype}")
        if input.device != self.weight.device:
            raise ValueError(f"input is on {input.device} but the layer's weight is on {self.weight.device}")

    def __prepare_scriptable__(self):  # torch.jit.script calls it first
        raise RuntimeError("torch.jit.script does not support LSHLinear (its training paths run Python: hash tables, "
                           "random draws, autograd hooks). Use torch.compile or torch.export, or torch.jit.trace a "
                           "model in eval() mode.")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"active={self.budget}, rebuild={self.schedule!r}, seed={self.seed}, sparse_grad={self.sparse_grad}, "
                f"inference={self.inference!r}, mode={self.mode!r}, tail={self.tail!r}, rescore={self.rescore}"
                + (", exact_softmax=True" if self.exact_softmax else "")
                + (f", warmup={self.warmup}" if self.warmup else "")
                + (", tail_proposal=<counts>" if self.tail_proposal is not None else ""))


class _Draw:
    __slots__ = ("order", "shape", "fingerprint", "found", "replays", "__weakref__")

    def __init__(self, order: int, x: Tensor, found: tuple[Tensor, Tensor]):
        self.order, self.shape, self.found, self.replays = order, x.shape, found, 0
        self.fingerprint = _fingerprint(x)


def _may_be_recomputed() -> bool:
    """Whether activation checkpointing may recompute this training forward: it runs under saved-tensor
    hooks (torch.utils.checkpoint's non-reentrant mode, transformers' default) or without grad inside an
    autograd.Function's forward (the reentrant mode's first pass: torch's, DeepSpeed's), outside backward.
    Other forwards record nothing: a record keeps the active set alive (49 MiB a step held by a loss kept
    across steps, measured), and a plain no_grad training forward's record (PPO's old log-probabilities
    in train mode) was replayed for a later checkpointed forward of the same input: wrong gradients."""
    if torch._C._current_graph_task_id() != -1:
        return False
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        return True
    return not torch.is_grad_enabled() and _in_autograd_function_forward()


def _in_autograd_function_forward() -> bool:
    """Whether a caller is an (old-style) autograd.Function's ``forward(ctx, ...)``, as a reentrant
    checkpoint's is. Walked only for training forwards without grad."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "forward" and frame.f_code.co_argcount and frame.f_code.co_varnames[0] == "ctx" \
                and isinstance(frame.f_locals.get("ctx"), torch.autograd.function.FunctionCtx):
            return True
        frame = frame.f_back
    return False


class _LazyWrites:
    """The rows that lazy optimizer steps wrote since the tables were built, while those steps were the
    weight's only writes: what a scheduled incremental build re-hashes without a pass over every row to
    find the moved ones (the fingerprints: 41 of a 131 ms rebuild at 670K x 128, on a CPU without
    bfloat16 dot products).

    A lazy step (LazyAdam's, SparseAdam's) writes the rows its sparse gradient names, once: the weight's
    version counter rises by one (or not at all: SparseAdam skips an empty gradient). The rows are taken
    before the step (a hook after it may zero the gradient). Any other write (an EMA ``copy_``, a dense
    step, a load, a cast) or a second write in one step ends the record, and the build finds the moved
    rows by their fingerprints again. Writes that no counter sees (through ``.data``, another process's
    to shared memory) are told apart by the fingerprints only: :meth:`LSHLinear.rebuild` takes them, and a
    shared weight is not recorded."""

    def __init__(self):
        self._version: Optional[int] = None  # the weight's version after the last recorded write; None: no record
        self._rows: Optional[Tensor] = None  # bool [out_features]: the rows written; None: none yet
        self._step: Optional[tuple[Optional[int], Optional[Tensor]]] = None  # (version, rows) of a step under way

    def __reduce__(self):  # copies and pickles start without a record: versions count anew there
        return _LazyWrites, ()

    def start(self, version: Optional[int]) -> None:
        """The tables were built from the weight at ``version`` (None: not known, no record)."""
        self._version, self._step = version, None
        if self._rows is not None:
            self._rows.zero_()

    def step_begins(self, version: Optional[int], rows: Optional[Tensor]) -> None:
        """An optimizer step is about to update the weight, now at ``version``; ``rows``: the int64 rows of a
        lazy step's sparse gradient, which it will write (None: any row)."""
        self._step = (version, rows)

    def step_ended(self, version: Optional[int], out_features: int) -> None:
        """The step left the weight at ``version``."""
        step, self._step = self._step, None
        if step is None or step[1] is None or self._version is None or step[0] != self._version:
            self._version = None  # a step that said nothing before it, or one after an unrecorded write
            return
        if version == step[0]:  # nothing written
            return
        rows = step[1]
        if version is None or version != step[0] + 1:
            self._version = None
            return
        if self._rows is None or self._rows.device != rows.device:
            self._rows = (torch.zeros(out_features, dtype=torch.bool, device=rows.device) if self._rows is None
                          else self._rows.to(rows.device))
        self._rows[rows] = True
        self._version = version

    def rows(self, version: Optional[int], device: torch.device) -> Optional[Tensor]:
        """The rows written since the build (int64, increasing, on ``device``) if the record holds every write up
        to ``version``; else None."""
        if version is None or version != self._version:
            return None
        if self._rows is None:
            return torch.zeros(0, dtype=torch.long, device=device)
        return self._rows.to(device).nonzero().squeeze(1)


class _RecordedDraws:
    """The active sets of a layer's training forwards that activation checkpointing may recompute,
    found again by their inputs when it does: the layer called twice in one checkpointed region, or
    checkpointed micro-batches summed into one backward, each get their own set back.

    A forward with an autograd graph keeps its record as long as the graph (in its output's
    ``grad_fn.metadata``), so nothing outlives its backward; a forward without one (reentrant
    checkpointing runs the region under ``no_grad``; a compiled layer's graph is out of reach) until its
    replay, among the last
    :attr:`WITHOUT_GRAPH`."""

    WITHOUT_GRAPH = 16

    def __init__(self):
        self._with_graph: list[weakref.ref] = []
        self._without_graph: collections.deque = collections.deque(maxlen=self.WITHOUT_GRAPH)
        self._recorded = 0
        self._warned_ambiguous = False

    def __reduce__(self):  # copies and pickles start empty: the records belong to this process's graphs
        return _RecordedDraws, ()

    def record(self, x: Tensor, found: tuple[Tensor, Tensor], values: Optional[Tensor]) -> None:
        draw, self._recorded = _Draw(self._recorded, x, found), self._recorded + 1
        if values is None or values.grad_fn is None:
            self._without_graph.append(draw)
            return
        values.grad_fn.metadata["lsh_torch_draw"] = draw
        self._with_graph = [ref for ref in self._with_graph if ref() is not None]
        self._with_graph.append(weakref.ref(draw))

    def replay(self, x: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """The set of the forward whose input ``x`` is (bit for bit), or None. Where several forwards
        had it, the one replayed least, then the earliest: a region's recomputation runs its
        forwards in their order (separate regions recompute last first: then the sets can swap,
        which is warned about)."""
        draws = [ref() for ref in self._with_graph] + list(self._without_graph)
        fingerprint = _fingerprint(x)
        same = [d for d in draws if d is not None and d.shape == x.shape and torch.equal(d.fingerprint, fingerprint)]
        if not same:
            return None
        draw = min(same, key=lambda d: (d.replays, d.order))
        if any(d is not draw and d.replays == draw.replays for d in same) and not self._warned_ambiguous:
            self._warned_ambiguous = True
            warnings.warn("LSHLinear: activation checkpointing recomputes a forward whose input another forward of "
                          "this layer had too (the same tensor, in two checkpointed calls): which active set was "
                          "whose cannot be told, and the recomputation may get the other's (gradients may differ "
                          "from those without checkpointing). Checkpoint the two calls in one region, or give "
                          "them different inputs.", stacklevel=user_stacklevel())
        draw.replays += 1
        if draw in self._without_graph:  # reentrant: recomputed once per backward; its set is not kept longer
            self._without_graph.remove(draw)
        return draw.found


def _fingerprint(x: Tensor) -> Tensor:
    """Column sums and each row's product with fixed irrational weights, in float32: a recomputation's
    input is bit-identical to its forward's, and two different inputs (another micro-batch, another
    position, the rows in another order, one-hot rows too) practically never share them."""
    x = x.detach().float()
    weights = (torch.arange(x.shape[-1], dtype=torch.float32, device=x.device) * 0.6180339887).frac() + 0.5
    return torch.cat([x.sum(0), x @ weights])


def _autocast(t: Optional[Tensor], dtype: torch.dtype, sparse_grad: bool) -> Optional[Tensor]:
    """``t`` in autocast's ``dtype`` (float64 stays); through :class:`_Cast` where its gradient may be sparse."""
    if t is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return _Cast.apply(t, dtype) if sparse_grad and t.requires_grad else t.to(dtype)


class _Cast(torch.autograd.Function):
    """``t.to(dtype)`` whose backward also takes the sparse gradients of ``sparse_grad=True``
    (``Tensor.to``'s backward refuses a sparse gradient for a strided input)."""

    @staticmethod
    def forward(t: Tensor, dtype: torch.dtype) -> Tensor:
        return t.to(dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dtype = inputs[0].dtype

    @staticmethod
    # Eager under torch.compile: a compiled backward took no sparse gradient (it failed). Only parameters of a
    # sparse_grad=True layer go through here: a graph break elsewhere failed strict export and fullgraph under autocast.
    @torch.compiler.disable
    def backward(ctx, grad: Tensor):
        return grad.to(ctx.dtype), None


def _stale_after_load(module: LSHLinear, incompatible_keys) -> None:
    if not getattr(module, "_loaded_own_parameters", True):  # a partial load (strict=False) without them
        return
    if getattr(module, "_tables_from_checkpoint", False):  # load_lsh_state came first: its tables are lost
        warnings.warn("load_state_dict after load_lsh_state discards the tables load_lsh_state restored (they are "
                      "rebuilt from the loaded weights, not the saved run's): call load_lsh_state after "
                      "load_state_dict to resume exactly", stacklevel=user_stacklevel())
    module._mark_stale()


def _rebuild_now(schedule, step: int) -> bool:
    answer = schedule(step)
    scalar_bool = str(getattr(answer, "dtype", "")) in ("bool", "torch.bool") and getattr(answer, "ndim", 1) == 0
    if not (isinstance(answer, bool) or scalar_bool):  # a truthy "no" would rebuild every step
        raise TypeError(f"rebuild schedule {schedule!r} must return a bool for step {step}, got {answer!r}")
    return bool(answer)


def _check_not_meta(weight: Tensor) -> None:
    if weight.is_meta:  # the tables and their lookup read data; a meta tensor has none
        raise RuntimeError("LSHLinear on the meta device has no data to hash or look up: only eval-mode forward with "
                           "inference='dense' (nn.Linear's computation) and topk(exact=True) work there; materialise the weights first "
                           "(e.g. module.to_empty(device=...) and load_state_dict)")


def _ddp_managing(params) -> Optional[nn.parallel.DistributedDataParallel]:
    """The DistributedDataParallel whose forward is running, if it reduces any of ``params``; else None."""
    ddp = nn.parallel.DistributedDataParallel._get_active_ddp_module()
    if ddp is None:
        return None
    params = list(params)
    return ddp if any(p is q for p in getattr(ddp, "_module_parameters", ()) for q in params) else None


def _label_matrix(labels: Optional[Tensor], batch_shape: torch.Size, device: torch.device,
                  name: str = "labels") -> Optional[Tensor]:
    """Checked ``labels`` (int64 ``batch_shape`` or ``batch_shape + (M,)``, on the input's ``device``) as ``[rows, M]``;
    ``name``: the argument's (topk's ``exclude`` takes neuron ids the same way)."""
    if labels is None:
        return None
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64:
        given = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(f"{name} must be an int64 tensor, got {given}")
    if labels.device != device:  # (a kernel would read another device's memory, or fail in an op)
        raise ValueError(f"{name} are on {labels.device} but the input is on {device}")
    return _label_rows(labels, batch_shape, -100, name)  # the loss's reshape; -100 becomes -1, padding as well


def _check_label_range(labels: Tensor, out_features: int, name: str = "labels") -> None:
    """Labels in [0, out_features) or -1 (padding), as the query kernels check theirs."""
    refuse((labels < -1) | (labels >= out_features),
           f"{name} must be in [0, out_features={out_features}) or -1 / -100 (padding)",
           lambda bad: f", got {labels[bad][0].item()}")


def _as_label_matrix(labels: Optional[Tensor], batch: int) -> Optional[Tensor]:
    if labels is None:
        return None
    labels = labels.reshape(batch, -1) if labels.dim() <= 1 else labels
    return labels.to(torch.int64).contiguous()


def _check_tail(tail, budget: int):
    if tail == "auto":
        return tail
    tail = int_or_float("tail", tail, "an int count, a float fraction of the budget or 'auto'")
    if isinstance(tail, float) and not 0.0 <= tail <= 1.0:
        raise ValueError(f"tail as a fraction of the budget must be in [0, 1], got {tail}")
    if isinstance(tail, int) and not 0 <= tail <= budget:
        raise ValueError(f"tail must be in [0, active budget={budget}], got {tail}")
    return tail


def _refuse_shared_labels_in_a_graph(layer: LSHLinear) -> None:
    """A shared set's top set is as large as the budget leaves beside the batch's distinct labels, a
    number read from the data: torch.compile breaks the graph there; fullgraph and export cannot."""
    why = (f"{type(layer).__name__}(out_features={layer.out_features}): an eval forward_sparse with labels in shared mode "
           "sizes its top set by the number of distinct labels in the batch, read from the data, so it cannot be "
           "one graph. Call it without labels, use mode='per_row', inference='dense', or torch.compile without "
           "fullgraph (it breaks the graph there).")
    if torch.compiler.is_exporting():
        raise RuntimeError(why)
    torch._dynamo.graph_break(msg=why)


def _labels_per_row(labels: Tensor) -> Tensor:
    """``[B]``: the distinct labels (values >= 0) of each row of ``labels`` ``[B, M]``, as the query forces them."""
    ordered = labels.sort(1).values
    return (ordered[:, :1] >= 0).sum(1) + ((ordered[:, 1:] != ordered[:, :-1]) & (ordered[:, 1:] >= 0)).sum(1)


def _distinct_labels(labels: Tensor) -> int:
    """How many distinct labels (values >= 0) ``labels`` holds, with one host sync (selecting the
    labels first, then ``unique``, would take two on a GPU)."""
    return int(_labels_per_row(labels.reshape(1, -1))[0]) if labels.numel() else 0


def _budget(active, out_features: int) -> int:
    active = int_or_float("active", active, "an int count or a float fraction")
    if isinstance(active, float):
        if not 0.0 < active <= 1.0:
            raise ValueError(f"active as a fraction must be in (0, 1], got {active}")
        return max(1, round(active * out_features))
    if not 1 <= active <= out_features:
        raise ValueError(f"active must be in [1, out_features={out_features}], got {active}")
    return active
