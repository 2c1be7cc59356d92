"""A web page for a trained checkpoint: pick or upload a source image, type a modification text, see the top-k.

    python demo.py --model_checkpoint CKPT --gallery DIR [--index FILE] [--port 7860] [--host 127.0.0.1]
        [--device auto|cpu|cuda] [--threads N]

The model and the gallery's features are loaded once, as retrieve.py loads them (``factory.model_from_checkpoint``,
``gallery_index.update_index`` with ``retrieve._GalleryEncoder``, ``--index`` reused and updated); every query is
encoded and ranked as ``retrieve.py --json`` ranks it (the query's own image left out), through the one adapter
``_search``. A result clicked on the page becomes the next turn's source.

Served (Flask, one Jinja template, CSS and JS from this machine only):
    GET  /                 the page; ``?q=TEXT&page=N`` filters and pages the gallery grid
    GET  /gallery          ``{"files": [...], "page", "pages", "total", "q"}``: the same grid as JSON
    GET  /image/<path>     a gallery image
    POST /search           multipart ``image`` (a file) or ``image_path`` (relative to the gallery), ``text``, ``k``:
                           ``{"results": [{"rank", "path", "score"}, ...], "text", "k"}``
Every refusal is a 4xx answer ``{"error": "..."}``; the server goes on serving.

Safe by default: binds 127.0.0.1; serves only the gallery's image files (never a path with ``..``, an absolute path,
a NUL byte, or a link that resolves outside the gallery: such gallery entries are left out with a warning); an
upload over 16 MB, one that is not an image, or one of more pixels than ``image_cache.MAX_IMAGE_PIXELS`` (PIL's
decompression-bomb threshold) is refused; file names and texts reach the page escaped.
"""
from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image

import checksums
import distributed
import factory
import gallery_index
import retrieve
from checkpoint import WriteFailed
from errors import OneLineParser, UserInputError, report_internal_error
from gallery import IMAGE_SUFFIXES, scan_gallery
from image_cache import MAX_IMAGE_PIXELS, BadImageError, load_rgb_uint8

try:  # an optional extra (requirements-demo.txt): without it, demo.py says how to install it
    import flask
    from werkzeug.exceptions import HTTPException
    from werkzeug.serving import make_server
except ImportError:  # pragma: no cover - exercised only where the extra is missing
    flask = None

PROG = "demo.py"
HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "demo_templates")
MAX_UPLOAD_BYTES = 16 * 1024 * 1024  # Flask's MAX_CONTENT_LENGTH: a larger request is answered 413
MAX_K = 100  # results per query
DEFAULT_K = 10
PAGE_SIZE = 48  # gallery images per page of the picker
IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
               ".bmp": "image/bmp"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    """The flags of demo.py: the model, the gallery and where the page is served."""
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = retrieve.add_checkpoint_flags(p.add_argument_group("model"))
    g.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto = cuda if available")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    g = p.add_argument_group("gallery")
    g.add_argument("--gallery", type=str, required=True, help="folder of the gallery images (searched recursively)")
    g.add_argument("--index", type=str, default="",
                   help="file keeping the gallery's features between runs, as retrieve.py's ('' = in memory)")
    g.add_argument("--batch_size", type=int, default=32, help="images encoded per batch at start-up")
    g = p.add_argument_group("server")
    g.add_argument("--host", type=str, default="127.0.0.1",
                   help="address to listen on (0.0.0.0 opens the page to every machine that can reach this one)")
    g.add_argument("--port", type=int, default=7860, help="TCP port (1..65535)")
    return p


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (a free port of a local address); a UserInputError naming it otherwise."""
    sock = None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        return sock
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise UserInputError(f"--host {host} --port {port} cannot be listened on ({exc.strerror or exc}); pass "
                             f"another --port, or a --host address of this machine") from None


def _check_port(host: str, port: int) -> None:
    """The address ``host:port`` can be listened on now, checked before the model is loaded (``_bind``)."""
    _bind(host, port).close()


def validate(args: argparse.Namespace) -> None:
    """The flags' ranges, the checkpoint and gallery found, the port free: one UserInputError otherwise."""
    if flask is None:
        raise UserInputError("Flask is not installed; install the demo's extra: pip install -r requirements-demo.txt")
    if not 1 <= args.port <= 65535:
        raise UserInputError(f"--port must be 1..65535, got {args.port}")
    if args.batch_size < 1:
        raise UserInputError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.threads < 0:
        raise UserInputError(f"--threads must be >= 0, got {args.threads}")
    if not os.path.isfile(args.model_checkpoint):
        raise UserInputError(f"checkpoint {args.model_checkpoint} does not exist; pass --model_checkpoint PATH")
    if not os.path.isdir(args.gallery):
        raise UserInputError(f"gallery {args.gallery} is not a folder; pass --gallery DIR holding the images")
    if args.index and os.path.isdir(args.index):
        raise UserInputError(f"--index {args.index} is a folder; pass the path of a file")
    _check_port(args.host, args.port)


