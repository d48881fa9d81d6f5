"""keydctl's boundary: per-verb loading, errors as messages and exit codes, a closed pipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from keyd.cli import main
from tests import configs


def test_every_verb_is_registered_by_the_module_the_table_names() -> None:
    for verb, module in main.COMMANDS.items():
        parser = main.build_parser(verb)
        sub = next(a for a in parser._actions if a.dest == "command")
        assert verb in sub.choices, (verb, module)  # type: ignore[operator]


def test_help_lists_every_verb(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main.main(["--help"])
    out = capsys.readouterr().out
    assert all(verb in out for verb in main.COMMANDS)


def test_status_loads_neither_the_daemon_nor_gpg_modules() -> None:
    code = ("import sys; from keyd.cli import main; main.build_parser('status'); "
            "print(sorted(m for m in sys.modules if m.startswith(('keyd.daemon.', 'gnupg', 'gi')) "
            "or m == 'keyd.daemon'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_config_error_is_one_message_with_its_fix_and_exit_3(capsys: pytest.CaptureFixture[str]) -> None:
    assert main.main(["check-config", "--config", "/nonexistent/keyd.toml"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("keydctl: /nonexistent/keyd.toml") and "fix:" in err


@pytest.mark.parametrize("volumes", [1, 200])  # output left in the buffer at exit, or not
def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path: Path, volumes: int) -> None:
    config = tmp_path / "keyd.toml"
    config.write_text("".join(configs.layer(f"v{n}", "data", "mount", device=f"/dev/disk/by-label/v{n}",
                                            fstype="ext4", mountpoint=f"/srv/v{n}")
                              for n in range(volumes)))
    proc = subprocess.Popen([sys.executable, "-m", "keyd.cli.main", "check-config", "--config",
                             str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"})
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # like `| head -0`
    err = proc.stderr.read().decode()
    assert proc.wait() == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err
