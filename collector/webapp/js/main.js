// The participant's page: join, check the model and its audit, consent, transform photos
// here, upload only the model's outputs, resume after a reload, status, withdraw.
import * as api from './api.js';
import * as journal from './journal.js';
import { faceDigest, itemId, itemKey, sha256, unhex } from './ids.js';
import { Model } from './model.js';
import { DETECTOR_FILES } from './faces.js';
import { PhotoError, loadDetector, photoItems } from './photos.js';
import * as R from './routes.js';
import { TrustError, cardDigest, checkPolicy, loadKey, summary, verifiedAttestations } from './trust.js';
import { encodeArrays, encodeBatch } from './wire.js';
import { ambiguate, codeArrays, keyFile, sparseSpec, wireArrays } from './sparse.js';

const $ = (id) => document.getElementById(id);
const UPLOAD_BATCH = 64; // items per upload at most (and within MAX_BATCH_ITEMS and MAX_BODY_BYTES)
const RUN_CHUNK = 16;    // photos per onnxruntime call, as the Python client
const MAX_PREVIEWS = 24;
const state = { me: null, key: null, card: null, model: null, pending: [], files: [] };
window.pric = state; // for the tests (read-only use)

function show(id, on = true) { $(id).hidden = !on; } // on: a boolean (undefined would mean true)
function alertMsg(text, ok = false) { const a = $('alert'); a.textContent = text; a.className = ok ? 'ok' : ''; a.hidden = !text; }
function problem(name, text) { const li = document.createElement('li'); li.textContent = `${name}: ${text}`; $('problems').append(li); }

async function start() {
  if (!window.isSecureContext || !crypto.subtle) {
    alertMsg('This page must be opened over HTTPS (or on this computer\'s loopback address): only there does the browser offer the cryptography that checks the model.');
    return;
  }
  state.me = await journal.get('config', 'me');
  if (!state.me) { show('join'); return; }
  await joined();
}

async function join() {
  alertMsg('');
  try {
    const got = await api.register($('invite').value.trim());
    const raw = crypto.getRandomValues(new Uint8Array(32)); // this participant's item-id secret
    state.me = { participant_id: got.participant_id, token: got.token, item_key: raw };
    await journal.put('config', 'me', state.me);
    show('join', false);
    await joined();
  } catch (err) { alertMsg(err.message); }
}

// client/cli.py PAGE_KEY_FORMAT: the file `pric-client page-key` writes
const PAGE_KEY_FORMAT = 'pric-page-key/1';
const MAX_PAGE_KEY_BYTES = 16 * 1024;

/** pric-client's registration and item-id secret (`pric-client page-key`) → this page's
 * registration: the page then uploads as that participant, with the ids pric-client computes.
 * The token is sent to nobody before the file is known to be for this collector. */
async function parsePageKey(bytes) {
  const bad = (why) => { throw new Error(`the chosen file is not a pric-client page key: ${why}`); };
  if (bytes.length > MAX_PAGE_KEY_BYTES) bad(`larger than ${MAX_PAGE_KEY_BYTES} bytes`);
  let doc;
  try { doc = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes)); } catch { bad('not JSON'); }
  if (!doc || typeof doc !== 'object' || doc.format !== PAGE_KEY_FORMAT) bad(`its format is not ${PAGE_KEY_FORMAT}`);
  for (const f of ['server', 'participant_id', 'token', 'item_key']) if (typeof doc[f] !== 'string' || !doc[f]) bad(`no ${f}`);
  if (!/^[0-9a-f]{64}$/.test(doc.item_key)) bad('item_key is not 32 bytes in lowercase hex');
  let origin;
  try { origin = new URL(doc.server).origin; } catch { bad(`server ${doc.server.slice(0, 100)} is not a URL`); }
  if (origin !== location.origin) {
    throw new Error(`the chosen file is pric-client's registration at ${origin.slice(0, 200)}, not at this collector (${location.origin}): nothing was sent`);
  }
  return { participant_id: doc.participant_id, token: doc.token, item_key: unhex(doc.item_key) };
}

async function importKey(ev) {
  alertMsg('');
  const f = ev.target.files && ev.target.files[0];
  ev.target.value = '';
  if (!f) return;
  try {
    const me = await parsePageKey(new Uint8Array(await f.slice(0, MAX_PAGE_KEY_BYTES + 1).arrayBuffer()));
    try { await api.me(me.token); }
    catch (err) { throw new Error(err.status === 401 ? `the collector does not accept this registration any more (withdrawn?); join anew or run pric-client register --force` : err.message); }
    state.me = { ...me, imported: true };
    await journal.put('config', 'me', state.me);
    show('join', false);
    await joined();
  } catch (err) { alertMsg(err.message); }
  finally { document.body.dataset.imported = String(Date.now()); }
}

