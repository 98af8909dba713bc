"""MMATS_CONFIG and the [database] table: every mistake is one line naming the file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from db.config import ConfigError, load_settings

REPO = Path(__file__).resolve().parent.parent


def settings_error(tmp_path: Path, content: bytes | None) -> str:
    path = tmp_path / "mmats.toml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_settings({"MMATS_CONFIG": str(path if content is not None else tmp_path)})
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("content,says", [
    (b'[database]\nhome = "caf\xe9"\n', "mmats.toml: not UTF-8 text (byte b'\\xe9' at offset 22)"),
    (b'[database]\nhomee = "x"\n',
     "mmats.toml: unknown key 'homee' in [database] (known: home, url)"),
    (b'[database]\nhome = "x"\nport = 5\nuser = "u"\n',
     "unknown key 'port', 'user' in [database]"),
    (b"[database\n", "mmats.toml: invalid TOML: "),
])
def test_bad_config_files_are_one_line(tmp_path, content, says):
    assert says in settings_error(tmp_path, content)


def test_a_folder_is_not_a_config_file(tmp_path):
    assert settings_error(tmp_path, None) == (
        f"MMATS_CONFIG names {tmp_path}, which is a folder, not a TOML file")


def test_the_known_keys_still_work(tmp_path):
    path = tmp_path / "mmats.toml"
    path.write_text(f'[database]\nhome = "{tmp_path / "home"}"\n'
                    'url = "postgresql://u@h/db"\n[other]\nx = 1\n')
    settings = load_settings({"MMATS_CONFIG": str(path)})
    assert settings.home == tmp_path / "home" and settings.database_url == "postgresql://u@h/db"


def test_cli_reports_a_non_utf8_config_in_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b'[database]\nhome = "\xff"\n')
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MMATS_")},
           "MMATS_CONFIG": str(path)}
    result = subprocess.run([sys.executable, "-c", "from api.cli import main; main()", "db",
                             "url"], env=env, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL, cwd=REPO)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {path}: not UTF-8 text (byte b'\\xff' at offset 19): a TOML file is UTF-8"]
