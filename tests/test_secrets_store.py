"""Issue 8 item 9, end to end: a secret given to any entry point never reaches a byte of the store
(registry, WAL, blobs, ``runs/<id>/*.json``). Each test feeds one entry point and greps the
whole store once SQLite is closed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from repro_core import ArtifactManager, ExperimentContext
from repro_core.ttrl import TTRLContext

MARK = "SUPERSECRET-MARKER-123"
JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0"
       ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")
SECRETS = (MARK.encode(), JWT.encode())


def _leaks(store_root: Path) -> list[str]:
    ArtifactManager.reset_instance()  # close SQLite so every byte is in the files
    files = [p for p in store_root.rglob("*") if p.is_file()]
    assert files, "nothing was stored"
    return [str(p.relative_to(store_root)) for p in files
            if any(s in p.read_bytes() for s in SECRETS)]


def test_init_run_config(manager: ArtifactManager, store_root: Path) -> None:
    manager.init_run("t", config={
        "lr": 0.1, "api_key": MARK, "db_password": MARK, "num_key_value_heads": 8,
        "db": {"url": f"postgres://admin:{MARK}@db:5432/x", "auth": {"jwt": JWT}},
        "headers": [{"Authorization": f"Bearer {MARK}"}], "notes": f"password: {MARK}",
    })
    manager.finalize_run()
    assert _leaks(store_root) == []


def test_state_reason(manager: ArtifactManager, store_root: Path) -> None:
    manager.init_run("t")
    manager.set_run_state("failed", reason=f"could not reach postgres://u:{MARK}@db/x "
                                           f"(token={MARK}, {JWT})")
    manager.finalize_run()
    assert _leaks(store_root) == []


def test_artifact_metadata(manager: ArtifactManager, store_root: Path) -> None:
    manager.init_run("t")
    manager.log_artifact("d", "dataset", data={"rows": 3}, metadata={
        "source": f"https://bot:{MARK}@data.example.com/x.parquet", "password": MARK,
        "headers": {"Authorization": f"Bearer {JWT}"}, "num_rows": 3,
    })
    manager.finalize_run()
    assert _leaks(store_root) == []


def test_exception_message_in_trace_reason_and_run_json(store_root: Path,
                                                        manager: ArtifactManager) -> None:
    with pytest.raises(ConnectionError), ExperimentContext(
        name="t", root=store_root, monitor_hardware=False, capture_level=1,
    ):
        raise ConnectionError(f"postgres://admin:{MARK}@db:5432/x refused; api_key={MARK}")
    assert _leaks(store_root) == []


def test_ttrl_update_and_experience_metadata(store_root: Path, manager: ArtifactManager) -> None:
    with TTRLContext(name="t", root=store_root, monitor_hardware=False, capture_level=1) as t:
        t.log_experience("e1", {"prompt": "2+2"}, {"answer": "4"},
                         metadata={"token": MARK, "judge_url": f"https://u:{MARK}@judge/x"})
        t.log_online_update("e1", reward=1.0, confidence=0.9, metadata={"password": MARK})
        t.log_online_update("e1", reward=0.5, confidence=0.8)  # no metadata: the fast path
    assert _leaks(store_root) == []


def test_ttrl_experience_data_keeps_field_names_loses_credentials(
    store_root: Path, manager: ArtifactManager
) -> None:
    """Inputs/outputs are data: a field called ``key`` stays; credential formats still go."""
    with TTRLContext(name="t", root=store_root, monitor_hardware=False, capture_level=1) as t:
        record = t.log_experience("e1", {"key": "A", "session": JWT},
                                  {"url": f"https://u:{MARK}@h/x"})
    assert record["input"] == {"key": "A", "session": "<redacted>"}
    assert _leaks(store_root) == []


def test_run_names_tags_and_metric_names(manager: ArtifactManager, store_root: Path) -> None:
    manager.init_run(f"run postgresql://u:{MARK}@h/db", tags=[f"Authorization: Bearer {MARK}",
                                                              "plain-tag"])
    manager.log_metrics({f"postgresql://u:{MARK}@h/db": 1.0, "loss": 0.5})
    manager.log_metrics({f"postgresql://u:{MARK}@h/db": 2.0})  # the same name, again
    run_id = manager.run_id
    manager.finalize_run()
    assert _leaks(store_root) == []
    fresh = ArtifactManager.reset_instance()
    fresh.set_root(store_root)
    metrics = fresh.get_metrics(run_id)
    assert [v for _, v, _ in metrics["postgresql://<redacted>@h/db"]] == [1.0, 2.0]
    assert "plain-tag" in fresh.get_run(run_id or "")["tags"]
