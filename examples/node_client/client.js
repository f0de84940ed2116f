#!/usr/bin/env node
'use strict';
// A minimal fleetfl device written from PROTOCOL.md: MQTT 5 settings, topics, join, hello,
// the round, delayed and FDA (naive) timings with the dense payload, participant selection
// (sitting out the windows an assign says), both wire layouts,
// chunk reassembly, a persisted sequence counter, last will, refusal replies, stop.
// A PROTOCOL DEMONSTRATOR, NOT A LEARNER: its "training" is a deterministic pseudo-gradient
// step toward a fixed point (see README.md); it joins any job whose model it can size.
const fs = require('fs');
const os = require('os');
const path = require('path');
const mqtt = require('mqtt');
const { CodecError, F64, Reassembler, decode, encode } = require('./wire');

const USAGE = 'usage: node client.js --broker mqtt://HOST:PORT --run RUN --id ID [--state-dir DIR] '
  + '[--samples N] [--step-ms MS] [--block-timeout S] [--task-fingerprint F]';
const opts = { broker: 'mqtt://127.0.0.1:1883', run: 'demo', id: '', 'state-dir': '.', samples: '100',
  'step-ms': '2', 'block-timeout': '120', 'task-fingerprint': '' };
for (let i = 2; i < process.argv.length; i += 2) {
  const key = process.argv[i].replace(/^--/, '');
  if (!(key in opts) || process.argv[i + 1] === undefined) { console.error(USAGE); process.exit(2); }
  opts[key] = process.argv[i + 1];
}
const ID = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$/;
if (!ID.test(opts.id) || !ID.test(opts.run) || opts.id === 'coordinator' || os.endianness() !== 'LE') {
  console.error(`${USAGE}\n(ids: 1 to 64 of A-Z a-z 0-9 . _ -, not starting with '.'; little-endian hosts only)`);
  process.exit(2);
}
const RUN = opts.run, ME = opts.id, SAMPLES = Number(opts.samples), STEP_MS = Number(opts['step-ms']);
// FLEETFL_NODE_FAULT breaks one rule on purpose, so a conformance checker can be seen to fail
const FAULT = process.env.FLEETFL_NODE_FAULT || '';
const log = (...a) => console.error(new Date().toISOString(), `[${ME}]`, ...a);
const T = { avg: `fl/${RUN}/down/avg`, ctl: `fl/${RUN}/down/ctl`, model: `fl/${RUN}/down/model`,
  status: `fl/${RUN}/status/${ME}`, up: `fl/${RUN}/up/${ME}`, refusal: `fl/${RUN}/status/${ME}/refusal` };

// -- sequence numbers (section 10): one counter, persisted in blocks of 1000 -----------------
const seqFile = path.join(opts['state-dir'], `${ME}.seq`);
let seqNext = Math.max(readBound(), Date.now() * 1000), seqEnd = 0;
function readBound() {
  try { return Number(fs.readFileSync(seqFile, 'utf8').trim()) || 0; } catch { return 0; }
}
function nextSeq() {
  if (seqNext >= seqEnd) { // reserve the next block durably before using a number of it
    seqEnd = seqNext + 1000;
    fs.mkdirSync(opts['state-dir'], { recursive: true });
    const tmp = `${seqFile}.tmp`;
    const fd = fs.openSync(tmp, 'w');
    fs.writeSync(fd, `${seqEnd}\n`);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    fs.renameSync(tmp, seqFile);
    const dir = fs.openSync(opts['state-dir'], 'r');
    fs.fsyncSync(dir);
    fs.closeSync(dir);
  }
  return seqNext++;
}

// -- messages we write ---------------------------------------------------------------------
let proto = 2; // the version of the model we joined (section 19); the will: our newest
const message = (kind, baseVersion, fields = {}, arrays = {}) => encode(
  { kind, run: RUN, sender: ME, seq: nextSeq(), base_version: baseVersion, fields, arrays }, proto);
const offlineWill = message('offline', 0); // encoded at start, fired by the broker (3.4)

