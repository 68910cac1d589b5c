"""The synthetic sample: CelebA's exact files, determinism, prevalences, visible attributes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import CELEBA_ATTRIBUTES
from pipeline.sample import (CELEBA_SPLIT_SIZES, GROUP_SKIN, _row_params, draw_face, make_sample,
                             sample_labels)
from pipeline.schemas import LANDMARKS

# CelebA's prevalences (% of 202,599 images), from list_attr_celeba.txt.
CELEBA_PREVALENCE = dict(zip(CELEBA_ATTRIBUTES, [
    11.1, 26.7, 51.3, 20.5, 2.2, 15.2, 24.1, 23.5, 23.9, 14.8, 5.1, 20.5, 14.2, 5.8, 4.7, 6.5,
    6.3, 4.2, 38.7, 45.5, 41.7, 48.3, 4.2, 11.5, 83.5, 28.4, 4.3, 27.7, 8.0, 6.6, 5.7, 48.2,
    20.8, 32.0, 18.9, 4.8, 47.2, 12.3, 7.3, 77.4]))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    make_sample(str(tmp_path / "a"), 12, seed=5)
    make_sample(str(tmp_path / "b"), 12, seed=5)
    make_sample(str(tmp_path / "c"), 12, seed=6)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) == 12 + 4
    assert a == b
    assert a["list_attr_celeba.txt"] != c["list_attr_celeba.txt"]
    assert a["img_align_celeba/000001.jpg"] != c["img_align_celeba/000001.jpg"]


def test_workers_draw_the_same_bytes(tmp_path):
    make_sample(str(tmp_path / "one"), 8, seed=2)
    make_sample(str(tmp_path / "two"), 8, seed=2, workers=2)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_celeba_file_layout(tmp_path):
    n = 30
    make_sample(str(tmp_path), n, seed=1)
    attr = (tmp_path / "list_attr_celeba.txt").read_text().split("\n")
    assert attr[0] == str(n)
    assert attr[1] == " ".join(CELEBA_ATTRIBUTES) + " "  # CelebA's trailing space
    rows = attr[2:-1]
    assert attr[-1] == "" and len(rows) == n
    row_re = re.compile(r"^\d{6}\.jpg( (-1| 1)){40}$")  # "000001.jpg -1  1  1 -1 ..."
    assert all(row_re.match(r) for r in rows), rows[0]
    assert [r[:10] for r in rows] == [f"{i:06d}.jpg" for i in range(1, n + 1)]

    part = (tmp_path / "list_eval_partition.txt").read_text().splitlines()
    splits = [int(line.split()[1]) for line in part]
    assert splits == sorted(splits) and set(splits) <= {0, 1, 2}  # contiguous, like CelebA
    ident = (tmp_path / "identity_CelebA.txt").read_text().splitlines()
    assert all(re.match(r"^\d{6}\.jpg \d+$", line) for line in ident)
    lm = (tmp_path / "list_landmarks_align_celeba.txt").read_text().splitlines()
    assert lm[0] == str(n) and lm[1].split() == list(LANDMARKS)
    assert all(len(line.split()) == 11 for line in lm[2:])

    imgs = sorted((tmp_path / "img_align_celeba").iterdir())
    assert len(imgs) == n
    with Image.open(imgs[0]) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (178, 218))


def test_split_ratio_and_identities_follow_celeba():
    labels = sample_labels(20000, seed=0)
    frac = np.bincount(labels.partition, minlength=3) / len(labels)
    want = np.array(CELEBA_SPLIT_SIZES) / sum(CELEBA_SPLIT_SIZES)
    assert np.allclose(frac, want, atol=0.002)
    # identities never straddle splits, and there are ~20 images per identity
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not set(labels.identity[labels.partition == a]) & set(labels.identity[labels.partition == b])
    assert 15 < len(labels) / len(np.unique(labels.identity)) < 25
    # sex is a property of the person
    male = labels.column("Male")
    for ident in np.unique(labels.identity)[:50]:
        assert len(set(male[labels.identity == ident])) == 1


def test_prevalences_near_celeba():
    labels = sample_labels(20000, seed=11)
    got = labels.attrs.mean(0) * 100
    off = {a: (round(g, 1), CELEBA_PREVALENCE[a]) for a, g in zip(CELEBA_ATTRIBUTES, got)
           if abs(g - CELEBA_PREVALENCE[a]) > 2.5}
    assert not off, f"prevalence (sample %, CelebA %) off by > 2.5 points: {off}"


def test_correlations_like_celeba():
    labels = sample_labels(20000, seed=3)
    c = labels.column
    male, young, smiling = c("Male"), c("Young"), c("Smiling")
    assert c("Wearing_Lipstick")[male].mean() < 0.02 and c("Wearing_Lipstick")[~male].mean() > 0.7
    assert c("Heavy_Makeup")[male].mean() < 0.02
    assert c("Gray_Hair")[young].mean() < 0.02 and c("Gray_Hair")[~young].mean() > 0.1
    assert c("Bald")[young].mean() < 0.02 and c("Bald")[~young & male].mean() > 0.08
    assert c("High_Cheekbones")[smiling].mean() - c("High_Cheekbones")[~smiling].mean() > 0.5
    assert c("Mouth_Slightly_Open")[smiling].mean() - c("Mouth_Slightly_Open")[~smiling].mean() > 0.3
    beard = c("Goatee") | c("Mustache") | ~c("No_Beard")
    assert beard[~male].mean() < 0.01
    # mutually exclusive hair colours / bald
    hair = c("Black_Hair").astype(int) + c("Blond_Hair") + c("Brown_Hair") + c("Gray_Hair")
    assert hair.max() <= 1 and not (c("Bald") & (hair > 0)).any()


def test_attractive_depends_on_the_latent_group():
    labels = sample_labels(40000, seed=4)
    att = labels.column("Attractive")
    rate = [att[labels.group == g].mean() for g in range(4)]
    assert rate[0] - rate[3] > 0.1  # the annotators' bias the fairness analysis should find
    # ... and on other attributes
    assert att[labels.column("Young")].mean() - att[~labels.column("Young")].mean() > 0.15
    # group changes skin tone
    skin = labels.params["skin"].mean(1)
    assert skin[labels.group == 0].mean() - skin[labels.group == 3].mean() > 80


VISIBLE = [a for a in CELEBA_ATTRIBUTES if a != "Attractive"]  # Attractive is a judgement


@pytest.mark.parametrize("attribute", VISIBLE)
def test_every_visible_attribute_changes_the_picture(attribute):
    labels = sample_labels(4, seed=9)
    base = np.zeros(len(CELEBA_ATTRIBUTES), bool)
    base[CELEBA_ATTRIBUTES.index("No_Beard")] = True
    base[CELEBA_ATTRIBUTES.index("Young")] = True
    params = _row_params(labels, 0)
    params.update(long_hair=False, full_beard=False, sunglasses=False)
    flipped = base.copy()
    j = CELEBA_ATTRIBUTES.index(attribute)
    flipped[j] = not flipped[j]

    def draw(row):
        return np.asarray(draw_face(row, labels.landmarks[0], params, np.random.default_rng(0)),
                          dtype=np.int16)

    for skin in GROUP_SKIN[[0, 3]]:  # visible on the lightest and the darkest skin
        params["skin"] = skin.tolist()
        diff = np.abs(draw(base) - draw(flipped)).max(axis=2)
        changed = int((diff > 25).sum())
        assert changed >= 15, f"{attribute} barely changes the image on skin {skin} ({changed} px)"


def test_utkface_format(tmp_path):
    make_sample(str(tmp_path), 10, seed=0, fmt="utkface")
    files = sorted((tmp_path / "UTKFace").iterdir())
    assert len(files) == 10
    for f in files:
        assert re.match(r"^\d{1,3}_[01]_[0-4]_\d{17}\.jpg\.chip\.jpg$", f.name), f.name
    with Image.open(files[0]) as im:
        assert (im.format, im.size) == ("JPEG", (200, 200))


def test_lfw_format(tmp_path):
    make_sample(str(tmp_path), 40, seed=0, fmt="lfw")
    people = sorted((tmp_path / "lfw").iterdir())
    assert people and sum(len(list(p.iterdir())) for p in people) == 40
    for person in people:
        for k, f in enumerate(sorted(person.iterdir()), start=1):
            assert f.name == f"{person.name}_{k:04d}.jpg"
    with Image.open(next(people[0].iterdir())) as im:
        assert im.size == (250, 250)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown sample format"):
        make_sample(str(tmp_path), 2, seed=0, fmt="imagenet")
    with pytest.raises(ValueError, match="n must be"):
        make_sample(str(tmp_path), 0, seed=0)


def test_make_sample_job(tmp_path):
    from typer.testing import CliRunner

    from jobs.make_sample import app

    res = CliRunner().invoke(app, ["--out", str(tmp_path / "s"), "--n", "3", "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "s" / "img_align_celeba" / "000003.jpg").exists()
    res = CliRunner().invoke(app, ["--out", str(tmp_path / "t"), "--n", "3", "--format", "png"])
    assert res.exit_code == 1 and "unknown sample format 'png'" in res.output
