"""lsh_torch.integrations.transformers.patch on tiny random transformers causal LMs."""
import copy
import inspect
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
lsh_hf = pytest.importorskip("lsh_torch.integrations.transformers")

import lsh_torch  # noqa: E402

VOCAB = 3000


def tiny(model_type: str = "gpt2", **config):
    """A random 2-layer model of the type; no dropout, so train-mode passes are deterministic."""
    if model_type == "gpt2":
        kwargs = dict(n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0)
    else:
        kwargs = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    config = transformers.AutoConfig.for_model(model_type, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1,
                                               pad_token_id=1, **kwargs, **config)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).train()


def batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (3, 12), generator=gen)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt left out of the loss
    labels[2, -3:] = -100  # padding
    return ids, labels


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type", lsh_hf.SUPPORTED_MODEL_TYPES)
def test_full_budget_loss_and_gradients_equal_transformers(model_type):
    """With every word active the sparse softmax is the full one: HF's loss and gradients."""
    reference = tiny(model_type)
    model = lsh_hf.patch(copy.deepcopy(reference), active=VOCAB)
    ids, labels = batch()
    expected = reference(ids, labels=labels).loss
    out = model(ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    expected.backward()
    out.loss.backward()
    got, want = grads(model), grads(reference)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_num_items_in_batch_and_shift_labels_follow_transformers():
    reference = tiny("llama")
    model = lsh_hf.patch(copy.deepcopy(reference), active=VOCAB)
    ids, labels = batch()
    for kwargs in ({"num_items_in_batch": torch.tensor(50)}, {"shift_labels": labels.roll(-1, 1)}):
        torch.testing.assert_close(model(ids, labels=labels, **kwargs).loss,
                                   reference(ids, labels=labels, **kwargs).loss, rtol=1e-5, atol=1e-5)


def test_logits_to_keep_scores_the_positions_transformers_scores():
    """logits_to_keep was dropped in training: the kept positions' shift_labels were refused (an int)
    or mismatched (a packed-training boolean mask), where transformers scores those positions."""
    reference = tiny("llama")
    model = lsh_hf.patch(copy.deepcopy(reference), active=VOCAB)
    ids, labels = batch()
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 3:9] = True
    mask[1, 10] = True  # another count in one row
    cases = [(4, shifted[:, -4:].contiguous())]
    if hasattr(transformers.modeling_utils, "slice_logits_to_keep"):  # boolean masks: transformers 5.2x on
        cases.append((mask, shifted[mask]))
    for keep, shift_labels in cases:
        torch.testing.assert_close(model(ids, labels=labels, shift_labels=shift_labels, logits_to_keep=keep).loss,
                                   reference(ids, labels=labels, shift_labels=shift_labels, logits_to_keep=keep).loss,
                                   rtol=1e-5, atol=1e-5)


