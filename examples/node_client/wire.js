'use strict';
// The fleetfl wire format, written from PROTOCOL.md alone: a strict msgpack header reader,
// a header writer (@msgpack/msgpack plus float-64 patching, section 20), messages of protocol
// versions 1 and 2 (section 4 and issue 18's layout) and chunk reassembly (section 9).
const crypto = require('crypto');
const { Encoder } = require('@msgpack/msgpack');

const DOWNLINK_HEADER_MAX = 8 * 1024 * 1024; // what a device MUST read (section 4)
const MAX_DEPTH = 16; // maps and arrays nest at most 16 levels, the header map is 1 (section 5)
const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;
const SIG_BYTES = 64;
const V2_MAGIC = Buffer.from('FLM\x02', 'latin1');

class CodecError extends Error {
  constructor(reason, detail) { super(`${reason}: ${detail}`); this.reason = reason; }
}

// A msgpack float as read (float 32 or 64), or a number to write as float 64: JS numbers
// cannot tell 1.0 from 1, and the types of section 5 must.
class F64 { constructor(v) { this.v = v; } }

// -- reading: every value typed as on the wire; ints are numbers, floats F64 ------------------
function readHeader(buf, start, limit) {
  const end = Math.min(buf.length, start + limit);
  let pos = start;
  const bad = (what) => new CodecError('malformed', what);
  const need = (n) => { if (pos + n > end) throw bad('truncated or over-long message header'); };
  const utf8 = new TextDecoder('utf-8', { fatal: true });
  const take = (n, read) => { need(n); const v = read(pos); pos += n; return v; };
  const str = (n) => {
    if (n > 65536) throw bad('a str of more than 65,536 bytes');
    need(n);
    let s;
    try { s = utf8.decode(buf.subarray(pos, pos + n)); } catch (e) { throw bad('invalid UTF-8'); }
    pos += n;
    return s;
  };
  // `depth`: how many maps and arrays enclose this one (0: the header map itself)
  const deep = (depth) => { if (depth >= MAX_DEPTH) throw bad(`nested deeper than ${MAX_DEPTH} levels`); };
  const arr = (n, depth) => {
    deep(depth);
    if (n > 65536) throw bad('an array of more than 65,536 elements');
    const out = [];
    for (let i = 0; i < n; i++) out.push(item(depth + 1));
    return out;
  };
  const map = (n, depth) => {
    deep(depth);
    if (n > 1024) throw bad('a map of more than 1,024 entries');
    const out = Object.create(null);
    for (let i = 0; i < n; i++) {
      const key = item(depth + 1);
      if (typeof key !== 'string') throw bad('a map key that is not a str');
      out[key] = item(depth + 1);
    }
    return out;
  };
  const item = (depth) => {
    const b = take(1, (p) => buf[p]);
    if (b <= 0x7f) return b;
    if (b >= 0xe0) return b - 0x100;
    if ((b & 0xf0) === 0x80) return map(b & 0x0f, depth);
    if ((b & 0xf0) === 0x90) return arr(b & 0x0f, depth);
    if ((b & 0xe0) === 0xa0) return str(b & 0x1f);
    switch (b) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xca: return new F64(take(4, (p) => buf.readFloatBE(p)));
      case 0xcb: return new F64(take(8, (p) => buf.readDoubleBE(p)));
      case 0xcc: return take(1, (p) => buf.readUInt8(p));
      case 0xcd: return take(2, (p) => buf.readUInt16BE(p));
      case 0xce: return take(4, (p) => buf.readUInt32BE(p));
      case 0xcf: return Number(take(8, (p) => buf.readBigUInt64BE(p))); // > 2^53: inexact
      case 0xd0: return take(1, (p) => buf.readInt8(p));
      case 0xd1: return take(2, (p) => buf.readInt16BE(p));
      case 0xd2: return take(4, (p) => buf.readInt32BE(p));
      case 0xd3: return Number(take(8, (p) => buf.readBigInt64BE(p)));
      case 0xd9: return str(take(1, (p) => buf.readUInt8(p)));
      case 0xda: return str(take(2, (p) => buf.readUInt16BE(p)));
      case 0xdb: return str(take(4, (p) => buf.readUInt32BE(p)));
      case 0xdc: return arr(take(2, (p) => buf.readUInt16BE(p)), depth);
      case 0xdd: return arr(take(4, (p) => buf.readUInt32BE(p)), depth);
      case 0xde: return map(take(2, (p) => buf.readUInt16BE(p)), depth);
      case 0xdf: return map(take(4, (p) => buf.readUInt32BE(p)), depth);
      default: throw bad(`msgpack type 0x${b.toString(16)} (bin, ext or unused) in the header`);
    }
  };
  const value = item(0);
  return { value, end: pos };
}

