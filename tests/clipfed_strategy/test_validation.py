"""``validate_replies``: every reply is checked against the global model before it touches anything."""

from __future__ import annotations

import numpy as np
import pytest

from clipfed_strategy.validation import ValidationConfig, check_structure, update_norm, validate_replies

REF = {
    "conv.weight": np.zeros((2, 1, 3, 3), np.float32),
    "bn.running_mean": np.zeros(2, np.float32),
    "bn.running_var": np.ones(2, np.float32),
    "bn.num_batches_tracked": np.array(7, np.int64),
    "fc.weight": np.zeros((3, 4), np.float32),
    "fc.bias": np.zeros(3, np.float32),
}
CFG = ValidationConfig()


def reply(seed: int = 0, scale: float = 0.01) -> dict[str, np.ndarray]:
    """The reference plus a small update of norm ≈ scale·sqrt(P) on the float parameters."""
    g = np.random.default_rng(seed)
    out = {}
    for k, v in REF.items():
        if v.dtype.kind == "f" and "running_" not in k:
            out[k] = (v + scale * g.standard_normal(v.shape)).astype(v.dtype)
        else:
            out[k] = v.copy()
    out["bn.num_batches_tracked"] = np.asarray(REF["bn.num_batches_tracked"] + 4)
    return out


def with_(key, value, base=None):
    out = dict(base or reply())
    if value is None:
        del out[key]
    else:
        out[key] = value
    return out


def test_a_sane_reply_passes():
    assert check_structure(reply(), REF, 50, CFG) is None
    assert validate_replies([(reply(i), 50) for i in range(4)], REF) == [None] * 4


@pytest.mark.parametrize("arrays, reason", [
    (with_("fc.weight", np.full((3, 4), np.nan, np.float32)), "parameter 'fc.weight' contains NaN or Inf"),
    (with_("fc.bias", np.array([0, np.inf, 0], np.float32)), "parameter 'fc.bias' contains NaN or Inf"),
    (with_("fc.bias", np.array([0, -np.inf, 0], np.float32)), "parameter 'fc.bias' contains NaN or Inf"),
    (with_("bn.running_var", np.array([1, np.nan], np.float32)), "parameter 'bn.running_var' contains NaN or Inf"),
    (with_("fc.weight", np.zeros((4, 3), np.float32)), "parameter 'fc.weight' has shape (4, 3), expected (3, 4)"),
    (with_("bn.num_batches_tracked", np.array([7], np.int64)),
     "parameter 'bn.num_batches_tracked' has shape (1,), expected ()"),
    (with_("fc.weight", np.zeros((3, 4), np.float64)), "parameter 'fc.weight' has dtype float64, expected float32"),
    (with_("fc.weight", np.zeros((3, 4), np.float16)), "parameter 'fc.weight' has dtype float16, expected float32"),
    (with_("bn.num_batches_tracked", np.array(7.0)), "parameter 'bn.num_batches_tracked' has dtype float64, expected int64"),
    (with_("fc.bias", None), "missing parameters ['fc.bias']"),
    (with_("backdoor.mask", np.ones(3, np.float32)), "unexpected parameters ['backdoor.mask']"),
    (with_("fc.bias", [0.0, 0.0, 0.0]), "parameter 'fc.bias' is not an array (list)"),
    (with_("conv.weight", np.full((2, 1, 3, 3), 2e6, np.float32)), "parameter 'conv.weight' has |value| > 1e+06"),
    (with_("bn.running_var", np.array([1, -0.5], np.float32)), "parameter 'bn.running_var' has negative variances"),
])
def test_structural_problems_have_a_reason(arrays, reason):
    assert check_structure(arrays, REF, 50, CFG) == reason
    reasons = validate_replies([(reply(1), 50), (arrays, 50), (reply(2), 50)], REF)
    assert reasons == [None, reason, None]


def test_many_missing_keys_are_abbreviated():
    reason = check_structure({}, REF, 50, CFG)
    assert reason.startswith("missing parameters ['bn.num_batches_tracked', 'bn.running_mean', 'bn.running_var']")
    assert reason.endswith("…")


@pytest.mark.parametrize("n, reason", [
    (0, "num-examples must be a positive integer, got 0"),
    (-3, "num-examples must be a positive integer, got -3"),
    (2.5, "num-examples must be a positive integer, got 2.5"),
    (float("nan"), "num-examples must be a positive integer, got nan"),
    (float("inf"), "num-examples must be a positive integer, got inf"),
    (10_000_001, "num-examples 10000001 is absurd (> 10000000)"),
    (1e12, "num-examples 1000000000000 is absurd (> 10000000)"),
    (None, "num-examples missing or not a number (NoneType)"),
    ("50", "num-examples missing or not a number (str)"),
    ([50], "num-examples missing or not a number (list)"),
    (True, "num-examples missing or not a number (bool)"),
])
def test_bad_num_examples(n, reason):
    assert check_structure(reply(), REF, n, CFG) == reason


