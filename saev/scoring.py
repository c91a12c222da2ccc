"""Scoring SAE latents ("prototypes") for AP: encoding latents a K-block at a time, and the files the score stage
reads and writes. This module owns three formats:

- Partials. A partial holds the AP of one K-block of one SAE's latents for every class, over the kept patches:
  `partials/block{b:05d}.safetensors` of a score artifact with `ap_CK` (float64 [C, block]), `min_K` and `max_K`
  (float32 [block]: each latent's lowest and highest score; equal = a constant, dead latent), `k_range` (int64
  [k_start, k_stop)) and metadata `"sae"` (the key of the train artifact scored) and `"matmul_precision"`.
  `write_partial` writes it and `read_partials` reads and checks every block of an artifact.
- TopK thresholds. A TopK SAE's latent depends on every other latent of the example, through one number: the
  example's k-th largest pre-activation (`nn.TopK`). `topk_kth` finds it for every kept row in one pass over the
  SAE's blocks, from the very matmuls the blocks compute (rows in batches of `batch_size`, latents in blocks of
  `block_size`: a matmul of a slice may differ in the last bit from the same columns of a bigger matmul, the same
  shapes never do, on one kind of device: a GPU and a CPU round differently, as they do for every score), so
  each block then computes only its own columns (`encode_block(..., kth_N=...)`).
  `topk_kth.safetensors` of a score artifact holds `kth_N` (float32 [N], finite) and metadata `"sae"`, `"k"`,
  `"block_size"`, `"batch_size"`, `"matmul_precision"`; `write_kth` and `read_kth` own it.
- Kept activations. `acts.npy` of a kept artifact: float32 [N, d_vit], C-order, the activations of the kept patches
  (in keep.npy order) at one layer, gathered once from the dump's shards so that every score task reads one
  contiguous file instead of gathering rows from every shard (`write_kept`, `read_kept`).
"""

import math
import pathlib
import typing
from collections.abc import Callable

import beartype
import numpy as np
import safetensors
import safetensors.numpy
import torch
from jaxtyping import Float, jaxtyped
from torch import Tensor

from saev import artifacts, checksums, nn


def partial_fpath(art: artifacts.Artifact, block: int) -> pathlib.Path:
    """The partial file of K-block `block` of the score artifact `art`."""
    return art.dpath / "partials" / f"block{block:05d}.safetensors"


def _rows(acts_ND: np.ndarray, start: int, batch_size: int, device: torch.device) -> Tensor:
    """Rows [start, start + batch_size) as a float32 tensor on `device` (copied: `acts_ND` may be a read-only map)."""
    return torch.from_numpy(np.array(acts_ND[start : start + batch_size], dtype=np.float32)).to(device)


@torch.inference_mode()
def encode_block(
    sae: nn.SparseAutoencoder,
    acts_ND: np.ndarray,
    k_start: int,
    k_stop: int,
    *,
    batch_size: int,
    device: torch.device,
    kth_N: Tensor | None = None,
) -> torch.Tensor:
    """Latents [k_start, k_stop) of the SAE for every row of acts_ND, as float32 [N, k_stop - k_start].

    Rows are encoded `batch_size` at a time. For a TopK SAE, `kth_N` (float32 [N], `topk_kth` with the same
    `batch_size` and a block size that has this block as one of its blocks) lets a block compute only its own
    columns; without it every batch computes all latents (a full encode per block).
    """
    n = len(acts_ND)
    out = torch.empty((n, k_stop - k_start), dtype=torch.float32, device=device)
    for start in range(0, n, batch_size):
        x_BD = _rows(acts_ND, start, batch_size, device)
        kth_B = None if kth_N is None else kth_N[start : start + len(x_BD)].to(device)
        out[start : start + len(x_BD)] = sae.encode(x_BD, latents=slice(k_start, k_stop), kth_B=kth_B)
    return out