async function joined() {
  $('who').textContent = `Joined as participant ${state.me.participant_id}${state.me.imported ? ' (pric-client\'s registration)' : ''}`;
  state.key = await itemKey(state.me.item_key);
  show('model'); show('status');
  refreshStatus();
  await checkModel();
}

/** Card, attestations and model bytes from the collector, verified here before any use. */
async function checkModel() {
  try {
    const tok = state.me.token;
    const card = await api.modelCard(tok);
    if (card.kind !== 'features' && card.kind !== 'sparse_code') throw new TrustError(`model ${card.model_id} is a ${String(card.kind).slice(0, 40)} model, which this page does not know; use the Python client`);
    // a sparse card: its ambiguation checked against the page's own floor before anything is fetched
    const spec = card.kind === 'sparse_code' ? sparseSpec(card) : null;
    // a card that finds faces brings its detector's three files (extra_files): fetched and
    // hashed with the model, bound by the same attestation, checked again before use
    const detectorNames = card.alignment ? DETECTOR_FILES : [];
    const [envs, file, anchor, ...detFiles] = await Promise.all([
      api.attestations(tok, card.model_id), api.modelFile(tok, card.model_id, card.file),
      api.call(R.WEB_TRUST_KEY, { what: 'trust anchor' }),
      ...detectorNames.map((n) => api.modelFile(tok, card.model_id, n))]);
    const digest = await sha256(file.data);
    if (digest !== card.sha256) throw new TrustError(`model ${card.model_id}: the served file's sha256 ${digest.slice(0, 12)}… is not the card's`);
    const held = { [card.file]: digest };
    for (const [i, n] of detectorNames.entries()) {
      held[n] = await sha256(detFiles[i].data);
      if (held[n] !== (card.extra_files || {})[n]) throw new TrustError(`model ${card.model_id}: the served detector file ${n} has sha256 ${held[n].slice(0, 12)}…, not the card's`);
    }
    const key = await loadKey(anchor);
    const good = await verifiedAttestations(card, envs.attestations || [], new Map([[key.keyid, key]]), held);
    for (const v of good) {
      const by = `model ${card.model_id} (audited by ${v.key.name || v.key.keyid.slice(0, 16)})`;
      if (v.predicate.data && v.predicate.data.quick) throw new TrustError(`${by}: the attestation signs a smoke run (pric-audit --quick), not an audit`);
      checkPolicy(v.predicate.measured, 1, by);
    }
    state.card = card; state.good = good; state.sparse = spec;
    state.model = await Model.load(card, file.data);
    state.detector = card.alignment
      ? await loadDetector(card, Object.fromEntries(detectorNames.map((n, i) => [n, detFiles[i].data]))) : null;
    const lines = summary(card, good, 1);
    if (spec) lines.splice(lines.length - 1, 0, `Each code map is sent with ${spec.k} true and ${spec.kFake} fake values; only holders of your keys can tell them apart. The keys stay in this browser (save them below to share them).`);
    $('summary').textContent = lines.join('\n');
    show('keys', Boolean(spec));
    if (spec) refreshKeys();
    show('summary'); show('trust-note');
    const consent = await journal.get('consent', card.model_id);
    const agreed = Boolean(consent && consent.sha256 === card.sha256 && consent.card === await cardDigest(card));
    $('model-state').textContent = agreed ? `You agreed to model ${card.model_id}.` : 'Read what the audit measured, then agree or leave.';
    show('agree-btn', !agreed);
    show('photos', agreed);
  } catch (err) {
    $('model-state').textContent = 'Nothing will be computed or sent.';
    alertMsg(err instanceof TrustError ? `The model cannot be used: ${err.message}` : err.message);
  }
}

async function agree() {
  await journal.put('consent', state.card.model_id, { sha256: state.card.sha256, card: await cardDigest(state.card), at: new Date().toISOString() });
  show('agree-btn', false);
  $('model-state').textContent = `You agreed to model ${state.card.model_id}.`;
  show('photos');
}

function preview(name, pixels, out) {
  if ($('previews').children.length >= MAX_PREVIEWS) return;
  const s = state.card.input, c = document.createElement('canvas');
  c.width = s.width; c.height = s.height;
  const img = new ImageData(s.width, s.height);
  for (let i = 0; i < s.width * s.height; i++) { img.data.set(pixels.subarray(i * 3, i * 3 + 3), i * 4); img.data[i * 4 + 3] = 255; }
  c.getContext('2d').putImageData(img, 0, 0);
  const fig = document.createElement('figure');
  const cap = document.createElement('figcaption');
  cap.textContent = state.sparse ? `sends ${state.sparse.kPrime} per map, ${state.sparse.kFake} fake` : `sends ${out.length} numbers`;
  cap.title = `${name}: stays here; sent: ${Array.from(out.slice(0, 6), (v) => v.toFixed(3)).join(', ')}…`;
  fig.append(c, cap);
  $('previews').append(fig);
}

