"""Metric correctness on hand-computed matrices (recall both ways, ties, SugarCrepe, QA matching)."""

from __future__ import annotations

import numpy as np
import pytest

from fwd2bot_index.eval.metrics import (
    exact_match,
    normalize_answer,
    normalized_contains,
    pairwise_accuracy,
    retrieval_recall,
    sugarcrepe_accuracy,
)

# 4 captions over 3 images; caption 0 and 1 belong to image 0.
SIM = np.array(
    [
        [0.9, 0.1, 0.2],  # t0 -> img0 ranks 0
        [0.3, 0.8, 0.5],  # t1 -> img0 ranks 2
        [0.1, 0.4, 0.6],  # t2 -> img1 ranks 1
        [0.2, 0.7, 0.7],  # t3 -> img2 ties with img1, ties count against the query: ranks 1
    ]
)
OWNERS = np.array([0, 0, 1, 2])


def test_recall_hand_computed_both_directions() -> None:
    r = retrieval_recall(SIM, OWNERS, ks=(1, 2, 3))
    assert r["t2i"] == {1: 0.25, 2: 0.75, 3: 1.0}
    # img0 column [.9 .3 .1 .2]: t0 first -> hit@1; img1 column [.1 .8 .4 .7]: t2 third;
    # img2 column [.2 .5 .6 .7]: t3 first.
    assert r["i2t"] == pytest.approx({1: 2 / 3, 2: 2 / 3, 3: 1.0})


def test_i2t_counts_a_hit_when_any_positive_is_in_top_k() -> None:
    # img0 has captions 0 and 1; caption 0 ranks last for img0 but caption 1 ranks first.
    sim = np.array([[0.0, 0.5], [0.9, 0.1], [0.2, 0.8]])
    r = retrieval_recall(sim, np.array([0, 0, 1]), ks=(1,))
    assert r["i2t"][1] == 1.0
    # If only the weak caption belonged to img0, img0 would miss at 1.
    r2 = retrieval_recall(sim[[0, 2]], np.array([0, 1]), ks=(1,))
    assert r2["i2t"][1] == 0.5


def test_ties_count_against_the_query_in_both_directions() -> None:
    everything_equal = np.ones((3, 3))
    r = retrieval_recall(everything_equal, np.array([0, 1, 2]), ks=(1, 2, 3))
    # A constant scorer gains nothing from ties: every positive ranks behind its equals.
    assert r["t2i"] == {1: 0.0, 2: 0.0, 3: 1.0}
    assert r["i2t"] == {1: 0.0, 2: 0.0, 3: 1.0}


def test_tie_between_two_positives_and_a_negative() -> None:
    # img1 owns captions 1 and 2; all three captions tie for img1, so caption 0 (a negative for img1)
    # ranks ahead of both positives: img1's best positive ranks second.
    # img0 owns caption 0 only: caption 2 beats it and caption 1 ties it, so it ranks third.
    sim = np.array([[0.0, 0.7], [0.0, 0.7], [1.0, 0.7]])
    r = retrieval_recall(sim, np.array([0, 1, 1]), ks=(1, 2, 3))
    assert r["i2t"] == {1: 0.0, 2: 0.5, 3: 1.0}
    # t0: img0 0.0 < img1 0.7 -> rank 1; t1: img1 wins; t2: img1 0.7 < img0 1.0 -> rank 1.
    assert r["t2i"] == pytest.approx({1: 1 / 3, 2: 1.0, 3: 1.0})


def test_tie_rule_does_not_depend_on_gallery_order() -> None:
    # The old "lower index wins" rule changed R@1 when the gallery was merely reordered.
    rng = np.random.default_rng(3)
    owners = np.array([0, 1, 2, 3, 0, 1])
    sim = rng.integers(0, 3, size=(6, 4)).astype(np.float32)
    base = retrieval_recall(sim, owners, ks=(1, 2))
    for _ in range(5):
        perm = rng.permutation(4)  # images reordered; captions keep their images
        caps = rng.permutation(6)
        inverse = np.argsort(perm)
        assert retrieval_recall(sim[caps][:, perm], inverse[owners[caps]], ks=(1, 2)) == base


