"""SpikeDetector, feature_norm_penalty and check_finite (sdm_triton.stability)."""

import math
import random
import statistics

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sdm_triton.stability import SpikeDetector, check_finite, feature_norm_penalty


def _feed(detector, series):
    return [detector.update(x) for x in series]


# --------------------------------------------------------------------------- SpikeDetector

def test_flat_series_never_triggers():
    det = SpikeDetector()
    assert not any(_feed(det, [1.0] * 500))
    assert det.steps == 500 and det.spikes == 0


def test_noisy_series_does_not_trigger():
    rng = random.Random(0)
    det = SpikeDetector()
    series = [2.0 + rng.gauss(0.0, 0.1) for _ in range(3000)]
    assert sum(_feed(det, series)) == 0


def test_decaying_training_curve_does_not_trigger():
    # A typical loss curve: fast decay plus noise; it never rises above its recent median.
    rng = random.Random(1)
    det = SpikeDetector()
    series = [0.3 + 5.0 * math.exp(-t / 40) + rng.gauss(0.0, 0.05) for t in range(1000)]
    assert sum(_feed(det, series)) == 0


def test_real_spike_triggers_once():
    rng = random.Random(2)
    det = SpikeDetector()
    base = [1.0 + rng.gauss(0.0, 0.02) for _ in range(60)]
    assert not any(_feed(det, base))
    assert det.update(2.0)
    assert not det.update(1.0)
    assert det.spikes == 1 and det.steps == 62
    assert det.spike_rate == pytest.approx(1 / 62)


def test_warmup_transients_do_not_trigger():
    det = SpikeDetector(warmup=20)
    early = [10.0, 0.1, 50.0, 3.0, 200.0, 0.5, 1e4, 2.0, 1.0, 0.9,
             30.0, 1.1, 1.0, 1e3, 0.9, 1.0, 0.95, 1.05, 1.0, 0.98]
    assert len(early) == 20
    assert not any(_feed(det, early))
    assert det.threshold() is not None          # judging starts with the 21st loss
    assert det.update(1e6)


def test_mad_floor_ignores_small_bump_on_constant_series():
    # The seed's early-training failure: MAD ~ 0 made every wobble a "spike".
    series = [1.0 + (1e-4 if i % 2 else -1e-4) for i in range(50)]
    det = SpikeDetector()
    _feed(det, series)
    assert not det.update(1.35)  # +35% clears the margin, but 1.35 < 1 + 6 * 1.4826 * 0.05 (the raw MAD is 1e-4)
    assert det.update(1.5)
    bare = SpikeDetector(mad_floor=0.0)
    _feed(bare, series)
    assert bare.update(1.35)


def test_relative_margin_at_large_loss():
    det = SpikeDetector()
    _feed(det, [100.0 + (0.01 if i % 2 else -0.01) for i in range(40)])
    assert not det.update(105.0)      # far above the MAD threshold, but only +5%
    assert det.update(120.0)          # +20%
    no_margin = SpikeDetector(rel_margin=0.0)
    _feed(no_margin, [100.0 + (0.01 if i % 2 else -0.01) for i in range(40)])
    assert no_margin.update(105.0)


def test_negative_median_uses_its_magnitude():
    # Reverse-KL SDM can sit slightly below zero.
    det = SpikeDetector()
    _feed(det, [-0.01] * 40)
    assert not det.update(-0.005)
    assert det.update(1.0)
    # The margin is 15% of |median| above the median, also for a negative median.
    det = SpikeDetector()
    _feed(det, [-10.0] * 40)
    assert not det.update(-9.0)    # above the floor threshold -9.56, but within -10 + 1.5
    assert det.update(-8.0)


def test_level_shift_is_eventually_accepted():
    det = SpikeDetector(window=20, warmup=10)
    _feed(det, [1.0] * 30)
    flags = _feed(det, [3.0] * 15)
    assert flags[0]
    assert not flags[-1]                      # the new level now fills half the window
    assert flags.index(False) == 10           # accepted once the median moved


