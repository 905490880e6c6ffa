"""``milkit view``: a local whole-slide viewer (Flask + vendored OpenSeadragon) and the per-slide report."""
