"""LSHLinear where PyTorch users train: autocast, pickling, meta-device construction, inference
mode, functional_call (issue 12)."""
import copy
import io
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad

from lsh_torch import LSHLinear, SparseOutput, load_lsh_state, lsh_state, sparse_cross_entropy


def trained_layer(**kwargs):
    """A layer a few steps into training: its tables (built at step 0) no longer match a rebuild
    from its current weights, so a copy that rebuilt would pick other active sets."""
    layer = LSHLinear(16, 200, active=20, rebuild=None, seed=3, **kwargs)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(8, 16)).pow(2).sum().backward()
        opt.step()
    return layer


def same_next_steps(a: LSHLinear, b: LSHLinear, steps=2):
    for _ in range(steps):
        x = torch.randn(6, 16)
        assert torch.equal(a.active_set(x), b.active_set(x))
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy"])
def test_copies_keep_outputs_and_active_sets(how):
    layer = trained_layer()
    model = nn.Sequential(nn.ReLU(), layer)
    if how == "pickle":
        copied = pickle.loads(pickle.dumps(model))
    elif how == "torch.save":
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    else:
        copied = copy.deepcopy(model)
    assert copied[1].step == layer.step and not copied[1]._stale
    same_next_steps(layer, copied[1])
    copied[1].load_state_dict(layer.state_dict())  # the load hook survived the copy
    assert copied[1]._stale


def test_functional_call_tables_do_not_outlive_the_call():
    layer = LSHLinear(16, 200, active=20, seed=3, rebuild=None, inference="lsh").eval()
    twin = copy.deepcopy(layer)
    x = torch.randn(6, 16)
    other = {"weight": torch.randn(200, 16), "bias": torch.zeros(200)}
    substituted = torch.func.functional_call(layer, other, (x,))
    assert not torch.equal(substituted, twin(x))
    assert torch.equal(layer(x), twin(x))  # tables rebuilt from the layer's own weight
    assert torch.equal(layer.active_set(x), twin.active_set(x))


@pytest.mark.parametrize("first", ["topk", "lsh eval"])
def test_tables_built_in_inference_mode_then_trained(first):
    layer = LSHLinear(16, 200, active=20, seed=3, rebuild=1, inference="lsh")
    layers, x = [layer, copy.deepcopy(layer)], torch.randn(6, 16)
    for i, layer in enumerate(layers):
        with torch.inference_mode(i == 0):
            layer.eval()
            layer.topk(x, 3) if first == "topk" else layer(x)
        layer.train()
        for _ in range(3):  # small steps: incremental rebuilds patch the codes in place
            layer(x).pow(2).sum().backward()
            with torch.no_grad():
                layer.weight[:5] *= 0.9
        assert 0 < layer.tables.rehashed < 200
    assert torch.equal(layers[0].tables.codes, layers[1].tables.codes)
    assert torch.equal(layers[0](x), layers[1](x))


def test_meta_device_construction_then_to_empty_and_load_hashes_like_a_normal_layer():
    normal = LSHLinear(16, 200, active=20, seed=3)
    with torch.device("meta"):
        lazy = LSHLinear(16, 200, active=20, seed=3)
    assert lazy.tables.projection.is_meta
    assert lazy.eval()(torch.empty(2, 16, device="meta")).shape == (2, 200)  # shape inference on meta
    lazy.train().to_empty(device="cpu")
    lazy.load_state_dict(normal.state_dict())
    assert torch.equal(lazy.tables.projection, normal.tables.projection)
    assert torch.equal(lazy.tables.fingerprint_vector, normal.tables.fingerprint_vector)
    same_next_steps(normal, lazy)


def test_meta_device_construction_then_load_with_assign_hashes_like_a_normal_layer():
    """load_state_dict(assign=True) after a meta-device construction (accelerate's init_empty_weights,
    transformers' low_cpu_mem_usage) moves the weights, not the non-persistent tables: every training
    or lsh-eval forward failed inside an op ("all tensors must be on one device, ... vector on meta"),
    and after load_lsh_state it hashed inputs with the meta projection (other active sets, silently)."""
    trained = trained_layer()
    fresh = LSHLinear(16, 200, active=20, rebuild=None, seed=3)
    fresh.load_state_dict(trained.state_dict())
    for resume, like in ((False, fresh), (True, trained)):
        with torch.device("meta"):
            lazy = LSHLinear(16, 200, active=20, rebuild=None, seed=3)
        lazy.load_state_dict(trained.state_dict(), assign=True)
        if resume:
            load_lsh_state(lazy, lsh_state(trained))
        same_next_steps(like, lazy)
        assert torch.equal(lazy.tables.projection, like.tables.projection)


