"""The results of a finished run, for notebooks: the best latent ("prototype") of every class, its SAE, its
activations on new images and its top patches on the dump.

This module owns reading a run back: `load_reduce` takes a reduce artifact's directory and returns `Results`: `best.json` as typed records (`ClassResult`) with the artifacts they came
from, found through the manifests (reduce -> dump, mask, score -> train). Everything else is the library's:
`saev.nn.load` reads the SAE, `saev.vit.make_vit` and `saev.data.datasets.resize_image` prepare new images as the
dump did, `saev.keepmask` reads the masks and `saev.scoring.encode_block` scores patches.

Locating a run by its config needs the pipeline's keys: that is `stages.results.load`, which also serves everything
here under one import for notebooks (the library never imports the stages).
"""

import dataclasses
import os
import pathlib
import typing
from collections.abc import Sequence

import beartype
import numpy as np
import torch
from jaxtyping import Float, jaxtyped
from PIL import Image

from saev import artifacts, configs, keepmask, nn, scoring
from saev import best as best_
from saev import vit as vits
from saev.data import datasets
from saev.data.shards import Shards

PatchSet = typing.Literal["keep", "heldout", "all"]
"""Which patches of the dump `top_patches` ranks: the kept ones (that chose the latent), the held-out ones, or every
patch of every image (labelled or not)."""

_DATA_CONFIGS = {cls.__name__: cls for cls in (datasets.Synthetic, datasets.SegFolder, datasets.ClassFolder)}
"""Dataset config classes by the `__class__` name recorded in a dump's params."""

_BATCH = 4096
"""Patches per SAE encoder matmul when scoring the dump (memory only)."""


class ResultsError(artifacts.IncompleteArtifactError):
    """A run cannot be read back: its reduce (or an input of it) is not done, or a file is not what the pipeline
    writes. The message names the artifact or file and what to do."""


@dataclasses.dataclass(frozen=True)
class ClassResult(best_.ClassBest):
    """One class of `best.json` (`saev.best.ClassBest`: its best latent over the sweep and that latent's AP) and its
    class id."""

    index: int
    """Class id (its position in `Results.classes`)."""


@dataclasses.dataclass(frozen=True)
class Prototype:
    """A class's chosen latent with the SAE it belongs to."""

    cls: ClassResult
    """The class it was chosen for."""
    sae: nn.SparseAutoencoder
    """The SAE (`saev.nn.load` of its train artifact), in eval mode."""
    latent: int
    """Index of the latent in `sae`."""
    layer: int
    """ViT block (non-negative index) whose patch activations the SAE reads."""


@dataclasses.dataclass(frozen=True)
class TopPatch:
    """One patch of the dump and the prototype's activation on it."""

    image: int
    """Image index in the dataset (and the dump)."""
    row: int
    """Patch row in the image's patch grid (0 at the top)."""
    col: int
    """Patch column (0 at the left)."""
    activation: float
    """The latent's activation on this patch."""
    label: str | None
    """Class name of the patch's label; None for an unlabelled patch."""
    name: str | None
    """The image's name in the dataset (file stem, or `synthetic-000042`); None when not asked for."""


@dataclasses.dataclass(frozen=True)
class Results:
    """A finished run: the per-class table of its reduce artifact and the artifacts it was computed from."""

    classes: tuple[ClassResult, ...]
    """One record per class, in class-id order (the rows of `best.json`)."""
    n_patches: int
    """Kept patches (the selection set)."""
    n_heldout: int
    """Held-out patches."""
    reduce: artifacts.Artifact
    """The reduce artifact: `best.json`, `best.csv`, `report/index.html`."""
    dump: artifacts.Artifact
    """The dump the SAEs were trained and scored on (activations, labels)."""
    mask: artifacts.Artifact
    """The keep-mask artifact (`keep.npy`, `heldout.npy`)."""
    saes: tuple[artifacts.Artifact, ...]
    """The train artifacts of the sweep, in sweep order (one SAE each)."""
    layers: dict[str, int]
    """Train key -> the ViT block its SAE reads."""
    vit: vits.VitConfig
    """The ViT of the dump (model, weights, layers, dtype)."""
    data: datasets.Synthetic | datasets.SegFolder | datasets.ClassFolder
    """The dataset config of the dump."""

    @property
    def best_fpath(self) -> pathlib.Path:
        """`best.json` of the reduce artifact."""
        return self.reduce.dpath / "best.json"

    @property
    def report_fpath(self) -> pathlib.Path:
        """The HTML report (present when `[reduce] report = true`)."""
        return self.reduce.dpath / "report" / "index.html"

    @property
    def resize(self) -> datasets.ResizeMode:
        """How the dump brought images to the model's square input (the synthetic images are square: stretched)."""
        return getattr(self.data, "resize", "stretch")

    def get_class(self, cls: str | int) -> ClassResult:
        """The record of class `cls`, by name or class id."""
        if isinstance(cls, int):
            if not 0 <= cls < len(self.classes):
                raise IndexError(f"class id {cls} is not within [0, {len(self.classes)})")
            return self.classes[cls]
        for row in self.classes:
            if row.name == cls:
                return row
        names = ", ".join(row.name for row in self.classes)
        hint = configs.closest(cls, [row.name for row in self.classes])
        raise KeyError(f"no class {cls!r} in {self.best_fpath}{hint} (classes: {names})")

    def shards(self) -> Shards:
        """The dump's activations and labels (checked as the stages read them)."""
        return Shards(self.dump.dpath)

    def dataset(self) -> datasets.Dataset:
        """The dump's dataset, opened from its config (a folder dataset must still be where it was dumped from)."""
        return datasets.make_dataset(self.data)


