"""lsh_torch.distributed on 2 gloo processes (CPU): data parallelism with row-sparse gradients
(DDP, FSDP2) and the vocabulary-parallel ShardedLSHLinear, against single-process references.

Each test spawns its ranks; they write what they computed to files that the test compares."""
import copy
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from lsh_torch import LazyAdam, LSHLinear, SparseOutput, load_lsh_state, lsh_state, sparse_cross_entropy
from lsh_torch._checks import vouched
from lsh_torch.distributed import (ShardedLSHLinear, all_reduce_sparse_grads, data_parallel, shard_range,
                                   unmanaged_parameters)

WORLD = 2
IN, HIDDEN = 6, 8


def _spawn(fn, tmp_path, *args):
    mp.spawn(_worker, args=(fn, str(tmp_path), args), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(WORLD)]


def _worker(rank, fn, tmp, args):
    torch.set_num_threads(1)  # two ranks on a small shared machine
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=WORLD)
    try:
        result = fn(rank, *args)
        torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still talks
    finally:
        dist.destroy_process_group()
    # Results saved and the group destroyed: skip interpreter finalization, where gloo's worker
    # threads can still hold tensors of FSDP2's collectives and abort the process ("terminate called
    # without an active exception", SIGABRT; seen twice in full runs after the ranks had finished,
    # never alone). An exception above still reaches the parent through mp.spawn.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class _Net(nn.Module):
    """A dense trunk (data parallel) and an output layer used through forward_sparse."""

    def __init__(self, make_head):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU())  # first: the same init in every run
        self.head = make_head()

    def forward(self, x):
        return self.trunk(x)


def _batch(step, rows, out_features):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(rows, IN, generator=gen), torch.randint(out_features, (rows,), generator=gen)


def _local(t, rank, sizes):
    start = sum(sizes[:rank])
    return t[start: start + sizes[rank]]


# ---------------------------------------------------------------------------------------------
# Data parallel: a replicated LSHLinear(sparse_grad=True) head

def _data_parallel_run(rank, wrapper, out_features, active, steps, optimizer="sgd"):
    torch.manual_seed(0)
    net = _Net(lambda: LSHLinear(HIDDEN, out_features, active=active, sparse_grad=True, rebuild=2))
    if rank == 1:  # a different start: data_parallel must copy rank 0's head (DDP the trunk)
        torch.manual_seed(1)
        net = _Net(lambda: LSHLinear(HIDDEN, out_features, active=active, sparse_grad=True, rebuild=2))
    index_rebuilt = None
    if wrapper == "ddp":
        net.head.topk(torch.randn(2, HIDDEN), 2, budget=8, norm_rows=0)  # an index of this rank's weights
        model = data_parallel(net)
        # rank 0's weights were written in place without bumping version counters: data_parallel bumps them
        index_rebuilt = not net.head._topk_index_describes(net.head.weight, net.head.bias)
    else:
        from torch.distributed.fsdp import fully_shard
        with torch.no_grad():  # FSDP2 does not broadcast: start every rank from rank 0's values
            for p in net.parameters():
                dist.broadcast(p, 0)
        model = fully_shard(net, ignored_params=unmanaged_parameters(net))
    # one LazyAdam for all: FSDP2's DTensor shards (dense Adam on the local rows) and the sparse head
    opt = torch.optim.SGD(net.parameters(), lr=0.5) if optimizer == "sgd" else LazyAdam(net.parameters(), lr=0.05)
    sent = []
    for step in range(steps):
        x, y = _batch(step, 8, out_features)
        x, y = _local(x, rank, [4, 4]), _local(y, rank, [4, 4])
        loss = sparse_cross_entropy(net.head.forward_sparse(model(x), y), y)
        opt.zero_grad()
        loss.backward()
        sent.append(all_reduce_sparse_grads(net))
        opt.step()
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
             for k, v in net.state_dict().items()}
    return {"state": state, "sent": sent, "index_rebuilt": index_rebuilt}


def _resume_run(rank, order):
    """Train, save, go on with an eval at the first step after; then resume a fresh model from the save,
    wrapping it by data_parallel before or after loading, and go on alike."""
    def make():
        return _Net(lambda: LSHLinear(HIDDEN, 300, active=30, sparse_grad=True, rebuild=4, inference="lsh"))

    def steps(net, model, opt, first, last):
        losses, evals = [], []
        for step in range(first, last):
            if step == first:  # an eval between steps
                net.eval()
                with torch.no_grad():
                    evals.append(net.head(net(torch.randn(6, IN, generator=torch.Generator().manual_seed(9)))))
                net.train()
            x, y = _batch(10 * step + rank, 8, 300)
            loss = sparse_cross_entropy(net.head.forward_sparse(model(x), y), y)
            opt.zero_grad()
            loss.backward()
            all_reduce_sparse_grads(net)
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses), evals[0]

    torch.manual_seed(0)
    net = make()
    model, opt = data_parallel(net), torch.optim.SGD(net.parameters(), lr=0.5)
    steps(net, model, opt, 0, 6)
    saved = {"model": copy.deepcopy(net.state_dict()), "opt": copy.deepcopy(opt.state_dict()), "lsh": lsh_state(net)}
    uninterrupted = steps(net, model, opt, 6, 10)
    torch.manual_seed(5)
    net = make()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    if order == "wrap_first":
        model = data_parallel(net)
    net.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    load_lsh_state(net, saved["lsh"])
    if order == "load_first":
        model = data_parallel(net)
    return uninterrupted, steps(net, model, opt, 6, 10)


