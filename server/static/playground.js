// The playground. It knows the server only through the public API: the models and their limits from
// /v1/models, the cache policies a request can carry from the request schema in /openapi.json (so a
// method, a field or a new kind of policy added to the server shows up here without a change), and
// runs each column as a job whose events it follows. The uncached column is the reference: every
// other column's speedup and PSNR are measured against it, on the pixels the browser decodes.
"use strict";

const MAX_POLICIES = 4;
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const API_KEY = document.querySelector('meta[name="ditcache-api-key"]').content;
const $ = (selector, root = document) => root.querySelector(selector);

const page = {
  models: new Map(), // id -> model card
  cacheKinds: [], // what a policy slot can be, read from the schema
  runs: [], // the columns of the current comparison
  inputs: { image: null, mask: null }, // the files given, each { name, url, width, height, ready }
  sizeTouched: false, // whether the user edited width or height since choosing the model
};
// The tasks of a model card that take an image in, and those of them that take a strength.
const IMAGE_TASKS = ["image_to_image", "inpainting", "edit", "image_to_video"];
const STRENGTH_TASKS = ["image_to_image", "inpainting"];

// -- talking to the API ----------------------------------------------------------------------------

function authHeaders(extra = {}) {
  return API_KEY ? { ...extra, Authorization: `Bearer ${API_KEY}` } : { ...extra };
}

async function api(path, init = {}) {
  const response = await fetch(path, { ...init, headers: authHeaders(init.headers) });
  if (!response.ok) throw await apiError(response);
  return response;
}

// The server's error envelope, kept whole: status, code, message, param, request id.
async function apiError(response) {
  let envelope = null;
  try {
    envelope = (await response.json()).error;
  } catch {
    // Not one of ours (a proxy's page, say): described by its status alone.
  }
  if (!envelope || typeof envelope !== "object") {
    envelope = { code: "http_error", message: `${response.status} ${response.statusText}` };
  }
  const error = new Error(envelope.message);
  error.status = response.status;
  error.envelope = envelope;
  return error;
}

function describeError(error) {
  const envelope = error.envelope || { code: "network_error", message: String(error.message || error) };
  const lines = [`${error.status ? `${error.status} ` : ""}${envelope.code}: ${envelope.message}`];
  if (envelope.param) lines.push(`field: ${envelope.param}`);
  if (envelope.request_id) lines.push(`request id: ${envelope.request_id}`);
  return lines.join("\n");
}

function showError(box, error) {
  box.textContent = describeError(error);
  box.hidden = false;
}

// -- the cache policies the schema allows ------------------------------------------------------------

function resolve(schema, root) {
  if (schema && schema.$ref) return resolve(root.components.schemas[schema.$ref.split("/").pop()], root);
  return schema;
}

// Every object the ``cache`` field accepts, with null and the nesting of anyOf / oneOf taken away.
function cacheMembers(schema, root) {
  schema = resolve(schema, root);
  const alternatives = schema.anyOf || schema.oneOf;
  if (alternatives) return alternatives.flatMap((member) => cacheMembers(member, root));
  return schema.type === "null" ? [] : [schema];
}

// One kind per method, per preset, and per any other shape of policy the server accepts.
function cacheKinds(openapi) {
  const request = openapi.components.schemas.GenerationRequest;
  const kinds = [];
  for (const member of cacheMembers(request.properties.cache, openapi)) {
    const properties = member.properties || {};
    const required = member.required || [];
    const tag = Object.entries(properties).find(([, property]) => property.const !== undefined);
    if (tag) {
      const [name, property] = tag;
      const fields = Object.fromEntries(Object.entries(properties).filter(([key]) => key !== name));
      kinds.push({ id: `${name}:${property.const}`, label: property.const, fixed: { [name]: property.const }, fields, required });
      continue;
    }
    const names = Object.keys(properties);
    const only = names.length === 1 ? resolve(properties[names[0]], openapi) : null;
    if (only && only.enum) {
      for (const value of only.enum) {
        kinds.push({ id: `${names[0]}:${value}`, label: `${names[0]} ${value}`, fixed: { [names[0]]: value }, fields: {}, required: [] });
      }
      continue;
    }
    kinds.push({ id: member.title, label: member.title, fixed: {}, fields: properties, required });
  }
  return kinds.map((kind) => ({ ...kind, fields: Object.fromEntries(
    Object.entries(kind.fields).map(([name, property]) => [name, resolve(property, openapi)])) }));
}