########
# Load #
########


@beartype.beartype
def load_reduce(dpath: str | os.PathLike) -> Results:
    """The results in the reduce artifact `dpath` (`<root>/reduce/<key>/`), with the artifacts named by its manifest.

    Raises:
        ResultsError: it or one of its inputs is not done, or a file is not what the pipeline writes.
    """
    dpath = pathlib.Path(dpath).resolve()
    root = dpath.parent.parent
    reduce_art = _done(artifacts.Artifact(root, dpath.parent.name, dpath.name))
    if reduce_art.stage != "reduce":
        raise ResultsError(f"{dpath} is not a reduce artifact (`<root>/reduce/<key>/`)")
    inputs = reduce_art.read_manifest().get("inputs", {})
    dump_art = _done(_input(reduce_art, inputs, "dump"))
    mask_art = _done(_input(reduce_art, inputs, "mask"))
    saes, layers = [], {}
    for name in sorted(k for k in inputs if k.startswith("score")):
        score_art = _done(_input(reduce_art, inputs, name))
        train_art = _done(_input(score_art, score_art.read_manifest().get("inputs", {}), "sae"))
        saes.append(train_art)
        layers[train_art.key] = _field(train_art, ("layer",), int)

    vit_cfg = _config(dump_art, vits.VitConfig, _field(dump_art, ("vit",), dict))
    data = _field(dump_art, ("data",), dict)
    data_cls = _DATA_CONFIGS.get(data.get("__class__"))
    if data_cls is None:
        raise ResultsError(
            f"{dump_art.manifest_fpath}: params.data names no known dataset config ({data.get('__class__')!r})"
        )

    best_fpath = reduce_art.dpath / "best.json"
    try:
        best = best_.read(best_fpath)
    except OSError as err:
        raise ResultsError(f"{best_fpath} is not a best.json of this version ({type(err).__name__}: {err})") from None
    except ValueError as err:  # names the file
        raise ResultsError(str(err)) from None
    fields = best_.fields(best_.ClassBest)
    classes = tuple(ClassResult(index=c, **{k: getattr(row, k) for k in fields}) for c, row in enumerate(best.classes))
    n_patches, n_heldout = best.n_patches, best.n_heldout
    return Results(
        classes=classes,
        n_patches=n_patches,
        n_heldout=n_heldout,
        reduce=reduce_art,
        dump=dump_art,
        mask=mask_art,
        saes=tuple(saes),
        layers=layers,
        vit=vit_cfg,
        data=_config(dump_art, data_cls, data),
    )


def _done(art: artifacts.Artifact) -> artifacts.Artifact:
    """`art`, or a ResultsError if it is not done (no manifest, a file missing or of the wrong size)."""
    if not art.is_done():
        raise ResultsError(f"{art.dpath} is not done; run `launch.py --stage {art.stage}` with its config")
    return art


def _input(art: artifacts.Artifact, inputs: dict, name: str) -> artifacts.Artifact:
    """The input `name` (a `stage/key` in the manifest of `art`) as an artifact of the same root."""
    ref = inputs.get(name)
    if not isinstance(ref, str) or ref.count("/") != 1:
        raise ResultsError(f"{art.manifest_fpath}: inputs.{name} is {ref!r}, expected 'stage/key'")
    stage, key = ref.split("/")
    return artifacts.Artifact(art.root, stage, key)


def _field(art: artifacts.Artifact, path: tuple[str, ...], tp: type) -> typing.Any:
    """The value at `params.<path>` of the manifest of `art`, checked to be a `tp`."""
    value: typing.Any = art.read_manifest().get("params")
    for name in path:
        value = value.get(name) if isinstance(value, dict) else None
    if not isinstance(value, tp):
        raise ResultsError(f"{art.manifest_fpath}: params.{'.'.join(path)} is {value!r}, expected a {tp.__name__}")
    return value


def _config(art: artifacts.Artifact, cls: type, params: dict) -> typing.Any:
    """The config `cls` from its hashed params in the manifest of `art` (`artifacts.hashed_params` in reverse: the
    unhashed fields, which change no result, take their defaults)."""
    fields = {k: v for k, v in params.items() if k != "__class__"}
    try:
        return configs.from_dict(cls, fields, where=str(art.manifest_fpath))
    except configs.ConfigError as err:
        raise ResultsError(str(err)) from None


