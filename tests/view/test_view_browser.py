"""``milkit view`` in a subprocess, driven in real headless Chromium (Debian's ``chromium``
through Playwright with ``executable_path``; nothing downloads a browser). Skips with a
message when Chromium or Playwright is missing. The last screenshot is kept in
``tests/view/artifacts/`` (or ``$MILKIT_TEST_ARTIFACTS``)."""

from __future__ import annotations

import io
import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from milkit.slide.annotations import patch_tumour_fraction, read_asap_xml
from milkit.slide.outputs import read_instances_h5

CHROMIUM = os.environ.get("MILKIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("MILKIT_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as err:
        return err.code, "", b""


def test_tiles_are_images_from_both_backends(server):
    for sid in ("s00", "s02"):  # OpenSlide DeepZoomGenerator; tifffile fallback (SubIFD strips)
        st, ctype, body = _get(f"{server}/slide/{sid}.dzi")
        assert st == 200 and b'Width="1024"' in body
        st, ctype, body = _get(f"{server}/slide/{sid}_files/10/1_1.jpeg")
        assert st == 200 and ctype == "image/jpeg" and body[:3] == b"\xff\xd8\xff"
        tile = np.asarray(Image.open(io.BytesIO(body)))
        assert tile.ndim == 3 and tile.std() > 5  # tissue, not a blank tile
        st, ctype, body = _get(f"{server}/heat/{sid}_files/10/1_1.png")
        assert st == 200 and ctype == "image/png" and body[:4] == b"\x89PNG"
        assert Image.open(io.BytesIO(body)).mode == "RGBA"
    meta = json.loads(_get(f"{server}/api/slide/s02")[2])
    assert meta["slide_backend"] == "tifffile"
    # the calibrated probability, when written, is what the heatmap shows (and the page says so)
    assert meta["value_source"].startswith("calibrated") and meta["values"] == pytest.approx(meta["probability"], abs=1e-5)
    assert meta["uncertainty"][0] == 0.125
    raw = json.loads(_get(f"{server}/api/slide/s00")[2])
    assert raw["value_source"].startswith("raw") and raw["probability"] is None
    assert raw["review"][0]["note"] == "uncertain" and raw["review"][0]["rings"][0][0] == [100.0, 100.0]
    assert raw["annotations"][0]["positive"] and len(raw["annotations"][0]["rings"][0]) >= 3
    assert _get(f"{server}/slide/s00_files/10/99_99.jpeg")[0] == 404
    assert _get(f"{server}/api/slide/nope")[0] == 404


@pytest.fixture(scope="module")
def page(server):
    if not CHROMIUM:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium); browser tests skipped")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install 'milkit[test]'); browser tests skipped")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1400, "height": 820})
        yield pg
        browser.close()


def _ready(page) -> None:
    page.wait_for_function("window.milkit && milkit.slide && milkit.fullyLoaded()", timeout=180_000)
    page.wait_for_timeout(400)  # let OpenSeadragon finish its animation frame


def _set(page, sel: str, value) -> None:
    page.eval_on_selector(sel, "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", str(value))


def _shot(page) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB")).astype(np.int32)


def _px(page, x: float, y: float) -> tuple[int, int]:
    p = page.evaluate(f"milkit.toScreen({x}, {y})")
    return int(round(p["x"])), int(round(p["y"]))


def test_viewer_layers_threshold_click_and_list(page, server, view_cohort):
    page.goto(f"{server}/?slide=s00")
    _ready(page)
    assert page.inner_text("#slide-title").startswith("s00")
    assert page.locator("#slide-table tbody tr").count() == 3
    # the verdict the labels carry is shown above the list, coloured by its level
    assert page.inner_text("#trust").startswith("verdict mil: UNCERTAIN — fewer than 10 validation slides")
    assert "(3 slides)" in page.inner_text("#trust") and page.locator("#trust .verdict.uncertain").count() == 1
    # where the lesion is and where tissue is clearly not lesion
    s = read_instances_h5(view_cohort.labels_dir / "s00" / "instances.h5")
    frac = patch_tumour_fraction(read_asap_xml(view_cohort.ann_dir / "s00.xml"), s.coords, s.size_level0)
    c = s.coords + s.size_level0 / 2
    les = c[int(np.argmax(frac))]
    far = c[np.flatnonzero(frac == 0)[np.argmax(((c[frac == 0] - les) ** 2).sum(1))]]

    for box in ("#show-patches", "#show-ann", "#show-heat"):
        page.uncheck(box)
    _set(page, "#op-heat", 1)
    _ready(page)
    off = _shot(page)
    page.check("#show-heat")
    _ready(page)
    on = _shot(page)

    def window(img, xy):
        x, y = _px(page, *xy)
        return img[y - 3:y + 4, x - 3:x + 4].reshape(-1, 3).mean(0)

    d_les = window(on, les) - window(off, les)
    assert np.abs(d_les).sum() > 60  # the heatmap layer changed the pixels on the lesion
    red_les, red_far = window(on, les), window(on, far)
    assert red_les[0] - red_les[2] > 60 and red_far[2] - red_far[0] > 30  # red on the lesion, blue outside

    # threshold slider: the drawn-patch count follows the values, live
    page.check("#show-patches")
    values = np.asarray(page.evaluate("milkit.slide.values"))
    counts = {}
    for thr in (0.9, 0.45, 0.2):
        _set(page, "#threshold", thr)
        counts[thr] = int(page.inner_text("#n-drawn"))
        assert counts[thr] == int((values >= thr).sum())
    assert counts[0.9] < counts[0.45] < counts[0.2]

    # click a patch: its coordinates and score
    k = int(np.argmax(frac))
    page.mouse.click(*_px(page, *c[k]))
    info = page.inner_text("#info")
    assert f"x {s.coords[k][0]}, y {s.coords[k][1]}" in info and f"{s.scores[k]:.4f}" in info

    page.check("#show-ann")
    _set(page, "#threshold", 0.5)
    _set(page, "#op-heat", 0.45)
    _ready(page)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "viewer.png"))
    assert (ARTIFACTS / "viewer.png").stat().st_size > 10_000

    # the review-region layer (review.geojson) is drawn along its outline and can be hidden
    with_review = _shot(page)
    page.uncheck("#show-review")
    page.wait_for_timeout(300)
    without = _shot(page)
    x, y = _px(page, 100, 200)
    assert np.abs(with_review[y - 4:y + 5, x - 4:x + 5] - without[y - 4:y + 5, x - 4:x + 5]).sum() > 500

    # the slide list sorts and opens slides (s02: the tifffile-read pyramid)
    page.click("#slide-table th[data-k='bag_prob']")
    page.click("#slide-table th[data-k='bag_prob']")  # descending
    first = page.inner_text("#slide-table tbody tr:first-child td:first-child")
    probs = {r["id"]: r["bag_prob"] for r in json.loads(_get(f"{server}/api/slides")[2])["slides"]}
    assert first == max(probs, key=probs.get)
    page.click("#slide-table tbody tr[data-id='s02']")
    page.wait_for_function("milkit.slide && milkit.slide.id === 's02'")
    _ready(page)
    assert page.evaluate("milkit.slide.slide_backend") == "tifffile"
    assert "s02" in page.url


