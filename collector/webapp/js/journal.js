// The page's journal in IndexedDB (this origin only): the registration, consents, and the
// item ids the collector acknowledged, so a reload resumes without duplicates; for sparse
// models the secret keys of the ambiguated codes with the codes they belong to (`keys`,
// never uploaded: a retried upload re-sends the same code, as client/keystore.py).
const DB = 'pric-participant';
const STORES = ['config', 'consent', 'done', 'keys'];

let opened = null; // one connection for the page's life: opening one per lookup cost ~1 ms a photo

function open() {
  opened = opened || new Promise((resolve, reject) => {
    const req = indexedDB.open(DB, 2);
    req.onupgradeneeded = () => { for (const s of STORES) if (!req.result.objectStoreNames.contains(s)) req.result.createObjectStore(s); };
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => { opened = null; reject(new Error(`the browser's storage (IndexedDB) cannot be opened: ${req.error}`)); };
  });
  return opened;
}

async function tx(store, mode, fn) {
  const db = await open();
  return new Promise((resolve, reject) => {
    const t = db.transaction(store, mode);
    const out = fn(t.objectStore(store));
    t.oncomplete = () => resolve(out && 'result' in out ? out.result : undefined);
    t.onerror = () => reject(t.error);
    t.onabort = () => reject(t.error || new Error('storage transaction aborted'));
  });
}

export const get = (store, key) => tx(store, 'readonly', (s) => s.get(key));
export const put = (store, key, value) => tx(store, 'readwrite', (s) => { s.put(value, key); });
export const count = (store) => tx(store, 'readonly', (s) => s.count());
export const clear = (store) => tx(store, 'readwrite', (s) => { s.clear(); });

/** Record acknowledged item ids in one transaction. */
export const markDone = (modelId, ids) => tx('done', 'readwrite', (s) => {
  const at = new Date().toISOString();
  for (const id of ids) s.put({ model_id: modelId, at }, `${modelId}/${id}`);
});
/** Keep the keys (and codes) of ambiguated items, before they are sent: {item_id, model_id, key, indices, values}. */
export const putKeys = (rows) => tx('keys', 'readwrite', (s) => {
  for (const r of rows) s.put(r, `${r.model_id}/${r.item_id}`);
});
export const getKey = (modelId, id) => get('keys', `${modelId}/${id}`);
export const allKeys = () => tx('keys', 'readonly', (s) => s.getAll());
export const isDone = async (modelId, id) => (await get('done', `${modelId}/${id}`)) !== undefined;
export async function forgetAll() { for (const s of STORES) await clear(s); }
