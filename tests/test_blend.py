"""blended_list(): hand-computed cases of both modes (API.md, "Blend")."""

from __future__ import annotations

import pytest

from recommendation_service import blended_list, request_seed


def test_strict_alternates_online_first() -> None:
    assert blended_list([1, 2, 3], [11, 12, 13]) == [1, 11, 2, 12, 3, 13]


def test_strict_rest_of_the_longer_list_follows() -> None:
    assert blended_list([1], [11, 12, 13]) == [1, 11, 12, 13]
    assert blended_list([1, 2, 3, 4], [11]) == [1, 11, 2, 3, 4]


def test_strict_skips_duplicates_and_takes_the_next_of_the_same_list() -> None:
    # online 1, offline 2, online (2 is taken) 3, offline 4, online gone: offline 5
    assert blended_list([1, 2, 3], [2, 4, 5]) == [1, 2, 3, 4, 5]
    # duplicates inside one list too
    assert blended_list([1, 1, 2], [1, 3]) == [1, 3, 2]
    assert blended_list([7, 8], [7, 8]) == [7, 8]


def test_empty_lists() -> None:
    assert blended_list([], []) == []
    assert blended_list([], [3, 2]) == [3, 2]
    assert blended_list([4, 5], []) == [4, 5]
    assert blended_list([], [], mode="probability", seed=1) == []


def test_probability_extremes() -> None:
    online, offline = [1, 2, 3], [11, 2, 12]
    assert blended_list(online, offline, "probability", p=1.0, seed=5) == [1, 2, 3, 11, 12]
    assert blended_list(online, offline, "probability", p=0.0, seed=5) == [11, 2, 12, 1, 3]


def test_probability_is_deterministic_per_seed() -> None:
    online, offline = list(range(0, 40)), list(range(100, 140))
    seed = request_seed(user_id=17, k=25, p=0.5)
    first = blended_list(online, offline, "probability", 0.5, seed)
    assert blended_list(online, offline, "probability", 0.5, seed) == first
    assert sorted(first) == online + offline
    # each list keeps its own order inside the blend
    assert [x for x in first if x < 100] == online
    assert [x for x in first if x >= 100] == offline
    others = {
        tuple(blended_list(online, offline, "probability", 0.5, request_seed(u, 25, 0.5)))
        for u in range(10)
    }
    assert len(others) > 1  # other users draw differently


def test_probability_follows_p() -> None:
    online, offline = list(range(0, 1000)), list(range(1000, 2000))
    head = blended_list(online, offline, "probability", 0.8, seed=3)[:500]
    share = sum(x < 1000 for x in head) / len(head)
    assert 0.72 < share < 0.88  # about p of the head comes from the online list


def test_request_seed_depends_on_the_request() -> None:
    assert request_seed(1, 25, 0.5) == [1, 25, 500000]
    assert request_seed(1, 25, 0.5) != request_seed(1, 25, 0.25)


@pytest.mark.parametrize(
    ("mode", "p", "message"), [("mixed", 0.5, "unknown blend"), ("strict", 1.5, "p must be in")]
)
def test_bad_arguments(mode: str, p: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        blended_list([1], [2], mode, p)
