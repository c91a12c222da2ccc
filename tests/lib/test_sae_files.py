"""SAE checkpoints of the saev library (v1: no schema and schema 1; 2.x: schemas 2 to 5) and our own, imported and scored;
ours exported as saev 2.x files. The fixtures are written here from the documented formats
(shared/notes/saev-formats.md and the v1 source), and the expected outputs computed independently with saev's
documented forward: h = x @ W_enc + b_enc, then its activation, then f @ W_dec + b_dec."""

import io
import json
import pathlib
import pickle
import shutil
import zipfile

import pytest
import torch

from saev import artifacts, nn, sae_files
from stages import pipeline as pl
from tests.helpers import assert_within, flip_byte, run, sae_forward_bounds

###########################################
# Our own writers of saev's file layouts  #
###########################################


def random_state(d_model: int, d_sae: int, seed: int = 0, b_enc_shift: float = 0.0) -> dict[str, torch.Tensor]:
    """Random saev weights of moderate size (outputs of order 1)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_model, d_sae, generator=gen) * 0.3,
        "b_enc": torch.randn(d_sae, generator=gen) * 0.1 + b_enc_shift,
        "W_dec": torch.randn(d_sae, d_model, generator=gen) * 0.3,
        "b_dec": torch.randn(d_model, generator=gen) * 0.5,
    }


def write_pt(fpath: pathlib.Path, header: object, state: object) -> pathlib.Path:
    """A sae.pt: one JSON line, a newline, then torch.save of the state dict."""
    fpath.parent.mkdir(parents=True, exist_ok=True)
    with open(fpath, "wb") as fd:
        fd.write((json.dumps(header) + "\n").encode("utf-8"))
        torch.save(state, fd)
    return fpath


def write_v1_pre_schema(fpath, d_vit: int, exp_factor: int, state) -> pathlib.Path:
    header = {
        "d_vit": d_vit, "exp_factor": exp_factor, "n_reinit_samples": 524288, "remove_parallel_grads": True,
        "normalize_w_dec": True, "seed": 0, "sparsity_coeff": 4e-4, "ghost_grads": False,
    }  # fmt: skip
    return write_pt(fpath, header, state)


def write_v1_schema1(fpath, cls: str, d_vit: int, exp_factor: int, state, top_k: int | None = None) -> pathlib.Path:
    cfg = {"d_vit": d_vit, "exp_factor": exp_factor, "n_reinit_samples": 524288, "remove_parallel_grads": True,
           "normalize_w_dec": True, "seed": 0}  # fmt: skip
    if top_k is not None:
        cfg["top_k"] = top_k
    return write_pt(fpath, {"schema": 1, "cfg": cfg, "cls": cls, "commit": "unknown", "lib": "1.0.0"}, state)


def schema5_header(cls: str, d_model: int, d_sae: int, top_k: int = 32) -> dict:
    no_sparsity = {"cls": "NoSparsity", "params": {"key": "no-sparsity"}}
    auxk = {"cls": "AuxK", "params": {"key": "auxk", "k_aux": 512, "alpha": 0.03125}}
    params = {
        "Relu": {"key": "relu", "sparsity": {"cls": "L1Sparsity", "params": {"key": "l1-sparsity", "coeff": 4e-4}},
                 "aux": {"cls": "NoAux", "params": {"key": "no-aux"}}},
        "TopK": {"key": "top-k", "top_k": top_k, "sparsity": no_sparsity, "aux": auxk},
        "BatchTopK": {"key": "batch-top-k", "top_k": top_k, "sparsity": no_sparsity, "momentum": 0.1, "aux": auxk},
    }[cls]  # fmt: skip
    cfg = {"d_model": d_model, "d_sae": d_sae, "activation": {"cls": cls, "params": params}, "reinit_blend": 0.8,
           "reinit_enc_dec_tranpose": True, "remove_parallel_grads": True, "normalize_w_dec": True}  # fmt: skip
    return {"schema": 5, "cfg": cfg, "commit": "unknown", "lib": "2.1.0"}


def write_schema5(fpath, cls: str, d_model: int, d_sae: int, state, top_k: int = 32, threshold: float | None = None):
    if threshold is not None:
        state = {**state, "activation.threshold": torch.tensor(threshold)}
    return write_pt(fpath, schema5_header(cls, d_model, d_sae, top_k), state)


def saev_forward(state, x_BD: torch.Tensor, kind: str, top_k: int = 0, threshold: float = 0.0):
    """saev's documented inference forward, computed here on its own (float64)."""
    st = {k: v.double() for k, v in state.items()}
    h = x_BD.double() @ st["W_enc"] + st["b_enc"]
    if kind == "relu":
        f = torch.relu(h)
    elif kind == "topk":  # the k largest as they are, even negative
        idx = h.topk(min(top_k, h.shape[1]), dim=-1).indices
        f = torch.zeros_like(h).scatter(-1, idx, h.gather(-1, idx))
    else:  # batch-top-k at inference: a JumpReLU, plain ReLU when the threshold is <= 0
        f = torch.where(h > max(threshold, 0.0), h, torch.zeros_like(h))
    return f, f @ st["W_dec"] + st["b_dec"]


def assert_same_outputs(sae: nn.SparseAutoencoder, expected_f, expected_x_hat, x_BD):
    """Our float32 forward equals the exact (float64) one within float32's rounding of each sum (`sae_forward_bounds`:
    relative to the magnitude of what is summed, so it holds on any CPU's kernels)."""
    with torch.no_grad():
        out = sae(x_BD)
    f_err, x_err = sae_forward_bounds(sae, x_BD)
    assert_within(out.f_BS, expected_f, f_err, "f")
    assert_within(out.x_hat_BD, expected_x_hat, x_err, "x_hat")


