"""saev.ap: average precision equal to scikit-learn's, ties included, and the best prototype per class."""

import threading
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.metrics import average_precision_score

from saev.ap import average_precision, best_per_class

# sklearn and the engine may differ in the last bits of a float64 sum; anything larger is a real difference.
TOL = 1e-12


def sklearn_ap(scores_NK: np.ndarray, positive_NC: np.ndarray) -> np.ndarray:
    """scikit-learn's AP per (class, column); NaN where a class has no positives (sklearn would say 0.0)."""
    ap_CK = np.full((positive_NC.shape[1], scores_NK.shape[1]), np.nan)
    for c in range(positive_NC.shape[1]):
        if positive_NC[:, c].any():
            for k in range(scores_NK.shape[1]):
                ap_CK[c, k] = average_precision_score(positive_NC[:, c], scores_NK[:, k])
    return ap_CK


def sklearn_ap_class_ids(scores_NK: np.ndarray, labels_N: np.ndarray, n_classes: int) -> np.ndarray:
    keep_N = labels_N >= 0
    positive_NC = labels_N[keep_N, None] == np.arange(n_classes)[None, :]
    return sklearn_ap(scores_NK[keep_N], positive_NC)


def assert_same_ap(ap_CK: torch.Tensor, ref_CK: np.ndarray) -> None:
    ap_CK = ap_CK.cpu().numpy()
    assert ap_CK.dtype == np.float64
    np.testing.assert_array_equal(np.isnan(ap_CK), np.isnan(ref_CK))
    np.testing.assert_allclose(ap_CK, ref_CK, rtol=0, atol=TOL, equal_nan=True)


@st.composite
def tied_scores(draw, max_n: int = 60, max_k: int = 5) -> np.ndarray:
    """Scores with many ties: small integer values (negatives too), many exact zeros, float32 or float64."""
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(1, max_k))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    values = st.one_of(st.just(0.0), st.integers(-3, 3).map(float), st.sampled_from([0.5, -0.25, 1e-3, -0.0]))
    return draw(hnp.arrays(dtype, (n, k), elements=values))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_equals_sklearn_on_heavily_tied_scores(data):
    scores_NK = data.draw(tied_scores())
    n_classes = data.draw(st.integers(1, 4))
    labels_N = data.draw(hnp.arrays(np.int64, scores_NK.shape[0], elements=st.integers(-1, n_classes - 1)))
    chunk = data.draw(st.one_of(st.none(), st.integers(1, 3)))
    ap_CK = average_precision(torch.from_numpy(scores_NK), torch.from_numpy(labels_N), n_classes, chunk=chunk)
    assert_same_ap(ap_CK, sklearn_ap_class_ids(scores_NK, labels_N, n_classes))


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_multi_hot_labels_equal_sklearn_per_label_column(data):
    scores_NK = data.draw(tied_scores())
    n_classes = data.draw(st.integers(1, 4))
    positive_NC = data.draw(hnp.arrays(np.bool_, (scores_NK.shape[0], n_classes)))
    ap_CK = average_precision(torch.from_numpy(scores_NK), torch.from_numpy(positive_NC))
    assert_same_ap(ap_CK, sklearn_ap(scores_NK, positive_NC))


def test_equals_sklearn_on_relu_like_scores_large_enough_for_radix_sort():
    rng = np.random.default_rng(0)
    n, k, n_classes = 20_000, 12, 3
    labels_N = rng.integers(-1, n_classes, n)
    scores_NK = np.maximum(rng.normal(size=(n, k)) + (labels_N[:, None] == np.arange(k) % n_classes), 0.8)
    scores_NK = (scores_NK - 0.8).astype(np.float32)  # ~65% exact zeros, continuous above
    ap_CK = average_precision(torch.from_numpy(scores_NK), torch.from_numpy(labels_N), n_classes)
    assert_same_ap(ap_CK, sklearn_ap_class_ids(scores_NK, labels_N, n_classes))


@pytest.mark.parametrize("value", [0.0, 7.5, -2.0])
def test_constant_column_has_ap_equal_to_prevalence(value):
    labels_N = torch.tensor([0, 1, 1, 2, 2, 2, 0, 1, 1, 1])
    scores_NK = torch.full((10, 3), value)
    ap_CK = average_precision(scores_NK, labels_N)
    prevalence_C = torch.tensor([2, 5, 3], dtype=torch.float64) / 10
    torch.testing.assert_close(ap_CK, prevalence_C[:, None].expand(3, 3), rtol=0, atol=TOL)


