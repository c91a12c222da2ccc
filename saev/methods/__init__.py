"""Baseline methods that are scored like SAE latents: k-means, PCA, random directions, the ViT's own neurons.

Every method, once fitted, is an `Encoder`: `n_latents` columns of codes for each activation row, a block of
columns at a time (`encode_block`), a full-width reconstruction (`reconstruct`, for NMSE) and a count of non-zero
codes per row (`count_nonzero`, for L0). `saev.nn.SparseAutoencoder` is one too, so `saev.scoring` scores any of
them the same way.

Each method has a frozen config dataclass (`CONFIGS`, chosen by `kind` in TOML; unknown keys are refused by
`saev.configs.from_dict`) and a fitter that reads the corpus as a stream of float32 [B, D] batches, never whole
(`fit`): its state is saved every few batches and a fit killed mid-way resumes from it, giving the same result, bit
for bit on the CPU. A fitted method is a directory with `method.safetensors` (its tensors) and `method.json` ({"kind",
"config", "d_vit"}), written by `save` and read by `load`; nothing is unpickled.

Shape suffixes: B rows of a batch, D activation width (d_vit), K latents (or a block of them), N rows.
"""

import dataclasses
import json
import math
import pathlib
import typing
from collections.abc import Callable, Iterable

import beartype
import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import Tensor

from saev import atomic, configs, errors

WEIGHTS_FNAME = "method.safetensors"
"""The tensors of a fitted method inside its directory."""

CONFIG_FNAME = "method.json"
"""{"kind", "config", "d_vit"} of a fitted method inside its directory."""


class MethodConfigError(configs.ConfigError):
    """A method's config does not fit its data (k above the corpus rows, PCA components above the width, ...)."""


class MethodFileError(errors.UserInputError):
    """A fitted method's directory or a fit state is missing, damaged or for another config; the message names it."""


@typing.runtime_checkable
class Encoder(typing.Protocol):
    """What scoring and the NMSE/L0 metrics need of a method (`saev.nn.SparseAutoencoder` is one)."""

    @property
    def d_vit(self) -> int:
        """Width of the activations it reads."""
        ...

    @property
    def n_latents(self) -> int:
        """Number of code columns (latents)."""
        ...

    def encode_block(self, x_BD: Tensor, start: int, stop: int) -> Tensor:
        """Codes [start, stop) of every row, float32 [B, stop - start] on x_BD's device; equal to the same columns
        of `encode_block(x_BD, 0, n_latents)` (up to the last bit where a matmul of another width rounds
        differently)."""
        ...

    def reconstruct(self, x_BD: Tensor) -> Tensor:
        """The full-width reconstruction x_hat_BD (float32, same shape) from the codes of every latent."""
        ...

    def count_nonzero(self, x_BD: Tensor) -> Tensor:
        """int64 [B]: how many of each row's codes are non-zero (its L0)."""
        ...


@typing.runtime_checkable
class Fitted(Encoder, typing.Protocol):
    """A fitted method of `kinds()` (what `save` writes and `load` returns): an `Encoder` with its config and
    tensors, movable between devices like a torch module."""

    cfg: typing.Any
    """Its config (one of `Config`)."""

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor that defines it, by name (what `method.safetensors` holds)."""
        ...

    def to(self, device: str | torch.device) -> typing.Any: ...


@typing.runtime_checkable
class Fitter(typing.Protocol):
    """A method's fit in progress: one `update` per batch of the stream, a state that can be saved and restored."""

    batches_seen: int
    """Batches given to `update` so far (the stream resumes at this batch)."""

    def update(self, x_BD: Tensor) -> None:
        """Take one batch (float32 [B, D]) of the corpus stream."""
        ...

    def state_dict(self) -> dict[str, Tensor]:
        """Every tensor of the fit so far (on the CPU), `batches_seen` included."""
        ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Continue from a `state_dict` of a fitter with the same config and width."""
        ...

    def finish(self) -> Fitted:
        """The fitted method, from every batch taken so far."""
        ...


class Method(typing.Protocol):
    """A fitted method class: built from its config, its width and its tensors (what `save` writes)."""

    def __call__(self, cfg: typing.Any, d_vit: int, tensors: dict[str, Tensor]) -> Fitted: ...


def _registry() -> dict[str, tuple[type, Callable[..., Fitter], Method]]:
    """kind -> (config class, fitter class taking (cfg, d_vit), fitted class taking (cfg, d_vit, tensors))."""
    return {
        "kmeans": (kmeans.KMeansConfig, kmeans.KMeansFitter, kmeans.KMeans),
        "pca": (pca.PcaConfig, pca.PcaFitter, pca.Pca),
        "random": (random.RandomConfig, random.RandomFitter, random.RandomDirections),
        "neurons": (random.NeuronsConfig, random.NeuronsFitter, random.Neurons),
    }


def kinds() -> list[str]:
    """Every method kind, as `kind = "..."` names it in TOML."""
    return list(_registry())


def make_fitter(cfg: typing.Any, d_vit: int) -> Fitter:
    """A fresh fitter for the method config `cfg` on activations of width `d_vit`."""
    return _registry()[cfg.kind][1](cfg, d_vit)


##########
# Fitting #
##########


STATE_FNAME = "fit-state.safetensors"
"""A fit's state inside its state directory (see `fit`)."""