def test_a_layer_loaded_with_assign_after_a_meta_construction_moves_like_nn_linear():
    """The recipe's next step, model.to(device), failed: "Cannot copy out of meta tensor" (the tables, left on
    meta until the first forward)."""
    trained = trained_layer()
    with torch.device("meta"):
        lazy = torch.nn.Sequential(torch.nn.Identity(), LSHLinear(16, 200, active=20, rebuild=None, seed=3))
    lazy.load_state_dict({"1." + k: v for k, v in trained.state_dict().items()}, assign=True)
    lazy.to("cpu")
    like = LSHLinear(16, 200, active=20, rebuild=None, seed=3)
    like.load_state_dict(trained.state_dict())
    same_next_steps(like, lazy[1])


def test_to_empty_is_seen_even_where_uninitialised_memory_holds_the_projection(monkeypatch):
    """to_empty() was detected by the projection's values changing: memory that happened to hold them
    (a freed copy; seen once in CI) kept the uninitialised tables, and a lookup failed in an op."""
    torch.manual_seed(0)
    layer, normal = (LSHLinear(16, 200, active=20, seed=3, inference="lsh") for _ in range(2))
    layer(torch.randn(4, 16))  # tables built
    projection, empty_like = layer.tables.projection.clone(), torch.empty_like

    def reused_memory(t, *args, **kwargs):  # the projection's old values where it was, garbage elsewhere
        return projection.clone() if t.shape == projection.shape else empty_like(t, *args, **kwargs).fill_(7)
    monkeypatch.setattr(torch, "empty_like", reused_memory)
    layer.to_empty(device="cpu")
    monkeypatch.setattr(torch, "empty_like", empty_like)
    layer.weight.data.copy_(normal.weight.data)  # as transformers' _init_weights does: no load to mark it stale
    layer.bias.data.copy_(normal.bias.data)
    x = torch.randn(4, 16)
    assert torch.equal(layer.eval()(x), normal.eval()(x))


def test_random_selection_topk_after_a_meta_construction_and_assign_load():
    """topk of a selection="random" layer keyed its rows with the meta projection (CPU times meta gave
    garbage, every row the same key): other answers than a normally built layer's."""
    normal = LSHLinear(16, 2000, seed=3, selection="random").eval()
    with torch.device("meta"):
        lazy = LSHLinear(16, 2000, seed=3, selection="random")
    lazy.load_state_dict(normal.state_dict(), assign=True)
    x = torch.randn(6, 16)
    assert torch.equal(lazy.eval().topk(x, 3).indices, normal.topk(x, 3).indices)


