"""Hugging Face transformers in one call: ``patch(model)`` trains a causal LM's output head sparsely.

    import lsh_torch.integrations.transformers as lsh_hf

    model = AutoModelForCausalLM.from_config(config)       # or from_pretrained(...)
    lsh_hf.patch(model, active=2048)                        # any LSHLinear option
    loss = model(input_ids, labels=labels).loss             # training: sparse head, no [tokens, V] logits
    model.eval(); model.generate(input_ids)                 # eval and generate: exact, as before
    model.save_pretrained(path)                             # a plain checkpoint of the unpatched class
    lsh_hf.unpatch(model)                                   # the model as it was, its parameters kept

Like Liger-Kernel's ``apply_liger_kernel_to_*`` and Cut Cross-Entropy's ``cce_patch``, the patch
changes what ``model(..., labels=...)`` computes in training and nothing else.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import types
import typing
import warnings

import torch
from torch import Tensor, nn

try:
    from transformers import PreTrainedModel
    from transformers import Trainer as _Trainer
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.utils import ModelOutput
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
except ImportError as error:  # transformers is the optional extra "hf"
    raise ImportError("lsh_torch.integrations.transformers needs transformers: pip install 'lsh_torch[hf]'") from error
try:
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # transformers before 5.2x sliced inline in each model's forward, as this does
    def slice_logits_to_keep(hidden_states: Tensor, logits_to_keep: "int | Tensor") -> Tensor:
        return hidden_states[:, slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep, :]

from .._checks import refuse, user_stacklevel
from ..checkpoint import load_lsh_state, lsh_state
from ..convert import convert, unconvert
from ..losses import check_label_smoothing, sparse_cross_entropy
from ..nn import LSHLinear
from ..optim import LazyAdam
from ..optim import clip_grad_norm_ as _clip_sparse_grad_norm_

# Model types whose causal-LM forward is exactly ``lm_head(base_model(...).last_hidden_state)``
# followed by the shifted cross-entropy (read in their source; the tests run each one). Models that
# transform the logits after the head (Gemma 2/3 soft-capping, Granite's logits_scaling, Cohere's
# logit_scale) would be trained on the wrong logits, so they are refused rather than guessed at.
SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma")


def patch(model: PreTrainedModel, *, label_smoothing: float = 0.0, **lsh_kwargs) -> PreTrainedModel:
    """Make ``model(..., labels=labels)`` train the output head with LSH, in place; returns ``model``.

    The output head (``model.get_output_embeddings()``) becomes an :class:`~lsh_torch.LSHLinear`
    holding the same weight parameter (tied input embeddings stay tied; ``state_dict`` keys do not
    change), built by :func:`lsh_torch.convert` with ``lsh_kwargs`` (``active=``, ``mode=``,
    ``rebuild=``, ``seed=``, ...; the defaults are LSHLinear's for the vocabulary's width).

    In training mode with ``labels``, the forward pass computes the base model's hidden states,
    shifts the labels as the model does (``labels[..., 1:]`` against ``hidden[..., :-1, :]``, or a
    ``shift_labels=`` tensor as given), drops the positions labelled -100 (``ignore_index=``), and
    returns the loss of :meth:`LSHLinear.forward_sparse` with the targets forced into the active
    set, through :func:`lsh_torch.sparse_cross_entropy`: the mean over the kept tokens, or their sum
    divided by ``num_items_in_batch`` when the Trainer passes it (gradient accumulation), in float32
    whatever the model's dtype, as transformers' loss. ``logits_to_keep`` selects the positions scored,
    as it does for the logits. The output is the model's own class (its other fields as the
    unpatched model's), ``logits`` None: the ``[tokens, vocab]`` logits are never built. A batch
    whose labels are all -100 gets loss 0 (plain cross-entropy gives NaN). ``label_smoothing`` is
    ``F.cross_entropy``'s, the spread over the whole vocabulary estimated from the active set
    (:func:`~lsh_torch.sparse_cross_entropy`). Give it here rather than as the Trainer's
    ``label_smoothing_factor``: with that, the Trainer takes the labels out of the model's inputs
    and smooths the logits it gets back, the dense head's (exact, at the dense cost).

    Everything else is the unpatched model: eval mode, calls without labels (also in training
    mode: the head is then dense), ``generate()``, ``save_pretrained`` (a checkpoint that the
    unpatched class loads). The head's hash tables are rebuilt by its own schedule (``rebuild=``,
    counted in training forward passes, micro-batches included).

    With ``sparse_grad=True`` an untied head's gradient is sparse: train it with this module's
    :class:`Trainer`, which measures the gradients' norm with :func:`lsh_torch.clip_grad_norm_` and makes its
    default AdamW a :class:`lsh_torch.LazyAdam` (transformers' Trainer does neither: its ``clip_grad_norm_``
    and AdamW refuse sparse gradients). The patch survives ``torch.save(model)``, pickling and spawned workers.

    Raises:
        TypeError: ``model`` is not a transformers model with a linear output head.
        ValueError: its ``model_type`` is not one of :data:`SUPPORTED_MODEL_TYPES`, or it is not that
            type's causal-LM class (``GPT2DoubleHeadsModel``'s second loss would be lost), it is patched
            already, ``lsh_kwargs`` are given for a head that is an LSHLinear already, or ask for
            ``inference="lsh"`` (eval stays exact).
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model has model_type {model_type!r}; patch() supports {SUPPORTED_MODEL_TYPES}, whose "
                         "logits are the output head's outputs unchanged")
    causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if causal_lm not in (cls.__name__ for cls in type(model).__mro__):
        # GPT2DoubleHeadsModel is a "gpt2" too: its multiple-choice head's loss would be dropped, silently.
        raise ValueError(f"model is a {type(model).__name__}; patch() supports the causal-LM class of its model_type, "
                         f"{causal_lm} (and its subclasses), whose only loss is the output head's")
    if getattr(model, "_lsh_torch_patched", False):
        raise ValueError("model is patched already")
    label_smoothing = check_label_smoothing(label_smoothing)
    if lsh_kwargs.get("inference", "dense") != "dense":
        raise ValueError(f"inference={lsh_kwargs['inference']!r}: patch() keeps eval and generate() exact (the softmax "
                         "over a zero-filled LSH forward would count every unscored word as logit 0); for a sparse "
                         "retrieval of the best words use model.get_output_embeddings().topk(hidden, k)")
    head = model.get_output_embeddings()
    if isinstance(head, LSHLinear):
        if lsh_kwargs:
            raise ValueError(f"model's output head is an LSHLinear already; lsh_kwargs {sorted(lsh_kwargs)} would "
                             "be ignored")
    elif isinstance(head, nn.Linear):
        head = convert(head, filter=lambda name, module: True, **lsh_kwargs)
        model.set_output_embeddings(head)
    else:
        raise TypeError(f"model must have an nn.Linear output head (model.get_output_embeddings()), got "
                        f"{type(head).__name__}")

    embedding = model.get_input_embeddings()
    if head.sparse_grad and getattr(embedding, "weight", None) is head.weight and not getattr(embedding, "sparse", False):
        warnings.warn("patch(sparse_grad=True): the head's weight is the input embedding's (tied), whose gradient is "
                      "dense, so the weight's gradient (the sum of both) is dense too; sparse_grad applies to untied "
                      "heads (tie_word_embeddings=False)", stacklevel=user_stacklevel())
    original = model.forward  # the bound original (or whatever wraps it, e.g. accelerate's hooks)
    # None for the class's own forward: a pickled bound method is re-read by name (getattr) on load
    model._lsh_torch_forward = None if _is_class_forward(model, original) else original
    model.forward = _PatchedForward(model)
    model._lsh_torch_patched = True
    model._lsh_torch_label_smoothing = label_smoothing
    model._lsh_torch_output = _output_class(type(model))  # read here: dynamo warns of a cached helper in a graph
    return model


