"""lsh_torch.convert / unconvert: nn.Linear <-> LSHLinear in place, on nested models."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lsh_torch
from lsh_torch import LSHLinear, convert, load_lsh_state, lsh_state, unconvert


class TinyLM(nn.Module):
    """Embedding, a transformer block with an MLP, and a wide output head tied to the embedding."""

    def __init__(self, vocab=1200, d=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.block = nn.TransformerEncoderLayer(d, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 1500), nn.ReLU(), nn.Linear(1500, d))
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        h = self.block(self.embed(tokens))
        return self.head(h + self.mlp(h))


def test_convert_wide_layers_in_place_and_back():
    model = TinyLM()
    tokens = torch.randint(0, 1200, (2, 5))
    params = {n: p for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model.eval()(tokens)

    rng = torch.get_rng_state()
    assert convert(model, active=0.1, num_tables=3) is model
    assert torch.equal(torch.get_rng_state(), rng)  # conversion draws no random numbers
    converted = {n for n, m in model.named_modules() if isinstance(m, LSHLinear)}
    assert converted == {"mlp.0", "head"}  # out_features >= 1000 only; the block's 32/16-wide layers stay
    assert type(model.mlp[2]) is nn.Linear and type(model.block.linear1) is nn.Linear
    assert model.head.weight is model.embed.weight  # tying survives: the same Parameter objects
    assert {n: p for n, p in model.named_parameters()} == params
    assert model.mlp[0].budget == 150 and model.mlp[0].tables.num_tables == 3
    assert model.mlp[0].seed != model.head.seed  # independent projections per layer
    assert not model.head.training  # the replaced layer's mode carries over
    assert list(model.state_dict()) == list(state)
    assert torch.equal(model(tokens), expected)  # eval is exact (dense) by default

    model.train()
    model(tokens).sum().backward()  # trains through the LSH path
    assert model.head.step == 1

    assert unconvert(model) is model
    assert not any(isinstance(m, LSHLinear) for m in model.modules())
    assert type(model.head) is nn.Linear and model.head.weight is model.embed.weight
    assert {n: p for n, p in model.named_parameters()} == params
    assert torch.equal(model.eval()(tokens), expected)


def test_a_module_registered_twice_under_one_parent_is_replaced_at_both():
    wide = nn.Linear(4, 2000)
    model = nn.ModuleList([wide, nn.ReLU(), wide])
    convert(model, active=8)
    assert isinstance(model[0], LSHLinear) and model[2] is model[0]
    unconvert(model)
    assert type(model[0]) is nn.Linear and model[2] is model[0]
    for fn in (convert, unconvert, lsh_state, lambda m: load_lsh_state(m, {})):
        with pytest.raises(TypeError, match="model must be an nn.Module, got (NoneType|list)"):
            fn([wide] if fn is lsh_state else None)
    with pytest.raises(TypeError, match="strict must be a bool"):
        load_lsh_state(model, {}, strict="no")  # (taken as strict)
    # A zero-width layer, which LSHLinear refuses, stays an nn.Linear (the whole conversion failed).
    model = nn.Sequential(nn.Linear(0, 2000), nn.Linear(4, 2000))
    with pytest.warns(UserWarning, match="left '0' as an nn.Linear: in_features=0, out_features=2000"):
        convert(model)
    assert type(model[0]) is nn.Linear and isinstance(model[1], LSHLinear)
    with pytest.raises(TypeError, match=r"unknown LSHLinear option\(s\) \['actve'\]"):
        convert(nn.Linear(4, 10), actve=8)  # no layer wide enough: the typo used to pass unseen


def test_filter_threshold_options_and_errors():
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    convert(model, min_out_features=64, active=8, seed=7, rebuild=5)
    assert [type(m) for m in model] == [LSHLinear, nn.ReLU, LSHLinear, nn.ReLU, nn.Linear]
    assert (model[0].seed, model[2].seed) == (7, 8)
    assert model[0].schedule.period == 5
    unconvert(model, filter=lambda name, m: name == "2")
    assert [type(m) for m in model][:3] == [LSHLinear, nn.ReLU, nn.Linear]

    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    convert(model, filter=lambda name, m: m.in_features == 16, active=2)
    assert [type(m) for m in model] == [nn.Linear, LSHLinear]

    shared = nn.Linear(4, 2000)
    model = nn.ModuleList([shared, nn.Sequential(shared)])
    convert(model, active=10)
    assert model[0] is model[1][0] and isinstance(model[0], LSHLinear)

    layer = convert(nn.Linear(4, 2000), active=10)  # the root itself is replaced: use the return value
    assert isinstance(layer, LSHLinear) and isinstance(unconvert(layer), nn.Linear)

    with pytest.raises(ValueError, match="min_out_features"):
        convert(nn.Linear(2, 2), min_out_features=0)
    for seed, error in ((True, TypeError), ("a", TypeError), (1.5, TypeError), (-1, ValueError)):
        with pytest.raises(error, match="seed"):  # True became seed 1; the others failed without naming it
            convert(nn.Linear(2, 2000), seed=seed)
    with pytest.raises(ValueError, match="active"):
        convert(nn.Linear(2, 2000), active=5000)
    model = nn.Sequential(nn.Linear(8, 3000), nn.ReLU(), nn.Linear(3000, 1500))
    with pytest.raises(ValueError, match=r"'2' \(Linear\(in_features=3000, out_features=1500.* active must be in "
                                         r"\[1, out_features=1500\], got 2048; the model is unchanged"):
        convert(model, active=2048)  # fits the first layer, not the second: the error names the one
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]


def test_a_filter_must_be_callable_and_return_a_bool():
    """A filter returning "no" (truthy) converted the layer; one that was not callable failed inside the walk."""
    for function in (convert, unconvert):
        model = nn.Sequential(nn.Linear(16, 2000))
        if function is unconvert:
            convert(model)
        kind = type(model[0])
        with pytest.raises(TypeError, match=f"{function.__name__}: filter must return a bool, got 'no' for '0'"):
            function(model, filter=lambda name, m: "no")
        with pytest.raises(TypeError, match=f"{function.__name__}: filter must be a callable"):
            function(model, filter="x")
        assert type(model[0]) is kind  # unchanged
        function(model, filter=lambda name, m: np.bool_(True))
        assert type(model[0]) is not kind


def test_plain_checkpoint_loads_into_converted_model_and_back():
    original = TinyLM()
    model = convert(TinyLM(), active=0.1)
    model.load_state_dict(original.state_dict(), strict=True)
    tokens = torch.randint(0, 1200, (2, 5))
    assert torch.equal(model.eval()(tokens), original.eval()(tokens))
    original.load_state_dict(model.state_dict(), strict=True)


def test_exported_from_package():
    assert lsh_torch.convert is convert and lsh_torch.unconvert is unconvert


def test_parametrized_linear_is_left_with_a_warning():
    with pytest.warns(FutureWarning):
        old_style = nn.utils.weight_norm(nn.Linear(8, 2000))  # the deprecated hook-based weight_norm
    bias_only = nn.Linear(8, 2000)
    nn.utils.parametrize.register_parametrization(bias_only, "bias", nn.Identity())
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(8, 2000)), old_style, nn.Linear(8, 2000),
                          bias_only)
    with pytest.warns(UserWarning) as record:
        convert(model)
    assert [str(w.message).split(" computed")[0] for w in record] == [
        f"convert: left '{i}' as an nn.Linear: its {p} is" for i, p in (("0", "weight"), ("1", "weight"), ("3", "bias"))]
    assert type(model[0]).__name__ == "ParametrizedLinear" and type(model[1]) is nn.Linear
    assert isinstance(model[2], LSHLinear)
    assert type(model[3]).__name__ == "ParametrizedLinear"
    assert all(layer(torch.randn(3, 8)).shape == (3, 2000) for layer in model)


def test_layers_torch_reads_without_calling_them_are_named():
    """nn.MultiheadAttention never calls its out_proj (it reads the weight): a filter that selects it is told so and
    the layer stays. An nn.TransformerEncoderLayer's eval under no_grad takes torch's fused fast path, which reads
    linear1/linear2's weights: converted as asked, with a warning where inference="lsh" would not apply there."""
    torch.manual_seed(0)
    block = nn.TransformerEncoderLayer(16, 2, dim_feedforward=2048, batch_first=True, dropout=0.0)
    with pytest.warns(UserWarning) as record:
        convert(block, filter=lambda name, m: name in ("self_attn.out_proj", "linear1"), inference="lsh")
    assert [str(w.message).split(":")[1].strip() for w in record] == [
        "left 'self_attn.out_proj' as an nn.Linear", "'linear1' is a linear layer of an nn.TransformerEncoderLayer, whose "
        "eval under no_grad takes torch's fused fast path"]
    assert type(block.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(block.linear1, LSHLinear) and block.linear1.inference == "lsh"
    block.eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        fused = block(x)  # the fast path: dense
        try:
            torch.backends.mha.set_fastpath_enabled(False)
            lsh = block(x)  # the remedy the warning names: the LSHLinear's own eval
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    assert not torch.allclose(fused, lsh)
    torch.testing.assert_close(lsh, block(x.requires_grad_()).detach())  # what eval with grad computes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default inference, dense, agrees with the fast path: nothing to say
        convert(nn.TransformerEncoderLayer(16, 2, dim_feedforward=2048, batch_first=True))
        # batch_first=False (torch's default) never takes the fast path: the LSHLinear is called, nothing to say
        convert(nn.TransformerEncoderLayer(16, 2, dim_feedforward=2048), inference="lsh")


def test_a_gated_mlp_converts_its_gate_alone():
    """convert() hashed a gated MLP's gate_proj and up_proj independently: act(gate) * up was nonzero
    on 130 of 2,048 units where each computed 512, three quarters of the work reaching nothing."""
    class GatedMLP(nn.Module):  # LLaMA's: down_proj(act(gate_proj(x)) * up_proj(x))
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(32, 2048), nn.Linear(32, 2048)
            self.down_proj = nn.Linear(2048, 32)

        def forward(self, x):
            return self.down_proj(torch.relu(self.gate_proj(x)) * self.up_proj(x))

    class Fused(nn.Module):  # Phi-3's: one layer, chunked into the two factors
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Linear(32, 4096)

    model = convert(nn.Sequential(GatedMLP(), Fused()), active=0.25)
    mlp = model[0]
    assert isinstance(mlp.gate_proj, LSHLinear) and type(mlp.up_proj) is nn.Linear
    assert type(model[1].gate_up_proj) is nn.Linear
    x = torch.randn(4, 32)
    gate = torch.relu(mlp.gate_proj(x))
    assert torch.equal((gate * mlp.up_proj(x)) != 0, gate != 0)  # every unit the gate passes reaches down_proj
    t5 = nn.Module()  # T5's gated-GELU feed-forward names its factors wi_0 and wi_1
    t5.wi_0, t5.wi_1, t5.wo = nn.Linear(32, 2048), nn.Linear(32, 2048), nn.Linear(2048, 32)
    t5 = convert(t5)
    assert isinstance(t5.wi_0, LSHLinear) and type(t5.wi_1) is nn.Linear
    custom = convert(GatedMLP(), filter=lambda name, m: True)  # a filter of one's own decides
    assert isinstance(custom.up_proj, LSHLinear)


def test_layers_named_like_a_gated_pair_but_in_a_row_are_converted():
    """An MLP of layers w1, w2, w3 in a row (a common naming) matched SwiGLU's (w1, w3) pair: its wide output
    layer w3 was left dense, silently."""
    mlp = nn.Module()
    mlp.w1, mlp.w2, mlp.w3 = nn.Linear(64, 2000), nn.Linear(2000, 2000), nn.Linear(2000, 1000)
    convert(mlp)
    assert all(isinstance(getattr(mlp, name), LSHLinear) for name in ("w1", "w2", "w3"))


def test_a_linear_subclass_with_parameters_or_a_forward_of_its_own_is_refused():
    """A LoRA-like subclass selected by a filter was replaced: its A and B parameters left the state_dict."""
    class LoRALinear(nn.Linear):
        def __init__(self, i, o):
            super().__init__(i, o)
            self.A, self.B = nn.Parameter(torch.zeros(4, i)), nn.Parameter(torch.zeros(o, 4))

        def forward(self, x):
            return super().forward(x) + x @ self.A.T @ self.B.T

    class Logged(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    for layer in (LoRALinear(16, 1200), Logged(16, 1200)):
        model = nn.Sequential(layer)
        keys = list(model.state_dict())
        with pytest.raises(ValueError, match=f"'0' is a {type(layer).__name__}.*of its own.*the model is unchanged"):
            convert(model, filter=lambda name, m: True)
        assert model[0] is layer and list(model.state_dict()) == keys
    class Plain(nn.Linear):  # a subclass of nothing of its own (as torch's NonDynamicallyQuantizableLinear)
        pass
    assert isinstance(convert(nn.Sequential(Plain(16, 1200)), filter=lambda name, m: True)[0], LSHLinear)
