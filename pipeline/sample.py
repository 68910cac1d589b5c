"""The built-in synthetic face collection, in CelebA's (or UTKFace's / LFW's) exact on-disk format.

Why synthetic: the pipeline, its tests and ``make demo`` must run with no download. The sample
therefore has to behave like CelebA where the later stages look:

* **Labels** are sampled jointly (:func:`sample_labels`, vectorised numpy, no images needed) with
  CelebA-like prevalences and correlations: sex and age first, then attributes conditioned on them
  (lipstick / makeup almost never with ``Male``, gray hair and baldness rarely with ``Young``,
  ``High_Cheekbones`` and ``Mouth_Slightly_Open`` mostly with ``Smiling`` ...). Images belong to
  identities; sex, age, demographic group, skin tone and face geometry are per identity.
* A latent **demographic group** (not an annotated attribute) sets skin tone and shifts hair colour.
  ``Attractive`` is a noisy, subjective score of other attributes *and* of that group, so the
  fairness analysis downstream has a real disparity to find.
* **Pictures**: every attribute with a visible form changes the drawing (:func:`draw_face`), so a
  small CNN can learn it from pixels. Faces are drawn with PIL ``ImageDraw`` primitives (C code,
  tens of microseconds each) on a pre-rendered background bank; one 178x218 image costs a few
  milliseconds on one core, JPEG encoding included.

Determinism: labels come from ``numpy.random.default_rng(seed)``; each image's texture details come
from ``default_rng((seed, index))``, so the same seed gives byte-identical files whether one process
or several draw them.

Public entry: :func:`make_sample`. :func:`sample_labels` is public for tests and benchmarks.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.config import CELEBA_ATTRIBUTES
from pipeline.schemas import LANDMARKS

log = logging.getLogger(__name__)

WIDTH, HEIGHT = 178, 218  # CelebA's aligned image size (img_align_celeba)
UTK_SIZE = 200  # UTKFace's aligned-and-cropped chips are 200x200
LFW_SIZE = 250  # LFW images are 250x250
JPEG_QUALITY = 90  # close to CelebA's JPEGs (their quality is ~95, files ~10 KB)

# CelebA's official split sizes (list_eval_partition.txt): train / val / test, contiguous by id.
CELEBA_SPLIT_SIZES = (162770, 19867, 19962)
CELEBA_TOTAL = sum(CELEBA_SPLIT_SIZES)  # 202,599
IMAGES_PER_IDENTITY = 20  # CelebA: 202,599 images of 10,177 people

# Latent demographic groups: share of the collection, base skin RGB, and the annotators' bias
# on "Attractive" (logit shift). Index 0 is the over-represented, favoured group.
GROUP_SHARE = np.array([0.62, 0.16, 0.12, 0.10])
GROUP_SKIN = np.array([[232, 196, 170], [200, 152, 112], [156, 106, 74], [98, 66, 48]], float)
GROUP_ATTRACTIVE_BIAS = np.array([0.45, 0.0, -0.45, -0.7])
# UTKFace race codes (0 white, 1 black, 2 asian, 3 indian, 4 others) for each latent group.
GROUP_UTK_RACE = np.array([0, 2, 3, 1])

# Hair colours (RGB) by category: black, blond, brown, gray, other (auburn / dark brown; no label).
HAIR_RGB = np.array([[28, 24, 24], [226, 196, 120], [104, 68, 42], [176, 176, 180],
                     [120, 52, 30]], float)
HAIR_BLACK, HAIR_BLOND, HAIR_BROWN, HAIR_GRAY, HAIR_OTHER = range(5)

PALE_RGB = np.array([246, 226, 216], float)  # what Pale_Skin blends the skin towards

_A = {name: i for i, name in enumerate(CELEBA_ATTRIBUTES)}

FIRST_NAMES = ("Alex", "Maria", "John", "Aiko", "Omar", "Lena", "Kofi", "Priya", "Ivan", "Sofia",
               "Chen", "Amara", "Luis", "Hana", "Noah", "Zara", "Tomas", "Mei", "Ravi", "Elena")
LAST_NAMES = ("Smith", "Garcia", "Kim", "Okafor", "Novak", "Silva", "Tanaka", "Haddad", "Berg",
              "Costa", "Mensah", "Ivanova", "Patel", "Moreau", "Rossi", "Nguyen", "Khan", "Lind")


@dataclass
class Labels:
    """Sampled labels and drawing parameters for ``n`` images (row i is image i)."""

    attrs: np.ndarray  # (n, 40) bool, CelebA attribute order
    identity: np.ndarray  # (n,) int, 1-based like identity_CelebA.txt
    partition: np.ndarray  # (n,) int, 0 train / 1 val / 2 test
    group: np.ndarray  # (n,) int, latent demographic group
    age: np.ndarray  # (n,) int, years (drives UTKFace names and Young)
    landmarks: np.ndarray  # (n, 10) int, CelebA aligned-landmark order
    params: dict[str, np.ndarray]  # per-image drawing parameters (float / int arrays)

    def __len__(self) -> int:
        return len(self.identity)

    def column(self, name: str) -> np.ndarray:
        return self.attrs[:, _A[name]]


def _bern(rng: np.random.Generator, p) -> np.ndarray:
    return rng.random(np.shape(p)) < p


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def sample_labels(n: int, seed: int) -> Labels:
    """Sample CelebA-like labels for ``n`` images (vectorised; ~1 s for 200,000 rows).

    Prevalences land near CelebA's (Male ~42 %, Young ~77 %, Smiling ~48 %, Attractive ~51 % ...);
    ``tests/test_sample.py`` holds them to a tolerance.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)

    # Splits: contiguous ranges in CelebA's proportions, like list_eval_partition.txt.
    n_train = int(round(n * CELEBA_SPLIT_SIZES[0] / CELEBA_TOTAL))
    n_val = int(round(n * CELEBA_SPLIT_SIZES[1] / CELEBA_TOTAL))
    partition = np.full(n, 2, np.int64)
    partition[:n_train] = 0
    partition[n_train:n_train + n_val] = 1

    # Identities: ~20 images each, identities disjoint across splits (as in CelebA).
    identity = np.empty(n, np.int64)
    next_id = 0
    for part in (0, 1, 2):
        idx = np.flatnonzero(partition == part)
        if len(idx) == 0:
            continue
        k = max(1, int(math.ceil(len(idx) / IMAGES_PER_IDENTITY)))
        identity[idx] = next_id + rng.integers(0, k, len(idx))
        next_id += k
    # CelebA's identity numbers look arbitrary; permute so they do not follow the split.
    id_perm = rng.permutation(next_id) + 1
    identity = id_perm[identity]
    n_id = next_id + 1  # index space for per-identity arrays (ids are 1..next_id)

    # Per-identity traits: sex, age, group, skin, eye colour, face geometry, natural hair colour.
    id_male = _bern(rng, np.full(n_id, 0.417))
    id_group = rng.choice(4, size=n_id, p=GROUP_SHARE)
    p_young = np.where(id_male, 0.65, 0.86)
    id_young = _bern(rng, p_young)
    id_age = np.where(id_young, rng.integers(18, 35, n_id), rng.integers(35, 80, n_id))
    id_skin = GROUP_SKIN[id_group] + rng.normal(0, 7, (n_id, 3))
    id_eye = rng.integers(0, 4, n_id)
    id_face_w = rng.normal(0, 1.6, n_id)
    id_face_h = rng.normal(0, 1.6, n_id)
    blond_factor = np.array([1.3, 0.6, 0.1, 0.05])[id_group]
    p_hair = np.stack([
        np.array([0.13, 0.30, 0.55, 0.55])[id_group],  # black
        np.where(id_male, 0.055, 0.235) * blond_factor,  # blond
        np.array([0.25, 0.25, 0.17, 0.12])[id_group],  # brown
    ], axis=1)
    p_hair = np.concatenate([p_hair, np.clip(1 - p_hair.sum(1, keepdims=True), 0, 1)], axis=1)
    cum = np.cumsum(p_hair, axis=1)
    u = rng.random(n_id)[:, None]
    id_hair = (u > cum).sum(1)  # 0 black, 1 blond, 2 brown, 3 -> "other"
    id_hair = np.where(id_hair == 3, HAIR_OTHER, id_hair)

    male = id_male[identity]
    young = id_young[identity]
    group = id_group[identity]
    age = id_age[identity] + rng.integers(-2, 3, n)  # photos of one person span a few years
    age = np.clip(age, 16, 90)
    female = ~male
    old = ~young

    def per_sex(p_male, p_female):
        return _bern(rng, np.where(male, p_male, p_female))

    a = np.zeros((n, len(CELEBA_ATTRIBUTES)), bool)

    def put(name, values):
        a[:, _A[name]] = values

    put("Male", male)
    put("Young", young)

    # Hair: baldness and gray hair mostly with age (and baldness with men).
    bald = _bern(rng, np.select([male & old, male & young, female & old], [0.12, 0.015, 0.003],
                                0.0005))
    gray = ~bald & _bern(rng, np.where(old, 0.16, 0.008))
    hair_cat = np.where(gray, HAIR_GRAY, id_hair[identity])
    # A few photos show a different (dyed) colour than the person's usual one.
    dyed = ~gray & _bern(rng, np.full(n, 0.08))
    hair_cat = np.where(dyed, rng.choice([HAIR_BLACK, HAIR_BLOND, HAIR_BROWN, HAIR_OTHER], n),
                        hair_cat)
    put("Bald", bald)
    put("Gray_Hair", gray)
    put("Black_Hair", ~bald & (hair_cat == HAIR_BLACK))
    put("Blond_Hair", ~bald & (hair_cat == HAIR_BLOND))
    put("Brown_Hair", ~bald & (hair_cat == HAIR_BROWN))
    receding = ~bald & _bern(rng, np.select([male & old, male, old], [0.25, 0.085, 0.10], 0.035))
    put("Receding_Hairline", receding)
    hat = _bern(rng, np.full(n, 0.048))
    put("Wearing_Hat", hat)
    bangs = ~bald & ~receding & per_sex(0.09, 0.21)
    put("Bangs", bangs)
    wavy = ~bald & per_sex(0.15, 0.46)
    straight = ~bald & ~wavy & per_sex(0.22, 0.41)
    put("Wavy_Hair", wavy)
    put("Straight_Hair", straight)
    long_hair = ~bald & np.where(male, _bern(rng, np.full(n, 0.08)), _bern(rng, np.full(n, 0.88)))

    # Beards (men; a trace of annotation noise for women as in CelebA).
    bearded = np.where(male, _bern(rng, np.full(n, 0.39)), _bern(rng, np.full(n, 0.003)))
    goatee = bearded & _bern(rng, np.full(n, 0.38))
    mustache = bearded & _bern(rng, np.where(goatee, 0.45, 0.15))
    sideburns = (bearded & _bern(rng, np.full(n, 0.30))) | (male & ~bearded & _bern(rng, np.full(n, 0.02)))
    stubble = male & _bern(rng, np.where(bearded, 0.22, 0.29))
    full_beard = bearded & ~goatee & ~(mustache & _bern(rng, np.full(n, 0.5)))
    put("No_Beard", ~bearded)
    put("Goatee", goatee)
    put("Mustache", mustache)
    put("Sideburns", sideburns)
    put("5_o_Clock_Shadow", stubble)

    # Expression: smiling drives cheekbones and an open mouth.
    smiling = _bern(rng, np.full(n, 0.482))
    put("Smiling", smiling)
    put("High_Cheekbones", _bern(rng, np.where(smiling, 0.80, 0.13)))
    put("Mouth_Slightly_Open", _bern(rng, np.where(smiling, 0.68, 0.30)))

    # Make-up and accessories: almost never with Male.
    lipstick = per_sex(0.004, 0.80)
    makeup = np.where(lipstick, per_sex(0.25, 0.80), per_sex(0.001, 0.07))
    put("Wearing_Lipstick", lipstick)
    put("Heavy_Makeup", makeup)
    put("Rosy_Cheeks", per_sex(0.015, 0.10))
    put("Wearing_Earrings", per_sex(0.02, 0.31))
    put("Wearing_Necklace", per_sex(0.015, 0.20))
    put("Wearing_Necktie", per_sex(0.16, 0.01))
    put("Eyeglasses", _bern(rng, np.where(young, 0.045, 0.135)))

    # Face shape and features.
    put("Arched_Eyebrows", per_sex(0.04, 0.43))
    put("Bushy_Eyebrows", per_sex(0.25, 0.065))
    put("Big_Lips", _bern(rng, np.array([0.20, 0.26, 0.28, 0.40])[group]))
    big_nose = _bern(rng, np.select([male & old, male, old], [0.52, 0.34, 0.2], 0.09))
    put("Big_Nose", big_nose)
    put("Pointy_Nose", ~big_nose & per_sex(0.22, 0.43))
    chubby = _bern(rng, np.select([male & old, male, old], [0.2, 0.06, 0.06], 0.02))
    put("Chubby", chubby)
    put("Double_Chin", _bern(rng, np.where(chubby, 0.45, 0.023)))
    put("Oval_Face", ~chubby & _bern(rng, np.full(n, 0.295)))
    put("Narrow_Eyes", _bern(rng, np.full(n, 0.115)))
    put("Bags_Under_Eyes", _bern(rng, np.where(old, 0.40, 0.15)))
    put("Blurry", _bern(rng, np.full(n, 0.051)))
    pale = _bern(rng, np.where(group == 0, 0.065, 0.01))
    put("Pale_Skin", pale)

    # Attractive: a subjective annotator judgement -- a noisy function of other attributes and of
    # the latent group (the annotators' bias the fairness analysis should find).
    c = lambda name: a[:, _A[name]].astype(float)  # noqa: E731
    score = (-1.62 + 1.1 * c("Young") + 0.5 * (1 - c("Male")) + 0.8 * c("Heavy_Makeup")
             + 0.35 * c("Smiling") + 0.45 * c("Oval_Face") + 0.3 * c("Arched_Eyebrows")
             + 0.3 * c("Pointy_Nose") + 0.25 * c("Wavy_Hair") + 0.2 * c("Blond_Hair")
             - 1.1 * c("Chubby") - 0.8 * c("Double_Chin") - 1.0 * c("Bald") - 0.6 * c("Gray_Hair")
             - 0.5 * c("Bags_Under_Eyes") - 0.6 * c("Big_Nose") - 0.4 * c("Eyeglasses")
             - 0.7 * c("Blurry") - 0.3 * c("Narrow_Eyes") + GROUP_ATTRACTIVE_BIAS[group])
    put("Attractive", _bern(rng, _sigmoid(score + rng.logistic(0, 0.6, n))))

    # Geometry (pixels in the 178x218 frame) -> landmarks. Aligned like CelebA: eyes near y=111.
    cx = 89 + rng.normal(0, 1.2, n)
    cy = 122 + rng.normal(0, 1.2, n)
    # Base face size; Oval_Face / Chubby reshape it when drawing (so the picture follows the label).
    face_w = 39.5 + np.where(male, 2.0, 0.0) + id_face_w[identity]
    face_h = 52 + id_face_h[identity] + rng.normal(0, 0.7, n)
    eye_dx = 19.5 + rng.normal(0, 0.8, n)
    eye_y = cy - 11 + rng.normal(0, 0.8, n)
    nose_y = cy + 12 + rng.normal(0, 1.0, n)
    mouth_y = cy + 30 + rng.normal(0, 1.0, n)
    mouth_dx = 15 + 3.0 * smiling + rng.normal(0, 0.8, n)
    tilt = rng.normal(0, 1.2, n)  # eye-line tilt in pixels (landmarks move with it)
    landmarks = np.stack([
        cx - eye_dx, eye_y + tilt, cx + eye_dx, eye_y - tilt, cx + rng.normal(0, 1.5, n), nose_y,
        cx - mouth_dx, mouth_y - 2.0 * smiling + tilt * 0.5,
        cx + mouth_dx, mouth_y - 2.0 * smiling - tilt * 0.5,
    ], axis=1)
    landmarks = np.rint(landmarks).astype(np.int64)

    # Colours that are labels (hair colour, Pale_Skin) are applied when drawing, from the labels;
    # here only the person's base skin and small per-photo variations.
    skin = id_skin[identity]
    other_hair = np.where(_bern(rng, np.full(n, 0.5))[:, None], HAIR_RGB[HAIR_OTHER],
                          [[62, 40, 30]])  # unlabelled colours: auburn or dark brown
    params = {
        "cx": cx, "cy": cy, "face_w": face_w, "face_h": face_h, "tilt": tilt,
        "skin": np.clip(skin, 0, 255), "hair_other": other_hair,
        "hair_jitter": rng.normal(0, 8, (n, 3)),
        "long_hair": long_hair, "full_beard": full_beard,
        "eye_color": id_eye[identity],
        "bg": rng.integers(0, 1 << 30, n),  # which background, tint
        "shirt": rng.integers(20, 236, (n, 3)).astype(float),
        "hat_rgb": rng.integers(20, 236, (n, 3)).astype(float),
        "lip_shade": rng.integers(0, 3, n),
        "sunglasses": _bern(rng, np.full(n, 0.2)),
        "blur": rng.uniform(1.8, 3.0, n),
        "light": rng.uniform(0.85, 1.12, n),
    }
    return Labels(attrs=a, identity=identity, partition=partition, group=group, age=age,
                  landmarks=landmarks, params=params)


