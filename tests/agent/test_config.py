"""Config precedence (flag > env > file > default) and the errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from helexa.mesh.config import DEFAULT_PORT, ConfigError, load_config
from helexa.mesh.timing import HTTP_IDLE_TIMEOUT_S, MAX_CONNECTIONS


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_with_no_configuration(tmp_path: Path) -> None:
    cfg = load_config([], {"HOME": str(tmp_path)}, hostname="box")
    assert cfg.name == "box"
    assert cfg.host == "0.0.0.0"
    assert cfg.port == DEFAULT_PORT
    assert cfg.state_dir == tmp_path / ".local" / "state" / "helexa"
    assert cfg.catalogue_path == cfg.state_dir / "models.toml"
    assert cfg.catalogue_default is True
    assert cfg.peers == ()
    assert cfg.mdns is True
    assert cfg.log_level == "info"
    assert cfg.api_keys == ()


def test_state_dir_defaults_follow_systemd_then_xdg(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "xdg")}
    assert load_config([], env).state_dir == tmp_path / "xdg" / "helexa"
    env["STATE_DIRECTORY"] = str(tmp_path / "sd")
    assert load_config([], env).state_dir == tmp_path / "sd"


def test_precedence_file_then_env_then_flag(tmp_path: Path) -> None:
    conf = _write(
        tmp_path / "helexa.toml",
        'name = "from-file"\nport = 1111\nhost = "10.0.0.1"\nmesh = "filemesh"\nlog_level = "debug"\n',
    )
    env = {"HOME": str(tmp_path), "HELEXA_CONFIG": str(conf)}
    cfg = load_config([], env)
    assert (cfg.name, cfg.port, cfg.host, cfg.mesh, cfg.log_level) == (
        "from-file",
        1111,
        "10.0.0.1",
        "filemesh",
        "debug",
    )
    assert cfg.config_path == conf

    env |= {"HELEXA_PORT": "2222", "HELEXA_NAME": "from-env"}
    cfg = load_config([], env)
    assert (cfg.name, cfg.port, cfg.host) == ("from-env", 2222, "10.0.0.1")

    cfg = load_config(["--port", "3333", "--host", "127.0.0.1"], env)
    assert (cfg.name, cfg.port, cfg.host) == ("from-env", 3333, "127.0.0.1")


def test_flag_config_beats_env_config(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.toml", "port = 1\n")
    b = _write(tmp_path / "b.toml", "port = 2\n")
    cfg = load_config(["--config", str(b)], {"HOME": str(tmp_path), "HELEXA_CONFIG": str(a)})
    assert cfg.port == 2


def test_relative_paths_in_file_resolve_against_its_folder(tmp_path: Path, monkeypatch) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    conf = _write(etc / "helexa.toml", 'catalogue = "models.toml"\nstate_dir = "../state"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(["--config", str(conf)], {"HOME": str(tmp_path)})
    assert cfg.catalogue_path == etc / "models.toml"
    assert cfg.catalogue_default is False
    assert cfg.state_dir == tmp_path / "state"
    # From a flag, relative means relative to the current directory.
    cfg = load_config(["--config", str(conf), "--catalogue", "m.toml"], {"HOME": str(tmp_path)})
    assert cfg.catalogue_path == elsewhere / "m.toml"


def test_lists_from_env_file_and_repeated_flags(tmp_path: Path) -> None:
    conf = _write(tmp_path / "h.toml", 'peers = ["10.0.0.5:31313"]\napi_keys = ["k1"]\nmdns = false\n')
    env = {"HOME": str(tmp_path), "HELEXA_CONFIG": str(conf)}
    cfg = load_config([], env)
    assert cfg.peers == ("10.0.0.5:31313",)
    assert cfg.api_keys == ("k1",)
    assert cfg.mdns is False
    env |= {"HELEXA_PEERS": "a:1, b:2", "HELEXA_MDNS": "1"}
    cfg = load_config([], env)
    assert cfg.peers == ("a:1", "b:2")
    assert cfg.mdns is True
    cfg = load_config(["--peer", "c:3", "--peer", "[::1]:4", "--no-mdns", "--api-key", "z"], env)
    assert cfg.peers == ("c:3", "[::1]:4")
    assert cfg.mdns is False
    assert cfg.api_keys == ("z",)


def test_port_zero_is_allowed(tmp_path: Path) -> None:
    assert load_config(["--port", "0"], {"HOME": str(tmp_path)}).port == 0


@pytest.mark.parametrize(
    ("argv", "env", "file_text", "expected"),
    [
        ([], {"HELEXA_PORT": "eighty"}, None, "bad port 'eighty' from environment HELEXA_PORT"),
        (["--port", "70000"], {}, None, "bad port '70000' from flag --port"),
        ([], {}, 'port = "x"\n', "bad port 'x' from "),
        ([], {}, "port = true\n", "bad port True from "),
        ([], {"HELEXA_MDNS": "maybe"}, None, "bad mdns 'maybe' from environment HELEXA_MDNS"),
        ([], {"HELEXA_PEERS": "nohost"}, None, "bad peers"),
        ([], {"HELEXA_DRAIN_TIMEOUT_S": "-1"}, None, "bad drain_timeout_s '-1'"),
        ([], {}, 'log_level = "loud"\n', "bad log_level 'loud'"),
        ([], {}, "prot = 1\n", "unknown key 'prot'"),
        ([], {}, "port = = 1\n", "not valid TOML"),
        (["--bogus"], {}, None, "unrecognized arguments: --bogus"),
    ],
)
def test_bad_values_name_key_and_source(tmp_path: Path, argv, env, file_text, expected) -> None:
    environ = {"HOME": str(tmp_path), **env}
    if file_text is not None:
        conf = _write(tmp_path / "helexa.toml", file_text)
        environ["HELEXA_CONFIG"] = str(conf)
    with pytest.raises(ConfigError) as info:
        load_config(argv, environ)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    if file_text is not None and "port" in expected:
        assert str(tmp_path / "helexa.toml") in message


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(["--config", str(tmp_path / "nope.toml")], {"HOME": str(tmp_path)})


def test_secrets_are_masked_in_describe(tmp_path: Path) -> None:
    cfg = load_config(["--mesh-key", "s3cret", "--api-key", "k"], {"HOME": str(tmp_path)})
    text = repr(cfg.describe())
    assert "s3cret" not in text
    assert "'k'" not in text


def test_model_roots_from_file_env_and_flags(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "HELEXA_STATE_DIR": str(tmp_path / "state")}
    cfg = load_config([], env)
    assert cfg.model_roots == () and cfg.local_model_roots == (tmp_path / "state" / "models",)
    conf = _write(tmp_path / "helexa.toml", 'model_roots = ["weights", "/srv/models"]\n')
    cfg = load_config(["--config", str(conf)], env)
    assert cfg.model_roots == (tmp_path / "weights", Path("/srv/models"))  # relative to the file
    assert cfg.local_model_roots == (tmp_path / "state" / "models", tmp_path / "weights", Path("/srv/models"))
    cfg = load_config(["--config", str(conf)], {**env, "HELEXA_MODEL_ROOTS": "/a,/b"})
    assert cfg.model_roots == (Path("/a"), Path("/b"))
    cfg = load_config(["--config", str(conf), "--model-root", "/c", "--model-root", "/d"], env)
    assert cfg.model_roots == (Path("/c"), Path("/d"))


def test_connection_limit_and_idle_timeout_from_file_env_and_flags(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    cfg = load_config([], env)
    assert (cfg.max_connections, cfg.http_idle_timeout_s) == (MAX_CONNECTIONS, HTTP_IDLE_TIMEOUT_S)
    conf = _write(tmp_path / "helexa.toml", "max_connections = 100\nhttp_idle_timeout_s = 75\n")
    cfg = load_config(["--config", str(conf)], env)
    assert (cfg.max_connections, cfg.http_idle_timeout_s) == (100, 75.0)
    cfg = load_config(["--config", str(conf)], {**env, "HELEXA_MAX_CONNECTIONS": "50"})
    assert cfg.max_connections == 50
    cfg = load_config(["--max-connections", "10", "--http-idle-timeout", "2.5"], env)
    assert (cfg.max_connections, cfg.http_idle_timeout_s) == (10, 2.5)
    for argv in (["--max-connections", "0"], ["--max-connections", "many"], ["--http-idle-timeout", "0"]):
        with pytest.raises(ConfigError, match=r"bad (max_connections|http_idle_timeout_s)"):
            load_config(argv, env)
