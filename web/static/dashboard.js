// mesh dashboard: polls /api/swarm and redraws the page in place, with the elements web/dashboard.py renders.
// Every string from a snapshot came from a peer: it is only ever set as text or as an attribute, never as HTML.
"use strict";

(function () {
  const STATES = ["ONLINE", "JOINING", "DRAINING", "OFFLINE"];
  const SERVER_COLUMNS = ["name", "peer", "span", "state", "tok/s/block", "RTT ms", "sessions", "batch", "device",
    "dtype", "version", "relayed"];
  const MAX_REQUESTS = 50;
  const config = JSON.parse(document.body.dataset.config || "{}");
  const refreshMs = 1000 * (config.refresh || 1.5);

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") el.className = v;
      else if (k === "style") for (const [p, x] of Object.entries(v)) el.style.setProperty(p, String(x));
      else el.setAttribute(k, String(v));
    }
    for (const c of children.flat()) {
      if (c !== null && c !== undefined) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  const num = (v, d = 0) => (typeof v === "number" && isFinite(v) ? v : d);
  const shortId = (p) => String(p || "").slice(-8);
  const state = (s) => (STATES.includes(s.state) ? s.state : "OFFLINE");
  const clock = (t) => new Date(num(t, Date.now() / 1000) * 1000).toTimeString().slice(0, 8);
  const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

  function ranges(blocks) {
    const out = [];
    let start = null;
    blocks.forEach((b, i) => {
      if (start === null) start = b;
      if (i + 1 === blocks.length || blocks[i + 1] !== b + 1) {
        out.push(start === b ? `${start}` : `${start}:${b + 1}`);
        start = null;
      }
    });
    return out.join(", ");
  }

  function summary(counts) {
    if (!counts.length) return "no blocks known";
    const missing = counts.map((c, b) => (c === 0 ? b : -1)).filter((b) => b >= 0);
    if (missing.length) return `${missing.length} of ${counts.length} blocks uncovered: ${ranges(missing)}`;
    const thin = counts.filter((c) => c === 1).length;
    return `all ${counts.length} blocks covered` + (thin ? `, ${thin} by a single server` : "");
  }

  function lanes(servers) {
    const rows = [];
    const sorted = [...servers].sort((a, b) => num(a.start) - num(b.start) || num(a.end) - num(b.end) ||
      String(a.peer_id).localeCompare(String(b.peer_id)));
    for (const s of sorted) {
      let row = rows.find((r) => num(r[r.length - 1].end) <= num(s.start));
      if (!row) rows.push((row = []));
      row.push(s);
    }
    return rows;
  }

  function bar(s, total) {
    const start = Math.trunc(num(s.start)), end = Math.trunc(num(s.end)), st = state(s), peer = String(s.peer_id || "");
    const classes = ["server-bar", `state-${st.toLowerCase()}`];
    if (s.relayed) classes.push("relayed");
    if (s.caught) classes.push("caught");
    const label = [String(s.public_name || shortId(peer)), `${start}:${end}`];
    if (st !== "ONLINE") label.push(st.toLowerCase());
    if (s.relayed) label.push("relayed");
    if (s.caught) label.push("caught lying");
    const tip = `${shortId(peer)}: blocks ${start}:${end}, ${st}, ${num(s.throughput).toFixed(1)} tok/s/block`;
    return h("div", {
      class: classes.join(" "), "data-peer": peer, "data-start": start, "data-end": end, "data-state": st,
      title: tip, style: { left: `${(100 * start) / total}%`, width: `${(100 * (end - start)) / total}%` },
    }, h("span", null, label.join(" · ")));
  }

  function block(b, count, tput) {
    const cls = "block" + (count === 0 ? " uncovered" : count === 1 ? " thin" : "");
    const tip = `block ${b}: ${plural(count, "server")}, ${tput.toFixed(1)} tok/s`;
    return h("div", { class: cls, "data-block": b, "data-servers": count, title: tip }, b);
  }

  function serverRow(s) {
    const peer = String(s.peer_id || ""), st = state(s), rtt = num(s.rtt, -1);
    const quant = s.quant && s.quant !== "none" ? `/${s.quant}` : "";
    const cells = [
      s.public_name || "-", h("code", { title: peer }, shortId(peer)), `${num(s.start)}:${num(s.end)}`,
      [h("span", { class: `state state-${st.toLowerCase()}` }, st),
        s.caught ? [" ", h("strong", { class: "caught" }, "caught lying")] : null],
      num(s.throughput).toFixed(1), rtt >= 0 ? (rtt * 1000).toFixed(1) : "-", Math.trunc(num(s.sessions)),
      num(s.batch) ? num(s.batch).toFixed(1) : "-", s.device || "", `${s.dtype || ""}${quant}`, s.version || "",
      s.relayed ? "yes" : "no",
    ];
    return h("tr", { "data-peer": peer }, cells.map((c) => h("td", null, c)));
  }

  function model(m) {
    const total = Math.trunc(num(m.num_blocks));
    const counts = Array.from({ length: total }, (_, b) => Math.trunc(num((m.servers_per_block || [])[b])));
    const tputs = Array.from({ length: total }, (_, b) => num((m.throughput_per_block || [])[b]));
    const servers = (m.servers || []).filter((s) => s && typeof s === "object");
    const ok = total > 0 && counts.every((c) => c > 0);
    const section = h("section", { class: "model", "data-model": m.model_id || "" },
      h("h2", null, String(m.model_id || ""), " ",
        h("small", null, `${total} blocks · ${plural(servers.length, "server")}`)),
      h("p", { class: `summary ${ok ? "ok" : "bad"}` }, summary(counts)));
    if (total) {
      section.append(h("div", { class: "blockmap", style: { "--blocks": total } },
        h("div", { class: "blocks" }, counts.map((c, b) => block(b, c, tputs[b]))),
        h("div", { class: "lanes" },
          lanes(servers).map((row) => h("div", { class: "lane" }, row.map((s) => bar(s, total)))))));
    }
    const rows = [...servers].sort((a, b) => num(a.start) - num(b.start) || num(a.end) - num(b.end)).map(serverRow);
    if (!rows.length) {
      rows.push(h("tr", { class: "empty" }, h("td", { colspan: SERVER_COLUMNS.length }, "no servers known")));
    }
    section.append(h("table", { class: "servers" },
      h("thead", null, h("tr", null, SERVER_COLUMNS.map((c) => h("th", null, c)))), h("tbody", null, rows)));
    return section;
  }

  function requestRow(r) {
    const status = Math.trunc(num(r.status));
    const cells = [clock(r.time), r.endpoint || "", r.model || "", Math.trunc(num(r.tokens_in)),
      Math.trunc(num(r.tokens_out)), num(r.seconds).toFixed(2), num(r.tokens_per_s).toFixed(1), r.route || "", status];
    return h("tr", { class: status >= 200 && status < 400 ? "ok" : "bad" }, cells.map((c) => h("td", null, c)));
  }

  function render(snap) {
    const models = (snap.models || []).filter((m) => m && typeof m === "object");
    const target = document.getElementById("models");
    target.replaceChildren(...(models.length ? models.map(model)
      : [h("p", { class: "empty" }, "no servers found yet")]));
    const requests = (snap.requests || []).filter((r) => r && typeof r === "object")
      .sort((a, b) => num(b.time) - num(a.time)).slice(0, MAX_REQUESTS);
    const body = document.querySelector("#requests tbody");
    const columns = document.querySelectorAll("#requests thead th").length;
    body.replaceChildren(...(requests.length ? requests.map(requestRow)
      : [h("tr", { class: "empty" }, h("td", { colspan: columns }, "no requests yet"))]));
  }

  const updated = document.getElementById("updated");
  const connection = document.getElementById("connection");

  async function refresh() {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), Math.max(5000, 3 * refreshMs));
    try {
      const reply = await fetch("/api/swarm", { cache: "no-store", signal: abort.signal });
      if (!reply.ok) throw new Error(`HTTP ${reply.status}`);
      render(await reply.json());
      updated.textContent = clock(Date.now() / 1000);
      updated.dataset.refreshes = String(Number(updated.dataset.refreshes || 0) + 1);
      connection.textContent = "live";
      connection.className = "live";
      connection.removeAttribute("title");
    } catch (e) {
      connection.textContent = "disconnected";
      connection.className = "disconnected";
      connection.title = String(e);
    } finally {
      clearTimeout(timer);
      setTimeout(refresh, refreshMs);
    }
  }

  refresh();
})();
