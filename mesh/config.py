"""The agent's configuration: one frozen `AgentConfig`, loaded once at the edge.

Every setting has a default, so `helexa agent` runs with no configuration at all. Precedence, per key:
command-line flag > `HELEXA_*` environment variable > `helexa.toml` > default. The key table (names,
variables, flags, defaults) is the shared contract in the project notes; `helexa.toml` uses the same
key names at its top level.

`load_config(argv, environ)` takes the environment as a mapping so tests pass a plain dict. A bad value
raises `ConfigError` whose message names the key and where the value came from (flag, variable or
file); the agent prints it as one line and exits with status 2.

Relative paths in the config file resolve against that file's folder (a relative catalogue path
worked in tests and was empty under systemd); relative paths from flags or variables resolve against
the current directory.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NoReturn

from helexa.engine.gguf import DEFAULT_CACHE_MB as DEFAULT_GGUF_CACHE_MB
from helexa.mesh.timing import DEFAULT_DRAIN_TIMEOUT_S, HTTP_IDLE_TIMEOUT_S, MAX_CONNECTIONS

LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")

DEFAULT_CONFIG_PATH = Path("/etc/helexa/helexa.toml")
DEFAULT_PORT = 31313
DEFAULT_HOST = "0.0.0.0"
DEFAULT_MESH = "default"

FILE_KEYS = frozenset(
    {
        "name",
        "host",
        "port",
        "catalogue",
        "state_dir",
        "peers",
        "mesh",
        "mesh_key",
        "mdns",
        "advertise_address",
        "log_level",
        "drain_timeout_s",
        "api_keys",
        "hf_cache_dir",
        "gguf_cache_mb",
        "model_roots",
        "labels",
        "max_connections",
        "http_idle_timeout_s",
        "cors_origins",
    }
)


class ConfigError(Exception):
    """A bad configuration value; the message is one line naming the key and its source."""


@dataclass(frozen=True, kw_only=True, slots=True)
class AgentConfig:
    """Everything the agent reads from its configuration, resolved and validated.

    `catalogue_path` is None only when no catalogue was configured: the agent then uses
    `<state_dir>/models.toml`, created from the packaged default on first start (`catalogue_default`
    is True in that case). `advertise_address` None means "work it out from the interfaces".
    """

    name: str
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    state_dir: Path
    catalogue_path: Path
    catalogue_default: bool = True
    config_path: Path | None = None
    peers: tuple[str, ...] = ()
    mesh: str = DEFAULT_MESH
    mesh_key: str | None = None
    mdns: bool = True
    advertise_address: str | None = None
    log_level: LogLevel = "info"
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    api_keys: tuple[str, ...] = ()
    hf_cache_dir: Path | None = None
    # Bound of the cache of converted GGUF files (`<state_dir>/gguf`), in MB; LRU beyond it.
    gguf_cache_mb: int = DEFAULT_GGUF_CACHE_MB
    # Folders local model sources may be in, besides `<state_dir>/models` (`local_model_roots`).
    model_roots: tuple[Path, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    max_connections: int = MAX_CONNECTIONS
    http_idle_timeout_s: float = HTTP_IDLE_TIMEOUT_S
    # Browser origins allowed to call the API (CORS); empty = loopback origins only; "*" = any.
    cors_origins: tuple[str, ...] = ()

    @property
    def local_model_roots(self) -> tuple[Path, ...]:
        """Where a catalogue entry's local `source` may point (`catalogue.validate`): the state
        directory's `models` folder, then every configured `model_roots` folder."""
        return (self.state_dir / "models", *self.model_roots)

    def describe(self) -> dict[str, object]:
        """A loggable view with the secrets masked."""
        return {
            "name": self.name,
            "host": self.host,
            "port": self.port,
            "state_dir": str(self.state_dir),
            "catalogue": str(self.catalogue_path),
            "config": str(self.config_path) if self.config_path else None,
            "peers": list(self.peers),
            "mesh": self.mesh,
            "mesh_key": "***" if self.mesh_key else None,
            "mdns": self.mdns,
            "advertise_address": self.advertise_address,
            "log_level": self.log_level,
            "drain_timeout_s": self.drain_timeout_s,
            "api_keys": len(self.api_keys),
            "hf_cache_dir": str(self.hf_cache_dir) if self.hf_cache_dir else None,
            "gguf_cache_mb": self.gguf_cache_mb,
            "model_roots": [str(p) for p in self.local_model_roots],
            "labels": dict(self.labels),
            "max_connections": self.max_connections,
            "http_idle_timeout_s": self.http_idle_timeout_s,
        }


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so `main` decides how errors look."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(
        prog="helexa agent",
        description="Run this host's helexa agent (OpenAI-compatible HTTP for the whole mesh).",
        argument_default=None,
    )
    p.add_argument(
        "--config", metavar="FILE", help="helexa.toml (default /etc/helexa/helexa.toml if present)"
    )
    p.add_argument("--name", help="node name (default: the hostname)")
    p.add_argument("--host", help=f"bind address (default {DEFAULT_HOST})")
    p.add_argument("--port", help=f"API port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--catalogue", metavar="FILE", help="models.toml (default <state_dir>/models.toml)")
    p.add_argument("--state-dir", dest="state_dir", metavar="DIR", help="node id, catalogue, caches")
    p.add_argument(
        "--peer", dest="peers", action="append", metavar="HOST:PORT", help="static peer (repeatable)"
    )
    p.add_argument("--mesh", help=f"mesh name (default {DEFAULT_MESH!r})")
    p.add_argument("--mesh-key", dest="mesh_key", metavar="KEY", help="shared secret of the mesh")
    p.add_argument("--no-mdns", dest="mdns", action="store_const", const=False, help="disable mDNS discovery")
    p.add_argument("--advertise-address", dest="advertise_address", metavar="ADDR", help="address peers use")
    p.add_argument("--log-level", dest="log_level", choices=LOG_LEVELS, help="default info")
    p.add_argument("--drain-timeout", dest="drain_timeout_s", metavar="SECONDS", help="graceful drain bound")
    p.add_argument(
        "--api-key", dest="api_keys", action="append", metavar="KEY", help="client key (repeatable)"
    )
    p.add_argument(
        "--cors-origin",
        dest="cors_origins",
        action="append",
        metavar="ORIGIN",
        help="a browser origin allowed to call the API, e.g. https://chat.example (repeatable; * = any)",
    )
    p.add_argument(
        "--model-root",
        dest="model_roots",
        action="append",
        metavar="DIR",
        help="a folder local model sources may be in, besides <state_dir>/models (repeatable)",
    )
    p.add_argument(
        "--gguf-cache-mb",
        dest="gguf_cache_mb",
        metavar="MB",
        help=f"bound of the converted-GGUF cache in <state_dir>/gguf (default {DEFAULT_GGUF_CACHE_MB})",
    )
    p.add_argument(
        "--max-connections",
        dest="max_connections",
        metavar="N",
        help=f"client connections open at once (default {MAX_CONNECTIONS})",
    )
    p.add_argument(
        "--http-idle-timeout",
        dest="http_idle_timeout_s",
        metavar="SECONDS",
        help=f"close idle or slow-header connections after this (default {HTTP_IDLE_TIMEOUT_S:g})",
    )
    return p