# --------------------------------------------------------------------------------------------
# Drawing


_BG_CACHE: dict[tuple[int, int], list[Image.Image]] = {}


def _backgrounds(w: int, h: int) -> list[Image.Image]:
    """A fixed bank of 24 textured backgrounds (gradient + soft blobs), rendered once per size.

    Rendering them per image would dominate the cost; a fixed bank (seed 0, independent of the
    sample's seed) keeps images cheap and deterministic.
    """
    key = (w, h)
    if key in _BG_CACHE:
        return _BG_CACHE[key]
    rng = np.random.default_rng(12345)
    bank = []
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(24):
        top, bottom = rng.uniform(30, 235, 3), rng.uniform(30, 235, 3)
        t = (yy / h)[..., None]
        img = top * (1 - t) + bottom * t
        for _ in range(3):
            bx, by, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 70)
            blob = np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * r * r))[..., None]
            img = img * (1 - 0.5 * blob) + rng.uniform(30, 235, 3) * 0.5 * blob
        img += rng.normal(0, 4, img.shape)
        bank.append(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)))
    _BG_CACHE[key] = bank
    return bank


def _rgb(v, k: float = 1.0, alpha: int | None = None) -> tuple:
    out = tuple(int(max(0, min(255, c * k))) for c in v)
    return out + (alpha,) if alpha is not None else out


