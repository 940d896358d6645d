"""schemathesis hooks for hotline's relay: sign every /v1 request as a device would.

Loaded by scripts/contract.sh through SCHEMATHESIS_HOOKS. With HOTLINE_SIGN=1 each
request is signed, just before it is sent (so over the exact path, query and body that
go out), by a fresh Ed25519 key: every request comes from a new device, so the relay's
per-device rate limit never answers instead of the route under test. With
HOTLINE_SIGN=0 nothing is added (the relay must refuse with a problem document).
"""

import hashlib
import os
import time

import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

SIGN = os.environ.get("HOTLINE_SIGN") == "1"
_send = requests.Session.send


def _signed(session, request, **kwargs):
    if SIGN and request.path_url.startswith("/v1/"):
        key = Ed25519PrivateKey.generate()
        device = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
        body = request.body or b""
        if isinstance(body, str):
            body = body.encode()
        now = str(int(time.time() * 1000))
        content = hashlib.sha256(body).hexdigest()
        message = "\n".join(
            [
                "hotline-relay-request-v1",
                request.method,
                request.path_url,
                now,
                content,
            ]
        ).encode()
        request.headers["hotline-device"] = device
        request.headers["hotline-time"] = now
        request.headers["hotline-signature"] = key.sign(message).hex()
        request.headers["hotline-content-sha256"] = content
    return _send(session, request, **kwargs)


requests.Session.send = _signed
