"""The names of keyd's D-Bus API, shared by the service (dbus_api) and its clients (client).

A module of its own that imports nothing, so that ``keydctl wait`` (keyd-wait@.service,
run at every boot) and the other D-Bus clients do not load the daemon to know them.
"""

from __future__ import annotations

BUS_NAME = "org.keyd.Keyd1"
OBJECT_PATH = "/org/keyd/Keyd1"
INTERFACE = "org.keyd.Keyd1.Manager"
API_VERSION = "1"