def inputs(d: int, n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


###########
# Imports #
###########


def test_encoder_bias_absorbs_the_decoder_bias(tmp_path):
    """saev's h = x @ W + b equals our (x - b_dec) @ W + b' exactly when b' = b + b_dec @ W."""
    state = random_state(8, 24)
    imported = sae_files.read_sae(write_schema5(tmp_path / "sae.pt", "Relu", 8, 24, state))
    expected = (state["b_enc"].double() + state["b_dec"].double() @ state["W_enc"].double()).float()
    torch.testing.assert_close(imported.sae.b_enc.detach(), expected, atol=0, rtol=0)
    for name in ("W_enc", "W_dec", "b_dec"):
        assert torch.equal(imported.sae.state_dict()[name], state[name])
    x = inputs(8)
    with torch.no_grad():
        theirs = x.double() @ state["W_enc"].double() + state["b_enc"].double()
        assert_within(imported.sae.pre_acts(x), theirs, sae_forward_bounds(imported.sae, x)[0], "pre-activations")


def test_v1_pre_schema_relu(tmp_path):
    state = random_state(8, 32)
    imported = sae_files.read_sae(write_v1_pre_schema(tmp_path / "sae.pt", 8, 4, state))
    assert imported.fmt == "saev-v1" and isinstance(imported.sae.activation, nn.Relu)
    x = inputs(8)
    assert_same_outputs(imported.sae, *saev_forward(state, x, "relu"), x)


@pytest.mark.parametrize("cls,kind", [("Relu", "relu"), ("TopK", "topk")])
def test_v1_schema1(tmp_path, cls, kind):
    state = random_state(8, 16, b_enc_shift=-0.4)
    fpath = write_v1_schema1(tmp_path / "sae.pt", cls, 8, 2, state, top_k=5 if cls == "TopK" else None)
    imported = sae_files.read_sae(fpath)
    assert imported.fmt == "saev-v1-schema1" and imported.sae.cfg.d_sae == 16
    x = inputs(8)
    assert_same_outputs(imported.sae, *saev_forward(state, x, kind, top_k=5), x)


@pytest.mark.parametrize(
    "cls,kind,threshold",
    [("Relu", "relu", 0.0), ("TopK", "topk", 0.0), ("BatchTopK", "batchtopk", 0.35), ("BatchTopK", "batchtopk", -0.2)],
)
def test_schema5_with_d_sae_not_a_multiple_of_d_model(tmp_path, cls, kind, threshold):
    state = random_state(8, 13, b_enc_shift=-0.3)
    fpath = write_schema5(tmp_path / "sae.pt", cls, 8, 13, state, top_k=4,
                          threshold=threshold if cls == "BatchTopK" else None)  # fmt: skip
    imported = sae_files.read_sae(fpath)
    assert imported.fmt == "saev-2-schema5" and imported.sae.cfg.d_sae == 13 and imported.sae.cfg.d_vit == 8
    x = inputs(8)
    assert_same_outputs(imported.sae, *saev_forward(state, x, kind, top_k=4, threshold=threshold), x)
    # A per-latent rule encodes a block of latents alone; TopK slices the full encoding: the same values either way.
    with torch.no_grad():
        torch.testing.assert_close(imported.sae.encode(x, slice(3, 9)), imported.sae.encode(x)[:, 3:9])


def test_v1_schema1_with_a_tagged_activation(tmp_path):
    """saev's later schema-1 files: cls "SparseAutoencoderConfig" and the activation as {"cls", "params"}."""
    state = random_state(8, 16, b_enc_shift=-0.4)
    cfg = {"d_vit": 8, "exp_factor": 2, "seed": 0, "activation": {"cls": "TopK", "params": {"top_k": 3}}}
    fpath = write_pt(tmp_path / "sae.pt", {"schema": 1, "cfg": cfg, "cls": "SparseAutoencoderConfig"}, state)
    x = inputs(8)
    assert_same_outputs(sae_files.read_sae(fpath).sae, *saev_forward(state, x, "topk", top_k=3), x)


def legacy_2x_header(schema: int, cls: str, d_model: int, d_sae: int, top_k: int) -> dict:
    """A 2.x header of schema 2, 3 or 4 with the legacy forms saev's loader still reads for them: "kind" for "key" and
    an untagged sparsity ({"coeff": ...} or {}); schema 2 with saev's older cfg spelling (d_vit, exp_factor)."""
    header = schema5_header(cls, d_model, d_sae, top_k)
    params = header["cfg"]["activation"]["params"]
    params["kind"] = params.pop("key")
    params["sparsity"] = {"coeff": 4e-4} if cls == "Relu" else {}
    if schema == 2:
        cfg = {"d_vit": d_model, "exp_factor": d_sae // d_model, "n_reinit_samples": 524288, "seed": 0,
               "remove_parallel_grads": True, "normalize_w_dec": True, "activation": header["cfg"]["activation"]}  # fmt: skip
        header["cfg"] = cfg
    return {**header, "schema": schema}


@pytest.mark.parametrize("schema", [2, 3, 4])
@pytest.mark.parametrize(
    "cls,kind,threshold", [("Relu", "relu", 0.0), ("TopK", "topk", 0.0), ("BatchTopK", "batchtopk", 0.3)]
)
def test_schemas_2_to_4_are_read_like_5(tmp_path, schema, cls, kind, threshold):
    """saev's loader reads schemas 2-4 as 5, accepting legacy training-only params; so do we, with the same outputs."""
    state = random_state(8, 16, b_enc_shift=-0.3)
    if cls == "BatchTopK":
        state["activation.threshold"] = torch.tensor(threshold)
    imported = sae_files.read_sae(write_pt(tmp_path / "sae.pt", legacy_2x_header(schema, cls, 8, 16, top_k=5), state))
    assert imported.fmt == f"saev-2-schema{schema}" and imported.sae.cfg.d_vit == 8 and imported.sae.cfg.d_sae == 16
    assert imported.top_k == (None if cls == "Relu" else 5)
    x = inputs(8)
    assert_same_outputs(imported.sae, *saev_forward(state, x, kind, top_k=5, threshold=threshold), x)


def test_a_schema1_header_may_spell_the_width_d_model(tmp_path):
    """Some saev versions wrote the schema-1 width as d_model: it is read, never replaced by a default width."""
    state = random_state(8, 24)
    cfg = {"d_model": 8, "exp_factor": 3, "seed": 0}
    imported = sae_files.read_sae(write_pt(tmp_path / "sae.pt", {"schema": 1, "cfg": cfg, "cls": "Relu"}, state))
    assert imported.sae.cfg.d_vit == 8 and imported.sae.cfg.d_sae == 24
    x = inputs(8)
    assert_same_outputs(imported.sae, *saev_forward(state, x, "relu"), x)


def test_a_top_k_above_d_sae_keeps_every_latent_like_saev(tmp_path):
    state = random_state(8, 13)
    imported = sae_files.read_sae(write_schema5(tmp_path / "sae.pt", "TopK", 8, 13, state, top_k=40))
    assert imported.sae.activation.k == 13
    x = inputs(8)
    assert_same_outputs(imported.sae, *saev_forward(state, x, "topk", top_k=40), x)


def test_imported_topk_keeps_negative_values_like_saev(tmp_path):
    """Rows with fewer than k positive pre-activations keep their k largest values, negative ones included."""
    state = random_state(8, 16, b_enc_shift=-2.0)  # most pre-activations negative
    imported = sae_files.read_sae(write_schema5(tmp_path / "sae.pt", "TopK", 8, 16, state, top_k=6))
    assert imported.sae.activation == nn.TopK(6, keep_negative=True)
    x = inputs(8)
    f, x_hat = saev_forward(state, x, "topk", top_k=6)
    assert (f < 0).any()
    assert_same_outputs(imported.sae, f, x_hat, x)
    assert ((imported.sae.encode(x) != 0).sum(dim=1) == 6).all()


def test_our_own_directory_and_train_artifacts_import_unchanged(tmp_path):
    sae = nn.SparseAutoencoder(nn.SaeConfig(d_vit=8, exp_factor=2, seed=3), nn.TopK(4))
    nn.save(sae, tmp_path / "mine")
    imported = sae_files.read_sae(tmp_path / "mine")
    assert imported.fmt == "ours" and imported.sae.activation == nn.TopK(4)
    for name, tensor in sae.state_dict().items():
        assert torch.equal(imported.sae.state_dict()[name], tensor)


def test_a_directory_holding_a_saev_file_is_read(tmp_path):
    state = random_state(8, 16)
    write_schema5(tmp_path / "run" / "sae.pt", "Relu", 8, 16, state)
    assert sae_files.read_sae(tmp_path / "run").fmt == "saev-2-schema5"


def test_the_checksum_is_of_the_file_contents(tmp_path):
    state = random_state(8, 16)
    a = write_schema5(tmp_path / "a" / "sae.pt", "Relu", 8, 16, state)
    b = shutil.copy(a, tmp_path / "b.pt")
    c = write_schema5(tmp_path / "c" / "sae.pt", "Relu", 8, 16, random_state(8, 16, seed=1))
    assert sae_files.read_sae(a).checksum == sae_files.read_sae(b).checksum != sae_files.read_sae(c).checksum


############
# Refusals #
############


class Payload:
    """A pickled object: weights_only loading must refuse it without running anything."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _state() -> dict[str, torch.Tensor]:
    return random_state(8, 16)


REFUSALS = {
    "empty file": (lambda p: p.write_bytes(b""), "no JSON header line"),
    "no newline": (lambda p: p.write_bytes(b"\x00" * 100), "no JSON header line"),
    "header not JSON": (lambda p: p.write_bytes(b"{schema: 5\n" + b"x" * 10), "header line is not JSON"),
    "header a list": (lambda p: write_pt(p, [1, 2], _state()), "not an object"),
    "schema 0": (lambda p: write_pt(p, {**schema5_header("Relu", 8, 16), "schema": 0}, _state()), "'schema' is 0"),
    "schema 6": (lambda p: write_pt(p, {**schema5_header("Relu", 8, 16), "schema": 6}, _state()), "'schema' is 6"),
    "schema 99": (lambda p: write_pt(p, {**schema5_header("Relu", 8, 16), "schema": 99}, _state()), "'schema' is 99"),
    "schema string": (
        lambda p: write_pt(p, {**schema5_header("Relu", 8, 16), "schema": "5"}, _state()),
        "'schema' is '5'",
    ),
    "cfg missing": (lambda p: write_pt(p, {"schema": 5}, _state()), "'cfg' must be an object"),
    "d_model missing": (
        lambda p: write_pt(
            p, {"schema": 5, "cfg": {"d_sae": 16, "activation": {"cls": "Relu", "params": {}}}}, _state()
        ),
        "'cfg.d_model' is missing",
    ),
    "d_sae negative": (
        lambda p: write_pt(p, {"schema": 5, "cfg": {**schema5_header("Relu", 8, 16)["cfg"], "d_sae": -3}}, _state()),
        "'cfg.d_sae' must be a positive integer",
    ),
    "v1 width missing": (
        lambda p: write_pt(p, {"schema": 1, "cfg": {"exp_factor": 2, "top_k": 4}, "cls": "TopK"}, _state()),
        "'cfg.d_vit' is missing (the width; 'cfg.d_model' is not given either)",
    ),
    "v1 exp_factor missing": (
        lambda p: write_pt(p, {"schema": 1, "cfg": {"d_vit": 8, "top_k": 4}, "cls": "TopK"}, _state()),
        "'cfg.exp_factor' is missing",
    ),
    "v1 top_k missing": (
        lambda p: write_pt(p, {"schema": 1, "cfg": {"d_vit": 8, "exp_factor": 2}, "cls": "TopK"}, _state()),
        "'cfg.top_k' is missing",
    ),
    "v1 widths disagree": (
        lambda p: write_pt(
            p, {"schema": 1, "cfg": {"d_vit": 8, "d_model": 16, "exp_factor": 2}, "cls": "Relu"}, _state()
        ),
        "'cfg.d_vit'=8 and 'cfg.d_model'=16 disagree",
    ),
    "pre-schema width missing": (
        lambda p: write_pt(p, {"exp_factor": 2, "seed": 0}, _state()),
        "header field 'd_vit' is missing",
    ),
    "pre-schema exp_factor missing": (
        lambda p: write_pt(p, {"d_vit": 8, "seed": 0}, _state()),
        "header field 'exp_factor' is missing",
    ),
    "tagged schema 1 without activation": (
        lambda p: write_pt(
            p, {"schema": 1, "cfg": {"d_vit": 8, "exp_factor": 2}, "cls": "SparseAutoencoderConfig"}, _state()
        ),
        "'cfg.activation' is missing",
    ),
    "d_sae missing": (
        lambda p: write_pt(
            p, {"schema": 5, "cfg": {"d_model": 8, "activation": {"cls": "Relu", "params": {}}}}, _state()
        ),
        "'cfg.d_sae' is missing",
    ),
    "d_sae and exp_factor disagree": (
        lambda p: write_pt(
            p, {"schema": 5, "cfg": {**schema5_header("Relu", 8, 16)["cfg"], "exp_factor": 3}}, _state()
        ),
        "'cfg.d_sae'=16 and 'cfg.exp_factor'=3 disagree",
    ),
    "top_k missing": (
        lambda p: write_pt(
            p, {"schema": 5, "cfg": {"d_model": 8, "d_sae": 16, "activation": {"cls": "TopK", "params": {}}}}, _state()
        ),
        "'cfg.activation.params.top_k' is missing",
    ),
    "params missing": (
        lambda p: write_pt(
            p, {"schema": 3, "cfg": {"d_model": 8, "d_sae": 16, "activation": {"cls": "Relu"}}}, _state()
        ),
        "'cfg.activation' must be an object with 'cls' and 'params'",
    ),
    "unknown activation": (
        lambda p: write_pt(
            p,
            {
                "schema": 5,
                "cfg": {**schema5_header("Relu", 8, 16)["cfg"], "activation": {"cls": "Gated", "params": {}}},
            },
            _state(),
        ),
        "'cfg.activation.cls' is 'Gated'",
    ),
    "top_k zero": (lambda p: write_schema5(p, "TopK", 8, 16, _state(), top_k=0), "'cfg.activation.params.top_k'"),
    "v1 JumpRelu": (lambda p: write_v1_schema1(p, "JumpRelu", 8, 2, _state()), "'cls' is 'JumpRelu'"),
    "v1 BatchTopK": (
        lambda p: write_v1_schema1(p, "BatchTopK", 8, 2, _state(), top_k=4),
        "without an inference threshold",
    ),
    "2.x BatchTopK without threshold": (
        lambda p: write_schema5(p, "BatchTopK", 8, 16, _state()),
        "activation.threshold",
    ),
    "missing tensor": (
        lambda p: write_schema5(p, "Relu", 8, 16, {k: v for k, v in _state().items() if k != "b_dec"}),
        "missing tensor(s) b_dec",
    ),
    "extra tensor": (
        lambda p: write_schema5(p, "Relu", 8, 16, {**_state(), "scale": torch.ones(1)}),
        "unexpected tensor(s) scale",
    ),
    "wrong shape": (lambda p: write_schema5(p, "Relu", 8, 16, random_state(8, 12)), "tensor 'W_enc' has shape [8, 12]"),
    "width mismatch": (
        lambda p: write_schema5(p, "Relu", 6, 16, _state()),
        "tensor 'W_enc' has shape [8, 16], but header d_model=6",
    ),
    "NaN weight": (
        lambda p: write_schema5(p, "Relu", 8, 16, {**_state(), "b_enc": torch.full((16,), float("nan"))}),
        "tensor 'b_enc' holds NaN",
    ),
    "integer tensor": (
        lambda p: write_schema5(p, "Relu", 8, 16, {**_state(), "b_dec": torch.zeros(8, dtype=torch.int64)}),
        "tensor 'b_dec' has dtype torch.int64",
    ),
    "not a dict": (lambda p: write_pt(p, schema5_header("Relu", 8, 16), list(_state().values())), "not a mapping"),
    "truncated": (
        lambda p: p.write_bytes(write_schema5(p, "Relu", 8, 16, _state()).read_bytes()[: p.stat().st_size // 2]),
        "not a readable torch state dict",
    ),
    "meta tensor": (
        lambda p: write_schema5(p, "Relu", 8, 16, {**_state(), "W_enc": torch.empty(8, 16, device="meta")}),
        "tensor 'W_enc' is on device meta (a meta tensor: shapes without values), not the CPU",
    ),
    "sparse tensor": (
        lambda p: write_schema5(p, "Relu", 8, 16, {**_state(), "W_dec": _state()["W_dec"].to_sparse()}),
        "tensor 'W_dec' has layout sparse_coo, not a dense (strided) tensor",
    ),
    "sparse csr tensor": (
        lambda p: write_schema5(p, "Relu", 8, 16, {**_state(), "W_enc": _state()["W_enc"].to_sparse_csr()}),
        "tensor 'W_enc' has layout sparse_csr",
    ),
    "quantized tensor": (
        lambda p: write_schema5(
            p, "Relu", 8, 16, {**_state(), "b_dec": torch.quantize_per_tensor(torch.zeros(8), 0.1, 0, torch.quint8)}
        ),
        "tensor 'b_dec' has layout quantized",
    ),
    "complex tensor": (
        lambda p: write_schema5(p, "Relu", 8, 16, {**_state(), "b_dec": torch.zeros(8, dtype=torch.complex64)}),
        "tensor 'b_dec' has dtype torch.complex64, not a floating-point type",
    ),
    "float64 beyond float32": (
        lambda p: write_schema5(p, "Relu", 8, 16, {**_state(), "W_dec": _state()["W_dec"].double() * 1e300}),
        "tensor 'W_dec' overflows float32 (it holds torch.float64 values up to",
    ),
    "converted bias beyond float32": (  # each fits float32; b_dec @ W_enc does not
        lambda p: write_schema5(
            p, "Relu", 8, 16, {**_state(), "W_enc": torch.full((8, 16), 1e30), "b_dec": torch.full((8,), 1e30)}
        ),
        "tensor 'b_enc + b_dec @ W_enc' overflows float32",
    ),
    "threshold beyond float32": (
        lambda p: write_schema5(
            p, "BatchTopK", 8, 16, {**_state(), "activation.threshold": torch.tensor(1e300, dtype=torch.float64)}
        ),
        "tensor 'activation.threshold' overflows float32",
    ),
    "infinite weight": (
        lambda p: write_schema5(p, "Relu", 8, 16, {**_state(), "W_dec": torch.full((16, 8), float("inf"))}),
        "tensor 'W_dec' holds NaN or infinite values",
    ),
    "NaN threshold": (
        lambda p: write_schema5(
            p, "BatchTopK", 8, 16, {**_state(), "activation.threshold": torch.tensor(float("nan"))}
        ),
        "tensor 'activation.threshold' holds NaN or infinite values",
    ),
    "pickle after the header": (
        lambda p: p.write_bytes(json.dumps(schema5_header("Relu", 8, 16)).encode() + b"\n" + pickle.dumps(_state())),
        "the state dict holds pickled objects",
    ),
    "pickled object after the header": (
        lambda p: p.write_bytes(
            json.dumps(schema5_header("Relu", 8, 16)).encode()
            + b"\n"
            + pickle.dumps({"W_enc": Payload(p.parent / "ran")})
        ),
        "the state dict holds pickled objects",
    ),
    "truncated in the header": (
        lambda p: p.write_bytes(write_schema5(p, "Relu", 8, 16, _state()).read_bytes()[:40]),
        "no JSON header line",
    ),
    "truncated just after the header": (
        lambda p: p.write_bytes(json.dumps(schema5_header("Relu", 8, 16)).encode() + b"\n"),
        "not a readable torch state dict",
    ),
    "truncated near the end": (
        lambda p: p.write_bytes(write_schema5(p, "Relu", 8, 16, _state()).read_bytes()[:-30]),
        "not a readable torch state dict",
    ),
    "garbage after the header": (
        lambda p: p.write_bytes(json.dumps(schema5_header("Relu", 8, 16)).encode() + b"\n" + b"\x13" * 500),
        "not a readable torch state dict",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_files_are_refused_with_one_line_naming_the_file(tmp_path, case):
    make, message = REFUSALS[case]
    fpath = tmp_path / "sae.pt"
    make(fpath)
    with pytest.raises(sae_files.SaeFileError) as info:
        sae_files.read_sae(fpath)
    msg = str(info.value)
    assert "\n" not in msg and str(fpath) in msg and message in msg, msg
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg, msg  # never that advice
    assert not (tmp_path / "ran").exists()


def test_pickled_objects_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    fpath = write_pt(tmp_path / "sae.pt", schema5_header("Relu", 8, 16), {**_state(), "evil": Payload(marker)})
    with pytest.raises(sae_files.SaeFileError, match="pickled objects") as info:
        sae_files.read_sae(fpath)
    assert not marker.exists() and "\n" not in str(info.value) and str(fpath) in str(info.value)


def test_tensors_saved_on_a_gpu_are_read_onto_the_cpu(tmp_path):
    """A state dict saved from CUDA tensors (its archive names the device "cuda:0") is read onto the CPU, where the
    checks run (a meta tensor, which has no values, is refused: REFUSALS)."""
    fpath = write_schema5(tmp_path / "sae.pt", "Relu", 8, 16, _state())
    header, _, payload = fpath.read_bytes().partition(b"\n")
    src, out = zipfile.ZipFile(io.BytesIO(payload)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")  # pickled str: length, bytes
            dst.writestr(info, data)
    fpath.write_bytes(header + b"\n" + out.getvalue())
    imported = sae_files.read_sae(fpath)
    assert all(t.device.type == "cpu" for t in imported.sae.state_dict().values())
    assert torch.equal(imported.sae.W_enc.detach(), _state()["W_enc"])


@pytest.mark.parametrize("field,value", [("d_vit", "8"), ("keep_negative", "yes")])
def test_our_directory_with_a_mistyped_field_is_refused_in_one_line(tmp_path, field, value):
    """An imported sae.json of ours with a field of the wrong type: SaeFileError naming the file and the field."""
    nn.save(nn.SparseAutoencoder(nn.SaeConfig(d_vit=8, exp_factor=2), nn.TopK(4)), tmp_path / "mine")
    cfg_fpath = tmp_path / "mine" / nn.CONFIG_FNAME
    fields = json.loads(cfg_fpath.read_text())
    (fields["activation"] if field == "keep_negative" else fields)[field] = value
    cfg_fpath.write_text(json.dumps(fields))
    with pytest.raises(sae_files.SaeFileError) as info:
        sae_files.read_sae(tmp_path / "mine")
    msg = str(info.value)
    assert "\n" not in msg and str(cfg_fpath) in msg and f"{field}={value!r}" in msg, msg


@pytest.mark.parametrize("where", ["missing path", "empty directory", "our directory without weights"])
def test_missing_checkpoints_are_refused(tmp_path, where):
    path = tmp_path / "ckpt"
    if where != "missing path":
        path.mkdir()
    if where == "our directory without weights":
        nn.save(nn.SparseAutoencoder(nn.SaeConfig(d_vit=4)), path)
        (path / nn.WEIGHTS_FNAME).unlink()
    with pytest.raises(sae_files.SaeFileError) as info:
        sae_files.read_sae(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("offset", ["header", "tensors"])
def test_a_corrupted_byte_is_refused_or_is_another_sae(tmp_path, offset):
    """A same-size corruption never passes for the original: the file is refused, or its checksum (its key) differs."""
    fpath = write_schema5(tmp_path / "sae.pt", "Relu", 8, 16, _state())
    original = sae_files.read_sae(fpath).checksum
    flip_byte(fpath, 5 if offset == "header" else fpath.stat().st_size - 200)
    try:
        corrupted = sae_files.read_sae(fpath)
    except sae_files.SaeFileError as err:
        assert "\n" not in str(err) and str(fpath) in str(err)
    else:
        assert corrupted.checksum != original


##########
# Export #
##########


def make_sae(activation: nn.Activation, d_vit: int = 8, d_sae: int = 24) -> nn.SparseAutoencoder:
    cfg = (
        nn.SaeConfig(d_vit=d_vit, exp_factor=1, latents=d_sae) if d_sae % d_vit else nn.SaeConfig(d_vit, d_sae // d_vit)
    )
    sae = nn.SparseAutoencoder(cfg, activation)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return sae


@pytest.mark.parametrize("activation", [nn.Relu(), nn.TopK(5), nn.TopK(5, keep_negative=True), nn.JumpRelu(0.2)],
                         ids=["relu", "topk", "topk-keep-negative", "jumprelu"])  # fmt: skip
@pytest.mark.parametrize("d_sae", [24, 13])
def test_export_then_import_gives_the_same_outputs(tmp_path, activation, d_sae):
    sae = make_sae(activation, d_sae=d_sae)
    sae_files.write_saev_pt(sae, tmp_path / "sae.pt")
    back = sae_files.read_sae(tmp_path / "sae.pt")
    assert back.sae.activation == activation and back.sae.cfg.d_sae == d_sae
    x = inputs(8)
    with torch.no_grad():
        want, got = sae(x), back.sae(x)
    f_err, x_err = sae_forward_bounds(sae, x)  # two float32 forwards: each within its bound of the exact one
    assert_within(got.f_BS, want.f_BS, 2 * f_err, "f")
    assert_within(got.x_hat_BD, want.x_hat_BD, 2 * x_err, "x_hat")


@pytest.mark.parametrize(
    "activation,kind", [(nn.Relu(), "relu"), (nn.TopK(5), "topk"), (nn.JumpRelu(0.2), "batchtopk")]
)
def test_export_is_a_saev_schema5_file_with_saevs_forward(tmp_path, activation, kind):
    """The file has saev 2.x's header and tensors, and saev's forward on them gives our SAE's outputs (for TopK: on
    rows whose k largest pre-activations are positive, where both rules agree)."""
    sae = make_sae(activation)
    with torch.no_grad():
        sae.b_enc += 1.0  # every row has at least k positive pre-activations
    fpath = tmp_path / "sae.pt"
    sae_files.write_saev_pt(sae, fpath, top_k=7)
    with open(fpath, "rb") as fd:
        header = json.loads(fd.readline())
        state = torch.load(fd, weights_only=True)
    assert header["schema"] == 5 and set(header) == {"schema", "cfg", "commit", "lib"}
    cfg = header["cfg"]
    assert set(cfg) == {"d_model", "d_sae", "activation", "reinit_blend", "reinit_enc_dec_tranpose",
                        "remove_parallel_grads", "normalize_w_dec"}  # fmt: skip
    assert (cfg["d_model"], cfg["d_sae"]) == (8, 24)
    act = cfg["activation"]
    assert act["cls"] == {"relu": "Relu", "topk": "TopK", "batchtopk": "BatchTopK"}[kind]
    assert act["params"]["key"] == {"relu": "relu", "topk": "top-k", "batchtopk": "batch-top-k"}[kind]
    expected = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"activation.threshold"} if kind == "batchtopk" else set())
    assert set(state) == expected
    if kind == "topk":
        assert act["params"]["top_k"] == 5 and "relu-after-top-k" in header["lib"]
    if kind == "batchtopk":
        assert act["params"]["top_k"] == 7 and float(state["activation.threshold"]) == pytest.approx(0.2)
    x = inputs(8)
    f, x_hat = saev_forward(state, x, kind, top_k=5, threshold=0.2)
    assert_same_outputs(sae, f, x_hat, x)


def test_saevs_own_topk_files_are_not_marked(tmp_path):
    """Only our exports of a ReLU-after-top-k SAE carry the mark; a saev file with "lib" naming another writer keeps
    saev's rule."""
    state = random_state(8, 16)
    header = schema5_header("TopK", 8, 16, top_k=3)
    header["lib"] = "2.1.0 (relu-after-top-k)"
    assert sae_files.read_sae(write_pt(tmp_path / "sae.pt", header, state)).sae.activation.keep_negative


