# clip-search in one container: the gateway, the encoder and every indexer shard run as processes
# of `python -m clip_search`. Build: docker build -t clip-search .   Run: see docker-compose.yml.
FROM python:3.11-slim

# annlite builds its HNSW/PQ extensions from source
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
COPY clip_search clip_search
COPY executors executors
COPY flows flows

# The lock pins every package; the CPU index makes torch==2.14.1 the small CPU build (2.14.1+cpu).
# For a GPU image, build with --build-arg TORCH_INDEX=https://pypi.org/simple.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX}" -c requirements.lock .

ENV JINA_HIDE_SURVEY=1 \
    CLIP_SEARCH_CACHE=/models
VOLUME ["/workspace", "/models"]
EXPOSE 61000
ENTRYPOINT ["python", "-m", "clip_search"]
CMD ["flows/search_flow.yml", "--workspace", "/workspace", "--model", "mini::shapes"]
