"""dump: images -> ViT activations in saev's shard protocol, plus per-patch class labels.

Output `<root>/dump/<key>/`: `metadata.json`, `shards.json`, `acts%06d.bin` (float32 [image, layer, token, dim]) and
`labels.bin` ([image, patch] class ids, majority class of the mask pixels in each patch).

The image range is split into shard-aligned chunks of `shards_per_job` shards, one piece of work each (one task of a
job array on Slurm, run in order locally). A chunk writes whole shards, each followed by its labels in
`parts/labels%06d.npy`; a killed chunk resumes at its first shard without labels, so finished shards are never
rewritten (the chunk holding the last image pads the last shard to full size). When every chunk is done, the labels
are joined into labels.bin and the index files and manifest are written.

With `[dump.adopt]` an existing saev shard directory (v1 or 2.x layout) is the dump instead: one piece links its
files into the artifact, hashes them once and writes our translated metadata (`saev.data.saevfmt`); nothing is
computed, copied or written in the source directory. Its key hashes the source's metadata.json, shards.json, the label
settings and the sizes and modification times of its files (`source_fingerprint`), not its path.
"""

import concurrent.futures
import dataclasses
import json
import logging
import pathlib
import typing

import numpy as np

from saev import artifacts, atomic, checksums, configs, helpers, slurm
from saev import overlap as overlap_steps
from saev import vit as vits
from saev.data import datasets, labels, saevfmt, shards
from saev.engine.plan import Piece, StagePlan

from .graph import DumpInfo

if typing.TYPE_CHECKING:
    from .pipeline import Pipeline

NAME = "dump"
VERSION = 2  # 2: synthetic images rendered in batches (new pixels)
ADOPT_VERSION = 3
"""The format version in an adopted dump's key, instead of `VERSION` (so that dumps made here keep theirs). 3: the key
covers the source's file listing (sizes and modification times), which `dataset.json` holds."""
DATASET_FILES = "dataset.json"
"""Folder datasets and adopted dumps: the listing the dump was made from (path -> [size, mtime_ns]) and its digest (in
the key)."""

logger = logging.getLogger("stages.dump")


class Inputs(typing.NamedTuple):
    """The dump reads no other stage."""


@dataclasses.dataclass(frozen=True)
class Adopt:
    """An existing saev shard directory (v1 protocol "1.0.0" or 2.x protocol "2.1") used in place as the dump."""

    shards: pathlib.Path
    """The shard directory (metadata.json, shards.json, acts000000.bin..., optional labels.bin); relative to the config's directory."""
    class_names: tuple[str, ...] = ()
    """Class names: label i of labels.bin is class_names[i] (saev's files name no classes); or give `classes`."""
    classes: pathlib.Path | None = None
    """A classes.txt (one class name a line) instead of `class_names`; relative to the config's directory."""
    ignore: int | None = None
    """The label of unlabelled patches in labels.bin; not set: 255, or the labels.json value of an adopted dump of this pipeline (-1 for int16 labels). Must fit the labels dtype and not be a class id (checked when planned)."""

    def __post_init__(self):
        if self.class_names and self.classes is not None:
            raise ValueError("dump.adopt: give class_names or classes, not both")
        if fault := labels.class_names_fault(self.class_names):
            raise ValueError(f"class_names {fault}")