############
# Pipeline #
############


def import_config(cfg: pathlib.Path, imports: str) -> pathlib.Path:
    text = cfg.read_text().replace('sweep = "tiny-sweep.toml"', f'sweep = ""\nimports = {imports}')
    cfg.write_text(text)
    return cfg


def test_imported_saes_score_like_the_native_ones(done_config, copy_of_done, tmp_path):
    """Export the tiny run's two trained SAEs as saev 2.x files, score them instead of a sweep, and get the same
    best latents and APs per class."""
    native_plan = pl.make_plan(pl.load(done_config))
    native = json.loads((native_plan["reduce"].artifacts[0].dpath / "best.json").read_text())
    exported = []
    for i, art in enumerate(native_plan["train"].artifacts):
        sae_files.export_train_artifact(art.dpath, tmp_path / "exports" / f"sae{i}.pt")
        exported.append(str(tmp_path / "exports" / f"sae{i}.pt"))
    cfg = import_config(copy_of_done, json.dumps(exported))
    assert run(cfg) == 0
    plan = pl.make_plan(pl.load(cfg))
    for name in ("dump", "mask"):  # the same activations and keep-mask
        assert [a.key for a in plan[name].artifacts] == [a.key for a in native_plan[name].artifacts]
    imported = json.loads((plan["reduce"].artifacts[0].dpath / "best.json").read_text())
    key_map = {a.key: b.key for a, b in zip(native_plan["train"].artifacts, plan["train"].artifacts, strict=True)}
    assert len(set(key_map.values())) == 2 and not set(key_map) & set(key_map.values())
    for want, got in zip(native["classes"], imported["classes"], strict=True):
        assert (got["name"], got["prototype"], got["dead"]) == (want["name"], want["prototype"], want["dead"])
        assert got["sae"] == key_map.get(want["sae"])
        for field in ("ap", "heldout_ap"):
            assert (got[field] is None) == (want[field] is None)
            if want[field] is not None:
                assert got[field] == pytest.approx(want[field], abs=1e-6)
    for native_key, key in key_map.items():
        want, got = native["per_sae"][native_key], imported["per_sae"][key]
        assert [c["prototype"] for c in got["classes"]] == [c["prototype"] for c in want["classes"]]
        assert got["config"].startswith("imported saev-2-schema5") and got["d_sae"] == want["d_sae"]
    # Each imported SAE is a train artifact: its converted SAE, metrics and where it came from.
    for art in plan["train"].artifacts:
        source = json.loads((art.dpath / "source.json").read_text())
        assert source["format"] == "saev-2-schema5" and source["path"] in exported
        assert set(json.loads((art.dpath / "metrics.json").read_text())) >= {"nmse", "l0", "dead_frac"}
    # Running again does nothing; the same file imported twice is one SAE.
    assert run(cfg) == 0
    cfg.write_text(cfg.read_text().replace(json.dumps(exported), json.dumps(exported + exported[:1])))
    assert [a.key for a in pl.make_plan(pl.load(cfg))["train"].artifacts] == [a.key for a in plan["train"].artifacts]


