"""image_cache.ImageCache: the sidecar's checksums catch a changed array, and a sidecar with a field of the wrong
type rebuilds the cache instead of raising."""
from __future__ import annotations

import json
import logging
import os
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import image_cache

S = 8


def make_images(folder, n: int = 6) -> list[str]:
    """``n`` small noisy PNGs (distinct contents), and one unreadable file last."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        path = os.path.join(str(folder), f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    broken = os.path.join(str(folder), "broken.png")
    with open(broken, "wb") as f:
        f.write(b"not an image")
    return paths + [broken]


def open_cache(folder, paths) -> image_cache.ImageCache:
    return image_cache.ImageCache(str(folder), "set", "train", S, paths, num_threads=1)


def fresh(cache: image_cache.ImageCache, i: int) -> torch.Tensor:
    return image_cache.load_rgb_uint8(cache.paths[i], S)


@pytest.fixture
def built(tmp_path, caplog):
    """A cache of 6 readable images and 1 unreadable one, built once (its 'image cache written' line cleared)."""
    paths = make_images(tmp_path / "images")
    with caplog.at_level(logging.INFO, logger="datasets"):
        cache = open_cache(tmp_path / "cache", paths)
    assert any("image cache written" in r.getMessage() for r in caplog.records)
    caplog.clear()
    return cache


def rebuilt(caplog) -> bool:
    return any("image cache written" in r.getMessage() for r in caplog.records)


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_array_overwritten_with_noise_is_rebuilt_with_a_warning(built, caplog):
    with open(built.data_file, "r+b") as f:  # the same size, other bytes
        f.write(np.random.default_rng(1).integers(0, 256, os.path.getsize(built.data_file), dtype=np.uint8).tobytes())
    with caplog.at_level(logging.INFO, logger="datasets"):
        again = open_cache(os.path.dirname(built.data_file), built.paths)
    (warning,) = warnings(caplog)
    assert built.data_file in warning and "rebuilding it" in warning and rebuilt(caplog)
    for i in range(6):
        assert torch.equal(again.get(i), fresh(again, i))
    assert again.bad == {6}


def test_an_overwrite_that_keeps_size_mtime_and_inode_is_caught_by_the_sampled_rows(built, caplog):
    stat = os.stat(built.data_file)
    array = np.memmap(built.data_file, dtype=np.uint8, mode="r+", shape=built.shape)
    array[3] = 255 - array[3]
    array.flush()
    del array
    os.utime(built.data_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the stat the sidecar recorded
    with caplog.at_level(logging.INFO, logger="datasets"):
        again = open_cache(os.path.dirname(built.data_file), built.paths)  # 7 rows < SAMPLE_ROWS: all sampled
    assert len(warnings(caplog)) == 1 and rebuilt(caplog)
    assert torch.equal(again.get(3), fresh(again, 3))


def test_an_unchanged_file_checks_only_a_sample_and_a_touched_one_all_rows_once(built, caplog, monkeypatch):
    monkeypatch.setattr(image_cache, "SAMPLE_ROWS", 3)
    checked: list[int] = []
    real_crc32 = zlib.crc32

    def spy(data, *start):
        checked.append(1)
        return real_crc32(data, *start)

    monkeypatch.setattr(image_cache.zlib, "crc32", spy)
    folder = os.path.dirname(built.data_file)
    with caplog.at_level(logging.INFO, logger="datasets"):
        open_cache(folder, built.paths)
        assert len(checked) == 3 and not rebuilt(caplog)  # rows 0, 3 and 6 of 7
        checked.clear()
        os.utime(built.data_file, ns=(1, 1))  # written since (here: the same bytes)
        open_cache(folder, built.paths)
        assert len(checked) == 7 and not rebuilt(caplog) and not warnings(caplog)
        checked.clear()
        again = open_cache(folder, built.paths)  # the sidecar now records the new mtime: a sample again
        assert len(checked) == 3 and not rebuilt(caplog)
    assert torch.equal(again.get(2), fresh(again, 2))
    assert image_cache._sample_rows(7) == [0, 3, 6] and image_cache._sample_rows(2) == [0, 1]


@pytest.mark.parametrize("field, value", [("bad", None), ("bad", "0"), ("bad", [1.5]), ("bad", ["6"]),
                                          ("bad", [True]), ("bad", [99]), ("bad_paths", [3]), ("crc32", [1, 2]),
                                          ("crc32", None), ("shape", "7,3,8,8"), ("array_stat", {"size": "1"}),
                                          ("digest", 5), ("format", None), (None, None)])
def test_a_sidecar_with_a_field_missing_or_of_the_wrong_type_is_rebuilt(built, caplog, field, value):
    with open(built.meta_file) as f:
        meta = json.load(f)
    if field is None:
        meta = [meta]  # not an object at all
    elif value is None:
        del meta[field]
    else:
        meta[field] = value
    with open(built.meta_file, "w") as f:
        json.dump(meta, f)
    with caplog.at_level(logging.INFO, logger="datasets"):
        again = open_cache(os.path.dirname(built.data_file), built.paths)
    assert rebuilt(caplog) and not warnings(caplog)
    assert again.bad == {6} and torch.equal(again.get(5), fresh(again, 5))
    with open(built.meta_file) as f:
        assert json.load(f)["bad"] == [6]


def test_a_sidecar_that_cannot_be_refreshed_after_a_full_check_keeps_the_cache(built, caplog, monkeypatch):
    def full_disk(self, meta):
        raise OSError(28, "No space left on device")

    os.utime(built.data_file, ns=(1, 1))
    monkeypatch.setattr(image_cache.ImageCache, "_write_meta", full_disk)
    with caplog.at_level(logging.INFO, logger="datasets"):
        again = open_cache(os.path.dirname(built.data_file), built.paths)
    assert not rebuilt(caplog) and not warnings(caplog) and torch.equal(again.get(1), fresh(again, 1))
