"""Pretrained weights by name: `--weights NAME` (torchvision's weight enum of the arch: IMAGENET1K_V1,
IMAGENET1K_V2, DEFAULT) and `--pretrained` (DEFAULT), as files in the torch hub cache.

torchvision keeps such a file at torch.hub.get_dir()/checkpoints/<the URL's file name> ($TORCH_HOME/hub, else
~/.cache/torch/hub), the file name carrying the first hex digits of its sha256. Start-up (`ensure_file`) finds
it there, or downloads it where the network answers within seconds; a machine without a network and without
the file gets one line naming the file, where to put it and the URL to fetch it from. The weights then load as
`--finetune-from`'s do (`start_file`: one path for both; a classifier of another size is replaced).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision

from rn50.config.errors import NodeWideError
from rn50.config.recipe import Model
from rn50.system.dist import DistEnv, barrier

PROBE_TIMEOUT_S = 3.0  # how long the download host (or the proxy) may take to accept a connection
READ_TIMEOUT_S = 60.0  # a download whose socket stays silent this long fails, never hangs start-up


@dataclass(frozen=True)
class Named:
    """Torchvision's weights of one arch by name: `given` as typed, `name` the enum member it resolves to
    (DEFAULT: IMAGENET1K_V2 for resnet50), its URL and the file in this machine's hub cache."""
    arch: str
    given: str
    name: str
    enum: str  # "ResNet50_Weights.IMAGENET1K_V2"
    url: str

    @property
    def path(self) -> Path:
        """Where torchvision's load_state_dict_from_url keeps it (read at each call: TORCH_HOME may change)."""
        return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(self.url).path)

    @property
    def hash_prefix(self) -> str:
        """The published file's sha256 begins with these hex digits (torch.hub's file-name convention)."""
        found = torch.hub.HASH_REGEX.search(self.path.name)
        return found.group(1) if found else ""

    def describe(self) -> str:
        """"resnet50's IMAGENET1K_V2 weights (DEFAULT)": what the run starts from, and what was typed."""
        return f"{self.arch}'s {self.name} weights" + (f" ({self.given})" if self.given != self.name else "")


FILE_INSTEAD = "pass the file with --finetune-from FILE"  # rn50.train's way to give weights by their file


def named(arch: str, given: str, instead: str = FILE_INSTEAD) -> Named:
    """The weights `given` names for `arch`: a member of its enum (any case), DEFAULT, or the enum's full name
    (`ResNet50_Weights.IMAGENET1K_V2`). Anything else is one line listing the arch's names; `instead`: the
    command's way to give a file."""
    enum = torchvision.models.get_model_weights(arch)
    members = {key.upper(): member for key, member in enum.__members__.items()}  # DEFAULT: an alias
    key = given.upper().removeprefix(f"{enum.__name__}.".upper())
    if key not in members:
        names = ", ".join(members)
        raise NodeWideError(f"--weights {given} is not a name of {arch}'s weights in torchvision "
                            f"({enum.__name__}): one of {names} (DEFAULT: {enum.DEFAULT.name}); or {instead}")
    member = members[key]
    return Named(arch, given, member.name, f"{enum.__name__}.{member.name}", member.url)


def start_file(spec: Model) -> tuple[str, str] | None:
    """The file the starting weights come from and how to name them: --finetune-from's, or --weights' in the
    hub cache (its enum's name); None without either."""
    if spec.weights:
        weights = named(spec.arch, spec.weights)
        return str(weights.path), f"{weights.enum} ({weights.path})"
    return (spec.finetune_from, spec.finetune_from) if spec.finetune_from else None


def ensure_file(weights: Named, fetch: bool, wait, progress: bool, instead: str = FILE_INSTEAD) -> Path:
    """The weights' file in the hub cache, downloaded first where it is missing, `fetch` is true (one process
    per node fetches) and the host answers; `wait`: after the fetch, every process waits for its node's (a
    barrier). A file still missing is one line naming it, where to put it and its URL."""
    path, why = weights.path, f"no connection to {urlparse(weights.url).hostname} within {PROBE_TIMEOUT_S:g} s"
    if fetch and not path.is_file() and online(weights.url):
        why = download(weights, progress)
    wait()
    if not path.is_file():
        raise NodeWideError(f"{weights.describe()} are not on this machine and could not be downloaded ({why}): "
                            f"fetch {weights.url} and put it at {path} (torch's hub cache; TORCH_HOME moves it), or "
                            f"{instead}")
    return path