def test_a_changed_checkpoint_is_a_new_sae(done_config, tiny_config, tmp_path):
    native_plan = pl.make_plan(pl.load(done_config))
    fpath = tmp_path / "sae.pt"
    sae_files.export_train_artifact(native_plan["train"].artifacts[0].dpath, fpath)
    cfg = import_config(tiny_config, json.dumps([str(fpath)]))
    before = pl.make_plan(pl.load(cfg))["train"].artifacts[0].key
    sae_files.export_train_artifact(native_plan["train"].artifacts[1].dpath, fpath)
    assert pl.make_plan(pl.load(cfg))["train"].artifacts[0].key != before


def test_a_checkpoint_changed_after_the_plan_is_refused_by_the_job(done_config, tiny_config, tmp_path):
    from stages import train as train_stage

    native_plan = pl.make_plan(pl.load(done_config))
    fpath = tmp_path / "sae.pt"
    sae_files.export_train_artifact(native_plan["train"].artifacts[0].dpath, fpath)
    pipeline = pl.load(import_config(tiny_config, json.dumps([str(fpath)])))
    plan = pl.make_plan(pipeline)
    sae_files.export_train_artifact(native_plan["train"].artifacts[1].dpath, fpath)
    with pytest.raises(sae_files.SaeFileError, match="changed since the plan"):
        train_stage.run(pipeline, plan["train"], pl.REGISTRY.inputs("train", plan), plan["train"].pieces[0])
    assert not plan["train"].artifacts[0].dpath.exists()


