// The cachetail dashboard. Reads GET /v1/status (the rules, the families) and the live feed
// GET /v1/events (a status snapshot every second, each applied change as it is applied), and
// reconnects on its own when the daemon restarts. Everything from the daemon is put on the page
// as text (textContent), never as markup.
'use strict';

const HISTORY = 300;          // seconds of chart history (one status a second)
const FEED_MAX = 150;         // changes kept in the feed
const STALE_AFTER_MS = 5000;  // no status for this long: the connection is dead, reconnect

const $ = (id) => document.getElementById(id);

const state = {
  source: null,
  retryMs: 1000,
  lastMessageAt: 0,
  last: null,                 // the previous status snapshot
  series: { rate: [], lagEvents: [], lagSeconds: [] },
  reloads: null,
  reloadFailures: null,
  changesSeen: 0,
  statusLoading: false,
};

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function fmtCount(n) {
  return typeof n === 'number' ? n.toLocaleString('en-US') : '–';
}

function fmtMs(ms) {
  if (typeof ms !== 'number') return '–';
  if (ms < 1) return ms.toFixed(2) + ' ms';
  if (ms < 10) return ms.toFixed(1) + ' ms';
  if (ms < 1000) return Math.round(ms) + ' ms';
  return (ms / 1000).toFixed(1) + ' s';
}

// Two latencies (p50 / p99) in one unit, so that they fit a card: "0.23 / 0.53 ms".
function fmtPair(node, a, b) {
  node.replaceChildren();
  if (typeof a !== 'number' || typeof b !== 'number') {
    node.textContent = '–';
    return;
  }
  const seconds = b >= 1000;
  const scale = seconds ? 1000 : 1;
  const one = (v) => {
    const x = v / scale;
    return x < 1 ? x.toFixed(2) : x < 10 ? x.toFixed(1) : Math.round(x).toLocaleString('en-US');
  };
  node.append(one(a) + ' / ' + one(b) + ' ', el('span', 'unit', seconds ? 's' : 'ms'));
}

function fmtSeconds(s) {
  if (typeof s !== 'number') return '–';
  if (s < 10) return s.toFixed(1) + ' s';
  if (s < 120) return Math.round(s) + ' s';
  return Math.round(s / 60) + ' min';
}

function fmtRate(r) {
  if (typeof r !== 'number') return '–';
  return r < 10 ? r.toFixed(1) : Math.round(r).toLocaleString('en-US');
}

function ratio(hits, misses) {
  const total = hits + misses;
  return total > 0 ? hits / total : null;
}

function pct(r) {
  return r === null ? '–' : (r * 100).toFixed(1) + '%';
}

function setConnection(kind, text) {
  const pill = $('conn');
  pill.className = 'pill ' + kind;
  pill.textContent = text;
}

// ---- charts: an area and a line over the last HISTORY samples, scaled to their maximum

const SVG = 'http://www.w3.org/2000/svg';

function drawChart(svg, values) {
  const box = svg.viewBox.baseVal;
  const width = box.width;
  const height = box.height;
  const max = Math.max(1e-9, ...values);
  // The x axis spans the history there is (at least a minute), up to HISTORY seconds.
  const span = Math.max(60, values.length);
  const step = width / (span - 1);
  const offset = span - values.length;
  const points = values.map((v, i) => {
    const x = (offset + i) * step;
    const y = height - 1 - (v / max) * (height - 2);
    return x.toFixed(1) + ',' + y.toFixed(1);
  });
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  if (points.length < 2) return;
  const first = ((offset) * step).toFixed(1);
  const area = document.createElementNS(SVG, 'polygon');
  area.setAttribute('class', 'area');
  area.setAttribute('points', first + ',' + height + ' ' + points.join(' ') + ' ' + width + ',' + height);
  const line = document.createElementNS(SVG, 'polyline');
  line.setAttribute('class', 'line');
  line.setAttribute('points', points.join(' '));
  const title = document.createElementNS(SVG, 'title');
  title.textContent = 'max ' + max.toLocaleString('en-US', { maximumFractionDigits: 2 });
  svg.append(area, line, title);
}

function push(series, value) {
  series.push(value);
  if (series.length > HISTORY) series.shift();
}

// ---- the config: rules and families, from /v1/status

async function loadStatus() {
  if (state.statusLoading) return;
  state.statusLoading = true;
  try {
    const response = await fetch('/v1/status', { cache: 'no-store' });
    if (response.ok) renderConfig(await response.json());
  } catch (e) {
    // the feed's reconnect loop reports the outage
  } finally {
    state.statusLoading = false;
  }
}

function chips(parent, names, className) {
  for (const name of names) parent.append(el('span', 'chip ' + className, name));
}