def _ellipse_pts(cx, cy, rx, ry, a0, a1, steps=16):
    """Points on an ellipse from angle a0 to a1 (degrees, 0 = +x, 90 = down)."""
    ang = np.radians(np.linspace(a0, a1, steps))
    return list(zip((cx + rx * np.cos(ang)).tolist(), (cy + ry * np.sin(ang)).tolist()))


def draw_face(attrs: np.ndarray, lm: np.ndarray, p: dict, rng: np.random.Generator) -> Image.Image:
    """Draw one 178x218 face. ``attrs`` is the 40-bool row, ``lm`` the 10 landmarks, ``p`` the
    image's drawing parameters (scalars), ``rng`` the image's own generator (texture details)."""
    A = {name: bool(attrs[i]) for name, i in _A.items()}
    bank = _backgrounds(WIDTH, HEIGHT)
    im = bank[p["bg"] % len(bank)].copy()
    if (p["bg"] >> 8) & 1:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    d = ImageDraw.Draw(im, "RGBA")  # RGBA mode blends translucent fills (make-up, shading)

    cx, cy = p["cx"], p["cy"]
    fw = p["face_w"] + 6.0 * A["Chubby"] - 3.0 * A["Oval_Face"]
    fh = p["face_h"] + 5.0 * A["Oval_Face"]
    skin = np.asarray(p["skin"], float)
    if A["Pale_Skin"]:
        skin = 0.35 * skin + 0.65 * PALE_RGB
    if A["Gray_Hair"]:
        hair = HAIR_RGB[HAIR_GRAY]
    elif A["Blond_Hair"]:
        hair = HAIR_RGB[HAIR_BLOND]
    elif A["Black_Hair"]:
        hair = HAIR_RGB[HAIR_BLACK]
    elif A["Brown_Hair"]:
        hair = HAIR_RGB[HAIR_BROWN]
    else:
        hair = np.asarray(p["hair_other"], float)
    hair = np.clip(hair + np.asarray(p["hair_jitter"]), 0, 255)
    lex, ley, rex, rey, nx, ny, mlx, mly, mrx, mry = (float(v) for v in lm)
    top = cy - fh  # top of the face ellipse (forehead top)
    chin = cy + fh
    hair_c = _rgb(hair)
    hair_dark = _rgb(hair, 0.7)
    skin_c = _rgb(skin)
    shade = _rgb(skin, 0.82)

    # Long hair falls behind the head down to the shoulders.
    if p["long_hair"] and not A["Bald"]:
        hw = fw + 15
        outline = _ellipse_pts(cx, top + 40, hw, 52, 180, 360, 14)
        if A["Wavy_Hair"]:
            side = [(cx + hw + 4 * math.sin(k), top + 40 + k * 12) for k in range(0, 12)]
        else:
            side = [(cx + hw + 2, top + 40 + k * 12) for k in range(0, 12)]
        left = [(2 * cx - x, y) for x, y in reversed(side)]
        d.polygon(outline + side + [(cx + fw - 5, 205), (cx - fw + 5, 205)] + left, fill=hair_c)

    # Shoulders and clothes; the neck.
    d.ellipse((cx - 82, chin + 12, cx + 82, chin + 110), fill=_rgb(p["shirt"]))
    d.rectangle((cx - 17, cy + 20, cx + 17, chin + 22), fill=shade)
    if A["Wearing_Necktie"]:
        d.polygon([(cx - 16, chin + 13), (cx, chin + 30), (cx + 16, chin + 13)], fill=(240, 240, 240))
        tie = _rgb(p["hat_rgb"], 0.8)
        d.polygon([(cx - 5, chin + 18), (cx + 5, chin + 18), (cx + 3, chin + 25), (cx - 3, chin + 25)],
                  fill=tie)
        d.polygon([(cx - 3, chin + 25), (cx + 3, chin + 25), (cx + 8, HEIGHT), (cx - 8, HEIGHT)],
                  fill=tie)
    if A["Wearing_Necklace"]:
        d.arc((cx - 20, chin - 8, cx + 20, chin + 20), 20, 160, fill=(230, 190, 60), width=2)
        d.ellipse((cx - 3, chin + 16, cx + 3, chin + 22), fill=(240, 200, 70))

    # Hair mass behind the top of the head (absent when bald).
    if not A["Bald"]:
        d.ellipse((cx - fw - 6, top - 13, cx + fw + 6, top + 2 * fh * 0.55), fill=hair_c)
    else:
        # A bald skull continues the face upward.
        d.ellipse((cx - fw + 1, top - 8, cx + fw - 1, top + fh), fill=skin_c)

    # Ears, then the face. Chubby faces are wider (set in face_w) and get round jowls.
    d.ellipse((cx - fw - 7, ley - 4, cx - fw + 5, ley + 18), fill=shade)
    d.ellipse((cx + fw - 5, rey - 4, cx + fw + 7, rey + 18), fill=shade)
    d.ellipse((cx - fw, top, cx + fw, chin), fill=skin_c)
    if A["Male"] and not A["Oval_Face"]:
        # A squarer jaw for men: widen the lower face.
        d.polygon(_ellipse_pts(cx, cy + 8, fw - 1, fh - 9, 10, 170, 12), fill=skin_c)
    if A["Chubby"]:
        d.ellipse((cx - fw - 3, cy + 5, cx - fw + 20, cy + 35), fill=skin_c)
        d.ellipse((cx + fw - 20, cy + 5, cx + fw + 3, cy + 35), fill=skin_c)
    if A["Double_Chin"]:
        # A second, fuller chin under the jaw line, with a fold between the two.
        d.ellipse((cx - 24, chin - 12, cx + 24, chin + 9), fill=_rgb(skin, 0.95),
                  outline=_rgb(skin, 0.7), width=2)
        d.arc((cx - 20, chin - 18, cx + 20, chin - 1), 25, 155, fill=_rgb(skin, 0.6), width=2)

    # Earrings hang from the ear lobes.
    if A["Wearing_Earrings"]:
        for ex in (cx - fw - 1, cx + fw + 1):
            d.ellipse((ex - 3, ley + 17, ex + 3, ley + 25), outline=(235, 195, 60), width=2)
            d.ellipse((ex - 2, ley + 24, ex + 2, ley + 28), fill=(245, 210, 80))

    # Hair on the forehead: the hairline is lower normally, high (with bare temples) when receding.
    if not A["Bald"]:
        depth = 12 if A["Receding_Hairline"] else 24
        d.chord((cx - fw - 3, top - 12, cx + fw + 3, top + 2 * depth), 180, 360, fill=hair_c)
        if A["Receding_Hairline"]:
            for sgn in (-1, 1):
                d.polygon([(cx + sgn * 8, top + depth - 1), (cx + sgn * (fw - 4), top - 4),
                           (cx + sgn * (fw - 2), top + depth + 4)], fill=skin_c)
        # Strand texture: straight lines, waves, or short curls.
        xs = np.linspace(cx - fw + 6, cx + fw - 6, 9)
        for x in xs.tolist():
            if A["Straight_Hair"]:
                d.line([(x, top - 8), (x + 0.15 * (x - cx), top + depth - 2)], fill=hair_dark, width=1)
            elif A["Wavy_Hair"]:
                pts = [(x + 3 * math.sin(k * 1.6), top - 8 + k * 3.5) for k in range(int(depth / 3.5) + 2)]
                d.line(pts, fill=hair_dark, width=2)
            else:
                d.arc((x - 3, top - 4, x + 3, top + 2), 0, 300, fill=hair_dark, width=1)
    else:
        # Shine on the scalp; a little hair above the ears.
        d.ellipse((cx - 12, top - 4, cx + 6, top + 6), fill=_rgb(skin, 1.12, 150))
        d.ellipse((cx - fw - 3, ley - 18, cx - fw + 6, ley + 2), fill=_rgb(HAIR_RGB[HAIR_GRAY]))
        d.ellipse((cx + fw - 6, rey - 18, cx + fw + 3, rey + 2), fill=_rgb(HAIR_RGB[HAIR_GRAY]))

    if A["Bangs"]:
        low = ley - 15
        pts = [(cx - fw + 2, top + 8)]
        n_teeth = 7
        for k in range(n_teeth + 1):
            x = cx - fw + 6 + k * (2 * fw - 12) / n_teeth
            pts.append((x, low + (4 if k % 2 else 0)))
        pts += [(cx + fw - 2, top + 8), (cx + fw - 10, top - 4), (cx - fw + 10, top - 4)]
        d.polygon(pts, fill=hair_c)
        for k in range(1, n_teeth):
            x = cx - fw + 6 + k * (2 * fw - 12) / n_teeth
            d.line([(x, top + 2), (x + 1, low)], fill=hair_dark, width=1)

    if A["Sideburns"]:
        for sgn in (-1, 1):
            x_out = cx + sgn * (fw - 1)
            x_in = cx + sgn * (fw - 8)
            d.polygon([(x_out, ley - 12), (x_in, ley - 12), (x_in + sgn * 1, ley + 24),
                       (x_out - sgn * 1, ley + 27)], fill=hair_c)

    # Age: wrinkles on the forehead, crow's feet, and nasolabial folds.
    if not A["Young"]:
        wr = _rgb(skin - 40, 1.0, 230)  # absolute darkening: visible on dark skin too
        if not A["Bangs"]:
            for k in range(2):
                d.arc((cx - 20, ley - 26 + 5 * k, cx + 20, ley - 16 + 5 * k), 200, 340, fill=wr, width=2)
        for ex, sgn in ((lex, -1), (rex, 1)):
            for k in (-1, 0, 1):
                d.line([(ex + sgn * 11, ley + 1 + 2 * k), (ex + sgn * 16, ley + 4 * k)], fill=wr, width=1)
        d.line([(nx - 11, ny), (mlx - 3, mly + 3)], fill=wr, width=2)
        d.line([(nx + 11, ny), (mrx + 3, mry + 3)], fill=wr, width=2)

    # Cheeks: highlight + shadow for high cheekbones; pink for rosy cheeks; blush with make-up.
    if A["High_Cheekbones"]:
        for sgn, ex, ey in ((-1, lex, ley), (1, rex, rey)):
            d.ellipse((ex - 9, ey + 8, ex + 9, ey + 16), fill=_rgb(skin + 45, 1.0, 170))
            d.line([(ex - sgn * 2, ey + 24), (ex + sgn * 10, ey + 16)], fill=_rgb(skin - 45, 1.0, 200),
                   width=2)
    if A["Rosy_Cheeks"]:
        for ex, ey in ((lex, ley), (rex, rey)):
            d.ellipse((ex - 10, ey + 12, ex + 10, ey + 28), fill=(235, 70, 90, 120))
    if A["Heavy_Makeup"]:
        for ex, ey in ((lex, ley), (rex, rey)):
            d.ellipse((ex - 9, ey - 9, ex + 9, ey + 1), fill=(150, 60, 150, 120))

    # Eyebrows: colour follows the hair; arched = peaked, bushy = thick.
    brow = _rgb(hair, 0.55) if not A["Bald"] else _rgb(HAIR_RGB[HAIR_GRAY], 0.7)
    if A["Blond_Hair"]:
        brow = _rgb(hair, 0.6)
    bw = 5 if A["Bushy_Eyebrows"] else (2 if not A["Male"] else 3)
    for ex, ey, sgn in ((lex, ley, -1), (rex, rey, 1)):
        by = ey - 10
        peak = 5 if A["Arched_Eyebrows"] else 1
        pts = [(ex + sgn * 11, by + 2), (ex + sgn * 3, by - peak), (ex - sgn * 9, by)]
        d.line(pts, fill=brow, width=bw, joint="curve")

    # Eyes: narrow eyes are flat slits; bags are dark arcs underneath.
    eh = 1.6 if A["Narrow_Eyes"] else 4.0
    iris = ((90, 60, 30), (60, 110, 170), (80, 130, 70), (40, 30, 25))[int(p["eye_color"]) % 4]
    for ex, ey in ((lex, ley), (rex, rey)):
        if A["Bags_Under_Eyes"]:
            d.arc((ex - 9, ey + 1, ex + 9, ey + 9), 20, 160, fill=_rgb(skin, 0.6), width=2)
            d.ellipse((ex - 8, ey + 3, ex + 8, ey + 9), fill=_rgb(skin, 0.5, 70))
        d.ellipse((ex - 8, ey - eh, ex + 8, ey + eh), fill=(245, 245, 245))
        r = min(3.6, eh + 0.4)
        d.ellipse((ex - 3.6, ey - r, ex + 3.6, ey + r), fill=iris)
        d.ellipse((ex - 1.4, ey - min(1.4, r), ex + 1.4, ey + min(1.4, r)), fill=(10, 10, 10))
        lid_w = 2 if A["Heavy_Makeup"] else 1
        d.arc((ex - 8, ey - eh, ex + 8, ey + eh), 180, 360, fill=(20, 15, 15), width=lid_w)

    # Nose: a shaded ridge and nostrils; big = wide, pointy = long and sharp.
    nw = 9 if A["Big_Nose"] else 5.5
    tip = ny + (3 if A["Pointy_Nose"] else 0)
    top_n = (lex + rex) / 2
    nose_shade = _rgb(skin, 0.78, 180)
    if A["Pointy_Nose"]:
        d.polygon([(top_n - 1, ley + 3), (nx + 1, tip + 2), (nx - 4, tip - 1)], fill=nose_shade)
        d.line([(top_n + 1, ley + 4), (nx + 1, tip + 1)], fill=_rgb(skin, 1.15, 200), width=1)
    else:
        d.line([(top_n - 2, ley + 4), (nx - nw * 0.4, tip - 3)], fill=nose_shade, width=2)
    d.chord((nx - nw, tip - 6, nx + nw, tip + 4), 0, 180, fill=_rgb(skin, 0.85, 200))
    d.ellipse((nx - nw * 0.65 - 2, tip - 1, nx - nw * 0.65 + 2, tip + 2), fill=_rgb(skin, 0.45))
    d.ellipse((nx + nw * 0.65 - 2, tip - 1, nx + nw * 0.65 + 2, tip + 2), fill=_rgb(skin, 0.45))

    # Beards, drawn before the mouth so the lips stay visible.
    if A["5_o_Clock_Shadow"]:
        k = 420
        px = rng.uniform(-1, 1, k)
        py = rng.uniform(0, 1, k)
        keep = px ** 2 + (py * 1.0) ** 2 < 1.0
        xs = (cx + px[keep] * (fw - 3)).tolist()
        ys = (ny + 4 + py[keep] * (chin - ny - 6)).tolist()
        # Stubble must contrast with the skin, not the hair: dark dots on light skin, light
        # dots on dark skin (dark hair on dark skin would otherwise vanish).
        dots = (40, 36, 32, 170) if float(np.mean(skin[:3])) > 110 else (165, 150, 135, 170)
        d.point(list(zip(xs, ys)), fill=dots)
        d.ellipse((cx - fw + 4, ny, cx + fw - 4, chin - 1), fill=(60, 70, 80, 40))
    beard_c = _rgb(hair, 0.9) if not A["Bald"] else _rgb(HAIR_RGB[HAIR_GRAY], 0.9)
    # No_Beard = False always shows something: a full beard unless a goatee/moustache is drawn.
    if not A["No_Beard"] and (p["full_beard"] or not (A["Goatee"] or A["Mustache"])):
        # Jaw and chin from cheek to cheek, with a gap around the mouth.
        outer = _ellipse_pts(cx, cy, fw, fh, 10, 170, 18)
        inner = [(mlx - 5, mly - 3), (cx, (mly + mry) / 2 + 8), (mrx + 5, mry - 3)]
        d.polygon(outer + inner, fill=beard_c)
    if A["Goatee"]:
        d.polygon([(mlx + 2, mly + 5), (mrx - 2, mry + 5), (cx + 8, chin + 1), (cx - 8, chin + 1)],
                  fill=beard_c)
    if A["Mustache"]:
        d.polygon([(mlx - 3, mly - 1), (cx, ny + 5), (mrx + 3, mry - 1), (cx, mly - 3)], fill=beard_c)

    # Mouth: lips (red with lipstick, thicker when big), a curve up when smiling, teeth/dark
    # interior when open.
    lip_t = 4.0 if A["Big_Lips"] else 2.2
    if A["Wearing_Lipstick"]:
        lip = ((200, 25, 50), (215, 60, 110), (160, 20, 40))[int(p["lip_shade"]) % 3]
    else:
        lip = _rgb((skin[0] * 0.85, skin[1] * 0.62, skin[2] * 0.6))
    my = (mly + mry) / 2
    open_h = 5.0 if A["Mouth_Slightly_Open"] else 0.0
    if A["Smiling"]:
        depth = 9 + open_h
        if open_h:
            d.chord((mlx, my - depth, mrx, my + depth), 0, 180, fill=(70, 15, 20))
            d.chord((mlx + 3, my - depth + 3, mrx - 3, my + 3), 0, 180, fill=(250, 250, 245))
        d.arc((mlx, my - depth, mrx, my + depth), 0, 180, fill=lip, width=int(lip_t + 1))
        d.line([(mlx, my), (mrx, my)], fill=lip, width=max(1, int(lip_t - 1)))
    else:
        if open_h:
            d.ellipse((mlx + 4, my - open_h / 2 - 1, mrx - 4, my + open_h / 2 + 1), fill=(70, 15, 20))
        d.chord((mlx, my - lip_t - 2 - open_h / 2, mrx, my + lip_t - open_h / 2), 180, 360, fill=lip)
        d.chord((mlx + 2, my - lip_t + open_h / 2, mrx - 2, my + lip_t + 3 + open_h / 2), 0, 180, fill=lip)
        if not open_h:
            d.line([(mlx + 1, my), (mrx - 1, my)], fill=_rgb(lip, 0.6), width=1)

    # Glasses over the eyes (sometimes tinted).
    if A["Eyeglasses"]:
        frame = (20, 20, 25) if int(p["bg"]) % 3 else (120, 80, 40)
        for ex, ey in ((lex, ley), (rex, rey)):
            box = (ex - 12, ey - 8, ex + 12, ey + 8)
            if p["sunglasses"]:
                d.rounded_rectangle(box, radius=5, fill=(20, 20, 30, 215), outline=frame, width=2)
            else:
                d.rounded_rectangle(box, radius=5, fill=(200, 220, 255, 40), outline=frame, width=2)
        d.line([(lex + 12, ley - 2), (rex - 12, rey - 2)], fill=frame, width=2)
        d.line([(lex - 12, ley - 3), (cx - fw, ley - 1)], fill=frame, width=2)
        d.line([(rex + 12, rey - 3), (cx + fw, rey - 1)], fill=frame, width=2)

    # Hat: crown and brim over the top of the head.
    if A["Wearing_Hat"]:
        hc = _rgb(p["hat_rgb"])
        d.rounded_rectangle((cx - fw + 2, top - 30, cx + fw - 2, top + 14), radius=12, fill=hc)
        d.rectangle((cx - fw + 2, top + 6, cx + fw - 2, top + 12), fill=_rgb(p["hat_rgb"], 0.6))
        d.ellipse((cx - fw - 18, top + 8, cx + fw + 18, top + 20), fill=_rgb(p["hat_rgb"], 0.85))

    # Lighting, then blur for Blurry.
    if abs(p["light"] - 1.0) > 0.02:
        k = p["light"]
        im = im.point([min(255, int(v * k)) for v in range(256)] * 3)
    if A["Blurry"]:
        im = im.filter(ImageFilter.GaussianBlur(p["blur"]))
    return im


