"""SAE checkpoints made elsewhere, read as our `SparseAutoencoder`, and ours written in the saev library's format.

Formats read (`read_sae`):

- the saev library's `sae.pt`: one line of UTF-8 JSON (the header), a newline, then `torch.save(state_dict)` bytes.
  Header schemas: none (saev v1's first files: a flat ReLU config, `d_vit`, `exp_factor`), 1 (saev v1: `cfg` with
  `d_vit`, `exp_factor`, `top_k`, and `cls` naming the activation "Relu", "TopK" or "BatchTopK"; or `cls`
  "SparseAutoencoderConfig" with a tagged `cfg.activation`) and 2 to 5 (saev 2.x: `cfg` with `d_model`, `d_sae` and
  `activation` = {"cls": "Relu" | "TopK" | "BatchTopK", "params": {"key": ..., "top_k": ..., ...}}). saev's own loader
  reads schemas 2, 3 and 4 like 5 except that their training-only params may be in a legacy form (`"kind"` for
  `"key"`, `"sparsity": {"coeff": ...}` or `{}` for a tagged sparsity object); neither changes an SAE's outputs, so we
  read the four alike (and do not refuse a legacy form in schema 5, as saev does). Other schemas are refused. Every
  schema may spell the width `d_vit` or `d_model`, and the latent count `d_sae` or `exp_factor` (times the width), as
  saev's versions did; the width, the latent count, the activation of a tagged header and a TopK/BatchTopK `top_k` are
  required (saev's defaults for them changed between its versions, so a missing one is refused, never guessed).
  Tensors: `W_enc` [d_model, d_sae], `b_enc` [d_sae], `W_dec` [d_sae, d_model], `b_dec` [d_model], plus
  `activation.threshold` (a scalar) for a 2.x BatchTopK SAE.
- ours: a directory with `sae.json` + `sae.safetensors` (`saev.nn.save`; a train artifact directory is one).

Nothing is unpickled: the header is parsed as JSON and the state dict read with `torch.load(weights_only=True)`,
which only rebuilds tensors; a file that needs more (pickled objects) is refused. Before anything is opened the path
must be a regular file (a FIFO or a device is refused unread: `helpers.open_regular_file`); only the header line is
read before the file's size is checked against the header's shapes (every tensor at 8 bytes a value, plus the
archive's own few KiB). Each tensor must be dense (not sparse or quantized), on the CPU (not a meta tensor), of a
floating-point dtype and finite, and stay finite once converted to float32 (a float64 value beyond float32's range
would become inf).

Conversion. saev's encoder is `h = x @ W_enc + b_enc` (no `b_dec` subtraction); ours is `(x - b_dec) @ W_enc + b_enc`,
so an imported SAE gets `b_enc_ours = b_enc_theirs + b_dec @ W_enc` (computed in float64), and an export
`b_enc_theirs = b_enc_ours - b_dec @ W_enc`. Activations:

- ReLU -> `Relu()`.
- TopK(top_k) -> `TopK(min(top_k, d_sae), keep_negative=True)`: saev keeps the k largest pre-activations as they are,
  so a row with fewer than k positive ones keeps negative values; so do we, for imported SAEs.
- BatchTopK (2.x) -> `JumpRelu(max(threshold, 0))` from the `activation.threshold` buffer: saev's inference rule is
  `h if h > threshold else 0`, and plain ReLU when threshold <= 0 (so no negative threshold is needed).
- BatchTopK (v1) -> refused: it has no inference threshold, so a patch's latents depend on the rest of its batch.

Export (`write_saev_pt`) writes header schema 5. Our `TopK` passes kept values through a ReLU, saev's does not: an
export of such an SAE says so in the header's "lib" field ("saev-pipeline <version> (relu-after-top-k)"), and
`read_sae` restores our rule from it; the saev library itself ignores "lib" and keeps negative values in rows with
fewer than k positive pre-activations. Training-only fields of the header (sparsity penalty, auxiliary loss, BatchTopK
momentum) are written as saev's defaults; they do not change an SAE's outputs.
"""

