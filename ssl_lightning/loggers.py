"""A W&B logger that falls back to offline mode instead of crashing or hanging.

``wandb.init`` in online mode raises at once without an API key and can stall on an unreachable
server, so the decision is taken before the run starts: offline when there is no key (neither
``WANDB_API_KEY`` nor a netrc entry for the W&B host) or when a short TCP connect to the host
fails. An explicit ``WANDB_MODE`` is respected and skips the connect; ``offline=True`` forces
offline. Offline runs land in ``<save_dir>/wandb/offline-run-*`` and upload later with
``wandb sync <that directory>``.
"""

from __future__ import annotations

import netrc
import os
import socket
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn

DEFAULT_HOST = "https://api.wandb.ai"
EXPLICIT_OFFLINE_MODES = ("offline", "dryrun", "disabled")


def wandb_host() -> str:
    """Host name of the W&B server (``WANDB_BASE_URL`` or api.wandb.ai)."""
    return urlparse(os.environ.get("WANDB_BASE_URL", DEFAULT_HOST)).hostname or "api.wandb.ai"


def has_api_key(host: str) -> bool:
    """Whether a W&B API key is configured, read without any network access."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(entry and entry[2])


def is_reachable(host: str, timeout: float) -> bool:
    """Whether a TCP connection to ``host``:443 opens within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def offline_reason(timeout: float) -> str | None:
    """Why the run must be offline, or None when online logging can work (or WANDB_MODE decides)."""
    mode = os.environ.get("WANDB_MODE")
    if mode in EXPLICIT_OFFLINE_MODES:
        return None
    host = wandb_host()
    if not has_api_key(host):
        return f"no W&B API key (set WANDB_API_KEY or run `wandb login`) for {host}"
    if mode is None and not is_reachable(host, timeout):
        return f"{host} did not answer within {timeout:g} s"
    return None


class SafeWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` that switches to offline mode when online logging cannot work.

    Args:
        project, name, tags, group, save_dir, log_model: as in ``WandbLogger`` / ``wandb.init``
            (``log_model=False``: checkpoints are not uploaded as artifacts).
        offline: force offline mode.
        probe_timeout: seconds to wait for the W&B host before falling back to offline.
        **kwargs: passed on to ``WandbLogger`` and ``wandb.init``.

    The switch is announced once, on rank zero. Other ranks never log (Lightning's default), so
    they skip the probe.
    """

    def __init__(
        self,
        project: str | None = "ssl-lightning",
        name: str | None = None,
        tags: list[str] | None = None,
        group: str | None = None,
        save_dir: str = ".",
        log_model: bool | Literal["all"] = False,
        offline: bool = False,
        probe_timeout: float = 3.0,
        **kwargs: Any,
    ):
        if not offline and rank_zero_only.rank == 0:
            reason = offline_reason(probe_timeout)
            if reason is not None:
                rank_zero_warn(
                    f"SafeWandbLogger: logging to W&B offline because {reason}. "
                    f"Upload later with `wandb sync {Path(save_dir) / 'wandb'}/offline-run-*`."
                )
                offline = True
        super().__init__(
            project=project, name=name, tags=tags, group=group, save_dir=save_dir, log_model=log_model,
            offline=offline, **kwargs,
        )