def test_transformers_without_slice_logits_to_keep_still_imports_and_slices():
    """transformers 5.17 (the GPU machine's) has no slice_logits_to_keep: importing the integration
    failed, claiming transformers was missing. Its models sliced the last N positions inline."""
    script = """
import torch, transformers.modeling_utils as utils
del utils.slice_logits_to_keep
import lsh_torch.integrations.transformers as lsh_hf
h = torch.arange(24.).reshape(2, 4, 3)
assert torch.equal(lsh_hf.slice_logits_to_keep(h, 0), h)
assert torch.equal(lsh_hf.slice_logits_to_keep(h, 1), h[:, -1:])
assert torch.equal(lsh_hf.slice_logits_to_keep(h, torch.tensor([0, 2])), h[:, [0, 2]])
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=os.path.dirname(os.path.dirname(lsh_torch.__file__)))


def test_a_bfloat16_model_gets_a_float32_loss_like_transformers():
    """The loss was reduced in the head's dtype: bfloat16 8.00000 against transformers' float32 8.02281."""
    reference = tiny("llama").to(torch.bfloat16)
    model = lsh_hf.patch(copy.deepcopy(reference), active=VOCAB)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (16, 64), generator=gen)
    with torch.no_grad():
        got, want = model(ids, labels=ids).loss, reference(ids, labels=ids).loss
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_output_is_the_models_own_class_with_its_fields():
    """GPT-2 returns CausalLMOutputWithCrossAttentions: its cross-attentions were dropped in training."""
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                     add_cross_attention=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(config).train()
    model = lsh_hf.patch(copy.deepcopy(reference), active=VOCAB)
    ids, labels = batch()
    encoder = torch.randn(3, 5, 32)
    got, want = (m(ids, labels=labels, encoder_hidden_states=encoder, output_attentions=True) for m in (model, reference))
    assert type(got) is type(want)
    assert got.keys() == want.keys() - {"logits"}
    torch.testing.assert_close(got.cross_attentions, want.cross_attentions)


def test_label_smoothing_with_every_word_active_is_cross_entropys():
    reference = tiny("qwen2")
    model = lsh_hf.patch(copy.deepcopy(reference), active=VOCAB, label_smoothing=0.2)
    ids, labels = batch()
    logits = reference(ids).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                                 label_smoothing=0.2)
    torch.testing.assert_close(model(ids, labels=labels).loss, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="label_smoothing must be between 0.0 and 1.0"):
        lsh_hf.patch(tiny("gpt2"), label_smoothing=2.0)


def test_float_labels_are_refused_and_tuples_keep_the_logits_place():
    reference = tiny("gpt2")
    model = lsh_hf.patch(copy.deepcopy(reference), active=VOCAB)
    ids, labels = batch()
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        model(ids, labels=labels.float())
    got, want = model(ids, labels=labels, return_dict=False), reference(ids, labels=labels, return_dict=False)
    assert len(got) == len(want) and got[1] is None and want[1].shape[-1] == VOCAB  # out[1] is the logits' place
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_ignored_positions_never_reach_the_head():
    model = lsh_hf.patch(tiny("gpt2"), active=256)
    ids, labels = batch()
    calls = []
    forward_sparse = model.lm_head.forward_sparse
    model.lm_head.forward_sparse = lambda x, y: calls.append((x.shape[0], y)) or forward_sparse(x, y)
    model(ids, labels=labels).loss.backward()
    (rows, targets), = calls
    kept = labels[:, 1:][labels[:, 1:] != -100]
    assert rows == kept.numel() == 3 * 11 - 3 - 3 and torch.equal(targets, kept)
    loss = model(ids, labels=torch.full_like(labels, -100)).loss
    assert loss.item() == 0.0
    loss.backward()  # still a graph: a Trainer step on a fully padded batch does not crash


def test_the_compiled_loss_reads_no_label_on_the_host():
    """The label range check read min and max with .item(): a graph break under torch.compile (and two
    host syncs per step on a GPU). Now asserted on the device there."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = lsh_hf.patch(tiny("gpt2"), active=128)
    ids, labels = batch()
    loss = torch.compile(lambda: model(ids, labels=labels).loss, backend="eager")()
    assert torch.isfinite(loss)
    assert not [reason for reason in counters["graph_break"] if "item" in reason], dict(counters["graph_break"])
    torch._dynamo.reset()


def test_training_never_builds_full_logits_and_counts_steps():
    model = lsh_hf.patch(tiny("gpt2"), active=256, rebuild=2)
    full_calls = []
    model.lm_head.register_forward_hook(lambda *_: full_calls.append(1))
    ids, labels = batch()
    for _ in range(3):
        out = model(ids, labels=labels)
        out.loss.backward()
    assert out.logits is None and not full_calls
    assert model.lm_head.step == 3  # the head's rebuild schedule sees every training step
    model.eval()
    assert model(ids, labels=labels).logits.shape == (*ids.shape, VOCAB)
    assert full_calls == [1]


def test_a_patched_head_draws_its_tail_from_the_given_counts():
    """patch passes tail_proposal on to the head: its training tails carry the proposal's weights (frequent words
    standing for fewer than 2 outputs, where a uniform tail's entries stand for about 90), and the loss trains."""
    counts = torch.zeros(VOCAB).index_fill_(0, torch.arange(2, 40), 1e6)
    model = lsh_hf.patch(tiny("gpt2"), active=64, mode="per_row", tail_proposal=counts)
    assert torch.equal(model.lm_head.tail_proposal, counts.double())
    ids, labels = batch()
    h = model.transformer(ids).last_hidden_state
    out = model.lm_head.forward_sparse(h, labels.clamp_min(0))
    lw = out.log_weights
    assert ((lw != 0) & (lw < math.log(2))).any()
    model(ids, labels=labels).loss.backward()
    assert model.lm_head.weight.grad is not None