import dataclasses
import importlib.metadata
import io
import json
import pathlib
import re
import typing

import beartype
import torch
from torch import Tensor

from saev import artifacts, atomic, checksums, errors, helpers, nn

CONVERSION_VERSION = 2
"""Version of the conversion rules above; part of the key of every imported SAE (bump it when they change). 2: its
metrics count non-zero latents (an imported TopK SAE keeps negative values), so earlier imports are measured again."""

LIB_NAME = "saev-pipeline"
"""How our exports name their writer in the header's "lib" field."""
RELU_AFTER_TOP_K = "relu-after-top-k"
"""The mark, in "lib", of an export whose TopK passes kept values through a ReLU (our `TopK` rule)."""

SUPPORTED_SCHEMAS = (None, 1, 2, 3, 4, 5)
"""saev header schemas `read_sae` reads (None: a header without "schema")."""

_WHAT = "SAE checkpoint"
"""How messages name the files read here."""
_MAX_HEADER_BYTES = 1 << 20
_ARCHIVE_SLACK_BYTES = 64 << 10
"""Bytes a torch archive adds to its tensors' data (zip records, the pickled index, alignment): a few KiB."""
_ACTIVATION_CLASSES = ("Relu", "TopK", "BatchTopK")
_THRESHOLD = "activation.threshold"


class SaeFileError(errors.UserInputError, ValueError):
    """An SAE checkpoint cannot be imported; the message (one line) names the file and the field at fault."""


@beartype.beartype
@dataclasses.dataclass(frozen=True)
class ImportedSae:
    """An SAE read from a checkpoint and converted to our formula."""

    sae: nn.SparseAutoencoder
    """The SAE (cpu, float32), computing the same latents and reconstructions as the original."""
    fmt: str
    """Where it came from: "saev-v1" (no schema), "saev-v1-schema1", "saev-2-schema<2 to 5>" or "ours"."""
    checksum: str
    """XXH3-128 of the file's bytes (ours: of sae.json, then sae.safetensors); with `CONVERSION_VERSION` it keys the
    SAE's train artifact."""
    top_k: int | None
    """saev's `top_k` of a TopK or BatchTopK SAE as written in its header (None otherwise)."""
    header: dict[str, typing.Any]
    """The JSON header as read (ours: sae.json)."""


############
# Reading  #
############


@beartype.beartype
def read_sae(path: pathlib.Path | str) -> ImportedSae:
    """Read an SAE checkpoint: a saev `sae.pt` file, a directory holding one, or a directory with our `sae.json` +
    `sae.safetensors`.

    Raises:
        SaeFileError: missing or unreadable path, not a regular file, larger than its header's shapes allow,
            truncated or corrupted file, bad header, unsupported schema or activation, pickled objects, missing,
            extra, misshapen, sparse, meta or non-finite tensors, or values that overflow float32 (one line naming
            the file and the field).
    """
    path = pathlib.Path(path)
    if path.is_dir():
        if (path / nn.CONFIG_FNAME).exists() or (path / nn.WEIGHTS_FNAME).exists():
            return _read_ours(path)
        if (path / "sae.pt").exists():
            return read_saev_pt(path / "sae.pt")
        raise SaeFileError(
            f"{path}: directory holds neither a saev sae.pt nor our {nn.CONFIG_FNAME} + {nn.WEIGHTS_FNAME}"
        )
    return read_saev_pt(path)


