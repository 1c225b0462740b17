"""Where shard bytes come from: a local (or network) file system, or S3-compatible object storage.

A store answers two questions: `read_object(name)` (a whole small object: dataset.json, a member table)
and `read_range(name, offset, size)` (one tar member's bytes). Every loader that reads shards does so
through one of these, so local disk, NFS/Lustre and S3 differ only here.

S3 (`s3://bucket/prefix`): boto3 with the standard AWS configuration, nothing of ours:
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE (and ~/.aws/config), AWS_REGION,
and AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) for on-prem stores (MinIO, Ceph, SeaweedFS). No credential
ever enters a message, a log or a state dict: messages name only the bucket, the key and the endpoint.

A read that fails mid-epoch (connection dropped, timeout, 5xx) is retried with backoff
(RN50_S3_ATTEMPTS tries, default 6: 15.5 s of backoff in all); when every try failed, `StorageLost` is raised,
which rn50.train turns into a checkpoint and exit 75, never a skipped image.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from pipelines.errors import UserError

S3_PREFIX = "s3://"
DEFAULT_ATTEMPTS = 6  # 0.5 + 1 + 2 + 4 + 8 s of backoff between them: a short network blip passes unseen


class StorageLost(Exception):
    """Shard bytes could not be read after every retry (mid-epoch). One-argument constructor: torch's
    DataLoader re-raises a worker's exception in the main process by calling its type with the message."""


def is_s3(location) -> bool:
    return normalise(location).startswith(S3_PREFIX)


def normalise(location) -> str:
    """The location as a string. `--data s3://b/p` parsed as a Path becomes 's3:/b/p': put the slash back."""
    text = str(location)
    if text.startswith("s3:/") and not text.startswith(S3_PREFIX):
        text = S3_PREFIX + text[len("s3:/"):]
    return text


def open_store(location):
    location = normalise(location)
    return S3Store(location) if location.startswith(S3_PREFIX) else LocalStore(location)


