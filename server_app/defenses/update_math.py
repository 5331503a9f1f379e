"""Pure numpy helpers shared by the baseline defences.

A model is a ``state`` (``dict[str, np.ndarray]``, the numpy view of a PyTorch
``state_dict`` carried in an ``ArrayRecord``). A client *update* is the
difference ``w_i - w_t`` between the client's returned state and the global
state it started from.

Defences look at updates through one flat vector per client built from the
*trainable* keys only. BatchNorm running statistics (``running_mean``,
``running_var``, ``num_batches_tracked``) are excluded: they are data
statistics, not gradients, and mixing them into distances or norms distorts
clustering under non-IID data (zhmzm/FLAME issue #10).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np

NON_TRAINABLE_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
"""Last dotted component of state-dict keys that are never trainable."""


def is_trainable_key(name: str, value: np.ndarray) -> bool:
    """Tell whether a state-dict entry is a trainable parameter.

    Parameters
    ----------
    name : str
        State-dict key, e.g. ``"layer1.0.bn1.running_mean"``.
    value : np.ndarray
        The array stored under ``name``; integer and boolean arrays are buffers.

    Returns
    -------
    bool
        False for BatchNorm running statistics and non-float arrays, else True.
    """
    if name.rsplit(".", 1)[-1] in NON_TRAINABLE_SUFFIXES:
        return False
    return bool(np.issubdtype(np.asarray(value).dtype, np.floating))


def select_trainable_keys(
    state: Mapping[str, np.ndarray], explicit: Collection[str] | None = None
) -> list[str]:
    """Return the trainable keys of ``state`` in state-dict order.

    Parameters
    ----------
    state : Mapping[str, np.ndarray]
        A model state.
    explicit : Collection[str] or None (default: None)
        Keys known to be trainable (e.g. ``[n for n, p in model.named_parameters()]``).
        If given, these are used as-is (in ``state`` order) instead of the
        name/dtype rule of :func:`is_trainable_key`.

    Returns
    -------
    list[str]
        The trainable keys.

    Raises
    ------
    KeyError
        If an explicit key is missing from ``state``.
    """
    if explicit is not None:
        missing = sorted(set(explicit) - set(state))
        if missing:
            raise KeyError(f"trainable_keys not in the model state: {missing[:5]}")
        wanted = set(explicit)
        return [k for k in state if k in wanted]
    return [k for k, v in state.items() if is_trainable_key(k, v)]


def output_layer_keys(trainable_keys: Sequence[str]) -> list[str]:
    """Return the keys of the last module holding trainable parameters.

    The module is the prefix before the last dot of the last trainable key, so
    ``["conv.weight", "fc.weight", "fc.bias"]`` gives ``["fc.weight", "fc.bias"]``.

    Parameters
    ----------
    trainable_keys : Sequence[str]
        Trainable keys in state-dict order (non-empty).
    """
    if not trainable_keys:
        raise ValueError("no trainable keys: cannot find the output layer")
    prefix = trainable_keys[-1].rsplit(".", 1)[0]
    return [k for k in trainable_keys if k.rsplit(".", 1)[0] == prefix]


def flatten(state: Mapping[str, np.ndarray], keys: Sequence[str]) -> np.ndarray:
    """Concatenate ``state[k]`` for ``k`` in ``keys`` into one float32 vector."""
    if not keys:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(
        [np.asarray(state[k], dtype=np.float32).ravel() for k in keys]
    )


def flat_updates(
    client_states: Sequence[Mapping[str, np.ndarray]],
    global_state: Mapping[str, np.ndarray],
    keys: Sequence[str],
) -> np.ndarray:
    """Stack the flattened updates ``w_i - w_t`` of all clients.

    Returns
    -------
    np.ndarray
        float32 array of shape ``[num_clients, num_coordinates]``.
    """
    base = flatten(global_state, keys)
    out = np.empty((len(client_states), base.size), dtype=np.float32)
    for i, state in enumerate(client_states):
        offset = 0
        for k in keys:
            size = int(np.size(global_state[k]))
            np.subtract(
                np.asarray(state[k], dtype=np.float32).ravel(),
                base[offset : offset + size],
                out=out[i, offset : offset + size],
            )
            offset += size
    return out


def unflatten(
    vector: np.ndarray, template: Mapping[str, np.ndarray], keys: Sequence[str]
) -> dict[str, np.ndarray]:
    """Split a flat vector back into arrays shaped like ``template[k]``."""
    out: dict[str, np.ndarray] = {}
    offset = 0
    for k in keys:
        shape = np.shape(template[k])
        size = int(np.prod(shape))
        out[k] = np.asarray(vector[offset : offset + size]).reshape(shape)
        offset += size
    if offset != vector.size:
        raise ValueError(f"vector has {vector.size} entries, keys need {offset}")
    return out


def l2_norms(updates: np.ndarray) -> np.ndarray:
    """Euclidean norm of each row, in float64."""
    return np.sqrt(np.einsum("ij,ij->i", updates, updates, dtype=np.float64))


def cosine_similarity_matrix(updates: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarities of the rows (float64, ``[K, K]``).

    A zero row has similarity 0 to everything (including itself).
    """
    gram = (updates @ updates.T).astype(np.float64)
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    denom = np.outer(norms, norms)
    with np.errstate(divide="ignore", invalid="ignore"):
        sim = np.where(denom > 0, gram / denom, 0.0)
    return np.clip(sim, -1.0, 1.0)


