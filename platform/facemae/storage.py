"""Where datasets live: a local path, ``s3://bucket/prefix`` or ``gs://bucket/prefix``.

Every location goes through pyarrow's filesystems, the layer Ray Data and Ray Train already use.
Credentials come the standard way: for S3 the AWS chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and ``~/.aws``, instance roles);
for GCS Google's application default credentials (``GOOGLE_APPLICATION_CREDENTIALS``). The endpoint
of an S3-compatible store (MinIO, Ceph, moto) and the region come from :func:`configure` (the
``storage`` config section), else from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` and
``AWS_REGION`` / ``AWS_DEFAULT_REGION``, as the AWS tools read them.

Atomicity. :func:`atomic_write` never lets a reader see half an object under its final name: a local
file is written to a temp name in the same folder, fsynced and renamed (``os.replace``); an object is
first written to a local temp file and then uploaded to its final key, and an S3 object (a single PUT
or a multipart upload) or a GCS object becomes visible only when its upload completes. A writer that
fails before the upload leaves nothing; a process killed during the upload leaves at most an
unfinished multipart upload, which is invisible (a bucket lifecycle rule
``AbortIncompleteMultipartUpload`` reclaims its parts).

Local paths keep their exact behaviour (``pathlib`` / ``os`` calls); only ``scheme://`` locations
take the filesystem route. Imports stdlib and pyarrow only, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pyarrow.fs as pafs

SCHEMES = {"s3": "S3", "gs": "GCS", "gcs": "GCS"}
CONNECT_TIMEOUT_S = 5.0
RETRIES = 3  # attempts per request once a bucket answered; the first check makes one attempt only
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                  "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
PathLike = str | os.PathLike


class StorageLocationError(ValueError):
    """A location that names no usable place: an unknown scheme, a URL without a bucket."""


class StorageUnreachableError(ConnectionError):
    """A bucket that cannot be reached: wrong endpoint, missing credentials, denied access, no such bucket."""


_options: dict[str, str] = {"endpoint_override": "", "region": ""}
_filesystems: dict[tuple[str, str, str, str], pafs.FileSystem] = {}  # (scheme, bucket, endpoint, region)
_lock = threading.Lock()


def configure(*, endpoint_override: str = "", region: str = "") -> None:
    """Sets this process's object-store settings (the ``storage`` config section); empty values fall
    back to the AWS environment variables. Jobs call it before touching a location, and Ray tasks
    call it with :func:`options` of their driver, since a worker is another process.

    Args:
        endpoint_override: S3-compatible endpoint, e.g. ``http://127.0.0.1:9000``.
        region: S3 region, e.g. ``eu-west-1``.
    """
    _options.update(endpoint_override=endpoint_override, region=region)


def options() -> dict[str, str]:
    """The settings in effect, the environment's included: what a Ray task passes to :func:`configure`
    so that it reaches the same endpoint as its driver. Holds no credential."""
    return {"endpoint_override": _endpoint(), "region": _region()}


def _endpoint() -> str:
    return (_options["endpoint_override"] or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or "")


def _region() -> str:
    return _options["region"] or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ""


def is_remote(location: PathLike) -> bool:
    """Whether ``location`` is a ``scheme://`` URL rather than a local path."""
    return isinstance(location, str) and "://" in location


def absolute(location: str) -> str:
    """A local path made absolute against this process's working directory (``~`` expanded); a URL as it is.
    For locations that travel to another process (a Ray Train worker, a Tune trial, an actor), whose working
    directory is its own."""
    return location if not location or is_remote(location) else str(Path(location).expanduser().resolve())


