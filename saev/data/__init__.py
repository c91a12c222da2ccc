"""Data: image datasets with segmentation masks, per-patch labels, and activation shards."""
