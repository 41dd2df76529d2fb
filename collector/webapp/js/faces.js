// Faces in the page, as the Python client finds and aligns them: a port of protocol/faces.py
// (MTCNN: pyramid, P-/R-/O-Net in onnxruntime-web, NMS, box and landmark regression) and
// protocol/align.py (detection on the cheapest JPEG draft near DETECT_SIDE, searched at
// DETECT_SIDE's scales; Umeyama similarity to the card's template; each face warped from the
// smallest decode that holds it at CUT_MARGIN pixels per model pixel). The detector's three
// ONNX files come from the collector with the model and are checked against the attested
// card's sha256. The constants are protocol.align's and protocol.faces', served in routes.js
// (collector.web.routes_module), so the page holds no second copy.
//
// Numbers follow numpy's: float32 where the Python code holds float32 arrays (Math.fround
// at every operation), float64 elsewhere; Pillow's box resize (resize.js), crop, reduce and
// bilinear affine transform are ported with their integer rounding.
import { pyRound, resize } from './resize.js';
import { CUT_MARGIN, DETECT_DRAFT_MIN, DETECT_SIDE, MAX_ANGLE, MAX_CANDIDATES, MAX_RESIDUAL, MIN_EYE_PX, NESTED_FACE } from './routes.js';

export class FaceError extends Error {}

const f = Math.fround;
// protocol.faces
export const DETECTOR_FILES = ['pnet.onnx', 'rnet.onnx', 'onet.onnx'];
// client.pipeline.DEFAULT_MIN_FACE: faces whose box is smaller (photo pixels) are left out and counted
export const DEFAULT_MIN_FACE = 20;

// --- Pillow's image operations on {w, h, data: RGBA bytes} -----------------------------------
/** Image.resize(size, BOX) of the whole image (a copy when the size is the same). */
export function resizeBox(img, w, h) {
  if (w === img.w && h === img.h) return { w, h, data: img.data.slice() };
  return resize(img, w, h, 'box', [0, 0, img.w, img.h]);
}

/** Image.crop(box): zeros outside the image. */
export function crop(img, l, t, r, b) {
  const w = r - l, h = b - t, out = new Uint8Array(w * h * 4);
  const x0 = Math.max(l, 0), x1 = Math.min(r, img.w);
  if (x1 > x0) {
    for (let y = Math.max(t, 0); y < Math.min(b, img.h); y++) {
      out.set(img.data.subarray((y * img.w + x0) * 4, (y * img.w + x1) * 4), ((y - t) * w + (x0 - l)) * 4);
    }
  }
  return { w, h, data: out };
}

/** Pillow's division_UINT32(n, 8): float32 arithmetic, truncated. */
const multiplier = (n) => Math.trunc(f(4294967296 / (256 * n)));

/** Image.reduce(r, box): the mean of each r×r cell of the box, the last row and column over
 * the pixels left ((sum + n/2) · multiplier >> 24, as Reduce.c). */
export function reduce(img, r, box) {
  const [bx, by, bx1, by1] = box, bw = bx1 - bx, bh = by1 - by;
  const ow = Math.ceil(bw / r), oh = Math.ceil(bh / r), out = new Uint8Array(ow * oh * 4), d = img.data;
  for (let oy = 0; oy < oh; oy++) {
    const y0 = by + oy * r, y1 = Math.min(y0 + r, by + bh);
    for (let ox = 0; ox < ow; ox++) {
      const x0 = bx + ox * r, x1 = Math.min(x0 + r, bx + bw);
      const n = (y1 - y0) * (x1 - x0), m = multiplier(n), amend = Math.floor(n / 2);
      let s0 = 0, s1 = 0, s2 = 0;
      for (let y = y0; y < y1; y++) {
        for (let x = x0, p = (y * img.w + x0) * 4; x < x1; x++, p += 4) { s0 += d[p]; s1 += d[p + 1]; s2 += d[p + 2]; }
      }
      const o = (oy * ow + ox) * 4;
      // UINT32 arithmetic: the product stays below 2^32
      out[o] = Math.floor(((s0 + amend) * m) / 16777216) & 255;
      out[o + 1] = Math.floor(((s1 + amend) * m) / 16777216) & 255;
      out[o + 2] = Math.floor(((s2 + amend) * m) / 16777216) & 255;
      out[o + 3] = 255;
    }
  }
  return { w: ow, h: oh, data: out };
}

