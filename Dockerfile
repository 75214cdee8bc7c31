# evo2-recipe on the NGC PyTorch image the reference recipe uses (torch + Transformer Engine preinstalled).
# Not built in our CI (no Docker engine there); the install itself is the tested .ci_build.sh.
FROM nvcr.io/nvidia/pytorch:26.04-py3
WORKDIR /workspace/evo2-recipe
COPY . .
# .ci_build.sh sees the container's torch and creates .venv with --system-site-packages, so TE stays in use.
RUN EVO2_PYTHON=/usr/bin/python3 bash .ci_build.sh
ENV VIRTUAL_ENV=/workspace/evo2-recipe/.venv PATH=/workspace/evo2-recipe/.venv/bin:$PATH
CMD ["bash"]
