"""Container images for the test node, built without a container engine or a registry.

Owns the image archives tests/peers/node.py imports into containerd (`ctr images import`):

  base      Debian bookworm from debootstrap (minbase plus the packages kubeshim's recipe
            installs, so the recipe's apt step finds them there);
  kubeshim  kubeshim:0.1.0, the project's own recipe (scripts/image-install.sh, the script the
            Dockerfile runs) run in a chroot over the base, captured as an overlayfs upper layer;
  agnhost   registry.k8s.io/e2e-test-images/agnhost, the base plus the agnhost binary built by
            build.sh (Kubernetes' e2e test server), also tagged as glibc-dns-testing;
  pause     registry.k8s.io/pause, the agnhost binary alone running `agnhost pause`.

Each archive is in `docker save` format (manifest.json, config, uncompressed layer tars) and is
cached under $KUBESHIM_IMAGES_DIR (default ~/.cache/kubeshim/images) by the hash of what it
is made from; a second run builds nothing.

    python tests/peers/images.py build     # prints one line per image: name, seconds, archive
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the tests package from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.peers.cluster import REPO, Peers  # noqa: E402

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# What the base holds: kubeshim's recipe packages, and the clients e2e tests run in agnhost pods.
BASE_PACKAGES = (
    "python3", "python3-pip", "nftables", "iproute2", "curl", "dnsutils", "ca-certificates",
    "netcat-openbsd", "procps", "socat", "wget",
)
KUBESHIM_IMAGE = "kubeshim:0.1.0"
# The names Kubernetes' e2e framework uses at the pinned version (test/utils/image/manifest.go).
AGNHOST_IMAGE = "registry.k8s.io/e2e-test-images/agnhost:2.66.1"
GLIBC_DNS_IMAGE = "registry.k8s.io/e2e-test-images/glibc-dns-testing:2.1.1"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10.2"
# Sources the Dockerfile copies into /app (and the recipe itself).
KUBESHIM_SOURCES = (
    "pyproject.toml", "README.md", "cluster", "proxy", "dns", "kubeshim", "examples",
    "scripts/image-install.sh",
)
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def images_dir() -> Path:
    return Path(os.environ.get("KUBESHIM_IMAGES_DIR") or Path.home() / ".cache/kubeshim/images")


@dataclass(frozen=True)
class Image:
    """One built image archive and the names it carries."""

    names: tuple[str, ...]
    archive: Path
    seconds: float


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big") + part)
    return h.hexdigest()[:16]


def _tree_digest(root: Path, rels: Sequence[str]) -> bytes:
    """Names, modes and contents of the files under `rels` (symlinks by target)."""
    h = hashlib.sha256()
    for rel in rels:
        top = root / rel
        paths = [top] if not top.is_dir() or top.is_symlink() else sorted(top.rglob("*"))
        for p in paths:
            if "__pycache__" in p.parts or p.suffix == ".pyc":
                continue
            h.update(str(p.relative_to(root)).encode() + b"\0")
            if p.is_symlink():
                h.update(os.readlink(p).encode())
            elif p.is_file():
                h.update(oct(p.stat().st_mode & 0o111).encode() + p.read_bytes())
    return h.digest()


def host_ca_bundle() -> str:
    """The CA bundle pip uses on this host (PIP_CERT, SSL_CERT_FILE, else Debian's)."""
    for var in ("PIP_CERT", "SSL_CERT_FILE"):
        if os.environ.get(var) and Path(os.environ[var]).is_file():
            return os.environ[var]
    return "/etc/ssl/certs/ca-certificates.crt"


def _run(argv: Sequence[str], what: str, timeout: float = 1800) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-25:])
        raise RuntimeError(f"{what} failed (exit {result.returncode}):\n{tail}")


# --- Layers --------------------------------------------------------------------------------


def _normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime = min(info.mtime, 2**31 - 1)
    info.uname = info.gname = ""
    return info


