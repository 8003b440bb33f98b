# Runtime image: slim Python, non-root, the same start command as `make run` (python -m service serve).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MICROTASKS_VAR=/var/lib/microtasks \
    HOST=0.0.0.0 \
    PORT=8402

WORKDIR /app
COPY pyproject.toml setup.cfg README.md openapi.yaml ./
COPY service ./service
COPY endpoints ./endpoints
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --home-dir /var/lib/microtasks --create-home microtasks

USER microtasks
EXPOSE 8402
HEALTHCHECK --interval=15s --timeout=3s --retries=3 \
    CMD ["python", "-c", "import urllib.request,os;urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\",\"8402\")}/healthz',timeout=2)"]
CMD ["python", "-m", "service", "serve"]
