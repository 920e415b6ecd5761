"""Active-set quality diagnostics for :class:`~lsh_torch.LSHLinear`.

How good is a hashed active set? The question has a direct answer: compute the exact
activations once (dense, so only as a probe, never in the training step) and ask how many of the
true top-``k`` neurons the active set holds.

- :func:`active_set_recall` measures it for one layer and one batch, with the fraction of
  multiply-adds the sparse step computes.
- :class:`RecallMonitor` repeats the probe every ``every`` training steps, as a forward hook or
  by hand, marks the steps at which the tables were rebuilt, and plots recall over training.

Example::

    layer = LSHLinear(784, 1000)
    monitor = RecallMonitor(layer, every=50).attach()   # probes inside layer.forward
    ... train ...
    monitor.plot("recall.png"); monitor.detach()
"""
from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_bool, check_int

__all__ = ["topk_recall", "active_set_recall", "multiply_add_fraction", "RecallMonitor"]


def _check_layer(layer) -> None:
    for attr in ("weight", "budget", "active_set", "tables", "in_features", "out_features"):
        if not hasattr(layer, attr):
            raise TypeError(f"layer must be an LSHLinear (missing .{attr}), got {type(layer).__name__}")


@torch.no_grad()
def topk_recall(active: Tensor, scores: Tensor, k: int) -> dict:
    """Recall of the exact top-``k`` of ``scores`` [B, N] by ``active`` [B, A] (indices into N).

    Returns ``recall`` (mean over rows of |active ∩ top-k| / k; where scores tie at the k-th
    largest, any of the tied neurons counts), ``recall_min`` (worst row) and
    ``mass_recall``: the ReLU activation mass ``sum(relu(scores))`` the active set holds, as a
    share of what the best set of the same size (the exact top-``A``) holds: 1.0 for winner-take-all,
    about ``A / N`` of the positive mass for a random set; rows without positive mass count 1.0.
    """
    if active.dim() != 2 or scores.dim() != 2 or active.shape[0] != scores.shape[0]:
        raise ValueError(f"active must be [B, A] and scores [B, N] with the same B, got "
                         f"{tuple(active.shape)} and {tuple(scores.shape)}")
    if not active.shape[0]:
        raise ValueError("active and scores must hold at least one row: the recall of none is undefined")
    n = scores.shape[1]
    if active.dtype not in (torch.int32, torch.int64) or not scores.dtype.is_floating_point:
        raise TypeError(f"active must be an integer tensor and scores a floating one, got {active.dtype} and "
                        f"{scores.dtype}")
    if not 1 <= active.shape[1] <= n:
        raise ValueError(f"active must hold between 1 and N = {n} outputs per row, got {active.shape[1]}")
    if bool(scores.isnan().any()):
        raise ValueError("scores hold NaN: their top-k is undefined")
    if bool((scores == math.inf).any()):  # (its mass share was inf / inf: NaN, returned)
        raise ValueError("scores hold +inf: their activation mass, and its share in the active set, is undefined")
    k = check_int("k", k, 1, n)  # (k=2.5 or True reached torch.topk's own message)
    active = active.long()
    if active.numel() and (int(active.min()) < 0 or int(active.max()) >= n):
        raise ValueError(f"active holds indices outside [0, {n})")
    in_active = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    in_active.scatter_(1, active, True)
    # Tie-invariant: an active neuron tied with the k-th score takes one of the top-k's places left to ties.
    kth = scores.topk(k, dim=1).values[:, -1:]
    above, tied = scores > kth, scores == kth
    hits = ((in_active & above).sum(1) + torch.minimum((in_active & tied).sum(1), k - above.sum(1))).float() / k
    pos = scores.float().clamp_min(0)
    total = pos.topk(active.shape[1], dim=1).values.sum(1)
    kept = (pos * in_active).sum(1)
    mass = torch.where(total > 0, kept / total.clamp_min(1e-30), torch.ones_like(total))
    return {"recall": float(hits.mean()), "recall_min": float(hits.min()),
            "mass_recall": float(mass.mean())}


