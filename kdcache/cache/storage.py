"""Where a cache lives: a local directory, or an object store named by a URL (``s3://``, ``gs://``,
``abfs://`` through ``pyarrow.fs``; any other fsspec URL through pyarrow's ``FSSpecHandler``).

Every read and write of a cache goes through a :class:`Store`. Keys are ``/``-separated paths
relative to the cache root (``run.json``, ``shards/part-00000.parquet``); every write puts one
whole object whose bytes are complete in memory.

**Local directory** (:class:`LocalStore`). An object is written to ``.<name>.tmp-<pid>`` beside
its final name, fsynced and renamed into place, so a reader sees the old file, no file, or the
whole new one. :meth:`Store.create_json_once` links a complete temp file to the final name
(``os.link`` fails if the name exists): an atomic create-if-absent, the first of racing
workers wins.

**Object store** (:class:`ObjectStore`). There is no rename. What the cache relies on instead:
a PUT, or a completed multipart upload, makes an object appear whole or not at all, and a
read after a write sees it (S3, GCS and Azure Blob are strongly consistent). An object is
written once, straight to its final key. A writer killed during an upload leaves no object
(S3 may keep the parts of an unfinished multipart upload, which no listing shows; a bucket
lifecycle rule ``AbortIncompleteMultipartUpload`` reclaims them). The guarantees of
:mod:`kdcache.cache.writer` rest on the order of writes, which both stores keep: a shard object
first, then its record object; a record counts only if its shard object exists with the
recorded size, and stage two checks every shard's sha256 against the manifest. So a killed
worker leaves nothing that looks finished, and a rerun rewrites exactly the shards without a
valid record, with the same bytes. For fsspec backends that write in place (sftp, say), a
killed writer can leave a partial object; a partial shard has no record and a partial JSON
does not parse, so it still never counts as finished.

What is weaker on an object store: :meth:`Store.create_json_once` is a look-up followed by a
PUT, not an atomic create. Two workers starting at the same moment can both find ``run.json``
(or ``scorer.json``) absent and both write it; the later PUT wins. Workers with the same
settings write the same bytes, so nothing changes. With different settings, each worker reads
``run.json`` back after writing it, and :func:`kdcache.teacher.generate.check_claim` reads
``run.json`` and ``scorer.json`` again before every shard record, so the worker whose claim
lost stops before recording a shard: one cache never mixes two settings or two scorers.

Credentials and endpoints come from each store's usual environment: for S3,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or ``AWS_PROFILE``, an instance role),
``AWS_REGION`` / ``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL`` for S3-compatible servers
(MinIO, Ceph, R2); for GCS, ``GOOGLE_APPLICATION_CREDENTIALS``. Store errors become one-line
:class:`kdcache.errors.KdcacheError`\\ s naming the URL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from kdcache.errors import KdcacheError, first_line

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_url(location: str | os.PathLike) -> bool:
    """Whether ``location`` names an object store (``scheme://...``) rather than a local path."""
    match = _URL.match(str(location))
    return match is not None and match.group(1).lower() != "file"


def _json_bytes(payload: Any, indent: int) -> bytes:
    return (json.dumps(payload, indent=indent) + "\n").encode()


def _fsync_write(path: Path, data: bytes | memoryview) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


class Store(ABC):
    """A cache root: whole objects under ``/``-separated keys (see the module docstring)."""

    is_local: bool

    @abstractmethod
    def where(self, key: str = "") -> str:
        """How messages name ``key`` (a path, or a URL)."""

    @abstractmethod
    def read_bytes(self, key: str):
        """The object's bytes (``bytes`` or a ``pyarrow.Buffer``); ``FileNotFoundError`` if it does not exist."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes | memoryview) -> None:
        """Put the object whole (readers never see part of it); replaces an existing one."""

    @abstractmethod
    def create_json_once(self, key: str, payload: Any) -> None:
        """Write ``payload`` as JSON unless ``key`` exists (atomic only on a local directory)."""

    @abstractmethod
    def size(self, key: str) -> int | None:
        """Bytes of the object, or None if it does not exist."""

    @abstractmethod
    def exists(self, key: str = "") -> bool:
        """Whether ``key`` is an object or has objects under it."""

    @abstractmethod
    def list(self, key: str = "") -> list[str]:
        """Names directly under ``key`` (objects and sub-prefixes); empty if there are none."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object, or everything under the prefix; nothing if absent."""

    @abstractmethod
    def prepare(self) -> None:
        """Make the root writable (create the directory; check the bucket exists)."""

    def read_json(self, key: str) -> Any:
        return json.loads(bytes(self.read_bytes(key)))

    def write_json(self, key: str, payload: Any, indent: int = 2) -> None:
        self.write_bytes(key, _json_bytes(payload, indent))

    def clean_temps(self, key: str) -> None:
        """Remove temporary files a killed writer of ``key`` left (local directories only)."""

    def __str__(self) -> str:
        return self.where()


class LocalStore(Store):
    """A cache in a local (or network-mounted) directory."""

    is_local = True

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, key: str = "") -> Path:
        return self.root / key if key else self.root

    def where(self, key: str = "") -> str:
        return str(self.path(key))

    def read_bytes(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes | memoryview) -> None:
        """Temp file, fsync, rename; on failure (disk full) the temp file is removed and the
        ``OSError`` raised."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            _fsync_write(tmp, data)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    def create_json_once(self, key: str, payload: Any) -> None:
        path = self.path(key)
        if path.exists():
            return
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(_json_bytes(payload, 2))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)

    def size(self, key: str) -> int | None:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            return None

    def exists(self, key: str = "") -> bool:
        return self.path(key).exists()

    def list(self, key: str = "") -> list[str]:
        path = self.path(key)
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []

    def delete(self, key: str) -> None:
        path = self.path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def clean_temps(self, key: str) -> None:
        path = self.path(key)
        for stale in path.parent.glob(f".{path.name}.tmp-*"):
            stale.unlink(missing_ok=True)


class ObjectStore(Store):
    """A cache under a URL prefix of an object store, through a ``pyarrow.fs.FileSystem``."""

    is_local = False

    def __init__(self, url: str, filesystem, root: str, bucketed: bool) -> None:
        self.url = url.rstrip("/")
        self.fs = filesystem
        self.root = root.rstrip("/")
        # S3/GCS/Azure: the first path segment is a bucket (container), which must exist.
        self.bucketed = bucketed

    @classmethod
    def from_url(cls, url: str) -> ObjectStore:
        filesystem, root, bucketed = _filesystem(url)
        return cls(url.split("?", 1)[0], filesystem, root, bucketed)

    def _full(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def where(self, key: str = "") -> str:
        return f"{self.url}/{key}" if key else self.url

    def _info(self, key: str):
        try:
            return self.fs.get_file_info(self._full(key))
        except Exception as exc:  # noqa: BLE001 - pyarrow raises OSError or ArrowException subclasses
            raise store_error(self.where(key), exc) from None

    def read_bytes(self, key: str):
        """The object's bytes as a ``pyarrow.Buffer`` (one GET, no copy)."""
        try:
            with self.fs.open_input_stream(self._full(key)) as stream:
                return stream.read_buffer()
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001
            if self._info(key).type.name == "NotFound":
                raise FileNotFoundError(self.where(key)) from None
            raise store_error(self.where(key), exc) from None

    def write_bytes(self, key: str, data: bytes | memoryview) -> None:
        """One upload of the complete bytes. No ``with`` block: pyarrow completes an upload
        when its stream closes, so a failed write must not reach ``close()``; afterwards the
        object's size is checked."""
        full = self._full(key)
        try:
            if not self.bucketed:
                self.fs.create_dir(full.rsplit("/", 1)[0], recursive=True)  # path-like fsspec backends
            stream = self.fs.open_output_stream(full)
            stream.write(data)
            stream.close()
        except Exception as exc:  # noqa: BLE001
            raise store_error(self.where(key), exc) from None
        size = self.size(key)
        if size != memoryview(data).nbytes:
            raise KdcacheError(f"{self.where(key)}: the store holds {size} bytes after writing "
                               f"{memoryview(data).nbytes}; rerun the same command")

    def create_json_once(self, key: str, payload: Any) -> None:
        if self.size(key) is None:
            self.write_json(key, payload)

    def size(self, key: str) -> int | None:
        info = self._info(key)
        return None if info.type.name == "NotFound" else info.size

    def exists(self, key: str = "") -> bool:
        return self._info(key).type.name != "NotFound"

    def list(self, key: str = "") -> list[str]:
        from pyarrow.fs import FileSelector

        try:
            infos = self.fs.get_file_info(FileSelector(self._full(key), allow_not_found=True))
        except Exception as exc:  # noqa: BLE001
            raise store_error(self.where(key), exc) from None
        return sorted(info.base_name for info in infos)

    def delete(self, key: str) -> None:
        info = self._info(key)
        try:
            if info.type.name == "Directory":
                self.fs.delete_dir(self._full(key))
            elif info.type.name != "NotFound":
                self.fs.delete_file(self._full(key))
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001
            raise store_error(self.where(key), exc) from None

    def check_bucket(self) -> None:
        """One-line error if the URL's bucket (container) does not exist or is not visible."""
        if not self.bucketed:
            return
        bucket = self.root.split("/", 1)[0]
        try:
            found = self.fs.get_file_info(bucket).type.name != "NotFound"
        except Exception as exc:  # noqa: BLE001
            raise store_error(self.url, exc) from None
        if not found:
            raise KdcacheError(f"{self.url}: bucket {bucket!r} does not exist (or these credentials cannot see it); "
                               "create it or fix the URL")

    def prepare(self) -> None:
        self.check_bucket()


