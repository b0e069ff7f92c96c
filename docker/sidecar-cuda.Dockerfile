# llmfdw sidecar, NVIDIA GPUs: the sidecar's vLLM engine (sidecar/llm_sidecar/engines/vllm.py targets vLLM 0.32).
#   docker build -f docker/sidecar-cuda.Dockerfile -t llmfdw/sidecar-cuda:0.3.0 .   (repository root)
# vLLM's wheel brings torch with its CUDA runtime libraries; the driver comes from the node (NVIDIA
# container toolkit / GPU operator). vLLM pins its own torch and transformers, so this image does not
# install requirements.txt (CPU torch, xllamacpp): only vLLM and the sidecar's own dependencies.
# Weights are not in the image: mount them (helm value sidecar.modelVolume, at /models).
FROM python:3.11.14-slim-bookworm AS build
WORKDIR /src
COPY setup.py pyproject.toml ./
COPY proto ./proto
COPY sidecar ./sidecar
COPY fdw/llm_tables ./fdw/llm_tables
COPY fdw/multicorn ./fdw/multicorn
RUN python -m venv /opt/llmfdw \
 && /opt/llmfdw/bin/pip install --no-cache-dir pip==26.3 \
 && /opt/llmfdw/bin/pip install --no-cache-dir vllm==0.32.0 grpcio==1.85.1 grpcio-health-checking==1.85.1 \
      grpcio-tools==1.85.1 prometheus_client==0.26.0 PyYAML==6.0.4 setuptools wheel \
 && /opt/llmfdw/bin/pip install --no-cache-dir --no-deps --no-build-isolation .

FROM python:3.11.14-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 libnuma1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 999 postgres \
 && groupadd --gid 10001 llmfdw \
 && useradd --uid 10001 --gid 10001 --groups postgres --home-dir /home/llmfdw --create-home \
      --shell /usr/sbin/nologin llmfdw
COPY --from=build /opt/llmfdw /opt/llmfdw
ENV PATH=/opt/llmfdw/bin:$PATH HOME=/home/llmfdw HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
    VLLM_WORKER_MULTIPROC_METHOD=spawn NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
EXPOSE 50051 9090
# checkov:skip=CKV_DOCKER_2: health is the gRPC health service, probed by Kubernetes (helm/templates)
ENTRYPOINT ["python", "-m", "llm_sidecar.server"]
CMD ["--listen", "0.0.0.0:50051", "--metrics-port", "9090", "--metrics-address", "0.0.0.0"]