def test_non_finite_loss_is_a_spike_and_stays_out_of_the_window():
    det = SpikeDetector(warmup=5)
    assert det.update(float("nan"))           # even during the warm-up
    _feed(det, [1.0] * 10)
    assert det.update(float("inf"))
    assert all(math.isfinite(x) for x in det.history)
    assert det.spikes == 2 and det.steps == 12
    assert not det.update(1.0)


def test_window_is_bounded():
    det = SpikeDetector(window=7, warmup=3)
    _feed(det, range(20))
    assert det.history == [13.0, 14.0, 15.0, 16.0, 17.0, 18.0, 19.0]


def test_load_state_dict_keeps_newest_within_window():
    det = SpikeDetector(window=4, warmup=2)
    det.load_state_dict({"history": [1, 2, 3, 4, 5, 6], "steps": 6, "spikes": 0})
    assert det.history == [3.0, 4.0, 5.0, 6.0]


def test_state_dict_round_trip_and_reset():
    rng = random.Random(3)
    series = [1.0 + rng.gauss(0, 0.05) for _ in range(80)] + [5.0] + [1.0 + rng.gauss(0, 0.05) for _ in range(40)]
    full = SpikeDetector()
    expected = _feed(full, series)

    first = SpikeDetector()
    got = _feed(first, series[:70])
    resumed = SpikeDetector()
    resumed.load_state_dict(first.state_dict())
    got += _feed(resumed, series[70:])
    assert got == expected
    assert (resumed.steps, resumed.spikes) == (full.steps, full.spikes) == (121, 1)
    assert resumed.history == full.history

    resumed.reset()
    assert (resumed.steps, resumed.spikes, resumed.history) == (0, 0, [])
    assert resumed.threshold() is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_load_state_dict_rejects_a_non_finite_history(bad):
    """A non-finite loss in a loaded window would make the median / MAD NaN and switch the
    detector off for good (every comparison with NaN is False): a ValueError, and the
    detector keeps its state (nothing half loaded)."""
    det = SpikeDetector(window=10, warmup=3)
    _feed(det, [1.0, 1.1, 0.9, 1.0])
    before = det.state_dict()
    with pytest.raises(ValueError, match="history"):
        det.load_state_dict({"history": [1.0, bad, 1.0, 1.0], "steps": 4, "spikes": 0})
    assert det.state_dict() == before
    assert det.update(50.0), "the detector must still detect after a rejected load"


@pytest.mark.parametrize("missing", ["history", "steps", "spikes"])
def test_load_state_dict_names_a_missing_key(missing):
    """A state without one of its keys is a ValueError naming the key (not a bare KeyError),
    and the detector is left as it was."""
    state = {"history": [1.0, 2.0], "steps": 2, "spikes": 0}
    del state[missing]
    det = SpikeDetector(window=5, warmup=2)
    det.update(3.0)
    with pytest.raises(ValueError, match=missing):
        det.load_state_dict(state)
    assert (det.steps, det.spikes, det.history) == (1, 0, [3.0])


@pytest.mark.parametrize("state, exc", [
    ({"history": [1.0], "steps": -1, "spikes": 0}, ValueError),
    ({"history": [1.0], "steps": 1.5, "spikes": 0}, ValueError),
    ({"history": [1.0], "steps": 1, "spikes": 2}, ValueError),
    ({"history": [1.0], "steps": 1, "spikes": True}, ValueError),
    ({"history": ["1.0"], "steps": 1, "spikes": 0}, TypeError),
    ({"history": 1.0, "steps": 1, "spikes": 0}, TypeError),
    ([1.0, 2.0], TypeError),
])
def test_load_state_dict_rejects_malformed_states(state, exc):
    det = SpikeDetector(window=5, warmup=2)
    with pytest.raises(exc):
        det.load_state_dict(state)
    assert (det.steps, det.spikes, det.history) == (0, 0, [])