def online(url: str) -> bool:
    """Whether the URL's host (or the HTTPS proxy, where one is set) accepts a connection within
    PROBE_TIMEOUT_S. In a thread of its own: a resolver that never answers (getaddrinfo takes no timeout)
    costs PROBE_TIMEOUT_S, not minutes."""
    target = urlparse(urllib.request.getproxies().get(urlparse(url).scheme) or url)
    port = target.port or (443 if target.scheme == "https" else 80)
    answered = []

    def probe():
        try:
            socket.create_connection((target.hostname, port), timeout=PROBE_TIMEOUT_S).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 1.0)
    return bool(answered)


def download(weights: Named, progress: bool) -> str:
    """torch.hub's download into the cache (a temporary file renamed when whole, its sha256 checked against
    the file name's), with a read timeout; returns why it failed ("" when it did not)."""
    weights.path.parent.mkdir(parents=True, exist_ok=True)
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(READ_TIMEOUT_S)  # urlopen in torch.hub takes no timeout of its own
    try:
        torch.hub.download_url_to_file(weights.url, str(weights.path), weights.hash_prefix or None, progress)
        return ""
    except Exception as exc:  # any failure leaves the file missing: ensure_file's one line says what to do
        return f"the download failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        socket.setdefaulttimeout(before)


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_or_named(given: Path, arch: str | None) -> Path:
    """rn50.evaluate's --weights: a file, or, where it names none (a bare word such as IMAGENET1K_V2),
    torchvision's weights of that name for `arch` (the recipe's default without --arch), from the hub cache or
    downloaded. Every process fetches for itself: torch.hub writes a temporary file and renames it when whole."""
    if given.exists() or given.suffix or given.parent != Path("."):
        return given
    instead = f"give the path of a file to --weights (no file is named {given})"
    weights = named(arch or Model().arch, str(given), instead)
    return ensure_file(weights, fetch=True, wait=lambda: None, progress=True, instead=instead)


RECORD_KEYS = ("weights_file", "weights_sha256", "weights_enum", "weights_url")  # at_start's record


def at_start(spec: Model, env: DistEnv, saved_recipe: dict | None) -> tuple[dict, list[str]]:
    """Start-up's part (rn50.reliability.lifecycle.start, before the run folder exists): --weights' file found
    or fetched (each node's local rank 0 fetches), else one line. Returns the record of what the run starts
    from, for recipe.json and every checkpoint's recipe (RECORD_KEYS: the file, its sha256 as rank 0 computes
    it, and for --weights the resolved enum and its URL), and a note where the file is not the one torchvision
    publishes under its name. A resumed run (`saved_recipe`: its checkpoint's recipe) starts from the
    checkpoint: it carries the record on and needs no file."""
    if saved_recipe is not None:
        return {k: v for k, v in saved_recipe.items() if k in RECORD_KEYS}, []
    weights = named(spec.arch, spec.weights) if spec.weights else None
    if weights is not None:
        ensure_file(weights, fetch=env.local_rank == 0, wait=barrier, progress=env.is_main)
    path = str(weights.path) if weights is not None else spec.finetune_from
    if not path or not env.is_main:
        return {}, []
    record = {"weights_file": path, "weights_sha256": sha256(path)}
    if weights is None:
        return record, []
    record.update(weights_enum=weights.enum, weights_url=weights.url)
    if record["weights_sha256"].startswith(weights.hash_prefix):
        return record, []
    return record, [f"note: {path} is not the file torchvision publishes as {weights.enum} (its sha256 begins "
                    f"{record['weights_sha256'][:8]}, the published one's {weights.hash_prefix}); training starts "
                    "from it all the same"]
