# ditcache with the ray extra, for Ray Serve and KubeRay (docker/ray-service.yaml). Build the base first:
#   docker build -t ditcache .
#   docker build -f docker/ray.Dockerfile -t ditcache-ray .
# KubeRay starts Ray in the container itself, so this image has no entrypoint of its own.
ARG BASE_IMAGE=ditcache:latest
FROM ${BASE_IMAGE}

USER root
# Keep in step with the ray extra of pyproject.toml.
RUN pip install "ray[serve]>=2.40,<3" "redis>=5"
USER ditcache

ENTRYPOINT []
CMD ["ditcache", "serve", "--backend", "ray"]
