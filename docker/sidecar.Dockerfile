# llmfdw sidecar, CPU: SmolLM2 (llama.cpp via xllamacpp) and all-MiniLM-L6-v2 (sentence-transformers),
# both shipped inside PyPI packages, so the image needs no model download.
#   docker build -f docker/sidecar.Dockerfile -t llmfdw/sidecar:0.3.0 .      (from the repository root)
# Runs as uid 10001; group postgres (gid 999, the official postgres image's) exists so that the
# colocated shape can pass --socket-group postgres.
FROM python:3.11.14-slim-bookworm AS build
WORKDIR /src
COPY requirements.txt requirements-nodeps.txt setup.py pyproject.toml ./
COPY proto ./proto
COPY sidecar ./sidecar
COPY fdw/llm_tables ./fdw/llm_tables
COPY fdw/multicorn ./fdw/multicorn
# torch 2.13.0 from PyTorch's CPU index (2.13.0+cpu): from PyPI alone it would be the multi-GB CUDA build.
RUN python -m venv /opt/llmfdw \
 && /opt/llmfdw/bin/pip install --no-cache-dir pip==26.3 \
 && /opt/llmfdw/bin/pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && /opt/llmfdw/bin/pip install --no-cache-dir -r requirements.txt \
 && /opt/llmfdw/bin/pip install --no-cache-dir --no-deps -r requirements-nodeps.txt \
 && /opt/llmfdw/bin/pip install --no-cache-dir --no-deps --no-build-isolation .

FROM python:3.11.14-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 999 postgres \
 && groupadd --gid 10001 llmfdw \
 && useradd --uid 10001 --gid 10001 --groups postgres --home-dir /home/llmfdw --create-home \
      --shell /usr/sbin/nologin llmfdw
COPY --from=build /opt/llmfdw /opt/llmfdw
ENV PATH=/opt/llmfdw/bin:$PATH HOME=/home/llmfdw HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 50051 9090
# Kubernetes checks health with grpc probes (helm/); an image HEALTHCHECK would need a client binary.
# checkov:skip=CKV_DOCKER_2: health is the gRPC health service, probed by Kubernetes (helm/templates)
ENTRYPOINT ["python", "-m", "llm_sidecar.server"]
CMD ["--listen", "0.0.0.0:50051", "--metrics-port", "9090", "--metrics-address", "0.0.0.0"]