def test_slide_report_sorts_in_chromium(page, view_cohort, tmp_path):
    from milkit.slide.labeling import evaluate_annotations

    res = evaluate_annotations(tmp_path, view_cohort.ann_dir, view_cohort.labels_dir)
    assert set(res["splits"]) == {"unlisted"}  # no run: no split is invented
    html = view_cohort.labels_dir / "report_annotations.html"
    page.goto(html.as_uri())
    rows = lambda: page.eval_on_selector_all("#slides tbody tr", "rs => rs.map(r => r.cells[0].textContent)")
    before = rows()
    page.click("#slides th:nth-child(4)")  # slide probability, ascending
    asc = rows()
    probs = {k: v["bag_prob"] for k, v in res["per_slide"].items()}
    assert asc == sorted(before, key=probs.get)
    assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    assert page.locator("img").count() == 6  # 2 positive (FN candidates) + 1 negative, slide and heatmap each


def test_run_report_slide_section_in_chromium(page, server, view_cohort, tmp_path):
    """report.html's per-slide section of a slide run: the table sorts on a click, every image
    decodes, in-page links land on a thumbnail and every 'open' link opens that slide in milkit view."""
    from urllib.parse import urlsplit

    from milkit.report import ScoreSet, write_report
    from milkit.view.run_slides import SlideBag

    split_of = {"s00": "val", "s01": "val", "s02": "test"}
    per: dict[str, list] = {"val": [], "test": []}
    for sid, split in split_of.items():
        s = read_instances_h5(view_cohort.labels_dir / sid / "instances.h5")
        ann = view_cohort.ann_dir / f"{sid}.xml"
        true = (patch_tumour_fraction(read_asap_xml(ann), s.coords, s.size_level0) >= 0.5).astype(int) if ann.is_file() \
            else np.zeros(len(s.coords), int)
        per[split].append(SlideBag(sid, int(true.any()), s.bag_prob, s.coords, float(s.size_level0), s.scores,
                                   s.labels, None, "probability", true))
    scores = {"mil": {sp: ScoreSet(np.array([b.label for b in bs]), np.array([b.bag_prob for b in bs]), slides=bs)
                      for sp, bs in per.items()}}
    port = urlsplit(server).port
    path = write_report(tmp_path, {"mil": {"val": {}, "test": {}}, "_run": {"primary_stage": "mil"}}, scores,
                        view_port=port)
    page.goto(path.as_uri())
    rows = lambda: page.eval_on_selector_all("#run-slides tbody tr", "rs => rs.map(r => r.dataset.id.split(':')[1])")
    probs = {b.slide_id: b.bag_prob for bs in per.values() for b in bs}
    page.click("#run-slides th:nth-child(4)")  # slide probability, ascending
    assert rows() == sorted(probs, key=probs.get)
    page.click("#run-slides th:nth-child(4)")  # again: descending
    assert rows() == sorted(probs, key=probs.get, reverse=True)
    assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    assert page.locator("#slides-section ~ div img").count() == 6  # s00 (FN), s01 (FP), s02 (FN): truth + heatmap
    anchors = page.eval_on_selector_all("#run-slides a[href^='#']", "as => as.map(a => a.getAttribute('href'))")
    assert len(anchors) == 3 and page.evaluate(
        "hs => hs.every(h => document.getElementById(decodeURIComponent(h.slice(1))) !== null)", anchors)
    links = page.eval_on_selector_all("#run-slides a.view", "as => as.map(a => a.href)")
    assert len(links) == 3
    for href in links:
        sid = href.split("slide=")[1]
        page.goto(href)
        page.wait_for_function(f"window.milkit && milkit.slide && milkit.slide.id === '{sid}'", timeout=120_000)
    # a link to a slide the labels folder lacks says so (and shows the first slide)
    page.goto(f"{server}/?slide=nope")
    page.wait_for_function("document.getElementById('info').textContent.indexOf(\"no slide 'nope'\") === 0",
                           timeout=120_000)
