"""torch.compile and torch.export of models with LSHLinear.

Compilation is slow on 2 cores, so the models are tiny and most tests use the ``aot_eager``
backend: it runs Dynamo and AOTAutograd (the fake kernels, the registered autograd, the traced
backward) exactly as ``inductor`` does, without generating code; one test per mode (eval,
training) runs the real ``inductor``.
"""
import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import lsh_torch
from lsh_torch import LSHLinear, ops


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graph_breaks():
    return sum(counters["graph_break"].values())


def break_reasons():
    return {reason.splitlines()[0] for reason in counters["graph_break"]}


class Net(nn.Module):
    """A dense layer, an LSHLinear hidden layer and an LSHLinear output layer (with a sparse loss path)."""

    def __init__(self, mode="per_row", hidden_inference="dense", head_inference="lsh", seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(8, 32)
        self.hidden = LSHLinear(32, 64, active=16, rebuild=3, seed=1, mode=mode, inference=hidden_inference)
        self.head = LSHLinear(64, 300, active=30, rebuild=4, seed=2, mode=mode, inference=head_inference)

    def features(self, x):
        return F.relu(self.hidden(F.relu(self.inp(x))))

    def forward(self, x):
        return self.head(self.features(x))

    def loss(self, x, y, sparse, label_smoothing=0.0):
        h = self.features(x)
        if sparse:
            return lsh_torch.sparse_cross_entropy(self.head.forward_sparse(h, y), y, label_smoothing=label_smoothing)
        return F.cross_entropy(self.head(h), y)


def batch(step, rows=16):
    g = torch.Generator().manual_seed(step)
    return torch.randn(rows, 8, generator=g), torch.randint(0, 300, (rows,), generator=g)


def check_eval(backend):
    # hidden: exact dense inference; head: LSH inference. Tables are stale when compiling: the build
    # is traced into the graph on the first call, and the graph without it serves the next calls.
    model = Net(hidden_inference="dense", head_inference="lsh").eval()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    for step in range(3):
        x, _ = batch(step)
        assert torch.equal(compiled(x), reference(x))
    # Built (while traced: their version counters unknown, the next eager lookup builds them again).
    assert model.head.tables._built and not model.head._marked_stale
    assert torch.equal(model.head.tables.items, reference.head.tables.items)
    # New weights and tables (new buffer tensors) are picked up without recompiling the graph.
    with torch.no_grad():
        for m in (model, reference):
            m.head.weight.mul_(-1)
            m.head.rebuild()
    x, _ = batch(5)
    assert torch.equal(compiled(x), reference(x))
    assert graph_breaks() == 0


def test_compile_eval_fullgraph_dense_and_lsh_inference():
    check_eval("aot_eager")
    assert counters["stats"]["unique_graphs"] == 2  # with the table build, then without


def test_compile_eval_fullgraph_inductor():
    check_eval("inductor")


def train(model, steps, sparse, compile_backend=None, label_smoothing=0.0):
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    loss_fn = torch.compile(model.loss, backend=compile_backend) if compile_backend else model.loss
    losses, graphs = [], []
    for step in range(steps):
        loss = loss_fn(*batch(step), sparse=sparse, label_smoothing=label_smoothing)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        graphs.append(counters["stats"]["unique_graphs"])
    return losses, graphs


@pytest.mark.parametrize("mode,sparse,label_smoothing", [("per_row", True, 0.0), ("shared", False, 0.0),
                                                         ("shared", True, 0.1)])
@pytest.mark.filterwarnings("ignore:.*feeds a loss over all outputs")  # sparse=False: forward() + F.cross_entropy, on purpose
def test_compiled_training_equals_eager(mode, sparse, label_smoothing):
    steps = 9  # rebuilds before steps 3 and 6 (hidden) and 4 and 8 (head)
    eager, _ = train(Net(mode), steps, sparse, label_smoothing=label_smoothing)
    model = Net(mode)
    compiled, graphs = train(model, steps, sparse, compile_backend="aot_eager", label_smoothing=label_smoothing)
    assert compiled == eager
    assert model.hidden.step == model.head.step == steps
    # The only graph breaks: LSHLinear's training bookkeeping and lookup (one per layer and step).
    assert break_reasons() == {"Skip inlining `torch.compiler.disable()`d function"}
    assert graphs[1] == graphs[-1]  # compiled in the first step (one graph per piece), no recompiling after


@pytest.mark.parametrize("mode", ["per_row", "shared"])
def test_compiled_training_with_a_proposal_tail_equals_eager(mode):
    """The tail's draws are eager (the lookup); their log-weights are computed in the graph."""
    def net():
        model = Net(mode)
        model.head.tail_proposal = torch.arange(300, dtype=torch.float64) ** 2
        return model
    eager, _ = train(net(), 6, True)
    compiled, graphs = train(net(), 6, True, compile_backend="aot_eager")
    assert compiled == eager
    assert break_reasons() == {"Skip inlining `torch.compiler.disable()`d function"}
    if mode == "per_row":  # (a shared set here grows with the batch's distinct labels: one recompile, dynamic after)
        assert graphs[1] == graphs[-1]


@pytest.mark.parametrize("autocast", [False, True], ids=["", "bf16 autocast"])
@pytest.mark.parametrize("exact", [False, True], ids=["hashed", "exact softmax"])
def test_a_compiled_step_with_sparse_gradients_equals_eager_and_warns_nothing(exact, autocast):
    """Forward, backward and LazyAdam in one compiled function. The backward's COO gradients are eager; traced,
    dynamo warned the user to wrap torch.sparse_coo_tensor in a custom operator. Under autocast the weight's
    cast took the sparse gradient in the compiled backward, which failed (NotImplementedError: empty_strided on
    SparseCPU; a reviewer's)."""
    def run(backend):
        model = Net()
        model.head = LSHLinear(64, 300, seed=2) if exact else model.head  # 300 outputs, active "auto": exact
        assert model.head.exact_softmax == exact
        model.head.sparse_grad = True
        opt = lsh_torch.LazyAdam(model.head.parameters(), lr=1e-2)

        def step(x, y):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model.loss(x, y, sparse=True)
            loss.backward()
            opt.step()
            return loss
        step = torch.compile(step, backend=backend) if backend else step
        return [step(*batch(i)).item() for i in range(5)]

    eager = run(None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if autocast:  # (bfloat16 products and sums, fused otherwise)
            torch.testing.assert_close(run("aot_eager"), eager, rtol=2e-2, atol=0)
        else:
            assert run("aot_eager") == eager
    assert not [w for w in caught if "sparse_coo_tensor" in str(w.message)]


def test_compiled_training_inductor():
    eager, _ = train(Net(), 5, sparse=True)
    compiled, _ = train(Net(), 5, sparse=True, compile_backend="inductor")
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)  # fused float arithmetic may round differently


@pytest.mark.parametrize("prebuilt", [True, False])
def test_export_eval_matches_eager(prebuilt, tmp_path):
    model = Net(hidden_inference="lsh", head_inference="dense").eval()
    x, _ = batch(0, rows=5)
    if prebuilt:
        model.hidden.rebuild()  # the tables become constants of the program, not rebuilt per call
    batch_dim = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch_dim}})
    built = any("build_tables" in str(node.target) for gm in program.graph_module.modules()
                if isinstance(gm, torch.fx.GraphModule) for node in gm.graph.nodes)
    assert built != prebuilt
    path = tmp_path / "net.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    for rows in (5, 3):
        x, _ = batch(rows, rows)
        expected = model(x)
        assert torch.equal(program.module()(x), expected)
        assert torch.equal(loaded(x), expected)


