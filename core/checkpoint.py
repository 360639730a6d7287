"""Checkpoints that never unpickle, written atomically.

A checkpoint is a directory ``step_0000500/``:

- ``model.safetensors``, ``teacher.safetensors``, ``objective.safetensors`` (the projector),
  ``optimizer.safetensors``: tensors only;
- ``state.json``: step, optimiser hyper-parameters and scalar state, LR schedule, RNG states
  (the training generator, torch, numpy and python, per rank), the data position, the run
  config and anything the caller adds;
- ``manifest.json``, written last: the sha256 of every file. Loading verifies it, so a
  truncated or edited file is refused instead of half-loaded.

The directory is written under a temporary name and renamed into place
(``core/files.atomic_directory``), so a crash or a full disk mid-write leaves the previous
checkpoint as it was; rewriting a step replaces its directory the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import Tensor

from selfflow.core import files
from selfflow.core.distributed import shard
from selfflow.core.train_step import TrainState

FORMAT = 1
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted or read; the message says which file and why."""


# ----------------------------------------------------------------------------- helpers


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    files.save_tensors(path, tensors)


def _optimizer_split(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, Tensor):
                tensors[f"{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_join(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, st in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state(generator: torch.Generator | None) -> dict[str, Any]:
    """JSON-able RNG states of this process (the generator's state goes as a byte list)."""
    py = random.getstate()
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple), "the global RandomState is MT19937: get_state() is the legacy tuple"
    out: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    if generator is not None:
        out["generator"] = generator.get_state().tolist()
    return out


def restore_rng(state: dict[str, Any], generator: torch.Generator | None) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    if generator is not None and "generator" in state:
        generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))


def _gather_rng(generator: torch.Generator | None) -> list[dict[str, Any]]:
    mine = rng_state(generator)
    sh = shard()
    if sh.world == 1:
        return [mine]
    everyone: list[Any] = [None] * sh.world
    dist.all_gather_object(everyone, mine)  # between our own ranks, never from a file
    return everyone


# ----------------------------------------------------------------------------- save


def save_checkpoint(
    directory: str | os.PathLike,
    state: TrainState,
    *,
    generator: torch.Generator | None = None,
    data_position: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    keep_last: int = 3,
) -> Path | None:
    """Write ``directory/step_{state.step:07d}`` atomically and keep the last ``keep_last``.

    Call on every rank (RNG states are gathered); only rank 0 writes. Returns the path on
    rank 0, ``None`` elsewhere.
    """
    rngs = _gather_rng(generator)
    if not shard().is_main:
        return None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{state.step:07d}"
    files.clean_stale(directory)
    with files.atomic_directory(final) as tmp:  # a failure mid-write leaves the last checkpoint as it was
        _save_tensors(state.module.state_dict(), tmp / "model.safetensors")
        _save_tensors(state.teacher.state_dict(), tmp / "teacher.safetensors")
        _save_tensors(state.objective.state_dict(), tmp / "objective.safetensors")
        opt_tensors, opt_meta = _optimizer_split(state.optimizer)
        _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
        meta = {
            "format": FORMAT,
            "step": state.step,
            "optimizer": opt_meta,
            "lr_schedule": None if state.lr_schedule is None else state.lr_schedule.state_dict(),
            "rng": rngs,
            "data_position": data_position or {},
            "extra": extra or {},
        }
        (tmp / "state.json").write_text(json.dumps(meta))
        names = sorted(p.name for p in tmp.iterdir())
        manifest = {"format": FORMAT, "step": state.step, "sha256": {f: _sha256(tmp / f) for f in names}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))  # last: it marks the checkpoint complete
    for old in list_checkpoints(directory)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (with a manifest) in step order; temporary directories are ignored."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob("step_*") if p.is_dir() and (p / "manifest.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