/** Image.transform(size, AFFINE, data, BILINEAR): Geometry.c's bilinear filter, black outside. */
export function affine(img, fw, fh, a) {
  const out = new Uint8Array(fw * fh * 4), d = img.data, W = img.w, H = img.h;
  const clipX = (x) => (x < 0 ? 0 : x < W ? x : W - 1);
  for (let y = 0; y < fh; y++) {
    for (let x = 0; x < fw; x++) {
      const o = (y * fw + x) * 4;
      out[o + 3] = 255;
      const xo = x + 0.5, yo = y + 0.5;
      let xin = a[0] * xo + a[1] * yo + a[2], yin = a[3] * xo + a[4] * yo + a[5];
      if (xin < 0.0 || xin >= W || yin < 0.0 || yin >= H) continue;
      xin -= 0.5; yin -= 0.5;
      const xi = Math.floor(xin), yi = Math.floor(yin), dx = xin - xi, dy = yin - yi;
      const r0 = (yi < 0 ? 0 : yi < H ? yi : H - 1) * W, x0 = clipX(xi), x1 = clipX(xi + 1);
      const hasNext = yi + 1 >= 0 && yi + 1 < H, r1 = (yi + 1) * W;
      for (let b = 0; b < 3; b++) {
        const a0 = d[(r0 + x0) * 4 + b], a1 = d[(r0 + x1) * 4 + b];
        const v1 = a0 + (a1 - a0) * dx;
        let v2 = v1;
        if (hasNext) { const c0 = d[(r1 + x0) * 4 + b], c1 = d[(r1 + x1) * 4 + b]; v2 = c0 + (c1 - c0) * dx; }
        out[o + b] = Math.trunc(v1 + (v2 - v1) * dy); // (UINT8)v1: truncation
      }
    }
  }
  return { w: fw, h: fh, data: out };
}

// --- protocol.faces: post-processing ------------------------------------------------------
/** Greedy NMS (protocol.faces.nms): indices kept, best score first. rows: [[x1, y1, x2, y2], ...]. */
export function nms(rows, scores, threshold, method = 'union', nested = 0.0) {
  const n = rows.length;
  if (!n) return [];
  const area = rows.map((r) => (r[2] - r[0] + 1) * (r[3] - r[1] + 1));
  let order = Array.from({ length: n }, (_, i) => i).sort((i, j) => scores[j] - scores[i]); // stable
  const keep = [];
  while (order.length) {
    const i = order[0], rest = order.slice(1), bi = rows[i];
    keep.push(i);
    order = rest.filter((j) => {
      const bj = rows[j];
      const w = Math.max(0.0, Math.min(bi[2], bj[2]) - Math.max(bi[0], bj[0]) + 1);
      const h = Math.max(0.0, Math.min(bi[3], bj[3]) - Math.max(bi[1], bj[1]) + 1);
      const inter = w * h;
      let overlap;
      if (method === 'min') {
        const small = Math.min(area[i], area[j]), large = Math.max(area[i], area[j]);
        overlap = small >= nested * large ? inter / small : inter / (area[i] + area[j] - inter);
      } else overlap = inter / (area[i] + area[j] - inter);
      return overlap <= threshold;
    });
  }
  return keep;
}

export function pyramidScales(height, width, minFace, factor) {
  const m = 12.0 / minFace;
  let side = Math.min(height, width) * m;
  const scales = [];
  while (side >= 12) {
    scales.push(m * factor ** scales.length);
    side *= factor;
  }
  return scales;
}

