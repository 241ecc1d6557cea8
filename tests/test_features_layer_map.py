"""Layer mapping of feature alignment: uniform rule, explicit pairs, range checks."""

import pytest

from fastkd.distill.features.layer_map import describe, layer_pairs, uniform_pairs


@pytest.mark.parametrize(("ls", "lt", "expected"), [
    (2, 4, ((0, 1), (1, 3))),
    (3, 12, ((0, 3), (1, 7), (2, 11))),
    (2, 5, ((0, 2), (1, 4))),  # round(2.5) = 3: halves round up
    (1, 2, ((0, 1),)),
    (3, 3, ((0, 0), (1, 1), (2, 2))),
    (4, 2, ((0, 0), (1, 0), (2, 1), (3, 1))),  # deeper student: never below layer 0
])
def test_uniform(ls, lt, expected):
    assert uniform_pairs(ls, lt) == expected
    assert layer_pairs("uniform", ls, lt) == expected


@pytest.mark.parametrize("mapping", ["0:2,1:0", [[0, 2], [1, 0]], ((0, 2), (1, 0))])
def test_explicit(mapping):
    pairs = layer_pairs(mapping, 2, 3)
    assert pairs == ((0, 2), (1, 0))
    assert describe(pairs) == "student 0 -> teacher 2, student 1 -> teacher 0"


@pytest.mark.parametrize(("mapping", "match"), [
    ("0:3", r"layer pair \(0, 3\) is out of range.*teacher 3 \(0..2\)"),
    ([[2, 0]], r"layer pair \(2, 0\) is out of range.*student has 2 layers"),
    ("-1:0", "out of range"),
    ("0-1", "expected 'uniform' or 's:t"),
    ("nonsense", "expected 'uniform' or 's:t"),
    ([[0, 1, 2]], "not a \\(student, teacher\\) pair"),
    ([[0, 1.5]], "not a \\(student, teacher\\) pair"),
    ([], "no \\(student, teacher\\) pairs"),
    ("0:1,0:1", "repeats a pair"),
])
def test_bad_mapping(mapping, match):
    with pytest.raises(ValueError, match=match):
        layer_pairs(mapping, 2, 3)


def test_bad_depth():
    with pytest.raises(ValueError, match="the teacher has 0 layers"):
        uniform_pairs(2, 0)