@pytest.mark.parametrize("loss", ["1.5", b"1.5", [1.5], None, True, torch.tensor([1.5, 2.0]), torch.tensor(True),
                                  torch.tensor(1 + 1j)],
                         ids=["str", "bytes", "list", "None", "bool", "2-element", "bool-tensor", "complex"])
def test_update_rejects_what_is_not_a_loss(loss):
    """``update("1.5")`` used to be accepted (float() parses strings): a TypeError, and the
    counters do not move."""
    det = SpikeDetector(window=5, warmup=2)
    with pytest.raises(TypeError, match="loss"):
        det.update(loss)
    assert (det.steps, det.spikes, det.history) == (0, 0, [])


def test_update_accepts_numbers_and_0dim_tensors():
    det = SpikeDetector(window=10, warmup=3)
    for value in (1, 1.0, torch.tensor(1.0), torch.tensor(1.0, dtype=torch.float64), torch.tensor(1),
                  torch.tensor(1.0, requires_grad=True).detach()):
        assert not det.update(value)
    assert det.history == [1.0] * 6
    assert det.update(torch.tensor(100.0))


@pytest.mark.parametrize("kwargs", [
    dict(window=0), dict(warmup=0), dict(window=10, warmup=11), dict(k=-1.0),
    dict(mad_floor=float("nan")), dict(rel_margin=-0.1), dict(window=2.5),
])
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        SpikeDetector(**kwargs)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=120),
       st.integers(1, 30), st.integers(0, 10))
def test_loss_at_or_below_median_is_never_a_spike(series, window, warmup_offset):
    det = SpikeDetector(window=window + warmup_offset, warmup=window)
    for x in series:
        med = statistics.median(det.history) if det.history else math.inf
        flagged = det.update(x)
        if x <= med:
            assert not flagged


# --------------------------------------------------------------------------- feature_norm_penalty

