"""Signing overhead: encode + decode of an UPDATE message signed and verified (Ed25519 over the
SHA-256 of the message, shared/wire/codec.py) vs the same message unsigned.

What is measured, per parameter count N (float32 delta): the median time of `encode(msg)`,
`encode(msg, signer)`, `decode(payload, ctx)` without keys and `decode(signed, ctx_with_keys)`
(checks the signature), all interleaved in one loop (bench/timing.py), plus the two pieces that
signing adds: one SHA-256 pass over the payload, and one Ed25519 sign / verify of a 32-byte
digest (constant: it does not grow with N). The ratio column is signed / unsigned.

Run: `.venv/bin/python bench/signing_overhead.py [--sizes 100000,4000000]`; prints a Markdown
table.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import tempfile

import numpy as np
from timing import medians

from fleetfl.shared.core.messages import Kind, Message
from fleetfl.shared.wire.codec import DecodeContext, decode, encode
from fleetfl.shared.wire.signing import DOMAIN, KeyRing, Signer, write_key_pair

RUN = "bench"
DEFAULT_SIZES = (100_000, 4_000_000)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Cost of signing and verifying an UPDATE message "
                                            "vs plain encode/decode (medians, interleaved).")
    p.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                   help="comma-separated parameter counts (default %(default)s)")
    p.add_argument("--repeats", type=int, default=0, help="default: more for small sizes")
    return p.parse_args(argv)


def measure(n: int, signer: Signer, ring: KeyRing, repeats: int) -> dict[str, float]:
    delta = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    msg = Message(Kind.UPDATE, RUN, "agent0", 1, 0, {"window": 1, "samples": 1000, "steps": 10},
                  {"delta": delta})
    plain, signed = encode(msg), encode(msg, signer)
    ctx, ctx_keys = DecodeContext(RUN, n), DecodeContext(RUN, n, keys=ring)
    digest = hashlib.sha256(signed[:-64]).digest()
    signature = signed[-64:]
    key = signer.public_key
    return medians({
        "encode": lambda: encode(msg),
        "encode signed": lambda: encode(msg, signer),
        "decode": lambda: decode(plain, ctx),
        "decode verified": lambda: decode(signed, ctx_keys),
        "sha256(payload)": lambda: hashlib.sha256(memoryview(signed)[:-64]).digest(),
        "ed25519 sign(digest)": lambda: signer.sign(digest),
        "ed25519 verify(digest)": lambda: key.verify(signature, DOMAIN + digest),
    }, repeats)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        signer = Signer.from_file(write_key_pair("agent0", tmp)[0])
    ring = KeyRing({"agent0": signer.public_key})
    ms = 1e3
    print(f"Signing overhead, {platform.machine()}, Python {platform.python_version()}; "
          "medians in ms per message\n")
    print("| parameters | payload MB | encode | encode signed | x | decode | decode verified "
          "| x | sha256 | sign | verify |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in (int(s) for s in args.sizes.split(",")):
        repeats = args.repeats or (200 if n <= 200_000 else 25)
        t = measure(n, signer, ring, repeats)
        print(f"| {n:,} | {n * 4 / 1e6:.1f} | {t['encode'] * ms:.3f} | "
              f"{t['encode signed'] * ms:.3f} | {t['encode signed'] / t['encode']:.2f} | "
              f"{t['decode'] * ms:.3f} | {t['decode verified'] * ms:.3f} | "
              f"{t['decode verified'] / t['decode']:.2f} | {t['sha256(payload)'] * ms:.3f} | "
              f"{t['ed25519 sign(digest)'] * ms:.3f} | {t['ed25519 verify(digest)'] * ms:.3f} |")
    print("\nx = signed / unsigned time. sha256 is the one pass over the payload each side adds;"
          " sign and verify work on a 32-byte digest, so they do not grow with the model.")


if __name__ == "__main__":
    main()
