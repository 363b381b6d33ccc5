"""`transferlab compare`: the pipeline runs of an experiment side by side,
grouped by the data set they ran on (the parent run's `dataset` tag)."""

import time

from transferlab import compare


def test_runs_are_grouped_by_data_set_and_last_keeps_the_newest_of_each(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("compare")

    def pipeline(dataset: str, backbone: str, accuracy: float) -> None:
        with mlflow.start_run(experiment_id=experiment, tags={"stage": "pipeline", "dataset": dataset}):
            mlflow.log_params({"backbone.name": backbone, "backbone.weights": "imagenet"})
            mlflow.log_metric("test_accuracy", accuracy)
        time.sleep(0.01)  # start times a millisecond apart at least: "latest" is well defined

    pipeline("cifar10-jpeg.tar.gz@aa", "vgg16", 0.90)
    pipeline("parts@bb", "vgg16", 0.95)
    pipeline("cifar10-jpeg.tar.gz@aa", "vgg16", 0.85)  # the newest on CIFAR: --last 1 keeps it
    pipeline("parts@bb", "resnet50", 0.92)
    rows = compare.collect("compare", last=1)  # a group per data set (not all runs by accuracy)
    assert [(r["dataset"], r["backbone"], r["test_accuracy"]) for r in rows] == [
        ("cifar10-jpeg.tar.gz@aa", "vgg16", 0.85), ("parts@bb", "vgg16", 0.95), ("parts@bb", "resnet50", 0.92)]
    assert "| dataset | backbone |" in compare.markdown(rows)
