"""The audit's event types and their journald MESSAGE_IDs (fixed forever, one per type).

The ids were generated once with ``uuid.uuid4().hex``; systemd/keyd.catalog
explains each one. Never change or reuse an id: admins filter on them
(``journalctl MESSAGE_ID=...``).
"""

from __future__ import annotations

import enum


class AuditEvent(enum.StrEnum):
    """One kind of audited decision."""

    DAEMON_STARTED = "daemon-started"
    RECONCILED = "reconciled"
    STICK_INSERTED = "stick-inserted"
    STICK_REMOVED = "stick-removed"
    BUNDLE_ACCEPTED = "bundle-accepted"
    BUNDLE_REJECTED = "bundle-rejected"
    BACKOFF = "backoff"
    UNLOCK_STARTED = "unlock-started"
    UNLOCK_FINISHED = "unlock-finished"
    UNLOCK_FAILED = "unlock-failed"
    DEGRADED = "degraded"
    MENDED = "mended"
    KEY_TIMEOUT = "key-timeout"
    PASSPHRASE_FALLBACK = "passphrase-fallback"  # noqa: S105 (an event name)
    GRACE_STARTED = "grace-started"
    LOCK_STARTED = "lock-started"
    LOCK_FINISHED = "lock-finished"
    LOCK_BUSY = "lock-busy"
    LOCK_FAILED = "lock-failed"
    SERVICES_FAILED = "services-failed"
    DBUS_DENIED = "dbus-denied"
    STATE_NOT_SAVED = "state-not-saved"
    SHARE_ACCEPTED = "share-accepted"
    SHARES_COMBINED = "shares-combined"
    SHARES_EXPIRED = "shares-expired"
    REVOCATIONS_NEAR_CAP = "revocations-near-cap"


MESSAGE_IDS: dict[AuditEvent, str] = {
    AuditEvent.DAEMON_STARTED: "cb2743a0561c4649917dec5b684fa186",
    AuditEvent.RECONCILED: "004b2d6568a342d2a279c1a49a8174a5",
    AuditEvent.STICK_INSERTED: "03e97cc9a22e4eb4bad1e65773c647f3",
    AuditEvent.STICK_REMOVED: "5c56b110b7644c84aaa4957bb1ee98e7",
    AuditEvent.BUNDLE_ACCEPTED: "02de5ddcfa8048108da02d2c5bd3fb56",
    AuditEvent.BUNDLE_REJECTED: "3ce6bf53828f41949d1ed09abdc922b8",
    AuditEvent.BACKOFF: "45b84f7ddef54785a1a3325c41b64bac",
    AuditEvent.UNLOCK_STARTED: "5041700ff81c4c349f6cca19ad507dd5",
    AuditEvent.UNLOCK_FINISHED: "188528fdf40f4e5c9d8714031fb16725",
    AuditEvent.UNLOCK_FAILED: "895d0b57a998446599e9cab2566e8d1c",
    AuditEvent.DEGRADED: "44096c167a38423fbdcc295883a13ef0",
    AuditEvent.MENDED: "842cf9855a8049a892322874da82bd80",
    AuditEvent.KEY_TIMEOUT: "aa60d9943d934fe8a46f40ff34954742",
    AuditEvent.PASSPHRASE_FALLBACK: "3636abbe5df44576a9666aecfd892b96",
    AuditEvent.GRACE_STARTED: "3881fe96c1b841c18c0cb2321b0511e2",
    AuditEvent.LOCK_STARTED: "40a014332a214026acd3d0ec6a92d0e9",
    AuditEvent.LOCK_FINISHED: "7443c20eae16497b9fe68447ecb1fd55",
    AuditEvent.LOCK_BUSY: "96dd5b5025d54d3885f51cfbe8324bee",
    AuditEvent.LOCK_FAILED: "8d56af1f57054fe598353ae3194b0a6d",
    AuditEvent.SERVICES_FAILED: "8bf859282432479295d51cebc7719615",
    AuditEvent.DBUS_DENIED: "a468564e8a6a49148e3585a5950f913c",
    AuditEvent.STATE_NOT_SAVED: "f32570e8a31247309c0ea5956f8da53b",
    AuditEvent.SHARE_ACCEPTED: "4279542f70644d619b710a2248121e70",
    AuditEvent.SHARES_COMBINED: "46ba25194e8d4d9ea7bb8527b6e4abaa",
    AuditEvent.SHARES_EXPIRED: "7d932a10b4e64a7ca079a11a512a1953",
    AuditEvent.REVOCATIONS_NEAR_CAP: "d44c826b44604cd6820d6a5f9de5c55f",
}

EVENT_BY_ID: dict[str, AuditEvent] = {value: key for key, value in MESSAGE_IDS.items()}

SYSLOG_IDENTIFIER = "keyd"