@beartype.beartype
def read_saev_pt(fpath: pathlib.Path | str) -> ImportedSae:
    """Read a saev `sae.pt` (header schema none, or 1 to 5) and convert it (see the module docstring)."""
    fpath = pathlib.Path(fpath)
    # Its size is bounded by its header's shapes (`_max_file_bytes`): only the header line is read before.
    with helpers.open_regular_file(fpath, what=_WHAT, max_bytes=None, error=SaeFileError) as (fobj, size):
        line = _read(fobj, fpath, min(size, _MAX_HEADER_BYTES))
        newline = line.find(b"\n")
        if newline < 0:
            raise SaeFileError(f"{fpath}: no JSON header line (a saev sae.pt starts with one line of JSON)")
        try:
            header = json.loads(line[:newline].decode("utf-8"), parse_constant=_refuse_constant)
        except (UnicodeDecodeError, ValueError) as err:
            raise SaeFileError(f"{fpath}: the header line is not JSON ({_one_line(err)})") from None
        if not isinstance(header, dict):
            raise SaeFileError(f"{fpath}: the header is JSON {type(header).__name__}, not an object")
        spec = _parse_header(fpath, header)
        max_bytes = _max_file_bytes(spec, newline + 1)
        if size > max_bytes:
            raise SaeFileError(
                f"{fpath} has {size} bytes, more than its header's shapes allow (d_model={spec.d_model}, "
                f"d_sae={spec.d_sae}: at most {max_bytes} bytes, float64 tensors included)"
            )
        data = line + _read(fobj, fpath, size - len(line))
    state = _load_state_dict(fpath, data[newline + 1 :])
    return ImportedSae(
        sae=_convert(fpath, spec, state),
        fmt=spec.fmt,
        checksum=checksums.bytes_checksum(data),
        top_k=spec.top_k,
        header=header,
    )


def _read(fobj: typing.BinaryIO, fpath: pathlib.Path, n: int) -> bytes:
    try:
        return fobj.read(n)
    except OSError as err:
        raise SaeFileError(f"cannot read {_WHAT} file {fpath}: {err.strerror or err}") from None


class _Spec(typing.NamedTuple):
    fmt: str
    d_model: int
    d_sae: int
    activation: str  # "Relu", "TopK" or "BatchTopK"
    top_k: int | None
    keep_negative: bool


def _parse_header(fpath: pathlib.Path, header: dict) -> _Spec:
    schema = header.get("schema")
    if schema not in SUPPORTED_SCHEMAS or isinstance(schema, bool):
        raise SaeFileError(
            f"{fpath}: header field 'schema' is {schema!r}; supported: none or 1 (saev v1), 2 to 5 (saev 2.x)"
        )
    ours = isinstance(header.get("lib"), str) and header["lib"].startswith(LIB_NAME)
    keep_negative = not (ours and RELU_AFTER_TOP_K in header["lib"])
    v1 = schema in (None, 1)
    if schema is None:  # saev v1's first files: the ReLU config itself
        d_model, d_sae = _widths(fpath, header, "", v1)
        return _Spec("saev-v1", d_model, d_sae, "Relu", None, keep_negative)
    cfg = header.get("cfg")
    if not isinstance(cfg, dict):
        raise SaeFileError(f"{fpath}: header field 'cfg' must be an object, got {cfg!r:.60}")
    d_model, d_sae = _widths(fpath, cfg, "cfg.", v1)
    fmt = "saev-v1-schema1" if v1 else f"saev-2-schema{schema}"
    if schema == 1:
        cls = header.get("cls", "SparseAutoencoderConfig")
        if cls in _ACTIVATION_CLASSES:  # saev v1's first schema-1 files: the activation is the config's class
            top_k = None if cls == "Relu" else _int_field(fpath, cfg, "top_k", "cfg.")
            return _Spec(fmt, d_model, d_sae, cls, top_k, keep_negative)
        if cls != "SparseAutoencoderConfig":
            raise SaeFileError(
                f"{fpath}: header field 'cls' is {cls!r}; supported: {', '.join(_ACTIVATION_CLASSES)} "
                "or SparseAutoencoderConfig"
            )
    if "activation" not in cfg:  # saev's default activation changed between versions (Relu, then TopK)
        raise SaeFileError(f"{fpath}: header field 'cfg.activation' is missing")
    activation = cfg["activation"]
    if not (isinstance(activation, dict) and isinstance(activation.get("params"), dict)):
        raise SaeFileError(f"{fpath}: header field 'cfg.activation' must be an object with 'cls' and 'params'")
    cls = activation.get("cls")
    if cls not in _ACTIVATION_CLASSES:
        raise SaeFileError(
            f"{fpath}: header field 'cfg.activation.cls' is {cls!r}; supported: {', '.join(_ACTIVATION_CLASSES)}"
        )
    # Only top_k matters at inference; the other params (sparsity, aux, momentum, in any legacy form) train.
    top_k = None if cls == "Relu" else _int_field(fpath, activation["params"], "top_k", "cfg.activation.params.")
    return _Spec(fmt, d_model, d_sae, cls, top_k, keep_negative)