function renderConfig(status) {
  const config = status.config || {};
  $('db').textContent = config.database || '';
  state.reloads = config.reloads;
  state.reloadFailures = config.reload_failures;
  showReloadError(config.last_reload_error);

  const rules = config.rules || [];
  const body = $('rules').tBodies[0];
  body.replaceChildren();
  for (const rule of rules) {
    const row = el('tr');
    row.append(el('td', 'table-name', rule.table));
    row.append(el('td', null, (rule.on || []).join(', ')));
    const keys = el('td');
    chips(keys, rule.keys || [], 'key');
    const tags = el('td');
    chips(tags, rule.tags || [], 'tag');
    const strategy = el('td');
    strategy.append(el('span', 'strategy-badge ' + rule.strategy, rule.strategy));
    if (rule.derived_from) strategy.append(el('span', 'derived', 'auto, from ' + rule.derived_from));
    row.append(keys, tags, strategy);
    body.append(row);
  }
  if (rules.length === 0) {
    const row = el('tr');
    const cell = el('td', 'muted', 'No rules: nothing is refreshed by changes.');
    cell.colSpan = 5;
    row.append(cell);
    body.append(row);
  }
  const families = config.families || [];
  const loaded = config.loaded_at ? new Date(config.loaded_at * 1000).toLocaleTimeString() : '–';
  $('config-meta').textContent = rules.length + ' rules, ' + families.length + ' key families · loaded ' +
    loaded + ' · ' + fmtCount(config.reloads) + ' reloads (' + fmtCount(config.reload_failures) + ' failed)' +
    (config.path ? ' · ' + config.path : '');
  renderFamilies(families.map((f) => Object.assign({ family: f.pattern }, f)));
}

function showReloadError(message) {
  $('reload-error').hidden = !message;
  $('reload-error-text').textContent = message || '';
}

function renderFamilies(families) {
  const body = $('families').tBodies[0];
  const rows = new Map(Array.from(body.rows, (r) => [r.dataset.family, r]));
  const seen = new Set();
  for (const f of families) {
    seen.add(f.family);
    let row = rows.get(f.family);
    if (!row) {
      row = el('tr');
      row.dataset.family = f.family;
      row.append(el('td', 'family mono', f.family));
      const cell = el('td');
      const gauge = el('div', 'ratio');
      const bar = el('div', 'bar');
      bar.append(el('span'));
      gauge.append(bar, el('span', 'pct'));
      cell.append(gauge);
      row.append(cell);
      for (let i = 0; i < 4; i++) row.append(el('td', 'num'));
      body.append(row);
    }
    const r = ratio(f.hits || 0, f.misses || 0);
    row.querySelector('.bar span').style.width = r === null ? '0' : (r * 100).toFixed(1) + '%';
    row.querySelector('.pct').textContent = pct(r);
    const cells = row.cells;
    cells[2].textContent = fmtCount(f.hits);
    cells[3].textContent = fmtCount(f.misses);
    cells[4].textContent = fmtCount(f.fills);
    cells[5].textContent = fmtMs(f.mean_fill_ms);
  }
  for (const [name, row] of rows) if (!seen.has(name)) row.remove();
}

// ---- the live feed

function onStatus(s) {
  $('role').textContent = s.role || '';
  $('backend').textContent = s.backend === 'redis'
    ? 'redis' + (s.redis_ok === false ? ' (down)' : '')
    : (s.backend || '');
  $('backend').className = 'pill' + (s.redis_ok === false ? ' warn' : '');
  $('paused').hidden = !s.paused;

  const last = state.last;
  let rate = 0;
  if (last && s.events >= last.events && s.now_ms > last.now_ms) {
    rate = (s.events - last.events) / ((s.now_ms - last.now_ms) / 1000);
  }
  state.last = s;
  push(state.series.rate, rate);
  push(state.series.lagEvents, s.lag || 0);
  push(state.series.lagSeconds, s.lag_seconds || 0);
  drawChart($('chart-rate'), state.series.rate);
  drawChart($('chart-lag-events'), state.series.lagEvents);
  drawChart($('chart-lag-seconds'), state.series.lagSeconds);

  $('rate').textContent = fmtRate(rate);
  $('events').textContent = fmtCount(s.events);
  $('lag-events').textContent = fmtCount(s.lag);
  $('lag-seconds').textContent = fmtSeconds(s.lag_seconds);
  $('hit-ratio').textContent = pct(ratio(s.hits || 0, s.misses || 0));
  $('hits').textContent = fmtCount(s.hits);
  $('misses').textContent = fmtCount(s.misses);
  $('fills').textContent = fmtCount(s.fills);
  $('queue').textContent = fmtCount(s.write_behind_queue);

  const latency = s.latency || {};
  const fresh = latency.commit_to_fresh || {};
  const fill = latency.fill || {};
  fmtPair($('fresh'), fresh.p50_ms, fresh.p99_ms);
  $('fresh-count').textContent = fmtCount(fresh.count || 0);
  fmtPair($('fill'), fill.p50_ms, fill.p99_ms);
  $('fill-count').textContent = fmtCount(fill.count || 0);

  renderFamilies(s.families || []);
  showReloadError(s.last_reload_error);
  if (s.reloads !== state.reloads || s.reload_failures !== state.reloadFailures) {
    loadStatus(); // the rules may have changed
  }
}