def test_duplicate_columns_give_bit_identical_ap():
    rng = np.random.default_rng(1)
    base_N3 = np.maximum(rng.normal(size=(500, 3)), 0).astype(np.float32)
    scores_NK = torch.from_numpy(base_N3[:, [0, 1, 2, 0, 1, 2, 2, 0]])
    labels_N = torch.from_numpy(rng.integers(-1, 5, 500))
    ap_CK = average_precision(scores_NK, labels_N, chunk=3)  # duplicates land in different chunks
    assert torch.equal(ap_CK[:, [0, 1, 2]], ap_CK[:, [3, 4, 5]])
    assert torch.equal(ap_CK[:, 2], ap_CK[:, 6]) and torch.equal(ap_CK[:, 0], ap_CK[:, 7])


def test_ignored_rows_are_removed_not_counted_as_negatives():
    scores_NK = torch.tensor([[3.0], [2.0], [2.0], [1.0], [0.0], [0.0]])
    labels_N = torch.tensor([-1, 0, 1, 0, -1, 1])
    ap_CK = average_precision(scores_NK, labels_N)
    kept_N = (labels_N >= 0).numpy()
    for c in range(2):
        expected = average_precision_score(labels_N.numpy()[kept_N] == c, scores_NK.numpy()[kept_N, 0])
        assert abs(ap_CK[c, 0].item() - expected) <= TOL
    # Counting the top-scored ignored row as a negative would lower class 0's AP.
    assert ap_CK[0, 0].item() > average_precision_score(labels_N.numpy() == 0, scores_NK.numpy()[:, 0])


def test_class_without_positives_gets_nan_ap_and_best_index_minus_one():
    scores_NK = torch.rand(20, 4)
    labels_N = torch.tensor([0, 2] * 10)
    ap_CK = average_precision(scores_NK, labels_N, n_classes=4)
    assert ap_CK.shape == (4, 4)
    assert torch.isnan(ap_CK[[1, 3]]).all() and not torch.isnan(ap_CK[[0, 2]]).any()
    best_C, index_C = best_per_class(ap_CK)
    assert torch.isnan(best_C[[1, 3]]).all()
    assert index_C[[1, 3]].tolist() == [-1, -1]


def test_single_example_positive_has_ap_one():
    ap_CK = average_precision(torch.tensor([[0.3, 0.0, -1.0]]), torch.tensor([1]))
    assert torch.isnan(ap_CK[0]).all()
    assert ap_CK[1].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_scores_raise_naming_the_columns(bad):
    scores_NK = torch.rand(50, 12)
    scores_NK[7, 3] = bad
    scores_NK[0, 9] = bad
    scores_NK[49, 10] = float("nan")
    with pytest.raises(ValueError, match=r"3 prototype column\(s\); first: \[3, 9, 10\]"):
        average_precision(scores_NK, torch.zeros(50, dtype=torch.int64), chunk=4)


def test_negative_zero_ties_with_positive_zero():
    rng = np.random.default_rng(2)
    # Negative scores too, so the zeros sit mid-column and get ranked rather than forming the bottom group.
    scores_NK = np.round(rng.normal(size=(300, 4)), 1) + 0.0  # + 0.0: every zero is +0.0
    signed_NK = np.where((scores_NK == 0) & (rng.random((300, 4)) < 0.5), -0.0, scores_NK)
    assert np.signbit(signed_NK[signed_NK == 0]).any() and not np.signbit(scores_NK[scores_NK == 0]).any()
    labels_N = rng.integers(0, 3, 300)
    for dtype in (np.float32, np.float64):
        ap_CK = average_precision(signed_NK.astype(dtype), labels_N)
        assert torch.equal(ap_CK, average_precision(scores_NK.astype(dtype), labels_N))
        assert_same_ap(ap_CK, sklearn_ap_class_ids(signed_NK.astype(dtype), labels_N, 3))


def test_best_per_class_ties_go_to_the_lowest_index():
    nan = float("nan")
    ap_CK = torch.tensor(
        [[0.2, 0.5, 0.5, 0.1], [0.7, 0.7, 0.7, 0.7], [nan, nan, nan, nan], [nan, 0.3, nan, 0.3]], dtype=torch.float64
    )
    best_C, index_C = best_per_class(ap_CK)
    assert index_C.tolist() == [1, 0, -1, 1]
    torch.testing.assert_close(best_C, torch.tensor([0.5, 0.7, nan, 0.3], dtype=torch.float64), equal_nan=True)