def _max_file_bytes(spec: _Spec, header_bytes: int) -> int:
    """The largest sae.pt the header's shapes allow: the header, every tensor at 8 bytes a value (float64), and the
    archive's own bytes."""
    n_values = 2 * spec.d_model * spec.d_sae + spec.d_sae + spec.d_model + 1  # + 1: BatchTopK's threshold
    return header_bytes + 8 * n_values + _ARCHIVE_SLACK_BYTES


def _widths(fpath: pathlib.Path, obj: dict, prefix: str, v1: bool) -> tuple[int, int]:
    """(d_model, d_sae) from either spelling of each: the width `d_vit` (saev v1) or `d_model` (2.x), the latent count
    `d_sae` or `exp_factor` times the width. A missing one, or two spellings that disagree, is refused."""
    width = {n: _int_field(fpath, obj, n, prefix) for n in ("d_vit", "d_model") if n in obj}
    if not width:
        name, other = ("d_vit", "d_model") if v1 else ("d_model", "d_vit")
        raise SaeFileError(
            f"{fpath}: header field '{prefix}{name}' is missing (the width; '{prefix}{other}' is not given either)"
        )
    if len(set(width.values())) > 1:
        raise SaeFileError(
            f"{fpath}: header fields '{prefix}d_vit'={width['d_vit']} and '{prefix}d_model'={width['d_model']} "
            "disagree (both name the width)"
        )
    d_model = width.popitem()[1]
    count = {n: _int_field(fpath, obj, n, prefix) for n in ("exp_factor", "d_sae") if n in obj}
    if not count:
        name, other = ("exp_factor", "d_sae") if v1 else ("d_sae", "exp_factor")
        raise SaeFileError(
            f"{fpath}: header field '{prefix}{name}' is missing (the number of latents; '{prefix}{other}' is not "
            "given either)"
        )
    if len(count) == 2 and count["d_sae"] != count["exp_factor"] * d_model:
        raise SaeFileError(
            f"{fpath}: header fields '{prefix}d_sae'={count['d_sae']} and '{prefix}exp_factor'={count['exp_factor']} "
            f"disagree (width {d_model})"
        )
    return d_model, count["d_sae"] if "d_sae" in count else count["exp_factor"] * d_model


