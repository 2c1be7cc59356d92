"""Image decoding as the original did it (PIL -> RGB -> Resize -> CenterCrop, uint8), and the decode-once uint8
memmap cache of a dataset's resized images (``--image_cache``)."""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import zlib
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from errors import UserInputError
from progress import progress

logger = logging.getLogger("datasets")

# Images are bounded before they are decoded (their size is in the file's header): an image whose longer side is more
# than MAX_ASPECT_RATIO times its shorter side (resizing its shorter side to 224 would make a 20000x1 PNG 4.5
# gigapixels), or with more than MAX_IMAGE_PIXELS pixels (PIL's own decompression-bomb warning threshold), is
# skipped as unreadable. The published datasets' images are far inside both bounds.
MAX_ASPECT_RATIO: float = 20.0
MAX_IMAGE_PIXELS: int = 89_478_485


# ----------------------------------------------------------------------------------------------------------------
# Image loading
# ----------------------------------------------------------------------------------------------------------------

class BadImageError(Exception):
    """An image file that cannot be opened or decoded (missing, corrupt, truncated)."""

    def __init__(self, path: str, reason: str = "") -> None:
        super().__init__(path)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"unreadable image {self.path}" + (f" ({self.reason})" if self.reason else "")


def load_rgb_uint8(path: str, image_size: int) -> torch.Tensor:
    """Decodes ``path`` as the original did and returns a uint8 tensor (3, S, S), S = ``image_size``.

    PIL open -> convert('RGB') (MIT-States holds grayscale and CMYK JPEGs) -> Resize(S) on the shorter side (PIL
    bilinear) -> CenterCrop(S) -> pil_to_tensor. PIL's LOAD_TRUNCATED_IMAGES is left alone, so a truncated file
    raises ``BadImageError(path)`` instead of silently returning a partly grey image. An image beyond
    ``MAX_ASPECT_RATIO`` or ``MAX_IMAGE_PIXELS`` (read from its header, before decoding) raises it too.
    """
    import torchvision.transforms.functional as TF

    try:
        with open(path, "rb") as f:
            with Image.open(f) as img:
                width, height = img.size
                if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                    raise BadImageError(path, f"{width}x{height} pixels: aspect ratio beyond {MAX_ASPECT_RATIO:g}")
                if width * height > MAX_IMAGE_PIXELS:
                    raise BadImageError(path, f"{width}x{height} pixels: more than {MAX_IMAGE_PIXELS}")
                rgb = img.convert("RGB")  # forces the full decode
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImageError(path) from exc
    rgb = TF.resize(rgb, image_size, interpolation=TF.InterpolationMode.BILINEAR)
    rgb = TF.center_crop(rgb, [image_size, image_size])
    return TF.pil_to_tensor(rgb).contiguous()  # (3, S, S) uint8


# ----------------------------------------------------------------------------------------------------------------
# Decode-once image cache
# ----------------------------------------------------------------------------------------------------------------

CACHE_FORMAT = "composeae-image-cache/2"  # the sidecar's layout (see ImageCache)
SAMPLE_ROWS = 64  # rows checked against their CRC-32 at every open of an unchanged array file