@pytest.mark.parametrize("order", ["wrap_first", "load_first"])
def test_a_resume_under_data_parallel_goes_on_exactly_in_either_order(tmp_path, order):
    """data_parallel bumped every replicated layer's version counter after its broadcasts, also where they
    changed nothing (every rank loaded the same checkpoint, then wrapped): the first eval lookup then
    re-hashed the restored tables, and the resumed run's losses parted from the uninterrupted run's."""
    for (losses, evals), (resumed_losses, resumed_evals) in _spawn(_resume_run, tmp_path, order):
        assert torch.equal(evals, resumed_evals) and torch.equal(losses, resumed_losses)


def _single_process_run(out_features, steps, optimizer="sgd"):
    torch.manual_seed(0)
    net = _Net(lambda: LSHLinear(HIDDEN, out_features, active=out_features, sparse_grad=True, rebuild=2))
    opt = torch.optim.SGD(net.parameters(), lr=0.5) if optimizer == "sgd" else LazyAdam(net.parameters(), lr=0.05)
    for step in range(steps):
        x, y = _batch(step, 8, out_features)
        loss = sparse_cross_entropy(net.head.forward_sparse(net(x), y), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.state_dict()


class _Whole(nn.Module):
    """Trunk and sparse-gradient head in one forward, as a plain DDP user writes it."""

    def __init__(self):
        super().__init__()
        self.trunk, self.head = nn.Linear(IN, HIDDEN), LSHLinear(HIDDEN, 40, active=8, sparse_grad=True)

    def forward(self, x, y):
        return sparse_cross_entropy(self.head.forward_sparse(self.trunk(x), y), y)


def _plain_ddp_run(rank):
    torch.manual_seed(0)
    x, y = torch.randn(4, IN), torch.randint(0, 40, (4,))

    def refused(model, *args):
        ddp = nn.parallel.DistributedDataParallel(model)  # held: a temporary's backward reduces nothing
        with pytest.raises(RuntimeError, match=r"inside DistributedDataParallel, which cannot reduce its sparse "
                                               r"gradients .* lsh_torch\.distributed\.data_parallel"):
            ddp(*args)
        return ddp

    def trains(ddp, *args):  # two steps: a reduction that failed would fail here
        for _ in range(2):
            out = ddp(*args)
            (out if out.dim() == 0 else out.sum()).backward()

    plain = refused(_Whole(), x, y)
    with torch.no_grad():
        assert plain.module.head(plain.module.trunk(x)).shape == (4, 40)  # no gradient: nothing to refuse
    biased = _Whole()
    biased.head.weight.requires_grad_(False)  # the bias still gets a sparse gradient
    refused(biased, x, y)
    with pytest.raises(RuntimeError, match="inside DistributedDataParallel"):  # compiled: refused as well
        nn.parallel.DistributedDataParallel(torch.compile(_Whole(), backend="eager"))(x, y)

    class Eval(nn.Module):  # a dense eval forward (its gradient is dense) and a lookup, under DDP with grad on
        def __init__(self):
            super().__init__()
            self.head = LSHLinear(IN, 40, active=8, sparse_grad=True)

        def forward(self, x):
            self.head.active_set(x)
            return self.head.eval()(x)

    trains(nn.parallel.DistributedDataParallel(Eval()), x)
    frozen = _Whole()
    frozen.head.requires_grad_(False)  # a frozen head gets no gradient: nothing to refuse
    trains(nn.parallel.DistributedDataParallel(frozen), x, y)
    sharded = nn.Sequential(nn.Linear(IN, HIDDEN), ShardedLSHLinear(HIDDEN, 40, sparse_grad=False))
    with pytest.raises(RuntimeError, match="copied rank 0's rows over every other rank's"):  # dense gradients too
        nn.parallel.DistributedDataParallel(sharded)(x)
    wrapped = data_parallel(_Whole())  # the sparse parameters left out of DDP: the same forward trains
    wrapped(x, y).backward()
    all_reduce_sparse_grads(wrapped.module)
    kept = nn.Sequential(nn.Linear(IN, HIDDEN), ShardedLSHLinear(HIDDEN, 40))
    assert data_parallel(kept)(x).shape == (4, 40)
    return wrapped.module.head.weight.grad.is_sparse


def test_plain_ddp_refuses_a_sparse_gradient_head_at_the_forward(tmp_path):
    """Its backward failed with "Cannot access storage of SparseTensorImpl"."""
    assert _spawn(_plain_ddp_run, tmp_path) == [True, True]


def _shard_outside_the_wrapper_run(rank):
    """A shard under a wrapper that manages it, called outside the wrapper's forward (``head.forward_sparse(model(x),
    y)``, where no DDP forward runs): what each wrapper gives."""
    from torch.distributed.fsdp import fully_shard
    x, y = (_local(t, rank, [4, 4]) for t in _batch(0, 8, 12))
    said = {}
    linear = nn.Linear(HIDDEN, 12)
    with torch.no_grad():
        linear.weight[[0, 6]] = 0  # each rank's first row zero (padding rows), the rest distinct
    for wrapper in ("ddp", "fsdp2", "data_parallel", "zeros", "zero first rows"):
        torch.manual_seed(0)
        net = _Net(lambda: ShardedLSHLinear(HIDDEN, 12, active=1.0, tail=0))
        if wrapper == "zeros":  # every rank's rows alike, legitimately: not a copy
            nn.init.zeros_(net.head.weight)
        if wrapper == "zero first rows":  # equal first rows were taken for a copy (a review's run)
            net.head = ShardedLSHLinear.from_linear(linear, active=1.0, tail=0)
        model = {"ddp": nn.parallel.DistributedDataParallel, "fsdp2": fully_shard}.get(wrapper, data_parallel)(net)
        try:
            sparse_cross_entropy(net.head.forward_sparse(model(x), y), y).backward()
            said[wrapper] = None
        except RuntimeError as error:
            said[wrapper] = str(error)
    return said


def test_a_shard_copied_over_by_a_wrapper_is_refused_where_it_is_called_outside_it(tmp_path):
    """A plain DDP's wrapping copied rank 0's rows over rank 1's, and fully_shard without ignored_params re-split
    them: with the layer called outside the wrapper's forward, it trained the wrong rows silently (a review's run)."""
    for said in _spawn(_shard_outside_the_wrapper_run, tmp_path):
        for wrapper in ("ddp", "fsdp2"):
            assert "rank 1 holds rank 0's rows" in said[wrapper] and "unmanaged_parameters" in said[wrapper]
        assert said["data_parallel"] is None and said["zeros"] is None and said["zero first rows"] is None


@pytest.mark.parametrize("wrapper,optimizer", [("ddp", "sgd"), ("fsdp2", "sgd"), ("fsdp2", "lazyadam")])
def test_data_parallel_sparse_head_stays_identical(tmp_path, wrapper, optimizer):
    """LSH active sets (16 of 64 neurons, different per rank): the ranks stay bit-identical and
    only touched rows travel."""
    ranks = _spawn(_data_parallel_run, tmp_path, wrapper, 64, 16, 4, optimizer)
    # Rank 1's weights were replaced by rank 0's: its index is rebuilt; rank 0's, unchanged, is kept.
    assert [rank["index_rebuilt"] for rank in ranks] == ([False, True] if wrapper == "ddp" else [None, None])
    before = _single_process_run(64, 0)
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
        assert not torch.equal(value, before[key]), f"{key} was not trained"
    dense_bytes = 64 * (HIDDEN + 1) * 4
    for sent in ranks[0]["sent"]:  # weight and bias rows: at most 16 + 4 labels... of 64
        assert 0 < sent < dense_bytes


@pytest.mark.parametrize("wrapper,optimizer", [("ddp", "sgd"), ("fsdp2", "sgd"), ("fsdp2", "lazyadam")])
def test_data_parallel_equals_single_process_on_the_global_batch(tmp_path, wrapper, optimizer):
    """Every neuron active (nothing random): the average of the ranks' gradients is the gradient
    of the global batch's mean loss, so training matches one process on the global batch."""
    ranks = _spawn(_data_parallel_run, tmp_path, wrapper, 12, 12, 5, optimizer)
    reference = _single_process_run(12, 5, optimizer)
    for key, value in reference.items():
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key


# ---------------------------------------------------------------------------------------------
# Vocabulary parallel

OUT = 13  # uneven shards: 7 and 6 rows
SIZES = [5, 3]  # uneven local batches


def _full_linear(out_features=OUT):
    torch.manual_seed(3)
    return nn.Linear(HIDDEN, out_features)


def _sharded_data():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(sum(SIZES), HIDDEN, generator=gen)
    # Several labels per row (M differs by rank), padding, a row of rank 0 without any label.
    labels = [torch.tensor([[0, 12], [7, -1], [-1, -100], [6, 7], [12, 3]]), torch.tensor([[1], [9], [12]])]
    return x, labels


def _soft_targets(labels):
    target = torch.zeros(labels.shape[0], OUT)
    for row, row_labels in enumerate(labels.tolist()):
        valid = [label for label in row_labels if label >= 0]
        target[row, valid] = 1.0 / len(valid) if valid else 0.0
    return target


def _reference_grads(loss_of_rank):
    """Reference for the convention: the loss of rank q is ``loss_of_rank(q, logits)``; weight and
    bias gradients are those of the mean over ranks, the input's those of its own rank's loss."""
    lin = _full_linear()
    x, _ = _sharded_data()
    xs = [_local(x, r, SIZES).clone().requires_grad_() for r in range(WORLD)]
    losses = [loss_of_rank(r, F.linear(xs[r], lin.weight, lin.bias)) for r in range(WORLD)]
    (sum(losses) / WORLD).backward()
    return ([loss.detach() for loss in losses], [WORLD * x.grad for x in xs], lin.weight.grad, lin.bias.grad)


def _soft_loss(rank, logits, label_smoothing=0.0):
    target = _soft_targets(_sharded_data()[1][rank])
    labelled = target.sum(1) > 0
    return F.cross_entropy(logits[labelled], target[labelled], label_smoothing=label_smoothing)


def _sharded_loss_run(rank, mode, sparse_grad, label_smoothing):
    layer = ShardedLSHLinear.from_linear(_full_linear(), active=1.0, tail=0, mode=mode, sparse_grad=sparse_grad)
    x, labels = _sharded_data()
    x = _local(x, rank, SIZES).clone().requires_grad_()
    out = layer.forward_sparse(x, labels[rank])
    loss = sparse_cross_entropy(out, labels[rank], label_smoothing=label_smoothing)
    loss.backward()
    dense = lambda g: g.to_dense() if g.is_sparse else g
    refused = None  # a gradient penalty's create_graph=True: refused, not incomplete
    try:
        torch.autograd.grad(sparse_cross_entropy(layer.forward_sparse(x, labels[rank]), labels[rank]), x,
                            create_graph=True)
    except RuntimeError as error:
        refused = str(error)
    return {"loss": loss.detach(), "x_grad": x.grad, "weight_grad": dense(layer.weight.grad),
            "bias_grad": dense(layer.bias.grad), "rows": (layer.start, layer.end), "indices": out.indices,
            "refused": refused}


@pytest.mark.parametrize("mode,sparse_grad,label_smoothing", [("shared", False, 0.0), ("per_row", True, 0.25)])
def test_sharded_loss_and_gradients_equal_the_full_softmax(tmp_path, mode, sparse_grad, label_smoothing):
    ranks = _spawn(_sharded_loss_run, tmp_path, mode, sparse_grad, label_smoothing)
    losses, x_grads, weight_grad, bias_grad = _reference_grads(lambda r, z: _soft_loss(r, z, label_smoothing))
    assert [r["rows"] for r in ranks] == [(0, 7), (7, 13)]
    for rank, result in enumerate(ranks):
        start, end = result["rows"]
        assert result["indices"].min() >= start and result["indices"].max() < end  # global ids of its own rows
        torch.testing.assert_close(result["loss"], losses[rank])
        torch.testing.assert_close(result["x_grad"], x_grads[rank])
        torch.testing.assert_close(result["weight_grad"], weight_grad[start:end])
        torch.testing.assert_close(result["bias_grad"], bias_grad[start:end])
        assert "second-order gradients" in result["refused"]


PROPOSAL_COUNTS = torch.arange(60, dtype=torch.float64) ** 3  # counts per output of the 60-wide layer


def _sharded_tail_run(rank, proposal):
    layer = ShardedLSHLinear.from_linear(_full_linear(60), active=24, tail=6, mode="shared",
                                         tail_proposal=PROPOSAL_COUNTS if proposal else None)
    x, labels = _sharded_data()
    out = layer.forward_sparse(_local(x, rank, SIZES), labels[rank])
    assert vouched(out.indices) and vouched(out.log_weights)  # the global ids too: the loss does not sort them again
    return {"out": tuple(out[:3]), "loss": sparse_cross_entropy(out, labels[rank], "none"),
            "smoothed": sparse_cross_entropy(out, labels[rank], "none", label_smoothing=0.3),
            "counts": layer.shard.tail_proposal, "rows": (layer.start, layer.end)}


@pytest.mark.parametrize("proposal", [False, True], ids=["uniform tail", "proposal tail"])
def test_sharded_smoothed_loss_with_tails_is_the_loss_of_the_shards_joined(tmp_path, proposal):
    # Each shard's tail stands for its own rest: joined into one active set (the shards' log_weights
    # kept), the single-process loss is each rank's, with and without label smoothing. With a proposal each
    # shard draws from its own rows' counts.
    ranks = _spawn(_sharded_tail_run, tmp_path, proposal)
    values, indices, log_weights = (torch.cat(parts, -1) for parts in zip(*(r["out"] for r in ranks)))
    assert (log_weights != 0).sum() == 12  # both shards drew a corrected tail
    for r in ranks:
        assert (r["counts"] is None) if not proposal else torch.equal(r["counts"], PROPOSAL_COUNTS[slice(*r["rows"])])
    labels = torch.cat([F.pad(rows, (0, 2 - rows.shape[1]), value=-1) for rows in _sharded_data()[1]])
    joined = SparseOutput(values, indices, log_weights)
    for key, smoothing in (("loss", 0.0), ("smoothed", 0.3)):
        want = sparse_cross_entropy(joined, labels, "none", label_smoothing=smoothing)
        torch.testing.assert_close(torch.cat([r[key] for r in ranks]), want)


def _sharded_dense_run(rank):
    layer = ShardedLSHLinear.from_linear(_full_linear(), active=4, rebuild=1)
    x, labels = _sharded_data()
    x = _local(x, rank, SIZES).clone().requires_grad_()
    exact = layer.topk(x, 5, exact=True)
    approximate = layer.topk(x, 6, budget=4)  # the tables' candidates: at most 4 per shard
    numpy_args = layer.topk(x, np.int64(6), budget=np.int64(4))  # was the default budget, silently
    tensor_k = layer.topk(x, torch.tensor(6), budget=4)  # torch.topk's 0-dim k
    unchecked = layer.topk(x, 6, budget=4, min_recall=0)  # each shard's index alone, not its first inputs' exact top k
    none = layer.topk(x, 0)  # torch.topk's k=0
    # Each rank's own seen ids (global, of both shards; its widths differ by rank, padded with -1 and -100).
    seen = labels[rank]
    exact_unseen = layer.topk(x, 5, exact=True, exclude=seen)
    unseen = layer.topk(x, 4, budget=4, exclude=seen)  # approximate: each shard searches 4 + 2 candidates
    # A k past the shards' default 768 candidates together: their default grows to 4k (it was refused).
    wide = ShardedLSHLinear.from_linear(_full_linear(4000)).topk(x.detach(), 2000)
    out = layer(x)
    loss = F.cross_entropy(out, labels[rank][:, 0], ignore_index=-1)
    loss.backward()
    named = all(isinstance(t, torch.return_types.topk) for t in (exact, approximate, none))
    exact, approximate, numpy_args, tensor_k, unchecked = (tuple(t) for t in (exact, approximate, numpy_args, tensor_k,
                                                                               unchecked))
    return {"exact": exact, "approximate": approximate, "numpy_args": numpy_args, "tensor_k": tensor_k,
            "unchecked": unchecked, "exact_unseen": tuple(exact_unseen), "unseen": tuple(unseen),
            "named": named, "none": tuple(none.indices.shape), "wide": tuple(wide),
            "out": out.detach(), "loss": loss.detach(),
            "x_grad": x.grad, "weight_grad": layer.weight.grad, "bias_grad": layer.bias.grad,
            "rows": (layer.start, layer.end)}


def test_sharded_topk_and_exact_forward(tmp_path):
    ranks = _spawn(_sharded_dense_run, tmp_path)
    lin = _full_linear()
    x, labels = _sharded_data()
    first = lambda rank, logits: F.cross_entropy(logits, labels[rank][:, 0], ignore_index=-1)
    losses, x_grads, weight_grad, bias_grad = _reference_grads(first)
    for rank, result in enumerate(ranks):
        logits = F.linear(_local(x, rank, SIZES), lin.weight, lin.bias).detach()
        torch.testing.assert_close(result["out"], logits)
        values, indices = logits.topk(5, dim=1)
        assert result["named"] and result["none"] == (SIZES[rank], 0)
        wide = F.linear(_local(x, rank, SIZES), *_full_linear(4000).parameters()).topk(2000)
        torch.testing.assert_close(result["wide"][0], wide.values)
        torch.testing.assert_close(result["exact"][0], values)
        assert torch.equal(result["exact"][1], indices)
        approx_values, approx_indices = result["approximate"]
        assert all(torch.equal(a, b) for a, b in zip(result["numpy_args"], result["approximate"]))
        assert all(torch.equal(a, b) for a, b in zip(result["tensor_k"], result["approximate"]))
        assert approx_indices.shape == (SIZES[rank], 6)
        torch.testing.assert_close(approx_values, logits.gather(1, approx_indices))  # true scores, global ids
        assert (approx_values[:, :-1] >= approx_values[:, 1:]).all()
        # These few inputs are the shards' checked ones: each answered its exact top 4, at least its index's.
        unchecked_values, unchecked_indices = result["unchecked"]
        torch.testing.assert_close(unchecked_values, logits.gather(1, unchecked_indices))
        assert (approx_values >= unchecked_values - 1e-6).all()  # (exact and index scores: other summation orders)
        # exclude: the best of what each row has not seen, by global ids, whichever shard holds them.
        seen = labels[rank].masked_fill(labels[rank] < 0, OUT)
        masked = torch.cat([logits, logits[:, :1]], 1).scatter(1, seen, -math.inf)[:, :OUT]
        want = masked.topk(5, dim=1)
        torch.testing.assert_close(result["exact_unseen"][0], want.values)
        assert torch.equal(result["exact_unseen"][1], want.indices)
        unseen_values, unseen_indices = result["unseen"]
        assert not (unseen_indices.unsqueeze(2) == labels[rank].unsqueeze(1)).any()
        torch.testing.assert_close(unseen_values, logits.gather(1, unseen_indices))
        assert (unseen_values[:, :-1] >= unseen_values[:, 1:]).all()
        start, end = result["rows"]
        torch.testing.assert_close(result["loss"], losses[rank])
        torch.testing.assert_close(result["x_grad"], x_grads[rank])
        torch.testing.assert_close(result["weight_grad"], weight_grad[start:end])
        torch.testing.assert_close(result["bias_grad"], bias_grad[start:end])


def _sharded_training_run(rank, steps):
    linear = _full_linear()
    torch.manual_seed(0)
    net = _Net(lambda: ShardedLSHLinear.from_linear(linear, active=1.0, tail=0, sparse_grad=True))
    model = data_parallel(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for step in range(steps):
        x, y = _batch(step, 8, OUT)
        x, y = _local(x, rank, [4, 4]), _local(y, rank, [4, 4])
        loss = sparse_cross_entropy(net.head.forward_sparse(model(x), y), y)
        opt.zero_grad()
        loss.backward()
        all_reduce_sparse_grads(net)  # nothing to do: the sharded head is not replicated
        opt.step()
    return {"trunk": {k: v.clone() for k, v in net.trunk.state_dict().items()}, "head": net.head.full_state_dict()}


def test_sharded_training_equals_single_process(tmp_path):
    steps = 20
    ranks = _spawn(_sharded_training_run, tmp_path, steps)
    linear = _full_linear()
    torch.manual_seed(0)
    net = _Net(lambda: linear)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for step in range(steps):
        x, y = _batch(step, 8, OUT)
        loss = F.cross_entropy(net.head(net(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for key, value in net.trunk.state_dict().items():
        torch.testing.assert_close(ranks[0]["trunk"][key], value, rtol=1e-5, atol=1e-5, msg=key)
        assert torch.equal(ranks[0]["trunk"][key], ranks[1]["trunk"][key])
    for key, value in net.head.state_dict().items():
        torch.testing.assert_close(ranks[0]["head"][key], value, rtol=1e-5, atol=1e-5, msg=key)
        assert not torch.equal(ranks[0]["head"][key], _full_linear().state_dict()[key])


def _checkpoint_run(rank):
    with pytest.raises(ValueError, match="out_features"):
        ShardedLSHLinear(HIDDEN, 1)  # fewer rows than ranks
    # Ranks that build different layers: another out_features left rows to no rank (silently), another
    # in_features or dtype aborted the process inside gloo.
    agree = "in_features, out_features, bias, dtype .* and the active budget must be the same on every rank"
    for differing in (dict(out_features=OUT + rank), dict(in_features=HIDDEN + rank), dict(bias=rank == 0),
                      dict(dtype=torch.float64 if rank else torch.float32), dict(active=4 + rank)):
        with pytest.raises(ValueError, match=agree):
            ShardedLSHLinear(**{"in_features": HIDDEN, "out_features": OUT, **differing})
    torch.manual_seed(0)  # seeded alike: the shards must still differ
    layer = ShardedLSHLinear(HIDDEN, OUT)
    with pytest.raises(ValueError, match="labels"):
        layer.forward_sparse(torch.randn(2, HIDDEN), torch.tensor([0, OUT]))
    # A bad argument on one rank only raises on both (it used to leave the other in a collective).
    with pytest.raises(ValueError, match="labels must be in" if rank == 1 else "rank 1 .* invalid argument"):
        layer.forward_sparse(torch.randn(2, HIDDEN), torch.tensor([0, OUT if rank == 1 else 1]))
    with pytest.raises((TypeError, ValueError), match="input" if rank == 0 else "rank 0 .* invalid argument"):
        layer.topk(torch.randn(2, HIDDEN + (rank == 0)), 2, exact=True)
    with pytest.raises(ValueError, match="k, exact, budget, probes and min_recall must be the same on every rank"):
        layer.topk(torch.randn(2, HIDDEN), 2, exact=rank == 0)  # mixed exact and approximate shards
    with pytest.raises(ValueError, match=r"exclude must be given to topk on every rank or on none, got exclude by "
                                         r"ranks \[1\] only"):
        layer.topk(torch.randn(2, HIDDEN), 2, exclude=torch.tensor([3, 4]) if rank else None)
    with pytest.raises(ValueError, match="exclude must be in" if rank == 1 else "rank 1 .* invalid argument"):
        layer.topk(torch.randn(2, HIDDEN), 2, exclude=torch.tensor([0, OUT if rank == 1 else 1]))
    # Ranks calling different methods: one was told its labels were missing, the other failed in a later collective.
    with pytest.raises(ValueError, match="called different methods of ShardedLSHLinear .rank 0 forward_sparse, "
                                         "rank 1 topk."):
        layer.forward_sparse(torch.randn(2, HIDDEN), torch.tensor([0, 1])) if rank == 0 else layer.topk(
            torch.randn(2, HIDDEN), 2)
    # The sharded loss, a shard's failed lookup and the sparse-gradient all-reduce stop every rank too,
    # and what the ranks must agree on is checked.
    y = torch.tensor([0, 1])
    out = layer.forward_sparse(torch.randn(2, HIDDEN), y)
    with pytest.raises(ValueError, match="label_smoothing must be between" if rank == 1 else "rank 1 .* raised"):
        sparse_cross_entropy(out, y, label_smoothing=1.5 if rank == 1 else 0.0)
    with pytest.raises(ValueError, match="label_smoothing, reduction and ignore_index must be the same on every rank"):
        sparse_cross_entropy(out, y, label_smoothing=0.1 * rank)
    # Labels given to forward_sparse on rank 0 only: the loss refused rank 1's, named by a global row ("row 3").
    wide = ShardedLSHLinear(HIDDEN, 400, active=8, mode="per_row")
    with pytest.raises(ValueError, match=r"labels must be given to forward_sparse on every rank or on none, got "
                                         r"labels by ranks \[0\] only"):
        wide.forward_sparse(torch.randn(2, HIDDEN), y if rank == 0 else None)
    unforced = wide.forward_sparse(torch.randn(2, HIDDEN), y)
    with pytest.raises(ValueError, match=r"label 30\d of rank 1's row [01]\)"):  # its own row
        sparse_cross_entropy(unforced, torch.tensor([300, 301]) if rank else y)
    # Hand-built log-weights are checked (a NaN on one rank stops both) and detached, as the unsharded loss's.
    weights = unforced.log_weights.masked_fill(unforced.log_weights > 0, math.nan if rank else 1.0)
    with pytest.raises(ValueError, match="log_weights must not be NaN" if rank == 1 else "rank 1 .* raised"):
        sparse_cross_entropy(unforced._replace(log_weights=weights), y)
    weights = unforced.log_weights.clone().requires_grad_()
    sparse_cross_entropy(unforced._replace(log_weights=weights), y).backward()
    assert weights.grad is None and (unforced.log_weights > 0).any()
    narrow = ShardedLSHLinear(HIDDEN, OUT, active=2, mode="shared")  # shard 0 (rows 0-6) has a budget of 2
    # 13 outputs with active left to "auto": every output, as one LSHLinear of that width (exact_softmax)
    assert layer.shard.exact_softmax and out.log_weights is None and layer.budgets == layer.widths
    assert not narrow.shard.exact_softmax
    # Labels past a shard's budget grow its set (LSHLinear._set_size), each shard its own.
    grown = narrow.forward_sparse(torch.randn(2, HIDDEN), torch.tensor([[0, 1], [2, 3]]))
    assert grown.indices.shape[-1] == (5 if rank == 0 else 2)  # shard 0: its 4 labels and a tail of 1
    broken = ShardedLSHLinear(HIDDEN, OUT, active=2, mode="shared")
    if rank == 0:  # a weight that cannot be hashed fails shard 0's first lookup, and stops both ranks
        with torch.no_grad():
            broken.shard.weight[0, 0] = math.nan
    with pytest.raises((RuntimeError, ValueError), match="non-finite" if rank == 0 else "rank 0 .* raised"):
        broken.forward_sparse(torch.randn(2, HIDDEN), torch.tensor([[0, 1], [2, 3]]))
    replica = LSHLinear(HIDDEN, 40 + 8 * rank, active=4, sparse_grad=True)  # not the same layer on both ranks
    sparse_cross_entropy(replica.forward_sparse(torch.randn(2, HIDDEN), y), y).backward()
    with pytest.raises(ValueError, match="replicated sparse parameters .* must be the same on every rank"):
        all_reduce_sparse_grads(replica)
    frozen = LSHLinear(HIDDEN, 40, active=4, sparse_grad=True).requires_grad_(rank == 0)  # none on rank 1
    with pytest.raises(ValueError, match="replicated sparse parameters .* must be the same on every rank"):
        all_reduce_sparse_grads(frozen)
    with pytest.raises(ValueError, match="labels must have shape" if rank == 1 else "rank 1 .* raised"):
        sparse_cross_entropy(out, y if rank == 0 else torch.tensor([0, 1, 2]))  # labels' shape: after the check
    uneven = ShardedLSHLinear(HIDDEN, 363)  # shards of 182 and 181 rows: topk tables of 5 and 4 bits
    with pytest.raises(ValueError, match="probes must be in" if rank == 1 else "rank 1 .* raised"):
        uneven.topk(torch.randn(2, HIDDEN), 2, probes=20, budget=100)  # within rank 0's limit, not rank 1's
    full = layer.full_state_dict()
    with pytest.raises(ValueError, match=r"state_dict\['weight'\]"):
        layer.load_full_state_dict({"weight": full["weight"][:-1], "bias": full["bias"]})
    alone = dist.new_group([0])  # collective: every rank creates it
    result = {"full": full, "keys": sorted(layer.state_dict())}
    if rank == 0:
        one = ShardedLSHLinear(HIDDEN, OUT, process_group=alone)
        one.load_full_state_dict(full)
        x = torch.randn(3, HIDDEN)
        result["one"] = {"full": one.full_state_dict(), "x": x, "out": one(x).detach()}
    two = ShardedLSHLinear(HIDDEN, OUT)
    two.load_full_state_dict(full)
    result["two"] = two.full_state_dict()
    return result


def test_full_state_dict_round_trip_onto_world_size_1_and_2(tmp_path):
    ranks = _spawn(_checkpoint_run, tmp_path)
    full = ranks[0]["full"]
    assert full["weight"].shape == (OUT, HIDDEN) and full["bias"].shape == (OUT,)
    assert ranks[0]["keys"] == ["shard.bias", "shard.weight"]
    for key in full:
        assert torch.equal(ranks[1]["full"][key], full[key])
        assert torch.equal(ranks[0]["one"]["full"][key], full[key])
        assert torch.equal(ranks[0]["two"][key], full[key])
    assert not torch.equal(full["weight"][:6], full["weight"][7:])  # ranks seeded alike drew different rows
    linear = nn.Linear(HIDDEN, OUT)
    linear.load_state_dict(full)  # nn.Linear-compatible
    torch.testing.assert_close(ranks[0]["one"]["out"], linear(ranks[0]["one"]["x"]).detach())


def _shard_copies_run(rank):
    """A shard's gradient hook (divide by the world size) lived on its parameter objects: copies and
    reassigned parameters lost it (gradients 2x at world size 2). Construction consumed the global RNG
    by the shard's width (uneven widths: ranks seeded alike then built different trunks), an option
    refused for one shard's width raised on that rank only (the others hung), the meta device failed,
    and rank 0's state_dict loaded on rank 1 copied its rows there silently."""
    import copy
    import io

    def grad(layer, x, y):
        layer.zero_grad()
        sparse_cross_entropy(layer.forward_sparse(x, y), y).backward()
        return layer.weight.grad.to_dense().clone()

    torch.manual_seed(3)
    linear = nn.Linear(HIDDEN, 13)
    layer = ShardedLSHLinear.from_linear(linear)
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(4, HIDDEN, generator=gen), torch.randint(13, (4,), generator=gen)
    assigned = ShardedLSHLinear(HIDDEN, 13)
    assigned.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()}, assign=True)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(layer), assigned, torch.load(buffer, weights_only=False)]
    torch.manual_seed(0)
    ShardedLSHLinear(HIDDEN, 13)  # rows 7 and 6
    after = torch.rand(3)
    try:
        ShardedLSHLinear(HIDDEN, 13, active=0.5, tail=4)  # rank 1's budget is 3
        refused = None
    except ValueError as error:
        refused = str(error)
    meta = ShardedLSHLinear(HIDDEN, 13, device="meta")
    even = ShardedLSHLinear(HIDDEN, 14)  # 7 rows each: rank 0's state_dict fits rank 1's shapes
    saved = [even.state_dict()]
    dist.broadcast_object_list(saved, src=0)
    try:
        even.load_state_dict(saved[0])
        other_rows = None
    except RuntimeError as error:
        other_rows = str(error)
    return {"grads": [grad(layer, x, y)] + [grad(c, x, y) for c in copies], "after": after, "refused": refused,
            "meta": meta.weight.is_meta, "other_rows": other_rows}


def test_sharded_layer_copies_keep_their_gradient_and_construction_agrees(tmp_path):
    ranks = _spawn(_shard_copies_run, tmp_path)
    for result in ranks:
        for copied in result["grads"][1:]:
            assert torch.equal(copied, result["grads"][0])
        assert result["meta"]
    assert torch.equal(ranks[0]["after"], ranks[1]["after"])
    assert "tail must be in [0, active budget=3], got 4" in ranks[1]["refused"]
    assert "rank 1 of the process group raised an error" in ranks[0]["refused"]
    assert ranks[0]["other_rows"] is None
    assert "holds rows [0, 7) of 14 (another rank's shard, or a shard of a run over another number of ranks), this rank owns [7, 14)" in ranks[1]["other_rows"]


def _clip_run(rank, wrapper):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from lsh_torch.distributed import clip_grad_norm_
    torch.manual_seed(0)
    net = _Net(lambda: ShardedLSHLinear(HIDDEN, 13, active=1.0, tail=0, sparse_grad=True))
    model = data_parallel(net) if wrapper == "ddp" else fully_shard(net, ignored_params=unmanaged_parameters(net))
    x, y = _batch(0, 8, 13)
    x, y = _local(x, rank, [4, 4]), _local(y, rank, [4, 4])
    sparse_cross_entropy(net.head.forward_sparse(model(x), y), y).backward()
    grads = {name: p.grad.clone() for name, p in net.named_parameters()}

    def whole(g):  # an FSDP2 shard's gradient gathered
        return g.full_tensor() if isinstance(g, DTensor) else g.to_dense()

    result = {"before": {name: whole(g) for name, g in grads.items()}}
    for norm_type in (2.0, 1.0, math.inf):
        for name, p in net.named_parameters():
            p.grad = grads[name].clone()
        total = clip_grad_norm_(net, 0.1, norm_type=norm_type)
        result[norm_type] = {"total": total, "after": {name: whole(p.grad).clone() for name, p in net.named_parameters()}}
    first = next(net.parameters())
    first.grad = first.grad * math.inf
    try:
        clip_grad_norm_(net, 0.1, error_if_nonfinite=True)
    except RuntimeError as error:
        result["nonfinite"] = str(error)
    return result


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_clip_grad_norm_counts_every_shard_once_and_keeps_the_replicas_equal(tmp_path, wrapper):
    """clip_grad_norm_ on one rank sees its shard only: the ranks clipped the trunk by different factors
    (norms 0.538 and 0.688 in a review's run) and its replicas drifted apart. Under FSDP2 (the trunk's
    gradients DTensor shards) it raised: a DTensor part made the total one, which plain gradients refuse."""
    ranks = _spawn(_clip_run, tmp_path, wrapper)
    trunk = [name for name in ranks[0]["before"] if name.startswith("trunk")]
    shards = [name for name in ranks[0]["before"] if name.startswith("head")]
    everything = torch.cat([ranks[0]["before"][n].flatten() for n in trunk]
                           + [r["before"][n].flatten() for r in ranks for n in shards])
    for norm_type in (2.0, 1.0, math.inf):
        expected = torch.linalg.vector_norm(everything, norm_type)
        for r in ranks:
            torch.testing.assert_close(r[norm_type]["total"], expected)
            for name in trunk + shards:
                torch.testing.assert_close(r[norm_type]["after"][name],
                                           r["before"][name] * min(1.0, 0.1 / (float(expected) + 1e-6)))
        for name in trunk:
            assert torch.equal(ranks[0][norm_type]["after"][name], ranks[1][norm_type]["after"][name])
        assert float(expected) > 0.1  # it clipped
    assert all("non-finite" in r["nonfinite"] for r in ranks)


def _clip_empty_local_shard_run(rank):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from lsh_torch import clip_grad_norm_
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))  # the last bias: 1 row, 2 ranks
    fully_shard(net)
    net(torch.randn(4, IN)).square().sum().backward()
    whole = [p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for p in net.parameters()]
    return {"whole": whole, **{norm_type: clip_grad_norm_(net.parameters(), math.inf, norm_type)
                               for norm_type in (2.0, math.inf)}}


