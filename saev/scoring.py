"""Scoring SAE latents ("prototypes") for AP: encoding latents a K-block at a time, and the files the score stage
reads and writes. Any `saev.methods.Encoder` (an SAE, k-means, PCA, random directions, neurons) is scored the same
way; an SAE's blocks take the fast path described below. This module owns three formats:

- Partials. A partial holds the AP of one K-block of one SAE's latents for every class, over the kept patches:
  `partials/block{b:05d}.safetensors` of a score artifact with `ap_CK` (float64 [C, block]), `min_K` and `max_K`
  (float32 [block]: each latent's lowest and highest score; equal = a constant, dead latent), `k_range` (int64
  [k_start, k_stop)), the 1-D logistic probe of every (class, latent) pair fit on the same scores (`saev.probe`:
  `w_CK`, `b_CK`, `loss_CK` float64 [C, block], the train cross-entropy without the ridge term; `converged_CK`
  uint8) and metadata `"sae"` (the key of the train artifact scored) and `"matmul_precision"`.
  `write_partial` writes it and `read_partials` reads and checks every block of an artifact.
- TopK latents. Which latents a TopK SAE keeps for an example depends on all of its pre-activations
  (`nn.TopK`). `topk_latents` finds each kept row's k selected latents (their indices) in one pass over the SAE's
  blocks (rows in batches of `batch_size`, latents in blocks of `block_size`, a running top k per row), so each
  block then computes only its own columns and keeps those selected (`encode_block(..., top_Nk=...)`). Indices, not
  a threshold value: a block that rounds its pre-activations differently (another batch size, device or BLAS) still
  keeps exactly the latents selected, so the selection never depends on where a block runs.
  `topk_latents.safetensors` of a score artifact holds `latents_Nk` (int32 [N, k], distinct indices in [0, d_sae)
  per row) and metadata `"sae"`, `"k"`, `"d_sae"`, `"matmul_precision"` (what it is for) and `"block_size"`,
  `"batch_size"` (how it was computed); `write_topk` and `read_topk` own it.
- Blocks. `score_block` encodes a block's latents for every kept row into buffers allocated once per process and
  reused by the next block (`get_block_buffers`), applies the bias and activation rule and folds each latent's
  min and max in while a few rows' scores are in the cache, then runs the AP engine on the scores in place.
  A block's scores equal the same columns of a full encode of all rows (`SparseAutoencoder.encode`), bit for bit,
  whatever the block's width and the number of rows: every encoder matmul is at least `MIN_MATMUL` (64) rows by 64
  columns (a narrower block, a shorter last batch or fewer latents are computed in a larger window and cut out),
  so no block takes a BLAS small-matrix path that sums in another order. This rests on the BLAS summing each entry
  of a matmul of that size or more the same way whatever its shape, as torch's CPU BLAS (MKL) does on the CPUs
  tested (AMD EPYC, AVX-512); other BLAS libraries, CUDA (cuBLAS chooses kernels by shape) and TF32 or bf16
  matmul precisions may change the last bit of a score between block widths or batch sizes.
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
from jaxtyping import Float, Int, jaxtyped
from torch import Tensor

from saev import ap, artifacts, atomic, checksums, methods, nn, probe


def partial_fpath(art: artifacts.Artifact, block: int) -> pathlib.Path:
    """The partial file of K-block `block` of the score artifact `art`."""
    return art.dpath / "partials" / f"block{block:05d}.safetensors"


def _rows(acts_ND: np.ndarray, start: int, batch_size: int, device: torch.device) -> Tensor:
    """Rows [start, start + batch_size) as a float32 tensor on `device` (copied: `acts_ND` may be a read-only map)."""
    return torch.from_numpy(np.array(acts_ND[start : start + batch_size], dtype=np.float32)).to(device)


MIN_MATMUL = 64
"""Fewest rows and columns of an encoder matmul: a narrower block of latents, or a shorter last batch of rows, is
computed inside a window this large and cut out. BLAS libraries take other code paths for small matrices (MKL on
AVX-512 sums a product fewer than 12 columns or 8 rows wide in another order), which would change the last bit of
a score; at this size and above each entry is summed the same way whatever the shape (see the module docstring)."""

_CHUNK_BYTES = 16 * 2**20
"""Scores post-processed together on a CPU (bias, activation rule, min and max): small enough to stay in a server
CPU's last-level cache between those passes, large enough that the chunks' few hundred small parallel operations
cost little even on a busy machine (where each waits for a descheduled thread)."""


def _window(start: int, stop: int, total: int) -> tuple[int, int]:
    """[a, b) within [0, total), containing [start, stop), at least `MIN_MATMUL` long where total allows."""
    a = max(0, min(start, total - MIN_MATMUL))
    return a, max(stop, min(total, a + MIN_MATMUL))


def _batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Row batches [start, stop) covering [0, n); a last batch shorter than `MIN_MATMUL` rows starts earlier (its
    first rows are computed twice, to the same values)."""
    return [_window(start, min(n, start + batch_size), n) for start in range(0, n, batch_size)]


