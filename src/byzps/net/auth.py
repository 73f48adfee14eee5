"""Worker authentication and per-message integrity. Pure: no I/O beyond reading a key file.

Each worker id has its own 32-byte secret key. The PS holds every key; a worker's machine
needs only its own. A connection authenticates by challenge-response, then every frame in
either direction carries a 32-byte MAC trailer:

1. worker -> PS  ``HELLO(worker_id, client_nonce)``   (32 fresh random bytes, hex)
2. PS -> worker  ``CHALLENGE(server_nonce)``          (32 fresh random bytes, hex)
3. worker -> PS  ``AUTH(tag)``, ``tag = BLAKE2b-256(key=k_w, person="byzps-auth",
   id || client_nonce || server_nonce)``; the PS compares in constant time.
4. Both derive ``session = BLAKE2b-256(key=k_w, person="byzps-session", id || cn || sn)``.
   From then on each frame carries ``MAC = BLAKE2b-256(key=session, direction || seq || frame)``
   where direction is ``P`` (PS -> worker) or ``W``, and seq counts that direction's frames
   from 0. The first MAC'd frame from the PS proves that the PS knows k_w (mutual).

Because the session key is fresh per connection and the MAC covers the direction, a sequence
number and the whole frame (whose header holds round and worker id), a message cannot be forged,
replayed, reordered, reflected back, or moved to another round or connection.
Keyed BLAKE2b is a MAC by design (Aumasson et al. 2013, RFC 7693 section 2.9).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Union

import yaml

from byzps.safeio import MAX_SECRETS_BYTES, FileRefused, first_line, load_yaml, read_text, shorten

KEY_BYTES = 32
NONCE_BYTES = 32
MAC_BYTES = 32
ENV_SECRETS = "BYZPS_SECRETS"

Buffer = Union[bytes, bytearray, memoryview]

log = logging.getLogger(__name__)


class AuthError(ValueError):
    """Authentication or integrity failure; the message says what failed (never the key)."""


def _b2(key: bytes, person: bytes, *parts: Buffer) -> bytes:
    h = hashlib.blake2b(key=key, person=person, digest_size=MAC_BYTES)
    for p in parts:
        h.update(p)
    return h.digest()


def new_nonce() -> bytes:
    """32 bytes from the OS CSPRNG."""
    return secrets.token_bytes(NONCE_BYTES)


def auth_tag(key: bytes, worker_id: int, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """The worker's 32-byte response to the PS's challenge (see module docstring, step 3)."""
    return _b2(key, b"byzps-auth", struct.pack("<Q", worker_id), client_nonce, server_nonce)


def check_tag(key: bytes, worker_id: int, client_nonce: bytes, server_nonce: bytes,
              tag: bytes) -> None:
    """Verify a response in constant time.

    Raises:
        AuthError: the tag does not match.
    """
    if not hmac.compare_digest(auth_tag(key, worker_id, client_nonce, server_nonce), tag):
        raise AuthError(f"authentication failed for worker {worker_id}: wrong key")


class MacSession:
    """Per-connection MAC state: the session key and one sequence counter per direction.

    Args:
        key: the worker's 32-byte key.
        worker_id: the worker's id.
        client_nonce, server_nonce: the two 32-byte nonces of this connection.
        is_server: True at the PS (sends direction ``P``, receives ``W``), False at a worker.
    """

    def __init__(self, key: bytes, worker_id: int, client_nonce: bytes, server_nonce: bytes,
                 is_server: bool):
        self._key = _b2(key, b"byzps-session", struct.pack("<Q", worker_id), client_nonce,
                        server_nonce)
        self._send_dir, self._recv_dir = (b"P", b"W") if is_server else (b"W", b"P")
        self.send_seq = 0
        self.recv_seq = 0

    def _mac(self, direction: bytes, seq: int, parts: Iterable[Buffer]) -> bytes:
        return _b2(self._key, b"byzps-frame", direction, struct.pack("<Q", seq), *parts)

    def seal(self, parts: Iterable[Buffer]) -> bytes:
        """MAC trailer (32 bytes) for the next outgoing frame made of ``parts``."""
        tag = self._mac(self._send_dir, self.send_seq, parts)
        self.send_seq += 1
        return tag

    def verify(self, parts: Iterable[Buffer], tag: Buffer) -> None:
        """Check the MAC of the next incoming frame.

        Raises:
            AuthError: forged, altered, replayed, reordered or reflected frame.
        """
        want = self._mac(self._recv_dir, self.recv_seq, parts)
        if not hmac.compare_digest(want, bytes(tag)):
            raise AuthError(f"bad MAC on incoming frame #{self.recv_seq} (forged, altered, "
                            f"replayed or out of order)")
        self.recv_seq += 1


# ---------------------------------------------------------------------------------------------
# Key files


def generate_keys(worker_ids: Iterable[int]) -> dict[int, bytes]:
    """A fresh random 32-byte key for each worker id."""
    return {int(w): secrets.token_bytes(KEY_BYTES) for w in worker_ids}


def write_keys(path: Union[str, Path], keys: dict[int, bytes]) -> None:
    """Write ``keys`` as YAML ``{keys: {id: hex}}`` readable by the owner only (mode 0600).

    Raises:
        OSError: the file cannot be written.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(keys_text(keys))