function kindAvailable(kind, model) {
  if ("method" in kind.fixed) return kind.fixed.method !== "none" && model.cache_methods.includes(kind.fixed.method);
  if ("preset" in kind.fixed) return kind.fixed.preset in model.presets;
  return true;
}

// -- one input per schema field ----------------------------------------------------------------------

function nullable(property) {
  const alternatives = property.anyOf || [];
  const nonNull = alternatives.filter((alternative) => alternative.type !== "null");
  if (alternatives.length && nonNull.length === 1) return { schema: { ...nonNull[0], default: property.default }, nullable: true };
  return { schema: property, nullable: false };
}

function numberInput(schema, value, placeholder) {
  const input = document.createElement("input");
  input.type = "number";
  input.step = schema.type === "integer" ? "1" : "any";
  if (schema.minimum !== undefined) input.min = schema.minimum;
  if (schema.maximum !== undefined) input.max = schema.maximum;
  if (value !== undefined && value !== null) input.value = value;
  input.placeholder = placeholder;
  return input;
}

function readNumber(input, schema, isNullable) {
  if (input.value === "") return isNullable ? null : undefined;
  return schema.type === "integer" ? Math.trunc(Number(input.value)) : Number(input.value);
}

// A labelled control for one field, and how to read its value back (undefined: leave it out).
function fieldControl(name, property) {
  const { schema, nullable: isNullable } = nullable(property);
  const label = document.createElement("label");
  label.dataset.field = name;
  label.title = property.description || schema.description || name;
  const text = name.replace(/_/g, " ");
  const fallback = schema.default === undefined ? null : schema.default;
  let read;
  if (schema.type === "boolean") {
    const input = document.createElement("input");
    input.type = "checkbox";
    input.checked = Boolean(fallback);
    label.classList.add("check");
    label.append(input, text);
    read = () => input.checked;
  } else if (schema.enum) {
    const select = document.createElement("select");
    for (const value of schema.enum) select.append(new Option(value, value, false, value === fallback));
    label.append(text, select);
    read = () => select.value;
  } else if (schema.type === "integer" || schema.type === "number") {
    const input = numberInput(schema, fallback, isNullable ? "null" : "");
    label.append(text, input);
    read = () => readNumber(input, schema, isNullable);
  } else if (schema.type === "array" && (schema.prefixItems || []).length === 2) {
    // A [low, high] range: two numbers side by side.
    const pair = (schema.prefixItems || []).map((item, i) => numberInput(item, fallback ? fallback[i] : undefined, i ? "high" : "low"));
    const box = document.createElement("span");
    box.append(...pair);
    label.append(text, box);
    read = () => {
      const values = pair.map((input, i) => readNumber(input, schema.prefixItems[i], true));
      if (values.every((value) => value === null)) return isNullable ? null : undefined;
      return values;
    };
  } else if (schema.type === "string") {
    const input = document.createElement("input");
    input.type = "text";
    input.value = fallback ?? "";
    label.append(text, input);
    read = () => (input.value === "" && isNullable ? null : input.value);
  } else {
    // Anything else the schema may grow: edited as JSON.
    const input = document.createElement("input");
    input.type = "text";
    input.value = fallback === null ? "" : JSON.stringify(fallback);
    input.placeholder = "JSON";
    label.append(text, input);
    read = () => (input.value.trim() === "" ? (isNullable ? null : undefined) : JSON.parse(input.value));
  }
  return { label, read, fallback };
}

// -- policy slots ------------------------------------------------------------------------------------

function addPolicy(kindId) {
  const slot = $("#policy-template").content.firstElementChild.cloneNode(true);
  slot.controls = [];
  $(".policy-kind", slot).addEventListener("change", () => renderPolicyFields(slot));
  $(".remove-policy", slot).addEventListener("click", () => {
    slot.remove();
    updatePolicyButtons();
  });
  $("#policy-list").append(slot);
  fillPolicyKinds(slot, kindId);
  updatePolicyButtons();
}

function updatePolicyButtons() {
  const count = document.querySelectorAll("#policy-list .policy").length;
  $("#add-policy").disabled = count >= MAX_POLICIES;
}

function fillPolicyKinds(slot, wanted) {
  const select = $(".policy-kind", slot);
  const model = currentModel();
  const keep = wanted || select.value;
  select.replaceChildren();
  for (const kind of page.cacheKinds) {
    if (model && kindAvailable(kind, model)) select.append(new Option(kind.label, kind.id));
  }
  if ([...select.options].some((option) => option.value === keep)) select.value = keep;
  renderPolicyFields(slot);
}

