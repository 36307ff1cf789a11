// keygate's dashboard: reads the admin API every few seconds and draws pools, keys, tenants,
// quota events and alerts. Hand-written, no library, no build step.
//
// Rules kept throughout:
// - the DOM is built with createElement and textContent only: names from the config, tenants
//   or Google may hold markup, and it must stay text;
// - the admin token lives in sessionStorage (this tab only), goes out as Authorization: Bearer,
//   and is never put in a URL, localStorage, a cookie or the page.
'use strict';

(function () {
  const TOKEN = 'keygate-admin-token';
  const REFRESH_MS = 5000;
  const $ = (id) => document.getElementById(id);
  let timer = null;
  let lastPools = [];

  // ---- DOM helpers: text only ----------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === 'class') node.className = value;
      else if (name === 'text') node.textContent = value;
      else node.setAttribute(name, value === true ? '' : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    return node;
  }

  function table(caption, headers, rows) {
    const head = el('tr', null, ...headers.map((h) => el('th', { scope: 'col' }, h)));
    const body = rows.map((cells) =>
      el('tr', null, ...cells.map((c, i) => el('td', { 'data-label': headers[i] }, c))));
    return el('table', null, el('caption', { class: 'sr-only' }, caption),
      el('thead', null, head), el('tbody', null, ...body));
  }

  // ---- formatting ----------------------------------------------------------------------

  function when(iso) {
    if (!iso) return '';
    const d = new Date(iso);
    return isNaN(d) ? iso : d.toLocaleString();
  }

  function left(untilIso) {
    const s = Math.max(0, Math.ceil((new Date(untilIso) - Date.now()) / 1000));
    if (s >= 3600) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
    if (s >= 60) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${s} s`;
  }

  function countdown(untilIso) {
    return el('span', { class: 'countdown', 'data-until': untilIso }, left(untilIso));
  }

  function tickCountdowns() {
    for (const c of document.querySelectorAll('.countdown')) {
      c.textContent = left(c.dataset.until);
    }
  }

  function number(n) {
    if (n >= 1e9) return `${(n / 1e9).toFixed(1)}G`;
    if (n >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
    if (n >= 1e4) return `${(n / 1e3).toFixed(1)}k`;
    return String(n);
  }

  // States are words with an icon, never a colour alone.
  const STATES = {
    ok: ['\u2713', 'ok'],
    cooling: ['\u25D4', 'cooling'],
    disabled: ['\u2717', 'disabled'],
    capped: ['\u25A0', 'capped'],
    unavailable: ['\u2205', 'unavailable'],
  };

  function badge(state) {
    const [icon, word] = STATES[state] || ['?', state];
    return el('span', { class: `badge ${STATES[state] ? state : 'unknown'}` },
      el('span', { 'aria-hidden': 'true' }, icon), ' ', word);
  }

  function keyState(k) {
    // Cooling only for models outside the project's tier reads as "unavailable".
    const cools = k.cooldowns || [];
    const unavailable = k.state === 'cooling' && cools.every((c) => c.kind === 'unavailable');
    const box = el('div', { class: 'state' }, badge(unavailable ? 'unavailable' : k.state));
    if (k.reason) box.append(el('div', { class: 'why' }, `why: ${k.reason.replaceAll('_', ' ')}`));
    for (const c of k.cooldowns || []) {
      const kind = c.kind === 'unavailable' ? 'not in tier' : c.kind.replaceAll('_', ' ');
      box.append(el('div', { class: 'cooldown' },
        el('span', { class: 'model' }, c.model), ` (${kind}) until ${when(c.until)}, `,
        countdown(c.until), ' left'));
    }
    if ((k.blocked_methods || []).length) {
      box.append(el('div', { class: 'why' }, `blocked: ${k.blocked_methods.join(', ')}`));
    }
    return box;
  }

  // A small bar chart with its totals as text beside it.
  function chart(label, values) {
    const w = 120, h = 28;
    const max = Math.max(1, ...values);
    const total = values.reduce((a, b) => a + b, 0);
    const bar = w / Math.max(1, values.length);
    const pic = svg('svg', { width: w, height: h, viewBox: `0 0 ${w} ${h}`, role: 'img',
      'aria-label': `${label}: ${total}`, class: 'chart' });
    pic.append(svg('line', { x1: 0, y1: h - 0.5, x2: w, y2: h - 0.5, class: 'axis' }));
    values.forEach((v, i) => {
      if (!v) return;
      const bh = Math.max(1, (v / max) * (h - 2));
      pic.append(svg('rect', { x: (i * bar).toFixed(2), y: (h - bh).toFixed(2),
        width: Math.max(0.8, bar - 0.4).toFixed(2), height: bh.toFixed(2) }));
    });
    return el('figure', { class: 'spark' }, pic,
      el('figcaption', null, `${label}: ${number(total)}`));
  }

  function usageCell(series) {
    if (!series) return el('span', { class: 'muted' }, 'no data');
    return el('div', { class: 'usage' },
      chart('requests, hour', series.hour.requests), chart('tokens, hour', series.hour.tokens),
      chart('requests, day', series.day.requests), chart('tokens, day', series.day.tokens));
  }

  // ---- the admin API -------------------------------------------------------------------

  class Unauthorized extends Error {}

  async function api(method, path, body) {
    const token = sessionStorage.getItem(TOKEN);
    if (!token) throw new Unauthorized('no token');
    const init = { method, headers: { Authorization: `Bearer ${token}` }, cache: 'no-store',
      credentials: 'omit', referrerPolicy: 'no-referrer' };
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const resp = await fetch(path, init);
    if (resp.status === 401) throw new Unauthorized('token refused');
    let data = null;
    try { data = await resp.json(); } catch (_) { data = null; }
    return { ok: resp.ok, status: resp.status, data: data || {} };
  }

  function keyPath(pool, fp) {
    return `/admin/pools/${encodeURIComponent(pool)}/keys/${encodeURIComponent(fp.replace(/^key#/, ''))}`;
  }

  // ---- confirmation and results --------------------------------------------------------

  function confirmAction(text) {
    const dialog = $('confirm');
    $('confirm-text').textContent = text;
    return new Promise((resolve) => {
      const done = (yes) => {
        $('confirm-ok').onclick = null;
        $('confirm-cancel').onclick = null;
        dialog.onclose = null;
        if (dialog.open) dialog.close();
        resolve(yes);
      };
      $('confirm-ok').onclick = () => done(true);
      $('confirm-cancel').onclick = () => done(false);
      dialog.onclose = () => done(false);
      dialog.showModal();
      $('confirm-cancel').focus();
    });
  }

  // ok: true (done), false (failed) or null (nothing done).
  function showResult(ok, text) {
    $('result-box').hidden = false;
    const r = $('result');
    r.className = ok === null ? 'muted' : ok ? 'ok' : 'error';
    const [icon, word] = ok === null ? ['\u2013 ', 'Cancelled'] : ok ? ['\u2713 ', 'Done'] : ['\u2716 ', 'Failed'];
    r.replaceChildren(el('span', { 'aria-hidden': 'true' }, icon), `${word}: ${text}`);
  }

  function describe(a) {
    const d = a.data;
    if (!a.ok) return d.error || `HTTP ${a.status}`;
    const parts = [];
    if (d.disabled) parts.push(`${d.disabled} disabled`);
    if (d.enabled) parts.push(`${d.enabled} enabled`);
    if (d.cleared !== undefined) parts.push(`${d.cleared} cooldown(s) cleared for project ${d.project}`);
    if (d.added) parts.push(`${d.added} added to pool ${d.pool} (project ${d.project})`);
    if (d.reloaded !== undefined) parts.push(`configuration reloaded: ${typeof d.reloaded === 'string' ? d.reloaded : JSON.stringify(d.reloaded)}`);
    if (d.checks) parts.push(d.checks.map((c) => `${c.key}: ${c.result} (${c.state})`).join('; '));
    if (d.note) parts.push(d.note);
    return parts.join('. ') || JSON.stringify(d);
  }

  async function act(question, method, path, body) {
    if (!(await confirmAction(question))) {
      showResult(null, 'nothing was changed');
      return;
    }
    try {
      const a = await api(method, path, body);
      showResult(a.ok, describe(a));
    } catch (e) {
      if (e instanceof Unauthorized) return signOut('The token was refused; sign in again.');
      showResult(false, String(e.message || e));
    }
    refresh();
  }

  function button(text, label, onclick, cls) {
    const b = el('button', { type: 'button', class: cls || null, 'aria-label': label }, text);
    b.addEventListener('click', onclick);
    return b;
  }

  // ---- drawing -------------------------------------------------------------------------

  function nextRecovery(pool) {
    const byModel = new Map();
    for (const k of pool.keys) {
      if (k.state === 'disabled') continue;
      for (const c of k.cooldowns || []) {
        const t = new Date(c.until).getTime();
        if (!byModel.has(c.model) || t < byModel.get(c.model)) byModel.set(c.model, t);
      }
    }
    if (!byModel.size && !(pool.caps || []).length) return null;
    const items = [...byModel.entries()].sort((a, b) => a[1] - b[1]).map(([model, t]) => {
      const iso = new Date(t).toISOString();
      return el('li', null, el('span', { class: 'model' }, model), `: first key back at ${when(iso)} (`, countdown(iso), ')');
    });
    for (const c of pool.caps || []) {
      items.push(el('li', null, `${c.scope} ${c.name} capped (${c.kind.replaceAll('_', ' ')}) until ${when(c.until)} (`, countdown(c.until), ')'));
    }
    return el('div', { class: 'recovery' }, el('h4', null, 'Next recovery'), el('ul', null, ...items));
  }

  function drawPools(pools, usage) {
    const boxes = pools.map((pool) => {
      const rows = pool.keys.map((k) => {
        const actions = el('div', { class: 'actions' });
        const path = keyPath(pool.name, k.key);
        if (k.state === 'disabled') {
          actions.append(button('Enable', `Enable ${k.key}`, () =>
            act(`Enable ${k.key} in pool ${pool.name}?`, 'POST', `${path}/enable`)));
        } else {
          actions.append(button('Disable', `Disable ${k.key}`, () =>
            act(`Disable ${k.key} in pool ${pool.name}? It serves nothing until enabled.`, 'POST', `${path}/disable`), 'danger'));
        }
        if ((k.cooldowns || []).length || k.state === 'capped') {
          actions.append(button('Clear cooldown', `Clear the cooldowns of ${k.key}`, () =>
            act(`Clear every cooldown of ${k.key}'s project ${k.project}?`, 'POST', `${path}/clear-cooldown`, {})));
        }
        actions.append(button('Check', `Check ${k.key} with Google`, () =>
          act(`Check ${k.key} with Google (a model listing, no quota spent)?`, 'POST', `${path}/check`), 'quiet'));
        const name = el('div', { class: 'keyname' }, el('code', null, k.key));
        if (k.note) name.append(el('div', { class: 'keynote' }, k.note));
        const project = el('div', null, k.project);
        if (k.billing_account) project.append(el('div', { class: 'muted' }, `billing: ${k.billing_account}`));
        return [name, project, keyState(k), usageCell(usage.get(`${pool.name}\u0000${k.key}`)), actions];
      });
      const header = el('div', { class: 'pool-head' },
        el('h3', null, `Pool ${pool.name}`),
        el('span', { class: 'muted' }, `${pool.upstream} \u00B7 models ${pool.models.join(', ')}`),
        button('Check all keys', `Check every key of pool ${pool.name}`, () =>
          act(`Check all ${pool.keys.length} keys of pool ${pool.name} with Google?`, 'POST', `/admin/pools/${encodeURIComponent(pool.name)}/check`), 'quiet'));
      return el('article', { class: 'pool', 'data-pool': pool.name }, header, nextRecovery(pool),
        table(`Keys of pool ${pool.name}`, ['Key', 'Project', 'State', 'Usage', 'Actions'], rows));
    });
    $('pools').replaceChildren(...boxes);
    const names = pools.map((p) => p.name);
    if (names.join('\u0000') !== lastPools.join('\u0000')) {
      $('add-pool').replaceChildren(...names.map((n) => el('option', { value: n }, n)));
      lastPools = names;
    }
  }

  function drawTenants(tenants, usage) {
    if (!tenants.length) {
      $('tenants').replaceChildren(el('p', { class: 'muted' }, 'No tenants are configured: clients use the gateway without a token of their own.'));
      return;
    }
    const rows = tenants.map((t) => {
      const r = t.refused || {};
      const limits = el('div', null, `rpm: ${t.rpm ?? 'none'}`, el('br'), `concurrent: ${t.max_concurrent ?? 'none'}`);
      const refused = el('div', null, `rpm: ${r.rpm || 0}`, el('br'), `concurrency: ${r.max_concurrent || 0}`, el('br'), `fair share: ${r.fair_share || 0}`);
      return [el('div', null, el('strong', null, t.name), el('div', { class: 'muted' }, `pools: ${(t.pools || []).join(', ')}`)),
        limits, String(t.in_flight), refused, usageCell(usage.get(t.name))];
    });
    $('tenants').replaceChildren(table('Tenants', ['Tenant', 'Limits', 'In flight', 'Refused', 'Usage'], rows));
  }

  function drawEvents(events) {
    const list = events.quota_events || [];
    if (!list.length) {
      $('events').replaceChildren(el('p', { class: 'muted' }, 'No quota event since keygate started.'));
    } else {
      const rows = list.map((e) => [when(e.at), el('code', null, e.key), e.project,
        el('span', { class: 'model' }, e.model), e.reason.replaceAll('_', ' '),
        e.until ? `${e.action} until ${when(e.until)}` : e.action,
        el('span', { class: 'message' }, e.message || '')]);
      $('events').replaceChildren(table('Recent quota events',
        ['Time', 'Key', 'Project', 'Model', 'Reason', 'Cooldown set', 'Google said (scrubbed)'], rows));
    }
    const a = events.alerts;
    if (!a) {
      $('alerts').replaceChildren(el('p', { class: 'muted' }, 'Alerts are not configured (no alerts: section).'));
      return;
    }
    const summary = el('p', null, `Delivered ${a.delivered}, failed ${a.failed}, dropped ${a.rate_limited} as repeats and ${a.queue_full} on a full queue.`);
    const rows = (a.sent || []).map((s) => [when(s.at), s.kind.replaceAll('_', ' '), s.text, s.result]);
    $('alerts').replaceChildren(summary, rows.length ? table('Alerts sent', ['Time', 'Kind', 'Text', 'Result'], rows)
      : el('p', { class: 'muted' }, 'No alert sent yet.'));
  }

  function usageMap(hour, day) {
    const keys = new Map(), tenants = new Map();
    const join = (map, id, h, d) => map.set(id, { hour: h, day: d });
    const dayKeys = new Map(day.keys.map((k) => [`${k.pool}\u0000${k.key}`, k]));
    for (const k of hour.keys) {
      const id = `${k.pool}\u0000${k.key}`;
      join(keys, id, k, dayKeys.get(id) || k);
    }
    const dayTenants = new Map(day.tenants.map((t) => [t.name, t]));
    for (const t of hour.tenants) join(tenants, t.name, t, dayTenants.get(t.name) || t);
    return { keys, tenants };
  }

  // ---- the loop ------------------------------------------------------------------------

  async function refresh() {
    clearTimeout(timer);
    try {
      const [pools, tenants, events, hour, day] = await Promise.all([
        api('GET', '/admin/pools'), api('GET', '/admin/tenants'), api('GET', '/admin/events'),
        api('GET', '/admin/usage?minutes=60&step=1'), api('GET', '/admin/usage?minutes=1440&step=15'),
      ]);
      const usage = usageMap(hour.data, day.data);
      drawPools(pools.data.pools || [], usage.keys);
      drawTenants(tenants.data.tenants || [], usage.tenants);
      drawEvents(events.data);
      // With Redis the charts add up every instance; without (or Redis away), this one's.
      const whose = hour.data.shared ? 'charts of every instance' : "charts of this instance's own traffic";
      $('status').textContent = `Updated ${new Date().toLocaleTimeString()} (${whose}); refreshes every ${REFRESH_MS / 1000} s.`;
    } catch (e) {
      if (e instanceof Unauthorized) return signOut('The token was refused; sign in again.');
      $('status').textContent = `Could not reach keygate (${e.message || e}); retrying.`;
    }
    timer = setTimeout(refresh, REFRESH_MS);
  }

  function signedIn() {
    $('login').hidden = true;
    $('app').hidden = false;
    $('top-actions').hidden = false;
    refresh();
  }

  function signOut(why) {
    clearTimeout(timer);
    sessionStorage.removeItem(TOKEN);
    for (const id of ['pools', 'tenants', 'events', 'alerts', 'result']) $(id).replaceChildren();
    $('result-box').hidden = true;
    $('app').hidden = true;
    $('top-actions').hidden = true;
    $('login').hidden = false;
    $('status').textContent = 'Not signed in.';
    const err = $('login-error');
    err.hidden = !why;
    err.textContent = why || '';
    $('token').focus();
  }

  document.addEventListener('DOMContentLoaded', () => {
    $('login-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const token = $('token').value.trim();
      $('token').value = '';
      if (!token) return;
      sessionStorage.setItem(TOKEN, token);
      signedIn();
    });
    $('signout').addEventListener('click', () => signOut(''));
    $('reload').addEventListener('click', () =>
      act('Reload the configuration file? Running requests finish on the old one.', 'POST', '/admin/reload'));
    $('add-key').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const pool = $('add-pool').value;
      const key = $('add-secret').value.trim();
      const project = $('add-project').value.trim();
      $('add-secret').value = '';
      $('add-project').value = '';
      if (!key) return;
      const body = project ? { key, project } : { key };
      act(`Add this key to pool ${pool}? It is runtime only: lost on restart.`, 'POST',
        `/admin/pools/${encodeURIComponent(pool)}/keys`, body);
    });
    setInterval(tickCountdowns, 1000);
    if (sessionStorage.getItem(TOKEN)) signedIn();
    else signOut('');
  });
})();
