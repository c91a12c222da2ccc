"""saev.probe: every (latent, class) 1-D logistic probe reaches the objective's optimum, sparse or not."""

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from saev.probe import fit_probes, probe_loss


def objective(x: np.ndarray, z_N: np.ndarray, y_N: np.ndarray, b0: float, ridge: float) -> tuple:
    """The probe objective, its gradient and Hessian in (w, b), dense and in float64."""
    w, b = x
    t_N = b + w * z_N
    p_N = 1 / (1 + np.exp(-t_N))
    q_N = p_N * (1 - p_N)
    f = np.mean(np.logaddexp(0, t_N) - y_N * t_N) + 0.5 * ridge * (w * w + (b - b0) ** 2)
    g = np.array([np.mean((p_N - y_N) * z_N) + ridge * w, np.mean(p_N - y_N) + ridge * (b - b0)])
    h = np.array([[np.mean(q_N * z_N * z_N), np.mean(q_N * z_N)], [np.mean(q_N * z_N), np.mean(q_N)]])
    return f, g, h + ridge * np.eye(2)


def scipy_probe(z_N: np.ndarray, y_N: np.ndarray, ridge: float, clip: float = 1e-12) -> tuple[float, float, float]:
    """(w, b, mean BCE) at scipy's optimum (trust-exact with the exact Hessian) of the same objective."""
    pi = np.clip(y_N.mean(), clip, 1 - clip)
    b0 = float(np.log(pi) - np.log1p(-pi))
    z_N = z_N.astype(np.float64)
    res = scipy.optimize.minimize(
        lambda x: objective(x, z_N, y_N, b0, ridge)[0],
        np.array([0.0, b0]),
        jac=lambda x: objective(x, z_N, y_N, b0, ridge)[1],
        hess=lambda x: objective(x, z_N, y_N, b0, ridge)[2],
        method="trust-exact",
        options={"gtol": 1e-13, "maxiter": 1000},
    )
    w, b = res.x
    t_N = b + w * z_N
    return float(w), float(b), float(np.mean(np.logaddexp(0, t_N) - y_N * t_N))


