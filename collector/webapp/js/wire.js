// The binary upload batch of protocol/wire.py (Content-Type application/vnd.pric.batch):
//   b"PRIC" | 0x01 | uint32 LE header length | UTF-8 JSON header | one block per array,
//   the arrays of all items stacked, C order, little-endian.
// Header: {schema_version, model_id, model_sha256, items: [{item_id, labels}], arrays: [{name, dtype, shape}]}
export const SCHEMA_VERSION = 1;
const TYPED = { float32: Float32Array, float16: Float16Array, uint16: Uint16Array, uint8: Uint8Array };

/** items: [{item_id, array: Float32Array}] of one features model (one output array). */
export function encodeBatch(card, items) {
  if (card.output.dtype !== 'float32') throw new Error(`output dtype ${card.output.dtype} is not supported in the page`);
  return encodeArrays(card, [{ name: card.output.name, dtype: 'float32', shape: card.output.shape.map(Number) }],
    items.map((it) => ({ item_id: it.item_id, arrays: { [card.output.name]: it.array } })));
}

/** specs: [{name, dtype, shape}] (protocol.model_card.wire_arrays); items: [{item_id,
 * arrays: {name: typed array of that dtype}}]. Typed arrays are little-endian on every
 * device the page runs on (sparse.js checks). */
export function encodeArrays(card, specs, items) {
  const header = {
    schema_version: SCHEMA_VERSION, model_id: card.model_id, model_sha256: card.sha256,
    items: items.map((it) => ({ item_id: it.item_id, labels: {} })),
    arrays: specs.map((s) => ({ name: s.name, dtype: s.dtype, shape: s.shape })),
  };
  const head = new TextEncoder().encode(JSON.stringify(header));
  const sizes = specs.map((s) => {
    if (!TYPED[s.dtype]) throw new Error(`array dtype ${s.dtype} is not supported in the page`);
    return s.shape.reduce((a, b) => a * b, 1) * TYPED[s.dtype].BYTES_PER_ELEMENT;
  });
  const body = new Uint8Array(9 + head.length + items.length * sizes.reduce((a, b) => a + b, 0));
  body.set([0x50, 0x52, 0x49, 0x43, 0x01], 0);
  new DataView(body.buffer).setUint32(5, head.length, true);
  body.set(head, 9);
  let at = 9 + head.length;
  specs.forEach((s, j) => {
    for (const it of items) {
      const a = it.arrays[s.name];
      if (!(a instanceof TYPED[s.dtype]) || a.byteLength !== sizes[j]) throw new Error(`item ${it.item_id}: array ${s.name} is not ${s.dtype} of shape (${s.shape})`);
      body.set(new Uint8Array(a.buffer, a.byteOffset, a.byteLength), at);
      at += sizes[j];
    }
  });
  return body;
}