// -- MQTT (section 3) ----------------------------------------------------------------------
let backoff = 1000;
const client = mqtt.connect(opts.broker, {
  protocolVersion: 5, clientId: `fl-${RUN}-${ME}`, clean: true, keepalive: 30,
  reconnectPeriod: backoff, properties: { sessionExpiryInterval: 300 },
  will: { topic: T.status, payload: offlineWill, qos: 1, retain: true },
});
let inflight = 0, connections = 0;
function publish(topic, payload, retain = false, done = () => {}) {
  inflight += 1;
  client.publish(topic, payload, { qos: 1, retain }, () => { inflight -= 1; done(); });
}
function subscribe(topic) { client.subscribe([topic, `${topic}/chunk/+`], { qos: 1 }); }
function unsubscribe(topic) { client.unsubscribe([topic, `${topic}/chunk/+`]); }
[T.avg, T.ctl, T.refusal].forEach(subscribe);
subscribe(T.model);

client.on('connect', () => {
  connections += 1;
  client.options.clean = false; // clean start only on the first connection of the process
  client.options.reconnectPeriod = backoff = 1000;
  log(`connected to ${opts.broker}`);
  if (connections > 1 && hello) afterReconnect();
});
client.on('close', () => { // back off 1 s doubling to 16 s
  client.options.reconnectPeriod = backoff;
  backoff = Math.min(backoff * 2, 16000);
});
client.on('error', (e) => log(`mqtt: ${e.message}`));

function afterReconnect() {
  // say hello again once the broker has every update we sent (else they become replays)
  const started = Date.now();
  const wait = () => {
    if (inflight > 0 && Date.now() - started < 10000) { setTimeout(wait, 10); return; }
    publish(T.status, message('hello', hello.base_version, hello.fields), true);
    if (dev && dev.blocked()) resync('reconnected while waiting for an average');
  };
  wait();
}

// -- receiving: chunks, decoding, who may send what where -----------------------------------
const reassembler = new Reassembler();
const CHUNK = /^(.*)\/chunk\/(0|[1-9][0-9]*)$/;
const KIND_TOPIC = { avg: T.avg, model: T.model, refusal: T.refusal, sync: T.ctl, assign: T.ctl,
  evaluate: T.ctl, stop: T.ctl };
let modelSize = null, rejected = 0;
client.on('message', (topic, payload) => {
  if (payload.length === 0) return; // a cleared retained message
  const chunk = CHUNK.exec(topic);
  try {
    if (chunk) {
      const whole = reassembler.add(chunk[1], Number(chunk[2]), payload);
      if (whole) handle(whole.topic, decode(whole.payload, RUN, modelSize));
      return;
    }
    handle(topic, decode(payload, FAULT === 'any_run' ? null : RUN, modelSize));
  } catch (e) {
    if (!(e instanceof CodecError)) throw e;
    rejected += 1;
    log(`rejected message on ${topic}: ${e.message}`);
  }
});
const value = (v) => (v instanceof F64 ? v.v : v);

function handle(topic, msg) {
  // a device MUST ignore a kind on another kind's topic, e.g. an avg on down/ctl (3.2)
  if (msg.sender !== 'coordinator' || (KIND_TOPIC[msg.kind] !== topic && FAULT !== 'any_topic')) {
    throw new CodecError('unexpected', `${msg.kind} from ${msg.sender} on ${topic}`);
  }
  switch (msg.kind) {
    case 'refusal': // log it, never act on it (section 18)
      if (msg.fields.agent === ME) {
        log(`the coordinator refused our ${msg.fields.refused_kind || 'message'} seq=${msg.fields.seq}: `
          + `${msg.fields.reason} (${msg.fields.detail.replace(/[^\x20-\x7e]/g, '?').slice(0, 200)})`);
      }
      return;
    case 'stop': stop(`run ended: ${msg.fields.reason}`); return;
    case 'model': if (!dev) join(msg); return;
    case 'evaluate': // no validation data: answer at once (13.5)
      if (dev) publish(T.up, message('metrics', msg.fields.version, { version: msg.fields.version, samples: 0, values: {} }));
      return;
    case 'avg':
      if (!dev) return;
      if (msg.arrays.delta.length !== params.length) throw new CodecError('bad_shape', 'a dense average needs N values');
      dev.onAvg(msg.fields.window, msg.fields.version, msg.arrays.delta);
      return;
    case 'sync': if (dev && dev.onSync) dev.onSync(msg.fields.window); return;
    case 'assign': // participant selection (14.5); suffix jobs (FedPMT's layers) are refused
      if (dev) { tell(msg.fields.window, msg.fields.first_layer); if (dev.onAssign) dev.onAssign(); }
      return;
    default:
  }
}

