// Photo → the model's uint8 input, in the page, as protocol.preprocess does it:
//   bytes ─► sniff (HEIC and non-images refused by name) ─► size guards
//         ─► decode: createImageBitmap with the file's own colours and EXIF orientation
//            (colorSpaceConversion 'none', imageOrientation 'from-image'): Chromium's
//            libjpeg-turbo gives Pillow's pixels. A JPEG much larger than the model's
//            input is decoded at reduced scale, as the Python client's draft mode does
//            (protocol.preprocess.load_image): WebCodecs' ImageDecoder with the size of
//            Pillow's draft makes libjpeg-turbo scale in its IDCT, the same pixels again
//         ─► faces, for a card with alignment (faces.js: the card's detector and aligner)
//         ─► crop box + Pillow's resize (resize.js)            → uint8 (H, W, 3)
import { DETECTOR_FILES, FaceDetector, alignmentProblems, draftScale, modelDetail, photoFaces } from './faces.js';
import { sha256 } from './ids.js';
import { loadNet } from './model.js';
import { prepare } from './resize.js';
import * as R from './routes.js';

export class PhotoError extends Error {}

/** What the bytes are, from their first bytes (the file name is never trusted). */
export function sniff(bytes) {
  const b = bytes.subarray(0, 32);
  const ascii = (from, to) => String.fromCharCode(...b.subarray(from, to));
  if (b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff) return 'jpeg';
  if (ascii(0, 8) === '\x89PNG\r\n\x1a\n') return 'png';
  if (ascii(0, 6) === 'GIF87a' || ascii(0, 6) === 'GIF89a') return 'gif';
  if (ascii(0, 4) === 'RIFF' && ascii(8, 12) === 'WEBP') return 'webp';
  if (ascii(0, 2) === 'BM') return 'bmp';
  if (ascii(4, 8) === 'ftyp') {
    const brand = ascii(8, 12);
    if (['heic', 'heix', 'heim', 'heis', 'hevc', 'hevx', 'mif1', 'msf1'].includes(brand)) return 'heic';
    if (brand === 'avif' || brand === 'avis') return 'avif';
  }
  return null;
}

/** Width and height from a JPEG's SOF or a PNG's IHDR, before decoding (null if not found). */
export function dimensions(bytes, kind) {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (kind === 'png' && bytes.length >= 24) return [v.getUint32(16), v.getUint32(20)];
  if (kind === 'jpeg') {
    let i = 2;
    while (i + 9 < bytes.length) {
      if (bytes[i] !== 0xff) { i++; continue; }
      const m = bytes[i + 1];
      if (m === 0xff) { i++; continue; }
      if (m >= 0xc0 && m <= 0xcf && m !== 0xc4 && m !== 0xc8 && m !== 0xcc) return [v.getUint16(i + 7), v.getUint16(i + 5)];
      if (m === 0xd8 || (m >= 0xd0 && m <= 0xd7) || m === 0x01) { i += 2; continue; }
      i += 2 + v.getUint16(i + 2);
    }
  }
  return null;
}

/** protocol.preprocess._needed_size: the smallest whole-image size whose crop box still
 * covers the model's input at 1:1. */
export function neededSize(spec) {
  const [left, top, right, bottom] = spec.crop_box;
  return [Math.ceil(spec.width / (right - left)), Math.ceil(spec.height / (bottom - top))];
}

export { draftScale };

/** A JPEG at 1/s scale, upright, as Pillow's draft + exif_transpose gives it; null when this
 * browser cannot (no ImageDecoder) or does not decode at exactly that size (the caller then
 * decodes every pixel: a measured, bounded difference, see docs/participant.md). */
async function decodeScaled(bytes, w, h, s) {
  if (typeof ImageDecoder !== 'function') return null;
  const sw = Math.ceil(w / s), sh = Math.ceil(h / s);
  let dec = null, frame = null;
  try {
    dec = new ImageDecoder({ data: bytes, type: 'image/jpeg', colorSpaceConversion: 'none', desiredWidth: sw, desiredHeight: sh });
    frame = (await dec.decode()).image;
    const fw = frame.displayWidth, fh = frame.displayHeight;
    // the decoder turns the frame upright (EXIF orientation); a quarter turn swaps the sides
    if (!((fw === sw && fh === sh) || (fw === sh && fh === sw))) return null;
    const canvas = new OffscreenCanvas(fw, fh);
    const ctx = canvas.getContext('2d', { willReadFrequently: true, colorSpace: 'srgb' });
    ctx.drawImage(frame, 0, 0);
    return { w: fw, h: fh, data: ctx.getImageData(0, 0, fw, fh, { colorSpace: 'srgb' }).data, scale: s };
  } catch {
    return null; // a broken file is named by the full decode below
  } finally {
    if (frame) frame.close();
    if (dec) dec.close();
  }
}

/** Photo bytes → upright RGBA pixels {w, h, data}, or PhotoError naming what is wrong.
 * With the card's input `spec`, a large JPEG is decoded at Pillow's draft scale. */