def test_imports_with_a_layer_of_their_own_and_relative_paths(done_config, tiny_config):
    native_plan = pl.make_plan(pl.load(done_config))
    sae_files.export_train_artifact(native_plan["train"].artifacts[0].dpath, tiny_config.parent / "a.pt")
    cfg = import_config(tiny_config, '["a.pt", {path = "a.pt", layer = -2}]')
    plan = pl.make_plan(pl.load(cfg))
    layers = [plan["train"].info[a.key].layer for a in plan["train"].artifacts]
    assert len(layers) == 2 and layers[0] == layers[1] + 1


@pytest.mark.parametrize("case", ["wrong width", "missing", "layer not dumped", "bad file", "nothing to score",
                                  "float64 beyond float32", "meta tensor", "pickle"])  # fmt: skip
def test_bad_imports_are_refused_before_anything_runs(tiny_config, tmp_path, capsys, case):
    fpath = tmp_path / "sae.pt"
    imports, message = json.dumps([str(fpath)]), str(fpath)
    if case in ("float64 beyond float32", "meta tensor", "pickle"):  # caught by --dry-run too, naming the tensor
        REFUSALS[case if case != "pickle" else "pickle after the header"][0](fpath)
        message = (
            f"{fpath}: "
            + {
                "pickle": "the state dict holds pickled objects",
                "meta tensor": "tensor 'W_enc' is on device meta",
                "float64 beyond float32": "tensor 'W_dec' overflows float32",
            }[case]
        )
    elif case == "wrong width":
        write_schema5(fpath, "Relu", 5, 10, random_state(5, 10))
        message = f"{fpath}: the SAE reads width d_model=5"
    elif case == "layer not dumped":
        write_schema5(fpath, "Relu", 32, 64, random_state(32, 64))
        imports, message = f'[{{path = "{fpath}", layer = 0}}]', "train.imports[0].layer=0"
    elif case == "bad file":
        fpath.write_bytes(b'{"schema": 6, "cfg": {}}\n')
        message = f"{fpath}: header field 'schema' is 6"
    elif case == "nothing to score":
        imports, message = "[]", '[train] has no SAEs: sweep = "", methods = "" and no imports'
    cfg = import_config(tiny_config, imports)
    assert run(cfg, dry_run=True) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], errors
    assert not (tiny_config.parent / "runs").exists()


