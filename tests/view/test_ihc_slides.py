"""The demo's slides: real IHC tissue (scikit-image's bundled sample), pyramidal, with the
DAB-stained lesion exactly where its ASAP XML says."""

from __future__ import annotations

import numpy as np
import openslide
from PIL import Image, ImageDraw

from milkit.slide.annotations import read_asap_xml
from milkit.slide.synthetic import make_ihc_slide


def test_ihc_slide_is_a_pyramid_with_the_lesion_where_annotated(tmp_path):
    pos = make_ihc_slide(tmp_path, "p", True, seed=3, size=(1024, 1024))
    neg = make_ihc_slide(tmp_path, "n", False, seed=4, size=(1024, 1024))
    assert neg.annotation is None and pos.annotation.is_file()
    osr = openslide.OpenSlide(str(pos.path))
    assert osr.dimensions == (1024, 1024) and osr.level_count >= 2
    assert float(osr.properties["openslide.mpp-x"]) == 0.5
    img = np.asarray(osr.read_region((0, 0), 0, (1024, 1024)).convert("RGB")).astype(np.float64)
    m = Image.new("L", (1024, 1024), 0)
    ImageDraw.Draw(m).polygon([tuple(p) for p in read_asap_xml(pos.annotation)[0].exterior], fill=1)
    inside = np.asarray(m, bool)
    brown = img[..., 0] - img[..., 2]  # DAB is brown (R > B); haematoxylin is blue (B > R)
    tissue = img.std(-1) > 12
    assert brown[inside & tissue].mean() > 30 and brown[~inside & tissue].mean() < 0
    nimg = np.asarray(openslide.OpenSlide(str(neg.path)).read_region((0, 0), 0, (1024, 1024)).convert("RGB"), np.float64)
    assert (nimg[..., 0] - nimg[..., 2])[nimg.std(-1) > 12].mean() < 0  # no DAB anywhere on a negative slide
    assert img[tissue].std() > 20  # real texture, not a flat colour
