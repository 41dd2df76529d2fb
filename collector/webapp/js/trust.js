// Attestations checked in the page, as protocol/attestation.py and client/verify.py check
// them: an Ed25519 signature (WebCrypto) over DSSE's PAE of the in-toto statement, by a
// key of the page's trust store; the statement binds this exact card (every field but
// `audit`) and the sha256 of the model bytes the page will run; the measured figures pass
// the participant's policy (client.verify.Policy defaults).
import { hex, sha256 } from './ids.js';
import * as R from './routes.js';

export const PAYLOAD_TYPE = 'application/vnd.in-toto+json';
const STATEMENT_TYPE = 'https://in-toto.io/Statement/v1';
const PREDICATE_TYPE = 'https://pric.dev/attestation/privacy-audit/v1';
// client.verify.Policy's defaults (tests/web checks they are equal)
export const POLICY = { private_margin: 0.12, max_psnr: 20.0, max_reid_rank1: 0.05, per_person_margin: 0.25 };

export class TrustError extends Error {}

function b64(s) {
  if (typeof s !== 'string' || !/^[A-Za-z0-9+/]*={0,2}$/.test(s) || s.length % 4) throw new TrustError('attestation: the payload is not base64');
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/** A PRIC public key file ({keyid, name, public_key}) → {keyid, name, key: CryptoKey}. */
export async function loadKey(json) {
  const raw = b64(String(json.public_key || ''));
  if (raw.length !== 32) throw new TrustError('trust anchor: an Ed25519 public key has 32 bytes');
  const keyid = await sha256(raw);
  if (json.keyid && json.keyid !== keyid) throw new TrustError('trust anchor: its keyid does not match its key');
  let key;
  try { key = await crypto.subtle.importKey('raw', raw, { name: 'Ed25519' }, false, ['verify']); }
  catch { throw new TrustError('this browser cannot verify Ed25519 signatures (WebCrypto); use a current browser or the Python client'); }
  return { keyid, name: String(json.name || '').slice(0, 200), key };
}

export function pae(payloadType, payload) {
  const t = new TextEncoder().encode(payloadType);
  const head = new TextEncoder().encode(`DSSEv1 ${t.length} `);
  const mid = new TextEncoder().encode(` ${payload.length} `);
  const out = new Uint8Array(head.length + t.length + mid.length + payload.length);
  out.set(head, 0); out.set(t, head.length); out.set(mid, head.length + t.length); out.set(payload, head.length + t.length + mid.length);
  return out;
}

/** protocol.attestation.verify: the envelope's signature by a trusted key, the statement's shape. */
export async function verifyEnvelope(envelope, trusted) {
  if (!envelope || typeof envelope !== 'object' || envelope.payloadType !== PAYLOAD_TYPE) throw new TrustError('attestation: not a DSSE envelope of an in-toto statement');
  const payload = b64(String(envelope.payload || ''));
  if (payload.length > R.MAX_ATTESTATION_BYTES) throw new TrustError('attestation: the payload is larger than the limit');
  const sigs = Array.isArray(envelope.signatures) ? envelope.signatures.slice(0, R.MAX_ATTESTATIONS) : [];
  const unknown = [];
  for (const s of sigs) {
    if (!s || typeof s !== 'object') continue;
    const keyid = String(s.keyid || '');
    const key = trusted.get(keyid);
    if (!key) { unknown.push(keyid.slice(0, 16)); continue; }
    let ok = false;
    try { ok = await crypto.subtle.verify('Ed25519', key.key, b64(String(s.sig || '')), pae(PAYLOAD_TYPE, payload)); } catch { ok = false; }
    if (!ok) throw new TrustError(`attestation signed by ${key.name || keyid.slice(0, 16)}: the signature does not verify (tampered or forged)`);
    let st;
    try { st = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(payload)); } catch { throw new TrustError('attestation: the signed statement is not JSON'); }
    const p = st && st.predicate;
    const shaped = st && st._type === STATEMENT_TYPE && st.predicateType === PREDICATE_TYPE && Array.isArray(st.subject)
      && p && typeof p === 'object' && ['card', 'measured', 'thresholds', 'data', 'auditor'].every((k) => p[k] && typeof p[k] === 'object' && !Array.isArray(p[k]));
    if (!shaped) throw new TrustError('attestation: not a PRIC privacy-audit statement');
    if (p.auditor.keyid !== keyid) throw new TrustError('attestation: the statement names another auditor key than the one that signed it');
    return { key, statement: st, predicate: p };
  }
  if (unknown.length) throw new TrustError(`attestation: signed only by keys this page does not trust (${unknown.join(', ')}…)`);
  throw new TrustError('attestation: no signature');
}

