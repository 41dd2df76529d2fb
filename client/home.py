"""The client's per-user folder (`--home`, env PRIC_CLIENT_HOME, else a platformdirs
config folder) and the participant config stored in it.

    <home>/config.json      server URL, participant id, token   (mode 0600)
    <home>/journal.sqlite   acknowledged uploads                  (mode 0600)
    <home>/keys.sqlite      ambiguation keys                      (mode 0600)
    <home>/item-key         secret of this participant's item ids (mode 0600)
    <home>/trust/           auditor public keys you added (<keyid16>.json), removed.txt
    <home>/policy.json      your privacy policy (only ever tighter than the defaults)
    <home>/consent.json     models you agreed to upload features of (mode 0600)
    <home>/models/<model_id>/  cached model card + ONNX files + verified attestations
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from protocol.errors import InvalidInputError

ENV_HOME = "PRIC_CLIENT_HOME"
APP_NAME = "pric-client"
CONFIG_FILE = "config.json"
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
ITEM_KEY_BYTES = 32


def default_home() -> Path:
    """$PRIC_CLIENT_HOME, else the per-user config folder of the platform."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically with mode 0600 (never briefly world-readable)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.chmod(tmp, PRIVATE_FILE_MODE)
    os.replace(tmp, path)


def touch_private(path: Path) -> None:
    """Create `path` empty with mode 0600 if missing, and force 0600 if it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE_MODE)
    os.close(fd)
    os.chmod(path, PRIVATE_FILE_MODE)


@dataclass(frozen=True)
class ParticipantConfig:
    server: str
    participant_id: str
    token: str
    # chosen at register and used by every later command: plain http:// to a host that is
    # not loopback was allowed (--insecure); the PEM file of a private CA (--ca-bundle)
    insecure: bool = False
    ca_bundle: str | None = None

    def __repr__(self) -> str:  # never print the token
        return (f"ParticipantConfig(server={self.server!r}, participant_id={self.participant_id!r}, token=<hidden>, "
                f"insecure={self.insecure!r}, ca_bundle={self.ca_bundle!r})")


class Home:
    """Paths and private files under the client's home folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def ensure(self) -> "Home":
        self.root.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
        return self

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def journal_path(self) -> Path:
        return self.root / "journal.sqlite"

    @property
    def keys_path(self) -> Path:
        return self.root / "keys.sqlite"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def item_key_path(self) -> Path:
        return self.root / "item-key"

    @property
    def trust_dir(self) -> Path:
        return self.root / "trust"

    @property
    def policy_path(self) -> Path:
        return self.root / "policy.json"

    @property
    def consent_path(self) -> Path:
        return self.root / "consent.json"

    def new_item_key(self) -> bytes:
        """A fresh secret for item ids (at register): ids made with it cannot be recomputed
        from a photo by anyone else, nor linked to ids made by another registration."""
        self.ensure()
        key = secrets.token_bytes(ITEM_KEY_BYTES)
        write_private(self.item_key_path, key.hex().encode() + b"\n")
        return key

    def item_key(self) -> bytes:
        """This home's item-id secret; created on first use for a home registered before
        item ids were keyed (or one that only transforms). A damaged file is refused, never
        replaced: a new secret would give every photo a new id, and the collector would
        store photos already uploaded a second time."""
        path = self.item_key_path
        if not path.exists():
            return self.new_item_key()
        try:
            if os.name == "posix" and path.stat().st_mode & 0o077:
                os.chmod(path, PRIVATE_FILE_MODE)
            key = bytes.fromhex(path.read_text().strip())
        except (OSError, ValueError):
            key = b""
        if len(key) != ITEM_KEY_BYTES:
            raise InvalidInputError(f"{path}: the item-id secret is damaged ({ITEM_KEY_BYTES} bytes in hex expected); "
                                    "restore it from a backup, or register again with --force")
        return key

    def model_dir(self, model_id: str) -> Path:
        # model ids are `name@version` without '/', checked by ModelCard.validate
        return self.models_dir / model_id

    def save_config(self, config: ParticipantConfig) -> Path:
        self.ensure()
        write_private(self.config_path, (json.dumps(asdict(config), indent=2) + "\n").encode())
        return self.config_path

    def load_config(self) -> ParticipantConfig:
        path = self.config_path
        if not path.is_file():
            raise InvalidInputError(
                f"{path}: not registered yet; run `pric-client --home {self.root} register --server URL` first"
            )
        try:
            d = json.loads(path.read_text())
            ca_bundle = d.get("ca_bundle")
            return ParticipantConfig(server=str(d["server"]), participant_id=str(d["participant_id"]), token=str(d["token"]),
                                     insecure=d.get("insecure") is True,
                                     ca_bundle=str(ca_bundle) if ca_bundle is not None else None)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise InvalidInputError(f"{path}: config is damaged; register again with --force") from None

    def has_config(self) -> bool:
        return self.config_path.is_file()


def open_private_sqlite(path: Path, schema: str) -> "sqlite3.Connection":
    """Open (creating with mode 0600) a SQLite file in WAL mode with synchronous=FULL, so a
    committed transaction survives a killed process; apply `schema`."""
    import sqlite3

    path.parent.mkdir(parents=True, exist_ok=True)
    touch_private(path)
    db = sqlite3.connect(path, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(schema)
    db.commit()
    for suffix in ("-wal", "-shm"):  # SQLite creates these with the umask's mode
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.chmod(PRIVATE_FILE_MODE)
    return db