def keys_text(keys: dict[int, bytes]) -> str:
    """The text of a key file holding ``keys`` (worker id -> 32-byte key), as
    :func:`write_keys` writes it and :func:`load_keys` reads it."""
    body = yaml.safe_dump({"keys": {int(w): k.hex() for w, k in sorted(keys.items())}})
    return "# byzps worker keys: keep secret. The PS needs all; a worker only its own.\n" + body


def load_keys(path: Union[str, Path]) -> dict[int, bytes]:
    """Read a key file written by :func:`write_keys` (YAML or JSON).

    The file must be a regular file of at most :data:`byzps.safeio.MAX_SECRETS_BYTES` bytes
    (checked before reading); YAML aliases are refused (:class:`byzps.safeio.NoAliasLoader`).

    Returns:
        worker id -> 32-byte key.

    Raises:
        AuthError: unreadable file, not a regular file, too large, not YAML/JSON, wrong layout,
            an id that is not a non-negative integer, or a key that is not 64 hex characters;
            the message names the file and the entry (never the key, and no value longer than
            :data:`byzps.safeio.ECHO_CHARS` characters).
    """
    p = Path(path)
    try:
        if p.stat().st_mode & 0o077:
            log.warning("secrets file %s is readable by other users; chmod 600 it", p)
        text = read_text(p, MAX_SECRETS_BYTES, "secrets file")
        data = json.loads(text) if p.suffix == ".json" else load_yaml(text)
    except FileRefused as e:
        raise AuthError(str(e)) from None
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError, RecursionError) as e:
        raise AuthError(f"secrets file {p}: cannot read it: {first_line(e)}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), dict):
        raise AuthError(f"secrets file {p}: expected a mapping 'keys: {{worker id: hex key}}'")
    keys = {}
    for wid, hexkey in data["keys"].items():
        if not ((isinstance(wid, int) and not isinstance(wid, bool) and wid >= 0)
                or (isinstance(wid, str) and len(wid) <= 20 and wid.isdigit())):
            raise AuthError(f"secrets file {p}: worker id {shorten(wid)} is not a non-negative "
                            f"integer")
        if not isinstance(hexkey, str) or len(hexkey) != 2 * KEY_BYTES:
            raise AuthError(f"secrets file {p}: key of worker {shorten(wid)} must be "
                            f"{2 * KEY_BYTES} hex characters")
        try:
            keys[int(wid)] = bytes.fromhex(hexkey)
        except ValueError:
            raise AuthError(f"secrets file {p}: key of worker {shorten(wid)} is not hex") \
                from None
    return keys


def secrets_path(configured: Union[str, None]) -> Union[str, None]:
    """The key file to use: ``$BYZPS_SECRETS`` if set, else the config's ``server.secrets_file``."""
    return os.environ.get(ENV_SECRETS) or configured
