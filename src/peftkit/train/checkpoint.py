"""Training checkpoints: what it takes to continue a run exactly, in safetensors and JSON (no pickle).

A checkpoint is a folder ``<root>/checkpoints/step-<N>/`` holding

- ``trainer_state.json`` (written by rank 0): the step, the loss history and counters, the
  scheduler's state and the optimiser's hyper-parameters (``param_groups``), the world size;
- ``rank<R>.safetensors`` (one per rank): the trainable parameters (``param.<name>``; a rank's own
  shard under FSDP), persistent buffers (``buffer.<name>``), what a method keeps outside both
  (``method.<adapter>:<key>``, e.g. AdaLoRA's rank masks), the optimiser's state tensors
  (``optim.<index>.<key>``, e.g. AdamW's ``exp_avg``) and the random generators' states
  (``rng.torch``, ``rng.cuda.<i>``, ``rng.numpy``);
- ``rank<R>.json``: the rest of that rank's state (python ``random``, numpy's position, scalar
  optimiser entries).

The data position needs no file: the data order is a function of the seed and the step.
``<root>/checkpoints/latest.json`` names the newest complete checkpoint. Every rank writes into a
temporary folder; once all are done, rank 0 writes ``trainer_state.json``, renames the folder into
place, points ``latest.json`` at it (each file written atomically) and removes older checkpoints,
so a crash at any moment leaves ``latest.json`` naming a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import Tensor, nn

from peftkit.config import ConfigError, check
from peftkit.formats.hf_peft import atomic_write_bytes
from peftkit.layers import unmerged_base_values, unmerged_for_load
from peftkit.train import distributed as D
from peftkit.train.checks import read_json_object

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
STATE = "trainer_state.json"
STATE_KEYS = ("step", "world_size", "optimizer_param_groups", "total_steps", "batch_size", "seed", "history",
              "samples", "seconds", "scheduler")
RANK_KEYS = ("numpy", "python", "optim_scalars")
DAMAGED = "the checkpoint is damaged; resume from an earlier copy of the run or train again"


def _write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())


def _rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors |= {f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss = random.getstate()
    return tensors, {"numpy": [name, int(pos), int(has_gauss), float(cached)],
                     "python": [version, list(internal), gauss]}


def _set_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in tensors.items() if k.startswith("rng.cuda."))
    if cuda:
        torch.cuda.set_rng_state_all([s for _, s in cuda])
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def _optim_entries(tensors: dict[str, Tensor], scalars: dict[str, Any]) -> int:
    """How many optimiser-state entries a rank's checkpoint holds (tensors ``optim.*`` and scalars)."""
    return sum(k.startswith("optim.") for k in tensors) + len(scalars)


def _check_optimizer_state(folder: Path, tensors: dict[str, Tensor], meta: dict[str, Any], params: list[Tensor]
                           ) -> None:
    """Refuse optimiser state that does not fit: an index with no parameter, a moment whose shape is not its
    parameter's, or fewer entries than were written (``optim_entries``; a file without it is not counted).

    Raises:
        ConfigError: naming the checkpoint folder and the first entry that does not fit.
    """
    where = f"the optimiser state in {str(folder)!r}"
    count = _optim_entries(tensors, meta["optim_scalars"])
    written = meta.get("optim_entries")
    check(written is None or written == count,
          f"{where} has {count} entries where {written} were written; {DAMAGED}")
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        _, index, _ = key.split(".", 2)
        check(index.isdigit() and int(index) < len(params),
              f"{where} has {key!r}, for no parameter of this optimiser; {DAMAGED}")
        local = D.local(params[int(index)])
        check(value.dim() == 0 or value.shape == local.shape,
              f"{where} has {key!r} of shape {list(value.shape)} for a parameter of shape {list(local.shape)}; "
              f"{DAMAGED}")