@torch.inference_mode()
def topk_kth(
    sae: nn.SparseAutoencoder,
    acts_ND: np.ndarray,
    block_size: int,
    *,
    batch_size: int,
    device: torch.device,
    on_rows: Callable[[int], None] | None = None,
) -> Float[Tensor, " N"]:
    """Each row's k-th largest pre-activation over all latents of a TopK SAE, float32 [N] on `device`.

    One pass: rows `batch_size` at a time, each through the blocks [0, block_size), [block_size, 2 block_size), ...
    of latents, keeping a running top k of every row (the k-th largest of a row is that of the union of its blocks'
    top k). These are the matmuls `encode_block` computes for each block with the same `batch_size`, so a block's
    test pre >= kth compares the same bits as a full encode would (`nn.TopK.select`). `on_rows(n)` is called after
    each batch of n rows (progress).
    """
    activation = sae.activation
    if not isinstance(activation, nn.TopK):
        raise ValueError(f"topk_kth needs a TopK SAE, not one with activation {activation!r}")
    n, d_sae = len(acts_ND), sae.cfg.d_sae
    out = torch.empty(n, dtype=torch.float32, device=device)
    for start in range(0, n, batch_size):
        x_BD = _rows(acts_ND, start, batch_size, device)
        top_BJ = torch.empty((len(x_BD), 0), dtype=torch.float32, device=device)
        for k_start in range(0, d_sae, block_size):
            pre_BK = sae.pre_acts(x_BD, slice(k_start, min(d_sae, k_start + block_size)))
            top_BK = pre_BK.topk(min(activation.k, pre_BK.shape[1]), dim=1, sorted=False).values
            both_BJ = torch.cat([top_BJ, top_BK], dim=1)
            top_BJ = both_BJ.topk(min(activation.k, both_BJ.shape[1]), dim=1, sorted=False).values
        out[start : start + len(x_BD)] = activation.kth_largest(top_BJ)  # raises if k > d_sae, as a full encode
        if on_rows is not None:
            on_rows(len(x_BD))
    return out


KTH_FNAME = "topk_kth.safetensors"
"""The TopK thresholds of a score artifact (see the module docstring)."""


class KthError(artifacts.IncompleteArtifactError):
    """A TopK thresholds file is missing, unreadable, changed since written, or not for this SAE and these rows; the
    message names it."""


class Kth(typing.NamedTuple):
    """A TopK thresholds file's contents."""

    kth_N: np.ndarray
    """float32 [N] each kept row's k-th largest pre-activation."""
    batch_size: int
    """Rows per matmul they were computed with (blocks must encode with the same)."""


@beartype.beartype
def write_kth(
    fpath: pathlib.Path,
    kth_N: Tensor,
    *,
    train_key: str,
    k: int,
    block_size: int,
    batch_size: int,
    matmul_precision: str,
) -> None:
    """Write a TopK thresholds file atomically (checksummed): `kth_N` and what it was computed for and with."""
    tensors = {"kth_N": kth_N.to(device="cpu", dtype=torch.float32).contiguous().numpy()}
    metadata = {
        "sae": train_key, "k": str(k), "block_size": str(block_size), "batch_size": str(batch_size),
        "matmul_precision": matmul_precision,
    }  # fmt: skip
    artifacts.atomic_write_bytes(fpath, safetensors.numpy.save(tensors, metadata=metadata))


