"""`launch.py --export OUT_DIR`: a config's artifacts in the saev library's own layouts, for its tools.

    OUT_DIR/<HASH>/          the dump in the 2.x shard layout (metadata.json, shards.json, acts*.bin, labels.bin);
                             HASH is the sha256 of its metadata, as saev names shard directories
    OUT_DIR/classes.txt      the dump's class names, one a line (saev's files hold none)
    OUT_DIR/saes/<train key>/sae.pt   each trained SAE (see `export_saes`)

Nothing is recomputed: the artifacts must be done (checked against their manifests first).
"""

import pathlib

from saev import artifacts
from saev.data import saevfmt
from saev.data.shards import Shards

from .graph import Plan


def export(pipeline, plan: Plan, out_dpath: pathlib.Path) -> list[str]:
    """Export the dump, then the SAEs; returns one line per thing written (for the launcher to print).

    Raises:
        IncompleteArtifactError: the dump is not done or is damaged (run the pipeline first).
        ShardError: the dump cannot be written in the 2.x layout (int16 labels).
    """
    out_dpath.mkdir(parents=True, exist_ok=True)
    dump_art = plan["dump"].artifacts[0]
    dump_art.verify(params=plan["dump"].params[dump_art.key])
    shards = Shards(dump_art.dpath)
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
    lines.extend(export_saes(pipeline, plan, out_dpath / "saes"))
    return lines


def export_saes(pipeline, plan: Plan, saes_dpath: pathlib.Path) -> list[str]:
    """Each done train artifact as `saes_dpath/<train key>/sae.pt` (saev 2.x checkpoint); one line per SAE.

    SAE EXPORT PLUGS IN HERE: for each `art` of `plan["train"].artifacts` that `art.is_done()`, call the SAE
    exporter (`export_sae(art.dpath, saes_dpath / art.key / "sae.pt")`, from the checkpoint interop module) and
    return a line naming the file. Until then no SAE is exported.
    """
    return []
