# syntax=docker/dockerfile:1
# Images of the Kubernetes deployment (k8s/), versions pinned to pyproject.toml (tests/test_k8s.py checks):
#   docker build -t mann-search:0.1.0-ray2.60.0 .                               Ray head/worker (default target)
#   docker build --target mlflow -t mann-search-mlflow:0.1.0-mlflow3.17.2 .    MLflow tracking server
#   docker build --target optuna-dashboard -t mann-search-optuna-dashboard:0.1.0-optuna-dashboard0.21.0 .
#                                                     optuna-dashboard (optional, k8s/optuna-dashboard)
# All run as uid 1000 (the Ray image's `ray` user, group 100), never as root.

# The MLflow version of the server and of the clients in the Ray image: one pin for both.
ARG MLFLOW_VERSION=3.17.2

# ---------------------------------------------------------------------------------------------------------------
# MLflow tracking server: a small CPU image (the server needs neither Ray nor torch), PostgreSQL driver included.
FROM python:3.11.13-slim AS mlflow
ARG MLFLOW_VERSION
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --no-cache-dir "mlflow==${MLFLOW_VERSION}" "psycopg2-binary==2.9.13" \
    && useradd --uid 1000 --gid 100 --create-home --home-dir /home/mlflow --shell /usr/sbin/nologin mlflow
USER 1000:100
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--host", "0.0.0.0", "--port", "5000"]

# ---------------------------------------------------------------------------------------------------------------
# optuna-dashboard on the Optuna study's PostgreSQL database (optional: k8s/optuna-dashboard). The Optuna pin is
# the Ray image's, so the dashboard reads the schema the searcher writes.
FROM python:3.11.13-slim AS optuna-dashboard
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --no-cache-dir "optuna-dashboard==0.21.0" "optuna==5.0.0" "psycopg2-binary==2.9.13" \
    && useradd --uid 1000 --gid 100 --create-home --home-dir /home/optuna --shell /usr/sbin/nologin optuna
USER 1000:100
WORKDIR /home/optuna
EXPOSE 8080
ENTRYPOINT ["optuna-dashboard"]
CMD ["--host", "0.0.0.0", "--port", "8080"]

# ---------------------------------------------------------------------------------------------------------------
# Ray head/worker image: the pinned Ray release with CUDA, the project's pinned dependencies and the project.
FROM rayproject/ray:2.60.0-py311-gpu AS ray
ARG MLFLOW_VERSION
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# torch from PyPI is the CUDA build on Linux x86_64 (it brings its CUDA libraries; the node needs the NVIDIA
# driver only). The other pins are the versions the test suite runs with, inside pyproject.toml's ranges;
# psycopg2 is the driver of the Optuna study's PostgreSQL storage (MANN_OPTUNA_STORAGE, k8s/raycluster).
RUN pip install --no-cache-dir \
        "torch==2.13.0" \
        "ray[default,tune]==2.60.0" \
        "optuna==5.0.0" \
        "mlflow==${MLFLOW_VERSION}" \
        "numpy==2.4.6" \
        "pillow==13.0.0" \
        "pyyaml==6.0.4" \
        "matplotlib==3.11.2" \
        "ninja==1.13.2" \
        "psycopg2-binary==2.9.13"
# The project folder is also the Ray job's working_dir (k8s/rayjob/rayjob.yaml): `mann-search run
# configs/search/cluster.yaml` resolves from here.
WORKDIR /home/ray/mann-search
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 mann ./mann
COPY --chown=1000:100 search ./search
COPY --chown=1000:100 configs ./configs
RUN pip install --no-cache-dir --no-deps . \
    && mann --help > /dev/null && mann-search --help > /dev/null
USER 1000:100
# The fused model's C++ time loops (CPU workers; CUDA runs the same steps from Python), built once into the image
# where the base image has a C++ compiler; without one this prints a warning and CPU workers use the Python loops.
ENV TORCH_EXTENSIONS_DIR=/home/ray/.cache/torch_extensions
RUN python -c "from mann.fused import extension; print('C++ time loops:', 'built' if extension() else 'unavailable')"
