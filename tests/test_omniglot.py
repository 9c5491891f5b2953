"""Omniglot reading, verification, caching and splits: real data and generated zips."""

from __future__ import annotations

import time
import zipfile

import numpy as np
import pytest

from mann.config import DataConfig
from mann.omniglot import DataError, load_omniglot, make_splits, split_characters

from .conftest import make_tiny_zip, png_bytes


def test_real_omniglot_counts_and_paper_split(omniglot_dir, tmp_path):
    cfg = DataConfig(data_dir=str(omniglot_dir))
    data = load_omniglot(cfg)
    assert data.images.shape == (1623, 20, 20, 20) and data.images.dtype == np.uint8
    assert sum(n.startswith("images_background/") for n in data.names) == 964
    assert sum(n.startswith("images_evaluation/") for n in data.names) == 659
    tr, va, te = split_characters(1623, cfg)
    assert (len(tr), len(va), len(te)) == (1100, 100, 423)
    assert len(set(tr) | set(va) | set(te)) == 1623  # disjoint and complete
    splits = make_splits(data, cfg)
    assert splits.train.shape[0] == 4400  # rotations as extra classes
    assert splits.test.shape[0] == 423
    # deterministic by seed, different for another seed
    assert np.array_equal(split_characters(1623, cfg)[2], te)
    other = split_characters(1623, DataConfig(split_seed=1))[2]
    assert not np.array_equal(other, te)


def test_cache_is_keyed_by_content_and_fast(tiny_data, tmp_path):
    cfg = DataConfig(data_dir=str(tiny_data), cache_dir=str(tmp_path / "cache"), verify_counts=False,
                     train_characters=12, val_characters=2)
    first = load_omniglot(cfg)
    assert not first.from_cache and first.cache_path.exists()
    assert first.images.shape == (20, 20, 20, 20)
    t0 = time.perf_counter()
    second = load_omniglot(cfg)
    assert second.from_cache and time.perf_counter() - t0 < 1.0
    assert np.array_equal(first.images, second.images) and first.names == second.names
    # new content -> new digest -> rebuilt
    make_tiny_zip(tiny_data / "images_evaluation.zip", "images_evaluation", alphabets=2, chars=5, first_id=13)
    third = load_omniglot(cfg)
    assert not third.from_cache and third.digest != first.digest and len(third.images) == 22
    # another image size is another cache entry
    small = load_omniglot(DataConfig(**{**cfg.__dict__, "image_size": 10}))
    assert small.images.shape[2:] == (10, 10)


def test_extracted_folders_work_too(tiny_data, tmp_path):
    for name in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(tiny_data / f"{name}.zip") as z:
            z.extractall(tmp_path / "folders")
    cfg = DataConfig(data_dir=str(tmp_path / "folders"), cache_dir=str(tmp_path / "c"), verify_counts=False,
                     train_characters=12, val_characters=2)
    from_zip = load_omniglot(DataConfig(**{**cfg.__dict__, "data_dir": str(tiny_data)}))
    from_dir = load_omniglot(cfg)
    assert np.array_equal(from_zip.images, from_dir.images)


def test_counts_are_verified(tiny_data, tmp_path):
    cfg = DataConfig(data_dir=str(tiny_data), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="12 characters, expected 964"):
        load_omniglot(cfg)


def test_missing_data_dir_and_missing_source(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_omniglot(DataConfig(data_dir=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="no Omniglot found"):
        load_omniglot(DataConfig(data_dir=str(tmp_path)))
    make_tiny_zip(tmp_path / "images_background.zip", "images_background", 1, 2)
    with pytest.raises(DataError, match="missing images_evaluation"):
        load_omniglot(DataConfig(data_dir=str(tmp_path), cache_dir=str(tmp_path / "c")))


def test_corrupt_zip_is_named(tmp_path):
    (tmp_path / "images_background.zip").write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(DataError, match=r"images_background.zip: not a readable zip"):
        load_omniglot(DataConfig(data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"), verify_counts=False,
                                 train_characters=2, val_characters=0))


def test_truncated_zip_is_named(tiny_data, tmp_path):
    path = tiny_data / "images_background.zip"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="images_background.zip"):
        load_omniglot(DataConfig(data_dir=str(tiny_data), cache_dir=str(tmp_path / "c"), verify_counts=False,
                                 train_characters=12, val_characters=2))


def test_corrupt_png_is_named(tmp_path):
    make_tiny_zip(tmp_path / "images_background.zip", "images_background", 1, 2,
                  extra={"images_background/Alphabet_9/character01/0099_01.png": b"\x89PNG garbage"})
    with pytest.raises(DataError, match="0099_01.png: not a readable PNG"):
        load_omniglot(DataConfig(data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"), verify_counts=False,
                                 train_characters=2, val_characters=0))


@pytest.mark.parametrize("evil", ["../evil.png", "images_background/../../evil.png", "/etc/evil.png"])
def test_path_traversal_entries_are_refused(tmp_path, evil):
    make_tiny_zip(tmp_path / "images_background.zip", "images_background", 1, 2, extra={evil: png_bytes(0)})
    with pytest.raises(DataError, match="unsafe entry"):
        load_omniglot(DataConfig(data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"), verify_counts=False,
                                 train_characters=2, val_characters=0))
    assert not (tmp_path.parent / "evil.png").exists()


@pytest.mark.parametrize(
    "name,match",
    [
        ("images_background/Alphabet_0/0001_01.png", "not in the layout"),
        ("images_background/Alphabet_0/character01/first.png", "not NNNN_DD.png"),
        ("other_folder/Alphabet_0/character01/0001_01.png", "outside the expected top folder"),
    ],
)
def test_wrong_layout_is_named(tmp_path, name, match):
    make_tiny_zip(tmp_path / "images_background.zip", "images_background", 1, 2, extra={name: png_bytes(0)})
    with pytest.raises(DataError, match=match):
        load_omniglot(DataConfig(data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"), verify_counts=False,
                                 train_characters=2, val_characters=0))


def test_missing_drawer_is_named(tmp_path):
    path = tmp_path / "images_background.zip"
    make_tiny_zip(path, "images_background", 1, 3)
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist() if not n.endswith("0002_07.png")}
    with zipfile.ZipFile(path, "w") as z:
        for n, b in entries.items():
            z.writestr(n, b)
    with pytest.raises(DataError, match="character02 has drawers"):
        load_omniglot(DataConfig(data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"), verify_counts=False,
                                 train_characters=2, val_characters=0))
