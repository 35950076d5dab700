"""LoRA initialisations that start from the base weight, and their conversion back to plain LoRA.

PiSSA: Meng, Wang and Zhang, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of
Large Language Models", 2024, arXiv:2404.02948. With ``W = U S V^T`` (float32, ``(out, in)``):
``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_r^T`` and the base becomes ``W_res = W - s B A``.
``pissa_niter_N`` takes ``U_r, S_r, V_r`` from ``torch.svd_lowrank(W, r, niter=N)`` (Halko, Martinsson
and Tropp, "Finding structure with randomness", 2009, arXiv:0909.4061), which is much faster on big
matrices. Its random projection is drawn from a fixed seed (0), the global generator left as it was, so
loading the saved adapter onto the same base rebuilds the same residual; peft draws it from the global
generator, so a ``pissa_niter_N`` adapter does not rebuild the same residual in the other library (nor
in peft itself under another seed) unless it was converted to plain LoRA.

OLoRA: Büyükakyüz, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models", 2024,
arXiv:2406.01775. With ``W = Q R`` (reduced QR): ``B = Q[:, :r]``, ``A = R[:r]`` and
``W_res = W - s B A`` (as HF PEFT computes it: the factors are not divided by ``s``).

Either way the adapted layer starts exactly at the base model's function (``W_res + s B A = W``),
and the trainable-parameter count is LoRA's ``r * (in + out)``.

Because the base weight is changed, such an adapter only fits the residual model. After training,
:func:`convert_to_plain_lora` (reached through ``save_pretrained(...,
path_initial_model_for_weight_conversion=<folder of the adapter saved before training>)``, as in
peft) rewrites it as a plain LoRA of rank ``2r`` for the *original* base weight, using
``s B A - s B0 A0 = s [B | -B0] [A ; A0]``.
"""

from __future__ import annotations

import copy
import math
import re
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from peftkit.config import PeftConfig, check
from peftkit.formats.hf_peft import PREFIX, AdapterLoadError, get_peft_model_state_dict, read_adapter_files
from peftkit.layers import AdaptedLayer

if TYPE_CHECKING:
    from peftkit.model import PeftModel

PISSA_PAPER = ("PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language Models "
               "(Meng et al., 2024, arXiv:2404.02948)")
OLORA_PAPER = "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models (Büyükakyüz, 2024, arXiv:2406.01775)"
_NITER = re.compile(r"pissa_niter_(\d+)")
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "loftq")
BASE_INITS = ("pissa", "pissa_niter_[N]", "olora")
#: initialisations peftkit accepts in a trained adapter's config (loading replaces A and B), not to train from:
#: EVA sets A from activations of the training data (Paischer et al., "One Initialization to Rule them All:
#: Fine-tuning via Explained Variance Adaptation", 2024, arXiv:2410.07170), which peftkit does not run
LOAD_ONLY_INITS = ("eva",)


def check_init(value: Any) -> None:
    """Check that ``value`` is a known ``init_lora_weights`` (True, False, ``"gaussian"``, ``"orthogonal"``,
    ``"pissa"``, ``"pissa_niter_N"``, ``"olora"``, ``"loftq"`` or the load-only ``"eva"``).

    Raises:
        ConfigError: any other value; the message lists the valid ones.
    """
    check(value in PLAIN_INITS or value in LOAD_ONLY_INITS or value in ("pissa", "olora")
          or (isinstance(value, str) and _NITER.fullmatch(value)),
          f"init_lora_weights={value!r} is not valid; expected one of {PLAIN_INITS + BASE_INITS + LOAD_ONLY_INITS} "
          "(N: the number of subspace iterations, an integer >= 0; 'eva' only in a trained adapter's config)")


def check_trainable_init(config: Any) -> None:
    """Check that ``config`` (or a part of a composed config) asks for no initialisation peftkit accepts only
    when loading a trained adapter (:data:`LOAD_ONLY_INITS`).

    Raises:
        ConfigError: ``init_lora_weights="eva"`` (peftkit has no EVA step).
    """
    for part in getattr(config, "configs", None) or [config]:
        init = getattr(part, "init_lora_weights", None)
        check(not (isinstance(init, str) and init in LOAD_ONLY_INITS),
              f"init_lora_weights={init!r}: peftkit has no EVA initialisation (it needs activations of the training "
              "data); the value is accepted only in the config of a trained adapter being loaded. Train from "
              "True, 'gaussian', 'orthogonal', 'pissa' or 'olora' instead")


def changes_base(init: Any) -> bool:
    """Whether ``init`` moves part of the base weight into the adapter (PiSSA, OLoRA)."""
    return isinstance(init, str) and (init == "olora" or init.startswith("pissa"))


