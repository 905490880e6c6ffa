"""The Flask app of ``milkit view`` (127.0.0.1 only): the page, the slide list, one
slide's patches and layers as JSON, and Deep Zoom tiles for the slide and the heatmap."""

from __future__ import annotations

from pathlib import Path

from flask import Flask, Response, abort, jsonify, send_from_directory

from milkit.view.catalog import Catalog
from milkit.view.colors import css_gradient, lut
from milkit.view.tiles import encode

STATIC = Path(__file__).parent / "static"


def create_app(catalog: Catalog) -> Flask:
    app = Flask(__name__, static_folder=str(STATIC), static_url_path="/static")

    def slide(sid: str):
        try:
            return catalog.get(sid)
        except KeyError:
            abort(404, f"no slide {sid!r} in {catalog.labels_dir}")

    @app.get("/")
    def index():
        return send_from_directory(STATIC, "index.html")

    @app.get("/api/slides")
    def slides():
        rows = catalog.slide_list()
        return jsonify({"labels_dir": str(catalog.labels_dir), "slides": rows, "pending": catalog.pending,
                        "trust": catalog.trust,
                        "colormap": lut().tolist(), "gradient": css_gradient()})

    @app.get("/api/slide/<sid>")
    def slide_json(sid: str):
        return jsonify(slide(sid).payload)

    @app.get("/slide/<sid>.dzi")
    def slide_dzi(sid: str):
        d = slide(sid)
        if d.tiles is None:
            abort(404, d.payload["slide_error"])
        return Response(d.tiles.dzi(), mimetype="application/xml")

    @app.get("/slide/<sid>_files/<int:level>/<int:col>_<int:row>.<fmt>")
    def slide_tile(sid: str, level: int, col: int, row: int, fmt: str):
        d = slide(sid)
        if d.tiles is None or fmt not in ("jpeg", "jpg"):
            abort(404)
        try:
            im = d.tiles.tile(level, col, row)
        except ValueError as err:
            abort(404, str(err))
        return Response(encode(im, "jpeg"), mimetype="image/jpeg")

    @app.get("/heat/<sid>.dzi")
    def heat_dzi(sid: str):
        return Response(slide(sid).heat.dzi(), mimetype="application/xml")

    @app.get("/heat/<sid>_files/<int:level>/<int:col>_<int:row>.png")
    def heat_tile(sid: str, level: int, col: int, row: int):
        try:
            im = slide(sid).heat.tile(level, col, row)
        except ValueError as err:
            abort(404, str(err))
        return Response(encode(im, "png"), mimetype="image/png")

    return app


def serve(catalog: Catalog, port: int, open_browser: bool = True) -> None:
    """Run the app on 127.0.0.1:``port`` until interrupted."""
    import logging
    import threading
    import webbrowser

    import socket

    with socket.socket() as probe:  # a taken port is the user's to change: one line naming --port, exit 2
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as werkzeug: TIME_WAIT is no obstacle
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as err:
            raise ValueError(f"--port {port}: 127.0.0.1:{port} is not free ({err.strerror}); choose another --port") from None
    url = f"http://127.0.0.1:{port}/"
    app = create_app(catalog)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    print(f"milkit view: {url}  ({len(catalog.files)} slides from {catalog.labels_dir}; Ctrl-C stops)", flush=True)
    if open_browser:
        threading.Timer(1.0, lambda: webbrowser.open(url)).start()
    app.run(host="127.0.0.1", port=port, threaded=True, use_reloader=False)
