"""Image decoding as the original did it (PIL -> RGB -> Resize -> CenterCrop, uint8), and the decode-once uint8
memmap cache of a dataset's resized images (``--image_cache``)."""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from errors import UserInputError

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


class ImageCache:
    """Every image of a dataset decoded and resized once, in a uint8 memmap (N, 3, S, S) under ``folder``.

    The transform has no randomness, so one decode serves every epoch and every later run. The file name holds the
    dataset name, split, image size and a hash of the file list (paths, sizes, mtimes); a changed file list makes a
    new cache. The array is written to a temporary file and moved into place with ``os.replace`` before its sidecar
    json (which also lists the unreadable images, stored as zeros) is moved in, so a reader never sees a half
    written cache. ``get(i)`` returns exactly what ``load_rgb_uint8`` returns, and raises ``BadImageError`` for an
    unreadable image as a fresh decode would. The open memmap is not pickled (workers reopen it).
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
        if meta is None:
            meta = self._build(num_threads)
        self.bad = frozenset(int(i) for i in meta["bad"])
        self._array: np.memmap | None = None

    def _read_meta(self) -> dict | None:
        try:
            with open(self.meta_file) as f:
                meta = json.load(f)
            ok = (meta.get("digest") == self.digest and meta.get("shape") == list(self.shape)
                  and os.path.getsize(self.data_file) == int(np.prod(self.shape)))
        except (OSError, ValueError, AttributeError):
            return None
        return meta if ok else None

    def _build(self, num_threads: int | None) -> dict:
        from tqdm import tqdm

        n = len(self.paths)
        tmp = f"{self.data_file}.tmp-{os.getpid()}"
        array = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=self.shape)
        bad: list[int] = []

        def decode(i: int) -> int | None:
            try:
                array[i] = load_rgb_uint8(self.paths[i], self.image_size).numpy()
                return None
            except BadImageError:
                array[i] = 0
                return i

        workers = num_threads or min(8, os.cpu_count() or 1)
        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
                for result in tqdm(pool.map(decode, range(n)), total=n, desc="image cache", mininterval=1.0,
                                   disable=n < 1000):
                    if result is not None:
                        bad.append(result)
            array.flush()
            del array
            os.replace(tmp, self.data_file)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        meta = {"digest": self.digest, "shape": list(self.shape), "bad": sorted(bad),
                "bad_paths": [self.paths[i] for i in sorted(bad)]}
        tmp_meta = f"{self.meta_file}.tmp-{os.getpid()}"
        with open(tmp_meta, "w") as f:
            json.dump(meta, f)
        os.replace(tmp_meta, self.meta_file)
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