class _SparseEval(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, y=None):
        out = self.layer.forward_sparse(x, y)
        return out.values, out.indices, out.log_weights


def test_export_of_a_shared_forward_sparse_samples_the_rows_eager_does():
    # The rescored shared top set is chosen from a sample of the batch's rows, its size from the batch's
    # (top_set_scores="auto": 1 of 2 or 8 rows here, taken twice, 5 of 40): the batch dimension stays free
    # (no guard that specialises it) and the exported program chooses as eager does at every size.
    torch.manual_seed(0)
    model = _SparseEval(LSHLinear(16, 20_000, active=256, mode="shared", seed=1)).eval()
    program = torch.export.export(model, (torch.randn(8, 16),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch", min=2, max=100_000)}})
    for rows in (2, 8, 40):
        x = torch.randn(rows, 16)
        for got, expected in zip(program.module()(x), model(x)):
            assert torch.equal(got, expected)


class _ValidationLoss(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, y):
        return lsh_torch.sparse_cross_entropy(self.layer.forward_sparse(x, y), y)


@pytest.mark.parametrize("strict", [False, True])
def test_export_with_labels_keeps_the_batch_dynamic(strict):
    """Non-strict export (the default) with labels specialised the batch to the traced one (Size.numel() in the
    loss's reshape, a tuple comparison of the batch with the shared width): a reviewer's validation-loss module."""
    torch.manual_seed(0)
    batch_dim = torch.export.Dim("batch", min=2, max=1024)
    for model, n in ((_SparseEval(LSHLinear(16, 20_000, active=256, mode="per_row", seed=1)).eval(), 20_000),
                     (_ValidationLoss(LSHLinear(16, 300)).eval(), 300)):  # the exact softmax's [300] indices
        program = torch.export.export(model, (torch.randn(8, 16), torch.randint(0, n, (8,))), strict=strict,
                                      dynamic_shapes={"x": {0: batch_dim}, "y": {0: batch_dim}})
        for rows in (2, 5, 300):
            x, y = torch.randn(rows, 16), torch.randint(0, n, (rows,))
            got, expected = program.module()(x, y), model(x, y)
            for a, b in zip(*(t if isinstance(t, tuple) else (t,) for t in (got, expected))):
                assert (a is None and b is None) or torch.equal(a, b)


def test_export_leaves_the_eager_model_as_it_was():
    """Non-strict export (the default) of a model with stale tables left a FakeTensor as their M, a buffer
    that was None (export puts back only those it found): deepcopy and torch.save(model) then failed."""
    model = Net(hidden_inference="lsh", head_inference="lsh").eval()
    x, _ = batch(0, rows=5)
    program = torch.export.export(model, (x,))
    assert all(type(b) is torch.Tensor for b in model.buffers())
    copied = copy.deepcopy(model)
    torch.save(model, io.BytesIO())
    assert torch.equal(program.module()(x), model(x)) and torch.equal(copied(x), model(x))


@pytest.mark.parametrize("sparse", [True, False])
def test_export_of_a_training_forward_says_why_not(sparse):
    """A training lookup advances the step counter and rebuilds on a schedule: an exported graph would
    freeze one step. It failed deep in tracing on a data-dependent size; now it says what to export."""
    model = Net().train()
    x, y = batch(0, rows=5)
    forward = (lambda m, x, y: m.loss(x, y, sparse=True)) if sparse else (lambda m, x, y: m(x))

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x, y):
            return forward(self.net, x, y)

    steps = model.hidden.step
    with pytest.raises(RuntimeError, match=r"torch.export \(or torch.jit.trace\) of a training forward is not supported.*eval\(\) mode"):
        torch.export.export(Wrapped(), (x, y))
    assert model.hidden.step == steps  # refused before the step was counted


def test_a_shared_eval_lookup_with_labels_breaks_the_graph_and_says_why_where_it_cannot():
    """Its top set's size depends on the batch's distinct labels: fullgraph and export failed deep in
    tracing (GuardOnDataDependentSymNode); now they say why, and a plain compile equals eager."""
    layer = LSHLinear(16, 20000, mode="shared", seed=1).eval()
    x, y = torch.randn(8, 16), torch.randint(0, 20000, (8,))
    eager = layer.forward_sparse(x, y)
    compiled = torch.compile(lambda x, y: layer.forward_sparse(x, y), backend="aot_eager")(x, y)
    assert torch.equal(compiled.indices, eager.indices) and torch.equal(compiled.values, eager.values)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="distinct labels in the batch"):
        torch.compile(lambda x, y: layer.forward_sparse(x, y), backend="aot_eager", fullgraph=True)(x, y)

    class Sparse(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x, y):
            return self.layer.forward_sparse(x, y)
    with pytest.raises(RuntimeError, match="distinct labels in the batch"):
        torch.export.export(Sparse(), (x, y))


