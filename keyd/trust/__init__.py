"""Key sticks: signed key bundles, safe stick mounting, verification and enrollment.

Entry points: :class:`keyd.trust.stick_mount.StickMounter` (mount, read,
unmount), :class:`keyd.trust.verify.Verifier` (decide), :func:`keyd.trust.verify.commit`
(remember generations and revocations), :class:`keyd.trust.enroll.Enroller`.
"""