def _int_field(fpath: pathlib.Path, obj: dict, name: str, prefix: str) -> int:
    if name not in obj:
        raise SaeFileError(f"{fpath}: header field '{prefix}{name}' is missing")
    value = obj[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SaeFileError(f"{fpath}: header field '{prefix}{name}' must be a positive integer, got {value!r:.60}")
    return value


def _load_state_dict(fpath: pathlib.Path, payload: bytes) -> dict[str, Tensor]:
    buffer = io.BytesIO(payload)
    try:
        state = torch.load(buffer, weights_only=True, map_location="cpu")
    except Exception as err:  # torch reports a truncated or garbled archive with many exception types
        text = str(err)
        # A class or function to rebuild, or a plain pickle stream (PROTO 2 to 5: pickle.dumps, not torch's archive):
        # pickled objects either way, refused by torch's weights-only unpickler before it runs anything.
        is_pickle = payload[:1] == b"\x80" and payload[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
        if (
            "Unsupported global" in text
            or "Unsupported class" in text
            or (type(err).__name__ == "UnpicklingError" and is_pickle)
        ):
            raise SaeFileError(
                f"{fpath}: the state dict holds pickled objects, which weights_only loading refuses (only tensors "
                "are read; nothing was unpickled)"
            ) from None
        # Never quote torch's advice to retry with weights_only=False: that would run whatever the file holds.
        found = re.search(r"Unsupported operand \d+|PytorchStreamReader failed [^.]*", text)
        reason = found.group(0) if found else _one_line(err) if "weights_only" not in text else type(err).__name__
        raise SaeFileError(
            f"{fpath}: the bytes after the header are not a readable torch state dict (truncated or corrupted?): "
            f"{reason}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise SaeFileError(f"{fpath}: the state dict is not a mapping of names to tensors")
    return state


def _convert(fpath: pathlib.Path, spec: _Spec, state: dict[str, Tensor]) -> nn.SparseAutoencoder:
    d_model, d_sae = spec.d_model, spec.d_sae
    expected = {"W_enc": (d_model, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_model), "b_dec": (d_model,)}
    if spec.activation == "BatchTopK":
        if _THRESHOLD not in state:
            raise SaeFileError(
                f"{fpath}: a BatchTopK SAE without an inference threshold (tensor '{_THRESHOLD}'; saev v1 has none): "
                "its latents depend on the rest of the batch, so a patch has no score of its own"
            )
        expected[_THRESHOLD] = ()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        what = [f"missing tensor(s) {', '.join(missing)}"] * bool(missing) + [
            f"unexpected tensor(s) {', '.join(extra)}"
        ] * bool(extra)
        raise SaeFileError(f"{fpath}: state dict has {'; '.join(what)} (expected {', '.join(expected)})")
    for name, shape in expected.items():
        tensor = state[name]
        if tuple(tensor.shape) != shape and not (shape == () and tensor.numel() == 1):
            raise SaeFileError(
                f"{fpath}: tensor '{name}' has shape {list(tensor.shape)}, but header d_model={d_model}, "
                f"d_sae={d_sae} need {list(shape)}"
            )
        _check_tensor(fpath, name, tensor)
    W_enc, b_enc, b_dec = (state[n].double() for n in ("W_enc", "b_enc", "b_dec"))
    activation: nn.Activation
    if spec.activation == "Relu":
        activation = nn.Relu()
    elif spec.activation == "TopK":
        activation = nn.TopK(min(typing.cast(int, spec.top_k), d_sae), keep_negative=spec.keep_negative)
    else:
        threshold = state[_THRESHOLD].reshape(())
        _check_finite(fpath, _THRESHOLD, threshold.float(), threshold)  # saev keeps it in a float32 buffer
        activation = nn.JumpRelu(max(float(threshold), 0.0))
    sae = nn.SparseAutoencoder(_sae_config(d_model, d_sae), activation)
    converted = {
        "W_enc": state["W_enc"].float(),
        "b_enc": (b_enc + b_dec @ W_enc).float(),  # their x @ W + b == our (x - b_dec) @ W + b + b_dec @ W
        "W_dec": state["W_dec"].float(),
        "b_dec": state["b_dec"].float(),
    }
    for name, tensor in converted.items():
        _check_finite(fpath, name if name != "b_enc" else "b_enc + b_dec @ W_enc", tensor, state[name])
    sae.load_state_dict(converted)
    return sae


def _check_tensor(fpath: pathlib.Path, name: str, tensor: Tensor) -> None:
    """Refuse a tensor we cannot read as plain values: not dense (sparse, quantized), not on the CPU (a meta tensor
    holds no values), not floating-point, or holding NaN or infinite values."""
    if tensor.layout != torch.strided or tensor.is_quantized:
        layout = "quantized" if tensor.is_quantized else str(tensor.layout).removeprefix("torch.")
        raise SaeFileError(f"{fpath}: tensor '{name}' has layout {layout}, not a dense (strided) tensor")
    if tensor.device.type != "cpu":
        what = " (a meta tensor: shapes without values)" if tensor.is_meta else ""
        raise SaeFileError(f"{fpath}: tensor '{name}' is on device {tensor.device}{what}, not the CPU")
    if not tensor.is_floating_point():
        raise SaeFileError(f"{fpath}: tensor '{name}' has dtype {tensor.dtype}, not a floating-point type")
    if not bool(torch.isfinite(tensor).all()):
        raise SaeFileError(f"{fpath}: tensor '{name}' holds NaN or infinite values")


def _check_finite(fpath: pathlib.Path, name: str, converted: Tensor, original: Tensor) -> None:
    """Refuse a tensor whose finite values overflow float32 (they would become inf)."""
    if not bool(torch.isfinite(converted).all()):
        top = float(original.double().abs().max())
        raise SaeFileError(
            f"{fpath}: tensor '{name}' overflows float32 (it holds {original.dtype} values up to {top:.3g} in "
            f"magnitude; float32 holds {torch.finfo(torch.float32).max:.3g})"
        )


def _sae_config(d_model: int, d_sae: int) -> nn.SaeConfig:
    if d_sae % d_model == 0:
        return nn.SaeConfig(d_vit=d_model, exp_factor=d_sae // d_model)
    return nn.SaeConfig(d_vit=d_model, exp_factor=1, latents=d_sae)


def _read_ours(dpath: pathlib.Path) -> ImportedSae:
    cfg_fpath, weights_fpath = dpath / nn.CONFIG_FNAME, dpath / nn.WEIGHTS_FNAME
    config = helpers.read_regular_file(cfg_fpath, what=_WHAT, error=SaeFileError)
    try:
        header = json.loads(config)
        d_vit, exp_factor = int(header["d_vit"]), int(header.get("exp_factor", 8))
        d_sae = header.get("latents") or d_vit * exp_factor
        max_bytes = _max_file_bytes(_Spec("ours", d_vit, int(d_sae), "", None, False), 0)
    except (ValueError, TypeError, KeyError, AttributeError):
        max_bytes = _ARCHIVE_SLACK_BYTES  # a bad sae.json: nn.load below names its field
    hasher = checksums.new_hasher()
    hasher.update(config)
    hasher.update(helpers.read_regular_file(weights_fpath, what=_WHAT, max_bytes=max_bytes, error=SaeFileError))
    try:
        sae = nn.load(dpath)
    except (OSError, ValueError) as err:
        raise SaeFileError(_one_line(err)) from None
    for name, tensor in sae.state_dict().items():
        if not bool(torch.isfinite(tensor).all()):
            raise SaeFileError(f"{weights_fpath}: tensor '{name}' holds NaN or infinite values")
    return ImportedSae(sae=sae, fmt="ours", checksum=hasher.hexdigest(), top_k=None, header=header)


def _refuse_constant(name: str) -> typing.NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


###########
# Writing #
###########


@beartype.beartype
def write_saev_pt(sae: nn.SparseAutoencoder, fpath: pathlib.Path | str, *, top_k: int | None = None) -> None:
    """Write `sae` as a saev 2.x `sae.pt` (`saev_pt_bytes`), atomically.

    Raises:
        atomic.WriteError: the file could not be written.
    """
    atomic.atomic_write_bytes(pathlib.Path(fpath), saev_pt_bytes(sae, top_k=top_k))


@beartype.beartype
def saev_pt_bytes(sae: nn.SparseAutoencoder, *, top_k: int | None = None) -> bytes:
    """The bytes of `sae` as a saev 2.x `sae.pt` (header schema 5); see the module docstring for the rules.

    Arguments:
        sae: the SAE (any device).
        top_k: saev's `top_k` for a JumpReLU SAE (exported as BatchTopK, whose k matters only for training); None:
            saev's default, 32. A TopK SAE's own k is used.
    """
    state = {name: t.detach().to("cpu", torch.float64) for name, t in sae.state_dict().items()}
    tensors = {
        "W_enc": state["W_enc"].float(),
        "b_enc": (state["b_enc"] - state["b_dec"] @ state["W_enc"]).float(),
        "W_dec": state["W_dec"].float(),
        "b_dec": state["b_dec"].float(),
    }
    no_sparsity = {"cls": "NoSparsity", "params": {"key": "no-sparsity"}}
    auxk = {"cls": "AuxK", "params": {"key": "auxk", "k_aux": 512, "alpha": 1 / 32}}
    lib = f"{LIB_NAME} {_version()}"
    act = sae.activation
    if isinstance(act, nn.Relu):
        payload = {"key": "relu", "sparsity": no_sparsity, "aux": {"cls": "NoAux", "params": {"key": "no-aux"}}}
        activation = {"cls": "Relu", "params": payload}
    elif isinstance(act, nn.TopK):
        activation = {"cls": "TopK", "params": {"key": "top-k", "top_k": act.k, "sparsity": no_sparsity, "aux": auxk}}
        if not act.keep_negative:
            lib += f" ({RELU_AFTER_TOP_K})"
    elif isinstance(act, nn.JumpRelu):
        params = {"key": "batch-top-k", "top_k": top_k or 32, "sparsity": no_sparsity, "momentum": 0.1, "aux": auxk}
        activation = {"cls": "BatchTopK", "params": params}
        # float64 keeps our threshold exact; saev's load_state_dict casts it to its float32 buffer, and both compare
        # float32 pre-activations with the threshold rounded to float32.
        tensors[_THRESHOLD] = torch.tensor(act.threshold, dtype=torch.float64)
    else:
        raise TypeError(f"cannot export activation {act!r}")
    header = {
        "schema": 5,
        "cfg": {
            "d_model": sae.cfg.d_vit,
            "d_sae": sae.cfg.d_sae,
            "activation": activation,
            "reinit_blend": 0.8,
            "reinit_enc_dec_tranpose": True,  # sic: saev's spelling
            "remove_parallel_grads": True,
            "normalize_w_dec": True,
        },
        "commit": artifacts.git_commit() or "unknown",
        "lib": lib,
    }
    buffer = io.BytesIO()
    buffer.write((json.dumps(header) + "\n").encode("utf-8"))
    torch.save(tensors, buffer)
    return buffer.getvalue()


@beartype.beartype
def export_train_artifact(train_dpath: pathlib.Path | str, fpath: pathlib.Path | str) -> None:
    """Write the SAE of a train artifact as a saev 2.x `sae.pt` (`train_artifact_saev_pt`), atomically."""
    atomic.atomic_write_bytes(pathlib.Path(fpath), train_artifact_saev_pt(train_dpath))


def train_artifact_saev_pt(train_dpath: pathlib.Path | str) -> bytes:
    """The SAE of a train artifact (`<root>/train/<key>/`) as the bytes of a saev 2.x `sae.pt` (`saev_pt_bytes`),
    with the BatchTopK `top_k` of its training config or of the file it was imported from, when its manifest records
    one."""
    train_dpath = pathlib.Path(train_dpath)
    sae = nn.load(train_dpath)
    top_k = None
    try:
        params = json.loads((train_dpath / "manifest.json").read_text()).get("params", {})
        found = params.get("import", {}).get("top_k") or params.get("sae", {}).get("objective", {}).get("k")
        top_k = found if isinstance(found, int) and not isinstance(found, bool) and found > 0 else None
    except (OSError, ValueError, AttributeError):
        pass
    return saev_pt_bytes(sae, top_k=top_k)


def _version() -> str:
    try:
        return importlib.metadata.version(LIB_NAME)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
