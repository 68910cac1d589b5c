"""The report: builds from the tables of a tiny run, shows every section, references only images
that exist, says "not run" for stages that have not run, and renders in a headless browser."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import pipeline.report as report
from pipeline import storage, tables
from tests.helpers import tiny_config
from tests.report_tables import SPACES, write_run

SECTION_IDS = ("findings", "data", "data-quality", "models-and-weights", "attribute-model",
               "clusters", "bias", "classifiers", "explanations", "run")


class _Page(HTMLParser):
    """Collects section ids, image sources, and the text of "not run" / warning notes."""

    def __init__(self):
        super().__init__()
        self.sections, self.images, self.notes = [], [], []
        self._in_note = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id"))
        elif tag == "img":
            self.images.append(a.get("src"))
        elif tag == "p" and "note" in (a.get("class") or ""):
            self._in_note = [a["class"], ""]

    def handle_data(self, data):
        if self._in_note is not None:
            self._in_note[1] += data

    def handle_endtag(self, tag):
        if tag == "p" and self._in_note is not None:
            self.notes.append(tuple(self._in_note))
            self._in_note = None


def _parse(index: Path) -> _Page:
    page = _Page()
    page.feed(index.read_text(encoding="utf-8"))
    return page


def _check_images(index: Path, page: _Page) -> None:
    from PIL import Image

    assert page.images, "the page references no image"
    for src in page.images:
        assert not src.startswith(("http:", "https:", "//")), f"external resource {src}"
        path = index.parent / src
        assert path.is_file(), f"the page references {src}, which does not exist"
        with Image.open(path) as im:
            im.verify()  # a real, complete PNG


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Every stage's tables (synthetic, in the stages' schemas) and the report built from them."""
    tmp = tmp_path_factory.mktemp("report_full")
    cfg = tiny_config(tmp, "report.dpi=60", "report.mean_face_images=20",
                      "cluster.spaces=[\"annotations\", \"semantic\"]")
    write_run(cfg)
    result = report.run(cfg)
    return cfg, result, Path(cfg.output.root) / "report" / "index.html"


def test_full_run_shows_every_section_and_no_problem(full_run):
    cfg, result, index = full_run
    assert result["report"] == str(index) and index.is_file()
    assert result["problems"] == [], result["problems"]
    assert result["not_run"] == []
    page = _parse(index)
    assert tuple(page.sections) == SECTION_IDS
    assert not [n for n in page.notes if "notrun" in n[0] or "warn" in n[0]], page.notes
    _check_images(index, page)
    html = index.read_text()
    for space in SPACES:  # every space gets its sweep, map, mean faces, sample grid ...
        for part in ("sweep", "map", "lift", "occurrence", "mean-faces", "samples", "distances"):
            assert f"figures/clusters-{space}-{part}.png" in html, (space, part)
    # data quality: the conflicting duplicate pair and the most suspect labels, as faces
    for fig in ("quality-conflicts", "quality-suspects"):
        assert f"figures/{fig}.png" in html, fig
    assert "Suspected label errors per attribute" in html
    for needle in ("P(A | B)", "Chi-square", "beeswarm", "rank agreement", "majority-class baseline",
                   "What undersampling changed", "config.toml", "Clusters against identity"):
        assert needle in html, needle


def test_every_written_figure_is_referenced(full_run):
    _, result, index = full_run
    page = _parse(index)
    on_disk = {f"figures/{p.name}" for p in (index.parent / "figures").iterdir()}
    assert on_disk == set(page.images)
    assert result["figures"] == len(on_disk)


def test_mean_face_is_the_pixel_average_of_the_cluster_images(tmp_path):
    from PIL import Image

    from pipeline.report import FACE_WIDTH, Context, FaceReader, mean_face

    cfg = tiny_config(tmp_path)
    paths = []
    for i, value in enumerate((0, 100, 200)):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((20, 10, 3), value, np.uint8)).save(p)
        paths.append(str(p))
    import pandas as pd

    reader = FaceReader(Context(cfg))
    faces = reader.load(pd.DataFrame({"image_id": ["a", "b", "c", "missing"],
                                      "uri": paths + [str(tmp_path / "nope.png")]}))
    assert len(faces) == 3 and faces[0].shape == (2 * FACE_WIDTH, FACE_WIDTH, 3)
    assert np.allclose(mean_face(faces), 100 / 255, atol=1e-6)
    assert [f["image_id"] for f in reader.failed] == ["missing"]  # recorded, not dropped silently


def test_missing_stages_give_not_run_notes(tmp_path):
    cfg = tiny_config(tmp_path, "report.dpi=60")
    write_run(cfg, stages=("ingest",))  # manifest + errors only
    result = report.run(cfg)
    index = Path(result["report"])
    page = _parse(index)
    assert tuple(page.sections) == SECTION_IDS
    assert result["problems"] == []
    for name in ("models/attributes/metrics", "clusters", "clusters/demographics",
                 "classifiers/metrics", "shap/importance"):
        assert name in result["not_run"], name
    notrun = [text for cls, text in page.notes if "notrun" in cls]
    for stage in ("train_attributes", "cluster", "classify", "explain"):
        assert any(stage in t for t in notrun), (stage, notrun)
    _check_images(index, page)  # the data section still has its figures


