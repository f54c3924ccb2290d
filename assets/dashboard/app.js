// dlq-bridge dashboard. Plain JavaScript, no framework and no build step: the
// page is a few views over the /v1 API, and every string from the server is
// put in the DOM as text (never as HTML), which the CSP backs up.
"use strict";

(function () {
  const REFRESH_MS = 5000;
  const TOKEN_KEY = "dlq-bridge-token";
  const state = { info: null, timer: null, view: null };

  // ---- small helpers -------------------------------------------------------

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) {
      if (c === undefined || c === null || c === false) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }
  const $ = (sel, root) => (root || document).querySelector(sel);

  function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

  class HttpError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function api(method, path, body) {
    const headers = { "Accept": "application/json" };
    const t = token();
    if (t) headers["Authorization"] = "Bearer " + t;
    const init = { method, headers, credentials: "omit", cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const r = await fetch(path, init);
    let data = null;
    try { data = await r.json(); } catch (_) { data = null; }
    if (!r.ok) {
      const msg = (data && data.error) || (r.status + " " + r.statusText);
      if (r.status === 401) needToken(msg);
      throw new HttpError(r.status, msg);
    }
    return data;
  }

  function banner(text) {
    const b = $("#banner");
    b.textContent = text || "";
    b.classList.toggle("hidden", !text);
  }

  function needToken(msg) {
    banner((token() ? "The API refused the token: " : "This needs the API token: ") + msg +
      ". Enter it at the top right.");
    $("#token").focus();
  }

  function showTokenState() {
    const s = $("#token-state");
    if (state.info && !state.info.token_required) s.textContent = "no token configured";
    else s.textContent = token() ? "token set for this tab" : "no token set";
  }

  function age(secs) {
    if (secs === null || secs === undefined) return "–";
    const s = Math.floor(secs);
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m";
    if (s < 86400) return Math.floor(s / 3600) + "h" + Math.floor((s % 3600) / 60) + "m";
    return Math.floor(s / 86400) + "d" + Math.floor((s % 86400) / 3600) + "h";
  }
  // An age minutes behind (CloudWatch, Cloud Monitoring) says so.
  function lagged(q) {
    return q.oldest_age !== null && q.oldest_age !== undefined && (q.oldest_age_exactness || q.exactness) === "lagged";
  }
  function when(iso) { return iso ? new Date(iso).toLocaleString() : "–"; }
  function qs(params) {
    const u = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") u.set(k, v);
    return u.toString();
  }
  function backendBadge(b) { return el("span", { class: "badge b-" + b, text: b }); }
  function errText(e) { return e instanceof HttpError ? e.message : "request failed: " + e.message; }

  // A depth sparkline as inline SVG (no canvas, no library).
  function sparkline(points, w, h) {
    const NS = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("class", "spark");
    svg.setAttribute("width", w);
    svg.setAttribute("height", h);
    svg.setAttribute("viewBox", "0 0 " + w + " " + h);
    if (!points || points.length === 0) return svg;
    // One poll so far: a flat line at that depth.
    const pts = points.length === 1 ? [[points[0][0] - 1, points[0][1]], points[0]] : points;
    const t0 = pts[0][0], t1 = pts[pts.length - 1][0];
    const max = Math.max(1, ...pts.map((p) => p[1]));
    const x = (t) => ((t - t0) / (t1 - t0)) * (w - 2) + 1;
    const y = (d) => h - 1 - (d / max) * (h - 3);
    const line = pts.map((p) => x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1)).join(" ");
    const area = document.createElementNS(NS, "polygon");
    area.setAttribute("class", "area");
    area.setAttribute("points", x(pts[0][0]).toFixed(1) + "," + h + " " + line + " " + x(pts[pts.length - 1][0]).toFixed(1) + "," + h);
    const pl = document.createElementNS(NS, "polyline");
    pl.setAttribute("points", line);
    const title = document.createElementNS(NS, "title");
    title.textContent = "depth over the last " + age(t1 - t0) + ", max " + max;
    svg.append(title, area, pl);
    return svg;
  }

  function setUpdated() { $("#updated").textContent = "Updated " + new Date().toLocaleTimeString() + "."; }

  // ---- routing ---------------------------------------------------------------

  function route() {
    clearInterval(state.timer);
    state.timer = null;
    banner("");
    const hash = location.hash || "#/";
    const main = $("#main");
    main.replaceChildren();
    document.querySelectorAll("header nav a").forEach((a) => a.classList.remove("active"));
    let m;
    if ((m = hash.match(/^#\/queue\/([^/?]+)/))) {
      renderQueue(main, decodeURIComponent(m[1]));
    } else if (hash.startsWith("#/runs")) {
      $("#nav-runs").classList.add("active");
      renderRuns(main);
    } else {
      $("#nav-overview").classList.add("active");
      renderOverview(main);
    }
  }

  // ---- overview --------------------------------------------------------------

  function renderOverview(main) {
    const tbody = el("tbody");
    main.append(
      el("h1", { text: "Dead-letter queues" }),
      el("table", { id: "queues" },
        el("thead", {}, el("tr", {},
          el("th", { text: "Queue" }), el("th", { text: "Backend" }), el("th", { class: "num", text: "Depth" }),
          el("th", { class: "num", text: "Oldest" }), el("th", { text: "Top reasons" }),
          el("th", { text: "Depth, last hours" }), el("th", { text: "Alerts" }))),
        tbody),
      el("p", { class: "muted", text: "Refreshes every " + REFRESH_MS / 1000 + " s from what serve polls; click a queue to browse it." }));
    const load = async () => {
      try {
        const [queues, history, alerts] = await Promise.all([
          api("GET", "/v1/queues"), api("GET", "/v1/history"), api("GET", "/v1/alerts")]);
        const rows = queues.map((q) => {
          const firing = alerts.filter((a) => a.queue === q.queue).map((a) => a.rule);
          const reasons = q.error
            ? el("span", { class: "err", text: "poll error: " + q.error })
            // Reasons are message content: the API leaves them out without the token.
            : q.top_reasons === undefined && q.polled_at
              ? el("span", { class: "muted", text: "enter the API token to see them" })
              : (q.top_reasons || []).map(([r, n]) => r + " (" + n + ")").join(", ") || "–";
          return el("tr", {
            class: "clickable" + (firing.length ? " firing" : ""), "data-queue": q.queue, "data-backend": q.backend,
            onclick: () => { location.hash = "#/queue/" + encodeURIComponent(q.queue); },
          },
          el("td", {}, el("a", { href: "#/queue/" + encodeURIComponent(q.queue), text: q.queue })),
          el("td", {}, backendBadge(q.backend)),
          el("td", { class: "num depth", text: q.depth === undefined || q.depth === null ? "?" : q.depth }),
          el("td", { class: "num", text: (q.oldest_age_exactness === "at_least" && q.oldest_age != null ? "≥ " : "") +
            age(q.oldest_age) + (lagged(q) ? " (lagged)" : "") }),
          el("td", {}, reasons),
          el("td", {}, sparkline(history[q.queue], 160, 28)),
          el("td", { class: firing.length ? "alert" : "muted", text: firing.length ? "firing: " + firing.join(", ") : "–" }));
        });
        tbody.replaceChildren(...rows);
        setUpdated();
      } catch (e) {
        banner(errText(e));
      }
    };
    load();
    state.timer = setInterval(load, REFRESH_MS);
  }

  // ---- queue page -----------------------------------------------------------

  function renderQueue(main, queue) {
    const q = (state.info && state.info.queues.find((x) => x.queue === queue)) || { queue, backend: "" };
    const filter = el("textarea", { id: "filter", rows: 2, spellcheck: "false",
      placeholder: 'e.g. attributes.tenant == "acme" && age > duration("1h")' });
    const filterErr = el("div", { id: "filter-error", class: "err hidden" });
    const apply = el("button", { id: "apply", class: "primary", type: "button", text: "Apply filter" });
    const info = el("div", { id: "messages-info", class: "muted" });
    const msgBody = el("tbody");
    const messagesTable = el("table", { id: "messages" },
      el("thead", {}, el("tr", {}, el("th", { text: "ID" }), el("th", { class: "num", text: "Age" }),
        el("th", { class: "num", text: "Deliveries" }), el("th", { text: "Reason" }), el("th", { text: "Source" }),
        el("th", { class: "num", text: "Bytes" }))), msgBody);
    const groupNote = el("div", { id: "group-note", class: "row hidden" });
    const bySel = el("select", { id: "report-by" },
      ["pattern", "reason", "source"].map((b) => el("option", { value: b, text: b })),
      el("option", { value: "attribute", text: "attribute…" }));
    const byAttr = el("input", { id: "report-attr", type: "text", placeholder: "attribute name", class: "hidden" });
    const reportBody = el("tbody");
    const reportInfo = el("div", { class: "muted", id: "report-info" });
    const panes = {
      messages: el("section", { id: "pane-messages" }, groupNote, info, messagesTable),
      report: el("section", { id: "pane-report", class: "hidden" },
        el("div", { class: "row" }, el("label", { for: "report-by", text: "Group by" }), bySel, byAttr,
          el("button", { type: "button", id: "report-run", text: "Report", onclick: () => loadReport() })),
        reportInfo,
        el("table", { id: "report" }, el("thead", {}, el("tr", {}, el("th", { text: "Group" }),
          el("th", { class: "num", text: "Count" }), el("th", { class: "num", text: "Share" }),
          el("th", { text: "First" }), el("th", { text: "Last" }), el("th", { text: "Deliveries" }))), reportBody)),
      actions: el("section", { id: "pane-actions", class: "hidden" }),
    };
    const tabs = el("div", { class: "tabs" }, Object.keys(panes).map((k) =>
      el("button", { type: "button", id: "tab-" + k, class: k === "messages" ? "active" : "",
        text: k[0].toUpperCase() + k.slice(1), onclick: () => showTab(k) })));
    function showTab(k) {
      for (const [name, p] of Object.entries(panes)) {
        p.classList.toggle("hidden", name !== k);
        $("#tab-" + name).classList.toggle("active", name === k);
      }
      if (k === "report" && !reportBody.children.length) loadReport();
    }

    main.append(
      el("h1", {}, queue, " ", backendBadge(q.backend)),
      el("div", { class: "card" },
        el("label", { for: "filter", text: "CEL filter (checked as you type, before anything is read)" }),
        filter, filterErr,
        el("div", { class: "row" }, apply, el("span", { class: "muted",
          text: "Variables: id, body, json, attributes, reason, description, delivery_count, enqueued_at, age, source." }))),
      tabs, panes.messages, panes.report, panes.actions);

    let group = null; // {by, key}: messages of one report group
    let checkSeq = 0;
    async function checkFilter() {
      const seq = ++checkSeq;
      const src = filter.value;
      try {
        const r = await api("GET", "/v1/filter/check?" + qs({ filter: src }));
        if (seq !== checkSeq) return r.valid;
        filter.classList.toggle("invalid", !r.valid);
        filterErr.classList.toggle("hidden", r.valid);
        if (r.valid) { filterErr.replaceChildren(); return true; }
        const parts = [el("div", { class: "filter-message",
          text: (r.line ? "line " + r.line + ", column " + r.column + ": " : "") + r.message })];
        if (r.line) {
          const line = src.split("\n")[r.line - 1] || "";
          parts.push(el("pre", { text: line }), el("pre", { class: "caret", text: " ".repeat(Math.max(0, r.column - 1)) + "^" }));
        }
        filterErr.replaceChildren(...parts);
        return false;
      } catch (e) {
        filterErr.textContent = errText(e);
        filterErr.classList.remove("hidden");
        return false;
      }
    }
    let debounce = null;
    filter.addEventListener("input", () => { clearTimeout(debounce); debounce = setTimeout(checkFilter, 250); });
    filter.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); apply.click(); }
    });
    apply.addEventListener("click", async () => {
      if (!(await checkFilter())) return;
      group = null;
      loadMessages();
      reportBody.replaceChildren();
      if (!panes.report.classList.contains("hidden")) loadReport();
    });
    bySel.addEventListener("change", () => byAttr.classList.toggle("hidden", bySel.value !== "attribute"));

    function byValue() { return bySel.value === "attribute" ? "attribute:" + byAttr.value.trim() : bySel.value; }

    async function loadMessages() {
      info.textContent = "Reading…";
      msgBody.replaceChildren();
      groupNote.classList.toggle("hidden", !group);
      if (group) {
        groupNote.replaceChildren(el("span", { text: "Messages of " + group.by + " group “" + group.key + "”." }),
          el("button", { type: "button", id: "group-clear", text: "Show all", onclick: () => { group = null; loadMessages(); } }));
      }
      try {
        const r = await api("GET", "/v1/queues/" + encodeURIComponent(queue) + "/browse?" +
          qs({ filter: filter.value.trim(), limit: 200, by: group && group.by, key: group && group.key }));
        info.textContent = r.messages.length + " shown of " + r.read + " read" +
          (r.filter_errors ? ", " + r.filter_errors + " filter errors" : "") +
          (r.truncated ? ", stopped at 8 MiB of bodies (narrow the filter to see others)" : "") +
          (r.hold_limited ? ", stopped where the queue reached the provider's limit on messages leased at once (SQS: about 120,000 in flight, other consumers' leases included): " + r.held_back + " more not read" :
            r.held_back ? ", " + r.held_back + " more the provider would not let the read reach (an SQS FIFO group's messages behind those read)" : "") +
          (r.true_peek ? " (true peek: nothing was disturbed)." :
            " (no true peek here: reading leased and released them, which raised their delivery counts).") +
          (r.body_redacted ? " Bodies are redacted (serve.dashboard.show_bodies is off)." : "");
        msgBody.replaceChildren(...r.messages.flatMap((m) => messageRows(m)));
      } catch (e) {
        info.textContent = "";
        info.append(el("span", { class: "err", id: "messages-error", text: errText(e) }));
      }
    }

    function messageRows(m) {
      const detail = el("tr", { class: "detail hidden" }, el("td", { colspan: 6 }, messageDetail(m)));
      const row = el("tr", { class: "clickable message", "data-id": m.id, onclick: () => detail.classList.toggle("hidden") },
        el("td", {}, el("code", { text: m.id })), el("td", { class: "num", text: age(m.age_seconds) }),
        el("td", { class: "num", text: m.delivery_count === null ? "–" : m.delivery_count }),
        el("td", { text: m.reason || "–" }), el("td", { text: m.source || "–" }), el("td", { class: "num", text: m.body_bytes }));
      return [row, detail];
    }

    function messageDetail(m) {
      const body = el("pre", { class: "body" });
      let mode = "text";
      const toggle = el("button", { type: "button", text: "Show hex" });
      const render = () => {
        if (m.body_redacted) { body.textContent = "(redacted: " + m.body_bytes + " bytes)"; return; }
        if (mode === "text") { body.textContent = m.body_text; toggle.textContent = "Show hex"; return; }
        const bytes = Uint8Array.from(atob(m.body_base64), (c) => c.charCodeAt(0));
        const lines = [];
        for (let i = 0; i < bytes.length; i += 16) {
          const chunk = Array.from(bytes.slice(i, i + 16));
          lines.push(i.toString(16).padStart(6, "0") + "  " + chunk.map((b) => b.toString(16).padStart(2, "0")).join(" ").padEnd(48) +
            "  " + chunk.map((b) => (b >= 32 && b < 127 ? String.fromCharCode(b) : ".")).join(""));
        }
        body.textContent = lines.join("\n");
        toggle.textContent = "Show text";
      };
      toggle.addEventListener("click", (ev) => { ev.stopPropagation(); mode = mode === "text" ? "hex" : "text"; render(); });
      render();
      const attrs = Object.entries(m.attributes || {}).map(([k, a]) =>
        el("tr", {}, el("td", {}, el("code", { text: k })), el("td", { text: a.type + (a.data_type ? " (" + a.data_type + ")" : "") }),
          el("td", {}, el("code", { text: typeof a.value === "string" ? a.value : JSON.stringify(a.value) }))));
      const props = Object.entries(m.properties || {}).map(([k, v]) =>
        el("tr", {}, el("td", {}, el("code", { text: k })), el("td", { text: "property" }), el("td", {}, el("code", { text: v }))));
      const kv = (k, v) => el("tr", {}, el("th", { text: k }), el("td", { text: v === null || v === undefined ? "–" : v }));
      return el("div", { class: "grid2" },
        el("div", {}, el("table", { class: "kv" },
          kv("reason", m.reason), kv("description", m.description), kv("delivery count", m.delivery_count),
          kv("enqueued", when(m.enqueued_at)), kv("age", age(m.age_seconds)), kv("source", m.source),
          kv("ordering key", m.ordering_key), kv("pattern", m.pattern)),
          el("h2", { text: "Attributes" }),
          attrs.length || props.length
            ? el("table", {}, el("thead", {}, el("tr", {}, el("th", { text: "Name" }), el("th", { text: "Type" }), el("th", { text: "Value" }))), el("tbody", {}, attrs, props))
            : el("p", { class: "muted", text: "none" })),
        el("div", {}, el("div", { class: "row" }, el("strong", { text: "Body" }), m.body_redacted ? null : toggle), body));
    }

    async function loadReport() {
      reportInfo.textContent = "Reading…";
      reportBody.replaceChildren();
      try {
        const by = byValue();
        const r = await api("GET", "/v1/queues/" + encodeURIComponent(queue) + "/report?" + qs({ by, filter: filter.value.trim(), top: 20 }));
        reportInfo.textContent = r.matched + " matched of " + r.read + " read" + (r.capped ? " (stopped at the scan cap)" : "") +
          ". Click a group to see its messages.";
        const rows = r.groups.map((g) => el("tr", { class: "clickable group", "data-key": g.key,
          onclick: () => { group = { by, key: g.key }; showTab("messages"); loadMessages(); } },
          el("td", {}, el("span", { class: "link", text: g.key })), el("td", { class: "num", text: g.count }),
          el("td", { class: "num", text: (g.share * 100).toFixed(0) + "%" }), el("td", { text: when(g.first_enqueued_at) }),
          el("td", { text: when(g.last_enqueued_at) }),
          el("td", { text: g.min_delivery_count === null ? "–" : g.min_delivery_count + "–" + g.max_delivery_count })));
        if (r.other) rows.push(el("tr", {}, el("td", { class: "muted", text: "other (" + r.other.groups_folded + " groups)" }),
          el("td", { class: "num", text: r.other.count }), el("td", { class: "num", text: (r.other.share * 100).toFixed(0) + "%" }),
          el("td"), el("td"), el("td")));
        reportBody.replaceChildren(...rows);
      } catch (e) {
        reportInfo.textContent = "";
        reportInfo.append(el("span", { class: "err", text: errText(e) }));
      }
    }

    panes.actions.append(
      actionCard("redrive", "Redrive", "Move the matching messages back to their source (or to a destination).", [
        ["to", "Destination", "text", "default: each message's source"], ["rate", "Rate (msg/s)", "number", ""], ["max", "Cap (messages)", "number", ""]]),
      actionCard("purge", "Purge", "Delete the matching messages, each written to a backup file first (unless unticked).", [
        ["older_than", "Older than", "text", "e.g. 7d"], ["rate", "Rate (msg/s)", "number", ""], ["max", "Cap (messages)", "number", ""],
        ["backup", "Backup file", "checkbox", ""]]),
      actionCard("export", "Export", "Write the matching messages to a JSONL file on the server (serve.data_dir/exports).", [
        ["max", "Cap (messages)", "number", ""]]));

    // One action: form, dry run (count and sample), confirm, progress, summary.
    function actionCard(kind, title, help, fields) {
      const inputs = {};
      const form = el("div", { class: "row" }, fields.map(([name, label, type, ph]) => {
        const input = el("input", { id: kind + "-" + name, type, placeholder: ph });
        if (type === "checkbox") input.checked = true;
        if (type === "number") input.min = "1";
        inputs[name] = input;
        return el("span", {}, el("label", { for: kind + "-" + name, text: label + " " }), input);
      }));
      const out = el("div", { id: kind + "-result" });
      const dry = el("button", { type: "button", id: kind + "-dry-run", class: "primary", text: "Dry run" });
      const card = el("div", { class: "card", id: "action-" + kind }, el("h2", { text: title }),
        el("p", { class: "muted", text: help + " The filter above applies." }), form, el("div", { class: "row" }, dry), out);
      const body = (dryRun) => {
        const b = { filter: filter.value.trim() || (kind === "purge" ? "" : undefined), dry_run: dryRun };
        for (const [name, input] of Object.entries(inputs)) {
          if (input.type === "checkbox") b[name] = input.checked;
          else if (input.value.trim() !== "") b[name] = input.type === "number" ? Number(input.value) : input.value.trim();
        }
        return b;
      };
      dry.addEventListener("click", async () => {
        if (!(await checkFilter())) { out.replaceChildren(el("p", { class: "err", text: "Fix the filter first." })); return; }
        if (kind === "purge" && !filter.value.trim()) {
          out.replaceChildren(el("p", { class: "err", text: "A purge needs a filter (`true` purges everything)." }));
          return;
        }
        out.replaceChildren(el("p", { class: "muted", text: "Dry run…" }));
        try {
          const b = body(true);
          let summary;
          if (kind === "export") summary = await api("POST", "/v1/queues/" + encodeURIComponent(queue) + "/export", b);
          else summary = (await runAndWait(kind, b, out)).summary;
          if (!summary) return;
          const n = summary.matched;
          const samples = (summary.samples || []).slice(0, 10);
          const confirm = el("button", { type: "button", id: kind + "-confirm", class: kind === "purge" ? "danger" : "primary",
            text: "Confirm " + kind + " of up to " + n + " message" + (n === 1 ? "" : "s") });
          const cancel = el("button", { type: "button", text: "Cancel", onclick: () => out.replaceChildren() });
          out.replaceChildren(
            el("p", { id: kind + "-dry-result" }, el("strong", { class: "match-count", text: n }),
              " message" + (n === 1 ? "" : "s") + " match" + (n === 1 ? "es" : "") + " (dry run: nothing was " +
              (kind === "export" ? "written" : "moved or deleted") + ")."),
            samples.length ? el("table", { class: "summary" }, el("thead", {}, el("tr", {}, el("th", { text: "Sample ID" }),
              el("th", { text: "Reason" }), el("th", { text: kind === "redrive" ? "Destination" : "" }))),
            el("tbody", {}, samples.map((s) => el("tr", {}, el("td", {}, el("code", { text: s.id })),
              el("td", { text: s.reason || "–" }), el("td", { text: s.destination || "" }))))) : null,
            summary.destinations && Object.keys(summary.destinations).length
              ? el("p", { class: "muted", text: "Plan: " + Object.entries(summary.destinations).map(([d, c]) => c + " → " + d).join(", ") }) : null,
            el("div", { class: "row" }, confirm, cancel));
          confirm.disabled = n === 0;
          confirm.addEventListener("click", async () => {
            confirm.disabled = true;
            // What the user confirmed is what the dry run counted: messages
            // that arrive meanwhile are left for the next run.
            const real = body(false);
            real.max = real.max ? Math.min(real.max, n) : n;
            try {
              if (kind === "export") {
                const s = await api("POST", "/v1/queues/" + encodeURIComponent(queue) + "/export", real);
                out.replaceChildren(el("p", { id: kind + "-summary", class: "okc",
                  text: "Exported " + s.written + " of " + s.read + " read to " + s.file + (s.capped ? " (stopped at the cap)" : "") + "." }));
              } else {
                await runAndWait(kind, real, out);
              }
            } catch (e) {
              out.append(el("p", { class: "err", text: errText(e) }));
            }
          });
        } catch (e) {
          out.replaceChildren(el("p", { class: "err", id: kind + "-error", text: errText(e) }));
        }
      });
      return card;
    }

    // Start a redrive or purge run and follow it until it ends, showing live
    // progress, then its summary.
    async function runAndWait(kind, b, out) {
      const started = await api("POST", "/v1/queues/" + encodeURIComponent(queue) + "/" + kind, b);
      const bar = el("progress", { max: 1, value: 0 });
      const status = el("div", { id: kind + "-status", class: "muted" });
      out.replaceChildren(status, bar);
      for (;;) {
        const v = await api("GET", started.status_url);
        const p = v.progress;
        const total = b.max || Math.max(p.matched, 1);
        bar.max = total;
        bar.value = Math.min(p.settled + p.failed, total);
        status.textContent = (b.dry_run ? "dry run " : "") + v.status + ": examined " + p.examined + ", matched " + p.matched +
          (b.dry_run ? "" : ", sent " + p.sent + ", settled " + p.settled + ", failed " + p.failed);
        if (v.status !== "running") {
          if (!b.dry_run) {
            out.append(runSummary(kind, v, started.backup));
            if (v.status === "finished") status.classList.add("okc");
          }
          status.setAttribute("data-status", v.status);
          return v;
        }
        await new Promise((r) => setTimeout(r, 400));
      }
    }

    function runSummary(kind, v, backup) {
      const s = v.summary || {};
      const kv = (k, val) => el("tr", {}, el("th", { text: k }), el("td", { text: val === undefined || val === null ? "–" : val }));
      return el("table", { class: "summary kv", id: kind + "-summary" }, el("tbody", {},
        kv("run", v.run_id), kv("outcome", v.status + (s.stopped ? " (" + s.stopped + ")" : "")), kv("matched", s.matched),
        kv(kind === "purge" ? "backed up" : "sent", s.sent), kv(kind === "purge" ? "deleted" : "settled", s.settled),
        kv("failed", (s.send_failed || 0) + (s.settle_failed || 0)), kv("released (put back)", s.released),
        backup ? kv("backup", backup) : null, v.error ? kv("error", v.error) : null,
        (s.errors || []).length ? kv("errors", s.errors.join("; ")) : null));
    }

    loadMessages();
  }

  // ---- runs ------------------------------------------------------------------

  function renderRuns(main) {
    const tbody = el("tbody");
    main.append(el("h1", { text: "Runs" }),
      el("p", { class: "muted", text: "Redrives and purges: live ones from this replica, finished ones from the audit journal." }),
      el("table", { id: "runs" }, el("thead", {}, el("tr", {}, ["Started", "Queue", "Action", "Who", "Filter", "Matched", "Sent", "Settled", "Failed", "Outcome"]
        .map((h) => el("th", { text: h, class: ["Matched", "Sent", "Settled", "Failed"].includes(h) ? "num" : null })))), tbody));
    const load = async () => {
      try {
        const runs = await api("GET", "/v1/runs?limit=200");
        tbody.replaceChildren(...runs.map((r) => {
          const s = r.summary || {};
          const outcome = r.status + (s.stopped ? " (" + s.stopped + ")" : "") + (r.error ? ": " + r.error : "");
          return el("tr", { class: "run", "data-run": r.run_id },
            el("td", { text: when(r.started_at) }), el("td", { text: r.queue }),
            el("td", { text: r.action + (r.dry_run ? " (dry run)" : "") }), el("td", { text: r.trigger }),
            el("td", {}, el("code", { text: r.filter || "true" })), el("td", { class: "num", text: r.progress.matched }),
            el("td", { class: "num", text: r.progress.sent }), el("td", { class: "num", text: r.progress.settled }),
            el("td", { class: "num", text: r.progress.failed }),
            el("td", { class: r.status === "failed" ? "err" : r.status === "finished" ? "okc" : "" }, outcome,
              r.status === "running" ? el("button", { class: "stop", title: "Stop this run: it leases no more, finishes the sends it has out and releases the rest", onclick: async (ev) => {
                if (!confirm("Stop run " + r.run_id + " on " + r.queue + "? What it has not moved stays in the DLQ.")) return;
                ev.target.disabled = true;
                try { await api("POST", "/v1/runs/" + encodeURIComponent(r.run_id) + "/cancel"); } catch (e) { banner(errText(e)); }
                load();
              } }, "Stop") : null));
        }));
        if (!runs.length) tbody.append(el("tr", {}, el("td", { colspan: 10, class: "muted", text: "No runs yet." })));
        setUpdated();
      } catch (e) {
        banner(errText(e));
      }
    };
    load();
    state.timer = setInterval(load, REFRESH_MS);
  }

  // ---- start -------------------------------------------------------------------

  async function start() {
    $("#token-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const t = $("#token").value.trim();
      if (t) sessionStorage.setItem(TOKEN_KEY, t); else sessionStorage.removeItem(TOKEN_KEY);
      $("#token").value = "";
      showTokenState();
      route();
    });
    try {
      state.info = await api("GET", "/v1/info");
    } catch (e) {
      banner(errText(e));
    }
    showTokenState();
    window.addEventListener("hashchange", route);
    route();
  }
  document.addEventListener("DOMContentLoaded", start);
})();
