"""Pure client-side tests (no daemon): LocalAccumulator against the two-pass
reference, merging, the data-parallel all-reduce, input conversion, local
validation and the wire encodings."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import vcid
from vcid._arrays import Features, check_features, encode

import reference as ref

STAT_NAMES = ("class_counts", "class_means", "scatter", "within_trace", "unit_sum",
              "unit_count", "unit_within_trace")


def assert_stats_close(acc: vcid.LocalAccumulator, expected: dict, rtol=1e-10, atol=1e-9):
    for name in STAT_NAMES:
        got = getattr(acc, name)
        want = expected[name]
        assert got.shape == np.shape(want), name
        if name in ("class_counts", "unit_count"):
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def test_accumulator_equals_two_pass_reference(rng):
    x, y = ref.clustered(rng, 500, 12, 5)
    acc = vcid.LocalAccumulator(5, 12)
    for start in range(0, 500, 37):
        acc.update(x[start:start + 37], y[start:start + 37])
    assert acc.samples == 500
    assert_stats_close(acc, ref.sufficient_statistics(x, y, 5))
    np.testing.assert_allclose(acc.global_mean, x.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(acc.scatter, acc.scatter.T)


def test_large_common_offset_keeps_its_digits(rng):
    """Σx² − N·x̄² would lose everything here; the Chan merge must not."""
    x, y = ref.clustered(rng, 400, 6, 4, spread=1e-3, offset=1e8)
    acc = vcid.LocalAccumulator(4, 6)
    for start in range(0, 400, 50):
        acc.update(x[start:start + 50], y[start:start + 50])
    expected = ref.sufficient_statistics(x, y, 4)
    # The data themselves carry only ~1e-5 relative precision of the spread
    # (ulp(1e8) = 1.5e-8 against a spread of 1e-3); 1e-4 is far inside what
    # the naive formula would give, which is checked to be useless below.
    np.testing.assert_allclose(acc.scatter, expected["scatter"], rtol=1e-4,
                               atol=1e-4 * np.abs(expected["scatter"]).max())
    np.testing.assert_allclose(acc.within_trace, expected["within_trace"], rtol=1e-4)
    naive = np.array([(x[y == c] ** 2).sum() - (y == c).sum() * (x[y == c].mean(0) ** 2).sum()
                      for c in range(4)])
    assert np.max(np.abs(naive - expected["within_trace"]) / expected["within_trace"]) > 1.0


def test_merge_equals_one_accumulator_over_all_data(rng):
    x, y = ref.clustered(rng, 600, 9, 6)
    whole = vcid.LocalAccumulator(6, 9).update(x, y)
    parts = [vcid.LocalAccumulator(6, 9) for _ in range(3)]
    # Uneven parts, one of which misses some classes entirely.
    order = np.argsort(y, kind="stable")
    chunks = [order[:50], order[50:400], order[400:]]
    for acc, idx in zip(parts, chunks):
        acc.update(x[idx], y[idx])
    merged = vcid.LocalAccumulator(6, 9)
    for acc in reversed(parts):
        merged.merge(acc)
    merged.merge(vcid.LocalAccumulator(6, 9))  # merging an empty one changes nothing
    for name in STAT_NAMES:
        np.testing.assert_allclose(getattr(merged, name), getattr(whole, name),
                                   rtol=1e-10, atol=1e-9, err_msg=name)
    assert_stats_close(merged, ref.sufficient_statistics(x, y, 6))


def test_merge_rejects_other_shapes():
    with pytest.raises(ValueError, match=r"other: expected num_classes=3, feature_dim=4, "
                                         r"received num_classes=3, feature_dim=5"):
        vcid.LocalAccumulator(3, 4).merge(vcid.LocalAccumulator(3, 5))
    with pytest.raises(ValueError, match="other: expected a LocalAccumulator"):
        vcid.LocalAccumulator(3, 4).merge("nope")


def all_reduce_in_threads(ranks: list) -> list:
    """Each accumulator's ``all_reduce`` in a thread of its own, with a shared
    sum collective (what torch.distributed.all_reduce does)."""
    barrier = threading.Barrier(len(ranks))
    lock = threading.Lock()
    box: dict = {}

    def sum_fn(v):
        with lock:
            box["sum"] = box.get("sum", 0) + v
        barrier.wait()
        total = box["sum"].copy()
        barrier.wait()
        if barrier.wait() == 0:
            box.clear()
        barrier.wait()
        return total

    results = [None] * len(ranks)

    def work(i):
        results[i] = ranks[i].all_reduce(sum_fn)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(ranks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_all_reduce_across_simulated_ranks_equals_merge(rng):
    """Three 'ranks' in threads with a shared sum collective (what
    torch.distributed.all_reduce does) give the merged statistics on every rank."""
    x, y = ref.clustered(rng, 450, 7, 4, offset=50.0)
    shards = [slice(0, 100), slice(100, 120), slice(120, 450)]
    ranks = [vcid.LocalAccumulator(4, 7).update(x[s], y[s]) for s in shards]
    results = all_reduce_in_threads(ranks)
    expected = ref.sufficient_statistics(x, y, 4)
    for out in results:
        assert_stats_close(out, expected, rtol=1e-9, atol=1e-8)


def test_from_stats_round_trip_and_checks(rng):
    x, y = ref.clustered(rng, 80, 3, 3)
    acc = vcid.LocalAccumulator(3, 3).update(x, y)
    again = vcid.LocalAccumulator.from_stats(acc.class_counts, acc.class_means, acc.scatter,
                                             acc.within_trace, acc.unit_sum, acc.unit_count,
                                             acc.unit_within_trace)
    for name in STAT_NAMES:
        np.testing.assert_array_equal(getattr(again, name), getattr(acc, name))
    bad = acc.scatter
    bad[0, 1] += 1.0
    with pytest.raises(vcid.ArgumentError, match=r"scatter: expected a symmetric matrix "
                                                 r"\(\[1\]\[0\] = \[0\]\[1\]\)"):
        vcid.LocalAccumulator.from_stats(acc.class_counts, acc.class_means, bad,
                                         acc.within_trace, acc.unit_sum, acc.unit_count)
    # Class 1 emptied of samples and unit vectors, but not of its mean.
    counts, units, unit_sum = acc.class_counts, acc.unit_count, acc.unit_sum
    counts[1] = units[1] = 0
    unit_sum[1] = 0.0
    uwt = acc.unit_within_trace
    uwt[1] = 0.0
    with pytest.raises(vcid.ArgumentError, match="class_means: expected zero mean and "
                                                 "within_trace for class 1, which has no"):
        vcid.LocalAccumulator.from_stats(counts, acc.class_means, acc.scatter,
                                         acc.within_trace, unit_sum, units, uwt)
    with pytest.raises(ValueError, match=r"unit_count: expected shape \(3,\)"):
        vcid.LocalAccumulator.from_stats(acc.class_counts, acc.class_means, acc.scatter,
                                         acc.within_trace, acc.unit_sum, [1, 2])


def test_accumulator_shape_arguments():
    with pytest.raises(ValueError, match="num_classes: expected an integer in \\[2"):
        vcid.LocalAccumulator(1, 4)
    with pytest.raises(ValueError, match="feature_dim: expected an integer >= 1, received str"):
        vcid.LocalAccumulator(3, "4")


def test_zero_rows_do_not_enter_unit_sums():
    x = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 2.0]])
    acc = vcid.LocalAccumulator(2, 2).update(x, np.array([0, 0, 1]))
    np.testing.assert_array_equal(acc.unit_count, [1, 1])
    np.testing.assert_allclose(acc.unit_sum, [[0.6, 0.8], [0.0, 1.0]])


# ------------------------------------------------- unit-vector within trace


def stats_args(acc: vcid.LocalAccumulator, **changes) -> list:
    args = {name: getattr(acc, name) for name in STAT_NAMES}
    args.update(changes)
    return [args[name] for name in STAT_NAMES]


def offset_data(rng, n=600, d=8, k=4):
    """Features 1e4 + 1e-2·(class centre + noise): every direction within
    ~1e-6 of the others, so c − ‖Σu‖²/c keeps only ~4 digits."""
    y = rng.integers(0, k, size=n)
    centres = rng.normal(size=(k, d)) * 3.0
    return 1e4 + 1e-2 * (centres[y] + rng.normal(size=(n, d))), y


def test_unit_within_trace_reference_value():
    # Class 0: u = (.6, .8), (.8, .6), mean (.7, .7): Σ‖u − ū‖² = 4·0.01;
    # the zero row enters neither the unit sums nor the trace.
    x = np.array([[3.0, 4.0], [0.0, 0.0], [4.0, 3.0], [0.0, 2.0], [5.0, 0.0]])
    acc = vcid.LocalAccumulator(3, 2).update(x, np.array([0, 0, 0, 1, 1]))
    np.testing.assert_array_equal(acc.unit_count, [2, 2, 0])
    # Class 1: u = (0, 1), (1, 0), mean (.5, .5): 4·0.25.
    np.testing.assert_allclose(acc.unit_within_trace, [0.04, 1.0, 0.0], rtol=1e-14, atol=1e-16)
    # The same value when the rows arrive one at a time (Chan merge).
    one_by_one = vcid.LocalAccumulator(3, 2)
    for row, label in zip(x, [0, 0, 0, 1, 1]):
        one_by_one.update(row[None, :], [label])
    np.testing.assert_allclose(one_by_one.unit_within_trace, [0.04, 1.0, 0.0],
                               rtol=1e-14, atol=1e-16)


def test_tiny_rows_are_normalised_without_underflow():
    """‖h‖² underflows to 0 for 3e-170; the row is still a unit vector (the
    daemon rescales such rows too)."""
    x = np.array([[3e-170, 4e-170], [6e-170, 8e-170]])
    acc = vcid.LocalAccumulator(2, 2).update(x, np.array([0, 0]))
    np.testing.assert_array_equal(acc.unit_count, [2, 0])
    np.testing.assert_allclose(acc.unit_sum[0], [1.2, 1.6], rtol=1e-15)
    assert acc.unit_within_trace[0] < 1e-30


def test_unit_within_trace_keeps_its_digits_with_a_large_common_offset(rng):
    x, y = offset_data(rng)
    want = ref.sufficient_statistics(x, y, 4)["unit_within_trace"]
    assert np.all(want < 1e-9 * np.bincount(y))  # directions within ~1e-6 of each other
    whole = vcid.LocalAccumulator(4, 8).update(x, y)
    batched = vcid.LocalAccumulator(4, 8)
    start = 0
    while start < len(y):  # uneven batches, some missing classes
        size = int(rng.integers(1, 60))
        batched.update(x[start:start + size], y[start:start + size])
        start += size
    parts = [vcid.LocalAccumulator(4, 8).update(x[s], y[s])
             for s in (slice(0, 10), slice(10, 300), slice(300, 600))]
    merged = vcid.LocalAccumulator(4, 8)
    for part in parts[::-1]:
        merged.merge(part)
    for acc in (whole, batched, merged):
        np.testing.assert_allclose(acc.unit_within_trace, want, rtol=1e-9, atol=0)
    # What the unit sums alone give (from_stats without the trace, which is
    # what the daemon derives for a block that lacks it) is far off: the test
    # above can fail.
    derived = vcid.LocalAccumulator.from_stats(*stats_args(whole)[:6])
    assert np.max(np.abs(derived.unit_within_trace / want - 1)) > 1e-6


def test_unit_within_trace_is_invariant_to_the_batch_split(rng):
    x, y = offset_data(rng, n=300)
    single = vcid.LocalAccumulator(4, 8).update(x, y)
    for size in (1, 7, 64, 299):
        acc = vcid.LocalAccumulator(4, 8)
        for start in range(0, 300, size):
            acc.update(x[start:start + size], y[start:start + size])
        np.testing.assert_allclose(acc.unit_within_trace, single.unit_within_trace,
                                   rtol=1e-9, atol=0, err_msg=f"batches of {size}")
        np.testing.assert_array_equal(acc.unit_count, single.unit_count)


def test_all_reduce_corrects_the_unit_within_trace(rng):
    """Summing the ranks' traces would miss c_r·‖ū_r − ū‖²; all_reduce adds it."""
    x, y = offset_data(rng)
    shards = [slice(0, 50), slice(50, 400), slice(400, 600)]
    ranks = [vcid.LocalAccumulator(4, 8).update(x[s], y[s]) for s in shards]
    want = ref.sufficient_statistics(x, y, 4)["unit_within_trace"]
    for out in all_reduce_in_threads(ranks):
        np.testing.assert_allclose(out.unit_within_trace, want, rtol=1e-9, atol=0)
    naive = sum(r.unit_within_trace for r in ranks)
    assert np.max(np.abs(naive / want - 1)) > 1e-3