def test_patched_forward_keeps_the_signature_and_copies_cleanly():
    model = lsh_hf.patch(tiny("gpt2"), active=128)
    # Trainer (remove_unused_columns, loss kwargs) and generate() read the forward's signature.
    assert inspect.signature(model.forward) == inspect.signature(type(model).forward.__get__(model))
    clone = copy.deepcopy(model)
    assert clone.forward.model is clone
    ids, labels = batch()
    clone(ids, labels=labels).loss.backward()
    assert clone.lm_head.step == 1 and model.lm_head.step == 0


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_a_pickled_patched_model_keeps_its_patch(model_type, tmp_path):
    """The patched forward was a closure bound to the model, which pickle stores by name: torch.save(model)
    and spawned workers got transformers' own forward back, whose loss ran over the zero-filled training
    output of the LSHLinear head (a wrong loss, no error), and patch() refused to patch it again."""
    model = lsh_hf.patch(tiny(model_type), active=128)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    ids, labels = batch()
    out, expected = loaded(ids, labels=labels), model(ids, labels=labels)
    assert out.logits is None and torch.equal(out.loss, expected.loss)
    assert inspect.signature(loaded.forward) == inspect.signature(type(loaded).forward.__get__(loaded))
    lsh_hf.unpatch(loaded)
    assert "forward" not in vars(loaded) and type(loaded.lm_head) is torch.nn.Linear


def test_compiling_a_patched_model_does_not_warn():
    """The output class came from a functools.cache'd helper: dynamo warned of "silent incorrectness"."""
    torch._dynamo.reset()
    model = lsh_hf.patch(tiny("gpt2"), active=128)
    ids, labels = batch()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lru_cache.*")
        torch.compile(lambda: model(ids, labels=labels).loss, backend="eager")().backward()
    torch._dynamo.reset()


def test_a_patched_model_exports_in_eval_as_the_unpatched_one():
    """torch.export (non-strict, its default) reads model.forward.__code__, which the patched forward, an object,
    did not have: export failed where the unpatched model exported."""
    model = tiny("llama", use_cache=False).eval()  # (a cache in the output is no type export knows)
    ids = batch()[0]
    expected = model(ids).logits
    lsh_hf.patch(model, active=128)
    program = torch.export.export(model, (ids,))
    torch.testing.assert_close(program.module()(ids).logits, expected)


def test_unpatch_gives_back_the_model_and_a_hand_unconverted_head_runs_dense():
    reference = tiny("gpt2")
    model = lsh_hf.patch(copy.deepcopy(reference), active=128)
    weight = model.lm_head.weight
    ids, labels = batch()
    model(ids, labels=labels).loss.backward()
    assert lsh_hf.unpatch(model) is model
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is weight  # the same Parameter
    assert "forward" not in vars(model) and not hasattr(model, "_lsh_torch_patched")
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(ids, labels=labels).loss, reference(ids, labels=labels).loss)
    lsh_hf.patch(model, active=128)  # and again
    with pytest.raises(ValueError, match="not patched"):
        lsh_hf.unpatch(reference)
    lsh_torch.unconvert(model)  # by hand: the patched forward falls back to the model's own, dense
    torch.testing.assert_close(model(ids, labels=labels).loss, reference(ids, labels=labels).loss)