/** Transform the picked photos here; bad ones are reported by name and skipped. */
async function pick(ev) {
  try { await transformPicked(ev); }
  catch (err) { alertMsg(err.message); }
  finally { pickers(true); document.body.dataset.ready = String(Date.now()); }
}

async function transformPicked(ev) {
  alertMsg('');
  $('problems').replaceChildren(); $('previews').replaceChildren();
  show('upload-btn', false);
  pickers(false); // one pick at a time
  const files = Array.from(ev.target.files || []);
  state.pending = [];
  let known = 0, bad = 0, done = 0, faces = 0, small = 0;
  const seen = new Set(); // item ids of this pick: a photo picked twice is sent once
  const prog = $('progress'); prog.max = files.length || 1; prog.value = 0; show('progress');
  const card = state.card;
  let chunk = [];
  const flush = async () => {
    if (!chunk.length) return;
    const outs = await state.model.run(chunk.map((c) => c.pixels));
    if (!state.sparse) {
      chunk.forEach((c, i) => { state.pending.push({ item_id: c.id, array: outs[i] }); preview(c.name, c.pixels, outs[i]); });
    } else {
      // ambiguated here; the keys (with their codes) are kept before anything is sent, and a
      // code drawn before (an upload cut short, a reload) is sent again as it was
      const fresh = [];
      for (const [i, c] of chunk.entries()) {
        const kept = await journal.getKey(card.model_id, c.id);
        const code = kept ? { indices: kept.indices, values: new Float16Array(kept.values.buffer.slice(0)) }
          : await ambiguate(outs[i], state.sparse);
        if (!kept) fresh.push({ item_id: c.id, model_id: card.model_id, key: code.key, indices: code.indices, values: new Uint16Array(code.values.buffer.slice(0)) });
        state.pending.push({ item_id: c.id, arrays: codeArrays(code, state.sparse) });
        preview(c.name, c.pixels, Float32Array.from(code.values));
      }
      await journal.putKeys(fresh);
    }
    chunk = [];
  };
  for (const f of files) {
    const name = f.webkitRelativePath || f.name;
    try {
      const bytes = new Uint8Array(await f.arrayBuffer());
      const photoSha = await sha256(bytes);
      if (!card.alignment) {
        // one item per photo, as the Python client
        const id = await itemId(state.key, photoSha, card.sha256);
        if (seen.has(id) || await journal.isDone(card.model_id, id)) { known++; }
        else {
          seen.add(id);
          chunk.push({ id, name, pixels: (await photoItems(bytes, card)).items[0].pixels });
        }
      } else {
        // one item per face, with the Python client's per-face ids (client.pipeline.face_digest)
        const got = await photoItems(bytes, card, state.detector);
        for (const line of got.problems) problem(name, line);
        small += got.small;
        let fresh = 0;
        for (const it of got.items) {
          const id = await itemId(state.key, await faceDigest(photoSha, it.face), card.sha256);
          if (seen.has(id) || await journal.isDone(card.model_id, id)) continue;
          seen.add(id); fresh++;
          chunk.push({ id, name: `${name} (face ${it.face + 1})`, pixels: it.pixels });
        }
        if (!fresh && got.items.length) known++;
        faces += got.items.length;
      }
      if (chunk.length >= RUN_CHUNK) await flush();
    } catch (err) {
      if (!(err instanceof PhotoError)) { alertMsg(`${name}: ${err.message}`); }
      else problem(name, err.message);
      bad++;
    }
    prog.value = ++done;
    $('photo-state').textContent = `${done} of ${files.length} photos looked at here`;
  }
  await flush();
  const faceNote = card.alignment ? ` ${faces} face(s) found${small ? `, ${small} too small left out` : ''}.` : '';
  $('photo-state').textContent = `${state.pending.length} to send, ${known} already sent, ${bad} skipped (see below).${faceNote} Nothing has left this device yet.`;
  $('upload-btn').textContent = `Upload ${state.pending.length} ${card.alignment ? 'faces' : 'photos'}' model outputs`;
  show('upload-btn', state.pending.length > 0);
}

function pickers(on) { for (const id of ['files', 'folder']) $(id).disabled = !on; }

