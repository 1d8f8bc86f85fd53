"""DeepSpeed wrapping and distributed init, MLflow tracking, checkpoint IO, cluster files."""