// -- writing: @msgpack/msgpack writes integral numbers as ints, so each F64 is written as a
// non-integral placeholder (which it encodes as float 64) and patched to the real double.
const encoder = new Encoder();
function packHeader(obj) {
  const patches = [];
  const swap = (v) => {
    if (v instanceof F64) {
      const placeholder = 0.7071067811865476 + patches.length / 1048576;
      patches.push([placeholder, v.v]);
      return placeholder;
    }
    if (Array.isArray(v)) return v.map(swap);
    if (v && typeof v === 'object') {
      const out = {};
      for (const [k, x] of Object.entries(v)) out[k] = swap(x);
      return out;
    }
    return v;
  };
  const bytes = Buffer.from(encoder.encode(swap(obj)));
  const probe = Buffer.alloc(9);
  probe[0] = 0xcb;
  for (const [placeholder, real] of patches) {
    probe.writeDoubleBE(placeholder, 1);
    const at = bytes.indexOf(probe);
    if (at < 0) throw new Error('float placeholder not found');
    bytes.writeDoubleBE(real, at + 1);
  }
  return bytes;
}

// -- the envelope and the kinds' fields (sections 6, 7): i int, f float, s str, m map, a array
const KINDS = {
  hello: { f: { samples: 'i', first_window: 'i' }, o: { capabilities: 'm', validation_samples: 'i' } },
  offline: { f: {} },
  refused: { f: { reason: 's', task: 's' } },
  update: { f: { window: 'i', samples: 'i', steps: 'i' }, a: { delta: 'upto' },
    o: { scalars: 'a', first_layer: 'i', step_seconds: 'f' } },
  fda_state: { f: { step: 'i', drift_sq: 'f' }, o: { projection: 'f' }, oa: { sketch: 'small' } },
  metrics: { f: { version: 'i', samples: 'i', values: 'm' } },
  model: { f: { version: 'i', next_window: 'i', job: 'm' }, a: { params: 'model' },
    oa: { last_avg: 'model' } },
  avg: { f: { window: 'i', version: 'i', contributors: 'a' }, a: { delta: 'upto' } },
  sync: { f: { version: 'i', window: 'i', estimate: 'f' } },
  assign: { f: { window: 'i', first_layer: 'm', deadline: 'f' } },
  evaluate: { f: { version: 'i' }, a: { params: 'model' } },
  stop: { f: { reason: 's' } },
  refusal: { f: { agent: 's', reason: 's', seq: 'i', refused_kind: 's', detail: 's', suppressed: 'i' } },
};
const ID = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$/;
const isMap = (v) => v !== null && typeof v === 'object' && !Array.isArray(v) && !(v instanceof F64);
const TYPES = {
  i: (v) => typeof v === 'number', f: (v) => v instanceof F64, s: (v) => typeof v === 'string',
  m: isMap, a: Array.isArray,
};

function checkArrays(kind, arrays, modelSize) {
  const spec = KINDS[kind];
  const rules = { ...(spec.a || {}), ...(spec.oa || {}) };
  const names = Object.keys(arrays);
  if (!Object.keys(spec.a || {}).every((n) => names.includes(n)) || !names.every((n) => n in rules)) {
    throw new CodecError('bad_array', `${kind} carries arrays ${names}`);
  }
  return names.map((name) => {
    const a = arrays[name];
    if (!isMap(a) || Object.keys(a).length !== 2 || !('dtype' in a) || !('shape' in a)) {
      throw new CodecError('bad_array', `array ${name} is not {dtype, shape}`);
    }
    if (a.dtype !== '<f4') throw new CodecError('bad_dtype', `array ${name} dtype ${a.dtype}`);
    const shape = a.shape;
    if (!Array.isArray(shape) || shape.length < 1 || shape.length > 8
        || !shape.every((d) => typeof d === 'number' && d >= 0 && d < 2 ** 40)) {
      throw new CodecError('bad_shape', `array ${name} shape`);
    }
    const count = shape.reduce((x, y) => x * y, 1);
    const rule = rules[name];
    if ((rule === 'small' && count > 65536) || (modelSize != null
        && ((rule === 'model' && count !== modelSize) || (rule === 'upto' && count > modelSize)))) {
      throw new CodecError('bad_shape', `array ${name} has ${count} values`);
    }
    return [name, count];
  });
}