/** The checks before decoding: size, and a format the page can decode. */
function checkBytes(bytes) {
  if (bytes.length === 0) throw new PhotoError('empty file');
  if (bytes.length > R.MAX_FILE_BYTES) throw new PhotoError(`file is larger than ${R.MAX_FILE_BYTES / 2 ** 20} MiB`);
  const kind = sniff(bytes);
  if (kind === 'heic') throw new PhotoError('HEIC photo: browsers cannot decode HEIC; use the Python client (pric-client), which reads it');
  if (kind === null) throw new PhotoError('not a recognised image format');
  return kind;
}

export async function decode(bytes, spec = null) {
  const kind = checkBytes(bytes);
  const dims = dimensions(bytes, kind);
  if (dims && dims[0] * dims[1] > R.MAX_PIXELS) throw new PhotoError(`${dims[0]}x${dims[1]} pixels exceeds the limit of ${R.MAX_PIXELS} (too large to decode safely)`);
  if (kind === 'jpeg' && spec && dims) {
    const s = draftScale(dims[0], dims[1], neededSize(spec));
    if (s > 1) {
      const img = await decodeScaled(bytes, dims[0], dims[1], s);
      if (img) return img;
    }
  }
  let bitmap;
  try {
    bitmap = await createImageBitmap(new Blob([bytes]), { colorSpaceConversion: 'none', imageOrientation: 'from-image', premultiplyAlpha: 'none' });
  } catch {
    throw new PhotoError(`cannot decode image (${kind})`);
  }
  try {
    const { width: w, height: h } = bitmap;
    if (w < 1 || h < 1) throw new PhotoError('image has no pixels');
    if (w * h > R.MAX_PIXELS) throw new PhotoError(`${w}x${h} pixels exceeds the limit of ${R.MAX_PIXELS}`);
    const canvas = new OffscreenCanvas(w, h);
    const ctx = canvas.getContext('2d', { willReadFrequently: true, colorSpace: 'srgb' });
    // transparency over white, as protocol.preprocess._to_rgb does (a JPEG has none)
    if (kind !== 'jpeg') {
      ctx.fillStyle = '#ffffff';
      ctx.fillRect(0, 0, w, h);
    }
    ctx.drawImage(bitmap, 0, 0);
    const img = ctx.getImageData(0, 0, w, h, { colorSpace: 'srgb' });
    return { w, h, data: img.data };
  } finally {
    bitmap.close();
  }
}

/** A card's face detector in the page: its three ONNX files (name → bytes), each checked
 * against the sha256 the card's alignment section and its extra_files state (the attested
 * card binds both) before onnxruntime sees them. */
export async function loadDetector(card, files) {
  const al = card.alignment;
  if (!al || !al.detector || typeof al.detector.files !== 'object' || al.detector.files === null) throw new PhotoError('the card has no face detector');
  const problems = alignmentProblems(al);
  if (problems.length) throw new PhotoError(`the card's alignment section: ${problems.join('; ')}`);
  const nets = {};
  for (const name of DETECTOR_FILES) {
    const want = al.detector.files[name];
    if (!want || (card.extra_files || {})[name] !== want) throw new PhotoError(`detector file ${name}: the card's alignment and extra_files disagree`);
    const got = await sha256(files[name]);
    if (got !== want) throw new PhotoError(`detector file ${name}: its sha256 ${got.slice(0, 12)}… is not the card's; refusing to use the detector`);
    nets[name.replace('.onnx', '')] = await loadNet(files[name]);
  }
  return new FaceDetector(al.detector, nets);
}

/** Photo bytes → its items, as client.pipeline.Extractor.decode_items: without alignment
 * one item (face null); with it one per face found (face: its index, largest first), a
 * problem line per face that cannot be aligned, `small` faces left out for their size.
 * PhotoError for a photo that cannot be decoded or has no face. */
export async function photoItems(bytes, card, detector = null, options = {}) {
  if (!card.alignment) return { items: [{ face: null, pixels: prepare(await decode(bytes, card.input), card.input) }], problems: [], small: 0 };
  if (!detector) throw new PhotoError('this model finds faces, and its detector is not loaded');
  checkBytes(bytes);
  const kind = sniff(bytes);
  const dims = dimensions(bytes, kind);
  const dec = (b, need) => decode(b, need ? { crop_box: [0, 0, 1, 1], width: need[0], height: need[1] } : null);
  // each face is cut at the resolution the card's input keeps of the aligned frame
  const detail = modelDetail(card.alignment.frame, card.input);
  const got = await photoFaces(bytes, kind, dims, card.alignment, detector, dec, { detail, ...options });
  if (!got.faces.length && !got.small) throw new PhotoError('no face found');
  const out = { items: [], problems: [], small: got.small };
  for (const f of got.faces) {
    if (f.error) out.problems.push(f.error.message);
    else out.items.push({ face: f.index, pixels: prepare(f.image, card.input) });
  }
  return out;
}

/** Photo bytes → [uint8 (H, W, 3) model input per face]. */
export async function modelInputs(bytes, card, detector = null) {
  return (await photoItems(bytes, card, detector)).items.map((it) => it.pixels);
}
