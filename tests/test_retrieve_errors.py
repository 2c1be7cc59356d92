"""retrieve.py fails cleanly: --index replaces only an index, damaged index contents are rebuilt, the gallery scan
never opens a FIFO, every output path is checked before the model is loaded, and bad input is one line."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket

import numpy as np
import pytest
import torch

import factory
import gallery_index
import retrieve

pytestmark = pytest.mark.usefixtures("one_thread")


def lines_of(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def one_error(rc: int, err: str, code: int = 2) -> str:
    """The one line of stderr, checked to be a ``retrieve.py: error:`` line with exit code ``code``."""
    lines = lines_of(err)
    assert rc == code and len(lines) == 1 and "Traceback" not in err, (rc, err)
    assert lines[0].startswith("retrieve.py: error: "), lines[0]
    return lines[0]


@pytest.fixture
def query(triplets_run, gallery, gallery_tools) -> list[str]:
    return gallery_tools.query_flags(triplets_run["ckpt"], gallery, 5)


@pytest.fixture
def no_model(monkeypatch):
    """Building the model fails the test: what is refused must be refused before."""
    def boom(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(factory, "model_from_checkpoint", boom)


def results(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------------------------------
# --index
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["checkpoint_copy", "text", "torn_index", "empty"])
def test_index_that_is_not_an_index_is_refused_and_left_byte_identical(query, triplets_run, tmp_path, kind,
                                                                       no_model, run_retrieve):
    target = tmp_path / "index.pt"
    if kind == "checkpoint_copy":
        shutil.copy(triplets_run["ckpt"], target)
    elif kind == "text":
        target.write_text("my notes\n")
    elif kind == "empty":
        target.write_bytes(b"")
    else:  # the first half of a real index
        retrieve.save_index(str(target), {"model": "tirg"}, [("a.jpg", 1, 2)], torch.ones(1, 4))
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    before = target.read_bytes()
    rc, out, err = run_retrieve(*query, "--index", str(target))
    line = one_error(rc, err)
    assert f"--index {target} is not a gallery index of retrieve.py" in line and "not replaced" in line
    assert target.read_bytes() == before and out == ""


def test_index_naming_the_checkpoint_is_refused(query, triplets_run, tmp_path, no_model, run_retrieve):
    ckpt = triplets_run["ckpt"]
    before = open(ckpt, "rb").read()
    link = tmp_path / "link.pth"
    link.symlink_to(ckpt)
    for index in (ckpt, str(link)):
        rc, _, err = run_retrieve(*query, "--index", index)
        assert "is also --model_checkpoint" in one_error(rc, err)
    assert open(ckpt, "rb").read() == before


def test_outputs_that_are_inputs_or_each_other_are_refused(query, triplets_run, tmp_path, no_model, run_retrieve):
    ckpt = triplets_run["ckpt"]
    before = open(ckpt, "rb").read()
    for argv, expect in ((["--json", ckpt], "--json"), (["--out", str(tmp_path / "a.png"), "--index",
                                                         str(tmp_path / "a.png")], "--index")):
        rc, _, err = run_retrieve(*query, *argv)
        line = one_error(rc, err)
        assert line.startswith(f"retrieve.py: error: {expect} ") and " is also --" in line, line
    assert open(ckpt, "rb").read() == before and not os.path.exists(tmp_path / "a.png")


def test_index_of_another_version_is_replaced(query, tmp_path, run_retrieve):
    index = str(tmp_path / "index.pt")
    torch.save({"format": "composeae-retrieve-index/0", "paths": ["x.jpg"]}, index)
    rc, _, err = run_retrieve(*query, "--index", index)
    assert rc == 0 and lines_of(err) == [f"retrieve.py: {index} is a gallery index of another version of "
                                         f"retrieve.py (composeae-retrieve-index/0); rebuilding it"], err
    saved = read_manifest(index)
    assert saved["format"] == gallery_index.INDEX_FORMAT and len(saved["files"]) == 18


def read_manifest(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _damage(path: str, how: str) -> str:
    """Changes the index at ``path`` (its manifest or feature file) as ``how`` says; returns the words the notice
    names."""
    manifest = read_manifest(path)
    features = os.path.join(os.path.dirname(path), manifest["feature_file"])
    row_bytes = manifest["dim"] * 4
    if how == "fewer_rows":
        os.truncate(features, 15 * row_bytes)
        return f"the feature file {manifest['feature_file']} holds 15 rows for 18 files"
    if how == "other_width":
        manifest["dim"] = 7
        np.full((18, 7), 7 ** -0.5, dtype=np.float32).tofile(features)
        words = "'features' are 7 wide"
    elif how == "files_list":
        manifest["files"] = "\0".join(f[0] for f in manifest["files"])
        words = "'files' is a str, not a list"
    elif how == "nan":
        with open(features, "r+b") as f:
            f.seek(4 * row_bytes)
            f.write(np.float32("nan").tobytes())
        return "NaN"
    else:  # how == "sizes_dtype"
        manifest["files"][0][1] = float(manifest["files"][0][1])
        words = "'files' entry 0 is not [path, size, mtime_ns]"
    with open(path, "w") as f:
        json.dump(manifest, f)
    return words


@pytest.mark.parametrize("how", ["fewer_rows", "other_width", "files_list", "nan", "sizes_dtype"])
def test_damaged_index_contents_are_rebuilt_with_a_notice(query, tmp_path, how, run_retrieve):
    index, out = str(tmp_path / "index.pt"), str(tmp_path / "r.jsonl")
    rc, _, err = run_retrieve(*query, "--index", index, "--json", out)
    assert rc == 0, err
    expected = results(out)
    words = _damage(index, how)
    rc, _, err = run_retrieve(*query, "--index", index, "--json", out)
    assert rc == 0, err
    (notice,) = lines_of(err)
    assert notice.startswith(f"retrieve.py: {index} is damaged (") and words in notice, notice
    assert notice.endswith("; rebuilding it")
    got = results(out)
    assert [r["path"] for r in got[0]["results"]] == [r["path"] for r in expected[0]["results"]]
    assert [r["score"] for r in got[0]["results"]] == pytest.approx([r["score"] for r in expected[0]["results"]],
                                                                    abs=1e-5)
    rc, _, err = run_retrieve(*query, "--index", index, "--json", out)  # the rewritten index is sound again
    assert rc == 0 and err == "", err


# ----------------------------------------------------------------------------------------------------------------
# The gallery scan
# ----------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def alarm(seconds: int):
    """Raises TimeoutError in the main thread after ``seconds`` (a hang fails the test instead of blocking it)."""
    def timeout(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_fifo_socket_dangling_link_and_folder_named_like_images_are_skipped(triplets_run, gallery, tmp_path,
                                                                            run_retrieve):
    folder = tmp_path / "g"
    shutil.copytree(gallery, folder)
    os.mkfifo(folder / "pipe.jpg")
    (folder / "gone.png").symlink_to(folder / "nowhere.png")
    (folder / "album.jpg").mkdir()
    shutil.copy(folder / "images/green clock/001.jpg", folder / "album.jpg/inner.jpg")
    (folder / "link.jpg").symlink_to(folder / "images/green plate/001.jpg")
    skipped = ["album.jpg", "gone.png", "pipe.jpg"]
    sock = None
    if len(os.fsencode(folder / "s.png")) < 100:  # AF_UNIX paths are short
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(folder / "s.png"))
        skipped.append("s.png")
    try:
        with alarm(120):
            rc, out, err = run_retrieve("--model_checkpoint", triplets_run["ckpt"], "--gallery", str(folder),
                                        "--device", "cpu", "--image", str(folder / "images/blue clock/000.jpg"),
                                        "--text", "green", "--top_k", "100", "--index", str(tmp_path / "index.pt"))
    finally:
        if sock is not None:
            sock.close()
    assert rc == 0, err
    assert lines_of(err) == [f"retrieve.py: warning: skipped {len(skipped)} unreadable gallery files: "
                             f"{', '.join(sorted(skipped))}"]
    listed = {line.split(None, 2)[2] for line in out.splitlines()[2:]}
    assert {"link.jpg", "album.jpg/inner.jpg"} <= listed and not listed & set(skipped)
    assert len(listed) == 19  # 18 copied + inner + link, less the query itself


def test_fifo_as_the_query_image_is_refused(query, tmp_path, no_model, run_retrieve, gallery_tools):
    os.mkfifo(tmp_path / "q.jpg")
    argv = gallery_tools.with_flag(query, "--image", str(tmp_path / "q.jpg"))
    with alarm(60):
        rc, _, err = run_retrieve(*argv)
    assert "q.jpg is not a regular file" in one_error(rc, err)


# ----------------------------------------------------------------------------------------------------------------
# Output paths
# ----------------------------------------------------------------------------------------------------------------

FILE_FLAGS = {"--json": "r.jsonl", "--out": "grid.png", "--index": "index.pt"}


@pytest.mark.parametrize("flag", ["--json", "--out", "--index", "--out_dir"])
def test_output_in_a_missing_folder_is_made(query, tmp_path, flag, run_retrieve):
    path = tmp_path / "new" / "deeper" / FILE_FLAGS.get(flag, "pictures")
    rc, _, err = run_retrieve(*query, flag, str(path))
    assert rc == 0, err
    if flag == "--out_dir":
        assert sorted(os.listdir(path)) == ["index.html", "query_0001.png"]
    else:
        assert path.is_file() and path.stat().st_size > 0


@pytest.mark.parametrize("flag", ["--json", "--out", "--index", "--out_dir"])
@pytest.mark.parametrize("case", ["is_folder", "below_a_file", "not_writable"])
def test_bad_output_path_is_refused_before_the_model_is_built(query, tmp_path, flag, case, no_model, monkeypatch,
                                                              run_retrieve):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder.png").mkdir()
    if case == "is_folder":
        path = tmp_path / ("a_file" if flag == "--out_dir" else "a_folder.png")
        expect = "is not a folder" if flag == "--out_dir" else "is a folder"
    elif case == "below_a_file":
        path = tmp_path / "a_file" / "sub" / FILE_FLAGS.get(flag, "pictures")
        expect = f"{tmp_path / 'a_file'} is not a folder"
    else:
        path = tmp_path / "locked" / FILE_FLAGS.get(flag, "pictures")
        (tmp_path / "locked").mkdir()
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.basename(p) == "locked"
                            else real_access(p, mode, **kw))  # as root, every folder is writable
        expect = f"the folder {tmp_path / 'locked'} is not writable"
    rc, out, err = run_retrieve(*query, flag, str(path))
    line = one_error(rc, err)
    assert line.startswith(f"retrieve.py: error: {flag} {path}") and expect in line, line
    assert out == "" and sorted(os.listdir(tmp_path)) == sorted(["a_file", "a_folder.png"] + (
        ["locked"] if case == "not_writable" else []))


def test_folder_in_out_dir_where_a_picture_goes_is_refused(query, tmp_path, no_model, run_retrieve):
    (tmp_path / "pictures" / "query_0001.png").mkdir(parents=True)
    rc, _, err = run_retrieve(*query, "--out_dir", str(tmp_path / "pictures"))
    assert "holds a folder query_0001.png" in one_error(rc, err)


def test_a_full_disk_is_one_line_exit_1_and_leaves_no_temp_file(query, tmp_path, monkeypatch, run_retrieve):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    out_file = tmp_path / "out" / "r.jsonl"
    rc, _, err = run_retrieve(*query, "--json", str(out_file))
    line = one_error(rc, err, code=1)
    assert f"cannot write {out_file}: no space left on device; the earlier file" in line
    assert os.listdir(tmp_path / "out") == []


# ----------------------------------------------------------------------------------------------------------------
# Input
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bom", [False, True])
def test_queries_csv_that_is_not_utf8_names_the_byte_and_its_offset(query, gallery, tmp_path, bom, no_model,
                                                                    run_retrieve):
    image = os.path.join(gallery, "images/blue clock/000.jpg")
    head = (b"\xef\xbb\xbf" if bom else b"") + b"image,text\n" + f"{image},green\n".encode() * 400
    path = tmp_path / "q.csv"
    path.write_bytes(head + b"\xff,red\n")  # past the first 8 KiB that a text stream decodes at once
    base = query[:query.index("--image")]
    rc, _, err = run_retrieve(*base, "--queries", str(path))
    line = one_error(rc, err)
    assert line == f"retrieve.py: error: {path}: not UTF-8 text (byte 0xff at offset {len(head)}); convert it to UTF-8"


@pytest.mark.parametrize("thumb", ["100000", "15", "1025"])
def test_thumb_outside_its_range_is_refused(query, thumb, no_model, run_retrieve):
    rc, _, err = run_retrieve(*query, "--thumb", thumb)
    assert f"--thumb must be 16..1024 pixels, got {thumb}" in one_error(rc, err)


def test_thumb_range_is_in_the_help(capsys):
    assert retrieve.main(["--help"]) == 0
    assert "(16..1024)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("field, value", [("image_size", 200000), ("image_size", 0), ("lstm_dim", "16"),
                                          ("image_embed_dim", 1.5), ("vocab", ["red"]), ("vocab", {"red": 99})])
def test_checkpoint_with_unsound_settings_is_refused_before_the_model_is_built(query, triplets_run, tmp_path, field,
                                                                              value, no_model, run_retrieve,
                                                                              gallery_tools):
    def unsound(state: dict) -> None:
        if field == "vocab":
            state["vocab"] = value
        else:
            state["args"][field] = value

    path = gallery_tools.edited_checkpoint(triplets_run["ckpt"], str(tmp_path / "bad.pth"), unsound)
    rc, _, err = run_retrieve(*gallery_tools.with_flag(query, "--model_checkpoint", path))
    line = one_error(rc, err)
    assert line.startswith(f"retrieve.py: error: checkpoint {path}: '{field}' ") and "main.py" in line, line