##############
# Prototypes #
##############


@beartype.beartype
def get_prototype(results: Results, cls: str | int, device: str | torch.device = "cpu") -> Prototype:
    """The chosen latent of class `cls` (name or id) and its SAE, loaded on `device`.

    Raises:
        ValueError: the class had no kept patches, so no latent was chosen.
    """
    row = results.get_class(cls)
    if row.sae is None or row.prototype < 0:
        raise ValueError(f"class {row.name!r} has no chosen latent (no kept patches of it in {results.mask.dpath})")
    train_art = artifacts.Artifact(results.reduce.root, "train", row.sae)
    sae = nn.load(train_art.dpath, device=device).eval()
    return Prototype(cls=row, sae=sae, latent=row.prototype, layer=results.layers[row.sae])


@jaxtyped(typechecker=beartype.beartype)
def activations(
    results: Results,
    cls: str | int,
    images: Sequence[Image.Image | str | os.PathLike],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> Float[np.ndarray, "n side side"]:
    """The activation of class `cls`'s prototype on every patch of new images, as float32 [n_images, side, side].

    Each image goes through the dump's ViT as the dump's images did: read upright (a path; as the folder datasets
    read files), brought to the model's square input by the dataset's resize mode (`Results.resize`), normalised,
    and the SAE's layer recorded; then the prototype latent is encoded for every patch.

    Args:
        results: a run (`load`).
        cls: class name or id.
        images: PIL images or image file paths.
        device: where the ViT and the SAE run.
        batch_size: images per ViT forward pass (memory only).
    """
    device = torch.device(device)
    proto = get_prototype(results, cls, device)
    model = vits.make_vit(dataclasses.replace(results.vit, layers=(proto.layer,)), device)
    out = np.empty((len(images), model.n_side, model.n_side), dtype=np.float32)
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        pixels_B3SS = np.stack([
            datasets.resize_image(_open(image), model.img_size, results.resize) for image in batch
        ])  # fmt: skip
        acts_BLTD = model(model.normalize(pixels_B3SS))
        acts_BPD = acts_BLTD[:, 0, int(results.vit.cls_token) :, :].cpu().numpy()
        scores_N1 = scoring.encode_block(
            proto.sae, acts_BPD.reshape(-1, acts_BPD.shape[-1]), proto.latent, proto.latent + 1,
            batch_size=_BATCH, device=device,
        )  # fmt: skip
        out[start : start + len(batch)] = scores_N1[:, 0].cpu().numpy().reshape(len(batch), model.n_side, model.n_side)
    return out


def _open(image: Image.Image | str | os.PathLike) -> Image.Image:
    """A PIL image as given, or an image file read upright as 8-bit RGB (errors name the file)."""
    if isinstance(image, Image.Image):
        return image
    return datasets.read_image(pathlib.Path(image))


@beartype.beartype
def top_patches(
    results: Results,
    cls: str | int,
    k: int = 10,
    *,
    patches: PatchSet = "keep",
    names: bool = True,
    device: str | torch.device = "cpu",
) -> list[TopPatch]:
    """The `k` patches of the dump where class `cls`'s prototype fires hardest, highest first (equal activations:
    the earlier patch first).

    Args:
        results: a run (`load`).
        cls: class name or id.
        k: how many patches.
        patches: rank the kept patches (that chose the latent; checked as the score stage reads them), the held-out
            ones, or every patch of the dump.
        names: look up each image's name in the dataset (a folder dataset must still be where it was dumped from).
        device: where the SAE runs.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    device = torch.device(device)
    proto = get_prototype(results, cls, device)
    shards = results.shards()
    md = shards.metadata
    if patches == "all":
        idx = np.arange(md.n_imgs * md.n_patches_per_img, dtype=np.int64)
    else:
        masks = keepmask.load_for_dump(results.mask.dpath, shards)
        idx = masks.keep if patches == "keep" else masks.heldout
    scores_N = np.empty(len(idx), dtype=np.float32)
    for start in range(0, len(idx), _BATCH):
        acts_BD = shards.patches_flat(proto.layer, idx[start : start + _BATCH])
        scores_B1 = scoring.encode_block(
            proto.sae, acts_BD, proto.latent, proto.latent + 1, batch_size=_BATCH, device=device
        )
        scores_N[start : start + len(acts_BD)] = scores_B1[:, 0].cpu().numpy()
    order = np.argsort(-scores_N, kind="stable")[:k]
    _, n_side = vits.get_patch_grid(results.vit)
    flat_labels = np.asarray(shards.labels).reshape(-1)
    dataset = results.dataset() if names else None
    out = []
    for i in order:
        img, patch = divmod(int(idx[i]), md.n_patches_per_img)
        label = int(flat_labels[idx[i]])
        out.append(
            TopPatch(
                image=img,
                row=patch // n_side,
                col=patch % n_side,
                activation=float(scores_N[i]),
                label=results.classes[label].name if 0 <= label < len(results.classes) else None,
                name=dataset[img].name if dataset is not None else None,
            )
        )
    return out
