"""Soft prompts: what prompt tuning, P-tuning and prefix tuning (the "prompt" kind) share.

These methods leave every layer alone and change what the frozen model sees: ``P`` virtual tokens
prepended to the input embeddings (prompt tuning, P-tuning) or ``P`` key/value pairs prepended at
every attention layer (prefix tuning, P-tuning v2). A forward pre-hook and a forward hook on the
adapted model rewrite each call to it, so one code path serves ``PeftModel.forward``, every step of
``generate()`` and a direct call of the base model; generation therefore agrees with the forward that
training uses by construction.

How a call is rewritten (``L`` real tokens, ``B`` rows):

- the first call of a sequence (no cache, or an empty one) inserts the virtual tokens: embeddings
  before the input's embeddings, or key/value prefixes written into the cache (a transformers
  ``DynamicCache``; the model's own one during ``generate()``);
- a later call whose cache already holds them (cached generation steps, or a caller's own loop over a
  returned cache) only extends the mask and shifts the positions;
- ``attention_mask`` (2-D, real tokens only, as for the base model) gets ``P`` ones in front;
- positions: a real token sits at ``o + P + (cumsum(attention_mask) - 1)`` (padding at ``o + P``), the
  virtual tokens of prompt methods at ``o..o+P-1``, with ``o`` the model's first position (0; RoBERTa's
  family: ``padding_idx + 1``; Nystromformer: 2); without padding that is HF PEFT's ``o+P..o+P+L-1``, with left padding
  each row sees the positions it would see alone. Given ``position_ids`` are shifted by P;
- ``token_type_ids`` get ``P`` zeros in front when embeddings are inserted;
- token-level ``labels`` ``(B, L)`` get ``P`` values of -100 in front; for a causal LM the first real
  label is ignored as well, so the loss counts exactly the targets the base model's loss counts;
- token-level ``logits`` come back for the real tokens only, ``(B, L, ...)``;
- a decoder's sequence classifier (Llama's, GPT-2's: it pools the last token that is not
  ``pad_token_id``, which it finds from ``input_ids`` only) gets inserted embeddings with each row's
  trailing padding moved in front of its real tokens, masked, so that the last position is the one it
  would pool; positions are taken before the move, so each row equals the row alone. Its hidden states,
  if returned, are in that order.

On an encoder-decoder model (T5, BART) hooks on its encoder and decoder do this instead, as peft's
``PeftModelForSeq2SeqLM``: prompt tuning and P-tuning put the virtual tokens before the encoder's input
(:class:`EncoderPromptHooks`), prefix tuning writes its prefixes into the decoder's self-attention cache
(:class:`DecoderPrefixHooks`).

While the adapter is inactive, ``disable_adapter()`` is in force, or the model is unloaded, nothing
is rewritten. Mixed-adapter batches (``adapter_names=``) naming a prompt adapter raise ``ValueError``.

Papers of the methods built on this machinery (each method's module gives the details):
  Lester et al., "The Power of Scale for Parameter-Efficient Prompt Tuning", 2021, arXiv:2104.08691
    (:mod:`peftkit.methods.prompt_tuning`).
  Liu et al., "GPT Understands, Too", 2021, arXiv:2103.10385 (P-tuning, :mod:`peftkit.methods.p_tuning`).
  Li and Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", 2021, arXiv:2101.00190, and
    Liu et al., "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across Scales and
    Tasks", 2021, arXiv:2110.07602 (:mod:`peftkit.methods.prefix_tuning`).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from peftkit.config import PeftConfig, check
from peftkit.layers import onloaded, unwrap
from peftkit.methods.gating import rewritten_mask
from peftkit.tuners import Tuner

if TYPE_CHECKING:
    from peftkit.host import AdapterModel


#: True while an adapter is built to receive a file's values (``from_pretrained`` / ``load_adapter``): an
#: initialisation that needs more than the model (prompt tuning's TEXT start reads a tokenizer) is skipped
LOADING_VALUES: contextvars.ContextVar[bool] = contextvars.ContextVar("peftkit_loading_values", default=False)


@contextlib.contextmanager
def loading_values() -> Iterator[None]:
    """Context: adapters built inside get their values from a file next (see :data:`LOADING_VALUES`)."""
    token = LOADING_VALUES.set(True)
    try:
        yield
    finally:
        LOADING_VALUES.reset(token)


def _positive_or_none(config: Any, name: str, required: bool = False) -> None:
    value = getattr(config, name)
    check(value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0),
          f"{name}={value!r} is not valid; it must be an integer > 0"
          + ("" if required else " or None (read from the model)"))


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields every soft-prompt method has (as ``peft.PromptLearningConfig``).

    Args:
        num_virtual_tokens: ``P``, the number of virtual tokens, > 0 (required).
        token_dim: width of one virtual token; None reads it from the model (its input embedding width; for prefix
            tuning the key/value width ``num_key_value_heads * head_dim``).
        num_transformer_submodules: ``S``, 1 (decoder-only and encoder-only models) or 2 (encoder-decoder
            models, peft's ``SEQ_2_SEQ_LM`` layout); None reads it from the model (2 for an encoder-decoder).
            The trained table has ``S * P`` rows, as peft's; only the first ``P`` are prepended (to the encoder's
            input), as peft does with prompt tuning and P-tuning.
        num_attention_heads / num_layers: read from the model when None; written to the file for peft.
        modules_to_save: modules trained in full and saved with the adapter (``SEQ_CLS`` adds the head).

    Raises:
        ConfigError: a missing or non-positive ``num_virtual_tokens``, a non-positive size, or
            ``num_transformer_submodules`` other than 1 or 2 (2 is checked against the model at injection).
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    @property
    def total_virtual_tokens(self) -> int:
        """``S * P``, the rows of the trained table (``S`` = ``num_transformer_submodules``, 1 when None)."""
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)

    def validate(self) -> None:
        check(self.num_virtual_tokens is not None, "num_virtual_tokens is required: the number P of virtual "
                                                   "tokens, an integer > 0 (e.g. 20)")
        for name in ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers"):
            _positive_or_none(self, name, required=name == "num_virtual_tokens")
        check(self.num_transformer_submodules in (None, 1, 2),
              f"num_transformer_submodules={self.num_transformer_submodules!r} is not valid; use 1 (decoder-only "
              "and encoder-only models), 2 (encoder-decoder models) or None (read from the model)")
        check(self.modules_to_save is None or (isinstance(self.modules_to_save, list)
                                               and all(isinstance(m, str) for m in self.modules_to_save)),
              f"modules_to_save={self.modules_to_save!r} must be a list of module names or None")


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a transformer that virtual tokens must fit (from ``model.config``).

    Attributes:
        hidden_size: width of the hidden states. num_layers: transformer blocks (of the decoder, or of each
            stack). num_heads / num_kv_heads: attention and key/value heads. head_dim: width of one head.
        embed_dim: the input embeddings' width (the hidden size, or less: ALBERT, ELECTRA-small, OPT-350m).
        encoder_decoder: T5, BART, ...: the virtual tokens go before the encoder's input. Default False.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    embed_dim: int  # the input embeddings' width: the hidden size, or less (ALBERT, ELECTRA-small, OPT-350m)
    encoder_decoder: bool = False  # T5, BART, ...: the virtual tokens go before the encoder's input


def submodules(config: Any, shape: ModelShape) -> int:
    """The ``num_transformer_submodules`` a config gets on a model: for an encoder-decoder model the given
    value, 2 when None (peft's ``SEQ_2_SEQ_LM`` default); else 1 (a given 2 is then refused by :func:`settle`)."""
    given = config.num_transformer_submodules
    return (2 if given is None else given) if shape.encoder_decoder else 1


def model_shape(model: nn.Module, method: str | None = None) -> ModelShape:
    """Read the sizes from a transformers model's config.

    Args:
        method: the name of a method that supports encoder-decoder models (prompt tuning, P-tuning, prefix
            tuning), or None for one that does not (LLaMA-Adapter), which refuses them.

    Raises:
        ConfigError: the model has no transformers config; an encoder-decoder model when ``method`` is None,
            or one without ``get_encoder()`` / ``get_decoder()``.
    """
    cfg = getattr(model, "config", None)
    check(cfg is not None and hasattr(cfg, "get_text_config"),
          f"soft-prompt methods need a transformers model (with .config); got {type(model).__name__}")
    encoder_decoder = bool(getattr(cfg, "is_encoder_decoder", False))
    check(not encoder_decoder or method is not None,
          f"{type(model).__name__} is an encoder-decoder model; this method supports decoder-only and "
          "encoder-only models (prompt tuning, P-tuning and prefix tuning also support encoder-decoder ones)")
    check(not encoder_decoder or (hasattr(model, "get_encoder") and hasattr(model, "get_decoder")),
          f"{type(model).__name__} is an encoder-decoder model without get_encoder()/get_decoder(); {method} "
          "needs both to reach the encoder and the decoder")
    check(not type(model).__name__.endswith("ForMultipleChoice"),
          f"{type(model).__name__} takes (batch, choices, length) inputs; soft prompts support models whose inputs "
          "are (batch, length) for now")
    text = cfg.get_text_config()
    hidden, heads = int(text.hidden_size), int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    if getattr(text, "multi_query", False) and not getattr(text, "new_decoder_architecture", True):
        kv_heads = 1  # Falcon-7B's layout: one key/value head, whatever its config's num_kv_heads says
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    words = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    embed = int(getattr(words, "embedding_dim", None) or hidden)
    return ModelShape(hidden, int(text.num_hidden_layers), heads, kv_heads, head_dim, embed, encoder_decoder)


def position_table(model: nn.Module) -> tuple[int | None, int]:
    """``(usable, offset)`` of a model's positions. ``offset``: the position id of a sequence's first token,
    ``padding_idx + 1`` where the learned table reserves the rows up to the padding index (RoBERTa's family),
    the first entry of the embeddings' ``position_ids`` buffer where that is not 0 (Nystromformer's 2), else
    0. ``usable``: how many positions a learned absolute table leaves from there (BERT's
    ``max_position_embeddings``, GPT-2's ``n_positions``; RoBERTa's 2 fewer), or None when positions are not
    a fixed table (rotary, relative, ALiBi). Virtual tokens take positions of that table, one each."""
    offset, table = 0, None
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] == "position_embeddings" and isinstance(m, nn.Embedding):
            table = m
            if m.padding_idx is not None:
                offset = m.padding_idx + 1
            else:
                ids = getattr(model.get_submodule(name.rpartition(".")[0]), "position_ids", None)
                offset = int(ids.flatten()[0]) if isinstance(ids, Tensor) and ids.numel() else 0
            break
    text = model.config.get_text_config()
    n = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    if not isinstance(n, int) or getattr(text, "position_embedding_type", "absolute") != "absolute":
        return None, offset
    if table is None:
        words = model.get_input_embeddings()
        table = next((m for m in model.modules() if isinstance(m, nn.Embedding) and m is not words
                      and m.num_embeddings in (n, n + offset)), None)
    return (None if table is None else table.num_embeddings - offset), offset