function deepEqual(a, b) {
  if (a === b) return true;
  if (typeof a !== typeof b || a === null || b === null || typeof a !== 'object') return false;
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  const ka = Object.keys(a), kb = Object.keys(b);
  return ka.length === kb.length && ka.every((k) => Object.prototype.hasOwnProperty.call(b, k) && deepEqual(a[k], b[k]));
}

export function attestedCard(card) { const d = { ...card }; delete d.audit; return d; }
export const modelFiles = (card) => ({ [card.file]: card.sha256, ...(card.extra_files || {}) });

/** protocol.attestation.check_binds with the sha256 of the bytes the page holds. */
export function checkBinds(v, card, fileSha256) {
  const want = attestedCard(card);
  if (!deepEqual(v.predicate.card, want)) {
    const keys = [...new Set([...Object.keys(want), ...Object.keys(v.predicate.card)])].filter((k) => !deepEqual(want[k], v.predicate.card[k])).sort();
    throw new TrustError(`model ${card.model_id}: the card differs from the attested card in ${keys.join(', ') || 'its values'}`);
  }
  const subjects = {};
  for (const s of v.statement.subject) if (s && typeof s === 'object') subjects[s.name] = (s.digest || {}).sha256;
  const names = Object.keys(modelFiles(card)).sort();
  if (!deepEqual(Object.keys(subjects).sort(), names)) throw new TrustError(`model ${card.model_id}: the attestation covers files ${Object.keys(subjects).sort().join(', ')}, the card names ${names.join(', ')}`);
  for (const [name, digest] of Object.entries(fileSha256)) {
    if (subjects[name] !== digest) throw new TrustError(`model ${card.model_id}: ${name} has sha256 ${String(digest).slice(0, 12)}…, the attestation is for ${String(subjects[name]).slice(0, 12)}…`);
  }
  if (v.predicate.model_id !== card.model_id) throw new TrustError(`attestation is for model ${String(v.predicate.model_id).slice(0, 80)}, not ${card.model_id}`);
}

/** client.verify.verified_attestations: every envelope that verifies and binds; at least one. */
export async function verifiedAttestations(card, envelopes, trusted, fileSha256) {
  if (!envelopes.length) throw new TrustError(`model ${card.model_id}: no signed audit attestation is served for it; refusing to use it`);
  const good = [], reasons = [];
  for (const env of envelopes) {
    try { const v = await verifyEnvelope(env, trusted); checkBinds(v, card, fileSha256); good.push(v); }
    catch (err) { if (!(err instanceof TrustError)) throw err; reasons.push(err.message); }
  }
  if (!good.length) throw new TrustError(`model ${card.model_id}: no valid attestation: ${reasons[0]}${reasons.length > 1 ? ` (and ${reasons.length - 1} other attestation(s) failed too)` : ''}`);
  return good;
}

const num = (d, k) => (d && typeof d[k] === 'number' && Number.isFinite(d[k]) ? d[k] : null);
function need(d, k, what) { const v = num(d, k); if (v === null) throw new TrustError(`${what}: the attestation does not state ${k}`); return v; }
export function chance(m, what) { const p = m.private || {}; return Math.max(need(p, 'majority_rate', what), 'label_floor' in p ? need(p, 'label_floor', what) : 0); }
export function perPersonAt(m, photos, what) {
  const pp = m.per_person;
  if (pp === null || pp === undefined) return null;
  const c = pp.photos, a = pp.accuracy;
  if (!Array.isArray(c) || !Array.isArray(a) || !c.length || c.length !== a.length || !c.every((x) => Number.isInteger(x) && x > 0) || !a.every((x) => typeof x === 'number' && Number.isFinite(x))) throw new TrustError(`${what}: the attestation's per_person figures are malformed`);
  const pairs = c.map((n, i) => [n, a[i]]).sort((x, y) => x[0] - y[0] || x[1] - y[1]);
  for (const [n, acc] of pairs) if (n >= photos) return [n, acc];
  return pairs[pairs.length - 1];
}

