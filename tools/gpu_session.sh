#!/usr/bin/env bash
# One GPU-machine session: kiln on PYTHONPATH, optional wheels, then the named parts,
# each logging under $OUT. Usage: tools/gpu_session.sh PART...   (parts: see the case below)
# tools/prepare_gpu_carry.sh makes .whl/ and .carry/ here first.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/pkg "$OUT"
ln -sfn "$PWD" /tmp/pkg/kiln
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
mkdir -p /tmp/smol  # the SmolLM2 GGUF travels in two halves, one a call; /tmp stays while the machine is warm
for half in .carry/smol1/part.aa .carry/smol2/part.ab; do [ -f $half ] && cp $half /tmp/smol/; done
smollm() {  # join the halves of the SmolLM2 GGUF and dequantize it into a checkpoint
  local gguf=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
  [ -f "$gguf" ] || cat /tmp/smol/part.aa /tmp/smol/part.ab > "$gguf"
  echo "a1231443440b107ff29f02bdb38c9d0a  $gguf" | md5sum -c - || { rm -f "$gguf"; return 1; }
  [ -d /tmp/smol/ckpt ] || python3 tools/gguf_to_checkpoint.py "$gguf" /tmp/smol/ckpt
}
for part in "$@"; do
  echo "=== $part $(date +%T)"
  case $part in
    env) nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)";;
    tests) KILN_SMOLLM2=$([ -d /tmp/smol/ckpt ] && echo /tmp/smol/ckpt) python3 -m pytest -m gpu -q -p no:cacheprovider \
             --noconftest tests/test_cuda_*.py tests/test_sampler.py 2>&1 | tee "$OUT/tests.log" | tail -25;;
    profile) python3 bench/profile_step.py --batch 1 256 --out "$OUT" 2>&1 | tee "$OUT/profile.log" | grep -v "^-\|^ " ;;
    smollm) smollm && python3 bench/profile_step.py --model /tmp/smol/ckpt --dtype bfloat16 --batch 1 64 --prefill 512 --out "$OUT" \
             2>&1 | tee "$OUT/smollm.log" | grep -v "^-\|^ ";;
    serving-kiln) python3 bench/serving.py --parts kiln long load --out "$OUT/serving-kiln.json" 2>&1 | tail -30;;
    serving-peers) python3 bench/serving.py --parts transformers static --out "$OUT/serving-peers.json" 2>&1 | tail -12;;
    smollm-serving) smollm && python3 bench/serving.py --model /tmp/smol/ckpt --parts kiln transformers --output-len 256 \
             --concurrency 1 --transformers-concurrency 1 --out "$OUT/smollm-serving.json" 2>&1 | tail -8;;
    smollm-test) smollm && KILN_SMOLLM2=/tmp/smol/ckpt python3 -m pytest -m gpu -q -p no:cacheprovider --noconftest \
             tests/test_cuda_backend.py -k smollm 2>&1 | tail -5;;
    agreement) smollm && python3 bench/agreement.py /tmp/smol/ckpt --out "$OUT/agreement.json" 2>&1 | grep "^{";;
    reference-shapes) python3 bench/reference_shapes.py 2>&1 | tail -12;;
    quant) for scheme in ${QUANT_SCHEMES:-none int8 int4 fp8}; do  # a process each: one engine's GPU memory at a time
             python3 bench/quantization.py --schemes $scheme ${QUANT_ARGS:-} --out "$OUT/quant-$scheme.json" 2>&1 \
               | grep -E '"pass": 2|Error|error:' | cut -c1-400
           done;;
    quant-kv) python3 bench/quantization.py --schemes ${QUANT_SCHEMES:-fp8} --kv-cache-dtype fp8 ${QUANT_ARGS:-} \
               --out "$OUT/quant-kv.json" 2>&1 | grep -E '"pass": 2|Error|error:' | cut -c1-400;;
    load) [ -d /tmp/l8 ] || python3 -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path
from import_llama8b import write_checkpoint; write_checkpoint(Path('/tmp/l8'), 32, 4096, 14336, 2048)"  # the bundled tokenizer's vocabulary
          [ -d /tmp/l8.kiln ] || python3 -m kiln.cli build /tmp/l8 --target cuda --max-batch-size 256 --max-seq-len 4096 \
             -o /tmp/l8.kiln 2>&1 | tail -2
          python3 bench/load/run.py /tmp/l8.kiln ${LOAD_ARGS:---users 256 --requests 3000 --run-time 150} --max-num-seqs 256 \
             --max-queued 512 --long-prompt-tokens 1500 --json "$OUT/load.json" 2>&1 | tail -30;;
    moe-layers) python3 bench/moe_layers.py ${MOE_ARGS:-} --out "$OUT/moe-layers.json" 2>&1 \
               | grep -E '"comparison"|"build"|Error' | cut -c1-600;;
    mla-kernels) python3 bench/mla_kernels.py --out "$OUT/mla-kernels.json" 2>&1 | cut -c1-600;;
    kernels) python3 bench/quantized_kernels.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" | cut -c1-600;;
    *) echo "unknown part $part";;
  esac
done
echo "=== done $(date +%T)"
