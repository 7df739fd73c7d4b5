"""Reading a JSON Lines probe file: one object per line; errors name the file and the line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


class ProbeFileError(ValueError):
    pass


def read_probe_file(path: str | Path) -> list[tuple[str, object]]:
    """``(where, object)`` for every non-blank line, ``where`` being ``file:line``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (as some Windows editors write) is skipped
    except FileNotFoundError:
        raise ProbeFileError(f"probe file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ProbeFileError(f"probe file {path} is unreadable: {getattr(error, 'strerror', None) or error}") from None
    probes = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            probes.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise ProbeFileError(f"{path}:{number}: malformed JSON ({error.msg} at column {error.colno})") from None
    if not probes:
        raise ProbeFileError(f"probe file {path} has no probes")
    return probes


def probe_set_hash(probes: list[dict]) -> str:
    """sha256 (16 hex) of the probes as run, in order, as canonical JSON."""
    digest = hashlib.sha256()
    for probe in probes:
        digest.update(json.dumps(probe, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]