def test_an_eval_lookup_whose_labels_pass_the_budget_compiles():
    """Labels and tail past the budget grow a set (LSHLinear._set_size). Per row its size is a shape, so a
    dynamic compile follows eager; its warning, formatted from a traced width, crashed the trace. A shared
    set's size is data: in a full graph it keeps the budget, as before the growth (it raised a guard error).
    Rows padded past their labels give the padding to their top sets, compiled as eager."""
    layer = LSHLinear(8, 200, active=16, mode="per_row").eval()
    x, y = torch.randn(4, 8), torch.randperm(200)[:48].reshape(4, 12)  # 12 labels and a tail of 8: 20 outputs
    y[1:, 3:] = -1  # the other rows' top sets hold 9 outputs
    compiled = torch.compile(lambda x, y: layer.forward_sparse(x, y), backend="eager", dynamic=True)(x, y)
    eager = layer.forward_sparse(x, y)
    assert compiled.values.shape == (4, 20) and torch.equal(compiled.indices, eager.indices)
    assert (compiled.log_weights == 0).sum(1).tolist() == [12] * 4  # labels and top set: 12 + 0, 3 + 9
    shared = LSHLinear(8, 200, active=16, mode="shared", rescore=1).eval()
    out = torch.compile(lambda x, y: shared.forward_sparse(x, y), backend="eager", fullgraph=True)(
        x, torch.randint(0, 200, (4, 3)))
    assert out.values.shape == (4, 16)