/** P-Net output (5, H', W') of one level → rows [x1, y1, x2, y2, score, r0..r3] (float32). */
function windowsToBoxes(out, oh, ow, scale, threshold) {
  const rows = [], plane = oh * ow;
  for (let i = 0; i < oh; i++) {
    for (let j = 0; j < ow; j++) {
      const prob = out[4 * plane + i * ow + j];
      if (!(prob >= threshold)) continue;
      rows.push([f(Math.floor((2 * j + 1) / scale)), f(Math.floor((2 * i + 1) / scale)),
        f(Math.floor((2 * j + 12) / scale)), f(Math.floor((2 * i + 12) / scale)), prob,
        out[i * ow + j], out[plane + i * ow + j], out[2 * plane + i * ow + j], out[3 * plane + i * ow + j]]);
    }
  }
  return rows;
}

/** regress (float32): boxes moved by the offsets. */
function regress(rows, reg, plusOne = true) {
  return rows.map((b, k) => {
    const r = reg[k], w = f(f(b[2] - b[0]) + (plusOne ? 1 : 0)), h = f(f(b[3] - b[1]) + (plusOne ? 1 : 0));
    const o = b.slice();
    o[0] = f(b[0] + f(r[0] * w)); o[1] = f(b[1] + f(r[1] * h)); o[2] = f(b[2] + f(r[2] * w)); o[3] = f(b[3] + f(r[3] * h));
    return o;
  });
}

function square(rows) {
  return rows.map((b) => {
    const w = f(b[2] - b[0]), h = f(b[3] - b[1]), side = Math.max(w, h), o = b.slice();
    o[0] = f(f(b[0] + f(w * 0.5)) - f(side * 0.5));
    o[1] = f(f(b[1] + f(h * 0.5)) - f(side * 0.5));
    o[2] = f(o[0] + side);
    o[3] = f(o[1] + side);
    return o;
  });
}

/** float32 (K, 3, size, size): each box's pixels [x1 - 1, x2] × [y1 - 1, y2], box-resized. */
function crops(img, rows, size) {
  const n = size * size, out = new Float32Array(rows.length * 3 * n);
  rows.forEach((b, k) => {
    const [x1, y1, x2, y2] = b.slice(0, 4).map(Math.trunc);
    const patch = resizeBox(crop(img, x1 - 1, y1 - 1, Math.max(x2, x1), Math.max(y2, y1)), size, size);
    for (let p = 0; p < n; p++) for (let c = 0; c < 3; c++) out[(k * 3 + c) * n + p] = patch.data[p * 4 + c];
  });
  return out;
}

/** AlignmentSpec.problems / DetectorSpec.problems: the bounds a card's alignment section must
 * keep (a card comes from the collector; a factor of 1 would never end the pyramid). */
export function alignmentProblems(al) {
  const out = [], num = (v) => typeof v === 'number' && Number.isFinite(v);
  const d = al && al.detector;
  if (!d || typeof d !== 'object') return ['alignment: detector must be an object'];
  if (!Array.isArray(d.thresholds) || d.thresholds.length !== 3 || !d.thresholds.every((v) => num(v) && v > 0 && v < 1)) out.push('detector thresholds must be 3 numbers in (0, 1)');
  if (!(num(d.factor) && d.factor >= 0.3 && d.factor <= 0.9)) out.push('detector factor must be a number in [0.3, 0.9]');
  if (!(Number.isInteger(d.min_face) && d.min_face >= 12 && d.min_face <= 4096)) out.push('detector min_face must be an integer in [12, 4096]');
  const fr = al.frame;
  const frameOk = Array.isArray(fr) && fr.length === 2 && fr.every((v) => Number.isInteger(v) && v >= 16 && v <= 1024);
  if (!frameOk) out.push('alignment frame must be 2 integers (width, height) in [16, 1024]');
  const t = al.template;
  if (!(Array.isArray(t) && t.length === 5 && t.every((p) => Array.isArray(p) && p.length === 2 && p.every(num)))) out.push('alignment template must be 5 points (x, y) of finite numbers');
  else if (frameOk && !t.every(([x, y]) => x >= 0 && x <= fr[0] && y >= 0 && y <= fr[1])) out.push('alignment template points must lie inside the frame');
  if (al.method !== 'similarity-5pt') out.push(`alignment method must be 'similarity-5pt'`);
  return out;
}

/** protocol.faces.FaceDetector: sessions {pnet, rnet, onet} (Model-like: run(Float32Array, dims)). */
export class FaceDetector {
  constructor(spec, nets) { this.spec = spec; this.nets = nets; }