def _file_list_digest(paths: Sequence[str]) -> str:
    """SHA-1 over the paths, sizes and modification times of ``paths`` (a missing file counts as size -1)."""
    h = hashlib.sha1()
    for p in paths:
        try:
            st = os.stat(p)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        h.update(f"{os.path.abspath(p)}\t{size}\t{mtime}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _array_stat(path: str) -> dict[str, int]:
    """The size, mtime_ns and inode of ``path``: any write or replacement of the file changes one of them."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def _sample_rows(n: int) -> list[int]:
    """``SAMPLE_ROWS`` evenly spaced rows of ``n`` (all of them when fewer), the first and the last included."""
    return sorted({round(i * (n - 1) / (SAMPLE_ROWS - 1)) for i in range(SAMPLE_ROWS)}) if n > SAMPLE_ROWS \
        else list(range(n))


def _is_int_list(value, low: int, high: int) -> bool:
    """``value`` is a list of ints (not bools) in ``[low, high)``."""
    return isinstance(value, list) and all(type(x) is int and low <= x < high for x in value)


def _meta_is_valid(meta, digest: str, shape: tuple[int, int, int, int]) -> bool:
    """Whether ``meta`` (a parsed sidecar) is a sidecar of ``CACHE_FORMAT`` for this file list and shape, with
    every field of its type: ``bad`` row numbers, ``bad_paths`` strings, one unsigned 32-bit ``crc32`` per row,
    ``array_stat`` the ints of ``_array_stat``."""
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        return False
    n = shape[0]
    stat = meta.get("array_stat")
    return (meta.get("digest") == digest and meta.get("shape") == list(shape)
            and _is_int_list(meta.get("bad"), 0, n)
            and isinstance(meta.get("bad_paths"), list) and all(isinstance(p, str) for p in meta["bad_paths"])
            and _is_int_list(meta.get("crc32"), 0, 1 << 32) and len(meta["crc32"]) == n
            and isinstance(stat, dict) and set(stat) == {"size", "mtime_ns", "ino"}
            and all(type(v) is int for v in stat.values()))


class ImageCache:
    """Every image of a dataset decoded and resized once, in a uint8 memmap (N, 3, S, S) under ``folder``.

    The transform has no randomness, so one decode serves every epoch and every later run. The file name holds the
    dataset name, split, image size and a hash of the file list (paths, sizes, mtimes); a changed file list makes a
    new cache. The array is written to a temporary file and moved into place with ``os.replace`` before its sidecar
    json (which also lists the unreadable images, stored as zeros) is moved in, so a reader never sees a half
    written cache. ``get(i)`` returns exactly what ``load_rgb_uint8`` returns, and raises ``BadImageError`` for an
    unreadable image as a fresh decode would. The open memmap is not pickled (workers reopen it).

    The sidecar also holds the CRC-32 of every image's row of the array and the array file's size, mtime_ns and
    inode when it was written. Opening the cache checks ``SAMPLE_ROWS`` evenly spaced rows against their CRCs, and
    every row when the file's size, mtime_ns or inode differ from the recorded ones (the file was written or
    replaced since); a mismatch rebuilds the cache with a warning naming the file. A sidecar with a missing field or
    a field of the wrong type also rebuilds it, silently, as a sidecar that is not JSON does.
    """

    def __init__(self, folder: str, name: str, split: str, image_size: int, paths: Sequence[str],
                 num_threads: int | None = None) -> None:
        self.paths = list(paths)
        self.image_size = int(image_size)
        digest = _file_list_digest(self.paths)
        stem = f"{name}-{split}-{self.image_size}px-{digest[:16]}"
        try:
            os.makedirs(folder, exist_ok=True)
            if not os.access(folder, os.W_OK):
                raise PermissionError(13, "not writable", folder)
        except OSError as exc:  # a regular file, read-only, under a regular file
            raise UserInputError(f"--image_cache {folder}: cannot use it as the image cache folder "
                                 f"({exc.strerror or exc}); pass a writable folder, or '' for no cache") from None
        self.data_file = os.path.join(folder, stem + ".u8")
        self.meta_file = os.path.join(folder, stem + ".json")
        self.digest = digest
        self.shape = (len(self.paths), 3, self.image_size, self.image_size)
        meta = self._read_meta()
        if meta is not None and not self._verify(meta):
            meta = None
        if meta is None:
            meta = self._build(num_threads)
        self.bad = frozenset(meta["bad"])
        self._array: np.memmap | None = None

    def _read_meta(self) -> dict | None:
        """The sidecar, if it is this cache's and every field has its type; None otherwise."""
        try:
            with open(self.meta_file) as f:
                meta = json.load(f)
            size = os.path.getsize(self.data_file)
        except (OSError, ValueError):
            return None
        if not _meta_is_valid(meta, self.digest, self.shape) or size != int(np.prod(self.shape)):
            return None
        return meta

    def _verify(self, meta: dict) -> bool:
        """Whether the array's rows match the sidecar's CRC-32s: a sample of rows, or all of them when the file's
        size, mtime_ns or inode changed since they were recorded (then, if all match, the sidecar records the new
        ones). A mismatch is logged as a warning naming the file."""
        try:
            now = _array_stat(self.data_file)
            full = now != meta["array_stat"]
            rows = range(self.shape[0]) if full else _sample_rows(self.shape[0])
            if full:
                logger.info("image cache %s changed on disk since it was written: checking all %d images against "
                            "their checksums", self.data_file, self.shape[0])
            array = np.memmap(self.data_file, dtype=np.uint8, mode="r", shape=self.shape)
            wrong = sum(zlib.crc32(array[i]) != meta["crc32"][i] for i in rows)
            del array
        except OSError:  # removed or replaced by another process since the sidecar was read
            return False
        if wrong:
            logger.warning("image cache %s does not match the checksums in %s (%d of the %d images checked "
                           "differ): rebuilding it", self.data_file, self.meta_file, wrong, len(rows))
            return False
        if full:
            meta["array_stat"] = now
            try:
                self._write_meta(meta)
            except OSError as exc:  # the cache is sound; the next open checks every row again
                logger.info("image cache %s: cannot record the checked file's stat (%s)", self.meta_file, exc)
        return True

    def _write_meta(self, meta: dict) -> None:
        tmp_meta = f"{self.meta_file}.tmp-{os.getpid()}"
        with open(tmp_meta, "w") as f:
            json.dump(meta, f)
        os.replace(tmp_meta, self.meta_file)

    def _build(self, num_threads: int | None) -> dict:
        n = len(self.paths)
        tmp = f"{self.data_file}.tmp-{os.getpid()}"
        array = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=self.shape)
        bad: list[int] = []
        crc = [0] * n

        def decode(i: int) -> int | None:
            try:
                row = load_rgb_uint8(self.paths[i], self.image_size).numpy()  # (3, S, S) uint8
                result = None
            except BadImageError:
                row = np.zeros(self.shape[1:], dtype=np.uint8)
                result = i
            array[i] = row
            crc[i] = zlib.crc32(row)  # releases the GIL: computed by the decoding threads
            return result

        workers = num_threads or min(8, os.cpu_count() or 1)
        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
                for result in progress(pool.map(decode, range(n)), total=n, desc="image cache", disable=n < 1000):
                    if result is not None:
                        bad.append(result)
            array.flush()
            del array
            os.replace(tmp, self.data_file)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        meta = {"format": CACHE_FORMAT, "digest": self.digest, "shape": list(self.shape), "bad": sorted(bad),
                "bad_paths": [self.paths[i] for i in sorted(bad)], "crc32": crc,
                "array_stat": _array_stat(self.data_file)}
        self._write_meta(meta)
        logger.info("image cache written: %s (%d images, %d unreadable)", self.data_file, n, len(bad))
        return meta

    def get(self, i: int) -> torch.Tensor:
        if i in self.bad:
            raise BadImageError(self.paths[i])
        if self._array is None:
            self._array = np.memmap(self.data_file, dtype=np.uint8, mode="r", shape=self.shape)
        return torch.from_numpy(np.array(self._array[i]))  # (3, S, S) uint8, a private copy

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_array"] = None  # a memmap would be pickled as a full in-memory copy
        return state