class BlockBuffers:
    """Working memory of score blocks, allocated and touched once, then reused by every block with the same rows,
    width, batch size and device (`get_block_buffers`): a block then spends no time on page faults of fresh
    gigabyte-sized allocations or on copies between the matmul's output and the AP engine's input."""

    def __init__(self, n_rows: int, d_vit: int, width: int, batch_size: int, device: torch.device):
        rows = min(n_rows, max(batch_size, MIN_MATMUL))
        self.n_rows, self.d_vit, self.width, self.batch_size, self.device = n_rows, d_vit, width, batch_size, device
        # zeros, not empty: every page is touched here, once, rather than by a block's matmul.
        self.scores = torch.zeros(n_rows * width, dtype=torch.float32, device=device)
        """Flat storage of a block's scores: `scores_NK` views its first N * K values (contiguous for any K)."""
        self.x_BD = torch.zeros((rows, d_vit), dtype=torch.float32, device=device)
        """One batch of rows minus the SAE's b_dec: the matmul's input."""
        self.pre = torch.zeros(rows * MIN_MATMUL, dtype=torch.float32, device=device)
        """A narrow block's widened matmul (`MIN_MATMUL` columns); unused by blocks at least that wide."""

    def fits(self, n_rows: int, d_vit: int, width: int, batch_size: int, device: torch.device) -> bool:
        return (n_rows, d_vit, batch_size, device) == (
            self.n_rows, self.d_vit, self.batch_size, self.device
        ) and width <= self.width  # fmt: skip


_buffers: BlockBuffers | None = None
"""The buffers of the last block scored in this process (one set at a time)."""


def get_block_buffers(n_rows: int, d_vit: int, width: int, batch_size: int, device: torch.device) -> BlockBuffers:
    """Buffers for blocks of `width` latents over `n_rows` rows: those of the previous block when they fit, else new
    ones (the old ones are released first). They stay allocated for the next block until the process ends."""
    global _buffers
    if _buffers is None or not _buffers.fits(n_rows, d_vit, width, batch_size, device):
        _buffers = None  # release the old ones before allocating
        _buffers = BlockBuffers(n_rows, d_vit, width, batch_size, device)
    return _buffers


