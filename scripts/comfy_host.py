"""Find or make the ComfyUI the pack is tested against, and the reference code tests load as oracles.

The one lookup every script, test and benchmark uses (standard library only, so the test command
can call it before any virtual environment exists). The host is one of the tested releases
(:data:`TESTED`), the one ``COMFYUI_VERSION`` names or else the newest. A source is found, in this order:

1. the folder an environment variable names (``COMFYUI_PATH`` for the host): a user's own checkout,
   which must be the release asked for;
2. a copy made earlier inside the repository, under ``.host/`` (git-ignored; ``.host/ComfyUI-<version>``);
3. its source archive in the folder a variable names (``COMFYUI_ARCHIVE_DIR`` for the host,
   ``NEGATIVE_GUIDANCE_ORACLES`` for the oracles; or the file ``COMFYUI_ARCHIVE`` names), checked
   against its ``.sha256`` before it is unpacked into ``.host/``;
4. ``git clone --depth 1 --branch <tag>`` of the public repository into ``.host/``.

When none works, :class:`HostNotFound` says how to point the lookup at a checkout. Run as a script
it prints the folder it settled on to stdout and one line naming it to stderr, or the release asked
for (``version``) or every tested one (``versions``)::

    python scripts/comfy_host.py [host|nag-oracle|version|versions]
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MADE = ROOT / ".host"
TESTED = ("0.3.64", "0.8.0")
"""The ComfyUI releases the pack is tested on, oldest first; the newest is the default."""


class HostNotFound(RuntimeError):
    """No source could be found or made; the message says how to point the lookup at one."""


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one external source tree can come from, and how to recognise it."""

    name: str            # what it is, for messages
    env: str             # a variable naming a user's own checkout
    folder: str          # its folder name inside the archive
    made_as: str         # its folder name under .host/
    marker: str          # a file every real copy has, relative to the folder
    archive: str         # the source archive's file name
    archive_dir_env: str  # a variable naming the folder that holds the archive
    archive_env: str     # a variable naming another copy of that archive
    clone_url: str
    tag: str
    version_file: str = ""   # a file whose text holds the version, for the line printed
    pinned: str = ""         # the version asked for

    def is_copy(self, path: Path) -> bool:
        return (path / self.marker).is_file()

    def archive_path(self) -> Path | None:
        """The archive the variables point at, or None when none does."""
        if os.environ.get(self.archive_env):
            return Path(os.environ[self.archive_env])
        folder = os.environ.get(self.archive_dir_env)
        return Path(folder).expanduser() / self.archive if folder else None


def host_version() -> str:
    """The release ``COMFYUI_VERSION`` asks for, the newest tested when unset; an untested one is refused."""
    version = os.environ.get("COMFYUI_VERSION") or TESTED[-1]
    if version not in TESTED:
        raise HostNotFound(f"COMFYUI_VERSION={version} is not a release the pack is tested on; tested: "
                           f"{', '.join(TESTED)}")
    return version


def host(version: str | None = None) -> Source:
    """The host at ``version`` (by default the one ``COMFYUI_VERSION`` asks for)."""
    version = version or host_version()
    return Source(
        name="ComfyUI", env="COMFYUI_PATH", folder="ComfyUI", made_as=f"ComfyUI-{version}", marker="comfy/samplers.py",
        archive=f"ComfyUI-{version}.tar.gz", archive_dir_env="COMFYUI_ARCHIVE_DIR", archive_env="COMFYUI_ARCHIVE",
        clone_url="https://github.com/comfyanonymous/ComfyUI.git", tag=f"v{version}",
        version_file="comfyui_version.py", pinned=version,
    )


NAG_ORACLE = Source(
    name="ComfyUI-NAG ef8a641 (reference NAG port, a test oracle)",
    env="NAG_ORACLE_PATH",
    folder="ComfyUI-NAG",
    made_as="ComfyUI-NAG",
    marker="__init__.py",
    archive="ComfyUI-NAG-ef8a641.tar.gz",
    archive_dir_env="NEGATIVE_GUIDANCE_ORACLES",
    archive_env="NAG_ORACLE_ARCHIVE",
    clone_url="https://github.com/ChenDarYen/ComfyUI-NAG.git",
    tag="ef8a641be08983cf5f06669f70719b6eecce3c7f",
)

SOURCES = {"host": host, "nag-oracle": lambda: NAG_ORACLE}


@dataclasses.dataclass(frozen=True)
class Found:
    path: Path
    how: str

    def line(self, source: Source) -> str:
        """One line naming what is used, e.g. ``host: ComfyUI 0.3.64 at /x/.host/ComfyUI (made earlier)``."""
        version = _version(self.path, source)
        text = f"{source.name} {version}".strip() + f" at {self.path} ({self.how})"
        if source.pinned and version != source.pinned:
            text += f"; asked for {source.pinned}"
        return text


def _version(path: Path, source: Source) -> str:
    file = path / source.version_file
    if not source.version_file or not file.is_file():
        return ""
    found = [line.split("=", 1)[1].strip().strip("\"'") for line in file.read_text().splitlines()
             if line.startswith("__version__")]
    return found[0] if found else "of unknown version"


def made_copy(source: Source) -> Path:
    return MADE / source.made_as


