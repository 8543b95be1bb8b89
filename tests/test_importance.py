"""Importance metrics (eq. 3, eq. 7, App. G eqs. 10-11): hand values, degenerate cases, properties, reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from reference_impl import ref_entropy, ref_importance

from flexlora_hf.config import IMPORTANCE_METRICS
from flexlora_hf.functional.scoring import importance, importance_batched, max_entropy, spectral_entropy

SETTINGS = settings(max_examples=80, deadline=None)

# Magnitudes either exactly 0 or in a range where squaring neither underflows nor overflows.
_mag = st.one_of(st.just(0.0), st.floats(min_value=1e-3, max_value=1e3))
_signed = st.builds(lambda m, neg: -m if neg else m, _mag, st.booleans())
lam_lists = st.lists(_signed, min_size=0, max_size=12)
nonzero_lam_lists = st.lists(_signed, min_size=2, max_size=12).filter(lambda xs: any(x != 0 for x in xs))


def t(xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ hand-computed values
def test_uniform_pair_is_one() -> None:
    assert spectral_entropy(t([1.0, 1.0])) == pytest.approx(1.0, abs=1e-9)


def test_concentrated_pair_is_about_zero() -> None:
    value = spectral_entropy(t([1.0, 0.0]))
    assert 0.0 <= value < 1e-9


def test_three_four_by_hand() -> None:
    # s = (9/25, 16/25); I = -(0.36 ln 0.36 + 0.64 ln 0.64) / ln 2
    expected = -(0.36 * math.log(0.36) + 0.64 * math.log(0.64)) / math.log(2)
    assert expected == pytest.approx(0.9426831892554922, rel=1e-12)
    assert spectral_entropy(t([3.0, 4.0])) == pytest.approx(expected, rel=1e-9)
    assert spectral_entropy(t([-3.0, 4.0])) == pytest.approx(expected, rel=1e-9)


def test_norm_metrics_by_hand() -> None:
    assert importance(t([3.0, -4.0]), metric="nuclear") == pytest.approx(3.5)
    assert importance(t([3.0, -4.0]), metric="frobenius") == pytest.approx(2.5)
    assert importance(t([-2.0]), metric="nuclear") == pytest.approx(2.0)  # norms are not zeroed at rank 1


def test_energy_entropy_by_hand_uses_abs() -> None:
    # eq. 10 with |λ| for λ = (-3, 4): -(3·0.36·ln .36 + 4·0.64·ln .64) / (2 ln 2)
    elem = -(3 * 0.36 * math.log(0.36) + 4 * 0.64 * math.log(0.64)) / (2 * math.log(2))
    mat = 7 * -(0.36 * math.log(0.36) + 0.64 * math.log(0.64)) / (2 * math.log(2))
    assert importance(t([-3.0, 4.0]), metric="elem_energy_entropy") == pytest.approx(elem, rel=1e-9)
    assert importance(t([-3.0, 4.0]), metric="mat_energy_entropy") == pytest.approx(mat, rel=1e-9)
    assert elem > 0 and mat > 0  # a signed λ would have made eq. 10/11 partly cancel


def test_max_entropy() -> None:
    assert max_entropy(1) == 0.0
    assert max_entropy(4) == pytest.approx(math.log(4))


# ------------------------------------------------------------------------------------------------ degenerate cases
@pytest.mark.parametrize("metric", ["entropy", "elem_energy_entropy", "mat_energy_entropy"])
@pytest.mark.parametrize("lam", [[5.0], [-2.0], [0.0], [0.0, 0.0, 0.0], []])
def test_degenerate_is_zero_not_nan(metric: str, lam: list[float]) -> None:
    value = importance(t(lam), metric=metric)
    assert value == 0.0
    assert not math.isnan(value)


def test_degenerate_rows_in_batch() -> None:
    lam = t([[1.0, 2.0, 3.0], [7.0, 9.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, True], [True, False, False], [True, True, True], [False, False, False]])
    for metric in IMPORTANCE_METRICS:
        scores = importance_batched(lam, mask, metric=metric)
        assert scores.shape == (4,)
        assert torch.isfinite(scores).all()
    ent = importance_batched(lam, mask, metric="entropy")
    assert ent[0] > 0 and ent[1] == 0 and ent[2] == 0 and ent[3] == 0


def test_mask_ignores_inactive_values() -> None:
    # The inactive slot holds garbage; only the active ones count.
    lam = t([[3.0, 1e6, 4.0]])
    mask = torch.tensor([[True, False, True]])
    for metric in IMPORTANCE_METRICS:
        assert float(importance_batched(lam, mask, metric=metric)[0]) == pytest.approx(
            ref_importance([3.0, 4.0], metric), rel=1e-9
        )


def test_float32_input_and_grad_tensor_accepted() -> None:
    lam = torch.tensor([3.0, 4.0], requires_grad=True)
    assert spectral_entropy(lam) == pytest.approx(ref_entropy([3.0, 4.0]), rel=1e-6)


# ------------------------------------------------------------------------------------------------ errors
def test_unknown_metric_raises() -> None:
    with pytest.raises(ValueError, match="bogus"):
        importance(t([1.0, 2.0]), metric="bogus")
    with pytest.raises(ValueError, match="Unknown importance metric"):
        importance_batched(t([[1.0, 2.0]]), metric="spectral")


def test_batched_needs_2d() -> None:
    with pytest.raises(ValueError, match=r"\(M, R\)"):
        importance_batched(t([1.0, 2.0]))


# ------------------------------------------------------------------------------------------------ properties
@SETTINGS
@given(lam=lam_lists)
def test_entropy_in_unit_interval(lam: list[float]) -> None:
    value = spectral_entropy(t(lam))
    assert 0.0 <= value <= 1.0


@SETTINGS
@given(lam=lam_lists, data=st.data())
def test_permutation_invariance(lam: list[float], data: st.DataObject) -> None:
    perm = data.draw(st.permutations(lam))
    for metric in IMPORTANCE_METRICS:
        assert importance(t(perm), metric=metric) == pytest.approx(
            importance(t(lam), metric=metric), rel=1e-9, abs=1e-12
        )


@SETTINGS
@given(lam=nonzero_lam_lists, c=st.floats(min_value=1e-2, max_value=1e2), neg=st.booleans())
def test_entropy_scale_invariance(lam: list[float], c: float, neg: bool) -> None:
    c = -c if neg else c
    scaled = [c * x for x in lam]
    assert spectral_entropy(t(scaled)) == pytest.approx(spectral_entropy(t(lam)), rel=1e-9, abs=1e-10)


@SETTINGS
@given(lam=lam_lists, data=st.data())
def test_sign_invariance(lam: list[float], data: st.DataObject) -> None:
    flips = data.draw(st.lists(st.booleans(), min_size=len(lam), max_size=len(lam)))
    flipped = [-x if f else x for x, f in zip(lam, flips, strict=True)]
    for metric in IMPORTANCE_METRICS:
        assert importance(t(flipped), metric=metric) == importance(t(lam), metric=metric)


@SETTINGS
@given(r=st.integers(min_value=2, max_value=16), v=st.floats(min_value=1e-3, max_value=1e3), data=st.data())
def test_maximum_at_uniform_magnitude(r: int, v: float, data: st.DataObject) -> None:
    signs = data.draw(st.lists(st.booleans(), min_size=r, max_size=r))
    uniform = [-v if s else v for s in signs]
    top = spectral_entropy(t(uniform))
    assert top == pytest.approx(1.0, abs=1e-9)
    other = data.draw(st.lists(_signed, min_size=r, max_size=r))
    assert spectral_entropy(t(other)) <= top + 1e-12


@SETTINGS
@given(
    rows=st.lists(st.lists(st.tuples(_signed, st.booleans()), min_size=6, max_size=6), min_size=1, max_size=6),
    metric=st.sampled_from(IMPORTANCE_METRICS),
)
def test_batched_equals_per_row(rows: list[list[tuple[float, bool]]], metric: str) -> None:
    lam = t([[v for v, _ in row] for row in rows])
    mask = torch.tensor([[m for _, m in row] for row in rows])
    batched = importance_batched(lam, mask, metric=metric)
    for i, row in enumerate(rows):
        active = [v for v, m in row if m]
        single = importance(t(active), metric=metric)
        assert float(batched[i]) == pytest.approx(single, rel=1e-9, abs=1e-12)


@SETTINGS
@given(lam=lam_lists, metric=st.sampled_from(IMPORTANCE_METRICS))
def test_matches_reference(lam: list[float], metric: str) -> None:
    assert importance(t(lam), metric=metric) == pytest.approx(ref_importance(lam, metric), rel=1e-9, abs=1e-12)


@SETTINGS
@given(lam=st.lists(st.floats(min_value=-10, max_value=10, width=32), min_size=2, max_size=8))
def test_float32_matches_reference(lam: list[float]) -> None:
    assume(any(x * x > 1e-30 for x in lam))
    x32 = torch.tensor(lam, dtype=torch.float32)
    assert spectral_entropy(x32) == pytest.approx(ref_entropy([float(v) for v in x32]), rel=1e-6, abs=1e-9)
