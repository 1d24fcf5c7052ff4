# The Sequencer image: worker, webhook app, CLI and migrations (docker-compose.yml picks
# the command). Python 3.11 like the project; no dev tools, no Temporal binaries.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . /app
RUN pip install . \
    && useradd --create-home --uid 10001 sequencer \
    && chown -R sequencer /app
USER sequencer

EXPOSE 8000
CMD ["uvicorn", "webhooks.app:app", "--host", "0.0.0.0", "--port", "8000"]