@beartype.beartype
def read_kth(
    fpath: pathlib.Path, *, n_rows: int, train_key: str, k: int, block_size: int, matmul_precision: str
) -> Kth:
    """Read and check a TopK thresholds file: its checksum matches the one recorded when it was written, it holds
    exactly `kth_N` (float32 [n_rows], finite) and its metadata names this SAE, k, block size and matmul precision.

    Raises:
        KthError: naming the file and what is wrong (the score stage then computes it again).
    """
    if not fpath.is_file():
        raise KthError(f"{fpath} is missing")
    if checksums.recorded_checksum(fpath) is None:
        raise KthError(f"{fpath} has no checksum record (not written by write_kth)")
    try:
        artifacts.verify_file(fpath)
        with safetensors.safe_open(str(fpath), framework="numpy") as fd:
            metadata = fd.metadata() or {}
            names = set(fd.keys())
            if names != {"kth_N"}:
                raise KthError(f"{fpath}: holds tensors {sorted(names)}, expected ['kth_N']")
            kth_N = fd.get_tensor("kth_N")
    except artifacts.DamagedArtifactError as err:
        raise KthError(str(err)) from None
    except KthError:
        raise
    except Exception as err:  # safetensors raises SafetensorError (or others) on a corrupt header or short file
        raise KthError(f"{fpath} is not a readable safetensors file ({err})") from None
    expected = {
        "sae": train_key, "k": str(k), "block_size": str(block_size), "matmul_precision": matmul_precision,
    }  # fmt: skip
    got = {name: metadata.get(name) for name in expected}
    if got != expected:
        raise KthError(f"{fpath}: computed for {got}, expected {expected}")
    if kth_N.dtype != np.float32 or kth_N.shape != (n_rows,):
        raise KthError(f"{fpath}: kth_N is {kth_N.dtype} {list(kth_N.shape)}, expected float32 [{n_rows}]")
    if kth_N.size and not np.isfinite(kth_N).all():
        raise KthError(f"{fpath}: kth_N holds NaN/inf at row {int(np.flatnonzero(~np.isfinite(kth_N))[0])}")
    try:
        batch_size = int(metadata.get("batch_size", ""))
    except ValueError:
        raise KthError(f"{fpath}: batch_size {metadata.get('batch_size')!r} is not an integer") from None
    if batch_size < 1:
        raise KthError(f"{fpath}: batch_size {batch_size} is not positive")
    return Kth(kth_N, batch_size)


KEPT_FNAME = "acts.npy"
"""The kept activations of a kept artifact (see the module docstring)."""

_GATHER_ROWS = 65_536
"""Rows gathered from the shards per step while writing the kept activations (bounds the memory used)."""


class KeptError(artifacts.IncompleteArtifactError):
    """A kept-activations file cannot be read or does not hold [n_keep, d_vit] float32 rows; the message names it."""


@beartype.beartype
def write_kept(fpath: pathlib.Path, gather: Callable[[int, int], np.ndarray], n_rows: int, d_vit: int) -> None:
    """Write the kept activations atomically (checksummed) as float32 [n_rows, d_vit] .npy, `_GATHER_ROWS` rows at a
    time: `gather(start, stop)` returns rows [start, stop) (e.g. `Shards.patches_flat` of those kept patches)."""
    with artifacts.atomic_path(fpath) as tmp_fpath:
        out_ND = np.lib.format.open_memmap(tmp_fpath, mode="w+", dtype=np.float32, shape=(n_rows, d_vit))
        for start in range(0, n_rows, _GATHER_ROWS):
            stop = min(n_rows, start + _GATHER_ROWS)
            out_ND[start:stop] = gather(start, stop)
        out_ND.flush()
        del out_ND


