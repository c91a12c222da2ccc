"""`launch.py --export OUT_DIR`: a config's artifacts in the saev library's own layouts, for its tools.

    OUT_DIR/<HASH>/          the dump in the 2.x shard layout (metadata.json, shards.json, acts*.bin, labels.bin);
                             HASH is the sha256 of its metadata, as saev names shard directories
    OUT_DIR/classes.txt      the dump's class names, one a line (saev's files hold none)
    OUT_DIR/saes/<train key>/sae.pt   each SAE of the run (trained or imported) as a saev 2.x checkpoint

Nothing is recomputed: the artifacts must be done (checked against their manifests first).
"""

import pathlib
import typing

from saev import artifacts, sae_files
from saev.data import saevfmt
from saev.data.shards import Shards
from saev.engine.plan import Plan

if typing.TYPE_CHECKING:
    from .pipeline import Pipeline


def export(pipeline: "Pipeline", plan: Plan, out_dpath: pathlib.Path) -> list[str]:
    """Export the dump, then the SAEs; returns one line per thing written (for the launcher to print).

    Everything is checked before anything is written (not even OUT_DIR is made): the dump and every SAE against
    their manifests, and the dump's labels against saev's layout. A dump with int16 labels (255 classes or more) is
    refused whole, SAEs included, rather than exported in part: saev's labels.bin is uint8.

    Raises:
        IncompleteArtifactError: the dump or an SAE is not done or is damaged (run the pipeline first).
        ShardError: the dump cannot be written in the 2.x layout (int16 labels), or OUT_DIR holds an earlier export
            of the same metadata with other contents.
    """
    dump_art = plan["dump"].artifacts[0]
    dump_art.verify(params=plan["dump"].params[dump_art.key])
    shards = Shards(dump_art.dpath)
    saevfmt.check_exportable(shards)
    for art in plan["train"].artifacts:
        art.verify(params=plan["train"].params[art.key])
    out_dpath.mkdir(parents=True, exist_ok=True)
    cfg = pipeline.dump
    root = getattr(cfg.data, "root", "")  # folder datasets; the synthetic one has no directory
    dataset = str((pipeline.config_dpath / root).resolve()) if root and cfg.adopt is None else ""
    pixel_agg = "prefer-fg" if cfg.prefer_fg else "majority"
    shards_dpath = saevfmt.export(shards, out_dpath, dataset=dataset, pixel_agg=pixel_agg)
    lines = [f"dump {dump_art.ref}: {shards_dpath}"]
    if shards.metadata.class_names:
        classes_fpath = out_dpath / "classes.txt"
        artifacts.atomic_write_bytes(classes_fpath, "".join(f"{n}\n" for n in shards.metadata.class_names).encode())
        lines.append(f"class names: {classes_fpath}")
    lines.extend(export_saes(plan, out_dpath / "saes"))
    return lines


def export_saes(plan: Plan, saes_dpath: pathlib.Path) -> list[str]:
    """Each train artifact of the plan (trained or imported SAEs, in sweep order, imports first) as
    `saes_dpath/<train key>/sae.pt`, a saev 2.x checkpoint (`sae_files.export_train_artifact`); one line per SAE.

    Every SAE is checked against its manifest before anything is written (`Artifact.verify`).

    Raises:
        IncompleteArtifactError: an SAE is not done (`--stage train` first) or is damaged.
    """
    arts = plan["train"].artifacts
    for art in arts:
        art.verify(params=plan["train"].params[art.key])
    lines = []
    for art in arts:
        fpath = saes_dpath / art.key / "sae.pt"
        sae_files.export_train_artifact(art.dpath, fpath)
        lines.append(f"sae {art.ref}: {fpath}")
    return lines
