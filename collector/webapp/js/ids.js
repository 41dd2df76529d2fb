// Hashes and item ids, as the Python client makes them (client.pipeline.item_id_for):
// item id = hex(HMAC-SHA256(participant's item key, photo sha256 ‖ model sha256)).
export const hex = (bytes) => Array.from(new Uint8Array(bytes), (b) => b.toString(16).padStart(2, '0')).join('');
export function unhex(s) {
  if (!/^([0-9a-f]{2})*$/.test(s)) throw new Error('not lowercase hex');
  const out = new Uint8Array(s.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(s.slice(2 * i, 2 * i + 2), 16);
  return out;
}
export async function sha256(bytes) { return hex(await crypto.subtle.digest('SHA-256', bytes)); }

/** The participant's item-key as a non-extractable HMAC key (raw: 32 bytes). */
export function itemKey(raw) {
  return crypto.subtle.importKey('raw', raw, { name: 'HMAC', hash: 'SHA-256' }, false, ['sign']);
}

export async function itemId(key, photoSha256, modelSha256) {
  const msg = new Uint8Array(64);
  msg.set(unhex(photoSha256), 0);
  msg.set(unhex(modelSha256), 32);
  return hex(await crypto.subtle.sign('HMAC', key, msg));
}

/** client.pipeline.face_digest: what stands for the photo in a face's item id,
 * sha256(photo sha256 ‖ "pric-face" ‖ face index as 4 bytes big-endian), hex. */
export async function faceDigest(photoSha256, index) {
  const msg = new Uint8Array(32 + 9 + 4);
  msg.set(unhex(photoSha256), 0);
  msg.set(new TextEncoder().encode('pric-face'), 32);
  new DataView(msg.buffer).setUint32(41, index);
  return sha256(msg);
}