def test_empty_output_root_still_builds(tmp_path):
    cfg = tiny_config(tmp_path, "report.dpi=60")
    result = report.run(cfg)
    page = _parse(Path(result["report"]))
    assert tuple(page.sections) == SECTION_IDS
    assert "manifest" in result["not_run"]
    assert sum("notrun" in cls for cls, _ in page.notes) >= 6


def test_a_table_in_an_unexpected_shape_is_a_visible_warning(tmp_path):
    import pyarrow as pa

    cfg = tiny_config(tmp_path, "report.dpi=60")
    write_run(cfg, stages=("ingest",))
    bad = pa.table({"model": ["rf"], "value": [0.5]})  # lacks sampling, metric, ci_low ...
    tables.replace(cfg, "classifiers/metrics", bad)
    result = report.run(cfg)
    assert any("classifiers/metrics" in p and "ci_low" in p for p in result["problems"])
    warns = [t for cls, t in _parse(Path(result["report"])).notes if "warn" in cls]
    assert any("classifiers/metrics" in t for t in warns)


def test_report_describes_the_run_that_made_the_tables_not_the_current_config(tmp_path):
    """Tables made with one config, the report built with another: every setting the page
    states (CI level, bootstrap count, k rule, primary clustering, near-duplicate threshold,
    audit action, dataset) is the one recorded in the tables' metadata."""
    import html

    spaces = 'cluster.spaces=["annotations", "semantic"]'
    made = tiny_config(tmp_path, "report.dpi=60", spaces, "classify.ci_level=0.9",
                       "classify.bootstrap=37", "classify.permutations=123",
                       "cluster.k_rule=davies_bouldin", "cluster.primary_algorithm=gmm",
                       "audit.near_threshold=0.031")
    write_run(made, stages=("cluster", "audit", "classify"))
    edited = tiny_config(tmp_path, "report.dpi=60", spaces, "classify.ci_level=0.8",
                         "classify.bootstrap=11", "classify.permutations=456",
                         "cluster.k_rule=calinski_harabasz", "cluster.primary_algorithm=kmeans",
                         "audit.near_threshold=0.077", "audit.action=drop_conflicting_exact",
                         "data.dataset=utkface")
    result = report.run(edited)
    assert result["problems"] == [], result["problems"]
    text = html.unescape(Path(result["report"]).read_text(encoding="utf-8"))
    for said in ("90% bootstrap intervals (37 resamples)", "by the davies_bouldin rule",
                 "use the gmm clustering", "123 random shuffles", "≤ 0.031",
                 "audit.action = report", "celeba · "):
        assert said in text.replace("<code>", "").replace("</code>", "").replace(
            "<b>", "").replace("</b>", ""), said
    for not_said in ("80% bootstrap", "11 resamples", "calinski_harabasz rule",
                     "use the kmeans clustering", "456 random shuffles", "≤ 0.077",
                     "drop_conflicting_exact", "utkface"):
        assert not_said not in text, not_said


def test_a_table_without_its_recorded_settings_is_a_visible_warning(tmp_path):
    cfg = tiny_config(tmp_path, "report.dpi=60")
    write_run(cfg, stages=("cluster", "classify"))
    m = tables.read(cfg, "classifiers/metrics")
    tables.replace(cfg, "classifiers/metrics", m.replace_schema_metadata(None))  # an older run
    result = report.run(cfg)
    assert any("classifiers/metrics metadata lacks" in p and "rerun classify" in p
               for p in result["problems"]), result["problems"]


def test_rerun_drops_figures_of_tables_that_are_gone(tmp_path):
    cfg = tiny_config(tmp_path, "report.dpi=60", "report.faces_per_cluster=2",
                      "report.mean_face_images=4")
    write_run(cfg, stages=("ingest", "explain"))
    report.run(cfg)
    figs = Path(cfg.output.root) / "report" / "figures"
    assert any(p.name.startswith("shap-") for p in figs.iterdir())
    storage.delete(tables.location(cfg, "shap"))
    result = report.run(cfg)
    assert not any(p.name.startswith("shap-") for p in figs.iterdir())
    assert "shap/importance" in result["not_run"]