# ----------------------------------------------------------------------------------------------------------------
# The model and the gallery
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DemoState:
    """Everything a request reads, fixed at start-up: no request changes it. ``lock`` serialises the model's
    forward passes (one request at a time on the model; ranking runs outside it)."""
    model: torch.nn.Module
    image_size: int
    device: torch.device
    gallery: str  # the folder as given
    root: str  # its real path
    files: tuple[str, ...]  # relative paths with '/', sorted: the gallery's order
    where: dict[str, int]  # relative path -> position in files
    feats: torch.Tensor  # (G, D) L2-normalised
    checkpoint: str
    lock: threading.Lock


def _inside(root: str, path: str) -> bool:
    """Whether ``path``, links resolved, is ``root`` (a real path) or below it."""
    real = os.path.realpath(path)
    return os.path.commonpath([real, root]) == root


def _gallery_files(gallery: str) -> list[tuple[str, int, int]]:
    """retrieve.py's scan of ``gallery`` (``scan_gallery``) less the entries whose links resolve outside it, which
    the page never serves (named in one warning)."""
    files, _ = scan_gallery(gallery)
    root = os.path.realpath(gallery)
    kept = [f for f in files if _inside(root, os.path.join(gallery, f[0]))]
    if len(kept) < len(files):
        out = sorted({f[0] for f in files} - {f[0] for f in kept})
        print(f"{PROG}: warning: left out {len(out)} gallery link{'s' if len(out) > 1 else ''} to files outside "
              f"{gallery}: {', '.join(out[:10])}{', ...' if len(out) > 10 else ''}", file=sys.stderr)
    return kept