def split_url(location: str) -> tuple[str, str, str]:
    """``s3://bucket/a/b`` -> ``("s3", "bucket", "a/b")``.

    Raises:
        StorageLocationError: The scheme is not one of :data:`SCHEMES`, or there is no bucket.
    """
    scheme, _, rest = location.partition("://")
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise StorageLocationError(f"{location}: unsupported storage scheme {scheme + '://'!r}; use a local path, "
                                   "s3://bucket/prefix or gs://bucket/prefix")
    bucket, _, key = rest.partition("/")
    if not bucket or any(c in bucket for c in "?#@:"):
        raise StorageLocationError(f"{location}: no bucket named; write {scheme}://<bucket>/<prefix>, "
                                   f"e.g. {scheme}://my-bucket/datasets/faces")
    return scheme, bucket, key.strip("/")


def join(location: PathLike, *parts: str) -> str:
    """``location/part/...``: a local path joined as ``pathlib`` does, a URL with ``/``."""
    if is_remote(location):
        scheme, bucket, key = split_url(str(location))
        return "/".join([f"{scheme}://{bucket}", *(p.strip("/") for p in (key, *parts) if p.strip("/"))])
    return str(Path(location, *parts))


def resolve(location: PathLike) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path in it)`` of a location; the bucket of a URL is checked once per process.

    Raises:
        StorageLocationError: A malformed URL.
        StorageUnreachableError: The bucket does not answer, naming the setting to fix.
    """
    if not is_remote(location):
        return pafs.LocalFileSystem(), os.path.abspath(location)
    scheme, bucket, key = split_url(str(location))
    endpoint, region = (_endpoint(), _region()) if SCHEMES[scheme] == "S3" else ("", "")
    cache_key = (SCHEMES[scheme], bucket, endpoint, region)
    with _lock:
        fs = _filesystems.get(cache_key)
        if fs is None:
            if SCHEMES[scheme] == "S3" and not endpoint and not region:
                region = _bucket_region(bucket)
            _check_bucket(_filesystem(scheme, endpoint, region, attempts=1), scheme=scheme, bucket=bucket,
                          endpoint=endpoint)
            fs = _filesystems[cache_key] = _filesystem(scheme, endpoint, region, attempts=RETRIES)
    return fs, f"{bucket}/{key}".rstrip("/")


def _bucket_region(bucket: str) -> str:
    """The region of an AWS bucket (a request to another region's endpoint is refused), or "" to let
    the check below report why it cannot be reached."""
    try:
        return pafs.resolve_s3_region(bucket)
    except OSError:
        return ""


def _filesystem(scheme: str, endpoint: str, region: str, *, attempts: int) -> pafs.FileSystem:
    if SCHEMES[scheme] == "GCS":
        return pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=CONNECT_TIMEOUT_S * attempts))
    # allow_delayed_open: an object smaller than one multipart part goes up in a single PUT; the cost,
    # errors such as a missing bucket surfacing at close, is covered by the bucket check.
    kwargs: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S, "request_timeout": 30.0,
                              "allow_delayed_open": True,
                              "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)}
    if endpoint:
        kwargs["endpoint_override"] = endpoint  # "http://host:port" also picks the scheme
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def _check_bucket(fs: pafs.FileSystem, *, scheme: str, bucket: str, endpoint: str) -> None:
    """Fails fast, with the fix, when the bucket does not answer (one attempt, a short connect timeout)."""
    where = f"{scheme}://{bucket}" + (f" at {endpoint}" if endpoint else "")
    try:
        found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError as exc:
        detail = " ".join(str(exc).split())
        aws = re.search(r"AWS Error (.*?)(?:;|$)", detail)  # "AWS Error X during Y operation: reason; Details: ..."
        detail = aws.group(1) if aws else detail[:200]
        raise StorageUnreachableError(f"cannot reach {where} ({detail}); {_advice(scheme, detail)}") from None
    if not found:
        raise StorageUnreachableError(f"{where}: bucket {bucket!r} does not exist or is not visible with these "
                                      f"credentials; create it, or fix the bucket name; {_advice(scheme, '')}")


def _advice(scheme: str, detail: str) -> str:
    """What to set, for a bucket that did not answer."""
    if SCHEMES[scheme] == "GCS":
        return "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file (or run `gcloud auth " \
               "application-default login`)"
    creds = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
    have_creds = any(os.environ.get(k) for k in CREDENTIAL_ENV) or \
        Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")).expanduser().is_file()
    denied = any(w in detail for w in ("ACCESS_DENIED", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                       "credentials"))
    endpoint = ("check storage.endpoint_override (or AWS_ENDPOINT_URL) names a running S3-compatible server, "
                "e.g. http://127.0.0.1:9000, and storage.region")
    if denied:
        return f"access denied: {creds} to keys that may read and write this bucket"
    if not have_creds:
        return f"no AWS credentials found: {creds}; and {endpoint}"
    return endpoint


# Reading


def exists(location: PathLike) -> bool:
    """Whether a file, folder, object or prefix is there."""
    if not is_remote(location):
        return os.path.exists(location)
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: PathLike) -> bool:
    """Whether a file or object (not a folder or prefix) is there."""
    if not is_remote(location):
        return os.path.isfile(location)
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def open_input(location: PathLike) -> Any:
    """A seekable binary file (a ``pyarrow.NativeFile``, or Python's for a local path); close it (``with``)."""
    if not is_remote(location):
        return open(location, "rb")
    fs, path = resolve(location)
    return fs.open_input_file(path)


def read_bytes(location: PathLike) -> bytes:
    """A whole file's or object's bytes."""
    with open_input(location) as f:
        return f.read()


def read_text(location: PathLike) -> str:
    """A whole file or object as UTF-8 text."""
    return read_bytes(location).decode("utf-8")


def sha256(location: PathLike) -> str:
    """Hex SHA-256 of a file's or object's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open_input(location) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(location: PathLike) -> list[str]:
    """Every file under a folder or prefix, as sorted ``/``-separated paths relative to it; ``[]`` when
    there is none."""
    if not is_remote(location):
        root = Path(location)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) \
            if root.is_dir() else []
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path[len(path) + 1:] for i in infos if i.type == pafs.FileType.File)


# Writing


def open_output(location: PathLike) -> Any:
    """A binary output stream at the final name. Not atomic (a failed local writer leaves a partial
    file): use :func:`atomic_write` for anything a reader may trust."""
    if not is_remote(location):
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        return open(location, "wb")
    fs, path = resolve(location)
    return fs.open_output_stream(path)


def atomic_write(location: PathLike, write: Callable[[str], None]) -> None:
    """Calls ``write(tmp_path)`` with a local temp file and puts the complete result at ``location``
    (module docstring: renamed after fsync locally, uploaded to the final key on an object store)."""
    if is_remote(location):
        tmp = scratch("upload", suffix=".tmp")
        try:
            write(tmp)
            fs, path = resolve(location)
            # One C++ copy: no Python code runs between the parts of the upload, so an exception
            # here cannot complete it half-written.
            pafs.copy_files(tmp, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return
    tmp = str(sibling_temp(location))
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, location)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(location: PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) atomically."""
    atomic_write(location, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def delete(location: PathLike) -> None:
    """Removes one file or object; a missing one is fine.

    On S3, pyarrow then writes an empty ``<parent>/`` marker object so that the "folder" still exists
    (Arrow's ``S3FileSystem::DeleteFile``, no option turns it off); :func:`list_files` leaves such
    markers out.
    """
    if not is_remote(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = resolve(location)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def delete_tree(location: PathLike) -> None:
    """Removes a folder, or every object under a prefix, and what it holds; a missing one is fine."""
    if not is_remote(location):
        shutil.rmtree(location, ignore_errors=not os.path.exists(location))
        return
    fs, path = resolve(location)
    if "/" not in path:
        raise StorageLocationError(f"{location}: refusing to delete a whole bucket; name a prefix inside it")
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def make_dirs(location: PathLike) -> None:
    """Creates a local folder; object stores have no folders, so a URL needs nothing."""
    if not is_remote(location):
        Path(location).mkdir(parents=True, exist_ok=True)


# Folders: checkpoints and exports travel as whole folders between a local temp folder and a location.


def child_folders(location: PathLike) -> list[str]:
    """Names of the folders (prefixes) directly under ``location``, sorted; ``[]`` when there is none."""
    if not is_remote(location):
        return sorted(p.name for p in Path(location).iterdir() if p.is_dir()) if os.path.isdir(location) else []
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def upload_file(local: PathLike, location: PathLike) -> None:
    """Copies one local file to ``location`` whole (:func:`atomic_write`'s guarantee)."""
    atomic_write(location, lambda tmp: shutil.copyfile(local, tmp))


def upload_folder(local: PathLike, location: PathLike, *, last: Sequence[str] = ()) -> None:
    """Copies every file of a local folder under ``location``, each whole; the files named in ``last``
    (relative paths) go up after all the others, so a reader that waits for them finds the rest complete."""
    files = sorted(p.relative_to(local).as_posix() for p in Path(local).rglob("*") if p.is_file())
    for rel in sorted(files, key=lambda f: (f in last, last.index(f) if f in last else 0, f)):
        upload_file(Path(local, rel), join(location, rel))


def download_folder(location: PathLike, local: PathLike) -> None:
    """Copies every file under ``location`` into the local folder ``local`` (created)."""
    for rel in list_files(location):
        download_file(join(location, rel), Path(local, rel))


def download_file(location: PathLike, local: PathLike) -> None:
    """Copies one file or object to the local path ``local`` (its folder created)."""
    Path(local).parent.mkdir(parents=True, exist_ok=True)
    with open_input(location) as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


@contextlib.contextmanager
def local_folder(location: PathLike) -> Iterator[str]:
    """A local folder holding what ``location`` holds, for code that reads files by name (DeepSpeed's
    checkpoint loader): the folder itself when local, else a temporary copy removed afterwards."""
    if not is_remote(location):
        yield str(location)
        return
    with scratch_folder("download") as tmp:
        download_folder(location, tmp)
        yield tmp


# Scratch: temp files and folders named after their owner, "facemae-<kind>-<host>.<pid>-<random>" in the temp
# folder and ".<name>.<host>.<pid>-<random>.tmp" beside the file they will replace, so that the next facemae process
# on the node removes what a process killed before its cleanup ran (a Ray worker SIGKILLed mid-checkpoint, a
# preempted node's job) left behind.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_SCRATCH = re.compile(r"(?:facemae-.+?-|\..+?\.)(?P<host>[0-9a-f]{8})\.(?P<pid>\d+)-[^/]*")
REAP_EVERY_S = 600.0
_last_reap: list[float] = []
_reaped_folders: set[str] = set()


def scratch(kind: str, *, folder: bool = False, suffix: str = "") -> str:
    """A new empty temp file (or folder) for ``kind``, named after this process; the caller removes it.
    At most every :data:`REAP_EVERY_S` a call removes the scratch of processes of this host that have
    exited (:func:`reap_scratch`)."""
    now = time.monotonic()
    if not _last_reap or now - _last_reap[0] > REAP_EVERY_S:
        _last_reap[:] = [now]
        reap_scratch()
    prefix = f"facemae-{kind}-{_HOST}.{os.getpid()}-"
    if folder:
        return tempfile.mkdtemp(prefix=prefix, suffix=suffix)
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix)
    os.close(fd)
    return path


@contextlib.contextmanager
def scratch_folder(kind: str) -> Iterator[str]:
    """A :func:`scratch` folder for the block, removed after it."""
    path = scratch(kind, folder=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sibling_temp(path: PathLike, *, folder: bool = False, suffix: str = ".tmp") -> Path:
    """A new empty temp file (or folder) beside ``path`` (its folder created), to ``os.replace`` onto it
    atomically: ``.<name>.<host>.<pid>-<random><suffix>``; the caller removes it. The first one a process makes in
    a folder removes the temps there of this host's processes that no longer run (:func:`reap_scratch`), so a
    killed writer's half-written shard does not stay beside the dataset."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if str(path.parent) not in _reaped_folders:
        _reaped_folders.add(str(path.parent))
        reap_scratch(path.parent)
    prefix = f".{path.name}.{_HOST}.{os.getpid()}-"
    if folder:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=path.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


def reap_scratch(folder: PathLike | None = None) -> list[str]:
    """Removes the :func:`scratch` files and folders in ``folder`` (the temp folder) whose owner, a process of
    this host, no longer runs; returns their names. A folder another host shares (its name carries another
    host's hash) is left alone, as is anything of a running process."""
    removed = []
    with contextlib.suppress(OSError), os.scandir(folder or tempfile.gettempdir()) as entries:
        for entry in entries:
            match = _SCRATCH.fullmatch(entry.name)
            if not match or match["host"] != _HOST or _running(int(match["pid"])):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            removed.append(entry.name)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True


# cached_file's copies: one folder per object version, shared by the node's processes, kept across runs.
CACHE_KEEP_S = 7 * 86400.0  # a copy unused this long is removed
CACHE_MAX_BYTES = 20 << 30  # beyond this the least recently used copies go (FACEMAE_CACHE_MAX_GB)
CACHE_IN_USE_S = 600.0  # a copy used this recently stays (a process may be about to open it)


def cache_dir() -> Path:
    """Where :func:`cached_file` keeps its copies: ``$FACEMAE_CACHE_DIR``, else ``facemae/objects`` in the
    user's cache folder (``$XDG_CACHE_HOME``, else ``~/.cache``)."""
    if os.environ.get("FACEMAE_CACHE_DIR"):
        return Path(os.environ["FACEMAE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "facemae", "objects")


def cached_file(location: PathLike) -> str:
    """A local path of a file: itself when local, else a copy of the object in :func:`cache_dir`, keyed by
    location, size and modification time, so the node's processes (and later runs) download each version
    once. For read-only inputs that libraries open by name (safetensors' header reader, ``load_file``).

    The copy appears whole (downloaded to a temp name, renamed). A download prunes the cache: copies unused
    for :data:`CACHE_KEEP_S`, then the least recently used beyond ``$FACEMAE_CACHE_MAX_GB`` (20 GiB)."""
    if not is_remote(location):
        return str(location)
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{location}: no such object")
    key = hashlib.sha256(f"{location}#{info.size}#{info.mtime_ns}".encode()).hexdigest()[:24]
    local = cache_dir() / key / path.rsplit("/", 1)[-1]
    with contextlib.suppress(OSError):
        if local.stat().st_size == info.size:
            os.utime(local)  # its last use, for pruning
            return str(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    part = local.with_name(f".{local.name}.{_HOST}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        download_file(location, part)
        os.replace(part, local)  # a process downloading the same version at once replaces it with the same bytes
    finally:
        part.unlink(missing_ok=True)
    prune_cache()
    return str(local)


def prune_cache(max_bytes: int | None = None) -> list[str]:
    """Removes :func:`cached_file` copies unused for :data:`CACHE_KEEP_S`, then the least recently used until
    the rest fit in ``max_bytes`` (``$FACEMAE_CACHE_MAX_GB``, else :data:`CACHE_MAX_BYTES`), never one used in
    the last :data:`CACHE_IN_USE_S`; also downloads that a killed process left. Returns the removed folders."""
    if max_bytes is None:
        gb = os.environ.get("FACEMAE_CACHE_MAX_GB")
        max_bytes = int(float(gb) * (1 << 30)) if gb else CACHE_MAX_BYTES
    now, entries = time.time(), []  # (last use, bytes, folder)
    with contextlib.suppress(OSError), os.scandir(cache_dir()) as folders:
        for folder in folders:
            with contextlib.suppress(OSError):
                stats = [(f.name, f.stat(follow_symlinks=False)) for f in os.scandir(folder.path)]
                used = max([folder.stat().st_mtime, *(st.st_mtime for _, st in stats)])  # a download's too
                for name, st in stats:  # a download whose process was killed
                    if name.endswith(".part") and now - st.st_mtime > CACHE_KEEP_S:
                        os.unlink(os.path.join(folder.path, name))
                entries.append((used, sum(st.st_size for name, st in stats if not name.endswith(".part")),
                                folder.path))
    removed, total = [], sum(size for _, size, _ in entries)
    for used, size, folder in sorted(entries):
        if now - used < CACHE_IN_USE_S or (now - used < CACHE_KEEP_S and total <= max_bytes):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        total -= size
    return removed


def store_of(location: str) -> tuple[str, str] | None:
    """The store ``location`` is on: ``(scheme, bucket)`` of an object location, ``None`` for a local path."""
    return split_url(location)[:2] if is_remote(location) else None


def for_arrow(locations: Sequence[str]) -> tuple[list[str], pafs.FileSystem | None]:
    """``(paths, filesystem)`` to hand Ray Data's ``read_parquet`` or pyarrow: local paths made absolute (its
    tasks run in working directories of their own) with ``None`` (the default), object locations as paths in
    their filesystem, which carries the endpoint and region of :func:`configure` (a bare URL would reach AWS
    itself). All on one store (:func:`store_of`)."""
    if len({store_of(loc) for loc in locations}) > 1:
        raise StorageLocationError(f"{locations[0]} and others: read from one store (one bucket) at a time")
    if not locations or not is_remote(locations[0]):
        return [absolute(loc) for loc in locations], None
    resolved = [resolve(loc) for loc in locations]
    return [path for _, path in resolved], resolved[0][0]


class AppendLog:
    """A text file that grows by lines (metrics.jsonl, sample ids). Appended in place when local. An
    object cannot grow, so on a store a local copy (started from the object, when there is one) takes
    the lines and :meth:`flush` uploads it whole, replacing the object: a reader sees the log as of
    the last upload, never half a line. Uploads are at most one per ``upload_every_s`` (a whole-log
    upload per line would send O(lines^2) bytes over a run), plus forced ones (a checkpoint, the end)."""

    def __init__(self, location: PathLike, *, upload_every_s: float = 0.0) -> None:
        self.location = str(location)
        self.remote = is_remote(location)
        self.upload_every_s = upload_every_s
        self._uploaded_at = -math.inf
        if self.remote:
            self._local = scratch("log", suffix=".txt")
            if is_file(location):
                download_file(location, self._local)
        else:
            self._local = self.location
            Path(self._local).parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._local, "a", encoding="utf-8")
        self._dirty = False

    def text(self) -> str:
        """What the log holds so far."""
        self._file.flush()
        return Path(self._local).read_text(encoding="utf-8")

    def write(self, text: str) -> None:
        """Appends ``text``; on disk on return when local, at the next upload on a store."""
        self._file.write(text)
        self._file.flush()
        self._dirty = True

    def flush(self, *, force: bool = False) -> None:
        """Uploads the log when it is on a store, has grown since the last upload, and either ``force`` or
        ``upload_every_s`` have passed since then."""
        if not (self.remote and self._dirty):
            return
        now = time.monotonic()
        if force or now - self._uploaded_at >= self.upload_every_s:
            upload_file(self._local, self.location)
            self._uploaded_at, self._dirty = now, False

    def close(self) -> None:
        self.flush(force=True)
        self._file.close()
        if self.remote:
            Path(self._local).unlink(missing_ok=True)


@contextlib.contextmanager
def output_folder(location: PathLike) -> Iterator[Path]:
    """A local folder to write a set of files into (a report): ``location`` itself when local (created);
    for an object-store location a temporary folder whose files are uploaded, each whole, once the block
    ends without an error."""
    if not is_remote(location):
        Path(location).mkdir(parents=True, exist_ok=True)
        yield Path(location)
        return
    with scratch_folder("output") as tmp:
        yield Path(tmp)
        upload_folder(tmp, location)
