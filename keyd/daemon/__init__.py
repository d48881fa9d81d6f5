"""keyd, the daemon: udev hot-plug, a pure per-volume state machine, systemd and D-Bus glue.

Layout: :mod:`~keyd.daemon.machine` (pure transitions), :mod:`~keyd.daemon.uevents`
(pure edge translation), :mod:`~keyd.daemon.backoff` (pure per-stick backoff),
(the daemon's policy keys are in keyd.toml: :mod:`keyd.config.daemon`), :mod:`~keyd.daemon.core`
(dispatches events, keeps states), :mod:`~keyd.daemon.actions` (carries effects out),
:mod:`~keyd.daemon.main` (the GLib loop), :mod:`~keyd.daemon.dbus_api` and
:mod:`~keyd.daemon.client` (the D-Bus interface and its client).
"""
