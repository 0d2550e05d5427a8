"""SafeWandbLogger: offline fallback without a key or a reachable server; no test touches the network."""

import re
import socket

import lightning as L
import pytest
import wandb

from ssl_lightning import loggers
from ssl_lightning.callbacks import SpectrumCallback
from ssl_lightning.loggers import SafeWandbLogger

from helpers.monitoring_stubs import FixedEmbeddings, StubMethod
from helpers.paths import CONFIGS

REAL_PROBE = loggers.is_reachable
#: the server wandb talks to when nothing overrides its default (it changes between wandb versions)
WANDB_DEFAULT_URL = wandb.Settings().base_url


def closed_local_url() -> str:
    """An http URL on this machine where nothing listens: connecting is refused at once, no network needed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def no_wandb_credentials(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    # Any probe would mean a network call: fail loudly instead.
    monkeypatch.setattr(loggers, "is_reachable", lambda url, timeout: pytest.fail("probed the network"))


@pytest.mark.timeout(120)
def test_fit_without_key_logs_offline_with_metrics_in_summary(tmp_path, no_wandb_credentials):
    with pytest.warns(UserWarning, match="offline because no W&B API key"):
        logger = SafeWandbLogger(project="test", save_dir=str(tmp_path), tags=["ci"])
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=logger, callbacks=[SpectrumCallback()],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(StubMethod(FixedEmbeddings(40)))
    try:
        summary = dict(logger.experiment.summary)
        assert {"rankme/feats", "rankme/embeds", "erank/feats", "alpha_req/feats"} <= set(summary)
        assert summary["rankme/num_samples"] == 40
    finally:
        logger.experiment.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_unreachable_server_switches_to_offline_and_says_so(monkeypatch, no_wandb_credentials):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    probed = []
    monkeypatch.setattr(loggers, "is_reachable", lambda url, timeout: probed.append((url, timeout)) or False)
    expected = rf"offline because {re.escape(WANDB_DEFAULT_URL)} did not answer within 0\.5 s"
    with pytest.warns(UserWarning, match=expected) as caught:
        logger = SafeWandbLogger(probe_timeout=0.5)
    assert probed == [(WANDB_DEFAULT_URL, 0.5)]
    assert logger._offline
    assert len([w for w in caught if "SafeWandbLogger" in str(w.message)]) == 1


def test_key_and_reachable_server_stay_online_and_explicit_offline_mode_skips_probe(monkeypatch, no_wandb_credentials):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(loggers, "is_reachable", lambda url, timeout: True)
    assert loggers.offline_reason(1.0) is None
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(loggers, "is_reachable", lambda url, timeout: pytest.fail("probed despite WANDB_MODE"))
    assert loggers.offline_reason(1.0) is None


@pytest.mark.timeout(60)  # hang guard: a refused connection answers at once
def test_probe_asks_the_server_named_in_wandbs_settings_file(tmp_path, monkeypatch, no_wandb_credentials):
    url = closed_local_url()
    (tmp_path / "wandb-config").mkdir()
    (tmp_path / "wandb-config" / "settings").write_text(f"[default]\nbase_url = {url}\n")  # `wandb login --host`
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(loggers, "is_reachable", REAL_PROBE)
    with pytest.warns(UserWarning, match=rf"offline because {re.escape(url)} did not answer"):
        logger = SafeWandbLogger(save_dir=str(tmp_path), probe_timeout=5)
    assert logger._offline


@pytest.mark.timeout(60)  # hang guard: a refused connection answers at once
def test_explicit_online_mode_with_an_unreachable_server_fails_at_start_up(tmp_path, monkeypatch, no_wandb_credentials):
    url = closed_local_url()
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", url)
    monkeypatch.setattr(loggers, "is_reachable", REAL_PROBE)
    expected = rf"WANDB_MODE=online but {re.escape(url)} did not answer within 5 s.*WANDB_MODE=offline"
    with pytest.raises(ConnectionError, match=expected):
        SafeWandbLogger(save_dir=str(tmp_path), probe_timeout=5)


def test_netrc_key_counts_as_a_key(tmp_path, monkeypatch, no_wandb_credentials):
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert loggers.has_api_key("api.wandb.ai")
    assert not loggers.has_api_key("other.example")



@pytest.mark.timeout(120)
def test_cli_uploads_the_resolved_config_to_the_wandb_run(tmp_path, no_wandb_credentials):

    from ssl_lightning.cli import main

    configs = CONFIGS
    with pytest.warns(UserWarning, match="offline"):
        cli = main([
            "fit", "--config", str(configs / "quickstart.yaml"), "--config", str(configs / "logger" / "wandb.yaml"),
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
            "--trainer.callbacks", "[]", "--trainer.default_root_dir", str(tmp_path),
        ])
    try:
        uploaded = dict(cli.trainer.logger.experiment.config)["cli"]
        assert uploaded["model"]["init_args"]["temperature"] == 0.2
        assert uploaded["data"]["class_path"].endswith("Digits") and uploaded["trainer"]["max_epochs"] == 1
    finally:
        cli.trainer.logger.experiment.finish()
