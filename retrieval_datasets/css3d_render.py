"""TIRG's CSS3D scene file and its 2-D rendering.

``css_toy_dataset_novel2_small.dup.npy`` (TIRG, Vo et al., CVPR 2019, Sec. 4.1; github google/tirg) is a 0-d object
array saved by Python 2's numpy: an .npy header followed by a protocol-2 pickle of a dict ``{split: {'objects_img',
'mods', 'labels' (test only)}}``. ``load_scene_file`` reads it with numpy's .npy header reader and an unpickler that
resolves only the globals such a file needs (numpy's array and scalar reconstruction, dtypes, a few builtins), with
the latin-1 decoding that Python 2 byte strings need; any other global is refused, so a crafted file cannot run code.

``render_2d`` draws the 2-D version of a scene (64 x 64, white background) from its objects, with the geometry of
TIRG's ``generate_2d_image``: object centre ``pos`` = (y, x) as fractions of the image, half-size 4 px (8 px when
``size == 'large'``), squares ('rectangle'), diamonds ('circle') and triangles in eight named colours.
"""
from __future__ import annotations

import io
import math
import pickle
from typing import Any

import numpy as np
import numpy.lib.format as npy_format

from errors import UserInputError

RENDER_SIZE = 64  # TIRG's 2-D images are 64 x 64

# RGB of TIRG's colour names (0-255)
COLORS = {
    "gray": (87, 87, 87), "red": (244, 35, 35), "blue": (42, 75, 215), "green": (29, 205, 20),
    "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51),
}


def _allowed_globals() -> dict[tuple[str, str], Any]:
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's array reconstructor, whatever its module is
    scalar = np.float64(0).__reduce__()[0]  # numpy's scalar reconstructor
    allowed: dict[tuple[str, str], Any] = {}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # Python 2 / numpy 1 name, numpy 2 name
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    for module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "ndarray")] = np.ndarray
        allowed[(module, "dtype")] = np.dtype
    for module in ("__builtin__", "builtins"):
        for name, obj in (("set", set), ("frozenset", frozenset), ("complex", complex), ("bytearray", bytearray)):
            allowed[(module, name)] = obj
    return allowed


class _SceneUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the numpy and builtin names of ``_allowed_globals``."""

    def __init__(self, file, source: str) -> None:
        super().__init__(file, encoding="latin1", fix_imports=True)
        self.source = source
        self.allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UserInputError(f"{self.source}: refusing to load {module}.{name} from the pickle (a CSS3D scene "
                                 f"file holds only numpy arrays, dicts, lists, numbers and strings)") from None


def load_scene_file(path: str) -> dict:
    """The dict of a CSS3D .npy scene file (see the module docstring); one-line ``UserInputError`` when it is not
    one."""
    with open(path, "rb") as f:
        data = f.read()
    f = io.BytesIO(data)
    try:
        version = npy_format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(f)
        else:
            shape, _, dtype = npy_format.read_array_header_2_0(f)
    except ValueError as exc:
        raise UserInputError(f"{path}: not an .npy file ({exc}); expected TIRG's css_toy_dataset_novel2_small.dup.npy") \
            from None
    if dtype != np.dtype(object):
        raise UserInputError(f"{path}: holds a {dtype} array, expected the pickled dict of TIRG's CSS3D scene file")
    try:
        obj = _SceneUnpickler(f, path).load()
    except UserInputError:
        raise
    except Exception as exc:  # a truncated or corrupt pickle
        raise UserInputError(f"{path}: cannot read its pickle ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, np.ndarray) and obj.shape == () and shape == ():
        obj = obj.item()
    if not isinstance(obj, dict):
        raise UserInputError(f"{path}: holds a {type(obj).__name__}, expected a dict of splits")
    return obj


def object_problem(obj: Any) -> str | None:
    """Why ``render_2d`` cannot draw the scene object ``obj`` (a dict with a known ``color``, a ``size``, a
    ``shape`` and a ``pos`` of two finite numbers), or None when it can."""
    if not isinstance(obj, dict):
        return f"must be a dict with color, size, shape and pos, got {type(obj).__name__} {str(obj)[:40]!r}"
    missing = [k for k in ("color", "size", "shape", "pos") if k not in obj]
    if missing:
        return f"lacks {', '.join(missing)}"
    if not isinstance(obj["color"], str) or obj["color"] not in COLORS:
        return f"color {obj['color']!r} is not one of {', '.join(COLORS)}"
    try:
        y, x = (float(v) for v in obj["pos"])
    except (TypeError, ValueError):
        return f"pos must be two numbers (y, x), got {str(obj['pos'])[:40]!r}"
    if not (math.isfinite(y) and math.isfinite(x)):
        return f"pos must be two finite numbers (y, x), got {str(obj['pos'])[:40]!r}"
    return None


def render_2d(objects: list[dict], size: int = RENDER_SIZE) -> np.ndarray:
    """uint8 (size, size, 3) image of a scene's objects (see the module docstring), white background."""
    img = np.full((size, size, 3), 255, dtype=np.uint8)
    for obj in objects:
        try:
            color = np.array(COLORS[obj["color"]], dtype=np.uint8)
            half = 8.0 if obj["size"] == "large" else 4.0
            y, x = float(obj["pos"][0]) * size, float(obj["pos"][1]) * size
            shape = obj["shape"]
        except (KeyError, TypeError, IndexError) as exc:
            raise UserInputError(f"CSS3D object {obj!r} lacks a known color, size, shape or pos ({exc})") from None
        if shape == "rectangle":
            img[_clip(y - half, size):_clip(y + half, size), _clip(x - half, size):_clip(x + half, size)] = color
        elif shape == "circle":  # a diamond: width shrinks linearly away from the centre row
            for row in range(int(y - half), int(y + half) + 1):
                left = x + abs(row - y) - half
                _fill_row(img, row, left, 2 * x - left, color)
        elif shape == "triangle":  # apex at the top, base at the bottom
            for row in range(int(y - half), int(y + half)):
                a = x + (row - y + half) / 2
                b = 2 * x - a
                _fill_row(img, row, min(a, b), max(a, b), color)
    return img


def _clip(v: float, size: int) -> int:
    return min(max(int(v), 0), size)


def _fill_row(img: np.ndarray, row: int, left: float, right: float, color: np.ndarray) -> None:
    if 0 <= row < img.shape[0]:
        img[row, _clip(left, img.shape[1]):_clip(right, img.shape[1])] = color