async function upload() {
  alertMsg('');
  show('upload-btn', false);
  pickers(false); // a new pick would replace the photos being sent
  const card = state.card, total = state.pending.length;
  const specs = state.sparse ? wireArrays(state.sparse) : null;
  const perItem = (specs ? specs.reduce((a, x) => a + x.shape.reduce((p, q) => p * q, 1) * (x.dtype === 'uint8' ? 1 : 2), 0)
    : 4 * card.output.shape.reduce((a, b) => a * b, 1)) + 200; // values + header share, bytes
  const batchSize = Math.max(1, Math.min(UPLOAD_BATCH, R.MAX_BATCH_ITEMS, Math.floor(R.MAX_BODY_BYTES / 2 / perItem)));
  const prog = $('progress'); prog.max = total; prog.value = 0;
  let sent = 0, stored = 0, dups = 0;
  try {
    // the collector links all of a participant's uploads: the per-person bound is checked at
    // the photos it would then hold (those acknowledged before included), as pric-client does
    const held = (await journal.count('done')) + total;
    for (const v of state.good) checkPolicy(v.predicate.measured, held, `model ${card.model_id} (audited by ${v.key.name || v.key.keyid.slice(0, 16)})`);
    while (state.pending.length) {
      const batch = state.pending.slice(0, batchSize);
      const got = await api.upload(state.me.token, specs ? encodeArrays(card, specs, batch) : encodeBatch(card, batch));
      await journal.markDone(card.model_id, batch.map((b) => b.item_id)); // acknowledged: never sent again
      state.pending.splice(0, batch.length);
      sent += batch.length; stored += got.stored; dups += got.duplicates;
      prog.value = sent;
      $('photo-state').textContent = `Uploaded ${sent} of ${total}`;
    }
    alertMsg(`Uploaded ${sent} ${card.alignment ? 'faces' : 'photos'}' model outputs (${stored} new, ${dups} the collector already had).`, true);
  } catch (err) {
    alertMsg(`${err.message} (${state.pending.length} photos wait; press Upload again)`);
    $('upload-btn').textContent = `Upload the remaining ${state.pending.length}`;
    show('upload-btn');
  }
  pickers(true);
  document.body.dataset.uploaded = String(Date.now());
  refreshStatus();
  if (state.sparse) refreshKeys();
}

async function refreshKeys() {
  const n = (await journal.allKeys()).filter((r) => r.model_id === state.card.model_id).length;
  $('keys-text').textContent = `This browser keeps the keys of ${n} ambiguated code(s) of model ${state.card.model_id}: without them nobody, the collector included, can tell your true values from the fakes. They are never uploaded; clearing this site's data loses them.`;
  $('keys-btn').disabled = n === 0;
}

/** The keys as client/keystore.py's key file (pric-client decode reads it), saved by the browser. */
async function saveKeys() {
  const rows = (await journal.allKeys()).filter((r) => r.model_id === state.card.model_id);
  const url = URL.createObjectURL(new Blob([keyFile(rows)], { type: 'application/json' }));
  const a = document.createElement('a');
  a.href = url; a.download = `pric-keys-${state.card.model_id.replace(/[^A-Za-z0-9_.-]/g, '_')}.json`;
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

async function refreshStatus() {
  try {
    const me = await api.me(state.me.token);
    const local = await journal.count('done');
    $('status-text').textContent = `The collector holds ${me.items} item(s) of yours${Object.keys(me.items_by_model || {}).length ? ' (' + Object.entries(me.items_by_model).map(([m, n]) => `${m}: ${n}`).join(', ') + ')' : ''}; this browser's journal lists ${local}.`;
  } catch (err) { $('status-text').textContent = err.message; }
}

async function withdraw() {
  if (!confirm('Delete everything you uploaded from the collector, and leave?')) return;
  try {
    const got = await api.withdraw(state.me.token);
    await journal.forgetAll();
    state.me = null; state.pending = [];
    for (const id of ['model', 'photos', 'status']) show(id, false);
    $('who').textContent = '';
    alertMsg(`Withdrawn: the collector deleted ${got.deleted} item(s) and your token; this browser forgot your registration.`, true);
    show('join');
  } catch (err) { alertMsg(err.message); }
}

$('join-btn').addEventListener('click', join);
$('keyfile').addEventListener('change', importKey);
$('agree-btn').addEventListener('click', agree);
$('files').addEventListener('change', pick);
$('folder').addEventListener('change', pick);
$('upload-btn').addEventListener('click', upload);
$('refresh-btn').addEventListener('click', refreshStatus);
$('withdraw-btn').addEventListener('click', withdraw);
$('keys-btn').addEventListener('click', saveKeys);
start().catch((err) => alertMsg(err.message));