def multiply_add_fraction(layer, with_hashing: bool = True) -> float:
    """Multiply-adds of one sparse training forward row of ``layer``, as a fraction of ``nn.Linear``'s.

    That is :meth:`~lsh_torch.LSHLinear.forward`'s row (the hidden layers' path). ``forward_sparse`` of a
    layer with ``exact_softmax`` computes every output (1.0, no hashing); with a tail it also scores
    ``rescore`` times the top set's size of pooled candidates, without gradient, to choose it.

    The sparse step computes ``budget`` dot products of length ``in_features``; hashing the input
    adds the ``L*K`` projections of the transformed input (length ``in_features + 1``), or for
    ``hash="dwta"`` the ``L*H*bin_size`` comparisons of its bins. Table
    rebuilds (``out_features * (in_features + 1) * L*K`` each, amortized over the rebuild period)
    are not included.
    """
    _check_layer(layer)
    d, n = layer.in_features, layer.out_features
    macs = layer.budget * d
    if check_bool("with_hashing", with_hashing):
        macs += _hashing_macs(layer)
    return macs / (n * d)


def _hashing_macs(layer) -> int:
    """Multiply-adds of projecting one input row for the lookup (none for ``selection="random"``)."""
    if getattr(layer.tables, "selection", "lsh") == "random":
        return 0
    tables = layer.tables
    family = getattr(tables, "hash", None)
    if family is None:
        return (layer.in_features + 1) * tables.num_tables * tables.bits
    return family.macs(layer.in_features, tables.num_tables, tables.bits)