// The message in `buf` (a Buffer), checked as section 8 orders it (no keys: unsigned and
// signed messages alike, the signature not verified), or a CodecError.
function decode(buf, run, modelSize, maxBytes = MAX_MESSAGE_BYTES) {
  if (buf.length > maxBytes) throw new CodecError('oversized', `${buf.length} bytes`);
  const v2 = buf.subarray(0, 3).toString('latin1') === 'FLM';
  let body, offset;
  if (v2) {
    if (buf.length < 8) throw new CodecError('malformed', 'shorter than the prefix');
    if (buf[3] !== 2) throw new CodecError('bad_protocol', `layout version ${buf[3]}`);
    const h = buf.readUInt32LE(4);
    if (h > DOWNLINK_HEADER_MAX) throw new CodecError('malformed', 'header length above 8 MiB');
    ({ value: body, end: offset } = readHeader(buf, 8, h));
    if (offset !== 8 + h) throw new CodecError('malformed', 'header length does not match');
  } else {
    if (![0xde, 0xdf].includes(buf[0]) && (buf[0] & 0xf0) !== 0x80) {
      throw new CodecError('malformed', 'neither the version-2 prefix nor a msgpack map');
    }
    ({ value: body, end: offset } = readHeader(buf, 0, DOWNLINK_HEADER_MAX));
  }
  if (!isMap(body)) throw new CodecError('malformed', 'message is not a map');
  for (const key of ['proto', 'kind', 'run', 'sender', 'seq', 'base_version', 'fields', 'arrays']) {
    if (!(key in body)) throw new CodecError('malformed', `missing ${key}`);
  }
  if (body.proto !== (v2 ? 2 : 1)) throw new CodecError('bad_protocol', `proto ${body.proto}`);
  const kind = body.kind;
  if (typeof kind !== 'string' || !(kind in KINDS)) throw new CodecError('unknown_kind', `${kind}`);
  for (const [k, t] of [['run', 's'], ['sender', 's'], ['seq', 'i'], ['base_version', 'i']]) {
    if (!TYPES[t](body[k])) throw new CodecError('bad_type', `${k} has the wrong type`);
  }
  if (run !== null && body.run !== run) throw new CodecError('other_run', `run ${body.run}`);
  if (!ID.test(body.sender)) throw new CodecError('bad_sender', `sender ${body.sender}`);
  if (body.seq < 0 || body.base_version < 0) throw new CodecError('bad_value', 'negative');
  const signed = 'sig' in body;
  if (signed) {
    if (body.sig !== 'ed25519') throw new CodecError('malformed', 'unknown sig');
    if (!('ts' in body)) throw new CodecError('malformed', 'sig without ts');
    if (!TYPES.f(body.ts)) throw new CodecError('bad_type', 'ts');
    if (!Number.isFinite(body.ts.v)) throw new CodecError('bad_value', 'ts not finite');
  }
  const { fields, arrays } = body;
  if (!isMap(fields) || !isMap(arrays)) throw new CodecError('malformed', 'fields/arrays');
  const spec = KINDS[kind];
  for (const name of Object.keys(fields)) {
    if (!(name in spec.f) && !(name in (spec.o || {}))) throw new CodecError('bad_field', name);
  }
  for (const [name, t] of Object.entries({ ...spec.f, ...(spec.o || {}) })) {
    if (!(name in fields)) {
      if (name in spec.f) throw new CodecError('bad_field', `${kind} lacks ${name}`);
    } else if (!TYPES[t](fields[name])) {
      throw new CodecError('bad_type', `${name} has the wrong type`);
    }
  }
  const layout = checkArrays(kind, arrays, modelSize);
  const pad = (n) => (v2 ? (16 - (n % 16)) % 16 : 0);
  let need = offset + pad(offset);
  for (const [, count] of layout) need += 4 * count + pad(4 * count);
  need += signed ? SIG_BYTES : 0;
  if (buf.length !== need) {
    throw new CodecError(buf.length < need ? 'truncated' : 'bad_shape', `${buf.length} bytes, need ${need}`);
  }
  let at = offset + pad(offset);
  const zeros = (from, n) => buf.subarray(from, from + n).every((b) => b === 0);
  if (!zeros(offset, pad(offset))) throw new CodecError('malformed', 'padding is not zeros');
  const out = {};
  for (const [name, count] of layout) {
    if (!zeros(at + 4 * count, pad(4 * count))) throw new CodecError('malformed', 'padding is not zeros');
    const values = new Float32Array(count); // a copy: v1 arrays may start at an odd offset
    Buffer.from(values.buffer).set(buf.subarray(at, at + 4 * count));
    if (!values.every(Number.isFinite)) throw new CodecError('not_finite', `array ${name}`);
    out[name] = values;
    at += 4 * count + pad(4 * count);
  }
  return { proto: body.proto, kind, run: body.run, sender: body.sender, seq: body.seq,
    base_version: body.base_version, fields, arrays: out };
}