def test_chunking_gives_identical_results():
    rng = np.random.default_rng(3)
    scores_NK = torch.from_numpy(np.round(np.maximum(rng.normal(size=(400, 17)), 0), 1).astype(np.float32))
    labels_N = torch.from_numpy(rng.integers(-1, 6, 400))
    positive_NC = torch.from_numpy(rng.random((400, 3)) < 0.2)
    for labels in (labels_N, positive_NC):
        whole_CK = average_precision(scores_NK, labels)
        for chunk in (1, 4, 16, 100):
            assert torch.equal(average_precision(scores_NK, labels, chunk=chunk), whole_CK)


@pytest.mark.parametrize("workers", [2, 3, 5])
@pytest.mark.parametrize("multi_hot", [False, True])
def test_blocks_side_by_side_give_the_same_bits_as_blocks_one_at_a_time(workers, multi_hot):
    gen = torch.Generator().manual_seed(12)
    scores_NK = torch.randn(3000, 23, generator=gen).clamp_(min=0).mul_(100).round_()  # exact zeros and ties
    if multi_hot:
        labels = torch.rand(3000, 3, generator=gen) < 0.2
    else:
        labels = torch.randint(-1, 6, (3000,), generator=gen)
    serial_CK = average_precision(scores_NK, labels, workers=1)
    for chunk in (None, 1, 4, 7):
        assert torch.equal(average_precision(scores_NK, labels, chunk=chunk, workers=workers), serial_CK)


def test_blocks_side_by_side_under_inference_mode_equal_blocks_one_at_a_time():
    scores_NK, labels_N = torch.rand(500, 40), torch.randint(-1, 3, (500,))
    serial_CK = average_precision(scores_NK, labels_N, workers=1)
    with torch.inference_mode():  # the AP is then an inference tensor, writable only in inference mode
        assert torch.equal(average_precision(scores_NK, labels_N, workers=2, chunk=4), serial_CK)


def test_side_by_side_blocks_leave_torch_thread_counts_as_they_were():
    before = torch.get_num_threads()
    counts = []
    try:
        torch.set_num_threads(3)
        average_precision(torch.rand(200, 40), torch.randint(0, 3, (200,)), workers=2, chunk=4)
        counts.append(torch.get_num_threads())
        # torch gives threads that start later the count set last: the workers' one-thread count must not leak.
        thread = threading.Thread(target=lambda: counts.append(torch.get_num_threads()))
        thread.start()
        thread.join()
    finally:
        torch.set_num_threads(before)
    assert counts == [3, 3]


def test_workers_below_one_raise():
    with pytest.raises(ValueError, match="workers"):
        average_precision(torch.rand(10, 2), torch.randint(0, 2, (10,)), workers=0)


def test_numpy_input_equals_tensor_input():
    rng = np.random.default_rng(4)
    scores_NK = rng.normal(size=(100, 5))
    labels_N = rng.integers(0, 3, 100)
    assert torch.equal(average_precision(scores_NK, labels_N), average_precision(torch.tensor(scores_NK), labels_N))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_narrow_float_scores_equal_sklearn(dtype):
    rng = np.random.default_rng(5)
    scores_NK = torch.from_numpy(np.maximum(rng.normal(size=(300, 4)), 0)).to(dtype)
    labels_N = rng.integers(0, 3, 300)
    ap_CK = average_precision(scores_NK, labels_N)
    assert_same_ap(ap_CK, sklearn_ap_class_ids(scores_NK.float().numpy(), labels_N, 3))


@pytest.mark.parametrize(("labels", "n_classes"), [([0, 1, 2], 2), ([0, -2, 1], None), ([0, 1, 3], 3)])
def test_out_of_range_int_labels_raise(labels, n_classes):
    with pytest.raises(ValueError, match="label"):
        average_precision(torch.rand(3, 2), torch.tensor(labels), n_classes)


def test_ignored_rows_do_not_change_the_callers_scores():
    scores_NK = torch.rand(30, 3)
    before_NK = scores_NK.clone()
    average_precision(scores_NK, torch.tensor([-1, 0, 1] * 10))
    assert torch.equal(scores_NK, before_NK)


def test_scores_made_under_inference_mode_are_accepted():
    with torch.inference_mode():
        scores_NK = torch.rand(30, 3)
    ap_CK = average_precision(scores_NK, torch.tensor([-1, 0, 1] * 10))
    assert not torch.isnan(ap_CK).any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    rng = np.random.default_rng(6)
    scores_NK = torch.from_numpy(np.maximum(rng.normal(size=(50_000, 40)), 1.0).astype(np.float32) - 1.0)
    labels_N = torch.from_numpy(rng.integers(-1, 20, 50_000))
    positive_NC = torch.from_numpy(rng.random((50_000, 3)) < 0.1)
    for labels in (labels_N, positive_NC):
        cpu_CK = average_precision(scores_NK, labels)
        cuda_CK = average_precision(scores_NK.cuda(), labels.cuda())
        assert cuda_CK.device.type == "cuda"
        torch.testing.assert_close(cuda_CK.cpu(), cpu_CK, rtol=0, atol=TOL, equal_nan=True)