// -- joining (section 13): validate the job, refuse what we cannot run ---------------------
const JOB = { // key: [type, range check]; an int is accepted where a float is expected (11)
  algo: ['s', (v) => ['fedavg', 'dga', 'drpga', 'lbgm', 'fda', 'pmt'].includes(v)], task: ['s', (v) => v !== ''],
  task_fingerprint: ['s', () => true], local_steps: ['i', (v) => v >= 1], period: ['i', (v) => v >= 1],
  delay: ['i', (v) => v >= 0], lr: ['f', (v) => v > 0], momentum: ['f', () => true],
  optimizer: ['s', (v) => ['sgd', 'adam'].includes(v)], batch_size: ['i', (v) => v >= 1],
  partition: ['s', (v) => ['iid', 'dirichlet', 'shards', 'roles'].includes(v)], alpha: ['f', (v) => v > 0],
  seed: ['i', (v) => v >= 0 && v <= 2 ** 32 - 1], payload: ['s', (v) => ['', 'dense', 'partial', 'lbgm', 'suffix'].includes(v)],
  rate: ['f', (v) => [0.02, 0.05, 0.1, 0.2, 0.4, 1.0].includes(v)], rate_walk: ['b', () => true],
  fda_variant: ['s', (v) => ['naive', 'linear', 'sketch'].includes(v)], fda_theta: ['f', (v) => v >= 0],
  rtc_steps: ['i', (v) => v >= 1], lbgm_threshold: ['f', (v) => v >= 0 && v <= 1],
  select: ['f', (v) => v === 0 || (v > 0 && v < 1) || (v >= 1 && Number.isInteger(v))],
};
const DEFAULTS = { algo: 'fedavg', local_steps: 20, period: 10, delay: 2, lr: 0.05, seed: 0, payload: '',
  fda_variant: 'linear', rtc_steps: 5, select: 0 };
const isType = { s: (v) => typeof v === 'string', i: (v) => typeof v === 'number', b: (v) => typeof v === 'boolean',
  f: (v) => (v instanceof F64 || typeof v === 'number') && Number.isFinite(value(v)) };

function checkJob(job) { // the job as plain values, or an error naming what we refuse
  const out = { ...DEFAULTS };
  for (const [key, v] of Object.entries(job)) {
    if (!(key in JOB)) return `unknown job key ${key}`;
    const [type, ok] = JOB[key];
    if (!isType[type](v) || !ok(value(v))) return `job.${key}: wrong type or out of range`;
    out[key] = value(v);
  }
  if (opts['task-fingerprint'] && out.task_fingerprint !== opts['task-fingerprint']) return 'another task';
  if (!['fedavg', 'dga', 'fda'].includes(out.algo) || !['', 'dense'].includes(out.payload)) {
    return `this demonstrator runs fedavg, dga and fda with the dense payload, not ${out.algo}/${out.payload || 'default'}`;
  }
  if (out.algo === 'fda' && out.fda_variant !== 'naive') return 'this demonstrator runs only the naive FDA variant';
  return out;
}