@beartype.beartype
def save_state(fitter: Fitter, cfg: typing.Any, d_vit: int, fpath: pathlib.Path) -> None:
    """Write a fitter's state atomically, with its config and width (checked by `load_state`)."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in fitter.state_dict().items()}
    metadata = {"kind": cfg.kind, "config": json.dumps(dataclasses.asdict(cfg)), "d_vit": str(d_vit)}
    atomic.atomic_write_bytes(fpath, safetensors.torch.save(tensors, metadata=metadata))


@beartype.beartype
def load_state(fitter: Fitter, cfg: typing.Any, d_vit: int, fpath: pathlib.Path) -> None:
    """Restore a fitter from `save_state`'s file.

    Raises:
        MethodFileError: the file is unreadable, or saved for another method, config or width.
    """
    try:
        with safetensors.safe_open(str(fpath), framework="pt") as fd:
            metadata = fd.metadata() or {}
            tensors = {name: fd.get_tensor(name) for name in fd.keys()}
    except Exception as err:  # safetensors raises SafetensorError (or others) on a corrupt header or short file
        raise MethodFileError(f"{fpath} is not a readable fit state ({err}); delete it to start the fit over") from None
    expected = {"kind": cfg.kind, "config": json.dumps(dataclasses.asdict(cfg)), "d_vit": str(d_vit)}
    got = {name: metadata.get(name) for name in expected}
    if got != expected:
        raise MethodFileError(f"{fpath}: a fit state of {got}, expected {expected}; delete it to start the fit over")
    try:
        fitter.load_state_dict(tensors)
    except (KeyError, ValueError, RuntimeError) as err:
        raise MethodFileError(f"{fpath}: not a state of this fitter ({err}); delete it to start the fit over") from None


@beartype.beartype
def fit(
    cfg: typing.Any,
    d_vit: int,
    get_batches: Callable[[int], Iterable[Tensor]],
    *,
    state_fpath: pathlib.Path | None = None,
    save_every: int = 100,
    stop_after: int | None = None,
) -> Fitted | None:
    """Fit the method `cfg` on a stream of float32 [B, D] batches; returns the fitted method.

    `get_batches(start)` yields the stream's batches from batch `start` on (e.g.
    `lambda s: loader.batches(s, n_steps)` of a `saev.data.loader.ShuffledLoader`); it must give the same batches
    every time it is called. With `state_fpath`, an existing state there is restored first and the stream resumes at
    its batch; the state is saved there every `save_every` batches and when the fit stops. `stop_after` stops after
    that many batches in all (counting those of a restored state) and returns None, as a killed job would (tests,
    time limits): a later call resumes and gives the same result as an uninterrupted fit, bit for bit on the CPU.

    Raises:
        MethodConfigError: the config does not fit the data (e.g. k above the corpus rows).
        MethodFileError: the state at `state_fpath` is damaged or for another config.
    """
    fitter = make_fitter(cfg, d_vit)
    if state_fpath is not None and state_fpath.is_file():
        load_state(fitter, cfg, d_vit, state_fpath)
    if stop_after is None or fitter.batches_seen < stop_after:
        batches = get_batches(fitter.batches_seen)
        try:
            for x_BD in batches:
                if x_BD.ndim != 2 or x_BD.shape[1] != d_vit:
                    raise ValueError(f"a batch of shape {list(x_BD.shape)} for a method of width {d_vit}")
                fitter.update(x_BD)
                if state_fpath is not None and fitter.batches_seen % save_every == 0:
                    save_state(fitter, cfg, d_vit, state_fpath)
                if stop_after is not None and fitter.batches_seen >= stop_after:
                    break
        finally:
            close = getattr(batches, "close", None)  # a loader's reading thread, a generator
            if close is not None:
                close()
    if stop_after is not None and fitter.batches_seen >= stop_after:
        if state_fpath is not None:
            save_state(fitter, cfg, d_vit, state_fpath)
        return None
    return fitter.finish()


##################
# Saving, loading #
##################


@beartype.beartype
def save(method: Fitted, dpath: pathlib.Path | str) -> None:
    """Write a fitted method (one of `kinds()`) to the directory `dpath`: `method.safetensors` and `method.json`.

    Raises:
        atomic.WriteError: a file could not be written (disk full, permissions); the message names it.
    """
    dpath = pathlib.Path(dpath)
    cfg = method.cfg
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in method.tensors().items()}
    atomic.atomic_write_bytes(dpath / WEIGHTS_FNAME, safetensors.torch.save(tensors))
    obj = {"kind": cfg.kind, "config": dataclasses.asdict(cfg), "d_vit": method.d_vit}
    atomic.atomic_write_json(dpath / CONFIG_FNAME, obj)


@beartype.beartype
def load(dpath: pathlib.Path | str, device: str | torch.device = "cpu") -> Fitted:
    """Read a method written by `save` from the directory `dpath`.

    Raises:
        MethodFileError: a file is missing or unreadable, the JSON is not a method's, or the tensors disagree with it.
    """
    dpath = pathlib.Path(dpath)
    cfg_fpath, weights_fpath = dpath / CONFIG_FNAME, dpath / WEIGHTS_FNAME
    for fpath in (cfg_fpath, weights_fpath):
        if not fpath.is_file():
            raise MethodFileError(f"method file {fpath} is missing")
    try:
        obj = json.loads(cfg_fpath.read_text())
        kind, config, d_vit = obj["kind"], obj["config"], obj["d_vit"]
        registry = _registry()
        if kind not in registry:
            raise ValueError(f"unknown method kind {kind!r}; known: {kinds()}")
        if not isinstance(d_vit, int) or d_vit < 1:
            raise ValueError(f"d_vit must be a positive integer, got {d_vit!r}")
        config_cls, _, method_cls = registry[kind]
        if not isinstance(config, dict):
            raise ValueError(f"config must be an object, got {config!r}")
        # JSON's null is TOML's absent key: a field left at its default None (e.g. PCA's top_n).
        config = {k: v for k, v in config.items() if v is not None}
        cfg = configs.from_dict(config_cls, config, str(cfg_fpath), "config.")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise MethodFileError(f"{cfg_fpath} is not a fitted method's description: {err}") from None
    try:
        tensors = safetensors.torch.load_file(str(weights_fpath), device="cpu")
        method = method_cls(cfg, d_vit, tensors)
    except (safetensors.SafetensorError, KeyError, ValueError, RuntimeError) as err:
        raise MethodFileError(f"{weights_fpath} does not hold the tensors of {cfg} (width {d_vit}): {err}") from None
    return method.to(device)


@beartype.beartype
def load_encoder(dpath: pathlib.Path | str, device: str | torch.device = "cpu") -> Encoder:
    """What a train artifact holds: a fitted method (`method.json` present: `load`) or an SAE (`saev.nn.load`)."""
    from saev import nn

    dpath = pathlib.Path(dpath)
    return load(dpath, device) if (dpath / CONFIG_FNAME).exists() else nn.load(dpath, device=device)


def check_tensors(tensors: dict[str, Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise ValueError unless `tensors` holds exactly `shapes`' names with those shapes (a fitted method's load)."""
    got = {name: tuple(t.shape) for name, t in tensors.items()}
    if got != shapes:
        raise ValueError(f"tensors {got}, expected {shapes}")


