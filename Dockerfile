# GPU image for both trainers. Unbuilt on the project's CPU-only machines: it installs the project with the same
# scripts/install.sh that CI runs, then swaps in CUDA builds of JAX and PyTorch.
#   docker build -t gpt2 .
#   docker run --gpus all --rm -v $PWD/runs:/app/runs -v $PWD/data:/app/data gpt2 \
#       .venv/bin/python scripts/train_jax.py --config small
#   docker run --gpus all --rm --ipc=host -v $PWD/runs:/app/runs -v $PWD/data:/app/data gpt2 \
#       .venv/bin/torchrun --standalone --nproc_per_node=8 scripts/train_torch.py --config small
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip make git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . /app
RUN scripts/install.sh .venv test \
    && .venv/bin/pip install --quiet "jax[cuda12]" \
    && .venv/bin/pip install --quiet --force-reinstall --no-deps torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
ENV XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true
CMD [".venv/bin/python", "scripts/train_jax.py", "--config", "small"]