// One message in protocol `version` (1 or 2); arrays are Float32Arrays (little-endian hosts).
function encode(msg, version) {
  const arrays = {};
  for (const [name, a] of Object.entries(msg.arrays || {})) arrays[name] = { dtype: '<f4', shape: [a.length] };
  const head = packHeader({ proto: version, kind: msg.kind, run: msg.run, sender: msg.sender,
    seq: msg.seq, base_version: msg.base_version, fields: msg.fields || {}, arrays });
  const bytes = (a) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);
  const parts = Object.values(msg.arrays || {}).map(bytes);
  if (version === 1) return Buffer.concat([head, ...parts]);
  const zeros = (n) => Buffer.alloc((16 - (n % 16)) % 16);
  const prefix = Buffer.alloc(8);
  V2_MAGIC.copy(prefix);
  prefix.writeUInt32LE(head.length, 4);
  return Buffer.concat([prefix, head, zeros(8 + head.length), ...parts.flatMap((p) => [p, zeros(p.length)])]);
}

// -- chunks (section 9): sets by (base topic, digest), checked, joined once complete -----------
class Reassembler {
  constructor(maxBytes = MAX_MESSAGE_BYTES, idleMs = 30000, maxSets = 8) {
    this.sets = new Map();
    Object.assign(this, { maxBytes, idleMs, maxSets });
  }

  // { topic, payload, retain } once a set is complete, else null; throws CodecError on a bad chunk
  add(base, index, chunk, now = Date.now()) {
    for (const [key, set] of this.sets) if (now - set.at > this.idleMs) this.sets.delete(key);
    if (chunk.length <= 54 || !chunk.subarray(0, 4).equals(Buffer.from('FLCK')) || chunk[4] !== 2
        || (chunk[5] & ~1) !== 0) throw new CodecError('bad_chunk', 'not a version-2 chunk');
    const digest = chunk.subarray(6, 38).toString('hex');
    const [idx, count, total] = [chunk.readUInt32BE(38), chunk.readUInt32BE(42), Number(chunk.readBigUInt64BE(46))];
    if (idx !== index || count < 1 || idx >= count || total > this.maxBytes || total < count) {
      throw new CodecError('bad_chunk', `index ${idx} of ${count}, ${total} bytes`);
    }
    const key = `${base}\n${digest}`;
    let set = this.sets.get(key);
    if (!set) {
      if ([...this.sets.keys()].filter((k) => k.startsWith(`${base}\n`)).length >= this.maxSets) {
        throw new CodecError('bad_chunk', 'too many open chunk sets');
      }
      set = { count, total, flags: chunk[5], parts: new Map() };
      this.sets.set(key, set);
    }
    if (set.count !== count || set.total !== total || set.flags !== chunk[5]) {
      throw new CodecError('bad_chunk', 'count, total or flags differ within a set');
    }
    set.at = now;
    set.parts.set(idx, chunk.subarray(54));
    if (set.parts.size < count) return null;
    this.sets.delete(key);
    const parts = [...Array(count).keys()].map((i) => set.parts.get(i));
    const size = parts[0].length;
    const last = total - (count - 1) * size;
    if (!parts.slice(0, -1).every((p) => p.length === size) || last < 1 || last > size
        || parts[count - 1].length !== last) throw new CodecError('bad_chunk', 'chunk sizes');
    const outer = crypto.createHash('sha256');
    for (const p of parts) outer.update(crypto.createHash('sha256').update(p).digest());
    if (outer.digest('hex') !== digest) throw new CodecError('bad_chunk', 'digest mismatch');
    return { topic: base, payload: Buffer.concat(parts), retain: (set.flags & 1) === 1 };
  }
}

module.exports = { CodecError, F64, decode, encode, packHeader, readHeader, Reassembler };
