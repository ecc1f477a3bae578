"""Checkpoints and logs reach an S3 bucket and come back from it, through the server's faults.

The server is real: moto's standalone S3 server, its own process on a free loopback port, which boto3 reaches through
endpoint_url. Never a mock object, never AWS. Its outage is real too: a relay the test cuts stands between the two.
"""

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
import torch
from helpers import ROOT, losses, make_config, torchrun

from smollm2 import remote
from smollm2.checkpoint import checkpoint_name, list_checkpoints, load_checkpoint, rotate_checkpoints, save_atomic
from smollm2.config import S3Args
from smollm2.errors import CheckpointError
from smollm2.loading import load_model

BUCKET = "smollm2-runs"
CHECKPOINTS = [checkpoint_name(s) for s in (4, 8, 12)]   # make_config: 12 steps, a checkpoint every 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    port: int
    env: dict        # for train.py: the test keys, none of this machine's own AWS settings
    key_id: str
    secret: str
    guarded: str     # the URL of a second server that checks signatures and policies
    stranger: dict   # keys that server knows, of a user with no right on its bucket

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id=self.key_id,
                            aws_secret_access_key=self.secret)

    def object(self, key: str) -> bytes:
        return self.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def keys(self, prefix: str) -> set[str]:
        return {o["Key"] for o in self.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Two S3 servers, each its own process. The tests' own takes any signed request (moto's default). The guarded one
    lets its first 3 requests in unsigned, to create a bucket and a user with no right on it, and then checks every
    signature and policy: it shows access denied. (Checking everywhere is not an option: with it, moto 5.2 refuses
    ListObjectsV2 with a '/' in the prefix, getmoto/moto#5948.)"""
    folder = tmp_path_factory.mktemp("s3servers")
    log = open(folder / "servers.log", "wb")
    ports, procs = [free_port(), free_port()], []
    for port, extra in zip(ports, ({}, {"INITIAL_NO_AUTH_ACTION_COUNT": "3"})):
        procs.append(subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                      stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **extra}))
    try:
        deadline = time.time() + 60
        for port, proc in zip(ports, procs):
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert proc.poll() is None and time.time() < deadline, (folder / "servers.log").read_text()
                    time.sleep(0.1)
        key_id, secret = "AKIASMOLLM2TESTKEY01", "smollm2-test-secret-that-must-never-be-written"
        clients = [dict(endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1", aws_access_key_id=key_id,
                        aws_secret_access_key=secret) for port in ports]
        for args in clients:
            boto3.client("s3", **args).create_bucket(Bucket=BUCKET)
        iam = boto3.client("iam", **clients[1])
        iam.create_user(UserName="stranger")
        stranger = iam.create_access_key(UserName="stranger")["AccessKey"]
        nowhere = str(folder / "no-aws-config")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret, AWS_DEFAULT_REGION="us-east-1",
                   AWS_CONFIG_FILE=nowhere, AWS_SHARED_CREDENTIALS_FILE=nowhere, AWS_EC2_METADATA_DISABLED="true",
                   AWS_MAX_ATTEMPTS="1")   # one try per request: a fault shows at once, and our own retries act
        yield Server(ports[0], env, key_id, secret, f"http://127.0.0.1:{ports[1]}",
                     {"AWS_ACCESS_KEY_ID": stranger["AccessKeyId"],
                      "AWS_SECRET_ACCESS_KEY": stranger["SecretAccessKey"]})
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def aws_env(server, monkeypatch):
    """This process's environment as train.py's, for tests that drive remote.py directly."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in server.env.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)


class Proxy:
    """A TCP relay in front of the server, for its faults. cut(): the server is down, its port refuses connections.
    hang(): the server is stuck (as under SIGSTOP), it accepts connections and never answers. Either way the open
    connections are reset. restore() ends the fault; the server behind, and what it stores, live on as S3 does."""

    def __init__(self, target: int):
        self.target, self.port = target, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener, self.hung = None, False
        self.restore()

    def _reset_open(self) -> None:
        with self.lock:
            for s in self.open:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # close with a reset
                try:
                    s.shutdown(socket.SHUT_RDWR)   # wakes the relay threads reading it
                except OSError:
                    pass
                s.close()
            self.open.clear()

    def restore(self) -> None:
        self.hung = False
        self._reset_open()
        if self.listener is None:
            self.listener = socket.create_server(("127.0.0.1", self.port))
            self.listener.settimeout(0.1)
            threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self) -> None:
        self.listener.close()
        self.listener = None
        self._reset_open()

    def hang(self) -> None:
        self.hung = True
        self._reset_open()

    def _accept(self, listener: socket.socket) -> None:
        while listener is self.listener:
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.open.append(client)
                if self.hung:   # held open, never answered
                    continue
                upstream = socket.create_connection(("127.0.0.1", self.target))
                self.open.append(upstream)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class Output:
    """A running process's stdout and stderr, read line by line by a thread, so a test can act on what it says."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()

    def index(self, text: str) -> int:
        return next((i for i, line in enumerate(self.lines) if text in line), -1)

    def wait_for(self, text: str, timeout: float = 180) -> int:
        with self.cond:
            assert self.cond.wait_for(lambda: self.index(text) >= 0, timeout), \
                f"no line with {text!r} after {timeout}s:\n" + "".join(self.lines[-40:])
            return self.index(text)


