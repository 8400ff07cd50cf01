# dscluster image: one image for every pod (MPI launcher, MPI workers, Trainer nodes, LWS pods).
#
#   docker build -t registry.example.com/dscluster:0.1.0 .
#
# CUDA runtime base: the torch wheels bring their own CUDA libraries, the base brings a matching
# user-space runtime and the NVIDIA container toolkit conventions (NVIDIA_VISIBLE_DEVICES, ...).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python 3.11 (deadsnakes on Ubuntu 22.04), with headers for DeepSpeed's just-in-time ops;
# OpenMPI (mpirun/orted; libopenmpi-dev for mpi4py); ssh, because the MPI Operator's and the
# Trainer's launchers start ranks on the other pods over ssh; g++ and ninja for DeepSpeed's JIT
# ops; curl, procps (pgrep, pkill) and bash for the exec probes and the launcher and sshd wrappers
# (SIGTERM handling) the rendered manifests use.
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gnupg ca-certificates \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
      python3.11 python3.11-venv python3.11-dev \
      openmpi-bin libopenmpi-dev \
      openssh-server openssh-client \
      g++ ninja-build \
      curl procps iproute2 bash \
 && apt-get purge -y software-properties-common \
 && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/*

RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}

# torch first and pinned, alone: installing it together with the rest lets pip pick another build.
# The PyPI wheel for Linux x86_64 is the CUDA build; set TORCH_INDEX_URL to pick another CUDA line
# (for example https://download.pytorch.org/whl/cu128).
ARG TORCH_INDEX_URL=
RUN pip install --upgrade pip \
 && pip install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url ${TORCH_INDEX_URL}}

WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[mpi]" \
 && rm -rf /src

# Ranks started by mpirun over ssh get sshd's default PATH, not this image's ENV: put the entry
# points where that PATH looks.
RUN ln -s /opt/venv/bin/dscluster /usr/local/bin/dscluster \
 && ln -s /opt/venv/bin/python /usr/local/bin/python

# sshd for MPI workers. The operators mount the job's key pair and authorized_keys into ~/.ssh
# (sshAuthMountPath, /root/.ssh here); host keys are generated at build time and pods do not pin
# them (hosts are pods of the same job, resolved through the cluster DNS).
RUN mkdir -p /run/sshd \
 && ssh-keygen -A \
 && printf 'PermitRootLogin prohibit-password\nPasswordAuthentication no\nStrictModes no\nUseDNS no\n' \
      > /etc/ssh/sshd_config.d/dscluster.conf \
 && printf 'Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n' \
      > /etc/ssh/ssh_config.d/dscluster.conf

# DeepSpeed caches its compiled ops here; writable by any user.
ENV TORCH_EXTENSIONS_DIR=/var/cache/torch_extensions
RUN mkdir -p ${TORCH_EXTENSIONS_DIR} && chmod 1777 ${TORCH_EXTENSIONS_DIR}

WORKDIR /
EXPOSE 8000 29500 22
CMD ["dscluster", "--help"]
