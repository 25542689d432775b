# syntax=docker/dockerfile:1
# One image for every pod of the platform: Ray head and workers, job drivers and submitters, and
# the MLflow tracking server. How to build it: docs/deploy.md; CI builds and runs it for real
# (scripts/build-image.sh, tests/test_container.py).
#
# The default base is Ray's CUDA 12.8 image of the Ray version we pin, which KubeRay can run, and
# torch is the CUDA 12.8 build to match. Any base with bash and python3 (>= 3.11, with venv) works:
# CI uses a local Debian bookworm base and the CPU torch wheel.
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-cu128

# Extra wheels for pip's --find-links. Empty here; a build may replace it with a folder, e.g.
# `--build-context wheels=/opt/wheels` (CI: the CPU torch wheel, which the build cannot download).
FROM scratch AS wheels

FROM ${BASE_IMAGE}
USER 0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# KubeRay's examples run as uid 1000 (user `ray`, group 100 in rayproject/ray); other bases get one.
RUN getent passwd 1000 >/dev/null || useradd --uid 1000 --gid 100 --create-home --home-dir /home/ray --shell /bin/bash ray
# A virtualenv of our own: the same layout on any base, and the base's Python left as it is.
RUN python3 -m venv /opt/venv

# Layers from the slowest-changing to the fastest, so editing the code reinstalls only the code.
# The optional `ca` secret is a CA bundle for networks whose HTTPS goes through an intercepting
# proxy; a secret mount is never stored in a layer. torch comes first, from its own index, so the
# project's requirements find it satisfied.
ARG TORCH_SPEC="torch==2.13.0+cu128"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN --mount=type=secret,id=ca --mount=type=bind,from=wheels,target=/wheels \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    /opt/venv/bin/pip install --find-links /wheels --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

# The project's requirements, read from pyproject.toml (with the `server` and `optuna` extras: the
# image also runs the MLflow server and Tune sweeps), with Ray pinned to the RayCluster's version
# (chart value ray.version): head, workers and job submitter must all run the same Ray.
ARG RAY_VERSION=2.60.0
COPY pyproject.toml /tmp/metaplatform/
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    python3 -c 'import tomllib, sys; p = tomllib.load(sys.stdin.buffer)["project"]; extra = p["optional-dependencies"]; print("\n".join(p["dependencies"] + extra["server"] + extra["optuna"] + extra["pipelines"]))' \
        < /tmp/metaplatform/pyproject.toml > /tmp/requirements.txt \
    && /opt/venv/bin/pip install -r /tmp/requirements.txt "ray[default,train,tune]==${RAY_VERSION}" \
    && rm /tmp/requirements.txt

# The project itself, not editable: the wheel puts metaplatform.pth and metaplatform_hook.py into
# site-packages, which makes `platform.*` importable from any directory (docs/architecture.md).
COPY README.md metaplatform.pth metaplatform_hook.py /tmp/metaplatform/
COPY platform/ /tmp/metaplatform/platform/
COPY pipelines/ /tmp/metaplatform/pipelines/
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    /opt/venv/bin/pip install --no-deps /tmp/metaplatform \
    && /opt/venv/bin/pip check \
    && rm -rf /tmp/metaplatform

# KubeRay starts Ray through a login shell (`/bin/bash -lc -- "ray start ..."`), whose /etc/profile
# may reset PATH (Debian's does): the venv goes back in front for login shells too.
RUN echo "case \":\$PATH:\" in *:/opt/venv/bin:*) ;; *) PATH=\"/opt/venv/bin:\$PATH\" ;; esac; export PATH" \
        > /etc/profile.d/metaplatform-venv.sh

# The presets, so `--config configs/<preset>.yaml` works in the working directory of every pod.
COPY configs/ /opt/metaplatform/configs/
ENV PATH=/opt/venv/bin:${PATH} \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/metaplatform
USER 1000:100
CMD ["python", "-m", "platform.train", "--help"]
