"""Running generations: the service that prepares and finishes them, workers and replicas, jobs and their
store, loading the resident models, warm-up and metrics."""
