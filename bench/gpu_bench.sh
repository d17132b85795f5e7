#!/usr/bin/env bash
# The benchmark table on a GPU host that has JAX but no TensorFlow, Keras or DVC, in about
# 6 minutes (9 with the DINOv2-small rows): the extract rows of bench/extract_bench.py (bf16
# matmul ceiling, device-only forward, the project's extract end to end, on the ray engine too
# where Ray is installed, bare predict, the naive way, peak memory) at 224 px, for VGG16 and
# then DINOv2-small, then decode images/s. Python packages the host lacks come from wheels in
# .whl/, and the decode photo is .whl/retina.jpg; on the machine that prepares the run:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 \
#     -d .whl keras namex optree pydantic pydantic-core annotated-types typing-inspection \
#     filelock ruamel.yaml \
#     ray pandas python-dateutil pytz tzdata six msgpack protobuf click jsonschema \
#     jsonschema-specifications referencing rpds-py attrs typing-extensions
#   python3 bench/slim_ray_wheel.py .whl/ray-*.whl      # 79 MB -> 45 MB: all of .whl/ is 62 MiB
#   cp "$(python3 -c 'import skimage, os; print(os.path.dirname(skimage.__file__))')/data/retina.jpg" .whl/
#
# (the second and third lines of wheels are for the ray-engine row; without them it is skipped;
# for the DINOv2-small rows add keras-hub kagglehub kagglesdk tokenizers regex rich
# markdown-it-py mdurl pygments absl-py packaging requests urllib3 idna charset-normalizer
# certifi: where keras_hub does not import, they are skipped)
#
# then on the GPU host, from the repository root: bash bench/gpu_bench.sh
# IMAGES, SIZE, BATCH and PRECISION override the defaults (10000, 224, 256, mixed_bfloat16).
set -euo pipefail
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
fi
export KERAS_BACKEND="${KERAS_BACKEND:-jax}" TQDM_DISABLE=1
python3 -c "import jax; print('devices:', jax.devices())"
ray=()
if python3 -c "import ray.data" 2> /dev/null; then
  ray=(--ray)
else
  echo "row r (ray engine) skipped: Ray is not installed here (carry it as the header says)"
fi
timeout 300 python3 bench/extract_bench.py --size "${SIZE:-224}" --images "${IMAGES:-10000}" \
  --batch-size "${BATCH:-256}" --precision "${PRECISION:-mixed_bfloat16}" --repeats 1 "${ray[@]}"
if python3 -c "import keras_hub" 2> /dev/null; then
  timeout 200 python3 bench/extract_bench.py --backbone dinov2_small --size "${SIZE:-224}" \
    --images "${IMAGES:-10000}" --batch-size "${BATCH:-256}" --precision "${PRECISION:-mixed_bfloat16}" \
    --repeats 1 --layers block3:cls_avg,block6:cls_avg,final:cls_avg
else
  echo "DINOv2-small rows skipped: keras-hub is not installed here (carry it as the header says)"
fi
photo=()
[ -f .whl/retina.jpg ] && photo=(--photo .whl/retina.jpg)
timeout 60 python3 bench/decode_bench.py --images 300 "${photo[@]}"
