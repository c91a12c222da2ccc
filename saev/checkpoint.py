"""Training checkpoints: named tensors plus JSON scalars in ONE safetensors file, written atomically.

The scalars (step, configs, ...) are a JSON object stored in the safetensors header's metadata, so a checkpoint is
a single file replaced by one rename: a reader never sees tensors of one step with scalars of another. Nothing is
unpickled on load. The file records a `kind` (what wrote it) and a format `version`, checked on load.
"""

import json
import pathlib
from collections.abc import Mapping

import beartype
import safetensors
import safetensors.torch
from torch import Tensor

from saev import artifacts, atomic, errors

_META_KEY = "saev"


@beartype.beartype
def save(
    fpath: pathlib.Path, tensors: Mapping[str, Tensor], *, kind: str, version: int, meta: Mapping[str, object]
) -> None:
    """Write `tensors` (moved to cpu) and the JSON-serialisable `meta` to `fpath` atomically.

    The file is serialised in memory and written by `atomic.atomic_write_bytes`, so it follows the umask like
    every other artifact file (safetensors' own `save_file` creates 0600 files) and a full disk is a `WriteError`
    (`save_file` raises its own `SafetensorError` instead of an OSError).

    Raises:
        atomic.WriteError: the file could not be written (e.g. disk full); the previous checkpoint is kept.
    """
    header = json.dumps({"kind": kind, "version": version, "meta": dict(meta)}, allow_nan=False)
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    atomic.atomic_write_bytes(fpath, safetensors.torch.save(cpu, metadata={_META_KEY: header}))


class CheckpointError(errors.UserInputError, ValueError):
    """A training checkpoint cannot be resumed from (damaged, not a saev checkpoint, made for another run); the
    message names the file and says to delete it to start over."""


@beartype.beartype
def load(fpath: pathlib.Path, *, kind: str, version: int) -> tuple[dict[str, Tensor], dict[str, object]]:
    """Read a checkpoint written by `save`: (tensors on cpu, meta).

    Raises:
        FileNotFoundError: no file at `fpath`.
        PermissionError: the file is not readable by this user (the error names it).
        CheckpointError: not a readable safetensors file, not the checksum it was written with, not a saev checkpoint,
            or of another kind or version (a ValueError too).
    """
    if not fpath.is_file():
        raise FileNotFoundError(f"checkpoint {fpath} is missing")
    # safetensors reports an unreadable file as "No such file or directory": open it ourselves first.
    with open(fpath, "rb"):
        pass
    try:  # same-size corruption would otherwise resume from wrong weights
        artifacts.verify_file(fpath)
    except artifacts.DamagedArtifactError as err:
        raise CheckpointError(f"checkpoint {err}; delete it to start over") from None
    try:
        with safetensors.safe_open(str(fpath), framework="pt", device="cpu") as fd:
            header = (fd.metadata() or {}).get(_META_KEY)
            tensors = {name: fd.get_tensor(name) for name in fd.keys()}
    except (safetensors.SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint {fpath} is not a readable safetensors file: {err}") from err
    try:
        info = json.loads(header) if header is not None else None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint {fpath} has an unreadable header: {err}") from err
    if not isinstance(info, dict) or not isinstance(info.get("meta"), dict):
        raise CheckpointError(f"{fpath} is not a saev checkpoint (no '{_META_KEY}' metadata)")
    if (info.get("kind"), info.get("version")) != (kind, version):
        raise CheckpointError(
            f"checkpoint {fpath} is a {info.get('kind')!r} checkpoint of version {info.get('version')!r}; "
            f"expected {kind!r} version {version}"
        )
    return tensors, info["meta"]