@dataclasses.dataclass(frozen=True)
class Config:
    """Which images go through which ViT, and how activations are stored; or an existing dump to adopt."""

    data: datasets.DatasetConfig = datasets.Synthetic()
    """The one dataset of a one-dataset config: the built-in synthetic demo (kind = "synthetic"), images + masks (kind = "segfolder"), class subfolders (kind = "classfolder", every patch labelled with its image's class) or unlabelled images (kind = "imagefolder"). It is every role at once (see `Roles`); leave it out when the config has `[data.*]` roles."""
    vit: vits.VitConfig = vits.VitConfig()
    """The ViT (open_clip, or timm as "timm:<name>") and the layers recorded."""
    max_patches_per_shard: int = 2_400_000
    """Shard size budget in activation vectors (saev protocol); ~10 GiB shards at d_vit=1024."""
    prefer_fg: bool = False
    """Label a patch with its most common non-background class when it has any foreground pixel."""
    shards_per_job: int = artifacts.unhashed(4)
    """Shards written by one dump job (one job-array task on Slurm); more jobs finish sooner on a cluster."""
    batch_size: int = artifacts.unhashed(64)
    """Images per ViT forward pass (memory only)."""
    n_workers: int = artifacts.unhashed(2)
    """Threads that load and resize images of the folder datasets (decoding releases the GIL)."""
    prepare_mib: int = artifacts.unhashed(64)
    """Images prepared ahead of the forward passes (uint8, at the model's input size), in MiB; whole batches, at least one."""
    overlap: bool = artifacts.unhashed(True)
    """Prepare the next batches (read, decode, resize, label) and write the previous one on threads while the model runs; false: one step after the other (the same files, slower)."""
    device: str = artifacts.unhashed("auto")
    """'auto' (CUDA when available), 'cpu' or 'cuda'."""
    adopt: Adopt | None = artifacts.unhashed(None)
    """Use an existing saev shard directory as the dump ([dump.adopt]); then data, vit, max_patches_per_shard and prefer_fg must be left out (the source's metadata says what they were). Its key comes from the source's metadata, not from these fields."""

    def __post_init__(self):
        for name in ("max_patches_per_shard", "shards_per_job", "batch_size", "n_workers", "prepare_mib"):
            if getattr(self, name) <= 0:
                raise ValueError(f"dump.{name} must be positive, got {getattr(self, name)}")
        if self.adopt is not None:
            given = [name for name in ("data", "vit", "max_patches_per_shard", "prefer_fg")
                     if getattr(self, name) != _DEFAULTS[name]]  # fmt: skip
            if given:
                raise ValueError(
                    f"dump.adopt uses an existing dump, so dump.{given[0]} would not be used: remove it "
                    "(the adopted dump's metadata.json says which model, layers and images it holds)"
                )


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config) if f.default is not dataclasses.MISSING}


@dataclasses.dataclass(frozen=True)
class Roles:
    """Datasets by role (`[data.corpus]`, `[data.select]`, `[data.report]`, optional `[data.corpus_eval]`), each
    dumped through the same `[dump.vit]` model and layers as its own dump artifact (the same dataset config is the
    same artifact, shared by key between configs and roles).

    A one-dataset config (`[dump.data]` or `[dump.adopt]`) is every role at once: the SAEs are fit on the whole dump,
    the keep-mask's kept patches select the latents and its held-out patches (`mask.n_heldout`) report them."""

    corpus: datasets.DatasetConfig
    """What SAEs are fit on; may be unlabelled (kind = "imagefolder")."""
    select: datasets.DatasetConfig
    """Labelled train split: the keep-mask (`mask.n_keep`, or "all") is drawn here and every latent is scored on it to
    choose each class's latent."""
    report: datasets.DatasetConfig
    """Labelled val split, scored whole (every labelled patch): every reported figure comes from here. Same class names,
    in the same order, as `select`."""
    corpus_eval: datasets.DatasetConfig | None = None
    """Where the SAEs' NMSE and L0 are measured (e.g. ImageNet val); left out: the last `n_eval` rows of the corpus
    (held out of training), as in a one-dataset config."""


ROLES = ("corpus", "corpus_eval", "select", "report")
"""The roles, in the order their dumps are planned."""


def role_datasets(pipeline: "Pipeline") -> dict[str, datasets.DatasetConfig]:
    """Role -> dataset config ([data.*] roles; a one-dataset config: `dump.data` for corpus, select and report)."""
    if pipeline.data is None:
        return {"corpus": pipeline.dump.data, "select": pipeline.dump.data, "report": pipeline.dump.data}
    return {role: getattr(pipeline.data, role) for role in ROLES if getattr(pipeline.data, role) is not None}