  /** Faces in an upright RGBA image, largest first: [{box: [4], score, landmarks: [[x, y] × 5]}].
   * `zoom`: the image is searched as if enlarged this much (its pyramid covers faces from
   * min_face / zoom of its pixels); the faces are given in its own pixels. */
  async detect(img, zoom = 1.0) {
    const [t1, t2, t3] = this.spec.thresholds;
    const { w, h } = img;
    let found = [], level = img;
    const scales = pyramidScales(h * zoom, w * zoom, this.spec.min_face, this.spec.factor).map((s) => s * zoom);
    for (const scale of scales) {
      const sw = Math.trunc(w * scale + 1), sh = Math.trunc(h * scale + 1);
      // each level resized from the one before it (protocol.faces.pyramid)
      level = resizeBox(level, sw, sh);
      const n = sw * sh, x = new Float32Array(3 * n);
      for (let p = 0; p < n; p++) for (let c = 0; c < 3; c++) x[c * n + p] = level.data[p * 4 + c];
      const { data, dims } = await this.nets.pnet(x, [1, 3, sh, sw]);
      const rows = windowsToBoxes(data, dims[2], dims[3], scale, t1);
      found = found.concat(nms(rows, rows.map((r) => r[4]), 0.5).map((i) => rows[i]));
    }
    let boxes = nms(found, found.map((r) => r[4]), 0.7).slice(0, MAX_CANDIDATES).map((i) => found[i]);
    if (!boxes.length) return [];
    boxes = square(regress(boxes.map((r) => r.slice(0, 5)), boxes.map((r) => r.slice(5, 9)), false));
    // stage 2: R-Net
    let out = (await this.nets.rnet(crops(img, boxes, 24), [boxes.length, 3, 24, 24])).data;
    let rows = [], reg = [];
    boxes.forEach((b, k) => { if (out[k * 5 + 4] > t2) { rows.push([...b.slice(0, 4), out[k * 5 + 4]]); reg.push(Array.from(out.subarray(k * 5, k * 5 + 4))); } });
    const pick = nms(rows, rows.map((r) => r[4]), 0.7).slice(0, MAX_CANDIDATES);
    if (!pick.length) return [];
    boxes = square(regress(pick.map((i) => rows[i]), pick.map((i) => reg[i])));
    // stage 3: O-Net, landmarks
    out = (await this.nets.onet(crops(img, boxes, 48), [boxes.length, 3, 48, 48])).data;
    rows = []; reg = []; const points = [];
    boxes.forEach((b, k) => {
      const o = out.subarray(k * 15, k * 15 + 15);
      if (!(o[14] > t3)) return;
      const r = [Math.trunc(b[0]), Math.trunc(b[1]), Math.trunc(b[2]), Math.trunc(b[3]), o[14]].map(f);
      const bw = f(f(r[2] - r[0]) + 1), bh = f(f(r[3] - r[1]) + 1);
      points.push(Array.from({ length: 5 }, (_, q) => [f(f(f(bw * o[4 + q]) + r[0]) - 1), f(f(f(bh * o[9 + q]) + r[1]) - 1)]));
      rows.push(r); reg.push(Array.from(o.subarray(0, 4)));
    });
    if (!rows.length) return [];
    rows = regress(rows, reg);
    const faces = nms(rows, rows.map((r) => r[4]), 0.7, 'min', NESTED_FACE)
      .map((i) => ({ box: rows[i].slice(0, 4), score: rows[i][4], landmarks: points[i] }));
    const size = (fc) => Math.max(fc.box[2] - fc.box[0], fc.box[3] - fc.box[1]);
    return faces.sort((a, b) => (size(b) - size(a)) || (b.score - a.score));
  }
}

export const faceSize = (fc) => Math.max(fc.box[2] - fc.box[0], fc.box[3] - fc.box[1]);

// --- protocol.align -----------------------------------------------------------------------
/** umeyama: least-squares similarity src → dst (5 points), no reflection. In 2-D the SVD's
 * rotation is the angle atan2(c10 - c01, c00 + c11) of the covariance, and the sum of its
 * sign-corrected singular values that vector's length. */