#####################################
# Our model: the fields this added  #
#####################################


def test_latents_sets_d_sae_and_stays_out_of_keys_and_files_while_unset(tmp_path):
    """`SaeConfig.latents` and `TopK.keep_negative` were added without changing any earlier key or sae.json."""
    assert artifacts.hashed_params(nn.SaeConfig(d_vit=8)) == {
        "__class__": "SaeConfig",
        "d_vit": 8,
        "exp_factor": 8,
        "seed": 0,
    }
    assert artifacts.hashed_params(nn.SaeConfig(d_vit=8, latents=13))["latents"] == 13
    assert nn.activation_to_json(nn.TopK(4)) == {"kind": "topk", "k": 4}
    assert nn.activation_from_json(nn.activation_to_json(nn.TopK(4, keep_negative=True))) == nn.TopK(
        4, keep_negative=True
    )
    sae = nn.SparseAutoencoder(nn.SaeConfig(d_vit=8, exp_factor=1, latents=13), nn.TopK(4, keep_negative=True))
    assert {k: tuple(v.shape) for k, v in sae.state_dict().items()} == {
        "W_enc": (8, 13), "b_enc": (13,), "W_dec": (13, 8), "b_dec": (8,)
    }  # fmt: skip
    nn.save(sae, tmp_path)
    assert json.loads((tmp_path / "sae.json").read_text())["latents"] == 13
    assert nn.load(tmp_path).activation == nn.TopK(4, keep_negative=True)
    with pytest.raises(ValueError, match="latents must be positive"):
        nn.SaeConfig(d_vit=8, latents=0)