@pytest.fixture(autouse=True)
def _quiet_sklearn():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_equals_sklearn_on_tied_nonnegative_scores_with_ignored_rows(data):
    # All scores >= 0 (ReLU-like): the engine orders them by their float bits alone, and the zeros are the bottom group.
    scores_NK = np.abs(data.draw(tied_scores(max_n=80, max_k=9)))
    n_classes = data.draw(st.integers(1, 6))
    labels_N = data.draw(hnp.arrays(np.int64, scores_NK.shape[0], elements=st.integers(-1, n_classes - 1)))
    chunk = data.draw(st.one_of(st.none(), st.integers(1, 9)))  # powers of two and not
    ap_CK = average_precision(torch.from_numpy(scores_NK), torch.from_numpy(labels_N), n_classes, chunk=chunk)
    assert_same_ap(ap_CK, sklearn_ap_class_ids(scores_NK, labels_N, n_classes))


def test_many_classes_give_the_same_ap_as_few():
    # 40,000 classes leave too few bits for a 32-bit second sort key, so the engine sorts 64-bit keys instead.
    rng = np.random.default_rng(7)
    scores_NK = np.round(np.maximum(rng.normal(size=(20_000, 3)), 0), 2).astype(np.float32)  # ties among nonzeros
    labels_N = rng.integers(-1, 5, 20_000)
    few_CK = average_precision(scores_NK, labels_N, 5)
    many_CK = average_precision(scores_NK, np.where(labels_N >= 0, labels_N * 7919, -1), 40_000)
    assert torch.equal(many_CK[torch.arange(5) * 7919], few_CK)
    assert torch.isnan(many_CK[1]).all()
    assert_same_ap(few_CK, sklearn_ap_class_ids(scores_NK, labels_N, 5))


def test_chunking_gives_identical_results_when_blocks_have_different_minima():
    rng = np.random.default_rng(8)
    scores_NK = np.round(np.maximum(rng.normal(size=(300, 7)), 0), 1)
    scores_NK[:, 0] -= 1.0  # only column 0 has negatives: blocks without it have minimum 0
    scores_NK = torch.from_numpy(scores_NK.astype(np.float32))
    labels_N = torch.from_numpy(rng.integers(-1, 4, 300))
    whole_CK = average_precision(scores_NK, labels_N)
    for chunk in (1, 2, 3):
        assert torch.equal(average_precision(scores_NK, labels_N, chunk=chunk), whole_CK)
    assert_same_ap(whole_CK, sklearn_ap_class_ids(scores_NK.numpy(), labels_N.numpy(), 4))


def test_strided_scores_equal_contiguous_scores():
    rng = np.random.default_rng(9)
    scores_KN = np.maximum(rng.normal(size=(6, 500)), 0).astype(np.float32)
    labels_N = torch.from_numpy(rng.integers(-1, 3, 500))
    strided_NK = torch.from_numpy(scores_KN).T  # column-major: every row is strided
    expected_CK = average_precision(strided_NK.contiguous(), labels_N)
    assert torch.equal(average_precision(strided_NK, labels_N, chunk=4), expected_CK)
    assert torch.equal(average_precision(strided_NK[:, 1:5], labels_N), expected_CK[:, 1:5])


def test_class_with_only_positives_has_ap_one():
    # Every kept row is class 0 (one class), or a multi-hot column is all True: any ranking gives precision 1.
    rng = np.random.default_rng(10)
    scores_NK = torch.from_numpy(np.round(np.maximum(rng.normal(size=(200, 4)), 0), 1).astype(np.float32))
    labels_N = torch.from_numpy(np.where(rng.random(200) < 0.1, -1, 0))
    assert average_precision(scores_NK, labels_N).tolist() == [[1.0] * 4]
    positive_NC = torch.from_numpy(np.stack([np.ones(200, bool), np.zeros(200, bool), rng.random(200) < 0.3], 1))
    ap_CK = average_precision(scores_NK, positive_NC)
    assert ap_CK[0].tolist() == [1.0] * 4 and torch.isnan(ap_CK[1]).all()
    assert_same_ap(ap_CK, sklearn_ap(scores_NK.numpy(), positive_NC.numpy()))