def check_roles(pipeline: "Pipeline") -> None:
    """Refuse role settings that cannot give a trustworthy answer, before anything is planned: [data.*] roles with
    [dump.data] or [dump.adopt], a select or report split without labels, the same dataset to select and report."""
    roles = pipeline.data
    if roles is None:
        return
    if pipeline.dump.adopt is not None:
        raise configs.ConfigError(
            "[data.*] roles and [dump.adopt] cannot be combined: an adopted dump is a one-dataset config (corpus, "
            "select and report at once); remove one of them"
        )
    if pipeline.dump.data != _DEFAULTS["data"]:
        raise configs.ConfigError(
            "[dump.data] and [data.*] roles both name datasets: give one dataset as [dump.data], or every role as "
            "[data.corpus], [data.select] and [data.report] (see docs/data.md)"
        )
    if roles.select == roles.report:
        raise configs.ConfigError(
            "data.select and data.report are the same dataset: the reported figures would be measured on the patches "
            "that chose the latents. Give the val split as data.report, or use a one-dataset config ([dump.data]) "
            "with mask.n_heldout to hold patches out of the selection"
        )


def make_metadata(cfg: Config, dataset: datasets.Dataset) -> shards.Metadata:
    """The metadata of the dump of `dataset` (its config `dataset.cfg`) through `cfg`'s model, from the configs and the
    dataset alone (no model is built)."""
    img_size, n_side = vits.get_patch_grid(cfg.vit)
    n_classes = len(dataset.class_names)
    labels_dtype = "uint8" if n_classes < 255 else "int16"
    return shards.Metadata(
        vit_family=cfg.vit.family,
        vit_ckpt=f"{cfg.vit.model}:{cfg.vit.pretrained or f'random-init-seed-{cfg.vit.init_seed}'}",
        layers=vits.resolve_layers(cfg.vit, cfg.vit.layers),
        n_patches_per_img=n_side * n_side,
        cls_token=cfg.vit.cls_token,
        d_vit=vits.get_d_vit(cfg.vit),
        n_imgs=len(dataset),
        max_patches_per_shard=cfg.max_patches_per_shard,
        data=dict(artifacts.hashed_params(dataset.cfg)),
        labels_dtype=labels_dtype,
        labels_ignore=255 if labels_dtype == "uint8" else -1,
        class_names=tuple(dataset.class_names),
    )


def labels_part_fpath(art: artifacts.Artifact, shard: int) -> pathlib.Path:
    return art.dpath / "parts" / f"labels{shard:06d}.npy"


def shard_files(art: artifacts.Artifact, shard: int) -> tuple[pathlib.Path, pathlib.Path]:
    """The files one shard of a chunk leaves: its activations, then its labels part (written last: marks it done)."""
    return art.dpath / shards.shard_name(shard), labels_part_fpath(art, shard)


def shard_done(art: artifacts.Artifact, shard: int) -> bool:
    """Both files of the shard exist with the sizes they were written with."""
    return all(checksums.is_intact(f) for f in shard_files(art, shard))


def read_adopted(pipeline: "Pipeline") -> saevfmt.Source:
    """The `[dump.adopt]` source directory, read and checked (sizes and shapes), with the class names of the config."""
    cfg: Adopt = pipeline.dump.adopt
    class_names = cfg.class_names
    if cfg.classes is not None:
        class_names = datasets.read_class_names(pipeline.config_dpath / cfg.classes)
    check_adopt_outside_store(pipeline.config_dpath / cfg.shards, pipeline.root)
    return saevfmt.read_source(pipeline.config_dpath / cfg.shards, class_names=tuple(class_names), ignore=cfg.ignore)


