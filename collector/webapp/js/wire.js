// The binary upload batch of protocol/wire.py (Content-Type application/vnd.pric.batch):
//   b"PRIC" | 0x01 | uint32 LE header length | UTF-8 JSON header | one block per array,
//   the arrays of all items stacked, C order, little-endian.
// Header: {schema_version, model_id, model_sha256, items: [{item_id, labels}], arrays: [{name, dtype, shape}]}
export const SCHEMA_VERSION = 1;

/** items: [{item_id, array: Float32Array}] of one features model (one output array). */
export function encodeBatch(card, items) {
  const name = card.output.name;
  const shape = card.output.shape.map(Number);
  const per = shape.reduce((a, b) => a * b, 1);
  if (card.output.dtype !== 'float32') throw new Error(`output dtype ${card.output.dtype} is not supported in the page`);
  const header = {
    schema_version: SCHEMA_VERSION, model_id: card.model_id, model_sha256: card.sha256,
    items: items.map((it) => ({ item_id: it.item_id, labels: {} })),
    arrays: [{ name, dtype: 'float32', shape }],
  };
  const head = new TextEncoder().encode(JSON.stringify(header));
  const body = new Uint8Array(9 + head.length + items.length * per * 4);
  body.set([0x50, 0x52, 0x49, 0x43, 0x01], 0);
  new DataView(body.buffer).setUint32(5, head.length, true);
  body.set(head, 9);
  const view = new DataView(body.buffer);
  let at = 9 + head.length;
  for (const it of items) {
    if (it.array.length !== per) throw new Error(`item ${it.item_id}: ${it.array.length} values, the card states ${per}`);
    for (let i = 0; i < per; i++, at += 4) view.setFloat32(at, it.array[i], true);
  }
  return body;
}
