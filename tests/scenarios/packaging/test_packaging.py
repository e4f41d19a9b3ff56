"""Packaging: the RPM spec, the systemd unit, the sysusers file, the firewalld service and the example
configuration under `packaging/`.

The fast tests read the files and run the checkers the distributions run (`systemd-analyze verify`,
`systemd-sysusers`), and the agent's own config loader and catalogue validator on the examples. The slow
ones build the sdist and wheel, the SRPM from them, and a binary RPM from the SRPM with stand-ins for the
Fedora-only macros (`rpm-stub-macros`), so that %install and %files are exercised, not only parsed. The
wheel installs one import name, `helexa` (the repository's mesh/, engine/, catalogue/ and tui/ become
`helexa.mesh`, ...), and is installed into a fresh venv beside unrelated packages named mesh and engine.

`rpmbuild`, `systemd-analyze` and `systemd-sysusers` come from the Debian packages `rpm` and `systemd`,
which `scripts/setup` and `scripts/package` install; a missing tool fails the test that needs it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from helexa.catalogue.validate import FIELDS, validate_catalogue
from helexa.mesh.config import DEFAULT_PORT, FILE_KEYS, AgentConfig, load_config
from helexa.mesh.timing import DEFAULT_DRAIN_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[3]
PACKAGING = ROOT / "packaging"
SPEC = PACKAGING / "helexa.spec"
UNIT = PACKAGING / "helexa.service"
SYSUSERS = PACKAGING / "helexa.sysusers"
FIREWALLD = PACKAGING / "helexa-firewalld.xml"
CONFIG_EXAMPLE = PACKAGING / "helexa.example.toml"
MODELS_EXAMPLE = PACKAGING / "models.example.toml"
STUB_MACROS = Path(__file__).with_name("rpm-stub-macros")

VERSION: str = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def tool(name: str) -> str:
    """The path of a command-line tool, or a failure that says how to get it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (Debian packages rpm and systemd; scripts/setup installs them)")
    return path


def run(
    *args: str | Path, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )


# --- systemd unit ---------------------------------------------------------------------------------


def verify_unit(text: str, tmp_path: Path) -> str:
    """Run `systemd-analyze verify` on `text` as helexa.service and return everything it printed.

    verify insists that ExecStart's binary exists, and /usr/bin/helexa only does once the package is
    installed, so ExecStart points at a stub executable here; every other line is verified as shipped.
    verify exits 0 on warnings such as unknown keys, so the output is what callers check.
    """
    stub = tmp_path / "bin" / "helexa"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    assert "\nExecStart=/usr/bin/helexa agent\n" in text
    unit = tmp_path / "unit" / "helexa.service"
    unit.parent.mkdir()
    unit.write_text(text.replace("\nExecStart=/usr/bin/helexa ", f"\nExecStart={stub} "))
    result = run(tool("systemd-analyze"), "verify", "--man=no", unit)
    return (result.stdout + result.stderr).strip() + (
        "" if result.returncode == 0 else f"\n(rc {result.returncode})"
    )


def test_unit_verifies_without_warnings(tmp_path: Path) -> None:
    assert verify_unit(UNIT.read_text(), tmp_path) == ""


def test_unit_verify_reports_an_unknown_directive(tmp_path: Path) -> None:
    """The check above can fail: the same verification flags a misspelt key and a bad value."""
    broken = UNIT.read_text().replace("ProtectHome=yes", "ProtectHomes=yes\nProtectSystem=sometimes")
    output = verify_unit(broken, tmp_path)
    assert "Unknown key" in output and "ProtectHomes" in output
    assert "sometimes" in output


@dataclass(frozen=True, kw_only=True, slots=True)
class UnitLine:
    section: str
    key: str
    value: str


def unit_lines(text: str) -> list[UnitLine]:
    """The unit's settings in order (systemd allows repeated keys, which configparser does not)."""
    section = ""
    out: list[UnitLine] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append(UnitLine(section=section, key=key.strip(), value=value.strip()))
    return out


