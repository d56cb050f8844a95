"""Checking for and installing an update on the box.

Order of an install (nothing before step 6 touches a slot, step 8 is the only
write that changes what boots):

1. trusted time (ota.clock) becomes the Updater's reference time;
2. TUF refresh from the repository or an offline bundle: root chain, then
   timestamp, snapshot, targets with signatures, thresholds, versions
   (no rollback), expiry (no freeze) and snapshot consistency (no mix-and-match);
3. our policy on the signed custom metadata: product, board, version strictly
   above the floor, not a version that already failed here;
4. box state: running the good slot, nothing on trial;
5. for a local bundle, a first pass hashes the image without writing;
6. the image streams into the idle slot, hashed on the way (at most the signed
   length is read);
7. the slot is read back and hashed again;
8. last write: the boot environment puts the idle slot on trial with tries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface

from moat.durable import atomic_write
from moat.errors import MoatError
from ota import bootenv
from ota.bootenv import NO_SLOT, BootState
from ota.clock import TrustedClock
from ota.config import OtaConfig, failed_versions, record_failed
from ota.repository import BUNDLE_INDEX
from ota.slots import CHUNK_SIZE, Slot, SlotError
from ota.version import VersionError, is_newer, parse_version

log = logging.getLogger(__name__)

BUNDLE_URL = "bundle:/"
SUPPORTED_HASHES = ("sha256", "sha512")
MAX_BUNDLE_MEMBER = 1 << 20  # metadata files; images are bounded by TUF length


class OtaRefused(MoatError):
    """An update was refused; the message says why. Nothing that boots changed."""


class BundleFetcher(FetcherInterface):
    """Serves `bundle:/<member>` URLs from a single-file offline bundle (tar)."""

    def __init__(self, path: Path) -> None:
        try:
            self._tar = tarfile.open(path, "r:")  # noqa: SIM115 - lives with us
            self._members = {m.name: m for m in self._tar.getmembers() if m.isfile()}
        except (OSError, tarfile.TarError) as exc:
            raise OtaRefused(f"{path}: not an update bundle ({exc})") from exc

    def index(self) -> dict[str, Any]:
        data = b"".join(self._fetch(BUNDLE_URL + BUNDLE_INDEX))
        try:
            index: dict[str, Any] = json.loads(data[:MAX_BUNDLE_MEMBER])
        except ValueError as exc:
            raise OtaRefused(f"bundle index unreadable: {exc}") from exc
        return index

    def _fetch(self, url: str) -> Iterator[bytes]:
        name = url[len(BUNDLE_URL) :] if url.startswith(BUNDLE_URL) else url
        member = self._members.get(name)
        if member is None:
            raise tuf_exc.DownloadHTTPError(f"{name} not in bundle", 404)
        f = self._tar.extractfile(member)
        if f is None:
            raise tuf_exc.DownloadHTTPError(f"{name} unreadable", 404)
        return iter(lambda: f.read(CHUNK_SIZE), b"")


class _Updater(Updater):
    """tuf's Updater with fsynced metadata writes and an injected reference time."""

    def __init__(self, reference_time: datetime, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # TrustedMetadataSet judges every expiry against this (TUF spec 5.1);
        # python-tuf takes it from the wall clock, we give it trusted time
        self._trusted_set.reference_time = reference_time

    def _persist_file(self, filename: str, data: bytes) -> None:
        atomic_write(filename, data)


@dataclass
class Candidate:
    name: str
    target: TargetFile
    version: str
    url: str


class Source:
    """A repository URL or an offline bundle, ready for an Updater."""

    def __init__(self, repository_url: str | None, bundle: Path | None) -> None:
        self.bundle = bundle
        self.fetcher: FetcherInterface | None = None
        if bundle is not None:
            self.fetcher = BundleFetcher(bundle)
            self.metadata_url = BUNDLE_URL + "metadata/"
            self.targets_url = BUNDLE_URL + "targets/"
        elif repository_url:
            base = repository_url.rstrip("/")
            self.metadata_url = base + "/metadata/"
            self.targets_url = base + "/targets/"
        else:
            raise OtaRefused("no repository configured and no bundle given")

    def describe(self) -> str:
        return f"bundle {self.bundle}" if self.bundle else self.metadata_url


def _tuf_refusal(exc: Exception) -> OtaRefused:
    if isinstance(exc, tuf_exc.UnsignedMetadataError):
        return OtaRefused(f"refused: signature check failed: {exc}")
    if isinstance(exc, tuf_exc.BadVersionNumberError):
        return OtaRefused(f"refused: replayed old metadata: {exc}")
    if isinstance(exc, tuf_exc.ExpiredMetadataError):
        return OtaRefused(f"refused: metadata expired (stale or frozen source): {exc}")
    if isinstance(exc, tuf_exc.LengthOrHashMismatchError):
        return OtaRefused(f"refused: metadata altered: {exc}")
    if isinstance(exc, tuf_exc.DownloadError):
        cause = exc.__cause__ or exc.__context__
        detail = f"{exc} {cause or ''}".strip() or type(exc).__name__
        return OtaRefused(f"cannot fetch update metadata: {detail}")
    return OtaRefused(f"refused: {exc}")


class Installer:
    """Check and install updates for one box; `say` receives every decision."""

    def __init__(
        self,
        config: OtaConfig,
        say: Callable[[str], None] | None = None,
        clock: TrustedClock | None = None,
    ) -> None:
        self.config = config
        self._say = say or (lambda _msg: None)
        self.clock = clock or config.clock()

    def say(self, msg: str) -> None:
        log.info("%s", msg)
        self._say(msg)

    # -- state ---------------------------------------------------------------

    @property
    def metadata_dir(self) -> Path:
        return self.config.state_dir / "metadata"

    def failed_versions(self) -> list[str]:
        return failed_versions(self.config.state_dir)

    def record_failed(self, version: str) -> None:
        record_failed(self.config.state_dir, version)

    def _bootstrap_root(self) -> bytes | None:
        """The shipped root unless the cache already trusts a newer one."""
        try:
            shipped = self.config.trusted_root.read_bytes()
        except OSError as exc:
            raise OtaRefused(
                f"no trusted TUF root at {self.config.trusted_root} ({exc.strerror}): "
                "this image was built without one (MOAT_OTA_ROOT)"
            ) from exc
        try:
            cached = (self.metadata_dir / "root.json").read_bytes()
            cached_v = Metadata[Root].from_bytes(cached).signed.version
            if cached_v >= Metadata[Root].from_bytes(shipped).signed.version:
                return None
        except (OSError, ValueError, tuf_exc.RepositoryError):
            pass
        return shipped

    # -- check ---------------------------------------------------------------

    def check(self, source: Source) -> Candidate:
        """TUF-verify the source and pick the update for this box, or refuse."""
        now = self.clock.now()
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        try:
            updater = _Updater(
                now,
                metadata_dir=str(self.metadata_dir),
                metadata_base_url=source.metadata_url,
                target_base_url=source.targets_url,
                fetcher=source.fetcher,
                config=UpdaterConfig(max_root_rotations=64),
                bootstrap=self._bootstrap_root(),
            )
            updater.refresh()
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as exc:
            raise _tuf_refusal(exc) from exc
        except ValueError as exc:  # e.g. unparsable metadata
            raise OtaRefused(f"refused: malformed metadata: {exc}") from exc
        self.say(
            f"metadata from {source.describe()} verified (trusted time {now:%F %T}Z)"
        )

        name, version = self._choose(self._verified_targets())
        target = updater.get_targetinfo(name)
        if target is None:  # pragma: no cover - chosen from the same metadata
            raise OtaRefused(f"refused: target {name} vanished")
        digest = target.hashes.get("sha256", "")
        return Candidate(name, target, version, f"{source.targets_url}{digest}.{name}")

    def _verified_targets(self) -> dict[str, TargetFile]:
        # written by the Updater only after every check above passed
        md = Metadata[Targets].from_file(str(self.metadata_dir / "targets.json"))
        return md.signed.targets

    def _choose(self, targets: dict[str, TargetFile]) -> tuple[str, str]:
        cfg = self.config
        mine: list[tuple[tuple[int, ...], str, str]] = []
        boards: set[str] = set()
        for name, t in targets.items():
            moat = (t.custom or {}).get("moat") if isinstance(t.custom, dict) else None
            if not isinstance(moat, dict) or moat.get("product") != cfg.product:
                continue
            boards.add(str(moat.get("board")))
            if moat.get("board") != cfg.board:
                continue
            try:
                mine.append(
                    (parse_version(str(moat.get("version"))), name, moat["version"])
                )
            except VersionError:
                log.warning("target %s has a bad version; ignored", name)
        if not mine and boards:
            raise OtaRefused(
                f"refused: wrong board: update is for {', '.join(sorted(boards))}, "
                f"this box is {cfg.board}"
            )
        if not mine:
            raise OtaRefused(f"refused: no {cfg.product} image in this source")
        _, name, version = max(mine)
        floor = bootenv.load(cfg.store()).state.floor
        if not is_newer(version, floor):
            raise OtaRefused(
                f"refused: older version: {version} is not above the installed "
                f"floor {floor}"
            )
        if version in self.failed_versions():
            raise OtaRefused(
                f"refused: version {version} already failed to prove itself here"
            )
        return name, version

    # -- install -------------------------------------------------------------

    def install(self, source: Source) -> str:
        """Install the update into the idle slot and put it on trial."""
        cand = self.check(source)
        store = self.config.store()
        state = bootenv.load(store).state
        running = self.config.running()
        if running != state.good or state.trial not in (NO_SLOT,):
            raise OtaRefused(
                f"refused: running slot {running} is not proven good yet "
                f"(good={state.good}, on trial={state.trial}); try after it is"
            )
        idle = bootenv.other_slot(running)
        slot = Slot(idle, self.config.slots[idle])
        algs = [a for a in cand.target.hashes if a in SUPPORTED_HASHES]
        if not algs:
            raise OtaRefused("refused: target lists no sha256/sha512 hash")
        if cand.target.length > slot.capacity():
            raise OtaRefused(
                f"refused: image ({cand.target.length} bytes) larger than slot "
                f"{idle} ({slot.capacity()} bytes)"
            )

        # first pass for a local bundle: nothing is written if it is altered
        assert source.fetcher is not None or source.bundle is None
        fetcher = source.fetcher or self._http_fetcher()
        if source.bundle is not None:
            try:
                digests = self._hash_stream(fetcher, cand, algs)
            except (tuf_exc.DownloadError, OSError) as exc:
                raise OtaRefused(f"refused: image unreadable in bundle: {exc}") from exc
            self._verify_digests(cand, digests, "image in bundle")
            self.say(f"image {cand.name} in bundle matches its signed hashes")

        # stream into the idle slot
        self.say(f"writing {cand.name} ({cand.target.length} bytes) to slot {idle}")
        bootenv.save(store, lambda s: _with_version(s, idle, NO_SLOT))
        try:
            digests = slot.write_stream(
                fetcher.fetch(cand.url), cand.target.length, algs
            )
            self._verify_digests(cand, digests, "streamed image")
            self._verify_digests(
                cand, slot.readback(cand.target.length, algs), "image read back"
            )
        except (OtaRefused, SlotError, tuf_exc.DownloadError, OSError) as exc:
            slot.invalidate()
            raise OtaRefused(
                f"{exc}; slot {idle} was overwritten and is marked empty, "
                f"slot {running} still boots"
            ) from exc

        # last write: switch the boot slot
        tries = self.config.tries
        bootenv.save(
            store,
            lambda s: _on_trial(_with_version(s, idle, cand.version), idle, tries),
        )
        self.say(
            f"installed {cand.version} in slot {idle}; it boots next with "
            f"{tries} tries, slot {running} ({state.versions[running]}) stays fallback"
        )
        return idle

    def _http_fetcher(self) -> FetcherInterface:
        from tuf.ngclient import Urllib3Fetcher

        return Urllib3Fetcher()

    def _hash_stream(
        self, fetcher: FetcherInterface, cand: Candidate, algs: list[str]
    ) -> dict[str, str]:
        hashers = {a: hashlib.new(a) for a in algs}
        left = cand.target.length
        for chunk in fetcher.fetch(cand.url):
            chunk = chunk[:left]
            for h in hashers.values():
                h.update(chunk)
            left -= len(chunk)
            if left == 0:
                break
        if left:
            raise OtaRefused(f"refused: altered image: {left} bytes short")
        return {a: h.hexdigest() for a, h in hashers.items()}

    def _verify_digests(
        self, cand: Candidate, digests: dict[str, str], what: str
    ) -> None:
        for alg, digest in digests.items():
            if cand.target.hashes[alg] != digest:
                raise OtaRefused(
                    f"refused: altered image: {what} {alg} {digest[:16]}... does not "
                    f"match the signed {cand.target.hashes[alg][:16]}..."
                )


def _with_version(state: BootState, slot: str, version: str) -> BootState:
    from dataclasses import replace

    return replace(state, versions={**state.versions, slot: version})


def _on_trial(state: BootState, slot: str, tries: int) -> BootState:
    from dataclasses import replace

    return replace(state, trial=slot, tries=tries)
