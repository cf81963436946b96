"""Leakage-aware grouping (index blocks, pHash), stratified group splits, split CSV round trip."""

from __future__ import annotations

import csv
import logging
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kidneyscan.data import splits
from kidneyscan.data.datasets import CLASSES, DataError, Sample, scan_dataset


def _fake_samples(n_blocks: int = 12, per_block: int = 3) -> list[Sample]:
    """Samples in index blocks (stride 2 inside a block, gap 40 between blocks), 4 classes."""
    out = []
    for label, name in enumerate(CLASSES):
        for b in range(n_blocks):
            for k in range(per_block):
                idx = 100 * b + 2 * k
                out.append(Sample(Path(f"/x/{name}/{name}- ({idx}).jpg"), label, name, "", idx))
    return out


def _pattern(seed: int, size: int = 48) -> np.ndarray:
    """A smooth random image: different seeds give perceptually different images."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((6, 6)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC)).clip(0, 1)


def _save(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image * 255).round().astype(np.uint8)).save(path)


def test_index_blocks_follow_gaps_within_each_class() -> None:
    # Prepare
    samples = [
        Sample(Path(f"/x/{c}{i}.jpg"), CLASSES.index(c), c, f"{c}{i}", i)
        for c, i in [("Cyst", 1), ("Cyst", 3), ("Cyst", 6), ("Cyst", 20), ("Cyst", 21)]
        + [("Cyst", 60), ("Normal", 2), ("Normal", 4)]
    ] + [Sample(Path("/x/noindex.jpg"), 0, "Cyst", "noindex", None)]
    # Execute
    groups = splits.index_blocks(samples, max_gap=5)
    # Assert: Cyst {1,3,6} {20,21} {60}; Normal {2,4} separate from Cyst 1-6; no index alone
    assert groups.tolist() == [0, 0, 0, 1, 1, 2, 3, 3, 4]


def test_phash_is_stable_under_noise_and_differs_between_images() -> None:
    # Prepare
    a = _pattern(1)
    noisy = np.clip(a + np.random.default_rng(0).normal(0, 0.01, a.shape), 0, 1)
    b = _pattern(2)
    # Execute
    ha, hn, hb = (splits.phash(x) for x in (a, noisy, b))
    # Assert
    assert ha.shape == (64,) and ha.dtype == bool
    assert int((ha != hn).sum()) <= 4
    assert int((ha != hb).sum()) > 12


def test_hamming_pairs_match_brute_force() -> None:
    # Prepare: random hashes plus a few near copies
    rng = np.random.default_rng(3)
    hashes = rng.random((40, 64)) > 0.5
    hashes[5] = hashes[7]
    hashes[9] = hashes[2]
    hashes[9, :3] ^= True
    # Execute
    pairs = splits.hamming_pairs(hashes, 20, chunk=7)
    # Assert
    expected = {
        (i, j, int((hashes[i] != hashes[j]).sum()))
        for i, j in combinations(range(40), 2)
        if (hashes[i] != hashes[j]).sum() <= 20
    }
    assert {tuple(map(int, p)) for p in pairs} == expected
    assert (5, 7, 0) in expected and (2, 9, 3) in expected


def _flip(bits: np.ndarray, n: int, start: int = 0) -> np.ndarray:
    out = bits.copy()
    out[start : start + n] ^= True
    return out


def test_union_links_far_duplicates_and_cuts_runs_at_content_jumps() -> None:
    # Prepare: hashes with known distances. Cyst 2 is 8 bits from Cyst 1 (a neighbouring slice,
    # not a near duplicate); Cyst 500 is 1 bit from Cyst 1 (a far-away near duplicate); Cyst 901
    # is 20 bits from its index neighbour Cyst 900 (a new patient inside a run).
    base = np.zeros(64, dtype=bool)
    base[::2] = True
    other = np.zeros(64, dtype=bool)
    other[:32] = True  # 32 bits from base
    hashes = np.stack([base, _flip(base, 8), _flip(base, 1, 60), other, _flip(other, 20)])
    samples = [
        Sample(Path(f"/x/Cyst- ({i}).png"), 0, "Cyst", f"Cyst- ({i})", i)
        for i in (1, 2, 500, 900, 901)
    ]
    # Execute
    blocks = splits.groups_for(samples, grouping="blocks", hashes=hashes)
    phash = splits.groups_for(samples, grouping="phash", hashes=hashes)
    union = splits.groups_for(samples, grouping="blocks+phash", hashes=hashes)
    plain = splits.groups_for(samples, grouping="blocks+phash", hashes=hashes, max_jump=None)
    # Assert
    assert blocks.tolist() == [0, 0, 1, 2, 2]
    assert phash.tolist() == [0, 1, 0, 2, 3]
    assert union.tolist() == [0, 0, 0, 1, 2]
    assert plain.tolist() == [0, 0, 0, 1, 1]


def test_groups_from_images_on_disk(tmp_path: Path) -> None:
    # Prepare: Cyst 500 is a copy of Cyst 1; the others are unrelated images
    images = {1: _pattern(1), 2: _pattern(2), 500: _pattern(1), 900: _pattern(3)}
    samples = []
    for idx, img in images.items():
        p = tmp_path / "Cyst" / f"Cyst- ({idx}).png"
        _save(p, img)
        samples.append(Sample(p, 0, "Cyst", p.stem, idx))
    # Execute
    union = splits.groups_for(samples, grouping="blocks+phash", max_jump=None)
    # Assert: 1-2 index block, 500 copy of 1, 900 alone
    assert union.tolist() == [0, 0, 0, 1]


def test_patient_grouping_and_auto() -> None:
    samples = [
        Sample(Path(f"/x/{i}.jpg"), i % 2, CLASSES[i % 2], str(i), i, patient_id=f"p{i // 4}")
        for i in range(8)
    ]
    groups = splits.groups_for(samples, grouping="auto")
    assert splits.resolve_grouping(samples, "auto") == "patient"
    # same patient id in two classes = two patients (phantom ids are per class)
    assert len(set(groups.tolist())) == 4
    with pytest.raises(DataError, match="needs patient ids"):
        splits.groups_for([Sample(Path("/x.jpg"), 0, "Cyst", "x", 1)], grouping="patient")
    with pytest.raises(DataError, match="unknown grouping 'patients'"):
        splits.groups_for(samples, grouping="patients")


def test_make_split_keeps_groups_whole_and_is_stratified_and_repeatable() -> None:
    # Prepare
    samples = _fake_samples()
    # Execute
    first = splits.make_split(samples, val=0.15, test=0.15, seed=0, grouping="blocks")
    again = splits.make_split(samples, val=0.15, test=0.15, seed=0, grouping="blocks")
    # Assert
    assert {k: [s.path for s in v] for k, v in first.items()} == {
        k: [s.path for s in v] for k, v in again.items()
    }
    assert splits.crossing_groups(first) == {}
    assert sum(len(v) for v in first.values()) == len(samples)
    for name in ("train", "val", "test"):
        assert set(first.info["per_split"][name]) == set(CLASSES)
    assert 0.10 <= first.info["fractions"]["test"] <= 0.20
    assert 0.10 <= first.info["fractions"]["val"] <= 0.20
    assert first.info["grouping"] == "blocks" and first.info["n_groups"] == 48


def test_image_level_split_leaks_blocks_that_group_split_keeps_whole() -> None:
    # Prepare
    samples = _fake_samples()
    blocks = splits.index_blocks(samples)
    # Execute
    leaky = splits.make_split(samples, grouping="none", seed=1)
    leaky.groups = {s.path: int(g) for s, g in zip(samples, blocks, strict=True)}
    safe = splits.make_split(samples, groups=blocks, seed=1)
    # Assert
    assert len(splits.crossing_groups(leaky)) > 10
    assert splits.crossing_groups(safe) == {}


def test_kfold_partitions_the_data_by_groups() -> None:
    # Prepare
    samples = _fake_samples(n_blocks=15)
    # Execute
    kf = splits.make_kfold(samples, 5, test=0.2, seed=0, grouping="blocks")
    pairs = splits.kfold_pairs(kf)
    # Assert
    assert sorted(kf) == ["fold0", "fold1", "fold2", "fold3", "fold4", "test"]
    assert splits.crossing_groups(kf) == {}
    assert len(pairs) == 5
    non_test = len(samples) - len(kf["test"])
    for train, val in pairs:
        assert len(train) + len(val) == non_test
        assert not {s.path for s in train} & {s.path for s in val}
    assert {s.path for _, val in pairs for s in val} == {
        s.path for k, v in kf.items() if k != "test" for s in v
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val": 0.5, "test": 0.5}, "leaves nothing to train on"),
        ({"val": -0.1}, "val fraction must be in"),
        ({"test": 0.1, "val": 0.1, "grouping": "blocks"}, r"only 4 group\(s\) for 10 folds"),
    ],
)
def test_bad_split_requests_are_clear_errors(kwargs: dict, message: str) -> None:
    samples = _fake_samples(n_blocks=1)  # 4 groups in all
    with pytest.raises(DataError, match=message):
        splits.make_split(samples, **kwargs)


def _tiny_dataset(root: Path, per_class: int = 6) -> None:
    for label, name in enumerate(CLASSES):
        for k in range(per_class):
            idx = 30 * k  # every image its own block
            _save(root / name / f"{name}- ({idx}).png", _pattern(100 * label + k, 16))


def test_split_csv_round_trip_with_relative_paths(tmp_path: Path) -> None:
    # Prepare
    data = tmp_path / "data"
    _tiny_dataset(data)
    samples = scan_dataset(data)
    split = splits.make_split(samples, val=0.25, test=0.25, grouping="blocks")
    out = tmp_path / "split.csv"
    # Execute
    splits.save_split(split, out, root=data)
    loaded = splits.load_split(out, root=data)
    # Assert
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == splits.SPLIT_COLUMNS
    assert not Path(rows[0]["path"]).is_absolute()
    assert {k: [s.path for s in v] for k, v in loaded.items()} == {
        k: [s.path for s in v] for k, v in split.items() if v
    }
    assert loaded.groups == split.groups


def _edit_csv(csv_file: Path, line: int, **changes: str) -> None:
    with csv_file.open() as fh:
        rows = list(csv.DictReader(fh))
    rows[line - 2].update(changes)
    with csv_file.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=splits.SPLIT_COLUMNS)
        w.writeheader()
        w.writerows(rows)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"split": "trian"}, r"line 3: split 'trian' is not train, val, test or foldN"),
        ({"label": "2"}, r"line 3: label 2 does not match class 'Cyst'"),
        ({"Class": "Stone", "label": "2"}, r"is 'Stone' in the split but 'Cyst' in the data"),
        ({"path": "Cyst/gone.png"}, r"line 3: 'Cyst/gone.png': file not found"),
    ],
)
def test_split_csv_not_matching_the_data_is_named(
    tmp_path: Path, changes: dict[str, str], message: str
) -> None:
    # Prepare
    data = tmp_path / "data"
    _tiny_dataset(data)
    out = splits.save_split(
        splits.make_split(scan_dataset(data), grouping="blocks", val=0.25, test=0.25),
        tmp_path / "split.csv",
        root=data,
    )
    _edit_csv(out, 3, **changes)
    # Execute / Assert
    with pytest.raises(DataError, match=message):
        splits.load_split(out, root=data)


def test_split_csv_needs_root_for_relative_paths_and_counts_new_images(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    data = tmp_path / "data"
    _tiny_dataset(data)
    out = splits.save_split(
        splits.make_split(scan_dataset(data), grouping="blocks", val=0.25, test=0.25),
        tmp_path / "split.csv",
        root=data,
    )
    _save(data / "Cyst" / "Cyst- (999).png", _pattern(7, 16))
    # Execute / Assert
    with pytest.raises(DataError, match="relative path .* pass the data folder"):
        splits.load_split(out)
    splits.load_split(out, root=data)
    assert "1 image(s) of" in caplog.text and "are in no split" in caplog.text


def test_load_split_warns_about_groups_across_splits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    _tiny_dataset(data)
    samples = scan_dataset(data)
    split = splits.make_split(samples, grouping="none", val=0.25, test=0.25)
    split.groups = dict.fromkeys(split.groups, 0)  # pretend all images are one patient
    out = splits.save_split(split, tmp_path / "split.csv")  # absolute paths: no root needed
    caplog.set_level(logging.WARNING)
    loaded = splits.load_split(out)
    assert splits.crossing_groups(loaded) == {0: ["test", "train", "val"]}
    assert "1 group(s) span more than one split" in caplog.text


@pytest.mark.realdata
@pytest.mark.slow
def test_real_sample_group_split_has_every_class_everywhere(real_data: Path) -> None:
    # Execute
    samples = scan_dataset(real_data)
    split = splits.make_split(samples, grouping="blocks+phash")
    # Assert
    assert splits.crossing_groups(split) == {}
    for name in ("train", "val", "test"):
        assert set(split.info["per_split"][name]) == set(CLASSES)


def test_phantom_split_groups_by_true_patient(phantom_dir: Path) -> None:
    # Prepare
    samples = scan_dataset(phantom_dir)
    # Execute
    split = splits.make_split(samples, seed=0)
    # Assert: auto grouping uses the phantom's patient ids; no patient is in two splits
    assert split.info["grouping"] == "patient"
    where: dict[tuple[int, str | None], set[str]] = {}
    for name, members in split.items():
        for s in members:
            where.setdefault((s.label, s.patient_id), set()).add(name)
    assert all(len(v) == 1 for v in where.values())
    assert sum(len(v) for v in split.values()) == len(samples) == 48


def test_greedy_fold_choice_also_keeps_every_class(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: force the greedy path used when there are too many fold combinations
    monkeypatch.setattr(splits, "MAX_FOLD_CHOICES", 1)
    samples = _fake_samples()
    # Execute
    split = splits.make_split(samples, val=0.2, test=0.2, grouping="blocks", seed=3)
    # Assert
    assert splits.crossing_groups(split) == {}
    for name in ("train", "val", "test"):
        assert set(split.info["per_split"][name]) == set(CLASSES)
    assert 0.15 <= split.info["fractions"]["test"] <= 0.25


def _index_range(members: list[Sample], name: str) -> tuple[int, int]:
    idx = [s.index for s in members if s.class_name == name]
    return min(idx), max(idx)  # type: ignore[type-var]


def test_band_kfold_is_band_k_of_every_class_in_file_number_order() -> None:
    # Prepare: shuffled input order, so only the file numbers can give the bands
    samples = _fake_samples(n_blocks=10)
    samples = [samples[i] for i in np.random.default_rng(0).permutation(len(samples))]
    # Execute
    kf = splits.make_kfold(samples, 5, grouping="bands")
    # Assert: equal folds; within each class fold k is one contiguous index range, all of it
    # below fold k+1's (so no two folds interleave, whatever blocks the numbers form)
    assert sorted(kf) == [f"fold{i}" for i in range(5)] and kf.info["grouping"] == "bands"
    assert {len(v) for v in kf.values()} == {len(samples) // 5}
    for name in CLASSES:
        ranges = [_index_range(kf[f"fold{i}"], name) for i in range(5)]
        assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        assert sum(s.class_name == name for s in kf["fold0"]) == len(samples) // 20


def test_band_split_holds_out_whole_bands_by_seed_and_auto_uses_bands() -> None:
    samples = _fake_samples(n_blocks=14)
    split = splits.make_split(samples, val=0.15, test=0.15, seed=0)
    other = splits.make_split(samples, val=0.15, test=0.15, seed=1)
    assert split.info["grouping"] == "bands" and split.info["n_bands"] == 7
    assert len(split.info["test_bands"]) == len(split.info["val_bands"]) == 1
    assert (split.info["test_bands"], split.info["val_bands"]) != (
        other.info["test_bands"],
        other.info["val_bands"],
    )
    assert splits.crossing_groups(split) == {}
    for name in CLASSES:
        lo, hi = _index_range(split["test"], name)
        # a test band is contiguous: no train or val image of that class falls inside it
        assert not [
            s
            for p in ("train", "val")
            for s in split[p]
            if s.class_name == name and lo <= s.index <= hi  # type: ignore[operator]
        ]
    kf = splits.make_kfold(samples, 5, test=0.15, grouping="bands")
    assert sorted(kf) == [*(f"fold{i}" for i in range(5)), "test"]
    with pytest.raises(DataError, match="fewer than the 5 bands"):
        splits.index_bands(samples[:3], 5)
