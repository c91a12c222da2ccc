"""`launch.py --export OUT_DIR`: a config's artifacts in the saev library's own layouts, for its tools.

    OUT_DIR/saev/shards/<HASH>/          the dump (with [data.*] roles: the corpus's) in the 2.x shard layout (metadata.json, shards.json, acts*.bin,
                                         labels.bin) and classes.txt, its class names one a line (saev's files hold
                                         none); HASH is saev's name for it: the first 8 hex characters of the sha256
                                         of its metadata as compact sorted-key JSON. saev's 2.x readers open only a
                                         directory whose path ends in saev/shards/<dir>.
    OUT_DIR/saev/saes/<train key>/sae.pt each SAE of the run (trained or imported) as a saev 2.x checkpoint (baseline
                                         methods have no saev format and are not exported)

Nothing is recomputed: the artifacts must be done (checked against their manifests first). Nothing is overwritten: a
file already there is reused when it holds exactly what the export writes, and refused otherwise (before anything is
written).
"""

import pathlib
import typing

from saev import artifacts, errors, sae_files
from saev.data import saevfmt
from saev.data.shards import Shards
from saev.engine.plan import Plan

from .graph import MethodRun, role

if typing.TYPE_CHECKING:
    from .pipeline import Pipeline

SAES_SUBDIR = ("saev", "saes")
"""Under OUT_DIR: one directory per SAE, named by its train key, holding sae.pt."""


class ExportError(errors.UserInputError, ValueError):
    """An export would overwrite a file that holds something else; the message names it and what to do."""


class SaeExport(typing.NamedTuple):
    """One SAE of an export, planned (`plan_saes`)."""

    art: artifacts.Artifact
    """Its train artifact."""
    fpath: pathlib.Path
    """`OUT_DIR/saev/saes/<train key>/sae.pt`."""
    exists: bool
    """An earlier export left exactly this file there: nothing to write."""


def export(pipeline: "Pipeline", plan: Plan, out_dpath: pathlib.Path) -> list[str]:
    """Export the dump, then the SAEs; returns one line per thing written or reused (for the launcher to print).

    Everything is checked before anything is written (not even OUT_DIR is made): the dump and every SAE against
    their manifests, the dump's labels against saev's layout, and every file an earlier export left where this one
    writes. A dump with int16 labels (255 classes or more) is refused whole, SAEs included, rather than exported in
    part: saev's labels.bin is uint8.

    Raises:
        IncompleteArtifactError: the dump or an SAE is not done or is damaged (run the pipeline first).
        ShardError: the dump cannot be written in the 2.x layout (int16 labels), or OUT_DIR holds an earlier export
            of the same metadata with other contents.
        ExportError: OUT_DIR holds an SAE file of the same train key with other contents.
        WriteError: a file could not be written (disk full); the message names it.
    """
    dump_art, dump_info = role(plan["dump"], "corpus")  # with [data.*] roles: what the SAEs were trained on
    dump_art.verify(params=plan["dump"].params[dump_art.key])
    shards = Shards(dump_art.dpath)
    saevfmt.check_exportable(shards)  # before the SAEs: a dump that cannot be exported is the first thing to fix
    for art in plan["train"].artifacts:
        art.verify(params=plan["train"].params[art.key])
    cfg = pipeline.dump
    root = getattr(dump_info.data, "root", "")  # folder datasets; the synthetic one has no directory
    dataset = str((pipeline.config_dpath / root).resolve()) if root and cfg.adopt is None else ""
    pixel_agg = "prefer-fg" if cfg.prefer_fg else "majority"
    dump_export = saevfmt.plan_export(shards, out_dpath, dataset=dataset, pixel_agg=pixel_agg)
    saes = plan_saes(plan, out_dpath.joinpath(*SAES_SUBDIR))
    saevfmt.write_export(shards, dump_export)
    lines = [f"dump {dump_art.ref}: {dump_export.dpath}" + (" (already there)" if dump_export.exists else "")]
    if saevfmt.CLASSES_TXT in dump_export.texts:
        lines.append(f"class names: {dump_export.dpath / saevfmt.CLASSES_TXT}")
    lines.extend(write_saes(saes))
    return lines


def plan_saes(plan: Plan, saes_dpath: pathlib.Path) -> list[SaeExport]:
    """Where each train artifact of the plan (trained or imported SAEs, in sweep order, imports first) goes,
    `saes_dpath/<train key>/sae.pt`, each checked against a file already there. Nothing is written.

    Raises:
        ExportError: a file is already there and is not exactly the saev file of that SAE (e.g. written by another
            version of this pipeline, whose commit the header records).
    """
    saes = []
    for art in plan["train"].artifacts:
        if isinstance(plan["train"].info[art.key].config, MethodRun):
            continue  # a baseline (k-means, PCA, ...) has no saev format: not exported
        fpath = saes_dpath / art.key / "sae.pt"
        exists = fpath.exists() or fpath.is_symlink()
        if exists:
            todo = "remove it or export to another directory"
            if fpath.is_symlink() or not fpath.is_file():
                raise ExportError(
                    f"{fpath} is not a regular file (an export writes the SAE of {art.ref} there); {todo}"
                )
            data = sae_files.train_artifact_saev_pt(art.dpath)
            if fpath.stat().st_size != len(data) or fpath.read_bytes() != data:
                raise ExportError(f"{fpath} differs from the saev file of {art.ref} this export writes (another SAE, or "
                                  f"exported by another version); {todo}")  # fmt: skip
        saes.append(SaeExport(art, fpath, exists))
    return saes


def write_saes(saes: list[SaeExport]) -> list[str]:
    """Write the planned SAEs (`sae_files.export_train_artifact`, atomically) that are not there yet; one line each."""
    lines = []
    for sae in saes:
        if not sae.exists:
            sae_files.export_train_artifact(sae.art.dpath, sae.fpath)
        lines.append(f"sae {sae.art.ref}: {sae.fpath}" + (" (already there)" if sae.exists else ""))
    return lines


def export_saes(plan: Plan, saes_dpath: pathlib.Path) -> list[str]:
    """Each train artifact of the plan as `saes_dpath/<train key>/sae.pt`, a saev 2.x checkpoint, after checking
    every SAE against its manifest and every file already there (`plan_saes`); one line per SAE.

    Raises:
        IncompleteArtifactError: an SAE is not done (`--stage train` first) or is damaged.
        ExportError: a file already there holds something else.
    """
    for art in plan["train"].artifacts:
        art.verify(params=plan["train"].params[art.key])
    return write_saes(plan_saes(plan, saes_dpath))
