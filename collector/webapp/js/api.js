// The page's HTTP client: this origin only, a timeout on every call, answers read with a
// size cap, the collector's errors turned into one-line messages.
import * as R from './routes.js';

export class ApiError extends Error {
  constructor(message, status = 0, code = 'network') {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function readCapped(resp, limit, what) {
  const declared = Number(resp.headers.get('Content-Length') || 0);
  if (declared > limit) throw new ApiError(`${what}: the collector's answer of ${declared} bytes exceeds the limit of ${limit}`, resp.status, 'too_large');
  const reader = resp.body.getReader();
  const parts = [];
  let total = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    total += value.length;
    if (total > limit) { reader.cancel(); throw new ApiError(`${what}: the collector's answer exceeds the limit of ${limit} bytes`, resp.status, 'too_large'); }
    parts.push(value);
  }
  const out = new Uint8Array(total);
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

/** One call. opts: method, token, body (Uint8Array), contentType, headers, limit, what,
 * bytes (answer as bytes instead of JSON). */
export async function call(path, opts = {}) {
  const what = opts.what || path;
  const headers = { ...(opts.headers || {}) };
  if (opts.token) headers[R.AUTH_HEADER] = R.BEARER + opts.token;
  if (opts.contentType) headers['Content-Type'] = opts.contentType;
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), R.DEFAULT_TIMEOUT_S * 1000);
  let resp;
  try {
    resp = await fetch(path, { method: opts.method || 'GET', headers, body: opts.body, signal: ctl.signal,
                               credentials: 'omit', cache: 'no-store', redirect: 'error' });
    const data = await readCapped(resp, resp.ok ? (opts.limit || R.MAX_JSON_BYTES) : R.MAX_ERROR_BYTES, what);
    if (!resp.ok) {
      let msg = '';
      try { const j = JSON.parse(new TextDecoder().decode(data)); msg = String(j.message || j.error || ''); } catch { msg = ''; }
      throw new ApiError(`${what}: the collector answered ${resp.status}${msg ? ': ' + msg.slice(0, 300) : ''}`, resp.status,
                         resp.status === 401 ? 'auth' : 'http');
    }
    if (opts.bytes) return { data, headers: resp.headers };
    try { return JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(data)); }
    catch { throw new ApiError(`${what}: the collector's answer is not JSON`, resp.status, 'bad_answer'); }
  } catch (err) {
    if (err instanceof ApiError) throw err;
    const why = err && err.name === 'AbortError' ? `no answer within ${R.DEFAULT_TIMEOUT_S} s` : 'network error';
    throw new ApiError(`${what}: cannot reach the collector at ${location.origin} (${why}); nothing was lost`, 0, 'network');
  } finally {
    clearTimeout(timer);
  }
}

export const health = () => call(R.HEALTH, { what: 'health' });
export const register = (credential) => call(R.REGISTER, {
  method: 'POST', what: 'join', headers: credential ? { [R.ENROLMENT_HEADER]: credential } : {} });
export const me = (token) => call(R.ME, { token, what: 'status' });
export const withdraw = (token) => call(R.ME, { method: 'DELETE', token, what: 'withdraw' });
export const modelCard = (token) => call(R.MODEL_CARD, { token, what: 'model card', limit: R.MAX_CARD_BYTES });
export const attestations = (token, modelId) => call(R.MODEL_ATTESTATIONS.replace('<model_id>', encodeURIComponent(modelId)),
  { token, what: 'attestations', limit: R.MAX_ATTESTATIONS_ANSWER_BYTES });
export const modelFile = (token, modelId, name) => call(
  `${R.MODEL_FILE}?model_id=${encodeURIComponent(modelId)}&file=${encodeURIComponent(name)}`,
  { token, what: `model file ${name}`, limit: R.MAX_MODEL_FILE_BYTES, bytes: true });
export const upload = (token, body) => call(R.ITEMS, {
  method: 'POST', token, body, contentType: R.BINARY_CONTENT_TYPE, what: 'upload' });
