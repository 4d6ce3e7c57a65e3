// AlphaPulse-RL monitor dashboard: renders the monitor's snapshot (GET /api/snapshot, then every
// `snapshot` server-sent event of GET /api/stream) and acknowledges alerts (POST /api/alerts/{id}/acknowledge).
//
// Rules this file keeps:
//  * data reaches the DOM through textContent and data-* attributes only (never as HTML), so a message
//    from the daemon or an alert cannot inject markup;
//  * every element showing a number carries the raw value in data-value (the formatted text is for people);
//  * the control token is asked for when first needed, kept in localStorage and sent only as a bearer
//    header on the acknowledge request; the page itself never contains it;
//  * no request leaves this origin (the server's Content-Security-Policy enforces it too).
'use strict';

(() => {
  const TOKEN_KEY = 'alphapulse.controlToken';
  const SPARK_POINTS = 240;
  const HISTORY_URL = '/api/metrics?minutes=60&points=120'; // the sparkline's first hour, before live points
  const SEVERITY_ORDER = { P1: 1, P2: 2, P3: 3, P4: 4 };
  // Rules whose value is only "1 = firing": their value and threshold say nothing to a person.
  const YES_NO_RULES = new Set(['daemon_down', 'daemon_unhealthy', 'emergency_stop']);

  const view = {
    snapshot: null,   // the last snapshot rendered
    updates: 0,       // snapshots rendered since the page loaded
    receivedAt: 0,    // Date.now() of the last snapshot
    equity: [],       // {t: ms, v: equity} per distinct scrape, oldest first, for the sparkline
    lastScrape: null,
    acking: new Set(), // alert ids with an acknowledge request in flight
    stream: null,
  };

  const $ = (id) => document.getElementById(id);

  // ---- formatting ------------------------------------------------------------------------------------
  const formatters = new Map();
  function formatter(digits, signed) {
    const key = `${digits}:${signed}`;
    if (!formatters.has(key)) {
      formatters.set(key, new Intl.NumberFormat('en-US', {
        minimumFractionDigits: digits, maximumFractionDigits: digits,
        signDisplay: signed ? 'exceptZero' : 'auto',
      }));
    }
    return formatters.get(key);
  }

  function isNum(v) { return typeof v === 'number' && Number.isFinite(v); }

  /** Grouped decimal text ("12,345.67"); with `signed`, a leading + or - ("+1.20"). */
  function fmt(v, digits, signed = false) {
    return isNum(v) ? formatter(digits, signed).format(v) : '—';
  }

  /** Digits that keep a latency readable: 0.062 ms, 12.35 ms, 512.4 ms. */
  function msDigits(ms) { return ms < 10 ? 3 : ms < 100 ? 2 : 1; }

  function duration(seconds) {
    if (!isNum(seconds)) return '—';
    const s = Math.max(0, Math.floor(seconds));
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d) return `${d} d ${h} h`;
    if (h) return `${h} h ${String(m).padStart(2, '0')} min`;
    if (m) return `${m} min ${String(s % 60).padStart(2, '0')} s`;
    return `${s} s`;
  }

  function ago(iso) {
    const t = Date.parse(iso);
    if (!Number.isFinite(t)) return '—';
    const s = Math.round((Date.now() - t) / 1000);
    if (s < 2) return 'just now';
    return `${duration(s)} ago`;
  }

  /** "EMERGENCY_STOP" reads (and wraps on a phone) as "EMERGENCY STOP"; data-value keeps the API's name. */
  function stateText(state) { return typeof state === 'string' && state ? state.replace(/_/g, ' ') : '—'; }

  function utc(iso) {
    const t = Date.parse(iso);
    if (!Number.isFinite(t)) return '—';
    return new Date(t).toISOString().slice(0, 16).replace('T', ' ') + ' UTC';
  }

  // ---- DOM helpers -------------------------------------------------------------------------------------
  /** Show `text` in element `id` and keep the raw value in its data-value ('' when there is none). */
  function put(id, raw, text) {
    const el = $(id);
    if (!el) return null;
    el.dataset.value = raw === null || raw === undefined ? '' : String(raw);
    el.textContent = text;
    return el;
  }

  /** A number: raw value kept, `scale` applied only to the text (fractions shown as %, µs as ms). */
  function putNum(id, raw, digits, { scale = 1, signed = false } = {}) {
    const el = put(id, isNum(raw) ? raw : null, isNum(raw) ? fmt(raw * scale, digits, signed) : '—');
    if (el && el.classList.contains('signed')) {
      el.classList.toggle('pos', isNum(raw) && raw > 0);
      el.classList.toggle('neg', isNum(raw) && raw < 0);
    }
    return el;
  }

  function bar(id, fraction) {
    const el = $(id);
    if (!el) return;
    const f = isNum(fraction) ? Math.min(Math.max(fraction, 0), 1) : 0;
    el.style.width = `${(f * 100).toFixed(1)}%`;
    el.classList.toggle('warn', f >= 0.75 && f < 0.9);
    el.classList.toggle('crit', f >= 0.9);
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function notice(text, kind = 'info') {
    const n = $('notice');
    n.textContent = text;
    n.dataset.kind = kind;
    n.hidden = !text;
    clearTimeout(notice.timer);
    if (text && kind === 'info') notice.timer = setTimeout(() => { n.hidden = true; }, 8000);
  }

  // ---- rendering -------------------------------------------------------------------------------------
  function render(snap) {
    if (!snap || typeof snap !== 'object') return;
    view.snapshot = snap;
    view.updates += 1;
    view.receivedAt = Date.now();
    const daemon = snap.daemon || {};
    const m = daemon.metrics && typeof daemon.metrics === 'object' ? daemon.metrics : null;
    renderHeader(daemon, m);
    renderPortfolio(m, daemon.scraped_at);
    renderTrading(m);
    renderModel(m);
    renderPositions(m);
    renderDaemon(m);
    renderHost(snap.host || {});
    renderAlerts();
    const mon = snap.monitor || {};
    put('monitor-version', mon.version ?? null, mon.version ?? '—');
    put('monitor-uptime', mon.uptime_s ?? null, duration(mon.uptime_s));
    const upd = put('updated', daemon.scraped_at ?? null, daemon.scraped_at ? ago(daemon.scraped_at) : 'never');
    if (upd) {
      upd.dataset.count = String(view.updates);
      upd.title = daemon.scraped_at || '';
    }
    document.body.classList.toggle('no-metrics', m === null);
    tick();
  }

  function renderHeader(daemon, m) {
    const up = daemon.up === true;
    const status = daemon.health && typeof daemon.health.status === 'string' ? daemon.health.status : null;
    const pill = put('daemon-up', up, up ? `daemon ${status || 'up'}` : 'daemon down');
    pill.dataset.status = status || '';
    pill.className = `pill ${up ? (status === 'stalled' ? 'warn' : 'ok') : 'crit'}`;
    const problem = daemon.error || (daemon.health && daemon.health.problem) || '';
    const banner = $('daemon-error');
    banner.textContent = problem ? `Daemon: ${problem}` : '';
    banner.hidden = !problem;
    const state = m && m.trading ? m.trading.state : null;
    const sp = put('trading-state-pill', state, stateText(state));
    sp.className = `pill state st-${state || 'none'}`;
  }

  function renderPortfolio(m, scrapedAt) {
    const p = m && m.portfolio ? m.portfolio : {};
    putNum('equity', p.equity, 2);
    putNum('cash', p.cash, 2);
    putNum('initial-equity', p.initial_equity, 2);
    putNum('daily-pnl', p.daily_pnl, 2, { signed: true });
    const startOfDay = isNum(p.equity) && isNum(p.daily_pnl) ? p.equity - p.daily_pnl : null;
    const pct = startOfDay ? (p.daily_pnl / startOfDay) * 100 : null;
    putNum('daily-pnl-pct', pct, 2, { signed: true });
    putNum('realized-pnl', p.realized_pnl, 2, { signed: true });
    putNum('unrealized-pnl', p.unrealized_pnl, 2, { signed: true });
    putNum('drawdown', p.drawdown, 2, { scale: 100 });
    putNum('peak-equity', p.peak_equity, 2);
    const risk = m && m.risk ? m.risk : {};
    putNum('drawdown-limit', risk.limits ? risk.limits.max_drawdown_pct : null, 1);
    bar('drawdown-usage-bar', risk.usage ? risk.usage.drawdown : null);
    if (isNum(p.equity) && scrapedAt && scrapedAt !== view.lastScrape) {
      view.lastScrape = scrapedAt;
      view.equity.push({ t: Date.parse(scrapedAt), v: p.equity });
      if (view.equity.length > SPARK_POINTS) view.equity.shift();
      spark();
    }
  }

  /** The last hour of equity from the monitor's stored samples, placed before the points seen live. */
  async function loadHistory() {
    try {
      const r = await fetch(HISTORY_URL, { cache: 'no-store' });
      if (!r.ok) return;
      const body = await r.json();
      const first = view.equity.length ? view.equity[0].t : Infinity;
      const older = (Array.isArray(body.samples) ? body.samples : [])
        .map((x) => ({ t: Date.parse(x.ts), v: x.equity }))
        .filter((x) => Number.isFinite(x.t) && isNum(x.v) && x.t < first);
      view.equity = older.concat(view.equity).slice(-SPARK_POINTS);
      spark();
    } catch (e) {
      // No history is fine: the sparkline fills from the live stream.
    }
  }

  function spark() {
    const svg = $('equity-spark');
    const pts = view.equity.map((x) => x.v);
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    if (pts.length < 2) return;
    const lo = Math.min(...pts), hi = Math.max(...pts), span = hi - lo || 1;
    const coords = pts.map((v, i) => `${((i / (pts.length - 1)) * 100).toFixed(2)},${(22 - ((v - lo) / span) * 20).toFixed(2)}`);
    const line = document.createElementNS('http://www.w3.org/2000/svg', 'polyline');
    line.setAttribute('points', coords.join(' '));
    line.setAttribute('vector-effect', 'non-scaling-stroke');
    svg.appendChild(line);
  }

  function renderTrading(m) {
    const t = m && m.trading ? m.trading : {};
    const st = put('trading-state', t.state ?? null, stateText(t.state));
    st.className = `state st-${t.state || 'none'}${t.state && t.state.length > 8 ? ' long' : ''}`;
    $('state-reason').textContent = t.state_reason || '';
    put('trading-mode', t.mode ?? null, t.mode || '—');
    $('trading-symbol').textContent = t.symbol || '—';
    $('trading-timeframe').textContent = t.timeframe || '';
    putNum('orders', t.orders, 0);
  }

  function renderModel(m) {
    const mo = m && m.model ? m.model : {};
    const decided = isNum(mo.decisions) && mo.decisions > 0;
    putNum('model-confidence', decided ? mo.avg_confidence : null, 1, { scale: 100 });
    putNum('model-threshold', mo.confidence_threshold, 1, { scale: 100 });
    putNum('model-decisions', mo.decisions, 0);
    $('model-version').textContent = mo.version ? `${mo.version} (${mo.kind || '?'})` : '—';
    const fill = $('model-confidence-bar');
    fill.style.width = `${decided ? Math.min(Math.max(mo.avg_confidence, 0), 1) * 100 : 0}%`;
    fill.classList.toggle('warn', decided && isNum(mo.confidence_threshold) && mo.avg_confidence < mo.confidence_threshold);
    $('model-threshold-mark').style.left = `${isNum(mo.confidence_threshold) ? mo.confidence_threshold * 100 : 0}%`;
    const inf = mo.inference_us || {};
    const tto = (m && m.system && m.system.tick_to_order_us) || {};
    for (const [id, us] of [['inference-p99', inf.p99], ['inference-p50', inf.p50], ['tick-to-order-p99', tto.p99]]) {
      putNum(id, us, isNum(us) ? msDigits(us / 1000) : 0, { scale: 0.001 });
    }
  }

  const LABELS = { symbol: 'Symbol', side: 'Side', qty: 'Qty', entry_price: 'Entry', mark_price: 'Mark',
    notional: 'Notional', unrealized_pnl: 'Unrealized' };

  function renderPositions(m) {
    const body = $('positions-body');
    const positions = m && m.portfolio && Array.isArray(m.portfolio.positions) ? m.portfolio.positions : [];
    const rows = [];
    for (const p of positions) {
      const tr = el('tr');
      tr.dataset.symbol = String(p.symbol ?? '');
      const cell = (field, raw, text, cls) => {
        const td = el('td', cls, text);
        td.dataset.field = field;
        td.dataset.label = LABELS[field];
        td.dataset.value = raw === null || raw === undefined ? '' : String(raw);
        tr.appendChild(td);
      };
      cell('symbol', p.symbol, String(p.symbol ?? '—'));
      cell('side', p.side, String(p.side ?? '—'), `side-${p.side === 'short' ? 'short' : 'long'}`);
      cell('qty', p.qty, fmt(p.qty, 4), 'num');
      cell('entry_price', p.entry_price, fmt(p.entry_price, 2), 'num');
      cell('mark_price', p.mark_price, fmt(p.mark_price, 2), 'num');
      cell('notional', p.notional, fmt(p.notional, 2), 'num');
      const u = isNum(p.unrealized_pnl) ? p.unrealized_pnl : 0;
      cell('unrealized_pnl', p.unrealized_pnl, fmt(p.unrealized_pnl, 2, true), `num signed ${u > 0 ? 'pos' : u < 0 ? 'neg' : ''}`);
      rows.push(tr);
    }
    body.replaceChildren(...rows);
    $('positions').hidden = rows.length === 0;
    $('positions-none').hidden = rows.length !== 0;
    $('positions-none').textContent = m ? 'Flat: no open position.' : 'No data from the daemon.';
  }

  function renderDaemon(m) {
    const mk = m && m.market ? m.market : {};
    const lc = mk.last_candle || {};
    put('last-candle', lc.time ?? null, lc.time ? utc(lc.time) : '—');
    putNum('last-close', lc.close, 2);
    putNum('candles-processed', mk.candles_processed, 0);
    putNum('candles-rejected', mk.rejected_candles, 0);
    putNum('risk-alerts', m && m.risk ? m.risk.alerts : null, 0);
    const sy = m && m.system ? m.system : {};
    put('daemon-uptime', sy.uptime_s ?? null, duration(sy.uptime_s));
    putNum('daemon-rss', sy.rss_mb, 1);
    $('daemon-version').textContent = sy.version || '—';
  }

  function renderHost(h) {
    for (const [key, id] of [['cpu_pct', 'cpu'], ['memory_pct', 'memory'], ['disk_pct', 'disk']]) {
      putNum(`${id}-pct`, h[key], 1);
      const fill = $(`${id}-bar`);
      fill.style.width = `${isNum(h[key]) ? Math.min(Math.max(h[key], 0), 100) : 0}%`;
    }
  }

  function alertLists() {
    const a = view.snapshot && view.snapshot.alerts ? view.snapshot.alerts : {};
    const active = Array.isArray(a.active_alerts) ? a.active_alerts.slice() : [];
    const activeIds = new Set(active.map((x) => x.id));
    const recent = (Array.isArray(a.recent_alerts) ? a.recent_alerts : []).filter((x) => !activeIds.has(x.id));
    active.sort((x, y) => (SEVERITY_ORDER[x.severity] || 9) - (SEVERITY_ORDER[y.severity] || 9)
      || String(y.opened_at).localeCompare(String(x.opened_at)));
    return { active, recent: recent.slice(0, 20) };
  }

  function renderAlerts() {
    const { active, recent } = alertLists();
    $('alerts-active').replaceChildren(...active.map((a) => alertItem(a, true)));
    $('alerts-recent').replaceChildren(...recent.map((a) => alertItem(a, false)));
    put('alerts-count', active.length, String(active.length));
    $('alerts-count').classList.toggle('hot', active.some((a) => a.state === 'open'));
    put('alerts-recent-count', recent.length, String(recent.length));
    $('alerts-none').hidden = active.length !== 0;
  }

  function alertItem(a, actionable) {
    const sev = SEVERITY_ORDER[a.severity] ? a.severity : 'P4';
    const li = el('li', `alert sev-${sev} st-${a.state === 'open' || a.state === 'acknowledged' ? a.state : 'resolved'}`);
    li.dataset.alertId = String(a.id);
    li.dataset.state = String(a.state ?? '');
    li.dataset.severity = String(a.severity ?? '');
    li.dataset.rule = String(a.rule ?? '');
    li.appendChild(el('span', 'sev', String(a.severity ?? '?')));
    const body = el('div', 'alert-body');
    const head = el('div', 'alert-head');
    head.appendChild(el('strong', 'rule', String(a.rule ?? 'alert')));
    head.appendChild(el('span', 'tag alert-state', String(a.state ?? '')));
    if (isNum(a.count) && a.count > 1) head.appendChild(el('span', 'tag', `×${a.count}`));
    body.appendChild(head);
    body.appendChild(el('div', 'msg', String(a.message ?? '')));
    const meta = [];
    if (!YES_NO_RULES.has(a.rule)) {
      if (isNum(a.value)) meta.push(`value ${fmt(a.value, Math.abs(a.value) < 10 ? 3 : 1)}`);
      if (isNum(a.threshold)) meta.push(`threshold ${fmt(a.threshold, Math.abs(a.threshold) < 10 ? 3 : 1)}`);
    }
    const when = a.state === 'resolved' ? a.resolved_at : a.state === 'acknowledged' ? a.acknowledged_at : a.opened_at;
    const metaEl = el('div', 'meta', meta.join(' · '));
    if (when) {
      const t = el('span', 'ago', '');
      t.dataset.time = String(when);
      t.dataset.prefix = `${meta.length ? ' · ' : ''}${a.state === 'resolved' ? 'resolved' : a.state === 'acknowledged' ? 'acknowledged' : 'opened'} `;
      t.title = String(when);
      metaEl.appendChild(t);
    }
    body.appendChild(metaEl);
    li.appendChild(body);
    if (actionable && a.state === 'open') {
      const busy = view.acking.has(String(a.id));
      const b = el('button', 'ack', busy ? 'Acknowledging…' : 'Acknowledge');
      b.type = 'button';
      b.dataset.ackId = String(a.id);
      b.disabled = busy;
      li.appendChild(b);
    }
    return li;
  }

  /** Once a second: relative times, and the connection pill turns "stale" when snapshots stop coming. */
  function tick() {
    for (const t of document.querySelectorAll('.ago[data-time]')) {
      t.textContent = `${t.dataset.prefix || ''}${ago(t.dataset.time)}`;
    }
    const upd = $('updated');
    if (upd.dataset.value) upd.textContent = ago(upd.dataset.value);
    // Stale: no snapshot for three scrape intervals (and at least 15 s) although the stream is open.
    const conn = $('conn');
    const interval = view.snapshot && view.snapshot.monitor && isNum(view.snapshot.monitor.scrape_interval_s)
      ? view.snapshot.monitor.scrape_interval_s : 5;
    if (conn.dataset.state === 'live' && view.receivedAt
        && Date.now() - view.receivedAt > Math.max(15, 3 * interval) * 1000) {
      setConn('stale');
    }
  }

  // ---- live data -------------------------------------------------------------------------------------
  function setConn(state) {
    const c = $('conn');
    c.dataset.state = state;
    c.textContent = state;
    c.className = `pill ${state === 'live' ? 'ok' : state === 'connecting' ? '' : 'warn'}`;
  }

  async function fetchSnapshot() {
    try {
      const r = await fetch('/api/snapshot', { cache: 'no-store' });
      if (r.ok) render(await r.json());
    } catch (e) {
      setConn('offline');
    }
  }

  function connect() {
    if (view.stream) view.stream.close();
    const es = new EventSource('/api/stream');
    view.stream = es;
    es.addEventListener('open', () => setConn('live'));
    es.addEventListener('snapshot', (ev) => {
      let snap;
      try { snap = JSON.parse(ev.data); } catch (e) { return; }
      setConn('live');
      render(snap);
    });
    es.addEventListener('error', () => {
      if (es.readyState === EventSource.CLOSED) {
        // The server refused the stream (not a dropped connection, which EventSource retries by itself).
        setConn('offline');
        setTimeout(() => { if (view.stream === es) { fetchSnapshot(); connect(); } }, 5000);
      } else {
        setConn('reconnecting');
      }
    });
  }

  // ---- token and acknowledge -------------------------------------------------------------------------
  /** Ask for the control token in the page's own dialog; resolves to the token (saved) or null (cancelled). */
  function askToken(message) {
    const dlg = $('token-dialog');
    const input = $('token-input');
    const msg = $('token-message');
    return new Promise((resolve) => {
      const finish = (value) => {
        $('token-form').onsubmit = null;
        $('token-cancel').onclick = null;
        dlg.oncancel = null;
        if (dlg.open) dlg.close();
        resolve(value);
      };
      input.value = '';
      msg.textContent = message || '';
      msg.hidden = !message;
      $('token-forget').hidden = !localStorage.getItem(TOKEN_KEY);
      $('token-form').onsubmit = (ev) => {
        ev.preventDefault();
        const value = input.value.trim();
        if (!value) {
          msg.textContent = 'Enter the token, or cancel.';
          msg.hidden = false;
          return;
        }
        localStorage.setItem(TOKEN_KEY, value);
        finish(value);
      };
      $('token-cancel').onclick = () => finish(null);
      dlg.oncancel = (ev) => { ev.preventDefault(); finish(null); };
      if (!dlg.open) dlg.showModal();
      input.focus();
    });
  }

  async function acknowledge(id) {
    if (view.acking.has(id)) return;
    let token = localStorage.getItem(TOKEN_KEY);
    if (!token) token = await askToken();
    if (!token) return;
    view.acking.add(id);
    renderAlerts();
    try {
      for (;;) {
        let r;
        try {
          r = await fetch(`/api/alerts/${encodeURIComponent(id)}/acknowledge`, {
            method: 'POST', cache: 'no-store', headers: { Authorization: `Bearer ${token}` },
          });
        } catch (e) {
          notice('Could not reach the monitor to acknowledge; try again.', 'error');
          return;
        }
        let body = null;
        try { body = await r.json(); } catch (e) { body = null; }
        if (r.status === 401 || r.status === 403) {
          localStorage.removeItem(TOKEN_KEY);
          token = await askToken('The monitor refused that token. Enter the control token again.');
          if (!token) {
            notice('Not acknowledged: no valid control token.', 'error');
            return;
          }
          continue;
        }
        if (!r.ok) {
          const why = body && typeof body.error === 'string' ? body.error : `HTTP ${r.status}`;
          notice(`Alert ${id} not acknowledged: ${why}`, 'error');
          return;
        }
        markAcknowledged(id, body);
        notice(`Alert ${id} acknowledged.`);
        return;
      }
    } finally {
      view.acking.delete(id);
      renderAlerts();
    }
  }

  /** Show the acknowledgement at once; the next snapshot from the stream confirms (or corrects) it. */
  function markAcknowledged(id, body) {
    const a = view.snapshot && view.snapshot.alerts;
    if (!a) return;
    const update = body && typeof body === 'object' && body.alert && typeof body.alert === 'object' ? body.alert
      : body && typeof body === 'object' && String(body.id) === id ? body : null;
    for (const list of [a.active_alerts, a.recent_alerts]) {
      if (!Array.isArray(list)) continue;
      for (let i = 0; i < list.length; i += 1) {
        if (String(list[i].id) !== id) continue;
        list[i] = update ? { ...list[i], ...update }
          : { ...list[i], state: 'acknowledged', acknowledged_at: list[i].acknowledged_at || new Date().toISOString() };
      }
    }
  }

  function init() {
    $('alerts-active').addEventListener('click', (ev) => {
      const b = ev.target instanceof Element ? ev.target.closest('button.ack') : null;
      if (b && b.dataset.ackId) acknowledge(b.dataset.ackId);
    });
    $('token-button').addEventListener('click', async () => {
      const had = !!localStorage.getItem(TOKEN_KEY);
      const p = askToken(had ? 'A token is stored in this browser. Enter a new one to replace it.' : '');
      $('token-forget').onclick = () => {
        localStorage.removeItem(TOKEN_KEY);
        $('token-cancel').click();
        notice('Stored control token forgotten.');
      };
      await p;
    });
    setConn('connecting');
    fetchSnapshot().then(loadHistory);
    connect();
    setInterval(tick, 1000);
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
