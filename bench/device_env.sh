# Sourced by the bench/*_check.sh device scripts, from the repository root: installs the carried wheels of .whl/
# (trio, quart, hypercorn, cattrs, ...: what the GPU machine lacks) into /tmp/site unless SKIP_WHEELS is set, puts
# them and the checkout on PYTHONPATH, and sets the environment every check shares. A failed install ends the script.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -z "${SKIP_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