###########
# Metrics #
###########


class Metrics(typing.NamedTuple):
    """A method's reconstruction and sparsity on some rows (research-protocol.md, "Metrics")."""

    nmse: float
    """sum ||x - x_hat||^2 / sum ||x - mean||^2 (mean over the same rows), float64 sums; NaN if the rows are constant."""
    l0: float
    """Mean number of non-zero codes per row."""


@torch.inference_mode()
@beartype.beartype
def get_metrics(method: Encoder, batches: Iterable[Tensor]) -> Metrics:
    """NMSE and L0 of `method` over every row of `batches` (float32 [B, D] tensors, e.g. the corpus val split),
    streamed: the rows' variance is combined batch by batch (Chan et al.), so no second pass is needed."""
    n, sq_err, nonzero = 0, 0.0, 0
    mean_D: Tensor | None = None
    m2 = 0.0  # sum over rows and dims of squared deviations from the running mean
    for x_BD in batches:
        x64_BD = x_BD.double()
        sq_err += float((method.reconstruct(x_BD).double() - x64_BD).square().sum())
        nonzero += int(method.count_nonzero(x_BD).sum())
        b, batch_mean_D = len(x_BD), x64_BD.mean(dim=0)
        batch_m2 = float((x64_BD - batch_mean_D).square().sum())
        if mean_D is None:
            mean_D, m2 = batch_mean_D, batch_m2
        else:
            delta_D = batch_mean_D - mean_D
            m2 += batch_m2 + float(delta_D.square().sum()) * n * b / (n + b)
            mean_D = mean_D + delta_D * b / (n + b)
        n += b
    if n == 0:
        raise ValueError("metrics of a method need at least one row")
    return Metrics(nmse=sq_err / m2 if m2 > 0 else math.nan, l0=nonzero / n)


def array_batches(acts_ND: np.ndarray | Tensor, batch_size: int) -> Callable[[int], Iterable[Tensor]]:
    """`get_batches` for `fit` over an in-memory (or memory-mapped) array: rows in order, `batch_size` at a time."""

    def get_batches(start: int) -> Iterable[Tensor]:
        for s in range(start * batch_size, len(acts_ND), batch_size):
            rows = acts_ND[s : s + batch_size]
            yield rows.float() if isinstance(rows, Tensor) else torch.from_numpy(np.array(rows, dtype=np.float32))

    return get_batches


# The methods' modules use this module's names (errors, `check_tensors`) only when called, so they import it as it
# is being defined.
from saev.methods import kmeans, pca, random  # noqa: E402

Config = kmeans.KMeansConfig | pca.PcaConfig | random.RandomConfig | random.NeuronsConfig
"""The config of one method; in TOML `method = "pca"` or a table with `kind = "pca"` and its fields."""