def test_from_stats_checks_the_unit_within_trace(rng):
    x, y = ref.clustered(rng, 60, 3, 3)
    x[y == 2] = 0.0  # class 2: rows, but no unit vectors
    acc = vcid.LocalAccumulator(3, 3).update(x, y)
    assert acc.unit_count[2] == 0 and acc.class_counts[2] > 0
    T = acc.unit_within_trace
    cases = [
        ([T[0], T[1]], r"unit_within_trace: expected shape \(3,\), received \(2,\)"),
        ([np.nan, T[1], 0.0], r"unit_within_trace: expected finite values"),
        ([-1e-3, T[1], 0.0], r"unit_within_trace: expected a value in \[0, unit_count\[0\] = "
                             rf"{acc.unit_count[0]}\] for class 0, received -0.001"),
        ([T[0], acc.unit_count[1] * 1.01, 0.0],
         rf"unit_within_trace: expected a value in \[0, unit_count\[1\] = {acc.unit_count[1]}\] "
         r"for class 1, received"),
        ([T[0], T[1], 0.5], r"unit_within_trace: expected a value in \[0, unit_count\[2\] = 0\] "
                            r"for class 2, received 0.5"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            vcid.LocalAccumulator.from_stats(*stats_args(acc, unit_within_trace=bad))
    unit_sum = acc.unit_sum
    unit_sum[2, 1] = 0.25
    with pytest.raises(ValueError, match="unit_sum: expected zeros for class 2, whose "
                                         "unit_count is 0"):
        vcid.LocalAccumulator.from_stats(*stats_args(acc, unit_sum=unit_sum))
    # Omitted: derived from the unit sums (c − ‖s‖²/c), close on benign data.
    derived = vcid.LocalAccumulator.from_stats(*stats_args(acc)[:6])
    np.testing.assert_allclose(derived.unit_within_trace, T, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- inputs


class ArrayLike:
    """Anything with __array__ (e.g. a pandas frame, a jax array)."""

    def __init__(self, a):
        self._a = np.asarray(a)

    def __array__(self, dtype=None, copy=None):
        return self._a if dtype is None else self._a.astype(dtype)


class FakeTensor:
    """Duck-typed like a torch tensor on an accelerator: only
    .detach().cpu().numpy() gives the data, and records that it was used."""

    def __init__(self, a):
        self._a = np.asarray(a)
        self.calls = []

    def detach(self):
        self.calls.append("detach")
        return self

    def cpu(self):
        self.calls.append("cpu")
        return self

    def numpy(self):
        self.calls.append("numpy")
        return self._a

    @property
    def dtype(self):
        return "fake.float32"


def test_tensor_like_inputs_give_the_same_statistics(rng):
    x, y = ref.clustered(rng, 64, 5, 3)
    direct = vcid.LocalAccumulator(3, 5).update(x, y)
    via_array = vcid.LocalAccumulator(3, 5).update(ArrayLike(x), ArrayLike(y))
    fx, fy = FakeTensor(x), FakeTensor(y.astype(np.int16))
    via_tensor = vcid.LocalAccumulator(3, 5).update(fx, fy)
    via_list = vcid.LocalAccumulator(3, 5).update(x.tolist(), y.tolist())
    assert fx.calls == ["detach", "cpu", "numpy"]
    for other in (via_array, via_tensor, via_list):
        for name in STAT_NAMES:
            np.testing.assert_array_equal(getattr(other, name), getattr(direct, name))


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int32,
                                   np.uint32, np.int64, np.uint64])
def test_labels_of_any_integer_dtype(dtype):
    x = np.eye(4)
    acc = vcid.LocalAccumulator(4, 4).update(x, np.arange(4).astype(dtype))
    np.testing.assert_array_equal(acc.class_counts, [1, 1, 1, 1])


# Every local validation error names the argument, the expectation and what
# was received. The same checks guard Monitor.push (tested with the daemon).
BAD_INPUTS = [
    ("1-D features", np.ones(4), np.zeros(1, int),
     r"features: expected a 2-D array of shape \(rows, feature_dim=4\), received shape \(4,\)"),
    ("3-D features", np.ones((2, 2, 2)), np.zeros(2, int),
     r"features: expected a 2-D array .* received shape \(2, 2, 2\)"),
    ("wrong feature_dim", np.ones((3, 5)), np.zeros(3, int),
     r"features: expected feature_dim=4 columns .* received 5 columns"),
    ("empty batch", np.ones((0, 4)), np.zeros(0, int),
     r"features: expected at least 1 row .* received shape \(0, 4\)"),
    ("complex features", np.ones((2, 4), complex), np.zeros(2, int),
     r"features: expected a real floating or integer dtype, received complex128"),
    ("string features", np.array([["a"] * 4]), np.zeros(1, int),
     r"features: expected a real floating or integer dtype, received <U1"),
    ("NaN", np.array([[0, 1, 2, 3], [0, 1, np.nan, 3.0]]), np.zeros(2, int),
     r"features: expected finite values, received nan at row 1, column 2"),
    ("inf", np.array([[0, 1, 2, -np.inf]]), np.zeros(1, int),
     r"features: expected finite values, received -inf at row 0, column 3"),
    ("rows != labels", np.ones((3, 4)), np.zeros(2, int),
     r"labels: expected 3 labels \(one per feature row\), received 2"),
    ("2-D labels", np.ones((3, 4)), np.zeros((3, 1), int),
     r"labels: expected a 1-D array of 3 integer labels, received shape \(3, 1\)"),
    ("float labels", np.ones((3, 4)), np.array([0.0, 1.0, 2.0]),
     r"labels: expected an integer dtype .* received dtype float64"),
    ("bool labels", np.ones((2, 4)), np.array([True, False]),
     r"labels: expected an integer dtype .* received dtype bool"),
    ("label >= K", np.ones((3, 4)), np.array([0, 3, 1]),
     r"labels: expected every label in \[0, 3\) \(num_classes=3\), received 3 at row 1"),
    ("negative label", np.ones((3, 4)), np.array([0, 1, -1]),
     r"labels: expected every label in \[0, 3\) .* received -1 at row 2"),
    ("ragged features", [[1.0, 2.0], [1.0]], np.zeros(2, int),
     r"features: expected a numpy array, an object with __array__ .* received list"),
]


@pytest.mark.parametrize("case,features,labels,message", BAD_INPUTS,
                         ids=[c[0] for c in BAD_INPUTS])
def test_local_validation_errors(case, features, labels, message):
    acc = vcid.LocalAccumulator(3, 4)
    with pytest.raises(ValueError, match=message):
        acc.update(features, labels)
    assert acc.samples == 0  # nothing was folded in


# ------------------------------------------------------------- encodings


def _edge_float32():
    bits = np.array([
        0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000,  # exact ties: even stays, odd rounds up
        0x3F808001, 0x3F807FFF,                          # just above / below a tie
        0x7F7FFFFF, 0x7F7F7FFF, 0x7F7F8000, 0xFF7FFFFF,  # near the top: some round to ±inf
        0x00008000, 0x00018000, 0x00000001, 0x807FFFFF,  # subnormals
        0x00000000, 0x80000000, 0x7F800000, 0xFF800000,  # zeros, infinities
        0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x7FBFFFFF,  # NaNs (incl. ones naive rounding
    ], dtype=np.uint32)                                  # would turn into inf)
    return bits.view(np.float32)


def test_bfloat16_rounding_matches_independent_reference(rng):
    wide = (rng.standard_normal(20000) * np.exp(rng.uniform(-80, 80, 20000))).astype(np.float32)
    values = np.concatenate([_edge_float32(), wide, rng.standard_normal(5000).astype(np.float32)])
    np.testing.assert_array_equal(vcid.float32_to_bfloat16_bits(values),
                                  ref.bfloat16_round(values))


def test_bfloat16_rounding_matches_torch_if_installed(rng):
    torch = pytest.importorskip("torch")
    values = np.concatenate([_edge_float32(), rng.standard_normal(10000).astype(np.float32)])
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = vcid.float32_to_bfloat16_bits(values)
    nan = np.isnan(values)
    np.testing.assert_array_equal(got[~nan], expected[~nan])
    assert np.all((got[nan] & 0x7F80) == 0x7F80) and np.all((got[nan] & 0x7F) != 0)


def test_bfloat16_widening_is_exact(rng):
    bits = rng.integers(0, 2**16, 5000).astype(np.uint16)
    bits = bits[(bits & 0x7F80) != 0x7F80]  # finite only
    np.testing.assert_array_equal(vcid.bfloat16_bits_to_float32(bits).astype(np.float64),
                                  ref.bfloat16_values(bits))
    np.testing.assert_array_equal(
        vcid.float32_to_bfloat16_bits(vcid.bfloat16_bits_to_float32(bits)), bits)


def test_encodings_on_the_wire(rng):
    x = rng.standard_normal((3, 4))
    f = Features(x)
    assert encode(f, "float32") == x.astype("<f4").tobytes()
    assert encode(f, "float16") == x.astype("<f2").tobytes()
    assert encode(f, "bfloat16") == ref.bfloat16_round(x.astype(np.float32)).astype("<u2").tobytes()
    # bfloat16 bit patterns pass through untouched (no float32 round trip).
    bits = ref.bfloat16_round(x.astype(np.float32))
    assert encode(Features(bits, True), "bfloat16") == bits.astype("<u2").tobytes()
    assert encode(Features(bits, True), "float32") == ref.bfloat16_values(bits).astype("<f4").tobytes()


@pytest.mark.parametrize("encoding,value,message", [
    ("float16", 70000.0, r"features: expected values within the float16 range \(±65504\), "
                         r"received inf at row 0, column 1"),
    ("bfloat16", 3.4e38, r"features: expected values within the bfloat16 range"),
    ("float32", 1e39, r"features: expected values within the float32 range"),
])
def test_overflow_in_a_narrow_encoding_is_an_error(encoding, value, message):
    f = check_features(np.array([[1.0, value]]), 2)
    with pytest.raises(ValueError, match=message):
        encode(f, encoding)


def test_round_to_encoding_matches_wire_values(rng):
    x = rng.standard_normal((10, 3)) * 100
    for enc, dtype in (("float32", "<f4"), ("float16", "<f2")):
        np.testing.assert_array_equal(vcid.round_to_encoding(x, enc),
                                      x.astype(dtype).astype(np.float64))
    np.testing.assert_array_equal(vcid.round_to_encoding(x, "bfloat16"),
                                  ref.bfloat16_values(ref.bfloat16_round(x.astype(np.float32))))


def test_ml_dtypes_bfloat16_arrays_are_taken_bit_for_bit(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = rng.standard_normal((4, 3)).astype(ml_dtypes.bfloat16)
    f = check_features(x, 3)
    assert f.is_bfloat16_bits
    np.testing.assert_array_equal(f.array, x.view(np.uint16))


def test_real_torch_bfloat16_tensor_is_sent_bit_for_bit(rng):
    torch = pytest.importorskip("torch")
    t = torch.randn(5, 3, dtype=torch.float32).to(torch.bfloat16)
    f = check_features(t, 3)
    assert f.is_bfloat16_bits
    np.testing.assert_array_equal(f.array, t.view(torch.int16).numpy().view(np.uint16))


def test_an_accumulator_pickles_as_its_statistics(rng):
    """all_gather_object and multiprocessing pickle accumulators."""
    import copy
    import pickle

    x, y = ref.clustered(rng, 300, 6, 4, offset=1e3)
    acc = vcid.LocalAccumulator(4, 6).update(x, y)
    for again in (pickle.loads(pickle.dumps(acc)), copy.deepcopy(acc), acc.copy()):
        assert again is not acc and again.samples == 300
        for name in STAT_NAMES:
            np.testing.assert_array_equal(getattr(again, name), getattr(acc, name))
    empty = pickle.loads(pickle.dumps(vcid.LocalAccumulator(3, 2)))
    assert (empty.num_classes, empty.feature_dim, empty.samples) == (3, 2, 0)
