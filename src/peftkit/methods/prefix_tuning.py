"""Prefix tuning and P-tuning v2: trainable key/value prefixes at every attention layer.

Papers: Li and Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", 2021,
arXiv:2101.00190; Liu, Ji, Fu, Tam, Du, Yang and Tang, "P-Tuning v2: Prompt Tuning Can Be Comparable
to Fine-tuning Universally Across Scales and Tasks", 2021, arXiv:2110.07602.

Equation, at every layer ``l``: ``head = softmax(Q [Pk_l ; K]^T / sqrt(d_h)) [Pv_l ; V]`` with the
prefixes ``Pk_l, Pv_l: (P, d_kv)`` trained and the model frozen. With ``prefix_projection`` the
prefixes are reparameterised during training as ``[Pk ; Pv] = W2 tanh(W1 E' + b1) + b2`` (Li & Liang's
MLP); :meth:`PrefixEncoder.fold` replaces the MLP by its output exactly, which is also what the file
holds (peft's ``prompt_embeddings``), so a loaded adapter is folded.

On an encoder-decoder model (T5, BART; Li & Liang's summarisation setting) the prefixes are laid out as peft
0.21.2 lays them out, so that files move both ways with the same outputs: ``N`` is the encoder's number of
layers, the encoder and the decoder's cross-attention get no prefix, and decoder layer ``l`` attends to stored
layer ``2l mod N``'s prefixes in its self-attention (:meth:`PrefixTuner.decoder_cache`).

Trainable parameters (``N`` layers, ``d_kv`` = ``num_key_value_heads * head_dim``, ``h`` =
``encoder_hidden_size``): ``P * 2 * N * d_kv``; with the projection ``P*d_kv + (d_kv*h + h) +
(h*2*N*d_kv + 2*N*d_kv)``.

P-tuning v2 is prefix tuning applied to natural-language understanding: deep prompts at every layer
of an encoder with a classification head, usually without the reparameterisation. It has no config of
its own: the mechanism and the saved tensors are exactly prefix tuning's, so it is a registered preset
(``peftkit train --method p-tuning-v2``) of :class:`PrefixTuningConfig` (``task_type="SEQ_CLS"``,
``prefix_projection=False``) and its files are ``PREFIX_TUNING`` files that ``peft`` loads.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from peftkit.config import MethodSpec, check, register_method
from peftkit.layers import trains_with_checkpointing
from peftkit.methods.prompt_learning import (
    DecoderPrefixHooks,
    ModelShape,
    PromptCall,
    PromptLearningConfig,
    PromptTuner,
    VirtualTokens,
    model_shape,
    settle,
)

PREFIX_PAPER = "Prefix-Tuning: Optimizing Continuous Prompts for Generation (Li & Liang, 2021, arXiv:2101.00190)"
P_TUNING_V2_PAPER = ("P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across Scales "
                     "and Tasks (Liu et al., 2021, arXiv:2110.07602)")


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Configuration of prefix tuning and P-tuning v2 (field names as ``peft.PrefixTuningConfig``).

    Args:
        num_virtual_tokens: ``P`` (required, > 0). ``token_dim`` / ``num_attention_heads`` are the
            key/value width and heads (``num_key_value_heads`` under grouped-query attention), read from
            the model when None, as peft does.
        init_weights: None (random prefixes, N(0, 1)) or ``"zero"`` (zero prefixes: the output MLP layer,
            or the table without projection, starts at zero).
        encoder_hidden_size: ``h`` of the reparameterisation MLP, > 0; None uses ``token_dim``.
        prefix_projection: train through the MLP (Li & Liang) instead of the prefixes directly.

    Raises:
        ConfigError: ``init_weights`` other than None/``"zero"``, a non-positive ``encoder_hidden_size``;
            plus :class:`PromptLearningConfig`'s checks.

    Paper: Prefix-Tuning: Optimizing Continuous Prompts for Generation (Li & Liang, 2021, arXiv:2101.00190).
    """

    peft_type = "PREFIX_TUNING"
    init_weights: str | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    def validate(self) -> None:
        super().validate()
        check(self.init_weights in (None, "zero"),
              f"init_weights={self.init_weights!r} is not valid; expected None (random) or 'zero'")
        h = self.encoder_hidden_size
        check(h is None or (isinstance(h, int) and not isinstance(h, bool) and h > 0),
              f"encoder_hidden_size={h!r} is not valid; it must be an integer > 0 or None (token_dim)")
        check(isinstance(self.prefix_projection, bool),
              f"prefix_projection={self.prefix_projection!r} must be True or False")


