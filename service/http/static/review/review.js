// UGA Review: the slide with its overlays, the review queue, and a patch editor. Plain JS, no build step.
// Everything comes from the service's API (/v1) with the caller's bearer token (kept in sessionStorage).
"use strict";

(() => {
  const API = new URL("../v1", location.href).pathname; // the page is at /review/, the API at /v1
  const TOKEN_KEY = "uga.token";
  const $ = (id) => document.getElementById(id);
  const state = {
    token: sessionStorage.getItem(TOKEN_KEY),
    me: null,
    slide: null, // /slides/{slide}/info
    overlays: null, // /jobs/{id}/overlays
    layers: {}, // name -> OpenSeadragon TiledImage
    blobs: new Map(), // path -> Blob (patch heat maps, thumbnails), fetched once
    queue: [],
    viewer: null,
    tileSource: null, // the open slide's deep-zoom source, shared by both viewers
    contextViewer: null, // the editor's view of the open patch in its surroundings
    item: null, // the open queue item
  };

  // ---- API ------------------------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(path, options = {}) {
    const url = path.startsWith("/v1") ? path.replace(/^\/v1/, API) : API + path;
    const headers = { Authorization: `Bearer ${state.token}`, ...(options.headers || {}) };
    const response = await fetch(url, { ...options, headers });
    if (!response.ok) {
      let code = "http_error";
      let message = `${response.status} ${response.statusText}`;
      try {
        const body = await response.json();
        code = body.error.code;
        message = body.error.message;
      } catch (_) {
        /* not JSON */
      }
      if (response.status === 401) signOut(message);
      throw new ApiError(response.status, code, message);
    }
    return response;
  }
  const json = async (path, options) => (await api(path, options)).json();
  const blob = async (path, options) => (await api(path, options)).blob();

  // Fetched images by path, each fetched once (a second caller shares the first one's promise). Blobs,
  // not object URLs: each <img> gets its own URL (showImage), so dropping the cache never pulls an image
  // from under an element still loading it.
  function imageBlob(path) {
    if (!state.blobs.has(path)) {
      const data = blob(path);
      data.catch(() => state.blobs.delete(path)); // a failed fetch is tried again next time
      state.blobs.set(path, data);
    }
    return state.blobs.get(path);
  }

  // Drop every cached image (a new slide, or sign-out); a blob goes once nothing shows it.
  function forgetImages() {
    state.blobs.clear();
  }

  // A blob in an <img>, by an object URL of its own, freed once that image is decoded, or failed, or
  // replaced by another (decode() settles for this source only, whatever events are still queued).
  // Resolves once decoded; rejects if it did not decode or was replaced first.
  function showImage(img, data) {
    const url = URL.createObjectURL(data);
    img.src = url;
    return img.decode().finally(() => URL.revokeObjectURL(url));
  }

  // A tile source whose tiles the page fetches itself and hands to the viewer decoded (an ImageBitmap):
  // the bearer token of the moment (a 401 signs out), and no object URL left behind (OpenSeadragon's own
  // Ajax path makes one per tile and never frees it: a day of review would keep every tile seen).
  function pageLoaded(source, fetchTile) {
    source.downloadTileStart = (job) => {
      const abort = new AbortController();
      job.userData.abort = abort;
      const settle = (bitmap, error) => {
        // not after the viewer gave up on it (its timeout already finished the job) or aborted it
        if (!abort.signal.aborted && job.data === null && job.errorMsg === null) job.finish(bitmap, null, error);
      };
      fetchTile(job.src, abort.signal)
        .then((data) => createImageBitmap(data))
        .then((bitmap) => settle(bitmap, null), (err) => settle(null, `tile ${job.src}: ${err.message}`));
    };
    source.downloadTileAbort = (job) => job.userData.abort && job.userData.abort.abort();
    return source;
  }

  // The next patch's pixels and mask, fetched while the reviewer works on this one: one patch ahead,
  // so the next one opens without a wait (kept across a slide change: the pooled queue's next patch is
  // often on another slide). Keyed by the item and the job that proposed it: a rescored slide's patch
  // (a new model's mask) is fetched anew.
  const ahead = { id: null, pixels: null };
  const aheadKey = (item) => `${item.id}@${item.job_id}`;
  const fetchPixels = (item) => Promise.all([blob(item.links.image), blob(item.links.mask)]);

  function patchPixels(item) {
    if (ahead.id !== aheadKey(item)) return fetchPixels(item);
    const pixels = ahead.pixels;
    ahead.id = ahead.pixels = null;
    return pixels.catch(() => fetchPixels(item)); // fetching ahead failed: once more, now
  }

  function fetchAhead(current) {
    const next = state.queue.find((i) => i.id !== current.id);
    if (!next || ahead.id === aheadKey(next)) return;
    ahead.id = aheadKey(next);
    ahead.pixels = fetchPixels(next);
    ahead.pixels.catch(() => {}); // reported, if at all, when the patch is opened
    imageBlob(`${next.links.self}/uncertainty.png`).catch(() => {});
  }

  function say(text, isError = false) {
    const el = $("status");
    el.textContent = text;
    el.classList.toggle("error", isError);
  }

  const slidePath = (name) => name.split("/").map(encodeURIComponent).join("/");

  // ---- sign-in --------------------------------------------------------------------------------------
  function askToken(message = "") {
    $("sign-in-error").textContent = message;
    if (!$("sign-in").open) $("sign-in").showModal();
    $("token").focus();
  }

  function signOut(message = "") {
    letGo();
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    state.me = null;
    $("who").textContent = "";
    $("sign-out").hidden = true;
    askToken(message);
  }

  $("sign-in-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    state.token = $("token").value.trim();
    try {
      state.me = await json("/me");
    } catch (err) {
      askToken(err.message);
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, state.token);
    $("token").value = "";
    $("sign-in").close();
    start();
  });
  $("sign-in").addEventListener("cancel", (event) => {
    if (!state.token) event.preventDefault(); // Esc: the page is of no use without signing in
  });
  $("sign-out").addEventListener("click", () => {
    if (!closeEditor()) return; // unsaved edits kept: not signed out
    for (const viewer of [state.viewer, state.contextViewer]) if (viewer) viewer.destroy(); // requests carry the token
    state.viewer = state.contextViewer = null;
    ahead.id = ahead.pixels = null; // the next patch's pixels: not kept past the person who may see them
    state.queue = [];
    $("queue").replaceChildren();
    forgetImages();
    signOut();
  });

  // ---- hospital sign-in: OpenID Connect authorization code with PKCE (a public client, no secret) ---
  const PKCE_KEY = "uga.pkce";
  let oidc = null; // config.json: {client_id, authorize_url, token_url, scope, token} or null
  const redirectUri = () => location.origin + location.pathname;
  const b64url = (buffer) =>
    btoa(String.fromCharCode(...new Uint8Array(buffer)))
      .replace(/\+/g, "-")
      .replace(/\//g, "_")
      .replace(/=+$/, "");

  async function hospitalSignIn() {
    const verifier = b64url(crypto.getRandomValues(new Uint8Array(32)));
    const challenge = b64url(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier)));
    const nonce = b64url(crypto.getRandomValues(new Uint8Array(16)));
    sessionStorage.setItem(PKCE_KEY, JSON.stringify({ verifier, state: nonce, hash: location.hash }));
    const query = new URLSearchParams({
      response_type: "code",
      client_id: oidc.client_id,
      redirect_uri: redirectUri(),
      scope: oidc.scope,
      state: nonce,
      code_challenge: challenge,
      code_challenge_method: "S256",
    });
    const target = new URL(oidc.authorize_url, location.href); // it may carry its own query (Azure B2C: ?p=)
    for (const [k, v] of query) target.searchParams.set(k, v);
    location.assign(target.href);
  }
  $("oidc-button").addEventListener("click", () => hospitalSignIn().catch((err) => askToken(err.message)));

  async function finishHospitalSignIn(params) {
    const saved = JSON.parse(sessionStorage.getItem(PKCE_KEY) || "null");
    sessionStorage.removeItem(PKCE_KEY);
    history.replaceState(null, "", redirectUri() + ((saved && saved.hash) || ""));
    if (!saved || saved.state !== params.get("state")) {
      // checked first: a crafted link's error text is never shown as the provider's
      throw new Error("This sign-in answer is not for this tab's request: sign in again.");
    }
    if (params.get("error")) {
      throw new Error(`The identity provider refused: ${params.get("error_description") || params.get("error")}`);
    }
    const response = await fetch(oidc.token_url, {
      method: "POST",
      headers: { "Content-Type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams({
        grant_type: "authorization_code",
        code: params.get("code"),
        redirect_uri: redirectUri(),
        client_id: oidc.client_id,
        code_verifier: saved.verifier,
      }),
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok || !body[oidc.token]) {
      throw new Error(`The identity provider gave no ${oidc.token} (${body.error || response.status}): sign in again.`);
    }
    return body[oidc.token];
  }

  async function start() {
    $("who").textContent = `${state.me.name} · ${state.me.role}`;
    $("sign-out").hidden = false;
    document.body.dataset.role = state.me.role;
    $("model-panel").hidden = !state.me.can_administer;
    if (state.me.can_administer) refreshModelPanel();
    refreshOutcomes();
    const { slides } = await json("/slides");
    const select = $("slide-select");
    select.replaceChildren(...slides.map((s) => new Option(s.slide, s.slide)));
    if (!slides.length) {
      say("No segmented slides yet: submit a job first (POST /v1/jobs).");
      return;
    }
    if (state.item && state.viewer) {
      // signed in again (an expired token) with a patch open: keep it and its drawing (tiles are fetched
      // with the token of the moment)
      select.value = state.slide.slide;
      say(`Signed in again: patch #${state.item.rank} and your drawing are as you left them`);
      return;
    }
    const wanted = new URLSearchParams(location.hash.slice(1)).get("slide");
    select.value = slides.some((s) => s.slide === wanted) ? wanted : slides[0].slide;
    await openSlide(select.value);
  }

  // ---- slide viewer ---------------------------------------------------------------------------------
  const report = (err) => say(err.message, true); // what failed, on screen (never an unhandled rejection)
  $("slide-select").addEventListener("change", (e) => {
    const opened = openSlide(e.target.value);
    if (!opened) e.target.value = state.slide.slide; // stayed: edits kept
    else opened.catch(report);
  });

  // Returns false (and does nothing) when the reviewer keeps unsaved edits of the open patch.
  function openSlide(name, { force = false } = {}) {
    if (!closeEditor({ force })) return false;
    return loadSlide(name);
  }

  let loadingSlide = 0; // the newest loadSlide call; an older one that finishes later stops

  async function loadSlide(name) {
    const ticket = ++loadingSlide;
    forgetImages();
    say(`Opening ${name} …`);
    const info = await json(`/slides/${slidePath(name)}/info`);
    if (ticket !== loadingSlide) return;
    state.slide = info;
    state.layers = {};
    history.replaceState(null, "", `#slide=${encodeURIComponent(info.slide)}`);
    const tileSource = pageLoaded(
      new OpenSeadragon.DziTileSource({
        width: info.width,
        height: info.height,
        tileSize: info.tile_size,
        tileOverlap: info.overlap,
        tilesUrl: info.links.tiles,
        fileFormat: info.format,
      }),
      (path, signal) => blob(path, { signal }),
    );
    if (state.viewer) state.viewer.destroy();
    if (state.contextViewer) state.contextViewer.destroy();
    state.contextViewer = null;
    state.tileSource = tileSource;
    state.viewer = OpenSeadragon({
      element: $("viewer"),
      tileSources: tileSource,
      showNavigationControl: false,
      showNavigator: true,
      navigatorPosition: "TOP_RIGHT",
      gestureSettingsMouse: { clickToZoom: false },
      maxZoomPixelRatio: 4,
      visibilityRatio: 0.5,
    });
    state.viewer.addHandler("animation", drawScaleBar);
    state.viewer.addHandler("tile-load-failed", (event) => {
      const layer = event.tiledImage && event.tiledImage.uga_name;
      if (layer) say(`overlay ${layer}: ${event.message}`, true); // a slide tile that failed shows as a gap
    });
    state.viewer.addHandler("open", () => {
      drawScaleBar();
      $("viewer").dataset.ready = "true";
    });
    $("viewer").dataset.ready = "false";
    $("mpp-info").textContent = `${info.mpp.toFixed(3)} µm/px · ${info.width} × ${info.height} px`;
    state.overlays = null; // a slide without a finished job shows none of the previous slide's
    if (info.job) {
      const overlays = await json(`/jobs/${info.job}/overlays`);
      if (ticket !== loadingSlide) return;
      state.overlays = overlays;
      fillMeasures();
      await Promise.all([setLayer("outline"), setLayer("heat")]);
      if (ticket !== loadingSlide) return;
    }
    showNovelty();
    await loadQueue();
    if (ticket !== loadingSlide) return;
    say(`${info.slide}${info.model_version ? ` · segmented by ${info.model_version}` : " · not segmented yet"}`);
  }

  function drawScaleBar() {
    const viewer = state.viewer;
    const image = viewer && viewer.world.getItemAt(0);
    if (!image) return;
    const screenPerImage = image.viewportToImageZoom(viewer.viewport.getZoom(true)); // screen px / image px
    const umPerScreen = state.slide.mpp / screenPerImage;
    const target = 120 * umPerScreen; // about 120 screen px
    const magnitude = 10 ** Math.floor(Math.log10(target));
    const nice = [1, 2, 5, 10].map((m) => m * magnitude).filter((v) => v <= target).pop() || magnitude;
    $("scalebar-line").style.width = `${nice / umPerScreen}px`;
    $("scalebar-text").textContent = nice >= 1000 ? `${nice / 1000} mm` : `${nice} µm`;
  }

  // ---- overlays -------------------------------------------------------------------------------------
  function fillMeasures() {
    const select = $("heat-measure");
    const measures = state.overlays.overlays.filter((o) => o.legend);
    const chosen = select.value || state.overlays.ranking_measure || measures[0].name;
    select.replaceChildren(...measures.map((o) => new Option(labelOf(o.name), o.name)));
    select.value = measures.some((o) => o.name === chosen) ? chosen : measures[0].name;
  }

  const labelOf = (name) =>
    ({
      uga: "UGA score (ranking)",
      entropy: "Entropy: undecided",
      mutual_information: "Models disagree (BALD)",
      novelty: "Unlike training (out of distribution)",
    })[name] || name;

  // The slide's out-of-distribution verdict (a model with a novelty map), or why there is none.
  function showNovelty() {
    const note = $("ood-note");
    if (!state.overlays) {
      note.classList.remove("alert");
      note.textContent = "Not segmented yet: no maps.";
      return;
    }
    const verdict = state.overlays.novelty;
    note.classList.toggle("alert", Boolean(verdict && verdict.out_of_distribution));
    if (!verdict) {
      note.textContent = "No out-of-distribution map: this model does not compute one.";
      return;
    }
    const share = Math.round(verdict.share_beyond_threshold * 100);
    note.textContent = verdict.out_of_distribution
      ? `Out of distribution: ${share} % of the tissue is unlike the training data. Treat the model's answer with care.`
      : `${share} % of the tissue is unlike the training data (flagged above ${Math.round(verdict.flag_share * 100)} %).`;
  }

  async function setLayer(kind) {
    if (!state.overlays || !state.viewer) return;
    const checkbox = $(kind === "outline" ? "layer-outline" : "layer-heat");
    const slider = $(kind === "outline" ? "opacity-outline" : "opacity-heat");
    const name = kind === "outline" ? "outline" : $("heat-measure").value;
    const old = state.layers[kind];
    if (old && (!checkbox.checked || old.uga_name !== name)) {
      state.viewer.world.removeItem(old);
      delete state.layers[kind];
    }
    if (kind === "heat") showLegend(checkbox.checked ? name : null);
    if (!checkbox.checked) return markLayers();
    if (state.layers[kind]) {
      state.layers[kind].setOpacity(slider.value / 100);
      return;
    }
    const overlay = state.overlays.overlays.find((o) => o.name === name);
    const viewer = state.viewer;
    const width = state.overlays.extent_level0[0] / state.slide.width; // viewport units: the slide is 1 wide
    // still what the controls ask for once added (a slider dragged or a box unticked meanwhile)?
    const wanted = () =>
      state.viewer === viewer && checkbox.checked && !state.layers[kind] && (kind === "outline" || $("heat-measure").value === name);
    if (!wanted()) return;
    await new Promise((resolve) =>
      viewer.addTiledImage({
        // one tile, the whole overlay, from the page's image cache: fetched once for the viewer and its
        // navigator, and again only on another slide
        tileSource: pageLoaded(
          new OpenSeadragon.LegacyTileSource([{ url: overlay.url, width: state.overlays.size[0], height: state.overlays.size[1] }]),
          (path) => imageBlob(path),
        ),
        x: 0,
        y: 0,
        width,
        opacity: slider.value / 100,
        success: (event) => {
          if (!wanted()) {
            viewer.world.removeItem(event.item); // one layer per kind, and only the one asked for
          } else {
            event.item.uga_name = name;
            event.item.setOpacity(slider.value / 100);
            state.layers[kind] = event.item;
            markLayers();
          }
          resolve();
        },
        error: (event) => {
          say(`overlay ${name}: ${event.message}`, true);
          resolve();
        },
      }),
    );
  }

  // The overlays shown, for people reading the DOM (and the browser test): "entropy,outline".
  function markLayers() {
    $("viewer").dataset.layers = Object.values(state.layers)
      .map((item) => item.uga_name)
      .sort()
      .join(",");
  }

  function showLegend(name) {
    $("legend").hidden = !name;
    if (!name) return;
    const legend = state.overlays.overlays.find((o) => o.name === name).legend;
    const stops = legend.stops.map((s) => `rgba(${s.rgba[0]},${s.rgba[1]},${s.rgba[2]},${Math.max(s.rgba[3], 40) / 255}) ${s.at * 100}%`);
    $("legend-bar").style.background = `linear-gradient(to right, ${stops.join(", ")})`;
    $("legend-low").textContent = `${legend.low} (0)`;
    $("legend-high").textContent = `${legend.high} (≥ ${legend.max} ${legend.unit})`;
    $("legend-what").textContent = legend.what;
  }

  for (const id of ["layer-outline", "opacity-outline"]) $(id).addEventListener("input", () => setLayer("outline"));
  for (const id of ["layer-heat", "opacity-heat", "heat-measure"]) $(id).addEventListener("input", () => setLayer("heat"));
  $("layer-boxes").addEventListener("input", drawBoxes);

  // ---- queue ----------------------------------------------------------------------------------------
  $("queue-pooled").addEventListener("input", loadQueue);

  async function loadQueue() {
    const pooled = $("queue-pooled").checked;
    const query = pooled ? "k=100" : `slide=${encodeURIComponent(state.slide.slide)}&k=100`;
    let loaded = true;
    try {
      state.queue = state.slide.job || pooled ? (await json(`/queue?${query}`)).items : [];
    } catch (err) {
      state.queue = [];
      loaded = false;
      say(`The queue could not be loaded: ${err.message}`, true);
    }
    $("queue-count").textContent = `${state.queue.length} pending`;
    $("queue").replaceChildren(
      ...state.queue.map((item) => {
        const li = document.createElement("li");
        li.tabIndex = 0;
        li.dataset.item = item.id;
        const where = pooled ? ` · ${item.slide}` : "";
        li.innerHTML = '<span class="rank"></span><span class="score"></span><span class="muted facts"></span>';
        li.querySelector(".rank").textContent = item.rank;
        li.querySelector(".score").textContent = `score ${item.score.toFixed(3)} (${item.measure})`;
        li.querySelector(".facts").textContent =
          `tumour p ${item.mean_probability.toFixed(2)} · tissue ${(item.tissue_fraction * 100).toFixed(0)} %${where}`;
        li.addEventListener("click", () => openItem(item).catch(report));
        li.addEventListener("keydown", (e) => e.key === "Enter" && openItem(item).catch(report));
        return li;
      }),
    );
    drawBoxes();
    return loaded;
  }

  function drawBoxes() {
    const viewer = state.viewer;
    if (!viewer) return;
    viewer.clearOverlays();
    if (!$("layer-boxes").checked) return;
    const width = state.slide.width;
    for (const item of state.queue.filter((i) => i.slide === state.slide.slide)) {
      const b = item.bbox_level0;
      const el = document.createElement("div");
      el.className = "queue-box";
      el.dataset.item = item.id;
      const label = document.createElement("span");
      label.textContent = item.rank;
      el.append(label);
      el.addEventListener("click", () => openItem(item).catch(report));
      const rect = new OpenSeadragon.Rect(b.x / width, b.y / width, b.width / width, b.height / width);
      viewer.addOverlay({ element: el, location: rect });
    }
  }

  // ---- patch editor ---------------------------------------------------------------------------------
  const ed = {
    w: 0,
    h: 0,
    scale: 1, // screen px per patch px: the fitted scale times the zoom
    fit: 0, // screen px per patch px when the patch fits the frame
    zoom: 0, // index into ZOOMS
    mask: null, // Uint8Array (0/1), row-major, the patch's size
    model: null, // the model's mask (0/1)
    modelEdge: null,
    modelPng: null, // the model's mask as the server sent it (what "model is correct" submits)
    undo: [],
    redo: [],
    tool: "brush",
    polygon: [], // [x, y] in patch pixels
    drawing: false,
    last: null,
    busy: false,
  };
  const MAX_UNDO = 50;
  const SEND_TIMEOUT_MS = 30000; // a decision not answered by then is reported, the drawing kept

  // Unsaved edits: the mask differs from the model's (what "Model is correct" would send).
  function dirty() {
    if (!state.item || !ed.mask || !ed.model) return false;
    for (let i = 0; i < ed.mask.length; i++) if (ed.mask[i] !== ed.model[i]) return true;
    return ed.polygon.length > 0;
  }

  // Before leaving a patch with unsaved edits: true to go on (the edits are dropped), false to stay.
  function mayLeave() {
    if (!dirty()) return true;
    if (!window.confirm(`Patch #${state.item.rank} has edits that are not submitted. Discard them?`)) return false;
    dropDraft(state.item.id);
    return true;
  }

  // Unsent drawings survive a reload, a lost network or an expired sign-in: kept per patch in this
  // tab's sessionStorage (packed bits) until the patch is decided or its edits are discarded.
  const draftKey = (itemId) => `uga-review-draft:${state.me ? state.me.name : ""}:${itemId}`;
  function saveDraft() {
    if (!state.item || !ed.mask) return;
    try {
      if (!dirty()) return sessionStorage.removeItem(draftKey(state.item.id));
      const packed = new Uint8Array(Math.ceil(ed.mask.length / 8));
      for (let i = 0; i < ed.mask.length; i++) if (ed.mask[i]) packed[i >> 3] |= 1 << (i & 7);
      let bits = "";
      for (let i = 0; i < packed.length; i += 8192) bits += String.fromCharCode(...packed.subarray(i, i + 8192));
      sessionStorage.setItem(draftKey(state.item.id), JSON.stringify({ w: ed.w, h: ed.h, bits: btoa(bits) }));
    } catch (_) {
      /* storage full or off: the drawing stays in memory only */
    }
  }
  function loadDraft(itemId) {
    try {
      const draft = JSON.parse(sessionStorage.getItem(draftKey(itemId)) || "null");
      if (!draft || draft.w !== ed.w || draft.h !== ed.h) return null;
      const bits = atob(draft.bits);
      const mask = new Uint8Array(ed.w * ed.h);
      for (let i = 0; i < mask.length; i++) mask[i] = (bits.charCodeAt(i >> 3) >> (i & 7)) & 1;
      return mask;
    } catch (_) {
      return null;
    }
  }
  const dropDraft = (itemId) => sessionStorage.removeItem(draftKey(itemId));
  window.addEventListener("beforeunload", (event) => {
    if (dirty()) event.preventDefault();
  });

  let opening = 0; // the newest openItem call; an older one that finishes later is dropped

  // ---- claims: the patch this reviewer has open is theirs (the server leaves it out of others' queues) --
  // One patch at a time (the server lets go of the previous one); renewed only while the reviewer is
  // at work on it, so a tab left open lets the patch go after UGA_REVIEW_CLAIM_S.
  const claim = { id: null, wanted: null, timer: null, active: 0 };
  const releaseClaim = (id) =>
    api(`/queue/items/${id}/claim`, { method: "DELETE", keepalive: true }).catch(() => {});
  for (const type of ["pointerdown", "keydown"]) document.addEventListener(type, () => (claim.active = Date.now()));

  async function holdPatch(item, ticket) {
    if (!state.me.can_correct) return true;
    claim.wanted = item.id;
    try {
      const held = await json(`/queue/items/${item.id}/claim`, { method: "POST" });
      if (ticket !== opening) {
        if (item.id !== claim.id && item.id !== claim.wanted) releaseClaim(item.id); // another patch won
        return false;
      }
      claim.id = item.id;
      claim.active = Date.now();
      clearInterval(claim.timer);
      claim.timer = setInterval(() => renewHold(item, held.hold_s), (held.hold_s * 1000) / 3);
      return true;
    } catch (err) {
      if (ticket !== opening) return false;
      if (err instanceof ApiError && err.status === 409) {
        say(`Patch #${item.rank}: ${err.message}`, true);
        loadQueue();
        return false;
      }
      letGo(); // no hold (the network): review anyway, holding nothing else meanwhile
      return true;
    }
  }

  async function renewHold(item, holdS) {
    if (claim.id !== item.id) return;
    if (Date.now() - claim.active > holdS * 1000) return; // away: let the hold lapse
    try {
      await json(`/queue/items/${item.id}/claim`, { method: "POST" });
    } catch (err) {
      if (!(err instanceof ApiError) || claim.id !== item.id) return; // the network: try again next time
      clearInterval(claim.timer);
      claim.id = null;
      say(`Patch #${item.rank} is no longer yours: ${err.message}`, true);
    }
  }

  function letGo() {
    clearInterval(claim.timer);
    if (claim.id && state.token) releaseClaim(claim.id);
    claim.id = claim.wanted = null;
  }
  window.addEventListener("pagehide", letGo);

  async function openItem(item, { force = false } = {}) {
    if (!force && state.item && state.item.id === item.id) return; // already open: keep its edits
    if (!force && state.item && !mayLeave()) return;
    const ticket = ++opening;
    const opened = performance.now();
    if (!(await holdPatch(item, ticket))) return; // another reviewer has it open: the open patch stays
    state.item = null; // nothing can be decided on a patch until its pixels and mask are in
    $("editor").dataset.ready = "false";
    if (item.slide !== state.slide.slide) {
      $("slide-select").value = item.slide;
      await loadSlide(item.slide); // not openSlide: that closes the editor, and this open with it
      if (ticket !== opening) return;
    }
    for (const li of $("queue").children) li.classList.toggle("open", li.dataset.item === item.id);
    $("editor").hidden = false;
    $("editor").dataset.ready = "false";
    $("editor-title").textContent = `Patch #${item.rank}`;
    const facts = {
      score: `${item.score.toFixed(3)} (${item.measure}, ${item.scoring})`,
      "tumour p": item.mean_probability.toFixed(3),
      tissue: `${(item.tissue_fraction * 100).toFixed(0)} %`,
      size: `${item.bbox_um.width.toFixed(0)} × ${item.bbox_um.height.toFixed(0)} µm`,
      model: item.model_version,
    };
    $("item-facts").replaceChildren(
      ...Object.entries(facts).flatMap(([k, v]) => {
        const dt = document.createElement("dt");
        const dd = document.createElement("dd");
        dt.textContent = k;
        dd.textContent = v;
        return [dt, dd];
      }),
    );
    const canCorrect = state.me.can_correct;
    $("tools").hidden = $("decide").hidden = !canCorrect;
    $("read-only").hidden = canCorrect;
    let pngBlob, image, maskBlob, heatBlob, modelImage;
    try {
      [[pngBlob, maskBlob], heatBlob] = await Promise.all([patchPixels(item), imageBlob(`${item.links.self}/uncertainty.png`)]);
      [image, modelImage] = await Promise.all([loadImage(pngBlob), loadImage(maskBlob)]);
    } catch (err) {
      if (ticket === opening) {
        letGo(); // nothing can be done on it: it is not held either
        say(`Patch #${item.rank} could not be opened: ${err.message}`, true);
      }
      return;
    }
    if (ticket !== opening) return; // another patch was opened meanwhile: its pixels win
    if (modelImage.width !== image.width || modelImage.height !== image.height) {
      letGo();
      say(`Patch #${item.rank}: the model's mask is not the patch's size; reload the page`, true);
      return;
    }
    ed.modelPng = maskBlob;
    ed.w = image.width;
    ed.h = image.height;
    ed.model = grey(modelImage);
    ed.modelEdge = edge(ed.model, ed.w, ed.h);
    ed.mask = ed.model.slice();
    ed.undo = [];
    ed.redo = [];
    ed.polygon = [];
    const draft = loadDraft(item.id);
    if (draft) {
      ed.undo.push(ed.mask); // undo goes back to the model's mask
      ed.mask = draft;
    }
    layoutCanvases(image);
    showContext(item);
    // a broken or replaced inset shows as such: nothing to report
    showImage($("inset-image"), pngBlob).catch(() => {});
    showImage($("inset-heat"), heatBlob).catch(() => {});
    const legend = state.overlays && state.overlays.overlays.find((o) => o.name === item.measure);
    $("inset-words").textContent = legend ? legend.legend.high : "uncertain";
    render();
    state.item = item;
    $("editor").dataset.ready = "true";
    $("editor").dataset.item = item.id;
    $("editor").dataset.openMs = String(Math.round(performance.now() - opened)); // to drawable (bench_review)
    $("mask-canvas").focus();
    fetchAhead(item);
    if (draft) say(`Patch #${item.rank}: your drawing that was not sent is back; submit it or undo it`);
  }

  // The open patch in its surroundings, CONTEXT times its side, from the slide's own tiles: a small
  // patch is judged by the tissue around it. The reviewer may pan and zoom it further.
  const CONTEXT = 4;

  function showContext(item) {
    const el = $("context-view");
    el.dataset.ready = "false";
    if (!state.contextViewer) {
      state.contextViewer = OpenSeadragon({
        element: el,
        tileSources: state.tileSource,
        showNavigationControl: false,
        gestureSettingsMouse: { clickToZoom: false },
        maxZoomPixelRatio: 4,
        visibilityRatio: 0.2,
      });
    }
    const viewer = state.contextViewer;
    const place = () => {
      if (state.contextViewer !== viewer) return; // the slide changed before its tiles opened
      const width = state.slide.width; // viewport units: the slide is 1 wide
      const b = item.bbox_level0;
      const box = new OpenSeadragon.Rect(b.x / width, b.y / width, b.width / width, b.height / width);
      const margin = (CONTEXT - 1) / 2;
      const around = new OpenSeadragon.Rect(
        box.x - box.width * margin,
        box.y - box.height * margin,
        box.width * CONTEXT,
        box.height * CONTEXT,
      );
      viewer.clearOverlays();
      const mark = document.createElement("div");
      mark.className = "context-box";
      viewer.addOverlay({ element: mark, location: box });
      viewer.viewport.fitBounds(around, true);
      el.dataset.item = item.id;
      el.dataset.ready = "true";
    };
    if (viewer.world.getItemCount()) place();
    else viewer.addOnceHandler("open", place);
  }

  function closeEditor({ force = false } = {}) {
    if (!force && !mayLeave()) return false;
    opening++; // a patch still loading is not opened after all
    letGo();
    $("editor").hidden = true;
    state.item = null;
    for (const li of $("queue").children) li.classList.remove("open");
    return true;
  }

  // A blob decoded into an image for the canvases.
  function loadImage(data) {
    const img = new Image();
    return showImage(img, data).then(
      () => img,
      () => Promise.reject(new Error("image did not decode")),
    );
  }

  function grey(img) {
    const c = document.createElement("canvas");
    c.width = img.width;
    c.height = img.height;
    const ctx = c.getContext("2d");
    ctx.drawImage(img, 0, 0);
    const rgba = ctx.getImageData(0, 0, c.width, c.height).data;
    const out = new Uint8Array(c.width * c.height);
    for (let i = 0; i < out.length; i++) out[i] = rgba[i * 4] > 127 ? 1 : 0;
    return out;
  }

  function edge(mask, w, h) {
    const out = new Uint8Array(w * h);
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        const i = y * w + x;
        if (!mask[i]) continue;
        const inner = x > 0 && x < w - 1 && y > 0 && y < h - 1 && mask[i - 1] && mask[i + 1] && mask[i - w] && mask[i + w];
        out[i] = inner ? 0 : 1;
      }
    }
    return out;
  }

  function layoutCanvases(image) {
    const wrap = $("editor").getBoundingClientRect();
    const room = Math.max(200, Math.min(wrap.width - 340, wrap.height - 40));
    const fit = room / Math.max(ed.w, ed.h);
    ed.fit = fit >= 1 ? Math.floor(fit) : fit; // whole pixels when enlarging: a crisp, exact grid
    for (const id of ["patch-canvas", "mask-canvas"]) {
      const c = $(id);
      c.width = ed.w;
      c.height = ed.h;
    }
    $("patch-canvas").getContext("2d").drawImage(image, 0, 0);
    applyZoom();
    const frame = $("editor-canvas-wrap"); // a new patch opens at its centre, at the zoom kept
    frame.scrollLeft = (frame.scrollWidth - frame.clientWidth) / 2;
    frame.scrollTop = (frame.scrollHeight - frame.clientHeight) / 2;
  }

  // Zoom: the fitted size times ZOOMS[ed.zoom] (kept from patch to patch); the patch scrolls in its frame.
  const ZOOMS = [1, 2, 4, 8];

  function applyZoom(centre = null) {
    const frame = $("editor-canvas-wrap");
    const before = ed.scale;
    ed.scale = ed.fit * ZOOMS[ed.zoom];
    for (const id of ["patch-canvas", "mask-canvas"]) {
      $(id).style.width = `${ed.w * ed.scale}px`;
      $(id).style.height = `${ed.h * ed.scale}px`;
    }
    if (centre) {
      // the patch point at the frame's centre stays there
      const k = ed.scale / before;
      frame.scrollLeft = centre[0] * k - frame.clientWidth / 2;
      frame.scrollTop = centre[1] * k - frame.clientHeight / 2;
    }
    $("zoom-level").textContent = `${ZOOMS[ed.zoom]}×`;
    $("zoom-in").disabled = ed.zoom === ZOOMS.length - 1;
    $("zoom-out").disabled = ed.zoom === 0;
    $("editor").dataset.zoom = String(ZOOMS[ed.zoom]);
  }

  function zoom(step) {
    const next = step === 0 ? 0 : Math.min(ZOOMS.length - 1, Math.max(0, ed.zoom + step));
    if (next === ed.zoom || !ed.fit) return;
    const frame = $("editor-canvas-wrap");
    const centre = [frame.scrollLeft + frame.clientWidth / 2, frame.scrollTop + frame.clientHeight / 2];
    ed.zoom = next;
    applyZoom(centre);
  }
  $("zoom-in").addEventListener("click", () => zoom(1));
  $("zoom-out").addEventListener("click", () => zoom(-1));
  $("zoom-fit").addEventListener("click", () => zoom(0));

  function render() {
    if (!ed.mask) return;
    const ctx = $("mask-canvas").getContext("2d");
    const img = ctx.createImageData(ed.w, ed.h);
    const px = img.data;
    const showModel = $("show-model").checked;
    for (let i = 0; i < ed.mask.length; i++) {
      const o = i * 4;
      if (showModel && ed.modelEdge[i]) {
        px[o] = 0;
        px[o + 1] = 200;
        px[o + 2] = 70;
        px[o + 3] = 255;
      } else if (ed.mask[i]) {
        px[o] = 30;
        px[o + 1] = 110;
        px[o + 2] = 255;
        px[o + 3] = 95;
      }
    }
    ctx.putImageData(img, 0, 0);
    if (ed.polygon.length) {
      ctx.strokeStyle = "#ffeb3b";
      ctx.lineWidth = 1; // one patch pixel: as visible at 8× as at the fitted size
      ctx.beginPath();
      ed.polygon.forEach(([x, y], k) => (k ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
      ctx.stroke();
    }
    $("undo").disabled = !ed.undo.length;
    $("redo").disabled = !ed.redo.length;
  }
  $("show-model").addEventListener("input", render);

  function snapshot() {
    ed.undo.push(ed.mask.slice());
    if (ed.undo.length > MAX_UNDO) ed.undo.shift();
    ed.redo = [];
  }

  function undo() {
    if (!ed.undo.length) return;
    ed.redo.push(ed.mask);
    ed.mask = ed.undo.pop();
    render();
    saveDraft();
  }

  function redo() {
    if (!ed.redo.length) return;
    ed.undo.push(ed.mask);
    ed.mask = ed.redo.pop();
    render();
    saveDraft();
  }

  function stamp(cx, cy, value) {
    const r = Number($("brush-size").value) / 2;
    const x0 = Math.max(0, Math.floor(cx - r));
    const x1 = Math.min(ed.w - 1, Math.ceil(cx + r));
    const y0 = Math.max(0, Math.floor(cy - r));
    const y1 = Math.min(ed.h - 1, Math.ceil(cy + r));
    for (let y = y0; y <= y1; y++) {
      for (let x = x0; x <= x1; x++) {
        const dx = x + 0.5 - cx;
        const dy = y + 0.5 - cy;
        if (dx * dx + dy * dy <= r * r) ed.mask[y * ed.w + x] = value;
      }
    }
  }

  function strokeTo(x, y) {
    const value = ed.tool === "brush" ? 1 : 0;
    const [lx, ly] = ed.last || [x, y];
    const steps = Math.max(1, Math.ceil(Math.hypot(x - lx, y - ly) / 1.5));
    for (let s = 1; s <= steps; s++) stamp(lx + ((x - lx) * s) / steps, ly + ((y - ly) * s) / steps, value);
    ed.last = [x, y];
    render();
  }

  // Fill a polygon (even-odd) at pixel centres: pixel (x, y) is in when (x + .5, y + .5) is.
  function fillPolygon(points) {
    for (let y = 0; y < ed.h; y++) {
      const yc = y + 0.5;
      const xs = [];
      for (let k = 0; k < points.length; k++) {
        const [ax, ay] = points[k];
        const [bx, by] = points[(k + 1) % points.length];
        if (ay <= yc !== by <= yc) xs.push(ax + ((yc - ay) * (bx - ax)) / (by - ay));
      }
      xs.sort((a, b) => a - b);
      for (let k = 0; k + 1 < xs.length; k += 2) {
        const from = Math.max(0, Math.ceil(xs[k] - 0.5));
        const to = Math.min(ed.w - 1, Math.floor(xs[k + 1] - 0.5));
        for (let x = from; x <= to; x++) ed.mask[y * ed.w + x] = 1;
      }
    }
  }

  function closePolygon() {
    if (ed.polygon.length >= 3) {
      snapshot();
      fillPolygon(ed.polygon);
    }
    ed.polygon = [];
    render();
    saveDraft();
  }

  function patchPoint(event) {
    const rect = $("mask-canvas").getBoundingClientRect();
    return [((event.clientX - rect.left) * ed.w) / rect.width, ((event.clientY - rect.top) * ed.h) / rect.height];
  }

  const canvas = $("mask-canvas");
  canvas.addEventListener("pointerdown", (event) => {
    if (!state.item || !state.me || !state.me.can_correct || event.button !== 0) return; // loading: no strokes
    const [x, y] = patchPoint(event);
    if (ed.tool === "polygon") {
      if (event.detail >= 2) return; // the double-click's second press: closed by dblclick
      ed.polygon.push([x, y]);
      render();
      return;
    }
    canvas.setPointerCapture(event.pointerId);
    snapshot();
    ed.drawing = true;
    ed.last = null;
    strokeTo(x, y);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (ed.drawing) strokeTo(...patchPoint(event));
  });
  for (const kind of ["pointerup", "pointercancel"]) {
    canvas.addEventListener(kind, () => {
      if (ed.drawing) saveDraft();
      ed.drawing = false;
      ed.last = null;
    });
  }
  canvas.addEventListener("dblclick", () => ed.tool === "polygon" && closePolygon());

  function setTool(tool) {
    if (ed.polygon.length && tool !== "polygon") ed.polygon = [];
    ed.tool = tool;
    for (const b of document.querySelectorAll("#tools [data-tool]")) {
      b.classList.toggle("active", b.dataset.tool === tool);
      b.setAttribute("aria-pressed", String(b.dataset.tool === tool));
    }
    render();
  }
  for (const b of document.querySelectorAll("#tools [data-tool]")) b.addEventListener("click", () => setTool(b.dataset.tool));
  $("undo").addEventListener("click", undo);
  $("redo").addEventListener("click", redo);
  $("clear").addEventListener("click", () => {
    snapshot();
    ed.mask.fill(0);
    render();
    saveDraft();
  });

  function maskPng() {
    const c = document.createElement("canvas");
    c.width = ed.w;
    c.height = ed.h;
    const ctx = c.getContext("2d");
    const img = ctx.createImageData(ed.w, ed.h);
    for (let i = 0; i < ed.mask.length; i++) {
      const v = ed.mask[i] ? 255 : 0;
      img.data.set([v, v, v, 255], i * 4);
    }
    ctx.putImageData(img, 0, 0);
    return new Promise((resolve) => c.toBlob(resolve, "image/png"));
  }

  async function decide(action) {
    if (ed.busy || !state.item || !state.me.can_correct || $("editor").dataset.ready !== "true") return;
    if (action === "submit" && ed.polygon.length) {
      if (ed.polygon.length < 3) {
        say("The polygon has fewer than 3 corners: add corners or press Esc to drop it, then submit", true);
        return;
      }
      closePolygon(); // the corners clicked are part of the mask sent
    }
    if (action !== "submit" && dirty()) {
      const what = action === "skip" ? "Skip this patch" : "Send the model's mask";
      if (!window.confirm(`${what} and discard your edits to patch #${state.item.rank}?`)) return;
    }
    const empty = action !== "skip" && !(action === "accept" ? ed.model : ed.mask).some((v) => v);
    if (empty && !window.confirm(`Store patch #${state.item.rank} as containing no tumour at all? It trains the model.`)) {
      return;
    }
    ed.busy = true;
    const item = state.item;
    const sending = new AbortController();
    const timer = setTimeout(() => sending.abort(), SEND_TIMEOUT_MS);
    for (const id of ["accept", "skip", "submit"]) $(id).disabled = true;
    say(`Sending patch #${item.rank} …`);
    try {
      if (action === "skip") {
        await api(`/queue/items/${item.id}/skip`, { method: "POST", signal: sending.signal });
        say(`Patch #${item.rank} skipped`);
      } else {
        const body = action === "accept" ? ed.modelPng : await maskPng();
        const response = await api(`/queue/items/${item.id}/correction`, {
          method: "POST",
          headers: { "Content-Type": "image/png" },
          body,
          signal: sending.signal,
        });
        const record = await response.json();
        const what = action === "accept" ? "model's mask confirmed" : "correction stored";
        say(`Patch #${item.rank}: ${what}${record.duplicate ? " (already stored)" : ""} · ${record.id.slice(0, 8)}`);
        $("editor").dataset.lastCorrection = record.id;
        remember(record.id);
      }
      dropDraft(item.id);
      ed.model = ed.mask.slice(); // stored: leaving it now discards nothing
      await nextItem(item);
    } catch (err) {
      const why =
        err.name === "AbortError"
          ? `no answer within ${SEND_TIMEOUT_MS / 1000} s`
          : err instanceof TypeError
            ? "the service could not be reached (network)"
            : err.message;
      const kept = state.item === item ? "; your drawing is kept: try again (Enter)" : "";
      say(`Patch #${item.rank} not decided: ${why}${kept}`, true);
    } finally {
      clearTimeout(timer);
      for (const id of ["accept", "skip", "submit"]) $(id).disabled = false;
      ed.busy = false;
    }
  }
  $("accept").addEventListener("click", () => decide("accept"));
  $("skip").addEventListener("click", () => decide("skip"));
  $("submit").addEventListener("click", () => decide("submit"));
  $("close-editor").addEventListener("click", closeEditor);

  async function nextItem(done) {
    if (!(await loadQueue())) return; // the error stays on screen, and so does the editor
    const next = state.queue.find((i) => i.id !== done.id);
    if (next) await openItem(next, { force: true });
    else {
      closeEditor({ force: true });
      say("Queue done: no pending patches left.");
    }
  }

  document.addEventListener("keydown", (event) => {
    // keys typed in a form field, the queue or the context view (OpenSeadragon zooms on + and -) are theirs
    if ($("editor").hidden || event.target.closest("input, select, textarea, dialog, #queue, #context-view")) return;
    if ((event.key === "Enter" || event.key === " ") && event.target.closest("button")) return; // the button's own
    const key = event.key.toLowerCase();
    if (event.repeat && ["enter", "a", "s", "escape"].includes(key)) return; // a held key never acts twice
    const ctrl = event.ctrlKey || event.metaKey;
    const correcting = state.me && state.me.can_correct;
    if (ctrl && key === "z") event.shiftKey ? redo() : undo();
    else if (ctrl && key === "y") redo();
    else if (ctrl) return;
    else if (key === "escape") ed.polygon.length ? ((ed.polygon = []), render()) : closeEditor();
    else if (key === "+" || key === "=") zoom(1);
    else if (key === "-") zoom(-1);
    else if (key === "0") zoom(0);
    else if (!correcting) return;
    else if (key === "enter") ed.polygon.length ? closePolygon() : decide("submit");
    else if (key === "b") setTool("brush");
    else if (key === "e") setTool("eraser");
    else if (key === "p") setTool("polygon");
    else if (key === "a") decide("accept");
    else if (key === "s") decide("skip");
    else if (key === "c") $("clear").click();
    else if (key === "[" || key === "]") $("brush-size").stepUp(key === "]" ? 2 : -2);
    else return;
    event.preventDefault();
  });

  // ---- the loop closing: this reviewer's corrections, then and now ----------------------------------
  const mineKey = () => `uga-review-corrections:${state.me.name}`;
  const mine = () => JSON.parse(localStorage.getItem(mineKey()) || "[]");

  function remember(cid) {
    localStorage.setItem(mineKey(), JSON.stringify([cid, ...mine().filter((c) => c !== cid)].slice(0, 10)));
    refreshOutcomes();
  }

  function thumb(url, caption) {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.alt = caption;
    figure.append(img, Object.assign(document.createElement("figcaption"), { textContent: caption }));
    if (url) imageBlob(url).then((data) => showImage(img, data)).catch(() => (img.alt = `${caption}: unavailable`));
    return figure;
  }

  let outcomesTimer = null;
  async function refreshOutcomes() {
    clearTimeout(outcomesTimer);
    const ids = mine();
    $("loop-panel").hidden = !ids.length;
    const settled = await Promise.all(ids.map((cid) => json(`/corrections/${cid}/outcome`).catch(() => null)));
    const dice = (side) => (side && side.dice !== null ? side.dice.toFixed(2) : "–");
    $("outcomes").replaceChildren(
      ...settled.filter(Boolean).map((o) => {
        const li = document.createElement("li");
        li.dataset.correction = o.correction;
        const trio = document.createElement("div");
        trio.className = "trio";
        const before = o.before ? `${o.links.before}?v=${o.before.model_version}` : null;
        const after = o.after ? `${o.links.after}?v=${o.after.model_version}` : null;
        trio.append(thumb(before, "model then"), thumb(o.links.mask, "yours"), thumb(after, o.after ? "model now" : "not yet"));
        const words = o.withdrawn
          ? `withdrawn by ${o.withdrawn.by}: ${o.withdrawn.reason}`
          : o.after
            ? `Dice ${dice(o.before)} → ${dice(o.after)} (${o.after.model_version})`
            : `Dice ${dice(o.before)}; waiting for a promoted model to re-segment ${o.slide}`;
        li.append(trio, Object.assign(document.createElement("p"), { className: "muted", textContent: words }));
        if (!o.withdrawn && state.me.can_correct) {
          const button = document.createElement("button");
          Object.assign(button, { className: "withdraw", textContent: "Withdraw" });
          button.title = "Drawn in error: never train on it (kept for the record); its patch returns to the queue";
          button.addEventListener("click", () => withdraw(o.correction));
          li.append(button);
        }
        return li;
      }),
    );
    if (settled.some((o) => o && !o.after && !o.withdrawn)) outcomesTimer = setTimeout(refreshOutcomes, 15000);
  }

  async function withdraw(cid) {
    const reason = (prompt("Why withdraw this correction? (kept in its record)") || "").trim();
    if (!reason) return;
    try {
      const body = JSON.stringify({ reason: reason.slice(0, 500) });
      const headers = { "Content-Type": "application/json" };
      const done = await json(`/corrections/${cid}/withdraw`, { method: "POST", headers, body });
      const learned = done.current_model_learned_it
        ? "; the model serving now already learned from it: ask an admin to roll back if that matters"
        : "";
      say(`Correction ${cid.slice(0, 8)} withdrawn: it will not be trained on, and its patch is back in the queue${learned}`);
    } catch (err) {
      say(`Correction ${cid.slice(0, 8)} not withdrawn: ${err.message}`, true);
    }
    refreshOutcomes();
    if (state.slide) loadQueue();
  }

  // ---- model panel (admins) -------------------------------------------------------------------------
  async function refreshModelPanel() {
    if (!state.me || !state.me.can_administer) return;
    try {
      const [current, { runs }] = await Promise.all([json("/models/current"), json("/finetune/runs")]);
      $("model-serving").textContent = `${current.version} (${current.status})`;
      $("runs").replaceChildren(
        ...(runs.length ? runs.slice(0, 10) : [null]).map((run) => {
          const li = document.createElement("li");
          if (!run) li.textContent = "none yet";
          else {
            const p = run.progress.total ? ` ${Math.round(run.progress.fraction * 100)} %` : "";
            li.textContent = `${run.state}${p}${run.candidate ? ` → ${run.candidate}` : ""}${run.reason ? `: ${run.reason}` : ""}`;
          }
          return li;
        }),
      );
    } catch (err) {
      $("model-serving").textContent = err.message;
    }
    setTimeout(refreshModelPanel, 10000);
  }

  // ---- boot -----------------------------------------------------------------------------------------
  async function boot() {
    setTool("brush");
    oidc = await fetch("config.json")
      .then((r) => r.json())
      .then((c) => c.oidc)
      .catch(() => null);
    $("hospital-sign-in").hidden = !oidc;
    const params = new URLSearchParams(location.search);
    if (oidc && (params.has("code") || params.has("error"))) {
      try {
        state.token = await finishHospitalSignIn(params);
        sessionStorage.setItem(TOKEN_KEY, state.token);
      } catch (err) {
        askToken(err.message);
        return;
      }
    }
    if (!state.token) return askToken();
    try {
      state.me = await json("/me");
    } catch (err) {
      return askToken(err.message);
    }
    return start();
  }
  boot();
})();
