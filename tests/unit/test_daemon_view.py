"""keyd's view in the run directory: written on every change, believed only while keyd runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from keyd.daemon_view import STATE_FILE, StateFile, read_view
from keyd.engine.assess import LayerStatus
from keyd.engine.status import VolumeReport, render_table, to_json


def test_what_keyd_says_is_read_back_while_it_runs(tmp_path: Path) -> None:
    view = StateFile(str(tmp_path), ["tank", "vault"])
    view.state_changed("vault", "waiting-for-key", "waiting for 1 more stick (1 of 2 shares)")
    assert read_view(str(tmp_path)) == {
        "tank": ("locked", ""), "vault": ("waiting-for-key",
                                          "waiting for 1 more stick (1 of 2 shares)")}
    assert oct((tmp_path / STATE_FILE).stat().st_mode & 0o777) == "0o644"
    view.remove()
    assert read_view(str(tmp_path)) == {}


def test_a_file_left_by_a_keyd_that_is_gone_is_ignored(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout
    StateFile(str(tmp_path), ["tank"], pid=int(gone))
    assert read_view(str(tmp_path)) == {}
    (tmp_path / STATE_FILE).write_text("{not json")
    assert read_view(str(tmp_path)) == {}
    (tmp_path / STATE_FILE).write_text(json.dumps({"pid": os.getpid(), "volumes": []}))
    assert read_view(str(tmp_path)) == {}


def test_status_shows_keyds_state_under_the_layers() -> None:
    report = VolumeReport("vault", "locked", (LayerStatus("crypt", "crypt"),), ())
    daemon = {"vault": ("waiting-for-key", "waiting for 1 more stick (1 of 2 shares)")}
    table = render_table([report], daemon)
    assert table.splitlines()[-1].split() == ["(keyd)", "daemon", "waiting-for-key", "-",
                                              "waiting", "for", "1", "more", "stick", "(1",
                                              "of", "2", "shares)"]
    assert to_json([report], daemon)["volumes"][0]["daemon"] == {
        "state": "waiting-for-key", "detail": "waiting for 1 more stick (1 of 2 shares)"}
    assert to_json([report])["volumes"][0]["daemon"] is None
