"""Run in the guest: one keyd D-Bus call through keyd's own client; prints JSON {ok, result|error}.

usage: daemon_dbus_call.py unlock|lock|get VOLUME   (unlock reads the key from stdin)
Exit 0 whatever the daemon answered: the caller judges the JSON.
"""

from __future__ import annotations

import json
import sys

from keyd.daemon.client import connect


def main() -> int:
    """Make the call named on the command line."""
    verb, volume = sys.argv[1], sys.argv[2]
    client = connect()
    if client is None:
        print(json.dumps({"ok": False, "error": "NoDaemon", "message": "keyd is not on the bus"}))
        return 0
    try:
        if verb == "unlock":
            result: object = client.unlock_key(volume, sys.stdin.buffer.read())
        elif verb == "lock":
            result = client.lock(volume)
        else:
            result = client.get_volume(volume)
    except Exception as exc:  # report any refusal as data
        print(json.dumps({"ok": False, "error": type(exc).__name__, "message": str(exc)}))
        return 0
    print(json.dumps({"ok": True, "result": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