function renderPolicyFields(slot) {
  const kind = page.cacheKinds.find((candidate) => candidate.id === $(".policy-kind", slot).value);
  const box = $(".policy-fields", slot);
  box.replaceChildren();
  slot.controls = [];
  $(".policy-note", slot).textContent = "";
  if (!kind) return;
  for (const [name, property] of Object.entries(kind.fields)) {
    const control = fieldControl(name, property);
    slot.controls.push({ name, ...control, required: kind.required.includes(name) });
    box.append(control.label);
  }
  if ("preset" in kind.fixed) {
    // What the preset means on this model, as the server expands it.
    $(".policy-note", slot).textContent = JSON.stringify(currentModel().presets[kind.fixed.preset]);
  }
}

// The ``cache`` body of a slot: its kind's fixed keys, and each field that differs from its default.
function readPolicy(slot) {
  const kind = page.cacheKinds.find((candidate) => candidate.id === $(".policy-kind", slot).value);
  const cache = { ...kind.fixed };
  for (const control of slot.controls) {
    let value;
    try {
      value = control.read();
    } catch {
      throw Object.assign(new Error(`${control.name}: not valid JSON`), {
        envelope: { code: "invalid_request", message: "not valid JSON", param: `cache.${control.name}` },
      });
    }
    if (value === undefined) continue;
    if (control.required || JSON.stringify(value) !== JSON.stringify(control.fallback)) cache[control.name] = value;
  }
  return { slot, label: kind.label, cache };
}

// -- the request form --------------------------------------------------------------------------------

function currentModel() {
  return page.models.get($("#model").value);
}

function setNumber(id, value, { min, max, step }) {
  const input = $(`#${id}`);
  input.min = min;
  input.max = max;
  input.step = step;
  input.value = value ?? "";
}

function applyModel() {
  const model = currentModel();
  const { defaults, limits } = model;
  const multiple = model.size_multiple;
  setNumber("width", defaults.width, { min: multiple, max: limits.max_width, step: multiple });
  setNumber("height", defaults.height, { min: multiple, max: limits.max_height, step: multiple });
  setNumber("steps", defaults.steps, { min: 1, max: limits.max_steps, step: 1 });
  $("#guidance_scale").value = defaults.guidance_scale;
  const video = model.kind === "video";
  $("#frames-field").hidden = !video;
  if (video) setNumber("num_frames", defaults.num_frames, { min: 1, max: limits.max_frames, step: model.frame_step });
  const format = $("#output_format");
  format.replaceChildren(...model.output_formats.map((name) => new Option(name, name)));
  // Frames can be compared only where the browser decodes them one by one: animated WebP or GIF.
  format.value = video ? (["webp", "gif"].find((name) => model.output_formats.includes(name)) || model.output_formats[0]) : model.output_formats[0];
  $("#model-info").textContent = `${model.kind}, ${model.family}; ${(model.tasks || []).join(", ")}`;
  const frames = video ? `, frames 1 + ${model.frame_step}k up to ${limits.max_frames}` : "";
  $("#limits").textContent = `Sizes in multiples of ${multiple}, up to ${limits.max_width}x${limits.max_height} and ${limits.max_pixels} pixels; steps up to ${limits.max_steps}${frames}.`;
  page.sizeTouched = false;
  applyAdapters(model);
  applyImageControls();
  for (const slot of document.querySelectorAll("#policy-list .policy")) fillPolicyKinds(slot);
}

// A checkbox and a scale for each adapter on the model's card.
function applyAdapters(model) {
  const adapters = model.adapters || [];
  $("#adapters").hidden = adapters.length === 0;
  $("#adapter-list").replaceChildren(...adapters.map((adapter) => {
    const label = document.createElement("label");
    label.className = "adapter";
    label.dataset.name = adapter.name;
    label.title = `rank ${adapter.rank}, ${adapter.modules} modules`;
    const use = document.createElement("input");
    use.type = "checkbox";
    use.className = "adapter-use";
    const scale = numberInput({ type: "number", minimum: -8, maximum: 8 }, 1, "1");
    scale.className = "adapter-scale";
    scale.step = "0.1";
    scale.setAttribute("aria-label", `${adapter.name} scale`);
    label.append(use, ` ${adapter.name} `, scale);
    return label;
  }));
}

function readAdapters() {
  return [...document.querySelectorAll("#adapter-list .adapter")]
    .filter((label) => $(".adapter-use", label).checked)
    .map((label) => {
      const scale = $(".adapter-scale", label).value;
      return { name: label.dataset.name, scale: scale === "" ? 1 : Number(scale) };
    });
}