@pytest.mark.parametrize("strict", [True, False])
def test_exporting_approximate_topk_is_refused_clearly(strict):
    """Non-strict export read a FakeTensor's data pointer ("Cannot access data pointer of Tensor")."""
    layer, x = LSHLinear(16, 2000, seed=3).eval(), torch.randn(4, 16)
    layer.topk(x, 5)  # the index built eagerly

    class Top(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer.topk(x, 5)
    with pytest.raises(Exception, match="cannot be exported" if not strict else "disable"):
        torch.export.export(Top(), (x,), strict=strict)


def test_jit_trace_of_approximate_topk_is_refused_clearly():
    """The trace recorded the first call's index build and check: every traced call re-ran them (856 ms against
    28 ms eagerly, a user review), silently with check_trace=False."""
    class Top(nn.Module):
        def __init__(self, exact):
            super().__init__()
            self.layer, self.exact = LSHLinear(16, 2000, seed=3).eval(), exact

        def forward(self, x):
            return self.layer.topk(x, 5, exact=self.exact).indices
    x = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="cannot be exported or traced"):
        torch.jit.trace(Top(exact=False), (x,), check_trace=False)
    exact = Top(exact=True)
    assert torch.equal(torch.jit.trace(exact, (x,))(x), exact(x))


def test_jit_trace_of_a_training_forward_is_refused():
    """torch.jit.trace froze one step silently: no step counted, one seed, no rebuilds."""
    layer = LSHLinear(16, 200, active=20)
    with pytest.raises(RuntimeError, match=r"torch.jit.trace\) of a training forward is not supported"):
        torch.jit.trace(layer, torch.randn(4, 16))
    assert layer.step == 0
    traced = torch.jit.trace(layer.eval(), torch.randn(4, 16))  # eval: a function of the input and the tables
    x = torch.randn(4, 16)
    assert torch.equal(traced(x), layer(x))


def test_jit_trace_of_what_it_cannot_record_is_refused_clearly():
    """A rescored eval lookup failed inside the query ("budget must be an int, got tensor(512)"), and tables built in
    the traced call failed the trace's own check ("Graphs differed across invocations"): a reviewer's."""
    fresh = LSHLinear(16, 200, active=20, inference="lsh").eval()
    with pytest.raises(RuntimeError, match=r"hash tables are not built for the weight as it is .* Call rebuild\(\)"):
        torch.jit.trace(fresh, torch.randn(4, 16))
    fresh.rebuild()
    x = torch.randn(4, 16)
    assert torch.equal(torch.jit.trace(fresh, torch.randn(4, 16))(x), fresh(x))
    with torch.no_grad():  # a weight written since the build: the eval lookup would re-hash inside the trace
        fresh.weight.mul_(2)
    with pytest.raises(RuntimeError, match="not built for the weight as it is"):
        torch.jit.trace(fresh, torch.randn(4, 16))
    for model in (_SparseEval(LSHLinear(16, 20_000, active=256, seed=1)),
                  LSHLinear(16, 20_000, active=256, tail=64, inference="lsh")):
        model.eval()
        model.apply(lambda m: m.rebuild() if isinstance(m, LSHLinear) else None)
        with pytest.raises(RuntimeError, match="an eval lookup with a tail .* torch.jit.trace cannot record"):
            torch.jit.trace(model, torch.randn(4, 16), check_trace=False)