def build_state(args: argparse.Namespace) -> DemoState:
    """Checks the flags, loads the checkpoint's model as retrieve.py does and computes (or reuses, with
    ``--index``) the gallery's features."""
    validate(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    files = _gallery_files(args.gallery)
    if not files:
        raise UserInputError(f"gallery {args.gallery} holds no image files ({', '.join(IMAGE_SUFFIXES)}, any case); "
                             f"pass --gallery DIR holding the images")
    # a changed or bad checkpoint is refused before any work; the digest is that of the weights read
    sha256, ckpt = checksums.read_verified(args.model_checkpoint, args.ignore_checksum,
                                           lambda: factory.read_model_checkpoint(args.model_checkpoint))
    device = distributed.pick_device(args.device)
    model, margs, _ = factory.model_from_checkpoint(args.model_checkpoint, device, bert_model=args.bert_model,
                                                    ckpt=ckpt)
    image_size = int(margs.image_size)
    identity = {"checkpoint_sha256": sha256, "image_size": image_size, "model": str(margs.model)}
    # the index's width is the model's, told by one probe query's features
    probe = [{"path": os.path.join(args.gallery, files[0][0]), "text": "image"}]
    _, probe_feats, _ = retrieve.encode(model, image_size, [], probe, batch_size=1, device=device,
                                        num_workers=0)  # (1, D)
    options = argparse.Namespace(index=args.index, gallery=args.gallery, batch_size=args.batch_size, num_workers=0)
    encoder = retrieve._GalleryEncoder(options, model, image_size, device, probe)
    with tempfile.TemporaryDirectory(prefix="demo-") as tmp:  # the index without --index is a throw-away one
        update = gallery_index.update_index(args.index or os.path.join(tmp, "index.json"), identity, "float32",
                                            files, probe_feats.shape[1], encoder, durable=bool(args.index))
        if update.index is None:
            raise UserInputError(f"gallery {args.gallery}: none of its {len(files)} image files can be read")
        with update.features:
            feats = torch.cat([rows.clone() for _, rows in update.features.chunks()])  # (G, D) L2-normalised
        paths = list(update.index["files"])
    return DemoState(model=model, image_size=image_size, device=device, gallery=args.gallery,
                     root=os.path.realpath(args.gallery), files=tuple(paths),
                     where={p: i for i, p in enumerate(paths)}, feats=feats, checkpoint=args.model_checkpoint,
                     lock=threading.Lock())


def _search(state: DemoState, image_path: str, text: str, k: int) -> list[tuple[str, float]]:
    """The ``k`` best gallery images for the source image file ``image_path`` changed by ``text``:
    ``[(relative path, score)]``, as ``retrieve.py --json`` ranks them (``retrieve.encode`` composes the query,
    ``retrieve.rank`` ranks it with the evaluation's ``top_k``; a source that is a gallery file is left out of its
    own results); scores rounded to 6 decimals as retrieve.py writes them."""
    query = {"path": image_path, "text": text}
    with state.lock:  # one forward pass at a time: the model and torch's thread pool are shared
        _, query_feats, _ = retrieve.encode(state.model, state.image_size, [], [query], batch_size=1,
                                            device=state.device, num_workers=0)  # (1, D)
    exclude = torch.tensor([retrieve.gallery_position(image_path, state.gallery, state.where)],
                           dtype=torch.long)  # (1,)
    hits = retrieve.rank(query_feats, state.feats, k, exclude)[0]
    return [(state.files[g], round(s, 6)) for g, s in hits]


# ----------------------------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------------------------

class Refused(Exception):
    """A request the server answers with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def resolve(state: DemoState, rel: Any, what: str = "image_path") -> str:
    """The full path of the gallery image ``rel`` (relative to the gallery, '/' separators); Refused (400) for a
    path that is absolute, holds a NUL byte or a '..' part, and (404) for one that is not a gallery image or whose
    links now resolve outside the gallery. ``what`` names the path in the message."""
    if not isinstance(rel, str) or not rel:
        raise Refused(400, f"{what} is empty: pass the path of a gallery image, relative to the gallery")
    if "\0" in rel:
        raise Refused(400, f"{what} holds a NUL byte: pass the path of a gallery image")
    parts = rel.replace("\\", "/").split("/")
    if rel.startswith(("/", "\\")) or os.path.isabs(rel) or (len(rel) > 1 and rel[1] == ":"):
        raise Refused(400, f"{what} is absolute: pass a path relative to the gallery")
    if ".." in parts:
        raise Refused(400, f"{what} leaves the gallery ('..'): pass a path inside it")
    full = os.path.join(state.gallery, rel)
    if rel not in state.where or not _inside(state.root, full):
        raise Refused(404, f"{what} is not an image of the gallery: pick one from the gallery")
    return full


def _read_k(raw: Any) -> int:
    """The number of results asked for: a whole number 1..MAX_K (DEFAULT_K when not given)."""
    if raw is None or raw == "":
        return DEFAULT_K
    try:
        k = int(str(raw).strip())
    except ValueError:
        raise Refused(400, f"k must be a whole number 1..{MAX_K}") from None
    if not 1 <= k <= MAX_K:
        raise Refused(400, f"k must be a whole number 1..{MAX_K}, got {k}")
    return k


def _check_decodes(path: str, what: str) -> None:
    """``path`` decodes as the model's input (``load_rgb_uint8``: its pixel count and aspect ratio read from the
    header first, so a decompression bomb is never decoded); Refused (400) otherwise."""
    try:  # main() turns PIL's DecompressionBombWarning into an error for the whole server process
        load_rgb_uint8(path, 8)
    except (BadImageError, Image.DecompressionBombWarning) as exc:
        bomb = (Image.DecompressionBombError, Image.DecompressionBombWarning)
        reason = exc.reason if isinstance(exc, BadImageError) else ""
        if not reason and isinstance(exc if isinstance(exc, bomb) else exc.__cause__, bomb):
            reason = f"more than {MAX_IMAGE_PIXELS} pixels: a decompression bomb"
        reason = f" ({reason})" if reason else ""
        raise Refused(400, f"{what} cannot be read as an image{reason}; send a JPEG, PNG, WebP or BMP image of "
                           f"at most {MAX_IMAGE_PIXELS} pixels") from None


def search_request(state: DemoState, form: Any, files: Any) -> dict:
    """The answer of ``POST /search`` to the multipart ``form`` and ``files``: exactly one of ``image`` (an
    upload) and ``image_path``, a non-empty ``text`` and ``k``; Refused otherwise."""
    text = (form.get("text") or "").strip()
    if not text:
        raise Refused(400, "text is empty: type how the source image should change")
    k = _read_k(form.get("k"))
    upload = files.get("image")
    has_path = bool(form.get("image_path"))
    if (upload is not None) == has_path:
        raise Refused(400, "give one source: image (an uploaded file) or image_path (a gallery image)")
    with tempfile.TemporaryDirectory(prefix="demo-upload-") as tmp:  # this request's own folder
        if upload is not None:
            path = os.path.join(tmp, "upload")
            upload.save(path)
            if os.path.getsize(path) == 0:
                raise Refused(400, "the uploaded image is empty: send an image file")
            _check_decodes(path, "the uploaded file")
        else:
            path = resolve(state, form.get("image_path"))
            _check_decodes(path, f"gallery image {form.get('image_path')}")
        results = _search(state, path, text, k)
    return {"results": [{"rank": r, "path": p, "score": s} for r, (p, s) in enumerate(results, 1)],
            "text": text, "k": k}


def gallery_page(state: DemoState, q: Any, page: Any) -> dict:
    """The gallery files whose path holds ``q`` (any case), page ``page`` of PAGE_SIZE (clamped to the pages
    there are): ``{"files", "page", "pages", "total", "q"}``."""
    q = (q or "").strip() if isinstance(q, str) else ""
    needle = q.lower()
    found = [f for f in state.files if needle in f.lower()]
    pages = max(1, math.ceil(len(found) / PAGE_SIZE))
    try:
        page = min(max(1, int(page)), pages)
    except (TypeError, ValueError):
        page = 1
    return {"files": found[(page - 1) * PAGE_SIZE:page * PAGE_SIZE], "page": page, "pages": pages,
            "total": len(found), "q": q}


# ----------------------------------------------------------------------------------------------------------------
# The application
# ----------------------------------------------------------------------------------------------------------------

def create_app(state: DemoState, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> "flask.Flask":
    """The Flask application serving ``state``'s gallery: the routes of the module docstring."""
    app = flask.Flask(__name__, template_folder=ASSETS, static_folder=os.path.join(ASSETS, "static"),
                      static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = max_upload_bytes
    app.url_map.merge_slashes = False  # /image//etc/x reaches resolve() (and is refused), not a redirect

    @app.after_request
    def _headers(response):
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.errorhandler(Refused)
    def _refused(exc: Refused):
        return flask.jsonify(error=exc.message), exc.status

    @app.errorhandler(HTTPException)
    def _http_error(exc):
        message = exc.description
        if exc.code == 413:
            message = f"the request is larger than {max_upload_bytes / 2 ** 20:g} MB: send a smaller image"
        elif exc.code == 404:
            message = "not found: this server has /, /gallery, /image/PATH (a gallery image) and POST /search"
        return flask.jsonify(error=message), exc.code

    @app.get("/")
    def index():
        listing = gallery_page(state, flask.request.args.get("q"), flask.request.args.get("page", 1))
        return flask.render_template("index.html", listing=listing, total=len(state.files), default_k=DEFAULT_K,
                                     max_k=MAX_K, checkpoint=os.path.basename(state.checkpoint))

    @app.get("/gallery")
    def gallery():
        return flask.jsonify(gallery_page(state, flask.request.args.get("q"), flask.request.args.get("page", 1)))

    @app.get("/image/<path:rel>")
    def image(rel: str):
        full = resolve(state, rel, "the image path")
        mimetype = IMAGE_TYPES.get(os.path.splitext(rel)[1].lower(), "application/octet-stream")
        return flask.send_file(full, mimetype=mimetype, max_age=3600)

    @app.post("/search")
    def search():
        return flask.jsonify(search_request(state, flask.request.form, flask.request.files))

    return app


def serve(state: DemoState, host: str, port: int) -> None:
    """Serves the page on ``host:port`` (threaded: each request on its own thread) until interrupted."""
    # bound here, not by werkzeug, which answers a taken port with its own lines and sys.exit(1)
    with _bind(host, port) as sock:
        sock.listen(128)
        server = make_server(host, port, create_app(state), threaded=True, fd=sock.fileno())  # (a duplicate)
    shown = f"[{host}]" if ":" in host else host
    print(f"{PROG}: serving {len(state.files)} gallery images at http://{shown}:{server.server_port}/ "
          f"(Ctrl-C stops)", file=sys.stderr)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"{PROG}: warning: --host {host}: every machine that can reach this one can use the page",
              file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: serves until interrupted (0); 2 with one ``demo.py: error:`` line for bad input; 1 when
    the ``--index`` file cannot be written; 1 and one ``demo.py: internal error:`` line (the traceback in a file)
    for anything else (``errors.report_internal_error``)."""
    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad flag (one line already printed)
        return int(exc.code or 0)
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # PIL's bomb threshold: uploads beyond it are refused
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    try:
        serve(build_state(args), args.host, args.port)  # serve: a port taken since the check is a UserInputError
    except (UserInputError, WriteFailed) as exc:  # WriteFailed: the --index file (a full disk), not the input
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UserInputError) else 1
    except Exception as exc:  # noqa: BLE001 (the last resort: one line, the traceback in a file)
        return report_internal_error(PROG, exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