def check_adopt_outside_store(shards_dpath: pathlib.Path, root: pathlib.Path) -> None:
    """Refuse a `[dump.adopt] shards` directory inside the artifact store (the adopted artifact itself, or any
    `<root>/<stage>/<key>/`): adopting replaces each file of `<root>/dump/<key>/` by a link to the source's file, so a
    source there turns the links into links to themselves ("Too many levels of symbolic links" on the next run).

    Raises:
        ConfigError: one line naming the directory and the store root.
    """
    src, store = shards_dpath.expanduser().resolve(), root.expanduser().resolve()
    if src.is_relative_to(store):
        raise configs.ConfigError(
            f"dump.adopt.shards: {shards_dpath} is inside the artifact store {store}; adopting it would link the "
            "store's files to themselves: adopt the original directory, or one exported with launch.py --export OUT "
            "(OUT/saev/shards/<dir>)"
        )


def source_fingerprint(source: saevfmt.Source) -> datasets.Fingerprint:
    """Every file of the adopted directory that adopting reads or links, by size and modification time (nothing is
    read): in the key, so that a source edited since (even at the same size) is a new dump, and everything made from
    it is computed again. A directory moved or copied with its modification times (`mv`, `cp -a`, `rsync -a`) keeps
    its key; one copied without them (`cp -r`) gets a new one."""
    return datasets._make_fingerprint("adopted", (), source.dpath, [source.dpath / n for n in source.read_names], None)


