/* pihub-web: live updates over Server-Sent Events, and the History graph (uPlot).
 *
 * The server renders every page first; this script keeps it live. It builds the same markup as
 * pages.py, always with textContent (never innerHTML), so text from MQTT stays text. The stream
 * starts with a snapshot of everything (also after every reconnect), then one change per item.
 * Memory stays flat: the state holds one entry per item, rows are replaced in place, and the
 * notification list is trimmed to the server's bound.
 */
(function () {
  "use strict";
  var body = document.body;
  var page = body.dataset.page;
  var staleFactor = parseFloat(body.dataset.staleFactor || "3");
  var role = body.dataset.role;
  var csrfMeta = document.querySelector('meta[name="csrf"]');
  var csrf = csrfMeta ? csrfMeta.content : "";
  var state = { values: {}, daemons: {}, hosts: {}, boards: {}, rules: {}, notifications: [] };
  var pihub = window.pihub = { state: state, events: 0, snapshots: 0, lastChange: 0,
                               plot: null, plotted: 0, connected: false };
  var maxNotes = 100;
  var COUNTERS = ["published", "received", "rejected", "errors"];

  // ------------------------------------------------------------------ helpers

  function h(tag, attrs) {
    var el = document.createElement(tag);
    if (attrs) {
      for (var k in attrs) {
        if (attrs[k] === null || attrs[k] === undefined || attrs[k] === false) continue;
        if (k === "text") el.textContent = attrs[k];
        else if (k === "cls") el.className = attrs[k];
        else el.setAttribute(k, attrs[k]);
      }
    }
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined) continue;
      if (Array.isArray(c)) c.forEach(function (x) { if (x) el.appendChild(x); });
      else el.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return el;
  }
  function now() { return Date.now() / 1000; }
  function num(v) {
    if (typeof v !== "number" || !isFinite(v)) return "–";
    if (Number.isInteger(v)) return String(v);
    var s = v.toFixed(Math.abs(v) >= 100 ? 1 : 2);
    return s.replace(/0+$/, "").replace(/\.$/, "");
  }
  function age(s) {
    if (s === null || s === undefined || isNaN(s)) return "–";
    s = Math.max(0, Math.floor(s));
    if (s < 90) return s + " s";
    if (s < 5400) return Math.floor(s / 60) + " min";
    if (s < 172800) return Math.floor(s / 3600) + " h";
    return Math.floor(s / 86400) + " d";
  }
  function two(n) { return (n < 10 ? "0" : "") + n; }
  function stamp(ts) {
    if (typeof ts !== "number") return "–";
    var d = new Date(ts * 1000);
    return d.getFullYear() + "-" + two(d.getMonth() + 1) + "-" + two(d.getDate()) + " " +
      two(d.getHours()) + ":" + two(d.getMinutes()) + ":" + two(d.getSeconds());
  }
  function sortedKeys(o) { return Object.keys(o).sort(); }
  function byId(id) { return document.getElementById(id); }
  function swap(id, el) {
    var old = byId(id);
    if (!old) return false;
    old.replaceWith(el);
    return true;
  }

  // ------------------------------------------------------------------ overview

  function valueRow(it, t) {
    var a = t - it.ts, iv = it.interval_s;
    var stale = iv !== null && iv !== undefined && a > staleFactor * iv;
    return h("tr", { id: "v:" + it.location + "/" + it.quantity, cls: stale ? "stale" : "",
                     "data-ts": it.ts, "data-interval": iv === null ? "" : iv },
      h("th", { text: it.quantity }),
      h("td", { cls: "num" }, h("span", { cls: "val", text: num(it.value) }), " ",
        h("span", { cls: "unit", text: it.unit })),
      h("td", { cls: "age", text: age(a) }));
  }
  function renderOverview() {
    var sec = byId("values"), t = now(), by = {};
    Object.keys(state.values).forEach(function (k) {
      var it = state.values[k];
      (by[it.location] = by[it.location] || []).push(it);
    });
    var cards = sortedKeys(by).map(function (loc) {
      var rows = by[loc].sort(function (a, b) { return a.quantity < b.quantity ? -1 : 1; })
        .map(function (it) { return valueRow(it, t); });
      return h("article", { cls: "card", id: "l:" + loc }, h("h2", { text: loc }),
        h("table", { cls: "values" }, h("tbody", null, rows)));
    });
    if (!cards.length) cards = [h("p", { cls: "empty", text: "No measurements yet." })];
    sec.replaceChildren.apply(sec, cards);
  }

  // ------------------------------------------------------------------ daemons

  function daemonState(it, t) {
    var meta = it.meta || {}, verdict = (it.monitor || {}).state;
    if (it.status === "offline") return ["down", "offline"];
    if (verdict === "down") return ["down", "down (monitor)"];
    if (typeof meta.ts === "number" && typeof meta.interval_s === "number" &&
        t - meta.ts > 2.5 * meta.interval_s) return ["down", "silent"];
    if (it.status === "online") return ["up", "online"];
    return ["unknown", "unknown"];
  }
  function daemonRow(it, t) {
    var meta = it.meta || {}, st = daemonState(it, t), v = it.monitor || {};
    var c = meta.counters || {}, up = meta.uptime_s;
    if (typeof up === "number" && typeof meta.ts === "number" && st[0] === "up") up += t - meta.ts;
    var others = sortedKeys(c).filter(function (k) { return COUNTERS.indexOf(k) < 0 && c[k]; })
      .map(function (k) { return k + " " + c[k]; }).join(", ");
    return h("tr", { id: "d:" + it.daemon, cls: st[0] },
      h("th", { text: it.name || it.daemon }),
      h("td", null, h("span", { cls: "badge " + st[0], text: st[1] })),
      h("td", { text: (v.state || "–") + (v.reason ? " · " + v.reason : "") }),
      h("td", { text: meta.host || "–" }), h("td", { text: meta.version || "–" }),
      h("td", { cls: "num", text: typeof up === "number" ? age(up) : "–" }),
      h("td", { cls: "num age", "data-ts": typeof meta.ts === "number" ? meta.ts : "",
                text: typeof meta.ts === "number" ? age(t - meta.ts) : "–" }),
      h("td", { cls: "num", text: typeof meta.rss_kb === "number" ?
                (meta.rss_kb / 1024).toFixed(1) + " MB" : "–" }),
      COUNTERS.map(function (k) {
        return h("td", { cls: "num", text: k in c ? String(c[k]) : "–" });
      }),
      h("td", { cls: "more", text: others }));
  }
  // grouped by host, this hub's first, once there is a satellite (contract: "Fleet")
  function hostRow(name, sat) {
    var link = sat ? (state.hosts[name] || {}) : {}, txt = "this hub", down = false;
    if (sat) {
      var st = (link.monitor || {}).state ||
        ({ "1": "reachable", "0": "unreachable" })[link.bridge] || "link unknown";
      txt = "satellite · " + st; down = st === "unreachable";
    }
    return h("tr", { id: "h:" + name, cls: "hostrow" + (down ? " down" : "") },
      h("th", { colspan: "13" }, name || "–", " ", h("small", { text: txt })));
  }
  function renderDaemons() {
    var tb = document.querySelector("#daemons tbody"), t = now();
    var keys = sortedKeys(state.daemons), own = null, sites = {};
    keys.forEach(function (k) {
      var it = state.daemons[k];
      if (it.satellite) sites[it.host] = true; else own = it.host;
    });
    Object.keys(state.hosts).forEach(function (k) { sites[k] = true; });
    var names = Object.keys(sites).sort(), rows = [];
    if (!names.length) {
      rows = keys.map(function (k) { return daemonRow(state.daemons[k], t); });
    } else {
      [[own, false]].concat(names.map(function (n) { return [n, true]; })).forEach(function (g) {
        rows.push(hostRow(g[0], g[1]));
        keys.forEach(function (k) {
          var it = state.daemons[k];
          if (!!it.satellite === g[1] && (!g[1] || it.host === g[0])) rows.push(daemonRow(it, t));
        });
      });
    }
    tb.replaceChildren.apply(tb, rows);
    var empty = document.querySelector("main .empty");
    if (empty && Object.keys(state.daemons).length) empty.remove();
  }

  // ------------------------------------------------------------------ boards

  function minutesTo(d, t) {
    if (typeof d.departs_at === "number") return Math.max(0, Math.floor((d.departs_at - t) / 60));
    return typeof d.minutes === "number" ? d.minutes : null;
  }
  function boardItem(it, t) {
    var d = it.data || {}, stale = !!d.stale, kind, title, inner;
    if (Array.isArray(d.departures)) {
      kind = "transport"; title = d.stop || it.item;
      var rows = d.departures.filter(function (x) {
        return x && typeof x === "object" &&
          !(typeof x.departs_at === "number" && x.departs_at < t - 60);
      }).map(function (x) {
        var m = minutesTo(x, t);
        return h("tr", { "data-at": typeof x.departs_at === "number" ? x.departs_at : "" },
          h("td", { cls: "line" }, h("span", { text: x.line })),
          h("td", { cls: "dest", text: x.destination }),
          h("td", { cls: "min" }, m === null ? "–" : String(m), h("small", { text: " min" })),
          h("td", { cls: "time" }, x.time || "",
            x.delay_min ? h("small", { cls: "late", text: " +" + x.delay_min }) : null),
          h("td", { cls: "plat", text: x.platform || "" }));
      });
      inner = rows.length ? h("table", { cls: "departures" }, h("tbody", null, rows))
        : h("p", { cls: "empty", text: "No departures." });
    } else if ("bikes" in d) {
      kind = "bikes"; title = d.name || it.item;
      var kinds = (d.mechanical !== null && d.mechanical !== undefined) ||
        (d.electric !== null && d.electric !== undefined) ?
        num(d.mechanical) + " mechanical · " + num(d.electric) + " electric" : "";
      inner = [h("div", { cls: "bikes" }, h("span", { cls: "big", text: num(d.bikes) }),
        h("span", { cls: "lbl", text: "bikes" }), h("span", { cls: "big docks", text: num(d.docks) }),
        h("span", { cls: "lbl", text: "docks" })), h("p", { cls: "kinds", text: kinds })];
    } else {
      kind = "other"; title = it.item;
      inner = h("dl", null, Object.keys(d).slice(0, 20).map(function (k) {
        return [h("dt", { text: k }), h("dd", { text: JSON.stringify(d[k]) })];
      }).reduce(function (a, b) { return a.concat(b); }, []));
    }
    return h("article", { cls: "board board-" + kind + (stale ? " stale" : ""),
                          id: "b:" + it.board + "/" + it.item },
      h("h3", { text: title }), inner,
      stale && d.reason ? h("p", { cls: "reason", text: d.reason }) : null);
  }
  function renderBoards() {
    var root = byId("boards"), t = now(), by = {};
    Object.keys(state.boards).forEach(function (k) {
      var it = state.boards[k];
      (by[it.board] = by[it.board] || []).push(it);
    });
    var sets = sortedKeys(by).map(function (b) {
      return h("section", { cls: "boardset" }, h("h2", { text: b }),
        h("div", { cls: "boards" }, by[b].sort(function (x, y) { return x.item < y.item ? -1 : 1; })
          .map(function (it) { return boardItem(it, t); })));
    });
    if (!sets.length) sets = [h("p", { cls: "empty", text: "No board published yet." })];
    root.replaceChildren.apply(root, sets);
  }

  // ------------------------------------------------------------------ alerts

  function ruleRow(it) {
    var series = it.series && typeof it.series === "object" ? it.series : {};
    var lis = sortedKeys(series).slice(0, 50).map(function (k) {
      var s = series[k] || {};
      return h("li", { cls: s.state || "", text: k + ": " + s.state + " · " + num(s.value) + " " +
        (s.unit || "") + " · since " + stamp(s.since) });
    });
    var f = it.firing;
    return h("tr", { id: "r:" + it.rule, cls: f ? "firing" : "" }, h("th", { text: it.rule }),
      h("td", null, h("span", { cls: "badge " + (f ? "down" : "up"), text: f ? f + " firing" : "ok" })),
      h("td", null, h("ul", { cls: "series" }, lis)));
  }
  function noteItem(n) {
    return h("li", { cls: "note p" + (n.priority === null || n.priority === undefined ? 0 : n.priority) },
      h("time", { text: stamp(n.ts) }), " ", h("b", { text: n.title || n.topic }), " ",
      h("span", { text: n.message }));
  }
  function renderRules() {
    var tb = document.querySelector("#rules tbody");
    tb.replaceChildren.apply(tb, sortedKeys(state.rules).map(function (k) { return ruleRow(state.rules[k]); }));
    var e = byId("no-rules");
    if (e && Object.keys(state.rules).length) e.remove();
  }
  function renderNotes() {
    var ul = byId("notes");
    ul.replaceChildren.apply(ul, state.notifications.slice().reverse().map(noteItem));
    var e = byId("no-notes");
    if (e && state.notifications.length) e.remove();
  }

  // ------------------------------------------------------------------ outputs

  function outputRow(it) {
    var on = !!it.value, name = it.target || it.quantity;
    var sw = role === "admin" ?
      h("form", { method: "post", action: "/outputs/" + name, cls: "switch" },
        h("input", { type: "hidden", name: "csrf", value: csrf }),
        h("button", { type: "submit", name: "state", value: on ? "off" : "on",
                      text: "Switch " + (on ? "off" : "on") }))
      : h("span", { cls: "muted", text: "view only" });
    return h("tr", { id: "o:" + name, cls: on ? "on" : "off" }, h("th", { text: name }),
      h("td", { text: it.location + (it.host ? " · " + it.host : "") }),
      h("td", null, h("span", { cls: "badge " + (on ? "on" : "off"), text: on ? "on" : "off" })),
      h("td", { text: stamp(it.ts) }), h("td", null, sw));
  }
  function outputs() {
    return Object.keys(state.values).map(function (k) { return state.values[k]; })
      .filter(function (v) { return v.kind === "output"; })
      .sort(function (a, b) {
        var x = (a.host || "") + "\u0000" + a.quantity, y = (b.host || "") + "\u0000" + b.quantity;
        return x < y ? -1 : 1;
      });
  }
  function renderOutputs() {
    var tb = document.querySelector("#outputs tbody");
    tb.replaceChildren.apply(tb, outputs().map(outputRow));
    var e = document.querySelector("main .empty");
    if (e && tb.children.length) e.remove();
  }
  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    if (!form.classList || !form.classList.contains("switch")) return;
    ev.preventDefault();
    var button = ev.submitter || form.querySelector("button");
    var row = form.closest("tr");
    row.classList.add("pending");
    button.disabled = true;
    fetch("/api/outputs/" + encodeURIComponent(form.action.split("/").pop()), {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify({ state: button.value })
    }).then(function (r) {
      if (!r.ok) return r.json().then(function (j) { throw new Error(j.error || r.status); });
    }).catch(function (e) {
      row.classList.remove("pending");
      button.disabled = false;
      button.title = String(e.message || e);
      row.classList.add("failed");
    });
  });

  // ------------------------------------------------------------------ page dispatch

  var full = { overview: renderOverview, daemons: renderDaemons, boards: renderBoards,
               outputs: renderOutputs, alerts: function () { renderRules(); renderNotes(); } };
  var pendingFull = false;
  function rerender() {
    if (pendingFull || !full[page]) return;
    pendingFull = true;
    setTimeout(function () { pendingFull = false; full[page](); }, 0);
  }
  function apply(ch) {
    var t = now(), kind = ch.kind, key = ch.key, it = ch.item;
    if (kind === "notifications") {
      state.notifications.push(it);
      if (state.notifications.length > maxNotes) state.notifications.shift();
      if (page === "alerts") {
        var ul = byId("notes");
        ul.insertBefore(noteItem(it), ul.firstChild);
        while (ul.children.length > maxNotes) ul.lastChild.remove();
        var e = byId("no-notes");
        if (e) e.remove();
      }
      return;
    }
    var table = state[kind];
    if (!table) return;
    if (it === null) delete table[key]; else table[key] = it;
    if (page === "overview" && kind === "values") {
      if (!(it && swap("v:" + key, valueRow(it, t)))) rerender();
    } else if (page === "daemons" && kind === "daemons") {
      if (!(it && swap("d:" + key, daemonRow(it, t)))) rerender();
    } else if (page === "daemons" && kind === "hosts") {
      rerender();
    } else if (page === "boards" && kind === "boards") {
      if (!(it && swap("b:" + key, boardItem(it, t)))) rerender();
    } else if (page === "alerts" && kind === "rules") {
      if (!(it && swap("r:" + key, ruleRow(it)))) rerender();
    } else if (page === "outputs" && kind === "values" &&
               ((it && it.kind === "output") || !it)) {
      if (!(it && swap("o:" + (it.target || it.quantity), outputRow(it)))) rerender();
    }
  }

  // ------------------------------------------------------------------ the stream

  var live = byId("live"), source = null, retryTimer = null;
  function setLive(ok, text) {
    pihub.connected = ok;
    if (live) { live.textContent = text; live.className = "live " + (ok ? "ok" : "bad"); }
  }
  function connect() {
    if (source) source.close();
    source = new EventSource("/api/events");
    source.addEventListener("snapshot", function (ev) {
      var snap = JSON.parse(ev.data);
      state.values = snap.values; state.daemons = snap.daemons; state.boards = snap.boards;
      state.hosts = {};
      (snap.hosts || []).forEach(function (x) { if (x.satellite) state.hosts[x.host] = x; });
      state.rules = snap.rules; state.notifications = snap.notifications;
      pihub.snapshots++;
      setLive(true, "live");
      if (full[page]) full[page]();
    });
    source.onmessage = function (ev) {
      pihub.events++;
      apply(JSON.parse(ev.data));
      pihub.lastChange = performance.timeOrigin + performance.now();
    };
    source.onerror = function () {
      setLive(false, "reconnecting…");
      if (source.readyState === EventSource.CLOSED) {
        // an HTTP error (the session ended with a restart, too many pages): ask who we are
        clearTimeout(retryTimer);
        retryTimer = setTimeout(function () {
          fetch("/api/session", { credentials: "same-origin" }).then(function (r) {
            if (r.status === 401) location.reload(); else connect();
          }, function () { connect(); });
        }, 3000);
      }
    };
  }
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden && source && source.readyState === EventSource.CLOSED) connect();
  });
  if (page !== "history") connect();

  // ages, stale marks, countdowns and the clock, once a second
  setInterval(function () {
    var t = now();
    var clock = byId("clock");
    if (clock) { var d = new Date(); clock.textContent = two(d.getHours()) + ":" + two(d.getMinutes()); }
    if (page === "overview") {
      document.querySelectorAll("#values tr[data-ts]").forEach(function (tr) {
        var a = t - parseFloat(tr.dataset.ts), iv = tr.dataset.interval;
        tr.lastChild.textContent = age(a);
        tr.classList.toggle("stale", iv !== "" && a > staleFactor * parseFloat(iv));
      });
    } else if (page === "daemons") {
      Object.keys(state.daemons).forEach(function (k) {
        var row = byId("d:" + k), it = state.daemons[k];
        if (!row) return;
        var st = daemonState(it, t);
        if (!row.classList.contains(st[0])) { row.replaceWith(daemonRow(it, t)); return; }
        var cell = row.querySelector("td.age");
        if (cell && cell.dataset.ts) cell.textContent = age(t - parseFloat(cell.dataset.ts));
      });
    } else if (page === "boards") {
      document.querySelectorAll(".departures tr[data-at]").forEach(function (tr) {
        var at = parseFloat(tr.dataset.at);
        if (isNaN(at)) return;
        if (at < t - 60) { tr.remove(); return; }
        tr.querySelector(".min").firstChild.textContent = String(Math.max(0, Math.floor((at - t) / 60)));
      });
    }
  }, 1000);

  // ------------------------------------------------------------------ history

  var COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];
  function draw() {
    var form = byId("hform"), chart = byId("chart"), status = byId("hstatus");
    if (!form || !chart) return;
    var params = new URLSearchParams(new FormData(form));
    if (!params.get("step")) params.delete("step");
    if (!params.getAll("series").length) { status.textContent = "Pick one or more series."; return; }
    status.textContent = "loading…";
    fetch("/api/history?" + params.toString(), { credentials: "same-origin" })
      .then(function (r) { return r.json().then(function (j) { return [r, j]; }); })
      .then(function (rj) {
        var r = rj[0], j = rj[1];
        if (!r.ok) throw new Error(j.error || ("HTTP " + r.status));
        plot(j, chart, status);
      }).catch(function (e) { status.textContent = "History not available: " + (e.message || e); });
  }
  function plot(j, chart, status) {
    var xs = {}, idx = {};
    j.series.forEach(function (s) {
      [s.points, s.min, s.max].forEach(function (pts) {
        (pts || []).forEach(function (p) { xs[p[0]] = 1; });
      });
    });
    var x = Object.keys(xs).map(Number).sort(function (a, b) { return a - b; });
    x.forEach(function (t, i) { idx[t] = i; });
    function column(pts) {
      var col = new Array(x.length).fill(null);
      (pts || []).forEach(function (p) { col[idx[p[0]]] = p[1]; });
      return col;
    }
    var data = [x], series = [{}], bands = [], points = 0;
    j.series.forEach(function (s, i) {
      var color = COLORS[i % COLORS.length];
      data.push(column(s.points));
      points += s.points.length;
      series.push({ label: s.id + (s.unit ? " (" + s.unit + ")" : ""), stroke: color, width: 2,
                    points: { show: s.points.length < 60 } });
      if (j.band && s.min && s.max) {
        data.push(column(s.max)); data.push(column(s.min));
        series.push({ label: s.id + " max", stroke: color + "55", width: 1 });
        series.push({ label: s.id + " min", stroke: color + "55", width: 1 });
        bands.push({ series: [data.length - 2, data.length - 1], fill: color + "22" });
      }
    });
    if (pihub.plot) { pihub.plot.destroy(); pihub.plot = null; }
    chart.replaceChildren();
    var dark = body.classList.contains("dark");
    var axis = { stroke: dark ? "#cbd5e1" : "#334155", grid: { stroke: dark ? "#334155" : "#e2e8f0" } };
    pihub.plot = new uPlot({ width: Math.max(320, chart.clientWidth), height: 380, series: series,
                             bands: bands, axes: [axis, axis], scales: { x: { time: true } } },
                           data, chart);
    pihub.plotted = points;
    status.textContent = points ? points + " points, step " + j.step + " s" +
      (j.band ? ", band: min/max per step" : "") : "No points in this range.";
  }
  if (page === "history") {
    var hform = byId("hform");
    if (hform) {
      hform.addEventListener("submit", function (ev) {
        ev.preventDefault();
        var q = new URLSearchParams(new FormData(hform));
        if (!q.get("step")) q.delete("step");
        history.replaceState(null, "", "/history?" + q.toString());
        draw();
      });
      draw();
    }
    setLive(true, "");
  }
})();
