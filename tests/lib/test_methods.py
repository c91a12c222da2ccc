"""Baseline methods (saev.methods): each fit equals an independent numpy computation of what its docstring says, a
fit killed mid-way resumes to the same bits, every method scores through saev.scoring like an SAE latent, and
mistakes are refused with one-line user errors."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from saev import ap, configs, errors, methods, nn, scoring, sweep, training
from saev.data import loader
from saev.methods import kmeans, pca
from saev.methods import random as random_method


def blobs(n_per: int, d: int, n_blobs: int, seed: int, spread: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `n_blobs` well-separated Gaussian blobs in shuffled order, and the blob means."""
    rng = np.random.default_rng(seed)
    means_KD = rng.normal(size=(n_blobs, d)) * 10
    rows = np.concatenate([m + spread * rng.normal(size=(n_per, d)) for m in means_KD])
    return rng.permutation(rows).astype(np.float32), means_KD


def correlated(n: int, d: int, seed: int) -> np.ndarray:
    """Rows with distinct, well-spaced variances along random axes, far from the origin."""
    rng = np.random.default_rng(seed)
    q_DD = np.linalg.qr(rng.normal(size=(d, d)))[0]
    scales_D = np.linspace(10, 0.3, d)
    return (50 + rng.normal(size=(n, d)) * scales_D @ q_DD.T).astype(np.float32)


def fit(cfg, acts_ND: np.ndarray, batch_size: int, **kwargs):
    return methods.fit(cfg, acts_ND.shape[1], methods.array_batches(acts_ND, batch_size), **kwargs)


def block_codes(method, acts_ND: np.ndarray, k_start: int, k_stop: int, batch_size: int = 64) -> np.ndarray:
    """Codes through the scoring path (`saev.scoring.encode_block`)."""
    out = scoring.encode_block(method, acts_ND, k_start, k_stop, batch_size=batch_size, device=torch.device("cpu"))
    return out.numpy()


def one_line_user_error(excinfo, cls=configs.ConfigError) -> str:
    assert isinstance(excinfo.value, cls) and isinstance(excinfo.value, errors.UserError)
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


###########
# k-means #
###########


def test_kmeans_recovers_well_separated_blobs():
    acts_ND, means_KD = blobs(200, 8, 5, seed=0)
    km = fit(kmeans.KMeansConfig(k=5, seed=1), acts_ND, 64)
    centres_KD = km.centres_KD.numpy()
    # Every blob gets exactly one centre, at its mean up to the blob's sampling noise (spread 0.1 / sqrt(200)).
    match = np.linalg.norm(means_KD[:, None] - centres_KD[None], axis=2).argmin(axis=1)
    assert sorted(match) == list(range(5))
    np.testing.assert_allclose(centres_KD[match], means_KD, rtol=0, atol=0.05)


