"""README keeps up with the code: every setting the service reads is in its settings table."""

import re
from pathlib import Path

from service.config import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def documented_settings() -> set[str]:
    """The UGA_* names in the first cell of the settings table's rows (a row may name several)."""
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `UGA_")]
    return {name for row in rows for name in re.findall(r"UGA_[A-Z0-9_]+", row.split("|")[1])}


def test_every_setting_is_in_the_readmes_settings_table():
    read = {f"UGA_{name.upper()}" for name in Settings.model_fields}
    missing = read - documented_settings()
    assert not missing, f"add these settings to README's Settings table: {sorted(missing)}"