def _encode_into(
    sae: methods.Encoder,
    acts_ND: np.ndarray,
    k_start: int,
    k_stop: int,
    out_NK: Tensor,
    x_BD: Tensor,
    pre: Tensor,
    top_Nk: Tensor | None,
    min_max_K: tuple[Tensor, Tensor] | None = None,
) -> None:
    """`out_NK[:] = encode_block(...)`, with the batch buffer `x_BD` ([batch rows, d_vit]), the flat buffer `pre`
    (at least batch rows x `MIN_MATMUL` values, for blocks narrower than that) and, if given, each column's lowest
    and highest value folded into `min_max_K` (initialised to +inf and -inf).

    An SAE's block is computed here from its weights (the same values as its `encode_block`, without
    temporaries); any other method's through its `encode_block`, on the same row batches."""
    n, width, device = len(acts_ND), k_stop - k_start, out_NK.device
    latents = slice(k_start, k_stop)
    is_sae = isinstance(sae, nn.SparseAutoencoder)
    if is_sae:
        a, b = _window(k_start, k_stop, sae.cfg.d_sae)
        W_enc_DW = sae.W_enc.detach()[:, a:b]
        b_dec_D = sae.b_dec.detach()
    full = is_sae and top_Nk is None and not sae.activation.per_latent  # TopK without its selection: full, sliced
    # A GPU has no cache to keep a chunk in: there, a batch's rows are done at once.
    chunk = max(1, _CHUNK_BYTES // (4 * max(1, width))) if device.type == "cpu" else x_BD.shape[0]
    for start, stop in _batches(n, x_BD.shape[0]):
        x_bD = x_BD[: stop - start]
        out_bK = out_NK[start:stop]
        if not is_sae:
            x_bD.copy_(_rows(acts_ND, start, stop - start, device))
            out_bK.copy_(sae.encode_block(x_bD, k_start, k_stop))
        elif full:
            x_bD.copy_(_rows(acts_ND, start, stop - start, device))
            sae.encode_into(x_bD, out_bK, latents)
        else:
            if device.type == "cpu":  # straight from the (memory-mapped) rows into the buffer, in one pass
                np.subtract(acts_ND[start:stop], b_dec_D.numpy(), out=x_bD.numpy(), dtype=np.float32)
            else:
                torch.sub(_rows(acts_ND, start, stop - start, device), b_dec_D, out=x_bD)
            if (a, b) == (k_start, k_stop):
                torch.matmul(x_bD, W_enc_DW, out=out_bK)
            else:
                pre_bW = pre[: (stop - start) * (b - a)].view(stop - start, b - a)
                torch.matmul(x_bD, W_enc_DW, out=pre_bW)
                out_bK.copy_(pre_bW[:, k_start - a : k_stop - a])
        for c in range(start, stop, chunk):
            out_cK = out_NK[c : min(stop, c + chunk)]
            if is_sae and not full:
                top_ck = None if top_Nk is None else top_Nk[c : c + len(out_cK)].to(device)
                sae.activate_(out_cK, latents, top_ck)
            if min_max_K is not None:
                torch.minimum(min_max_K[0], out_cK.amin(dim=0), out=min_max_K[0])
                torch.maximum(min_max_K[1], out_cK.amax(dim=0), out=min_max_K[1])


@torch.inference_mode()
def encode_block(
    sae: methods.Encoder,
    acts_ND: np.ndarray,
    k_start: int,
    k_stop: int,
    *,
    batch_size: int,
    device: torch.device,
    top_Nk: Tensor | None = None,
) -> torch.Tensor:
    """Latents [k_start, k_stop) of the SAE for every row of acts_ND, as a new float32 [N, k_stop - k_start] tensor:
    the same values, bit for bit, as the same columns of a full encode of all rows (see the module docstring for
    where that holds). Any other `saev.methods.Encoder` (k-means, PCA, ...) is encoded by its own `encode_block`
    on the same row batches.

    Rows are encoded `batch_size` at a time. For a TopK SAE, `top_Nk` (each row's selected latents,
    `topk_latents`) lets a block compute only its own columns; without it every batch computes all latents (a full
    encode per block).
    """
    n, width = len(acts_ND), k_stop - k_start
    rows = min(n, max(batch_size, MIN_MATMUL))
    out = torch.empty((n, width), dtype=torch.float32, device=device)
    x_BD = torch.empty((rows, sae.d_vit), dtype=torch.float32, device=device)
    pre = torch.empty(rows * MIN_MATMUL if width < MIN_MATMUL else 0, dtype=torch.float32, device=device)
    _encode_into(sae, acts_ND, k_start, k_stop, out, x_BD, pre, top_Nk)
    return out


class BlockScores(typing.NamedTuple):
    """What a score block computes (`score_block`): the contents of its partial."""

    ap_CK: Tensor
    """float64 [C, K] AP of each of the block's latents for every class."""
    min_K: Tensor
    """float32 [K] each latent's lowest score (NaN if a score is NaN)."""
    max_K: Tensor
    """float32 [K] each latent's highest score."""
    probes: probe.Probes | None = None
    """The 1-D logistic probe of every (class, latent) pair, fit on the same scores (`saev.probe.fit_probes`); None
    when not asked for."""


@torch.inference_mode()
def score_block(
    sae: methods.Encoder,
    acts_ND: np.ndarray,
    labels_N: np.ndarray,
    n_classes: int,
    k_start: int,
    k_stop: int,
    *,
    batch_size: int,
    device: torch.device,
    top_Nk: Tensor | None = None,
    probes: bool = False,
) -> BlockScores:
    """Encode latents [k_start, k_stop) of every row (as `encode_block`, into this process's reused
    `get_block_buffers`), fold each latent's min and max in while its scores are in the cache, and compute the AP
    of every latent for every class (`ap.average_precision`, labels int [N]). What a score block (or a probe on its
    scores) costs beyond its matmul and AP is a pass over the rows and little else.
    """
    n, width = len(acts_ND), k_stop - k_start
    if n == 0:
        raise ValueError("a score block needs at least one row (min and max of no scores are undefined)")
    buffers = get_block_buffers(n, sae.d_vit, width, batch_size, device)
    scores_NK = buffers.scores[: n * width].view(n, width)
    min_K = torch.full((width,), torch.inf, dtype=torch.float32, device=device)
    max_K = torch.full((width,), -torch.inf, dtype=torch.float32, device=device)
    _encode_into(sae, acts_ND, k_start, k_stop, scores_NK, buffers.x_BD, buffers.pre, top_Nk, (min_K, max_K))
    labels_t = torch.from_numpy(labels_N).to(device)
    ap_CK = ap.average_precision(scores_NK, labels_t, n_classes=n_classes)
    fitted = probe.fit_probes(scores_NK, labels_t, n_classes) if probes else None
    return BlockScores(ap_CK, min_K, max_K, fitted)


@torch.inference_mode()
def topk_latents(
    sae: nn.SparseAutoencoder,
    acts_ND: np.ndarray,
    block_size: int,
    *,
    batch_size: int,
    device: torch.device,
    on_rows: Callable[[int], None] | None = None,
) -> Int[Tensor, "N k"]:
    """Each row's k selected latents (the indices of its k largest pre-activations over all latents) of a TopK
    SAE, int32 [N, k] on the CPU.

    One pass: rows `batch_size` at a time, each through the blocks [0, block_size), [block_size, 2 block_size), ...
    of latents (at least `MIN_MATMUL` wide), keeping a running top k of every row (a row's top k is the top k of the
    union of its blocks' top k). Each pre-activation equals, bit for bit, the one `encode_block` computes for its
    block and a full encode (see the module docstring for where that holds), so the selection is that of a full
    encode. `on_rows(n)` is called after each batch with the n rows it added (progress).
    """
    activation = sae.activation
    if not isinstance(activation, nn.TopK):
        raise ValueError(f"topk_latents needs a TopK SAE, not one with activation {activation!r}")
    n, d_sae, k = len(acts_ND), sae.cfg.d_sae, activation.k
    if k > d_sae:
        raise ValueError(f"TopK keeps k={k} latents but there are only {d_sae}")
    out = torch.empty((n, k), dtype=torch.int32)
    step, done = max(block_size, MIN_MATMUL), 0
    for start, stop in _batches(n, batch_size):
        x_BD = _rows(acts_ND, start, stop - start, device)
        vals_BJ = torch.empty((len(x_BD), 0), dtype=torch.float32, device=device)
        idx_BJ = torch.empty((len(x_BD), 0), dtype=torch.int64, device=device)
        for k_start in range(0, d_sae, step):
            a, b = _window(k_start, min(d_sae, k_start + step), d_sae)
            pre_BK = sae.pre_acts(x_BD, slice(a, b))[:, k_start - a :]
            top = pre_BK.topk(min(k, pre_BK.shape[1]), dim=1, sorted=False)
            vals_BJ = torch.cat([vals_BJ, top.values], dim=1)
            idx_BJ = torch.cat([idx_BJ, top.indices + k_start], dim=1)
            keep = vals_BJ.topk(min(k, vals_BJ.shape[1]), dim=1, sorted=False).indices
            vals_BJ, idx_BJ = vals_BJ.gather(1, keep), idx_BJ.gather(1, keep)
        out[start:stop] = idx_BJ.to(device="cpu", dtype=torch.int32)
        if on_rows is not None:
            on_rows(stop - done)
        done = stop
    return out


TOPK_FNAME = "topk_latents.safetensors"
"""The TopK latents of a score artifact (see the module docstring)."""


class TopkError(artifacts.IncompleteArtifactError):
    """A TopK latents file is missing, unreadable, changed since written, or not for this SAE and these rows; the
    message names it."""


@beartype.beartype
def write_topk(
    fpath: pathlib.Path,
    top_Nk: Tensor,
    *,
    train_key: str,
    d_sae: int,
    block_size: int,
    batch_size: int,
    matmul_precision: str,
) -> None:
    """Write a TopK latents file atomically (checksummed): `top_Nk` and what it was computed for and with."""
    tensors = {"latents_Nk": top_Nk.to(device="cpu", dtype=torch.int32).contiguous().numpy()}
    metadata = {
        "sae": train_key, "k": str(top_Nk.shape[1]), "d_sae": str(d_sae), "block_size": str(block_size),
        "batch_size": str(batch_size), "matmul_precision": matmul_precision,
    }  # fmt: skip
    atomic.atomic_write_bytes(fpath, safetensors.numpy.save(tensors, metadata=metadata))


@beartype.beartype
def read_topk(
    fpath: pathlib.Path, *, n_rows: int, train_key: str, k: int, d_sae: int, matmul_precision: str
) -> np.ndarray:
    """Read and check a TopK latents file; returns `latents_Nk` (int32 [n_rows, k]). Checked: its checksum matches
    the one recorded when it was written, it holds exactly `latents_Nk` of that dtype and shape, every row holds k
    distinct indices in [0, d_sae), and its metadata names this SAE, k, d_sae and matmul precision.

    Raises:
        TopkError: naming the file and what is wrong (the score stage then computes it again).
    """
    if not fpath.is_file():
        raise TopkError(f"{fpath} is missing")
    if checksums.recorded_checksum(fpath) is None:
        raise TopkError(f"{fpath} has no checksum record (not written by write_topk)")
    try:
        artifacts.verify_file(fpath)
        with safetensors.safe_open(str(fpath), framework="numpy") as fd:
            metadata = fd.metadata() or {}
            names = set(fd.keys())
            if names != {"latents_Nk"}:
                raise TopkError(f"{fpath}: holds tensors {sorted(names)}, expected ['latents_Nk']")
            top_Nk = fd.get_tensor("latents_Nk")
    except artifacts.DamagedArtifactError as err:
        raise TopkError(str(err)) from None
    except TopkError:
        raise
    except Exception as err:  # safetensors raises SafetensorError (or others) on a corrupt header or short file
        raise TopkError(f"{fpath} is not a readable safetensors file ({err})") from None
    expected = {"sae": train_key, "k": str(k), "d_sae": str(d_sae), "matmul_precision": matmul_precision}
    got = {name: metadata.get(name) for name in expected}
    if got != expected:
        raise TopkError(f"{fpath}: computed for {got}, expected {expected}")
    if top_Nk.dtype != np.int32 or top_Nk.shape != (n_rows, k):
        raise TopkError(f"{fpath}: latents_Nk is {top_Nk.dtype} {list(top_Nk.shape)}, expected int32 [{n_rows}, {k}]")
    if top_Nk.size:
        bad = (top_Nk < 0) | (top_Nk >= d_sae)
        if bad.any():
            row = int(np.flatnonzero(bad.any(axis=1))[0])
            raise TopkError(f"{fpath}: latents_Nk row {row} holds an index outside [0, {d_sae})")
        sorted_Nk = np.sort(top_Nk, axis=1)
        dup = (sorted_Nk[:, 1:] == sorted_Nk[:, :-1]).any(axis=1)
        if dup.any():
            raise TopkError(f"{fpath}: latents_Nk row {int(np.flatnonzero(dup)[0])} holds an index twice")
    return top_Nk


KEPT_FNAME = "acts.npy"
"""The kept activations of a kept artifact (see the module docstring)."""

_GATHER_ROWS = 65_536
"""Rows gathered from the shards per step while writing the kept activations (bounds the memory used)."""


class KeptError(artifacts.IncompleteArtifactError):
    """A kept-activations file cannot be read or does not hold [n_keep, d_vit] float32 rows; the message names it."""


@beartype.beartype
def write_kept(fpath: pathlib.Path, gather: Callable[[int, int], np.ndarray], n_rows: int, d_vit: int) -> None:
    """Write the kept activations atomically (checksummed while written) as float32 [n_rows, d_vit] .npy,
    `_GATHER_ROWS` rows at a time: `gather(start, stop)` returns rows [start, stop) (e.g. `Shards.patches_flat` of
    those kept patches).

    Plain writes, not a memory map: on a full tmpfs or quota, storing into a mapped page kills the process with SIGBUS
    instead of raising, so a full disk here is a `WriteError` naming `fpath` and no temporary file is left behind.

    Raises:
        atomic.WriteError: the file could not be written (disk full, permissions).
        ValueError: `gather` returned rows of another shape.
    """
    with atomic.atomic_file(fpath) as fd:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                  "shape": (n_rows, d_vit)}  # fmt: skip
        np.lib.format.write_array_header_1_0(fd, header)  # the header np.save and open_memmap write for this shape
        for start in range(0, n_rows, _GATHER_ROWS):
            stop = min(n_rows, start + _GATHER_ROWS)
            rows_ND = np.ascontiguousarray(gather(start, stop), dtype=np.float32)
            if rows_ND.shape != (stop - start, d_vit):
                raise ValueError(
                    f"gather({start}, {stop}) returned {list(rows_ND.shape)}, expected [{stop - start}, {d_vit}]"
                )
            fd.write(rows_ND.data)


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
    block: BlockScores,
    *,
    k_start: int,
    k_stop: int,
    train_key: str,
    matmul_precision: str,
) -> None:
    """Write one partial: a block's APs and each latent's lowest and highest score (`score_block`: the latents
    [k_start, k_stop) over the kept patches), its range, and the key of the train artifact whose SAE was scored."""
    tensors = {
        "ap_CK": block.ap_CK.cpu().numpy(),
        "min_K": block.min_K.cpu().numpy(),
        "max_K": block.max_K.cpu().numpy(),
        "k_range": np.array([k_start, k_stop], dtype=np.int64),
    }
    if block.probes is not None:
        tensors |= {
            "w_CK": block.probes.w_CK.cpu().numpy(),
            "b_CK": block.probes.b_CK.cpu().numpy(),
            "loss_CK": block.probes.loss_CK.cpu().numpy(),
            "converged_CK": block.probes.converged_CK.cpu().numpy().astype(np.uint8),
        }
    metadata = {"sae": train_key, "matmul_precision": matmul_precision}
    # Serialised in memory, written by our own atomic writer: checksummed, umask permissions, a full disk is a
    # WriteError naming the file (safetensors' own file writer gives 0600 files and its own error type).
    atomic.atomic_write_bytes(fpath, safetensors.numpy.save(tensors, metadata=metadata))