export function umeyama(src, dst) {
  const n = src.length, mean = (p) => [p.reduce((a, q) => a + q[0], 0) / n, p.reduce((a, q) => a + q[1], 0) / n];
  const ms = mean(src), md = mean(dst);
  let varS = 0;
  const cov = [[0, 0], [0, 0]];
  for (let i = 0; i < n; i++) {
    const s = [src[i][0] - ms[0], src[i][1] - ms[1]], d = [dst[i][0] - md[0], dst[i][1] - md[1]];
    varS += s[0] * s[0] + s[1] * s[1];
    for (let a = 0; a < 2; a++) for (let b = 0; b < 2; b++) cov[a][b] += d[a] * s[b];
  }
  varS /= n;
  for (let a = 0; a < 2; a++) for (let b = 0; b < 2; b++) cov[a][b] /= n;
  const cx = cov[0][0] + cov[1][1], cy = cov[1][0] - cov[0][1], theta = Math.atan2(cy, cx);
  const scale = varS > 0 ? Math.hypot(cx, cy) / varS : NaN;
  const c = Math.cos(theta), s = Math.sin(theta);
  const A = [[scale * c, -scale * s], [scale * s, scale * c]];
  const t = [md[0] - (A[0][0] * ms[0] + A[0][1] * ms[1]), md[1] - (A[1][0] * ms[0] + A[1][1] * ms[1])];
  let sq = 0;
  for (let i = 0; i < n; i++) {
    const px = A[0][0] * src[i][0] + A[0][1] * src[i][1] + t[0] - dst[i][0];
    const py = A[1][0] * src[i][0] + A[1][1] * src[i][1] + t[1] - dst[i][1];
    sq += px * px + py * py;
  }
  return { A, t, scale, angle: (theta * 180) / Math.PI, rms: Math.sqrt(sq / n) };
}

/** face_transform: landmarks (photo pixels) → the template; FaceError when degenerate. */
export function faceTransform(landmarks, alignment, where = 'face') {
  const pts = landmarks;
  if (pts.length !== 5 || !pts.every((p) => p.length === 2 && p.every(Number.isFinite))) throw new FaceError(`${where}: landmarks are not 5 finite points`);
  const eyes = Math.hypot(pts[1][0] - pts[0][0], pts[1][1] - pts[0][1]);
  if (eyes < MIN_EYE_PX) throw new FaceError(`${where}: face too small to align (eyes ${eyes.toFixed(1)} px apart, need ${MIN_EYE_PX})`);
  const tpl = alignment.template;
  const sim = umeyama(pts, tpl);
  const tplEyes = Math.hypot(tpl[1][0] - tpl[0][0], tpl[1][1] - tpl[0][1]);
  if (!(Number.isFinite(sim.scale) && sim.scale > 0)) throw new FaceError(`${where}: degenerate alignment transform (scale ${sim.scale})`);
  if (Math.abs(sim.angle) > MAX_ANGLE) throw new FaceError(`${where}: degenerate alignment transform (turned ${Math.round(sim.angle)} degrees)`);
  if (sim.rms > MAX_RESIDUAL * tplEyes) throw new FaceError(`${where}: degenerate alignment transform (landmarks fit the template ${sim.rms.toFixed(1)} px RMS, more than ${(MAX_RESIDUAL * tplEyes).toFixed(1)})`);
  return sim;
}

const inv2 = (A) => { const det = A[0][0] * A[1][1] - A[0][1] * A[1][0]; return [[A[1][1] / det, -A[0][1] / det], [-A[1][0] / det, A[0][0] / det]]; };
const mul = (M, v) => [M[0][0] * v[0] + M[0][1] * v[1], M[1][0] * v[0] + M[1][1] * v[1]];

/** warp: the frame cut from img by the transform (a box reduction first when the face has
 * ≥ 2 photo pixels per frame pixel), black outside. */