def adopted_from(art: artifacts.Artifact) -> pathlib.Path | None:
    """The directory an adopted dump artifact links to (its source.json), or None if it has none readable."""
    try:
        return pathlib.Path(json.loads((art.dpath / saevfmt.SOURCE_JSON).read_text())["dpath"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclasses.dataclass(frozen=True)
class AdoptPiece(Piece):
    """The one piece of an adopted dump: done when its artifact is done and links to the configured directory (a done
    artifact that links to the directory it was adopted from, moved or copied since, is relinked by the job)."""

    source: pathlib.Path | None = None
    """The configured source directory (resolved)."""

    def is_done(self) -> bool:
        return super().is_done() and adopted_from(self.artifact) in (None, self.source)


def plan_adopted(pipeline: "Pipeline") -> StagePlan[DumpInfo]:
    """One piece that links the source's files into the artifact; keyed by the source's metadata and shard list, the
    label settings and the source's file listing (`source_fingerprint`). Nothing is written (a relink is the job's)."""
    source = read_adopted(pipeline)
    md = source.metadata
    fingerprint = source_fingerprint(source)
    params = {
        "adopt": {"metadata": source.raw_metadata, "shards": source.raw_shards, "labels": source.has_labels,
                  "class_names": list(md.class_names), "ignore": md.labels_ignore},
        "dataset_files": fingerprint.digest,  # as a folder dataset's: `explain` names the files that changed
    }  # fmt: skip
    art = artifacts.Artifact(pipeline.root, NAME, artifacts.get_key(NAME, ADOPT_VERSION, params, {}))
    old = adopted_from(art)
    if art.is_done() and old not in (None, source.dpath):
        label = f"relink {old} -> {source.dpath} (moved or copied)"
    else:
        label = f"adopt {source.dpath} (saev protocol {source.protocol})"
    piece = AdoptPiece(NAME, art, label=label, source=source.dpath)
    info = DumpInfo(
        chunks={},
        fingerprint=fingerprint,
        n_patches=md.n_imgs * md.n_patches_per_img,
        layers=md.layers,
        d_vit=md.d_vit,
        has_labels=source.has_labels,
        adopted=source.dpath,
        roles=("corpus", "select", "report"),
        class_names=md.class_names,
    )
    return StagePlan(NAME, (art,), (piece,), {art.key: params}, {art.key: {}}, {art.key: info})


def relink(art: artifacts.Artifact, source: saevfmt.Source, params: dict) -> None:
    """Relink a done adopted dump to the configured directory, a move or copy of the one it links to (the same key:
    the same metadata.json, shards.json, sizes and modification times), if each file there has the checksum recorded
    when it was adopted (a file whose stat signature is the one last verified is not read), else refuse. The job
    runs it, under the artifact's lock: the artifact never silently keeps reading the old directory.

    Raises:
        ShardError: one line naming the first file of the configured directory that differs, and what to do.
    """
    old_dpath = adopted_from(art)
    manifest = art.read_manifest()
    verified = art.verified_sigs()
    records = {}
    for rel in source.linked:
        entry, fpath = manifest["files"][rel], source.dpath / rel
        st = fpath.stat()
        sig = checksums.stat_sig(st)
        digest = entry[checksums.CHECKSUM] if sig == verified.get(rel) else checksums.file_checksum(fpath)
        why = (f"has {st.st_size} bytes, {entry['size']} recorded" if st.st_size != entry["size"]
               else "has another checksum" if digest != entry[checksums.CHECKSUM] else None)  # fmt: skip
        if why is not None:
            raise shards.ShardError(
                f"{fpath} {why}: it differs from {old_dpath / rel}, adopted as {art.ref} with the same size and "
                f"modification time; set dump.adopt.shards back to {old_dpath}, or `touch {fpath}` to adopt "
                f"{source.dpath} as a new dump (a new key: everything made from it is computed again)"
            )
        records[rel] = (st.st_size, digest, sig)
    for rel, (size, digest, sig) in records.items():  # what was verified above, so sealing need not hash again
        saevfmt.link_atomically(source.dpath / rel, art.dpath / rel)
        checksums.write_record(art.dpath / rel, size, digest, sig)
    old = json.loads((art.dpath / saevfmt.SOURCE_JSON).read_text())
    atomic.atomic_write_json(art.dpath / saevfmt.SOURCE_JSON, {**old, "dpath": str(source.dpath)})
    art.write_manifest(
        params=params, inputs={}, started=manifest.get("started", artifacts.now()),
        extra={"adopted": str(source.dpath), "protocol": source.protocol},
    )  # fmt: skip
    logger.info("%s: relinked from %s to %s (same files)", art.ref, old_dpath, source.dpath)


def plan(pipeline: "Pipeline", inputs: Inputs) -> StagePlan[DumpInfo]:
    """One artifact per distinct dataset of the roles (`role_datasets`), in role order; its record lists the roles it
    plays. A dataset's key hashes the dump settings with that dataset in `data`, so a one-dataset config and a role
    naming the same dataset share the dump."""
    cfg: Config = pipeline.dump
    check_roles(pipeline)
    if cfg.adopt is not None:
        return plan_adopted(pipeline)
    vits.resolve_layers(cfg.vit, cfg.vit.layers)  # bad model or layers: fail now
    arts, pieces, all_params, info = [], [], {}, {}
    for role, data in role_datasets(pipeline).items():
        params = artifacts.hashed_params(dataclasses.replace(cfg, data=data))
        dataset = datasets.make_dataset(data)
        fingerprint = dataset.fingerprint()
        if fingerprint.files:
            # A folder dataset: its listing (paths, sizes, modification times) enters the key, so that editing, adding
            # or removing an image or mask gives a new dump instead of the old activations and labels.
            params["dataset_files"] = fingerprint.digest
        art = artifacts.Artifact(pipeline.root, NAME, artifacts.get_key(NAME, VERSION, params, {}))
        if art.key in info:  # the same dataset in another role: the same dump
            info[art.key] = dataclasses.replace(info[art.key], roles=(*info[art.key].roles, role))
            continue
        md = make_metadata(cfg, dataset)
        chunks = [(s, min(md.n_shards, s + cfg.shards_per_job)) for s in range(0, md.n_shards, cfg.shards_per_job)]
        name = "" if pipeline.data is None else f"{role}: "
        pieces += [
            # A chunk writes its shards in order, each followed by its labels; the last shard's labels mark it done,
            # and a damaged shard or labels part of the chunk (missing, or not the size it was written with) undoes
            # that.
            Piece(
                NAME,
                art,
                labels_part_fpath(art, stop - 1),
                f"{name}shards {start}-{stop - 1} of {md.n_shards}",
                owns=tuple(f for s in range(start, stop) for f in shard_files(art, s))[:-1],
            )
            for start, stop in chunks
        ]
        arts.append(art)
        all_params[art.key] = params
        info[art.key] = DumpInfo(
            chunks={stop - 1: (start, stop) for start, stop in chunks},
            fingerprint=fingerprint,
            n_patches=md.n_imgs * md.n_patches_per_img,
            layers=md.layers,
            d_vit=md.d_vit,
            has_labels=bool(md.class_names),
            roles=(role,),
            data=data,
            class_names=md.class_names,
        )
    check_role_classes(info)
    return StagePlan(NAME, tuple(arts), tuple(pieces), all_params, {art.key: {} for art in arts}, info)


def check_role_classes(info: dict[str, DumpInfo]) -> None:
    """The select and report splits have labels and name the same classes in the same order (a class id must mean one
    class). A one-dataset config without labels is refused later, by the mask's check (train alone runs without)."""
    by_role = {role: record for record in info.values() for role in record.roles}
    select, report = by_role["select"], by_role["report"]
    for name, record in (("select", select), ("report", report)):
        if not record.has_labels and set(record.roles) != {"corpus", "select", "report"}:
            raise configs.ConfigError(
                f"data.{name} ({datasets.describe(record.data)}) has no labels, but the {name} split is scored "
                "against its labels: only data.corpus and data.corpus_eval may be unlabelled"
            )
    if select.class_names != report.class_names:
        diff = next(
            (i for i, (a, b) in enumerate(zip(select.class_names, report.class_names, strict=False)) if a != b),
            min(len(select.class_names), len(report.class_names)),
        )
        at = lambda names: repr(names[diff]) if diff < len(names) else "none"  # noqa: E731
        raise configs.ConfigError(
            f"data.select and data.report name different classes ({len(select.class_names)} and "
            f"{len(report.class_names)} classes; class {diff} is {at(select.class_names)} in select, "
            f"{at(report.class_names)} in report): a class id must mean the same class in both splits"
        )


def check(pipeline: "Pipeline", own: StagePlan[DumpInfo], inputs: Inputs) -> None:
    """Checks that can run before any job is submitted: the dataset opens and the model config exists; an adopted
    dump's labels are within its class names (or the ignore value)."""
    if pipeline.dump.adopt is not None:
        source = read_adopted(pipeline)
        if source.has_labels:
            if not source.metadata.class_names:
                raise shards.ShardError(
                    f"{source.dpath / saevfmt.LABELS_BIN}: the adopted dump has labels but the config names no "
                    "classes: give dump.adopt.class_names or dump.adopt.classes"
                )
            saevfmt.check_source_labels(source)
        return
    for data in role_datasets(pipeline).values():
        datasets.make_dataset(data)
    vits.get_d_vit(pipeline.dump.vit)


def run_adopted(pipeline: "Pipeline", own: StagePlan[DumpInfo], piece: Piece) -> None:
    """Link the source's files into the artifact, hash them once, write the translated metadata and the manifest; or
    relink a done artifact to the directory it was moved or copied to (`relink`).

    The checksums taken are kept beside the artifact (`<root>/dump/.adopted/<key>.json`, which outlives the
    artifact's directory): adopting under the same key again (the artifact was unsealed, or deleted) needs every file
    to have the checksum it was first adopted with, since what was made from it used those contents. A source
    edited since has a new key anyway, unless its sizes and modification times were put back.
    """
    started = artifacts.now()
    art = piece.artifact
    source = read_adopted(pipeline)
    if art.is_done():  # and linking to another directory, or the piece would be done
        return relink(art, source, own.params[art.key])
    saevfmt.adopt(source, art.dpath)
    planned = own.info[art.key].fingerprint
    changed = source_fingerprint(source).changed(planned.files)
    if changed:
        raise shards.ShardError(f"{source.dpath / changed[0]} changed while it was being adopted; run again")
    adopted = {rel: checksums.read_record(art.dpath / rel).digest for rel in source.linked}
    ledger_fpath = art.root / NAME / ".adopted" / f"{art.key}.json"
    try:
        earlier = json.loads(ledger_fpath.read_text())
        if not isinstance(earlier, dict) or not all(isinstance(v, str) for v in earlier.values()):
            raise ValueError("not a JSON object of file -> checksum")
    except FileNotFoundError:
        earlier = None
    except (OSError, ValueError) as err:
        raise shards.ShardError(
            f"{ledger_fpath}: cannot read what was adopted as {art.ref}: {err}; delete it to adopt "
            f"{source.dpath} as it is now (what was made from the earlier contents is then not checked against them)"
        ) from None
    if earlier is None:
        atomic.atomic_write_json(ledger_fpath, adopted)
    else:
        differ = [rel for rel in sorted(adopted) if earlier.get(rel) != adopted[rel]]
        if differ:
            raise shards.ShardError(
                f"{source.dpath / differ[0]} changed since it was adopted as {art.ref} (another checksum at the same "
                f"size and modification time) and what was made from it used the old contents: put them back, or "
                f"`touch {source.dpath / differ[0]}` to adopt {source.dpath} as a new dump (a new key: everything "
                "made from it is computed again)"
            )
    atomic.atomic_write_json(art.dpath / DATASET_FILES, {"digest": planned.digest, "files": planned.files})
    art.write_manifest(
        params=own.params[art.key], inputs={}, started=started,
        extra={"adopted": str(source.dpath), "protocol": source.protocol},
    )  # fmt: skip


def run(pipeline: "Pipeline", own: StagePlan[DumpInfo], inputs: Inputs, piece: Piece) -> None:
    cfg: Config = pipeline.dump
    if cfg.adopt is not None:
        return run_adopted(pipeline, own, piece)
    art = piece.artifact
    dataset = datasets.make_dataset(own.info[art.key].data)
    md = make_metadata(cfg, dataset)
    last = int(piece.fpath.stem.removeprefix("labels"))
    first, stop = own.info[art.key].chunks[last]
    # Resume: shards whose files are intact are finished; start at the first one that is not (missing or damaged).
    start = next(s for s in range(first, stop) if not shard_done(art, s))
    if start > first:
        logger.info("resuming at shard %d: shards %d-%d are already written", start, first, start - 1)

    helpers.keep_freed_memory()  # batches allocate and free the same arrays: reuse their pages
    device = helpers.get_device(cfg.device)
    model = vits.make_vit(cfg.vit, device)
    per = md.n_imgs_per_shard
    img_start, img_stop = start * per, min(md.n_imgs, stop * per)
    labels_NP = np.empty((img_stop - img_start, md.n_patches_per_img), dtype=md.labels_dtype)
    progress = helpers.Progress(
        desc=f"dump shards {start}-{stop - 1}", total=img_stop - img_start, unit="images", logger=logger
    )

    def prepare(batch: range) -> tuple[np.ndarray, np.ndarray]:
        """The batch's images at the model's input size (uint8, channels first), with their patch labels."""
        # On CPU the forward already uses every allocated CPU: this thread's own torch work runs on one.
        helpers.set_torch_threads(1 if cfg.overlap and device.type == "cpu" else None)
        items = datasets.load_batch(dataset, batch, model.img_size, pool)
        labels_BP = labels.pool_patch_labels(
            items.masks,
            n_side=model.n_side,
            img_size=model.img_size,
            n_classes=len(md.class_names),
            ignore=md.labels_ignore,
            prefer_fg=cfg.prefer_fg,
            background=dataset.background,
        )
        return items.images, labels_BP

    def forward(batch: range, prepared: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        images_B3SS, labels_BP = prepared
        return model(model.normalize(images_B3SS)).cpu().numpy(), labels_BP

    def write(batch: range, computed: tuple[np.ndarray, np.ndarray]) -> None:
        acts_BLTD, labels_BP = computed
        writer.write(acts_BLTD)
        labels_NP[batch.start - img_start : batch.stop - img_start] = labels_BP
        # Labels of each shard finished by this batch, written after the shard itself: they mark it done.
        for shard in range(start, writer.shard):
            fpath = labels_part_fpath(art, shard)
            if not fpath.exists():
                lo, hi = shard * per - img_start, min(md.n_imgs, (shard + 1) * per) - img_start
                atomic.atomic_save_npy(fpath, labels_NP[lo:hi])
        progress.update(len(batch))

    batches = [range(b, min(img_stop, b + cfg.batch_size)) for b in range(img_start, img_stop, cfg.batch_size)]
    # The next batches are prepared (read, decoded, resized, labelled) on a thread and the previous ones written on
    # another while the model runs on this one; `prepare_mib` bounds the images prepared ahead.
    ahead = max(1, (cfg.prepare_mib << 20) // (cfg.batch_size * 3 * model.img_size**2))
    with (
        concurrent.futures.ThreadPoolExecutor(cfg.n_workers) as pool,
        shards.ShardWriter(art.dpath, md, start_shard=start, check_earlier=False) as writer,
    ):
        n_threads = helpers.set_torch_threads(None)
        try:
            overlap_steps.run_overlapped(batches, prepare, forward, write, ahead=ahead, behind=2, overlap=cfg.overlap)
        finally:
            helpers.set_torch_threads(n_threads, force=True)  # threads started later take the last count set
    progress.finish()


def finalize(pipeline: "Pipeline", own: StagePlan[DumpInfo], art: artifacts.Artifact) -> None:
    """Once every chunk is written: join the label parts into labels.bin, then write shards.json and metadata.json."""
    md = make_metadata(pipeline.dump, datasets.make_dataset(own.info[art.key].data))
    parts = []
    for s in range(md.n_shards):
        fpath = labels_part_fpath(art, s)
        artifacts.verify_file(fpath)  # small: hash it before its labels enter labels.bin
        parts.append(np.load(fpath, allow_pickle=False))
    writer = shards.ShardWriter(art.dpath, md, start_shard=md.n_shards)  # checks every shard file's size
    writer.write_labels(np.concatenate(parts))
    writer.close()
    fingerprint = own.info[art.key].fingerprint
    if fingerprint.files:  # what the dump was made from, so that a later run can say which files changed
        atomic.atomic_write_json(art.dpath / DATASET_FILES, {"digest": fingerprint.digest, "files": fingerprint.files})


def changed_files(old: artifacts.Artifact, fingerprint: datasets.Fingerprint) -> list[str] | None:
    """Dataset files added, removed or changed since the dump `old` was made (None if it did not record them)."""
    try:
        with open(old.dpath / DATASET_FILES) as fd:
            return fingerprint.changed(json.load(fd)["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def explain_key(
    pipeline: "Pipeline",
    own: StagePlan[DumpInfo],
    new: artifacts.Artifact,
    earlier: artifacts.Artifact,
    diffs: list[str],
) -> str | None:
    """For `--status`: which dataset files changed since the closest earlier dump, when its listing differs."""
    if "dataset_files" not in diffs:
        return None
    files = changed_files(earlier, own.info[new.key].fingerprint)
    if not files:
        return None
    return f"dataset files changed: {', '.join(files[:5])}" + (f" and {len(files) - 5} more" if len(files) > 5 else "")


def manifest_extra(pipeline: "Pipeline", art: artifacts.Artifact) -> dict[str, object]:
    return {"device": str(helpers.get_device(pipeline.dump.device)), "inference_dtype": pipeline.dump.vit.dtype}


def slurm_resources(pipeline: "Pipeline", configured: slurm.Resources) -> slurm.Resources:
    """Adopting a dump (`[dump.adopt]`) only links and hashes files: that job asks for no GPU (`[slurm.dump]`'s gpus
    and gres are dropped; its partition, CPUs, memory and hours are kept)."""
    if pipeline.dump.adopt is not None:
        return dataclasses.replace(configured, gpus=0, gres="")
    return configured
