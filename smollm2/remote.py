"""Remote storage: a run's checkpoints and logs in an S3 bucket, uploaded in the background, downloaded to resume.

Built on boto3. The config's `s3` section names the bucket, a key prefix, the region and, for MinIO, Cloudflare R2 and
other S3-compatible stores, an `endpoint_url`. Credentials come only from boto3's own chain (environment variables, a
profile, an instance role): no config key holds them, and nothing here prints or stores them.

Under the prefix a run keeps its run-directory layout: `checkpoints/step_00001000.pt`, `metrics.jsonl`, `loss.png`,
`config.yaml`, `tokenizer.json`. Every object carries the sha256 of its bytes as metadata. botocore checksums each
request in transit; after an upload the bucket must report the local file's size and sha256, and a download is checked
against that sha256 before it replaces anything.
"""

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, NoCredentialsError, PartialCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError

from smollm2.checkpoint import checkpoint_step, latest_checkpoint, resolve_checkpoint, rotate_checkpoints
from smollm2.config import S3Args
from smollm2.errors import CheckpointError, RemoteError

PART_SIZE = 64 * 2**20          # files above this go up multipart, in parts of this size (S3's minimum is 5 MiB)
MAX_WAITING_CHECKPOINTS = 8     # past this many, the oldest waiting checkpoint is given up: local disk is not endless
MAX_BACKOFF_S = 60              # retries wait 1 s, 2 s, 4 s ... up to this
STALL_TIMEOUT_S = 600           # at the end of training, stop waiting after this long without any upload progress
NOTE_EVERY_S = 15               # how often that wait says how it goes


def is_s3_url(path) -> bool:
    return str(path).startswith("s3://")


