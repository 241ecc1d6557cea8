"""Which teacher layer each student layer is aligned with.

"uniform" maps student layer i (of Ls) to teacher layer round((i + 1) * Lt / Ls) - 1 (halves
round up; at least 0 when the student is deeper), so the last student layer follows the last
teacher layer and the others are spread evenly below it.
An explicit mapping lists (student, teacher) pairs, as a sequence of pairs or as the string
"s:t,s:t,..." (the command-line form).
"""

from __future__ import annotations

from collections.abc import Sequence

LayerPairs = tuple[tuple[int, int], ...]


def uniform_pairs(student_layers: int, teacher_layers: int) -> LayerPairs:
    """((i, max(round((i + 1) * Lt / Ls) - 1, 0)) for every student layer i), in integers."""
    _check_depth("student", student_layers)
    _check_depth("teacher", teacher_layers)
    ls, lt = student_layers, teacher_layers
    return tuple((i, max((2 * (i + 1) * lt + ls) // (2 * ls) - 1, 0)) for i in range(ls))


def parse_pairs(mapping: str | Sequence[Sequence[int]]) -> LayerPairs:
    """Explicit pairs from "s:t,s:t" or [[s, t], ...]; `ValueError` on a malformed entry."""
    if isinstance(mapping, str):
        try:
            items = [tuple(int(x) for x in part.split(":")) for part in mapping.split(",")]
        except ValueError as err:
            raise ValueError(f"layer_map {mapping!r}: expected 'uniform' or 's:t,s:t,...' "
                             "(student:teacher layer indices)") from err
    else:
        items = [tuple(pair) for pair in mapping]
    for item in items:
        if len(item) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in item):
            raise ValueError(f"layer_map entry {item!r} is not a (student, teacher) pair of ints")
    if not items:
        raise ValueError("layer_map lists no (student, teacher) pairs")
    if len(set(items)) != len(items):
        raise ValueError(f"layer_map repeats a pair: {items}")
    return tuple(items)  # type: ignore[return-value]


def layer_pairs(
    mapping: str | Sequence[Sequence[int]], student_layers: int, teacher_layers: int
) -> LayerPairs:
    """The (student layer, teacher layer) pairs of `mapping` ("uniform" or explicit pairs),
    checked against the depths; `ValueError` naming the pair when an index is out of range."""
    if mapping == "uniform":
        return uniform_pairs(student_layers, teacher_layers)
    pairs = parse_pairs(mapping)
    for s, t in pairs:
        if not (0 <= s < student_layers and 0 <= t < teacher_layers):
            raise ValueError(
                f"layer pair ({s}, {t}) is out of range: the student has {student_layers} layers "
                f"(0..{student_layers - 1}) and the teacher {teacher_layers} "
                f"(0..{teacher_layers - 1})"
            )
    return pairs


def describe(pairs: LayerPairs) -> str:
    """'student 0 -> teacher 1, student 1 -> teacher 3' (printed at the start of a run)."""
    return ", ".join(f"student {s} -> teacher {t}" for s, t in pairs)


def _check_depth(role: str, layers: int) -> None:
    if layers < 1:
        raise ValueError(f"the {role} has {layers} layers; layer alignment needs at least 1")
