# clip-search, CPU image. One image serves both deployments:
#   single process:  docker run -p 61000:61000 -v clip-index:/workspace -v clip-models:/models clip-search:0.1.0
#                    (gateway, encoder and every shard as processes of `python -m clip_search`)
#   docker-compose:  docker-compose.yml runs one container per executor and per shard with `jina executor ...`
# Build: docker build -t clip-search:0.1.0 .

# --- build: annlite compiles its HNSW/PQ extensions from source, so the compilers stay in this stage
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements.lock pyproject.toml README.md ./
COPY clip_search clip_search
COPY executors executors
COPY flows flows
# The lock pins every package; the CPU index makes torch==2.14.1 the small CPU build (2.14.1+cpu).
# For a GPU image, build with --build-arg TORCH_INDEX=https://pypi.org/simple.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX}" -c requirements.lock .

# --- run: the installed project (mini::shapes is bundled in the package), no compilers, not root
FROM python:3.11-slim
RUN useradd --create-home --uid 10001 clip \
    && mkdir /workspace /models \
    && chown clip:clip /workspace /models
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# CLIP_SEARCH_CACHE: real weights (e.g. ViT-B-32::openai) are downloaded once into the /models volume
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    JINA_HIDE_SURVEY=1 \
    CLIP_SEARCH_CACHE=/models
USER clip
# the index (one folder per shard) and the model cache; a new named volume takes the owner `clip`
VOLUME ["/workspace", "/models"]
EXPOSE 61000
# the single-process service; compose and Kubernetes give each executor a check of its own
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["jina", "ping", "gateway", "grpc://127.0.0.1:61000"]
ENTRYPOINT ["python", "-m", "clip_search"]
# search_flow.yml is shipped inside the package (clip_search/flows)
CMD ["search_flow.yml", "--workspace", "/workspace", "--model", "mini::shapes"]
