"""Real clouds: every AWS credential source, virtual-hosted buckets, errors that say what to fix.

Two independent S3 implementations: SeaweedFS (conftest's ``s3``) and moto's server
with IAM authentication on (signatures, keys, session tokens and policies checked) and
its STS.  The instance-metadata service (IMDSv2: token PUT, then GETs carrying it) and
the container-credentials endpoint are small servers of this file that hand out real
moto IAM keys, each deleted from moto when its announced expiry passes: a request
signed with an expired key fails for real.  A fake answers only where a fault must be
injected (an expired token, a skewed clock), beside the real-part tests.
"""

from __future__ import annotations

import datetime
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import S3_ENV, S3Server, free_ports

ALLOW_ALL = json.dumps({"Version": "2012-10-17",
                        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})
TRUST_ALL = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"AWS": "*", "Federated": "*"},
     "Action": ["sts:AssumeRole", "sts:AssumeRoleWithWebIdentity"]}]})


class Moto:
    """moto's server on a free loopback port; IAM authentication switched on after setup."""

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
        self.port = free_ports(1)[0]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "moto.log", "ab")
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=self.log,
                                     stderr=self.log, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"moto_server did not start; see {workdir / 'moto.log'}") from None
                time.sleep(0.2)
        self.admin = ("admin-setup", "admin-setup")  # any key works until authentication is on
        iam = self.client("iam")
        iam.create_user(UserName="cubefs")
        iam.put_user_policy(UserName="cubefs", PolicyName="all", PolicyDocument=ALLOW_ALL)
        key = iam.create_access_key(UserName="cubefs")["AccessKey"]
        self.user_key = (key["AccessKeyId"], key["SecretAccessKey"])
        iam.create_user(UserName="powerless")  # no policy: authenticated, allowed nothing
        key = iam.create_access_key(UserName="powerless")["AccessKey"]
        self.powerless_key = (key["AccessKeyId"], key["SecretAccessKey"])
        self.role_arn = iam.create_role(RoleName="cubefs-node", AssumeRolePolicyDocument=TRUST_ALL)["Role"]["Arn"]
        iam.put_role_policy(RoleName="cubefs-node", PolicyName="all", PolicyDocument=ALLOW_ALL)
        for i in range(3):  # the rotator's users: one live key each
            iam.create_user(UserName=f"rotating-{i}")
            iam.put_user_policy(UserName=f"rotating-{i}", PolicyName="all", PolicyDocument=ALLOW_ALL)
        self.admin = self.user_key
        self.reset_auth(0)

    def client(self, service: str, region: str = "us-east-1") -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(service, endpoint_url=self.endpoint, region_name=region,
                            aws_access_key_id=self.admin[0], aws_secret_access_key=self.admin[1],
                            config=Config(s3={"addressing_style": "path"}))

    def reset_auth(self, free_requests: int) -> None:
        """Authentication for every request after the next ``free_requests``."""
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=str(free_requests).encode(),
                                     method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=20)
        self.log.close()


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    server = Moto(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


class Rotator:
    """Hands out real moto IAM keys that expire after ``life`` seconds: a new key once the
    current one is past 40% of its life (as IMDS rotates ahead of expiry), and each key
    deleted from moto when its expiry passes."""

    def __init__(self, moto: Moto, life: float) -> None:
        self.iam = moto.client("iam")
        self.life = life
        self.issued: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self._lock = threading.Lock()
        self._timers: list[threading.Timer] = []

    def current(self) -> dict[str, Any]:
        with self._lock:
            now = time.time()
            if not self.issued or self.issued[-1]["expires"] - now < 0.6 * self.life:
                user = f"rotating-{len(self.issued) % 3}"
                key = self.iam.create_access_key(UserName=user)["AccessKey"]
                entry = {"user": user, "id": key["AccessKeyId"], "secret": key["SecretAccessKey"],
                         "expires": now + self.life}
                self.issued.append(entry)
                timer = threading.Timer(self.life, self._expire, args=(entry,))
                timer.daemon = True
                timer.start()
                self._timers.append(timer)
            e = self.issued[-1]
        stamp = datetime.datetime.fromtimestamp(e["expires"], datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"AccessKeyId": e["id"], "SecretAccessKey": e["secret"], "Token": "", "Expiration": stamp}

    def _expire(self, entry: dict[str, Any]) -> None:
        self.iam.delete_access_key(UserName=entry["user"], AccessKeyId=entry["id"])
        self.deleted.append(entry["id"])

    def close(self) -> None:
        for t in self._timers:
            t.cancel()
        for e in self.issued:
            if e["id"] not in self.deleted:
                self._expire(e)


class CredentialServer(http.server.ThreadingHTTPServer):
    """IMDSv2 (``/latest/api/token`` PUT, then GETs with the token) and the container
    credentials endpoint (``/creds`` with an Authorization header), on loopback."""

    daemon_threads = True

    def __init__(self, rotator: Rotator, container_token: str = "container-secret") -> None:
        self.rotator = rotator
        self.container_token = container_token
        self.imds_token = "imds-token-" + os.urandom(8).hex()
        self.token_puts = self.credential_gets = self.refused = 0
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: CredentialServer

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: str, ctype: str = "text/plain") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            self.server.token_puts += 1
            return self._send(200, self.server.imds_token)
        self._send(400, "bad request")

    def do_GET(self) -> None:
        s = self.server
        if self.path == "/creds":
            if self.headers.get("Authorization") != s.container_token:
                s.refused += 1
                return self._send(403, "{}")
            s.credential_gets += 1
            return self._send(200, json.dumps(s.rotator.current()), "application/json")
        if self.headers.get("X-aws-ec2-metadata-token") != s.imds_token:  # IMDSv2 only
            s.refused += 1
            return self._send(401, "")
        if self.path == "/latest/meta-data/iam/security-credentials/":
            return self._send(200, "cubefs-node")
        if self.path == "/latest/meta-data/iam/security-credentials/cubefs-node":
            s.credential_gets += 1
            body = {"Code": "Success", "Type": "AWS-HMAC", "LastUpdated": "2026-01-01T00:00:00Z",
                    **s.rotator.current()}
            return self._send(200, json.dumps(body), "application/json")
        self._send(404, "")


