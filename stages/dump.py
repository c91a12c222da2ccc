"""dump: images -> ViT activations in saev's shard protocol, plus per-patch class labels.

Output `<root>/dump/<key>/`: `metadata.json`, `shards.json`, `acts%06d.bin` (float32 [image, layer, token, dim]) and
`labels.bin` ([image, patch] class ids, majority class of the mask pixels in each patch).
"""

import dataclasses
import logging

import numpy as np
import torch

from saev import artifacts, helpers
from saev import vit as vits
from saev.data import datasets, labels, shards

from .graph import Piece, StagePlan

NAME = "dump"
VERSION = 1

logger = logging.getLogger("stages.dump")


@dataclasses.dataclass(frozen=True)
class Config:
    """Which images go through which ViT, and how activations are stored."""

    data: datasets.Synthetic | datasets.SegFolder = datasets.Synthetic()
    """The dataset: the built-in synthetic demo (kind = "synthetic") or a folder of images + masks (kind = "segfolder")."""
    vit: vits.VitConfig = vits.VitConfig()
    """The open_clip ViT and the layers recorded."""
    max_patches_per_shard: int = 2_400_000
    """Shard size budget in activation vectors (saev protocol); ~10 GiB shards at d_vit=1024."""
    prefer_fg: bool = False
    """Label a patch with its most common non-background class when it has any foreground pixel."""
    batch_size: int = artifacts.unhashed(64)
    """Images per ViT forward pass (memory only)."""
    device: str = artifacts.unhashed("auto")
    """'auto' (CUDA when available), 'cpu' or 'cuda'."""

    def __post_init__(self):
        if self.max_patches_per_shard <= 0:
            raise ValueError(f"dump.max_patches_per_shard must be positive, got {self.max_patches_per_shard}")
        if self.batch_size <= 0:
            raise ValueError(f"dump.batch_size must be positive, got {self.batch_size}")


def plan(pipeline, upstream) -> StagePlan:
    vits.resolve_layers(pipeline.dump.vit.model, pipeline.dump.vit.layers)  # bad model or layers: fail now
    params = artifacts.hashed_params(pipeline.dump)
    art = artifacts.Artifact(pipeline.root, NAME, artifacts.get_key(NAME, VERSION, params, {}))
    label = f"{pipeline.dump.vit.model} on {datasets.describe(pipeline.dump.data)}"
    return StagePlan(NAME, (art,), (Piece(NAME, art, label=label),), {art.key: params}, {art.key: {}})


def count_patches(pipeline) -> int:
    """Patches the dump will hold (images x patches per image), from the configs alone."""
    _, n_side = vits.get_patch_grid(pipeline.dump.vit.model)
    return len(datasets.make_dataset(pipeline.dump.data)) * n_side * n_side


def check(pipeline) -> None:
    """Checks that can run before any job is submitted: the dataset opens and the model config exists."""
    datasets.make_dataset(pipeline.dump.data)
    vits.get_d_vit(pipeline.dump.vit.model)



def run(pipeline, plan, piece: Piece) -> None:
    started = artifacts.now()
    cfg: Config = pipeline.dump
    art = piece.artifact
    device = helpers.get_device(cfg.device)
    dataset = datasets.make_dataset(cfg.data)
    model = vits.make_vit(cfg.vit, device)
    n_classes = len(dataset.class_names)
    labels_dtype = "uint8" if n_classes < 255 else "int16"
    ignore = 255 if labels_dtype == "uint8" else -1
    md = shards.Metadata(
        vit_family=cfg.vit.family,
        vit_ckpt=f"{cfg.vit.model}:{cfg.vit.pretrained or f'random-init-seed-{cfg.vit.init_seed}'}",
        layers=tuple(model.layers),
        n_patches_per_img=model.n_patches_per_img,
        cls_token=cfg.vit.cls_token,
        d_vit=model.d_vit,
        n_imgs=len(dataset),
        max_patches_per_shard=cfg.max_patches_per_shard,
        data={**artifacts.hashed_params(cfg.data)},
        labels_dtype=labels_dtype,
        labels_ignore=ignore,
        class_names=tuple(dataset.class_names),
    )
    writer = shards.ShardWriter(art.dpath, md)
    labels_NP = np.full((len(dataset), model.n_patches_per_img), ignore, dtype=labels_dtype)
    progress = helpers.Progress(desc="dump", total=len(dataset), unit="images", logger=logger)
    for start in range(0, len(dataset), cfg.batch_size):
        stop = min(len(dataset), start + cfg.batch_size)
        samples = [dataset[i] for i in range(start, stop)]
        x_B3SS = torch.stack([model.preprocess(s.image) for s in samples]).to(device)
        acts_BLTD = model(x_B3SS)
        writer.write(acts_BLTD.float().cpu().numpy())
        for i, sample in enumerate(samples):
            labels_NP[start + i] = labels.pool_patch_labels(
                sample.mask,
                n_side=model.n_side,
                img_size=model.img_size,
                n_classes=n_classes,
                ignore=ignore,
                prefer_fg=cfg.prefer_fg,
                background=dataset.background,
            )
        progress.update(stop - start)
    progress.finish()
    writer.write_labels(labels_NP)
    writer.close()
    art.write_manifest(
        params=plan[NAME].params[art.key],
        inputs={},
        started=started,
        extra={"device": str(device), "inference_dtype": cfg.vit.dtype},
    )