# (key, environment variable) for keys settable in the environment.
_ENV: dict[str, str] = {
    "name": "HELEXA_NAME",
    "host": "HELEXA_HOST",
    "port": "HELEXA_PORT",
    "catalogue": "HELEXA_CATALOGUE",
    "state_dir": "HELEXA_STATE_DIR",
    "peers": "HELEXA_PEERS",
    "mesh": "HELEXA_MESH",
    "mesh_key": "HELEXA_MESH_KEY",
    "mdns": "HELEXA_MDNS",
    "advertise_address": "HELEXA_ADVERTISE_ADDRESS",
    "log_level": "HELEXA_LOG_LEVEL",
    "drain_timeout_s": "HELEXA_DRAIN_TIMEOUT_S",
    "api_keys": "HELEXA_API_KEYS",
    "hf_cache_dir": "HELEXA_HF_CACHE",
    "gguf_cache_mb": "HELEXA_GGUF_CACHE_MB",
    "model_roots": "HELEXA_MODEL_ROOTS",
    "max_connections": "HELEXA_MAX_CONNECTIONS",
    "http_idle_timeout_s": "HELEXA_HTTP_IDLE_TIMEOUT_S",
    "cors_origins": "HELEXA_CORS_ORIGINS",
}

_FLAG: dict[str, str] = {
    "name": "--name",
    "host": "--host",
    "port": "--port",
    "catalogue": "--catalogue",
    "state_dir": "--state-dir",
    "peers": "--peer",
    "mesh": "--mesh",
    "mesh_key": "--mesh-key",
    "mdns": "--no-mdns",
    "advertise_address": "--advertise-address",
    "log_level": "--log-level",
    "drain_timeout_s": "--drain-timeout",
    "api_keys": "--api-key",
    "model_roots": "--model-root",
    "gguf_cache_mb": "--gguf-cache-mb",
    "max_connections": "--max-connections",
    "http_idle_timeout_s": "--http-idle-timeout",
    "cors_origins": "--cors-origin",
}


