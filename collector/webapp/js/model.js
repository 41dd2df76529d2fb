// The card's ONNX model in the page: onnxruntime-web (WebAssembly, one thread), from this
// collector's own copy of the npm package (collector.web serves node_modules' files).
import * as ort from '../../ort/ort.wasm.min.mjs';

ort.env.wasm.wasmPaths = new URL('../../ort/', import.meta.url).href;
ort.env.wasm.numThreads = 1; // two threads need COOP/COEP and were slower for models this small
ort.env.wasm.proxy = false;
ort.env.logLevel = 'error';

export class Model {
  /** bytes: the ONNX file whose sha256 was checked against the attested card. */
  static async load(card, bytes) {
    const m = new Model();
    m.card = card;
    m.session = await ort.InferenceSession.create(bytes, { executionProviders: ['wasm'], graphOptimizationLevel: 'all' });
    m.input = m.session.inputNames.includes(card.input.name) ? card.input.name : m.session.inputNames[0];
    m.output = m.session.outputNames.includes(card.output.name) ? card.output.name : m.session.outputNames[0];
    m.per = card.output.shape.reduce((a, b) => a * b, 1);
    return m;
  }

  /** uint8 (H, W, 3) inputs → one Float32Array output each (protocol.runtime.model_input:
   * uint8 graphs take the pixels, older float32 graphs normalised NCHW). */
  async run(inputs) {
    const s = this.card.input, n = inputs.length, hw = s.height * s.width;
    let tensor;
    if (s.dtype === 'uint8') {
      const x = new Uint8Array(n * hw * 3);
      inputs.forEach((a, i) => x.set(a, i * hw * 3));
      tensor = new ort.Tensor('uint8', x, [n, s.height, s.width, 3]);
    } else {
      const x = new Float32Array(n * 3 * hw), f = Math.fround;
      inputs.forEach((a, i) => {
        for (let c = 0; c < 3; c++) {
          const mean = f(s.mean[c]), std = f(s.std[c]);
          for (let p = 0; p < hw; p++) x[(i * 3 + c) * hw + p] = f(f(f(a[p * 3 + c] / 255) - mean) / std);
        }
      });
      tensor = new ort.Tensor('float32', x, [n, 3, s.height, s.width]);
    }
    const out = (await this.session.run({ [this.input]: tensor }))[this.output];
    const dims = out.dims.slice(1).map(Number), want = this.card.output.shape.map(Number);
    if (dims.join() !== want.join()) throw new Error(`${this.card.model_id}: model output has shape (${dims}), the card states (${want})`);
    const data = Float32Array.from(out.data);
    return inputs.map((_, i) => data.subarray(i * this.per, (i + 1) * this.per));
  }
}

/** One of the face detector's nets (protocol.faces): float32 NCHW in, its one output out.
 * bytes: the file whose sha256 was checked against the attested card. */
export async function loadNet(bytes) {
  const session = await ort.InferenceSession.create(bytes, { executionProviders: ['wasm'], graphOptimizationLevel: 'all' });
  const input = session.inputNames[0], output = session.outputNames[0];
  return async (x, dims) => {
    const out = (await session.run({ [input]: new ort.Tensor('float32', x, dims) }))[output];
    return { data: out.data, dims: out.dims.map(Number) };
  };
}