def _rows_with_norms(norms, dim=5, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(len(norms), dim, generator=gen, dtype=dtype)
    return f / f.norm(dim=1, keepdim=True) * torch.tensor(norms, dtype=dtype)[:, None]


def test_penalty_against_hand_computation():
    f = _rows_with_norms([5.0, 8.0, 11.0, 0.0, 20.0, 7.0])
    # excess = relu(|n - 8| - 2): 1, 0, 1, 6, 10, 0 -> squares 1, 0, 1, 36, 100, 0
    expected = 5e-3 * (1 + 0 + 1 + 36 + 100 + 0) / 6
    got = feature_norm_penalty(f)
    assert got.dim() == 0
    assert got.item() == pytest.approx(expected, rel=1e-12)
    got = feature_norm_penalty(f, target=10.0, band=1.0, weight=0.5)
    # |n - 10| - 1: 4, 1, 0, 9, 9, 2 -> 16, 1, 0, 81, 81, 4
    assert got.item() == pytest.approx(0.5 * (16 + 1 + 0 + 81 + 81 + 4) / 6, rel=1e-12)


def test_penalty_mask_excludes_rows_even_nan_ones():
    f = _rows_with_norms([5.0, 8.0, 11.0, 20.0]).requires_grad_()
    mask = torch.tensor([True, True, False, False])
    garbage = f.detach().clone()
    garbage[2:] = float("nan")
    garbage.requires_grad_()
    for feats in (f, garbage):
        got = feature_norm_penalty(feats, mask=mask)
        assert got.item() == pytest.approx(5e-3 * (1 + 0) / 2, rel=1e-12)
        got.backward()
        assert torch.isfinite(feats.grad).all()
        assert (feats.grad[2:] == 0).all()
        assert (feats.grad[0] != 0).any()


def test_penalty_zero_when_no_row_present():
    f = _rows_with_norms([50.0, 0.0]).requires_grad_()
    got = feature_norm_penalty(f, mask=torch.zeros(2, dtype=torch.bool))
    assert got.item() == 0.0
    got.backward()
    assert (f.grad == 0).all()
    assert feature_norm_penalty(torch.empty(0, 4)).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_penalty_is_fp32_for_low_precision(dtype):
    f = (_rows_with_norms([3.0, 12.5, 30.0], dtype=torch.float32)).to(dtype).requires_grad_()
    got = feature_norm_penalty(f)
    assert got.dtype == torch.float32 and got.dim() == 0
    norms = f.detach().double().norm(dim=1)
    expected = 5e-3 * torch.relu((norms - 8).abs() - 2).square().mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    got.backward()
    assert f.grad.dtype == dtype and torch.isfinite(f.grad.float()).all()


def test_penalty_gradcheck():
    # Norms away from the kinks at target +- band and from zero.
    f = _rows_with_norms([3.0, 7.0, 11.5, 25.0, 0.5], dim=4).requires_grad_()
    mask = torch.tensor([True, True, True, False, True])
    assert torch.autograd.gradcheck(lambda x: feature_norm_penalty(x, weight=0.1), (f,))
    assert torch.autograd.gradcheck(lambda x: feature_norm_penalty(x, weight=0.1, mask=mask), (f,))


def test_penalty_zero_row_has_finite_gradient():
    f = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    got = feature_norm_penalty(f)
    assert got.item() == pytest.approx(5e-3 * 36)
    got.backward()
    assert torch.isfinite(f.grad).all()


def test_penalty_leading_dims_and_validation():
    f = _rows_with_norms([5.0, 8.0, 11.0, 20.0]).reshape(2, 2, 5)
    mask = torch.tensor([[True, False], [True, True]])
    assert feature_norm_penalty(f, mask=mask).item() == pytest.approx(5e-3 * (1 + 1 + 100) / 3)
    with pytest.raises(ValueError, match="mask must have shape"):
        feature_norm_penalty(f, mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError):
        feature_norm_penalty(f, mask=torch.ones(2, 2))
    with pytest.raises(TypeError):
        feature_norm_penalty(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError):
        feature_norm_penalty(f, band=-1.0)


@pytest.mark.parametrize("shape", [(3, 0), (0,), (2, 2, 0)])
def test_penalty_rejects_an_empty_feature_dim(shape):
    """D = 0 has no norm to keep in a band: a ValueError naming features (it returned
    5e-3 * relu(8 - 2)^2 = 0.18 for every row, a penalty no gradient can reduce)."""
    with pytest.raises(ValueError, match="features"):
        feature_norm_penalty(torch.zeros(shape))
    with pytest.raises(ValueError, match="features"):
        feature_norm_penalty(torch.zeros(shape), mask=torch.ones(shape[:-1], dtype=torch.bool))


# --------------------------------------------------------------------------- check_finite

def test_check_finite_passes_on_finite_inputs():
    check_finite(torch.randn(3, 4), None, torch.arange(5), torch.tensor(True), names=["q", "mask", "ids", "b"])
    check_finite()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_names_first_bad_input(bad):
    good = torch.randn(4, 3)
    worse = torch.randn(2, 3)
    worse[1, 1] = bad
    also_bad = torch.full((2,), float("nan"))
    with pytest.raises(ValueError, match=r"^g contains non-finite values"):
        check_finite(good, worse, also_bad, names=("q", "g", "logit_scale"))
    with pytest.raises(ValueError, match=r"^tensor 1 contains non-finite"):
        check_finite(good, worse)


def test_check_finite_reports_counts_and_bf16():
    t = torch.tensor([1.0, float("nan"), float("inf"), float("nan")], dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"2 NaN, 1 Inf"):
        check_finite(t, names=["feats"])


def test_check_finite_argument_errors():
    with pytest.raises(ValueError, match="names"):
        check_finite(torch.ones(1), torch.ones(1), names=["only_one"])
    with pytest.raises(TypeError):
        check_finite([1.0, float("nan")])