def test_unit_runs_the_agent_hardened_as_the_helexa_user() -> None:
    lines = unit_lines(UNIT.read_text())
    settings = {(u.section, u.key): u.value for u in lines}
    expected = {
        ("Unit", "StartLimitIntervalSec"): "300",
        ("Unit", "StartLimitBurst"): "5",
        ("Service", "ExecStart"): "/usr/bin/helexa agent",
        ("Service", "User"): "helexa",
        ("Service", "StateDirectory"): "helexa",
        ("Service", "ConfigurationDirectory"): "helexa",
        ("Service", "Restart"): "on-failure",
        ("Service", "KillSignal"): "SIGTERM",
        ("Service", "NoNewPrivileges"): "yes",
        ("Service", "ProtectSystem"): "strict",
        ("Service", "ProtectHome"): "yes",
        ("Service", "PrivateTmp"): "yes",
        ("Service", "ProtectKernelTunables"): "yes",
        ("Service", "ProtectKernelModules"): "yes",
        ("Service", "ProtectKernelLogs"): "yes",
        ("Service", "ProtectControlGroups"): "yes",
        ("Service", "CapabilityBoundingSet"): "",
        ("Service", "AmbientCapabilities"): "",
        ("Service", "DevicePolicy"): "closed",
        ("Service", "DeviceAllow"): "char-nvidia* rw",
        ("Install", "WantedBy"): "multi-user.target",
    }
    assert {k: settings.get(k) for k in expected} == expected
    families = set(settings[("Service", "RestrictAddressFamilies")].split())
    assert families == {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}
    env = [u.value for u in lines if u.key == "Environment"]
    assert "HELEXA_CONFIG=/etc/helexa/helexa.toml" in env
    # A stop must have time to drain in-flight requests before systemd escalates to SIGKILL.
    stop_s = float(settings[("Service", "TimeoutStopSec")].removesuffix("s"))
    assert stop_s > DEFAULT_DRAIN_TIMEOUT_S + 5
    # Nothing that would hide the GPUs or break JIT-compiling engines.
    assert ("Service", "PrivateDevices") not in settings
    assert ("Service", "MemoryDenyWriteExecute") not in settings


# --- sysusers and firewalld -----------------------------------------------------------------------


