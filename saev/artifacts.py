"""Content-hashed artifacts: keys, manifests and completeness checks (files are written by `saev.atomic`).

Every stage output is a directory `<root>/<stage>/<key>/`. The key is a hash of a canonical JSON of
{stage, format version, every result-changing config field, the keys of the inputs}, so the keys of a whole
graph are known before anything runs. `manifest.json` is written last, atomically: no manifest means not done.
Every other file is written atomically too (temp file in the same directory, fsync, rename), so a killed job
leaves either a whole file or none, never a torn one.
"""

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import platform
import socket
import subprocess
import sys
import typing
from collections.abc import Callable, Iterator, Mapping

import beartype

from saev import atomic, checksums, errors, slurm

logger = logging.getLogger("saev.artifacts")

MANIFEST = "manifest.json"
"""Name of the file whose presence marks an artifact as done."""


_VERIFIED = ".verified.json"
_DAMAGE_NOTE = ".damaged"
_CHANGED = "changed after its job wrote it (not the checksum recorded then)"


class IncompleteArtifactError(errors.UserInputError, RuntimeError):
    """An artifact that a stage needs is missing, has no manifest, or lost a file."""


class ArtifactBusyError(errors.UserEnvironmentError, RuntimeError):
    """Another process holds the lock of this artifact (it is being written now)."""


class DamagedArtifactError(IncompleteArtifactError):
    """An artifact's files disagree with its manifest (missing, wrong size, wrong checksum, another key's manifest)."""


###############
# Hashed keys #
###############


def unhashed(default: object = dataclasses.MISSING, **kwargs: object) -> typing.Any:
    """A dataclass field that does not change a stage's output (devices, batch sizes, log paths).

    Such fields are left out of artifact keys, so changing them recomputes nothing.
    """
    metadata = {"hashed": False}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use default_factory for mutable defaults")
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def hashed_if_set(default: object = None, **kwargs: object) -> typing.Any:
    """A dataclass field left out of artifact keys while it equals `default`: adding such a field to a config class
    keeps every earlier key, while setting it (it changes the output) gives new ones."""
    return dataclasses.field(default=default, metadata={"hashed": "unless-default"}, **kwargs)


@beartype.beartype
def hashed_params(obj: object) -> object:
    """The result-changing part of a config as plain JSON types.

    Dataclasses become dicts without their `unhashed` fields and their `hashed_if_set` fields at the default (plus a
    `__class__` entry so that two config classes with the same fields never collide); tuples become lists; everything
    else must already be JSON-serialisable.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, object] = {"__class__": type(obj).__name__}
        for field in dataclasses.fields(obj):
            hashed, value = field.metadata.get("hashed", True), getattr(obj, field.name)
            if hashed is True or (hashed == "unless-default" and value != field.default):
                out[field.name] = hashed_params(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [hashed_params(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): hashed_params(v) for k, v in obj.items()}
    if isinstance(obj, pathlib.Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot hash config value of type {type(obj).__name__}: {obj!r}")


@beartype.beartype
def canonical_json(obj: object) -> str:
    """JSON with sorted keys and no whitespace; NaN/inf are refused so that keys are portable."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


@beartype.beartype
def get_key(stage: str, version: int, params: object, inputs: Mapping[str, str]) -> str:
    """Content key of an artifact: 16 hex chars of sha256 over stage, format version, params and input keys.

    Args:
        stage: stage name, e.g. "train".
        version: the stage's output format version; bump it when the format or algorithm changes.
        params: result-changing parameters (see `hashed_params`).
        inputs: input name -> "stage/key" of each input artifact.
    """
    payload = {"stage": stage, "version": version, "params": params, "inputs": dict(inputs)}
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()[:16]