def test_kmeans_streamed_fit_equals_minibatch_updates_on_the_whole_array():
    acts_ND, _ = blobs(150, 6, 4, seed=2)
    batch_size, seed, k = 50, 3, 4
    rows = loader.ShuffledLoader(
        loader.ArrayRows(acts_ND), batch_size=batch_size, seed=5, chunk_rows=16, buffer_rows=64
    )
    n_steps = len(acts_ND) // batch_size
    with rows.batches(0, n_steps) as it:
        order_ND = torch.cat(list(it)).numpy()  # the stream's rows, in batch order
    km = methods.fit(kmeans.KMeansConfig(k=k, seed=seed), 6, lambda s: rows.batches(s, n_steps))

    # Reference: the module docstring's rule on the whole array, batch after batch, in numpy.
    n_held = -(-kmeans.INIT_ROWS_PER_CENTRE * k // batch_size) * batch_size
    init = kmeans.init_centres(torch.from_numpy(order_ND[:n_held]), k, torch.Generator().manual_seed(seed))
    centres_KD, counts_K = order_ND[init.numpy()].copy(), np.zeros(k)
    for s in range(0, len(order_ND), batch_size):
        x_BD = order_ND[s : s + batch_size].astype(np.float64)
        idx_B = ((x_BD[:, None] - centres_KD[None]) ** 2).sum(axis=2).argmin(axis=1)
        for c in range(k):
            won = idx_B == c
            if won.any():
                total = counts_K[c] * centres_KD[c] + x_BD[won].sum(axis=0)
                centres_KD[c] = (total / (counts_K[c] + won.sum())).astype(np.float32)
                counts_K[c] += won.sum()
        assert (counts_K > 0).all()  # no reseeding in this reference
    np.testing.assert_allclose(km.centres_KD.numpy(), centres_KD, rtol=1e-5)


def test_kmeans_empty_centre_is_reseeded_to_a_row_of_the_batch():
    # Two identical rows among the held ones: k-means++ must still pick 3 distinct rows, and a centre on a duplicate
    # that wins nothing (the other copy wins its rows) is moved onto a row of the batch.
    acts_ND = np.repeat(np.eye(3, dtype=np.float32), [1, 1, 10], axis=0)
    fitter = kmeans.KMeansFitter(kmeans.KMeansConfig(k=3, seed=0), 3)
    fitter.update(torch.from_numpy(acts_ND))
    fitter.centres_KD[0] = torch.tensor([100.0, 100.0, 100.0])  # far from everything: wins no row
    fitter.counts_K.zero_()
    fitter.update(torch.from_numpy(acts_ND))
    assert (fitter.counts_K[1:] > 0).all() and fitter.counts_K[0] == 0
    assert any(torch.equal(fitter.centres_KD[0], row) for row in torch.from_numpy(acts_ND))


@pytest.mark.parametrize("stop_after", [1, 9])  # while the first batches are held; after the start
def test_kmeans_fit_killed_midway_resumes_bit_for_bit(tmp_path, stop_after):
    acts_ND, _ = blobs(100, 5, 6, seed=4)
    cfg = kmeans.KMeansConfig(k=6, seed=2)
    whole = fit(cfg, acts_ND, 32)
    state_fpath = tmp_path / methods.STATE_FNAME
    assert fit(cfg, acts_ND, 32, state_fpath=state_fpath, save_every=2, stop_after=stop_after) is None
    resumed = fit(cfg, acts_ND, 32, state_fpath=state_fpath, save_every=2)
    assert torch.equal(resumed.centres_KD, whole.centres_KD)


@pytest.mark.parametrize("code", ["inverse-distance", "one-hot"])
def test_kmeans_codes_through_scoring_equal_numpy(code):
    acts_ND, _ = blobs(40, 6, 5, seed=5, spread=1.0)
    km = fit(kmeans.KMeansConfig(k=5, code=code, seed=0), acts_ND, 50)
    c_KD = km.centres_KD.numpy().astype(np.float64)
    dist_NK = np.linalg.norm(acts_ND[:, None].astype(np.float64) - c_KD[None], axis=2)
    expected_NK = np.zeros_like(dist_NK)
    nearest_N = dist_NK.argmin(axis=1)
    value_N = 1 / (1 + dist_NK.min(axis=1)) if code == "inverse-distance" else np.ones(len(acts_ND))
    expected_NK[np.arange(len(acts_ND)), nearest_N] = value_N
    for k_start, k_stop in [(0, 5), (1, 3), (4, 5)]:
        np.testing.assert_allclose(block_codes(km, acts_ND, k_start, k_stop), expected_NK[:, k_start:k_stop], rtol=1e-6)


def test_kmeans_nmse_is_reconstruction_by_the_nearest_centre_and_l0_is_1():
    acts_ND, _ = blobs(60, 4, 3, seed=6, spread=2.0)
    km = fit(kmeans.KMeansConfig(k=3), acts_ND, 45)
    c_KD = km.centres_KD.numpy().astype(np.float64)
    x_ND = acts_ND.astype(np.float64)
    x_hat_ND = c_KD[((x_ND[:, None] - c_KD[None]) ** 2).sum(axis=2).argmin(axis=1)]
    expected = ((x_ND - x_hat_ND) ** 2).sum() / ((x_ND - x_ND.mean(axis=0)) ** 2).sum()
    got = methods.get_metrics(km, methods.array_batches(acts_ND, 50)(0))
    assert got.l0 == 1.0
    np.testing.assert_allclose(got.nmse, expected, rtol=1e-5)


def test_kmeans_with_more_centres_than_corpus_rows_is_refused():
    acts_ND, _ = blobs(5, 4, 2, seed=7)
    with pytest.raises(methods.MethodConfigError) as excinfo:
        fit(kmeans.KMeansConfig(k=11), acts_ND, 4)
    assert "k=11" in one_line_user_error(excinfo) and "had 10" in str(excinfo.value)


#######
# PCA #
#######


def numpy_pca(acts_ND: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, top-k eigenvalues (decreasing) and eigenvectors of np.cov, each vector's largest |entry| positive."""
    x_ND = acts_ND.astype(np.float64)
    values_D, vectors_DD = np.linalg.eigh(np.cov(x_ND.T))
    order = np.argsort(values_D)[::-1][:k]
    vectors_DK = vectors_DD[:, order]
    signs_K = np.sign(vectors_DK[np.abs(vectors_DK).argmax(axis=0), np.arange(k)])
    return x_ND.mean(axis=0), values_D[order], vectors_DK * signs_K


def test_pca_equals_numpy_eigendecomposition_of_the_covariance():
    acts_ND = correlated(3000, 12, seed=0)
    model = fit(pca.PcaConfig(k=5), acts_ND, 256)
    mean_D, values_K, vectors_DK = numpy_pca(acts_ND, 5)
    np.testing.assert_allclose(model.eigenvalues_K.numpy(), values_K, rtol=1e-6)
    np.testing.assert_allclose(model.mean_D.numpy(), mean_D, rtol=1e-6)
    # Unit vectors stored in float32: within a few float32 ulps of their magnitude, 1.
    np.testing.assert_allclose(model.components_DK.numpy(), vectors_DK, rtol=0, atol=4e-7)


def test_pca_sign_eigh_spans_the_same_subspace():
    acts_ND = correlated(1000, 8, seed=1)
    model = fit(pca.PcaConfig(k=3, sign="eigh"), acts_ND, 100)
    _, _, vectors_DK = numpy_pca(acts_ND, 3)
    np.testing.assert_allclose(np.abs(model.components_DK.numpy()), np.abs(vectors_DK), rtol=0, atol=4e-7)


@pytest.mark.parametrize("top_n", [None, 2])
def test_pca_codes_through_scoring_and_nmse_equal_numpy(top_n):
    acts_ND = correlated(500, 10, seed=2)
    model = fit(pca.PcaConfig(k=4, top_n=top_n), acts_ND, 128)
    mean_D, comps_DK = model.mean_D.numpy().astype(np.float64), model.components_DK.numpy().astype(np.float64)
    x_ND = acts_ND.astype(np.float64)
    z_NK = (x_ND - mean_D) @ comps_DK
    if top_n is not None:
        drop_NK = np.argsort(-np.abs(z_NK), axis=1)[:, top_n:]
        np.put_along_axis(z_NK, drop_NK, 0.0, axis=1)
    # float32 codes of magnitude ~10 from a sum over D terms of magnitude ~50: compare within ulps of the terms.
    for k_start, k_stop in [(0, 4), (1, 3)]:
        got = block_codes(model, acts_ND, k_start, k_stop)
        np.testing.assert_allclose(got, z_NK[:, k_start:k_stop], rtol=1e-5, atol=1e-5 * 50)
        assert ((got == 0) == (z_NK[:, k_start:k_stop] == 0)).all()
    x_hat_ND = mean_D + z_NK @ comps_DK.T
    nmse = ((x_ND - x_hat_ND) ** 2).sum() / ((x_ND - x_ND.mean(axis=0)) ** 2).sum()
    got = methods.get_metrics(model, methods.array_batches(acts_ND, 100)(0))
    np.testing.assert_allclose(got.nmse, nmse, rtol=1e-5)
    assert got.l0 == (4 if top_n is None else top_n)


def test_pca_fit_killed_midway_resumes_bit_for_bit(tmp_path):
    acts_ND = correlated(700, 6, seed=3)
    cfg = pca.PcaConfig(k=3)
    whole = fit(cfg, acts_ND, 64)
    state_fpath = tmp_path / methods.STATE_FNAME
    assert fit(cfg, acts_ND, 64, state_fpath=state_fpath, save_every=3, stop_after=4) is None
    resumed = fit(cfg, acts_ND, 64, state_fpath=state_fpath)
    for name, tensor in whole.tensors().items():
        assert torch.equal(resumed.tensors()[name], tensor), name


def test_pca_with_more_components_than_the_width_is_refused():
    with pytest.raises(methods.MethodConfigError) as excinfo:
        fit(pca.PcaConfig(k=9), correlated(20, 8, seed=4), 10)
    assert "k=9" in one_line_user_error(excinfo) and "width 8" in str(excinfo.value)


##########################
# Random, neurons, SAEs #
##########################


def test_gaussian_directions_are_seeded_unit_vectors_scored_by_dot_product():
    acts_ND = correlated(200, 8, seed=5)
    rand = fit(random_method.RandomConfig(n=20, seed=3), acts_ND, 50)
    w_KD = rand.directions_KD.numpy()
    np.testing.assert_allclose(np.linalg.norm(w_KD, axis=1), 1.0, rtol=1e-6)
    assert torch.equal(fit(random_method.RandomConfig(n=20, seed=3), acts_ND[:1], 1).directions_KD, rand.directions_KD)
    assert not torch.equal(fit(random_method.RandomConfig(n=20, seed=4), acts_ND, 50).directions_KD, rand.directions_KD)
    expected_NK = acts_ND.astype(np.float64) @ w_KD.T.astype(np.float64)
    np.testing.assert_allclose(block_codes(rand, acts_ND, 3, 17), expected_NK[:, 3:17], rtol=1e-5, atol=1e-5 * 50)


def test_corpus_directions_are_a_reservoir_sample_by_algorithm_r():
    acts_ND = correlated(230, 4, seed=6)
    n, seed, batch_size = 7, 9, 100  # about 15 draws into 7 slots in the first batch: a slot drawn twice
    rand = fit(random_method.RandomConfig(n=n, source="corpus", seed=seed), acts_ND, batch_size)
    # Reference: Algorithm R row by row, with the uniforms drawn batch by batch as the module docstring says.
    gen, slots = torch.Generator().manual_seed(seed), list(range(n))
    for s in range(0, len(acts_ND), batch_size):
        first, stop = max(s, n), min(len(acts_ND), s + batch_size)  # rows t >= n of this batch draw a uniform
        u = torch.rand(max(0, stop - first), dtype=torch.float64, generator=gen).numpy()
        for i, t in enumerate(range(first, stop)):
            j = int(np.floor(u[i] * (t + 1)))
            if j < n:
                slots[j] = t
    rows_ND = acts_ND[slots]
    np.testing.assert_array_equal(rand.directions_KD.numpy(), rows_ND / np.linalg.norm(rows_ND, axis=1, keepdims=True))


def test_corpus_directions_resume_bit_for_bit_and_refuse_a_short_corpus(tmp_path):
    acts_ND = correlated(300, 5, seed=7)
    cfg = random_method.RandomConfig(n=10, source="corpus", seed=1)
    whole = fit(cfg, acts_ND, 25)
    state_fpath = tmp_path / methods.STATE_FNAME
    assert fit(cfg, acts_ND, 25, state_fpath=state_fpath, stop_after=5) is None
    assert torch.equal(fit(cfg, acts_ND, 25, state_fpath=state_fpath).directions_KD, whole.directions_KD)
    with pytest.raises(methods.MethodConfigError) as excinfo:
        fit(random_method.RandomConfig(n=400, source="corpus"), acts_ND, 25)
    assert "n=400" in one_line_user_error(excinfo)


def test_neurons_are_the_coordinates_with_exact_reconstruction():
    acts_ND = correlated(100, 6, seed=8)
    acts_ND[:, 2] = 0.0
    neurons = fit(random_method.NeuronsConfig(), acts_ND, 50)
    np.testing.assert_array_equal(block_codes(neurons, acts_ND, 1, 4), acts_ND[:, 1:4])
    assert methods.get_metrics(neurons, methods.array_batches(acts_ND, 30)(0)) == methods.Metrics(nmse=0.0, l0=5.0)


def test_an_sae_is_an_encoder_with_the_same_codes_and_metrics():
    acts_ND = correlated(300, 8, seed=9) / 50
    sae = nn.SparseAutoencoder(nn.SaeConfig(d_vit=8, exp_factor=2, seed=1))
    assert isinstance(sae, methods.Encoder) and sae.n_latents == 16 and sae.d_vit == 8
    x_BD = torch.from_numpy(acts_ND)
    with torch.no_grad():  # a matmul of another width may round the last bit differently (saev.scoring's docstring)
        np.testing.assert_allclose(sae.encode_block(x_BD, 3, 9), sae.encode(x_BD)[:, 3:9], rtol=1e-6)
    got = methods.get_metrics(sae, methods.array_batches(acts_ND, 64)(0))
    expected = training.get_metrics(sae, acts_ND, n_steps=0)
    np.testing.assert_allclose([got.nmse, got.l0], [expected.nmse, expected.l0], rtol=1e-5)


def test_score_block_of_a_method_is_the_ap_of_its_codes():
    acts_ND = correlated(400, 6, seed=10)
    labels_N = np.random.default_rng(0).integers(0, 3, size=400)
    model = fit(pca.PcaConfig(k=4), acts_ND, 100)
    codes_NK = block_codes(model, acts_ND, 1, 4, batch_size=128)
    block = scoring.score_block(model, acts_ND, labels_N, 3, 1, 4, batch_size=128, device=torch.device("cpu"))
    assert torch.equal(block.ap_CK, ap.average_precision(torch.from_numpy(codes_NK), labels_N, 3))
    assert torch.equal(block.min_K, torch.from_numpy(codes_NK.min(axis=0)))
    assert torch.equal(block.max_K, torch.from_numpy(codes_NK.max(axis=0)))


####################
# Files and configs #
####################


@pytest.mark.parametrize(
    "cfg",
    [
        kmeans.KMeansConfig(k=3, code="one-hot"),
        pca.PcaConfig(k=2, top_n=1),
        random_method.RandomConfig(n=5, source="corpus"),
        random_method.NeuronsConfig(),
    ],
)
def test_a_fitted_method_saves_and_loads_with_the_same_codes(tmp_path, cfg):
    acts_ND = correlated(120, 4, seed=11)
    method = fit(cfg, acts_ND, 30)
    methods.save(method, tmp_path / "m")
    loaded = methods.load(tmp_path / "m")
    assert type(loaded) is type(method) and loaded.cfg == cfg
    assert json.loads((tmp_path / "m" / methods.CONFIG_FNAME).read_text())["kind"] == cfg.kind
    x_BD = torch.from_numpy(acts_ND)
    n = method.n_latents
    assert torch.equal(loaded.encode_block(x_BD, 0, n), method.encode_block(x_BD, 0, n))


def test_a_damaged_method_directory_is_one_error_naming_the_file(tmp_path):
    method = fit(pca.PcaConfig(k=2), correlated(50, 4, seed=12), 25)
    methods.save(method, tmp_path)
    cfg_fpath = tmp_path / methods.CONFIG_FNAME
    cfg_fpath.write_text(json.dumps({"kind": "pca", "config": {"k": 2, "top": 1}, "d_vit": 4}))
    with pytest.raises(methods.MethodFileError) as excinfo:
        methods.load(tmp_path)
    assert str(cfg_fpath) in one_line_user_error(excinfo, methods.MethodFileError) and "top" in str(excinfo.value)
    cfg_fpath.write_text(json.dumps({"kind": "pca", "config": {"k": 3}, "d_vit": 4}))
    with pytest.raises(methods.MethodFileError, match="method.safetensors"):
        methods.load(tmp_path)
    (tmp_path / methods.WEIGHTS_FNAME).unlink()
    with pytest.raises(methods.MethodFileError, match="missing"):
        methods.load(tmp_path)


def test_a_fit_state_of_another_config_is_refused(tmp_path):
    acts_ND = correlated(200, 4, seed=13)
    state_fpath = tmp_path / methods.STATE_FNAME
    fit(pca.PcaConfig(k=2), acts_ND, 50, state_fpath=state_fpath, stop_after=2)
    with pytest.raises(methods.MethodFileError) as excinfo:
        fit(pca.PcaConfig(k=3), acts_ND, 50, state_fpath=state_fpath)
    assert str(state_fpath) in one_line_user_error(excinfo, methods.MethodFileError)


def test_an_option_a_method_does_not_read_is_refused():
    with pytest.raises(configs.ConfigError) as excinfo:
        configs.from_dict(kmeans.KMeansConfig, {"k": 4, "top_n": 2}, "sweep.toml")
    assert "unknown key 'top_n'" in one_line_user_error(excinfo)
    union = kmeans.KMeansConfig | pca.PcaConfig | random_method.RandomConfig | random_method.NeuronsConfig
    with pytest.raises(configs.ConfigError) as excinfo:
        configs.convert(union, {"kind": "kmeans", "k": 4, "top_n": 2}, "sweep.toml", "method")
    assert "not read by method kind 'kmeans' (only by 'pca')" in one_line_user_error(excinfo)
    with pytest.raises(configs.ConfigError, match="top_n must be in"):
        configs.from_dict(pca.PcaConfig, {"k": 4, "top_n": 5}, "sweep.toml")
    assert methods.kinds() == ["kmeans", "pca", "random", "neurons"]


def test_a_sweep_of_methods_expands_like_objectives():
    @dataclasses.dataclass(frozen=True)
    class Baselines:
        method: methods.Config
        """The method."""

    table = {"method": {"kind": ["kmeans", "pca", "neurons"], "k": [16, 64], "seed": 3}}
    points = sweep.expand_sweep(table, Baselines, where="sweep.toml")
    # `method.k` applies to the kinds that read it; `seed` only to k-means (the one kind of the list reading it).
    assert {p.method for p in points} == {
        kmeans.KMeansConfig(k=16, seed=3), kmeans.KMeansConfig(k=64, seed=3), pca.PcaConfig(k=16),
        pca.PcaConfig(k=64), random_method.NeuronsConfig(),
    }  # fmt: skip
