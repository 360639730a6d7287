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

Sharded checkpoints (format 2, ``run.parallel = "fsdp"``) replace the four tensor files by
``shards/``: one safetensors file per rank, written by every rank at once with
``torch.distributed.checkpoint`` and its ``HuggingFaceStorageWriter``. Each file holds that
rank's pieces of every tensor (model, teacher, objective, and the optimiser moments keyed
``optimizer/FQN/NAME``) and, in its JSON header, where each piece sits in the whole tensor;
DCP's own ``.metadata`` file (a pickle) is never written, and reading rebuilds the layout
from those headers (``HuggingFaceStorageReader``), so nothing is unpickled. ``state.json``
(rank 0: the optimiser's parameter groups, RNG states of every rank, the data position) and
the manifest over every file come last, as in format 1. Loading reshards: a checkpoint of W
ranks resumes on any number of ranks, or on one process with a plain model, and
``export_checkpoint`` turns it into format 1 (``selfflow checkpoint export``) for sampling on
one machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from selfflow.core import distributed, files
from selfflow.core.distributed import barrier, shard
from selfflow.core.train_step import TrainState

FORMAT = 1
SHARDED_FORMAT = 2
SHARDS = "shards"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle", ".distcp")
PARTS = ("model", "teacher", "objective")


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
    protect: Path | None = None,
) -> Path | None:
    """Write ``directory/step_{state.step:07d}`` atomically and keep the last ``keep_last``
    (and ``protect``, when given: e.g. the newest checkpoint whose losses were sane, which a
    run of bad steps must not rotate away).

    Call on every rank (RNG states are gathered); only rank 0 writes, except that a sharded
    state (``state.sharded``, FSDP2) is written by every rank into ``shards/`` (format 2).
    Returns the path on rank 0, ``None`` elsewhere.
    """
    if state.sharded:
        return _save_sharded(
            Path(directory),
            state,
            generator=generator,
            data_position=data_position,
            extra=extra,
            keep_last=keep_last,
            protect=protect,
        )
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
        _write_manifest(tmp, FORMAT, state.step)
    _keep_last(directory, keep_last, protect)
    return final


def _write_manifest(tmp: Path, fmt: int, step: int) -> None:
    names = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    manifest = {"format": fmt, "step": step, "sha256": {f: _sha256(tmp / f) for f in names}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))  # last: it marks the checkpoint complete


def _keep_last(directory: Path, keep_last: int, protect: Path | None = None) -> None:
    kept = Path(protect).resolve() if protect is not None else None
    for old in list_checkpoints(directory)[:-keep_last] if keep_last > 0 else []:
        if old.resolve() != kept:
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- sharded (format 2)


def _trained(state: TrainState) -> nn.Module:
    """The student and the objective under one root, so the optimiser's parameters have
    fully qualified names (``model.blocks.0.qkv.weight``, ``objective.projector.0.weight``)."""
    holder = nn.Module()
    holder.model = state.module
    holder.objective = state.objective
    return holder


def _broadcast_str(value: str | None) -> str:
    sh = shard()
    if sh.world == 1:
        assert value is not None
        return value
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0)  # between our own ranks, never from a file
    return str(box[0])


def _module_tensors(state: TrainState) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for part, module in zip(PARTS, (state.module, state.teacher, state.objective)):
        out.update({f"{part}/{k}": v for k, v in module.state_dict().items()})
    return out


def _optimizer_state(state: TrainState) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(_trained(state), state.optimizer)