@dataclass(frozen=True, kw_only=True, slots=True)
class _Raw:
    """One value before validation, with where it came from (for error messages)."""

    value: object
    source: str  # "flag --port", "environment HELEXA_PORT", "/etc/helexa/helexa.toml"
    base_dir: Path  # folder relative paths resolve against


def _split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _read_file(path: Path, source: str) -> dict[str, object]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} ({source}) does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot read: {e.strerror}") from None
    unknown = sorted(set(data) - FILE_KEYS)
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(FILE_KEYS))})"
        )
    return data


def _default_state_dir(environ: Mapping[str, str]) -> Path:
    if environ.get("STATE_DIRECTORY"):
        # systemd's StateDirectory= may list several, separated by ':'; the first is ours.
        return Path(environ["STATE_DIRECTORY"].split(":")[0])
    if environ.get("XDG_STATE_HOME"):
        return Path(environ["XDG_STATE_HOME"]) / "helexa"
    home = environ.get("HOME") or str(Path.home())
    return Path(home) / ".local" / "state" / "helexa"


def _bad(key: str, raw: _Raw, why: str) -> ConfigError:
    return ConfigError(f"bad {key} {raw.value!r} from {raw.source}: {why}")


def _as_str(key: str, raw: _Raw, *, allow_empty: bool = False) -> str:
    if not isinstance(raw.value, str):
        raise _bad(key, raw, "must be a string")
    text = raw.value.strip()
    if not text and not allow_empty:
        raise _bad(key, raw, "must not be empty")
    return text


def _as_port(key: str, raw: _Raw) -> int:
    value = raw.value
    if isinstance(value, bool):
        raise _bad(key, raw, "must be an integer 0..65535")
    if isinstance(value, str):
        try:
            value = int(value.strip(), 10)
        except ValueError:
            raise _bad(key, raw, "must be an integer 0..65535") from None
    if not isinstance(value, int) or not 0 <= value <= 65535:
        raise _bad(key, raw, "must be an integer 0..65535")
    return value


def _as_bool(key: str, raw: _Raw) -> bool:
    value = raw.value
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.strip().lower()
        if low in {"1", "true", "yes", "on"}:
            return True
        if low in {"0", "false", "no", "off"}:
            return False
    raise _bad(key, raw, "must be 0/1 or true/false")