/** client.verify.check_policy with the default policy. */
export function checkPolicy(m, photos, what, policy = POLICY) {
  const p = m.private;
  if (!p || typeof p !== 'object') throw new TrustError(`${what}: the attestation measures no private attribute`);
  const floor = chance(m, what), acc = need(p, 'strongest_accuracy', what), attr = String(p.attribute || 'private attribute').slice(0, 60);
  if (acc > floor + policy.private_margin) throw new TrustError(`${what}: ${attr} is guessed right ${acc.toFixed(3)} of the time by the strongest attacker, above the bound ${(floor + policy.private_margin).toFixed(3)}`);
  const psnr = need(m.reconstruction || {}, 'psnr', what);
  if (psnr > policy.max_psnr) throw new TrustError(`${what}: reconstruction PSNR ${psnr.toFixed(1)} dB is above the bound ${policy.max_psnr} dB`);
  const reid = m.reid || {};
  if (reid.rank1 === null || reid.rank1 === undefined) throw new TrustError(`${what}: re-identification was not measured (reid.rank1 is null)`);
  const r1 = need(reid, 'rank1', what);
  if (r1 > policy.max_reid_rank1) throw new TrustError(`${what}: re-identification rank-1 ${r1.toFixed(3)} is above the bound ${policy.max_reid_rank1}`);
  const got = perPersonAt(m, photos, what);
  if (got && got[1] > floor + policy.per_person_margin) throw new TrustError(`${what}: pooling ${got[0]} photos of one person, an attacker guesses ${attr} right ${got[1].toFixed(3)} of the time, above the bound ${(floor + policy.per_person_margin).toFixed(3)} for ${photos} photos of yours at this collector, those already sent included; send fewer photos, or use a model whose attestation passes`);
}

const f = (v, d = 3) => (typeof v === 'number' && Number.isFinite(v) ? v.toFixed(d) : 'n/a');

/** client.verify.summary: what the participant reads before agreeing, one line each. */
export function summary(card, good, photos, policy = POLICY) {
  const lines = [`Model ${card.model_id} (${card.kind}, sha256 ${card.sha256.slice(0, 16)}…)`];
  for (const v of good) {
    const p = v.predicate, m = p.measured, data = p.data || {};
    lines.push(`Audited by ${v.key.name || '(unnamed)'} (key ${v.key.keyid.slice(0, 16)}) on ${String(p.date).slice(0, 10)}, on ${String(data.name ?? '?').slice(0, 40)} (${String(data.split ?? '?').slice(0, 20)} split, ${data.n_test ?? '?'} photos):`);
    const primary = m.primary && typeof m.primary === 'object' ? Object.entries(m.primary).slice(0, 20) : [];
    const kept = primary.map(([name, v2]) => `${String(name).slice(0, 40)} ${f((v2 || {}).accuracy)}`).join(', ');
    lines.push(`  keeps: ${kept || '(no primary task measured)'} (accuracy)`);
    const pr = m.private, ci = Array.isArray(pr.ci95) && pr.ci95.length === 2 ? pr.ci95 : ['?', '?'], floor = chance(m, card.model_id);
    lines.push(`  hides: ${String(pr.attribute ?? '?').slice(0, 60)}: the strongest attacker (${String(pr.strongest ?? '?').slice(0, 30)}) is right ${f(pr.strongest_accuracy)} of the time (95% interval ${f(ci[0])}–${f(ci[1])}); chance is ${floor.toFixed(3)} (majority rate ${f(pr.majority_rate)}, label floor ${f(pr.label_floor)}); your bound ${(floor + policy.private_margin).toFixed(3)}`);
    const rec = m.reconstruction || {};
    lines.push(`  reconstruction from what is uploaded: PSNR ${f(rec.psnr, 1)} dB (your bound ${policy.max_psnr} dB)`);
    const reid = m.reid || {};
    lines.push(`  re-identification: rank-1 ${f(reid.rank1)} (chance ${f(reid.chance_rank1)}; your bound ${policy.max_reid_rank1})`);
    const pp = perPersonAt(m, photos, card.model_id);
    if (pp) lines.push(`  across your photos: pooling ${pp[0]} photos of one person, an attacker is right ${pp[1].toFixed(3)} of the time (your bound ${(floor + policy.per_person_margin).toFixed(3)})`);
  }
  lines.push('The signature proves that this auditor measured these figures on these exact model bytes and this card; it does not prove the auditor honest, nor that the figures hold for photos unlike the audited ones.');
  return lines;
}

/** What a consent is remembered for: the attested card (keys sorted) and the model bytes. */
export async function cardDigest(card) {
  return sha256(new TextEncoder().encode(sorted(attestedCard(card))));
}

function sorted(v) {
  if (Array.isArray(v)) return '[' + v.map(sorted).join(',') + ']';
  if (v && typeof v === 'object') return '{' + Object.keys(v).sort().map((k) => JSON.stringify(k) + ':' + sorted(v[k])).join(',') + '}';
  return JSON.stringify(v);
}

export { hex };
