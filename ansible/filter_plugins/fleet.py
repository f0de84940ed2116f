"""fleet_mosquitto_hash: a Mosquitto 2.x password-file hash ($7$: PBKDF2-HMAC-SHA512).

`mosquitto_passwd` draws a random salt on every run, so a password file it writes changes on
every apply. Deriving the salt from the password and the user name (both secret-backed: the
password is 32 random characters kept on the control node) gives the same line every time,
so the task is idempotent, and a changed password still changes the line.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

SALT_BYTES = 12  # what mosquitto_passwd uses


def fleet_mosquitto_hash(password: str, username: str, iterations: int = 1000) -> str:
    password, username = str(password), str(username)
    if not password:
        raise ValueError("fleet_mosquitto_hash: empty password")
    salt = hmac.new(password.encode(), b"fleetfl-mosquitto-salt:" + username.encode(),
                    hashlib.sha256).digest()[:SALT_BYTES]
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(iterations))
    b64 = base64.b64encode
    return f"$7${int(iterations)}${b64(salt).decode()}${b64(digest).decode()}"


class FilterModule:
    def filters(self):
        return {"fleet_mosquitto_hash": fleet_mosquitto_hash}