function readRequest() {
  const model = currentModel();
  const number = (id) => ($(`#${id}`).value === "" ? undefined : Number($(`#${id}`).value));
  if ($("#seed").value === "") $("#seed").value = Math.floor(Math.random() * 2 ** 31);
  const body = {
    model: model.id,
    prompt: $("#prompt").value,
    seed: number("seed"),
    width: number("width"),
    height: number("height"),
    steps: number("steps"),
    guidance_scale: number("guidance_scale"),
    output_format: $("#output_format").value,
  };
  if (model.kind === "video") body.num_frames = number("num_frames");
  if ($("#negative_prompt").value !== "") body.negative_prompt = $("#negative_prompt").value;
  const loras = readAdapters();
  if (loras.length) body.loras = loras;
  // What the image controls hold, where the model shows them. A mask or a strength goes as given,
  // image or not: where it cannot apply, the server's 422 says so, and the field is outlined.
  if (!$("#image-input").hidden) {
    const { image, mask } = page.inputs;
    if (image) body.image = inputUrl("image", image);
    if (mask && !$("#mask").hidden) body.mask = inputUrl("mask", mask);
    // A strength only where the task the request runs takes one: an edit model inpaints behind a mask
    // at a strength, and edits without one at none.
    const masked = body.mask !== undefined;
    if (!$("#strength-field").hidden && STRENGTH_TASKS.includes(imageTask(model, masked))) {
      body.strength = number("strength");
    }
  }
  for (const key of Object.keys(body)) if (body[key] === undefined) delete body[key];
  return body;
}

// -- the image in (and its mask) ---------------------------------------------------------------------

function takes(model, tasks) {
  return (model.tasks || []).some((task) => tasks.includes(task));
}

// The task a request with an image runs on the model, as the server picks it: inpainting with a mask,
// else a video from the image, else an edit model's edit, else image-to-image.
function imageTask(model, masked) {
  if (masked) return "inpainting";
  if (model.kind === "video") return "image_to_video";
  return (model.tasks || []).includes("edit") ? "edit" : "image_to_image";
}

// The image controls the model's card calls for: an image for any task that takes one, a mask for
// inpainting, a strength for image-to-image and inpainting (an edit, or an image animated into a
// video, takes none: an edit model with an inpainting pipeline shows it, and sends it with a mask).
function applyImageControls() {
  const model = currentModel();
  $("#image-input").hidden = !takes(model, IMAGE_TASKS);
  $("#mask").hidden = !takes(model, ["inpainting"]);
  $("#strength-field").hidden = !takes(model, STRENGTH_TASKS);
  applySize();
}

// The image the next run sends, if any: one is given and the model takes it.
function activeImage() {
  return $("#image-input").hidden ? null : page.inputs.image;
}

// Width and height with an image in. Without width and height, the server gives the output the
// image's size (snapped down to the model's size multiple), which is what an edit usually wants,
// and what a comparison of policies on it needs no more than once: so while the user has not
// edited either field since choosing the model, both are emptied, left out of the request, and
// show as their placeholder the size the server will pick. Once the user edits either, the two
// are the user's, kept and sent as they are, image or not (a size half from the image and half
// from the model's defaults is one nobody asked for). With no image, they hold the model's defaults.
function applySize() {
  const model = currentModel();
  const image = activeImage();
  const snap = (value) => Math.max(model.size_multiple, Math.floor(value / model.size_multiple) * model.size_multiple);
  for (const id of ["width", "height"]) {
    const input = $(`#${id}`);
    input.placeholder = image && image.width ? `${snap(image[id])} (image)` : image ? "the image's" : "";
    if (page.sizeTouched) continue;
    input.value = image ? "" : (model.defaults[id] ?? "");
  }
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error || new Error("could not be read"));
    reader.readAsDataURL(file);
  });
}

// The picture's size as the browser decodes it; null where it cannot (the server will say why).
async function pictureSize(url) {
  const picture = new Image();
  picture.src = url;
  try {
    await picture.decode();
    return { width: picture.naturalWidth, height: picture.naturalHeight };
  } catch {
    return null;
  }
}

// A file chosen or dropped: read as a data URL (what the request carries), shown, measured.
function setInput(kind, file) {
  const input = { name: file.name, url: null, width: null, height: null, error: null };
  page.inputs[kind] = input;
  renderInput(kind);
  input.ready = (async () => {
    try {
      input.url = await readAsDataUrl(file);
      Object.assign(input, await pictureSize(input.url));
    } catch (error) {
      input.error = error;
    }
    // A later file may have taken its place meanwhile.
    if (page.inputs[kind] === input) {
      renderInput(kind);
      if (kind === "image") applySize();
    }
  })();
}

