"""LazyAdam and its op lazy_adam_: reference, SparseAdam equivalence, opcheck, errors."""
import copy

import pytest
import torch

import reference as ref
import lsh_torch
from lsh_torch import LazyAdam, LSHLinear, ops, sparse_cross_entropy


def state(dtype=torch.float32):
    param, m, v = torch.randn(30, 4, dtype=dtype), torch.randn(30, 4, dtype=dtype), torch.rand(30, 4, dtype=dtype)
    return param, m, v, torch.tensor([0, 3, 7, 29]), torch.randn(4, 4, dtype=dtype)


@pytest.mark.parametrize("eps", [1e-8, 1e-2])  # (a large eps tells sqrt(v) + eps from sqrt(v + eps))
@pytest.mark.parametrize("decay", [0.0, 0.05])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lazy_adam_op_matches_reference(dtype, decay, eps):
    param, m, v, rows, grad = state(dtype)
    expected = [t.clone() for t in (param, m, v)]
    ref.lazy_adam_(*expected, rows, grad, 0.01, 0.9, 0.999, eps, decay)
    ops.lazy_adam_(param, m, v, rows, grad, 0.01, 0.9, 0.999, eps, decay)
    torch.testing.assert_close((param, m, v), tuple(expected))


def test_lazy_adam_touches_only_given_rows():
    param, m, v, rows, grad = state()
    before = [t.clone() for t in (param, m, v)]
    ops.lazy_adam_(param, m, v, rows, grad, 0.01, 0.9, 0.999, 1e-8)
    untouched = torch.ones(30, dtype=torch.bool)
    untouched[rows] = False
    for now, then in zip((param, m, v), before):
        assert torch.equal(now[untouched], then[untouched]) and not torch.equal(now[rows], then[rows])


def test_lazy_adam_opcheck():
    torch.library.opcheck(torch.ops.lsh_torch.lazy_adam_, (*state(), 0.01, 0.9, 0.999, 1e-8))
    torch.library.opcheck(torch.ops.lsh_torch.lazy_adam_, (*state(), 0.01, 0.9, 0.999, 1e-8, 0.01))


