// The operator's and auditor's view: counts (operator), models with their attestations
// verified in the page (both). The token is never stored.
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
      const jobs = stats.classifiers || [];
      const keys = jobs.length ? Object.keys(jobs[0]).filter((k) => typeof jobs[0][k] !== 'object').slice(0, 8) : ['classifier'];
      table($('jobs'), keys, jobs.map((j) => keys.map((k) => (typeof j[k] === 'number' && !Number.isInteger(j[k]) ? f(j[k]) : j[k]))));
    }
    const health = await api.health();
    const anchor = await loadKey(await api.call(R.WEB_TRUST_KEY, { what: 'trust anchor' }));
    const list = $('model-list');
    list.replaceChildren();
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
    }
    $('models').hidden = false;
    document.body.dataset.shown = String(Date.now());
  } catch (err) {
    alertMsg(err.message);
    $('stats').hidden = true; $('models').hidden = true;
    document.body.dataset.shown = String(Date.now());
  }
}

$('show-btn').addEventListener('click', show);
