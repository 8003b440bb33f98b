# Runtime image: slim Python, runtime dependencies only (wheels built in a throwaway stage), non-root,
# several server processes on one port, and the same start command the tests use (python -m service serve).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml setup.cfg README.md openapi.yaml ./
COPY service ./service
COPY endpoints ./endpoints
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MICROTASKS_VAR=/var/lib/microtasks \
    HOST=0.0.0.0 \
    PORT=8402 \
    WEB_WORKERS=4
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --home-dir /var/lib/microtasks --create-home microtasks
WORKDIR /var/lib/microtasks
USER 10001
EXPOSE 8402
HEALTHCHECK --interval=15s --timeout=3s --retries=3 \
    CMD ["python", "-c", "import urllib.request,os;urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\",\"8402\")}/healthz',timeout=2)"]
CMD ["python", "-m", "service", "serve"]
