"""Ed25519 keys for signed messages: a Signer (own private key), a KeyRing (sender id -> public
key) and `fl-keygen`.

Key files are what `openssl genpkey -algorithm ed25519` and `openssl pkey -pubout` write: a
PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`) and a SubjectPublicKeyInfo PEM public
key (`-----BEGIN PUBLIC KEY-----`), unencrypted (the services start unattended; the file's
mode protects it).

The key list the coordinator verifies agents against is one YAML file mapping agent id to
public key, each value either the PEM text or the base64 of the raw 32-byte key:

    pi01: |
      -----BEGIN PUBLIC KEY-----
      MCowBQYDK2VwAyEA...
      -----END PUBLIC KEY-----
    pi02: 3q2+7w...=          # base64 of the 32 raw bytes

What is signed is described in shared/wire/codec.py (one Ed25519 signature per message over a
domain tag and the SHA-256 of the message bytes).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import sys
from pathlib import Path

import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fleetfl.shared.core.messages import COORDINATOR_ID, ID_RULE, PROTOCOL_VERSION, valid_id
from fleetfl.shared.core.version import add_version_flag

SIGNATURE_BYTES = 64
# Signed bytes start with this tag, so a fleet key's signature can never be passed off as one
# over some other protocol's data that happens to hash the same way, nor over the bytes of
# another version of this one. Per protocol version:
DOMAINS = {1: b"fleetfl-sig-v1\x00", 2: b"fleetfl-sig-v2\x00"}
DOMAIN = DOMAINS[PROTOCOL_VERSION]


class KeyFileError(ValueError):
    """A key file or key list that is missing or does not parse; the message names the file."""


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}") from None


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def parse_public_key(text: str | bytes, where: str) -> Ed25519PublicKey:
    """A PEM public key, or base64 of the raw 32 bytes."""
    raw = text.encode() if isinstance(text, str) else text
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(raw)
        else:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(raw, validate=True))
    except (ValueError, TypeError, binascii.Error) as exc:
        raise KeyFileError(f"{where}: not a PEM or base64 Ed25519 public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{where}: a {type(key).__name__}, not an Ed25519 public key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    return parse_public_key(_read(path, "public key"), str(path))


def public_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def public_b64(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


class Signer:
    """Signs with this process's private key (one per agent, one for the coordinator)."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key = key.public_key()

    @classmethod
    def from_file(cls, path: str | Path) -> Signer:
        return cls(load_private_key(path))

    def sign(self, digest: bytes, proto: int = PROTOCOL_VERSION) -> bytes:
        """The signature of a message of protocol version `proto` whose digest is `digest`."""
        return self._key.sign(DOMAINS[proto] + digest)


class KeyRing:
    """Sender id -> public key: whose signatures a receiver accepts."""

    def __init__(self, keys: dict[str, Ed25519PublicKey]) -> None:
        self.keys = dict(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, sender: str) -> bool:
        return sender in self.keys

    def verify(self, sender: str, digest: bytes, signature: bytes,
               proto: int = PROTOCOL_VERSION) -> bool:
        """False also for an unknown sender (callers check `in` first to say which)."""
        key = self.keys.get(sender)
        if key is None:
            return False
        try:
            key.verify(signature, DOMAINS[proto] + digest)
        except InvalidSignature:
            return False
        return True

    @classmethod
    def from_file(cls, path: str | Path) -> KeyRing:
        """The YAML key list (module docstring)."""
        try:
            data = yaml.safe_load(_read(path, "key list"))
        except yaml.YAMLError as exc:
            raise KeyFileError(f"key list {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict) or not data:
            raise KeyFileError(f"key list {path} must map ids to public keys")
        keys = {}
        for sender, text in data.items():
            if not isinstance(sender, str) or not valid_id(sender):
                raise KeyFileError(f"key list {path}: {sender!r} is not a valid id")
            if not isinstance(text, str):
                raise KeyFileError(f"key list {path}: the key of {sender} is not a string")
            keys[sender] = parse_public_key(text, f"key list {path}, {sender}")
        return cls(keys)

    @classmethod
    def coordinator(cls, path: str | Path) -> KeyRing:
        """What an agent trusts: the coordinator's public key file, nothing else."""
        return cls({COORDINATOR_ID: load_public_key(path)})


def write_key_pair(name: str, folder: str | Path, force: bool = False) -> tuple[Path, Path]:
    """<folder>/<name>.key (private, mode 0600) and <folder>/<name>.pub."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    if not force and (private.exists() or public.exists()):
        raise KeyFileError(f"{private} or {public} exists (--force replaces them)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    private.unlink(missing_ok=True)
    # created 0600 rather than chmod-ed after writing: never readable by others, even briefly
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public.write_text(public_pem(key.public_key()))
    return private, public


def add_to_key_list(path: str | Path, name: str, key: Ed25519PublicKey) -> None:
    """Add or replace one entry of a YAML key list (base64 form: one line per agent)."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) if path.exists() else None
    data = data if isinstance(data, dict) else {}
    data[name] = public_b64(key)
    path.write_text(yaml.safe_dump(data, sort_keys=True))


def keygen_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="fl-keygen",
        description="Write an Ed25519 key pair for signed fleetfl messages: <dir>/<id>.key "
                    "(private, PKCS#8 PEM, mode 0600) and <dir>/<id>.pub (PEM), the formats "
                    "of `openssl genpkey -algorithm ed25519`.",
        epilog="Example: fl-keygen pi01 --dir keys --key-list keys/agents.yaml; then give the "
               "agent signing_key: keys/pi01.key and the coordinator agent_keys: "
               "keys/agents.yaml.")
    add_version_flag(p)
    p.add_argument("id", help="agent id (or 'coordinator')")
    p.add_argument("--dir", default=".", help="folder for the key files (default: here)")
    p.add_argument("--key-list", dest="key_list",
                   help="also add the public key to this YAML key list (created if missing)")
    p.add_argument("--force", action="store_true", help="replace existing key files")
    args = p.parse_args(argv)
    if not valid_id(args.id):
        p.error(f"{args.id!r}: use {ID_RULE}")
    try:
        private, public = write_key_pair(args.id, args.dir, args.force)
        if args.key_list:
            add_to_key_list(args.key_list, args.id, load_public_key(public))
    except (KeyFileError, OSError, yaml.YAMLError) as exc:
        print(f"fl-keygen: error: {exc}", file=sys.stderr)
        return 2
    print(f"{private}\n{public}")
    return 0


if __name__ == "__main__":
    sys.exit(keygen_main())


def add_signing_flags(parser: argparse.ArgumentParser, sender: str, verify_flag: str,
                      verify_help: str) -> None:
    """The signing flags of fl-agent and fl-coordinator: own key, what to verify against
    (`verify_flag`, the side's own), and the age limit that goes with it."""
    parser.add_argument("--signing-key", dest="signing_key",
                        help=f"sign what {sender} sends with this Ed25519 private key (PEM)")
    parser.add_argument(verify_flag, dest=verify_flag[2:].replace("-", "_"), help=verify_help)
    parser.add_argument("--max-message-age", dest="max_message_age", type=float,
                        help=f"with {verify_flag}: refuse messages older than this "
                             "(s, default 300)")