def test_clip_grad_norm_of_an_fsdp2_parameter_with_an_empty_local_shard(tmp_path):
    """The largest |g| of a rank's empty shard raised there and left the other rank waiting in the reduction
    (torch's clip_grad_norm_ does the same)."""
    for r in _spawn(_clip_empty_local_shard_run, tmp_path):
        everything = torch.cat([g.flatten() for g in r["whole"]])
        for norm_type in (2.0, math.inf):
            torch.testing.assert_close(r[norm_type], torch.linalg.vector_norm(everything, norm_type))


def test_shard_range_covers_every_row_once():
    for out_features, world in [(13, 2), (10, 4), (5, 5)]:
        ranges = [shard_range(out_features, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == out_features
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1


def test_shard_range_checks_its_arguments():
    for args, error in (((10, 5, 2), ValueError), ((10, -1, 2), ValueError), ((10, 0.5, 2), TypeError),
                        ((-10, 0, 3), ValueError), ((10, 0, 0), ValueError)):
        with pytest.raises(error):
            shard_range(*args)


def test_distributed_helpers_need_an_initialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedLSHLinear(HIDDEN, OUT)
    with pytest.raises(RuntimeError, match="init_process_group"):
        all_reduce_sparse_grads(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="init_process_group"):
        data_parallel(nn.Linear(2, 2))


def test_unmanaged_parameters_are_the_sparse_gradient_ones():
    dense_head, sparse_head = LSHLinear(HIDDEN, 10), LSHLinear(HIDDEN, 10, sparse_grad=True)
    embedding = nn.EmbeddingBag(5, IN, sparse=True)
    model = nn.ModuleList([embedding, _Net(lambda: dense_head), _Net(lambda: sparse_head)])
    ids = {id(p) for p in unmanaged_parameters(model)}
    assert ids == {id(embedding.weight), id(sparse_head.weight), id(sparse_head.bias)}
