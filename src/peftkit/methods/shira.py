"""SHiRA: train a fixed sparse set of entries of each adapted weight (``ShiraConfig``, ``peft_type`` ``SHIRA``,
peft's file format).

Paper: Bhardwaj et al., "Sparse High Rank Adapters", 2024, arXiv:2406.13175.

Equation: ``h = (W0 + S) x + b`` where ``S: (out, in)`` is zero except at ``k = r * (in + out)`` fixed entries, which
hold the trainable ``shira_weight: (k,)`` (as many parameters as a rank-``r`` LoRA, at any rank). The entries are the
``shira_indices: (2, k)`` (row, column) of a binary mask chosen when the adapter is added: ``mask_type="random"``
draws them as peft draws them (the first ``k`` of ``torch.randperm(out * in)`` under a fresh ``torch.Generator``,
seeded with ``random_seed`` when given, in row-major order), or ``config.mask_fn`` gives the mask. Files hold
``base_model.model.<module>.shira_weight`` and ``.shira_indices`` (int32), so they load both ways with peft.

Like the selective methods (:mod:`peftkit.methods.selective`), the difference is the adapter: the layer runs its
untouched base module with ``W0 + S`` (a parameter substitution, :func:`~peftkit.methods.selective.add_sparse`), so
disabling gives the base bit for bit and a merge adds ``S`` exactly; only the ``k`` entries exist as parameters,
so no optimiser can move any other.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.config import ConfigError, MethodSpec, PeftConfig, check, register_method
from peftkit.formats.hf_peft import PREFIX, AdapterLoadError
from peftkit.layers import AdaptedLayer, Adapter, wide
from peftkit.methods import _reparam as rp
from peftkit.methods.prompt_learning import LOADING_VALUES
from peftkit.methods.selective import _sparse_problem, add_sparse, sparse_to_dense
from peftkit.targeting import VERA_TARGET_DEFAULTS
from peftkit.tuners import WrapTuner

SHIRA_PAPER = "Sparse High Rank Adapters (Bhardwaj et al., 2024, arXiv:2406.13175)"

#: SHiRA's default targets by model type: LoRA's, with Phi's attention query and value only (peft's table)
SHIRA_TARGET_DEFAULTS = VERA_TARGET_DEFAULTS

#: a mask function: ``mask_fn(base_layer, r) -> mask``, ``mask: (out, in)`` of 0/1 with ``r * (in + out)`` ones
MaskFn = Callable[..., Tensor]


@dataclass
class ShiraConfig(PeftConfig):
    """Configuration of SHiRA, peft's ``ShiraConfig``.

    Args:
        r: sets the number of trained entries of each adapted ``(out, in)`` weight, ``k = r * (in + out)`` (a
            rank-``r`` LoRA's count; SHiRA's update is not limited to rank ``r``), an integer > 0 with ``k`` at most
            ``out * in``. Default 32.
        mask_type: ``"random"`` (default): ``k`` entries drawn from ``random_seed`` as peft draws them. Any other
            name needs a mask function set on the config after building it, as in peft
            (``config.mask_fn = my_mask_fn``: called as ``my_mask_fn(base_layer, r)``, it returns a ``(out, in)``
            tensor of zeros and ones with exactly ``k`` ones); a set ``mask_fn`` is used with ``"random"`` too.
            Loading a file needs no mask function: its indices are read from the file.
        random_seed: the seed of the random mask, an integer in ``[-2**63, 2**64)``, or None (default): an
            unseeded fresh ``torch.Generator`` (whose fixed default seed makes that mask repeatable too, as in peft).
            Every layer of one shape gets the same entries, as in peft.
        target_modules: module names/suffixes, a full-match regex, or ``"all-linear"``; None (default) takes the
            model type's usual targets, as peft (:data:`SHIRA_TARGET_DEFAULTS`). Only ``nn.Linear`` layers.
        fan_in_fan_out: kept for peft's files; True is set back to False with a warning (an ``nn.Linear`` stores
            ``(out, in)``), as peft does.
        init_weights: True (default): ``shira_weight`` starts at zero (the adapter starts as the identity); False:
            standard normal values (for tests).
        modules_to_save: modules trained in full and saved with the adapter.

    Attributes:
        mask_fn: the mask function (None unless set; see ``mask_type``). It is not saved.

    Equation: ``h = (W0 + S) x + b``, ``S`` sparse at the mask's ``k`` entries. Trainable parameters per layer:
    ``r * (in + out)``.

    Raises:
        ConfigError: ``r`` not an integer > 0, ``mask_type`` not a non-empty string, ``random_seed`` not an integer
            seed or None, ``fan_in_fan_out``/``init_weights`` not a bool, ``target_modules=[]``; when injecting
            (before the model changes): a target that is not an ``nn.Linear`` (or is a quantised one), ``k`` above
            a target's ``out * in``, ``mask_type`` other than ``"random"`` without a ``mask_fn``, or a mask that
            is not ``(out, in)``, not 0/1, or has not ``k`` ones (each message names the module).

    Paper: Sparse High Rank Adapters (Bhardwaj et al., 2024, arXiv:2406.13175).
    """

    peft_type = "SHIRA"
    default_target_modules = SHIRA_TARGET_DEFAULTS
    r: int = 32
    mask_type: str = "random"
    random_seed: int | None = None
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_weights: bool = True
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if not hasattr(self, "mask_fn"):
            self.mask_fn: MaskFn | None = None
        super().__post_init__()

    def validate(self) -> None:
        rp.check_positive_int("r", self.r)
        check(isinstance(self.mask_type, str) and self.mask_type != "",
              f"mask_type={self.mask_type!r} is not valid; give 'random' or the name of the mask function set as "
              "config.mask_fn")
        seed = self.random_seed
        check(seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and -2**63 <= seed < 2**64),
              f"random_seed={seed!r} is not valid; it must be an integer seed in [-2**63, 2**64) or None")
        check(isinstance(self.fan_in_fan_out, bool), f"fan_in_fan_out={self.fan_in_fan_out!r} must be True or False")
        check(isinstance(self.init_weights, bool), f"init_weights={self.init_weights!r} must be True or False")
        mask_fn = getattr(self, "mask_fn", None)
        check(mask_fn is None or callable(mask_fn), f"mask_fn={mask_fn!r} is not callable; give a function "
                                                    "mask_fn(base_layer, r) -> (out, in) 0/1 mask, or None")
        rp.check_common(self)


def random_indices(out_features: int, in_features: int, k: int, seed: int | None) -> Tensor:
    """The ``(2, k)`` int32 (row, column) entries of peft's random SHiRA mask of an ``(out, in)`` weight: the first
    ``k`` of ``torch.randperm(out * in)`` under a fresh CPU ``torch.Generator`` (seeded with ``seed`` unless None),
    sorted (row-major, the order in which peft reads them off its mask)."""
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    flat = torch.sort(torch.randperm(out_features * in_features, generator=generator)[:k]).values
    return torch.stack([flat // in_features, flat % in_features]).to(torch.int32)


def mask_indices(mask: Tensor, out_features: int, in_features: int, k: int, where: str) -> Tensor:
    """The ``(2, k)`` int32 (row, column) entries of a mask function's 0/1 ``mask: (out, in)``, row-major.

    Raises:
        ConfigError: ``mask`` is not a tensor of that shape, holds values other than 0 and 1, or has not ``k`` ones
            (``where`` names the module).
    """
    check(isinstance(mask, Tensor) and tuple(mask.shape) == (out_features, in_features),
          f"{where}: the mask function returned {type(mask).__name__}"
          f"{' of shape ' + str(tuple(mask.shape)) if isinstance(mask, Tensor) else ''}; it must return a tensor of "
          f"shape ({out_features}, {in_features}), the layer's weight")
    ones = mask == 1
    check(bool((ones | (mask == 0)).all()), f"{where}: the mask function's mask holds values other than 0 and 1")
    found = int(ones.sum())
    check(found == k, f"{where}: the mask function's mask has {found} ones; it needs exactly r * (in + out) = {k}")
    rows, cols = torch.where(ones.cpu())
    return torch.stack([rows, cols]).to(torch.int32)


def flat_indices(indices: Tensor, in_features: int) -> Tensor:
    """``(2, k)`` (row, column) entries as ``(k,)`` int64 indices into the flattened ``(out, in)`` weight."""
    return indices[0].long() * in_features + indices[1].long()


class ShiraLinear(Adapter):
    """SHiRA on one ``nn.Linear``: the base layer runs with ``W0 + S`` (``S`` zero but at ``shira_indices``).

    Args:
        out_features / in_features: the weight's shape ``(out, in)``.
        indices: ``(2, k)`` integer (row, column) entries, distinct.
        init: True: ``shira_weight`` starts at zero; False: standard normal.

    Shapes: ``shira_weight: (k,)``, the buffer ``shira_indices: (2, k)`` int32 (saved); ``delta_weight`` is ``S``,
    ``(out, in)`` float32 (float64 for float64 values).
    """

    substitutes_params = True
    substitutes_bias = False

    def __init__(self, out_features: int, in_features: int, indices: Tensor, init: bool) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        k = indices.shape[1]
        self.shira_weight = nn.Parameter(torch.zeros(k) if init else torch.randn(k))
        self.register_buffer("shira_indices", indices.to(torch.int32))
        #: the factor on ``S``, 1 (peft's ``set_scale`` changes it at inference only; it is never saved)
        self.scaling = 1.0

    def set_indices(self, indices: Tensor) -> None:
        """Hold ``k`` new entries ``indices: (2, k)`` with zero values (a file's, before its values are copied)."""
        device = self.shira_weight.device
        self.shira_weight = nn.Parameter(torch.zeros(indices.shape[1], dtype=self.shira_weight.dtype, device=device),
                                         requires_grad=self.shira_weight.requires_grad)
        self.shira_indices = indices.to(device=device, dtype=torch.int32)

    def values(self) -> Tensor:
        """``shira_weight`` times the scaling (``(k,)``)."""
        return self.shira_weight if self.scaling == 1.0 else self.shira_weight * self.scaling

    def substitute_params(self, layer: AdaptedLayer, params: dict[str, Tensor]) -> dict[str, Tensor]:
        w = params.get("weight", layer.base_layer._parameters["weight"])
        params["weight"] = add_sparse(w, flat_indices(self.shira_indices, self.in_features), self.values())
        return params

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        return y  # everything happened in substitute_params

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        return sparse_to_dense(flat_indices(self.shira_indices, self.in_features), wide(self.values().detach()),
                               (self.out_features, self.in_features))

    def extra_repr(self) -> str:
        return f"k={self.shira_weight.numel()} of {self.out_features} x {self.in_features}"


class ShiraTuner(WrapTuner):
    """Builds one SHiRA adapter per target (``nn.Linear`` only, as peft)."""

    method = "SHiRA"

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return (nn.Linear,)

    def make_adapter(self, base: nn.Module, config: ShiraConfig, module_name: str) -> Adapter:
        """A :class:`ShiraLinear` with the config's mask.

        Raises:
            ConfigError: a quantised base, ``r * (in + out)`` above ``out * in``, no mask function for a
                ``mask_type`` other than ``"random"`` (outside loading), or a bad mask (see :func:`mask_indices`).
        """
        check(not hasattr(base, "quantized_numel"),
              f"{module_name}: SHiRA changes entries of a float nn.Linear weight, and this one is quantised "
              f"({type(base).__name__}); leave it out of target_modules or use a method that trains on a quantised "
              "base (e.g. LoRA)")
        out_features, in_features = base.out_features, base.in_features
        k = config.r * (in_features + out_features)
        check(k <= out_features * in_features,
              f"{module_name}: r={config.r} gives r * (in + out) = {k} entries, more than the layer's {out_features} x "
              f"{in_features} = {out_features * in_features}; give r <= "
              f"{out_features * in_features // (in_features + out_features)} or leave this layer out")
        mask_fn = getattr(config, "mask_fn", None)
        if mask_fn is not None:
            indices = mask_indices(mask_fn(base, config.r), out_features, in_features, k, module_name)
        elif config.mask_type == "random" or LOADING_VALUES.get():
            # (a loaded adapter takes the file's indices: these only give it its size)
            indices = random_indices(out_features, in_features, k, config.random_seed)
        else:
            raise ConfigError(f"mask_type={config.mask_type!r} needs a mask function: set config.mask_fn = "
                              "fn(base_layer, r) -> (out, in) 0/1 mask with r * (in + out) ones, or use "
                              "mask_type='random'")
        return ShiraLinear(out_features, in_features, indices, config.init_weights)

    def inject(self, host: Any, config: ShiraConfig, adapter_name: str) -> None:
        if config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out=True is set to False: SHiRA adapts nn.Linear layers, which store their "
                          "weight as (out, in)", stacklevel=3)
        super().inject(host, config, adapter_name)
        config.fan_in_fan_out = False

    def before_load(self, host: Any, adapter_name: str, tensors: dict[str, Tensor]) -> None:
        """Take the file's entries (``shira_indices``), so that its values land where they were trained.

        Raises:
            AdapterLoadError: indices that are not ``(2, k)`` integers inside the weight, that repeat an entry, or
                whose count differs from ``shira_weight``'s. Nothing is changed unless every layer's are valid.
        """
        plan = []
        for name, adapter in host.adapters_of(adapter_name, ShiraLinear).items():
            key = f"{PREFIX}{name}.shira_indices"
            idx, values = tensors.get(key), tensors.get(f"{PREFIX}{name}.shira_weight")
            if idx is None:
                continue
            out_features, in_features = adapter.out_features, adapter.in_features
            problem = None
            if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
                problem = f"the indices are {str(idx.dtype).removeprefix('torch.')}, not integers"
            elif idx.dim() != 2 or idx.shape[0] != 2:
                problem = f"the indices have shape {tuple(idx.shape)}, not (2, k)"
            elif idx.numel() and (int(idx.min()) < 0 or int(idx[0].max()) >= out_features
                                  or int(idx[1].max()) >= in_features):
                problem = "an index is outside the weight"
            else:
                problem = _sparse_problem(flat_indices(idx, in_features), values, out_features * in_features)
            if problem:
                raise AdapterLoadError(f"adapter {adapter_name!r}: {key} / shira_weight are not valid SHiRA entries "
                                       f"of a {out_features} x {in_features} weight: {problem} (it needs (2, k) integer "
                                       "(row, column) indices inside the weight, no repeats, k values)")
            plan.append((adapter, idx))
        for adapter, idx in plan:
            if not torch.equal(adapter.shira_indices.cpu(), idx.to(torch.int32).cpu()):
                adapter.set_indices(idx)


def shira_from_cli(args: Any) -> ShiraConfig:
    """A :class:`ShiraConfig` from ``peftkit train`` options ``args``: ``--r`` (default 32, as peft),
    ``--target-modules`` (default: the model type's, e.g. BERT's query and value), ``--task-type``; ``random_seed``,
    ``init_weights`` through ``--option``.

    Raises:
        ConfigError: invalid values (from the config's validation).
    """
    return ShiraConfig(r=args.r or 32, target_modules=args.target_modules, task_type=args.task_type)


register_method(MethodSpec(
    name="shira", config_cls=ShiraConfig, family="selective", kind="select", mergeable=True,
    paper=SHIRA_PAPER, tuner=ShiraTuner(), cli_config=shira_from_cli, default_lr=None,
))
