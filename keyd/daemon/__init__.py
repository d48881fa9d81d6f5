"""keyd, the daemon: udev hot-plug, level-triggered reconciliation, systemd and D-Bus glue.

Layout: :mod:`~keyd.daemon.facts` (what keyd knows of each volume, and the state it
shows), :mod:`~keyd.daemon.reconcile` (pure: events update facts, the goal and the next
job are derived from them), :mod:`~keyd.daemon.uevents` (pure edge translation),
:mod:`~keyd.daemon.backoff` (pure per-stick backoff), :mod:`~keyd.daemon.core` (feeds
events in, carries effects out), :mod:`~keyd.daemon.workers` (the blocking jobs),
:mod:`~keyd.daemon.main` (the GLib loop), :mod:`~keyd.daemon.dbus_api` and
:mod:`~keyd.daemon.client` (the D-Bus interface and its client). The daemon's policy keys
are in keyd.toml (:mod:`keyd.config.daemon`).
"""
