// A port of Pillow's resampler (src/libImaging/Resample.c) for 8-bit RGB: the same
// coefficients (double precision), the same fixed-point rounding (PRECISION_BITS = 22) and
// the same pass order, so that the page's model inputs equal protocol.preprocess.prepare's
// byte for byte. Canvas drawImage or createImageBitmap resizing instead flipped 1-2 % of the
// model's decisions on celeba photos.

const PRECISION_BITS = 32 - 8 - 2;
const HALF = 1 << (PRECISION_BITS - 1);
const FILTERS = {
  // name: [filter(x), support]
  bilinear: [(x) => { x = Math.abs(x); return x < 1.0 ? 1.0 - x : 0.0; }, 1.0],
  box: [(x) => (x > -0.5 && x <= 0.5 ? 1.0 : 0.0), 0.5],
  bicubic: [(x) => {
    const a = -0.5;
    x = Math.abs(x);
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
  }, 2.0],
};

// Pillow passes the box as C floats: round to float32 as it does.
const f32 = Math.fround;

/** precompute_coeffs: per output pixel, the first input index, the count, and fixed-point
 * weights (normalize_coeffs_8bpc). */
function coeffs(inSize, in0, in1, outSize, filter) {
  const [fn, fsupport] = FILTERS[filter];
  const scale = (in1 - in0) / outSize;
  const filterscale = scale < 1.0 ? 1.0 : scale;
  const support = fsupport * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const kk = new Int32Array(outSize * ksize);
  const bounds = new Int32Array(outSize * 2);
  const w = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = in0 + (xx + 0.5) * scale;
    const ss = 1.0 / filterscale;
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    let ww = 0.0;
    for (let x = 0; x < xmax; x++) {
      const v = fn((x + xmin - center + 0.5) * ss);
      w[x] = v;
      ww += v;
    }
    for (let x = 0; x < xmax; x++) {
      const v = ww !== 0.0 ? w[x] / ww : w[x];
      // (int)(±0.5 + v * 2^22): C truncates toward zero
      kk[xx * ksize + x] = v < 0 ? Math.trunc(-0.5 + v * (1 << PRECISION_BITS))
                                 : Math.trunc(0.5 + v * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, kk, bounds };
}

function clip8(v) {
  if (v >= (1 << PRECISION_BITS) * 256) return 255;
  if (v <= 0) return 0;
  return v >> PRECISION_BITS;
}

// Images here: {w, h, data: Uint8Array of w*h*4 (RGBA; A ignored)}
function horizontal(src, outW, rowFirst, rows, c, shift) {
  const out = new Uint8Array(outW * rows * 4);
  const { ksize, kk, bounds } = c;
  const d = src.data, stride = src.w * 4; // locals: the loops below are the page's hottest
  for (let yy = 0; yy < rows; yy++) {
    const row = (yy + rowFirst) * stride;
    let o = yy * outW * 4;
    for (let xx = 0; xx < outW; xx++, o += 4) {
      const xmax = bounds[xx * 2 + 1], k = xx * ksize;
      let p = row + (bounds[xx * 2] - shift) * 4;
      let s0 = HALF, s1 = HALF, s2 = HALF;
      for (let x = 0; x < xmax; x++, p += 4) {
        // int32 arithmetic as in C: |sums| stay below 2^31 (255 · 2^22 · the filter's overshoot)
        const kv = kk[k + x];
        s0 = (s0 + Math.imul(d[p], kv)) | 0; s1 = (s1 + Math.imul(d[p + 1], kv)) | 0; s2 = (s2 + Math.imul(d[p + 2], kv)) | 0;
      }
      out[o] = clip8(s0); out[o + 1] = clip8(s1); out[o + 2] = clip8(s2); out[o + 3] = 255;
    }
  }
  return { w: outW, h: rows, data: out };
}

function vertical(src, outH, c, shift, colFirst, cols) {
  const out = new Uint8Array(cols * outH * 4);
  const { ksize, kk, bounds } = c;
  const d = src.data, stride = src.w * 4;
  const acc = new Int32Array(cols * 3); // row by row: the source is read in memory order
  for (let yy = 0; yy < outH; yy++) {
    const ymin = bounds[yy * 2] - shift, ymax = bounds[yy * 2 + 1], k = yy * ksize;
    acc.fill(HALF);
    for (let y = 0; y < ymax; y++) {
      const kv = kk[k + y];
      let p = (y + ymin) * stride + colFirst * 4;
      for (let xx = 0, a = 0; xx < cols; xx++, p += 4, a += 3) {
        acc[a] += Math.imul(d[p], kv); acc[a + 1] += Math.imul(d[p + 1], kv); acc[a + 2] += Math.imul(d[p + 2], kv);
      }
    }
    let o = yy * cols * 4;
    for (let xx = 0, a = 0; xx < cols; xx++, a += 3, o += 4) {
      out[o] = clip8(acc[a]); out[o + 1] = clip8(acc[a + 1]); out[o + 2] = clip8(acc[a + 2]); out[o + 3] = 255;
    }
  }
  return { w: cols, h: outH, data: out };
}

/** Pillow's Image.resize((outW, outH), filter, box) of an RGB(A) image (ImagingResampleInner):
 * one pass per axis, over only the rows (or columns) the second pass needs. `verticalFirst`
 * chooses the order (see passOrder). */
export function resize(src, outW, outH, filter, box, verticalFirst = null) {
  if (!(filter in FILTERS)) throw new Error(`resize filter ${filter} is not supported in the page`);
  const [x0, y0, x1, y1] = box.map(f32);
  const needH = outW !== src.w || x0 !== 0 || x1 !== outW;
  const needV = outH !== src.h || y0 !== 0 || y1 !== outH;
  const cv = coeffs(src.h, y0, y1, outH, filter);
  const ch = coeffs(src.w, x0, x1, outW, filter);
  if (verticalFirst === null) verticalFirst = passOrder(src, outW, outH);
  if (!verticalFirst) {
    let img = src, shift = 0;
    if (needH) {
      const first = cv.bounds[0], last = cv.bounds[outH * 2 - 2] + cv.bounds[outH * 2 - 1];
      img = horizontal(src, outW, first, last - first, ch, 0);
      shift = first;
    }
    return needV ? vertical(img, outH, cv, shift, 0, img.w) : img;
  }
  let img = src, shift = 0;
  if (needV) {
    const first = ch.bounds[0], last = ch.bounds[outW * 2 - 2] + ch.bounds[outW * 2 - 1];
    img = vertical(src, outH, cv, 0, first, last - first);
    shift = first;
  }
  return needH ? horizontal(img, outW, 0, img.h, ch, shift) : img;
}

/** Pillow 13's order: the vertical pass first when the height shrinks by more than twice
 * the width's shrink (in whole-image pixels, whatever the box); before 13 always
 * horizontal first. The two orders round differently, so this follows the Pillow the
 * Python client runs (pyproject: pillow; checked by tests/web against the installed one). */
export function passOrder(src, outW, outH) {
  const dy = src.h - outH, dx = src.w - outW;
  return dy > 0 && dy > dx * 2;
}

/** Python's round() (half to even), as protocol.preprocess uses for the crop box. */
export function pyRound(x) {
  const r = Math.round(x);
  if (Math.abs(x - Math.trunc(x)) === 0.5) return 2 * Math.round(x / 2);
  return r;
}

/** protocol.preprocess.prepare: the card's relative crop box, resize; RGB (or BGR) bytes
 * (H, W, 3), the uint8 input of the card's graph. */
export function prepare(img, spec, verticalFirst = null) {
  const [left, top, right, bottom] = spec.crop_box;
  const { w, h } = img;
  const l = pyRound(left * w), t = pyRound(top * h);
  const box = [l, t, Math.max(pyRound(right * w), l + 1), Math.max(pyRound(bottom * h), t + 1)];
  let out = img;
  // Image.resize returns a copy when size and box are the whole image
  if (!(w === spec.width && h === spec.height && box[0] === 0 && box[1] === 0 && box[2] === w && box[3] === h)) {
    out = resize(img, spec.width, spec.height, spec.resize_filter, box, verticalFirst);
  }
  const n = spec.width * spec.height;
  const rgb = new Uint8Array(n * 3);
  const bgr = spec.channel_order === 'BGR';
  for (let i = 0; i < n; i++) {
    const r = out.data[i * 4], g = out.data[i * 4 + 1], b = out.data[i * 4 + 2];
    rgb[i * 3] = bgr ? b : r; rgb[i * 3 + 1] = g; rgb[i * 3 + 2] = bgr ? r : b;
  }
  return rgb;
}