def unpatch(model: PreTrainedModel) -> PreTrainedModel:
    """Undo :func:`patch`, in place: the model's own forward again, and its output head an
    ``nn.Linear`` holding the same parameters (:func:`lsh_torch.unconvert`); returns ``model``."""
    if not getattr(model, "_lsh_torch_patched", False):
        raise ValueError("model is not patched")
    original = model._lsh_torch_forward
    if original is None:
        del model.forward  # the class's own again, not an instance attribute
    else:
        model.forward = original  # what wrapped it before the patch (accelerate's hooks, ...)
    head = model.get_output_embeddings()
    if isinstance(head, LSHLinear):
        model.set_output_embeddings(unconvert(head))
    for name in ("_lsh_torch_forward", "_lsh_torch_patched", "_lsh_torch_label_smoothing", "_lsh_torch_output"):
        delattr(model, name)
    return model


def _is_class_forward(model, method) -> bool:
    return isinstance(method, types.MethodType) and method.__self__ is model and method.__func__ is type(model).forward


class _PatchedForward:
    """The patched ``model.forward``: an object (not a closure) so that pickle, ``torch.save(model)`` and
    spawned workers keep the patch; its signature is the model's forward's, which Trainer and generate() read."""

    def __init__(self, model):
        self.model = model

    @property
    def __signature__(self):
        return inspect.signature(_class_forward(self.model))

    @property
    def __code__(self):  # torch.export (non-strict) names its shape environment after the forward's code
        return type(self.model).forward.__code__

    def __call__(self, *args, **kwargs):
        return _forward(self.model, *args, **kwargs)