def _walk(root: Path) -> Iterator[Path]:
    """Every path under root, parents first, in a stable order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            yield base / name


def write_layer(root: Path, out: Path, overlay_upper: bool = False) -> None:
    """Tar `root` as an image layer. With overlay_upper, overlayfs whiteouts (0/0 character
    devices) and opaque directories become the OCI layer whiteouts (`.wh.` files)."""
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in _walk(root):
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if overlay_upper and stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                parent, _, name = rel.rpartition("/")
                wh = tarfile.TarInfo(f"{parent}/.wh.{name}" if parent else f".wh.{name}")
                tar.addfile(_normalize(wh))
                continue
            tar.add(path, arcname=rel, recursive=False, filter=_normalize)
            if overlay_upper and stat.S_ISDIR(st.st_mode):
                try:
                    opaque = os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False)
                except OSError:
                    opaque = b""
                if opaque == b"y":
                    tar.addfile(_normalize(tarfile.TarInfo(f"{rel}/.wh..wh..opq")))
    tmp.rename(out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_archive(
    out: Path, names: Sequence[str], layers: Sequence[Path], entrypoint: Sequence[str],
    cmd: Sequence[str] = (), workdir: str = "/",
) -> None:
    """A `docker save` archive of one image: its layer tars (uncompressed), config, manifest."""
    diff_ids = [f"sha256:{_sha256(layer)}" for layer in layers]
    config = json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": list(entrypoint), "Cmd": list(cmd) or None,
            "Env": [PATH_ENV], "WorkingDir": workdir,
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "tests/peers/images.py"} for _ in layers],
    }, sort_keys=True).encode()
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    layer_names = [f"{d.removeprefix('sha256:')}/layer.tar" for d in diff_ids]
    manifest = json.dumps([
        {"Config": config_name, "RepoTags": list(names), "Layers": layer_names}
    ]).encode()
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        for name, layer in zip(layer_names, layers, strict=True):
            tar.add(layer, arcname=name)
        for name, data in ((config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tmp.rename(out)


# --- The images ------------------------------------------------------------------------------


class Builder:
    """Builds (or finds cached) the node's image archives."""

    def __init__(self, cache: Path | None = None, peers: Peers | None = None) -> None:
        self.cache = cache or images_dir()
        self.peers = peers or Peers.find()
        self.agnhost = self.peers.kube_proxy.parent / "agnhost"
        self._layers: list[Path] = []

    def base(self) -> tuple[Path, Path]:
        """(rootfs directory, layer tar) of the Debian base; debootstrap on first use."""
        key = _digest(DEBIAN_SUITE.encode(), DEBIAN_MIRROR.encode(),
                      " ".join(BASE_PACKAGES).encode())
        top = self.cache / f"base-{DEBIAN_SUITE}-{key}"
        rootfs, layer = top / "rootfs", top / "layer.tar"
        if layer.exists():
            return rootfs, layer
        if shutil.which("debootstrap") is None:
            raise RuntimeError("debootstrap is not installed (scripts/setup.sh installs it)")
        shutil.rmtree(top, ignore_errors=True)
        top.mkdir(parents=True)
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
              DEBIAN_SUITE, str(rootfs), DEBIAN_MIRROR], "debootstrap")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (rootfs / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        write_layer(rootfs, layer)
        return rootfs, layer

    def agnhost_layer(self, rootfs: Path) -> Path:
        """What agnhost's own Dockerfile adds to its base: the binary (also as agnhost-2),
        CoreDNS as /coredns (the DNS tests' own name server pods run it), porter's serving
        certificate, /uploads, and the user and group the image defines."""
        coredns = self.peers.coredns
        for binary in (self.agnhost, coredns):
            if not os.access(binary, os.X_OK):
                raise RuntimeError(f"{binary} missing: run tests/peers/build.sh")
        certs = {n: self.agnhost.parent / f"agnhost-{n}"
                 for n in ("localhost.crt", "localhost.key")}
        key = _digest(_sha256(self.agnhost).encode(), _sha256(coredns).encode(),
                      rootfs.parent.name.encode(), *(p.read_bytes() for p in certs.values()))
        layer = self.cache / f"agnhost-{key}.tar"
        if layer.exists():
            return layer
        self.cache.mkdir(parents=True, exist_ok=True)
        passwd = (rootfs / "etc/passwd").read_text() + \
            "user-defined-in-image:x:1000:1000::/home/user-defined-in-image:/bin/sh\n"
        group = (rootfs / "etc/group").read_text() + \
            "user-defined-in-image:x:1000:\ngroup-defined-in-image:x:50000:user-defined-in-image\n"

        def entry(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644) -> tarfile.TarInfo:
            info = tarfile.TarInfo(name)
            info.type, info.mode = kind, mode
            return info

        with tarfile.open(layer.with_suffix(".tmp"), "w") as tar:
            for name, data, mode in (("etc/passwd", passwd.encode(), 0o644),
                                     ("etc/group", group.encode(), 0o644)):
                info = entry(name, mode=mode)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            for name, path in certs.items():
                info = entry(name)
                info.size = path.stat().st_size
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            tar.addfile(entry("uploads", tarfile.DIRTYPE, 0o755))
            for name, binary in (("agnhost", self.agnhost), ("coredns", coredns)):
                info = entry(name, mode=0o755)
                info.size = binary.stat().st_size
                with open(binary, "rb") as f:
                    tar.addfile(info, f)
            link = entry("agnhost-2", tarfile.SYMTYPE, 0o777)
            link.linkname = "agnhost"
            tar.addfile(link)
        layer.with_suffix(".tmp").rename(layer)
        return layer

    def kubeshim_layer(self, rootfs: Path, base_layer: Path) -> Path:
        """scripts/image-install.sh in a chroot over the base; the overlay upper is the layer."""
        key = _digest(base_layer.parent.name.encode(), _tree_digest(REPO, KUBESHIM_SOURCES))
        layer = self.cache / f"kubeshim-{key}.tar"
        if layer.exists():
            return layer
        work = Path(tempfile.mkdtemp(prefix="kubeshim-image-", dir=self.cache))
        try:
            upper, merged = work / "upper", work / "merged"
            for d in (upper, work / "work", merged):
                d.mkdir()
            app = upper / "app"
            app.mkdir()
            for rel in KUBESHIM_SOURCES:
                if rel.startswith("scripts/"):
                    continue
                src = REPO / rel
                if src.is_dir():
                    shutil.copytree(src, app / rel, symlinks=True,
                                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    shutil.copy2(src, app / rel)
            recipe = upper / "usr/local/lib/kubeshim/image-install.sh"
            recipe.parent.mkdir(parents=True)
            shutil.copy2(REPO / "scripts/image-install.sh", recipe)
            # A private mount namespace: the overlay and /proc vanish with the shell.
            script = (
                "set -e; "
                f"mount -t overlay overlay -o lowerdir={rootfs},upperdir={upper},"
                f"workdir={work / 'work'} {merged}; "
                f"mount -t proc proc {merged}/proc; "
                f"mount --bind /dev {merged}/dev; "
                f"cp /etc/resolv.conf {merged}/etc/resolv.conf; "
                # pip in the chroot trusts what pip on this host trusts (the file goes with
                # /tmp, never into the layer).
                f"cp {host_ca_bundle()} {merged}/tmp/host-ca.crt; "
                f"chroot {merged} /usr/bin/env -i {PATH_ENV} HOME=/root "
                "PIP_CERT=/tmp/host-ca.crt sh /usr/local/lib/kubeshim/image-install.sh; "
                f"rm -f {merged}/etc/resolv.conf; "
                f"umount {merged}/dev {merged}/proc {merged}"
            )
            _run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                 "the kubeshim image recipe (scripts/image-install.sh)")
            for junk in ("root/.cache", "tmp", "var/cache/ldconfig", "etc/resolv.conf"):
                p = upper / junk
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                elif p.exists() or p.is_symlink():
                    p.unlink()
            write_layer(upper, layer, overlay_upper=True)
        finally:
            subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)
        return layer

    def _image(self, stem: str, names: Sequence[str], layers: Sequence[Path],
               entrypoint: Sequence[str], cmd: Sequence[str] = (), workdir: str = "/") -> Path:
        self._layers += layers
        key = _digest(*(n.encode() for n in names), *(p.name.encode() for p in layers),
                      *(a.encode() for a in (*entrypoint, "--", *cmd, workdir)))
        out = self.cache / f"{stem}-{key}.image.tar"
        if not out.exists():
            write_archive(out, names, layers, entrypoint, cmd, workdir)
        return out

    def build(self) -> list[Image]:
        """All images the node needs, each built unless cached."""
        self.cache.mkdir(parents=True, exist_ok=True)
        built: list[Image] = []

        def timed(names: Sequence[str], make: Callable[[], Path]) -> None:
            start = time.monotonic()
            built.append(Image(tuple(names), make(), time.monotonic() - start))

        start = time.monotonic()
        rootfs, base_layer = self.base()
        built.append(Image(("debian:" + DEBIAN_SUITE,), base_layer, time.monotonic() - start))
        agnhost = self.agnhost_layer(rootfs)
        timed([KUBESHIM_IMAGE], lambda: self._image(
            "kubeshim", [KUBESHIM_IMAGE], [base_layer, self.kubeshim_layer(rootfs, base_layer)],
            ["kubeshim"], ["--help"], "/app"))
        timed([AGNHOST_IMAGE, GLIBC_DNS_IMAGE], lambda: self._image(
            "agnhost", [AGNHOST_IMAGE, GLIBC_DNS_IMAGE], [base_layer, agnhost], ["/agnhost"],
            ["pause"]))
        timed([PAUSE_IMAGE], lambda: self._image(
            "pause", [PAUSE_IMAGE], [agnhost], ["/agnhost", "pause"]))
        self._prune({base_layer.parent, *(i.archive for i in built)} | set(self._layers))
        return built

    def _prune(self, keep: set[Path]) -> None:
        """Remove what earlier sources or versions left in the cache an hour ago or earlier:
        every source change makes a new kubeshim archive of ~330 MB, and a node needs its
        archives only while it starts (another checkout may be starting one right now)."""
        old = time.time() - 3600
        for entry in self.cache.iterdir():
            if entry in keep or entry.lstat().st_mtime > old:
                continue
            if entry.is_dir():
                subprocess.run(["rm", "-rf", "--one-file-system", str(entry)], check=False)
            else:
                entry.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["build"]:
        print(__doc__, file=sys.stderr)
        return 2
    start = time.monotonic()
    for image in Builder().build():
        print(f"{' '.join(image.names):70} {image.seconds:6.1f}s  {image.archive}")
    print(f"images built in {time.monotonic() - start:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