def test_agrees_with_torch_topk_when_nothing_ties() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    owners = np.concatenate([np.arange(12), rng.integers(0, 12, size=20)])
    sim = rng.standard_normal((owners.size, 12)).astype(np.float32)  # continuous: no ties
    r = retrieval_recall(sim, owners, ks=(1, 5))
    s = torch.from_numpy(sim)
    for k in (1, 5):  # CLIP_benchmark's own computation
        t2i = (s.topk(k, dim=1).indices == torch.from_numpy(owners)[:, None]).any(1).float().mean().item()
        top = s.T.topk(k, dim=1).indices
        i2t = (torch.from_numpy(owners)[top] == torch.arange(12)[:, None]).any(1).float().mean().item()
        assert r["t2i"][k] == pytest.approx(t2i) and r["i2t"][k] == pytest.approx(i2t)


def test_perfect_and_worst_cases() -> None:
    n = 6
    perfect = np.eye(n)
    owners = np.arange(n)
    r = retrieval_recall(perfect, owners, ks=(1, 5))
    assert r == {"t2i": {1: 1.0, 5: 1.0}, "i2t": {1: 1.0, 5: 1.0}}
    worst = 1.0 - np.eye(n)  # the positive always scores lowest
    r = retrieval_recall(worst, owners, ks=(1, 5, 6, 10))
    assert r["t2i"] == {1: 0.0, 5: 0.0, 6: 1.0, 10: 1.0}  # k >= gallery returns everything
    assert r["i2t"] == {1: 0.0, 5: 0.0, 6: 1.0, 10: 1.0}


def _recall_by_sorting(sim: np.ndarray, owners: np.ndarray, k: int) -> tuple[float, float]:
    """Independent reference: sort by descending score with positives last among equals (worst tie order)."""
    t2i = []
    for i in range(sim.shape[0]):
        order = np.lexsort((np.arange(sim.shape[1]) == owners[i], -sim[i]))
        t2i.append(owners[i] in order[:k])
    i2t = []
    for j in range(sim.shape[1]):
        order = np.lexsort((owners == j, -sim[:, j]))
        i2t.append(np.any(owners[order[:k]] == j))
    return float(np.mean(t2i)), float(np.mean(i2t))


def test_matches_a_sorting_reference_on_tied_random_matrices() -> None:
    rng = np.random.default_rng(7)
    for trial in range(20):
        n_images = int(rng.integers(2, 30))
        owners = np.concatenate([np.arange(n_images), rng.integers(0, n_images, size=int(rng.integers(0, 40)))])
        sim = rng.integers(0, 4, size=(owners.size, n_images)).astype(np.float32)  # many ties
        result = retrieval_recall(sim, owners, ks=(1, 3, 5))
        for k in (1, 3, 5):
            t2i, i2t = _recall_by_sorting(sim, owners, k)
            assert result["t2i"][k] == pytest.approx(t2i), (trial, k)
            assert result["i2t"][k] == pytest.approx(i2t), (trial, k)


