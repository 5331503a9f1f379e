"""The compose files, Dockerfiles, helper scripts and docs/deployment.md agree with each other.

* ``docker-compose config -q`` (Compose v2 ``docker compose`` or Debian's v1 ``docker-compose``)
  validates every combination of the overlays; skipped, with the reason, when neither is installed.
* Pure-Python checks of the parsed YAML: SuperNode partition ids 0..N-1, distinct, one
  ``num-partitions=N``; each SuperNode paired with its ClientApp SuperExec; ports; pinned Flower
  versions; the TLS overlay restating the same commands with TLS flags; the docs naming exactly
  these services, ports, volumes and connections.
* The certificate and key scripts produce what the TLS overlay mounts, in the formats Flower loads.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "docker-compose.yml"
TLS = ROOT / "docker-compose.tls.yml"
GPU = ROOT / "docker-compose.gpu.yml"
DOCS = ROOT / "docs" / "deployment.md"
FLWR_CONFIG = ROOT / "deploy" / "flwr-config.toml"
DOCKERFILES = [ROOT / "docker" / "superexec.Dockerfile", ROOT / "docker" / "superexec-cuda.Dockerfile"]
FLWR_VERSION = "1.42.0"
SUPERNODE = re.compile(r"^supernode-(\d+)$")
CLIENT_EXEC = re.compile(r"^superexec-clientapp-(\d+)$")


def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def services(path: Path) -> dict[str, dict]:
    return load(path)["services"]


def flags(command: list[str]) -> dict[str, str | bool]:
    """``["--a", "x", "--b"]`` -> ``{"--a": "x", "--b": True}`` (Flower's CLIs take no positionals here)."""
    out: dict[str, str | bool] = {}
    i = 0
    while i < len(command):
        tok = str(command[i])
        assert tok.startswith("--"), f"unexpected positional argument {tok!r} in {command}"
        if i + 1 < len(command) and not str(command[i + 1]).startswith("--"):
            out[tok] = str(command[i + 1])
            i += 2
        else:
            out[tok] = True
            i += 1
    return out


def volume(spec: str) -> tuple[str, str]:
    """``"${VAR:-./x}:/target:ro"`` -> ``("./x", "/target")`` (defaults of ``${VAR:-default}`` applied)."""
    parts = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", spec).split(":")
    return parts[0], parts[1]


def targets(svc: dict) -> set[str]:
    return {volume(v)[1] for v in svc.get("volumes", [])}


def node_config(value: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in value.split())


def supernodes(svcs: dict[str, dict]) -> dict[int, dict]:
    return {int(m.group(1)): s for name, s in svcs.items() if (m := SUPERNODE.match(name))}


# --- docker-compose config -q ---------------------------------------------------------------------


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    if legacy := shutil.which("docker-compose"):
        return [legacy]
    return None


@pytest.mark.parametrize(
    "files",
    [[BASE], [BASE, TLS], [BASE, GPU], [BASE, TLS, GPU]],
    ids=["base", "base+tls", "base+gpu", "base+tls+gpu"],
)
def test_compose_config_is_valid(files: list[Path]) -> None:
    cmd = compose_command()
    if cmd is None:
        pytest.skip("neither `docker compose` (v2 plugin) nor `docker-compose` is installed "
                    "(Debian: apt-get install -y --no-install-recommends docker-compose)")
    args = [*cmd, "--project-directory", str(ROOT)]
    for f in files:
        args += ["-f", str(f)]
    res = subprocess.run([*args, "config", "-q"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{' '.join(args)} config -q failed:\n{res.stdout}\n{res.stderr}"


# --- invariants of docker-compose.yml -------------------------------------------------------------


def test_supernode_partitions_are_0_to_n_minus_1_and_agree_on_n() -> None:
    nodes = supernodes(services(BASE))
    n = len(nodes)
    assert n >= 2 and sorted(nodes) == list(range(n)), f"supernode names must be supernode-0..{n - 1}: {sorted(nodes)}"
    seen = []
    for i, svc in nodes.items():
        conf = node_config(flags(svc["command"])["--node-config"])
        assert set(conf) == {"partition-id", "num-partitions"}, conf
        assert int(conf["partition-id"]) == i, f"supernode-{i} has partition-id={conf['partition-id']}"
        assert int(conf["num-partitions"]) == n, f"supernode-{i} says num-partitions={conf['num-partitions']}, N={n}"
        seen.append(int(conf["partition-id"]))
    assert len(set(seen)) == n


def test_every_supernode_has_its_clientapp_superexec() -> None:
    svcs = services(BASE)
    nodes = supernodes(svcs)
    execs = {int(m.group(1)): s for name, s in svcs.items() if (m := CLIENT_EXEC.match(name))}
    assert sorted(execs) == sorted(nodes)
    for i, node in nodes.items():
        nf, ef = flags(node["command"]), flags(execs[i]["command"])
        assert nf["--isolation"] == "process" and nf["--host"] == "0.0.0.0"
        assert nf["--superlink"] == "superlink:8000" and nf["--insecure"] is True
        assert ef["--runtime-api-address"] == f"supernode-{i}:{nf['--port']}"
        assert "supernode-" + str(i) in execs[i]["depends_on"]
        assert node["depends_on"]["superlink"]["condition"] == "service_healthy"
        assert f":{nf['--port']}/health" in " ".join(node["healthcheck"]["test"])
        assert {"/data", "/weights"} <= targets(execs[i])


def test_superlink_and_serverapp_superexec() -> None:
    svcs = services(BASE)
    link = svcs["superlink"]
    f = flags(link["command"])
    assert f["--isolation"] == "process" and f["--host"] == "0.0.0.0" and f["--port"] == "8000"
    assert f["--insecure"] is True and f["--disable-runtime-dependency-installation"] is True
    assert str(Path(f["--database"]).parent) in targets(link), "the SuperLink database must live on a volume"
    assert link["ports"] == ["8000:8000"]
    assert "http://127.0.0.1:8000/health" in " ".join(link["healthcheck"]["test"])
    server = svcs["superexec-serverapp"]
    assert flags(server["command"])["--runtime-api-address"] == "superlink:8000"
    assert targets(server) == {"/data", "/weights", "/server-data", "/results"}
    published = {name for name, s in svcs.items() if s.get("ports")}
    assert published == {"superlink"}, f"only the SuperLink publishes a port, not {published - {'superlink'}}"


def test_images_are_pinned_and_runtime_installs_stay_off() -> None:
    svcs = services(BASE)
    for name, svc in svcs.items():
        image = svc["image"]
        if image.startswith("flwr/"):
            assert image.endswith(":" + FLWR_VERSION), f"{name}: {image}"
        else:
            assert svc["build"]["args"]["FLWR_VERSION"] == FLWR_VERSION, name
            assert svc["build"]["dockerfile"] == "docker/superexec.Dockerfile", name
        assert "--allow-runtime-dependency-installation" not in svc.get("command", []), name
        if name != "init-permissions":
            assert svc["restart"] == "unless-stopped", name
    for dockerfile in DOCKERFILES:
        assert f"ARG FLWR_VERSION={FLWR_VERSION}" in dockerfile.read_text(), dockerfile.name


def test_dockerfiles_copy_every_package_the_wheel_needs() -> None:
    with open(ROOT / "pyproject.toml", "rb") as f:
        packages = tomllib.load(f)["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        ignore = Path(str(dockerfile) + ".dockerignore").read_text().split()
        for pkg in packages:
            assert re.search(rf"^COPY .*\b{re.escape(pkg)} \./{re.escape(pkg)}$", text, re.M), f"{dockerfile.name}: {pkg}"
            assert f"!{pkg}/" in ignore, f"{dockerfile.name}.dockerignore must let {pkg}/ through"
        for meta in ("pyproject.toml", "README.md", "LICENSE"):
            assert meta in text and f"!{meta}" in ignore
        assert 'ENTRYPOINT ["flower-superexec"]' in text


# --- the overlays ---------------------------------------------------------------------------------

TLS_ONLY = {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--root-certificates",
            "--enable-supernode-auth", "--auth-supernode-private-key"}


def test_tls_overlay_restates_each_command_with_tls_instead_of_insecure() -> None:
    base, tls = services(BASE), services(TLS)
    insecure = {name for name, s in base.items() if "--insecure" in s.get("command", [])}
    assert insecure == set(tls) - {"init-permissions"}, "the overlay must cover every --insecure service"
    for name in insecure:
        b, t = flags(base[name]["command"]), flags(tls[name]["command"])
        assert "--insecure" not in t, name
        assert {k: v for k, v in b.items() if k != "--insecure"} == {k: v for k, v in t.items() if k not in TLS_ONLY}, name
        mounted = targets(tls[name])
        for k, v in t.items():
            if k in TLS_ONLY and isinstance(v, str):
                assert v in mounted, f"{name}: {k} {v} is not mounted by the overlay"
    link = flags(tls["superlink"]["command"])
    assert link["--enable-supernode-auth"] is True
    assert {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"} <= set(link)
    assert "https://localhost:8000/health" in " ".join(tls["superlink"]["healthcheck"]["test"])
    for i, node in supernodes(tls).items():
        f = flags(node["command"])
        assert f["--auth-supernode-private-key"] == f"/app/keys/supernode-{i}"
        assert f["--ssl-certfile"] == f"/app/certificates/supernode-{i}.pem"
        assert "https://localhost:9094/health" in " ".join(node["healthcheck"]["test"])
    assert not any("ca.key" in v for s in tls.values() for v in s.get("volumes", []) if not v.startswith("./deploy/certs:")), \
        "ca.key must not be mounted into a service"


def test_tls_overlay_mounts_exactly_what_the_scripts_generate(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: docker/gen-certs.sh needs it")
    n = len(supernodes(services(BASE)))
    subprocess.run([str(ROOT / "docker" / "gen-certs.sh"), str(tmp_path / "certs"), str(n)], check=True,
                   capture_output=True)
    subprocess.run([str(ROOT / "docker" / "gen-supernode-keys.sh"), str(tmp_path / "keys"), str(n)], check=True,
                   capture_output=True)
    generated = {f"./deploy/{p.relative_to(tmp_path)}" for p in tmp_path.rglob("*") if p.is_file()}
    sources = {volume(v)[0] for s in services(TLS).values() for v in s.get("volumes", [])}
    sources = {src for src in sources if src.startswith(("./deploy/certs/", "./deploy/keys/"))}
    assert sources, "the TLS overlay mounts no certificate or key files"
    assert sources <= generated, f"mounted but never generated: {sorted(sources - generated)}"


def test_gpu_overlay_gives_the_serverapp_the_cuda_image_and_a_gpu() -> None:
    gpu = services(GPU)
    assert set(gpu) == {"superexec-serverapp"}
    svc = gpu["superexec-serverapp"]
    assert svc["build"]["dockerfile"] == "docker/superexec-cuda.Dockerfile"
    assert svc["build"]["args"]["FLWR_VERSION"] == FLWR_VERSION
    (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]


# --- the scripts ----------------------------------------------------------------------------------


def test_gen_certs_issues_certificates_flower_can_use(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: docker/gen-certs.sh needs it")
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    out = tmp_path / "certs"
    subprocess.run([str(ROOT / "docker" / "gen-certs.sh"), str(out), "2"], check=True, capture_output=True)
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    expected = {"superlink": {"superlink", "localhost"}, "supernode-0": {"supernode-0", "localhost"},
                "supernode-1": {"supernode-1", "localhost"}}
    for name, dns in expected.items():
        cert = x509.load_pem_x509_certificate((out / f"{name}.pem").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert set(san.get_values_for_type(x509.DNSName)) == dns
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
        assert cert.issuer == ca.subject
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    before = (out / "superlink.pem").read_bytes()
    subprocess.run([str(ROOT / "docker" / "gen-certs.sh"), str(out), "3"], check=True, capture_output=True)
    assert (out / "superlink.pem").read_bytes() == before, "a rerun must keep existing certificates"
    assert (out / "supernode-2.pem").is_file()


def test_gen_supernode_keys_writes_keys_flower_accepts(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

    out = tmp_path / "keys"
    subprocess.run([str(ROOT / "docker" / "gen-supernode-keys.sh"), str(out), "2"], check=True, capture_output=True)
    for i in range(2):
        private = load_ssh_private_key((out / f"supernode-{i}").read_bytes(), None)  # as flower-supernode does
        public = load_ssh_public_key((out / f"supernode-{i}.pub").read_bytes())       # as `flwr supernode register`
        assert isinstance(private, ec.EllipticCurvePrivateKey) and uses_nist_ec_curve(public)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert (out / f"supernode-{i}").stat().st_mode & 0o077 == 0, "private keys must be owner-only"


# --- docs/deployment.md and deploy/flwr-config.toml ------------------------------------------------

SERVICE_WORD = re.compile(r"\b(superlink|superexec-serverapp|supernode-\d+|superexec-clientapp-\d+|init-permissions)\b")


def test_docs_name_exactly_the_compose_services_ports_and_volumes() -> None:
    docs = DOCS.read_text()
    svcs = services(BASE)
    n = len(supernodes(svcs))
    for name in svcs:
        if SUPERNODE.match(name) or CLIENT_EXEC.match(name):
            continue
        assert f"`{name}`" in docs, f"docs/deployment.md does not mention service {name}"
    assert f"`supernode-0` … `supernode-{n - 1}`" in docs
    assert f"`superexec-clientapp-0` … `superexec-clientapp-{n - 1}`" in docs
    assert f"num-partitions={n}" in docs and f"num-clients={n}" in docs
    # every service the docs' shell commands name exists
    for block in re.findall(r"```bash\n(.*?)```", docs, re.S):
        for line in block.splitlines():
            if line.startswith("docker compose"):
                for word in SERVICE_WORD.findall(line.split("#")[0]):
                    assert word in svcs, f"docs command names unknown service {word!r}: {line}"
    for target in ("/data", "/weights", "/server-data", "/results"):
        assert f"`{target}`" in docs
    assert "**8000** published" in docs and "9094" in docs
    link_args = " ".join(str(t) for t in svcs["superlink"]["command"] if t != "--insecure")
    assert link_args in docs, f"docs/deployment.md must show the SuperLink's flags: {link_args}"


def test_docs_connections_exist_in_the_config_example() -> None:
    docs = DOCS.read_text()
    with open(FLWR_CONFIG, "rb") as f:
        conns = tomllib.load(f)["superlink"]
    assert conns["docker"] == {"address": "127.0.0.1:8000", "insecure": True}
    assert conns["docker-tls"]["address"] == "127.0.0.1:8000" and conns["docker-tls"]["root-certificates"].startswith("/")
    used = set(re.findall(r"flwr (?:run \.|ls|log <run-id>|stop <run-id>) ([\w-]+)", docs))
    used |= set(re.findall(r"flwr supernode register \S+ ([\w-]+)", docs))
    assert used == {"docker", "docker-tls"}, used
    for name in used:
        assert f"[superlink.{name}]" in docs
