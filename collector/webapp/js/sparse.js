// Ambiguation of sparse codes in the page, as protocol/sparse_code.py does it for the Python
// client: per code map the k largest magnitudes are the true entries; k_fake fakes go to
// uniformly drawn free positions with values from `sample_fake_values` (magnitudes
// exchangeable with the true ones, signs at the map's rate); with the card's value_bits,
// true and fake values are put on one grid scaled to the photo's largest released
// magnitude; the key marks which entries are true (format version 1, with the code's
// fingerprint). The wire arrays are those of protocol.model_card.wire_arrays: `indices`
// (uint16) and `values` (float16), or one uint8 `code` (pack_ambiguated) for sparse.wire
// "compact". Randomness: crypto.getRandomValues only. Cards whose fakes come from decoys
// (sparse.decoys: a decoy bank, or decoy codes with sparse.magnitudes "key") are refused
// here: pric-client handles them.
import { TrustError } from './trust.js';

// client/verify.py: the client's own floor, whatever the card asks
export const MIN_K_FAKE = 16;
export const MIN_FAKE_RATIO = 2;
const VALUE_BITS_RANGE = [2, 10]; // protocol.model_card.VALUE_BITS_RANGE
const KEY_VERSION = 1;
const AMBIGUATED_VERSION = 2;
const COMPAND_POWER = 1.5;
export const KEY_FILE_FORMAT = 'pric-keys'; // client/keystore.py
export const KEY_FILE_VERSION = 1;

if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) throw new Error('this page needs a little-endian device');

/** The card's sparse parameters, checked; TrustError (one line) for a card the page cannot or must not use. */
export function sparseSpec(card) {
  const sp = card.sparse;
  const bad = (why) => { throw new TrustError(`model ${card.model_id}: ${why}`); };
  if (!sp || typeof sp !== 'object') bad('a sparse_code card without its sparse parameters');
  const int = (k) => (Number.isInteger(sp[k]) && sp[k] > 0 ? sp[k] : bad(`sparse.${k} must be a positive integer`));
  const L = int('L'), m = int('m'), k = int('k'), kFake = int('k_fake');
  if (m > 65536 || k + kFake > m) bad(`sparse.k + k_fake = ${k + kFake} does not fit code maps of length ${m}`);
  // decoys first: a card with decoy codes may ask for fewer fakes than this page's floor
  if (sp.decoys != null) bad(`its fakes are drawn from decoys (a decoy bank or decoy codes: ${String(sp.decoys).slice(0, 60)}), which this page does not do yet; use the Python client (pric-client)`);
  const need = Math.max(MIN_FAKE_RATIO * k, MIN_K_FAKE);
  if (kFake < need) bad(`its card asks for k_fake=${kFake} fake values per code map with k=${k} true ones; this page never adds fewer than max(${MIN_FAKE_RATIO}·k, ${MIN_K_FAKE}) = ${need}`);
  const vb = sp.value_bits ?? null;
  if (vb !== null && !(Number.isInteger(vb) && vb >= VALUE_BITS_RANGE[0] && vb <= VALUE_BITS_RANGE[1])) bad(`sparse.value_bits ${vb} is not in [${VALUE_BITS_RANGE}]`);
  const wire = sp.wire ?? null;
  if (wire !== null && wire !== 'compact') bad(`sparse.wire ${String(wire).slice(0, 30)} is not one this page knows`);
  if (wire === 'compact' && vb === null) bad('sparse.wire "compact" needs sparse.value_bits');
  const out = card.output || {};
  if (!Array.isArray(out.shape) || out.shape.join() !== [L, m].join() || out.dtype !== 'float32') bad(`its output (${out.shape}) is not (L, m) = (${L}, ${m}) float32`);
  return { L, m, k, kFake, kPrime: k + kFake, valueBits: vb, wire };
}

/** The arrays one item carries (protocol.model_card.wire_arrays): [{name, dtype, shape}]. */
export function wireArrays(spec) {
  if (spec.wire === 'compact') return [{ name: 'code', dtype: 'uint8', shape: [ambiguatedLayout(spec).total] }];
  return [{ name: 'indices', dtype: 'uint16', shape: [spec.L, spec.kPrime] },
          { name: 'values', dtype: 'float16', shape: [spec.L, spec.kPrime] }];
}

// --- randomness (the OS's, through the browser) ---------------------------------------------
const pool = new Uint32Array(4096);
let poolAt = pool.length;
function u32() {
  if (poolAt >= pool.length) { crypto.getRandomValues(pool); poolAt = 0; }
  return pool[poolAt++];
}
/** Uniform in [0, 1), 53 random bits. */
function random() { return ((u32() >>> 5) * 67108864 + (u32() >>> 6)) / 9007199254740992; }
/** Uniform integer in [0, n), n ≤ 2^32, unbiased. */
function randInt(n) {
  const limit = Math.floor(4294967296 / n) * n;
  for (;;) { const x = u32(); if (x < limit) return x % n; }
}