def find(source: Source | None = None) -> Found | None:
    """The source the variable names or an earlier copy in ``.host/``; makes nothing."""
    source = source or host()
    named = os.environ.get(source.env)
    if named:
        path = Path(named).expanduser().resolve()
        if not source.is_copy(path):
            raise HostNotFound(f"{source.env}={named} is not a {source.name} checkout (no {source.marker})")
        version = _version(path, source)
        if source.pinned and version and version != source.pinned:
            raise HostNotFound(
                f"{source.env}={named} is {source.name} {version}, but COMFYUI_VERSION asks for {source.pinned}: "
                f"set COMFYUI_VERSION to the checkout's release (tested: {', '.join(TESTED)}) or point {source.env} "
                f"at a {source.pinned} checkout")
        return Found(path, f"from {source.env}")
    if source.is_copy(made_copy(source)):
        return Found(made_copy(source), "made earlier in .host/")
    return None


def ensure(source: Source | None = None, log=None) -> Found:
    """Find the source, or make it from the archive or a clone; raise :class:`HostNotFound` otherwise."""
    source = source or host()
    found = find(source)
    if found is not None:
        return found
    tried = []
    for make in (_from_archive, _from_clone):
        try:
            return make(source, log or _stderr)
        except HostNotFound as why:
            tried.append(str(why))
    raise HostNotFound(
        f"no {source.name} to test against. Tried:\n  - " + "\n  - ".join(tried)
        + f"\nPoint {source.env} at a checkout (e.g. {source.env}=/path/to/{source.folder} bash scripts/test.sh),"
        f" or {source.archive_dir_env} at a folder holding {source.archive} and its .sha256."
    )


def _from_archive(source: Source, log) -> Found:
    archive = source.archive_path()
    if archive is None:
        raise HostNotFound(f"archive {source.archive}: {source.archive_dir_env} names no folder")
    if not archive.is_file():
        raise HostNotFound(f"archive {archive}: not there")
    expected = _expected_sha256(archive)
    actual = _sha256(archive)
    if actual != expected:
        raise HostNotFound(f"archive {archive}: sha256 {actual} is not the {expected} of its .sha256 file")
    log(f"unpacking {archive.name} (sha256 checked) into .host/")
    with _staging() as stage:
        with tarfile.open(archive) as tar:
            _extract(tar, stage)
        return _install(source, stage / source.folder, f"unpacked from {archive}, sha256 checked")


def _from_clone(source: Source, log) -> Found:
    if shutil.which("git") is None:
        raise HostNotFound("git clone: no git on this machine")
    log(f"cloning {source.clone_url} at {source.tag} into .host/")
    with _staging() as stage:
        target = stage / source.folder
        env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
        cmd = ["git", "clone", "-q", "--depth", "1", "--branch", source.tag, source.clone_url, str(target)]
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise HostNotFound(f"git clone {source.clone_url}: no answer in 600 s") from None
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["failed"])[-1]
            raise HostNotFound(f"git clone {source.clone_url} --branch {source.tag}: {reason}")
        return _install(source, target, f"cloned from {source.clone_url} at {source.tag}")


def _expected_sha256(archive: Path) -> str:
    sums = archive.with_name(archive.name + ".sha256")
    if not sums.is_file():
        raise HostNotFound(f"archive {archive}: no {sums.name} beside it to check it against")
    return sums.read_text().split()[0].lower()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract(tar: tarfile.TarFile, into: Path) -> None:
    if hasattr(tarfile, "data_filter"):
        tar.extractall(into, filter="data")
        return
    for member in tar.getmembers():
        if member.name.startswith(("/", "..")) or "/../" in member.name:
            raise HostNotFound(f"archive member {member.name!r} points outside its folder")
    tar.extractall(into)


class _staging:
    """A scratch folder inside ``.host/``, removed whatever happens (so a half copy is never found)."""

    def __enter__(self) -> Path:
        MADE.mkdir(exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=".staging-", dir=MADE))
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _install(source: Source, unpacked: Path, how: str) -> Found:
    if not source.is_copy(unpacked):
        raise HostNotFound(f"{how}: no {source.folder}/{source.marker} inside")
    target = made_copy(source)
    if target.exists():
        shutil.rmtree(target)
    unpacked.rename(target)
    return Found(target, how)


def _stderr(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


PACK = "negative_guidance_pack"


def load_pack():
    """Import the pack by path under :data:`PACK` (its folder's name varies; never ``import nodes``)."""
    if PACK in sys.modules:
        return sys.modules[PACK]
    import importlib.util

    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return module


def import_host(cpu: bool = True, pytorch_attention: bool = False) -> Path:
    """Find or make the host, put it on ``sys.path`` and import it in-process (on the CPU unless told;
    with PyTorch's attention kernel, the host's ``--use-pytorch-cross-attention``, if asked).

    ``args`` must be set before ``comfy.model_management`` is first imported; the host's ``nodes.py``
    is imported too, so its node classes and custom-node loading are ready.
    """
    path = str(ensure(host()).path)
    if path not in sys.path:
        sys.path.insert(0, path)
    from comfy.cli_args import args

    args.cpu = cpu
    args.use_pytorch_cross_attention = args.use_pytorch_cross_attention or pytorch_attention
    import importlib

    importlib.import_module("comfy.model_management")
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    importlib.import_module("nodes")
    return Path(path)


def main(argv: list[str]) -> int:
    which = argv[0] if argv else "host"
    if which == "versions":
        sys.stdout.write(" ".join(TESTED) + "\n")
        return 0
    if which not in (*SOURCES, "version"):
        _stderr(f"usage: comfy_host.py [{'|'.join(SOURCES)}|version|versions]")
        return 2
    try:
        if which == "version":
            sys.stdout.write(host_version() + "\n")
            return 0
        source = SOURCES[which]()
        found = ensure(source)
    except HostNotFound as why:
        _stderr(f"error: {why}")
        return 1
    _stderr(f"{which}: {found.line(source)}")
    sys.stdout.write(f"{found.path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
