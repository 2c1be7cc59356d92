// The demo page's behaviour: pick or upload a source, search, show the results, keep the turns.
// Every text that comes from the server or the user is put in the page with textContent or attributes, never
// parsed as HTML.
"use strict";

(function () {
  const byId = (id) => document.getElementById(id);
  const grid = byId("gallery-grid");
  const form = byId("search-form");
  const textInput = byId("text");
  const kInput = byId("k");
  const statusLine = byId("status");
  const errorLine = byId("error");
  const results = byId("results");
  const trail = byId("trail");
  const turns = [];  // {source, text, k, results}
  let source = null;  // {path, url, name} for a gallery image, {file, url, name} for an upload
  let filter = byId("filter").value;

  function imageUrl(path) {
    return "/image/" + path.split("/").map(encodeURIComponent).join("/");
  }

  function element(tag, props, children) {
    const node = document.createElement(tag);
    Object.entries(props || {}).forEach(([key, value]) => {
      if (key === "text") node.textContent = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, value);
    });
    (children || []).forEach((child) => node.appendChild(child));
    return node;
  }

  function tile(path, caption, label, extra) {
    const children = [element("img", {src: imageUrl(path), alt: path, loading: "lazy"}),
                      element("span", {class: "caption", text: caption})];
    if (extra) children.push(extra);
    return element("li", {}, [element("button", {type: "button", class: "tile", "aria-label": label,
                                                 dataset: {path: path}}, children)]);
  }

  function setSource(next) {
    source = next;
    const img = byId("source-img");
    img.src = next.url;
    img.alt = "Source: " + next.name;
    img.hidden = false;
    byId("source-name").textContent = "Source: " + next.name;
    errorLine.textContent = "";
  }

  function pickGallery(path) {
    setSource({path: path, url: imageUrl(path), name: path});
    statusLine.textContent = "Source picked: " + path + ". Type the change and press Enter.";
    textInput.focus();
  }

  // ---- the gallery picker: filter and pages through GET /gallery, so the turns stay on the page ----
  function showGallery(listing) {
    grid.replaceChildren(...listing.files.map((p) => tile(p, p, "Use " + p + " as the source")));
    byId("gallery-count").textContent =
      listing.total + " images \u00b7 page " + listing.page + " of " + listing.pages;
    const prev = byId("prev-page"), next = byId("next-page");
    prev.hidden = listing.page <= 1;
    next.hidden = listing.page >= listing.pages;
    prev.dataset.page = listing.page - 1;
    next.dataset.page = listing.page + 1;
  }

  async function loadGallery(page) {
    const query = new URLSearchParams({q: filter, page: String(page)});
    try {
      const answer = await fetch("/gallery?" + query.toString());
      showGallery(await answer.json());
    } catch (err) {
      errorLine.textContent = "The gallery could not be loaded: " + err;
    }
  }

  byId("filter-form").addEventListener("submit", (event) => {
    event.preventDefault();
    filter = byId("filter").value;
    loadGallery(1);
  });
  ["prev-page", "next-page"].forEach((id) => byId(id).addEventListener("click", (event) => {
    event.preventDefault();
    loadGallery(Number(event.currentTarget.dataset.page));
  }));
  grid.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-path]");
    if (button) pickGallery(button.dataset.path);
  });

  byId("upload").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (!file) return;
    setSource({file: file, url: URL.createObjectURL(file), name: file.name + " (uploaded)"});
    statusLine.textContent = "Source uploaded: " + file.name + ". Type the change and press Enter.";
    textInput.focus();
  });

  // ---- search ----
  function showTurn(turn, number) {
    turns.forEach((t) => t.button && t.button.removeAttribute("aria-current"));
    if (turn.button) turn.button.setAttribute("aria-current", "true");
    const shown = byId("query-shown");
    byId("query-img").src = turn.source.url;
    byId("query-img").alt = "Query: " + turn.source.name;
    byId("query-caption").textContent = "Turn " + number + ": " + turn.source.name + " + \u201c" + turn.text + "\u201d";
    shown.hidden = false;
    results.replaceChildren(...turn.results.map((r) => tile(
      r.path, r.rank + ". " + r.path, "Result " + r.rank + ": " + r.path + ", score " + r.score.toFixed(4) +
      ". Use it as the next source",
      element("span", {class: "score", text: "score " + r.score.toFixed(4)}))));
  }

  function addTurn(turn) {
    turns.push(turn);
    const number = turns.length;
    const label = number + ". " + turn.source.name + " + \u201c" + turn.text + "\u201d";
    const button = element("button", {type: "button", class: "turn", "aria-label": "Show turn " + label}, [
      element("img", {src: turn.source.url, alt: turn.source.name}),
      element("span", {text: label})]);
    turn.button = button;
    button.addEventListener("click", () => showTurn(turn, number));
    trail.appendChild(element("li", {}, [button]));
    showTurn(turn, number);
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    errorLine.textContent = "";
    if (!source) {
      errorLine.textContent = "Pick a source image first (from the gallery, or upload one).";
      return;
    }
    const text = textInput.value.trim();
    if (!text) {
      errorLine.textContent = "Type how the source image should change.";
      textInput.focus();
      return;
    }
    const body = new FormData();
    if (source.file) body.append("image", source.file);
    else body.append("image_path", source.path);
    body.append("text", text);
    body.append("k", kInput.value);
    const asked = source;
    statusLine.textContent = "Searching\u2026";
    byId("submit").disabled = true;
    try {
      const answer = await fetch(form.getAttribute("action"), {method: "POST", body: body});
      const data = await answer.json();
      if (!answer.ok) {
        errorLine.textContent = data.error || ("The search failed (" + answer.status + ").");
        statusLine.textContent = "";
        return;
      }
      addTurn({source: asked, text: data.text, k: data.k, results: data.results});
      statusLine.textContent = data.results.length + " results for turn " + turns.length +
        ". Choose one to search on from it.";
    } catch (err) {
      errorLine.textContent = "The search failed: " + err;
      statusLine.textContent = "";
    } finally {
      byId("submit").disabled = false;
    }
  });

  results.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-path]");
    if (!button) return;
    pickGallery(button.dataset.path);
    textInput.value = "";
  });
})();
