"""What keydctl's trust verbs (enroll, verify, revoke) share: dates and trust settings.

Trust settings come from ``--signer`` / ``--gnupghome`` flags or the
``[trust]`` table of ``--config`` (default /etc/keyd/keyd.toml; absent is
fine when flags say enough). ``--state-dir`` and ``--revocations`` let every
verb run without root against throwaway paths.
"""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime, time

from keyd.config import load_config
from keyd.config.model import DEFAULT_CONFIG, TrustConfig
from keyd.trust.settings import DEFAULT_STATE_DIR, TrustSettings


def parse_date(text: str) -> datetime:
    """``YYYY-MM-DD`` (midnight UTC) or ISO 8601; a time without offset is taken as UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date (use 2027-01-31 or 2027-01-31T12:00:00+01:00)") from None
    if len(text) == 10:
        moment = datetime.combine(moment.date(), time(), UTC)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def settings_from_args(args: argparse.Namespace) -> TrustSettings:
    """TrustSettings from the config's [trust] table, overridden by flags.

    Without --config, a missing default config file means "no config": flags alone suffice.
    """
    path = args.config or DEFAULT_CONFIG
    trust = load_config(path).trust if args.config or os.path.exists(path) else TrustConfig()
    return TrustSettings(
        signers=trust.signers + tuple(args.signer), gnupghome=args.gnupghome or trust.gnupghome,
        revocations_file=args.revocations or trust.revocations,
        state_dir=args.state_dir or DEFAULT_STATE_DIR, source=path)