@jaxtyped(typechecker=beartype.beartype)
def read_kept(fpath: pathlib.Path, n_rows: int, d_vit: int) -> Float[np.ndarray, "N D"]:
    """Memory-map the kept activations (read-only), checked to be a plain float32 C-order [n_rows, d_vit] .npy.
    Values are not read here: the file's checksum is what vouches for them (the kept artifact is verified first).

    Raises:
        KeptError: the file is missing, not a .npy array, or of another dtype, order or shape.
    """
    try:
        acts_ND = np.load(fpath, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise KeptError(f"{fpath} is missing") from None
    except (ValueError, OSError, EOFError) as err:
        raise KeptError(f"{fpath} is not a readable .npy array ({err})") from None
    if acts_ND.dtype != np.float32 or acts_ND.shape != (n_rows, d_vit) or not acts_ND.flags.c_contiguous:
        raise KeptError(
            f"{fpath}: holds {acts_ND.dtype} {list(acts_ND.shape)}, expected float32 [{n_rows}, {d_vit}] in C order"
        )
    return acts_ND


def write_partial(
    fpath: pathlib.Path,
    *,
    ap_CK: np.ndarray,
    scores_NK: torch.Tensor,
    k_start: int,
    k_stop: int,
    train_key: str,
    matmul_precision: str,
) -> None:
    """Write one partial: the block's APs, each latent's lowest and highest score in `scores_NK` (the latents
    [k_start, k_stop) over the kept patches), its range, and the key of the train artifact whose SAE was scored."""
    tensors = {
        "ap_CK": ap_CK,
        "min_K": scores_NK.amin(dim=0).cpu().numpy(),
        "max_K": scores_NK.amax(dim=0).cpu().numpy(),
        "k_range": np.array([k_start, k_stop], dtype=np.int64),
    }
    metadata = {"sae": train_key, "matmul_precision": matmul_precision}
    # Serialised in memory, written by our own atomic writer: checksummed, umask permissions, a full disk is a
    # WriteError naming the file (safetensors' own file writer gives 0600 files and its own error type).
    artifacts.atomic_write_bytes(fpath, safetensors.numpy.save(tensors, metadata=metadata))


class Partials(typing.NamedTuple):
    """Every block of one SAE's score artifact, concatenated."""

    ap_CK: np.ndarray
    """float64 [C, d_sae] AP of every latent for every class."""
    min_K: np.ndarray
    """float32 [d_sae] lowest score of each latent over the kept patches."""
    max_K: np.ndarray
    """float32 [d_sae] highest score; equal to min_K for a constant (dead) latent."""


class PartialError(artifacts.IncompleteArtifactError):
    """A score partial is missing, unreadable, or does not hold what its artifact implies; the message names it."""


_PARTIAL_DTYPES = {"ap_CK": np.float64, "min_K": np.float32, "max_K": np.float32, "k_range": np.int64}
"""Every tensor of a partial file and its dtype (nothing else may be in the file)."""


def read_partials(
    art: artifacts.Artifact, d_sae: int, block_size: int, train_key: str, counts_C: np.ndarray
) -> Partials:
    """Read and check exactly the partials that tile [0, d_sae) of a score artifact, and concatenate them.

    Block b is `partials/block{b:05d}.safetensors` and covers latents [b * block_size, min(d_sae, (b + 1) *
    block_size)). Other files in partials/ are not read. Each file must hold exactly ap_CK (float64 [C, block]),
    min_K and max_K (float32 [block], finite, min <= max) and k_range (int64, the block's range), record
    `train_key` as its "sae" metadata, and have APs within [0, 1]; an AP row is NaN exactly when its class has no
    kept patch (counts_C[c] == 0), and then wholly NaN.

    Args:
        art: the score artifact.
        d_sae: latents of its SAE.
        block_size: latents per block (the score plan's `block_size`).
        train_key: key of the train artifact the partials must come from.
        counts_C: int [C] kept patches of each class; C is the number of classes.

    Raises:
        PartialError: naming the file and what is wrong with it (missing, corrupt, from another SAE, ...).
    """
    counts_C = np.asarray(counts_C)
    n_classes = len(counts_C)
    empty_C = counts_C == 0
    blocks = []
    for block in range(math.ceil(d_sae / block_size)):
        fpath = partial_fpath(art, block)
        k_start, k_stop = block * block_size, min(d_sae, (block + 1) * block_size)
        tensors = _read_partial(fpath, train_key)
        width = k_stop - k_start
        shapes = {"ap_CK": (n_classes, width), "min_K": (width,), "max_K": (width,), "k_range": (2,)}
        for name, shape in shapes.items():
            if tensors[name].shape != shape:
                raise PartialError(f"{fpath}: {name} has shape {list(tensors[name].shape)}, expected {list(shape)}")
        got_range = [int(x) for x in tensors["k_range"]]
        if got_range != [k_start, k_stop]:
            raise PartialError(f"{fpath}: k_range is {got_range}, expected [{k_start}, {k_stop}]")
        ap_CK, min_K, max_K = tensors["ap_CK"], tensors["min_K"], tensors["max_K"]
        nan_CK = np.isnan(ap_CK)
        out_of_range = ~nan_CK & ((ap_CK < 0) | (ap_CK > 1))
        if out_of_range.any():
            c, k = (int(x) for x in np.argwhere(out_of_range)[0])
            raise PartialError(
                f"{fpath}: AP {float(ap_CK[c, k])} of class {c}, latent {k_start + k} is not within [0, 1]"
            )
        wrong_nan_C = ~empty_C & nan_CK.any(axis=1)
        if wrong_nan_C.any():
            c = int(np.flatnonzero(wrong_nan_C)[0])
            k = int(np.flatnonzero(nan_CK[c])[0])
            raise PartialError(
                f"{fpath}: AP of class {c}, latent {k_start + k} is NaN but the class has {int(counts_C[c])} kept "
                "patches (NaN means a class without any)"
            )
        wrong_number_C = empty_C & ~nan_CK.all(axis=1)
        if wrong_number_C.any():
            c = int(np.flatnonzero(wrong_number_C)[0])
            k = int(np.flatnonzero(~nan_CK[c])[0])
            raise PartialError(
                f"{fpath}: class {c} has no kept patches but latent {k_start + k} has AP {float(ap_CK[c, k])} "
                "(expected NaN); it was scored on another mask"
            )
        bad_K = ~np.isfinite(min_K) | ~np.isfinite(max_K) | (min_K > max_K)
        if bad_K.any():
            k = int(np.flatnonzero(bad_K)[0])
            raise PartialError(
                f"{fpath}: latent {k_start + k} has min {float(min_K[k])} and max {float(max_K[k])} "
                "(expected finite, min <= max)"
            )
        blocks.append(tensors)
    return Partials(*(np.concatenate([b[name] for b in blocks], axis=-1) for name in Partials._fields))


def _read_partial(fpath: pathlib.Path, train_key: str) -> dict[str, np.ndarray]:
    """The tensors of one partial file, checked for their names, dtypes and "sae" metadata."""
    remedy = "delete it and rerun `--stage score`"
    if not fpath.is_file():
        raise PartialError(f"{fpath} is missing; rerun `--stage score`")
    try:
        with safetensors.safe_open(str(fpath), framework="numpy") as fd:
            metadata = fd.metadata() or {}
            names = set(fd.keys())
            if names != set(_PARTIAL_DTYPES):
                raise PartialError(
                    f"{fpath}: holds tensors {sorted(names)}, expected {sorted(_PARTIAL_DTYPES)}; {remedy}"
                )
            tensors = {name: fd.get_tensor(name) for name in _PARTIAL_DTYPES}
    except PartialError:
        raise
    except Exception as err:  # safetensors raises SafetensorError (or others) on a corrupt header or short file
        raise PartialError(f"{fpath} is not a readable safetensors file ({err}); {remedy}") from None
    if metadata.get("sae") != train_key:
        raise PartialError(
            f"{fpath}: scores SAE {metadata.get('sae')!r}, expected {train_key!r} (a partial of another SAE); {remedy}"
        )
    for name, dtype in _PARTIAL_DTYPES.items():
        if tensors[name].dtype != dtype:
            raise PartialError(f"{fpath}: {name} has dtype {tensors[name].dtype}, expected {np.dtype(dtype)}; {remedy}")
    return tensors