function clearInput(kind) {
  page.inputs[kind] = null;
  // So that choosing the same file again is a change.
  $(`#${kind}-file`).value = "";
  renderInput(kind);
  if (kind === "image") applySize();
}

function renderInput(kind) {
  const zone = $(`#${kind}`);
  const input = page.inputs[kind];
  const box = $(".drop-preview", zone);
  const preview = $(".preview", zone);
  zone.removeAttribute("aria-invalid");
  box.hidden = !input;
  zone.classList.toggle("filled", Boolean(input));
  if (!input) {
    preview.removeAttribute("src");
    return;
  }
  // A data: URL, which the page's Content-Security-Policy allows for images (img-src data: blob:).
  preview.hidden = !input.width;
  if (input.url && input.width) preview.src = input.url;
  let info;
  if (input.error) info = `${input.name}: could not be read (${input.error.message || input.error})`;
  else if (!input.url) info = `${input.name}: reading…`;
  else if (!input.width) info = `${input.name}: not an image this browser can show; the server will say what it makes of it`;
  else info = `${input.name}, ${input.width}×${input.height}`;
  $(".drop-info", zone).textContent = info;
  zone.dataset.state = input.error ? "error" : !input.url ? "reading" : input.width ? "ready" : "unreadable";
}

// The URL a request carries for a file; a file the browser could not read stops the run.
function inputUrl(kind, input) {
  if (input.url) return input.url;
  const message = `${input.name} could not be read: ${input.error ? input.error.message || input.error : "no data"}`;
  throw Object.assign(new Error(message), { envelope: { code: "invalid_request", message, param: kind } });
}

function wireDrop(kind) {
  const zone = $(`#${kind}`);
  $(`#${kind}-file`).addEventListener("change", (event) => {
    const [file] = event.target.files;
    if (file) setInput(kind, file);
  });
  $(".drop-clear", zone).addEventListener("click", () => clearInput(kind));
  const hasFiles = (event) => event.dataTransfer && [...event.dataTransfer.types].includes("Files");
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault();
      event.dataTransfer.dropEffect = "copy";
      zone.classList.add("dragging");
    });
  }
  zone.addEventListener("dragleave", (event) => {
    if (!zone.contains(event.relatedTarget)) zone.classList.remove("dragging");
  });
  zone.addEventListener("drop", (event) => {
    zone.classList.remove("dragging");
    if (!hasFiles(event)) return;
    event.preventDefault();
    event.stopPropagation();
    const [file] = event.dataTransfer.files;
    if (file) setInput(kind, file);
  });
}

// Marks the control a 422 blames: a request field, or a field of one column's policy.
function markInvalid(param, run) {
  if (!param) return;
  // "image", "image.0" or "image[0]" (one of several images): the image's drop zone.
  const [head, ...rest] = param.split(/[.[]/);
  let control = null;
  if (head === "cache" && run && run.slot) {
    control = rest.length && rest[0] !== "method" && rest[0] !== "preset"
      ? $(`[data-field="${CSS.escape(rest[0])}"]`, run.slot)
      : $(".policy-kind", run.slot);
    control = control && (control.querySelector("input, select") || control);
  } else {
    control = document.getElementById(head);
  }
  if (control) control.setAttribute("aria-invalid", "true");
}

// -- one column: a job, its events, its result -------------------------------------------------------

function newRun(column, body) {
  const card = $("#card-template").content.firstElementChild.cloneNode(true);
  const run = { ...column, body: column.cache ? { ...body, cache: column.cache } : { ...body }, card, job: null, result: null, pixels: null };
  card.classList.toggle("baseline", !column.cache);
  card.dataset.column = column.cache ? "policy" : "uncached";
  $(".card-title", card).textContent = column.label;
  $(".card-policy", card).textContent = column.cache ? JSON.stringify(column.cache) : "no cache: the reference";
  $(".card-cancel", card).addEventListener("click", () => cancel(run));
  $(".card-copy", card).addEventListener("click", () => copyCurl(run));
  setStatus(run, "submitting");
  $("#results").append(card);
  return run;
}

function setStatus(run, text, progress) {
  $(".card-status", run.card).textContent = text;
  const bar = $(".card-progress", run.card);
  if (progress) {
    bar.max = progress.total_steps || 1;
    bar.value = progress.step;
  }
}

function showJob(run, job) {
  run.job = job;
  run.card.dataset.status = job.status;
  if (job.status === "queued") {
    setStatus(run, job.queue_position ? `queued, ${job.queue_position} ahead` : "queued, next", job.progress);
  } else if (job.status === "running") {
    setStatus(run, `step ${job.progress.step} of ${job.progress.total_steps}`, job.progress);
  } else {
    setStatus(run, job.status, job.progress);
  }
}

async function submit(run) {
  try {
    const response = await api("v1/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(run.body),
    });
    showJob(run, await response.json());
  } catch (error) {
    fail(run, error);
    return;
  }
  follow(run);
}

