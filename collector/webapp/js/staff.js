// The operator's and auditor's view: counts, labels, training jobs and classifiers
// (operator), models with their attestations verified in the page and their audit reports
// (both). The token is never stored; the report's plots are fetched with it and shown as
// blob: images (same origin, the page's CSP unchanged).
import * as api from './api.js';
import * as R from './routes.js';
import { loadKey, verifiedAttestations, TrustError } from './trust.js';

const $ = (id) => document.getElementById(id);
function alertMsg(text) { $('alert').textContent = text; $('alert').hidden = !text; }
function table(el, head, rows) {
  el.replaceChildren();
  const tr = (cells, tag) => { const r = document.createElement('tr'); for (const c of cells) { const e = document.createElement(tag); e.textContent = String(c); r.append(e); } return r; };
  el.append(tr(head, 'th'));
  for (const row of rows) el.append(tr(row, 'td'));
  if (!rows.length) el.append(tr(['(none)'], 'td'));
}
const f = (v, d = 3) => (typeof v === 'number' ? v.toFixed(d) : 'n/a');
const when = (t) => (typeof t === 'number' ? new Date(t * 1000).toISOString().slice(0, 19).replace('T', ' ') : '');
const NAME_RE = new RegExp(R.AUDIT_FILE_NAME_RE);
const MAX_SUMMARY_CHARS = 4000;
let blobUrls = [];

function jobResult(j) {
  if (j.status === 'failed' || (j.error && j.status !== 'done')) return j.error || '';
  const r = j.result;
  if (!r) return '';
  return `accuracy ${f(r.accuracy)} (majority ${f(r.majority_rate)}), ${r.n_train} train / ${r.n_test} test items` +
    (r.classifier && r.classifier.id !== undefined ? `, classifier ${r.classifier.id}` : '');
}

function showJobs(list) {
  table($('jobs'), ['job', 'status', 'task', 'model', 'kind', 'attempts', 'queued', 'finished', 'result or error'],
    list.map((j) => { const p = j.params || {}; return [j.id, j.status, p.task, p.model_id, p.kind, j.attempts, when(j.created_at), when(j.finished_at), jobResult(j)]; }));
}

/** The summary of a report: report.md as text, else a JSON report's headline. */
function summaryText(name, bytes) {
  const text = new TextDecoder('utf-8').decode(bytes);
  if (name.endsWith('.md')) return text.slice(0, MAX_SUMMARY_CHARS) + (text.length > MAX_SUMMARY_CHARS ? '\n…' : '');
  let doc;
  try { doc = JSON.parse(text); } catch { return `${name}: not valid JSON`; }
  const head = doc && typeof doc === 'object' ? (doc.headline ?? doc.verdicts ?? doc) : doc;
  const out = JSON.stringify(head, null, 1);
  return `${name} (headline):\n` + out.slice(0, MAX_SUMMARY_CHARS) + (out.length > MAX_SUMMARY_CHARS ? '\n…' : '');
}

async function showAudit(token, id) {
  const base = R.MODEL_AUDIT.replace('<model_id>', encodeURIComponent(id));
  const { files } = await api.call(base, { token, what: `audit report of ${id}` });
  if (!files.length) return null;
  const box = document.createElement('div');
  box.className = 'audit';
  box.dataset.model = id;
  const h = document.createElement('h3');
  h.textContent = `${id}: ${files.length} file(s)`;
  box.append(h);
  const get = (name) => api.call(`${base}/${encodeURIComponent(name)}`,
    { token, what: `audit file ${name}`, limit: R.MAX_AUDIT_FILE_BYTES, bytes: true });
  const good = files.filter((x) => NAME_RE.test(x.name));
  const md = good.filter((x) => x.name.endsWith('.md'));
  const js = good.filter((x) => x.name.endsWith('.json'));
  const summaryFile = md.find((x) => x.name === 'report.md') || js.find((x) => x.name === 'report.json') || md[0] || js[0];
  if (summaryFile) {
    const pre = document.createElement('pre');
    pre.className = 'audit-summary';
    pre.textContent = summaryText(summaryFile.name, (await get(summaryFile.name)).data);
    box.append(pre);
  }
  for (const x of good.filter((y) => y.name.endsWith('.png'))) {
    const fig = document.createElement('figure');
    const cap = document.createElement('figcaption');
    cap.textContent = x.name;
    try {
      const { data } = await get(x.name);
      const url = URL.createObjectURL(new Blob([data], { type: 'image/png' }));
      blobUrls.push(url);
      const img = document.createElement('img');
      img.alt = `${id}: ${x.name}`;
      img.className = 'plot';
      img.src = url;
      fig.append(img, cap);
    } catch (err) {
      cap.textContent = `${x.name}: ${err.message}`;
      fig.append(cap);
    }
    box.append(fig);
  }
  const rest = good.filter((y) => !y.name.endsWith('.png') && y !== summaryFile).map((y) => y.name);
  if (rest.length) {
    const p = document.createElement('p');
    p.className = 'muted';
    p.textContent = `Also in the report: ${rest.join(', ')}.`;
    box.append(p);
  }
  return box;
}