@beartype.beartype
def verify_file(fpath: pathlib.Path) -> None:
    """Hash one written file and compare with the checksum recorded when it was written; `DamagedArtifactError`
    naming the file if they differ or the file is missing. A file with no record (older version) passes."""
    record = checksums.recorded_checksum(fpath)
    if record is None:
        if not fpath.is_file():
            raise DamagedArtifactError(f"{fpath} is missing")
        return
    try:
        ok = fpath.stat().st_size == record[0] and checksums.file_checksum(fpath) == record[1]
    except OSError as err:
        raise DamagedArtifactError(f"cannot read {fpath}: {err.strerror or err}") from err
    if not ok:
        raise DamagedArtifactError(f"{fpath} does not match the checksum it was written with (changed or corrupted)")


#############
# Artifacts #
#############


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class Artifact:
    """One stage output directory `<root>/<stage>/<key>/`."""

    root: pathlib.Path
    """Root of the artifact store (e.g. `runs/`)."""
    stage: str
    """Stage that writes it."""
    key: str
    """Content key (see `get_key`)."""

    @property
    def dpath(self) -> pathlib.Path:
        return self.root / self.stage / self.key

    @property
    def ref(self) -> str:
        """Short reference used in manifests and messages: `stage/key`."""
        return f"{self.stage}/{self.key}"

    @property
    def manifest_fpath(self) -> pathlib.Path:
        return self.dpath / MANIFEST

    def is_done(self) -> bool:
        """Cheap check: a readable manifest of this stage and key, every listed file present with its size."""
        return self.check().state == "done"

    def read_manifest(self) -> dict[str, typing.Any]:
        """The parsed manifest; `IncompleteArtifactError` if it is missing or unreadable."""
        try:
            with open(self.manifest_fpath, "rb") as fd:
                manifest = json.loads(fd.read().decode("utf-8"))
        except FileNotFoundError:
            raise IncompleteArtifactError(f"{self.ref} is not done: {self.manifest_fpath} is missing") from None
        except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise DamagedArtifactError(f"{self.ref}: cannot read {self.manifest_fpath}: {err}") from err
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise DamagedArtifactError(f"{self.ref}: {self.manifest_fpath} is not an artifact manifest")
        return manifest

    def check(
        self,
        hashing: typing.Literal["none", "changed", "all"] = "none",
        *,
        params: object = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> "Health":
        """Compare the artifact's files with its manifest; nothing is changed on disk.

        Args:
            hashing: "none" checks the manifest (readable, this stage and key, and `params` if given) and every
                listed file's presence and size (stat only); "changed" also hashes each file whose size, mtime, ctime
                or inode differ from when it was last verified (written or hashed here: a file edited in place, even
                at the same size, is caught; an untouched one is not read again); "all" hashes every file.
            params: the hashed params the plan expects; a manifest recording others is damaged.
            on_bytes: called with the number of bytes after each hashed chunk (progress).
        """
        try:
            manifest = self.read_manifest()
        except DamagedArtifactError as err:
            return Health("damaged", [Problem(MANIFEST, str(err).removeprefix(f"{self.ref}: "), "manifest")])
        except IncompleteArtifactError:
            return Health("missing", []) if hashing == "none" else self._check_unsealed(hashing, on_bytes)
        if (manifest.get("stage"), manifest.get("key")) != (self.stage, self.key):
            where = " (a link to another artifact?)" if self.dpath.is_symlink() else " (a copied directory?)"
            found = f"{manifest.get('stage')}/{manifest.get('key')}"
            return Health("damaged", [Problem(MANIFEST, f"names {found}, not {self.ref}{where}", "other_key")])
        if params is not None and manifest.get("params") != json.loads(canonical_json(params)):
            return Health(
                "damaged",
                [Problem(MANIFEST, "records other parameters than the config gives for this key", "manifest")],
            )
        problems, verified = [], self._read_verified() if hashing == "changed" else {}
        newly_verified = {}
        for rel, entry in manifest["files"].items():
            if isinstance(entry, int):  # stores of earlier versions: sizes only
                size, digest = entry, None
            elif isinstance(entry, dict) and type(entry.get("size")) is int:
                size, digest = entry["size"], entry.get(checksums.CHECKSUM)
            else:
                problems.append(
                    Problem(MANIFEST, f"lists {rel!r} with an entry that is not a size and checksum", "manifest")
                )
                continue
            fpath = self.dpath / rel
            try:
                st = fpath.stat()
            except FileNotFoundError:
                problems.append(Problem(rel, "is missing (scratch purged?)", "missing"))
                continue
            except OSError as err:
                problems.append(Problem(rel, f"cannot be read: {err.strerror or err}", "unreadable"))
                continue
            if st.st_size != size:
                problems.append(Problem(rel, f"has {st.st_size} bytes, the manifest says {size}", "size"))
                continue
            if hashing == "none" or digest is None:
                continue
            sig = checksums.stat_sig(st)
            if hashing == "changed" and verified.get(rel) == sig:
                continue
            what = "does not match its checksum (changed or corrupted since written)"
            self._hash_and_compare(rel, digest, sig, what, on_bytes, problems, newly_verified)
        if newly_verified:
            self._update_verified(newly_verified)
        return Health("damaged" if problems else "done", problems)

    def _check_unsealed(
        self, hashing: typing.Literal["changed", "all"], on_bytes: Callable[[int], None] | None
    ) -> "Health":
        """An artifact with no manifest (not done): each file written so far must still hold what its job wrote, the
        checksum recorded beside it. A file whose stat signature is neither the recorded one nor the one at which it
        was last verified is hashed ("all": every file). "damaged" when one differs (a piece edited after its job
        wrote it): repairing moves it aside and the run recomputes it, instead of sealing it; else "missing"."""
        problems, verified, newly_verified = [], self._read_verified() if hashing == "changed" else {}, {}
        for rel in self.list_files():
            fpath = self.dpath / rel
            record = checksums.read_record(fpath)
            try:
                st = fpath.stat()
            except OSError:
                continue  # gone since listed: a missing piece, recomputed anyway
            if record is None or record.size != st.st_size:
                continue  # no record (an earlier version), or not the size written: not done, recomputed anyway
            sig = checksums.stat_sig(st)
            if hashing == "changed" and sig in (record.sig, verified.get(rel)):
                continue
            self._hash_and_compare(rel, record.digest, sig, _CHANGED, on_bytes, problems, newly_verified)
        if newly_verified:
            self._update_verified(newly_verified)
        return Health("damaged" if problems else "missing", problems)

    def _hash_and_compare(
        self,
        rel: str,
        digest: str,
        sig: list[int],
        what: str,
        on_bytes: Callable[[int], None] | None,
        problems: list["Problem"],
        newly_verified: dict[str, list[int]],
    ) -> None:
        """Hash the file `rel` and compare it with `digest`: a `Problem` saying `what` when it differs (or one saying
        it cannot be read), else its stat signature `sig` (taken before hashing) goes to `newly_verified`."""
        try:
            actual = checksums.file_checksum(self.dpath / rel, on_bytes)
        except OSError as err:
            problems.append(Problem(rel, f"cannot be read: {err.strerror or err}", "unreadable"))
            return
        if actual != digest:
            problems.append(Problem(rel, what, "checksum"))
        else:
            newly_verified[rel] = sig

    def verify(self, *, params: object = None) -> dict[str, typing.Any]:
        """Check the artifact before a stage reads it: manifest, key, sizes, and the checksum of any file changed
        since it was last verified. A damaged artifact is unsealed (`repair`) so that rerunning its stage
        recomputes it. Returns the manifest; raises `IncompleteArtifactError` naming the first problem."""
        health = self.check("changed", params=params)
        if health.state == "missing":
            self.read_manifest()  # raises "not done"
        if health.state == "damaged":
            self.repair(health)
            raise DamagedArtifactError(f"{self.ref} is damaged: {health.describe(self)}; rerun its stage")
        return self.read_manifest()

    def repair(self, health: "Health") -> list[str]:
        """Make a damaged artifact not done, so that its stage recomputes what is needed; returns what was done.

        Files that disagree with their checksum are moved aside (`.<name>.corrupt`; their pieces are then missing),
        the manifest is moved aside (`.manifest.json.replaced`), and a link to another artifact's directory is
        removed (the directory it points to is left alone). Nothing else is deleted.
        """
        actions = []
        if self.dpath.is_symlink() and any(p.kind == "other_key" for p in health.problems):
            self.dpath.unlink()
            return [f"removed the link {self.dpath} (it pointed to another artifact)"]
        for problem in health.problems:
            if problem.kind in ("size", "checksum"):
                fpath = self.dpath / problem.rel
                with contextlib.suppress(OSError):
                    os.replace(fpath, fpath.with_name(f".{fpath.name}.corrupt"))
                    checksums.sum_fpath(fpath).unlink(missing_ok=True)
                    actions.append(f"moved {problem.rel} aside")
        if self.manifest_fpath.exists():
            with contextlib.suppress(OSError):
                os.replace(self.manifest_fpath, self.replaced_manifest_fpath)
                actions.append("unsealed it")
        with contextlib.suppress(OSError):
            (self.dpath / _DAMAGE_NOTE).write_text(health.describe(self) + "\n")
        return actions

    @property
    def replaced_manifest_fpath(self) -> pathlib.Path:
        """Where `repair` moves the manifest of a damaged artifact (what it recorded stays readable there)."""
        return self.dpath / f".{MANIFEST}.replaced"

    def damage_note(self) -> str | None:
        """Why this artifact was last unsealed by `repair` (None when it was not, or has been sealed since)."""
        try:
            return (self.dpath / _DAMAGE_NOTE).read_text().strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    def list_files(self) -> dict[str, int]:
        """Relative path -> size of every file in the directory except the manifest and hidden files (locks, temp
        files, checksum records, checkpoints)."""
        files = {}
        if not self.dpath.is_dir():
            return files
        for fpath in sorted(self.dpath.rglob("*")):
            if not fpath.is_file() or fpath.name == MANIFEST or fpath.name.startswith("."):
                continue
            files[fpath.relative_to(self.dpath).as_posix()] = fpath.stat().st_size
        return files

    def write_manifest(
        self,
        *,
        params: object,
        inputs: Mapping[str, str],
        started: str,
        extra: Mapping[str, object] | None = None,
    ) -> dict[str, typing.Any]:
        """Mark the artifact done: write `manifest.json` (atomically, last) listing every file with its size and
        checksum, as the file is now. The checksum recorded when a file was written is taken as is only while the
        file's stat signature is the recorded one (or the one at which it was last verified); otherwise the file is
        hashed again (a file written without a record is hashed now, and logged).

        Raises:
            DamagedArtifactError: a file no longer holds what its job wrote (edited since, even at the same size): it
                is moved aside (`repair`, logged), nothing is sealed, and a rerun recomputes it.
        """
        files, sigs, changed = {}, {}, []
        verified = self._read_verified()
        for rel in self.list_files():
            fpath = self.dpath / rel
            st = fpath.stat()
            sig, record = checksums.stat_sig(st), checksums.read_record(fpath)
            if record is None:
                logger.warning("%s: %s has no checksum recorded at write time; hashing it now", self.ref, rel)
                digest = checksums.file_checksum(fpath)
            elif record.size == st.st_size and sig in (record.sig, verified.get(rel)):
                digest = record.digest
            else:
                digest = checksums.file_checksum(fpath)
                if record.size != st.st_size or digest != record.digest:
                    changed.append(Problem(rel, _CHANGED, "checksum" if record.size == st.st_size else "size"))
                    continue
            files[rel] = {"size": st.st_size, checksums.CHECKSUM: digest}
            sigs[rel] = sig  # taken before hashing: a write during it shows as a change next time
        if changed:
            health = Health("damaged", changed)
            actions = self.repair(health)
            logger.warning("%s: %s; %s", self.ref, health.describe(self), ", ".join(actions))
            raise DamagedArtifactError(
                f"{health.describe(self)}: not sealed, {', '.join(actions) or 'left as is'}; rerun to recompute it"
            )
        manifest = {
            "stage": self.stage,
            "key": self.key,
            "params": params,
            "inputs": dict(inputs),
            "files": files,
            "started": started,
            "finished": now(),
            "host": socket.gethostname(),
            "slurm_job_id": slurm.job_id(),
            "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
            "git_commit": git_commit(),
            "versions": _versions(),
            **dict(extra or {}),
        }
        self._update_verified(sigs, replace=True)  # each file's state at which it matched its checksum
        atomic.atomic_write_json(self.manifest_fpath, manifest)
        (self.dpath / _DAMAGE_NOTE).unlink(missing_ok=True)
        return manifest

    def verified_sigs(self) -> dict[str, list[int]]:
        """File -> the stat signature (`checksums.stat_sig`) at which it last matched its checksum ({} if none)."""
        return self._read_verified()

    def _read_verified(self) -> dict[str, list[int]]:
        try:
            with open(self.dpath / _VERIFIED) as fd:
                obj = json.load(fd)
        except (OSError, ValueError):
            return {}
        if not isinstance(obj, dict):
            return {}
        # Anything but [size, mtime_ns, ctime_ns, inode] is ignored: that file is hashed again.
        return {
            rel: sig for rel, sig in obj.items()
            if isinstance(sig, list) and len(sig) == 4 and all(type(x) is int for x in sig)
        }  # fmt: skip

    def _update_verified(self, sigs: Mapping[str, list[int]], *, replace: bool = False) -> None:
        """Remember the stat signature at which each file last matched its checksum (best effort: a store that is
        not writable, or a lost race with another process, only means hashing again later)."""
        merged = {} if replace else self._read_verified()
        merged.update(sigs)
        fpath = self.dpath / _VERIFIED
        tmp = fpath.with_name(f"{fpath.name}{atomic.TMP_MARK}{os.getpid()}")
        try:
            with open(tmp, "w") as fd:
                json.dump(merged, fd)
            os.replace(tmp, fpath)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self, part: str = "", *, wait: bool = False, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold an exclusive lock while writing this artifact (or one part of it, e.g. one K-block).

        If another process holds it: raise `ArtifactBusyError`, or with `wait` call `on_wait` (e.g. to log) and
        block until it is released. The lock is an flock on `<dpath>/.lock[-part]`, released when the process dies,
        so a killed job never leaves a stale lock behind.
        """
        self.dpath.mkdir(parents=True, exist_ok=True)
        lock_fpath = self.dpath / (f".lock-{part}" if part else ".lock")
        try:
            fd = os.open(lock_fpath, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides: group-shared roots
        except PermissionError as err:
            raise PermissionError(
                err.errno,
                f"cannot open the lock file {lock_fpath}: {err.strerror} (a group-shared root needs group-writable "
                f"files: `chmod g+w {self.root}/*/*/.lock*` once; run with umask 002)",
            ) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise ArtifactBusyError(
                        f"{self.ref} is being written by another process (lock {lock_fpath})"
                    ) from None
                if on_wait is not None:
                    on_wait()
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


class Problem(typing.NamedTuple):
    """One file of an artifact that disagrees with the manifest."""

    rel: str
    """Path relative to the artifact directory (or `manifest.json` itself)."""
    what: str
    """What is wrong, e.g. "is missing (scratch purged?)"."""
    kind: typing.Literal["manifest", "other_key", "missing", "unreadable", "size", "checksum"]
    """The class of problem, for `Artifact.repair` (a file of the wrong size or checksum is moved aside)."""


class Health(typing.NamedTuple):
    """The result of `Artifact.check`."""

    state: typing.Literal["done", "missing", "damaged"]
    """done: matches its manifest; missing: no manifest (not done, nothing wrong); damaged: see problems."""
    problems: list[Problem]
    """What disagrees with the manifest (empty unless damaged)."""

    def describe(self, art: "Artifact", limit: int = 3) -> str:
        shown = [f"{art.dpath / p.rel} {p.what}" for p in self.problems[:limit]]
        more = len(self.problems) - limit
        return "; ".join(shown) + (f" (and {more} more)" if more > 0 else "")


@beartype.beartype
def now() -> str:
    """Current UTC time in ISO 8601, seconds precision."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def git_commit() -> str | None:
    """The commit of this code's git checkout (HEAD), or None outside one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=pathlib.Path(__file__).parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("torch", "numpy", "open_clip"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    return versions