def store_error(where: str, exc: BaseException) -> KdcacheError:
    """A one-line error for a failed store request, with what usually fixes it."""
    text = str(exc)
    upper = text.upper().replace(" ", "_")
    if "NO_SUCH_BUCKET" in upper or "NOSUCHBUCKET" in upper:
        hint = "the bucket does not exist; create it or fix the URL"
    elif any(code in upper for code in ("ACCESS_DENIED", "ACCESSDENIED", "INVALID_ACCESS_KEY", "INVALIDACCESSKEY",
                                        "SIGNATURE_DOES_NOT_MATCH", "SIGNATUREDOESNOTMATCH", "FORBIDDEN",
                                        "UNAUTHORIZED", "UNAUTHENTICATED", "CREDENTIALS", "ACCESS_TOKEN", "OAUTH",
                                        "EXPIRED_TOKEN", "INVALID_TOKEN")):
        hint = ("access denied; check the credentials (for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE "
                "or the instance role) and the bucket's permissions")
    elif any(code in upper for code in ("NETWORK_CONNECTION", "COULDN'T_CONNECT", "COULD_NOT_RESOLVE", "CURLCODE",
                                        "CONNECTION_REFUSED", "TIMED_OUT", "TIMEOUT")):
        hint = "cannot reach the store; check the network and the endpoint (for S3: AWS_ENDPOINT_URL, AWS_REGION)"
    else:
        hint = "check the URL, the credentials and the network, then rerun the same command"
    return KdcacheError(f"{where}: {first_line(exc)}; {hint}")


