#!/bin/sh
# kiln-fetch-models: fill the model cache volume with what Kiln's servers load, so that a
# replica starts in seconds instead of downloading, and servers can run with KILN_OFFLINE=1.
# It runs in either service image (both hold huggingface_hub's `hf` and rembg): the Kubernetes
# Job `models-fetch`, or `docker compose --profile fetch run --rm fetch-models`. Safe to rerun:
# files already in the cache are skipped. The model ids are the servers' own settings.
#
#   HF_HOME                        Hugging Face cache root (images: /models/huggingface)
#   U2NET_HOME                     rembg's model folder (images: /models/rembg)
#   KILN_IMG2IMG__MODEL__ID        default stable-diffusion-v1-5/stable-diffusion-v1-5
#   KILN_IMG2IMG__MODEL__REVISION  default: the default branch
#   KILN_MESH__MODEL__ID           default stabilityai/TripoSR
#   KILN_MESH__MODEL__REVISION     default: the default branch
#   KILN_MESH__TRIPOSR__REMBG_MODEL default u2net
set -eu

img2img="${KILN_IMG2IMG__MODEL__ID:-stable-diffusion-v1-5/stable-diffusion-v1-5}"
mesh="${KILN_MESH__MODEL__ID:-stabilityai/TripoSR}"
rembg_model="${KILN_MESH__TRIPOSR__REMBG_MODEL:-u2net}"

revision() {
  if [ -n "$1" ]; then printf -- '--revision=%s' "$1"; else printf -- '--revision=main'; fi
}

echo "img2img: $img2img"
# The diffusers pipeline without the safety checker's weights (Kiln loads it with
# safety_checker=None): configs, tokenizer, scheduler, and the fp16 (CUDA) and full-precision
# (CPU) safetensors of the UNet, VAE and text encoder. About 8 GB.
hf download "$img2img" "$(revision "${KILN_IMG2IMG__MODEL__REVISION:-}")" \
  --include model_index.json \
  --include '*/config.json' \
  --include '*/*_config.json' \
  --include 'tokenizer/*' \
  --include '*/diffusion_pytorch_model.safetensors' \
  --include '*/diffusion_pytorch_model.fp16.safetensors' \
  --include 'text_encoder/model.safetensors' \
  --include 'text_encoder/model.fp16.safetensors'

echo "mesh: $mesh"
# The files TripoSR's loader asks for (kiln_mesh.providers.triposr_local.WEIGHT_FILES).
hf download "$mesh" "$(revision "${KILN_MESH__MODEL__REVISION:-}")" \
  --include config.yaml \
  --include vit_config.json \
  --include model.safetensors \
  --include model.ckpt

echo "rembg: $rembg_model"
# The server's own loader, allowed to download this once, puts the file where it will look.
python -c "
import sys
from kiln_mesh.background import BackgroundRemover
BackgroundRemover(model_name=sys.argv[1], offline=False).load()
" "$rembg_model"

echo "model cache filled"