@pytest.mark.parametrize("mode", ["shared", "per_row"])  # per row: rows sorted already (no sort in LazyAdam)
def test_lazy_adam_equals_sparse_adam_on_an_lsh_layer(mode):
    layers = [LSHLinear(16, 300, active=32, mode=mode, sparse_grad=True, seed=3) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    opts = [torch.optim.SparseAdam(layers[0].parameters(), lr=0.01), LazyAdam(layers[1].parameters(), lr=0.01)]
    for _ in range(4):
        x, labels = torch.randn(8, 16), torch.randint(0, 300, (8,))
        for layer, opt in zip(layers, opts):
            opt.zero_grad()
            sparse_cross_entropy(layer.forward_sparse(x, labels), labels).backward()
            opt.step()
    torch.testing.assert_close(layers[0].weight, layers[1].weight)
    torch.testing.assert_close(layers[0].bias, layers[1].bias)


def test_lazy_adam_errors():
    param, m, v, rows, grad = state()
    with pytest.raises(RuntimeError, match="row"):
        ops.lazy_adam_(param, m, v, torch.tensor([30]), grad[:1], 0.01, 0.9, 0.999, 1e-8)
    with pytest.raises(RuntimeError, match="strictly increasing"):
        ops.lazy_adam_(param, m, v, torch.tensor([3, 3, 7, 9]), grad, 0.01, 0.9, 0.999, 1e-8)
    with pytest.raises(RuntimeError, match="grad_rows"):
        ops.lazy_adam_(param, m, v, rows, grad[:2], 0.01, 0.9, 0.999, 1e-8)
    with pytest.raises(RuntimeError, match="shape"):
        ops.lazy_adam_(param, m[:3], v, rows, grad, 0.01, 0.9, 0.999, 1e-8)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.lazy_adam_(param, m.double(), v, rows, grad, 0.01, 0.9, 0.999, 1e-8)
    for lr in (-1, float("inf")):  # inf was blamed on the weight decay (inf * 0 is nan)
        with pytest.raises(ValueError, match="Invalid learning rate"):
            LazyAdam([torch.nn.Parameter(param)], lr=lr)
    later = LazyAdam([torch.nn.Parameter(param)], lr=0.1)
    later.param_groups[0]["lr"] = float("nan")  # set after construction, as schedulers do
    later.param_groups[0]["params"][0].grad = torch.ones_like(param)
    with pytest.raises(ValueError, match="Invalid learning rate: nan"):
        later.step()
    for decay in (-0.1, 1.5, float("nan")):
        with pytest.raises(RuntimeError, match=r"decay \(lr \* weight_decay\) must be in \[0, 1\]"):
            ops.lazy_adam_(param, m, v, rows, grad, 0.01, 0.9, 0.999, 1e-8, decay)
    for weight_decay in (-0.1, float("inf"), float("nan"), 20.0):  # 20: lr * weight_decay = 2 > 1
        with pytest.raises(ValueError, match="weight_decay"):
            LazyAdam([torch.nn.Parameter(param)], lr=0.1, weight_decay=weight_decay)


def test_lazy_adam_op_bumps_versions_and_refuses_leaves_in_grad_mode():
    """The op itself (not only the Python wrapper) bumps the versions, as PyTorch's in-place ops do:
    called through torch.ops, or compiled with backend="eager", a backward through the old values ran
    and returned gradients of the new ones, silently."""
    param, m, v, rows, grad = state()
    weight = param.clone().requires_grad_()
    loss = (weight * weight).sum()
    with pytest.raises(RuntimeError, match="requires grad, and has no derivative"):
        torch.ops.lsh_torch.lazy_adam_(weight, m, v, rows, grad, 0.01, 0.9, 0.999, 1e-8)
    with torch.no_grad():
        torch.ops.lsh_torch.lazy_adam_(weight, m, v, rows, grad, 0.01, 0.9, 0.999, 1e-8)
    assert (weight._version, m._version, v._version) == (1, 1, 1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with pytest.raises(RuntimeError, match="requires grad, and has no derivative"):  # a view of a leaf: the leaf
        torch.ops.lsh_torch.lazy_adam_(weight[:], m, v, rows, grad, 0.01, 0.9, 0.999, 1e-8)
    with torch.inference_mode():
        inference_m = m.clone()
    ops.lazy_adam_(param, inference_m, v, rows, grad, 0.01, 0.9, 0.999, 1e-8)  # a version to bump but m's
    compiled = torch.compile(ops.lazy_adam_, backend="eager")
    compiled(param, m, v, rows, grad, 0.01, 0.9, 0.999, 1e-8)
    assert param._version == 2


def test_lazy_adam_reads_strided_and_expanded_gradients():
    """Memory overlap is "too hard to tell" for a non-dense tensor, which was refused as sharing memory."""
    param, m, v, rows, _ = state()
    grad = torch.randn(1, 4).expand(4, 4)
    expected = [t.clone() for t in (param, m, v)]
    ref.lazy_adam_(*expected, rows, grad.contiguous(), 0.01, 0.9, 0.999, 1e-8)
    ops.lazy_adam_(param, m, v, torch.tensor([0, 0, 3, 3, 7, 7, 29, 29])[::2], grad, 0.01, 0.9, 0.999, 1e-8)
    torch.testing.assert_close((param, m, v), tuple(expected))
    with pytest.raises(RuntimeError, match="grad_rows must not share memory"):
        ops.lazy_adam_(param, m, v, torch.arange(4), param[:4], 0.01, 0.9, 0.999, 1e-8)


def test_a_step_refused_for_its_weight_decay_updates_nothing():
    """Every group's decay is checked before any update: no parameter half-stepped, no step counted."""
    first, second = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(2, 3))
    opt = LazyAdam([{"params": [first]}, {"params": [second]}], lr=0.1, weight_decay=1.0)
    first.grad, second.grad = torch.ones_like(first), torch.ones_like(second)
    opt.step()
    before = [first.detach().clone(), second.detach().clone(), {k: v["step"] for k, v in opt.state.items()}]
    opt.param_groups[1]["weight_decay"] = 20.0  # set after construction: lr * weight_decay = 2
    with pytest.raises(ValueError, match=r"lr \* weight_decay <= 1"):
        opt.step()
    assert torch.equal(first, before[0]) and torch.equal(second, before[1])
    assert {k: v["step"] for k, v in opt.state.items()} == before[2]


@pytest.mark.parametrize("sparse", [False, True])
def test_a_gradient_whose_square_overflows_keeps_the_moments_finite_as_adams_do(sparse):
    """g^2 past float32's range (|g| > 1.8e19) made SparseAdam's v inf, then NaN (inf - inf): the weights went NaN
    where torch's Adam, scaling the product first, stays finite, its v inf past 5.8e20 and NaN never (a user review)."""
    params = [torch.nn.Parameter(torch.zeros(4, 3)) for _ in range(2)]
    opts = [LazyAdam([params[0]], lr=0.01), torch.optim.Adam([params[1]], lr=0.01)]
    for value in (1.9e19, 1e25, 2.0):
        grad = torch.full((4, 3), value)
        for p, opt in zip(params, opts):
            p.grad = grad.to_sparse(1) if sparse and opt is opts[0] else grad.clone()
            opt.step()
        moments = [opt.state[p]["exp_avg_sq"] for p, opt in zip(params, opts)]
        assert torch.equal(moments[0].isfinite(), moments[1].isfinite())  # (inf at 1e25, as Adam's)
        torch.testing.assert_close(params[0], params[1], rtol=1e-5, atol=1e-6)
    param, state = torch.zeros(2, 3), [torch.zeros(2, 3) for _ in range(2)]
    expected = [t.clone() for t in (param, *state)]
    rows, grad = torch.tensor([0, 1]), torch.tensor([[3e19, 1.0, -2e20], [0.5, 1e-30, 4.0]])
    ops.lazy_adam_(param, *state, rows, grad, 0.01, 0.9, 0.999, 1e-8)
    ref.lazy_adam_(*expected, rows, grad, 0.01, 0.9, 0.999, 1e-8)
    for got, want in zip((param, *state), expected):
        torch.testing.assert_close(got, want)


def test_lazy_adam_arithmetic_is_sparse_adams():
    """1 - beta2 was computed after rounding beta2 to float32: 1.3e-5 relative off SparseAdam's."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(50, 8)) for _ in range(2)]
    params[1].data.copy_(params[0].data)
    opts = [torch.optim.SparseAdam([params[0]], lr=0.01, betas=(0.9, 0.999)),
            LazyAdam([params[1]], lr=0.01, betas=(0.9, 0.999))]
    for _ in range(20):
        rows = torch.randperm(50)[:12].sort().values
        grad = torch.sparse_coo_tensor(rows[None], torch.randn(12, 8), (50, 8), check_invariants=True)
        for p, opt in zip(params, opts):
            p.grad = grad.clone()
            opt.step()
    for key in ("exp_avg", "exp_avg_sq"):  # bit for bit
        assert torch.equal(opts[0].state[params[0]][key], opts[1].state[params[1]][key])
    torch.testing.assert_close(params[0], params[1], rtol=1e-6, atol=1e-7)  # a few ulp: dense vs sparse adds


def test_lazy_adam_refuses_what_it_used_to_accept_silently():
    param, m, v, rows, grad = state()
    wide = torch.zeros(30, 2, 2)
    cases = [
        (lambda: ops.lazy_adam_(param, m, v, rows, grad, float("nan"), 0.9, 0.999, 1e-8), "step_size must be finite"),
        (lambda: ops.lazy_adam_(param, m, v, rows, grad, float("inf"), 0.9, 0.999, 1e-8), "step_size must be finite"),
        (lambda: ops.lazy_adam_(param, param, v, rows, grad, 0.01, 0.9, 0.999, 1e-8), "must not share memory"),
        # A gradient that is a view of param: row 3's gradient would be read after row 0's update wrote it.
        (lambda: ops.lazy_adam_(param, m, v, rows, param[:4], 0.01, 0.9, 0.999, 1e-8),
         "grad_rows must not share memory with param"),
        (lambda: ops.lazy_adam_(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0), rows[:0], torch.zeros(0),
                                0.01, 0.9, 0.999, 1e-8), "at least one dimension"),
        (lambda: ops.lazy_adam_(param, m, v, rows, grad, 0.01, 1.5, 0.999, 1e-8), "beta1 must be in \\[0, 1\\), got 1.5"),
        (lambda: ops.lazy_adam_(wide, wide.clone(), wide.clone(), rows, torch.zeros(4, 4, 1), 0.01, 0.9, 0.999, 1e-8),
         "grad_rows must be"),
    ]
    for fn, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            fn()


@pytest.mark.parametrize("options,error,pattern", [
    (dict(maximize="no"), TypeError, "maximize must be a bool, got 'no'"),  # truthy: it ascended
    (dict(lr="0.1"), TypeError, "lr must be a float"),
    (dict(betas=(0.9,)), TypeError, "betas must be a pair of floats"),
    (dict(betas="ab"), TypeError, "betas must be a pair of floats"),
    (dict(eps=float("inf")), ValueError, "Invalid epsilon value: inf"),  # every step a no-op
    (dict(weight_decay=None), TypeError, "weight_decay must be a float"),
])
def test_lazy_adam_refuses_hyperparameters_of_the_wrong_type(options, error, pattern):
    param = torch.nn.Parameter(torch.randn(5, 3))
    with pytest.raises(error, match=pattern):
        LazyAdam([param], **options)
    optimizer = LazyAdam([param])  # set after construction: refused by the step, which changes nothing
    optimizer.param_groups[0].update(options)
    param.grad, before = torch.randn(5, 3), param.detach().clone()
    with pytest.raises(error, match=pattern):
        optimizer.step()
    assert torch.equal(param, before)


def test_a_tensor_lr_steps_as_the_float_and_follows_a_scheduler():
    """torch's Adam takes lr=torch.tensor(...) (compiled optimizers keep it so); LazyAdam refused it with a TypeError.
    A scheduler fills a tensor lr in place: each step reads its value then."""
    torch.manual_seed(0)
    start, grads = torch.randn(6, 4), [torch.randn(6, 4) for _ in range(3)]
    params = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    tensor_lr = torch.tensor(0.1, dtype=torch.float64)  # (float64: the same 0.1 as the float)
    opts = [LazyAdam([params[0]], lr=0.1, weight_decay=0.01), LazyAdam([params[1]], lr=tensor_lr, weight_decay=0.01)]
    schedules = [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) for opt in opts]
    for grad in grads:
        for param, opt, schedule in zip(params, opts, schedules):
            param.grad = grad.clone()
            opt.step()
            schedule.step()
    assert torch.equal(params[0], params[1]) and isinstance(opts[1].param_groups[0]["lr"], torch.Tensor)
    with pytest.raises(TypeError, match="lr must be a float or a one-element float tensor"):
        LazyAdam([params[0]], lr=torch.tensor([0.1, 0.2]))


def test_maximize_ascends_as_sparse_adam_and_adam_do():
    """LazyAdam, "a drop-in for SparseAdam", refused SparseAdam's maximize= with a TypeError."""
    torch.manual_seed(0)
    start = torch.randn(50, 8)
    sparse = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    dense = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    opts = [(torch.optim.SparseAdam([sparse[0]], lr=0.01, maximize=True), LazyAdam([sparse[1]], lr=0.01, maximize=True)),
            (torch.optim.Adam([dense[0]], lr=0.01, maximize=True), LazyAdam([dense[1]], lr=0.01, maximize=True))]
    for _ in range(5):
        rows = torch.randperm(50)[:12].sort().values
        grad = torch.sparse_coo_tensor(rows[None], torch.randn(12, 8), (50, 8))
        for (theirs, ours), params, g in zip(opts, (sparse, dense), (grad, grad.to_dense())):
            for p, opt in zip(params, (theirs, ours)):
                p.grad = g.clone()
                opt.step()
    torch.testing.assert_close(sparse[1], sparse[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dense[1], dense[0])
    assert not torch.equal(sparse[1], start)


def test_dense_gradients_take_adams_step_on_every_row():
    # A transposed view and a channels_last conv weight too: updated through contiguous copies.
    params = [torch.nn.Parameter(torch.randn(30, 4)), torch.nn.Parameter(torch.randn(5)),
              torch.nn.Parameter(torch.tensor(2.0)), torch.nn.Parameter(torch.randn(4, 6).t()),
              torch.nn.Parameter(torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last))]
    assert not params[3].is_contiguous() and not params[4].is_contiguous()
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours, adam = LazyAdam(params, lr=0.01, eps=1e-6), torch.optim.Adam(twins, lr=0.01, eps=1e-6)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for ps, opt in ((params, ours), (twins, adam)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    torch.testing.assert_close(params, twins)


def test_a_state_loaded_from_adam_steps_on_in_float64_as_adam_does():
    """Adam's state holds step as a float32 tensor: loaded, its powers of the betas were float32, and float64
    parameters drifted from Adam's by 6e-7 over 20 steps (1e-16 from a LazyAdam state)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(30, 4, dtype=torch.float64))
    twin = torch.nn.Parameter(p.detach().clone())
    adam = torch.optim.Adam([twin], lr=0.01)
    twin.grad = torch.randn_like(twin)
    adam.step()
    with torch.no_grad():
        p.copy_(twin)
    ours = LazyAdam([p], lr=0.01)
    ours.load_state_dict(copy.deepcopy(adam.state_dict()))  # (not sharing the moments with adam)
    for _ in range(20):
        g = torch.randn_like(p)
        p.grad, twin.grad = g.clone(), g.clone()
        ours.step()
        adam.step()
    torch.testing.assert_close(p, twin, rtol=0, atol=1e-14)


@pytest.mark.parametrize("flags, match", [(dict(amsgrad=True), "amsgrad=True"),
                                          (dict(weight_decay=0.1), "L2 weight_decay")])
def test_an_adam_state_whose_update_lazyadam_does_not_do_is_refused(flags, match):
    """Loaded, amsgrad was ignored and Adam's L2 decay applied as AdamW's (2e-4 and 4e-2 from Adam's parameters
    after 3 steps, silently)."""
    p = torch.nn.Parameter(torch.randn(30, 4))
    adam = torch.optim.Adam([p], lr=0.01, **flags)
    p.grad = torch.randn_like(p)
    adam.step()
    ours = LazyAdam([p], lr=0.01)
    ours.load_state_dict(copy.deepcopy(adam.state_dict()))
    with pytest.raises(ValueError, match=match):
        ours.step()


@pytest.mark.parametrize("mode", ["per_row", "shared"])
def test_head_tied_to_a_dense_embedding_trains_like_adam(mode):
    """The head's sparse gradient plus the embedding's dense one make a dense gradient."""
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(300, 16)
            self.head = LSHLinear(16, 300, active=32, mode=mode, sparse_grad=True, seed=3)
            self.head.weight = self.embedding.weight

        def forward(self, tokens, labels):
            return sparse_cross_entropy(self.head.forward_sparse(self.embedding(tokens), labels), labels)

    model = Tied()
    twin = Tied()
    twin.load_state_dict(model.state_dict())
    initial = model.embedding.weight.detach().clone()
    ours = LazyAdam(model.parameters(), lr=0.01, eps=1e-6)
    reference = [torch.optim.Adam([twin.embedding.weight], lr=0.01, eps=1e-6),
                 torch.optim.SparseAdam([twin.head.bias], lr=0.01, eps=1e-6)]
    for _ in range(4):
        tokens, labels = torch.randint(0, 300, (8,)), torch.randint(0, 300, (8,))
        model(tokens, labels).backward()
        twin(tokens, labels).backward()
        assert not model.head.weight.grad.is_sparse and model.head.bias.grad.is_sparse
        for opt in (ours, *reference):
            opt.step()
            opt.zero_grad()
    assert not torch.equal(model.embedding.weight, initial)
    torch.testing.assert_close(model.state_dict(), twin.state_dict())


def test_weight_decay_on_dense_gradients_is_adamws_with_its_parameter_groups():
    params = [torch.nn.Parameter(torch.randn(30, 4)), torch.nn.Parameter(torch.tensor(2.0)),  # a 0-dim one too
              torch.nn.Parameter(torch.randn(5))]
    twins, plain = ([torch.nn.Parameter(p.detach().clone()) for p in params] for _ in range(2))
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}]  # noqa: E731
    ours = LazyAdam(groups(params), lr=0.01, eps=1e-6, weight_decay=0.5)
    adamw = torch.optim.AdamW(groups(twins), lr=0.01, eps=1e-6, weight_decay=0.5)
    undecayed = LazyAdam(plain, lr=0.01, eps=1e-6)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for ps, opt in ((params, ours), (twins, adamw), (plain, undecayed)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    torch.testing.assert_close(params, twins)
    # the decay is what made them agree: without it the decayed group differs, the other does not
    assert not torch.allclose(params[0], plain[0]) and not torch.allclose(params[1], plain[1])
    assert torch.equal(params[2], plain[2])


def test_weight_decay_on_sparse_gradients_decays_the_touched_rows_only():
    layer = LSHLinear(16, 300, active=32, mode="shared", sparse_grad=True, seed=3)
    x, labels = torch.randn(8, 16), torch.randint(0, 300, (8,))
    sparse_cross_entropy(layer.forward_sparse(x, labels), labels).backward()
    grad = layer.weight.grad.coalesce()
    rows, before = grad.indices()[0], layer.weight.detach().clone()
    lr, weight_decay = 0.01, 0.3

    def reference_step(decay):  # the first step from zero moments
        state = [before.clone(), torch.zeros_like(before), torch.zeros_like(before)]
        ref.lazy_adam_(*state, rows, grad.values(), lr * (1 - 0.999) ** 0.5 / (1 - 0.9), 0.9, 0.999, 1e-8, decay)
        return state[0]

    LazyAdam(layer.parameters(), lr=lr, weight_decay=weight_decay).step()
    torch.testing.assert_close(layer.weight.detach(), reference_step(lr * weight_decay))
    untouched = torch.ones(300, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(layer.weight.detach()[untouched], before[untouched])
    # the decay is in the step: the same step without it leaves the touched rows elsewhere
    assert not torch.allclose(layer.weight.detach()[rows], reference_step(0.0)[rows])


def test_a_state_saved_before_weight_decay_loads_without_it():
    param = torch.nn.Parameter(torch.randn(6, 3))
    opt = LazyAdam([param], lr=0.01)
    saved = opt.state_dict()
    del saved["param_groups"][0]["weight_decay"]
    fresh = LazyAdam([param], lr=0.01)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["weight_decay"] == 0.0
    param.grad = torch.ones_like(param)
    fresh.step()
    # unpickled (``__setstate__`` with the old defaults): a group added later gets no decay too
    state = dict(fresh.__getstate__())
    state["defaults"] = {k: v for k, v in state["defaults"].items() if k != "weight_decay"}
    for group in state["param_groups"]:
        group.pop("weight_decay")
    old = LazyAdam.__new__(LazyAdam)
    old.__setstate__(state)
    other = torch.nn.Parameter(torch.randn(2))
    old.add_param_group({"params": [other]})
    other.grad = torch.ones_like(other)
    old.step()
    assert [g["weight_decay"] for g in old.param_groups] == [0.0, 0.0]



def test_sorted_rows_skip_the_sort_and_anything_else_is_coalesced():
    # autograd stores a parameter's sparse .grad without its coalesced flag; rows that already ascend
    # are taken as they are, rows out of order or repeated are summed and sorted as coalesce() does.
    from lsh_torch.optim import _coalesced
    values = torch.randn(4, 3)
    for rows, expect_same in (([1, 4, 5, 9], True), ([4, 1, 5, 9], False), ([1, 4, 4, 9], False), ([7], True)):
        index = torch.tensor([rows])
        grad = torch.sparse_coo_tensor(index, values[: len(rows)], (10, 3))
        got = _coalesced(grad)
        assert got.is_coalesced()
        torch.testing.assert_close(got.to_dense(), grad.to_dense())
        assert torch.equal(got._indices(), grad.coalesce()._indices())
        assert (got._values().data_ptr() == grad._values().data_ptr()) == expect_same  # no copy when sorted


@pytest.mark.parametrize("mode", ["shared", "per_row"])
def test_the_layers_sparse_gradients_ascend_so_the_optimizer_sorts_nothing(mode):
    """A shared set's rows come in the query's order: its gradient was coalesced (sorted) at every step (on a
    GPU, two host syncs more; 3-4% of a 670K CPU step). Its backward now sorts the set's few rows itself."""
    from lsh_torch.optim import _coalesced
    layer = LSHLinear(16, 9000, active=64, mode=mode, sparse_grad=True)
    x, y = torch.randn(8, 16), torch.randint(0, 9000, (8,))
    out = layer.forward_sparse(x, y)
    sparse_cross_entropy(out, y).backward()
    for param in (layer.weight, layer.bias):
        rows = param.grad._indices()[0]
        assert (rows[1:] > rows[:-1]).all()
        assert _coalesced(param.grad)._values().data_ptr() == param.grad._values().data_ptr()
    dense = LSHLinear(16, 9000, active=64, mode=mode).requires_grad_(False)
    dense.load_state_dict(layer.state_dict())
    weight = dense.weight.clone().requires_grad_()
    logits = x @ weight[out.indices].transpose(-1, -2) if mode == "shared" else \
        torch.einsum("bd,bad->ba", x, weight[out.indices])
    logits = logits + dense.bias[out.indices]
    sparse_cross_entropy(out._replace(values=logits), y).backward()
    torch.testing.assert_close(layer.weight.grad.to_dense(), weight.grad)


def test_a_learning_rate_scheduled_down_to_zero_steps_as_sparse_adam_does():
    """A schedule may reach lr=0 (a warm-up's first step, cosine annealing's end): the step moves no
    weight and still updates the moments, as SparseAdam's and Adam's do."""
    start = torch.randn(6, 3)
    params = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    opts = [torch.optim.SparseAdam([params[0]], lr=0.1), LazyAdam([params[1]], lr=0.1)]
    schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2) for opt in opts]
    for step in range(4):  # lr 0.1, 0.05, 0, 0.05
        grad = torch.sparse_coo_tensor(torch.tensor([[1, 4]]), torch.randn(2, 3), (6, 3))
        before = params[1].detach().clone()
        for p, opt, schedule in zip(params, opts, schedules):
            p.grad = grad.clone()
            opt.step()
            schedule.step()
        torch.testing.assert_close(params[1], params[0])
        assert torch.equal(params[1], before) == (step == 2)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opts[1].state[params[1]][key], opts[0].state[params[0]][key])