/** protocol.sparse_code.sample_fake_values: n fake values for one map from its k true values. */
export function sampleFakeValues(trueValues, n) {
  const mags = Float64Array.from(trueValues, Math.abs).sort();
  const k = mags.length;
  const out = new Float32Array(n);
  let pPos = 0;
  for (const v of trueValues) if (v > 0) pPos++;
  pPos /= k;
  if (k === 1) {
    for (let i = 0; i < n; i++) out[i] = mags[0] * (0.5 + random());
  } else {
    // gap masses ~ Dirichlet(1, ..., 1): normalised exponentials
    const cum = new Float64Array(k + 1);
    let s = 0;
    for (let g = 0; g <= k; g++) { s += -Math.log1p(-random()); cum[g] = s; }
    const lowEnd = Math.max(mags[0] - (mags[1] - mags[0]), 0.5 * mags[0]);
    const j = Math.min(k - 1, 5);
    let scale = 0;
    for (let i = 0; i < j; i++) scale += (i + 1) * (mags[k - 1 - i] - mags[k - 2 - i]);
    scale /= j;
    for (let i = 0; i < n; i++) {
      const r = random() * s;
      let lo = 0, hi = k; // first gap whose cumulative mass exceeds r
      while (lo < hi) { const mid = (lo + hi) >> 1; if (cum[mid] > r) hi = mid; else lo = mid + 1; }
      const gap = lo, v = random();
      if (gap > 0 && gap < k) out[i] = mags[gap - 1] + v * (mags[gap] - mags[gap - 1]);
      else if (gap === 0) out[i] = lowEnd + v * (mags[0] - lowEnd);
      else out[i] = mags[k - 1] + scale * -Math.log1p(-v);
    }
  }
  for (let i = 0; i < n; i++) if (!(random() < pPos)) out[i] = -out[i];
  return out;
}

// --- the value grid (quantise_levels, level_values, snap_to_grid) ---------------------------
function rintEven(x) { // numpy's rint: halves to even
  const f = Math.floor(x), d = x - f;
  return d > 0.5 || (d === 0.5 && f % 2 !== 0) ? f + 1 : f;
}
function f16Scale(maxAbs) {
  const s = Math.f16round(maxAbs);
  if (!Number.isFinite(s)) throw new Error('the code has a magnitude beyond the float16 range; it cannot be quantised');
  return s;
}
function level(mag, scale, vb) {
  const n = 1 << (vb - 1);
  if (!(scale > 0)) return 0;
  const u = Math.max(mag / scale, 0);
  return Math.min(Math.max(rintEven(Math.pow(u, 1 / COMPAND_POWER) * n) - 1, 0), n - 1);
}
function levelValue(q, scale, vb) { return Math.fround(scale * Math.pow((q + 1) / (1 << (vb - 1)), COMPAND_POWER)); }

// --- ambiguation ----------------------------------------------------------------------------
/** Dense code (Float32Array L·m, one photo) → {indices Uint16Array, values Float16Array
 * (both L·k', sorted positions per map), key Uint8Array}: protocol.sparse_code.ambiguate. */
export async function ambiguate(code, spec) {
  const { L, m, k, kFake, kPrime, valueBits } = spec;
  if (code.length !== L * m) throw new Error(`the code has ${code.length} values, the card states ${L}x${m}`);
  const indices = new Uint16Array(L * kPrime);
  const vals = new Float32Array(L * kPrime);
  const mask = new Uint8Array(L * kPrime);
  const order = new Uint32Array(m);
  for (let l = 0; l < L; l++) {
    const row = code.subarray(l * m, (l + 1) * m);
    for (let i = 0; i < m; i++) order[i] = i;
    // the k largest magnitudes are true; the rest of the positions are free for fakes
    const sorted = Array.from(order).sort((a, b) => Math.abs(row[b]) - Math.abs(row[a]) || a - b);
    const truePos = sorted.slice(0, k), free = sorted.slice(k);
    for (let i = 0; i < kFake; i++) { // partial Fisher-Yates: k_fake distinct free positions
      const j = i + randInt(free.length - i);
      [free[i], free[j]] = [free[j], free[i]];
    }
    const tv = Float32Array.from(truePos, (p) => row[p]);
    const fv = sampleFakeValues(tv, kFake);
    const entries = [];
    for (let i = 0; i < k; i++) entries.push([truePos[i], tv[i], 1]);
    for (let i = 0; i < kFake; i++) entries.push([free[i], fv[i], 0]);
    entries.sort((a, b) => a[0] - b[0]);
    entries.forEach(([p, v, t], i) => { indices[l * kPrime + i] = p; vals[l * kPrime + i] = v; mask[l * kPrime + i] = t; });
  }
  if (valueBits !== null) { // one grid for true and fake values: the photo's largest released magnitude
    let mx = 0;
    for (const v of vals) mx = Math.max(mx, Math.abs(v));
    const scale = f16Scale(mx);
    for (let i = 0; i < vals.length; i++) vals[i] = (vals[i] < 0 ? -1 : 1) * levelValue(level(Math.abs(vals[i]), scale, valueBits), scale, valueBits);
  }
  const values = Float16Array.from(vals);
  for (const v of values) if (!Number.isFinite(v)) throw new Error('the code has a value beyond the float16 range');
  const fp = await fingerprint(indices, values);
  return { indices, values, key: packKey(mask, L, kPrime, k, fp) };
}

