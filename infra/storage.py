"""Where a study's files live: a local folder, or any filesystem pyarrow names by URI (as Ray's own
`storage_path` does: s3://, gs://, abfs://, hdfs://, file://).

A plain path is used in place (on a cluster: storage every node mounts). A URI is mirrored: the study
runs in a local working folder and its files are copied to the URI with pyarrow.fs. Trial ranks push their
run folder after each checkpoint and when they stop (finished or failed), and a trial that resumes, on any
node, first pulls its folder back; the driver pulls the trials' records before it judges and reports, and
pushes the rest of the study folder (spec, report, LR search, MLflow store). `file://` takes the same path
as s3:// does, which is how the tests exercise it.

A file is copied unless the other side already holds it with the same size and a modification time no
older than the source's. Checkpoints that training deleted locally (`train.keep_checkpoints`) are deleted
from the mirror at the next push, so a pull never resurrects them.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

CHECKPOINTS = "checkpoints"  # the run folder's checkpoint directory (infra/checkpoint.py)


class StorageError(ValueError):
    """A storage URI that pyarrow cannot open (unknown scheme, missing credentials or library)."""


def is_uri(location: str) -> bool:
    return "://" in location


@dataclass(frozen=True)
class Mirror:
    """The copy of one local folder at `root` on `fs` (a pyarrow filesystem)."""

    fs: pafs.FileSystem
    root: str
    uri: str

    @classmethod
    def open(cls, uri: str) -> "Mirror":
        try:
            fs, root = pafs.FileSystem.from_uri(uri)
        except (ValueError, OSError, ImportError) as exc:
            raise StorageError(f"storage {uri!r}: pyarrow cannot open it ({exc})") from exc
        return cls(fs=fs, root=root.rstrip("/"), uri=uri.rstrip("/"))

    def child(self, *parts: str) -> "Mirror":
        return Mirror(fs=self.fs, root=str(PurePosixPath(self.root, *parts)), uri="/".join([self.uri, *parts]))

    def push(self, local: Path, *, exclude: Iterable[str] = ()) -> int:
        """Copy `local`'s files here, but none under a folder named in `exclude`; returns files copied."""
        local, exclude = Path(local), set(exclude)
        if not local.is_dir():
            return 0
        ours = {p.relative_to(local).as_posix(): p for p in sorted(local.rglob("*")) if p.is_file()
                and not exclude & set(p.relative_to(local).parts[:-1]) and not _staging(p.relative_to(local))}
        theirs = {rel: i for rel, i in self._listing().items() if not exclude & set(PurePosixPath(rel).parts[:-1])}
        copied = 0
        for rel, path in ours.items():
            stat = path.stat()
            info = theirs.get(rel)
            if info is not None and _same(info.size, info.mtime_ns, stat.st_size, stat.st_mtime_ns):
                continue
            target = f"{self.root}/{rel}"
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(str(path), target, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
            copied += 1
        gone = [rel for rel in theirs if rel not in ours and CHECKPOINTS in PurePosixPath(rel).parts]
        for rel in gone:  # checkpoints training pruned locally
            self.fs.delete_file(f"{self.root}/{rel}")
        for folder in {rel.rsplit("/", 1)[0] for rel in gone}:
            if not self.fs.get_file_info(pafs.FileSelector(f"{self.root}/{folder}", allow_not_found=True)):
                self.fs.delete_dir(f"{self.root}/{folder}")
        return copied

    def pull(self, local: Path, *, exclude: Iterable[str] = ()) -> int:
        """Copy this mirror's files into `local`, but none under a folder named in `exclude`."""
        local, exclude = Path(local), set(exclude)
        copied = 0
        for rel, info in self._listing().items():
            if exclude & set(PurePosixPath(rel).parts[:-1]):
                continue
            path = local / rel
            if path.is_file():
                stat = path.stat()
                if _same(stat.st_size, stat.st_mtime_ns, info.size, info.mtime_ns):
                    continue
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".pull-{path.name}")
            pafs.copy_files(f"{self.root}/{rel}", str(partial), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            partial.replace(path)  # a reader never sees half a file
            copied += 1
        return copied

    def _listing(self) -> dict[str, pafs.FileInfo]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True))
        prefix = len(self.root) + 1
        return {i.path[prefix:]: i for i in infos if i.type == pafs.FileType.File}


def _same(size: int, mtime_ns: int | None, source_size: int, source_mtime_ns: int | None) -> bool:
    """The copy (size, mtime) is up to date with its source: same size and written no earlier."""
    return size == source_size and mtime_ns is not None and source_mtime_ns is not None \
        and mtime_ns >= source_mtime_ns


def _staging(rel: Path) -> bool:
    """A checkpoint being written (infra/checkpoint.py writes `.tmp-*` then renames it)."""
    return any(part.startswith(".tmp-") for part in rel.parts)