class Partials(typing.NamedTuple):
    """Every block of one SAE's score artifact, concatenated."""

    ap_CK: np.ndarray
    """float64 [C, d_sae] AP of every latent for every class."""
    min_K: np.ndarray
    """float32 [d_sae] lowest score of each latent over the kept patches."""
    max_K: np.ndarray
    """float32 [d_sae] highest score; equal to min_K for a constant (dead) latent."""
    w_CK: np.ndarray | None = None
    """float64 [C, d_sae] each (class, latent) probe's weight, fit on the kept patches (None: scored without probes)."""
    b_CK: np.ndarray | None = None
    """float64 [C, d_sae] its intercept."""
    loss_CK: np.ndarray | None = None
    """float64 [C, d_sae] its mean binary cross-entropy on the kept patches (the train CE, without the ridge)."""
    converged_CK: np.ndarray | None = None
    """uint8 [C, d_sae] 1 where its Newton iterations converged."""


class PartialError(artifacts.IncompleteArtifactError):
    """A score partial is missing, unreadable, or does not hold what its artifact implies; the message names it."""


_PARTIAL_DTYPES = {"ap_CK": np.float64, "min_K": np.float32, "max_K": np.float32, "k_range": np.int64}
"""Every tensor of a partial file scored without probes, and its dtype (nothing else may be in the file)."""
_PROBE_DTYPES = {"w_CK": np.float64, "b_CK": np.float64, "loss_CK": np.float64, "converged_CK": np.uint8}
"""The tensors a partial scored with probes holds besides."""