@pytest.mark.parametrize("n", [1, 50, 50.0, np.int64(50), np.int32(7), np.float32(8.0), 10_000_000])
def test_good_num_examples(n):
    assert check_structure(reply(), REF, n, CFG) is None


def test_num_examples_is_checked_before_the_arrays():
    assert check_structure({}, REF, 0, CFG).startswith("num-examples")


def test_limits_are_configurable():
    big = with_("conv.weight", np.full((2, 1, 3, 3), 2e6, np.float32))
    assert check_structure(big, REF, 50, ValidationConfig(max_abs_value=0)) is None
    assert check_structure(big, REF, 50, ValidationConfig(max_abs_value=3e6)) is None
    assert check_structure(reply(), REF, 200, ValidationConfig(max_num_examples=100)).endswith("absurd (> 100)")


def test_zero_variances_are_allowed():
    assert check_structure(with_("bn.running_var", np.zeros(2, np.float32)), REF, 50, CFG) is None


def test_integer_entries_are_not_checked_for_finiteness_or_magnitude():
    arrays = with_("bn.num_batches_tracked", np.array(2**40, np.int64))
    assert check_structure(arrays, REF, 50, CFG) is None


def test_update_norm_by_hand():
    a = {k: v.copy() for k, v in REF.items()}
    a["fc.weight"][0, 0] = 3.0
    a["fc.bias"][1] = -4.0
    a["bn.running_mean"][:] = 100.0  # BatchNorm statistics do not count
    a["bn.num_batches_tracked"] = np.array(10**6, np.int64)  # integer entries do not count
    assert update_norm(a, REF) == pytest.approx(5.0)
    assert update_norm(REF, REF) == 0.0


def test_absurd_update_norm_is_judged_against_the_round_median():
    replies = [(reply(i), 50) for i in range(4)]
    boosted = {k: (REF[k] + 1000 * (v - REF[k])).astype(v.dtype) if v.dtype.kind == "f" else v
               for k, v in reply(9).items()}
    replies.append((boosted, 50))
    reasons = validate_replies(replies, REF)
    assert reasons[:4] == [None] * 4
    assert reasons[4].startswith("update norm ") and "is absurd (> 50 × median" in reasons[4]
    # a looser ratio lets it through; 0 disables the check
    assert validate_replies(replies, REF, ValidationConfig(max_update_norm_ratio=5000)) == [None] * 5
    assert validate_replies(replies, REF, ValidationConfig(max_update_norm_ratio=0)) == [None] * 5


def test_norm_check_is_scale_free():
    """A federation with large honest updates is not penalised: only the ratio to the median counts."""
    replies = [(reply(i, scale=10.0), 50) for i in range(5)]
    assert validate_replies(replies, REF) == [None] * 5


def test_norm_check_needs_three_structurally_valid_replies():
    boosted = reply(9, scale=100.0)
    assert validate_replies([(reply(0), 50), (boosted, 50)], REF) == [None, None]
    # malformed replies do not count towards the median
    nan = with_("fc.bias", np.full(3, np.nan, np.float32))
    reasons = validate_replies([(reply(0), 50), (nan, 50), (nan, 50), (boosted, 50)], REF)
    assert reasons[0] is None and reasons[3] is None and "NaN" in reasons[1]
    reasons = validate_replies([(reply(0), 50), (reply(1), 50), (nan, 50), (boosted, 50)], REF)
    assert reasons[3].startswith("update norm")


def test_unchanged_models_do_not_make_every_real_update_absurd():
    """Clients that return the global model untouched (no data, skipped training) have norm 0; with
    them in the majority the median would be 0 and every client that trained would be rejected."""
    unchanged = {k: v.copy() for k, v in REF.items()}
    replies = [(unchanged, 50)] * 3 + [(reply(1), 50), (reply(2), 50)]
    assert validate_replies(replies, REF) == [None] * 5
    # ... while an absurd update among them is still caught
    boosted = reply(3, scale=1000.0)
    reasons = validate_replies(replies + [(boosted, 50)], REF)
    assert reasons[:5] == [None] * 5 and reasons[5].startswith("update norm")
    # nobody trained: nothing to judge
    assert validate_replies([(unchanged, 50)] * 4, REF) == [None] * 4