// The job's server-sent events, read with fetch: EventSource cannot send the API key.
async function follow(run) {
  try {
    const response = await api(`v1/jobs/${run.job.id}/events`, { headers: { Accept: "text/event-stream" } });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const data = buffer.slice(0, end).split("\n").filter((line) => line.startsWith("data:"));
        buffer = buffer.slice(end + 2);
        if (!data.length) continue; // a keep-alive comment
        const job = JSON.parse(data.map((line) => line.slice(5)).join("\n"));
        showJob(run, job);
        if (FINAL.has(job.status)) return finish(run, job);
      }
    }
    // The stream ended before the job did (a proxy cut it): ask for the job itself.
    const job = await (await api(`v1/jobs/${run.job.id}`)).json();
    return FINAL.has(job.status) ? finish(run, job) : follow(run);
  } catch (error) {
    fail(run, error);
  }
}

function fail(run, error) {
  run.done = true;
  run.card.dataset.status = "failed";
  setStatus(run, "failed");
  showError($(".card-error", run.card), error);
  if (error.envelope) markInvalid(error.envelope.param, run);
  settle();
  compare();
}

function finish(run, job) {
  run.done = true;
  if (job.status === "succeeded") {
    run.result = job.result;
    showMedia(run);
    $(".card-tools", run.card).hidden = false;
  } else if (job.error) {
    showError($(".card-error", run.card), { envelope: job.error });
  }
  settle();
  compare();
}

async function cancel(run) {
  if (!run.job || run.done) return;
  try {
    await api(`v1/jobs/${run.job.id}`, { method: "DELETE" });
  } catch (error) {
    showError($(".card-error", run.card), error);
  }
}

function settle() {
  const open = page.runs.filter((run) => !run.done);
  for (const run of page.runs) $(".card-cancel", run.card).hidden = Boolean(run.done);
  $("#run").disabled = open.length > 0;
  $("#cancel-all").disabled = open.length === 0;
  $("#status").textContent = open.length ? `${page.runs.length - open.length} of ${page.runs.length} done` : "";
}

// -- media and what they are compared on ------------------------------------------------------------

function bytesOf(b64) {
  const text = atob(b64);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  return bytes;
}

function showMedia(run) {
  const { result } = run;
  const url = `data:${result.media_type};base64,${result.data[0].b64_json}`;
  let element;
  if (result.media_type.startsWith("video/")) {
    element = document.createElement("video");
    Object.assign(element, { src: url, controls: true, loop: true, muted: true, autoplay: true });
  } else {
    element = document.createElement("img");
    element.src = url;
    element.alt = `${run.label}: ${run.body.prompt}`;
  }
  $(".card-media", run.card).replaceChildren(element);
}

// RGBA pixels of every frame, decoded by the browser as a person sees them.
async function decodePixels(result) {
  const bytes = bytesOf(result.data[0].b64_json);
  const canvas = document.createElement("canvas");
  canvas.width = result.width;
  canvas.height = result.height;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  const grab = (source) => {
    context.clearRect(0, 0, canvas.width, canvas.height);
    context.drawImage(source, 0, 0, canvas.width, canvas.height);
    return context.getImageData(0, 0, canvas.width, canvas.height).data;
  };
  if (result.kind === "image") {
    const bitmap = await createImageBitmap(new Blob([bytes], { type: result.media_type }));
    return [grab(bitmap)];
  }
  if (result.media_type === "video/mp4") throw new Error("frames are compared in gif or webp output");
  if (typeof ImageDecoder === "undefined") throw new Error("frames need a browser with ImageDecoder (https or localhost)");
  const decoder = new ImageDecoder({ data: bytes, type: result.media_type });
  await decoder.tracks.ready;
  const frames = [];
  for (let index = 0; index < decoder.tracks.selectedTrack.frameCount; index++) {
    const { image } = await decoder.decode({ frameIndex: index });
    frames.push(grab(image));
    image.close();
  }
  decoder.close();
  return frames;
}

