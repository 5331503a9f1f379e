import numpy as np
import pytest

from defense_testkit import TRAINABLE, tiny_state
from server_app.defenses import update_math as um


def test_trainable_keys_exclude_batchnorm_statistics_and_integer_buffers():
    state = tiny_state()
    assert um.select_trainable_keys(state) == TRAINABLE
    assert um.select_trainable_keys(state, explicit=["fc.bias", "conv.weight"]) == ["conv.weight", "fc.bias"]
    with pytest.raises(KeyError):
        um.select_trainable_keys(state, explicit=["nope"])


def test_output_layer_keys_are_the_last_module():
    assert um.output_layer_keys(TRAINABLE) == ["fc.weight", "fc.bias"]


def test_flatten_unflatten_round_trip_and_columns():
    state = tiny_state()
    vec = um.flatten(state, TRAINABLE)
    assert vec.shape == (23,)
    back = um.unflatten(vec, state, TRAINABLE)
    for k in TRAINABLE:
        np.testing.assert_array_equal(back[k], state[k])
    cols = um.key_columns(state, TRAINABLE, {"fc.weight", "fc.bias"})
    np.testing.assert_array_equal(cols, np.arange(14, 23))


def test_cosine_distances_and_similarities():
    u = np.array([[1, 0], [0, 2], [-3, 0], [2, 0], [0, 0]], dtype=np.float32)
    dist = um.cosine_distance_matrix(u)
    assert dist[0, 1] == pytest.approx(1.0)
    assert dist[0, 2] == pytest.approx(2.0)
    assert dist[0, 3] == pytest.approx(0.0)
    assert dist[4, 0] == pytest.approx(1.0)  # zero update: similarity 0
    assert np.all(np.diag(dist) == 0)
    np.testing.assert_allclose(um.cosine_to(u, np.array([1.0, 0.0], dtype=np.float32)), [1, 0, -1, 1, 0])


def test_clip_factors_and_weighted_mean():
    np.testing.assert_allclose(um.clip_factors(np.array([1.0, 4.0, 0.0]), 2.0), [1.0, 0.5, 1.0])
    u = np.array([[1.0, 0.0], [0.0, 3.0]], dtype=np.float32)
    np.testing.assert_allclose(um.weighted_mean(u, np.array([3.0, 1.0])), [0.75, 0.75])
    with pytest.raises(ValueError):
        um.weighted_mean(u, np.zeros(2))


def test_cast_like_rounds_integers():
    assert um.cast_like(np.array(7.6), np.array(1, dtype=np.int64)).dtype == np.int64
    assert int(um.cast_like(np.array(7.6), np.array(1, dtype=np.int64))) == 8