def test_resizing_a_patched_model_says_how_and_that_way_trains():
    model = lsh_hf.patch(tiny("gpt2"), active=128)
    ids, labels = batch()
    model.resize_token_embeddings(VOCAB + 100)  # transformers rewrites the head's weight and out_features
    with pytest.raises(ValueError, match="unpatch, resize, patch again"):
        model(ids, labels=labels)
    model = lsh_hf.unpatch(model)
    model.resize_token_embeddings(VOCAB + 200)
    lsh_hf.patch(model, active=128)
    labels[1, -2:] = VOCAB + 199  # new words, which the new tables hold
    model(ids, labels=labels).loss.backward()
    head = model.get_output_embeddings()
    assert head.tables.out_features == VOCAB + 200 and head.weight is model.transformer.wte.weight
    assert head.weight.grad[VOCAB + 199].abs().sum() > 0


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_eval_without_labels_and_generate_are_exact(model_type):
    reference = tiny(model_type)
    model = lsh_hf.patch(copy.deepcopy(reference), active=128)
    ids, labels = batch()
    model(ids, labels=labels).loss.backward()  # a sparse step first: the head is in use
    with torch.no_grad():
        # training mode without labels: the dense head, not zeros outside an active set
        assert torch.equal(model(ids).logits, reference(ids).logits)
        model.eval()
        reference.eval()
        out, expected = model(ids, labels=labels), reference(ids, labels=labels)
        assert torch.equal(out.logits, expected.logits) and torch.equal(out.loss, expected.loss)
    prompt = ids[:2, :5]
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(prompt))
    expected = reference.generate(prompt, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert generated.shape == (2, 11) and torch.equal(generated, expected)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_save_pretrained_loads_into_the_unpatched_class(model_type, tmp_path):
    model = lsh_hf.patch(tiny(model_type), active=128)
    tied = model.config.tie_word_embeddings
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids, labels = batch()
    for _ in range(3):
        model(ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert type(loaded.lm_head) is torch.nn.Linear
    assert "forward" not in vars(loaded)  # the plain class, not patched
    assert (loaded.lm_head.weight is loaded.get_input_embeddings().weight) == tied
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_trainer_with_gradient_accumulation_lowers_the_loss(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    model = lsh_hf.patch(tiny("gpt2"), active=256)
    gen = torch.Generator().manual_seed(0)
    # Arithmetic sequences of token ids: learnable in a few steps.
    starts = torch.randint(0, 50, (32,), generator=gen).tolist()
    data = [{"input_ids": (torch.arange(16) * 7 + s) % 50 + 2, "labels": (torch.arange(16) * 7 + s) % 50 + 2}
            for s in starts]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                                          gradient_accumulation_steps=2, max_steps=12, learning_rate=1e-2,
                                          logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                          disable_tqdm=True)
    counts = []
    sparse_loss = lsh_hf._sparse_loss
    monkeypatch.setattr(lsh_hf, "_sparse_loss", lambda *a: counts.append(a[5]) or sparse_loss(*a))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    # The sparse path ran for every micro-batch, normalised by the step's token count as Trainer asks.
    assert len(counts) == 24 and all(n is not None and n == counts[i - i % 2] for i, n in enumerate(counts))
    assert len(losses) == 12 and losses[-1] < losses[0] - 1.0


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_trainer_takes_a_sparse_gradient_head(tmp_path, max_grad_norm):
    """transformers 5 measures the gradients' norm at every step (clip_grad_norm_ with max_norm=inf), also with
    max_grad_norm=0: the recipe the README gave for sparse_grad=True (LazyAdam, max_grad_norm=0) failed at the
    first step in torch ('linalg_vector_norm' on SparseCPU; a helper's audit). lsh_hf.Trainer takes it, and clips."""
    pytest.importorskip("accelerate")
    model = lsh_hf.patch(tiny("llama", tie_word_embeddings=False), active=256, sparse_grad=True)
    data = [{"input_ids": (torch.arange(16) * 7 + s) % 50 + 2, "labels": (torch.arange(16) * 7 + s) % 50 + 2}
            for s in range(8)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4,
                                          learning_rate=1e-2, max_grad_norm=max_grad_norm, logging_steps=1,
                                          save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    optimizers = lambda: (lsh_torch.LazyAdam(model.parameters(), lr=1e-2), None)  # noqa: E731
    with pytest.raises(NotImplementedError, match="Sparse"):
        transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=optimizers()).train()
    head = model.get_output_embeddings().weight.detach().clone()
    trainer = lsh_hf.Trainer(model=model, args=args, train_dataset=data, optimizers=optimizers())
    trainer.train()
    norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert len(norms) == 4 and all(0 < n < float("inf") for n in norms)
    assert not torch.equal(model.get_output_embeddings().weight, head)
    # The norm is that of every gradient, the sparse head's by its values (as if it were dense).
    model.zero_grad()
    ids = data[0]["input_ids"][None]
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert any(g.is_sparse for g in grads)
    expected = torch.sqrt(sum(g.to_dense().pow(2).sum() for g in grads))
    torch.testing.assert_close(lsh_torch.clip_grad_norm_(model.parameters(), float("inf")), expected)


def test_trainer_gives_a_sparse_gradient_head_lazy_adam_for_its_default_adamw(tmp_path):
    """The default optimizer failed at the first step ("Adam does not support sparse gradients, please consider
    SparseAdam"), where the docs said to pass LazyAdam (a user review). AdamW becomes LazyAdam, groups kept."""
    pytest.importorskip("accelerate")
    model = lsh_hf.patch(tiny("llama", tie_word_embeddings=False), active=256, sparse_grad=True)
    data = [{"input_ids": (torch.arange(16) * 7 + s) % 50 + 2, "labels": (torch.arange(16) * 7 + s) % 50 + 2}
            for s in range(8)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                                          learning_rate=1e-2, weight_decay=0.1, adam_beta2=0.99, adam_epsilon=1e-6,
                                          save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    dense = transformers.Trainer(model=lsh_hf.unpatch(copy.deepcopy(model)), args=args).create_optimizer()
    lazy = lsh_hf.Trainer(model=model, args=args, train_dataset=data).create_optimizer()
    assert type(dense) is torch.optim.AdamW and type(lazy) is lsh_torch.LazyAdam
    for mine, theirs in zip(lazy.param_groups, dense.param_groups, strict=True):
        assert len(mine["params"]) == len(theirs["params"])
        for key in ("lr", "betas", "eps", "weight_decay"):
            assert mine[key] == theirs[key], key
    # AdamW's step on dense gradients: the same parameters after one step of each.
    twin = copy.deepcopy(model)
    reference = torch.optim.AdamW([{**g, "params": [dict(twin.named_parameters())[n] for n, p in model.named_parameters()
                                                    if any(p is q for q in g["params"])]} for g in lazy.param_groups])
    ids = data[0]["input_ids"][None]
    for net in (model, twin):
        net.get_output_embeddings().sparse_grad = False  # dense here, to compare with AdamW's arithmetic
        net(ids, labels=ids).loss.backward()
    lazy.step(), reference.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    model.get_output_embeddings().sparse_grad = True
    head = model.get_output_embeddings().weight.detach().clone()
    lsh_hf.Trainer(model=model, args=args, train_dataset=data).train()  # the sparse head trains with the default
    assert not torch.equal(model.get_output_embeddings().weight, head)


def test_sparse_grad_on_a_tied_head_warns_that_its_gradient_is_dense():
    """The weight's gradient is the embedding's dense one plus the head's: sparse_grad=True was silently dense."""
    with pytest.warns(UserWarning, match="tied"):
        model = lsh_hf.patch(tiny("gpt2"), active=256, sparse_grad=True)
    ids, labels = batch()
    model(ids, labels=labels).loss.backward()
    assert not model.lm_head.weight.grad.is_sparse
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lsh_hf.patch(tiny("llama", tie_word_embeddings=False), active=256, sparse_grad=True)
        lsh_hf.patch(tiny("gpt2"), active=256)


def test_trainer_resumes_a_checkpoint_exactly(tmp_path):
    """A checkpoint of transformers' Trainer holds no lsh_state: a resumed run rebuilt the head's tables from the
    checkpoint's weights with its step counter at 0, and its losses left the uninterrupted run's (a user review).
    lsh_hf.Trainer saves and loads it beside the optimizer: the resumed steps are the uninterrupted ones."""
    pytest.importorskip("accelerate")
    data = [{"input_ids": (torch.arange(16) * 7 + s) % 50 + 2, "labels": (torch.arange(16) * 7 + s) % 50 + 2}
            for s in range(16)]

    def run(trainer_class, folder, resume=None):
        model = lsh_hf.patch(tiny("gpt2"), active=256, rebuild=3)
        args = transformers.TrainingArguments(output_dir=str(tmp_path / folder), per_device_train_batch_size=4,
                                              max_steps=6, save_steps=2, learning_rate=1e-2, logging_steps=1,
                                              report_to=[], use_cpu=True, disable_tqdm=True)
        trainer = trainer_class(model=model, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        return [e["loss"] for e in trainer.state.log_history if "loss" in e], model.get_output_embeddings()

    losses, head = run(lsh_hf.Trainer, "whole")
    assert os.path.isfile(tmp_path / "whole" / "checkpoint-2" / lsh_hf.Trainer.LSH_STATE)
    resumed, resumed_head = run(lsh_hf.Trainer, "resumed", tmp_path / "whole" / "checkpoint-2")
    assert resumed[2:] == losses[2:] and resumed_head.step == head.step  # (the first two: the checkpoint's log)
    assert torch.equal(resumed_head.weight, head.weight)
    plain, _ = run(transformers.Trainer, "plain", tmp_path / "whole" / "checkpoint-2")
    assert plain[2:] != losses[2:]  # what the saved state is for


def test_converted_head_under_a_full_width_loss_warns_once():
    model = tiny("gpt2")
    lsh_torch.convert(model, min_out_features=VOCAB, active=128)
    ids, labels = batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model(ids, labels=labels).loss.backward()
    messages = [str(w.message) for w in caught if "forward_sparse" in str(w.message)]
    assert len(messages) == 1 and "patch(model)" in messages[0]


def test_patched_training_does_not_warn():
    model = lsh_hf.patch(tiny("gpt2"), active=128)
    ids, labels = batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(ids, labels=labels).loss.backward()
        model(ids).logits.logsumexp(-1).mean().backward()  # no labels: the dense head, exact
    assert not [w for w in caught if "forward_sparse" in str(w.message)]


def test_a_converted_head_is_taken_as_it_is():
    model = lsh_torch.convert(tiny("gpt2"), min_out_features=VOCAB, active=64)
    with pytest.raises(ValueError, match="LSHLinear already"):
        lsh_hf.patch(model, active=128)
    head = model.lm_head
    assert lsh_hf.patch(model).lm_head is head and head.budget == 64


def test_eval_of_a_head_converted_with_lsh_inference_is_exact():
    """A head converted by hand with inference="lsh" gave eval and generate() zero-filled logits."""
    reference = tiny("gpt2").eval()
    model = lsh_hf.patch(lsh_torch.convert(copy.deepcopy(reference), min_out_features=VOCAB, active=64,
                                           inference="lsh")).eval()
    ids, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    assert model.lm_head.inference == "lsh"  # the head's own setting, kept outside the patched calls


def test_bad_input_gets_clear_errors():
    with pytest.raises(TypeError, match="model must be a transformers PreTrainedModel"):
        lsh_hf.patch(torch.nn.Linear(4, 4))
    gemma2 = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
        "gemma2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16))
    with pytest.raises(ValueError, match="model_type 'gemma2'"):  # soft-capped logits
        lsh_hf.patch(gemma2)
    double_heads = transformers.GPT2DoubleHeadsModel(tiny("gpt2").config)
    with pytest.raises(ValueError, match="GPT2DoubleHeadsModel; patch.. supports the causal-LM class"):
        lsh_hf.patch(double_heads)  # its multiple-choice loss would be dropped, silently
    model = tiny("gpt2")
    model.lm_head = None
    with pytest.raises(TypeError, match="output head"):
        lsh_hf.patch(model)
    with pytest.raises(ValueError, match="inference='lsh': patch.. keeps eval and generate.. exact"):
        lsh_hf.patch(tiny("gpt2"), active=128, inference="lsh")  # eval's softmax would count unscored words as 0
    model = lsh_hf.patch(tiny("gpt2"), active=128)
    with pytest.raises(ValueError, match="patched already"):
        lsh_hf.patch(model)
    ids, labels = batch()
    with pytest.raises(ValueError, match=r"labels must be -100 \(ignored\) or in \[0, vocab size = 3000\)"):
        model(ids, labels=labels.index_fill(1, torch.tensor([5]), VOCAB))
    with pytest.raises(ValueError, match="must have the shape of the scored positions"):
        model(ids, labels=labels[:, :5])
    with pytest.raises(ValueError, match=r"shift_labels \(already shifted: not shifted again\) must have the shape"):
        model(ids, labels=labels, shift_labels=labels[:, 1:])  # shift_labels keep every position, -100 at the last