function pixelsOf(run) {
  run.pixels = run.pixels || decodePixels(run.result);
  return run.pixels;
}

// PSNR over every colour sample of every frame, pooled: 10 log10(255² / mean squared error).
function psnr(reference, other) {
  if (reference.length !== other.length || reference.some((frame, i) => frame.length !== other[i].length)) {
    throw new Error("sizes differ");
  }
  let squared = 0;
  let count = 0;
  reference.forEach((frame, f) => {
    const mine = other[f];
    for (let i = 0; i < frame.length; i += 4) {
      for (let c = 0; c < 3; c++) {
        const d = frame[i + c] - mine[i + c];
        squared += d * d;
      }
      count += 3;
    }
  });
  return squared === 0 ? Infinity : 10 * Math.log10((255 * 255) / (squared / count));
}

function ms(value) {
  return value === undefined || value === null ? "–" : `${value >= 100 ? value.toFixed(0) : value.toFixed(1)} ms`;
}

function share(reused, computed) {
  const total = reused + computed;
  return total ? `${Math.round((100 * reused) / total)}% (${reused} of ${total})` : "–";
}

function speedup(reference, mine) {
  if (!reference || !mine) return null;
  return reference / mine;
}

function numbers(run, baseline, quality) {
  const { timings, cache } = run.result;
  const work = timings.total - timings.queue_wait;
  const rows = [
    ["task", run.result.task || "–"],
    ...(run.result.strength === undefined || run.result.strength === null ? [] : [["strength", String(run.result.strength)]]),
    ["denoising", `${ms(timings.denoising)}, ${timings.denoising_steps.length} steps`],
    ["total", ms(work)],
    ["queued", ms(timings.queue_wait)],
  ];
  if (baseline && baseline !== run) {
    // Of the denoising, which is what a cache can save; end to end adds encoding and decoding.
    const base = baseline.result.timings;
    const denoise = speedup(base.denoising, timings.denoising);
    const total = speedup(base.total - base.queue_wait, work);
    rows.push(["speedup", denoise === null ? "–" : `×${denoise.toFixed(2)}`, denoise]);
    rows.push(["end to end", total === null ? "–" : `×${total.toFixed(2)}`, total]);
  } else if (!run.cache) {
    rows.push(["speedup", "×1.00 (reference)"]);
  }
  if (cache) {
    rows.push(["denoiser calls", `${cache.steps_computed} computed, ${cache.steps_cached} cached`]);
    rows.push(["blocks reused", share(cache.blocks_reused, cache.blocks_computed)]);
    rows.push(["attention reused", share(cache.attention_reused, cache.attention_computed)]);
  } else {
    rows.push(["cache", "not reported (the server runs without cache hooks)"]);
  }
  const batch = run.result.batch;
  if (batch) {
    // The server merges concurrent requests' transformer forwards (--max-batch): how this one's ran.
    rows.push(["merged forwards", `${batch.merged} of ${batch.runs}, ${batch.mean.toFixed(2)} requests each on average, at most ${batch.largest}`]);
  }
  const loras = run.result.loras || [];
  if (loras.length) rows.push(["adapters", loras.map((lora) => `${lora.name} ×${lora.scale}`).join(", ")]);
  if (run.cache) rows.push(["PSNR", quality]);
  rows.push(["seed", String(run.result.seed)]);
  rows.push(["request id", run.result.request_id]);
  const list = $(".card-numbers", run.card);
  list.replaceChildren();
  for (const [term, value, ratio] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    dd.dataset.term = term;
    if (ratio !== undefined && ratio !== null) dd.className = ratio >= 1 ? "faster" : "slower";
    list.append(dt, dd);
  }
}

// Every finished column against the uncached one, once both are there.
async function compare() {
  const reference = page.runs.find((run) => !run.cache);
  const baseline = reference && reference.result ? reference : null;
  for (const run of page.runs) {
    if (!run.result) continue;
    if (!run.cache || !baseline) {
      numbers(run, baseline, reference && reference.done ? "– (the uncached run did not finish)" : "waiting for the uncached result");
      continue;
    }
    let quality;
    try {
      const value = psnr(await pixelsOf(baseline), await pixelsOf(run));
      quality = value === Infinity ? "∞ dB (identical)" : `${value.toFixed(2)} dB`;
    } catch (error) {
      quality = `– (${error.message})`;
    }
    numbers(run, baseline, quality);
  }
}

// -- curl ----------------------------------------------------------------------------------------------

