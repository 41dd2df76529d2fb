// The page's journal in IndexedDB (this origin only): the registration, consents, and the
// item ids the collector acknowledged, so a reload resumes without duplicates.
const DB = 'pric-participant';
const STORES = ['config', 'consent', 'done'];

let opened = null; // one connection for the page's life: opening one per lookup cost ~1 ms a photo

function open() {
  opened = opened || new Promise((resolve, reject) => {
    const req = indexedDB.open(DB, 1);
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
export const isDone = async (modelId, id) => (await get('done', `${modelId}/${id}`)) !== undefined;
export async function forgetAll() { for (const s of STORES) await clear(s); }
