"""Scoring SAE latents ("prototypes") for AP: encoding latents a K-block at a time, and the score partial files.

A partial holds the AP of one K-block of one SAE's latents for every class, over the kept patches:
`partials/block{b:05d}.safetensors` of a score artifact with `ap_CK` (float64 [C, block]), `min_K` and `max_K`
(float32 [block]: each latent's lowest and highest score; equal = a constant, dead latent), `k_range` (int64
[k_start, k_stop)) and metadata `"sae"` (the key of the train artifact scored) and `"matmul_precision"`. This module
owns that format: `write_partial` writes it and `read_partials` reads and checks every block of an artifact.
"""

import math
import pathlib
import typing

import numpy as np
import safetensors
import safetensors.numpy
import torch

from saev import artifacts, nn


def partial_fpath(art: artifacts.Artifact, block: int) -> pathlib.Path:
    """The partial file of K-block `block` of the score artifact `art`."""
    return art.dpath / "partials" / f"block{block:05d}.safetensors"


@torch.inference_mode()
def encode_block(
    sae: nn.SparseAutoencoder,
    acts_ND: np.ndarray,
    k_start: int,
    k_stop: int,
    *,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Latents [k_start, k_stop) of the SAE for every row of acts_ND, as float32 [N, k_stop - k_start]."""
    n = len(acts_ND)
    out = torch.empty((n, k_stop - k_start), dtype=torch.float32, device=device)
    for start in range(0, n, batch_size):
        x_BD = torch.from_numpy(np.ascontiguousarray(acts_ND[start : start + batch_size])).to(device)
        out[start : start + len(x_BD)] = sae.encode(x_BD, latents=slice(k_start, k_stop))
    return out


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