def _as_seconds(key: str, raw: _Raw) -> float:
    value = raw.value
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _bad(key, raw, "must be a number of seconds") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 86400:
        raise _bad(key, raw, "must be a number of seconds in [0, 86400)")
    return float(value)


def _as_count(key: str, raw: _Raw, *, low: int, high: int) -> int:
    value = raw.value
    if isinstance(value, str):
        try:
            value = int(value.strip(), 10)
        except ValueError:
            raise _bad(key, raw, f"must be an integer {low}..{high}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(key, raw, f"must be an integer {low}..{high}")
    return value


def _as_path(key: str, raw: _Raw) -> Path:
    text = _as_str(key, raw)
    path = Path(os.path.expandvars(text)).expanduser()
    if not path.is_absolute():
        path = raw.base_dir / path
    return Path(os.path.normpath(path))


def _as_list(key: str, raw: _Raw) -> list[str]:
    value = raw.value
    if isinstance(value, str):
        return _split_list(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [str(v).strip() for v in value if str(v).strip()]
    raise _bad(key, raw, "must be a list of strings")


def _as_peer(key: str, raw: _Raw, peer: str) -> str:
    host, sep, port_text = peer.rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        raise _bad(key, raw, f"peer {peer!r} must be HOST:PORT")
    try:
        port = int(port_text, 10)
    except ValueError:
        raise _bad(key, raw, f"peer {peer!r} has a bad port") from None
    if not 1 <= port <= 65535:
        raise _bad(key, raw, f"peer {peer!r} has a bad port")
    return peer


def _as_host(key: str, raw: _Raw) -> str:
    text = _as_str(key, raw)
    try:
        ipaddress.ip_address(text)
    except ValueError:
        # A hostname: letters, digits, dots and dashes only.
        if not all(c.isalnum() or c in ".-_" for c in text):
            raise _bad(key, raw, "must be an IP address or a host name") from None
    return text


def load_config(
    argv: Sequence[str], environ: Mapping[str, str], *, hostname: str | None = None
) -> AgentConfig:
    """Parse flags, read the environment and the config file, and validate into an `AgentConfig`.

    Raises `ConfigError` (one-line message naming key and source) for any bad value.
    """
    args = build_parser().parse_args(list(argv))
    cwd = Path.cwd()

    # Which config file: --config > HELEXA_CONFIG > /etc/helexa/helexa.toml if it exists.
    config_path: Path | None = None
    raw: _Raw | None
    if args.config:
        config_path = _as_path("config", _Raw(value=args.config, source="flag --config", base_dir=cwd))
        file_data = _read_file(config_path, "flag --config")
    elif environ.get("HELEXA_CONFIG"):
        raw = _Raw(value=environ["HELEXA_CONFIG"], source="environment HELEXA_CONFIG", base_dir=cwd)
        config_path = _as_path("config", raw)
        file_data = _read_file(config_path, "environment HELEXA_CONFIG")
    elif DEFAULT_CONFIG_PATH.is_file():
        config_path = DEFAULT_CONFIG_PATH
        file_data = _read_file(config_path, "default location")
    else:
        file_data = {}

    def pick(key: str) -> _Raw | None:
        flag_value = getattr(args, key, None)
        if flag_value is not None:
            return _Raw(value=flag_value, source=f"flag {_FLAG[key]}", base_dir=cwd)
        env_name = _ENV.get(key)
        if env_name is not None and environ.get(env_name, "") != "":
            return _Raw(value=environ[env_name], source=f"environment {env_name}", base_dir=cwd)
        if key in file_data:
            assert config_path is not None
            return _Raw(value=file_data[key], source=str(config_path), base_dir=config_path.parent)
        return None

    raw = pick("name")
    name = _as_str("name", raw) if raw else (hostname or socket.gethostname() or "helexa")

    raw = pick("host")
    host = _as_host("host", raw) if raw else DEFAULT_HOST

    raw = pick("port")
    port = _as_port("port", raw) if raw else DEFAULT_PORT

    raw = pick("state_dir")
    state_dir = _as_path("state_dir", raw) if raw else _default_state_dir(environ)

    raw = pick("catalogue")
    if raw:
        catalogue_path, catalogue_default = _as_path("catalogue", raw), False
    else:
        catalogue_path, catalogue_default = state_dir / "models.toml", True

    raw = pick("peers")
    peers = tuple(_as_peer("peers", raw, p) for p in _as_list("peers", raw)) if raw else ()

    raw = pick("mesh")
    mesh = _as_str("mesh", raw) if raw else DEFAULT_MESH

    raw = pick("mesh_key")
    mesh_key = (_as_str("mesh_key", raw, allow_empty=True) or None) if raw else None

    raw = pick("mdns")
    mdns = _as_bool("mdns", raw) if raw else True

    raw = pick("advertise_address")
    advertise_address = _as_host("advertise_address", raw) if raw else None

    raw = pick("log_level")
    log_level: LogLevel = "info"
    if raw:
        text = _as_str("log_level", raw).lower()
        if text not in LOG_LEVELS:
            raise _bad("log_level", raw, f"must be one of {', '.join(LOG_LEVELS)}")
        log_level = text

    raw = pick("drain_timeout_s")
    drain_timeout_s = _as_seconds("drain_timeout_s", raw) if raw else DEFAULT_DRAIN_TIMEOUT_S

    raw = pick("api_keys")
    api_keys = tuple(_as_list("api_keys", raw)) if raw else ()

    raw = pick("hf_cache_dir")
    hf_cache_dir = _as_path("hf_cache_dir", raw) if raw else None

    raw = pick("model_roots")
    model_roots = (
        tuple(
            _as_path("model_roots", _Raw(value=text, source=raw.source, base_dir=raw.base_dir))
            for text in _as_list("model_roots", raw)
        )
        if raw
        else ()
    )

    raw = pick("gguf_cache_mb")
    gguf_cache_mb = _as_count("gguf_cache_mb", raw, low=0, high=2**40) if raw else DEFAULT_GGUF_CACHE_MB

    raw = pick("max_connections")
    max_connections = _as_count("max_connections", raw, low=1, high=1_000_000) if raw else MAX_CONNECTIONS

    raw = pick("http_idle_timeout_s")
    http_idle_timeout_s = _as_seconds("http_idle_timeout_s", raw) if raw else HTTP_IDLE_TIMEOUT_S
    if http_idle_timeout_s <= 0:
        assert raw is not None
        raise _bad("http_idle_timeout_s", raw, "must be more than 0 seconds")

    raw = pick("cors_origins")
    cors_origins = tuple(o.rstrip("/") for o in _as_list("cors_origins", raw)) if raw else ()

    labels: dict[str, str] = {}
    if "labels" in file_data:
        value = file_data["labels"]
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str | int | float | bool) for k, v in value.items()
        ):
            raise ConfigError(f"bad labels from {config_path}: must be a table of strings")
        labels = {str(k): str(v) for k, v in value.items()}

    return AgentConfig(
        name=name,
        host=host,
        port=port,
        state_dir=state_dir,
        catalogue_path=catalogue_path,
        catalogue_default=catalogue_default,
        config_path=config_path,
        peers=peers,
        mesh=mesh,
        mesh_key=mesh_key,
        mdns=mdns,
        advertise_address=advertise_address,
        log_level=log_level,
        drain_timeout_s=drain_timeout_s,
        api_keys=api_keys,
        hf_cache_dir=hf_cache_dir,
        gguf_cache_mb=gguf_cache_mb,
        model_roots=model_roots,
        labels=labels,
        max_connections=max_connections,
        http_idle_timeout_s=http_idle_timeout_s,
        cors_origins=cors_origins,
    )