def _filesystem(url: str):
    """``(pyarrow FileSystem, root path, bucketed)`` for a store URL."""
    import pyarrow as pa
    from pyarrow import fs as pafs

    scheme = _URL.match(url).group(1).lower()
    uri = url
    options = {
        # Objects smaller than one part go up in one PutObject at close (no multipart upload
        # left behind by a killed writer, one request instead of three).
        "s3": "allow_delayed_open=true",
        # pyarrow retries GCS for 15 minutes by default, so missing credentials took that
        # long to report; a minute still rides out transient errors.
        "gs": "retry_limit_seconds=60",
        "gcs": "retry_limit_seconds=60",
    }
    if scheme in options and options[scheme].split("=")[0] not in url:
        uri += ("&" if "?" in url else "?") + options[scheme]
    try:
        filesystem, root = pafs.FileSystem.from_uri(uri)
        return filesystem, root, type(filesystem).__name__ in ("S3FileSystem", "GcsFileSystem", "AzureFileSystem")
    except pa.ArrowInvalid as exc:
        if "Unrecognized filesystem type" not in str(exc):
            raise KdcacheError(f"{url}: invalid store URL ({first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - e.g. the S3 client cannot start, HDFS without a JVM
        raise store_error(url, exc) from None
    import fsspec

    try:
        filesystem, root = fsspec.core.url_to_fs(url)
    except ValueError:
        raise KdcacheError(f"{url}: unknown storage scheme {scheme}:// (neither pyarrow nor fsspec knows it); use a "
                           "local directory or a URL such as s3://bucket/prefix or gs://bucket/prefix") from None
    except ImportError as exc:
        raise KdcacheError(f"{url}: {first_line(exc).split(': ', 1)[-1]} (pip install it, then rerun)") from None
    except Exception as exc:  # noqa: BLE001
        raise store_error(url, exc) from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), root, False


def open_store(location: str | os.PathLike | Store) -> Store:
    """The :class:`Store` for a cache location: a ``Store`` as is, a URL as an
    :class:`ObjectStore` (``file://`` URLs are local), anything else as a local directory.

    Raises:
        KdcacheError: unknown URL scheme, or a store client that cannot start.
    """
    if isinstance(location, Store):
        return location
    if is_url(location):
        return ObjectStore.from_url(str(location))
    text = str(location)
    if _URL.match(text):  # file://
        from urllib.parse import unquote, urlparse

        return LocalStore(unquote(urlparse(text).path))
    return LocalStore(location)