/** sha256(indices uint16 LE ‖ values float16 LE)[:8] (AmbiguatedCode.fingerprint). */
export async function fingerprint(indices, values) {
  const buf = new Uint8Array(indices.byteLength + values.byteLength);
  buf.set(new Uint8Array(indices.buffer, indices.byteOffset, indices.byteLength), 0);
  buf.set(new Uint8Array(values.buffer, values.byteOffset, values.byteLength), indices.byteLength);
  return new Uint8Array(await crypto.subtle.digest('SHA-256', buf)).slice(0, 8);
}

/** b"PK" | version u8 | L u16 | k' u16 | k u16 (big-endian) | fingerprint 8 | packbits(mask). */
export function packKey(mask, L, kPrime, k, fp) {
  const out = new Uint8Array(17 + Math.ceil((L * kPrime) / 8));
  const dv = new DataView(out.buffer);
  out[0] = 0x50; out[1] = 0x4b; out[2] = KEY_VERSION;
  dv.setUint16(3, L); dv.setUint16(5, kPrime); dv.setUint16(7, k);
  out.set(fp, 9);
  for (let i = 0; i < mask.length; i++) if (mask[i]) out[17 + (i >> 3)] |= 0x80 >> (i & 7);
  return out;
}

// --- the compact wire form (pack_ambiguated) -------------------------------------------------
const binomials = new Map();
function binomialTable(m, kp) { // table[c][i] = C(c, i), c < m, i ≤ k'
  const id = `${m}/${kp}`;
  if (!binomials.has(id)) {
    const t = [];
    for (let c = 0; c <= m; c++) {
      const row = new Array(kp + 1).fill(0n);
      row[0] = 1n;
      for (let i = 1; i <= kp && c > 0; i++) row[i] = t[c - 1][i - 1] + t[c - 1][i];
      t.push(row);
    }
    binomials.set(id, t);
  }
  return binomials.get(id);
}
function bitLength(n) { return n === 0n ? 0 : n.toString(2).length; }
function ambiguatedLayout(spec) {
  const t = binomialTable(spec.m, spec.kPrime), c = t[spec.m][spec.kPrime];
  const supportBits = bitLength(c ** BigInt(spec.L) - 1n);
  return { c, t, supportBits, total: 3 + Math.ceil((supportBits + spec.L * spec.kPrime * spec.valueBits) / 8) };
}

/** An ambiguated code (values on the value_bits grid) → its compact bytes. */
export function packAmbiguated(indices, values, spec) {
  const { L, kPrime, valueBits: vb } = spec;
  const { c, t, supportBits, total } = ambiguatedLayout(spec);
  let mx = 0;
  for (const v of values) mx = Math.max(mx, Math.abs(v));
  const scale = f16Scale(mx);
  let acc = 0n;
  for (let l = L - 1; l >= 0; l--) { // map 0 is the least significant digit
    let rank = 0n;
    for (let i = 0; i < kPrime; i++) rank += t[indices[l * kPrime + i]][i + 1];
    acc = acc * c + rank;
  }
  const out = new Uint8Array(total);
  out[0] = AMBIGUATED_VERSION;
  new DataView(out.buffer).setFloat16(1, scale, false);
  let bit = 24;
  const put = (value, n) => { for (let b = n - 1; b >= 0; b--, bit++) if ((value >> b) & 1) out[bit >> 3] |= 0x80 >> (bit & 7); };
  const digits = acc.toString(2).padStart(supportBits, '0');
  for (const ch of digits) { if (ch === '1') out[bit >> 3] |= 0x80 >> (bit & 7); bit++; }
  for (const v of values) put(((v < 0 ? 1 : 0) << (vb - 1)) | level(Math.abs(v), scale, vb), vb);
  return out;
}

/** The item's arrays by name (wireArrays order). */
export function codeArrays(code, spec) {
  if (spec.wire === 'compact') return { code: packAmbiguated(code.indices, code.values, spec) };
  return { indices: code.indices, values: code.values };
}

/** A key file for a recipient (client/keystore.py's format): {item_id: {model_id, key base64}}. */
export function keyFile(rows) {
  const keys = {};
  for (const r of rows.sort((a, b) => (a.item_id < b.item_id ? -1 : 1))) {
    keys[r.item_id] = { model_id: r.model_id, key: btoa(String.fromCharCode(...r.key)) };
  }
  return JSON.stringify({ format: KEY_FILE_FORMAT, version: KEY_FILE_VERSION, keys }, null, 1) + '\n';
}
