// StudioX console: a reference client that uses only the public HTTP contract.
//
// - The token is read from the URL fragment (#token=..., what `make run` prints: a fragment
//   never reaches a server) or typed in, and kept in sessionStorage (this tab) only.
// - The task types and each type's params form come from /openapi.json, so a new option (or
//   a new task type) appears here without touching this file.
// - Live status follows GET /api/tasks/{id}/events (Server-Sent Events, read with fetch so
//   the bearer token can be sent) when the document lists it, and polls GET /api/tasks/{id}
//   every second otherwise. The webhooks panel shows only when /api/webhooks is documented.
"use strict";

(() => {
  const TOKEN_KEY = "studiox.token";
  const FINAL = new Set(["completed", "failed", "cancelled", "expired"]);
  // HTTP/1.1 browsers open about 6 connections per origin: a stream holds one, so a few
  // tasks are streamed and the rest are polled.
  const MAX_STREAMS = 3;
  const POLL_MS = 1000;

  const $ = (id) => document.getElementById(id);
  const state = {
    token: null, doc: null, schemas: {}, paramsSchemaOf: {}, features: {},
    ledgerCursors: [null], ledgerIndex: 0, tasks: new Map(), taskCursor: null,
    followers: new Map(), streams: 0, localImages: new Map(), objectUrls: [],
    historyCursor: null, billingOff: false, paramsField: null, inputs: [], estimateTimer: null,
  };

  // --- small DOM helpers --------------------------------------------------------------------

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const fmtTime = (iso) => (iso ? new Date(iso).toLocaleString() : "–");
  const signed = (n) => (n > 0 ? `+${n}` : String(n));
  const shortId = (id) => String(id).slice(0, 8);
  const fmtBytes = (n) => (n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KiB`
    : `${(n / 1048576).toFixed(1)} MiB`);

  // --- the API ------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, body, headers) {
      super((body && body.error) || `HTTP ${status}`);
      this.status = status;
      this.code = (body && body.code) || "error";
      this.details = (body && body.details) || [];
      const retry = headers && headers.get("Retry-After");
      this.retryAfter = retry === null || retry === undefined ? null : retry;
    }
  }

  async function api(method, path, { json, body, headers = {}, raw = false } = {}) {
    const init = { method, headers: { ...headers } };
    if (state.token) init.headers.Authorization = `Bearer ${state.token}`;
    if (json !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(json);
    } else if (body !== undefined) {
      init.body = body;
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new ApiError(0, { error: `The API could not be reached (${err.message})`, code: "network" });
    }
    if (raw && response.ok) return response;
    if (response.status === 204) return null;
    const text = await response.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch { data = { error: text.slice(0, 200) }; }
    if (!response.ok) {
      const error = new ApiError(response.status, data, response.headers);
      if (response.status === 401 && path !== "/api/users/initialize") signOut(error.message);
      throw error;
    }
    return data;
  }

  // An error as the API answered it, for a person: what is missing (402), when to retry
  // (429), which field (400).
  function describeError(err) {
    const lines = [];
    if (err.status === 402) {
      lines.push(`Not enough credits: ${err.message}.`);
    } else if (err.status === 429) {
      // The countdown below comes from Retry-After (rate_limited has one; the in-flight limit
      // says to wait for a task to finish).
      lines.push(`Refused for now (${err.code}): ${err.message}`);
    } else if (err.status === 400) {
      lines.push(`Invalid request: ${err.message}`);
      for (const d of err.details.slice(0, 8)) lines.push(`• ${d.path || "(body)"}: ${d.message}`);
    } else if (err.status === 503 && err.code === "billing_not_configured") {
      lines.push("Billing is not configured on this server (no Stripe key), so nothing can be bought here.");
    } else if (err.status === 0) {
      lines.push(err.message);
    } else {
      lines.push(`${err.status} ${err.code}: ${err.message}`);
    }
    return lines;
  }

  function renderError(target, err) {
    target.replaceChildren(el("div", {
      class: `error status-${err.status}`, dataset: { status: String(err.status), code: err.code },
    }, ...describeError(err).map((line) => el("div", { text: line }))));
    if (err.status === 429 && err.retryAfter !== null && /^\d+$/.test(err.retryAfter)) {
      let left = Number(err.retryAfter);
      const counter = el("div", { class: "countdown" });
      target.firstChild.append(counter);
      const tick = () => {
        counter.textContent = left > 0 ? `You can retry in ${left} s.` : "You can retry now.";
        if (left-- > 0) setTimeout(tick, 1000);
      };
      tick();
    }
  }

  function alertError(err, context) {
    const box = el("div", { class: "alert" });
    renderError(box, err);
    box.prepend(el("strong", { text: `${context}: ` }));
    box.append(el("button", { type: "button", class: "dismiss", text: "×", "aria-label": "Dismiss",
      onclick: () => box.remove() }));
    $("alerts").prepend(box);
    while ($("alerts").children.length > 4) $("alerts").lastChild.remove();
  }

  // --- sign-in ------------------------------------------------------------------------------

  function takeTokenFromFragment() {
    const params = new URLSearchParams(location.hash.slice(1));
    const token = params.get("token");
    if (token) {
      sessionStorage.setItem(TOKEN_KEY, token);
      // Out of the address bar and the history: a copied link must not carry it.
      history.replaceState(null, "", location.pathname + location.search);
    }
  }

  function signOut(reason) {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    for (const follower of state.followers.values()) follower.stop();
    state.followers.clear();
    $("app").hidden = true;
    $("sign-out").hidden = true;
    $("who").textContent = "";
    $("signin").hidden = false;
    if (reason) alertError(new ApiError(401, { error: reason, code: "unauthorized" }), "Signed out");
  }

  // --- /openapi.json: task types and their params schemas -----------------------------------

  function resolve(schema) {
    let s = schema || {};
    while (s && s.$ref) s = state.schemas[s.$ref.split("/").pop()] || {};
    return s;
  }

  async function loadDocument() {
    const doc = await api("GET", "/openapi.json");
    state.doc = doc;
    state.schemas = doc.components.schemas;
    state.features = {
      events: Boolean(doc.paths["/api/tasks/{task_id}/events"]),
      webhooks: Boolean(doc.paths["/api/webhooks"]),
      estimate: Boolean(doc.paths["/api/tasks/estimate"]),
      retry: Boolean(doc.paths["/api/tasks/{task_id}/retry"]),
    };
    const create = state.schemas.CreateTaskBody;
    const types = create.properties.type.enum || [];
    // "Options of the task type: image_analysis: AnalysisParams, ..." names each type's schema;
    // a params schema whose description starts with "<type>:" is the fallback.
    const described = create.properties.params.description || "";
    for (const [, type, name] of described.matchAll(/([a-z][a-z0-9_]*): ([A-Z]\w*)/g)) {
      if (state.schemas[name]) state.paramsSchemaOf[type] = name;
    }
    for (const type of types) {
      if (state.paramsSchemaOf[type]) continue;
      const found = Object.entries(state.schemas).find(([, s]) => (s.description || "").startsWith(`${type}:`));
      if (found) state.paramsSchemaOf[type] = found[0];
    }
    return types;
  }

  // --- a form from a JSON schema ------------------------------------------------------------
  //
  // Each field returns {node, get}; get() gives undefined for "not set", so the API's own
  // defaults apply and only what the user chose is sent.

  function nonNull(schema) {
    const s = resolve(schema);
    const variants = s.anyOf || s.oneOf;
    if (!variants) return { schema: s, optional: false };
    const rest = variants.filter((v) => resolve(v).type !== "null");
    if (rest.length === 1) {
      return { schema: { ...resolve(rest[0]), title: s.title, description: s.description, default: s.default },
        optional: rest.length !== variants.length };
    }
    return { schema: s, optional: rest.length !== variants.length };
  }

  function label(name, schema) {
    return schema.title || name;
  }

  function hint(schema) {
    const bits = [];
    if (schema.description) bits.push(schema.description);
    if (schema.minimum !== undefined || schema.maximum !== undefined) {
      bits.push(`range ${schema.minimum ?? "…"}–${schema.maximum ?? "…"}`);
    }
    if (schema.default !== undefined && schema.default !== null) bits.push(`default ${JSON.stringify(schema.default)}`);
    return bits.join(" · ");
  }

  function scalarField(name, schemaIn, path) {
    const { schema } = nonNull(schemaIn);
    const id = `f-${path.replace(/[^a-zA-Z0-9]+/g, "-")}`;
    const wrap = el("div", { class: "field", dataset: { path } });
    const title = el("label", { for: id, text: label(name, schema) });
    const small = el("small", { text: hint(schema) });
    let control;
    let get;
    const variants = schema.oneOf || schema.anyOf;
    const stringVariant = variants ? variants.map(resolve).find((v) => v.type === "string") : null;
    if (schema.enum || schema.const !== undefined) {
      const values = schema.enum || [schema.const];
      control = el("select", { id, name: path },
        el("option", { value: "", text: schema.default !== undefined && schema.default !== null
          ? `default (${schema.default})` : "default" }),
        values.map((v) => el("option", { value: String(v), text: String(v) })));
      get = () => (control.value === "" ? undefined : values.find((v) => String(v) === control.value));
    } else if (schema.type === "boolean") {
      control = el("input", { id, name: path, type: "checkbox" });
      control.checked = schema.default === true;
      get = () => (control.checked === (schema.default === true) ? undefined : control.checked);
    } else if (schema.type === "integer" || schema.type === "number") {
      control = el("input", {
        id, name: path, type: "number", min: schema.minimum, max: schema.maximum,
        step: schema.multipleOf || (schema.type === "integer" ? 1 : "any"),
        placeholder: schema.default ?? "",
      });
      get = () => (control.value === "" ? undefined : Number(control.value));
    } else if (schema.type === "array" && ["integer", "number"].includes(resolve(schema.items).type)) {
      control = el("input", { id, name: path, type: "text", placeholder: "comma-separated numbers" });
      get = () => (control.value.trim() === "" ? undefined
        : control.value.split(/[\s,]+/).filter(Boolean).map(Number));
    } else if (schema.type === "string" || stringVariant) {
      const s = schema.type === "string" ? schema : stringVariant;
      control = el("input", { id, name: path, type: "text", maxlength: s.maxLength,
        placeholder: schema.default ?? "" });
      get = () => (control.value === "" ? undefined : control.value);
    } else {
      control = el("textarea", { id, name: path, rows: 2, placeholder: "JSON" });
      get = () => (control.value.trim() === "" ? undefined : JSON.parse(control.value));
    }
    wrap.append(title, control, small);
    return { node: wrap, get };
  }

  function objectFields(schema, path, skip = []) {
    const s = resolve(schema);
    const box = el("div", { class: "fields" });
    const fields = [];
    for (const [name, prop] of Object.entries(s.properties || {})) {
      if (skip.includes(name)) continue;
      const field = buildField(name, prop, path ? `${path}.${name}` : name);
      fields.push([name, field]);
      box.append(field.node);
    }
    const get = () => {
      const out = {};
      for (const [name, field] of fields) {
        const value = field.get();
        if (value !== undefined) out[name] = value;
      }
      return out;
    };
    return { node: box, get };
  }

  function unionArrayField(name, schema, path) {
    // A list of tagged objects (the edit operations): add, remove, reorder.
    const items = resolve(schema.items);
    const variants = (items.anyOf || items.oneOf || [items]).map(resolve);
    const tagged = variants.find((v) => v.discriminator);
    const mapping = tagged ? tagged.discriminator.mapping : {};
    const tag = tagged ? tagged.discriminator.propertyName : "op";
    const wrap = el("div", { class: "field list-field", dataset: { path } });
    const list = el("ol", { class: "ops" });
    const entries = [];
    const picker = el("select", { "aria-label": `Add to ${label(name, schema)}`, name: `${path}-add` },
      el("option", { value: "", text: `add ${label(name, schema).toLowerCase()}…` }),
      Object.keys(mapping).map((key) => el("option", { value: key, text: key })));
    const renumber = () => entries.forEach((entry, index) => {
      entry.item.dataset.path = `${path}[${index}]`;
    });
    const add = (key) => {
      const opSchema = resolve({ $ref: mapping[key] });
      const inner = objectFields(opSchema, `${path}[${entries.length}]`, [tag]);
      const item = el("li", { class: "op", dataset: { op: key } },
        el("div", { class: "op-head" }, el("strong", { text: key }),
          el("small", { text: opSchema.description || "" }),
          el("button", { type: "button", class: "remove", text: "remove", onclick: () => {
            entries.splice(entries.indexOf(entry), 1);
            item.remove();
            renumber();
            scheduleEstimate();
          } })),
        inner.node);
      const entry = { item, get: () => ({ [tag]: key, ...inner.get() }) };
      entries.push(entry);
      list.append(item);
      renumber();
    };
    picker.addEventListener("change", () => {
      if (picker.value) add(picker.value);
      picker.value = "";
      scheduleEstimate();
    });
    wrap.append(el("label", { text: label(name, schema) }), el("small", { text: hint(schema) }), list, picker);
    return { node: wrap, get: () => (entries.length ? entries.map((e) => e.get()) : undefined) };
  }

  function buildField(name, schemaIn, path) {
    const { schema } = nonNull(schemaIn);
    if (schema.type === "array" && resolve(schema.items).type !== "integer" && resolve(schema.items).type !== "number") {
      const items = resolve(schema.items);
      if (items.anyOf || items.oneOf || items.properties) return unionArrayField(name, schema, path);
    }
    if (schema.type === "object" && schema.properties) {
      const inner = objectFields(schema, path);
      const box = el("fieldset", { class: "field", dataset: { path } }, el("legend", { text: label(name, schema) }),
        inner.node);
      return { node: box, get: () => { const v = inner.get(); return Object.keys(v).length ? v : undefined; } };
    }
    return scalarField(name, schemaIn, path);
  }

  // --- account, credits, ledger ---------------------------------------------------------------

  async function loadAccount() {
    let me;
    try {
      me = await api("GET", "/api/users/me");
    } catch (err) {
      if (err.code !== "user_not_found") throw err;
      // A new user: the frontend's first call (idempotent).
      me = await api("POST", "/api/users/initialize", { json: {} });
    }
    const user = me.user;
    $("who").textContent = user.email || user.name || user.clerkId;
    const facts = [["Plan", user.planId], ["User", user.clerkId], ["Email", user.email || "–"],
      ["Member since", fmtTime(user.createdAt)]];
    $("account-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { text: k }),
      el("dd", { text: v, dataset: { fact: k.toLowerCase().replace(/\s+/g, "-") } })]));
    state.planId = user.planId;
    await loadCredits();
  }

  async function loadCredits() {
    const c = await api("GET", "/api/users/credits");
    const cell = (name, value, note) => el("div", { class: "bucket", dataset: { bucket: name } },
      el("span", { class: "amount", text: String(value) }), el("span", { class: "name", text: note }));
    $("credits").replaceChildren(
      cell("plan", c.planCredits, "plan credits (expire at reset)"),
      cell("purchased", c.purchasedCredits, "purchased (never expire)"),
      cell("total", c.credits, "total"),
      cell("reserved", c.reserved, "reserved by pending tasks"),
      cell("available", c.available, "available for new tasks"),
      el("div", { class: "reset", text: `Next reset: ${fmtTime(c.nextResetAt)}` }));
  }

  async function loadLedger(index = state.ledgerIndex) {
    const cursor = state.ledgerCursors[index];
    const query = new URLSearchParams({ limit: "10" });
    if (cursor) query.set("cursor", cursor);
    const page = await api("GET", `/api/users/transactions?${query}`);
    state.ledgerIndex = index;
    state.ledgerCursors[index + 1] = page.nextCursor;
    $("ledger-rows").replaceChildren(...page.transactions.map((t) => el("tr", { dataset: { type: t.type } },
      el("td", { text: fmtTime(t.createdAt) }), el("td", { text: t.type }),
      el("td", { class: t.amount < 0 ? "neg" : "pos", text: signed(t.amount) }),
      el("td", { text: signed(t.planDelta) }), el("td", { text: signed(t.purchasedDelta) }),
      el("td", { text: String(t.balanceAfter) }),
      el("td", { text: t.description || (t.taskId ? `task ${shortId(t.taskId)}` : "") }))));
    $("ledger-older").disabled = !page.nextCursor;
    $("ledger-newest").disabled = index === 0;
    $("ledger-newer").disabled = index === 0;
    $("ledger-page").textContent = `page ${index + 1}`;
  }

  async function refreshMoney() {
    await Promise.all([loadCredits(), loadLedger(0)]);
  }

  // --- new task -------------------------------------------------------------------------------

  function selectedType() { return $("task-type").value; }

  function renderParams() {
    const type = selectedType();
    const schemaName = state.paramsSchemaOf[type];
    const box = $("params-fields");
    if (!schemaName) {
      state.paramsField = { get: () => undefined };
      box.replaceChildren(el("p", { text: "This task type takes no parameters." }));
    } else {
      const schema = state.schemas[schemaName];
      state.paramsField = objectFields(schema, "params");
      box.replaceChildren(el("p", { class: "schema-note", text: schema.description || schemaName }),
        state.paramsField.node);
    }
    const video = type === "video_generation";
    $("task-file").multiple = video;
    const costs = state.taskCosts && state.taskCosts[type];
    $("cost-rule").textContent = costs ? costs.description : "";
    scheduleEstimate();
  }

  function taskInput() {
    const urls = $("task-url").value.split(/[\s,]+/).map((s) => s.trim()).filter(Boolean);
    const sources = [...state.inputs.map((u) => u.id), ...urls];
    if (!sources.length) return undefined;
    if (selectedType() === "video_generation") return sources;
    return sources[0];
  }

  function taskBody() {
    const body = { type: selectedType(), input: taskInput() };
    const params = state.paramsField ? state.paramsField.get() : undefined;
    if (params && Object.keys(params).length) body.params = params;
    return body;
  }

  async function uploadFiles(files) {
    const list = $("uploads");
    if (selectedType() !== "video_generation") {
      state.inputs = [];
      list.replaceChildren();
    }
    for (const file of files) {
      const form = new FormData();
      form.append("file", file, file.name);
      const item = el("li", { text: `uploading ${file.name}…` });
      list.append(item);
      try {
        const { upload } = await api("POST", "/api/uploads", { body: form });
        const url = URL.createObjectURL(file);
        state.objectUrls.push(url);
        state.localImages.set(upload.id, url);
        state.inputs.push(upload);
        item.replaceChildren(el("img", { src: url, alt: "", class: "thumb" }),
          `${file.name}: ${upload.width}×${upload.height}, ${fmtBytes(upload.size)} (upload ${shortId(upload.id)})`,
          el("button", { type: "button", class: "remove", text: "remove", onclick: () => {
            state.inputs = state.inputs.filter((u) => u.id !== upload.id);
            item.remove();
            scheduleEstimate();
          } }));
        item.dataset.upload = upload.id;
      } catch (err) {
        item.replaceChildren();
        renderError(item, err);
      }
    }
    scheduleEstimate();
  }

  function scheduleEstimate() {
    clearTimeout(state.estimateTimer);
    state.estimateTimer = setTimeout(estimate, 250);
  }

  async function estimate() {
    const box = $("estimate");
    if (!state.features.estimate) { box.textContent = ""; return; }
    let body;
    try { body = taskBody(); } catch (err) { box.textContent = `Parameters: ${err.message}`; return; }
    if (body.input === undefined) {
      box.replaceChildren(el("span", { text: "Choose an image (or give a URL) to see what it costs." }));
      return;
    }
    try {
      const e = await api("POST", "/api/tasks/estimate", { json: body });
      const reasons = [];
      if (!e.planAllows) reasons.push(`your plan (${state.planId}) does not include ${body.type}`);
      if (!e.affordable) reasons.push(`it costs ${e.cost} and you have ${e.available} available`);
      if (!e.hasRoom) reasons.push(`${e.inFlight} of ${e.maxInFlight} tasks already in flight`);
      box.replaceChildren(el("div", { class: e.wouldBeAccepted ? "ok" : "warn", dataset: { cost: String(e.cost) } },
        el("strong", { text: `Estimate: ${e.cost} credit${e.cost === 1 ? "" : "s"}` }),
        ` · available ${e.available} · in flight ${e.inFlight}/${e.maxInFlight} · `,
        e.wouldBeAccepted ? "would be accepted" : `would be refused: ${reasons.join("; ")}`));
    } catch (err) {
      renderError(box, err);
    }
  }

  function markFields(err) {
    for (const node of document.querySelectorAll("#task-form .invalid")) node.classList.remove("invalid");
    for (const d of err.details || []) {
      const path = d.path || "";
      const nodes = [...document.querySelectorAll("#task-form [data-path]")]
        .filter((n) => path === n.dataset.path || path.startsWith(`${n.dataset.path}.`) || path.startsWith(`${n.dataset.path}[`));
      const best = nodes.sort((a, b) => b.dataset.path.length - a.dataset.path.length)[0];
      if (best) best.classList.add("invalid");
    }
  }

  async function submitTask(event) {
    event.preventDefault();
    const errorBox = $("task-error");
    errorBox.replaceChildren();
    let body;
    try { body = taskBody(); } catch (err) { errorBox.textContent = `Parameters: ${err.message}`; return; }
    $("submit-task").disabled = true;
    try {
      // A retried submission (a lost answer) returns the same task, never a second one.
      const { task } = await api("POST", "/api/tasks/create", {
        json: body, headers: { "Idempotency-Key": crypto.randomUUID() },
      });
      markFields({});
      showTask(task, true);
      follow(task);
      refreshMoney().catch(() => {});
      scheduleEstimate();
    } catch (err) {
      renderError(errorBox, err);
      markFields(err);
    } finally {
      $("submit-task").disabled = false;
    }
  }

  // --- the task list and live status --------------------------------------------------------

  async function loadTasks(more = false) {
    const query = new URLSearchParams({ limit: "20" });
    if (more && state.taskCursor) query.set("cursor", state.taskCursor);
    const page = await api("GET", `/api/tasks?${query}`);
    state.taskCursor = page.nextCursor;
    $("tasks-more").hidden = !page.nextCursor;
    for (const task of page.tasks) {
      showTask(task, false);
      if (!FINAL.has(task.status)) follow(task);
    }
  }

  function showTask(task, prepend) {
    const previous = state.tasks.get(task.id);
    state.tasks.set(task.id, task);
    const row = el("tr", { id: `task-${task.id}`, class: `task status-${task.status}`,
      dataset: { status: task.status, type: task.type, taskId: task.id } },
      el("td", { text: fmtTime(task.createdAt) }),
      el("td", {}, task.type, el("br"), el("small", { text: shortId(task.id) })),
      el("td", { class: "status" }, el("span", { class: "badge", text: task.status }),
        task.status === "pending" && task.queuePosition ? el("small", { text: ` #${task.queuePosition} in queue` }) : null,
        task.error ? el("div", { class: "task-failure", text: `${task.errorCode || "error"}: ${task.error}` }) : null),
      el("td", {}, el("progress", { max: 100, value: task.progress }), el("small", { text: ` ${task.progress}%` })),
      el("td", { text: String(task.creditsUsed) }),
      el("td", { class: "actions" }, ...taskActions(task)));
    const existing = $(`task-${task.id}`);
    if (existing) existing.replaceWith(row);
    else if (prepend) $("task-rows").prepend(row);
    else $("task-rows").append(row);
    if (previous && previous.status === "pending" && task.status === "processing") {
      refreshMoney().catch(() => {});  // the worker charged it as it started
    }
    if (previous && !FINAL.has(previous.status) && FINAL.has(task.status)) {
      refreshMoney().catch(() => {});
      scheduleEstimate();
      if (task.status === "completed") showOutput(task);
    }
  }

  function taskActions(task) {
    const actions = [];
    if (!FINAL.has(task.status)) {
      actions.push(el("button", { type: "button", class: "cancel", text: "Cancel", onclick: () => cancelTask(task.id) }));
    }
    if (["failed", "cancelled", "expired"].includes(task.status) && state.features.retry) {
      actions.push(el("button", { type: "button", class: "retry", text: "Retry", onclick: () => retryTask(task.id) }));
    }
    if (task.status === "completed") {
      actions.push(el("button", { type: "button", class: "show", text: "Show", onclick: () => showOutput(task) }));
    }
    return actions;
  }

  async function cancelTask(id) {
    try {
      const { task } = await api("PATCH", `/api/tasks/${id}/cancel`);
      showTask(task, false);
      await refreshMoney();
    } catch (err) { alertError(err, "Cancel"); }
  }

  async function retryTask(id) {
    try {
      const { task } = await api("POST", `/api/tasks/${id}/retry`);
      showTask(task, true);
      follow(task);
      await refreshMoney();
    } catch (err) { alertError(err, "Retry"); }
  }

  function follow(task) {
    if (state.followers.has(task.id) || FINAL.has(task.status)) return;
    let follower;
    if (state.features.events && state.streams < MAX_STREAMS) {
      follower = streamTask(task.id);
    } else {
      follower = pollTask(task.id);
    }
    state.followers.set(task.id, follower);
    updateLiveMode();
  }

  function done(id) {
    const follower = state.followers.get(id);
    if (follower) follower.stop();
    state.followers.delete(id);
    updateLiveMode();
  }

  function updateLiveMode() {
    const kinds = [...state.followers.values()].map((f) => f.kind);
    const streams = kinds.filter((k) => k === "stream").length;
    $("live-mode").textContent = kinds.length
      ? `live: ${streams} streamed (Server-Sent Events), ${kinds.length - streams} polled every second`
      : (state.features.events ? "live status: Server-Sent Events" : "live status: polling every second");
  }

  function pollTask(id) {
    let stopped = false;
    let timer = null;
    const tick = async () => {
      if (stopped) return;
      try {
        const { task } = await api("GET", `/api/tasks/${id}`);
        showTask(task, false);
        if (FINAL.has(task.status)) { done(id); return; }
      } catch (err) {
        if (err.status === 404 || err.status === 401) { done(id); return; }
        if (err.status === 429 && /^\d+$/.test(err.retryAfter || "")) {
          // Rate limited: come back when the API says, not every second.
          if (!stopped) timer = setTimeout(tick, Number(err.retryAfter) * 1000);
          return;
        }
      }
      if (!stopped) timer = setTimeout(tick, POLL_MS);
    };
    timer = setTimeout(tick, 0);
    return { kind: "poll", stop: () => { stopped = true; clearTimeout(timer); } };
  }

  // SSE over fetch: EventSource cannot send an Authorization header.
  function streamTask(id) {
    const controller = new AbortController();
    let lastEventId = null;
    let failures = 0;
    state.streams += 1;
    let released = false;
    const release = () => { if (!released) { released = true; state.streams -= 1; } };
    const follower = { kind: "stream", stop: () => { controller.abort(); release(); } };

    const handle = (type, data) => {
      const current = state.tasks.get(id);
      if (data.task) { showTask(data.task, false); return; }
      if (!current) return;
      const next = { ...current };
      if (data.status) next.status = data.status;
      if (typeof data.progress === "number") next.progress = data.progress;
      if (type === "queue" && data.queuePosition !== undefined) next.queuePosition = data.queuePosition;
      if (type === "task.started") { next.status = "processing"; next.queuePosition = null; }
      showTask(next, false);
    };

    const run = async () => {
      while (!controller.signal.aborted) {
        const headers = { Authorization: `Bearer ${state.token}`, Accept: "text/event-stream" };
        if (lastEventId) headers["Last-Event-ID"] = lastEventId;
        let finished = false;
        try {
          const response = await fetch(`/api/tasks/${id}/events`, { headers, signal: controller.signal });
          if (response.status === 204) {
            finished = true;
          } else if (!response.ok) {
            throw new Error(`HTTP ${response.status}`);
          } else {
            failures = 0;
            const reader = response.body.getReader();
            const decoder = new TextDecoder();
            let buffer = "";
            let ev = { type: "message", data: [] };
            for (;;) {
              const { value, done: ended } = await reader.read();
              if (ended) break;
              buffer += decoder.decode(value, { stream: true });
              let newline;
              while ((newline = buffer.search(/\r\n|\n|\r/)) >= 0) {
                const line = buffer.slice(0, newline);
                buffer = buffer.slice(newline + (buffer.startsWith("\r\n", newline) ? 2 : 1));
                if (line === "") {
                  if (ev.data.length) {
                    const data = JSON.parse(ev.data.join("\n"));
                    handle(ev.type, data);
                    if (FINAL.has((data.task || {}).status) || /^task\.(completed|failed|cancelled|expired)$/.test(ev.type)) {
                      finished = true;
                    }
                  }
                  ev = { type: "message", data: [] };
                } else if (!line.startsWith(":")) {
                  const colon = line.indexOf(":");
                  const field = colon < 0 ? line : line.slice(0, colon);
                  const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
                  if (field === "event") ev.type = value;
                  else if (field === "data") ev.data.push(value);
                  else if (field === "id") lastEventId = value;
                }
              }
            }
          }
        } catch (err) {
          if (controller.signal.aborted) return;
          failures += 1;
        }
        if (finished) {
          // The final event carried the task; read it once more if it did not.
          const task = state.tasks.get(id);
          if (!task || !FINAL.has(task.status)) {
            try { showTask((await api("GET", `/api/tasks/${id}`)).task, false); } catch { /* shown on next load */ }
          }
          done(id);
          return;
        }
        if (failures >= 3) {
          // The stream keeps failing (a proxy that buffers it, say): poll instead.
          release();
          state.followers.set(id, pollTask(id));
          updateLiveMode();
          return;
        }
        await new Promise((r) => setTimeout(r, 2000));
      }
    };
    run();
    return follower;
  }

  // --- outputs ---------------------------------------------------------------------------------

  async function fetchOutput(task) {
    const response = await api("GET", task.outputUrl || `/api/tasks/${task.id}/output`, { raw: true });
    const blob = await response.blob();
    const url = URL.createObjectURL(blob);
    state.objectUrls.push(url);
    return { url, type: blob.type || task.outputType || "" };
  }

  async function showOutput(task) {
    const box = $("output");
    box.replaceChildren(el("h3", { text: `Output of ${task.type} ${shortId(task.id)}` }));
    box.dataset.taskId = task.id;
    try {
      if (task.type === "image_analysis" || (task.output && task.output.analysis)) {
        box.append(analysisView(task));
      } else if ((task.outputType || "").startsWith("video/") || task.type === "video_generation") {
        const { url } = await fetchOutput(task);
        const video = el("video", { src: url, controls: true, autoplay: true, muted: true, loop: true,
          playsinline: true, class: "output-video" });
        video.muted = true;
        box.append(video, el("div", {}, el("a", { href: url, download: `${task.id}.mp4`, text: "Download" })));
        video.play().catch(() => {});
      } else if (task.outputUrl) {
        const { url, type } = await fetchOutput(task);
        if (type.startsWith("image/")) {
          const source = typeof task.input === "string" ? task.input : (task.input || {}).uploadId;
          const before = source && state.localImages.get(source);
          box.append(el("div", { class: "before-after" },
            before ? el("figure", {}, el("img", { src: before, alt: "Input image", class: "output-image input-image" }),
              el("figcaption", { text: "before" })) : null,
            el("figure", {}, el("img", { src: url, alt: "Edited image", class: "output-image" }),
              el("figcaption", { text: "after" }))));
        }
        box.append(el("div", {}, el("a", { href: url, download: task.id, text: `Download (${type})` })));
      }
      if (task.output && !task.output.analysis) {
        box.append(el("details", {}, el("summary", { text: "Output JSON" }),
          el("pre", { text: JSON.stringify(task.output, null, 2) })));
      }
    } catch (err) {
      renderError(box, err);
    }
  }

  function analysisView(task) {
    const a = (task.output || {}).analysis || {};
    const view = el("div", { class: "analysis" });
    // The image with its face boxes: boxes are in the upright image's pixels, which is what
    // the browser shows (it applies EXIF orientation), so they are placed as fractions of it.
    const source = typeof task.input === "string" ? task.input : (task.input || {}).uploadId;
    const local = source && state.localImages.get(source);
    const faces = (a.faces && a.faces.boxes) || [];
    const figure = el("figure", { class: "faces" });
    const frame = el("div", { class: "frame" });
    if (local) {
      frame.append(el("img", { src: local, alt: "Analysed image" }));
    } else {
      frame.classList.add("placeholder");
      frame.append(el("span", { text: "(image not loaded here: only this tab's own uploads are shown; boxes are drawn to scale)" }));
    }
    const placeBoxes = (w, h) => {
      for (const b of faces) {
        const box = el("div", { class: "face-box", title: `face ${b.width}×${b.height} at ${b.x},${b.y}` });
        box.style.left = `${(100 * b.x) / w}%`;
        box.style.top = `${(100 * b.y) / h}%`;
        box.style.width = `${(100 * b.width) / w}%`;
        box.style.height = `${(100 * b.height) / h}%`;
        frame.append(box);
      }
    };
    const img = frame.querySelector("img");
    if (img) {
      img.addEventListener("load", () => placeBoxes(img.naturalWidth, img.naturalHeight), { once: true });
    } else {
      const upright = [5, 6, 7, 8].includes((a.exif || {}).orientation);
      const w = upright ? a.height : a.width;
      const h = upright ? a.width : a.height;
      frame.style.aspectRatio = `${w} / ${h}`;
      placeBoxes(w || 1, h || 1);
    }
    figure.append(frame, el("figcaption", { text: a.faces
      ? `${a.faces.count} face${a.faces.count === 1 ? "" : "s"} found (${a.faces.detector || "no detector"})`
      : "Face detection was off" }));
    view.append(figure);

    const swatches = el("div", { class: "palette" });
    for (const c of (a.colors && a.colors.dominant) || []) {
      const chip = el("span", { class: "swatch", title: c.hex });
      chip.style.backgroundColor = c.hex;
      swatches.append(el("div", { class: "colour" }, chip, el("code", { text: c.hex }),
        el("small", { text: ` ${(c.proportion * 100).toFixed(1)}%` })));
    }
    const rows = [
      ["Format", `${a.format} ${a.mode || ""}`], ["Size", `${a.width} × ${a.height} (${a.megapixels} MP)`],
      ["File", a.fileSize !== undefined ? fmtBytes(a.fileSize) : "–"],
      ["Kind", a.classification ? `${a.classification.label} — ${a.classification.reason}` : "–"],
      ["Palette", swatches],
      ["Tone", a.tone ? `${a.tone.label}: brightness ${a.tone.brightness}, contrast ${a.tone.contrast}` : "–"],
      ["Sharpness", a.sharpness ? `${a.sharpness.laplacianVariance}${a.sharpness.blurry ? " (blurry)" : ""}` : "–"],
      ["Hashes", a.hashes ? `pHash ${a.hashes.phash}, dHash ${a.hashes.dhash}` : "–"],
      ["Faces", a.faces ? faces.map((b) => `${b.width}×${b.height} at (${b.x}, ${b.y})`).join("; ") || "none" : "not searched"],
    ];
    if (a.exif) {
      for (const [k, v] of Object.entries(a.exif)) {
        if (v !== null && typeof v !== "object") rows.push([`EXIF ${k}`, String(v)]);
        else if (v && typeof v === "object") rows.push([`EXIF ${k}`, JSON.stringify(v)]);
      }
    }
    view.append(el("table", { class: "facts-table" }, el("tbody", {},
      rows.map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", {}, v))))));
    return view;
  }

  // --- billing --------------------------------------------------------------------------------

  function billingOff(err) {
    if (err.code === "billing_not_configured") {
      state.billingOff = true;
      $("billing-status").replaceChildren(el("div", { class: "notice", dataset: { code: err.code } },
        "Billing is not configured on this server (no Stripe key): plans and packs are shown, "
        + "but buying, upgrading and the portal are unavailable."));
      for (const b of document.querySelectorAll("#billing button.buy")) b.disabled = true;
      $("portal").disabled = true;
      return true;
    }
    return false;
  }

  async function checkout(path, body) {
    const status = $("billing-status");
    try {
      const answer = await api("POST", path, { json: body, headers: { "Idempotency-Key": crypto.randomUUID() } });
      if (answer.url) {
        status.replaceChildren(el("div", { class: "ok" }, "Redirecting to Stripe Checkout… ",
          el("a", { href: answer.url, text: "open it" })));
        window.location.assign(answer.url);
      } else {
        status.replaceChildren(el("div", { class: "ok", text: answer.message || `${answer.action}: ${answer.planId}` }));
        await loadBilling();
      }
    } catch (err) {
      if (!billingOff(err)) renderError(status, err);
    }
  }

  async function loadBilling() {
    const data = await api("GET", "/api/billing/plans");
    state.taskCosts = data.taskCosts;
    const money = (cents, currency) => new Intl.NumberFormat(undefined, { style: "currency",
      currency: (currency || "usd").toUpperCase() }).format(cents / 100);
    $("plans").replaceChildren(...data.plans.map((p) => el("div", { class: `card${p.id === state.planId ? " current" : ""}`,
      dataset: { plan: p.id } },
      el("h4", { text: p.name }), el("div", { text: `${money(p.priceCents, p.currency)} / month` }),
      el("div", { text: `${p.monthlyCredits} credits a month, ${p.maxConcurrentTasks} tasks at once` }),
      el("div", { text: p.allowedTaskTypes.join(", ") }),
      p.id === state.planId ? el("strong", { text: "Your plan" })
        : p.priceCents && !p.purchasable ? el("small", { class: "warn", text: "Not sold here (no Stripe price configured)" })
        : el("button", { type: "button", class: "buy", disabled: state.billingOff,
          text: p.priceCents ? `Switch to ${p.name}` : "Downgrade to free",
          onclick: () => checkout("/api/billing/upgrade-plan", { planId: p.id }) }))));
    $("packs").replaceChildren(...data.packs.map((p) => el("div", { class: "card", dataset: { pack: p.id } },
      el("h4", { text: p.name }), el("div", { text: `${p.credits} credits (never expire)` }),
      el("div", { text: money(p.priceCents, p.currency) }),
      el("button", { type: "button", class: "buy", disabled: state.billingOff, text: "Buy",
        onclick: () => checkout("/api/billing/purchase-credits", { pack: p.id }) }))));
    await loadHistory(false);
  }

  async function loadHistory(more) {
    const query = new URLSearchParams({ limit: "10" });
    if (more && state.historyCursor) query.set("cursor", state.historyCursor);
    const page = await api("GET", `/api/billing/history?${query}`);
    state.historyCursor = page.nextCursor;
    $("history-more").hidden = !page.nextCursor;
    const rows = page.entries.map((e) => {
      let what = e.kind;
      let details = "";
      if (e.purchase) {
        const p = e.purchase;
        what = `purchase of ${p.credits} credits`;
        details = `${p.status}${p.amountPaid !== null ? `, paid ${(p.amountPaid / 100).toFixed(2)} ${p.currency}` : ""}`
          + (p.amountRefunded ? `, refunded ${(p.amountRefunded / 100).toFixed(2)}` : "")
          + (p.disputeState ? `, dispute ${p.disputeState}` : "");
      } else if (e.planChange) {
        what = `plan ${e.planChange.fromPlanId} → ${e.planChange.toPlanId}`;
        details = e.planChange.reason;
      } else if (e.period) {
        what = `paid period ${e.period.period || ""}`;
        details = `${e.period.credits} credits${e.period.description ? `, ${e.period.description}` : ""}`;
      }
      return el("tr", {}, el("td", { text: fmtTime(e.at) }), el("td", { text: what }), el("td", { text: details }));
    });
    if (more) $("history-rows").append(...rows);
    else $("history-rows").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 3, text: "Nothing yet." }))]));
  }

  async function openPortal() {
    const status = $("billing-status");
    try {
      const { url } = await api("POST", "/api/billing/portal");
      window.location.assign(url);
    } catch (err) {
      if (billingOff(err)) return;
      if (err.code === "no_billing_account") {
        status.replaceChildren(el("div", { class: "notice", text: "No billing account yet: buy a pack or a plan first." }));
      } else {
        renderError(status, err);
      }
    }
  }

  // --- webhooks -------------------------------------------------------------------------------

  function webhookEvents() {
    const schema = state.schemas.CreateWebhookBody;
    const { schema: list } = nonNull(schema.properties.events);
    return resolve(list.items).enum || [];
  }

  async function loadWebhooks() {
    const { webhooks } = await api("GET", "/api/webhooks");
    $("webhook-rows").replaceChildren(...(webhooks.length ? webhooks.map((w) => el("tr", { dataset: { webhook: w.id } },
      el("td", { text: w.url }), el("td", { text: w.events.join(", ") }),
      el("td", { text: w.status + (w.disabledReason ? ` (${w.disabledReason})` : "")
        + (w.failingSince ? `, failing since ${fmtTime(w.failingSince)}` : "") }),
      el("td", { class: "actions" },
        el("button", { type: "button", text: "Deliveries", onclick: () => loadDeliveries(w) }),
        el("button", { type: "button", text: "Delete", onclick: async () => {
          try { await api("DELETE", `/api/webhooks/${w.id}`); await loadWebhooks(); } catch (err) { alertError(err, "Delete webhook"); }
        } }))))
      : [el("tr", {}, el("td", { colspan: 4, text: "No endpoints yet." }))]));
  }

  async function loadDeliveries(w) {
    const box = $("deliveries");
    try {
      const page = await api("GET", `/api/webhooks/${w.id}/deliveries?limit=20`);
      box.replaceChildren(el("h3", { text: `Deliveries to ${w.url}` }), el("table", { class: "list" },
        el("thead", {}, el("tr", {}, ["Created", "Event", "Status", "Attempts", "Next attempt"].map((h) => el("th", { text: h })))),
        el("tbody", {}, page.deliveries.length ? page.deliveries.map((d) => el("tr", {},
          el("td", { text: fmtTime(d.createdAt) }), el("td", { text: d.eventType }), el("td", { text: d.status }),
          el("td", { text: d.attempts.map((a) => (a.statusCode ? `${a.statusCode}` : a.error) + ` (${a.latencyMs} ms)`).join("; ") || "–" }),
          el("td", { text: fmtTime(d.nextAttemptAt) })))
          : [el("tr", {}, el("td", { colspan: 5, text: "No deliveries yet." }))])));
    } catch (err) { renderError(box, err); }
  }

  async function registerWebhook(event) {
    event.preventDefault();
    const events = [...document.querySelectorAll("#webhook-events input:checked")].map((i) => i.value);
    const body = { url: $("webhook-url").value.trim() };
    if (events.length) body.events = events;
    const box = $("webhook-secret");
    try {
      const created = await api("POST", "/api/webhooks", { json: body });
      box.replaceChildren(el("div", { class: "ok" }, "Registered. Its signing secret, shown only now: ",
        el("code", { text: created.secret })));
      $("webhook-url").value = "";
      await loadWebhooks();
    } catch (err) { renderError(box, err); }
  }

  // --- start ----------------------------------------------------------------------------------

  async function start() {
    $("signin").hidden = true;
    $("app").hidden = false;
    $("sign-out").hidden = false;
    try {
      const types = await loadDocument();
      await loadAccount();
      $("task-type").replaceChildren(...types.map((t) => el("option", { value: t, text: t })));
      await loadBilling().catch((err) => alertError(err, "Billing"));
      renderParams();
      await Promise.all([loadLedger(0), loadTasks()]);
      updateLiveMode();
      if (state.features.webhooks) {
        $("webhooks").hidden = false;
        $("webhook-events").replaceChildren(el("span", { text: "Events (none ticked: all)" }),
          ...webhookEvents().map((e) => el("label", { class: "check" }, el("input", { type: "checkbox", value: e }), e)));
        await loadWebhooks().catch((err) => alertError(err, "Webhooks"));
      }
      document.body.dataset.ready = "true";
    } catch (err) {
      if (err.status !== 401) alertError(err, "Loading");
    }
  }

  function wire() {
    $("signin-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token-input").value.trim().replace(/^Bearer\s+/i, "");
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      state.token = token;
      $("token-input").value = "";
      start();
    });
    $("sign-out").addEventListener("click", () => signOut());
    $("task-type").addEventListener("change", () => {
      if (selectedType() !== "video_generation" && state.inputs.length > 1) {
        state.inputs = state.inputs.slice(0, 1);
        [...$("uploads").children].slice(1).forEach((n) => n.remove());
      }
      renderParams();
    });
    $("task-file").addEventListener("change", (event) => {
      const files = [...event.target.files];
      event.target.value = "";
      if (files.length) uploadFiles(files);
    });
    $("task-url").addEventListener("input", scheduleEstimate);
    $("params-fields").addEventListener("input", scheduleEstimate);
    $("params-fields").addEventListener("change", scheduleEstimate);
    $("task-form").addEventListener("submit", submitTask);
    $("tasks-more").addEventListener("click", () => loadTasks(true).catch((err) => alertError(err, "Tasks")));
    $("ledger-older").addEventListener("click", () => loadLedger(state.ledgerIndex + 1).catch((err) => alertError(err, "Ledger")));
    $("ledger-newer").addEventListener("click", () => loadLedger(Math.max(0, state.ledgerIndex - 1))
      .catch((err) => alertError(err, "Ledger")));
    $("ledger-newest").addEventListener("click", () => loadLedger(0).catch((err) => alertError(err, "Ledger")));
    $("history-more").addEventListener("click", () => loadHistory(true).catch((err) => alertError(err, "History")));
    $("portal").addEventListener("click", openPortal);
    $("webhook-form").addEventListener("submit", registerWebhook);
  }

  document.addEventListener("DOMContentLoaded", () => {
    wire();
    takeTokenFromFragment();
    state.token = sessionStorage.getItem(TOKEN_KEY);
    if (state.token) start();
    else $("signin").hidden = false;
  });
})();