def s3_config(tmp: Path, code_corpus: Path, endpoint: str, prefix: str, **overrides) -> Path:
    s3 = {"bucket": BUCKET, "prefix": prefix, "region": "us-east-1", "endpoint_url": endpoint}
    return make_config(tmp, code_corpus, s3={**s3, **overrides.pop("s3", {})}, **overrides)


def train(config: Path, env: dict, *args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(config), *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, f"train.py exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def uploaded(server, code_corpus, tmp_path_factory):
    """A finished 12-step run that uploaded to s3://BUCKET/a: (its run dir, its completed process)."""
    tmp = tmp_path_factory.mktemp("uploaded")
    return tmp / "run", train(s3_config(tmp, code_corpus, server.url, "a"), server.env)


def test_a_run_uploads_every_checkpoint_and_its_logs_byte_for_byte(uploaded, server):
    run, proc = uploaded
    names = [f"checkpoints/{c}" for c in CHECKPOINTS] + ["metrics.jsonl", "loss.png", "config.yaml", "tokenizer.json"]
    assert server.keys("a/") == {f"a/{name}" for name in names}   # and the start-up write check cleaned up after itself
    for name in names:
        assert server.object(f"a/{name}") == (run / name).read_bytes(), name
    assert proc.stdout.count("size and sha256 verified") == 3
    assert "s3: every file is in s3://smollm2-runs/a" in proc.stdout


def test_no_credential_is_printed_or_written_to_a_log_checkpoint_or_object(uploaded, server):
    run, proc = uploaded
    files = [p.read_bytes() for p in run.rglob("*") if p.is_file()] + [server.object(k) for k in server.keys("a/")]
    for secret in (server.secret, server.key_id):
        assert secret not in proc.stdout + proc.stderr
        assert not [f for f in files if secret.encode() in f]


@pytest.mark.parametrize("how", ["url", "bare"])
def test_resume_from_the_bucket_on_an_empty_machine_reproduces_the_uninterrupted_losses(
        uploaded, server, code_corpus, tmp_path, how):
    run, _ = uploaded
    prefix = f"killed-{how}"
    s3 = server.client()
    for name in CHECKPOINTS[:2]:   # the bucket as a run killed after its step-8 upload left it
        s3.copy_object(Bucket=BUCKET, Key=f"{prefix}/checkpoints/{name}",
                       CopySource={"Bucket": BUCKET, "Key": f"a/checkpoints/{name}"})
    # its log went up a moment later than the checkpoint, with step 9 in it: the resumed run drops and redoes that
    log = [line for line in (run / "metrics.jsonl").read_text().splitlines(True) if json.loads(line)["step"] <= 9]
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/metrics.jsonl", Body="".join(log).encode())
    config = s3_config(tmp_path, code_corpus, server.url, prefix)
    # `--resume s3://bucket/prefix`, or a bare `--resume`: the run dir has no checkpoint, the bucket has
    proc = train(config, server.env, *(["--resume", f"s3://{BUCKET}/{prefix}"] if how == "url" else ["--resume"]))
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / CHECKPOINTS[1]} at step 8" in proc.stdout
    assert losses(tmp_path / "run") == losses(run)   # bitwise, the log's first 8 steps from the bucket
    assert losses(tmp_path / "run", "val") == losses(run, "val")
    assert f"{prefix}/checkpoints/{CHECKPOINTS[2]}" in server.keys(prefix)