def _row_params(labels: Labels, i: int) -> dict:
    out = {}
    for k, v in labels.params.items():
        x = v[i]
        out[k] = x.tolist() if isinstance(x, np.ndarray) else x.item()
    return out


def render(labels: Labels, i: int, seed: int) -> Image.Image:
    """Image ``i`` of ``labels`` (its own rng, so any process can draw any image)."""
    rng = np.random.default_rng((int(seed), int(i)))
    return draw_face(labels.attrs[i], labels.landmarks[i], _row_params(labels, i), rng)


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    # Fixed encoder settings so bytes are reproducible (no optimize pass, no EXIF, no timestamp).
    im.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=2)
    return buf.getvalue()


def _utk_image(im: Image.Image) -> Image.Image:
    # UTKFace chips are square crops around the face.
    return im.crop((0, 25, WIDTH, 25 + WIDTH)).resize((UTK_SIZE, UTK_SIZE), Image.BILINEAR)


def _lfw_image(im: Image.Image, bg: Image.Image) -> Image.Image:
    # LFW frames show more background around a smaller face.
    canvas = bg.resize((LFW_SIZE, LFW_SIZE), Image.BILINEAR)
    canvas.paste(im, ((LFW_SIZE - WIDTH) // 2, (LFW_SIZE - HEIGHT) // 2 + 4))
    return canvas


def _utk_name(labels: Labels, i: int) -> str:
    age = int(labels.age[i])
    gender = 0 if labels.column("Male")[i] else 1  # UTKFace: 0 male, 1 female
    race = int(GROUP_UTK_RACE[labels.group[i]])
    # A 17-digit date-time stamp like UTKFace's (yyyymmddHHMMSSmmm), unique per image.
    stamp = 20170101000000000 + i * 1013
    return f"{age}_{gender}_{race}_{stamp}.jpg.chip.jpg"


def _lfw_person(identity: int) -> str:
    f = FIRST_NAMES[identity % len(FIRST_NAMES)]
    l = LAST_NAMES[(identity // len(FIRST_NAMES)) % len(LAST_NAMES)]
    k = identity // (len(FIRST_NAMES) * len(LAST_NAMES))
    return f"{f}_{l}" + (f"_{k + 1}" if k else "")


def image_relpaths(labels: Labels, fmt: str) -> list[str]:
    """Where each image goes under the sample root, for ``fmt``."""
    n = len(labels)
    if fmt == "celeba":
        return [f"img_align_celeba/{i + 1:06d}.jpg" for i in range(n)]
    if fmt == "utkface":
        return [f"UTKFace/{_utk_name(labels, i)}" for i in range(n)]
    if fmt == "lfw":
        seen: dict[int, int] = {}
        out = []
        for i in range(n):
            ident = int(labels.identity[i])
            seen[ident] = seen.get(ident, 0) + 1
            name = _lfw_person(ident)
            out.append(f"lfw/{name}/{name}_{seen[ident]:04d}.jpg")
        return out
    raise ValueError(f"unknown sample format {fmt!r}; expected celeba, utkface or lfw")


def _encode(labels: Labels, i: int, seed: int, fmt: str) -> bytes:
    im = render(labels, i, seed)
    if fmt == "utkface":
        im = _utk_image(im)
    elif fmt == "lfw":
        bank = _backgrounds(WIDTH, HEIGHT)
        im = _lfw_image(im, bank[(int(labels.params["bg"][i]) >> 3) % len(bank)])
    return _jpeg(im)


def _write_range(args) -> int:
    labels, seed, fmt, out, relpaths, start, stop = args
    for i in range(start, stop):
        path = os.path.join(out, relpaths[i])
        with open(path, "wb") as f:
            f.write(_encode(labels, i, seed, fmt))
    return stop - start


def _write_text(path: Path, lines: list[str]) -> None:
    # newline="\n": byte-identical on every platform.
    with open(path, "w", newline="\n", encoding="ascii") as f:
        f.write("\n".join(lines) + "\n")


def write_annotations(out: str | Path, labels: Labels) -> None:
    """Write CelebA's four annotation files for ``labels`` (exact layout of the originals)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    # list_attr_celeba.txt: count, names line (with CelebA's trailing space), then each value
    # right-aligned in 2 characters after one space: "000001.jpg -1  1  1 -1 ...".
    vals = np.where(labels.attrs, " 1", "-1")
    body = [name + " " + " ".join(row) for name, row in zip(names, vals.tolist())]
    _write_text(out / "list_attr_celeba.txt", [str(n), " ".join(CELEBA_ATTRIBUTES) + " "] + body)
    _write_text(out / "list_eval_partition.txt",
                [f"{name} {int(p)}" for name, p in zip(names, labels.partition.tolist())])
    _write_text(out / "identity_CelebA.txt",
                [f"{name} {int(k)}" for name, k in zip(names, labels.identity.tolist())])
    lm_lines = [name + "".join(f"{v:5d}" for v in row)
                for name, row in zip(names, labels.landmarks.tolist())]
    _write_text(out / "list_landmarks_align_celeba.txt", [str(n), " ".join(LANDMARKS)] + lm_lines)


def make_sample(out: str, n: int, seed: int, fmt: str = "celeba", workers: int = 1) -> dict:
    """Write a synthetic collection of ``n`` faces under ``out``; returns counts and timings.

    ``fmt``: ``celeba`` (img_align_celeba/ + the four CelebA annotation files), ``utkface``
    (UTKFace/age_gender_race_date.jpg.chip.jpg, 200x200) or ``lfw`` (lfw/<Name>/<Name>_0001.jpg,
    250x250). ``workers`` > 1 draws in that many processes; the files are identical either way.
    """
    import time

    if fmt not in ("celeba", "utkface", "lfw"):
        raise ValueError(f"unknown sample format {fmt!r}; expected celeba, utkface or lfw")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    t0 = time.perf_counter()
    labels = sample_labels(n, seed)
    relpaths = image_relpaths(labels, fmt)
    root = Path(out)
    for d in sorted({os.path.dirname(r) for r in relpaths}):
        (root / d).mkdir(parents=True, exist_ok=True)
    if fmt == "celeba":
        write_annotations(root, labels)
    t1 = time.perf_counter()
    if workers == 1:
        _write_range((labels, seed, fmt, str(root), relpaths, 0, n))
    else:
        import multiprocessing as mp

        step = max(1, -(-n // (workers * 4)))
        jobs = [(labels, seed, fmt, str(root), relpaths, s, min(n, s + step)) for s in range(0, n, step)]
        with mp.get_context("spawn").Pool(workers) as pool:
            pool.map(_write_range, jobs)
    t2 = time.perf_counter()
    log.info("wrote %d %s images to %s in %.1f s (%.0f images/s)", n, fmt, root, t2 - t1,
             n / max(t2 - t1, 1e-9))
    return {"images": n, "format": fmt, "out": str(root), "label_seconds": round(t1 - t0, 3),
            "image_seconds": round(t2 - t1, 3), "images_per_s": round(n / max(t2 - t1, 1e-9), 1)}