def relu_data(n: int, k: int, n_classes: int, seed: int, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """ReLU-like scores (about 60% zeros), column k leaning towards class k % C, and int labels."""
    rng = np.random.default_rng(seed)
    labels_N = rng.integers(0, n_classes, n)
    z_NK = rng.normal(size=(n, k)) + 1.5 * (labels_N[:, None] == np.arange(k) % n_classes)
    return np.maximum(z_NK - 0.25, 0).astype(dtype), labels_N


@pytest.mark.parametrize("ridge", [1e-8, 1e-4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_equals_scipy_optimum(dtype, ridge):
    scores_NK, labels_N = relu_data(3000, 4, 3, seed=1, dtype=dtype)
    labels_N[::17] = -1
    probes = fit_probes(scores_NK, labels_N, 3, ridge=ridge)
    assert probes.converged_CK.all() and not probes.degenerate_CK.any()
    keep_N = labels_N >= 0
    for c in range(3):
        for k in range(4):
            w, b, loss = scipy_probe(scores_NK[keep_N, k], (labels_N[keep_N] == c).astype(np.float64), ridge)
            np.testing.assert_allclose(probes.loss_CK[c, k].item(), loss, rtol=1e-9)
            np.testing.assert_allclose([probes.w_CK[c, k].item(), probes.b_CK[c, k].item()], [w, b], rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_cases_reach_scipy_loss_and_are_never_nan(data):
    n = data.draw(st.integers(2, 60))
    n_classes = data.draw(st.integers(1, 3))
    values = st.one_of(st.just(0.0), st.floats(-3, 3, allow_nan=False, width=32), st.sampled_from([1.0, 2.5]))
    scores_NK = data.draw(hnp.arrays(np.float32, (n, 3), elements=values))
    labels_N = data.draw(hnp.arrays(np.int64, n, elements=st.integers(-1, n_classes - 1)))
    if (labels_N < 0).all():
        labels_N[0] = 0
    ridge = data.draw(st.sampled_from([1e-2, 1e-4]))
    probes = fit_probes(scores_NK, labels_N, n_classes, ridge=ridge)
    for x in probes[:3]:
        assert torch.isfinite(x).all()
    keep_N = labels_N >= 0
    for c in range(n_classes):
        for k in range(3):
            y_N = (labels_N[keep_N] == c).astype(np.float64)
            if probes.degenerate_CK[c, k]:
                continue  # w may be large there; the separate tests below cover these pairs
            assert probes.converged_CK[c, k]
            w, b, loss = scipy_probe(scores_NK[keep_N, k], y_N, ridge)
            np.testing.assert_allclose(probes.loss_CK[c, k].item(), loss, rtol=1e-8)


def test_separable_column_ends_finite_and_flagged():
    # Class 1's rows are exactly the non-zero entries: the unpenalised optimum is at w = +inf.
    labels_N = np.array([0] * 50 + [1] * 10)
    scores_NK = np.concatenate([np.zeros(50), np.linspace(0.5, 2, 10)])[:, None].astype(np.float32)
    probes = fit_probes(scores_NK, labels_N, 2)
    assert probes.degenerate_CK.all()
    assert torch.isfinite(probes.w_CK).all() and torch.isfinite(probes.b_CK).all()
    assert probes.w_CK[1, 0] > 10 and probes.loss_CK[1, 0] < 1e-3
    assert torch.isfinite(probes.loss_CK).all()


def test_constant_and_all_zero_columns_give_the_prevalence_probe():
    labels_N = np.array([0, 1, 1, 2, 2, 2, 0, 1])
    scores_NK = np.stack([np.zeros(8), np.full(8, 3.0)], axis=1).astype(np.float32)
    probes = fit_probes(scores_NK, labels_N, 3)
    assert probes.degenerate_CK.all() and probes.converged_CK.all()
    prevalence_C = np.bincount(labels_N, minlength=3) / 8
    entropy_C = -(prevalence_C * np.log(prevalence_C) + (1 - prevalence_C) * np.log1p(-prevalence_C))
    for k in range(2):
        np.testing.assert_allclose(probes.loss_CK[:, k].numpy(), entropy_C, rtol=1e-9)
    np.testing.assert_array_equal(probes.w_CK[:, 0].numpy(), 0.0)  # z = 0: only the ridge acts on w


def test_classes_with_no_positive_or_one_positive():
    scores_NK, labels_N = relu_data(400, 3, 3, seed=2)
    labels_N[labels_N == 2] = 0
    labels_N[7] = 2  # one positive
    probes = fit_probes(scores_NK, labels_N, 4)  # class 3 has none
    for x in probes[:3]:
        assert torch.isfinite(x).all()
    assert probes.degenerate_CK[3].all() and probes.converged_CK[3].all()
    assert (probes.loss_CK[3] < 1e-9).all()
    for k in range(3):
        w, b, loss = scipy_probe(scores_NK[:, k], (labels_N == 2).astype(np.float64), 1e-8)
        if not probes.degenerate_CK[2, k]:
            np.testing.assert_allclose(probes.loss_CK[2, k].item(), loss, rtol=1e-8)


def test_int_and_multi_hot_labels_agree():
    scores_NK, labels_N = relu_data(500, 5, 4, seed=3)
    labels_N[::9] = -1
    keep_N = labels_N >= 0
    multi_NC = labels_N[keep_N, None] == np.arange(4)[None, :]
    by_id = fit_probes(scores_NK, labels_N, 4)
    for multi in (multi_NC, multi_NC.astype(np.uint8)):
        by_hot = fit_probes(scores_NK[keep_N], multi)
        for a, b in zip(by_id, by_hot, strict=True):
            if a.dtype == torch.float64:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
            else:
                assert torch.equal(a, b)


def test_chunks_and_workers_give_identical_bits():
    scores_NK, labels_N = relu_data(2000, 9, 5, seed=4)
    labels_N[::13] = -1
    ref = fit_probes(scores_NK, labels_N, 5, workers=1)
    for chunk_mib, workers in [(0.01, 1), (0.02, 2), (0.05, 3)]:  # 1, 2 and 6 columns a chunk
        out = fit_probes(scores_NK, labels_N, 5, chunk_mib=chunk_mib, workers=workers)
        for a, b in zip(ref, out, strict=True):
            assert torch.equal(a, b)


def test_probe_loss_is_the_fit_loss_on_the_same_rows_and_a_dense_loss_on_others():
    scores_NK, labels_N = relu_data(1500, 4, 3, seed=5)
    labels_N[::11] = -1
    probes = fit_probes(scores_NK[:1000], labels_N[:1000], 3)
    assert torch.equal(probe_loss(scores_NK[:1000], labels_N[:1000], probes.w_CK, probes.b_CK, 3), probes.loss_CK)
    val_CK = probe_loss(scores_NK[1000:], labels_N[1000:], probes.w_CK, probes.b_CK, 3)
    keep_N = labels_N[1000:] >= 0
    z_NK = scores_NK[1000:][keep_N].astype(np.float64)
    for c in range(3):
        y_N = labels_N[1000:][keep_N] == c
        t_NK = probes.b_CK[c].numpy() + probes.w_CK[c].numpy() * z_NK
        dense_K = np.mean(np.logaddexp(0, t_NK) - y_N[:, None] * t_NK, axis=0)
        np.testing.assert_allclose(val_CK[c].numpy(), dense_K, rtol=1e-12)


def test_bad_inputs_are_one_clear_error():
    scores_NK, labels_N = relu_data(20, 2, 2, seed=6)
    with pytest.raises(ValueError, match="ridge"):
        fit_probes(scores_NK, labels_N, ridge=0.0)
    bad_NK = scores_NK.copy()
    bad_NK[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or \+-inf in 1 prototype column\(s\); first: \[1\]"):
        fit_probes(bad_NK, labels_N)
    with pytest.raises(ValueError, match="every row is ignored"):
        fit_probes(scores_NK, np.full(20, -1))


def test_probe_loss_of_selected_pairs_equals_the_full_evaluation_there():
    scores_NK, labels_N = relu_data(800, 5, 3, seed=7)
    probes = fit_probes(scores_NK, labels_N, 3)
    only_CK = torch.zeros(3, 5, dtype=torch.bool)
    only_CK[[0, 1, 2], [4, 1, 4]] = True  # each class with one column; column 4 for two classes
    full_CK = probe_loss(scores_NK, labels_N, probes.w_CK, probes.b_CK, 3)
    some_CK = probe_loss(scores_NK, labels_N, probes.w_CK, probes.b_CK, 3, only_CK=only_CK)
    assert torch.isnan(some_CK[~only_CK]).all()
    torch.testing.assert_close(some_CK[only_CK], full_CK[only_CK], rtol=1e-12, atol=0)


def test_an_outlier_entry_does_not_stall_newton():
    # Eight negatives at small z among 2,000 heavy-tailed rows and one positive at z = 1000: the step bound alone
    # (largest logit change at that entry) allowed about 1/100 of each Newton step and stopped at max_iter far off.
    rng = np.random.default_rng(0)
    z_N = np.maximum(rng.standard_t(2, 2000), 0)
    labels_N = np.ones(2000, dtype=np.int64)
    labels_N[np.flatnonzero(z_N == 0)[:3]] = 0
    labels_N[np.flatnonzero((z_N > 0) & (z_N < 0.3))[:5]] = 0
    z_N[np.flatnonzero(labels_N == 1)[0]] = 1000.0
    probes = fit_probes(z_N[:, None].astype(np.float32), labels_N, 2)
    assert not probes.degenerate_CK.any() and probes.converged_CK.all()
    assert (probes.iterations_CK <= 20).all()
    w, b, loss = scipy_probe(z_N.astype(np.float32), (labels_N == 1).astype(np.float64), 1e-8)
    np.testing.assert_allclose(probes.loss_CK[1, 0].item(), loss, rtol=1e-9)


def test_nearly_separated_classes_converge():
    # Class 0 is exactly the rows above a threshold, by a margin of under 1% of the range: w must reach the hundreds.
    rng = np.random.default_rng(1)
    for _ in range(20):
        z_NK = np.maximum(rng.normal(size=(150, 2)), 0).astype(np.float32)
        labels_N = rng.integers(1, 3, 150)
        labels_N[z_NK[:, 0] > 0.8] = 0
        probes = fit_probes(z_NK, labels_N, 3)
        assert probes.degenerate_CK[0, 0] and probes.converged_CK.all()
        for x in probes[:3]:
            assert torch.isfinite(x).all()


def test_cross_entropy_is_exact_where_only_the_ridge_holds_w():
    # A class of nearly every row (three negatives) and a column of tiny values: the objective is flat along w up to
    # the ridge, so a loose tolerance on it left the cross-entropy off by 5e-8 relative.
    rng = np.random.default_rng(21)
    z_N = np.maximum(rng.normal(size=3000) * 0.03, 0).astype(np.float32)
    y_N = rng.random(3000) < 0.999
    probes = fit_probes(z_N[:, None], y_N[:, None])
    assert not probes.degenerate_CK.any() and probes.converged_CK.all()
    w, b, loss = scipy_probe(z_N, y_N.astype(np.float64), 1e-8)
    np.testing.assert_allclose(probes.loss_CK.item(), loss, rtol=1e-9)
