"""transformers' ``Trainer`` for peftkit models: :class:`PeftTrainer`.

``transformers.Trainer`` recognises PEFT models only as instances of the ``peft`` package's classes.
Given a peftkit :class:`~peftkit.PeftModel` it trains and evaluates (the model's ``forward`` shows the
wrapped model's arguments and ``labels``, so ``remove_unused_columns`` and ``label_names`` come out
right for most models), but it saves and reloads the whole state dict instead of the adapter, which
fails on a model with tied weights (GPT-2's embedding and LM head). :class:`PeftTrainer` is
``transformers.Trainer`` with those places taught about peftkit models (label names come from the
wrapped model's class, so question answering's ``start_positions`` too); everything else (optimiser, schedules,
gradient accumulation, DDP via ``torchrun``/``accelerate launch``, activation checkpointing through
the base model's ``activation_checkpointing_enable``, callbacks, logging) is transformers' own::

    from peftkit import LoraConfig, get_peft_model
    from peftkit.train.hf_trainer import PeftTrainer

    model = get_peft_model(base, LoraConfig(r=8, task_type="SEQ_CLS"))
    trainer = PeftTrainer(model=model, args=TrainingArguments(...), train_dataset=..., eval_dataset=...)
    trainer.train()                       # checkpoints hold adapter files
    trainer.train(resume_from_checkpoint=True)
    trainer.save_model("out")             # out/adapter_config.json + adapter_model.safetensors

Saved folders hold the adapter in HF PEFT format (``save_pretrained``), the tokenizer or processor,
and ``training_args.json`` (JSON instead of transformers' pickled ``training_args.bin``). Checkpoints of
an adapter whose file holds another form than it trains in (P-tuning's and prefix tuning's encoder, which
the file holds folded into the tokens; diff pruning's dense differences, written as their non-zero entries)
also hold the trainable parameters as they are (``training_state.safetensors``), as do those of an AdaLoRA
adapter once it pruned ranks (the file holds only the kept triplets); what a method keeps outside its parameters
(AdaLoRA's rank masks and importance averages) goes to ``method_state.safetensors``. A resumed run continues
exactly from them. Models that
are not peftkit models are handled exactly as by ``transformers.Trainer``.

It also runs peftkit's training hooks, as :class:`peftkit.train.Trainer` does: the adapters' loss terms
(AdaLoRA's orthogonality penalty, MoE-LoRA's load balancing, AdapterFusion's value regulariser) are added
to the training loss, once per optimiser step under gradient accumulation (the forward runs inside
``loss_terms_added_by_caller()``, so its own AdaLoRA penalty is not counted again), and evaluation losses
are the task's alone; ``peft_step_end(step)`` runs after every optimiser step, before the gradients are
cleared (AdaLoRA's rank allocation, SoRA, diff pruning); and ``peft_prepare`` gets the training batches
before the optimiser is built (the FISH and Child-Tuning masks). The plain ``transformers.Trainer`` runs
none of these hooks; its loss holds only what ``PeftModel.forward`` adds, as with peft: AdaLoRA's penalty,
in training and evaluation, once per micro-batch.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from transformers import Trainer, TrainerCallback
from transformers.utils import can_return_loss, find_labels

from peftkit.config import WEIGHTS_NAME, ConfigError
from peftkit.formats.hf_peft import atomic_write_bytes, load_saved_state, read_adapter_files
from peftkit.layers import unmerged_base_values, unmerged_for_load
from peftkit.model import PeftModel
from peftkit.train.trainer import check_optimizer_after_prepare

log = logging.getLogger("peftkit")


class _StepEnd(TrainerCallback):
    """Calls ``peft_step_end(step)`` (1-based) after each optimiser step, before the gradients are cleared."""

    def __init__(self, trainer: PeftTrainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        peft = self.trainer._peft_model()
        if peft is not None:
            peft.peft_step_end(state.global_step + 1)


def load_adapter_weights(model: PeftModel, folder: str | os.PathLike) -> None:
    """Copy the weights of every adapter of ``model`` from a folder written by ``save_pretrained``
    (``"default"`` in ``folder``, others in ``folder/<name>``), in place, keeping trainability.

    An AdaLoRA adapter saved after pruning holds only its kept triplets (``rank_pattern``); loaded into
    the model it was trained in, which holds all ``init_r``, the kept ones go to their places, the pruned
    ones are zero and masked, and the rank pattern is the file's: the adapter computes what was saved.
    (What the file does not hold starts afresh: the pruned triplets' ``A``/``B`` rows, which still enter
    the orthogonality penalty, and the importance averages of the rank allocation. ``PeftTrainer``'s
    ``resume_from_checkpoint`` restores both from the checkpoint's ``training_state.safetensors`` and
    ``method_state.safetensors`` instead.)

    Raises:
        FileNotFoundError: an adapter's ``adapter_model.safetensors`` is missing.
        AdapterLoadError: a file is unreadable (checked for every adapter before any is copied), or the tensors
            do not fit the model (nothing is copied for that adapter).
    """
    files = {}
    for name in model.peft_config:
        source = os.fspath(folder) if name == "default" else os.path.join(folder, name)
        if not os.path.isfile(os.path.join(source, WEIGHTS_NAME)):
            raise FileNotFoundError(f"{source!r} holds no {WEIGHTS_NAME} for adapter {name!r}; was it written by "
                                    "PeftTrainer (or PeftModel.save_pretrained)?")
        files[name] = read_adapter_files(source)
    for name, (config, tensors) in files.items():
        load_saved_state(model, tensors, name, config)


TRAINING_STATE = "training_state.safetensors"
METHOD_STATE = "method_state.safetensors"


def _save_atomically(tensors: dict[str, torch.Tensor], path: str) -> None:
    atomic_write_bytes(path, save(tensors, metadata={"format": "pt"}))


def _read_state_file(path: str, names_only: bool = False) -> dict[str, torch.Tensor] | set[str]:
    """The tensors of a checkpoint's :data:`TRAINING_STATE` or :data:`METHOD_STATE` file, or with ``names_only``
    just their names (read from the header; the tensors are not loaded).

    Raises:
        ConfigError: the file is not a readable safetensors file (truncated, damaged), naming it.
    """
    try:
        if names_only:
            with safe_open(path, "pt") as fh:
                return set(fh.keys())
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{path!r} is not a readable safetensors file ({err}); the checkpoint is damaged: resume "
                          "from another checkpoint") from None


def saved_form_differs(model: PeftModel) -> bool:
    """Whether loading ``model``'s adapter files back would replace its trainable parameters by another form
    (see :meth:`peftkit.host.AdapterModel.saved_form_differs`)."""
    return model.base_model.saved_form_differs()


def _load_training_state(model: PeftModel, folder: str) -> None:
    """Copy the trainable parameters from ``folder``'s :data:`TRAINING_STATE` (checked whole first).

    Raises:
        ConfigError: the file is missing or unreadable, or its names or shapes differ from the model's trainable
            parameters.
    """
    path = os.path.join(folder, TRAINING_STATE)
    check_msg = (f"{folder!r} cannot resume this model: its adapter file holds the saved form (folded prompt "
                 "encoder, sparse diff-pruning differences, pruned AdaLoRA ranks), which would replace the form the "
                 "model trains in")
    if not os.path.isfile(path):
        raise ConfigError(f"{check_msg}, and it has no {TRAINING_STATE} (written by PeftTrainer checkpoints) to "
                          "resume from")
    saved = _read_state_file(path)
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    wrong = sorted(set(saved) ^ set(own)) or [n for n in own if saved[n].shape != own[n].shape]
    if wrong:
        raise ConfigError(f"{path!r} does not fit the model's trainable parameters (e.g. {wrong[:2]}); resume with "
                          "the model and config the checkpoint was written by")
    with torch.no_grad(), unmerged_for_load(model):  # the values are unmerged ones
        for n, p in own.items():
            p.copy_(saved[n])


class PeftTrainer(Trainer):
    """``transformers.Trainer`` that saves, resumes and evaluates peftkit models as adapters.

    Takes exactly ``transformers.Trainer``'s arguments. For a peftkit :class:`~peftkit.PeftModel`:
    ``label_names`` (unless given) and ``can_return_loss`` come from the wrapped model's class,
    ``remove_unused_columns`` keeps the wrapped model's forward arguments (and ``adapter_names``),
    checkpoints and ``save_model`` write the adapter files, and ``resume_from_checkpoint`` /
    ``load_best_model_at_end`` load them back.
    """

    def __init__(self, model: Any = None, args: Any = None, *rest: Any, **kwargs: Any) -> None:
        super().__init__(model, args, *rest, **kwargs)
        peft = self._peft_model()
        if peft is not None:
            base_class = type(peft.get_base_model())
            if self.args.label_names is None:
                self.label_names = find_labels(base_class)
            self.can_return_loss = can_return_loss(base_class)
            self.add_callback(_StepEnd(self))

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """transformers' loss plus, in training, the adapters' loss terms (``peft_regularization()``) once per
        optimiser step: each micro-batch adds ``1/N`` of them under ``N``-step gradient accumulation when
        the loss is already scaled for it (normalised by ``num_items_in_batch``), else the whole term (the
        trainer then divides the micro-batch loss by ``N`` itself)."""
        peft = self._peft_model(model)
        if peft is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        # every loss term (AdaLoRA's included, which the forward would add to each micro-batch) is added here
        with peft.loss_terms_added_by_caller():
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            extra = peft.peft_regularization() if model.training else None
        if extra is None:
            return out
        scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        if self.loss_is_scaled_for_ga is not None:
            scaled = self.loss_is_scaled_for_ga
        if scaled:
            extra = extra / self.current_gradient_accumulation_steps
        if return_outputs:
            loss, outputs = out
            return loss + extra, outputs
        return out + extra

    def create_optimizer(self, model: Any = None) -> Any:
        """Before transformers builds the optimiser, the adapters that choose their parameters from data (FISH,
        Child-Tuning) see the training batches (``peft_prepare``); the batches are drawn only if one does.
        ``model``: as transformers' ``create_optimizer`` (default None: the trainer's model)."""
        peft = self._peft_model(model)
        if peft is not None and self.train_dataset is not None:
            def batches() -> Any:  # lazy: methods that need no data never create the loader; one pass at most
                for batch in self.get_train_dataloader():
                    yield self._prepare_inputs(batch)

            before = {id(p) for p in peft.parameters()}
            peft.peft_prepare(batches())
            if self.optimizer is not None:  # given by the user (optimizers=(...)): it must hold what prepare made
                check_optimizer_after_prepare(peft, self.optimizer, before)
        return super().create_optimizer(model)

    def _peft_model(self, model: Any = None) -> PeftModel | None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        return model if isinstance(model, PeftModel) else None

    def _set_signature_columns_if_needed(self) -> None:
        peft = self._peft_model()
        if self._signature_columns is None and peft is not None:
            columns = list(inspect.signature(peft.get_base_model().forward).parameters)
            self._signature_columns = [*columns, "adapter_names", "label", "label_ids", *self.label_names]
        super()._set_signature_columns_if_needed()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        peft = self._peft_model()
        if peft is None:
            super()._save(output_dir, state_dict)
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        peft.save_pretrained(output_dir, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return
        if saved_form_differs(peft):  # what a resumed run needs: the parameters as they train
            unmerged = unmerged_base_values(peft)  # a trained base bias a merge changed is written unmerged
            _save_atomically({n: unmerged.get(n, p).detach().contiguous() for n, p in peft.named_parameters()
                              if p.requires_grad}, os.path.join(output_dir, TRAINING_STATE))
        method = peft.base_model.method_state()
        if method:  # and what the methods keep beside them (AdaLoRA's rank masks and importance averages)
            _save_atomically({k: v.detach().contiguous() for k, v in method.items()},
                             os.path.join(output_dir, METHOD_STATE))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        atomic_write_bytes(os.path.join(output_dir, "training_args.json"), self.args.to_json_string().encode())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        peft = self._peft_model(model)
        if peft is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        method_path = os.path.join(resume_from_checkpoint, METHOD_STATE)
        method = _read_state_file(method_path) if os.path.isfile(method_path) else {}
        peft.base_model.load_method_state(method, check_only=True)
        state = os.path.join(resume_from_checkpoint, TRAINING_STATE)
        if os.path.isfile(state):  # the parameters in the form they train in
            names = _read_state_file(state, names_only=True)
            own = {n for n, p in peft.named_parameters() if p.requires_grad}
            if names != own:  # written for a model in training form: this one is folded or sparse already
                raise ConfigError(f"{resume_from_checkpoint!r} was written while the adapter trained in another form "
                                  "(an unfolded prompt encoder, or dense diff-pruning differences) than this model "
                                  "holds; resume into a model built with get_peft_model and the same config")
            _load_training_state(peft, resume_from_checkpoint)
        elif saved_form_differs(peft):
            _load_training_state(peft, resume_from_checkpoint)  # refused: the file is missing
        else:
            load_adapter_weights(peft, resume_from_checkpoint)
        peft.base_model.load_method_state(method)

    def _load_best_model(self) -> None:
        peft = self._peft_model()
        if peft is None:
            super()._load_best_model()
            return
        log.info("loading the best adapter from %s (score %s)", self.state.best_model_checkpoint,
                 self.state.best_metric)
        load_adapter_weights(peft, self.state.best_model_checkpoint)