def read_partials(
    art: artifacts.Artifact, d_sae: int, block_size: int, train_key: str, counts_C: np.ndarray, probes: bool = True
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
        probes: the partials hold the probes (`w_CK`, `b_CK`, `loss_CK`, `converged_CK`) too: scored with probes.

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
        tensors = _read_partial(fpath, train_key, probes)
        width = k_stop - k_start
        shapes = {"ap_CK": (n_classes, width), "min_K": (width,), "max_K": (width,), "k_range": (2,)}
        shapes |= {name: (n_classes, width) for name in _PROBE_DTYPES if probes}
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
        if probes:
            probe_CK = np.stack([tensors["w_CK"], tensors["b_CK"], tensors["loss_CK"]])
            bad = (tensors["loss_CK"] < 0).any() or (tensors["converged_CK"] > 1).any()
            if not np.isfinite(probe_CK).all() or bad:
                raise PartialError(
                    f"{fpath}: a probe has a non-finite or negative value (w, b, loss); delete it and rerun"
                )
        blocks.append(tensors)
    names = [name for name in Partials._fields if probes or name not in _PROBE_DTYPES]
    return Partials(**{name: np.concatenate([b[name] for b in blocks], axis=-1) for name in names})


def _read_partial(fpath: pathlib.Path, train_key: str, probes: bool) -> dict[str, np.ndarray]:
    """The tensors of one partial file, checked for their names, dtypes and "sae" metadata."""
    remedy = "delete it and rerun `--stage score`"
    dtypes = _PARTIAL_DTYPES | (_PROBE_DTYPES if probes else {})
    if not fpath.is_file():
        raise PartialError(f"{fpath} is missing; rerun `--stage score`")
    try:
        with safetensors.safe_open(str(fpath), framework="numpy") as fd:
            metadata = fd.metadata() or {}
            names = set(fd.keys())
            if names != set(dtypes):
                raise PartialError(f"{fpath}: holds tensors {sorted(names)}, expected {sorted(dtypes)}; {remedy}")
            tensors = {name: fd.get_tensor(name) for name in dtypes}
    except PartialError:
        raise
    except Exception as err:  # safetensors raises SafetensorError (or others) on a corrupt header or short file
        raise PartialError(f"{fpath} is not a readable safetensors file ({err}); {remedy}") from None
    if metadata.get("sae") != train_key:
        raise PartialError(
            f"{fpath}: scores SAE {metadata.get('sae')!r}, expected {train_key!r} (a partial of another SAE); {remedy}"
        )
    for name, dtype in dtypes.items():
        if tensors[name].dtype != dtype:
            raise PartialError(f"{fpath}: {name} has dtype {tensors[name].dtype}, expected {np.dtype(dtype)}; {remedy}")
    return tensors
