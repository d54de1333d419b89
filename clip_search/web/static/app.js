// The search page: plain JavaScript, no build step, nothing from a CDN (it must work offline).
'use strict';

const $ = (id) => document.getElementById(id);
const form = $('search-form');
const queryInput = $('query');
const imageInput = $('image-input');
const dropZone = $('drop-zone');
let queryImage = null; // a File when searching by image

// With API keys, the API answers 401 until the page sends one: asked once, kept for this tab only.
const KEY_STORE = 'clip-search-api-key';

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? {'Authorization': `Bearer ${key}`} : {};
}

async function api(path, options = {}) {
  let response = await fetch(path, {...options, headers: {...(options.headers || {}), ...authHeaders()}});
  if (response.status === 401 && askForKey(sessionStorage.getItem(KEY_STORE) ? 'That key was refused.' : '')) {
    response = await fetch(path, {...options, headers: {...(options.headers || {}), ...authHeaders()}});
  }
  return response;
}

function askForKey(why) {
  const key = window.prompt(`${why} This search service needs an API key:`.trim());
  if (!key) return false;
  sessionStorage.setItem(KEY_STORE, key.trim());
  return true;
}

function showError(message) {
  $('error').textContent = message;
  $('error').hidden = !message;
}

function setImage(file) {
  if (file && !file.type.startsWith('image/')) {
    showError(`${file.name} is not an image`);
    return;
  }
  queryImage = file || null;
  $('image-chip').hidden = !queryImage;
  queryInput.hidden = Boolean(queryImage);
  if (queryImage) {
    $('image-preview').src = URL.createObjectURL(queryImage);
    $('image-name').textContent = queryImage.name || 'pasted image';
    search();
  } else {
    imageInput.value = '';
    queryInput.focus();
  }
}

function requestBody() {
  const limit = $('limit').value.trim();
  const filter = $('filter').value.trim();
  const maxDistance = $('max-distance').value.trim();
  if (queryImage) {
    const data = new FormData();
    data.append('image', queryImage, queryImage.name || 'image');
    data.append('limit', limit);
    data.append('filter', filter);
    data.append('max_distance', maxDistance);
    return {body: data};
  }
  return {
    body: JSON.stringify({
      query: queryInput.value,
      limit: limit === '' ? null : Number(limit),
      filter,
      max_distance: maxDistance === '' ? null : Number(maxDistance),
    }),
    headers: {'Content-Type': 'application/json'},
  };
}

async function search() {
  try {
    await runSearch();
  } finally {
    // finished searches, counted: lets a test wait for this search's answer, not the last one's
    document.body.dataset.searches = Number(document.body.dataset.searches || 0) + 1;
  }
}

async function runSearch() {
  if (!queryImage && !queryInput.value.trim()) {
    showError('Type a query or drop an image.');
    return;
  }
  showError('');
  document.body.classList.add('busy');
  const started = performance.now();
  try {
    const response = await api('/api/search', {method: 'POST', ...requestBody()});
    const answer = await response.json();
    if (!response.ok) {
      showError(answer.error || `search failed (${response.status})`);
      return;
    }
    render(answer, performance.now() - started);
    if (!queryImage) {
      history.replaceState(null, '', `?q=${encodeURIComponent(queryInput.value.trim())}`);
    }
  } catch (error) {
    showError(`The server did not answer: ${error.message}`);
  } finally {
    document.body.classList.remove('busy');
  }
}

function render(answer, elapsed) {
  const grid = $('results');
  grid.replaceChildren(...answer.matches.map(card));
  const n = answer.matches.length;
  const what = answer.query === '<image>' ? 'the image' : `“${answer.query}”`;
  $('summary').textContent = `${n} ${n === 1 ? 'match' : 'matches'} for ${what} · ${Math.round(elapsed)} ms`;
}

function card(match, index) {
  const kind = match.thumbnail ? 'image' : 'text';
  const article = element('article', `result is-${kind}`);
  article.dataset.id = match.id;
  article.dataset.distance = match.distance;
  const media = element('div', 'media');
  if (match.thumbnail) {
    const img = element('img');
    showThumbnail(img, match.thumbnail);
    img.alt = displayName(match);
    img.loading = 'lazy';
    img.addEventListener('error', () => media.replaceChildren(element('span', 'missing', 'image unavailable')));
    media.append(img);
  } else {
    media.append(element('blockquote', 'caption', match.text || match.id));
  }
  const meta = element('div', 'meta');
  const name = element('span', 'name', kind === 'image' ? displayName(match) : 'text');
  name.title = match.id;
  meta.append(element('span', 'rank', `#${index + 1}`), name);
  const score = element('div', 'score');
  const meter = element('span', 'meter');
  const fill = element('span');
  fill.style.width = `${Math.max(0, Math.min(1, 1 - match.distance)) * 100}%`;
  meter.append(fill);
  score.append(element('span', 'distance', match.distance.toFixed(3)), meter);
  score.title = 'cosine distance (smaller is closer)';
  article.append(media, meta, score);
  const tags = Object.entries(match.tags || {});
  if (tags.length) {
    const list = element('div', 'tags');
    for (const [key, value] of tags) list.append(element('span', 'tag', `${key}: ${value}`));
    article.append(list);
  }
  return article;
}

function showThumbnail(img, url) {
  if (!sessionStorage.getItem(KEY_STORE)) {
    img.src = url;
    return;
  }
  // an <img> cannot send the key: fetch the picture with it
  api(url)
    .then((response) => (response.ok ? response.blob() : Promise.reject(new Error(response.status))))
    .then((blob) => { img.src = URL.createObjectURL(blob); })
    .catch(() => img.dispatchEvent(new Event('error')));
}

function displayName(match) {
  if (match.text) return match.text;
  if (match.uri) return match.uri.split(/[\\/]/).pop();
  return match.id;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

async function loadStatus() {
  try {
    const response = await api('/api/status');
    const status = await response.json();
    if (!response.ok) throw new Error(status.error);
    const parts = [`${status.documents} documents`, `${status.shards.length} shards`];
    if (status.model) parts.push(status.model);
    $('status').textContent = parts.join(' · ');
    $('status').classList.add('ok');
  } catch (error) {
    $('status').textContent = 'search service unreachable';
    $('status').classList.add('down');
  }
}

form.addEventListener('submit', (event) => {
  event.preventDefault();
  search();
});
imageInput.addEventListener('change', () => setImage(imageInput.files[0]));
$('clear-image').addEventListener('click', () => setImage(null));
for (const name of ['dragenter', 'dragover']) {
  dropZone.addEventListener(name, (event) => {
    event.preventDefault();
    dropZone.classList.add('dragging');
  });
}
for (const name of ['dragleave', 'drop']) {
  dropZone.addEventListener(name, () => dropZone.classList.remove('dragging'));
}
dropZone.addEventListener('drop', (event) => {
  event.preventDefault();
  if (event.dataTransfer.files.length) setImage(event.dataTransfer.files[0]);
});
document.addEventListener('paste', (event) => {
  const file = [...event.clipboardData.files].find((f) => f.type.startsWith('image/'));
  if (file) setImage(file);
});

loadStatus();
const initial = new URLSearchParams(location.search).get('q');
if (initial) {
  queryInput.value = initial;
  search();
}