class PrefixEncoder(VirtualTokens):
    """The prefixes of all layers: ``forward() -> (P, num_layers * 2 * token_dim)``, laid out per token as
    ``[layer 0 keys, layer 0 values, layer 1 keys, ...]`` (peft's layout). With ``prefix_projection``
    (and not ``folded``), ``embedding.weight: (P, token_dim)`` goes through ``transform``
    (``Linear-Tanh-Linear``); otherwise ``embedding.weight`` is the prefixes themselves."""

    head_names = ("transform",)

    def __init__(self, config: PrefixTuningConfig, folded: bool = False) -> None:
        d, width = config.token_dim, config.num_layers * 2 * config.token_dim
        project = config.prefix_projection and not folded
        super().__init__(config.num_virtual_tokens, d if project else width)
        if project:
            self.folded = False
            h = config.encoder_hidden_size
            self.transform = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, width))
        if config.init_weights == "zero":
            nn.init.zeros_(self.transform[-1].weight if project else self.embedding.weight)
            if project:
                nn.init.zeros_(self.transform[-1].bias)

    def project(self, table: Tensor) -> Tensor:
        return self.transform(table)


class PrefixTuner(PromptTuner):
    """Writes the prefixes into the cache of every first call (a fresh ``DynamicCache``, or the empty
    cache that ``generate()`` passes), so the real tokens attend to them at every layer. On an encoder-decoder
    model (T5, BART) only the decoder's self-attention gets them, as in peft (see :meth:`decoder_cache`)."""

    method = "prefix tuning"
    inserts_embeddings = False
    supports_encoder_decoder = True  # the prefixes go into the decoder's self-attention, as peft lays them out

    def encoder_decoder_hooks(self) -> type:
        """:class:`DecoderPrefixHooks`: on an encoder-decoder model the prefixes go to the decoder only."""
        return DecoderPrefixHooks

    def complete_config(self, config: PrefixTuningConfig, shape: ModelShape) -> None:
        """Sizes of the key/value prefixes: ``token_dim = num_key_value_heads * head_dim`` and
        ``num_attention_heads = num_key_value_heads``; ``encoder_hidden_size`` defaults to ``token_dim``;
        ``num_transformer_submodules`` is 2 on an encoder-decoder model (peft's value), else 1. ``num_layers`` is
        the model's ``num_hidden_layers`` (an encoder-decoder's encoder layers, as peft reads it).

        Raises:
            ConfigError: a given size differs from the model's.
        """
        settle(config, num_layers=shape.num_layers, num_attention_heads=shape.num_kv_heads,
               token_dim=shape.num_kv_heads * shape.head_dim,
               num_transformer_submodules=2 if shape.encoder_decoder else 1)
        if config.encoder_hidden_size is None:
            config.encoder_hidden_size = config.token_dim

    def build(self, config: PrefixTuningConfig, model: nn.Module, shape: ModelShape) -> VirtualTokens:
        return PrefixEncoder(config, folded=config.inference_mode)

    def inject(self, host: Any, config: PrefixTuningConfig, adapter_name: str) -> None:
        """As :meth:`PromptTuner.inject`, for a model whose layers take a key/value cache.

        Raises:
            ConfigError: a model without token embeddings (:meth:`PromptTuner.check_reads_tokens`: ViT, CLIP,
                Wav2Vec2); the model's transformer (``model.base_model``) takes no ``cache`` argument (MPNet, ESM,
                DistilBERT, DeBERTa-v2): the prefixes would be dropped unread (peft refuses such models too); an
                encoder-decoder model whose decoder has more layers than its encoder, or other numbers of heads (the
                prefixes are sized by the encoder's, as peft sizes them; a shallower decoder, as in distilled BARTs,
                reads the first of them as in peft).
        """
        self.check_reads_tokens(host.model)
        inner = getattr(host.model, "base_model", host.model)
        check("cache" in inspect.signature(inner.forward).parameters,
              f"{self.method} needs a model whose layers take a key/value cache, and {type(inner).__name__}.forward "
              "takes no 'cache' argument (the prefixes would never be read); "
              + ("use prompt tuning or P-tuning" if "inputs_embeds" in inspect.signature(host.model.forward).parameters
                 else "LoRA, (IA)^3, BitFit or bottleneck adapters apply to it"))
        cfg = host.model.config
        if getattr(cfg, "is_encoder_decoder", False):
            shape = model_shape(host.model, self.method)
            layers = _decoder_layers(host.model)
            heads = getattr(cfg, "decoder_attention_heads", None) or shape.num_heads
            check(layers <= shape.num_layers and heads == shape.num_heads,
                  f"{self.method} on {type(host.model).__name__} needs a decoder no deeper than the encoder and as wide "
                  f"(the prefixes are sized by the encoder, as peft sizes them); its decoder has {layers} layers and "
                  f"{heads} heads, its encoder {shape.num_layers} and {shape.num_heads}")
        super().inject(host, config, adapter_name)

    def insert(self, call: PromptCall, tokens: Tensor) -> None:
        """Write the prefixes into the first call's key/value cache (a new ``DynamicCache`` when the call has
        none): ``tokens: (P, num_layers * 2 * num_kv_heads * head_dim)`` becomes, per layer, keys and values
        ``(batch, num_kv_heads, P, head_dim)``.

        Raises:
            ValueError: the model trains with gradient checkpointing (transformers then drops the cache that
                holds the prefixes).
        """
        from transformers import Cache, DynamicCache

        model = call.model
        kv = _key_values(model, tokens)
        cache = call.kwargs.get("cache")
        if not isinstance(cache, Cache):
            cache = DynamicCache(config=model.config)
            call.made_cache = True
        size = (call.batch, *kv.shape[3:])
        for layer in range(kv.shape[0]):
            cache.update(kv[layer, 0].expand(size), kv[layer, 1].expand(size), layer)
        call.kwargs["cache"] = cache

    def decoder_cache(self, model: nn.Module, tokens: Tensor, batch: int, cache: Any) -> Any:
        """The cache of an encoder-decoder's first decoder call with the prefixes in its self-attention part, laid
        out as peft 0.21.2 does: decoder layer ``l`` gets the keys and values ``(batch, num_heads, P, head_dim)``
        of stored layer ``2l mod N`` (``N`` = ``num_layers``, the encoder's; a decoder may have fewer layers), and the
        cross-attention none. (peft doubles the
        table along the layers and splits it into groups of four, self-attention key and value then
        cross-attention key and value of one decoder layer, and then empties the cross-attention cache, so the
        stored layers ``2l+1 mod N`` are read nowhere: with ``N`` even, the odd ones get no gradient.)

        Args:
            tokens: the prefixes, ``(P, N * 2 * num_heads * head_dim)``. batch: ``B``. cache: the decoder's
                ``EncoderDecoderCache`` (empty) or None (a new one is made).

        Raises:
            ValueError: a cache that is not an ``EncoderDecoderCache``; the model trains with gradient
                checkpointing (transformers then drops the cache that holds the prefixes).
        """
        from transformers import DynamicCache, EncoderDecoderCache

        kv = _key_values(model, tokens)
        if cache is None:
            cache = EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
        if not isinstance(cache, EncoderDecoderCache):
            raise ValueError(f"prefix tuning on {type(model).__name__} needs the decoder's cache to be an "
                             f"EncoderDecoderCache (or None); got {type(cache).__name__}")
        n, size = kv.shape[0], (batch, *kv.shape[3:])
        for layer in range(_decoder_layers(model)):
            keys, values = kv[2 * layer % n]
            cache.self_attention_cache.update(keys.expand(size), values.expand(size), layer)
        return cache


