// The live chart: closed one-minute windows as candles, the open window as a lighter candle,
// anomalies as markers, fed by the worker's server-sent events (/chart/events).
// What the page shows is also published as window.__chartState and data-* attributes of
// <body>, which the browser test reads.
(() => {
  "use strict";
  const LWC = window.LightweightCharts;
  const $ = (id) => document.getElementById(id);
  const KEEP_CLOSED = 300; // a little more than the worker's 240, for a long-open page
  const STALE_FORMING_MS = 120000; // an open window that vanished: wait this long for its close

  const state = {
    symbol: null,
    closed: new Map(), // time -> candle
    forming: new Map(), // time -> candle (+ seen: ms)
    markers: new Map(), // "start_ms:kind" -> marker
    connected: false,
    loading: false,
    forminginfo: null,
    updates: 0,
  };
  let source = null;
  let follow = true; // fit the time scale to the data until the user moves it

  const chart = LWC.createChart($("chart"), {
    autoSize: true,
    layout: { attributionLogo: true, textColor: "#1f2430", background: { type: "solid", color: "#ffffff" } },
    grid: { vertLines: { color: "#f0f3fa" }, horzLines: { color: "#f0f3fa" } },
    timeScale: { timeVisible: true, secondsVisible: false, rightOffset: 3 },
    rightPriceScale: { scaleMargins: { top: 0.08, bottom: 0.25 } },
  });
  const candles = chart.addSeries(LWC.CandlestickSeries, {
    upColor: "#26a69a", downColor: "#ef5350", wickUpColor: "#26a69a", wickDownColor: "#ef5350",
    borderVisible: false,
  });
  const volume = chart.addSeries(LWC.HistogramSeries, {
    priceScaleId: "volume", priceFormat: { type: "volume" }, lastValueVisible: false, priceLineVisible: false,
  });
  chart.priceScale("volume").applyOptions({ scaleMargins: { top: 0.8, bottom: 0 } });
  const markers = LWC.createSeriesMarkers(candles, []);
  for (const name of ["wheel", "mousedown", "touchstart"]) {
    $("chart").addEventListener(name, () => { follow = false; }, { passive: true });
  }
  $("chart").addEventListener("dblclick", () => { follow = true; render(); });

  function precisionFor(price) {
    const abs = Math.abs(price);
    const digits = abs >= 50 ? 2 : abs >= 1 ? 4 : abs >= 0.01 ? 6 : 8;
    return { type: "price", precision: digits, minMove: Math.pow(10, -digits) };
  }

  function toMarker(m) {
    const z = `z=${Number(m.z).toFixed(1)}`;
    if (m.kind === "return") {
      const up = m.value >= 0;
      return { time: m.time, position: up ? "belowBar" : "aboveBar", shape: up ? "arrowUp" : "arrowDown",
               color: up ? "#2962ff" : "#e91e63", text: `R ${z}` };
    }
    return { time: m.time, position: "aboveBar", shape: "circle", color: "#ff9800", text: `V ${z}` };
  }

  function bars() {
    const all = new Map();
    for (const [t, c] of state.closed) all.set(t, c);
    for (const [t, c] of state.forming) if (!all.has(t)) all.set(t, { ...c, forming: true });
    return [...all.values()].sort((a, b) => a.time - b.time);
  }

  function render() {
    const list = bars();
    candles.setData(list.map((c) => {
      const bar = { time: c.time, open: c.open, high: c.high, low: c.low, close: c.close };
      if (c.forming) {
        const color = c.close >= c.open ? "rgba(38,166,154,0.4)" : "rgba(239,83,80,0.4)";
        Object.assign(bar, { color, wickColor: color, borderColor: color });
      }
      return bar;
    }));
    volume.setData(list.map((c) => ({
      time: c.time, value: c.volume ?? 0,
      color: c.forming ? "rgba(120,123,134,0.25)" : c.close >= c.open ? "rgba(38,166,154,0.5)" : "rgba(239,83,80,0.5)",
    })));
    const times = new Set(list.map((c) => c.time));
    const drawn = [...state.markers.values()].filter((m) => times.has(m.time))
      .sort((a, b) => a.time - b.time).map(toMarker);
    markers.setMarkers(drawn);
    // Show the whole history until the user scrolls or zooms (after layout: autoSize).
    if (follow) requestAnimationFrame(() => { if (follow) chart.timeScale().fitContent(); });
    publish(list, drawn.length);
  }

  function publish(list, drawnMarkers) {
    const closedTimes = [...state.closed.keys()];
    const info = state.forminginfo;
    const snapshot = {
      symbol: state.symbol,
      candles: list.length,
      closed: state.closed.size,
      forming: list.filter((c) => c.forming).length,
      markers: drawnMarkers,
      lastTime: list.length ? list[list.length - 1].time : null,
      lastClosedTime: closedTimes.length ? Math.max(...closedTimes) : null,
      connected: state.connected,
      loading: state.loading,
      formingHeld: info ? info.held : null,
      formingOwner: info ? info.owner : null,
      partition: info ? info.partition : null,
      updates: ++state.updates,
    };
    window.__chartState = snapshot;
    const data = document.body.dataset;
    data.symbol = snapshot.symbol ?? "";
    data.candles = snapshot.candles;
    data.closed = snapshot.closed;
    data.forming = snapshot.forming;
    data.markers = snapshot.markers;
    data.lastTime = snapshot.lastTime ?? "";
    data.lastClosedTime = snapshot.lastClosedTime ?? "";
    data.connected = snapshot.connected;
    data.updates = snapshot.updates;
  }

  function status(text, error = false) {
    const el = $("status");
    el.textContent = text;
    el.classList.toggle("error", error);
  }

  function showStatus() {
    if (!state.connected) return status("reconnecting…", true);
    const last = state.closed.size ? Math.max(...state.closed.keys()) : null;
    const when = last === null ? "no closed window yet"
      : `last closed window ${new Date(last * 1000).toISOString().slice(0, 16).replace("T", " ")} UTC`;
    status(`${state.loading ? "loading history… " : ""}live · ${state.closed.size} candles · ${when}`);
  }

  function showFormingNote() {
    const info = state.forminginfo;
    const note = $("forming-note");
    if (!info || info.held) { note.hidden = true; return; }
    note.hidden = false;
    const who = info.owner ? `the worker at ${info.owner}` : "another worker";
    const shown = info.owner && !info.error ? "its open window is fetched from there every second"
      : `closed candles only${info.error ? ` (${info.error})` : ""}`;
    note.textContent = `The open window of ${info.symbol} (partition ${info.partition}) is held by ${who}: ${shown}.`;
  }

  function trimClosed() {
    while (state.closed.size > KEEP_CLOSED) state.closed.delete(Math.min(...state.closed.keys()));
  }

  function onSnapshot(body) {
    state.closed = new Map(body.candles.map((c) => [c.time, c]));
    state.markers = new Map(body.markers.map((m) => [`${m.start_ms}:${m.kind}`, m]));
    state.loading = body.loading;
    if (body.candles.length) {
      candles.applyOptions({ priceFormat: precisionFor(body.candles[body.candles.length - 1].close) });
    }
    render();
  }

  function onForming(body) {
    const now = Date.now();
    const next = new Map(body.candles.map((c) => [c.time, { ...c, seen: now }]));
    // A window that just closed leaves the worker's state a moment before its record arrives.
    for (const [t, c] of state.forming) {
      if (!next.has(t) && !state.closed.has(t) && now - c.seen < STALE_FORMING_MS) next.set(t, c);
    }
    state.forming = next;
    state.forminginfo = body;
    if (!state.closed.size && body.candles.length) {
      candles.applyOptions({ priceFormat: precisionFor(body.candles[body.candles.length - 1].close) });
    }
    showFormingNote();
    render();
  }

  function connect(symbol) {
    if (source) source.close();
    Object.assign(state, { symbol, closed: new Map(), forming: new Map(), markers: new Map(),
                           connected: false, forminginfo: null });
    follow = true;
    render();
    showFormingNote();
    source = new EventSource(`/chart/events?symbol=${encodeURIComponent(symbol)}`);
    source.onopen = () => { state.connected = true; showStatus(); publish(bars(), 0); };
    source.onerror = () => { state.connected = false; showStatus(); publish(bars(), 0); };
    const on = (name, handle) => source.addEventListener(name, (e) => {
      handle(JSON.parse(e.data));
      showStatus();
    });
    on("snapshot", onSnapshot);
    on("forming", onForming);
    on("candle", (body) => {
      state.closed.set(body.candle.time, body.candle);
      state.forming.delete(body.candle.time);
      state.loading = false;
      trimClosed();
      render();
    });
    on("anomaly", (body) => {
      state.markers.set(`${body.marker.start_ms}:${body.marker.kind}`, body.marker);
      render();
    });
  }

  function wanted() {
    return new URLSearchParams(window.location.search).get("symbol");
  }

  async function loadSymbols() {
    let symbols = [];
    try {
      const response = await fetch("/chart/symbols");
      symbols = (await response.json()).symbols;
    } catch (err) {
      status(`cannot list symbols: ${err}`, true);
    }
    const pick = state.symbol ?? wanted() ?? symbols[0] ?? null;
    if (pick !== null && !symbols.includes(pick)) symbols.unshift(pick);
    const select = $("symbol");
    const current = [...select.options].map((o) => o.value).join("\n");
    if (current !== symbols.join("\n")) {
      select.replaceChildren(...symbols.map((s) => new Option(s, s)));
    }
    if (pick === null) {
      status("no symbols yet: waiting for the first windows…");
      return;
    }
    select.value = pick;
    if (state.symbol !== pick) connect(pick);
  }

  $("symbol").addEventListener("change", (e) => {
    const symbol = e.target.value;
    const url = new URL(window.location.href);
    url.searchParams.set("symbol", symbol);
    window.history.replaceState(null, "", url);
    connect(symbol);
  });

  publish([], 0);
  loadSymbols();
  setInterval(loadSymbols, 5000);
})();