def cosine_distance_matrix(updates: np.ndarray) -> np.ndarray:
    """Pairwise cosine distances ``1 - cos`` of the rows, zero diagonal, in [0, 2]."""
    dist = np.clip(1.0 - cosine_similarity_matrix(updates), 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    return dist


def cosine_to(updates: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row to ``reference`` (0 where a norm is 0)."""
    dots = (updates @ reference).astype(np.float64)
    denom = l2_norms(updates) * float(np.linalg.norm(reference.astype(np.float64)))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(denom > 0, dots / denom, 0.0)
    return np.clip(cos, -1.0, 1.0)


def clip_factors(norms: np.ndarray, bound: float) -> np.ndarray:
    """Scale factors ``min(1, bound / norm)`` that clip each norm to ``bound``.

    A zero norm gets factor 1.
    """
    norms = np.asarray(norms, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        factors = np.where(norms > bound, bound / norms, 1.0)
    return factors


def weighted_sum(updates: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """``sum_i c_i * updates[i]`` as a float64 vector, one row at a time (no full copy)."""
    out = np.zeros(updates.shape[1], dtype=np.float64)
    for c, row in zip(np.asarray(coefficients, dtype=np.float64), updates, strict=True):
        if c:
            out += c * row
    return out


def weighted_mean(updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean of the rows, weights normalised to sum 1 (float64 vector).

    Raises
    ------
    ValueError
        If the weights do not have a positive sum.
    """
    weights = np.asarray(weights, dtype=np.float64)
    total = float(weights.sum())
    if not total > 0:
        raise ValueError("weighted_mean needs weights with a positive sum")
    return weighted_sum(updates, weights / total)


def average_states(
    states: Sequence[Mapping[str, np.ndarray]],
    weights: np.ndarray,
    keys: Sequence[str],
) -> dict[str, np.ndarray]:
    """Weighted average of ``states[i][k]`` for each key (float64 arrays).

    Used for the non-trainable entries (BatchNorm statistics), which defences
    average over the clients they accept instead of clipping or noising them.
    """
    weights = np.asarray(weights, dtype=np.float64)
    total = float(weights.sum())
    if not total > 0:
        raise ValueError("average_states needs weights with a positive sum")
    factors = weights / total
    out: dict[str, np.ndarray] = {}
    for k in keys:
        acc = np.zeros(np.shape(states[0][k]), dtype=np.float64)
        for f, state in zip(factors, states, strict=True):
            if f:
                acc += f * np.asarray(state[k], dtype=np.float64)
        out[k] = acc
    return out


def cast_like(value: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Cast ``value`` to the dtype of ``like`` (rounding for integer dtypes)."""
    like = np.asarray(like)
    if np.issubdtype(like.dtype, np.integer):
        return np.rint(value).astype(like.dtype)
    return np.asarray(value).astype(like.dtype)


def key_columns(
    template: Mapping[str, np.ndarray], keys: Sequence[str], subset: Collection[str]
) -> np.ndarray:
    """Column indices, in the flat vector over ``keys``, of the keys in ``subset``."""
    cols = []
    offset = 0
    for k in keys:
        size = int(np.prod(np.shape(template[k])))
        if k in subset:
            cols.append(np.arange(offset, offset + size))
        offset += size
    return np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)


def trainable_keys_of(module) -> list[str]:
    """State-dict names of a torch module's trainable parameters.

    Pass the result as ``trainable_keys`` to a defence so that non-BatchNorm
    buffers (e.g. a model's input-normalisation ``mean``/``std``) are never
    clipped or noised.

    Parameters
    ----------
    module : torch.nn.Module
        The global model (anything with ``named_parameters()``).
    """
    return [name for name, p in module.named_parameters() if p.requires_grad]