@pytest.mark.parametrize(
    ("sim", "owners", "message"),
    [
        (np.array([[np.nan, 1.0]]), np.array([0]), "finite"),
        (np.ones((2, 2)), np.array([0]), "shape"),
        (np.ones((2, 3)), np.array([0, 1]), "without any caption"),
        (np.ones((2, 2)), np.array([0, 2]), "outside"),
        (np.ones(3), np.array([0, 1, 2]), "matrix"),
    ],
)
def test_recall_rejects_bad_input(sim: np.ndarray, owners: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        retrieval_recall(sim, owners)


def test_pairwise_accuracy_counts_ties_as_wrong() -> None:
    assert pairwise_accuracy([1, 2, 3, 3], [0, 2, 4, 1]) == 0.5
    assert sugarcrepe_accuracy(np.array([0.3, 0.3]), np.array([0.3, 0.2])) == 0.5
    with pytest.raises(ValueError, match="differ in length"):
        pairwise_accuracy([1, 2], [1])
    with pytest.raises(ValueError, match="no pairs"):
        pairwise_accuracy([], [])


def test_sugarcrepe_groups_are_micro_averages() -> None:
    pos = {
        "replace_obj": [1, 1, 1],
        "replace_att": [0],
        "replace_rel": [1],
        "swap_obj": [1, 0],
        "swap_att": [1, 1, 0, 0, 0, 0],
        "add_obj": [1],
        "add_att": [0],
    }
    neg = {name: [0.5] * len(v) for name, v in pos.items()}
    acc = sugarcrepe_accuracy(pos, neg)
    assert acc["replace_obj"] == 1.0 and acc["replace_att"] == 0.0
    assert acc["Replace"] == pytest.approx(4 / 5)  # macro would be 2/3
    assert acc["Swap"] == pytest.approx(3 / 8)  # macro would be 5/12
    assert acc["Add"] == 0.5


def test_sugarcrepe_group_omitted_when_a_member_is_missing() -> None:
    acc = sugarcrepe_accuracy({"swap_obj": [1.0]}, {"swap_obj": [0.0]})
    assert acc == {"swap_obj": 1.0}
    with pytest.raises(ValueError, match="same categories"):
        sugarcrepe_accuracy({"swap_obj": [1.0]}, {"swap_att": [0.0]})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The Two dogs!", "2 dogs"),
        ("twenty-one", "21"),
        ("Twenty", "20"),
        ("1,000 people", "1000 people"),
        ("3.5 meters.", "3.5 meters"),
        ("An apple, a pear.", "apple pear"),
        ("dog's bowl", "dogs bowl"),
        ("none", "0"),
        ("  Red   SQUARE ", "red square"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_exact_match_and_contains() -> None:
    assert exact_match("Two.", ["2"])
    assert exact_match("the red one", ["blue", "Red one"])
    assert not exact_match("red circle", "red")
    assert normalized_contains("I see two red cubes.", "2 red cubes")
    assert not normalized_contains("there are 12 dogs", "2")  # whole words only
    assert not normalized_contains("a cat", "the")  # gold normalises to nothing
    assert normalized_contains("the", "a")


def test_multi_relevant_precision_hand_computed() -> None:
    """Two queries over four images: P@k and AP by hand (query 1's relevant images rank 0 and 2)."""
    from fwd2bot_index.evaluation import multi_relevant_precision

    sim = np.array([[0.9, 0.1, 0.5, 0.3],    # ranking 0, 2, 3, 1; relevant {0, 3}: hits at 0 and 2
                    [0.2, 0.8, 0.4, 0.6]])   # ranking 1, 3, 2, 0; relevant {0}: hit at 3
    relevant = np.array([[True, False, False, True], [True, False, False, False]])
    got = multi_relevant_precision(sim, relevant, ks=(1, 2))
    assert got["p@1"] == pytest.approx((1 + 0) / 2)
    assert got["p@2"] == pytest.approx((0.5 + 0) / 2)
    assert got["map"] == pytest.approx(((1 / 1 + 2 / 3) / 2 + 1 / 4) / 2)


def test_multi_relevant_precision_ties_count_against_the_query() -> None:
    from fwd2bot_index.evaluation import multi_relevant_precision

    relevant = np.array([[False, True, False]])
    constant = multi_relevant_precision(np.zeros((1, 3)), relevant, ks=(1,))
    assert constant == {"p@1": 0.0, "map": pytest.approx(1 / 3)}  # behind both irrelevant images
    both = multi_relevant_precision(np.array([[0.5, 0.5, 0.1]]), np.array([[True, True, False]]), ks=(1, 2))
    assert both == {"p@1": 1.0, "p@2": 1.0, "map": 1.0}  # two relevant images tied with each other lose nothing


@pytest.mark.parametrize("sim, relevant, message", [
    (np.zeros((2, 3)), np.ones((2, 2), dtype=bool), "same 2-D shape"),
    (np.zeros((2, 3)), np.array([[True, False, False], [False, False, False]]), "at least one relevant"),
])
def test_multi_relevant_precision_rejects_bad_input(sim: np.ndarray, relevant: np.ndarray, message: str) -> None:
    from fwd2bot_index.evaluation import multi_relevant_precision

    with pytest.raises(ValueError, match=message):
        multi_relevant_precision(sim, relevant)