@pytest.mark.s3
def test_report_on_s3(tmp_path, s3_server, s3_bucket):
    from tests.conftest import s3_overrides

    cfg = tiny_config(tmp_path, f"output.root=s3://{s3_bucket}/run", "report.dpi=60",
                      "report.faces_per_cluster=2", "report.mean_face_images=4",
                      *s3_overrides(s3_server))
    write_run(cfg, stages=("ingest", "cluster"))
    result = report.run(cfg)
    assert result["report"] == f"s3://{s3_bucket}/run/report/index.html"
    assert result["problems"] == []
    out = tables.root(cfg).join("report")
    html = storage.read_bytes(out.join("index.html")).decode()
    page = _Page()
    page.feed(html)
    written = {f"figures/{i.path.rsplit('/', 1)[-1]}" for i in storage.list_files(out.join("figures"))}
    assert page.images and set(page.images) == written


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists()
                                        else None)


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="headless browser check skipped: `chromium` is not "
                    "installed (apt-get install -y chromium)")
def test_page_renders_in_headless_chromium(full_run, tmp_path):
    from PIL import Image

    _, _, index = full_run
    shot = tmp_path / "page.png"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--no-first-run", "--disable-extensions", "--window-size=1280,4000",
         f"--screenshot={shot}", index.resolve().as_uri()],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as im:
        px = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert px.shape[0] >= 3000
    non_white = (px.min(axis=2) < 235).mean()
    colours = len(np.unique(px.reshape(-1, 3)[::37], axis=0))
    # A blank or error page is nearly all white with a handful of colours; ours has a dark
    # header, text, tables and plots.
    assert non_white > 0.05, f"screenshot looks blank ({non_white:.1%} non-white pixels)"
    assert colours > 50, f"screenshot looks blank ({colours} distinct colours)"


@pytest.mark.slow
def test_report_from_real_stages(tmp_path, ray_session):
    """cluster → classify → explain run for real on a tiny manifest (annotations only, no
    attribute model), then the report: their tables must draw without a single problem."""
    from pipeline.run import run_stage
    from tests.helpers import write_tiny_manifest

    cfg = tiny_config(tmp_path, "report.dpi=60", "report.faces_per_cluster=4",
                      "report.mean_face_images=10", 'cluster.spaces=["annotations"]',
                      'cluster.algorithms=["kmeans", "gmm"]', "cluster.k_max=3",
                      'classify.features=["annotations"]', 'classify.models=["logistic_regression"]',
                      'classify.samplings=["none", "class"]', "classify.bootstrap=10")
    write_tiny_manifest(cfg, n=160)
    for stage in ("cluster", "classify", "explain"):
        run_stage(cfg, stage)
    result = run_stage(cfg, "report")
    assert result["problems"] == [], result["problems"]
    assert "models/attributes/metrics" in result["not_run"]  # train never ran: a note, no crash
    for name in ("clusters", "classifiers/metrics", "classifiers/findings", "shap/importance",
                 "clusters/demographics"):
        assert name not in result["not_run"], name
    index = Path(result["report"])
    page = _parse(index)
    assert tuple(page.sections) == SECTION_IDS
    _check_images(index, page)
    html = index.read_text()
    # the Findings section opens the page and states the run's count of surviving gaps
    first = html.index('<section id="findings">')
    assert first < html.index('<section id="data">') and "survive the Benjamini" in html
    for fig in ("clusters-annotations-mean-faces.png", "classifiers-per-cluster.png",
                "shap-logistic-regression-none-importance.png", "bias-annotations.png"):
        assert f"figures/{fig}" in html, fig


def test_findings_quote_the_audits_label_noise_disparities(full_run):
    """Findings names every attribute x grouping whose suspected-error rates differ significantly
    (audit/issue_rates), or says there is none; never silently leaves the audit out."""
    from pipeline import audit

    cfg, _, index = full_run
    html = index.read_text()
    start = html.index('id="findings"')
    findings = html[start:html.index("<section", start + 1)] if "<section" in html[start + 1:] \
        else html[start:]
    assert "Label-noise disparities (data audit)" in findings
    rates = tables.read(cfg, audit.ISSUE_RATES).to_pandas()
    sig = rates[rates["significant"].fillna(False).astype(bool)]
    if len(sig):
        for (attr, by), _ in sig.groupby(["attribute", "group_by"]):
            assert f"Label noise in {attr} differs by {by}" in findings, (attr, by)
    else:
        assert "no significant difference in suspected label errors" in findings


def test_a_narrow_read_of_a_table_lacking_a_column_names_what_is_missing(tmp_path):
    import pyarrow as pa

    from pipeline.report._context import Context, ReportDataError

    cfg = tiny_config(tmp_path, "report.dpi=60")
    tables.replace(cfg, "audit/label_conflicts", pa.table({"group": [1], "kind": ["exact"]}))
    ctx = Context(cfg)
    with pytest.raises(ReportDataError, match=r"audit/label_conflicts lacks the columns \['attribute'\]"):
        ctx.table("audit/label_conflicts", columns=("group", "kind", "attribute"))
    with pytest.raises(ReportDataError, match=r"lacks the columns \['values'\]"):
        ctx.rows_where("audit/label_conflicts", ("group", "values"), kind="exact")
    assert ctx.table("audit/label_conflicts", columns=("group",))["group"].tolist() == [1]
