"""dlib's face-recognition network: detect, align, describe (128-d), on CPU.

The models come from two packages on the index, weights included, so nothing is downloaded:
``dlib-bin`` (a prebuilt dlib) and ``face-recognition-models`` (dlib's
``dlib_face_recognition_resnet_model_v1.dat``, a ResNet trained for face verification, and
``shape_predictor_5_face_landmarks.dat``). The recipe is dlib's own
(``dnn_face_recognition_ex``):

1. the frontal-face HOG detector on the image at its own resolution; the largest box is kept;
2. when it finds nothing, a fixed box in the crop's centre (:func:`fallback_box`, measured on
   aligned CelebA crops), and the row records ``face_detected = False``;
3. the 5-point landmark model in the box, then ``get_face_chips``: 150 x 150 aligned chips with
   dlib's default 0.25 padding;
4. ``compute_face_descriptor`` on the whole batch of chips (dlib's batch API).

Two faces of one person are usually within 0.6 of each other (Euclidean), faces of two people
beyond it (dlib's published threshold). The model files' sha256 identify the weights
(:func:`weights_version`).

``face_recognition_models`` is located with ``importlib`` and never imported: its
``__init__`` imports ``pkg_resources``, which recent setuptools no longer ships.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os

import numpy as np

DIM = 128  # length of one descriptor
CHIP_SIZE = 150  # side of the aligned face chip the descriptor network expects, px
LANDMARKS_FILE = "shape_predictor_5_face_landmarks.dat"
DESCRIPTOR_FILE = "dlib_face_recognition_resnet_model_v1.dat"

# The fallback box as fractions of the image (centre x, centre y, side / shorter side): the mean
# HOG box on 194 of 200 aligned CelebA crops (178 x 218) is x 43-133, y 87-177, i.e. centred
# horizontally, its centre at 0.605 of the height, its side 0.505 of the width.
FALLBACK_CENTRE = (0.5, 0.6)
FALLBACK_SIDE = 0.5

_INSTALL = ("install the packages with `pip install dlib-bin face-recognition-models` "
            "(both are dependencies of faceaudit)")


class DlibMissing(ImportError):
    """dlib or its model files are not installed; the message says what to install."""


def model_dir() -> str:
    """The folder of ``face-recognition-models``' ``.dat`` files."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise DlibMissing(f'extract.embedding = "dlib" needs the face-recognition-models package '
                          f"(dlib's model files), which is not installed; {_INSTALL}")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "models")
    for name in (LANDMARKS_FILE, DESCRIPTOR_FILE):
        if not os.path.exists(os.path.join(folder, name)):
            raise DlibMissing(f"{os.path.join(folder, name)} is missing from the installed "
                              f"face-recognition-models package; reinstall it")
    return folder


def _dlib():
    try:
        import dlib
    except ImportError:
        raise DlibMissing(f'extract.embedding = "dlib" needs the dlib package, which is not '
                          f"installed; {_INSTALL}") from None
    return dlib


@functools.lru_cache(maxsize=1)
def weights_sha256() -> dict[str, str]:
    """``{file name: sha256}`` of the two model files (the weights' identity)."""
    folder = model_dir()
    out = {}
    for name in (LANDMARKS_FILE, DESCRIPTOR_FILE):
        h = hashlib.sha256()
        with open(os.path.join(folder, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out[name] = h.hexdigest()
    return out


def weights_version() -> str:
    """dlib's version and short hashes of both model files, e.g. ``dlib-20.0.1/5pt:…/resnet:…``."""
    h = weights_sha256()
    return (f"dlib-{_dlib().__version__}/5pt:{h[LANDMARKS_FILE][:16]}"
            f"/resnet:{h[DESCRIPTOR_FILE][:16]}")


def fallback_box(height: int, width: int) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the box used when the detector finds no face."""
    side = FALLBACK_SIDE * min(height, width)
    cx, cy = FALLBACK_CENTRE[0] * width, FALLBACK_CENTRE[1] * height
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    right, bottom = int(round(cx + side / 2)), int(round(cy + side / 2))
    return max(0, left), max(0, top), min(width - 1, right), min(height - 1, bottom)


class FaceEmbedder:
    """Detector, landmark model and descriptor network, loaded once.

    Parameters
    ----------
    upsample : int
        Times the HOG detector upsamples the image first (each finds faces half as large, at
        about 4x the cost); 0 suits crops whose face is at least ~80 px wide.
    jitters : int
        Random jitters averaged per descriptor (dlib's ``num_jitters``); 0 = one pass.
    """

    def __init__(self, upsample: int = 0, jitters: int = 0):
        dlib = _dlib()
        folder = model_dir()
        self._dlib = dlib
        self.upsample = int(upsample)
        self.jitters = int(jitters)
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks = dlib.shape_predictor(os.path.join(folder, LANDMARKS_FILE))
        self.descriptor = dlib.face_recognition_model_v1(os.path.join(folder, DESCRIPTOR_FILE))

    def box(self, image: np.ndarray) -> tuple[object, bool]:
        """The largest detected face box, or the fallback box; and whether it was detected."""
        dlib = self._dlib
        found = self.detector(image, self.upsample)
        if len(found):
            return max(found, key=lambda r: r.area()), True
        return dlib.rectangle(*fallback_box(*image.shape[:2])), False

    def chip(self, image: np.ndarray) -> tuple[np.ndarray, bool]:
        """The 150 x 150 aligned chip of the image's face, and whether the face was detected."""
        rect, detected = self.box(image)
        shape = self.landmarks(image, rect)
        return self._dlib.get_face_chip(image, shape, size=CHIP_SIZE), detected

    def describe(self, chips: list[np.ndarray]) -> np.ndarray:
        """``(n, 128)`` float32 descriptors of aligned chips, in one batch call."""
        if not chips:
            return np.zeros((0, DIM), np.float32)
        out = self.descriptor.compute_face_descriptor(chips, self.jitters)
        return np.asarray([np.asarray(v) for v in out], dtype=np.float32).reshape(len(chips), DIM)

    def embed(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Descriptors ``(n, 128)`` float32 and ``face_detected`` ``(n,)`` bool of RGB uint8 images."""
        chips, detected = [], []
        for im in images:
            c, d = self.chip(np.ascontiguousarray(im, dtype=np.uint8))
            chips.append(c)
            detected.append(d)
        return self.describe(chips), np.asarray(detected, dtype=bool)
