// milkit view: OpenSeadragon base slide + heatmap tiled image; patch labels, annotations and
// review regions drawn on a canvas over the viewer, recomputed on every viewport change.
(function () {
  "use strict";
  var M = window.milkit = {slide: null, drawn: 0, threshold: 0.5, slides: []};
  var $ = function (id) { return document.getElementById(id); };
  // the canvas drawer: WebGL (OpenSeadragon 5+ default) falls back to slow software rendering without a GPU
  var viewer = OpenSeadragon({id: "osd", prefixUrl: "/static/openseadragon/images/", showNavigator: true, drawer: "canvas",
    animationTime: 0.2, maxZoomPixelRatio: 4, gestureSettingsMouse: {clickToZoom: false}});
  M.viewer = viewer;
  var canvas = document.createElement("canvas");
  canvas.className = "milkit-overlay";
  viewer.canvas.appendChild(canvas);
  var baseItem = null, heatItem = null;

  function num(v, d) { return v === null || v === undefined || isNaN(v) ? "–" : Number(v).toFixed(d === undefined ? 3 : d); }

  // ---------------------------------------------------------------- slide list
  var sortKey = "id", sortAsc = true;
  function renderList() {
    var rows = M.slides.slice().sort(function (a, b) {
      var x = a[sortKey], y = b[sortKey];
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      return (x < y ? -1 : x > y ? 1 : 0) * (sortAsc ? 1 : -1);
    });
    var tb = document.querySelector("#slide-table tbody");
    tb.innerHTML = "";
    rows.forEach(function (s) {
      var tr = document.createElement("tr");
      tr.dataset.id = s.id;
      if (M.slide && M.slide.id === s.id) tr.className = "sel";
      [s.id, s.split, s.true_label === null ? "–" : s.true_label, num(s.bag_prob), s.n_patches, s.n_positive,
       num(s.patch_auroc), num(s.patch_f1)].forEach(function (v) {
        var td = document.createElement("td"); td.textContent = v; tr.appendChild(td);
      });
      tr.addEventListener("click", function () { openSlide(s.id); });
      tb.appendChild(tr);
    });
  }
  document.querySelectorAll("#slide-table th").forEach(function (th) {
    th.addEventListener("click", function () {
      var k = th.dataset.k;
      sortAsc = sortKey === k ? !sortAsc : true; sortKey = k; renderList();
    });
  });

  // ---------------------------------------------------------------- one slide
  function openSlide(id) {
    M.ready = false;
    return fetch("/api/slide/" + encodeURIComponent(id)).then(function (r) { return r.json(); }).then(function (d) {
      M.slide = d; baseItem = heatItem = null;
      $("slide-title").textContent = d.id + (d.slide_error ? " (" + d.slide_error + ")" : "");
      $("value-source").textContent = "colours: " + d.value_source + "; threshold from " + (d.threshold_source || "–");
      $("threshold").value = d.threshold.toFixed(2);
      M.threshold = parseFloat($("threshold").value);
      $("thr-value").textContent = M.threshold.toFixed(2);
      history.replaceState(null, "", "?slide=" + encodeURIComponent(d.id));
      var sources = [];
      if (d.slide_tiles) sources.push({tileSource: d.slide_tiles});
      sources.push({tileSource: d.heat_tiles, opacity: heatOpacity()});
      viewer.open(sources);
      renderList();
    });
  }
  viewer.world.addHandler("add-item", function (e) {
    var url = e.item.source && (e.item.source.tilesUrl || "");
    if (url.indexOf("/heat/") >= 0) heatItem = e.item;
    if (!baseItem || url.indexOf("/slide/") >= 0) baseItem = e.item;
    if (heatItem) heatItem.setOpacity(heatOpacity());
    e.item.addHandler("fully-loaded-change", function () { M.ready = M.fullyLoaded(); });
  });
  viewer.addHandler("open", function () { redraw(); });
  M.fullyLoaded = function () {
    var n = viewer.world.getItemCount();
    if (!M.slide || n < (M.slide.slide_tiles ? 2 : 1)) return false;
    for (var i = 0; i < n; i++) if (!viewer.world.getItemAt(i).getFullyLoaded()) return false;
    return true;
  };
  function heatOpacity() { return $("show-heat").checked ? parseFloat($("op-heat").value) : 0; }

  // ---------------------------------------------------------------- overlay canvas
  function transform() {
    var d = M.slide, it = baseItem;
    var p0 = it.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
    var p1 = it.imageToViewerElementCoordinates(new OpenSeadragon.Point(d.width, d.height));
    return {x: p0.x, y: p0.y, s: (p1.x - p0.x) / d.width};
  }
  M.toScreen = function (x, y) {  // level-0 pixel → page coordinates (tests, tooltips)
    var t = transform(), r = viewer.element.getBoundingClientRect();
    return {x: r.left + t.x + x * t.s, y: r.top + t.y + y * t.s};
  };
  function rings(ctx, t, list) {
    list.forEach(function (ring) {
      ring.forEach(function (p, i) {
        var x = t.x + p[0] * t.s, y = t.y + p[1] * t.s;
        if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
      });
      ctx.closePath();
    });
  }
  function redraw() {
    var d = M.slide;
    var w = viewer.element.clientWidth, h = viewer.element.clientHeight;
    if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
    var ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, w, h);
    if (!d || !baseItem) return;
    var t = transform(), ps = d.patch_size * t.s, thr = M.threshold, n = 0;
    for (var i = 0; i < d.values.length; i++) if (d.values[i] >= thr) n++;
    M.drawn = $("show-patches").checked ? n : 0;
    $("n-drawn").textContent = M.drawn;
    if ($("show-patches").checked) {
      ctx.globalAlpha = parseFloat($("op-patches").value);
      ctx.fillStyle = "rgba(220,0,0,0.35)"; ctx.strokeStyle = "rgb(200,0,0)"; ctx.lineWidth = 1;
      for (var k = 0; k < d.values.length; k++) {
        if (d.values[k] < thr) continue;
        var x = t.x + d.coords[k][0] * t.s, y = t.y + d.coords[k][1] * t.s;
        if (x > w || y > h || x + ps < 0 || y + ps < 0) continue;
        ctx.fillRect(x, y, ps, ps);
        if (ps > 6) ctx.strokeRect(x + 0.5, y + 0.5, ps - 1, ps - 1);
      }
    }
    if ($("show-ann").checked && d.annotations.length) {
      ctx.globalAlpha = parseFloat($("op-ann").value); ctx.lineWidth = 2;
      d.annotations.forEach(function (a) {
        ctx.beginPath(); rings(ctx, t, a.rings);
        ctx.setLineDash(a.positive ? [] : a.reviewed ? [2, 3] : [6, 4]);  // reviewed region: grey dots
        ctx.strokeStyle = a.positive ? "rgb(0,170,0)" : a.reviewed ? "rgb(110,110,110)" : "rgb(230,180,0)"; ctx.stroke();
      });
      ctx.setLineDash([]);
    }
    if ($("show-review").checked && d.review.length) {
      ctx.globalAlpha = parseFloat($("op-review").value); ctx.lineWidth = 2; ctx.setLineDash([3, 3]);
      ctx.strokeStyle = "rgb(255,120,0)";
      d.review.forEach(function (r) { ctx.beginPath(); rings(ctx, t, r.rings); ctx.stroke(); });
      ctx.setLineDash([]);
    }
    ctx.globalAlpha = 1;
  }
  M.redraw = redraw;
  viewer.addHandler("update-viewport", redraw);
  viewer.addHandler("resize", redraw);

  viewer.addHandler("canvas-click", function (e) {
    if (!e.quick || !M.slide || !baseItem) return;
    var d = M.slide, p = baseItem.viewerElementToImageCoordinates(e.position);
    for (var i = 0; i < d.coords.length; i++) {
      var c = d.coords[i];
      if (p.x >= c[0] && p.x < c[0] + d.patch_size && p.y >= c[1] && p.y < c[1] + d.patch_size) {
        $("info").innerHTML = "patch at <b>x " + c[0] + ", y " + c[1] + "</b> (level 0, " + d.patch_size +
          " px) · score <b>" + num(d.scores[i], 4) + "</b> · probability <b>" +
          (d.probability ? num(d.probability[i]) : "– (not calibrated)") + "</b> · uncertainty <b>" +
          (d.uncertainty ? num(d.uncertainty[i]) : "–") + "</b> · shown value " + num(d.values[i]) +
          (d.values[i] >= M.threshold ? " (positive at " : " (negative at ") + M.threshold.toFixed(2) + ")";
        M.clicked = i;
        return;
      }
    }
    $("info").textContent = "no patch at x " + Math.round(p.x) + ", y " + Math.round(p.y);
    M.clicked = null;
  });

  // ---------------------------------------------------------------- controls
  $("threshold").addEventListener("input", function () {
    M.threshold = parseFloat(this.value); $("thr-value").textContent = M.threshold.toFixed(2); redraw();
  });
  ["show-patches", "op-patches", "show-ann", "op-ann", "show-review", "op-review"].forEach(function (id) {
    $(id).addEventListener("input", redraw);
  });
  ["show-heat", "op-heat"].forEach(function (id) {
    $(id).addEventListener("input", function () { if (heatItem) heatItem.setOpacity(heatOpacity()); });
  });

  // the list arrives at once; patch AUROC/F1 against the annotations may follow (j.pending slides to go)
  function trustNote(j) {  // the verdict of the run and stage the labels come from (milkit label records it)
    var box = $("trust");
    box.innerHTML = "";
    (j.trust || []).forEach(function (t) {
      var d = document.createElement("div");
      var v = t.verdict || "no verdict recorded";
      d.className = "verdict " + v.replace(/ /g, "-");
      d.textContent = "verdict " + (t.stage || "?") + ": " + v.toUpperCase() + (t.rule ? " — " + t.rule : "") +
        " (" + t.n_slides + " slides" + (t.run_dir ? ", " + t.run_dir : "") + ")";
      box.appendChild(d);
    });
  }
  function listNote(j) {
    $("labels-dir").textContent = j.labels_dir + " · " + j.slides.length + " slides" +
      (j.pending ? " · patch metrics: " + j.pending + " to go" : "");
  }
  function refreshList() {
    fetch("/api/slides").then(function (r) { return r.json(); }).then(function (j) {
      M.slides = j.slides; listNote(j); renderList();
      if (j.pending) setTimeout(refreshList, 2000);
    });
  }
  fetch("/api/slides").then(function (r) { return r.json(); }).then(function (j) {
    M.slides = j.slides;
    $("bar").style.background = j.gradient;
    trustNote(j);
    listNote(j);
    renderList();
    if (j.pending) setTimeout(refreshList, 2000);
    var want = new URLSearchParams(location.search).get("slide");
    var found = j.slides.some(function (s) { return s.id === want; });
    var first = found ? want : (j.slides[0] || {}).id;
    if (first) openSlide(first).then(function () {
      if (want && !found) $("info").textContent = "no slide '" + want + "' in " + j.labels_dir + "; showing " + first;
    });
  });
})();
