"""A W&B logger that falls back to offline mode, or fails at start-up, instead of crashing mid-run.

``wandb.init`` in online mode raises at once without an API key, and with a key but no network it
retries for minutes until the first log stops the run. So the decision is taken before the run
starts, against the server wandb itself will use (``WANDB_BASE_URL``, else the settings file that
``wandb login --host`` writes, else wandb's default, which changes between wandb versions):

- ``WANDB_MODE`` (or the settings file's mode) ``offline``, ``dryrun`` or ``disabled``: respected,
  nothing probed; ``offline=True`` forces offline.
- no API key (neither ``WANDB_API_KEY`` nor a netrc entry for the server's host): offline.
- otherwise a short TCP connect to the server. When it fails: offline, or, when ``WANDB_MODE``
  explicitly asks for online logging, a ``ConnectionError`` at once, before training.

Offline runs land in ``<save_dir>/wandb/offline-run-*`` and upload later with
``wandb sync <that directory>``.
"""

from __future__ import annotations

import netrc
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn

if TYPE_CHECKING:
    import wandb

OFFLINE_MODES = ("offline", "dryrun", "disabled")


def wandb_settings() -> wandb.Settings:
    """The settings ``wandb.init`` starts from, loaded as wandb's own setup does: its defaults, then
    the settings file (``WANDB_CONFIG_DIR``/settings), then ``WANDB_*`` variables."""
    import wandb

    settings = wandb.Settings(quiet=True)  # quiet: wandb.init announces the settings file itself
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR", "~/.config/wandb")).expanduser()
    settings.settings_system = str(config_dir / "settings")
    settings.update_from_system_settings()
    settings.update_from_env_vars(dict(os.environ))
    return settings


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


def is_reachable(url: str, timeout: float) -> bool:
    """Whether a TCP connection to ``url``'s server (its port, else the scheme's) opens within ``timeout`` s."""
    parsed = urlparse(url)
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def offline_reason(timeout: float) -> str | None:
    """Why the run must log offline, or None when online logging can work (or the mode is offline already).

    Raises ConnectionError when ``WANDB_MODE`` asks for online logging and the server does not answer."""
    settings = wandb_settings()
    if settings.mode in OFFLINE_MODES:
        return None
    url = settings.base_url
    host = urlparse(url).hostname
    if not has_api_key(host):
        return f"no W&B API key (set WANDB_API_KEY or run `wandb login`) for {host}"
    if is_reachable(url, timeout):
        return None
    unreachable = f"{url} did not answer within {timeout:g} s"
    explicit_mode = os.environ.get("WANDB_MODE")
    if explicit_mode:
        raise ConnectionError(
            f"WANDB_MODE={explicit_mode} but {unreachable}: wandb would retry for minutes and then stop "
            "the run at its first log. Check the network (or WANDB_BASE_URL), set WANDB_MODE=offline to log "
            "offline and upload later with `wandb sync`, or unset WANDB_MODE to fall back to offline by itself."
        )
    return unreachable


class SafeWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` that switches to offline mode when online logging cannot work.

    Args:
        project, name, tags, group, save_dir, log_model: as in ``WandbLogger`` / ``wandb.init``
            (``log_model=False``: checkpoints are not uploaded as artifacts).
        offline: force offline mode.
        probe_timeout: seconds to wait for the W&B server before falling back to offline (or, with
            ``WANDB_MODE=online``, before failing).
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