def _decoder_layers(model: nn.Module) -> int:
    """The number of decoder layers of an encoder-decoder ``model`` (T5's ``num_decoder_layers``, BART's
    ``decoder_layers``; else its ``num_hidden_layers``)."""
    cfg = model.config
    return (getattr(cfg, "num_decoder_layers", None) or getattr(cfg, "decoder_layers", None)
            or model_shape(model, PrefixTuner.method).num_layers)


def _key_values(model: nn.Module, tokens: Tensor) -> Tensor:
    """The prefixes ``(P, N * 2 * heads * head_dim)`` as ``(N, 2, 1, heads, P, head_dim)`` (keys then values of each
    layer) in the dtype of the model's input embeddings.

    Raises:
        ValueError: the model trains with gradient checkpointing.
    """
    if trains_with_checkpointing(model):
        raise ValueError("prefix tuning cannot train with gradient checkpointing: transformers drops the cache "
                         "that holds the prefixes; disable gradient checkpointing")
    shape = model_shape(model, PrefixTuner.method)
    kv = tokens.to(model.get_input_embeddings().weight.dtype)
    kv = kv.view(tokens.shape[0], shape.num_layers, 2, shape.num_kv_heads, shape.head_dim)
    return kv.permute(1, 2, 3, 0, 4).unsqueeze(2)

def prefix_tuning_from_cli(args: Any) -> PrefixTuningConfig:
    """``peftkit train --method prefix-tuning``: 20 prefixes trained through the MLP (width 128), at the
    method's default learning rate 1e-3. (At 5e-3 the MLP's prefixes drift within 50 steps until every
    input gets the same output: SST-2 stays at the majority class, 0.509, after 800 steps of 32 rows;
    1e-3 reaches 0.800 after 300 steps.)"""
    return PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=True, encoder_hidden_size=128,
                              task_type=args.task_type)


def p_tuning_v2_from_cli(args: Any) -> PrefixTuningConfig:
    """``peftkit train --method p-tuning-v2``: 20 deep prompts per layer, trained directly at the preset's
    default learning rate 1e-2 (P-tuning v2 tunes 5e-3 to 1e-2)."""
    return PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=False, task_type=args.task_type)


PREFIX_TUNER = PrefixTuner()
register_method(MethodSpec(
    name="prefix-tuning", config_cls=PrefixTuningConfig, family="additive", kind="prompt", mergeable=False,
    paper=PREFIX_PAPER, tuner=PREFIX_TUNER, cli_config=prefix_tuning_from_cli, default_lr=1e-3,
))
register_method(MethodSpec(
    name="p-tuning-v2", config_cls=PrefixTuningConfig, family="additive", kind="prompt", mergeable=False,
    paper=P_TUNING_V2_PAPER, tuner=PREFIX_TUNER, cli_config=p_tuning_v2_from_cli, variant_of="prefix-tuning",
    default_lr=1e-2,
))