def _class_forward(model):
    return type(model).forward.__get__(model)


def _original_forward(model):
    original = model._lsh_torch_forward
    return _class_forward(model) if original is None else original


def _forward(model: PreTrainedModel, *args, **kwargs):
    if not isinstance(model.get_output_embeddings(), LSHLinear):  # unconverted by hand (lsh_torch.unconvert)
        return _original_forward(model)(*args, **kwargs)
    bound = inspect.signature(type(model).forward).bind(model, *args, **kwargs)
    arguments = dict(bound.arguments)
    labels = arguments.pop("labels", None)
    if not model.training or labels is None:
        with _dense(model.get_output_embeddings()):
            return _original_forward(model)(*args, **kwargs)
    del arguments["self"]
    logits_to_keep = arguments.pop("logits_to_keep", 0)
    for name, parameter in inspect.signature(type(model).forward).parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    num_items_in_batch = arguments.pop("num_items_in_batch", None)
    shift_labels = arguments.pop("shift_labels", None)
    ignore_index = arguments.pop("ignore_index", -100)
    return_dict = arguments.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)

    outputs = model.base_model(**arguments, return_dict=True)
    # The positions the unpatched model scores: the last logits_to_keep (0: all), or those a tensor selects.
    hidden = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
    loss = _sparse_loss(model.get_output_embeddings(), hidden, labels, shift_labels, ignore_index, num_items_in_batch,
                        model._lsh_torch_label_smoothing)
    output = model._lsh_torch_output
    fields = {f.name for f in dataclasses.fields(output)}
    result = output(loss=loss, logits=None, **{name: value for name, value in outputs.items() if name in fields})
    # As a tuple, logits keep their place (None) after the loss, as in the unpatched model's tuple.
    return result if return_dict else (loss, None) + tuple(v for k, v in result.items() if k != "loss")


def _output_class(cls: type) -> type:
    """The output class the model's forward returns (GPT-2's has cross-attentions), read off its annotation."""
    returned = typing.get_type_hints(cls.forward).get("return")
    for candidate in typing.get_args(returned) or (returned,):
        if isinstance(candidate, type) and issubclass(candidate, ModelOutput) and \
                {"loss", "logits"} <= {f.name for f in dataclasses.fields(candidate)}:
            return candidate
    return CausalLMOutputWithPast


def _sparse_loss(head: LSHLinear, hidden: Tensor, labels: Tensor, shift_labels, ignore_index: int,
                 num_items_in_batch, label_smoothing: float = 0.0) -> Tensor:
    given = labels if shift_labels is None else shift_labels
    if given.dtype.is_floating_point or given.dtype.is_complex or given.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of token ids, got {given.dtype}")
    if given.shape != hidden.shape[:-1]:  # the positions scored: input_ids', or those logits_to_keep keeps
        raise ValueError(f"labels must have the shape of the scored positions, {tuple(hidden.shape[:-1])}, got "
                         f"{tuple(labels.shape)}" if shift_labels is None else
                         f"shift_labels (already shifted: not shifted again) must have the shape of the scored "
                         f"positions, {tuple(hidden.shape[:-1])} (-100 where nothing is predicted), got "
                         f"{tuple(shift_labels.shape)}")
    if shift_labels is None:  # as transformers' ForCausalLMLoss: position t predicts label t + 1
        hidden, targets = hidden[..., :-1, :], labels[..., 1:]
    else:
        targets = shift_labels
    targets = targets.reshape(-1).to(device=hidden.device, dtype=torch.int64)
    keep = targets != ignore_index  # ignored positions never reach the lookup or the head
    hidden, targets = hidden.reshape(-1, hidden.shape[-1])[keep], targets[keep]
    refuse((targets < 0) | (targets >= head.out_features),  # synced: the masks above waited for the device
           f"labels must be {ignore_index} (ignored) or in [0, vocab size = {head.out_features})",
           lambda bad: f", got {targets[bad][0].item()}", synced=True)
    output = head.forward_sparse(hidden, targets)  # scored in float32, as the unpatched loss upcasts its logits
    loss = sparse_cross_entropy(output._replace(values=output.values.float()), targets, reduction="sum",
                                label_smoothing=label_smoothing)
    if num_items_in_batch is None:
        return loss / max(1, targets.numel())
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