def test_a_header_with_nan_is_refused(tmp_path):
    fpath = tmp_path / "sae.pt"
    fpath.write_bytes(b'{"schema": 5, "cfg": {"d_model": NaN}}\n')
    with pytest.raises(sae_files.SaeFileError, match="header line is not JSON"):
        sae_files.read_sae(fpath)


def test_a_saev_topk_sae_is_scored_with_saevs_own_latents(copy_of_done, tmp_path):
    """End to end, an imported saev 2.x TopK SAE (d_sae not a multiple of the width; most pre-activations negative, so
    kept latents can be negative) gets, per class, the best AP and latent that scikit-learn gives on saev's own forward
    over the kept patches."""
    from sklearn.metrics import average_precision_score

    from saev import vit
    from stages import score as score_stage

    d_model, d_sae, k = vit.get_d_vit("saev-tiny-vit"), 50, 5
    state = random_state(d_model, d_sae, seed=5, b_enc_shift=-1.0)
    state["W_enc"] *= 0.05  # pre-activations of order 0.3 below a bias of -1: rows with fewer than k positive ones
    fpath = write_schema5(tmp_path / "theirs" / "sae.pt", "TopK", d_model, d_sae, state, top_k=k)
    cfg = import_config(copy_of_done, json.dumps([str(fpath)]))
    assert run(cfg) == 0
    plan = pl.make_plan(pl.load(cfg))
    (train_art,) = plan["train"].artifacts
    best = json.loads((plan["reduce"].artifacts[0].dpath / "best.json").read_text())
    (kept_art,) = plan["kept"].artifacts
    acts_ND, labels_N = score_stage.load_kept(plan["dump"].artifact, plan["mask"].artifact, kept_art)
    f_NK, _ = saev_forward(state, torch.tensor(acts_ND), "topk", top_k=k)
    assert (f_NK < 0).any()
    scores_NK = f_NK.float().numpy()  # scored in float32, as the pipeline scores
    for c, row in enumerate(best["per_sae"][train_art.key]["classes"]):
        positive_N = labels_N == c
        if not positive_N.any():
            assert row["ap"] is None
            continue
        ap_K = [average_precision_score(positive_N, scores_NK[:, j]) for j in range(d_sae)]
        assert row["ap"] == pytest.approx(max(ap_K), abs=1e-6), row["name"]
        assert ap_K[row["prototype"]] == pytest.approx(max(ap_K), abs=1e-6)