def _optimizer_tensors(osd: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for fqn, st in osd["state"].items():
        for name, value in st.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer/{fqn}/{name}"] = value
            else:
                scalars.setdefault(fqn, {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _save_sharded(
    directory: Path,
    state: TrainState,
    *,
    generator: torch.Generator | None,
    data_position: dict[str, Any] | None,
    extra: dict[str, Any] | None,
    keep_last: int,
    protect: Path | None = None,
) -> Path | None:
    """Format 2: every rank writes its shards with DCP into the one temporary directory rank 0
    made (a filesystem every rank sees: the same machine, or a shared one across nodes)."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint import save as dcp_save

    rngs = _gather_rng(generator)
    sh = shard()
    final = directory / f"step_{state.step:07d}"
    stack = contextlib.ExitStack()
    with stack:
        tmp_name = None
        if sh.is_main:
            directory.mkdir(parents=True, exist_ok=True)
            files.clean_stale(directory)
            tmp_name = str(stack.enter_context(files.atomic_directory(final)))
        tmp = Path(_broadcast_str(tmp_name))
        opt_tensors, opt_meta = _optimizer_tensors(_optimizer_state(state))
        tensors = {**_module_tensors(state), **opt_tensors}
        writer = HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp_save(tensors, storage_writer=writer, no_dist=sh.world == 1)
        barrier()  # every rank's file is complete before rank 0 hashes them
        if sh.is_main:
            meta = {
                "format": SHARDED_FORMAT,
                "step": state.step,
                "world": sh.world,
                "optimizer": opt_meta,
                "lr_schedule": None if state.lr_schedule is None else state.lr_schedule.state_dict(),
                "rng": rngs,
                "data_position": data_position or {},
                "extra": extra or {},
            }
            (tmp / "state.json").write_text(json.dumps(meta))
            _write_manifest(tmp, SHARDED_FORMAT, state.step)
    barrier()  # the checkpoint is in place before any rank goes on (and could read it)
    if not sh.is_main:
        return None
    _keep_last(directory, keep_last, protect)
    return final


def _shard_files(ckpt: Path) -> list[Path]:
    found = sorted((ckpt / SHARDS).glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{ckpt / SHARDS} holds no shard files; the checkpoint is incomplete")
    return found


def _shard_layout(ckpt: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor of a sharded checkpoint: its whole shape and dtype, from the files' JSON
    headers only."""
    out: dict[str, tuple[list[int], torch.dtype]] = {}
    for f in _shard_files(ckpt):
        with safe_open(str(f), framework="pt") as h:
            info = _sharding_info(h, f)
            for k in h.keys():  # noqa: SIM118 (safe_open is not a dict)
                sl = h.get_slice(k)
                shape, off = list(sl.get_shape()), info[k]["saved_offsets"]
                end = [o + n for o, n in zip(off, shape)]
                if k in out:
                    end = [max(a, b) for a, b in zip(out[k][0], end)]
                out[k] = (end, _DTYPES[sl.get_dtype()])
    return {k: (tuple(v[0]), v[1]) for k, v in out.items()}


_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


def _sharding_info(h: Any, f: Path) -> dict[str, Any]:
    try:
        return json.loads((h.metadata() or {})["DCP_SHARDING_INFO"])
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{f} has no DCP sharding information in its header ({err}); it is not a selfflow shard"
        ) from err


def read_sharded(ckpt: Path, prefix: str) -> dict[str, Tensor]:
    """The whole tensors under ``prefix/`` of a sharded checkpoint, assembled from every
    rank's pieces on this process (no process group, no pickle). ``prefix`` is ``model``,
    ``teacher``, ``objective`` or ``optimizer``; keys lose it."""
    pieces: dict[str, list[tuple[list[int], Tensor]]] = {}
    for f in _shard_files(ckpt):
        with safe_open(str(f), framework="pt") as h:
            info = _sharding_info(h, f)
            for k in h.keys():  # noqa: SIM118 (safe_open is not a dict)
                if k.startswith(prefix + "/"):
                    pieces.setdefault(k[len(prefix) + 1 :], []).append((info[k]["saved_offsets"], h.get_tensor(k)))
    out: dict[str, Tensor] = {}
    for k, parts in pieces.items():
        ndim = parts[0][1].dim()
        size = [max(off[i] + t.shape[i] for off, t in parts) for i in range(ndim)]
        whole = torch.empty(size, dtype=parts[0][1].dtype)
        covered = 0
        for off, t in parts:
            whole[tuple(slice(o, o + n) for o, n in zip(off, t.shape))] = t
            covered += t.numel()
        if covered != whole.numel():
            raise CheckpointError(
                f"{ckpt / SHARDS}: the pieces of {prefix}/{k} cover {covered} of its {whole.numel()} elements; "
                "a shard file is missing"
            )
        out[k] = whole
    return out


def _check_fits(ckpt: Path, targets: dict[str, Tensor]) -> None:
    """One line when the checkpoint's tensors do not fit this run's (another model or config)."""
    layout = _shard_layout(ckpt)
    shapes = [k for k in targets if k in layout and tuple(targets[k].shape) != layout[k][0]]
    missing = [k for k in targets if k not in layout]
    unexpected = [k for k in layout if k not in targets]
    if shapes or missing or unexpected:
        parts = []
        if shapes:
            k = shapes[0]
            parts.append(
                f"{len(shapes)} tensors differ in shape (e.g. {k}: {layout[k][0]} in the checkpoint, "
                f"{tuple(targets[k].shape)} here)"
            )
        if missing:
            parts.append(f"{len(missing)} tensors are missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} are not in this run (e.g. {unexpected[0]})")
        raise CheckpointError(
            f"{ckpt / SHARDS} does not fit this model: {'; '.join(parts)}; it was written with another model or "
            "objective config: use the config it recorded, or start a new run"
        )


def _load_sharded(ckpt: Path, state: TrainState, meta: dict[str, Any]) -> None:
    """Format 2 into ``state`` on any number of ranks: DCP reads each rank's part of every
    tensor (resharding as needed) straight into the model's, teacher's, objective's and
    optimiser's tensors."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    modules = _module_tensors(state)
    osd = _optimizer_state(state)  # fresh AdamW state is created here, to be read into
    opt_tensors, _ = _optimizer_tensors(osd)
    targets = {**modules, **opt_tensors}
    _check_fits(ckpt, targets)
    one = not (dist.is_available() and dist.is_initialized())  # one process: a plain model reads whole tensors
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp_load(targets, storage_reader=HuggingFaceStorageReader(str(ckpt / SHARDS)), no_dist=one)
    for part, module in zip(PARTS, (state.module, state.teacher, state.objective)):
        module.load_state_dict({k[len(part) + 1 :]: v for k, v in modules.items() if k.startswith(part + "/")})
    saved = meta["optimizer"]
    new_state: dict[str, dict[str, Any]] = {}
    for key, value in opt_tensors.items():
        fqn, name = key[len("optimizer/") :].rsplit("/", 1)
        new_state.setdefault(fqn, {})[name] = value
    for fqn, st in saved.get("scalars", {}).items():
        new_state.setdefault(fqn, {}).update(st)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in saved["param_groups"]]
    try:
        set_optimizer_state_dict(
            _trained(state),
            state.optimizer,
            optim_state_dict={"state": new_state, "param_groups": groups},  # type: ignore[dict-item]
        )
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(
            f"{ckpt} does not fit this optimiser ({err}); it was written with another model or objective config: "
            "use the config it recorded, or start a new run"
        ) from err


def export_checkpoint(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A sharded checkpoint (format 2) as a format-1 one, on one process: whole tensors in
    ``model/teacher/objective/optimizer.safetensors``, the optimiser state keyed by parameter
    index as ``torch.optim`` numbers them, the same ``state.json`` otherwise. Written as
    ``out/checkpoints/step_N`` (a run directory: ``selfflow sample OUT`` reads it). A
    format-1 checkpoint is copied as it is. Returns the new checkpoint directory."""
    ckpt = resolve(path)
    manifest = verify(ckpt)
    meta = json.loads((ckpt / "state.json").read_text())
    final = Path(out) / "checkpoints" / f"step_{int(meta['step']):07d}"
    if final.exists():
        raise CheckpointError(f"{final} exists; give another --out (export never overwrites a checkpoint)")
    files.clean_stale(final.parent)
    with files.atomic_directory(final) as tmp:
        if manifest.get("format", meta.get("format")) != SHARDED_FORMAT:
            for f in ckpt.iterdir():
                shutil.copyfile(f, tmp / f.name)
            return final
        for part in PARTS:
            _save_tensors(read_sharded(ckpt, part), tmp / f"{part}.safetensors")
        moments = read_sharded(ckpt, "optimizer")
        saved = meta["optimizer"]
        index: dict[str, int] = {}
        groups = []
        for g in saved["param_groups"]:
            ids = []
            for fqn in g["params"]:
                index[fqn] = len(index)
                ids.append(index[fqn])
            groups.append({**g, "params": ids})
        opt: dict[str, Tensor] = {}
        for key, value in moments.items():
            fqn, name = key.rsplit("/", 1)
            opt[f"{index[fqn]}.{name}"] = value
        _save_tensors(opt, tmp / "optimizer.safetensors")
        scalars = {str(index[f]): v for f, v in saved.get("scalars", {}).items()}
        meta = {**meta, "format": FORMAT, "optimizer": {"param_groups": groups, "scalars": scalars}}
        meta["extra"] = {**meta.get("extra", {}), "exported_from": str(ckpt)}
        (tmp / "state.json").write_text(json.dumps(meta))
        _write_manifest(tmp, FORMAT, int(meta["step"]))
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
    for f in path.rglob("*"):
        if f.suffix in PICKLE_SUFFIXES or f.name == ".metadata":  # DCP's default metadata file is a pickle
            raise CheckpointError(f"{f} is a pickle-based file inside a checkpoint; selfflow never unpickles files")
    return manifest


def load_weights(path: str | os.PathLike, which: str = "teacher") -> dict[str, Tensor]:
    """Verified tensors of one part (``model``, ``teacher``, ``objective``) of a checkpoint."""
    ckpt = resolve(path)
    verify(ckpt)
    if (ckpt / SHARDS).is_dir():  # format 2: assembled from every rank's pieces
        return read_sharded(ckpt, which)
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


def check_model(path: str | os.PathLike, current: dict[str, Any], defaults: dict[str, Any] | None = None) -> None:
    """Refuse, in one line naming the differing settings, a checkpoint written by a model
    of another shape (width, depth, modalities and their channels, classes, ...), before any
    tensor is read. ``current`` is this model's ``attrs.asdict(ModelConfig)``; a checkpoint
    that recorded no model settings is left to ``load_checkpoint``'s shape check.
    ``defaults``: values for settings a checkpoint predates (written before the setting
    existed, so it ran with its default)."""
    ckpt = resolve(path)
    recorded = read_state(ckpt, full=False).get("extra", {}).get("model")
    if not isinstance(recorded, dict):
        return
    recorded = {**json.loads(json.dumps(defaults or {})), **recorded}
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
    if meta.get("format") not in (FORMAT, SHARDED_FORMAT):
        raise CheckpointError(
            f"{ckpt} has format {meta.get('format')}, this selfflow reads formats {FORMAT} and {SHARDED_FORMAT}"
        )
    if meta["format"] == SHARDED_FORMAT:
        _load_sharded(ckpt, state, meta)
        return _restore_rest(state, meta, generator)
    if distributed.is_sharded(state.module):
        raise CheckpointError(
            f"{ckpt} is a whole-model checkpoint (format {FORMAT}) and this run's model is sharded "
            "(run.parallel = 'fsdp'); resume it with run.parallel = 'ddp' (any number of processes)"
        )
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
    return _restore_rest(state, meta, generator)


def _restore_rest(state: TrainState, meta: dict[str, Any], generator: torch.Generator | None) -> dict[str, Any]:
    """Schedule, step and this rank's RNG states. A rank the checkpoint did not have (a
    resume on more ranks) takes rank 0's: the training generator is the same on every rank
    (random numbers are drawn for the global batch), the data position is global."""
    if state.lr_schedule is not None and meta["lr_schedule"] is not None:
        state.lr_schedule.load_state_dict(meta["lr_schedule"])
    state.step = int(meta["step"])
    rngs = meta["rng"]
    rank = shard().rank
    restore_rng(rngs[rank] if rank < len(rngs) else rngs[0], generator)
    return meta