@contextlib.contextmanager
def _dense(head: LSHLinear):
    """The head's exact path for one call: in training mode too, calls without labels get the
    unpatched model's logits (a training-mode LSHLinear.forward would be zero outside its active set),
    and a head converted by hand with inference="lsh" is dense here."""
    training, inference = head.training, head.inference
    head.training, head.inference = False, "dense"
    try:
        yield
    finally:
        head.training, head.inference = training, inference


class Trainer(_Trainer):
    """transformers' ``Trainer`` for a patched model:

    * **Exact resumes.** Its checkpoints hold :func:`lsh_torch.lsh_state` (``lsh_state.pt``, beside the
      optimizer's state), which ``train(resume_from_checkpoint=...)`` loads: the heads' tables and step
      counters go on as in the uninterrupted run. (transformers' own ``Trainer`` resumes with the tables
      rebuilt from the checkpoint's weights and the counters at 0: training goes on, not bit for bit.)
      The state is the saving process's, as the weights are: right for heads replicated over the processes
      (DDP), not for a model holding :class:`~lsh_torch.ShardedLSHLinear` shards (each rank's differ).
      ``save_only_model`` checkpoints hold no optimizer and no lsh_state.
    * **Row-sparse gradients** (``patch(model, sparse_grad=True)`` with an untied head, sparse
      embeddings): the gradients' norm, which transformers measures at every step (and clips with
      ``max_grad_norm > 0``), is :func:`lsh_torch.clip_grad_norm_`'s where a gradient is sparse
      (``torch.nn.utils.clip_grad_norm_`` refuses them). Its default optimizer, AdamW (``optim="adamw_torch"``
      or ``"adamw_torch_fused"``), which refuses sparse gradients, is then :class:`lsh_torch.LazyAdam` with
      the same parameter groups, ``lr``, betas, eps and weight decay: AdamW's step on dense gradients, and
      on the rows a sparse gradient touches. Other optimizers are transformers' (``optimizers=`` as usual).

    Everything else is transformers' ``Trainer``."""

    LSH_STATE = "lsh_state.pt"  # the checkpoint file of lsh_state(model)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:  # (every checkpoint but save_only_model's)
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            torch.save(lsh_state(self.model), os.path.join(output_dir, self.LSH_STATE))

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:  # (on resume, after the weights were loaded)
        super()._load_optimizer_and_scheduler(checkpoint)
        path = None if checkpoint is None else os.path.join(checkpoint, self.LSH_STATE)
        if path is not None and os.path.isfile(path):  # (a checkpoint of transformers' Trainer has none)
            # (On the CPU first: a GPU run's checkpoint resumes on a CPU machine, each rank's on its own device.)
            load_lsh_state(self.model, torch.load(path, map_location="cpu", weights_only=True))

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None) -> tuple:
        """transformers' choice from ``args``; AdamW becomes LazyAdam for a model with a sparse-gradient head."""
        cls, kwargs = _Trainer.get_optimizer_cls_and_kwargs(args, model)
        sparse = model is not None and any(isinstance(m, LSHLinear) and m.sparse_grad for m in model.modules())
        if sparse and cls is torch.optim.AdamW:  # (fused / foreach: AdamW's kernels, not LazyAdam's)
            return LazyAdam, {name: kwargs[name] for name in ("lr", "betas", "eps") if name in kwargs}
        return cls, kwargs

    def create_accelerator_and_postprocess(self) -> None:  # (at construction, and anew by hyperparameter_search)
        super().create_accelerator_and_postprocess()
        accelerator = self.accelerator
        dense_clip = accelerator.clip_grad_norm_

        def clip_grad_norm_(parameters, max_norm, norm_type=2, **kwargs):
            parameters = list(parameters)
            if not any(p.grad is not None and p.grad.is_sparse for p in parameters):
                return dense_clip(parameters, max_norm, norm_type, **kwargs)
            accelerator.unscale_gradients()  # (mixed precision's loss scale, as the accelerator's own clip does)
            return _clip_sparse_grad_norm_(parameters, max_norm, norm_type)
        accelerator.clip_grad_norm_ = clip_grad_norm_
