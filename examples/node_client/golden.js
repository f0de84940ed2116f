'use strict';
// Decode every golden vector of tests/golden (PROTOCOL.md section 20) with wire.js and compare
// with what it must decode to or be refused for. Signed vectors that need keys are skipped:
// this client verifies no signatures. Exit code 1 on any mismatch.
const fs = require('fs');
const path = require('path');
const { Reassembler, decode } = require('./wire');

const root = process.argv[2] || path.join(__dirname, '..', '..', 'tests', 'golden');
const { vectors } = JSON.parse(fs.readFileSync(path.join(root, 'vectors.json')));
let checked = 0, wrong = 0;
for (const v of vectors) {
  if (v.context.keys && v.refused) continue;
  const files = v.files.map((f) => fs.readFileSync(path.join(root, f)));
  let got;
  try {
    let payload = files[0];
    if (v.chunk_topics) { // reassembled in reverse order: any order must do
      const r = new Reassembler();
      for (let i = files.length - 1; i >= 0; i--) {
        const [, base, index] = /^(.*)\/chunk\/(\d+)$/.exec(v.chunk_topics[i]);
        payload = r.add(base, Number(index), files[i])?.payload || payload;
      }
    }
    got = decode(payload, v.context.run, v.context.model_size, v.context.max_bytes).kind;
  } catch (e) {
    got = `refused ${e.reason || e.message}`;
  }
  const want = v.refused ? `refused ${v.refused}` : v.expect.kind;
  checked += 1;
  if (got !== want) {
    wrong += 1;
    console.log(`${v.name}: expected ${want}, got ${got}`);
  }
}
console.log(`${checked} golden vectors, ${wrong} mismatches`);
process.exit(wrong ? 1 : 0);