@pytest.fixture
def rotator(moto: Moto) -> Iterator[Rotator]:
    r = Rotator(moto, life=12.0)
    yield r
    r.close()


@pytest.fixture
def cred_server(rotator: Rotator) -> Iterator[CredentialServer]:
    server = CredentialServer(rotator)
    yield server
    server.close()


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No AWS_* from the test runner, no ~/.aws, no real instance metadata: only what a test gives."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), AWS_CONFIG_FILE=str(home / "aws-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(home / "aws-credentials"), AWS_EC2_METADATA_DISABLED="true",
               AWS_DEFAULT_REGION="us-east-1")
    env.update(extra)
    return env


def cubefs(env: dict[str, str], *args: str, check: bool = True, timeout: float = 120,
           netns_hosts: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "cubefs", *args]
    if netns_hosts is not None:  # a private /etc/hosts for this command only (a mount namespace of its own)
        cmd = ["unshare", "-m", "sh", "-c", f'mount --bind {netns_hosts} /etc/hosts && exec "$@"', "sh", *cmd]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"cubefs {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res


def small_tree(tmp_path: Path, files: int = 3, size: int = 50_000) -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    for i in range(files):
        (src / f"f{i:03d}").write_bytes(os.urandom(size))
    return src


def build_and_list(env: dict[str, str], src: Path, store: str, endpoint: str, tag: str = "app:1",
                   *extra: str, netns_hosts: Path | None = None) -> None:
    """Write (build: bucket check, PUTs) and read back (verify: LIST, GETs) with these credentials."""
    cubefs(env, "build", str(src), "--tag", tag, "--store", store, "--s3-endpoint", endpoint, *extra,
           netns_hosts=netns_hosts)
    res = cubefs(env, "images", "--store", store, "--s3-endpoint", endpoint, "--json", *extra,
                 netns_hosts=netns_hosts)
    assert tag in [i["ref"] for i in json.loads(res.stdout)]
    cubefs(env, "verify", tag, "--store", store, "--s3-endpoint", endpoint, *extra, netns_hosts=netns_hosts)


def source_logged(res: subprocess.CompletedProcess[str]) -> str:
    for line in res.stderr.splitlines():
        if "AWS credentials from " in line:
            return line.split("AWS credentials from ", 1)[1].split(" ")[0]
    return ""


