"""Deterministic, stratified sample selection and train/val/test holdouts, and their record.

Every function is pure: the same labels, groups and seed always give the same sorted int64 index
arrays, so a run directory's `splits.json` can be re-derived and checked.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lnshift.data.sources import ImageSource
from lnshift.errors import ConfigError, DataError


def _class_permutations(labels: Sequence[str], seed: int) -> dict[str, np.ndarray]:
    """One random order of each class's indices; classes are drawn in sorted order."""
    rng = np.random.default_rng(seed)
    label_array = np.asarray(labels, dtype=object)
    return {c: rng.permutation(np.flatnonzero(label_array == c)) for c in sorted(set(labels))}


def _sorted_indices(parts: list[np.ndarray]) -> np.ndarray:
    return np.sort(np.concatenate([np.asarray(p, dtype=np.int64) for p in parts] or [np.empty(0, np.int64)]))


def subsample(
    labels: Sequence[str], *, fraction: float | None = None, shots: int | None = None, seed: int
) -> np.ndarray:
    """Stratified subset: `fraction` of each class (at least 1), or exactly `shots` per class.

    Each class's subset is a prefix of one seeded permutation, so for a fixed seed a smaller
    fraction (or fewer shots) always gives a subset of a larger one; the shift-vs-sample-size
    estimator relies on this nesting.
    """
    if (fraction is None) == (shots is None):
        raise ConfigError(f"give exactly one of fraction and shots (got fraction={fraction}, shots={shots})")
    if fraction is not None and not 0 < fraction <= 1:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1):
        raise ConfigError(f"shots must be an integer >= 1, got {shots!r}")
    permutations = _class_permutations(labels, seed)
    if shots is not None:
        too_small = {c: len(p) for c, p in permutations.items() if len(p) < shots}
        if too_small:
            sizes = ", ".join(f"{c!r} has {n}" for c, n in too_small.items())
            raise DataError(f"shots={shots} needs {shots} images per class, but class {sizes}")
        return _sorted_indices([p[:shots] for p in permutations.values()])
    return _sorted_indices([p[: max(1, round(fraction * len(p)))] for p in permutations.values()])


def holdout(
    labels: Sequence[str], groups: Sequence[str | None] | None, *, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split into (kept, held) with about `fraction` of each class held, keeping groups whole.

    Without groups every image is its own group. Each group belongs to the class of its
    majority label (ties: the alphabetically first) and is never split; images whose group is
    None are groups of one. Per class, with n images in its groups and target
    t = round(fraction * n), clamped to [1, n - 1] when n >= 2, the class's groups are shuffled
    with the seed and walked in that order (first fit): a group moves to the held side when
    that brings the held count closer to t and still leaves a group kept. A class with at least
    two groups that ends with none held holds out its smallest group. Without groups this
    holds out exactly t images of each class.
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"holdout fraction must be in (0, 1), got {fraction}")
    held: list[list[int]] = []
    for cls_groups in _shuffled_class_groups(labels, groups, seed, "holdout").values():
        total = sum(map(len, cls_groups))
        target = min(max(round(fraction * total), 1), total - 1) if total >= 2 else 0
        held += _first_fit(cls_groups, target, limit=total)
    held_idx = _sorted_indices(held)
    kept_idx = np.setdiff1d(np.arange(len(labels), dtype=np.int64), held_idx)
    return kept_idx, held_idx


def matched(
    labels: Sequence[str], groups: Sequence[str | None] | None, *, counts: Mapping[str, int], seed: int
) -> np.ndarray:
    """About `counts[c]` images of each class c (at least one, at most all), keeping groups whole.

    `--val-size match` cuts the validation data to the training subset's size with it. Groups
    belong to classes and are walked in a seeded order as in `holdout`: a group is taken when that
    brings the class's count closer to its target; a class that took none takes its smallest group.
    Without groups this is exactly min(max(counts[c], 1), n_c) images of each class c.
    """
    taken: list[list[int]] = []
    for c, cls_groups in _shuffled_class_groups(labels, groups, seed, "matched").items():
        total = sum(map(len, cls_groups))
        taken += _first_fit(cls_groups, min(max(counts.get(c, 0), 1), total), limit=total + 1)
    return _sorted_indices(taken)