export function warp(img, sim, frame) {
  let A = sim.A, t = sim.t;
  const [fw, fh] = frame, k = 1.0 / sim.scale;
  if (k >= 2) {
    const inv = inv2(A);
    const corners = [[0, 0], [fw, 0], [0, fh], [fw, fh]].map(([x, y]) => mul(inv, [x - t[0], y - t[1]]));
    const lo = [Math.floor(Math.min(...corners.map((p) => p[0]))) - 2, Math.floor(Math.min(...corners.map((p) => p[1]))) - 2];
    const hi = [Math.ceil(Math.max(...corners.map((p) => p[0]))) + 2, Math.ceil(Math.max(...corners.map((p) => p[1]))) + 2];
    const box = [Math.trunc(Math.max(0, lo[0])), Math.trunc(Math.max(0, lo[1])), Math.trunc(Math.min(img.w, hi[0])), Math.trunc(Math.min(img.h, hi[1]))];
    if (box[2] - box[0] >= 2 && box[3] - box[1] >= 2) {
      const r = Math.trunc(k);
      img = reduce(img, r, box);
      const off = [box[0] + (r - 1) / 2, box[1] + (r - 1) / 2];
      const Ao = mul(A, off);
      t = [Ao[0] + t[0], Ao[1] + t[1]];
      A = [[A[0][0] * r, A[0][1] * r], [A[1][0] * r, A[1][1] * r]];
    }
  }
  const inv = inv2(A), it = mul(inv, t), ih = mul(inv, [0.5, 0.5]);
  const c = [-it[0] + 0.5 - ih[0], -it[1] + 0.5 - ih[1]];
  return affine(img, fw, fh, [inv[0][0], inv[0][1], c[0], inv[1][0], inv[1][1], c[1]]);
}

/** The EXIF orientation of a JPEG (1 when none or unreadable): APP1 "Exif", IFD0 tag 0x0112. */
export function jpegOrientation(bytes) {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let i = 2;
  while (i + 4 <= bytes.length && bytes[i] === 0xff) {
    const m = bytes[i + 1], len = v.getUint16(i + 2);
    if (m === 0xda || m === 0xd9) break;
    if (m === 0xe1 && len >= 16 && String.fromCharCode(...bytes.subarray(i + 4, i + 10)) === 'Exif\0\0') {
      const t = i + 10, le = bytes[t] === 0x49;
      if (t + 8 > bytes.length) return 1;
      const u16 = (p) => v.getUint16(p, le), u32 = (p) => v.getUint32(p, le);
      const ifd = t + u32(t + 4);
      if (ifd + 2 > bytes.length) return 1;
      for (let e = 0, n = u16(ifd); e < n; e++) {
        const p = ifd + 2 + e * 12;
        if (p + 12 > bytes.length) return 1;
        if (u16(p) === 0x0112) { const o = u16(p + 8); return o >= 1 && o <= 8 ? o : 1; }
      }
      return 1;
    }
    i += 2 + len;
  }
  return 1;
}

/** Pillow's JpegImageFile.draft: the largest of 1/8, 1/4, 1/2 (else 1) that keeps the
 * stored (not yet EXIF-turned) w×h at least `need`; the decoded size is ceil(w/s)×ceil(h/s). */
export function draftScale(w, h, need) {
  const scale = Math.min(Math.floor(w / need[0]), Math.floor(h / need[1]));
  for (const s of [8, 4, 2]) if (scale >= s) return s;
  return 1;
}

/** align._draft_spec: the size [w, h] a reduced-scale decode is asked for so that its longest
 * side stays ≥ `side` (null: every pixel). A square of the shorter side's share, so that a
 * photo stored turned (EXIF orientation; the draft compares stored sides) gets the same
 * scale as an upright one. */
export function draftNeed(full, side) {
  if (!full || Math.max(full[0], full[1]) <= side) return null;
  const short = Math.max(1, Math.ceil((Math.min(full[0], full[1]) * side) / Math.max(full[0], full[1])));
  return [short, short];
}

/** align.model_detail: a card's input pixels per frame pixel (its crop_box of the frame
 * resized to height × width), the larger of the two axes. */
export function modelDetail(frame, input) {
  const [left, top, right, bottom] = input.crop_box;
  return Math.max(input.width / Math.max((right - left) * frame[0], 1e-9), input.height / Math.max((bottom - top) * frame[1], 1e-9));
}

