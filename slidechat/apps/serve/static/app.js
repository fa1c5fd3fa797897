/* slidechat serve: the page. Plain browser JavaScript, no build step, no external URL.
 *
 * Left: the slide list. Centre: OpenSeadragon on the slide's DeepZoom tiles, layers added as OSD simple images
 * that cover the level-0 extent, a scale bar from the slide's MPP. Right: the chat (streamed NDJSON answers,
 * one session per slide), the answer's evidence patches and cytology boxes drawn on the slide.
 *
 * Everything the browser tests touch has a data-testid; the viewer and the page state are exposed on
 * window.slidechatViewer / window.slidechat on purpose (the tests read image coordinates through them).
 */
"use strict";

(function () {
  const MAX_FIELD_SIDE = 4096;     // spec: a cytology field is at most 4096 level-0 px a side
  const WHOLE_IMAGE_SIDE = 4096;   // a slide up to this size is asked whole (no "field")
  const SVG_RASTER_SIDE = 4096;    // SVG layers are rasterised by the browser at most this large
  const SCALE_TARGET_PX = 125;     // the scale bar aims at ~100-150 screen px
  const PATCH_CONTEXT = 5;         // an evidence click shows the patch with this many patch widths around it
  const LAYER_LABELS = {tissue: "Tissue", grid: "Patch grid", screening: "Screening", evidence: "Evidence"};

  const $ = (id) => document.getElementById(id);
  const state = {
    model: {family: null, model_line: ""},
    slides: [],
    current: null,          // slide id
    info: null,             // GET /api/slides/{id} of the current slide
    slideItem: null,        // the slide's TiledImage (world item 0)
    layers: {},             // name -> {name, url, kind, on, item, gen, error}
    chats: {},              // slide id -> {session, turn, messages, evidence, evidenceUrl, regions, note}
    openGen: 0,
    busy: false,
    overlays: {highlight: null, regions: []},
  };
  let viewer = null;

  // ---------------------------------------------------------------- small helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("data-") || k === "role" || k === "title" || k === "alt" || k === "type"
               || k === "aria-label" || k === "loading") node.setAttribute(k, v === true ? "" : String(v));
      else node[k] = v;
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  /** The one-line error of a failed API response: its JSON {"error"} when there is one. */
  async function errorLine(resp) {
    let text = "";
    try { text = await resp.text(); } catch (e) { /* body unreadable: the status says enough */ }
    try {
      const j = JSON.parse(text);
      if (j && typeof j.error === "string") return j.error;
    } catch (e) { /* not JSON */ }
    return `HTTP ${resp.status} ${resp.statusText || ""}`.trim();
  }

  async function getJSON(path) {
    const resp = await fetch(path, {credentials: "same-origin"});
    if (!resp.ok) throw new Error(await errorLine(resp));
    return resp.json();
  }

  /** A signed evidence score with 3 significant digits: gradient x input scores can be 1e-5 or 1e+2. */
  function fmtScore(v) {
    if (!(typeof v === "number" && isFinite(v))) return "—";
    return (v > 0 ? "+" : "") + (v === 0 ? "0" : v.toPrecision(3));
  }

  function fmtSize(w, h) {
    return (w && h) ? `${w} × ${h} px` : "size unknown";
  }

  function fmtLength(um) {
    // um is m * 10^k with m in {1, 2, 5}: one significant digit is exact
    if (um >= 1000) return `${Number((um / 1000).toPrecision(1))} mm`;
    return `${Number(um.toPrecision(1))} µm`;
  }

  function chatFor(id) {
    if (!state.chats[id]) {
      state.chats[id] = {session: null, turn: null, messages: [], evidence: [], evidenceUrl: null,
                         regions: [], note: ""};
    }
    return state.chats[id];
  }

  function showChatError(msg) {
    const box = $("chat-error");
    box.textContent = msg || "";
    box.classList.toggle("hidden", !msg);
  }

  function showViewerMessage(msg, kind) {
    const box = $("viewer-message");
    box.textContent = msg || "";
    box.classList.toggle("hidden", !msg);
    box.classList.toggle("info", kind === "info");
  }

  // ---------------------------------------------------------------- model line

  async function loadModel() {
    try {
      const m = await getJSON("/api/model");
      state.model = {family: m.family || null, model_line: m.model_line || ""};
    } catch (e) {
      state.model = {family: null, model_line: `model unavailable: ${e.message}`};
    }
    renderModel();
  }

  function renderModel() {
    const fam = state.model.family;
    $("model-family").textContent = fam ? `${fam} family` : "no model";
    $("model-family").dataset.family = fam || "";
    $("model-line").textContent = state.model.model_line || (fam ? "" : "no model loaded: viewer only");
    updateAskEnabled();
  }

  // ---------------------------------------------------------------- slide list

  async function loadSlides() {
    let slides;
    try {
      slides = await getJSON("/api/slides");
    } catch (e) {
      $("slide-list-note").textContent = `cannot list slides: ${e.message}`;
      return;
    }
    state.slides = slides;
    const list = $("slide-list");
    list.replaceChildren();
    if (!slides.length) $("slide-list-note").textContent = "no slides found under the slides folder";
    for (const s of slides) list.append(slideItemNode(s));
  }

  function slideItemNode(s) {
    const thumb = el("img", {class: "thumb", alt: "", loading: "lazy", "data-testid": "slide-thumb"});
    thumb.addEventListener("error", () => thumb.classList.add("broken"));
    if (!s.error) thumb.src = s.thumbnail || `/api/slides/${encodeURIComponent(s.id)}/thumbnail.jpg`;
    else thumb.classList.add("broken");
    const mpp = (typeof s.mpp === "number" && s.mpp > 0) ? `${s.mpp.toFixed(3)} µm/px` : "no MPP";
    const meta = el("div", {class: "slide-meta-line"},
      el("span", {text: fmtSize(s.width, s.height)}),
      el("span", {text: mpp}),
      el("span", {class: s.has_features ? "ok" : "muted", "data-testid": "slide-features",
                  text: s.has_features ? "features ✓" : "features —"}));
    const body = el("div", {class: "slide-body"}, el("div", {class: "slide-name"}, ...breakable(s.name || s.id)), meta);
    if (s.has_screening) meta.append(el("span", {class: "ok", text: "screening ✓"}));
    if (s.error) body.append(el("div", {class: "slide-error", "data-testid": "slide-error", text: s.error}));
    const button = el("button", {type: "button", class: "slide-item" + (s.error ? " unreadable" : ""),
                                 "data-testid": "slide-item", "data-slide-id": s.id, title: s.name || s.id},
                      thumb, body);
    button.addEventListener("click", () => selectSlide(s.id));
    return el("li", {}, button);
  }

  /** A file name as text nodes with line-break opportunities after "_", "-" and "." (long slide names). */
  function breakable(name) {
    const out = [];
    for (const part of String(name).split(/(?<=[_.\-])/)) {
      if (out.length) out.push(document.createElement("wbr"));
      out.push(document.createTextNode(part));
    }
    return out;
  }

  function markSelected() {
    for (const b of document.querySelectorAll(".slide-item")) {
      const on = b.dataset.slideId === state.current;
      b.classList.toggle("selected", on);
      b.setAttribute("aria-current", on ? "true" : "false");
    }
  }

  // ---------------------------------------------------------------- viewer

  function makeViewer() {
    viewer = OpenSeadragon({
      element: $("viewer"),
      prefixUrl: "/vendor/osd/images/",
      drawer: "canvas",               // deterministic in headless browsers (no WebGL needed)
      showNavigator: true,
      navigatorPosition: "BOTTOM_RIGHT",
      showRotationControl: false,
      maxZoomPixelRatio: 2,
      visibilityRatio: 0.5,
      gestureSettingsMouse: {clickToZoom: false},
      timeout: 120000,
    });
    window.slidechatViewer = viewer;
    viewer.addHandler("animation", updateScaleBar);
    viewer.addHandler("resize", updateScaleBar);
    viewer.addHandler("open-failed", (e) => {
      showViewerMessage(`cannot open the slide: ${e.message || "the DeepZoom description did not load"}`);
    });
    viewer.addHandler("tile-load-failed", (e) => {
      $("slide-meta").dataset.tileErrors = String(Number($("slide-meta").dataset.tileErrors || 0) + 1);
      const warning = $("slide-warning");
      if (warning) warning.textContent = `some tiles failed to load (${e.message || "error"})`;
    });
  }

  async function selectSlide(id) {
    if (!viewer) return;
    state.current = id;
    const gen = ++state.openGen;
    markSelected();
    clearOverlays();
    resetLayers();
    state.slideItem = null;
    state.info = null;
    $("viewer-wrap").classList.add("empty");
    showViewerMessage("");
    $("slide-meta").replaceChildren();
    $("slide-meta").dataset.tileErrors = "0";
    renderChat();
    updateScaleBar();
    const entry = state.slides.find((s) => s.id === id) || {name: id};
    $("slide-title").textContent = entry.name || id;
    let info;
    try {
      info = await getJSON(`/api/slides/${encodeURIComponent(id)}`);
    } catch (e) {
      if (gen === state.openGen) { viewer.close(); showViewerMessage(`cannot open ${entry.name || id}: ${e.message}`); }
      return;
    }
    if (gen !== state.openGen) return;
    state.info = info;
    renderSlideMeta(info);
    if (info.error) {
      viewer.close();
      showViewerMessage(`this slide cannot be read: ${info.error}`);
      updateAskEnabled();
      return;
    }
    const urls = info.layer_urls || {};
    for (const name of info.layers || []) addLayerToggle(name, urls[name] || layerUrl(id, name));
    const onOpen = () => {
      if (gen !== state.openGen) return;
      const item = viewer.world.getItemAt(0);
      // a slide picked just before this one may finish opening first: wait for this one's own open
      if (!item || !String(item.source.tilesUrl || "").includes(`/${encodeURIComponent(id)}_files/`)) {
        viewer.addOnceHandler("open", onOpen);
        return;
      }
      state.slideItem = item;
      $("viewer-wrap").classList.remove("empty");
      updateScaleBar();
      const chat = chatFor(id);
      if (chat.evidenceUrl) setEvidenceLayer(chat.evidenceUrl, true);
      drawRegions(chat.regions);
      renderChat();
      document.body.dataset.slideOpen = id;
    };
    viewer.addOnceHandler("open", onOpen);
    document.body.dataset.slideOpen = "";
    viewer.open(`/api/slides/${encodeURIComponent(id)}.dzi`);
    updateAskEnabled();
  }

  function renderSlideMeta(info) {
    const bits = [fmtSize(info.width, info.height),
                  (typeof info.mpp === "number" && info.mpp > 0) ? `${info.mpp.toFixed(3)} µm/px` : "no MPP"];
    if (info.objective) bits.push(`${info.objective}×`);
    if (info.vendor) bits.push(info.vendor);
    bits.push(info.has_features ? `features ✓ (${info.n_patches ?? "?"} patches)` : "features —");
    if (info.has_screening) bits.push("screening ✓");
    $("slide-meta").replaceChildren(el("span", {text: bits.join(" · ")}),
                                    el("span", {class: "warn", id: "slide-warning", "data-testid": "slide-warning"}));
  }

  // ---------------------------------------------------------------- scale bar

  /** The round length (1, 2 or 5 x 10^k µm) whose bar is closest to SCALE_TARGET_PX screen pixels. */
  function niceScale(umPerPx) {
    const k = Math.floor(Math.log10(umPerPx * SCALE_TARGET_PX));
    let best = null;
    for (let e = k - 1; e <= k + 1; e++) {
      for (const m of [1, 2, 5]) {
        const um = m * Math.pow(10, e);
        const px = um / umPerPx;
        const d = Math.abs(Math.log(px / SCALE_TARGET_PX));
        if (!best || d < best.d) best = {um, px, d};
      }
    }
    return best;
  }

  function updateScaleBar() {
    const bar = $("scale-bar"), line = $("scale-bar-line"), label = $("scale-bar-label");
    const item = state.slideItem, mpp = state.info && state.info.mpp;
    const known = !!item && typeof mpp === "number" && mpp > 0;
    line.classList.toggle("hidden", !known);
    if (!known) {
      line.style.width = "0px"; bar.dataset.um = ""; bar.dataset.px = "";
      label.textContent = item ? "no MPP" : "—";
      return;
    }
    // screen px per level-0 px at the current (animated) zoom
    const imageZoom = item.viewportToImageZoom(viewer.viewport.getZoom(true));
    const s = niceScale(mpp / imageZoom);
    line.style.width = `${s.px.toFixed(1)}px`;
    label.textContent = fmtLength(s.um);
    bar.dataset.um = String(s.um);
    bar.dataset.px = s.px.toFixed(2);
  }

  // ---------------------------------------------------------------- layers

  function layerUrl(id, name) {
    const base = `/api/slides/${encodeURIComponent(id)}/layers/`;
    return base + (name === "screening" ? "screening.png" : `${name}.svg`);  // tissue.svg, grid.svg
  }

  function resetLayers() {
    for (const layer of Object.values(state.layers)) removeLayerItem(layer);
    state.layers = {};
    $("layers").replaceChildren();
    updateLegend();
  }

  function addLayerToggle(name, url) {
    const kind = url.split("?")[0].endsWith(".svg") ? "svg" : "png";
    const layer = {name, url, kind, on: false, item: null, gen: 0, error: ""};
    state.layers[name] = layer;
    const box = el("input", {type: "checkbox", "data-testid": `layer-${name}`, "data-layer": name});
    box.addEventListener("change", () => setLayer(name, box.checked));
    const status = el("span", {class: "layer-status", "data-testid": `layer-${name}-status`});
    const label = el("label", {class: "layer-toggle", "data-testid": `layer-${name}-toggle`},
                     box, el("span", {text: LAYER_LABELS[name] || name}), status);
    $("layers").append(label);
    return layer;
  }

  function removeLayerItem(layer) {
    layer.gen++;
    if (layer.item && viewer) viewer.world.removeItem(layer.item);
    layer.item = null;
  }

  /** An SVG with only a viewBox rasterises at the browser's default 300x150-ish size: give it real pixels. */
  async function svgDataUrl(url) {
    const resp = await fetch(url, {credentials: "same-origin"});
    if (!resp.ok) throw new Error(await errorLine(resp));
    const doc = new DOMParser().parseFromString(await resp.text(), "image/svg+xml");
    const svg = doc.documentElement;
    if (!svg || svg.nodeName.toLowerCase() !== "svg" || doc.getElementsByTagName("parsererror").length) {
      throw new Error("the layer is not a valid SVG");
    }
    const vb = (svg.getAttribute("viewBox") || "").trim().split(/[\s,]+/).map(Number);
    let w = vb.length === 4 ? vb[2] : Number(svg.getAttribute("width"));
    let h = vb.length === 4 ? vb[3] : Number(svg.getAttribute("height"));
    if (!(w > 0 && h > 0)) throw new Error("the SVG layer has no size");
    const scale = Math.min(1, SVG_RASTER_SIDE / Math.max(w, h));
    svg.setAttribute("width", String(Math.max(1, Math.round(w * scale))));
    svg.setAttribute("height", String(Math.max(1, Math.round(h * scale))));
    svg.setAttribute("preserveAspectRatio", "none");
    return "data:image/svg+xml;charset=utf-8," + encodeURIComponent(new XMLSerializer().serializeToString(svg));
  }

  /** Each score layer's colour legend is shown while it is on: screening probabilities (low to high),
   *  the evidence's signed scores (against / for the answer). */
  function updateLegend() {
    const on = (n) => Boolean(state.layers[n] && state.layers[n].on);
    $("score-legend").classList.toggle("hidden", !on("screening"));
    $("evidence-legend").classList.toggle("hidden", !on("evidence"));
  }

  async function setLayer(name, on) {
    const layer = state.layers[name];
    if (!layer || !viewer) return;
    const box = document.querySelector(`[data-layer="${name}"]`);
    if (box) box.checked = on;
    layer.on = on;
    updateLegend();
    removeLayerItem(layer);
    const status = document.querySelector(`[data-testid="layer-${name}-status"]`);
    const toggle = document.querySelector(`[data-testid="layer-${name}-toggle"]`);
    if (toggle) toggle.dataset.state = on ? "loading" : "off";
    if (status) status.textContent = "";
    if (!on) return;
    const gen = layer.gen, openGen = state.openGen;
    const stale = () => gen !== layer.gen || openGen !== state.openGen || !layer.on;
    const fail = (msg) => {
      if (stale()) return;
      layer.error = msg;
      if (toggle) toggle.dataset.state = "error";
      if (status) { status.textContent = "!"; status.title = msg; }
      showChatError(`layer ${LAYER_LABELS[name] || name}: ${msg}`);
    };
    let url = layer.url;
    try {
      if (layer.kind === "svg") url = await svgDataUrl(layer.url);
    } catch (e) { fail(e.message); return; }
    if (stale()) return;
    if (!state.slideItem) {  // the slide is still opening: its open handler brings on the layers that are on
      await new Promise((resolve) => viewer.addOnceHandler("open", resolve));
      if (stale()) return;
    }
    viewer.addSimpleImage({
      url, x: 0, y: 0, width: 1,   // viewport units: the slide item spans x 0..1, so this covers level 0
      opacity: layerOpacity(),
      success: (e) => {
        if (stale()) { viewer.world.removeItem(e.item); return; }
        layer.item = e.item;
        layer.error = "";
        if (toggle) toggle.dataset.state = "on";
      },
      error: (e) => fail((e && e.message) || "the layer picture did not load"),
    });
  }

  function layerOpacity() {
    return Number($("layer-opacity").value) / 100;
  }

  function setEvidenceLayer(url, on) {
    let layer = state.layers.evidence;
    if (layer && layer.url !== url) { removeLayerItem(layer); layer.url = url; }
    if (!layer) layer = addLayerToggle("evidence", url);
    setLayer("evidence", on);
  }

  function dropEvidenceLayer() {
    const layer = state.layers.evidence;
    if (!layer) return;
    removeLayerItem(layer);
    delete state.layers.evidence;
    const t = document.querySelector('[data-testid="layer-evidence-toggle"]');
    if (t) t.remove();
    updateLegend();
  }

  // ---------------------------------------------------------------- overlays (evidence outline, regions)

  function clearOverlays() {
    if (!viewer) return;
    if (state.overlays.highlight) viewer.removeOverlay(state.overlays.highlight);
    for (const o of state.overlays.regions) viewer.removeOverlay(o);
    state.overlays = {highlight: null, regions: []};
  }

  function imageRect(x, y, w, h) {
    return state.slideItem.imageToViewportRectangle(x, y, w, h);
  }

  /** Centre the viewer on one evidence patch (with some context around it) and outline it. */
  function focusPatch(ev, rank) {
    if (!state.slideItem) return;
    const r = imageRect(ev.x, ev.y, ev.w, ev.h);
    const cx = r.x + r.width / 2, cy = r.y + r.height / 2;
    const side = Math.max(r.width, r.height) * PATCH_CONTEXT;
    viewer.viewport.fitBounds(new OpenSeadragon.Rect(cx - side / 2, cy - side / 2, side, side));
    if (state.overlays.highlight) viewer.removeOverlay(state.overlays.highlight);
    const box = el("div", {class: "patch-outline", "data-testid": "patch-outline", "data-rank": rank},
                   el("span", {class: "patch-rank", text: `#${rank}`}));
    viewer.addOverlay({element: box, location: r});
    state.overlays.highlight = box;
    for (const b of document.querySelectorAll(".evidence-item")) {
      b.classList.toggle("selected", b.dataset.rank === String(rank));
    }
  }

  function drawRegions(regions) {
    if (!viewer) return;
    for (const o of state.overlays.regions) viewer.removeOverlay(o);
    state.overlays.regions = [];
    if (!state.slideItem) return;
    (regions || []).forEach((g, i) => {
      const box = el("div", {class: "region-box", "data-testid": "region-box", "data-index": i,
                             "data-x": g.x, "data-y": g.y, "data-w": g.w, "data-h": g.h},
                     el("span", {class: "region-label", text: g.label || `region ${i + 1}`}));
      viewer.addOverlay({element: box, location: imageRect(g.x, g.y, g.w, g.h)});
      state.overlays.regions.push(box);
    });
  }

  function focusRegion(g) {
    if (!state.slideItem) return;
    const r = imageRect(g.x, g.y, g.w, g.h);
    const side = Math.max(r.width, r.height) * 3;
    viewer.viewport.fitBounds(new OpenSeadragon.Rect(r.x + r.width / 2 - side / 2, r.y + r.height / 2 - side / 2,
                                                     side, side));
  }

  // ---------------------------------------------------------------- chat

  function updateAskEnabled() {
    const ok = !!state.model.family && !!state.current && !!state.info && !state.info.error && !state.busy;
    $("ask").disabled = !ok;
    $("ask").textContent = state.busy ? "Answering…" : "Ask";
    document.body.dataset.busy = state.busy ? "1" : "0";
  }

  function renderChat() {
    const id = state.current;
    const list = $("messages");
    list.replaceChildren();
    const evList = $("evidence-list");
    evList.replaceChildren();
    showChatError("");
    const link = $("export-report");
    if (!id) {
      $("session-line").textContent = "select a slide to start";
      link.classList.add("disabled"); link.removeAttribute("href"); link.setAttribute("aria-disabled", "true");
      return;
    }
    const chat = chatFor(id);
    for (const m of chat.messages) list.append(messageNode(m));
    list.scrollTop = list.scrollHeight;
    $("session-line").textContent = chat.session
      ? `session ${chat.session} · turn ${chat.turn}${chat.note ? " · " + chat.note : ""}`
      : "new conversation";
    $("session-line").dataset.session = chat.session || "";
    if (chat.session) {
      link.href = `/api/sessions/${encodeURIComponent(chat.session)}/report.html`;
      link.classList.remove("disabled"); link.setAttribute("aria-disabled", "false");
    } else {
      link.classList.add("disabled"); link.removeAttribute("href"); link.setAttribute("aria-disabled", "true");
    }
    renderEvidence(chat);
  }

  function messageNode(m) {
    const node = el("li", {class: `msg ${m.role}` + (m.streaming ? " streaming" : "") + (m.error ? " failed" : ""),
                           "data-testid": `message-${m.role}`},
                    el("div", {class: "msg-role", text: m.role === "user" ? "You" : "Model"}),
                    el("div", {class: "msg-text", "data-testid": "message-text",
                               text: m.text || (m.streaming ? (m.progress || "…") : "")}));
    if (m.error) node.append(el("div", {class: "msg-error", "data-testid": "message-error", text: m.error}));
    m.node = node;
    return node;
  }

  function renderEvidence(chat) {
    const list = $("evidence-list");
    list.replaceChildren();
    const note = $("evidence-note");
    $("evidence-title").textContent = state.model.family === "cytology" ? "Regions" : "Evidence";
    if (chat.evidence.length) {
      note.textContent = `top ${chat.evidence.length} patches of the last answer (${chat.evidenceMethod})`;
      if (chat.evidence.every((ev) => !(ev.score > 0))) {
        note.textContent += ": every score ≤ 0, no patch raised the answer's likelihood";
      }
      chat.evidence.forEach((ev, i) => {
        const rank = i + 1;
        const b = el("button", {type: "button", class: "evidence-item", "data-testid": "evidence-item",
                                "data-rank": rank, "data-x": ev.x, "data-y": ev.y, "data-w": ev.w, "data-h": ev.h},
                     el("span", {class: "ev-rank", text: `#${rank}`}),
                     el("span", {class: "ev-score", text: `score ${fmtScore(ev.score)}`}),
                     el("span", {class: "ev-pos", text: `x ${ev.x}, y ${ev.y} · ${ev.w}×${ev.h} px`}));
        b.addEventListener("click", () => focusPatch(ev, rank));
        list.append(el("li", {}, b));
      });
    } else if (chat.regions.length) {
      note.textContent = `${chat.regions.length} region(s) in the last answer`;
      chat.regions.forEach((g, i) => {
        const b = el("button", {type: "button", class: "evidence-item region-item", "data-testid": "region-item",
                                "data-index": i},
                     el("span", {class: "ev-rank", text: g.label || `region ${i + 1}`}),
                     el("span", {class: "ev-pos", text: `x ${g.x}, y ${g.y} · ${g.w}×${g.h} px`}));
        b.addEventListener("click", () => focusRegion(g));
        list.append(el("li", {}, b));
      });
    } else {
      note.textContent = chat.messages.length ? "none for the last answer" : "appears with an answer";
    }
  }

  /** The current view in level-0 px (clamped to the image, at most MAX_FIELD_SIDE a side) for cytology. */
  function currentField() {
    const info = state.info, item = state.slideItem;
    if (state.model.family !== "cytology" || !info || !item) return null;
    if (Math.max(info.width, info.height) <= WHOLE_IMAGE_SIDE) return null;  // asked whole
    const r = item.viewportToImageRectangle(viewer.viewport.getBounds(true));
    let x0 = Math.max(0, Math.floor(r.x)), y0 = Math.max(0, Math.floor(r.y));
    let x1 = Math.min(info.width, Math.ceil(r.x + r.width)), y1 = Math.min(info.height, Math.ceil(r.y + r.height));
    const shrink = (a, b) => {
      if (b - a <= MAX_FIELD_SIDE) return [a, b];
      const c = (a + b) / 2;
      return [Math.round(c - MAX_FIELD_SIDE / 2), Math.round(c - MAX_FIELD_SIDE / 2) + MAX_FIELD_SIDE];
    };
    [x0, x1] = shrink(x0, x1);
    [y0, y1] = shrink(y0, y1);
    if (x1 <= x0 || y1 <= y0) return null;
    return {x: x0, y: y0, w: x1 - x0, h: y1 - y0};
  }

  async function readStream(resp, onLine) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (value) buf += decoder.decode(value, {stream: true});
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (line) onLine(JSON.parse(line));
      }
      if (done) break;
    }
    buf += decoder.decode();
    if (buf.trim()) onLine(JSON.parse(buf.trim()));
  }

  async function ask() {
    const textarea = $("question");
    const question = textarea.value.trim();
    if (!question || state.busy || !state.current || !state.info || state.info.error) return;
    const slideId = state.current;
    const chat = chatFor(slideId);
    const field = currentField();
    const body = {slide: slideId, question, session: chat.session, field};
    const user = {role: "user", text: question};
    const answer = {role: "assistant", text: "", streaming: true};
    chat.messages.push(user, answer);
    textarea.value = "";
    state.busy = true;
    updateAskEnabled();
    const visible = () => state.current === slideId;
    if (visible()) renderChat();
    const paint = () => {
      if (!visible() || !answer.node) return;
      answer.node.querySelector(".msg-text").textContent = answer.text || answer.progress || "…";
      $("messages").scrollTop = $("messages").scrollHeight;
    };
    let final = null;
    try {
      const resp = await fetch("/api/chat/stream", {
        method: "POST", credentials: "same-origin",
        headers: {"Content-Type": "application/json", "Accept": "application/x-ndjson"},
        body: JSON.stringify(body),
      });
      if (!resp.ok) throw new Error(await errorLine(resp));
      await readStream(resp, (msg) => {
        if (typeof msg.error === "string") throw new Error(msg.error);
        if (typeof msg.token === "string") { answer.text += msg.token; answer.progress = ""; paint(); }
        else if (typeof msg.progress === "string") { answer.progress = msg.progress; paint(); }
        else if (msg.done) final = msg;
      });
      if (!final) throw new Error("the answer stream ended without its final line");
      answer.text = final.answer;
      chat.note = (chat.session && final.session !== chat.session) ? "a new session was started" : "";
      chat.session = final.session;
      chat.turn = final.turn;
      chat.evidence = Array.isArray(final.evidence) ? final.evidence : [];
      chat.regions = Array.isArray(final.regions) ? final.regions : [];
      chat.evidenceUrl = final.evidence_url || null;
      chat.evidenceMethod = final.evidence_method || "gradient × input";
      if (final.model_line) state.model.model_line = final.model_line;
    } catch (e) {
      answer.error = e.message || String(e);
    } finally {
      answer.streaming = false;
      state.busy = false;
    }
    renderModel();
    if (!visible()) return;
    renderChat();
    if (answer.error) {
      if (!answer.text && !$("question").value) $("question").value = question;  // refused: let it be edited
      showChatError(answer.error);
      return;
    }
    if (chat.evidenceUrl) setEvidenceLayer(chat.evidenceUrl, true); else dropEvidenceLayer();
    if (state.overlays.highlight) { viewer.removeOverlay(state.overlays.highlight); state.overlays.highlight = null; }
    drawRegions(chat.regions);
    document.body.dataset.answers = String(Number(document.body.dataset.answers || 0) + 1);
  }

  function newConversation() {
    if (!state.current || state.busy) return;
    state.chats[state.current] = null;
    chatFor(state.current);
    dropEvidenceLayer();
    clearOverlays();
    renderChat();
  }

  // ---------------------------------------------------------------- start

  function start() {
    if (typeof OpenSeadragon === "undefined") {
      showViewerMessage("OpenSeadragon did not load (/vendor/osd/openseadragon.min.js): run tools/setup_env.sh");
    } else {
      makeViewer();
      showViewerMessage("Select a slide on the left to open it.", "info");
    }
    $("ask-form").addEventListener("submit", (e) => { e.preventDefault(); ask(); });
    $("question").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); ask(); }
    });
    $("new-chat").addEventListener("click", newConversation);
    $("layer-opacity").addEventListener("input", () => {
      for (const layer of Object.values(state.layers)) if (layer.item) layer.item.setOpacity(layerOpacity());
    });
    $("export-report").addEventListener("click", (e) => {
      if ($("export-report").classList.contains("disabled")) e.preventDefault();
    });
    renderChat();
    updateScaleBar();
    Promise.all([loadModel(), loadSlides()]).then(() => {
      document.body.dataset.ready = "1";
    });
  }

  window.slidechat = {
    state,
    viewer: () => viewer,
    slideItem: () => state.slideItem,
    layerItem: (name) => (state.layers[name] ? state.layers[name].item : null),
    selectSlide,
    niceScale,
    fmtScore,
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