def _shuffled_class_groups(
    labels: Sequence[str], groups: Sequence[str | None] | None, seed: int, caller: str
) -> dict[str, list[list[int]]]:
    """Per class (sorted), its groups' indices in one seeded order.

    Each group belongs to the class of its majority label (ties: the alphabetically first); images
    whose group is None, or all images when `groups` is None, are groups of one.
    """
    if groups is not None and len(groups) != len(labels):
        raise DataError(f"{caller} got {len(labels)} labels but {len(groups)} groups")
    members: dict[object, list[int]] = {}
    for i in range(len(labels)):
        group = None if groups is None else groups[i]
        members.setdefault(("image", i) if group is None else ("group", group), []).append(i)
    class_groups: dict[str, list[list[int]]] = {}
    for idx in members.values():  # in order of first appearance, so the shuffle is reproducible
        counts = Counter(labels[i] for i in idx)
        majority = min(counts, key=lambda c: (-counts[c], c))
        class_groups.setdefault(majority, []).append(idx)
    rng = np.random.default_rng(seed)
    return {c: [class_groups[c][j] for j in rng.permutation(len(class_groups[c]))] for c in sorted(class_groups)}


def _first_fit(cls_groups: list[list[int]], target: int, limit: int) -> list[list[int]]:
    """The groups taken, walking them in order: each that brings the count closer to `target` and below `limit`.

    If none was, the smallest group, when it is below `limit`.
    """
    chosen: list[list[int]] = []
    count = 0
    for idx in cls_groups:
        if abs(count + len(idx) - target) < abs(count - target) and count + len(idx) < limit:
            chosen.append(idx)
            count += len(idx)
    smallest = min(cls_groups, key=len)
    if not chosen and len(smallest) < limit:
        chosen.append(smallest)
    return chosen


@dataclass
class Split:
    """The images of one split: `name` is "train", "val" or "test:<name>"; indices into `source`."""

    name: str
    source: str
    indices: list[int]


def splits_to_dict(
    splits: list[Split], sources: dict[str, ImageSource], classes: list[str], seed: int, options: dict
) -> dict:
    """The JSON-ready content of `splits.json`: enough to rebuild and audit every split."""
    record: dict[str, dict] = {}
    for split in splits:
        source = sources[split.source]
        samples = [source.samples[i] for i in split.indices]
        counts = dict.fromkeys(classes, 0)
        for s in samples:
            counts[s.label] = counts.get(s.label, 0) + 1
        entry: dict = {"source": split.source, "indices": [int(i) for i in split.indices]}
        entry["paths"] = [s.path for s in samples]
        if source.has_groups():
            entry["groups"] = [s.group for s in samples]
        entry["counts"] = counts
        record[split.name] = entry
    return {
        "seed": seed,
        "classes": list(classes),
        "class_to_idx": {c: i for i, c in enumerate(classes)},
        "options": dict(options),
        "splits": record,
    }


def check_disjoint(splits: list[Split], sources: dict[str, ImageSource]) -> None:
    """DataError if two splits of one source share an image path or (for grouped sources) a group."""
    for kind in ("path", "group"):
        owner: dict[tuple[str, str], str] = {}
        for split in splits:
            samples = sources[split.source].samples
            shared: dict[str, list[str]] = {}
            for i in split.indices:
                key = getattr(samples[i], kind)
                if key is None:
                    continue
                first = owner.setdefault((split.source, key), split.name)
                if first != split.name:
                    shared.setdefault(first, []).append(key)
            for other, keys in shared.items():
                unique = sorted(set(keys))
                raise DataError(
                    f"splits {other!r} and {split.name!r} of source {split.source!r} share "
                    f"{len(unique)} {kind}(s), e.g. {unique[0]!r}; a {kind} must stay on one side"
                )


def find_duplicate_content(
    a: ImageSource, a_idx: Sequence[int], b: ImageSource, b_idx: Sequence[int]
) -> list[tuple[str, str]]:
    """(path in a, path in b) for every pair of byte-identical files, found by sha256.

    Catches the same image shipped in two sources (e.g. a train folder and a test zip), which
    path and group checks cannot see.
    """
    by_hash: dict[str, list[str]] = {}
    for i in a_idx:
        by_hash.setdefault(hashlib.sha256(a.read_bytes(i)).hexdigest(), []).append(a.samples[i].path)
    pairs = []
    for j in b_idx:
        digest = hashlib.sha256(b.read_bytes(j)).hexdigest()
        pairs += [(path, b.samples[j].path) for path in by_hash.get(digest, [])]
    return pairs