@pytest.mark.parametrize("exact", [True, False])
def test_topk_with_a_dynamic_k_compiles_once(exact):
    """Argument checks must leave a symbolic int symbolic: converting it (operator.index) pinned k
    and the batch size to their first values, one recompilation per new value."""
    torch._dynamo.reset()
    layer = LSHLinear(16, 256, num_tables=4, bits=4).eval()
    by_k = torch.compile(lambda x, k: layer.topk(x, k, exact=exact)[0], backend="eager", dynamic=True)
    by_rows = torch.compile(lambda x: layer.topk(x, x.shape[0], exact=exact)[0], backend="eager", dynamic=True)
    x = torch.randn(5, 16)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k in (2, 3):
            assert by_k(x, k).shape == (5, k)
        for rows in (3, 4):
            assert by_rows(torch.randn(rows, 16)).shape == (rows, rows)


def test_a_weight_of_another_width_does_not_recompile_the_backward():
    """sparse_linear_grad_weight's row count is a SymInt: as an int it pinned the weight's rows to their first
    count in the backward's graph, one recompilation per width (a weight passed in: functional_call, gathered)."""
    torch._dynamo.reset()

    def loss(x, w, active):
        return ops.sparse_linear(x, w, None, active).square().sum()

    compiled = torch.compile(loss, dynamic=True, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (40, 50, 60):
            x, w, active = torch.randn(4, 5), torch.randn(n, 5, requires_grad=True), torch.randint(0, n, (4, 3))
            compiled(x, w, active).backward()
            got, w.grad = w.grad, None
            loss(x, w, active).backward()
            torch.testing.assert_close(got, w.grad)


@pytest.mark.parametrize("scale", [2.0 ** -90, 2.0 ** 70])
def test_a_compiled_build_of_huge_or_tiny_rows_equals_eager(scale):
    """A traced build summed the norms in float32 alone, while the transform scales such rows: M read 0 (or inf)
    and the build failed in the graph where eager builds (float64 sums there) work."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = LSHLinear(16, 300, active=50, inference="lsh").eval()
    with torch.no_grad():
        layer.weight.mul_(scale)
    x = torch.randn(4, 16)
    eager = layer(x)
    layer._mark_stale()  # the compiled forward builds the tables in its graph
    torch.testing.assert_close(torch.compile(layer, backend="eager", fullgraph=True)(x), eager)


def test_fullgraph_says_why_a_training_forward_or_approximate_topk_breaks_the_graph():
    """dynamo's message said "reason: None" and hinted to remove lsh_torch's own torch.compiler.disable."""
    layer = LSHLinear(32, 20_000, seed=2)
    x, y = torch.randn(8, 32), torch.randint(0, 20_000, (8,))
    for call, why in ((lambda: layer.train().forward_sparse(x, y).values, "LSHLinear's training lookup runs eagerly"),
                      (lambda: layer.eval().topk(x, 5).values, r"LSHLinear.topk\(exact=False\) builds, checks")):
        torch._dynamo.reset()
        with pytest.raises(torch._dynamo.exc.Unsupported, match=why):
            torch.compile(call, fullgraph=True, backend="eager")()


def test_an_autocast_eval_exports_strict_and_compiles_whole():
    """The autocast cast's eager backward (for sparse gradients) applied to every cast: strict export and a
    fullgraph compile of an eval model under autocast failed at it (a review); now only parameters of a
    sparse_grad=True layer take it."""
    layer = LSHLinear(16, 3000, active=128).eval()

    class Autocast(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.layer(x).float()
    x = torch.randn(4, 16)
    program = torch.export.export(Autocast(), (x,), strict=True)
    assert torch.equal(program.module()(x), Autocast()(x))
    torch._dynamo.reset()
    x.requires_grad_()
    torch.compile(Autocast(), fullgraph=True, backend="aot_eager")(x).sum().backward()
    assert x.grad is not None