def test_a_step_refused_for_any_reason_changes_nothing():
    """Everything the update could refuse is checked before the first parameter moves: an element-sparse
    gradient (SparseAdam's, whose entries LazyAdam's whole-row update would not match), a gradient of
    another dtype, betas or eps set after construction, a loaded moment of another shape."""
    def fresh():
        first, second = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4, 3))
        opt = LazyAdam([first], lr=0.1)
        opt.add_param_group({"params": [second]})
        for p in (first, second):
            p.grad = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.ones(2, 3), (4, 3))
        opt.step()  # states exist, step 1
        for p in (first, second):
            p.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 3), (4, 3))
        return opt, first, second

    def element_sparse(opt, second):
        second.grad = torch.sparse_coo_tensor(torch.tensor([[1, 2], [0, 2]]), torch.ones(2), (4, 3))

    def other_dtype(opt, second):
        second.grad_dtype = None  # torch lets a gradient of another dtype in
        second.grad = second.grad.double()

    def betas(opt, second):
        opt.param_groups[1]["betas"] = (0.9, 1.0)

    def eps(opt, second):
        opt.param_groups[1]["eps"] = -1.0

    def moment_shape(opt, second):
        opt.state[second]["exp_avg"] = torch.zeros(5, 3)

    for spoil, error, match in ((element_sparse, ValueError, "sparse in 2 dimensions.*SparseAdam"),
                                (other_dtype, TypeError, r"param_groups\[1\]\['params'\]\[0\] must be floating point"),
                                (betas, ValueError, "beta"), (eps, ValueError, "epsilon"),
                                (moment_shape, ValueError, "exp_avg")):
        opt, first, second = fresh()
        spoil(opt, second)
        before = first.detach().clone(), second.detach().clone()
        with pytest.raises(error, match=match):
            opt.step()
        assert torch.equal(first, before[0]) and torch.equal(second, before[1]), spoil.__name__
        assert [opt.state[p]["step"] for p in (first, second)] == [1, 1], spoil.__name__