async function show() {
  alertMsg('');
  const token = $('token').value.trim();
  if (!token) { alertMsg('Enter an operator or auditor token.'); return; }
  try {
    let stats = null;
    try { stats = await api.call(R.STATS, { token, what: 'stats' }); }
    catch (err) { if (err.status !== 403) throw err; }  // an auditor: no counts
    $('stats').hidden = !stats;
    if (stats) {
      $('counts').textContent = `${stats.participants} participant(s), ${stats.items} item(s).`;
      table($('by-model'), ['model', 'items'], Object.entries(stats.items_by_model));
      table($('labels'), ['label', '0', '1'], Object.entries(stats.labels).map(([k, v]) => [k, v['0'], v['1']]));
      const cls = stats.classifiers || [];
      const keys = cls.length ? Object.keys(cls[0]).filter((k) => typeof cls[0][k] !== 'object').slice(0, 8) : ['classifier'];
      table($('classifiers'), keys, cls.map((j) => keys.map((k) => (typeof j[k] === 'number' && !Number.isInteger(j[k]) ? f(j[k]) : j[k]))));
      showJobs((await api.call(`${R.JOBS}?limit=50`, { token, what: 'jobs' })).jobs || []);
    }
    for (const u of blobUrls) URL.revokeObjectURL(u);
    blobUrls = [];
    const health = await api.health();
    const anchor = await loadKey(await api.call(R.WEB_TRUST_KEY, { what: 'trust anchor' }));
    const list = $('model-list');
    list.replaceChildren();
    const audits = [];
    for (const id of health.models || []) {
      const card = await api.call(R.MODEL_CARD_BY_ID.replace('<model_id>', encodeURIComponent(id)), { token, what: `card of ${id}` });
      const envs = (await api.attestations(token, id)).attestations || [];
      const box = document.createElement('div');
      const h = document.createElement('h3');
      h.textContent = `${id} (${card.kind}, sha256 ${card.sha256.slice(0, 16)}…)`;
      const p = document.createElement('pre');
      try {
        const good = await verifiedAttestations(card, envs, new Map([[anchor.keyid, anchor]]), Object.fromEntries(
          Object.entries({ [card.file]: card.sha256, ...(card.extra_files || {}) })));
        p.textContent = good.map((v) => {
          const m = v.predicate.measured, pr = m.private || {};
          return `verified: signed by ${v.key.name} (${v.key.keyid.slice(0, 16)}) on ${String(v.predicate.date).slice(0, 10)}\n` +
            `  private ${pr.attribute}: strongest ${pr.strongest} ${f(pr.strongest_accuracy)} (majority ${f(pr.majority_rate)}); ` +
            `reconstruction PSNR ${f((m.reconstruction || {}).psnr, 1)} dB; re-identification rank-1 ${f((m.reid || {}).rank1)}`;
        }).join('\n');
      } catch (err) {
        if (!(err instanceof TrustError)) throw err;
        p.textContent = `NOT verified with the project's release key: ${err.message} (${envs.length} attestation(s) stored)`;
      }
      box.append(h, p);
      list.append(box);
      const audit = await showAudit(token, id);
      if (audit) audits.push(audit);
    }
    $('audit-list').replaceChildren(...audits);
    if (!audits.length) $('audit-list').textContent = 'No model on this collector has an audit report in its audit/ folder.';
    $('models').hidden = false;
    $('audits').hidden = false;
    document.body.dataset.shown = String(Date.now());
  } catch (err) {
    alertMsg(err.message);
    $('stats').hidden = true; $('models').hidden = true; $('audits').hidden = true;
    document.body.dataset.shown = String(Date.now());
  }
}

$('show-btn').addEventListener('click', show);