# --- the cheap path: env and plain keys, no botocore ---------------------------------------------

def test_env_and_static_profile_keys_never_import_botocore(s3: S3Server, tmp_path: Path) -> None:
    src = small_tree(tmp_path)
    env = clean_env(tmp_path, **{k: v for k, v in S3_ENV.items()})
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "cubefs", "build", str(src), "--tag", "c:1",
                          "--store", s3.store("cheap"), "--s3-endpoint", s3.endpoint],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "botocore" not in res.stderr
    # the same keys from a profile of ~/.aws/credentials, chosen by AWS_PROFILE
    env = clean_env(tmp_path, AWS_PROFILE="weed")
    Path(env["AWS_SHARED_CREDENTIALS_FILE"]).write_text(
        f"[weed]\naws_access_key_id = {S3_ENV['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {S3_ENV['AWS_SECRET_ACCESS_KEY']}\n")
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "cubefs", "-v", "images", "--store",
                          s3.store("cheap"), "--s3-endpoint", s3.endpoint], env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and "c:1" in res.stdout, res.stderr
    assert "botocore" not in res.stderr


# --- every source of the chain, against moto with authentication on ------------------------------

def test_web_identity_token_file(moto: Moto, tmp_path: Path) -> None:
    """EKS/IRSA: a token file and a role; botocore calls STS AssumeRoleWithWebIdentity (unsigned,
    as in AWS: the only request moto lets through unauthenticated), then S3 is signed with the
    session it returned."""
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl")
    env = clean_env(tmp_path, AWS_WEB_IDENTITY_TOKEN_FILE=str(token), AWS_ROLE_ARN=moto.role_arn,
                    AWS_ROLE_SESSION_NAME="cubefs-test", AWS_ENDPOINT_URL_STS=moto.endpoint)
    src = small_tree(tmp_path)
    try:
        moto.reset_auth(1)
        res = cubefs(env, "-v", "build", str(src), "--tag", "wi:1", "--store", "s3://moto-wi/img",
                     "--s3-endpoint", moto.endpoint)
    finally:
        moto.reset_auth(0)
    assert source_logged(res) == "assume-role-with-web-identity", res.stderr
    # without the token file's role, the same store refuses: authentication really is on
    env.pop("AWS_WEB_IDENTITY_TOKEN_FILE")
    bad = cubefs(env, "images", "--store", "s3://moto-wi/img", "--s3-endpoint", moto.endpoint, check=False)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_credential_process_on_both_servers(moto: Moto, s3: S3Server, tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    for name, (key, secret), endpoint, store in (
        ("moto", moto.user_key, moto.endpoint, "s3://moto-proc/p"),
        ("weed", (S3_ENV["AWS_ACCESS_KEY_ID"], S3_ENV["AWS_SECRET_ACCESS_KEY"]), s3.endpoint, s3.store("proc")),
    ):
        script = tmp_path / f"creds-{name}.sh"
        body = json.dumps({"Version": 1, "AccessKeyId": key, "SecretAccessKey": secret})
        script.write_text(f"#!/bin/sh\necho x >> {calls}\ncat <<'EOF'\n{body}\nEOF\n")
        script.chmod(0o700)
        (tmp_path / name).mkdir()
        env = clean_env(tmp_path / name, AWS_PROFILE="proc")
        Path(env["AWS_CONFIG_FILE"]).write_text(f"[profile proc]\ncredential_process = {script}\n")
        res = cubefs(env, "-v", "build", str(small_tree(tmp_path)), "--tag", "proc:1", "--store", store,
                     "--s3-endpoint", endpoint)
        assert source_logged(res) == "custom-process", res.stderr
        cubefs(env, "verify", "proc:1", "--store", store, "--s3-endpoint", endpoint)
    assert len(calls.read_text().split()) == 4  # once per command, not per request


def test_assume_role_profile_chain(moto: Moto, tmp_path: Path) -> None:
    """source_profile → role_arn: botocore signs STS AssumeRole with the base profile's keys
    (moto checks that signature and the role's trust), and S3 gets the role's session."""
    env = clean_env(tmp_path, AWS_PROFILE="node", AWS_ENDPOINT_URL_STS=moto.endpoint)
    Path(env["AWS_SHARED_CREDENTIALS_FILE"]).write_text(
        f"[base]\naws_access_key_id = {moto.user_key[0]}\naws_secret_access_key = {moto.user_key[1]}\n")
    Path(env["AWS_CONFIG_FILE"]).write_text(
        f"[profile node]\nrole_arn = {moto.role_arn}\nsource_profile = base\nregion = us-east-1\n")
    src = small_tree(tmp_path)
    res = cubefs(env, "-v", "build", str(src), "--tag", "ar:1", "--store", "s3://moto-ar/img",
                 "--s3-endpoint", moto.endpoint)
    assert source_logged(res) == "assume-role", res.stderr
    cubefs(env, "verify", "ar:1", "--store", "s3://moto-ar/img", "--s3-endpoint", moto.endpoint)
    # a base profile with a wrong secret: STS refuses, one line that names the way out
    Path(env["AWS_SHARED_CREDENTIALS_FILE"]).write_text(
        f"[base]\naws_access_key_id = {moto.user_key[0]}\naws_secret_access_key = wrong\n")
    bad = cubefs(env, "images", "--store", "s3://moto-ar/img", "--s3-endpoint", moto.endpoint, check=False)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "cannot get AWS credentials" in bad.stderr and "profile" in bad.stderr


def test_container_credentials(moto: Moto, cred_server: CredentialServer, tmp_path: Path) -> None:
    env = clean_env(tmp_path, AWS_CONTAINER_CREDENTIALS_FULL_URI=f"{cred_server.url}/creds",
                    AWS_CONTAINER_AUTHORIZATION_TOKEN=cred_server.container_token)
    src = small_tree(tmp_path)
    res = cubefs(env, "-v", "build", str(src), "--tag", "ct:1", "--store", "s3://moto-ct/img",
                 "--s3-endpoint", moto.endpoint)
    assert source_logged(res) == "container-role", res.stderr
    assert cred_server.credential_gets >= 1 and cred_server.refused == 0


def test_instance_metadata_v2(moto: Moto, cred_server: CredentialServer, tmp_path: Path) -> None:
    env = clean_env(tmp_path, AWS_EC2_METADATA_SERVICE_ENDPOINT=cred_server.url, AWS_EC2_METADATA_DISABLED="false")
    src = small_tree(tmp_path)
    res = cubefs(env, "-v", "build", str(src), "--tag", "md:1", "--store", "s3://moto-md/img",
                 "--s3-endpoint", moto.endpoint)
    assert source_logged(res) == "iam-role", res.stderr
    assert cred_server.token_puts >= 1 and cred_server.credential_gets >= 1
    assert cred_server.refused == 0  # every GET carried the session token (IMDSv2)


def test_credentials_expire_during_a_mount_and_are_refreshed(moto: Moto, rotator: Rotator,
                                                             cred_server: CredentialServer, tmp_path: Path) -> None:
    """A mount on container credentials that live 12 s, each key deleted from moto when it
    expires; 30 s of reads from the store (no disk cache) see no failed request, no retry.
    (Container, not instance, credentials: botocore stretches instance credentials that are
    under 12-20 minutes from expiry, its "static stability" for an IMDS outage.)"""
    store = "s3://moto-long/img"
    builder = clean_env(tmp_path, AWS_ACCESS_KEY_ID=moto.user_key[0], AWS_SECRET_ACCESS_KEY=moto.user_key[1])
    src = small_tree(tmp_path, files=40, size=64_000)
    cubefs(builder, "build", str(src), "--tag", "long:1", "--store", store, "--s3-endpoint", moto.endpoint)
    env = clean_env(tmp_path, AWS_CONTAINER_CREDENTIALS_FULL_URI=f"{cred_server.url}/creds",
                    AWS_CONTAINER_AUTHORIZATION_TOKEN=cred_server.container_token)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cubefs(env, "mount", "long:1", str(mnt), "--store", store, "--s3-endpoint", moto.endpoint, "--cache-dir",
           str(tmp_path / "cache"), "--cache-size", "0", "--memory-cache", "1M", "--pack-readahead", "0",
           "--readahead", "0", "--dir-prefetch", "0", "--no-prefetch")  # every read a GET, for 30 s
    try:
        t0 = time.monotonic()
        names = sorted(os.listdir(src))
        i = 0
        while time.monotonic() - t0 < 30:
            name = names[i % len(names)]
            assert (mnt / name).read_bytes() == (src / name).read_bytes()
            i += 1
            time.sleep(0.7)
        stats = json.loads(cubefs(env, "stats", str(mnt), "--json").stdout)
        text = cubefs(env, "stats", str(mnt)).stdout
    finally:
        cubefs(env, "umount", str(mnt), check=False)
    assert stats["read_errors"] == 0
    assert stats["store_requests"]["failures"] == 0 and stats["store_requests"]["retries"] == 0, stats
    assert stats["store_requests"]["gets"] >= 20
    creds = stats["store_info"]["credentials"]
    assert creds["source"] == "container-role" and creds["refreshes"] >= 2, creds
    assert "credentials from container-role" in text
    assert len(rotator.deleted) >= 2  # keys the mount had used really stopped working meanwhile
    # ... really: a key past its expiry is refused by moto
    expired = next(e for e in rotator.issued if e["id"] in rotator.deleted)
    bad = cubefs(clean_env(tmp_path, AWS_ACCESS_KEY_ID=expired["id"], AWS_SECRET_ACCESS_KEY=expired["secret"]),
                 "images", "--store", store, "--s3-endpoint", moto.endpoint, check=False)
    assert bad.returncode != 0 and "InvalidAccessKeyId" in bad.stderr, bad.stderr


# --- addressing ----------------------------------------------------------------------------------

def _hosts(tmp_path: Path, *names: str) -> Path:
    path = tmp_path / "hosts"
    path.write_text("127.0.0.1 localhost " + " ".join(names) + "\n")
    return path


def test_virtual_hosted_addressing_aws_and_cos_names(moto: Moto, tmp_path: Path) -> None:
    """Endpoints named like AWS and COS (resolving to moto in a private /etc/hosts): auto picks
    virtual-hosted style and the region in the name; moto answers virtual-hosted requests only
    when the Host header names the bucket, so a path-style request would go to another bucket."""
    env = clean_env(tmp_path, AWS_ACCESS_KEY_ID=moto.user_key[0], AWS_SECRET_ACCESS_KEY=moto.user_key[1])
    env.pop("AWS_DEFAULT_REGION")
    aws, cos = "s3.eu-west-1.amazonaws.com", "cos.ap-guangzhou.myqcloud.com"
    hosts = _hosts(tmp_path, aws, f"vh-aws.{aws}", cos, f"imgs-1250000000.{cos}", "s3.test", "vh-any.s3.test")
    moto.client("s3").create_bucket(Bucket="imgs-1250000000")
    src = small_tree(tmp_path)
    for endpoint, store in ((f"http://{aws}:{moto.port}", "s3://vh-aws/img"),
                            (f"http://{cos}:{moto.port}", "s3://imgs-1250000000/img")):
        build_and_list(env, src, store, endpoint, netns_hosts=hosts)
    keys = {o["Key"] for o in moto.client("s3").list_objects_v2(Bucket="imgs-1250000000")["Contents"]}
    assert any(k.startswith("img/") for k in keys)
    # any other name: path style unless asked (the flag, or the environment)
    build_and_list(env, src, "s3://vh-any/img", f"http://s3.test:{moto.port}", "app:1",
                   "--s3-addressing", "virtual", netns_hosts=hosts)
    res = cubefs({**env, "AWS_S3_ADDRESSING_STYLE": "sideways"}, "images", "--store", "s3://x",
                 "--s3-endpoint", moto.endpoint, check=False)
    assert res.returncode == 2 and "sideways" in res.stderr


def test_region_discovered_from_the_bucket(moto: Moto, tmp_path: Path) -> None:
    moto.client("s3", "eu-central-1").create_bucket(
        Bucket="regional", CreateBucketConfiguration={"LocationConstraint": "eu-central-1"})
    env = clean_env(tmp_path, AWS_ACCESS_KEY_ID=moto.user_key[0], AWS_SECRET_ACCESS_KEY=moto.user_key[1])
    env.pop("AWS_DEFAULT_REGION")
    res = cubefs(env, "-v", "build", str(small_tree(tmp_path)), "--tag", "r:1", "--store", "s3://regional/x",
                 "--s3-endpoint", moto.endpoint)
    assert "bucket region eu-central-1" in res.stderr, res.stderr


# --- errors: one line that says what to fix ------------------------------------------------------

def _one_line(res: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert res.returncode == code, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_service_errors_are_one_line_saying_what_to_fix(moto: Moto, s3: S3Server, tmp_path: Path) -> None:
    weed = clean_env(tmp_path, **S3_ENV)
    _one_line(cubefs(weed, "images", "--store", s3.store("no-such-bucket-here"), "--s3-endpoint", s3.endpoint,
                     check=False), 5, "does not exist", "create it")
    _one_line(cubefs({**weed, "AWS_SECRET_ACCESS_KEY": "wrong"}, "images", "--store", s3.store("iso"),
                     "--s3-endpoint", s3.endpoint, check=False), 5, "SignatureDoesNotMatch", "AWS_SECRET_ACCESS_KEY")
    motoenv = clean_env(tmp_path, AWS_ACCESS_KEY_ID=moto.powerless_key[0], AWS_SECRET_ACCESS_KEY=moto.powerless_key[1])
    moto.client("s3").create_bucket(Bucket="denied")
    _one_line(cubefs(motoenv, "images", "--store", "s3://denied/x", "--s3-endpoint", moto.endpoint, check=False),
              5, "access denied", "AccessDenied", "s3:GetObject")
    _one_line(cubefs({**motoenv, "AWS_ACCESS_KEY_ID": "AKIANOTAKEY000000000"}, "images", "--store", "s3://denied/x",
                     "--s3-endpoint", moto.endpoint, check=False), 5, "InvalidAccessKeyId", "check the key")


class _FaultServer(http.server.ThreadingHTTPServer):
    """Answers every request with one S3 error: only for faults no real server can be made to give."""

    daemon_threads = True

    def __init__(self, status: int, code: str, date_offset: float = 0.0) -> None:
        self.status, self.code, self.date_offset = status, code, date_offset
        super().__init__(("127.0.0.1", 0), _FaultHandler)
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _FaultHandler(http.server.BaseHTTPRequestHandler):
    server: _FaultServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = f"<Error><Code>{self.server.code}</Code><Message>x</Message></Error>".encode()
        self.send_response(self.server.status)
        self.send_header("Date", self.date_time_string(time.time() + self.server.date_offset))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = _answer


@pytest.mark.parametrize(("status", "code", "offset", "words"), [
    (400, "ExpiredToken", 0, ("has expired", "renew it")),
    (403, "RequestTimeTooSkewed", 3600, ("clock is off by 3", "behind the store's", "synchronize it")),  # 3599-3600 s
])
def test_faults_no_real_server_gives(tmp_path: Path, status: int, code: str, offset: float,
                                     words: tuple[str, ...]) -> None:
    server = _FaultServer(status, code, offset)
    try:
        env = clean_env(tmp_path, AWS_ACCESS_KEY_ID="AKIAEXAMPLE", AWS_SECRET_ACCESS_KEY="s",
                        AWS_SESSION_TOKEN="old-session")
        res = cubefs(env, "images", "--store", "s3://b/x", "--s3-endpoint", server.endpoint, check=False)
        _one_line(res, 5, *words)
    finally:
        server.shutdown()
        server.server_close()


def test_addressing_rules() -> None:
    """What auto picks, without a network: the cases above depend on these."""
    from cubefs.remote.addressing import choose, region_from_host

    assert choose("https://s3.eu-west-1.amazonaws.com", "imgs", "auto").endpoint == \
        "https://imgs.s3.eu-west-1.amazonaws.com"
    assert choose("https://cos.ap-guangzhou.myqcloud.com", "imgs-1250000000", "auto").virtual
    assert not choose("https://s3.eu-west-1.amazonaws.com", "my.dotted.bucket", "auto").virtual  # TLS name
    assert not choose("http://127.0.0.1:8333", "imgs", "auto").virtual
    assert not choose("http://minio.lan:9000", "imgs", "auto").virtual
    assert choose("http://minio.lan:9000", "imgs", "path").bucket_path == "/imgs"
    assert region_from_host("s3.eu-west-1.amazonaws.com") == "eu-west-1"
    assert region_from_host("bkt.s3.dualstack.us-west-2.amazonaws.com") == "us-west-2"
    assert region_from_host("cos.ap-guangzhou.myqcloud.com") == "ap-guangzhou"
    assert region_from_host("s3.amazonaws.com") is None