def test_a_compiled_training_step_with_the_optimizer_inside_matches_eager():
    """torch.compile over forward_sparse + loss + backward + LazyAdam.step: the step runs eagerly (a
    graph break), the training is eager's."""
    losses = []
    for compiled in (False, True):
        torch.manual_seed(0)
        head = LSHLinear(16, 9000, sparse_grad=True, seed=0)
        opt = LazyAdam(head.parameters(), lr=1e-2)

        def train_step(x, y):
            loss = sparse_cross_entropy(head.forward_sparse(x, y), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss
        step = torch.compile(train_step, backend="eager") if compiled else train_step
        gen = torch.Generator().manual_seed(1)
        losses.append([step(torch.randn(8, 16, generator=gen), torch.randint(0, 9000, (8,), generator=gen)).item()
                       for _ in range(3)])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_a_model_cast_after_a_step_is_named_with_the_way_out():
    """After model.double() the moments stay float32: the message spoke of a 'loaded' state only."""
    layer = LSHLinear(8, 300, active=20, sparse_grad=True)
    opt = LazyAdam(layer.parameters(), lr=1e-2)
    x, y = torch.randn(4, 8), torch.randint(0, 300, (4,))
    sparse_cross_entropy(layer.forward_sparse(x, y), y).backward()
    opt.step()
    layer.double()
    opt.zero_grad()
    sparse_cross_entropy(layer.forward_sparse(x.double(), y), y).backward()
    with pytest.raises(ValueError, match=r"model cast .* opt.load_state_dict\(opt.state_dict\(\)\)"):
        opt.step()
    opt.load_state_dict(opt.state_dict())
    opt.step()
    assert opt.state[layer.weight]["exp_avg"].dtype == torch.float64


@pytest.mark.parametrize("norm_type", [1.0, 2.0, float("inf")])
def test_clip_grad_norm_takes_sparse_gradients_as_their_dense_form(norm_type):
    """torch.nn.utils.clip_grad_norm_ refuses COO gradients ('linalg_vector_norm' on SparseCPU), which
    transformers' Trainer calls at every step: lsh_torch.clip_grad_norm_ gives what torch's gives for the
    same gradients made dense (norm and scaled gradients), sparse ones staying sparse."""
    torch.manual_seed(0)
    layer = LSHLinear(16, 500, active=50, sparse_grad=True)
    embedding = torch.nn.Embedding(100, 16, sparse=True)
    layer(embedding(torch.tensor([4, 4, 8, 8, 1, 1, 1, 9]))).square().sum().backward()  # repeats: coalesced
    params = [*layer.parameters(), *embedding.parameters()]
    dense = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for d, p in zip(dense, params):
        d.grad = p.grad.to_dense()
    expected = torch.nn.utils.clip_grad_norm_(dense, 1.0, norm_type)
    # foreach= as torch's takes it (code written for torch's passes it; it chooses kernels, not results)
    torch.testing.assert_close(lsh_torch.clip_grad_norm_(params, 1.0, norm_type, foreach=True), expected, rtol=1e-5,
                               atol=0)
    assert all(p.grad.is_sparse for p in params)
    for d, p in zip(dense, params):
        torch.testing.assert_close(p.grad.to_dense(), d.grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="max_norm must be a float >= 0"):
        lsh_torch.clip_grad_norm_(params, -1.0)
    with pytest.raises(TypeError, match="foreach must be None or a bool"):
        lsh_torch.clip_grad_norm_(params, 1.0, foreach="yes")


def test_clip_grad_norm_sums_float64_gradients_in_float64_and_zeroes_them_at_max_norm_0():
    """As torch's: a float64 model's norm is float64 (it was summed in float32: 1e-8 off in a review's run), and
    ``max_norm=0`` zeroes the gradients (it was refused)."""
    torch.manual_seed(0)
    layer = LSHLinear(16, 500, active=50, sparse_grad=True, dtype=torch.float64)
    layer(torch.randn(8, 16, dtype=torch.float64) * 1e3).square().sum().backward()
    dense = [torch.nn.Parameter(p.detach().clone()) for p in layer.parameters()]
    for d, p in zip(dense, layer.parameters()):
        d.grad = p.grad.to_dense()
    total = lsh_torch.clip_grad_norm_(layer.parameters(), float("inf"))
    assert total.dtype == torch.float64
    torch.testing.assert_close(total, torch.nn.utils.clip_grad_norm_(dense, float("inf")), rtol=1e-14, atol=0)
    lsh_torch.clip_grad_norm_(layer.parameters(), 0.0)
    assert all(not p.grad.to_dense().any() for p in layer.parameters())


def test_clip_grad_norm_leaves_gradients_below_max_norm_unchanged():
    """As torch's: a total norm below max_norm scales by 1, never up (sparse and dense gradients alike)."""
    torch.manual_seed(0)
    layer = LSHLinear(16, 500, active=50, sparse_grad=True)
    layer(torch.randn(8, 16)).square().sum().backward()
    before = [p.grad.to_dense().clone() for p in layer.parameters()]
    total = lsh_torch.clip_grad_norm_(layer.parameters(), 1e6)
    assert float(total) < 1e6
    for b, p in zip(before, layer.parameters()):
        torch.testing.assert_close(p.grad.to_dense(), b, rtol=0, atol=0)