function describeRow(row) {
  return Object.entries(row || {})
    .map(([column, value]) => column + '=' + (value === null ? 'NULL' : JSON.stringify(value)))
    .join(' · ');
}

function onChange(c) {
  const item = el('li');
  item.dataset.position = c.position;
  const head = el('div', 'change-head');
  head.append(el('span', 'position', '#' + c.position));
  head.append(el('span', 'op ' + c.op, c.op));
  if (c.table) head.append(el('span', 'table-name', c.table));
  const row = describeRow(c.row);
  if (row) head.append(el('span', 'row mono', row));
  item.append(head);

  const effects = el('div', 'effects');
  for (const key of c.keys || []) {
    const chip = el('span', 'chip key ' + key.strategy, key.key);
    chip.append(el('span', 'strategy', key.strategy));
    if (key.rule !== undefined) chip.title = 'rule ' + key.rule + (key.via ? ' via ' + key.via : '');
    if (key.via) chip.append(el('span', 'via', 'via ' + key.via));
    effects.append(chip);
  }
  for (const f of c.fallbacks || []) {
    effects.append(el('span', 'chip flush', 'every ' + f.family + ' dropped: ' + f.reason + ' (via ' + f.via + ')'));
  }
  for (const tag of c.tags || []) effects.append(el('span', 'chip tag', 'tag ' + tag));
  if (c.flush) effects.append(el('span', 'chip flush', c.op === 'unreadable' ? 'unreadable: flushes the cache' : 'flushes the cache'));
  if (c.error) effects.append(el('span', 'chip flush', c.error));
  if (!effects.childNodes.length) effects.append(el('span', 'muted', 'no cache keys for this change'));
  item.append(effects);
  addToFeed(item, 1);
}

function addToFeed(item, changes) {
  const feed = $('feed');
  feed.prepend(item);
  while (feed.children.length > FEED_MAX) feed.lastElementChild.remove();
  state.changesSeen += changes;
  $('feed-empty').hidden = true;
  $('feed-count').textContent = '(' + fmtCount(state.changesSeen) + ' since this page opened)';
}

function onMessage(message) {
  state.lastMessageAt = Date.now();
  let event;
  try {
    event = JSON.parse(message.data);
  } catch (e) {
    return;
  }
  if (event.type === 'status') onStatus(event);
  else if (event.type === 'change') onChange(event);
  else if (event.type === 'skipped') {
    addToFeed(el('li', 'muted', '… ' + fmtCount(event.count) + ' more changes, not shown'), event.count);
  }
}

function connect() {
  if (state.source) state.source.close();
  setConnection('connecting', 'connecting…');
  const source = new EventSource('/v1/events');
  state.source = source;
  state.lastMessageAt = Date.now();
  source.onopen = () => {
    state.retryMs = 1000;
    state.last = null; // counters may have restarted with the daemon
    setConnection('live', 'live');
    loadStatus();
  };
  source.onmessage = onMessage;
  source.onerror = () => {
    setConnection('down', 'reconnecting…');
    if (source.readyState === EventSource.CLOSED) {
      // The browser gave up on this stream: start a new one, backing off.
      setTimeout(connect, state.retryMs);
      state.retryMs = Math.min(state.retryMs * 2, 10000);
    }
  };
}

// A stream that went quiet (a half-open connection, a suspended laptop) is replaced.
setInterval(() => {
  if (state.source && Date.now() - state.lastMessageAt > STALE_AFTER_MS) {
    setConnection('down', 'reconnecting…');
    connect();
  }
}, 1000);

// ---- admin actions: sent with the token typed here (kept in this page only, never stored)

function adminRequest(action, target) {
  const q = encodeURIComponent(target);
  switch (action) {
    case 'tag': return ['POST', '/v1/admin/invalidate?tag=' + q];
    case 'family': return ['POST', '/v1/admin/flush?family=' + q];
    case 'key': return ['DELETE', '/v1/keys/' + q];
    default: return ['POST', '/v1/admin/flush'];
  }
}

$('admin').addEventListener('submit', async (event) => {
  event.preventDefault();
  const output = $('admin-result');
  const action = $('admin-action').value;
  const target = $('admin-target').value.trim();
  if (action !== 'all' && !target) {
    output.className = 'bad';
    output.textContent = 'Name the ' + action + ' first.';
    return;
  }
  const [method, url] = adminRequest(action, target);
  const headers = {};
  const token = $('admin-token').value;
  if (token) headers.Authorization = 'Bearer ' + token;
  try {
    const response = await fetch(url, { method, headers, cache: 'no-store' });
    const text = await response.text();
    output.className = response.ok ? 'good' : 'bad';
    output.textContent = response.status + ' ' + response.statusText + ': ' + text;
  } catch (e) {
    output.className = 'bad';
    output.textContent = 'The daemon did not answer: ' + e;
  }
});

connect();