def test_training_goes_on_while_the_server_is_down_and_every_checkpoint_arrives_after(server, code_corpus, tmp_path):
    proxy = Proxy(server.port)
    config = s3_config(tmp_path, code_corpus, proxy.url, "outage", **{"run.keep_last_checkpoints": 1})
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(config)], cwd=ROOT,
                            env=server.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = Output(proc)
    try:
        out.wait_for("is reachable and writable")   # the start-up check passed: now the server goes down
        proxy.cut()
        waiting = out.wait_for("s3: waiting for")      # training is over, its uploads are not
        held = {p.name: p.read_bytes() for p in list_checkpoints(tmp_path / "run")}
        proxy.restore()
        assert proc.wait(timeout=180) == 0, "".join(out.lines[-40:])
    finally:
        proc.kill()
        proxy.cut()
    text = "".join(out.lines)
    assert 0 <= out.index("step 12/12") < waiting, "training waited for the network"
    assert "warning: s3: upload of outage/" in text and "uploads are behind" in text
    assert sorted(held) == CHECKPOINTS, "rotation (keep 1) deleted a checkpoint not yet uploaded"
    for name, data in held.items():
        assert server.object(f"outage/checkpoints/{name}") == data
    assert server.object("outage/metrics.jsonl") == (tmp_path / "run" / "metrics.jsonl").read_bytes()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == CHECKPOINTS[2:], "uploaded, then rotated"


def test_a_stuck_server_never_blocks_the_loop_and_what_waits_stays_on_disk(server, aws_env, tmp_path, monkeypatch,
                                                                           capsys):
    proxy = Proxy(server.port)
    monkeypatch.setattr(remote, "MAX_WAITING_CHECKPOINTS", 2)
    up = remote.Uploader(S3Args(bucket=BUCKET, prefix="stuck", endpoint_url=proxy.url), tmp_path, keep_last=1)
    proxy.hang()
    paths = [tmp_path / "checkpoints" / checkpoint_name(s) for s in (1, 2, 3)]
    for i, path in enumerate(paths):
        save_atomic({"step": torch.tensor(i + 1)}, path)
        start = time.perf_counter()
        up.add_checkpoint(path)
        assert time.perf_counter() - start < 0.1, "add_checkpoint waited for the network"
        rotate_checkpoints(tmp_path, 1, spare=up.is_pending)
        while i == 0 and up.current is None:   # step 1's upload is under way, and stuck: it cannot be given up
            time.sleep(0.01)
    err = capsys.readouterr().err
    assert "stuck/checkpoints/step_00000002.pt is given up" in err and "uploads are behind" in err
    assert list_checkpoints(tmp_path) == paths[::2], "1, uploading, and 3, the newest, kept; 2, given up, rotated out"
    assert not up.finish(stall_timeout=2)
    err = capsys.readouterr().err
    assert "gave up after 2s without progress" in err and "step_00000001.pt" in err and "step_00000003.pt" in err
    proxy.restore()   # the stuck connection is reset: that try fails, the next one goes through
    assert up.finish()
    assert server.keys("stuck/") == {f"stuck/checkpoints/{p.name}" for p in paths[::2]}
    assert list_checkpoints(tmp_path) == paths[2:], "step 1, once uploaded, rotated out"
    proxy.cut()


def test_a_large_file_goes_up_multipart_and_is_verified(server, aws_env, tmp_path):
    path = tmp_path / "checkpoints" / checkpoint_name(1)
    path.parent.mkdir()
    data = os.urandom(11 * 2**20)
    path.write_bytes(data)
    up = remote.Uploader(S3Args(bucket=BUCKET, prefix="big", endpoint_url=server.url), tmp_path, part_size=5 * 2**20)
    up.add_checkpoint(path)
    assert up.finish()
    head = server.client().head_object(Bucket=BUCKET, Key=f"big/checkpoints/{path.name}")
    assert head["ETag"].strip('"').endswith("-3")   # 5 + 5 + 1 MiB
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert server.object(f"big/checkpoints/{path.name}") == data