def test_sysusers_creates_the_helexa_user_with_its_state_dir_as_home(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").touch()
    (tmp_path / "etc" / "group").touch()
    conf = tmp_path / "usr" / "lib" / "sysusers.d" / "helexa.conf"
    conf.parent.mkdir(parents=True)
    shutil.copy(SYSUSERS, conf)
    result = run(tool("systemd-sysusers"), f"--root={tmp_path}")
    # Parse errors are printed with the file name but do not change the exit status.
    assert result.returncode == 0 and "helexa.conf:" not in result.stderr, result.stderr
    users = [line.split(":") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()]
    (user,) = [u for u in users if u[0] == "helexa"]
    assert user[5] == "/var/lib/helexa"
    assert int(user[2]) < 1000  # a system user
    assert any(line.startswith("helexa:") for line in (tmp_path / "etc" / "group").read_text().splitlines())


def test_firewalld_service_opens_mdns_and_the_api_port() -> None:
    root = ET.parse(FIREWALLD).getroot()
    assert root.tag == "service"
    assert (root.findtext("short") or "").strip() == "helexa"
    ports = {(p.get("port"), p.get("protocol")) for p in root.iter("port")}
    assert ports == {(str(DEFAULT_PORT), "tcp"), ("5353", "udp")}
    # A <destination> would restrict every port of the service to the mDNS multicast group.
    assert root.find("destination") is None


# --- example configuration ------------------------------------------------------------------------


def uncommented(text: str, pattern: str) -> str:
    """The lines of `text` that are commented-out TOML matching `pattern`, with the `#` removed."""
    return "\n".join(line[1:] for line in text.splitlines() if re.match(pattern, line))


def test_example_config_as_shipped_gives_the_defaults() -> None:
    assert tomllib.loads(CONFIG_EXAMPLE.read_text()) == {}
    config = load_config(
        ["--config", str(CONFIG_EXAMPLE)], {"STATE_DIRECTORY": "/var/lib/helexa"}, hostname="h"
    )
    assert config.port == DEFAULT_PORT
    assert config.state_dir == Path("/var/lib/helexa")
    assert config.catalogue_path == Path("/var/lib/helexa/models.toml")


def test_example_config_documents_every_key_with_a_valid_value(tmp_path: Path) -> None:
    """Uncommenting every setting gives a file with every known key that the agent accepts, and the
    settings that show a default show the agent's actual default."""
    text = uncommented(CONFIG_EXAMPLE.read_text(), r"#(\w+ = .*|\[labels\])$")
    data = tomllib.loads(text)
    assert set(data) == FILE_KEYS
    path = tmp_path / "helexa.toml"
    path.write_text(text)
    config = load_config(["--config", str(path)], {}, hostname="h")
    assert config.labels  # the [labels] table came through as a table
    defaults = {f.name: f.default for f in fields(AgentConfig)}
    for key in ("host", "port", "mesh", "mdns", "log_level", "drain_timeout_s"):
        assert getattr(config, key) == defaults[key], key
    assert config.state_dir == Path("/var/lib/helexa")
    assert config.catalogue_path == Path("/var/lib/helexa/models.toml")


def test_models_example_is_a_valid_catalogue_that_explains_every_field(tmp_path: Path) -> None:
    text = MODELS_EXAMPLE.read_text()
    live = tomllib.loads(text)
    entries, problems = validate_catalogue(live, file=str(MODELS_EXAMPLE), base_dir=tmp_path)
    # Until the demo model has been trained into catalogue/demo/, the validator warns that it is missing.
    assert [p for p in problems if demo_files() or (p.field, p.severity) != ("source", "warning")] == []
    assert [e.id for e in entries] == ["helexa/demo"]
    # The example shows the demo entry exactly as the packaged default catalogue has it.
    packaged = tomllib.loads((ROOT / "catalogue" / "models.toml").read_text())
    assert live["models"] == [m for m in packaged["models"] if m["id"] == "helexa/demo"]

    # The commented reference entry: every key an entry may have (the validator's list), valid as written.
    reference = uncommented(text, r"#(\[\[models\]\]|\w+ = .*)$")
    data = tomllib.loads(reference)
    (raw,) = data["models"]
    assert set(raw) == set(FIELDS)
    entries, problems = validate_catalogue(data, file="reference", base_dir=tmp_path)
    assert problems == ()
    assert len(entries) == 1 and entries[0].keep_alive_s == 30 * 60


# --- the spec -------------------------------------------------------------------------------------


def spec_sections(text: str) -> dict[str, str]:
    """The spec's preamble (key "") and each %section's body, keyed by the section line."""
    names = (
        r"%(description|prep|generate_buildrequires|build|install|check|pre|post|preun|postun|files|changelog)"
        r"\b"
    )
    out: dict[str, list[str]] = {"": []}
    current = ""
    for line in text.splitlines():
        if re.match(names, line):
            current = line.split()[0]
            out.setdefault(current, [])
            continue
        out[current].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def test_spec_version_is_pyprojects() -> None:
    (version,) = re.findall(r"^Version:\s*(\S+)$", SPEC.read_text(), flags=re.MULTILINE)
    assert version == VERSION


def test_spec_installs_and_lists_every_packaging_file() -> None:
    """Every file beside the spec is a Source, installed by %install to a path that %files lists."""
    text = SPEC.read_text()
    sections = spec_sections(text)
    sources = dict(re.findall(r"^Source(\d+):\s*(\S+)$", sections[""], flags=re.MULTILINE))
    assert sources.pop("0") == "%{name}-%{version}.tar.gz"
    assert sorted(sources.values()) == sorted(p.name for p in PACKAGING.iterdir() if p != SPEC)
    files = sections["%files"].splitlines()
    for number, name in sources.items():
        (target,) = re.findall(
            rf"^install .*%{{SOURCE{number}}} %{{buildroot}}(\S+)$", sections["%install"], re.M
        )
        listed = [line for line in files if line.split()[-1:] == [target]]
        assert listed, f"{name} is installed as {target}, which %files does not list"
        if target.startswith("%{_sysconfdir}/"):
            assert "%config(noreplace)" in listed[0], target
    for macro in (
        "%pyproject_wheel",
        "%pyproject_install",
        "%pyproject_save_files",
        "%pyproject_buildrequires",
    ):
        assert macro in text
    assert "%{_bindir}/helexa" in files
    assert "%dir %attr(0750,helexa,helexa) %{_localstatedir}/lib/helexa" in files
    assert "%systemd_post helexa.service" in sections["%post"]
    assert "%systemd_preun helexa.service" in sections["%preun"]
    assert "%systemd_postun_with_restart helexa.service" in sections["%postun"]
    assert "%sysusers_create_compat %{SOURCE2}" in sections["%pre"] and sources["2"] == SYSUSERS.name
    assert "mlc" in sections["%description"].lower()


# --- builds (slow) --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Built:
    sdist: Path
    wheel: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The sdist and the wheel (built from the unpacked sdist), as scripts/package builds them."""
    out = tmp_path_factory.mktemp("dist")
    result = run(
        sys.executable, "-m", "build", "--no-isolation", "--skip-dependency-check", "--outdir", out, ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return Built(sdist=out / f"helexa-{VERSION}.tar.gz", wheel=out / f"helexa-{VERSION}-py3-none-any.whl")


def demo_files() -> list[str]:
    """The demo model's files in the working tree (none until it has been trained)."""
    demo = ROOT / "catalogue" / "demo"
    return sorted(str(p.relative_to(ROOT)) for p in demo.rglob("*") if p.is_file()) if demo.is_dir() else []


# The repository's top-level folders and the names they install as (pyproject's package-dir).
FOLDERS = ("mesh", "engine", "catalogue", "tui")


def package_files() -> list[str]:
    """Every module and data file of the four top-level folders, subpackages included."""
    found = []
    for top in FOLDERS:
        for p in (ROOT / top).rglob("*"):
            if (
                p.is_file()
                and "__pycache__" not in p.parts
                and p.suffix in {".py", ".tcss", ".toml", ".typed"}
            ):
                found.append(str(p.relative_to(ROOT)))
    return sorted(found)


def installed_path(repo_path: str) -> str:
    """Where a file of the repository lands in the wheel: `mesh/cli/main.py` -> `helexa/mesh/cli/main.py`."""
    assert repo_path.split("/", 1)[0] in FOLDERS, repo_path
    return f"helexa/{repo_path}"


@pytest.mark.slow
def test_sdist_and_wheel_carry_the_package_data(built: Built) -> None:
    with tarfile.open(built.sdist) as tar:
        in_sdist = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    with zipfile.ZipFile(built.wheel) as whl:
        in_wheel = set(whl.namelist())
        entry_points = whl.read(f"helexa-{VERSION}.dist-info/entry_points.txt").decode()
    for wanted in [
        "catalogue/models.toml",
        "catalogue/py.typed",
        "mesh/cli/main.py",
        *package_files(),
        *demo_files(),
    ]:
        assert wanted in in_sdist, f"{wanted} is missing from the sdist"
        assert installed_path(wanted) in in_wheel, f"{installed_path(wanted)} is missing from the wheel"
    assert "helexa = helexa.mesh.cli.main:main" in entry_points


@pytest.mark.slow
def test_wheel_installs_one_top_level_name(built: Built) -> None:
    """Everything installs under `helexa`, a namespace package: nothing named mesh, engine, catalogue or
    tui lands at the top of site-packages, where it would clash with other distributions."""
    dist_info = f"helexa-{VERSION}.dist-info"
    with zipfile.ZipFile(built.wheel) as whl:
        names = whl.namelist()
        top_level = whl.read(f"{dist_info}/top_level.txt").decode().split()
    assert {name.split("/", 1)[0] for name in names} == {"helexa", dist_info}
    assert top_level == ["helexa"]
    assert "helexa/__init__.py" not in names  # PEP 420: nothing to clash with another helexa.* portion
    assert {name.split("/")[1] for name in names if name.startswith("helexa/")} == set(FOLDERS)


# The dummy distributions the wheel must coexist with, and what the check below runs in their venv.
NEIGHBOURS = ("mesh", "engine", "catalogue", "tui")
IMPORT_EVERYTHING = """\
import importlib, pathlib, sys
import mesh, engine, catalogue, tui
import helexa.mesh.cli.main, helexa.engine.registry
from helexa.catalogue.store import default_catalogue_text

site = pathlib.Path(sys.argv[1])
for neighbour in (mesh, engine, catalogue, tui):
    assert neighbour.NEIGHBOUR == neighbour.__name__, neighbour
assert pathlib.Path(helexa.mesh.cli.main.__file__).is_relative_to(site / "helexa"), helexa.mesh.cli.main
assert "helexa/demo" in default_catalogue_text()  # package data, read through helexa.catalogue
names = sorted(
    ".".join(p.relative_to(site).with_suffix("").parts).removesuffix(".__init__")
    for p in (site / "helexa").rglob("*.py")
    if p.name != "__main__.py"
)
for name in names:
    module = importlib.import_module(name)
    assert pathlib.Path(module.__file__).is_relative_to(site), (name, module.__file__)
print(len(names))
"""


def site_packages(venv: Path) -> Path:
    (path,) = (venv / "lib").glob("python3*/site-packages")
    return path


@pytest.mark.slow
def test_wheel_installs_beside_unrelated_mesh_and_engine_packages(built: Built, tmp_path: Path) -> None:
    """A fresh venv holding the wheel and unrelated top-level packages named mesh, engine, catalogue and
    tui: each import name gets its own package, every module of ours imports, the command runs.

    The venv has no pip and no dependencies of its own; a .pth line adds this checkout's venv's
    site-packages for aiohttp, textual and the rest. Only that directory is added: the .pth files in
    it (the editable install's import hook among them) are not processed, so nothing of the checkout
    is importable there, only the wheel.
    """
    venv = tmp_path / "venv"
    result = run(sys.executable, "-m", "venv", "--without-pip", venv)
    assert result.returncode == 0, result.stderr
    site = site_packages(venv)
    (site / "dependencies.pth").write_text(f"{site_packages(Path(sys.prefix))}\n")
    for name in NEIGHBOURS:
        (site / name).mkdir()
        (site / name / "__init__.py").write_text(f"NEIGHBOUR = {name!r}\n")
    python = venv / "bin" / "python"
    pip: list[str | Path] = [sys.executable, "-m", "pip", "--python", python]
    result = run(*pip, "install", "--quiet", "--no-deps", "--no-index", "--no-compile", built.wheel)
    assert result.returncode == 0, result.stdout + result.stderr

    elsewhere = tmp_path / "elsewhere"  # a working directory without the checkout's folders
    elsewhere.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONNOUSERSITE": "1"}
    result = run(python, "-c", IMPORT_EVERYTHING, site, cwd=elsewhere, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    modules = [p for p in package_files() if p.endswith(".py") and not p.endswith("/__main__.py")]
    assert int(result.stdout) == len(modules)
    result = run(venv / "bin" / "helexa", "--help", cwd=elsewhere, env=env)
    assert result.returncode == 0, result.stderr
    assert "helexa agent" in result.stdout


def build_srpm(sdist: Path, top: Path) -> Path:
    sources = top / "SOURCES"
    sources.mkdir(parents=True)
    shutil.copy(sdist, sources)
    for path in PACKAGING.iterdir():
        if path != SPEC:
            shutil.copy(path, sources)
    result = run(tool("rpmbuild"), "-bs", "--define", f"_topdir {top}", SPEC)
    assert result.returncode == 0, result.stderr
    (srpm,) = (top / "SRPMS").glob("*.src.rpm")
    return srpm


@pytest.mark.slow
def test_srpm_carries_the_spec_the_sdist_and_every_packaging_file(built: Built, tmp_path: Path) -> None:
    srpm = build_srpm(built.sdist, tmp_path / "rpmbuild")
    assert srpm.name == f"helexa-{VERSION}-1.src.rpm"
    listed = set(run(tool("rpm"), "-qpl", srpm).stdout.split())
    assert listed == {built.sdist.name, *(p.name for p in PACKAGING.iterdir())}


@pytest.mark.slow
def test_binary_rpm_rebuilt_from_the_srpm_installs_the_right_files(built: Built, tmp_path: Path) -> None:
    """`rpmbuild --rebuild` of the SRPM (what an operator runs), with stand-ins for the Fedora macros.

    Runs %prep, %build, %install and %check for real; then checks paths, owners, modes and config flags
    in the binary package.
    """
    srpm = build_srpm(built.sdist, tmp_path / "srpm")
    macros = tmp_path / "macros"
    macros.write_text(STUB_MACROS.read_text().replace("@PYTHON@", sys.executable))
    top = tmp_path / "rebuild"
    result = run(
        tool("rpmbuild"), "--rebuild", "--nodeps", "--load", macros, "--define", f"_topdir {top}", srpm
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    (rpm,) = (top / "RPMS" / "noarch").glob(f"helexa-{VERSION}-1.noarch.rpm")
    query = "[%{FILENAMES}\t%{FILEMODES:perms}\t%{FILEUSERNAME}\t%{FILEGROUPNAME}\t%{FILEFLAGS:fflags}\n]"
    rows = [line.split("\t") for line in run(tool("rpm"), "-qp", "--qf", query, rpm).stdout.splitlines()]
    files = {name: (perms, user, group, flags) for name, perms, user, group, flags in rows}
    expected = {
        "/usr/bin/helexa": ("-rwxr-xr-x", "root", "root", ""),
        "/usr/lib/systemd/system/helexa.service": ("-rw-r--r--", "root", "root", ""),
        "/usr/lib/sysusers.d/helexa.conf": ("-rw-r--r--", "root", "root", ""),
        "/usr/lib/firewalld/services/helexa.xml": ("-rw-r--r--", "root", "root", ""),
        "/etc/helexa": ("drwxr-xr-x", "root", "root", ""),
        "/etc/helexa/helexa.toml": ("-rw-r-----", "root", "helexa", "cn"),
        "/etc/helexa/models.toml": ("-rw-r-----", "root", "helexa", "cn"),
        "/var/lib/helexa": ("drwxr-x---", "helexa", "helexa", ""),
        "/var/cache/helexa": ("drwxr-x---", "helexa", "helexa", ""),
    }
    assert {name: files.get(name) for name in expected} == expected
    site = next(name for name in files if name.endswith("/site-packages/helexa/catalogue/models.toml"))
    site_packages = site.removesuffix("helexa/catalogue/models.toml")
    for wanted in ["mesh/cli/main.py", "catalogue/entry.py", *demo_files()]:
        assert site_packages + installed_path(wanted) in files, wanted
    # One directory of ours in site-packages, owned by the package; nothing else at the top.
    assert {
        name.removeprefix(site_packages).split("/")[0] for name in files if name.startswith(site_packages)
    } == {
        "helexa",
        f"helexa-{VERSION}.dist-info",
    }
    assert site_packages + "helexa" in files
    requires = set(run(tool("rpm"), "-qp", "--requires", rpm).stdout.splitlines())
    # Every runtime dependency of pyproject.toml is a Requires of the RPM (a missing one once was).
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for requirement in pyproject["project"]["dependencies"]:
        name = re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0]
        dist = re.sub(r"[-_.]+", "-", name).lower()  # PEP 503, as rpm's python3dist() spells it
        assert any(f"python3dist({dist})" in r for r in requires), dist
