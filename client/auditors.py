"""The participant's trust store: the auditor keys whose attestations the client accepts.

    default   the project's release key, shipped in the package (client/trust/
              release-key.pub.json; absent in a checkout without it: the default is empty)
    added     <home>/trust/<keyid16>.json, one PublicKey file each (`trust add FILE`)
    removed   <home>/trust/removed.txt: default keys the participant removed, one key id a
              line (`trust remove KEYID`); remembered, so an update does not bring them back

Only a key in this store can vouch for a model: the collector cannot add one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from client.home import PRIVATE_DIR_MODE, Home, write_private
from protocol.attestation import PublicKey
from protocol.errors import InvalidInputError

RELEASE_KEY_FILE = Path(__file__).resolve().parent / "trust" / "release-key.pub.json"
# the files of the default store (tests replace it: they never use the release private key)
DEFAULT_KEY_FILES: tuple[Path, ...] = (RELEASE_KEY_FILE,)
REMOVED_FILE = "removed.txt"
MIN_PREFIX = 4  # hex digits of a key id that `trust remove` needs at least
MAX_TRUSTED_KEYS = 256


@dataclass(frozen=True)
class Entry:
    key: PublicKey
    default: bool  # shipped with the client
    added: bool    # added by the participant


def default_keys() -> dict[str, PublicKey]:
    """The shipped default keys (none when the package holds no release key file)."""
    out: dict[str, PublicKey] = {}
    for path in DEFAULT_KEY_FILES:
        if path.is_file():
            key = PublicKey.load(path)
            out[key.keyid] = key
    return out


class TrustStore:
    def __init__(self, home: Home) -> None:
        self.home = home
        self.dir = home.trust_dir

    def added(self) -> dict[str, PublicKey]:
        out: dict[str, PublicKey] = {}
        if not self.dir.is_dir():
            return out
        for path in sorted(self.dir.glob("*.json"))[:MAX_TRUSTED_KEYS]:
            key = PublicKey.load(path)  # a damaged file is refused in one line naming it
            out[key.keyid] = key
        return out

    def removed(self) -> set[str]:
        path = self.dir / REMOVED_FILE
        try:
            lines = path.read_text().split()
        except FileNotFoundError:
            return set()
        except OSError as exc:
            raise InvalidInputError(f"{path}: cannot read ({exc.strerror or exc})") from None
        return {line.strip().lower() for line in lines if line.strip()}

    def entries(self) -> list[Entry]:
        """Every trusted key: defaults not removed, then added ones."""
        defaults = {k: v for k, v in default_keys().items() if k not in self.removed()}
        added = self.added()
        keyids = list(defaults) + [k for k in added if k not in defaults]
        return [Entry(added.get(k) or defaults[k], k in defaults, k in added) for k in keyids]

    def trusted(self) -> dict[str, PublicKey]:
        """keyid → key: what protocol.attestation.verify accepts."""
        return {e.key.keyid: e.key for e in self.entries()}

    def add(self, path: str | Path) -> PublicKey:
        key = PublicKey.load(path)
        self._mkdir()
        write_private(self.dir / f"{key.keyid[:16]}.json", key.to_json().encode())
        removed = self.removed()
        if key.keyid in removed:  # adding a removed default key back
            self._save_removed(removed - {key.keyid})
        return key

    def remove(self, prefix: str) -> Entry:
        """Remove the one trusted key whose id starts with `prefix`."""
        prefix = prefix.strip().lower()
        if len(prefix) < MIN_PREFIX or any(c not in "0123456789abcdef" for c in prefix):
            raise InvalidInputError(f"trust remove {prefix!r}: give at least {MIN_PREFIX} hex digits of a key id "
                                    "(`pric-client trust list` shows them)")
        hits = [e for e in self.entries() if e.key.keyid.startswith(prefix)]
        if not hits:
            raise InvalidInputError(f"trust remove {prefix}: no trusted key has an id starting so")
        if len(hits) > 1:
            raise InvalidInputError(f"trust remove {prefix}: {len(hits)} trusted keys have ids starting so; "
                                    "give more digits")
        entry = hits[0]
        if entry.added:
            for path in self.dir.glob("*.json"):
                try:
                    if PublicKey.load(path).keyid == entry.key.keyid:
                        path.unlink()
                except InvalidInputError:
                    continue
        if entry.default:
            self._save_removed(self.removed() | {entry.key.keyid})
        return entry

    def _mkdir(self) -> None:
        self.home.ensure()
        self.dir.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)

    def _save_removed(self, keyids: set[str]) -> None:
        self._mkdir()
        write_private(self.dir / REMOVED_FILE, "".join(f"{k}\n" for k in sorted(keyids)).encode())