let dev = null, params = null, job = null, hello = null, refusedJob = null, target = null;
function join(model) {
  const text = JSON.stringify(model.fields.job, (k, v) => value(v));
  if (text === refusedJob) return;
  proto = model.proto;
  const checked = checkJob(model.fields.job);
  if (typeof checked === 'string') { // say why on our status topic, wait for another job
    log(`not joining: ${checked}`);
    const task = model.fields.job.task_fingerprint;
    publish(T.status, message('refused', 0, { reason: checked, task: typeof task === 'string' ? task : '' }), true);
    refusedJob = text;
    return;
  }
  unsubscribe(T.model);
  job = checked;
  assigned = []; // told again in answer to our hello
  params = Float32Array.from(model.arrays.params);
  modelSize = params.length;
  target = params.map((_, i) => Math.sin(i * 0.37 + job.seed) * 0.1); // the stand-in's fixed point
  dev = { fedavg: roundTiming, fda: roundTiming, dga: delayedTiming }[job.algo]();
  dev.start(model.fields.version, model.fields.next_window);
  hello = { base_version: model.fields.version, fields: { samples: SAMPLES, first_window: model.fields.next_window,
    validation_samples: 0, capabilities: { client: 'fleetfl node example', protocols: [1, 2] } } };
  publish(T.status, message('hello', hello.base_version, hello.fields), true);
  log(`joined at version ${model.fields.version}, first window ${model.fields.next_window}, ${modelSize} parameters, ${job.algo}`);
}

// -- participant selection (14.5): [from window, f] told for our id, f -1: sit the window out
let assigned = [];
function tell(window, firstLayer) {
  const f = Object.prototype.hasOwnProperty.call(firstLayer, ME) ? firstLayer[ME] : undefined;
  if (!Number.isInteger(f) || f < -1) return; // not for us, or not an int (F64, bool): ignored
  const kept = assigned.filter(([w]) => w < window); // it replaces its window and later ones
  const past = kept.findLastIndex(([w]) => w <= window - 64); // what no window we reach reads
  assigned = [...kept.slice(Math.max(past, 0)), [window, f]];
}
function told(w) { // what is in force for window w (undefined: nothing yet)
  let f;
  for (const [from, first] of assigned) if (from <= w) f = first;
  return f;
}
const selecting = () => job.select > 0 && FAULT !== 'no_assign';
const ready = (w) => !selecting() || (told(w) !== undefined && told(w) !== -1); // may train w
const sitsOut = (w) => selecting() && told(w) === -1; // told so, not merely not told yet

function resync(why) {
  log(`resynchronising from the model: ${why}`);
  dev = null;
  subscribe(T.model);
}

// -- timings (section 14), dense payload ---------------------------------------------------
function sendUpdate(baseVersion, window, steps, delta) {
  const fields = { window, samples: FAULT === 'samples' ? SAMPLES + 1 : SAMPLES, steps,
    step_seconds: FAULT === 'int_float' ? 0 : new F64(STEP_MS / 1000) };
  publish(T.up, message('update', baseVersion, fields, { delta }));
}
const minus = (a, b) => a.map((x, i) => x - b[i]);

function roundTiming() { // fedavg: H steps, send, wait; fda: the same, ended by sync
  const s = {};
  const end = () => { sendUpdate(s.baseVersion, s.window, s.steps, minus(params, s.base)); s.waiting = true; };
  return {
    start(version, nextWindow) { Object.assign(s, { base: params.slice(), baseVersion: version, window: nextWindow, steps: 0, waiting: false }); },
    window: () => s.window,
    blocked: () => s.waiting || !ready(s.window), // sitting a window out: no steps, no fda_state
    afterStep() {
      s.steps += 1;
      if (job.algo === 'fedavg' && s.steps >= job.local_steps && !s.waiting) end();
      if (job.algo === 'fda' && !s.waiting && s.steps % job.rtc_steps === 0) {
        const drift = minus(params, s.base).reduce((acc, d) => acc + d * d, 0); // float64 sum
        publish(T.up, message('fda_state', s.baseVersion, { step: s.steps, drift_sq: new F64(drift) }));
      }
    },
    onSync(w) { if (w === s.window && !s.waiting && ready(w)) end(); else if (w > s.window) resync(`missed window ${s.window}`); },
    onAvg(w, v, delta) {
      if (w < s.window) return;
      if (w > s.window) { resync(`missed the average of window ${s.window}`); return; }
      for (let i = 0; i < params.length; i++) params[i] = s.base[i] + delta[i];
      Object.assign(s, { base: params.slice(), baseVersion: v, window: w + 1, steps: 0, waiting: false });
    },
  };
}

