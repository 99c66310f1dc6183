"""Stratified subsampling, group-aware holdouts, the splits.json record and leak checks."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lnshift.config import VAL_SIZES, FitConfig
from lnshift.data import (
    Split,
    check_disjoint,
    find_duplicate_content,
    holdout,
    matched,
    open_source,
    splits_to_dict,
    subsample,
)
from lnshift.errors import ConfigError, DataError
from lnshift.training.ingredients import Data, prepare_data

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def labels_of(sizes: dict[str, int]) -> list[str]:
    """Labels interleaved (not grouped by class), so tests do not rely on input order."""
    labels = [c for c, n in sizes.items() for _ in range(n)]
    return [labels[i] for i in np.random.default_rng(123).permutation(len(labels))]


def per_class(labels: list[str], indices: np.ndarray) -> Counter:
    return Counter(labels[i] for i in indices)


def test_subsample_fraction_is_stratified_with_at_least_one_per_class() -> None:
    labels = labels_of({"a": 10, "b": 3, "c": 1})
    picked = subsample(labels, fraction=0.3, seed=0)
    assert picked.dtype == np.int64 and list(picked) == sorted(picked)
    assert per_class(labels, picked) == {"a": 3, "b": 1, "c": 1}
    assert len(subsample(labels, fraction=1.0, seed=0)) == 14


def test_subsample_shots_exact_and_too_few_names_the_class() -> None:
    labels = labels_of({"a": 10, "b": 3})
    assert per_class(labels, subsample(labels, shots=3, seed=1)) == {"a": 3, "b": 3}
    with pytest.raises(DataError, match=r"shots=4.*class 'b' has 3"):
        subsample(labels, shots=4, seed=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of fraction and shots"),
        ({"fraction": 0.5, "shots": 2}, "exactly one of fraction and shots"),
        ({"fraction": 0.0}, r"fraction must be in \(0, 1\], got 0.0"),
        ({"fraction": 1.5}, "got 1.5"),
        ({"shots": 0}, "shots must be an integer >= 1, got 0"),
        ({"shots": 2.5}, "got 2.5"),
    ],
)
def test_subsample_option_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        subsample(["a", "b"], seed=0, **kwargs)


def test_subsample_is_nested_and_seeded() -> None:
    labels = labels_of({"a": 40, "b": 25, "c": 7})
    small, large = subsample(labels, fraction=0.2, seed=5), subsample(labels, fraction=0.6, seed=5)
    assert set(small) < set(large)
    assert set(subsample(labels, shots=3, seed=5)) < set(subsample(labels, shots=4, seed=5))
    assert np.array_equal(small, subsample(labels, fraction=0.2, seed=5))
    assert not np.array_equal(small, subsample(labels, fraction=0.2, seed=6))


def test_holdout_without_groups_holds_the_rounded_fraction() -> None:
    labels = labels_of({"a": 10, "b": 2, "c": 1, "d": 4})
    kept, held = holdout(labels, None, fraction=0.25, seed=0)
    assert per_class(labels, held) == {"a": 2, "b": 1, "d": 1}
    assert per_class(labels, kept) == {"a": 8, "b": 1, "c": 1, "d": 3}
    assert kept.dtype == held.dtype == np.int64
    assert np.array_equal(np.sort(np.concatenate([kept, held])), np.arange(len(labels)))
    all_none = holdout(labels, [None] * len(labels), fraction=0.25, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(all_none, (kept, held), strict=True))
    with pytest.raises(ConfigError, match="got 1"):
        holdout(labels, None, fraction=1, seed=0)


def test_holdout_keeps_groups_whole_and_assigns_them_by_majority() -> None:
    labels = ["a"] * 12 + ["b"] * 12
    groups = [f"g{i // 3}" for i in range(24)]  # eight groups of three
    groups[3] = "g0"  # g0 is now four 'a' images, g1 two
    labels[23] = "a"  # g7 stays a 'b' group by majority
    kept, held = holdout(labels, groups, fraction=0.25, seed=3)
    held_groups = {groups[i] for i in held}
    assert held_groups.isdisjoint(groups[i] for i in kept)
    # Target round(0.25 * 12) = 3 per class; one group per class gets closest from an empty side.
    assert len(held_groups & {"g0", "g1", "g2", "g3"}) == 1
    assert len(held_groups & {"g4", "g5", "g6", "g7"}) == 1
    assert sorted(Counter(groups[i] for i in held).values())[-1] <= 4


def test_holdout_of_a_class_of_big_groups_still_holds_one_group_and_keeps_one() -> None:
    labels = ["a"] * 30 + ["b"] * 10
    groups = ["big1"] * 15 + ["big2"] * 15 + [str(i) for i in range(10)]
    kept, held = holdout(labels, groups, fraction=0.1, seed=0)
    held_a = {groups[i] for i in held if labels[i] == "a"}
    assert len(held_a) == 1 and len(per_class(labels, kept)) == 2


def test_holdout_single_group_class_stays_kept() -> None:
    labels = ["a"] * 5 + ["b"] * 6
    groups = ["A"] * 5 + ["b1", "b1", "b2", "b2", "b3", "b3"]
    kept, held = holdout(labels, groups, fraction=0.4, seed=0)
    assert per_class(labels, kept)["a"] == 5
    assert set(per_class(labels, held)) == {"b"}


@st.composite
def labelled_data(draw: st.DrawFn) -> tuple[list[str], list[str | None] | None]:
    sizes = draw(st.lists(st.integers(1, 12), min_size=1, max_size=30))
    labels = [f"c{k}" for k, n in enumerate(sizes) for _ in range(n)]
    labels = draw(st.permutations(labels))
    if draw(st.booleans()):
        return labels, None
    groups = draw(
        st.lists(st.one_of(st.none(), st.sampled_from("ABCDEFGHIJ")), min_size=len(labels), max_size=len(labels))
    )
    return labels, groups


@settings(max_examples=60, deadline=None)
@given(
    data=labelled_data(),
    fractions=st.lists(st.floats(0.01, 1.0), min_size=2, max_size=2),
    shots=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_subsample_properties(data: tuple, fractions: list[float], shots: int, seed: int) -> None:
    labels, _ = data
    sizes = Counter(labels)
    low, high = sorted(fractions)
    small = subsample(labels, fraction=low, seed=seed)
    large = subsample(labels, fraction=high, seed=seed)
    assert per_class(labels, small) == {c: max(1, round(low * n)) for c, n in sizes.items()}
    assert set(small) <= set(large)
    assert np.array_equal(small, subsample(labels, fraction=low, seed=seed))
    if shots + 1 <= min(sizes.values()):
        few = subsample(labels, shots=shots, seed=seed)
        assert per_class(labels, few) == dict.fromkeys(sizes, shots)
        assert set(few) < set(subsample(labels, shots=shots + 1, seed=seed))
    elif shots > min(sizes.values()):
        with pytest.raises(DataError):
            subsample(labels, shots=shots, seed=seed)


@settings(max_examples=60, deadline=None)
@given(data=labelled_data(), fraction=st.floats(0.01, 0.99), seed=st.integers(0, 2**32 - 1))
def test_holdout_properties(data: tuple, fraction: float, seed: int) -> None:
    labels, groups = data
    kept, held = holdout(labels, groups, fraction=fraction, seed=seed)
    again = holdout(labels, groups, fraction=fraction, seed=seed)
    assert np.array_equal(kept, again[0]) and np.array_equal(held, again[1])
    assert np.array_equal(np.sort(np.concatenate([kept, held])), np.arange(len(labels)))
    assert len(np.intersect1d(kept, held)) == 0
    if groups is None:
        for c, n in Counter(labels).items():
            expected = min(max(round(fraction * n), 1), n - 1) if n >= 2 else 0
            assert per_class(labels, held)[c] == expected
        return
    named = {g for g in groups if g is not None}
    assert {groups[i] for i in held} & {groups[i] for i in kept} <= {None}
    # Group units: named groups plus one unit per ungrouped image; each class of >= 2 units is split.
    units: dict[object, list[int]] = {}
    for i, g in enumerate(groups):
        units.setdefault(("image", i) if g is None else g, []).append(i)
    majority = {
        u: min(Counter(labels[i] for i in idx).items(), key=lambda kv: (-kv[1], kv[0]))[0] for u, idx in units.items()
    }
    held_set = set(held.tolist())
    for c in set(majority.values()):
        sides = {units[u][0] in held_set for u in units if majority[u] == c}
        n_units = sum(1 for u in units if majority[u] == c)
        assert sides == ({True, False} if n_units >= 2 else {False}), (c, named)


def test_matched_takes_the_counts_at_least_one_at_most_all() -> None:
    labels = labels_of({"a": 10, "b": 3, "c": 2})
    picked = matched(labels, None, counts={"a": 4, "b": 5}, seed=0)
    assert per_class(labels, picked) == {"a": 4, "b": 3, "c": 1}
    assert picked.dtype == np.int64 and list(picked) == sorted(set(picked))


def test_matched_takes_whole_groups_near_the_target() -> None:
    labels = ["a"] * 12 + ["b"] * 6
    groups = [f"a{i // 3}" for i in range(12)] + ["b-big"] * 5 + ["b-one"]  # a: four groups of 3
    picked = matched(labels, groups, counts={"a": 5, "b": 1}, seed=1)
    taken = Counter(groups[i] for i in picked)
    assert all(n == groups.count(g) for g, n in taken.items())  # whole groups
    assert per_class(labels, picked)["a"] in (3, 6)  # one or two groups of 3 for a target of 5
    assert set(taken) & {"b-big", "b-one"} == {"b-one"}  # the group that meets the target of 1


@settings(max_examples=60, deadline=None)
@given(data=labelled_data(), target=st.integers(0, 6), seed=st.integers(0, 2**32 - 1))
def test_matched_properties(data: tuple, target: int, seed: int) -> None:
    labels, groups = data
    counts = dict.fromkeys(set(labels), target)
    picked = matched(labels, groups, counts=counts, seed=seed)
    assert np.array_equal(picked, matched(labels, groups, counts=counts, seed=seed))
    if groups is None:
        assert per_class(labels, picked) == {c: min(max(target, 1), n) for c, n in Counter(labels).items()}
        return
    taken = set(picked.tolist())
    units: dict[object, list[int]] = {}
    for i, g in enumerate(groups):
        units.setdefault(("image", i) if g is None else g, []).append(i)
    assert all(len({i in taken for i in idx}) == 1 for idx in units.values())  # groups stay whole
    majority = {
        u: min(Counter(labels[i] for i in idx).items(), key=lambda kv: (-kv[1], kv[0]))[0] for u, idx in units.items()
    }
    assert {majority[u] for u, idx in units.items() if idx[0] in taken} == set(majority.values())  # every class


def image_folder(root: Path, sizes: dict[str, int], group_size: int | None = None) -> str:
    """PNG images per class under root; with group_size, a CSV path,label,group (that many images a group)."""
    rows = ["path,label,group"]
    for c, n in sizes.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (4, 4), (i, len(rows), 0)).save(root / c / f"{i}.png")
            rows.append(f"{c}/{i}.png,{c},{c}{i // group_size if group_size else i}")
    if group_size is None:
        return str(root)
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    return str(root / "list.csv")


DATA_CONFIG = {"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear"}


def splits_of(train: str, **options) -> Data:
    cfg = FitConfig.from_dict({"train": train, "test": {}, **options})
    return prepare_data(cfg, {**DATA_CONFIG, "crop_pct": 1.0})


@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("regime", [{"shots": 3}, {"fraction": 0.1}])
def test_val_size_match_validates_on_as_much_as_training(tmp_path: Path, regime: dict, groups: int | None) -> None:
    train = image_folder(tmp_path / "data", {"a": 60, "b": 40, "c": 30}, groups)
    holdout_data = splits_of(train, **regime, seed=4)
    data = splits_of(train, **regime, seed=4, val_size="match")
    record, splits = data.splits, data.splits["splits"]
    assert splits["train"] == holdout_data.splits["splits"]["train"]  # the rule changes only validation
    val, held = set(splits["val"]["indices"]), set(holdout_data.splits["splits"]["val"]["indices"])
    assert val < held and not val & set(splits["train"]["indices"])  # drawn from the hold-out: never trained on
    target = splits["train"]["counts"]
    assert record["validation"] == {
        "rule": "match",
        "meaning": VAL_SIZES["match"],
        "drawn_from": "a --val-fraction 0.2 hold-out of --train",
        "available": len(held),
        "matched_to": "--shots 3" if "shots" in regime else "--fraction 0.1",
        "target": target,
        "size": len(val),
    }
    assert record["options"]["val_size"] == "match"
    if groups is None:
        assert splits["val"]["counts"] == target
    else:  # whole groups of 2: each class within one image of its target
        assert all(abs(splits["val"]["counts"][c] - n) <= 1 for c, n in target.items())
        assert not set(splits["val"]["groups"]) & set(splits["train"]["groups"])
    fsr_sub_run = splits_of(train, **regime, seed=4, val_size="match", subset=0.5).splits["splits"]
    assert fsr_sub_run["val"] == splits["val"] and fsr_sub_run["train"] != splits["train"]  # the parent's validation
    again = splits_of(train, **regime, seed=4, val_size="match").splits["splits"]["val"]
    assert again == splits["val"] != splits_of(train, **regime, seed=5, val_size="match").splits["splits"]["val"]


def test_val_size_holdout_and_match_without_a_subset_keep_the_whole_hold_out(tmp_path: Path) -> None:
    train = image_folder(tmp_path / "data", {"a": 10, "b": 10})
    whole, match = splits_of(train), splits_of(train, val_size="match")
    assert whole.splits["validation"]["rule"] == "holdout" and "target" not in whole.splits["validation"]
    assert match.splits["splits"]["val"] == whole.splits["splits"]["val"]
    assert match.splits["validation"]["size"] == whole.splits["validation"]["size"] == 4
    assert "no --fraction or --shots" in match.splits["validation"]["not_applied"]


def test_val_size_match_cuts_a_given_val_source_too(tmp_path: Path) -> None:
    train = image_folder(tmp_path / "train", {"a": 10, "b": 10})
    val = image_folder(tmp_path / "val", {"a": 8, "b": 8})
    data = splits_of(train, val=val, shots=2, val_size="match")
    assert data.splits["splits"]["val"]["counts"] == {"a": 2, "b": 2}
    assert data.splits["validation"]["drawn_from"] == f"--val {val}"
    assert len(splits_of(train, val=val, shots=2).splits["splits"]["val"]["indices"]) == 16


def test_splits_to_dict_is_json_ready_and_counts_classes(tmp_path: Path) -> None:
    for rel in ("a/1.png", "a/2.png", "b/3.png", "b/4.png"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / rel)
    (tmp_path / "list.csv").write_text("path,label,group\na/1.png,a,x\na/2.png,a,y\nb/3.png,b,z\n")
    folder, table = open_source(str(tmp_path)), open_source(str(tmp_path / "list.csv"))
    splits = [Split("train", folder.spec, [0, 2, 3]), Split("test:csv", table.spec, [1, 2])]
    record = splits_to_dict(
        splits, {folder.spec: folder, table.spec: table}, ["a", "b"], seed=7, options={"fraction": 0.5}
    )
    assert json.loads(json.dumps(record)) == record
    assert record["seed"] == 7 and record["class_to_idx"] == {"a": 0, "b": 1}
    assert record["options"] == {"fraction": 0.5}
    assert record["splits"]["train"] == {
        "source": folder.spec,
        "indices": [0, 2, 3],
        "paths": ["a/1.png", "b/3.png", "b/4.png"],
        "counts": {"a": 1, "b": 2},
    }
    assert record["splits"]["test:csv"]["groups"] == ["y", "z"]
    assert record["splits"]["test:csv"]["counts"] == {"a": 1, "b": 1}


def test_check_disjoint_catches_shared_paths_and_groups(tmp_path: Path) -> None:
    for rel in ("a/1.png", "a/2.png", "b/3.png"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / rel)
    (tmp_path / "list.csv").write_text("path,label,group\na/1.png,a,x\na/2.png,a,x\nb/3.png,b,z\n")
    folder, table = open_source(str(tmp_path)), open_source(str(tmp_path / "list.csv"))
    sources = {folder.spec: folder, table.spec: table}
    check_disjoint([Split("train", folder.spec, [0, 2]), Split("test:csv", table.spec, [0, 2])], sources)
    with pytest.raises(DataError, match=r"'train' and 'val' of source .* share 1 path.*'a/1\.png'"):
        check_disjoint([Split("train", folder.spec, [0, 2]), Split("val", folder.spec, [0])], sources)
    with pytest.raises(DataError, match=r"'train' and 'test:t' .* share 1 group.*'x'"):
        check_disjoint([Split("train", table.spec, [0, 2]), Split("test:t", table.spec, [1])], sources)


def test_find_duplicate_content_reports_identical_files_across_sources(tmp_path: Path) -> None:
    def png(color: tuple[int, int, int]) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), color).save(buf, "PNG")
        return buf.getvalue()

    files = {"one/a/1.png": png((1, 1, 1)), "one/b/2.png": png((2, 2, 2))}
    files |= {"two/a/x.png": png((2, 2, 2)), "two/b/y.png": png((3, 3, 3))}
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    one, two = open_source(str(tmp_path / "one")), open_source(str(tmp_path / "two"))
    assert find_duplicate_content(one, [0, 1], two, [0, 1]) == [("b/2.png", "a/x.png")]
    assert find_duplicate_content(one, [0], two, [0, 1]) == []


def test_real_lc25000_group_holdout_leaks_no_group() -> None:
    table, archive = DATA / "lc25000_lung_groups.csv", DATA / "lc25000_lung.zip"
    if not (table.exists() and archive.exists()):
        pytest.skip(f"real data missing under {DATA} (the repo is expected beside shared/data)")
    source = open_source(str(table), root=str(archive))
    labels = [s.label for s in source.samples]
    groups = [s.group for s in source.samples]
    kept, held = holdout(labels, groups, fraction=0.2, seed=0)
    assert {groups[i] for i in kept}.isdisjoint(groups[i] for i in held)
    for n in per_class(labels, held).values():
        assert abs(n - 1000) <= 40
    train, val = holdout([labels[i] for i in kept], [groups[i] for i in kept], fraction=0.1, seed=0)
    splits = [
        Split("train", source.spec, kept[train].tolist()),
        Split("val", source.spec, kept[val].tolist()),
        Split("test:lung", source.spec, held.tolist()),
    ]
    check_disjoint(splits, {source.spec: source})
