"""What MLflow 3's UI reads from the experiments and runs we create, on a real SQLite store:
the experiment kind tag and the context tags mlflow.start_run would set."""

from mlflow.tracking import MlflowClient

from pipeline import tracking


def test_experiments_are_tagged_model_training_and_runs_get_context_tags(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(uri)
    old = c.create_experiment("made-before")  # one of ours from before the tag
    chosen = c.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    run_id, _ = tracking.open_run(uri, "fresh", "r1", {"a": 1}, {"x": "y"})
    tracking.open_run(uri, "made-before", "r2", {}, {})
    tracking.open_run(uri, "chosen", "r3", {}, {})
    kind = "mlflow.experimentKind"
    assert c.get_experiment_by_name("fresh").tags[kind] == "custom_model_development"
    assert c.get_experiment(old).tags[kind] == "custom_model_development"
    assert c.get_experiment(chosen).tags[kind] == "genai_development"  # someone's choice is kept
    tags = c.get_run(run_id).data.tags
    expected = tracking.context_tags()
    assert {k: tags[k] for k in expected} == expected and tags["x"] == "y"
    assert set(expected) >= {"mlflow.user", "mlflow.source.name", "mlflow.source.type"}
    assert tags["mlflow.source.type"] == "LOCAL"
    if tracking.git_commit():
        assert tags["mlflow.source.git.commit"] == tracking.git_commit()
    # Given context (a sweep's driver's) wins over this process's.
    given = {"mlflow.user": "someone", "mlflow.source.name": "driver.py"}
    rid, _ = tracking.open_run(uri, "fresh", "r4", {}, {}, given)
    tags = c.get_run(rid).data.tags
    assert tags["mlflow.user"] == "someone" and tags["mlflow.source.name"] == "driver.py"
    assert "mlflow.source.type" not in tags