class LocalStore:
    """Shards in a folder: one open file per shard per process, read with pread (no seek, so threads
    share it). On a network file system this is the point: a few large files opened once, instead of
    one open (a metadata round trip) per image."""

    def __init__(self, root: str):
        self.root = Path(root)
        self.location = str(self.root)
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def __getstate__(self):  # DataLoader workers get the path, not the parent's descriptors
        return {"root": self.root}

    def __setstate__(self, state):
        self.__init__(str(state["root"]))

    def describe(self) -> str:
        return f"local folder {self.root}"

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def read_object(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def _fd(self, name: str) -> int:
        if os.getpid() != self._pid:  # forked: the parent's descriptors share its file offsets; open anew
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(name)
        if fd is None:
            with self._lock:
                fd = self._fds.get(name)
                if fd is None:
                    fd = self._fds[name] = os.open(self.root / name, os.O_RDONLY)
        return fd

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        try:
            data = os.pread(self._fd(name), size, offset)
        except OSError as exc:  # a network file system that went away: as an object store's dropped connection
            raise StorageLost(f"reading {self.root / name} failed ({exc.strerror}); the file system holding "
                              "the shards is unavailable") from None
        if len(data) != size:
            raise StorageLost(f"{self.root / name} is shorter than dataset.json says ({offset + len(data)} < "
                              f"{offset + size} bytes): the shard changed; write the shards again with tools.shard")
        return data

    def size(self, name: str) -> int:
        return (self.root / name).stat().st_size


def _boto3():
    try:
        import boto3
        import botocore
    except ImportError:
        raise UserError("reading shards from s3:// needs boto3; install it with `pip install -e '.[s3]'` "
                        "(or `pip install boto3`)") from None
    return boto3, botocore


class S3Store:
    """Shards under s3://bucket/prefix. One boto3 client per process (clients are thread-safe, but not
    fork-safe: a DataLoader worker makes its own)."""

    def __init__(self, location: str):
        self.location = location
        rest = location[len(S3_PREFIX):]
        self.bucket, _, prefix = rest.partition("/")
        if not self.bucket:
            raise UserError(f"{location} names no bucket; pass --data s3://BUCKET/PREFIX")
        self.prefix = prefix.strip("/")
        self.attempts = max(1, int(os.environ.get("RN50_S3_ATTEMPTS", DEFAULT_ATTEMPTS)))
        self._client, self._pid = None, None
        self._lock = threading.Lock()

    def __getstate__(self):  # never the client (nor anything it holds): workers build their own
        return {"location": self.location}

    def __setstate__(self, state):
        self.__init__(state["location"])

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    @property
    def client(self):
        if self._client is None or self._pid != os.getpid():
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    boto3, botocore = _boto3()
                    # our own retry loop (read_range): botocore's would not cover a body cut off mid-read
                    config = botocore.config.Config(retries={"total_max_attempts": 1}, connect_timeout=5,
                                                    read_timeout=30, max_pool_connections=64)
                    self._client = boto3.session.Session().client("s3", config=config)
                    self._pid = os.getpid()
        return self._client

    @property
    def endpoint(self) -> str:
        try:
            return self.client.meta.endpoint_url
        except UserError:
            raise
        except Exception:  # noqa: BLE001 - only for messages
            return "the default AWS endpoint"

    def describe(self) -> str:
        return f"{self.location} (endpoint {self.endpoint})"

    def _user_error(self, exc, name: str) -> UserError:
        """One line for what goes wrong at start-up: no bucket, no object, refused or missing credentials,
        an endpoint that does not answer. Never the credentials themselves."""
        _, botocore = _boto3()
        where = f"s3://{self.bucket}/{self.key(name)}"
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return UserError(f"no AWS credentials for {where}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                             "or AWS_PROFILE with a profile in ~/.aws/credentials")
        if isinstance(exc, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError,
                            botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectionClosedError)):
            return UserError(f"cannot reach the S3 endpoint {self.endpoint} for {where}; check AWS_ENDPOINT_URL "
                             "(on-prem stores) and that the server is up and reachable from this machine")
        if isinstance(exc, botocore.exceptions.ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                return UserError(f"bucket {self.bucket!r} does not exist at {self.endpoint}; check the bucket in "
                                 "--data s3://BUCKET/PREFIX (and AWS_ENDPOINT_URL for on-prem stores)")
            if code in ("NoSuchKey", "404", "NotFound"):
                return UserError(f"{where} does not exist; upload the folder that `python -m tools.shard` wrote "
                                 "(e.g. `aws s3 sync SHARDS s3://BUCKET/PREFIX`) or fix the prefix in --data")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken",
                        "ExpiredToken"):
                return UserError(f"{self.endpoint} refused the credentials for {where} ({code}); check "
                                 "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and the bucket policy")
            return UserError(f"S3 request for {where} failed ({code or 'unknown error'}); check the bucket, the "
                             "credentials and AWS_ENDPOINT_URL")
        return UserError(f"S3 request for {where} failed ({type(exc).__name__}); check AWS_ENDPOINT_URL and "
                         "the network")

    def exists(self, name: str) -> bool:
        _, botocore = _boto3()
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(name))
            return True
        except botocore.exceptions.ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound"):
                # a missing bucket also answers 404 to HEAD: ask the bucket itself, for the right message
                try:
                    self.client.head_bucket(Bucket=self.bucket)
                except Exception as bucket_exc:  # noqa: BLE001
                    raise self._bucket_error(bucket_exc) from None
                return False
            raise self._user_error(exc, name) from None
        except Exception as exc:  # noqa: BLE001 - every other failure is a start-up error with one line
            raise self._user_error(exc, name) from None

    def _bucket_error(self, exc) -> UserError:
        _, botocore = _boto3()
        if isinstance(exc, botocore.exceptions.ClientError) and \
                str(exc.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchBucket", "NotFound"):
            return UserError(f"bucket {self.bucket!r} does not exist at {self.endpoint}; check the bucket in "
                             "--data s3://BUCKET/PREFIX (and AWS_ENDPOINT_URL for on-prem stores)")
        return self._user_error(exc, "")

    def read_object(self, name: str) -> bytes:
        """Start-up reads: any failure is one clear line (UserError), after one retry for a blip."""
        last = None
        for attempt in range(2):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"].read()
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001
                last = exc
                error = self._user_error(exc, name)
                if "cannot reach" not in str(error) or attempt == 1:
                    raise error from None
                time.sleep(0.5)
        raise self._user_error(last, name)

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        """One member's bytes, retried with backoff; StorageLost when every try failed. A short answer
        (the object changed) is not retried: it is an error in the data, not the network."""
        key = self.key(name)
        last = None
        for attempt in range(self.attempts):
            try:
                answer = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{offset + size - 1}")
                data = answer["Body"].read()
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - connection errors, timeouts, 5xx, throttling
                last = exc
                if attempt + 1 < self.attempts:
                    time.sleep(min(8.0, 0.5 * 2 ** attempt))
                continue
            if len(data) != size:
                raise StorageLost(f"s3://{self.bucket}/{key} is shorter than dataset.json says: the shard changed; "
                                  "upload the shards that tools.shard wrote again")
            return data
        raise StorageLost(f"reading s3://{self.bucket}/{key} from {self.endpoint} failed {self.attempts} times "
                          f"({type(last).__name__}); the object store is unreachable")

    def size(self, name: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self.key(name))["ContentLength"])
        except Exception as exc:  # noqa: BLE001
            raise self._user_error(exc, name) from None


def display(location) -> str:
    """The data location as summaries and reports record it: the s3:// URI as given (never credentials: they
    are not part of it), a local path made absolute."""
    text = normalise(location)
    return text if text.startswith(S3_PREFIX) else str(Path(text).resolve())