def test_export_writes_every_sae_of_a_run(done_config, tiny_config, tmp_path):
    """`stages.export.export_saes` (for `launch.py --export`): one saev file per SAE, importable to the same SAE."""
    from stages import export

    plan = pl.make_plan(pl.load(done_config))
    lines = export.export_saes(plan, tmp_path / "out")
    written = [tmp_path / "out" / a.key / "sae.pt" for a in plan["train"].artifacts]
    assert lines == [f"sae {a.ref}: {f}" for a, f in zip(plan["train"].artifacts, written, strict=True)]
    x = inputs(plan["train"].info[plan["train"].artifacts[0].key].config.sae.d_vit)
    for art, fpath in zip(plan["train"].artifacts, written, strict=True):
        native = nn.load(art.dpath)
        with torch.no_grad():
            got, want = sae_files.read_sae(fpath).sae(x).f_BS, native(x).f_BS
        assert_within(got, want, 2 * sae_forward_bounds(native, x)[0], str(fpath))
    with pytest.raises(artifacts.IncompleteArtifactError, match="not done"):
        export.export_saes(pl.make_plan(pl.load(tiny_config)), tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


@pytest.mark.parametrize(
    "params,top_k", [({"sae": {"objective": {"k": 12}}}, 12), ({"import": {"top_k": 9}}, 9), ({}, 32)]
)
def test_an_exported_jumprelu_sae_names_the_k_it_was_trained_with(tmp_path, params, top_k):
    """BatchTopK's k only matters to saev's training, but an export says what it was when the manifest records it
    (a native batchtopk SAE's objective, or the file it was imported from), else saev's default."""
    nn.save(make_sae(nn.JumpRelu(0.1)), tmp_path / "art")
    (tmp_path / "art" / "manifest.json").write_text(json.dumps({"params": params}))
    sae_files.export_train_artifact(tmp_path / "art", tmp_path / "sae.pt")
    header = sae_files.read_sae(tmp_path / "sae.pt").header
    assert header["cfg"]["activation"]["params"]["top_k"] == top_k