def test_a_process_that_only_unpickles_layers_sees_fused_steps(tmp_path):
    """The step hook was registered when a layer was built: a process that torch.load-ed a model (or a
    spawned worker) left fused steps unseen (topk kept a stale index) and eval could not tell steps from
    other writes."""
    torch.manual_seed(0)
    layer = LSHLinear(16, 2000, active=128, rebuild=None, inference="lsh", asymmetric=False)
    x, y = torch.randn(64, 16), torch.randint(0, 2000, (64,))
    sparse_cross_entropy(layer.forward_sparse(x, y), y).backward()  # tables built
    torch.save((layer, x, y), tmp_path / "layer.pt")
    script = (f"import torch, lsh_torch\n"
              f"layer, x, y = torch.load({str(tmp_path / 'layer.pt')!r}, weights_only=False)\n"
              "layer.eval()(x); layer.train()  # the tables checked against the weight's version\n"
              "opt = torch.optim.Adam(layer.parameters(), lr=0.5, fused=True)\n"
              "lsh_torch.sparse_cross_entropy(layer.forward_sparse(x, y), y).backward()\n"
              "version = layer.weight._version; opt.step()\n"
              "print(layer.weight._version > version, layer._stepped_version == layer._weight_version())\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["True", "True"]  # the fused step was bumped and seen by the layer


@pytest.mark.parametrize("hash", ["srp", "dwta"])
@pytest.mark.parametrize("load", ["load_state_dict", "data"])
def test_to_empty_off_the_meta_device_then_load_hashes_like_a_normal_layer(hash, load):
    """to_empty() re-drew the seeded buffers only from the meta device: elsewhere the projection held
    uninitialised memory (other active sets than a layer of that seed, silently), DWTA's bins failed every
    forward ("bins must hold dimension indices"), and tables built before stayed in use though their
    memory was uninitialised too (weights written through .data, as transformers' _init_weights does)."""
    normal = LSHLinear(16, 200, active=20, seed=3, hash=hash)
    layer = LSHLinear(16, 200, active=20, seed=3, hash=hash)
    layer.active_set(torch.randn(6, 16))  # tables built (no step counted)
    layer.to_empty(device="cpu")
    if load == "data":
        for mine, theirs in zip(layer.parameters(), normal.parameters()):
            mine.data.copy_(theirs)
    else:
        layer.load_state_dict(normal.state_dict())
    assert torch.equal(layer.tables.hash_buffer, normal.tables.hash_buffer)
    same_next_steps(normal, layer)


@pytest.mark.parametrize("hash", ["srp", "dwta"])
def test_casting_the_module_keeps_its_seeded_hashing(hash):
    """module.to(dtype) casts the weights, not the seeded projection, fingerprints or M: a layer cast to
    bfloat16 hashes as one built in bfloat16 from the same seed, and a .half().float() round trip as
    one never cast (a rounded projection picked 2,026 of the same 2,048 neurons)."""
    kwargs = dict(active=64, seed=3, hash=hash, asymmetric=hash == "srp")
    built = LSHLinear(16, 2000, dtype=torch.bfloat16, **kwargs)
    cast = LSHLinear(16, 2000, **kwargs).to(torch.bfloat16)
    cast.load_state_dict(built.state_dict())
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    assert torch.equal(cast.tables.hash_buffer, built.tables.hash_buffer)
    assert torch.equal(cast.active_set(x), built.active_set(x))
    plain = LSHLinear(16, 2000, **kwargs)
    plain.active_set(x.float())  # tables built (fingerprints, M) before the round trip
    twice = copy.deepcopy(plain).half().float()
    for name in ("hash_buffer", "fingerprint_vector", "fingerprints", "max_norm"):
        before, after = getattr(plain.tables, name), getattr(twice.tables, name)
        assert (before is None and after is None) or torch.equal(before, after), name
    twice.load_state_dict(plain.state_dict())  # the weights' rounding undone: the same layer again
    same_next_steps(plain, twice)


def autocast_pair(device, **kwargs):
    layer = LSHLinear(16, 200, active=20, seed=3, device=device, **kwargs)
    linear = nn.Linear(16, 200, device=device)
    linear.load_state_dict(layer.state_dict())
    return layer, linear


LOW = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("mode", ["per_row", "shared"])
def test_autocast_training_like_linear(mode, sparse_grad, low, device):
    layer, linear = autocast_pair(device, mode=mode, sparse_grad=sparse_grad)
    x, labels = torch.randn(6, 16, device=device), torch.randint(0, 200, (6,), device=device)
    with torch.autocast(device, dtype=low):
        expected = linear(x)
        out = layer(x.to(low))  # what an autocast layer before it returns
        sparse = layer.forward_sparse(x, labels)  # float32 input, cast like nn.Linear's
    assert out.dtype == sparse.values.dtype == expected.dtype == low
    mask = out != 0
    torch.testing.assert_close(out[mask], expected[mask])
    gathered = expected[:, sparse.indices] if sparse.indices.dim() == 1 else expected.gather(1, sparse.indices)
    torch.testing.assert_close(sparse.values, gathered)
    (out.float().sum() + sparse_cross_entropy(sparse, labels)).backward()
    ((expected.float() * mask).sum() + sparse_cross_entropy(SparseOutput(gathered, *sparse[1:]), labels)).backward()
    for ours, theirs in ((layer.weight, linear.weight), (layer.bias, linear.bias)):
        assert ours.grad.dtype == torch.float32 and ours.grad.is_sparse == sparse_grad
        torch.testing.assert_close(ours.grad.to_dense(), theirs.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize("inference", ["dense", "lsh"])
def test_autocast_eval_and_topk_like_linear(inference, low, device):
    layer, linear = autocast_pair(device, inference=inference)
    layer.eval()
    x = torch.randn(6, 16, device=device)
    with torch.autocast(device, dtype=low):
        expected = linear(x)
        out = layer(x.to(low))
        values, indices = layer.topk(x, 3)
        exact, _ = layer.topk(x.to(low), 3, exact=True)
    assert out.dtype == values.dtype == exact.dtype == expected.dtype == low
    mask = out != 0
    assert mask.all() == (inference == "dense")
    torch.testing.assert_close(out[mask], expected[mask])
    torch.testing.assert_close(values, expected.gather(1, indices))
    torch.testing.assert_close(exact, expected.topk(3).values)
    with torch.autocast(device, dtype=low):  # float64, like nn.Linear, is left alone
        assert layer.double()(x.double()).dtype == torch.float64


@pytest.mark.parametrize("mode", ["per_row", "shared"])
@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("upstream", ["quadratic", "linear"])
def test_gradient_penalty_matches_linear_on_the_active_set(mode, sparse_grad, upstream):
    """``upstream="linear"``: the first backward's incoming gradient needs no graph (with sparse_grad=True
    its weight-dependent part was once dropped without a word)."""
    layer = LSHLinear(16, 200, active=20, seed=3, mode=mode, sparse_grad=sparse_grad, dtype=torch.float64)
    linear = nn.Linear(16, 200, dtype=torch.float64)
    linear.load_state_dict(layer.state_dict())
    x = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(6, 200, dtype=torch.float64)
    penalties = []
    for module in (layer, linear):
        out = module(x)
        if module is layer:
            mask = out != 0
        loss = (out * mask).pow(2).sum() if upstream == "quadratic" else (out * mask * scale).sum()
        grad_x, = torch.autograd.grad(loss, x, create_graph=True)
        penalties.append(grad_x.pow(2).sum())
        penalties[-1].backward()
    torch.testing.assert_close(penalties[0], penalties[1])
    assert linear.weight.grad.abs().max() > 1
    assert layer.weight.grad.is_sparse == sparse_grad
    torch.testing.assert_close(layer.weight.grad.to_dense(), linear.weight.grad)
    if upstream == "quadratic":  # (a penalty on x's gradient of a linear loss does not depend on the bias)
        assert layer.bias.grad.is_sparse == sparse_grad
        torch.testing.assert_close(layer.bias.grad.to_dense(), linear.bias.grad)
    else:
        assert layer.bias.grad is linear.bias.grad is None


@pytest.mark.parametrize("transform", ["grad", "vmap"])
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_torch_func_on_the_sparse_path_raises_clearly(transform, sparse_grad):
    layer = LSHLinear(16, 200, active=20, sparse_grad=sparse_grad)
    params, x = dict(layer.named_parameters()), torch.randn(6, 16)
    loss = lambda params, x: torch.func.functional_call(layer, params, (x,)).pow(2).sum()  # noqa: E731
    with pytest.raises(RuntimeError, match="does not support torch.func transforms"):
        torch.func.grad(loss)(params, x) if transform == "grad" else torch.func.vmap(layer)(x[:, None])
    with pytest.raises(RuntimeError, match="or forward-mode AD"), forward_ad.dual_level():  # jvp's own message
        layer(forward_ad.make_dual(x, torch.ones_like(x)))                                 # named no layer
    layer.eval()  # dense eval is nn.Linear's computation, which torch.func supports
    linear = nn.Linear(16, 200)
    linear.load_state_dict(layer.state_dict())
    ours = torch.func.grad(loss)(params, x)
    theirs = torch.func.grad(lambda p, x: torch.func.functional_call(linear, p, (x,)).pow(2).sum())(
        dict(linear.named_parameters()), x)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("mode,sparse_grad", [("per_row", False), ("shared", False), ("per_row", True)])
def test_batched_gradients_are_exact_per_row_and_refused_clearly_elsewhere(mode, sparse_grad):
    """torch.autograd.grad(is_grads_batched=True) (jacobian(vectorize=True)) at a layer's first backward failed
    in the loss check's hook ('Batching rule not implemented for aten::detach'); where vmap cannot build the
    weight's gradient (a shared set's in-place rows, COO tensors) it failed deep inside torch, naming nothing."""
    layer = LSHLinear(16, 200, active=20, mode=mode, sparse_grad=sparse_grad, dtype=torch.float64)
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    vectors = torch.randn(4, *out.shape, dtype=torch.float64)
    if mode == "shared" or sparse_grad:
        with pytest.raises(RuntimeError, match="batched gradients .* are not supported"):
            torch.autograd.grad(out, (x, layer.weight), vectors, is_grads_batched=True)
        return
    batched = torch.autograd.grad(out, (x, layer.weight), vectors, is_grads_batched=True, retain_graph=True)
    for vector, *each in zip(vectors, *batched):
        for ours, looped in zip(each, torch.autograd.grad(out, (x, layer.weight), vector, retain_graph=True)):
            torch.testing.assert_close(ours, looped)


def test_a_parametrized_weight_warns_once_at_the_callers_line():
    """weight_norm / parametrize make the weight a new tensor at every access, and the tables are
    rebuilt from every row at every lookup: said once per layer, pointing at the user's call."""
    layer = LSHLinear(8, 9000, seed=0)
    torch.nn.utils.parametrizations.weight_norm(layer)
    x = torch.randn(4, 8)
    with pytest.warns(UserWarning, match="weight is parametrized") as caught:
        layer.forward_sparse(x)
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.forward_sparse(x)  # once per layer
        LSHLinear(8, 9000, seed=0).forward_sparse(x)  # a plain weight: nothing to say


@pytest.mark.parametrize("how", ["prune", "weight_norm"])
def test_a_weight_recomputed_by_a_forward_hook_warns_once(how):
    """torch.nn.utils.prune and the legacy weight_norm compute the weight in a forward pre-hook: a new
    tensor every forward, so every training step re-hashed every row, and unlike parametrize said nothing."""
    from torch.nn.utils import prune

    layer = LSHLinear(16, 200, active=20, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the legacy weight_norm's deprecation
        prune.l1_unstructured(layer, "weight", 0.3) if how == "prune" else nn.utils.weight_norm(layer)
    x = torch.randn(4, 16)
    with pytest.warns(UserWarning, match="weight is parametrized") as caught:
        layer(x)
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # once per layer
        substitute = {"weight": torch.randn(200, 16)}  # functional_call's weight is no hook's
        torch.func.functional_call(LSHLinear(16, 200, active=20), substitute, (x,))


@pytest.mark.parametrize("how", ["prune", "weight_norm"])
def test_forward_sparse_and_topk_recompute_a_weight_that_a_forward_hook_computes(how):
    """forward_sparse and topk do not go through __call__: they read the weight of the last forward (a
    no-grad one after a validation pass), and the head's weight silently stopped training."""
    from torch.nn.utils import prune
    torch.manual_seed(0)
    layer = LSHLinear(16, 200, active=20, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune.l1_unstructured(layer, "weight", 0.3) if how == "prune" else nn.utils.weight_norm(layer)
        x, y = torch.randn(4, 16), torch.tensor([1, 2, 3, 4])
        with torch.no_grad():
            layer.eval()(x)  # a validation pass leaves a weight without grad
        layer.train()
        source = layer.weight_orig if how == "prune" else layer.weight_v
        with torch.no_grad():
            source.mul_(2)  # an optimizer step: the next computation differs
        out = layer.forward_sparse(x, y)
        sparse_cross_entropy(out, y).backward()
    assert source.grad is not None and source.grad.abs().sum() > 0
    rows = out.indices if out.indices.dim() == 1 else out.indices[0]
    torch.testing.assert_close(out.values[..., :len(rows)] if out.indices.dim() == 1 else out.values[0],
                               (x @ layer.weight.t() + layer.bias)[0 if out.indices.dim() > 1 else slice(None), rows])
    with torch.no_grad():
        source.mul_(2)
    values, indices = layer.eval().topk(x, 3, exact=True)
    torch.testing.assert_close(values, (x @ layer.weight.t() + layer.bias).topk(3).values)


@pytest.mark.parametrize("method", ["forward", "forward_sparse", "topk", "active_set"])
def test_a_parametrized_weight_is_computed_once_per_call(method):
    """nn.Linear reads a parametrized weight once per forward; LSHLinear read it 2-6 times (spectral_norm
    runs a power iteration at each computation: outputs and its u then differed from nn.Linear's)."""
    class Counted(nn.Module):
        computations = 0

        def forward(self, w):
            Counted.computations += 1
            return w
    layer = LSHLinear(16, 20000, seed=0)
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", Counted())
    Counted.computations = 0  # (registering computes it once)
    x = torch.randn(4, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        {"forward": lambda: layer(x), "forward_sparse": lambda: layer.forward_sparse(x),
         "topk": lambda: layer.eval().topk(x, 5), "active_set": lambda: layer.active_set(x)}[method]()
    assert Counted.computations == 1


@pytest.mark.parametrize("parametrization", ["weight_norm", "orthogonal", "spectral_norm"])
def test_a_parametrized_weight_gets_a_dense_gradient_with_sparse_grad(parametrization):
    """weight_norm's and orthogonal's backward refused the sparse gradient ("unsupported memory format
    option Contiguous"); a computed weight's gradient is dense, and the parameters' gradients are right."""
    torch.manual_seed(0)
    layer = LSHLinear(16, 300, active=40, sparse_grad=True, seed=0)
    getattr(torch.nn.utils.parametrizations, parametrization)(layer)
    x, y = torch.randn(4, 16), torch.tensor([1, 2, 3, 4])
    leaves = list(layer.parametrizations.weight.parameters())
    with torch.nn.utils.parametrize.cached():  # spectral_norm: one power iteration for both computations
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = layer.forward_sparse(x, y)
        sparse_cross_entropy(out, y).backward(retain_graph=True)
        grads = [p.grad.clone() for p in leaves]
        for p in leaves:
            p.grad = None
        # The same loss computed densely on the same active set.
        active = out.indices.expand(4, -1) if out.indices.dim() == 1 else out.indices
        values = (x @ layer.weight.t() + layer.bias).gather(1, active)
        sparse_cross_entropy(type(out)(values, out.indices, out.log_weights), y).backward()
    for got, p in zip(grads, leaves):
        assert not got.is_sparse
        torch.testing.assert_close(got, p.grad)


def test_a_pruned_weight_keeps_its_sparse_gradient():
    """prune's mask takes a sparse gradient (SparseAdam steps it); only parametrize and weight_norm need a dense one."""
    from torch.nn.utils import prune
    torch.manual_seed(0)
    layer = LSHLinear(16, 300, active=40, sparse_grad=True, seed=0)
    prune.random_unstructured(layer, "weight", 0.3)
    x, y = torch.randn(4, 16), torch.tensor([1, 2, 3, 4])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse_cross_entropy(layer.forward_sparse(x, y), y).backward()
    assert layer.weight_orig.grad.is_sparse and layer.bias.grad.is_sparse
    torch.optim.SparseAdam([layer.weight_orig, layer.bias]).step()


def test_torch_jit_script_is_refused_with_what_to_use_instead():
    with pytest.raises(RuntimeError, match="torch.jit.script does not support LSHLinear.*torch.compile"):
        torch.jit.script(nn.Sequential(nn.ReLU(), LSHLinear(16, 100)).eval())


def test_swapping_parameters_on_conversion_after_a_forward_and_topk():
    """torch.utils.swap_tensors, which .to() and load_state_dict use under
    torch.__future__.set_swap_module_params_on_conversion(True) (and for tensor-subclass parameters),
    refuses a tensor with a weak reference, and the tables and topk's index kept one to the weight: after
    a forward, .double() and load_state_dict failed ("Couldn't swap LSHLinear.weight")."""
    x = torch.randn(6, 16)
    layer = LSHLinear(16, 2000, active=20, seed=3, inference="lsh")  # wider than topk's budget: an index
    layers = [layer, copy.deepcopy(layer)]
    loaded = {name: t + 0.01 for name, t in layers[0].state_dict().items()}
    results = []
    for swap, layer in zip((False, True), layers):
        layer(x)
        layer.topk(x, 3)
        before = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(swap)
        try:
            weight = layer.weight
            layer.double()
            assert layer.weight is weight  # the same Parameter: the tables still follow it
            with torch.no_grad():  # (an output's graph holds the weight: no swapping then, as for nn.Linear)
                results.append((layer.eval()(x.double()), layer.topk(x.double(), 3)))
                layer.load_state_dict(loaded)
                results.append((layer(x.double()), layer.topk(x.double(), 3)))
        finally:
            torch.__future__.set_swap_module_params_on_conversion(before)
    for plain, swapped in zip(results[:2], results[2:]):
        assert torch.equal(plain[0], swapped[0]) and all(map(torch.equal, plain[1], swapped[1]))


def test_warnings_point_past_the_package_but_not_past_a_user_file_named_like_it():
    from lsh_torch import _checks
    package = os.path.dirname(os.path.abspath(_checks.__file__))
    scope = {}
    exec(compile("def call(f):\n    return f()\n", package + "_demo.py", "exec"), scope)  # e.g. lsh_torch_demo.py
    assert scope["call"](_checks.user_stacklevel) == 1  # the caller's own line
    exec(compile("def call(f):\n    return f()\n", os.path.join(package, "inner.py"), "exec"), scope)
    assert scope["call"](_checks.user_stacklevel) == 2  # a frame inside the package is skipped


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("calls", ["once", "twice in a region", "micro-batches in one backward"])
def test_activation_checkpointing_replays_the_steps_draws(use_reentrant, calls):
    """torch.utils.checkpoint (and transformers' gradient checkpointing) recompute the forward inside
    backward: that recomputation counted as the next training step, drew another active set than the
    loss's and gave other gradients, silently (step 2 after one real step). Replaying the last step
    instead still failed a layer called twice in one region (max grad difference 21) and checkpointed
    micro-batches summed into one backward (3.2): each recomputation now gets its own forward's set."""
    from torch.utils.checkpoint import checkpoint

    def make():
        torch.manual_seed(0)
        return nn.ModuleDict({"hidden": LSHLinear(16, 256, active=32, seed=1, rebuild=2, warmup=1),
                              "head": LSHLinear(256, 600, active=64, seed=2, rebuild=3, sparse_grad=True)})

    def loss(model, xs, y, run):
        def region(v):
            h = torch.relu(model["hidden"](v))
            if calls == "twice in a region":
                h = h + torch.relu(model["hidden"](2 * v))
            return model["head"].forward_sparse(h, y).values
        return sum(run(region, x).square().sum() for x in xs)

    plain, checkpointed = make(), make()
    forwards = 2 if calls == "twice in a region" else 1
    for step in range(5):  # the warm-up, rebuilds at steps 1 and 3 (hidden) and 3 (head)
        g = torch.Generator().manual_seed(step)
        xs = [torch.randn(8, 16, generator=g, requires_grad=True)
              for _ in range(3 if calls == "micro-batches in one backward" else 1)]
        y = torch.randint(0, 600, (8,), generator=g)
        for model, run in ((plain, lambda f, x: f(x)),
                           (checkpointed, lambda f, x: checkpoint(f, x, use_reentrant=use_reentrant))):
            model.zero_grad()
            loss(model, xs, y, run).backward()
        for name, p in checkpointed.named_parameters():
            assert torch.equal(p.grad.to_dense(), dict(plain.named_parameters())[name].grad.to_dense()), name
        assert checkpointed["hidden"].step == plain["hidden"].step == (step + 1) * forwards * len(xs)
        assert checkpointed["head"].step == plain["head"].step == (step + 1) * len(xs)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_around_a_compiled_layer_replays_each_forwards_set(use_reentrant):
    """A compiled layer under eager checkpointing (a block compiled inside a checkpointed model) recorded
    no set (its output is the compiled graph's): two micro-batches in one backward re-drew the last
    step's set, and the gradients differed (0.016-0.018 in a review's run)."""
    from torch.utils.checkpoint import checkpoint

    def grads(compiled):
        torch.manual_seed(0)
        torch._dynamo.reset()
        layer = LSHLinear(16, 256, active=32, seed=1)
        run = torch.compile(layer, backend="aot_eager") if compiled else layer
        total = 0
        for micro in range(2):
            x = torch.randn(8, 16, generator=torch.Generator().manual_seed(micro), requires_grad=True)
            total = total + (checkpoint(run, x, use_reentrant=use_reentrant) if compiled else run(x)).square().sum()
        total.backward()
        return [p.grad for p in layer.parameters()]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for ours, plain in zip(grads(True), grads(False)):
            assert torch.equal(ours, plain)
    assert not [w for w in caught if "recorded training forwards" in str(w.message)]  # no re-drawn set


def test_a_recomputation_matching_no_forward_warns():
    """An input the recomputation does not reproduce (a nondeterministic upstream computation) cannot
    be matched to its forward: it re-draws the last step's set, and says its gradients may differ."""
    from torch.utils.checkpoint import checkpoint

    layer = LSHLinear(16, 256, active=32, seed=1)
    calls = []

    def region(v):
        calls.append(None)
        return layer(v + len(calls))  # another input in the recomputation
    x = torch.randn(8, 16, requires_grad=True)
    with pytest.warns(UserWarning, match="matches none of this layer's recorded training forwards"):
        checkpoint(region, x, use_reentrant=False).sum().backward()
    assert layer.step == 1


def test_recorded_draws_live_with_their_graph_and_copies_start_empty():
    """Only forwards that checkpointing may recompute keep their set, and not past their graph: every
    forward's set kept alive by its graph held 49 MiB a step where a loss was kept across steps."""
    import copy
    import gc
    import pickle

    layer = LSHLinear(16, 256, active=32)
    out = layer(torch.randn(8, 16, requires_grad=True))
    assert not layer._draws._with_graph and not layer._draws._without_graph  # no checkpoint: nothing kept
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # as non-reentrant checkpointing
        out = layer(torch.randn(8, 16, requires_grad=True))
    assert len([r for r in layer._draws._with_graph if r() is not None]) == 1
    del out
    gc.collect()
    assert [r() for r in layer._draws._with_graph] == [None]  # freed with the graph, not kept by the layer
    with torch.no_grad():  # a plain forward without grad: never recomputed, nothing kept
        layer(torch.randn(8, 16))
    assert not layer._draws._without_graph
    from torch.utils.checkpoint import checkpoint
    for _ in range(20):  # reentrant checkpointing's first pass (no grad, inside its Function), never backwarded
        checkpoint(layer, torch.randn(8, 16, requires_grad=True), use_reentrant=True)
    assert len(layer._draws._without_graph) == layer._draws.WITHOUT_GRAPH  # bounded
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert not other._draws._without_graph and not other._draws._with_graph


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("mode", ["per_row", "shared"])
def test_a_forward_without_grad_before_a_checkpointed_one_of_the_same_input(use_reentrant, mode):
    """A training forward under no_grad (PPO's old log-probabilities in train mode, a logged metric), then
    a checkpointed one of the same batch: the recomputation was given the first forward's set (a plain
    no_grad forward was recorded as if reentrant checkpointing's first pass), and the weight's gradient
    was off by a third of its norm, warned once and then silent."""
    from torch.utils.checkpoint import checkpoint

    def grads(checkpointed):
        torch.manual_seed(0)
        layer = LSHLinear(16, 600, active=64, mode=mode, seed=1, sparse_grad=True)
        for step in range(3):
            x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
            y = torch.randint(0, 600, (8,), generator=torch.Generator().manual_seed(step))
            region = lambda v: sparse_cross_entropy(layer.forward_sparse(v, y), y)  # noqa: E731
            with torch.no_grad():
                region(x)
            layer.zero_grad()
            x = x.requires_grad_()
            (checkpoint(region, x, use_reentrant=use_reentrant) if checkpointed else region(x)).backward()
            yield layer.weight.grad.to_dense(), x.grad

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ambiguity left to warn about
        for ours, plain in zip(grads(True), grads(False)):
            assert all(torch.equal(a, b) for a, b in zip(ours, plain))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_rows_in_another_order_and_twice_the_same_input(use_reentrant):
    """One-hot rows in another order shared the column and row sums: the sets swapped, silently (max grad
    difference 10). The same input in two checkpointed calls cannot be told apart: it is warned about."""
    from torch.utils.checkpoint import checkpoint

    def grads(x1, x2, checkpointed):
        torch.manual_seed(0)
        layer = LSHLinear(16, 256, active=32, seed=1, mode="per_row")
        a, b = torch.randn(256), torch.randn(256)
        run = (lambda f, v: checkpoint(f, v, use_reentrant=use_reentrant)) if checkpointed else (lambda f, v: f(v))
        ((run(layer, x1) * a).sum() + (run(layer, x2) * b).sum()).backward()
        return layer.weight.grad
    onehot = torch.eye(16)[torch.randperm(16)[:8]].requires_grad_()
    permuted = onehot.detach().flip(0).requires_grad_()
    assert torch.equal(grads(onehot, permuted, True), grads(onehot, permuted, False))
    with pytest.warns(UserWarning, match="input another forward of this layer had too"):
        grads(onehot, onehot, True)