function delayedTiming() { // dga: send every K steps, apply each average D steps later
  const s = {};
  const applyDue = () => {
    for (const w of [...s.sent.keys()].sort((a, b) => a - b)) {
      const { own, due } = s.sent.get(w);
      if (due > s.step || !s.arrived.has(w)) break;
      if (w !== s.lastApplied + 1) { resync(`missed the average of window ${s.lastApplied + 1}`); return; }
      const { v, delta } = s.arrived.get(w);
      for (let i = 0; i < params.length; i++) { const c = own ? delta[i] - own[i] : delta[i]; params[i] += c; s.anchor[i] += c; }
      s.sent.delete(w); s.arrived.delete(w);
      Object.assign(s, { baseVersion: v, lastApplied: w });
    }
  };
  const skip = () => { // sit out at once a window told -1, not started, surely decided (14.5)
    const seen = Math.max(s.lastApplied, ...s.arrived.keys());
    let skipped = false;
    while (s.inWindow === 0 && s.window <= seen + Math.floor(job.delay / job.period) + 1 && sitsOut(s.window)) {
      s.sent.set(s.window, { own: null, due: s.step }); // nothing sent, nothing of ours to take back
      s.window += 1; skipped = true;
    }
    if (skipped) for (const e of s.sent.values()) e.due = Math.min(e.due, s.step); // idle: all due now
  };
  return {
    start(version, nextWindow) {
      Object.assign(s, { anchor: params.slice(), baseVersion: version, window: nextWindow, lastApplied: nextWindow - 1,
        step: 0, inWindow: 0, sent: new Map(), arrived: new Map() });
    },
    window: () => s.window,
    blocked: () => !ready(s.window) || [...s.sent].some(([w, { due }]) => due <= s.step && !s.arrived.has(w)),
    afterStep() {
      s.step += 1; s.inWindow += 1;
      if (s.inWindow === job.period) {
        const own = minus(params, s.anchor);
        s.anchor = params.slice();
        s.sent.set(s.window, { own, due: s.step + job.delay });
        sendUpdate(s.baseVersion, s.window, job.period, own);
        s.window += 1; s.inWindow = 0;
        skip();
      }
      if (dev) applyDue();
    },
    onAvg(w, v, delta) {
      if (w <= s.lastApplied || s.arrived.has(w)) return;
      s.arrived.set(w, { v, delta });
      skip();
      applyDue();
    },
    onAssign() { skip(); applyDue(); },
  };
}

// -- the training loop: one stand-in step per tick while not blocked ------------------------
let blockedSince = null;
setInterval(() => {
  if (!dev) return;
  if (dev.blocked()) { // only time blocked on an average counts, not sitting out (14.5)
    blockedSince = ready(dev.window()) ? blockedSince || Date.now() : null;
    if (blockedSince && Date.now() - blockedSince > Number(opts['block-timeout']) * 1000) resync('blocked too long');
    return;
  }
  blockedSince = null;
  // NOT learning: a deterministic pseudo-gradient step toward a fixed point
  for (let i = 0; i < params.length; i++) params[i] += job.lr * 0.1 * (target[i] - params[i]);
  dev.afterStep();
}, STEP_MS);

// -- leaving (3.4, 13.6): offline, retained, then a normal disconnect (no will) ------------
let stopping = false;
function stop(why) {
  if (stopping) return;
  stopping = true;
  log(`stopping: ${why} (${rejected} messages rejected)`);
  publish(T.status, message('offline', 0), true, () => client.end(false, {}, () => process.exit(0)));
  setTimeout(() => process.exit(0), 5000).unref();
}
process.on('SIGTERM', () => stop('SIGTERM'));
process.on('SIGINT', () => stop('SIGINT'));
