"""Optional API keys for `qks-serve`.

Keys come from files (one key a line; blank lines and `#` comments skipped) or the environment
(`QKS_SERVE_API_KEYS`, `QKS_SERVE_ADMIN_KEYS`: comma-separated). A request names its key in the
`X-API-Key` header (or `Authorization: Bearer KEY`). With no keys configured everything is open (the
server binds 127.0.0.1 unless told otherwise). With keys, tagging and listing labels need any key
and `PUT /v1/labels/{bank}` needs an admin key. Keys are compared in constant time, against every
configured key, and are never logged or echoed.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

HEADER = "X-API-Key"
ENV_KEYS, ENV_ADMIN_KEYS = "QKS_SERVE_API_KEYS", "QKS_SERVE_ADMIN_KEYS"


class KeyFileError(ValueError):
    """A key file that cannot be used; one line (never the keys)."""


def read_keys(path: str | Path | None, env: str) -> frozenset[bytes]:
    keys: list[str] = []
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise KeyFileError(f"cannot read the key file {path}: {getattr(e, 'strerror', None) or type(e).__name__}") \
                from None
        keys += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if not keys:
            raise KeyFileError(f"the key file {path} holds no keys")
    keys += [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]
    return frozenset(k.encode("utf-8") for k in keys)


@dataclass(frozen=True)
class Keys:
    user: frozenset[bytes] = frozenset()
    admin: frozenset[bytes] = frozenset()

    @property
    def enabled(self) -> bool:
        return bool(self.user or self.admin)

    @staticmethod
    def _match(given: bytes, keys: frozenset[bytes]) -> bool:
        found = False
        for k in keys:  # every key is compared: the time does not tell which one matched
            found |= hmac.compare_digest(given, k)
        return found

    def check(self, headers, admin: bool = False) -> tuple[int, str] | None:
        """None when the request may go on, else (401 or 403, reason)."""
        if not self.enabled:
            return None
        given = headers.get(HEADER)
        if given is None:
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        if not given:
            return 401, f"an API key is required (header {HEADER})"
        given_b = given.encode("utf-8", "surrogateescape")
        is_admin = self._match(given_b, self.admin)
        if not (is_admin or self._match(given_b, self.user)):
            return 401, "the API key is not valid"
        if admin and not is_admin:
            return 403, "changing label banks needs an admin key"
        return None
