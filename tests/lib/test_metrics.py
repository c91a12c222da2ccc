"""saev.metrics: the protocol's figures equal independent computations (scikit-learn, numpy counts)."""

import numpy as np
import torch
from sklearn.metrics import average_precision_score

from saev import metrics


def split(seed: int = 0, n_images: int = 30, patches: int = 16, n_classes: int = 4):
    """ReLU-like scores of each class's latent (column c leans towards class c), labels, image ids and a probe."""
    rng = np.random.default_rng(seed)
    n = n_images * patches
    labels_N = rng.integers(0, n_classes, n)
    labels_N[::23] = -1
    z_NC = np.maximum(rng.normal(size=(n, n_classes)) + 1.2 * (labels_N[:, None] == np.arange(n_classes)) - 0.5, 0)
    w_C = np.array([1.5, -0.7, 0.0, 2.0])[:n_classes]
    b_C = np.array([-2.0, -1.0, -1.4, -2.5])[:n_classes]
    image_N = np.repeat(np.arange(n_images), patches)
    as_t = torch.from_numpy
    return as_t(z_NC.astype(np.float32)), as_t(w_C), as_t(b_C), as_t(labels_N), as_t(image_N)


def test_probe_r_is_a_ratio_of_mean_cross_entropy_to_mean_entropy():
    z_NC, w_C, b_C, labels_N, _ = split()
    keep = labels_N.numpy() >= 0
    z, y = z_NC.numpy()[keep].astype(np.float64), labels_N.numpy()[keep]
    ce, h = [], []
    for c in range(4):
        t = b_C[c].item() + w_C[c].item() * z[:, c]
        pos = y == c
        ce.append(np.mean(np.logaddexp(0, t) - pos * t))
        pi = pos.mean()
        h.append(-(pi * np.log(pi) + (1 - pi) * np.log(1 - pi)))
    np.testing.assert_allclose(metrics.probe_r(z_NC, w_C, b_C, labels_N), 1 - np.mean(ce) / np.mean(h), rtol=1e-12)


def test_map_is_sklearn_ap_of_the_probe_score_with_absent_classes_as_zero():
    z_NC, w_C, b_C, labels_N, _ = split()
    labels_N[labels_N == 3] = 0  # class 3 absent: AP 0
    keep = labels_N.numpy() >= 0
    ap_C = metrics.ap_per_class(z_NC, w_C, labels_N)
    for c in range(3):
        score = b_C[c].item() + w_C[c].item() * z_NC.numpy()[keep, c].astype(np.float64)
        ref = average_precision_score(labels_N.numpy()[keep] == c, score)
        np.testing.assert_allclose(ap_C[c].item(), ref, rtol=1e-12)
    assert ap_C[3] == 0.0


def test_purity_counts_the_most_frequent_label_among_the_top_nonzero_patches():
    z_NC, _, _, labels_N, _ = split()
    k, keep = 16, labels_N.numpy() >= 0
    z, y = z_NC.numpy()[keep], labels_N.numpy()[keep]
    expected = []
    for c in range(4):
        top = np.argsort(-z[:, c], kind="stable")[:k]
        top = top[z[top, c] != 0]
        expected.append(np.bincount(y[top]).max() / k if top.size else 0.0)
    np.testing.assert_allclose(metrics.purity(z_NC, labels_N, k), np.mean(expected), rtol=1e-12)


def test_bootstrap_intervals_contain_the_estimate_and_follow_the_seed():
    z_NC, w_C, b_C, labels_N, image_N = split()
    out = metrics.table(z_NC, w_C, b_C, labels_N, image_N, n_boot=40, n_perm=20, seed=3)
    for name in ("probe_r", "map", "coverage"):
        est = out[name]
        assert est.low <= est.value <= est.high
    assert out == metrics.table(z_NC, w_C, b_C, labels_N, image_N, n_boot=40, n_perm=20, seed=3)
    assert out["map_null_mean"] < out["map"].value and out["map_p"] < 0.1
    ap_C = metrics.ap_per_class(z_NC, w_C, labels_N)
    assert out["coverage"].value == float((ap_C > 0.3).double().mean())