@torch.no_grad()
def principal_factors(weight: Tensor, r: int, scaling: float, init: str) -> tuple[Tensor, Tensor]:
    """The initial ``(A, B)`` of a PiSSA or OLoRA adapter.

    Args:
        weight: the base weight as ``(out, in)``, any float dtype (computed in float32).
        r: the rank, at most ``min(out, in)``.
        scaling: the adapter's ``alpha / r`` (or rsLoRA's ``alpha / sqrt(r)``).
        init: ``"pissa"``, ``"pissa_niter_N"`` or ``"olora"``.

    Returns:
        ``A: (r, in)`` and ``B: (out, r)`` in float32; ``weight - scaling * B @ A`` is the residual.

    Raises:
        ConfigError: ``r > min(out, in)``.
    """
    out_f, in_f = weight.shape
    check(r <= min(out_f, in_f), f"init_lora_weights={init!r} needs r <= min(out, in) = {min(out_f, in_f)}; got r={r}")
    w = weight.detach().float()
    if init == "olora":
        q, upper = torch.linalg.qr(w)
        return upper[:r].contiguous(), q[:, :r].contiguous()
    if init == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        # a fixed seed for the random projection, so that loading the saved adapter onto the same base
        # rebuilds the same residual (the global RNG is left as it was)
        with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(w, r, niter=int(init.rsplit("_", 1)[1]))
        vh = v.T
    root = (s / scaling).sqrt()
    return (root[:, None] * vh).contiguous(), (u * root[None, :]).contiguous()


def _cat_rank(a: Tensor, a0: Tensor, groups: int) -> Tensor:
    """``[a ; a0]`` along the rank (dim 0), keeping each convolution group's rank rows together."""
    if groups == 1:
        return torch.cat([a, a0], 0)
    parts = [t.reshape(groups, t.shape[0] // groups, *t.shape[1:]) for t in (a, a0)]
    return torch.cat(parts, 1).reshape(2 * a.shape[0], *a.shape[1:])


def convert_to_plain_lora(model: PeftModel, adapter_name: str, initial_dir: str) -> tuple[PeftConfig, dict[str, Tensor]]:
    """A PiSSA/OLoRA adapter (trained from the initial state saved in ``initial_dir``) as a plain LoRA.

    Every low-rank pair becomes ``A' = [A ; A0]`` (rank dim 0) and ``B' = [B | -B0]`` (rank dim 1), so
    ``s' B' A' = s (B A - B0 A0)`` with ``s' = s``: the config's ``r`` and ``lora_alpha`` (and their
    patterns) are doubled (``lora_alpha`` times ``sqrt(2)`` with rsLoRA) and ``init_lora_weights`` becomes
    True. Applied to the original base weight ``W = W_res + s B0 A0`` it gives the trained layer
    ``W_res + s B A``. Other tensors (biases, ``modules_to_save``) are kept as they are.

    Args:
        model: the PeftModel holding the trained adapter.
        adapter_name: which adapter to convert.
        initial_dir: folder written by ``save_pretrained`` right after the adapter was created.

    Returns:
        ``(config, tensors)`` ready to be written.

    Raises:
        ValueError: DoRA (its norm depends on the base weight, so there is no equivalent plain LoRA), or
            rsLoRA with ``rank_pattern``/``alpha_pattern`` (as in peft).
        AdapterLoadError: ``initial_dir`` lacks a tensor of this adapter or has another shape.
    """
    config = copy.deepcopy(model.peft_config[adapter_name])
    if getattr(config, "use_dora", False):
        raise ValueError("path_initial_model_for_weight_conversion does not apply to DoRA adapters: the magnitude is "
                         "normalised by the residual weight, so no plain LoRA reproduces them")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("path_initial_model_for_weight_conversion is not supported with use_rslora=True together "
                         "with rank_pattern/alpha_pattern (as in peft)")
    _, initial = read_adapter_files(initial_dir)
    # the LoRA tensors only (as peft's conversion): a targeted lm_head's base here is the residual, not the user's
    own = get_peft_model_state_dict(model, adapter_name, save_embedding_layers=False)
    tensors = {k: v.detach().clone() for k, v in own.items()}
    for module_name, layer in model.base_model.wrappers():
        if not isinstance(layer, AdaptedLayer) or adapter_name not in layer.adapters:
            continue
        adapter = layer.adapters[adapter_name]
        keys = [f"{PREFIX}{module_name}.{k}" for k in (adapter.a_key, adapter.b_key)]
        for k in keys:
            if k not in initial or initial[k].shape != tensors[k].shape:
                found = tuple(initial[k].shape) if k in initial else "missing"
                raise AdapterLoadError(f"{initial_dir!r} does not hold the initial {k} with shape "
                                       f"{tuple(tensors[k].shape)} (found {found}); give the folder saved right "
                                       "after the adapter was created")
        key_a, key_b = keys
        tensors[key_a] = _cat_rank(tensors[key_a], initial[key_a].to(tensors[key_a]), adapter.groups)
        tensors[key_b] = torch.cat([tensors[key_b], -initial[key_b].to(tensors[key_b])], 1)
    config.init_lora_weights = True
    config.r *= 2
    config.lora_alpha *= math.sqrt(2) if config.use_rslora else 2
    config.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    config.alpha_pattern = {k: 2 * v for k, v in config.alpha_pattern.items()}
    return config, tensors
