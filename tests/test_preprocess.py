"""Preprocessing behaviour on small hand-built datasets."""

import numpy as np
import pandas as pd
import pytest

from cotrec.config import DataConfig
from cotrec.data.preprocess import preprocess
from cotrec.data.raw import RawDataset
from cotrec.errors import DataError


def make_raw(rows, items=None):
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    inter["timestamp"] = inter["timestamp"].astype(np.int64)
    ids = sorted(set(inter["item_id"])) if items is None else items
    return RawDataset("toy", "movie", inter, pd.DataFrame({"item_id": ids, "caption": [f"title {i}" for i in ids]}))


def config(**kw):
    return DataConfig(source="movielens", path="/unused", **kw)


def dense_block(users, items, t0=0):
    """Every user interacts with every item, one second apart."""
    return [(u, i, t0 + n) for u in users for n, i in enumerate(items)]


def test_positions_are_chronological_with_stable_ties_and_loo_splits():
    rows = dense_block(["1", "2", "3"], ["a", "b", "c", "d"])
    # user 1: two extra items at the same second, listed x then y: x must come first.
    rows += [("1", "x", 100), ("1", "y", 100)]
    # and an earlier item listed last in the file
    rows += [("1", "z", -5)]
    out = preprocess(make_raw(rows), config(k_core=1))
    inter, items = out.interactions, out.items
    caption_of = dict(zip(items.item_idx, items.item_id))
    u1 = out.users.set_index("user_id").loc["1", "user_idx"]
    seq = inter[inter.user_idx == u1].sort_values("position")
    assert [caption_of[i] for i in seq.item_idx] == ["z", "a", "b", "c", "d", "x", "y"]
    assert seq.position.tolist() == list(range(7))
    assert seq.split.tolist() == ["train"] * 5 + ["valid", "test"]
    for _, group in inter.groupby("user_idx"):
        assert group.position.tolist() == list(range(len(group)))
        assert np.all(np.diff(group.timestamp.to_numpy()) >= 0)
        assert (group.split == "test").sum() == 1 and group.split.iloc[-1] == "test"


def test_k_core_repeats_until_stable():
    # Core: users A-C x items p-r (3 each). Item s has 3 users, but D has only s, t: D drops,
    # then s has 2 users < 3 and must drop too, which no single pass would do.
    rows = dense_block(["A", "B", "C"], ["p", "q", "r"])
    rows += [("A", "s", 10), ("B", "s", 10), ("D", "s", 10), ("D", "t", 11)]
    out = preprocess(make_raw(rows), config(k_core=3))
    assert set(out.items.item_id) == {"p", "q", "r"}
    assert set(out.users.user_id) == {"A", "B", "C"}
    assert out.stats["k_core_rounds"] >= 3
    counts = out.interactions.groupby("item_idx").size()
    assert counts.min() >= 3


def test_dense_ids_follow_natural_order_and_tables_agree():
    rows = dense_block(["10", "9", "100"], ["3", "20", "1"])
    out = preprocess(make_raw(rows), config(k_core=1))
    assert out.users.user_id.tolist() == ["9", "10", "100"]
    assert out.items.item_id.tolist() == ["1", "3", "20"]
    assert out.users.num_interactions.tolist() == [3, 3, 3]
    assert out.stats["users"] == 3 and out.stats["items"] == 3 and out.stats["interactions"] == 9


def test_repeats_keep_the_earliest_and_unknown_items_drop():
    rows = dense_block(["u"], ["a", "b", "c", "d"]) + [("u", "a", 50), ("u", "ghost", 60)]
    out = preprocess(make_raw(rows, items=["a", "b", "c", "d"]), config(k_core=1))
    assert out.stats["dropped_repeats"] == 1 and out.stats["dropped_unknown_items"] == 1
    assert len(out.interactions) == 4


def test_sampling_is_seeded_and_recorded():
    users = [str(u) for u in range(40)]
    rows = dense_block(users, ["a", "b", "c", "d", "e"])
    first = preprocess(make_raw(rows), config(k_core=1, sample_users=10, sample_seed=7))
    again = preprocess(make_raw(rows), config(k_core=1, sample_users=10, sample_seed=7))
    other = preprocess(make_raw(rows), config(k_core=1, sample_users=10, sample_seed=8))
    assert first.users.user_id.tolist() == again.users.user_id.tolist()
    assert first.users.user_id.tolist() != other.users.user_id.tolist()
    assert len(first.users) == 10 and first.stats["sample"] == {"users": 10, "seed": 7, "from_users": 40}


def test_users_need_three_interactions_even_with_small_k():
    rows = dense_block(["a"], ["x", "y"]) + dense_block(["b", "c"], ["x", "y", "z"])
    out = preprocess(make_raw(rows), config(k_core=1))
    assert set(out.users.user_id) == {"b", "c"}


def test_nothing_left_is_a_clear_error():
    rows = dense_block(["a", "b"], ["x", "y", "z"])
    with pytest.raises(DataError, match="nothing left after filtering"):
        preprocess(make_raw(rows), config(k_core=5))


def test_min_rating_needs_ratings():
    rows = dense_block(["a", "b"], ["x", "y", "z"])
    with pytest.raises(DataError, match="no ratings"):
        preprocess(make_raw(rows), config(k_core=1, min_rating=4))


def test_sample_k_core_filters_again_within_the_sample():
    # 40 users on 5 shared items; 10 more items each seen by one user only
    rows = dense_block([str(u) for u in range(40)], ["a", "b", "c", "d", "e"])
    rows += [(str(u), f"rare{u % 10}", 100 + u) for u in range(40)]
    plain = preprocess(make_raw(rows), config(k_core=1, sample_users=12, sample_seed=3))
    cored = preprocess(make_raw(rows), config(k_core=1, sample_users=12, sample_seed=3, sample_k_core=3))
    assert set(plain.users.user_id) == set(cored.users.user_id)  # the same seeded sample
    assert any(i.startswith("rare") for i in plain.items.item_id)
    users_per_item = plain.interactions.merge(plain.items, on="item_idx").groupby("item_id").user_idx.nunique()
    assert set(cored.items.item_id) == set(users_per_item[users_per_item >= 3].index)
    assert cored.stats["sample"]["k_core"] == 3
    with pytest.raises(DataError, match="sample_k_core"):
        preprocess(make_raw(rows), config(k_core=1, sample_users=12, sample_seed=3, sample_k_core=50))


def test_integer_ids_prepare_exactly_as_their_text_and_1_and_text_1_are_one_id():
    rows = dense_block([10, 2, 33], [5, 7, 9, 11]) + [(2, 40, 100), (10, 40, 50)]
    as_int = preprocess(make_raw(rows, items=["5", "7", "9", "11", "40"]), config(k_core=1, sample_users=2))
    text_rows = [(str(u), str(i), t) for u, i, t in rows]
    as_text = preprocess(make_raw(text_rows, items=["5", "7", "9", "11", "40"]), config(k_core=1, sample_users=2))
    for name in ("interactions", "items", "users"):
        pd.testing.assert_frame_equal(getattr(as_int, name), getattr(as_text, name))
    # a column mixing 1 and "1" (one log written by two tools) counts one user, as text does
    mixed = [(1, "5", 0), ("1", "7", 1), (1, "9", 2), (2, "5", 0), (2, "7", 1), (2, "9", 2)]
    out = preprocess(make_raw(mixed, items=["5", "7", "9"]), config(k_core=1))
    assert out.users.user_id.tolist() == ["1", "2"] and out.users.num_interactions.tolist() == [3, 3]
