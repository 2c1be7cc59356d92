"""demo.py with Flask's test client: /search ranks as retrieve.py --json, paths that leave the gallery and bad
uploads are refused with a JSON error while the server keeps serving, names reach the page escaped, concurrent
requests get their own results, and bad flags are one line, exit 2."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import threading
import zlib

import pytest
import torch
from PIL import Image

flask = pytest.importorskip("flask", reason="the demo's extra is not installed (pip install -r requirements-demo.txt)")

import demo  # noqa: E402  (needs flask)
import retrieve  # noqa: E402

QUERY = "images/blue clock/000.jpg"
SCRIPT_NAME = "<script>alert(1)</script>.png"  # a folder '<script>alert(1)<' holding 'script>.png'


pytestmark = pytest.mark.usefixtures("one_thread")


def state_for(ckpt: str, gallery: str, *extra: str) -> demo.DemoState:
    args = demo.get_args_parser().parse_args(["--model_checkpoint", ckpt, "--gallery", gallery, "--device", "cpu",
                                              "--port", str(free_port()), *extra])
    return demo.build_state(args)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client(triplets_run, gallery):
    return demo.create_app(state_for(triplets_run["ckpt"], gallery)).test_client()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, triplets_run, triplets_data, gallery_tools) -> dict:
    """A gallery with a file named like a script tag and a link to an image outside it."""
    base = tmp_path_factory.mktemp("hostile")
    folder = gallery_tools.copy_test_split(triplets_data, str(base / "g"))
    os.makedirs(os.path.join(folder, "<script>alert(1)<"))
    shutil.copy(os.path.join(folder, QUERY), os.path.join(folder, SCRIPT_NAME))
    shutil.copy(os.path.join(folder, QUERY), str(base / "outside.png"))
    os.symlink(str(base / "outside.png"), os.path.join(folder, "out-link.png"))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        state = state_for(triplets_run["ckpt"], folder)
    return {"folder": folder, "outside": str(base / "outside.png"), "state": state, "stderr": err.getvalue(),
            "client": demo.create_app(state, max_upload_bytes=64 * 1024).test_client()}


def retrieve_json(ckpt: str, gallery: str, image: str, text: str, k: int, out: str) -> list[dict]:
    with contextlib.redirect_stdout(io.StringIO()):
        rc = retrieve.main(["--model_checkpoint", ckpt, "--gallery", gallery, "--device", "cpu", "--image", image,
                            "--text", text, "--top_k", str(k), "--json", out])
    assert rc == 0
    with open(out) as f:
        return json.load(f)["results"]


def search(client, **form) -> tuple[int, dict]:
    answer = client.post("/search", data=form, content_type="multipart/form-data")
    assert answer.is_json, answer.data[:200]
    return answer.status_code, answer.get_json()


# ----------------------------------------------------------------------------------------------------------------
# The ranking
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("image, text, k", [(QUERY, "green", 5), ("images/large plate/002.jpg", "small", 17),
                                            ("images/green clock/001.jpg", "replace green with red", 100)])
def test_search_of_a_gallery_image_equals_retrieve_json(client, triplets_run, gallery, tmp_path, image, text, k):
    status, got = search(client, image_path=image, text=text, k=str(k))
    assert status == 200, got
    expected = retrieve_json(triplets_run["ckpt"], gallery, os.path.join(gallery, image), text, k,
                             str(tmp_path / "r.jsonl"))
    assert [r["path"] for r in got["results"]] == [r["path"] for r in expected]
    assert [r["score"] for r in got["results"]] == pytest.approx([r["score"] for r in expected], abs=2e-6)
    assert [r["rank"] for r in got["results"]] == list(range(1, len(expected) + 1))
    assert image not in [r["path"] for r in got["results"]]  # the query's own image is left out
    assert len(got["results"]) == min(k, 17) and (got["text"], got["k"]) == (text, k)


def test_uploaded_image_equals_retrieve_json_of_a_file_outside_the_gallery(client, triplets_run, gallery, tmp_path):
    outside = str(tmp_path / "query.jpg")
    shutil.copy(os.path.join(gallery, QUERY), outside)
    with open(outside, "rb") as f:
        status, got = search(client, image=(io.BytesIO(f.read()), "query.jpg"), text="green", k="18")
    assert status == 200, got
    expected = retrieve_json(triplets_run["ckpt"], gallery, outside, "green", 18, str(tmp_path / "r.jsonl"))
    assert [r["path"] for r in got["results"]] == [r["path"] for r in expected]
    assert QUERY in [r["path"] for r in got["results"]]  # an upload is no gallery file: nothing is left out
    assert len(got["results"]) == 18


def test_two_concurrent_searches_get_their_own_results(client):
    asks = [dict(image_path=QUERY, text="green", k="6"), dict(image_path="images/large plate/002.jpg", text="small",
                                                                 k="4")]
    alone = [search(client, **a)[1]["results"] for a in asks]
    assert alone[0] != alone[1]
    barrier, got, errors = threading.Barrier(4), {}, []

    def worker(n: int) -> None:
        try:
            own = client.application.test_client()  # one client per thread, one application for all
            barrier.wait(timeout=30)
            got[n] = search(own, **asks[n % 2])
        except Exception as exc:  # reported below: an assertion in a thread would be lost
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for n in range(4):
        status, answer = got[n]
        assert status == 200 and answer["results"] == alone[n % 2] and answer["text"] == asks[n % 2]["text"]


# ----------------------------------------------------------------------------------------------------------------
# Safety
# ----------------------------------------------------------------------------------------------------------------

def test_link_out_of_the_gallery_is_left_out_with_a_warning(hostile):
    assert "out-link.png" not in hostile["state"].files and SCRIPT_NAME in hostile["state"].files
    assert hostile["stderr"].strip() == "demo.py: warning: left out 1 gallery link to files outside " \
                                        f"{hostile['folder']}: out-link.png"


@pytest.mark.parametrize("path, status", [("../outside.png", 400), ("images/../../outside.png", 400),
                                          ("/etc/passwd", 400), ("out-link.png", 404), ("images/a\0.png", 400),
                                          ("images/missing.jpg", 404), ("..\\outside.png", 400)])
def test_search_path_leaving_the_gallery_is_refused_and_the_server_goes_on(hostile, path, status):
    code, got = search(hostile["client"], image_path=path, text="green", k="3")
    assert code == status and set(got) == {"error"} and "image_path" in got["error"]
    code, got = search(hostile["client"], image_path=QUERY, text="green", k="3")
    assert code == 200 and len(got["results"]) == 3


def test_absolute_path_of_a_gallery_file_is_refused(hostile):
    code, got = search(hostile["client"], image_path=os.path.join(hostile["folder"], QUERY), text="red")
    assert code == 400 and "absolute" in got["error"]


@pytest.mark.parametrize("url", ["/image/..%2Foutside.png", "/image/%2E%2E/outside.png", "/image/out-link.png",
                                 "/image/%2Fetc%2Fpasswd", "/image/images/a%00.png", "/image/images"])
def test_image_path_leaving_the_gallery_is_refused(hostile, url):
    answer = hostile["client"].get(url)
    assert answer.status_code in (400, 404) and answer.is_json
    assert any(words in answer.get_json()["error"] for words in ("the image path", "not found"))
    assert hostile["client"].get("/image/" + QUERY.replace(" ", "%20")).status_code == 200


def test_gallery_image_is_served_as_an_image(hostile):
    answer = hostile["client"].get("/image/images/blue%20clock/000.jpg")
    assert answer.status_code == 200 and answer.mimetype == "image/jpeg"
    with open(os.path.join(hostile["folder"], QUERY), "rb") as f:
        assert answer.data == f.read()
    assert answer.headers["X-Content-Type-Options"] == "nosniff"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming ``width`` x ``height`` pixels with almost no data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")  # as demo.main() sets it
@pytest.mark.parametrize("name, payload, status, words", [
    ("notes.png", b"this is not an image", 400, "cannot be read as an image"),
    ("bomb.png", png_header_only(40000, 40000), 400, "more than 89478485 pixels: a decompression bomb"),
    ("big.png", png_header_only(10000, 10000), 400, "more than 89478485 pixels: a decompression bomb"),
    ("empty.png", b"", 400, "empty"),
    ("large.png", b"\0" * (65 * 1024), 413, "larger than"),
])
def test_bad_upload_is_refused_with_a_json_error(hostile, name, payload, status, words):
    code, got = search(hostile["client"], image=(io.BytesIO(payload), name), text="green")
    assert code == status and words in got["error"], got
    code, got = search(hostile["client"], image_path=QUERY, text="green", k="2")
    assert code == 200 and len(got["results"]) == 2


@pytest.mark.parametrize("form, words", [(dict(text="green"), "one source"),
                                         (dict(image_path=QUERY, text="  "), "text is empty"),
                                         (dict(image_path=QUERY, text="red", k="0"), "1..100"),
                                         (dict(image_path=QUERY, text="red", k="ten"), "whole number")])
def test_bad_search_form_is_refused(client, form, words):
    code, got = search(client, **form)
    assert code == 400 and words in got["error"]


def test_file_names_are_escaped_in_the_page(hostile):
    answer = hostile["client"].get("/?q=alert")
    page = answer.get_data(as_text=True)
    assert answer.status_code == 200
    assert "<script>alert(1)" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.png" in page
    assert 'data-path="&lt;script&gt;alert(1)&lt;/script&gt;.png"' in page
    assert "default-src 'self'" in answer.headers["Content-Security-Policy"]
    listing = hostile["client"].get("/gallery?q=ALERT").get_json()
    assert listing["files"] == [SCRIPT_NAME] and listing["total"] == 1
    code, got = search(hostile["client"], image_path=SCRIPT_NAME, text="green", k="30")
    code_copy, copy = search(hostile["client"], image_path=QUERY, text="green", k="30")
    assert code == code_copy == 200 and len(got["results"]) == 18  # 20 files, the link out and the query left out
    swapped = [SCRIPT_NAME if r["path"] == QUERY else r["path"] for r in got["results"]]
    assert swapped == [r["path"] for r in copy["results"]]  # the same pixels: the same ranking, itself left out


def test_page_is_self_contained_and_pages_the_gallery(client, gallery, monkeypatch):
    page = client.get("/").get_data(as_text=True)
    assert '<meta name="viewport"' in page and "http://" not in page and "https://" not in page
    assert page.count('class="tile"') == 18  # every image of a small gallery on the first page
    for asset in ("/static/demo.js", "/static/demo.css"):
        assert asset in page and client.get(asset).status_code == 200
    assert "innerHTML" not in client.get("/static/demo.js").get_data(as_text=True)
    clocks = sorted(f for f in _all_files(gallery) if "clock" in f)
    assert 0 < len(clocks) < 18
    listing = client.get("/gallery?q=Clock&page=9").get_json()  # any case; past the last page: the last page
    assert listing["page"] == listing["pages"] == 1 and listing["files"] == clocks
    assert listing["total"] == len(clocks) and listing["q"] == "Clock"
    monkeypatch.setattr(demo, "PAGE_SIZE", 5)
    every = [client.get(f"/gallery?page={n}").get_json() for n in range(1, 5)]
    assert [p["pages"] for p in every] == [4] * 4 and [len(p["files"]) for p in every] == [5, 5, 5, 3]
    assert sum((p["files"] for p in every), []) == sorted(f for f in _all_files(gallery))
    assert client.get("/gallery?page=99").get_json()["files"] == every[-1]["files"]  # past the end: the last page
    page = client.get("/?page=2").get_data(as_text=True)
    assert page.count('class="tile"') == 5 and 'id="prev-page" data-page="1"' in page


def _all_files(folder: str) -> list[str]:
    return [os.path.relpath(os.path.join(root, n), folder).replace(os.sep, "/") for root, _, names in os.walk(folder)
            for n in names]


# ----------------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------------

def call(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = demo.main(list(argv))
    return rc, err.getvalue()


def test_errors_are_one_line_exit_2(triplets_run, gallery, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images")
    ckpt = triplets_run["ckpt"]
    cases = [
        ((["--model_checkpoint", str(tmp_path / "missing.pth"), "--gallery", gallery]), "does not exist"),
        ((["--model_checkpoint", ckpt, "--gallery", str(empty)]), "holds no image files"),
        ((["--model_checkpoint", ckpt, "--gallery", str(tmp_path / "nowhere")]), "is not a folder"),
        ((["--model_checkpoint", ckpt, "--gallery", gallery, "--port", "0"]), "--port must be 1..65535"),
        ((["--model_checkpoint", ckpt, "--gallery", gallery, "--port", "http"]), "invalid int value"),
        ((["--model_checkpoint", ckpt, "--gallery", gallery, "--device", "tpu"]), "invalid choice"),
        ((["--gallery", gallery]), "--model_checkpoint"),
        ((["--model_checkpoint", ckpt, "--gallery", gallery, "--index", ckpt]), "is not a gallery index"),
    ]
    for argv, words in cases:
        rc, err = call(*argv, "--port", str(free_port())) if "--port" not in argv else call(*argv)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("demo.py: error: ") and words in lines[0], err


def test_original_code_lstm_checkpoint_is_one_line_exit_2(triplets_run, gallery, tmp_path, gallery_tools):
    path = gallery_tools.edited_checkpoint(triplets_run["ckpt"], str(tmp_path / "original.pth"),
                                           gallery_tools.original_code_state)
    rc, err = call("--model_checkpoint", path, "--gallery", gallery, "--device", "cpu", "--port", str(free_port()))
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("demo.py: error: ") and "without a vocabulary" in err


def test_port_in_use_is_one_line_exit_2(triplets_run, gallery):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        rc, err = call("--model_checkpoint", triplets_run["ckpt"], "--gallery", gallery, "--port", str(port))
    assert rc == 2 and err.startswith(f"demo.py: error: --host 127.0.0.1 --port {port} cannot be listened on")


def test_index_is_written_and_reused(triplets_run, gallery, tmp_path, monkeypatch):
    index = str(tmp_path / "index.pt")
    first = state_for(triplets_run["ckpt"], gallery, "--index", index)
    assert os.path.isfile(index)
    encoded = []
    real = retrieve.encode
    monkeypatch.setattr(retrieve, "encode", lambda model, size, paths, queries, **kw: (
        encoded.append(list(paths)), real(model, size, paths, queries, **kw))[1])
    again = state_for(triplets_run["ckpt"], gallery, "--index", index)
    assert encoded == [[]]  # only the probe query was encoded: every gallery feature came from the index
    assert again.files == first.files and torch.allclose(again.feats, first.feats, atol=1e-6)


def test_an_unexpected_error_is_one_internal_error_line(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(demo, "build_state", broken)
    rc = demo.main(["--model_checkpoint", "x.pth", "--gallery", "g"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert err[0].startswith("demo.py: internal error: RuntimeError: a bug; the traceback is in ")


def test_a_port_taken_after_the_check_is_one_line_exit_2(triplets_run, gallery, monkeypatch):
    import socket

    monkeypatch.setattr(demo, "_check_port", lambda host, port: None)  # taken between the check and the bind
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        rc, err = call("--model_checkpoint", triplets_run["ckpt"], "--gallery", gallery, "--port", str(port))
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"demo.py: error: --host 127.0.0.1 --port {port} cannot be listened on")
