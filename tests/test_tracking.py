"""MLflow tracking: default store location, reachability check, params/metrics/artifacts, fail-soft logging."""

import json
import socket
import time
from pathlib import Path

import pytest

from nanovlm import tracking
from nanovlm.config import configs_to_dict, preset


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (a fresh one takes seconds to create its tables)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracking.check_tracking_store(uri)
    return uri, root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_default_store_is_sqlite_under_nanovlm_home(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("NANOVLM_HOME", str(tmp_path))
    assert tracking.default_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking.artifact_root(tracking.default_tracking_uri()) == (tmp_path.resolve() / "mlartifacts").as_uri()


def test_default_store_is_under_home_dot_nanovlm(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("NANOVLM_HOME", raising=False)
    assert tracking.default_tracking_uri() == f"sqlite:///{Path.home().resolve()}/.nanovlm/mlflow.db"


def test_mlflow_tracking_uri_overrides_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOVLM_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.default_tracking_uri() == "http://127.0.0.1:5000"
    assert tracking.artifact_root("http://127.0.0.1:5000") is None


def test_relative_sqlite_uri_resolves_against_working_dir(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert tracking.sqlite_path("sqlite:///sub/x.db") == tmp_path.resolve() / "sub" / "x.db"
    assert tracking.sqlite_path("sqlite:////abs/x.db") == Path("/abs/x.db")
    assert tracking.absolute_uri("sqlite:///sub/x.db") == f"sqlite:///{tmp_path.resolve()}/sub/x.db"
    assert tracking.absolute_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_unreachable_server_fails_fast_with_the_uri_in_the_message():
    uri = f"http://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(tracking.TrackingError, match=f"{uri}.*unreachable"):
        tracking.check_tracking_store(uri, timeout_s=3)
    assert time.monotonic() - start < 30  # a bound against hanging, not a speed test


def test_file_store_is_refused_with_a_sqlite_suggestion(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(tracking.TrackingError, match="sqlite"):
        tracking.check_tracking_store(tmp_path.as_uri())


def test_unwritable_sqlite_directory_is_reported(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(tracking.TrackingError, match="a_file"):
        tracking.check_tracking_store(f"sqlite:///{blocker / 'mlflow.db'}")


def test_flatten_config_uses_dataclass_field_names():
    vlm, train = preset("tiny", lr_mp=0.002)
    params = tracking.flatten_config(configs_to_dict(vlm, train))
    assert params["lm_n_blocks"] == "3"
    assert params["lr_mp"] == "0.002"
    assert params["tokenizer_path"] == "None"
    assert json.loads(params["vlm_extra_tokens"]) == {"image_token": "<|image|>"}
    assert len(params) == len(vlm.to_dict()) + len(train.to_dict())


def test_run_records_params_tags_metrics_and_artifacts(store, tmp_path):
    uri, root = store
    vlm, train = preset("tiny")
    config = configs_to_dict(vlm, train)
    tags = tracking.run_tags(config, preset="tiny", world_size=2, device_type="cpu")
    run_id = tracking.create_run(config, uri=uri, experiment_name="t-records", tags=tags)

    run = tracking.TrackingRun(run_id, uri, flush_every=2)
    for step in (1, 2, 3):
        run.log_metrics({"loss": 1.0 / step, "tokens_per_second": 100.0 * step}, step=step)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    run.log_artifacts(tmp_path / "ckpt", "checkpoint")
    run.end()

    client = tracking._client(uri)
    got = client.get_run(run_id)
    assert got.data.params == {k: str(v) if not isinstance(v, dict) else json.dumps(v, sort_keys=True)
                               for section in config.values() for k, v in section.items()}
    assert got.data.tags["preset"] == "tiny" and got.data.tags["world_size"] == "2"
    assert got.data.tags["device_type"] == "cpu" and got.data.tags["dataset"] == "shapes"
    assert got.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    # artifacts sit next to the database, not in the working directory
    assert got.info.artifact_uri.startswith((root / "mlartifacts").as_uri())
    assert [f.path for f in client.list_artifacts(run_id, "checkpoint")] == ["checkpoint/config.json"]


def test_runs_carry_mlflow_context_tags_in_a_model_training_experiment(store):
    uri, _ = store
    run_id = tracking.create_run(configs_to_dict(*preset("tiny")), uri=uri, experiment_name="t-context",
                                 tags={"preset": "tiny"})
    client = tracking._client(uri)
    tags = client.get_run(run_id).data.tags
    assert tags["mlflow.user"] and tags["mlflow.source.name"] and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.git.commit"] == tracking.git_commit() and tags["preset"] == "tiny"
    kind = client.get_experiment_by_name("t-context").tags[tracking.EXPERIMENT_KIND_TAG]
    assert kind == "custom_model_development"


def test_an_existing_experiment_without_a_kind_is_tagged_when_logged_to(store):
    uri, _ = store
    client = tracking._client(uri)
    made_elsewhere = client.create_experiment("t-untagged")
    genai = client.create_experiment("t-genai", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    assert tracking.get_or_create_experiment(uri, "t-untagged") == made_elsewhere
    tracking.get_or_create_experiment(uri, "t-genai")
    assert client.get_experiment(made_elsewhere).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert client.get_experiment(genai).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"  # a kind is kept


def test_a_run_record_names_the_run_only_in_its_own_store(tmp_path):
    tracking.write_run_record(tmp_path, "abc123", "sqlite:////data/mlflow.db")
    assert tracking.recorded_run_id(tmp_path, "sqlite:////data/mlflow.db") == "abc123"
    assert tracking.recorded_run_id(tmp_path, "sqlite:////elsewhere/mlflow.db") is None
    assert tracking.recorded_run_id(tmp_path / "no-record", "sqlite:////data/mlflow.db") is None


def test_child_run_carries_its_parent_id(store):
    uri, _ = store
    config = configs_to_dict(*preset("tiny"))
    parent = tracking.create_run(config, uri=uri, experiment_name="t-nested")
    child = tracking.create_run(config, uri=uri, experiment_name="t-nested", parent_run_id=parent)
    assert tracking._client(uri).get_run(child).data.tags[tracking.PARENT_RUN_TAG] == parent


def test_a_tracking_hiccup_is_logged_and_the_metrics_are_sent_later(store, caplog):
    uri, _ = store
    run_id = tracking.create_run(configs_to_dict(*preset("tiny")), uri=uri, experiment_name="t-hiccup")
    run = tracking.TrackingRun(run_id, uri, flush_every=1)
    real = tracking._client(uri)

    class FlakyClient:
        calls = 0

        def log_batch(self, *args, **kwargs):
            FlakyClient.calls += 1
            if FlakyClient.calls == 1:
                raise ConnectionError("store went away")
            return real.log_batch(*args, **kwargs)

    run._client_obj = FlakyClient()
    run.log_metrics({"loss": 2.0}, step=1)      # fails, stays buffered, no exception
    assert run.failures == 1 and "training continues" in caplog.text
    run.log_metrics({"loss": 1.0}, step=2)      # succeeds and sends both
    assert [(m.step, m.value) for m in real.get_metric_history(run_id, "loss")] == [(1, 2.0), (2, 1.0)]


def test_logging_to_a_dead_server_never_raises(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    run = tracking.TrackingRun("0123", f"http://127.0.0.1:{_free_port()}", flush_every=1)
    run.log_metrics({"loss": 1.0}, step=1)
    run.set_tags({"a": "b"})
    run.end()
    assert run.failures >= 3 and len(run._pending) == 1  # still buffered for a later flush