def _check_rng_state(folder: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Refuse random-generator states that could not be restored (tried on throwaway generators).

    Raises:
        ConfigError: naming the generator whose saved state does not fit.
    """
    for name in ("rng.torch", "rng.numpy"):
        check(name in tensors, f"{str(folder)!r} holds no {name} state; {DAMAGED}")
    try:
        torch.Generator().set_state(tensors["rng.torch"])
        kind, pos, has_gauss, cached = meta["numpy"]
        np.random.RandomState().set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss,
                                           cached))
        version, internal, gauss = meta["python"]
        random.Random().setstate((version, tuple(internal), gauss))
    except (RuntimeError, ValueError, TypeError) as err:
        raise ConfigError(f"{str(folder)!r} holds a random-generator state that cannot be restored ({err}); "
                          f"{DAMAGED}") from None


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    names = {n for n, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if k in names}


def _method_host(model: nn.Module) -> Any:
    """The peftkit adapter host of ``model`` (a :class:`~peftkit.PeftModel`), or None for another module."""
    host = getattr(model, "base_model", None)
    return host if callable(getattr(host, "method_state", None)) else None


def _params_by_index(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _plain(value: Any) -> Any:
    """JSON-ready: tuples become lists (restored from the live optimiser's types on load)."""
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def save_checkpoint(root: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> Path:
    """Write the checkpoint of optimiser step ``step`` under ``root/checkpoints``; every rank must call it.

    Args:
        model: the user's module (not a DDP wrapper); trainable parameters and buffers are saved.
        state: JSON-ready trainer state (rank 0's is written).

    Returns:
        The checkpoint folder.
    """
    info = D.current()
    folder = Path(root) / CHECKPOINTS
    final, tmp = folder / f"step-{step:08d}", folder / f".tmp-step-{step:08d}"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    D.barrier()
    # a trained base tensor that a merged adapter changed (bias="all") is written unmerged, as adapter files are
    unmerged = unmerged_base_values(model)
    tensors = {f"param.{n}": unmerged[n] if n in unmerged and not hasattr(p, "device_mesh") else D.local(p)
               for n, p in model.named_parameters() if p.requires_grad}
    tensors |= {f"buffer.{n}": b for n, b in _buffers(model).items()}
    host = _method_host(model)
    if host is not None:  # what a method keeps outside parameters and buffers (AdaLoRA's rank masks)
        tensors |= {f"method.{k}": v for k, v in host.method_state().items()}
    scalars: dict[str, Any] = {}
    opt = optimizer.state_dict()
    for index, entries in opt["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{index}.{key}"] = D.local(value)
            else:
                scalars[f"{index}.{key}"] = value
    rng, meta = _rng_state()
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in (tensors | rng).items()}
    atomic_write_bytes(tmp / f"rank{info.rank}.safetensors", save(tensors, metadata={"format": "pt"}))
    _write_json(tmp / f"rank{info.rank}.json", {**meta, "optim_scalars": scalars,
                                                 "optim_entries": _optim_entries(tensors, scalars)})
    D.barrier()
    if info.is_main:
        _write_json(tmp / STATE, {**state, "step": step, "world_size": info.world_size,
                                  "optimizer_param_groups": _plain(opt["param_groups"])})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_json(folder / LATEST, {"step": step, "folder": final.name})
        for old in folder.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    D.barrier()
    return final


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root/checkpoints`` (the one ``latest.json`` names; without it, the
    newest ``step-*`` folder holding its state), or None when there is none.

    Raises:
        ConfigError: ``latest.json`` is damaged or names a folder that is not a complete checkpoint.
    """
    pointer = Path(root) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        # a stop between a checkpoint's folder being put in place and latest.json being written: the newest
        # folder whose state (written last inside it) is there is complete
        done = sorted(p for p in (Path(root) / CHECKPOINTS).glob("step-*") if (p / STATE).is_file())
        return done[-1] if done else None
    name = read_json_object(pointer, DAMAGED).get("folder")
    check(isinstance(name, str) and name.startswith("step-") and "/" not in name and "\\" not in name,
          f"{str(pointer)!r} names no checkpoint folder (expected \"folder\": \"step-<N>\", got {name!r}); {DAMAGED}")
    folder = Path(root) / CHECKPOINTS / name
    check((folder / STATE).is_file(), f"{str(pointer)!r} names {name!r}, which holds no {STATE}; {DAMAGED}")
    return folder


def _read_state(folder: Path) -> dict[str, Any]:
    state = read_json_object(folder / STATE, DAMAGED)
    missing = [k for k in STATE_KEYS if k not in state]
    check(not missing, f"{str(folder / STATE)!r} lacks {missing}; {DAMAGED}")
    sched = state["scheduler"]
    fields = {
        "step": _whole(state["step"]), "world_size": _whole(state["world_size"]) and state["world_size"] >= 1,
        "samples": _whole(state["samples"]), "seconds": _number(state["seconds"]),
        "history": isinstance(state["history"], list) and all(_number(v) for v in state["history"]),
        "scheduler": isinstance(sched, dict) and {"base_lrs", "last_epoch", "lr_lambdas"} <= set(sched)
        and _whole(sched["last_epoch"]) and isinstance(sched["base_lrs"], list)
        and all(_number(v) for v in sched["base_lrs"]),
        "total_steps": _whole(state["total_steps"]) and _whole(state["step"]) and state["step"] <= state["total_steps"],
        "optimizer_param_groups": isinstance(state["optimizer_param_groups"], list) and all(
            isinstance(g, dict) and isinstance(g.get("params"), list) and _number(g.get("lr"))
            for g in state["optimizer_param_groups"]),
    }
    wrong = [k for k, ok in fields.items() if not ok]
    check(not wrong, f"{str(folder / STATE)!r} has {', '.join(wrong)} of the wrong form; {DAMAGED}")
    return state


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _rank_meta_problems(meta: dict[str, Any]) -> list[str]:
    """The fields of a ``rank<R>.json`` that do not have the form :func:`_rng_state` and the optimiser write."""
    numpy_state, python_state, scalars = meta["numpy"], meta["python"], meta["optim_scalars"]
    ok = {
        "numpy": isinstance(numpy_state, list) and len(numpy_state) == 4 and isinstance(numpy_state[0], str)
        and all(_number(v) for v in numpy_state[1:]),
        "python": isinstance(python_state, list) and len(python_state) == 3 and _whole(python_state[0])
        and isinstance(python_state[1], list) and all(_whole(v) for v in python_state[1])
        and (python_state[2] is None or _number(python_state[2])),
        "optim_scalars": isinstance(scalars, dict) and all(
            isinstance(k, str) and "." in k and k.split(".", 1)[0].isdigit() and _number(v) for k, v in scalars.items()),
    }
    return [k for k, good in ok.items() if not good]


def _read_rank(folder: Path, rank: int, tensors: bool = True) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Rank ``rank``'s tensors (only the file's header is checked when ``tensors`` is False) and JSON."""
    meta = read_json_object(folder / f"rank{rank}.json", DAMAGED)
    missing = [k for k in RANK_KEYS if k not in meta]
    check(not missing, f"{str(folder / f'rank{rank}.json')!r} lacks {missing}; {DAMAGED}")
    wrong = _rank_meta_problems(meta)
    check(not wrong, f"{str(folder / f'rank{rank}.json')!r} has {', '.join(wrong)} of the wrong form; {DAMAGED}")
    path = folder / f"rank{rank}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing; {DAMAGED}")
    try:
        if tensors:
            return load_file(path), meta
        with safe_open(path, "pt"):
            return {}, meta
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{str(path)!r} is not a readable safetensors file ({err}); {DAMAGED}") from None


def read_checkpoint_state(folder: str | os.PathLike) -> dict[str, Any]:
    """The trainer state saved in the checkpoint ``folder`` (its ``trainer_state.json``), checked; nothing is
    loaded. Raises ConfigError (damaged) or FileNotFoundError (missing)."""
    return _read_state(Path(folder))


def check_checkpoint(folder: str | os.PathLike, rank: int = 0, world_size: int | None = None) -> None:
    """Read the checkpoint's JSON files and rank ``rank``'s safetensors header, without changing anything.

    Raises:
        ConfigError / FileNotFoundError: a damaged or missing file (the message names it), or, with
            ``world_size``, a checkpoint written by another number of processes (checked first: a run of
            more processes than wrote it would otherwise find a rank's files "missing").
    """
    state = _read_state(Path(folder))
    check(world_size is None or state["world_size"] == world_size,
          f"checkpoint {str(folder)!r} was written by {state['world_size']} process(es) but this run has "
          f"{world_size}; resume with --nproc-per-node {state['world_size']}")
    _read_rank(Path(folder), rank, tensors=False)


def load_checkpoint(folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer
                    ) -> dict[str, Any]:
    """Restore parameters, buffers, optimiser state and this rank's random generators from ``folder``.

    Returns:
        The trainer state saved with it (``step``, ``scheduler``, ...).

    Raises:
        ConfigError: the checkpoint was written by another number of processes, does not fit the
            model or optimiser (names, shapes), or a file of it is damaged; checked before anything is changed.
        FileNotFoundError: a file of the checkpoint is missing.
    """
    info = D.current()
    folder = Path(folder)
    state = _read_state(folder)
    check(state["world_size"] == info.world_size,
          f"checkpoint {str(folder)!r} was written by {state['world_size']} process(es) but this run has "
          f"{info.world_size}; resume with --nproc-per-node {state['world_size']}")
    tensors, meta = _read_rank(folder, info.rank)
    targets = {f"param.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    targets |= {f"buffer.{n}": b for n, b in _buffers(model).items()}
    saved = {k for k in tensors if k.startswith(("param.", "buffer."))}
    wrong = sorted(saved ^ set(targets)) + [k for k in saved & set(targets)
                                            if tensors[k].shape != D.local(targets[k]).shape]
    if wrong:
        raise ConfigError(f"checkpoint {str(folder)!r} does not fit this model (trainable parameters or "
                          f"buffers differ: {wrong[:4]}); resume with the run's own options")
    params = _params_by_index(optimizer)
    groups = optimizer.param_groups
    check(len(state["optimizer_param_groups"]) == len(groups),
          f"checkpoint {str(folder)!r} has {len(state['optimizer_param_groups'])} optimiser groups, not {len(groups)}")
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            p = params[int(index)]
            if hasattr(p, "device_mesh") and value.dim() == p.dim():  # a shard of a DTensor's state
                from torch.distributed.tensor import DTensor

                value = DTensor.from_local(value.to(D.local(p).device), p.device_mesh, p.placements,
                                           run_check=False, shape=p.shape, stride=p.stride())
            opt_state.setdefault(int(index), {})[name] = value
    for key, value in meta["optim_scalars"].items():
        index, name = key.split(".", 1)
        opt_state.setdefault(int(index), {})[name] = value
    _check_optimizer_state(folder, tensors, meta, params)
    _check_rng_state(folder, tensors, meta)
    method = {k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")}
    host = _method_host(model)
    if method:
        check(host is not None, f"checkpoint {str(folder)!r} holds adapter training state ({sorted(method)[:2]}) "
                                "but the model is not a peftkit PeftModel; resume with the run's own options")
        host.load_method_state(method, check_only=True)
    saved_groups = []
    for live, stored in zip(groups, state["optimizer_param_groups"], strict=True):
        saved_groups.append({k: tuple(v) if isinstance(live.get(k), tuple) else v for k, v in stored.items()})
    optimizer.load_state_dict({"state": opt_state, "param_groups": saved_groups})
    with torch.no_grad(), unmerged_for_load(model):  # the values are unmerged ones
        for key, dst in targets.items():
            D.local(dst).copy_(tensors[key])
    if method:
        host.load_method_state(method)
    _set_rng_state(tensors, meta)
    return state