def settle(config: Any, **model_values: int) -> None:
    """Fill the named config fields from the model; a given value must agree (all checked first).

    Raises:
        ConfigError: a given value differs from the model's (the config is then left unchanged).
    """
    for name, value in model_values.items():
        given = getattr(config, name)
        check(given is None or given == value,
              f"{name}={given!r} does not fit the model, which needs {value}; leave it None to read it from the model "
              "(an adapter file's value is that of the model it was trained on)")
    for name, value in model_values.items():
        setattr(config, name, value)


class VirtualTokens(nn.Module):
    """The trainable source of one adapter's virtual tokens: ``forward() -> (P, width)``.

    ``embedding.weight`` ``(P, in_width)`` is the trained table. A subclass with a training-time
    reparameterisation (an MLP or LSTM producing the tokens) sets ``head_names`` and :meth:`project`;
    :meth:`fold` replaces the table by the projection's output and drops the heads, exactly (the folded
    tokens are the projection's outputs). Without heads the module is folded from the start.
    """

    head_names: tuple[str, ...] = ()

    def __init__(self, num_tokens: int, width: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_tokens, width)
        self.folded = True

    @property
    def saved_form_differs(self) -> bool:
        """True until :meth:`fold`: files hold the projected tokens, not the table and heads that train."""
        return not self.folded

    def project(self, table: Tensor) -> Tensor:
        """The reparameterisation ``(P, in_width) -> (P, width)``; identity by default."""
        return table

    def forward(self) -> Tensor:
        """The virtual-token embeddings ``(P, width)``: the table itself once folded, else :meth:`project` of it."""
        # accelerate's hooks (cpu_offload) load an offloaded table only while it is read here
        hooked = "forward" in vars(self.embedding)
        with onloaded([self.embedding]) if hooked else contextlib.nullcontext():
            table = self.embedding.weight
            return table if self.folded else self.project(table)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the reparameterisation by its output (in eval mode, so dropout is off); exact."""
        if self.folded:
            return
        was_training = self.training
        self.eval()
        tokens = self.forward().detach().clone()
        self.train(was_training)
        trainable = self.embedding.weight.requires_grad
        self.embedding = nn.Embedding(*tokens.shape, device=tokens.device, dtype=tokens.dtype)
        self.embedding.weight.copy_(tokens)
        self.embedding.weight.requires_grad_(trainable)
        for name in self.head_names:
            delattr(self, name)
        self.folded = True

    @torch.no_grad()
    def saved(self) -> Tensor:
        """What HF PEFT writes as ``prompt_embeddings``: the tokens themselves (the table once folded), computed in
        eval mode (an LSTM encoder's dropout off, as :meth:`fold`), so that a save during training writes the
        tokens the adapter computes in use."""
        if self.folded:
            return self.embedding.weight
        was_training = self.training
        self.eval()
        try:
            return self.forward().detach().clone()
        finally:
            self.train(was_training)


class PromptTuner(Tuner):
    """Tuner base of the soft-prompt methods.

    Subclasses give :meth:`complete_config` (fill the model sizes into the config with :func:`settle`,
    which checks given values first), :meth:`build` (the :class:`VirtualTokens`) and, unless they
    prepend embeddings (``inserts_embeddings``), :meth:`insert`. ``inject`` keeps the module in
    ``host.extra_modules[name]`` and hooks the model; files hold ``prompt_embeddings`` (peft's key),
    the folded tokens.
    """

    inserts_embeddings = True
    method = "soft prompt"
    supports_encoder_decoder = False  # prompt tuning, P-tuning (encoder input) and prefix tuning (decoder cache) set it

    def encoder_decoder_hooks(self) -> type:
        """The hooks class that applies an adapter to an encoder-decoder model (when
        ``supports_encoder_decoder``): :class:`EncoderPromptHooks`, the virtual tokens before the encoder's input."""
        return EncoderPromptHooks

    def complete_config(self, config: Any, shape: ModelShape) -> None:  # pragma: no cover - abstract
        """Fill ``config``'s model-dependent sizes (``token_dim``, ``num_layers``, ...) from ``shape``, in
        place, with :func:`settle`.

        Raises:
            ConfigError: a size given in the config differs from the model's (the config is left unchanged).
        """
        raise NotImplementedError

    def build(self, config: Any, model: nn.Module, shape: ModelShape) -> VirtualTokens:  # pragma: no cover
        """A new adapter's :class:`VirtualTokens` for the completed ``config``: ``forward() -> (P, width)``.
        Built folded (the table only, no reparameterisation) when ``config.inference_mode``; ``inject``
        then moves it to the device of the model's input embeddings.

        Raises:
            NotImplementedError: a subclass that does not override it.
        """
        raise NotImplementedError

    def insert(self, call: PromptCall, tokens: Tensor) -> None:
        """Put the virtual ``tokens`` (``forward()`` of the module) into a first call's arguments."""
        call.prepend_embeddings(tokens)

    def check_reads_tokens(self, model: nn.Module) -> None:
        """Refuse a model that soft prompts cannot reach: one without a token-embedding table
        (``get_input_embeddings()`` an ``nn.Embedding``, or a peftkit wrapper of one: vision and audio models such
        as ViT, CLIP, Wav2Vec2 have patch or feature encoders instead) or, for a method that prepends embeddings
        (``inserts_embeddings``), whose forward (the encoder's, on an encoder-decoder model) takes no ``inputs_embeds``
        argument (CLIP's text model; Whisper, whose encoder reads audio features).

        Raises:
            ConfigError: naming the model class, its ``model_type``, what it lacks and the methods that do apply.
        """
        if not hasattr(getattr(model, "config", None), "get_text_config"):
            return  # not a transformers model: model_shape says so
        kind = model.config.model_type
        where = f"{type(model).__name__} (model_type={kind!r})"
        encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        others = ("LoRA, (IA)^3, BitFit or bottleneck adapters apply to it (give target_modules where the model "
                  "type has no defaults)")
        try:
            words = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            found = f"get_input_embeddings() gives {type(words).__name__}"
        except NotImplementedError:
            words, found = None, "get_input_embeddings() is not implemented"
        # (another adapter may wrap the table: a modules_to_save copy, a LoRA of a composition)
        check(isinstance(unwrap(words) if isinstance(words, nn.Module) else words, nn.Embedding),
              f"{self.method} needs a model that reads token embeddings, and {where} has no token-embedding table "
              f"({found}): soft prompts cannot reach its inputs; {others}")
        if not self.inserts_embeddings:
            return
        reader = model.get_encoder() if encoder_decoder and hasattr(model, "get_encoder") else model
        check("inputs_embeds" in inspect.signature(reader.forward).parameters,
              f"{self.method} prepends virtual tokens to the input embeddings, and {where}'s "
              f"{'encoder (' + type(reader).__name__ + ')' if reader is not model else 'forward'} takes no "
              f"inputs_embeds argument, so they cannot be passed in; {others}"
              + ("; prefix tuning, which writes the decoder's key/value cache, may also apply" if encoder_decoder
                 else ""))

    def inject(self, host: AdapterModel, config: Any, adapter_name: str) -> None:
        """Complete ``config`` from the model's shape (sizes it reads; restored on failure), build the
        :class:`VirtualTokens` into ``host.extra_modules[adapter_name]`` and install the hooks that rewrite
        each call of the model.

        Raises:
            ConfigError: the model has no token embeddings to extend (:meth:`check_reads_tokens`),
                ``num_virtual_tokens`` leaves no learned position for the input, the model's shape
                cannot be read (see :func:`model_shape`), or the config does not fit it.
        """
        model = host.model
        self.check_reads_tokens(model)
        shape = model_shape(model, self.method if self.supports_encoder_decoder else None)
        positions = position_table(model)[0]
        check(positions is None or config.num_virtual_tokens < positions,
              f"num_virtual_tokens={config.num_virtual_tokens} leaves no position for the input: "
              f"{type(model).__name__} has {positions} learned positions and the virtual tokens take one each; "
              f"use fewer than {positions} (an input then has up to {positions} - num_virtual_tokens tokens)")
        before = dict(config.__dict__)
        try:
            self.complete_config(config, shape)
            weight = model.get_input_embeddings().weight
            module = self.build(config, model, shape).to(weight.device)
        except BaseException:  # the sizes read from the model are not left in the caller's config
            config.__dict__.update(before)
            raise
        module.built_for_load = LOADING_VALUES.get()  # its first load folds it silently: that is how files load
        host.extra_modules[adapter_name] = module
        hooks = self.encoder_decoder_hooks() if shape.encoder_decoder else PromptHooks
        module.hooks = hooks(host, adapter_name, self)

    def remove(self, host: AdapterModel, adapter_name: str) -> None:
        if adapter_name in host.extra_modules:
            host.extra_modules[adapter_name].hooks.remove()

    def extra_tensors(self, host: AdapterModel, adapter_name: str) -> dict[str, Any]:
        return {"prompt_embeddings": host.extra_modules[adapter_name].saved()}

    def before_load(self, host: AdapterModel, adapter_name: str, tensors: dict[str, Tensor]) -> None:
        """Fold the adapter (files hold the tokens only); warn when it was training its reparameterisation, not
        built to take a file's values: from then on the table trains directly, without the heads."""
        module = host.extra_modules[adapter_name]
        if not module.folded and not getattr(module, "built_for_load", False):
            warnings.warn(f"loading values into {self.method} adapter {adapter_name!r} replaced its reparameterisation "
                          f"({', '.join(n for n in module.head_names if getattr(module, n, None) is not None)}) by "
                          "the loaded tokens, since files hold only the tokens (as peft's); from now on the table of "
                          "tokens trains directly, and an optimizer built before still holds the removed parameters: "
                          "build it again. To resume training with the reparameterisation, restore a training "
                          "checkpoint (peftkit train --resume) instead", stacklevel=4)
        module.built_for_load = False
        module.fold()


class PromptCall:
    """The keyword arguments of one call to the adapted model while they are rewritten.

    Attributes:
        kwargs: the arguments the model will get.
        model: the adapted model. batch / length: ``B`` and ``L`` of this call's real tokens.
        num_virtual: ``P``. causal: whether the model is a causal LM (its labels are shifted).
        strip: how many leading positions of the token-level logits to drop afterwards.
        made_cache: whether the rewrite created the cache (it is dropped from the output unless the call
            asked for caching).

    Args:
        model: the adapted model. kwargs: the call's keyword arguments (rewritten in place).
        num_virtual: ``P``, the number of virtual tokens.

    Raises:
        ValueError: the call has neither ``input_ids`` nor ``inputs_embeds``, or both.
    """

    def __init__(self, model: nn.Module, kwargs: dict[str, Any], num_virtual: int) -> None:
        self.model, self.kwargs, self.num_virtual = model, kwargs, num_virtual
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            raise ValueError("a soft-prompt adapter needs input_ids or inputs_embeds")
        if ids is not None and embeds is not None:
            raise ValueError("give input_ids or inputs_embeds, not both (the model takes exactly one of them; with "
                             "both, input_ids would be ignored)")
        self.batch, self.length = ref.shape[0], ref.shape[1]
        self.device = ref.device
        self.causal = bool(getattr(model, "can_generate", lambda: False)())
        self.strip = 0
        self.made_cache = False
        self.spans: dict[str, Tensor] = {}  # a question-answering model's span targets, scored after the call

    def prepend_embeddings(self, tokens: Tensor) -> None:
        """Insert ``tokens`` ``(P, hidden)`` before the input embeddings, with padded type ids and labels."""
        kw, batch, p = self.kwargs, self.batch, self.num_virtual
        embeds = kw.pop("inputs_embeds", None)
        if embeds is None:
            embeds = self.model.get_input_embeddings()(kw["input_ids"])
        kw["input_ids"] = None
        kw["inputs_embeds"] = torch.cat([tokens.to(embeds.dtype).expand(batch, -1, -1), embeds], dim=1)
        if kw.get("token_type_ids") is not None:
            types = kw["token_type_ids"]
            kw["token_type_ids"] = torch.cat([types.new_zeros(batch, p), types], dim=1)
        self.strip = p
        if type(self.model).__name__.endswith("ForQuestionAnswering"):  # the span loss is taken on the real tokens
            self.spans = {k: kw.pop(k) for k in ("start_positions", "end_positions") if kw.get(k) is not None}
        labels = kw.get("labels")
        # token-level labels get -100 over the virtual tokens; a sequence classifier's (multi-label (B, classes),
        # regression (B, 1)) are per row, whatever their width
        per_row = type(self.model).__name__.endswith(("ForSequenceClassification", "ForMultipleChoice"))
        if labels is not None and not per_row and labels.dim() >= 2 and labels.shape[1] == self.length:
            padded = torch.cat([labels.new_full((batch, p, *labels.shape[2:]), -100), labels], dim=1)
            if self.causal:
                padded[:, p] = -100  # no real token predicts the first one in the base model either
            kw["labels"] = padded


class PromptHooks:
    """The pre-hook and hook on the adapted model that apply one soft-prompt adapter to every call.

    Args:
        host: the :class:`~peftkit.host.AdapterModel` holding the adapter (hooks go on ``host.model``).
        adapter_name: the adapter they apply. tuner: its :class:`PromptTuner` (which inserts the tokens).
    """

    def __init__(self, host: AdapterModel, adapter_name: str, tuner: PromptTuner) -> None:
        self.host, self.name, self.tuner = host, adapter_name, tuner
        model = host.model
        self.positional = _positional_names(model)
        self.takes_positions = "position_ids" in inspect.signature(model.forward).parameters
        self.pools_last_token = _pools_last_non_pad_token(model)
        # read once (a walk over the modules, not one per call); RoBERTa numbers positions from padding_idx + 1
        self.positions, self.offset = position_table(model)
        self.pending: Callable[[Any], Any] | None = None
        self.handles = (model.register_forward_pre_hook(self.before, with_kwargs=True),
                        model.register_forward_hook(self.after, with_kwargs=True))

    def remove(self) -> None:
        """Unregister both hooks from the model."""
        for h in self.handles:
            h.remove()

    def applies(self) -> bool:
        """Whether this call of the model is rewritten: the adapter is in use (active, or a part of an active
        composed adapter), adapters are not disabled and no mixed-adapter batch is running.

        Raises:
            ValueError: a mixed-adapter batch names this adapter.
        """
        host = self.host
        if host.disabled:
            return False
        rows = host.ctx.row_names
        if rows is not None:
            if self.name in rows:
                raise ValueError(f"adapter {self.name!r} is a soft-prompt adapter; mixed-adapter batches "
                                 "(adapter_names=...) do not support soft prompts yet")
            return False
        # the active adapters and the parts of active composed ones; set_adapter allows one soft prompt among them
        return self.name in host.in_use

    def before(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        """Forward pre-hook: when :meth:`applies`, the call's arguments rewritten as keywords (mask and
        positions extended; on a first call the virtual tokens inserted by the tuner: embeddings, with
        padded labels and type ids, or cache prefixes; ``past_key_values`` passed as ``cache``), else None
        (the call runs unchanged).

        Raises:
            TypeError: more positional arguments than ``model.forward`` takes.
            ValueError: as :meth:`applies`; no ``input_ids``/``inputs_embeds``; an ``attention_mask`` that is
                not 2-D over the real tokens; a cache that cannot grow or holds fewer positions than the
                virtual tokens; prefix tuning while training with gradient checkpointing; more input tokens
                than the model's learned positions leave room for after the virtual tokens.
        """
        self.pending = None
        if not self.applies():
            return None
        kw = _as_keywords(model, self.positional, args, kwargs)
        if "past_key_values" in kw:  # the pre-5 name of transformers' cache argument
            kw["cache"] = kw.pop("past_key_values")
        config = self.host.peft_config[self.name]
        call = PromptCall(model, kw, config.num_virtual_tokens)
        positions, p = self.positions, config.num_virtual_tokens
        cache = kw.get("cache")
        past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        if positions is not None and past < p and call.length + p > positions:
            raise ValueError(f"an input of {call.length} tokens does not fit after num_virtual_tokens={p}: "
                             f"{type(model).__name__} has {positions} learned positions; truncate inputs to "
                             f"{positions - p} tokens")
        if positions is not None and past >= p and past + call.length > positions:  # a cached step (generation)
            raise ValueError(f"{past - p} earlier tokens and {call.length} new one(s) do not fit after "
                             f"num_virtual_tokens={p}: {type(model).__name__} has {positions} learned positions, so at "
                             f"most {positions - p} tokens (prompt and generated ones) go through the model; ask "
                             "for fewer new tokens or truncate the prompt")
        want_tuple = kw.get("return_dict") is False or (
            "return_dict" not in kw and getattr(getattr(model, "config", None), "return_dict", True) is False
            and hasattr(model, "can_generate"))
        if want_tuple:  # rewritten as a ModelOutput, turned back into the model's tuple by the finisher
            kw["return_dict"] = True
        ids = kw.get("input_ids")
        if self._extend(call):
            self.tuner.insert(call, self.host.extra_modules[self.name]())
            if self.pools_last_token and ids is not None and call.kwargs.get("inputs_embeds") is not None:
                _move_trailing_padding_in_front(call, ids, model.config.get_text_config().pad_token_id)
        use_cache = kw.get("use_cache")
        if use_cache is None:
            use_cache = getattr(model.config, "use_cache", True)
        self.pending = _finisher(call, drop_cache=call.made_cache and not use_cache, as_tuple=want_tuple)
        rewritten_mask(model, kw["attention_mask"])  # gates recorded the user's mask if their hook ran first
        if self.host.ctx.attention_mask is not None:  # the call's mask, as MoE-LoRA's load balancing reads it
            self.host.ctx.attention_mask = kw["attention_mask"]
        return (), kw

    def after(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        """Forward hook: for a rewritten call, the output with the prepended virtual positions cut from the
        token-level ``logits`` (``(B, P + L, ...) -> (B, L, ...)``), and without the cache when the rewrite
        made one that the call did not ask for (``use_cache`` false); None (output unchanged) otherwise."""
        finish, self.pending = self.pending, None
        return None if finish is None else finish(output)

    def _extend(self, call: PromptCall) -> bool:
        """Extend mask and positions; returns whether this is a first call (virtual tokens to insert)."""
        kw, p, batch, length = call.kwargs, call.num_virtual, call.batch, call.length
        cache = kw.get("cache")
        if getattr(cache, "is_compileable", False):
            raise ValueError(f"soft-prompt adapter {self.name!r} needs a growing cache (transformers' DynamicCache, "
                             f"the default); {type(cache).__name__} has no room for the virtual tokens")
        past = cache.get_seq_length() if cache is not None else 0
        if past and past < p:
            raise ValueError(f"the cache holds {past} positions, fewer than the {p} virtual tokens of adapter "
                             f"{self.name!r}; pass the cache returned by this adapted model")
        real_past = past - p if past else 0
        mask = kw.get("attention_mask")
        if mask is None:
            mask = torch.ones(batch, real_past + length, dtype=torch.long, device=call.device)
        elif mask.dim() != 2 or mask.shape[1] != real_past + length:
            raise ValueError(f"attention_mask of shape {tuple(mask.shape)} does not fit: a soft-prompt adapter "
                             f"needs a 2-D mask over the real tokens, (batch, {real_past + length})")
        kw["attention_mask"] = torch.cat([mask.new_ones(batch, p), mask], dim=1)
        if self.takes_positions:
            positions = kw.get("position_ids")
            if positions is not None and positions.dim() == 1:  # one row of positions for the whole batch
                positions = positions.unsqueeze(0).expand(batch, -1)
            if positions is None:  # as transformers' generate() computes them (from the model's first position)
                positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -length:] + self.offset
            positions = positions + p
            if not past and self.tuner.inserts_embeddings:
                virtual = torch.arange(self.offset, self.offset + p, device=positions.device, dtype=positions.dtype)
                positions = torch.cat([virtual.expand(positions.shape[0], p), positions], dim=1)
            kw["position_ids"] = positions
        return not past



class EncoderPromptHooks:
    """The hooks that apply one soft-prompt adapter to an encoder-decoder model (T5, BART, ...), as peft's
    ``PeftModelForSeq2SeqLM`` does for prompt tuning and P-tuning: the first ``P`` of the ``S * P`` virtual
    tokens go before the encoder's input embeddings, ``(B, L, d) -> (B, P + L, d)``, its mask gets ``P``
    leading ones, and the decoder's cross-attention mask gets the same ``P`` ones; decoder inputs, labels and
    logits are left as they are. The hooks sit on ``get_encoder()`` and ``get_decoder()``, not on the whole
    model, so ``generate()``, which runs the encoder once by itself and then only the decoder, is covered too.

    Args: as :class:`PromptHooks` (``host``, ``adapter_name``, ``tuner``).
    """

    def __init__(self, host: AdapterModel, adapter_name: str, tuner: PromptTuner) -> None:
        self.host, self.name, self.tuner = host, adapter_name, tuner
        model = host.model
        self.encoder, self.decoder = model.get_encoder(), model.get_decoder()
        self.encoder_args = _positional_names(self.encoder)
        self.decoder_args = _positional_names(self.decoder)
        self.positions = position_table(model)[0]  # BART's learned table; None for T5's relative positions
        # Pegasus, Marian, ... scale the token embeddings in the encoder's forward, only when it embeds the ids
        words = getattr(self.encoder, "embed_tokens", None)
        scale = getattr(self.encoder, "embed_scale", None)
        self.scale = scale if isinstance(scale, (int, float)) and scale != 1 and not hasattr(words, "embed_scale") \
            else None
        self.handles = (self.encoder.register_forward_pre_hook(self.before_encoder, with_kwargs=True),
                        self.decoder.register_forward_pre_hook(self.before_decoder, with_kwargs=True))

    remove = PromptHooks.remove
    applies = PromptHooks.applies

    def before_encoder(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        """Encoder pre-hook: when :meth:`applies`, ``inputs_embeds`` ``(B, P + L, d)`` with the virtual tokens in
        front and the mask (if given) extended; else None. ``module``/``args``/``kwargs``: the encoder and its
        call.

        Raises:
            ValueError: as :meth:`PromptHooks.applies`; neither or both of ``input_ids`` and ``inputs_embeds``;
                an ``attention_mask`` that is not ``(B, L)``; more tokens than the learned positions leave room
                for after the virtual tokens (BART's table).
        """
        if not self.applies():
            return None
        kw = _as_keywords(module, self.encoder_args, args, kwargs)
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        if (ids is None) == (embeds is None):
            raise ValueError("a soft-prompt adapter needs exactly one of input_ids and inputs_embeds for the "
                             f"encoder of {type(self.host.model).__name__}; got "
                             + ("neither" if ids is None else "both"))
        if embeds is None:  # embedded as the encoder would (peft 0.21.2 leaves out an encoder's embed_scale)
            embeds = self.host.model.get_input_embeddings()(ids)
            if self.scale is not None:
                embeds = embeds * self.scale
        batch, length = embeds.shape[:2]
        p = self.host.peft_config[self.name].num_virtual_tokens
        if self.positions is not None and length + p > self.positions:
            raise ValueError(f"an input of {length} tokens does not fit after num_virtual_tokens={p}: "
                             f"{type(self.host.model).__name__} has {self.positions} learned positions; truncate "
                             f"inputs to {self.positions - p} tokens")
        tokens = self.host.extra_modules[self.name]()[:p].to(embeds.dtype)
        kw["input_ids"] = None
        kw["inputs_embeds"] = torch.cat([tokens.expand(batch, -1, -1), embeds], dim=1)
        mask = kw.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2 or tuple(mask.shape) != (batch, length):
                raise ValueError(f"attention_mask of shape {tuple(mask.shape)} does not fit: a soft-prompt adapter "
                                 f"needs a 2-D mask over the encoder's real tokens, ({batch}, {length})")
            kw["attention_mask"] = torch.cat([mask.new_ones(batch, p), mask], dim=1)
        return (), kw

    def before_decoder(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        """Decoder pre-hook: when :meth:`applies` and the encoder's states are ``P`` longer than the given
        ``encoder_attention_mask`` (they hold the virtual tokens), that mask with ``P`` leading ones; else None.
        ``module``/``args``/``kwargs``: the decoder and its call, as for any ``with_kwargs`` pre-hook."""
        if not self.applies():
            return None
        kw = _as_keywords(module, self.decoder_args, args, kwargs)
        states, mask = kw.get("encoder_hidden_states"), kw.get("encoder_attention_mask")
        p = self.host.peft_config[self.name].num_virtual_tokens
        if states is None or mask is None or mask.dim() != 2 or states.shape[1] != mask.shape[1] + p:
            return None
        kw["encoder_attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], p), mask], dim=1)
        return (), kw


class DecoderPrefixHooks:
    """The hook that applies one prefix-tuning adapter to an encoder-decoder model (T5, BART, ...), as peft
    0.21.2's ``PeftModelForSeq2SeqLM`` does: the encoder and the cross-attention get nothing; the decoder's first
    call of a sequence (no cache, or the empty one ``generate()`` passes) gets the prefixes written into the
    self-attention part of its ``EncoderDecoderCache`` (see :meth:`PrefixTuner.decoder_cache`), and every call's
    ``attention_mask`` (the decoder's, over its real tokens) gets ``P`` leading ones. The decoder's positions
    (T5's relative ones, BART's learned ones) then start after the ``P`` prefixes, as in peft. A cache the hook
    made for a call that did not ask for one (``use_cache`` false) is left out of the output, as the base model
    leaves it out (peft returns it). The hooks sit on ``get_decoder()``, so ``PeftModel.forward``, ``generate()``
    and a direct call of the base model are covered.

    Args: as :class:`PromptHooks` (``host``, ``adapter_name``, ``tuner``: a prefix tuner).
    """

    def __init__(self, host: AdapterModel, adapter_name: str, tuner: Any) -> None:
        self.host, self.name, self.tuner = host, adapter_name, tuner
        self.decoder = host.model.get_decoder()
        self.decoder_args = _positional_names(self.decoder)
        self.positions = position_table(host.model)[0]  # BART's learned table; None for T5's relative positions
        self.drop_cache = False
        self.handles = (self.decoder.register_forward_pre_hook(self.before_decoder, with_kwargs=True),
                        self.decoder.register_forward_hook(self.after_decoder))

    remove = PromptHooks.remove
    applies = PromptHooks.applies

    def before_decoder(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        """Decoder pre-hook: when :meth:`applies`, the call as keywords with the mask extended and, on a first
        call, the prefixes in the cache; else None. ``module``/``args``/``kwargs``: the decoder and its call.

        Raises:
            ValueError: as :meth:`PromptHooks.applies`; a cache that cannot grow or holds fewer positions than the
                prefixes; an ``attention_mask`` that is not ``(B, earlier + new tokens)``; more decoder tokens than
                the learned positions leave room for after the prefixes (BART's table); training with gradient
                checkpointing (see :meth:`PrefixTuner.decoder_cache`).
        """
        self.drop_cache = False
        if not self.applies():
            return None
        kw = _as_keywords(module, self.decoder_args, args, kwargs)
        if "past_key_values" in kw:  # the pre-5 name of transformers' cache argument
            kw["cache"] = kw.pop("past_key_values")
        ref = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        if ref is None:
            return None  # the decoder raises its own error
        batch, length = ref.shape[:2]
        p = self.host.peft_config[self.name].num_virtual_tokens
        cache = kw.get("cache")
        if getattr(cache, "is_compileable", False):
            raise ValueError(f"prefix-tuning adapter {self.name!r} needs a growing cache (transformers' "
                             "EncoderDecoderCache of DynamicCaches, the default); "
                             f"{type(getattr(cache, 'self_attention_cache', cache)).__name__} has no room for the prefixes")
        past = cache.get_seq_length() if cache is not None else 0
        if past and past < p:
            raise ValueError(f"the cache holds {past} positions, fewer than the {p} prefixes of adapter "
                             f"{self.name!r}; pass the cache returned by this adapted model")
        if self.positions is not None and (past or p) + length > self.positions:
            raise ValueError(f"{max(past - p, 0)} earlier and {length} new decoder token(s) do not fit after "
                             f"num_virtual_tokens={p}: {type(self.host.model).__name__} has {self.positions} learned "
                             f"positions, so at most {self.positions - p} decoder tokens (labels or generated ones)")
        mask = kw.get("attention_mask")
        if mask is not None:
            width = (past - p if past else 0) + length
            if mask.dim() != 2 or tuple(mask.shape) != (batch, width):
                raise ValueError(f"decoder attention mask of shape {tuple(mask.shape)} does not fit: a prefix-tuning "
                                 f"adapter needs a 2-D mask over the decoder's real tokens, ({batch}, {width})")
            kw["attention_mask"] = torch.cat([mask.new_ones(batch, p), mask], dim=1)
        if not past:
            kw["cache"] = self.tuner.decoder_cache(self.host.model, self.host.extra_modules[self.name](), batch, cache)
            use_cache = kw.get("use_cache")
            self.drop_cache = cache is None and not (self.host.model.config.use_cache if use_cache is None else use_cache)
        return (), kw

    def after_decoder(self, module: nn.Module, args: tuple, output: Any) -> Any:
        """Decoder hook: the output without the cache when :meth:`before_decoder` made one that the call did not
        ask for; else None (output unchanged)."""
        drop, self.drop_cache = self.drop_cache, False
        if not drop or getattr(output, "cache", None) is None:
            return None
        return type(output)(**{k: v for k, v in output.items() if k != "cache"})


def _positional_names(module: nn.Module) -> list[str]:
    params = inspect.signature(module.forward).parameters
    return [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _as_keywords(module: nn.Module, names: list[str], args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments as keywords (``TypeError`` for more positional arguments than ``forward`` takes)."""
    if len(args) > len(names):
        raise TypeError(f"{type(module).__name__}.forward got {len(args)} positional arguments")
    kw = dict(zip(names, args, strict=False))
    kw.update(kwargs)
    return kw

def _pools_last_non_pad_token(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers sequence classifier that pools the last token that is not
    ``pad_token_id`` (the decoders' ``...ForSequenceClassification``), which it can find only in ``input_ids``."""
    config = getattr(model, "config", None)
    if config is None or not type(model).__name__.endswith("ForSequenceClassification"):
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "pad_token_id", None) is None:
        return False
    try:
        return "last_non_pad_token" in inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return False


def _move_trailing_padding_in_front(call: PromptCall, ids: Tensor, pad_token_id: int) -> None:
    """Rotate each row's real part (after the ``P`` virtual tokens) so that its last non-pad token, the one
    the classifier would pool from ``input_ids``, is the last position, and mask the positions moved in
    front (padding after the pooled token, which no real token attends in a causal model). Embeddings,
    mask, positions and type ids move together; positions were computed before, so they stay right."""
    kw, p, length = call.kwargs, call.num_virtual, call.length
    steps = torch.arange(length, device=ids.device)
    last = (steps * (ids != pad_token_id)).argmax(-1)  # as transformers finds the pooled token
    shift = (length - 1 - last).to(ids.device)
    if not bool(shift.any()):
        return
    index = (steps[None, :] - shift[:, None]) % length  # new position j holds old position index[j]

    def rotate(t: Tensor) -> Tensor:
        real = t[:, p:]
        idx = index.to(real.device).view(*index.shape, *([1] * (real.dim() - 2))).expand_as(real)
        return torch.cat([t[:, :p], real.gather(1, idx)], dim=1)

    kw["inputs_embeds"] = rotate(kw["inputs_embeds"])
    mask = rotate(kw["attention_mask"])
    mask[:, p:] *= (steps[None, :] >= shift[:, None]).to(mask.device, mask.dtype)
    kw["attention_mask"] = mask
    for key in ("position_ids", "token_type_ids"):
        if kw.get(key) is not None and kw[key].dim() == 2 and kw[key].shape[1] == p + length:
            kw[key] = rotate(kw[key])


def _span_loss(start_logits: Tensor, end_logits: Tensor, start: Tensor, end: Tensor) -> Tensor:
    """transformers' question-answering loss over ``(B, L)`` logits: the mean of the start and end cross-entropies,
    positions outside ``0..L-1`` ignored."""
    length = start_logits.shape[1]
    score = torch.nn.CrossEntropyLoss(ignore_index=length)
    start, end = start.reshape(-1).clamp(0, length), end.reshape(-1).clamp(0, length)
    return (score(start_logits, start) + score(end_logits, end)) / 2


def _finisher(call: PromptCall, drop_cache: bool, as_tuple: bool = False) -> Callable[[Any], Any]:
    strip = call.strip

    def finish(output: Any) -> Any:
        logits = getattr(output, "logits", None)
        if strip and isinstance(logits, Tensor) and logits.dim() >= 3 and logits.shape[1] == strip + call.length:
            output.logits = logits[:, strip:]
        if strip and getattr(output, "start_logits", None) is not None:  # question answering: (B, P + L) -> (B, L)
            output.start_logits, output.end_logits = output.start_logits[:, strip:], output.end_logits[:, strip:]
            if len(call.spans) == 2:  # the loss first, as the model's own output has it
                loss = _span_loss(output.start_logits, output.end_logits, call.spans["start_positions"],
                                  call.spans["end_positions"])
                output = type(output)(loss=loss, **{k: v for k, v in output.items() if k != "loss"})
        if drop_cache and getattr(output, "cache", None) is not None:
            # rebuilt without it, as the model's own output is: a "cache" key holding None makes beam search try to
            # reorder it (and a ModelOutput allows neither deleting a key nor setting one to None as an attribute)
            output = type(output)(**{k: v for k, v in output.items() if k != "cache"})
        if as_tuple and hasattr(output, "to_tuple"):  # what return_dict=False gives: the fields that are set
            return tuple(v for v in output.values() if v is not None)
        return output

    return finish