// Face coordinates are numpy float32 in the client: k is cast to float32, each product rounded
const scaledF = (fc, k) => { const kf = f(k); return { box: fc.box.map((v) => f(v * kf)), score: fc.score, landmarks: fc.landmarks.map(([x, y]) => [f(x * kf), f(y * kf)]) }; };
const sizeF = (fc) => Math.max(f(fc.box[2] - fc.box[0]), f(fc.box[3] - fc.box[1]));

/** Aligner.photo: every face of a photo (or the largest), aligned, from its bytes.
 * decode(bytes, need) → upright RGBA, at Pillow's draft scale for `need` [w, h] (null: every
 * pixel). `detail`: the model's input pixels per frame pixel (modelDetail); each face is cut
 * from the smallest decode that has CUT_MARGIN pixels per pixel the model keeps, each decode
 * made at most once. Returns {faces: [{index, face, image | null, error | null}], small}. */
export async function photoFaces(bytes, kind, rawDims, alignment, detector, decode, { which = 'all', minFace = DEFAULT_MIN_FACE, detail = 1.0 } = {}) {
  let full = null;
  if (rawDims) {
    full = [rawDims[0], rawDims[1]];
    if (kind === 'jpeg' && [5, 6, 7, 8].includes(jpegOrientation(bytes))) full = [full[1], full[0]];
  }
  // which decode a need gives: Pillow's draft scale of the stored JPEG (other formats whole)
  const scaleOf = (need) => (need && kind === 'jpeg' && rawDims ? draftScale(rawDims[0], rawDims[1], need) : 1);
  // detection on the cheapest JPEG draft whose longest side is still ≥ DETECT_DRAFT_MIN
  const detNeed = draftNeed(full, DETECT_DRAFT_MIN);
  const decoded = await decode(bytes, detNeed);
  let det = decoded, r = 1.0, zoom = 1.0;
  if (Math.max(decoded.w, decoded.h) > DETECT_SIDE) {
    r = DETECT_SIDE / Math.max(decoded.w, decoded.h);
    det = resizeBox(decoded, Math.max(1, pyRound(decoded.w * r)), Math.max(1, pyRound(decoded.h * r)));
  } else if (full && Math.max(full[0], full[1]) > DETECT_SIDE) {
    // a draft a little smaller than DETECT_SIDE is searched as if it were DETECT_SIDE px
    zoom = DETECT_SIDE / Math.max(decoded.w, decoded.h);
  }
  const kx = full ? full[0] / decoded.w : 1.0; // full photo px per decoded px
  const decodes = new Map([[scaleOf(detNeed), decoded]]);
  const keep = Math.min(1.0, Math.max(detail, 1e-3)) * CUT_MARGIN;
  const out = { faces: [], small: 0 };
  const rf = f(r);
  for (let face of await detector.detect(det, zoom)) {
    if (which === 'largest' && out.faces.length) break;
    // in full-photo pixels
    face = scaledF({ box: face.box.map((v) => f(v / rf)), score: face.score, landmarks: face.landmarks.map(([x, y]) => [f(x / rf), f(y / rf)]) }, kx);
    if (sizeF(face) < minFace) { out.small++; continue; }
    const where = `face ${out.faces.length + 1}`;
    try {
      const sim = faceTransform(face.landmarks, alignment, where); // checked in photo pixels
      let img = decoded;
      if (full && sim.scale * keep * full[0] > decoded.w) {
        // too few pixels in the detection's decode: the smallest draft that has enough
        const need = draftNeed(full, Math.ceil(sim.scale * keep * Math.max(full[0], full[1])));
        const s = scaleOf(need);
        if (!decodes.has(s)) decodes.set(s, await decode(bytes, need));
        img = decodes.get(s);
      }
      const k = full ? img.w / full[0] : 1.0; // source px per full-photo px
      const aligned = warp(img, faceTransform(scaledF(face, k).landmarks, alignment, where), alignment.frame);
      out.faces.push({ index: out.faces.length, face, image: aligned, error: null });
    } catch (err) {
      if (!(err instanceof FaceError)) throw err;
      out.faces.push({ index: out.faces.length, face, image: null, error: err });
    }
  }
  return out;
}