// The longest body given as an argument (-d '...'); a longer one goes on standard input.
const CURL_ARGUMENT_MAX = 100_000;
const EXTENSIONS = { "image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "video/mp4": "mp4", "image/gif": "gif" };

function curlOf(run) {
  const quote = (text) => `'${text.replace(/'/g, `'\\''`)}'`;
  const url = new URL("v1/generations", window.location.href).href;
  const type = run.result.media_type;
  const lines = [`curl -s ${quote(url)}`, "-H 'Content-Type: application/json'", `-H ${quote(`Accept: ${type}`)}`];
  // The key itself stays out of the clipboard: the command reads it from the environment.
  if (API_KEY) lines.push('-H "Authorization: Bearer $DITCACHE_API_KEY"');
  const body = JSON.stringify(run.body);
  const output = `-o result.${EXTENSIONS[type] || "bin"}`;
  if (body.length <= CURL_ARGUMENT_MAX) {
    lines.push(`-d ${quote(body)}`, output);
    return lines.join(" \\\n  ");
  }
  // Linux takes one argument of at most 128 KiB (MAX_ARG_STRLEN): a body that carries a larger
  // image goes on curl's standard input, as a here-document. JSON.stringify writes no newline, so
  // no line of the body can end the document early.
  lines.push("--data-binary @-", `${output} <<'JSON'`);
  return `${lines.join(" \\\n  ")}\n${body}\nJSON`;
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // Refused (no permission, page not focused): the selection way below still works.
    }
  }
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.append(area);
  area.select();
  const copied = document.execCommand("copy");
  area.remove();
  return copied;
}

async function copyCurl(run) {
  const text = curlOf(run);
  $(".card-curl", run.card).textContent = text;
  const copied = await copyText(text);
  $(".card-copied", run.card).textContent = copied ? "copied" : "select it below";
  if (!copied) $("details", run.card).open = true;
}

// -- the page ------------------------------------------------------------------------------------------

async function runAll(event) {
  event.preventDefault();
  $("#page-error").hidden = true;
  for (const marked of document.querySelectorAll('[aria-invalid="true"]')) marked.removeAttribute("aria-invalid");
  let body;
  let policies;
  try {
    // A file just chosen or dropped may still be being read.
    await Promise.all(Object.values(page.inputs).filter(Boolean).map((input) => input.ready));
    body = readRequest();
    policies = [...document.querySelectorAll("#policy-list .policy")].map(readPolicy);
  } catch (error) {
    showError($("#page-error"), error);
    return;
  }
  $("#results").replaceChildren();
  page.runs = [{ label: "uncached", cache: null }, ...policies].map((column) => newRun(column, body));
  settle();
  // One after another, so that the uncached job is queued first and the columns run in order.
  const runs = page.runs;
  for (const run of runs) {
    if (runs.stopped) {
      run.done = true;
      run.card.dataset.status = "cancelled";
      setStatus(run, "cancelled before it was sent");
      settle();
    } else {
      await submit(run);
    }
  }
}

function cancelAll() {
  // Columns not sent yet are not sent at all.
  page.runs.stopped = true;
  page.runs.forEach(cancel);
}

async function start() {
  $("#form").addEventListener("submit", runAll);
  $("#add-policy").addEventListener("click", () => addPolicy());
  $("#cancel-all").addEventListener("click", cancelAll);
  $("#model").addEventListener("change", applyModel);
  for (const id of ["width", "height"]) $(`#${id}`).addEventListener("input", () => { page.sizeTouched = true; });
  for (const kind of ["image", "mask"]) wireDrop(kind);
  // A file dropped beside a drop zone would replace the page with itself: it is ignored instead.
  for (const type of ["dragover", "drop"]) {
    window.addEventListener(type, (event) => {
      if (event.dataTransfer && [...event.dataTransfer.types].includes("Files")) event.preventDefault();
    });
  }
  try {
    const [openapi, models] = await Promise.all([
      fetch("openapi.json").then((response) => (response.ok ? response.json() : Promise.reject(new Error(`openapi.json: ${response.status}`)))),
      api("v1/models").then((response) => response.json()),
    ]);
    page.cacheKinds = cacheKinds(openapi);
    for (const model of models.data) page.models.set(model.id, model);
  } catch (error) {
    showError($("#page-error"), error);
    $("#run").disabled = true;
    return;
  }
  $("#model").replaceChildren(...[...page.models.keys()].map((id) => new Option(id, id)));
  applyModel();
  for (const wanted of ["preset:fast", "preset:quality"]) addPolicy(wanted);
  document.body.dataset.ready = "true";
}

start();