# ----------------------------------------------------------------------------- load


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a checkpoint, a ``checkpoints/`` folder or a run directory."""
    path = Path(path)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path} looks like a pickle-based checkpoint ({path.suffix}); selfflow never unpickles files. "
            "Convert the weights to safetensors, or point at a selfflow checkpoint directory"
        )
    if (path / "manifest.json").is_file():
        return path
    for candidate in (path, path / "checkpoints"):
        last = latest_checkpoint(candidate)
        if last is not None:
            return last
    raise CheckpointError(f"no selfflow checkpoint at {path} (expected a step_* directory with manifest.json)")


def verify(path: Path) -> dict[str, Any]:
    """Check every file against the manifest; returns the manifest."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path / 'manifest.json'} is unreadable ({err}); the checkpoint is incomplete") from err
    for name, digest in manifest.get("sha256", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing; the checkpoint is incomplete")
        if _sha256(f) != digest:
            raise CheckpointError(
                f"{f} does not match its sha256 in the manifest: it was truncated or modified; refusing to load"
            )
    for f in path.iterdir():
        if f.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{f} is a pickle-based file inside a checkpoint; selfflow never unpickles files")
    return manifest


def load_weights(path: str | os.PathLike, which: str = "teacher") -> dict[str, Tensor]:
    """Verified tensors of one part (``model``, ``teacher``, ``objective``) of a checkpoint."""
    ckpt = resolve(path)
    verify(ckpt)
    return load_file(str(ckpt / f"{which}.safetensors"))


def read_state(path: str | os.PathLike, *, full: bool = True) -> dict[str, Any]:
    """The checkpoint's ``state.json``, verified against the manifest: every file
    (``full``), or only ``state.json`` itself (a cheap look before the tensors are loaded,
    which verifies the rest)."""
    ckpt = resolve(path)
    if full:
        verify(ckpt)
    else:
        try:
            digest = json.loads((ckpt / "manifest.json").read_text())["sha256"]["state.json"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{ckpt / 'manifest.json'} is unreadable or lists no state.json ({err})") from err
        if not (ckpt / "state.json").is_file() or _sha256(ckpt / "state.json") != digest:
            raise CheckpointError(f"{ckpt / 'state.json'} is missing or does not match its sha256 in the manifest")
    return json.loads((ckpt / "state.json").read_text())


def model_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"width 32 in the checkpoint, 64 here"`` for every model setting that differs."""
    keys = list(dict.fromkeys([*recorded, *current]))
    return [
        f"{k} {recorded.get(k, 'unset')!r} in the checkpoint, {current.get(k, 'unset')!r} here"
        for k in keys
        if recorded.get(k) != current.get(k)
    ]


def check_model(path: str | os.PathLike, current: dict[str, Any]) -> None:
    """Refuse, in one line naming the differing settings, a checkpoint written by a model
    of another shape (width, depth, modalities and their channels, classes, ...), before any
    tensor is read. ``current`` is this model's ``attrs.asdict(ModelConfig)``; a checkpoint
    that recorded no model settings is left to ``load_checkpoint``'s shape check."""
    ckpt = resolve(path)
    recorded = read_state(ckpt, full=False).get("extra", {}).get("model")
    if not isinstance(recorded, dict):
        return
    diffs = model_differences(recorded, json.loads(json.dumps(current)))
    if diffs:
        raise CheckpointError(
            f"{ckpt} was written by another model ({'; '.join(diffs)}); resume it with the config it recorded "
            "(drop the --set or config that changes the model), or start a new run"
        )


def _load_module(module: torch.nn.Module, file: Path, device: torch.device) -> None:
    """Load ``file`` into ``module``; a file of another model is one line that counts the
    mismatches and shows one, never torch's list of every tensor."""
    tensors = load_file(str(file), device=str(device))
    own = module.state_dict()
    shapes = [k for k in own if k in tensors and tuple(own[k].shape) != tuple(tensors[k].shape)]
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    if shapes or missing or unexpected:
        parts = []
        if shapes:
            k = shapes[0]
            parts.append(
                f"{len(shapes)} tensors differ in shape (e.g. {k}: {tuple(tensors[k].shape)} in the checkpoint, "
                f"{tuple(own[k].shape)} here)"
            )
        if missing:
            parts.append(f"{len(missing)} tensors are missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} are not in this model (e.g. {unexpected[0]})")
        raise CheckpointError(
            f"{file} does not fit this model: {'; '.join(parts)}; it was written with another model config: "
            "use the config it recorded, or start a new run"
        )
    module.load_state_dict(tensors)


def load_checkpoint(
    path: str | os.PathLike, state: TrainState, *, generator: torch.Generator | None = None
) -> dict[str, Any]:
    """Restore ``state`` (model, teacher, projector, optimiser, schedule, step) and the RNG
    states of this rank in place. Returns the JSON state (data position, extra)."""
    ckpt = resolve(path)
    verify(ckpt)
    meta = json.loads((ckpt / "state.json").read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt} has format {meta.get('format')}, this selfflow reads format {FORMAT}")
    device = next(state.module.parameters()).device
    _load_module(state.module, ckpt / "model.safetensors", device)
    _load_module(state.teacher, ckpt / "teacher.safetensors", device)
    _load_module(state.objective, ckpt / "objective.safetensors", device)
    opt = _optimizer_join(load_file(str(ckpt / "optimizer.safetensors"), device=str(device)), meta["optimizer"])
    try:
        state.optimizer.load_state_dict(opt)
    except ValueError as err:  # another parameter count: torch's message, named and with the fix
        raise CheckpointError(
            f"{ckpt / 'optimizer.safetensors'} does not fit this optimiser ({err}); it was written with another "
            "model or objective config: use the config it recorded, or start a new run"
        ) from err
    if state.lr_schedule is not None and meta["lr_schedule"] is not None:
        state.lr_schedule.load_state_dict(meta["lr_schedule"])
    state.step = int(meta["step"])
    rngs = meta["rng"]
    rank = shard().rank
    restore_rng(rngs[rank] if rank < len(rngs) else rngs[0], generator)
    return meta