def _check_input(layer, x) -> None:
    """``x`` must be a floating ``[*, in_features]`` input of ``layer``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != layer.in_features:
        raise ValueError(f"x must have shape [*, in_features={layer.in_features}], got {tuple(x.shape)}")
    if not x.is_floating_point():  # the layer refuses integer inputs, as nn.Linear does: cast here, they were not
        raise TypeError(f"x must be a floating tensor, as the layer takes, got {x.dtype}")


@torch.no_grad()
def active_set_recall(layer, x: Tensor, k: Optional[int] = None, active: Optional[Tensor] = None,
                      include_bias: bool = True, sparse: bool = False) -> dict:
    """How well ``layer``'s active set for the batch ``x`` agrees with its true top activations.

    Args:
        layer: an :class:`~lsh_torch.LSHLinear`.
        x: inputs ``[*, in_features]`` (flattened to rows).
        k: size of the exact top set to recover (default: the layer's budget, so recall equals
            precision).
        active: evaluate this ``[B, A]`` (or batch-shared ``[A]``) active set instead of the
            layer's own (e.g. a random one, as a baseline). By default the layer's :meth:`active_set` for ``x`` is used, with the
            tables as they are now (stale tables give the recall training actually sees). If the
            layer is marked stale the tables are rebuilt first, exactly as its next forward would.
        include_bias: rank neurons by ``w·x + b`` (the activation; default) or ``w·x`` only (what
            the hash sees).
        sparse: the set of :meth:`~lsh_torch.LSHLinear.forward_sparse` (True: a softmax output layer's,
            shared unless ``mode="per_row"``, half of it the uniform tail by default) instead of
            :meth:`~lsh_torch.LSHLinear.forward`'s. Without labels: training forces them in too.

    Returns a dict: ``recall``, ``recall_min``, ``mass_recall`` (see :func:`topk_recall`), ``k``,
    ``budget``, ``random_recall`` (expected recall of a uniformly random set of that size,
    ``budget / out_features``), ``active_fraction``, ``mult_fraction`` (multiply-adds of the sparse
    step over the dense layer's) and ``mult_fraction_with_hashing`` (plus hashing the input).
    """
    _check_layer(layer)
    _check_input(layer, x)
    x2 = x.detach().reshape(-1, layer.in_features).to(layer.weight.dtype)
    n = layer.out_features
    exact = active is None and sparse and layer.exact_softmax  # every output, no lookup
    if active is None:
        active = layer.active_set(x2, sparse=sparse)
    if active.dim() == 1:  # one set shared by the batch (mode="shared")
        active = active.unsqueeze(0).expand(x2.shape[0], -1)
    if active.dim() != 2 or active.shape[0] != x2.shape[0]:
        raise ValueError(f"active must be [B={x2.shape[0]}, A] or [A], got {tuple(active.shape)}")
    budget = active.shape[1]
    k = budget if k is None else k
    k = check_int("k", k, 1, n)
    bias = layer.bias if check_bool("include_bias", include_bias) else None
    scores = F.linear(x2, layer.weight.detach(), None if bias is None else bias.detach())
    out = topk_recall(active, scores, k)
    out.update({"k": k, "budget": budget, "random_recall": budget / n, "active_fraction": budget / n,
                "mult_fraction": budget / n,
                "mult_fraction_with_hashing": (budget * layer.in_features + (0 if exact else _hashing_macs(layer)))
                / (n * layer.in_features)})
    return out


class RecallMonitor:
    """A cheap periodic probe of an LSHLinear's active-set recall during training.

    Two ways to use it:

    - ``monitor.attach()`` registers a forward hook: every ``every``-th training forward of the
      layer (counted by ``layer.step``) it runs :func:`active_set_recall` on the first
      ``max_rows`` rows of that forward's input. ``detach()`` removes the hook; the monitor is
      also a context manager (``with RecallMonitor(layer).attach(): ...``).
    - Call ``monitor.maybe_probe(x)`` yourself after a step (needed for layers trained through
      :meth:`~lsh_torch.LSHLinear.forward_sparse`, which forward hooks do not see; construct the
      monitor with ``sparse=True`` there, so that it measures that path's set) (probes when
      ``layer.step`` is a multiple of ``every``), or ``monitor.probe(x)`` to probe unconditionally
      (e.g. on a fixed held-out batch).

    Rebuilds are detected by watching the layer's table tensors (a rebuild replaces them), at
    every hooked forward or at every call, and recorded in ``rebuild_steps`` as the value of
    ``layer.step`` after the forward that rebuilt (with manual calls: the first call that sees
    the change). A probe measures the set a training step would draw, also when the model is in
    eval mode (``probe_eval``, a held-out batch in an eval pass). The probe itself never changes
    the training: it draws no global random numbers and, apart from building tables that are
    marked stale (as the next forward would), leaves the layer alone.

    Attributes:
        history: list of dicts, one per probe: ``step``, ``since_rebuild`` (steps since the last
            seen rebuild) and the keys of :func:`active_set_recall`.
        rebuild_steps: steps at which a build was seen: the first build (at the first training forward
            where the tables are built lazily) and every rebuild after it.
    """

    def __init__(self, layer, every: int = 100, k: Optional[int] = None, max_rows: int = 256,
                 name: Optional[str] = None, include_bias: bool = True, probe_eval: bool = False,
                 sparse: bool = False):
        _check_layer(layer)
        every, max_rows = check_int("every", every, 1, 2 ** 62), check_int("max_rows", max_rows, 1, 2 ** 62)
        if k is not None:
            k = check_int("k", k, 1, layer.out_features)
        self.layer, self.every, self.k, self.max_rows = layer, every, k, max_rows
        self.name = name or type(layer).__name__
        self.include_bias = check_bool("include_bias", include_bias)
        self.probe_eval = check_bool("probe_eval", probe_eval)
        self.sparse = check_bool("sparse", sparse)
        self.history: list[dict] = []
        self.rebuild_steps: list[int] = []
        self._handle = None
        self._tables_ref = None
        self._last_rebuild = 0
        self._note_tables(record=False)

    # -- rebuild tracking ------------------------------------------------------------------
    def _note_tables(self, record: bool = True) -> None:
        items = self.layer.tables.items
        seen = self._tables_ref() if self._tables_ref is not None else None
        if seen is not items:
            if record and self._tables_ref is not None:
                step = int(self.layer.step)
                if not self.rebuild_steps or self.rebuild_steps[-1] != step:
                    self.rebuild_steps.append(step)
                self._last_rebuild = step
            self._tables_ref = weakref.ref(items)

    # -- probing ---------------------------------------------------------------------------
    # Eager under torch.compile (a graph break): a probe reads the step counter and measured floats,
    # which as guards recompiled the caller at every probe.
    @torch.compiler.disable
    @torch.no_grad()
    def probe(self, x: Tensor) -> dict:
        """Measure recall on ``x`` now and append it to :attr:`history`."""
        _check_input(self.layer, x)
        self._note_tables()
        x2 = x.detach().reshape(-1, self.layer.in_features)[: self.max_rows]
        # The set a training step would draw, in eval mode too: an eval lookup re-hashes the rows a write
        # other than an optimizer step moved, which would change the tables training goes on with.
        training, self.layer.training = self.layer.training, True
        try:
            record = active_set_recall(self.layer, x2, k=self.k, include_bias=self.include_bias, sparse=self.sparse)
        finally:
            self.layer.training = training
        self._note_tables()  # a stale layer is rebuilt by the probe's own lookup
        step = int(self.layer.step)
        record = {"step": step, "since_rebuild": step - self._last_rebuild, **record}
        self.history.append(record)
        return record

    @torch.compiler.disable
    def maybe_probe(self, x: Tensor) -> Optional[dict]:
        """Probe if ``layer.step`` is a positive multiple of ``every`` (and not yet probed at it),
        not during the layer's warm-up: there training draws uniformly and builds no tables (a probe would
        build some, measuring tables that training then replaces with its full build)."""
        self._note_tables()
        step = int(self.layer.step)
        if (step <= 0 or step % self.every or (self.history and self.history[-1]["step"] == step)
                or step <= getattr(self.layer, "warmup", 0)):  # the build ending it runs at step == warmup
            return None
        return self.probe(x)

    __call__ = maybe_probe

    def _hook(self, module, args, kwargs, output) -> None:
        if not module.training and not self.probe_eval:
            return
        self.maybe_probe(args[0] if args else kwargs["input"])

    def attach(self) -> "RecallMonitor":
        """Register the forward hook on the layer (idempotent); returns ``self``."""
        if self._handle is None:
            self._handle = self.layer.register_forward_hook(self._hook, with_kwargs=True)  # layer(input=x) too
        return self

    def detach(self) -> None:
        """Remove the forward hook."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> "RecallMonitor":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def __getstate__(self):  # pickled with the layer its hook is on (torch.save(model)): a weak reference does not
        return {**self.__dict__, "_tables_ref": None}  # the next probe notes the tables again, as at construction

    # -- reporting -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-ready summary: the settings, the history and the rebuild steps."""
        return {"name": self.name, "every": self.every, "k": self.k, "max_rows": self.max_rows,
                "history": list(self.history), "rebuild_steps": list(self.rebuild_steps)}

    def plot(self, path, ax=None, title: Optional[str] = None):
        """Plot recall (and activation-mass recall) over training steps, rebuilds as vertical lines.

        Writes a PNG (or whatever the extension says) to ``path`` unless ``path`` is None; draws
        into ``ax`` if given. Needs matplotlib. Returns the matplotlib figure.
        """
        from matplotlib.figure import Figure
        if ax is None:  # a figure pyplot does not track: plots in a loop leave nothing open
            fig = Figure(figsize=(7, 3.5))
            ax = fig.subplots()
        else:
            fig = ax.figure
        steps = [h["step"] for h in self.history]
        ax.plot(steps, [h["recall"] for h in self.history], marker=".", label=f"recall@{self._k_label()}")
        ax.plot(steps, [h["mass_recall"] for h in self.history], marker=".", alpha=0.7,
                label="ReLU mass recall")
        if self.history:
            ax.axhline(self.history[-1]["random_recall"], color="gray", ls=":", label="random set")
        for i, s in enumerate(self.rebuild_steps):
            ax.axvline(s, color="tab:red", alpha=0.25, lw=0.8, label="rebuild" if i == 0 else None)
        ax.set_xlabel("training step")
        ax.set_ylabel("recall")
        ax.set_ylim(0, 1.02)
        ax.set_title(title or f"{self.name}: active-set recall of the exact top activations")
        ax.legend(loc="best", fontsize=8)
        if path is not None:
            fig.tight_layout()
            fig.savefig(path, dpi=120)
        return fig

    def _k_label(self) -> str:
        if self.k is not None:
            return str(self.k)
        return str(self.history[-1]["k"]) if self.history else "budget"

    def __repr__(self) -> str:
        return (f"RecallMonitor({self.name}, every={self.every}, probes={len(self.history)}, "
                f"rebuilds={len(self.rebuild_steps)}, attached={self._handle is not None})")