def test_the_upload_flags_choose_what_goes_up_and_a_half_written_record_does_not(server, aws_env, tmp_path):
    records = [{"kind": "train", "step": 1}, {"kind": "sample", "step": 1, "text": "def f"}, {"kind": "val", "step": 1},
               {"kind": "eval", "step": 1, "task": "hellaswag", "scores": {"acc": 0.3}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "tra')
    (tmp_path / "loss.png").write_bytes(b"a plot")
    path = tmp_path / "checkpoints" / checkpoint_name(1)
    save_atomic({"step": torch.tensor(1)}, path)
    s3 = S3Args(bucket=BUCKET, prefix="flags", endpoint_url=server.url, upload_checkpoints=False, upload_metrics=False,
                upload_plots=False, upload_samples=True)
    up = remote.Uploader(s3, tmp_path)
    up.add_checkpoint(path)
    assert up.finish()
    assert server.keys("flags/") == {"flags/samples.jsonl"}
    assert [json.loads(line) for line in server.object("flags/samples.jsonl").splitlines()] == [records[1]]


def test_generate_and_load_model_read_a_checkpoint_straight_from_the_bucket(uploaded, server, aws_env, tmp_path,
                                                                             monkeypatch):
    run, _ = uploaded
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)   # no config here: boto3's own setting names the endpoint
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model, _, info = load_model(f"s3://{BUCKET}/a")
    assert info["step"] == 12
    assert Path(info["tokenizer"]).read_bytes() == (run / "tokenizer.json").read_bytes()
    for key, value in load_checkpoint(run / "checkpoints" / CHECKPOINTS[2])["model"].items():
        assert torch.equal(model.state_dict()[key], value)
    assert load_model(f"s3://{BUCKET}/a/checkpoints/{CHECKPOINTS[0]}")[2]["step"] == 4
    with pytest.raises(CheckpointError, match="no such object"):
        load_model(f"s3://{BUCKET}/a/checkpoints/{checkpoint_name(99)}")
    proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint_path", f"s3://{BUCKET}/a",
                           "--prompt", "def ", "--max_new_tokens", "8", "--temperature", "0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 12" in proc.stderr   # what this 12-step model writes is mostly blanks


def test_bucket_problems_are_one_line_errors_before_anything_runs(server, code_corpus, tmp_path):
    no_keys = {k: v for k, v in server.env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    cases = {   # name: (s3 section changes, environment, what the one line says)
        "missing_bucket": ({"bucket": "no-such-bucket"}, server.env, "no such bucket"),
        "dead_endpoint": ({"endpoint_url": f"http://127.0.0.1:{free_port()}"}, server.env, "cannot reach the endpoint"),
        "access_denied": ({"endpoint_url": server.guarded}, {**server.env, **server.stranger}, "access denied (403)"),
        "no_credentials": ({}, no_keys, "no AWS credentials found"),
    }
    procs = {}
    for name, (s3, env, _) in cases.items():   # all at once: each is mostly python and torch starting up
        config = s3_config(tmp_path / name, code_corpus, server.url, name, s3=s3)
        procs[name] = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(config)], cwd=ROOT,
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, err[-3000:])
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: s3://"), (name, err)
        assert cases[name][2] in err, (name, err)
        assert "step 1/" not in out and not (tmp_path / name / "run").exists(), name   # checked before anything else


def test_a_sharded_run_uploads_its_checkpoint_folders_and_loads_back_from_the_bucket(server, code_corpus, tmp_path,
                                                                                     aws_env, monkeypatch):
    config = s3_config(tmp_path / "fsdp", code_corpus, server.url, "sharded",
                       **{"optimizer.zero_stage": 1, "tokens.train_steps": 8,
                          "tokens.batch_accumulation_per_replica": 2})
    proc = torchrun(config, env={**server.env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "fsdp" / "run"
    for folder in list_checkpoints(run):   # every file of every step_N/ folder, byte for byte
        for f in (p for p in folder.rglob("*") if p.is_file()):
            assert server.object(f"sharded/checkpoints/{folder.name}/{f.relative_to(folder)}") == f.read_bytes()
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model, _, info = load_model(f"s3://{BUCKET}/sharded")   # the newest folder, consolidated on load
    assert info["step"] == 8
    for key, value in load_model(run)[0].state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    # a new machine resumes the sharded run on one process, from the bucket's step-4 folder
    resumed = s3_config(tmp_path / "one", code_corpus, server.url, "sharded-resumed",
                        **{"tokens.train_steps": 8, "tokens.batch_accumulation_per_replica": 2})
    out = train(resumed, server.env, "--resume", f"s3://{BUCKET}/sharded/checkpoints/{checkpoint_name(4)[:-3]}")
    assert "at step 4" in out.stdout
    got, want = losses(tmp_path / "one" / "run"), losses(run)
    assert [s for s, _ in got] == [s for s, _ in want] and [x for _, x in got] == pytest.approx([x for _, x in want],
                                                                                                abs=1e-5)