def join_key(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def split_url(url: str) -> tuple[str, str]:
    """s3://bucket/some/key -> (bucket, some/key)."""
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket or ".." in key.split("/"):
        raise RemoteError(f"{url}: expected s3://bucket/prefix or s3://bucket/prefix/checkpoints/step_N.pt")
    return bucket, key.strip("/")


def bucket_url(s3: S3Args) -> str:
    return f"s3://{join_key(s3.bucket, s3.prefix)}"


def describe(client, bucket: str, key: str = "") -> str:
    return f"s3://{join_key(bucket, key)} at {client.meta.endpoint_url}"


def make_client(region: Optional[str] = None, endpoint_url: Optional[str] = None):
    """An S3 client. None falls back to boto3's own settings (AWS_DEFAULT_REGION, AWS_ENDPOINT_URL, the profile)."""
    # a 10 s connect timeout: a wrong endpoint fails in seconds, not after botocore's default minutes
    config = BotoConfig(connect_timeout=10, read_timeout=60, retries={"mode": "standard"})
    try:
        return boto3.session.Session().client("s3", region_name=region, endpoint_url=endpoint_url, config=config)
    except ValueError as e:   # botocore: "Invalid endpoint: ..."
        raise RemoteError(f"s3.endpoint_url: {e}; expected a URL such as https://s3.example.com") from None


def explain(e: Exception, where: str) -> RemoteError:
    """A boto3 failure -> one line naming the bucket and what to fix (never the credentials themselves)."""
    code = str(e.response.get("Error", {}).get("Code")) if isinstance(e, ClientError) else ""
    if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
        why = ("no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with "
               "an instance role (the config never holds credentials)")
    elif isinstance(e, (BotoConnectionError, HTTPClientError)):
        why = f"cannot reach the endpoint ({e}); check s3.endpoint_url and s3.region, and that the server is up"
    elif code in ("404", "NoSuchBucket"):
        why = "no such bucket: create it, or fix s3.bucket (and s3.endpoint_url, if it points at another store)"
    elif code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"):
        why = (f"access denied ({code}): the credentials boto3 found may not list and write there; check them and the "
               "bucket policy (s3:ListBucket, s3:GetObject, s3:PutObject)")
    elif code in ("301", "PermanentRedirect", "AuthorizationHeaderMalformed"):
        why = "the bucket lives in another region: set s3.region to it"
    else:
        why = f"{code or type(e).__name__}: {' '.join(str(e).split())}"   # one line, whatever botocore wrote
    return RemoteError(f"{where}: {why}")


def check_bucket(client, bucket: str, prefix: str) -> None:
    """Fail now, not after hours of training: the bucket exists, answers, and these credentials may write there."""
    probe = join_key(prefix, ".write-check")
    try:
        client.head_bucket(Bucket=bucket)
        client.put_object(Bucket=bucket, Key=probe, Body=b"train.py checks that it may write here\n")
    except (BotoCoreError, ClientError) as e:
        raise explain(e, describe(client, bucket, prefix)) from None
    with contextlib.suppress(BotoCoreError, ClientError):   # a write-only policy may forbid this; the probe then stays
        client.delete_object(Bucket=bucket, Key=probe)


def sha256_file(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def disk_size(path: Path) -> int:
    """Bytes of a file, or of every file in a folder (a sharded checkpoint); 0 when it is gone."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size if path.exists() else 0


def say(line: str, stream=None) -> None:
    """One line in one write, so that the uploader's lines and the training loop's do not run into each other."""
    (stream or sys.stdout).write(line + "\n")
    (stream or sys.stdout).flush()


# ---------------------------------------------------------------- downloads: resume and load


def run_prefix(folder: str) -> str:
    """The run's own prefix from a key's folder: a/b/checkpoints -> a/b."""
    parts = folder.split("/") if folder else []
    return "/".join(parts[:-1] if parts and parts[-1] == "checkpoints" else parts)


def latest_key(client, bucket: str, prefix: str, url: str) -> str:
    """The key of the newest checkpoint under prefix/checkpoints/: a step_N.pt object, or the folder of a sharded
    step_N/ (its key without a trailing slash)."""
    folder = join_key(prefix, "checkpoints") + "/"
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
        for obj in page.get("Contents", []):
            name = obj["Key"][len(folder):].split("/")[0]
            if (step := checkpoint_step(name)) is not None:
                found[step] = folder + name
    if not found:
        raise RemoteError(f"{url}: no checkpoints/step_* under s3://{bucket}/{folder}; check the prefix, or give a "
                          "checkpoint's full key")
    return found[max(found)]


def fetch(client, bucket: str, key: str, dest: Path, missing_ok: bool = False) -> None:
    """Download one object to dest (atomically), checked against the sha256 recorded at its upload."""
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if str(e.response.get("Error", {}).get("Code")) not in ("404", "NoSuchKey"):
            raise
        if missing_ok:
            return
        raise RemoteError(f"s3://{bucket}/{key}: no such object; `aws s3 ls s3://{bucket}/{key.rpartition('/')[0]}/` "
                          "lists what there is") from None
    size, want = head["ContentLength"], head.get("Metadata", {}).get("sha256")
    if dest.is_file() and dest.stat().st_size == size and want == sha256_file(dest):
        return                                               # already here, e.g. resuming where it was uploaded from
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.part")   # one per process: torchrun ranks may fetch the same file
    say(f"s3: downloading s3://{bucket}/{key} ({size / 2**20:.1f} MB) to {dest}", sys.stderr)
    client.download_file(bucket, key, str(tmp), Config=TransferConfig(multipart_chunksize=PART_SIZE))
    got = sha256_file(tmp)
    if tmp.stat().st_size != size or (want and got != want):   # objects copied by other tools carry no sha256
        tmp.unlink()
        raise RemoteError(f"s3://{bucket}/{key}: the download does not match its upload (sha256 {got[:12]}... instead "
                          f"of {want[:12]}...); try again")
    os.replace(tmp, dest)


def fetch_folder(client, bucket: str, key: str, dest: Path) -> None:
    """Download every object under key/ into dest/, through a .part folder renamed once all of it is here: a sharded
    checkpoint is either whole on disk or absent."""
    part = dest.with_name(dest.name + ".part")
    keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + "/")
            for obj in page.get("Contents", [])]
    if not keys:
        raise RemoteError(f"s3://{bucket}/{key}/: no such checkpoint folder")
    for k in keys:
        fetch(client, bucket, k, part / k[len(key) + 1:])
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(part, dest)


def download_checkpoint(url: str, run_dir=None, s3: Optional[S3Args] = None) -> Path:
    """s3://bucket/prefix (that run's newest checkpoint), or one checkpoint's key: .../checkpoints/step_N.pt (a file)
    or .../checkpoints/step_N (a sharded checkpoint's folder) -> a local checkpoint.

    To resume (`run_dir` given) it lands in run_dir/checkpoints/, with the run's metrics.jsonl when the run dir has
    none, so the log goes on from the checkpoint's step. To load, it lands in a cache folder that mirrors the bucket,
    with the run's tokenizer.json beside it, where loading.load_model looks for one. `s3` gives region and endpoint.
    """
    bucket, key = split_url(url)
    client = make_client(s3.region if s3 else None, s3.endpoint_url if s3 else None)
    try:
        if checkpoint_step(key.rpartition("/")[2]) is None:
            key = latest_key(client, bucket, run_prefix(key), url)
        prefix = run_prefix(key.rpartition("/")[0])
        if run_dir is None:
            cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smollm2" / "s3"
            run_dir, sidecars = cache / bucket / prefix, ["tokenizer.json"]
        else:
            run_dir = Path(run_dir)
            sidecars = [] if (run_dir / "metrics.jsonl").exists() else ["metrics.jsonl"]
        dest = run_dir / "checkpoints" / key.rpartition("/")[2]
        if key.endswith(".pt"):
            fetch(client, bucket, key, dest)
        else:
            fetch_folder(client, bucket, key, dest)
        for name in sidecars:
            fetch(client, bucket, join_key(prefix, name), run_dir / name, missing_ok=True)
    except (BotoCoreError, ClientError) as e:
        raise explain(e, describe(client, bucket, key)) from None
    return dest


# ---------------------------------------------------------------- uploads in the background


def find_resume(resume: Optional[str], run_dir: Path, s3: S3Args) -> Optional[Path]:
    """--resume (or checkpoints.resume_checkpoint_path) -> the checkpoint to go on from: "latest" is the run
    directory's newest, else the bucket's (a new machine); a path or an s3:// URL is that checkpoint. None when
    starting afresh, which is refused over a run directory that already holds checkpoints."""
    if resume == "latest":
        found = latest_checkpoint(run_dir)
        if found is None and s3.bucket:   # a new machine: go on from the newest checkpoint in the bucket
            return download_checkpoint(bucket_url(s3), run_dir, s3)
        if found is None:
            raise CheckpointError(f"--resume: no checkpoint in {run_dir}/checkpoints yet; start without --resume")
        return found
    if is_s3_url(resume):
        return download_checkpoint(resume, run_dir, s3)
    if resume:
        return resolve_checkpoint(resume)
    existing = latest_checkpoint(run_dir)
    if existing is not None:
        raise CheckpointError(f"{run_dir} already holds checkpoints (newest {existing.name}): pass --resume to "
                              "continue that run, or set checkpoints.checkpoints_path to a new directory")
    return None


@dataclass
class _Job:
    path: Path                             # the local file (or a sharded checkpoint's folder)
    key: str                               # its object key
    drop_kinds: frozenset = frozenset()    # metrics.jsonl records left out of the upload (the upload_* flags)

    @property
    def is_checkpoint(self) -> bool:
        """A checkpoint file or folder, or a file inside a sharded checkpoint's folder."""
        return checkpoint_step(self.path.name) is not None or checkpoint_step(self.path.parent.name) is not None


class Uploader:
    """Uploads a run's files from one background thread, so the training loop never waits on the network.

    The loop calls add_checkpoint() after each save (a lock and a list append, no I/O). The thread uploads the oldest
    waiting file and verifies it; on failure the file goes to the back of the queue and the thread backs off, 1 s
    doubling to a minute, for as long as it takes. A checkpoint stays on local disk until it is in the bucket: rotation
    asks is_pending(), and once an upload succeeds the thread rotates what was spared (and what `spare(path)`, another
    user of the checkpoints, still holds on to). finish() waits at the end.
    """

    def __init__(self, s3: S3Args, run_dir, keep_last: int = 0, part_size: int = PART_SIZE,
                 spare: Optional[Callable[[Path], bool]] = None):
        self.client = make_client(s3.region, s3.endpoint_url)
        check_bucket(self.client, s3.bucket, s3.prefix)
        self.s3, self.run_dir, self.keep_last, self.where = s3, Path(run_dir), keep_last, bucket_url(s3)
        self.spare = spare
        self.transfer = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size)
        self.waiting: list[_Job] = []
        self.current: Optional[_Job] = None
        self.failures, self.last_error, self.progress_at, self.sent_run_files = 0, "", time.time(), False
        self.cond = threading.Condition()
        threading.Thread(target=self._work, name="s3-uploader", daemon=True).start()
        say(f"s3: {describe(self.client, s3.bucket, s3.prefix)} is reachable and writable; checkpoints and logs upload "
            "there in the background")

    def _pending(self) -> list[_Job]:
        return ([self.current] if self.current else []) + self.waiting

    def _add(self, path: Path, name: Optional[str] = None, drop_kinds: frozenset = frozenset()) -> None:
        key = join_key(self.s3.prefix, name or path.relative_to(self.run_dir).as_posix())
        if not any(j.key == key for j in self.waiting):   # a log queued twice goes up once, as it is by then
            self.waiting.append(_Job(path, key, drop_kinds))

    def _add_logs(self) -> None:
        s3 = self.s3
        drop = frozenset(kind for kind, on in (("train", s3.upload_metrics), ("val", s3.upload_metrics),
                                               ("eval", s3.upload_metrics), ("sample", s3.upload_samples)) if not on)
        if s3.upload_metrics or s3.upload_samples:   # samples are records of metrics.jsonl; alone: samples.jsonl
            self._add(self.run_dir / "metrics.jsonl", "metrics.jsonl" if s3.upload_metrics else "samples.jsonl", drop)
        if s3.upload_plots:
            self._add(self.run_dir / "loss.png")

    def add_checkpoint(self, path) -> None:
        """Queue a checkpoint just saved, and the logs as they are now. The training loop's call: it never blocks."""
        notes = []
        with self.cond:
            if self.s3.upload_checkpoints:
                if not self.sent_run_files:   # what generate.py wants beside the weights; written once per process
                    self._add(self.run_dir / "config.yaml")
                    self._add(self.run_dir / "tokenizer.json")
                    self.sent_run_files = True
                self._add(Path(path))
                ckpts = [j for j in self._pending() if j.is_checkpoint]
                if len(ckpts) > MAX_WAITING_CHECKPOINTS:
                    dropped = min((j for j in self.waiting if j.is_checkpoint), key=lambda j: j.path.name)
                    self.waiting.remove(dropped)
                    ckpts.remove(dropped)
                    notes.append(f"more than {MAX_WAITING_CHECKPOINTS} checkpoints wait: {dropped.key} is given up (it "
                                 "stays local until rotated out); raise checkpoints.checkpoint_interval")
                if len(ckpts) > 1:
                    error = f" (last error: {self.last_error})" if self.failures else ""
                    notes.append(f"uploads are behind{error}: {len(ckpts)} checkpoints wait "
                                 f"({', '.join(j.path.name for j in ckpts)}); training goes on, and they stay on local "
                                 "disk until uploaded")
            self._add_logs()
            self.cond.notify_all()
        for note in notes:
            say(f"warning: s3: {note}", sys.stderr)

    def is_pending(self, path) -> bool:
        """True while `path` waits for, or is in, its upload: rotation must not delete it yet."""
        with self.cond:
            return any(j.path == Path(path) for j in self._pending())

    def _progressed(self, _bytes: int) -> None:
        self.progress_at = time.time()

    def _body(self, job: _Job):
        """(sha256, size, readable) of what goes up. Logs are copied first: the run rewrites them as we upload."""
        if job.is_checkpoint:   # written once, by an atomic rename: read straight from disk
            return sha256_file(job.path), job.path.stat().st_size, open(job.path, "rb")
        data = job.path.read_bytes()
        if job.path.suffix == ".jsonl":   # whole records only: the last line may be half-written
            data = data[:data.rfind(b"\n") + 1]
            if job.drop_kinds:
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if json.loads(line).get("kind") not in job.drop_kinds)
        return hashlib.sha256(data).hexdigest(), len(data), io.BytesIO(data)

    def _upload(self, job: _Job) -> int:
        """Upload one file, or every file of a sharded checkpoint's folder, and check that the bucket holds exactly
        them; raises on any failure. Returns the bytes sent."""
        if job.path.is_dir():
            files = sorted(f for f in job.path.rglob("*") if f.is_file())
            return sum(self._upload(_Job(f, join_key(job.key, f.relative_to(job.path).as_posix()))) for f in files)
        digest, size, body = self._body(job)
        with body:
            self.client.upload_fileobj(body, self.s3.bucket, job.key, ExtraArgs={"Metadata": {"sha256": digest}},
                                       Config=self.transfer, Callback=self._progressed)
        head = self.client.head_object(Bucket=self.s3.bucket, Key=job.key)
        stored = head.get("Metadata", {}).get("sha256", "none")
        if head["ContentLength"] != size or stored != digest:
            raise RemoteError(f"verification failed: the bucket holds {head['ContentLength']} bytes with sha256 "
                              f"{stored[:12]}..., the file has {size} bytes with sha256 {digest[:12]}...")
        return size

    def _work(self) -> None:
        while True:
            with self.cond:
                while not self.waiting:
                    self.cond.wait()
                job = self.current = self.waiting.pop(0)
            size, error = 0, None
            try:
                size = self._upload(job)
            except FileNotFoundError:   # deleted before its turn: a log not written yet, or a user's clean-up
                if job.is_checkpoint:
                    say(f"warning: s3: {job.path} vanished before its upload", sys.stderr)
            except (BotoCoreError, ClientError, S3UploadFailedError, RemoteError, OSError) as e:
                text = str(e).split(": ", 1)[-1] if isinstance(e, S3UploadFailedError) else str(e)   # not the repr
                error = (text.strip().splitlines() or [type(e).__name__])[0][:300]                   # of the file
            with self.cond:
                self.current, retried = None, self.failures
                if error:
                    self.failures, self.last_error = retried + 1, error
                    if not any(j.key == job.key for j in self.waiting):
                        self.waiting.append(job)   # tried again after the others, once the backoff is over
                elif size:
                    self.failures, self.progress_at = 0, time.time()
                waiting = len(self.waiting)
                self.cond.notify_all()
            if error:
                delay = min(2 ** retried, MAX_BACKOFF_S)
                say(f"warning: s3: upload of {job.key} failed ({error}); {waiting} file(s) waiting, next try in "
                    f"{delay}s", sys.stderr)
                time.sleep(delay)
            elif size and job.is_checkpoint:
                again = f"; uploads work again after {retried} failed tries" if retried else ""
                say(f"s3: uploaded {job.key} ({size / 2**20:.1f} MB, size and sha256 verified{again})")
                rotate_checkpoints(self.run_dir, self.keep_last,
                                   spare=lambda p: self.is_pending(p) or bool(self.spare and self.spare(p)))

    def finish(self, stall_timeout: float = STALL_TIMEOUT_S) -> bool:
        """At the end of training: queue the final logs and wait for every upload, saying how it goes. False when
        files are still missing from the bucket after `stall_timeout` seconds without progress (they stay local)."""
        with self.cond:
            self._add_logs()
            self.cond.notify_all()
            self.progress_at, note_at = time.time(), 0.0
            while (pending := self._pending()) and time.time() - self.progress_at <= stall_timeout:
                if time.time() >= note_at:
                    size = sum(map(disk_size, (j.path for j in pending))) / 2**20
                    say(f"s3: waiting for {len(pending)} upload(s), {size:.1f} MB, to reach {self.where} (gives up "
                        f"after {stall_timeout:.0f}s without progress)")
                    note_at = time.time() + NOTE_EVERY_S
                self.cond.wait(1.0)
        if pending:
            say(f"warning: s3: gave up after {stall_timeout:.0f}s without progress (last error: {self.last_error}); "
                f"not uploaded: {', '.join(j.key for j in pending)}. They stay in {self.run_dir}: copy them with "
                f"`aws s3 sync {self.run_dir} {self.where}`", sys.stderr)
            return False
        say(f"s3: every file is in {self.where}")
        return True
